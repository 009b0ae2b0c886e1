"""Calibration statistics: sub-sampled histograms of large tensors, the pipelined calibration
loop, and the session helper that must leave the caller's model untouched."""

from math import gcd

import numpy as np
import onnx
import pytest

import mxqn_onnx
from mxqn_onnx.calibration.calibrate import collect_histograms, make_session
from mxqn_onnx.calibration.data import input_specs, make_source
from mxqn_onnx.calibration.observers import TensorHistogram, sample_stride
from mxqn_onnx.errors import MxqnError
from mxqn_onnx.quant import quantizers as Q


@pytest.mark.parametrize("shape,cap", [((16, 256, 56, 56), 1 << 20), ((4, 64, 30, 30), 10_000),
                                       ((7, 3, 5), 10), ((1000,), 999)])
def test_sample_stride_is_coprime_and_respects_the_cap(shape, cap):
    s = sample_stride(shape, cap)
    n = int(np.prod(shape))
    assert s > 1
    assert -(-n // s) <= cap  # ceil(n / s) values are sampled
    assert all(gcd(s, d) == 1 for d in shape if d > 1)


def test_no_sampling_below_the_cap_or_without_one():
    assert sample_stride((4, 8, 8), 256) == 1
    assert sample_stride((4, 8, 8), None) == 1


def test_sampled_histogram_keeps_totals_extremes_and_scores():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((8, 32, 40, 40)), 0).astype(np.float32) * \
        rng.lognormal(0, 0.5, (1, 32, 1, 1)).astype(np.float32)
    x[3, 5, 7, 11] = 50.0  # a lone outlier the sample will almost surely skip
    full, sub = TensorHistogram("full"), TensorHistogram("sub")
    full.update(x)
    sub.update(x, max_elements=40_000)
    stride = sample_stride(x.shape, 40_000)
    assert stride > 1
    assert abs(sub.total - full.total) < stride  # each sampled value stands for `stride` values
    assert (sub.min, sub.max) == (full.min, full.max) == (0.0, 50.0)  # extremes always exact
    for bits in (4, 8):
        a = Q.best_fxp_binned(full.bins(), bits, False)
        b = Q.best_fxp_binned(sub.bins(), bits, False)
        assert abs(a.frac - b.frac) <= 1
        assert abs(a.sqnr_db - b.sqnr_db) < 0.5
    # the zero bin (half of a ReLU output) keeps its share
    zero_share = lambda h: h.counts[0] / h.total  # noqa: E731
    assert zero_share(sub) == pytest.approx(zero_share(full), abs=0.01)


def test_sampled_update_still_sees_every_nan():
    x = np.ones((64, 64), dtype=np.float32)
    x[1, 1] = np.nan  # index 65: not a multiple of any stride the cap below gives
    h = TensorHistogram("t")
    with pytest.raises(ValueError, match="NaN or Inf"):
        h.update(x, max_elements=100)
    x[1, 1] = -np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        h.update(x, max_elements=100)


def test_sampled_histograms_still_merge_by_adding():
    rng = np.random.default_rng(1)
    a, b = (rng.laplace(size=(4, 50, 50)).astype(np.float32) for _ in range(2))
    h1, h2, both = TensorHistogram(), TensorHistogram(), TensorHistogram()
    h1.update(a, 1000)
    h2.update(b, 1000)
    both.update(a, 1000)
    both.update(b, 1000)
    np.testing.assert_array_equal(h1.merge(h2).counts, both.counts)


def test_channel_sums_match_a_direct_reduction():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 7, 9, 11)).astype(np.float32) + np.arange(7, dtype=np.float32)[None, :, None, None]
    h = TensorHistogram("t", channel_axis=1)
    h.update(x)
    h.update(x[:2])
    ref = (x.astype(np.float64).sum(axis=(0, 2, 3)) + x[:2].astype(np.float64).sum(axis=(0, 2, 3))) / (7 * 99)
    np.testing.assert_allclose(h.channel_mean, ref, rtol=1e-5)


def test_make_session_leaves_the_model_as_it_was(digits_model):
    m = onnx.load(str(digits_model))
    before = m.SerializeToString()
    inner = m.graph.node[3].output[0]
    s = make_session(m, [inner])
    assert inner in [o.name for o in s.get_outputs()]
    assert m.SerializeToString() == before


def test_pipelined_calibration_counts_every_sample_once(digits_model, digits_calib):
    m = onnx.load(str(digits_model))
    x = np.load(digits_calib)["input"][:37]  # 37 = 2 full batches of 16 and a partial one
    src = make_source(x, input_specs(m), 16)
    inner = [n.output[0] for n in m.graph.node if n.op_type == "Relu"][:2]
    hists, n, _ = collect_histograms(m, inner + ["input"], src)
    assert n == 37
    assert hists["input"].total == x.size
    per_sample = {t: hists[t].total / 37 for t in inner}
    assert all(v == int(v) and v > 0 for v in per_sample.values())


def test_a_failing_batch_is_reported_not_swallowed(digits_model):
    m = onnx.load(str(digits_model))
    batches = [{"input": np.ones((4, 1, 28, 28), np.float32)}, {"input": np.full((4, 1, 28, 28), np.nan, np.float32)}]
    with pytest.raises(MxqnError, match="NaN or Inf"):
        mxqn_onnx.quantize(m, batches, verify=False)


def test_histograms_do_not_depend_on_how_batches_are_cut(digits_model, digits_calib):
    m = onnx.load(str(digits_model))
    x = np.load(digits_calib)["input"][:70]
    names = [n.output[0] for n in m.graph.node if n.op_type == "Relu"][:4] + ["input"]
    axes = {n: 1 for n in names}
    whole, _, _ = collect_histograms(m, names, make_source(x, input_specs(m), 16), channel_axes=axes,
                                     output_budget=1 << 40)
    cut, _, _ = collect_histograms(m, names, make_source(x, input_specs(m), 16), channel_axes=axes,
                                   output_budget=30_000)  # a few samples per onnxruntime run
    for t in names:
        np.testing.assert_array_equal(whole[t].counts, cut[t].counts)
        assert (whole[t].min, whole[t].max) == (cut[t].min, cut[t].max)
        np.testing.assert_allclose(whole[t].channel_mean, cut[t].channel_mean, rtol=1e-5, atol=1e-7)


def test_reused_output_buffers_give_fresh_results(digits_model, digits_calib):
    from mxqn_onnx.calibration.calibrate import _ReusingRunner

    m = onnx.load(str(digits_model))
    names = [n.output[0] for n in m.graph.node if n.op_type == "Relu"][:3]
    session = make_session(m, names)
    runner = _ReusingRunner(session, names)
    x = np.load(digits_calib)["input"]
    feeds = [{"input": x[i:i + 4]} for i in range(0, 24, 4)]
    got = [[o.copy() for o in runner.run(f)] for f in feeds]  # copies: the buffers are reused
    assert runner.sets[0] is not None and runner.enabled  # the bound path was taken
    for f, outs in zip(feeds, got):
        for a, b in zip(session.run(names, f), outs):
            np.testing.assert_array_equal(a, b)
