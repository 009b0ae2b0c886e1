"""Data-derived defaults are checked on held-back calibration samples (QuantConfig.holdout)."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import mxqn_onnx
from mxqn_onnx.calibration.calibrate import collect_histograms
from mxqn_onnx.calibration.data import input_specs, make_source
from mxqn_onnx.calibration.observers import TensorHistogram, TensorSample


def _conv_net(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 8, 1, 1)) * 0.4).astype(np.float32)
    w2 = (rng.standard_normal((4, 16, 3, 3)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    inits = [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             onnx.numpy_helper.from_array(w2, "w2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_held_back_rows_stay_out_of_channel_means_and_samples():
    x = np.arange(6 * 3 * 4, dtype=np.float32).reshape(6, 3, 4)
    h = TensorHistogram("t", channel_axis=1)
    h.update(x, channel_skip=2)
    np.testing.assert_allclose(h.channel_mean, x[2:].mean(axis=(0, 2)))
    assert h.total == x.size  # the histogram itself counts every value
    s = TensorSample("t", 3)
    s.update(x, skip=2)
    np.testing.assert_array_equal(s.array(), x[2:5])


def test_collect_histograms_holds_back_the_first_samples():
    model = _conv_net()
    x = np.random.default_rng(0).standard_normal((12, 8, 6, 6)).astype(np.float32)
    x[:4] += 5.0  # the held-back samples differ: their values must not reach the means
    source = make_source({"x": x}, input_specs(model), 5)
    hists, n, _ = collect_histograms(model, ["x"], source, channel_axes={"x": 1}, held_back=4,
                                     output_budget=x[0].nbytes * 3)
    assert n == 12
    np.testing.assert_allclose(hists["x"].channel_mean, x[4:].mean(axis=(0, 2, 3)), rtol=1e-5)


def test_bias_correction_dropped_where_held_back_samples_disagree(tmp_path):
    """Planted: the channel means of the held-back quarter are the opposite of the rest's, so
    the correction estimated on the rest makes the held-back error worse; the check must
    notice and keep a candidate without it, and the model must be that candidate."""
    model = _conv_net()
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((32, 8, 6, 6))).astype(np.float32) + 2.0
    x[:8] = -x[:8]  # held back: 8 of 32
    res = mxqn_onnx.quantize(model, {"x": x}, wbits=3, abits=8, act_quant="fixed")
    ho = res.holdout
    assert ho["held_back_samples"] == 8
    assert ho["sqnr_db"]["no bias correction"] > ho["sqnr_db"]["default"]
    assert ho["kept"] != "default"
    assert not any(d.bias_correction for d in res.layers)
    stored = json.loads(dict((p.key, p.value) for p in res.model.metadata_props)["mxqn"])
    assert stored["holdout"]["kept"] == ho["kept"]
    # that candidate took the default's choices minus the correction: the same as choosing
    # afresh without it (weights, rounding and activations do not depend on the correction)
    fresh = mxqn_onnx.quantize(model, {"x": x}, wbits=3, abits=8, act_quant="fixed", bias_correction=False)
    if ho["kept"] == "no bias correction":
        assert [d.to_dict() for d in res.layers] == [d.to_dict() for d in fresh.layers]
        assert [i.SerializeToString() for i in res.model.graph.initializer] == \
            [i.SerializeToString() for i in fresh.model.graph.initializer]
    assert fresh.holdout["sqnr_db"]["default"] == ho["sqnr_db"]["no bias correction"]
    # the same data without the check keeps the (harmful) correction
    off = mxqn_onnx.quantize(model, {"x": x}, wbits=3, abits=8, act_quant="fixed", holdout=False)
    assert off.holdout is None and any(d.bias_correction for d in off.layers)


def test_kept_candidate_is_the_best_on_held_back_samples(digits_model, digits_calib):
    res = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=8)
    ho = res.holdout
    assert ho is not None and len(ho["sqnr_db"]) >= 2
    assert ho["sqnr_db"][ho["kept"]] == max(ho["sqnr_db"].values())


def test_no_holdout_with_few_samples_or_without_verification(digits_model, digits_calib):
    x = np.load(digits_calib)
    few = {k: x[k][:6] for k in x.files if k != "labels"}
    assert mxqn_onnx.quantize(digits_model, few).holdout is None
    assert mxqn_onnx.quantize(digits_model, digits_calib, verify=False).holdout is None


def test_holdout_flag_is_validated():
    with pytest.raises(mxqn_onnx.MxqnError, match="holdout"):
        mxqn_onnx.quantize(_conv_net(), "random", holdout="yes")


def test_held_back_count_grows_with_the_calibration_set_up_to_32():
    """A quarter of the calibration samples, 2 to 32 (on 39 conversions 32 kept the test-best
    candidate 33 times against 26 for 8: docs/BENCHMARKS.md)."""
    from mxqn_onnx.calibration.data import HELD_BACK_MAX, held_back_count
    from mxqn_onnx.config import QuantConfig

    model = _conv_net()
    specs = input_specs(model)
    counts = {}
    for n in (7, 8, 20, 64, 100, 256, 1000):
        source = make_source({"x": np.zeros((n, 8, 6, 6), np.float32)}, specs, 16)
        counts[n] = held_back_count(QuantConfig(), source)
    assert counts == {7: 0, 8: 2, 20: 5, 64: 16, 100: 25, 256: 32, 1000: 32}
    assert HELD_BACK_MAX == 32
    # capped by calib_count, and nothing to check: nothing held back
    source = make_source({"x": np.zeros((256, 8, 6, 6), np.float32)}, specs, 16)
    assert held_back_count(QuantConfig(calib_count=20), source) == 5
    assert held_back_count(QuantConfig(bias_correction=False, rounding="nearest"), source) == 0


def test_held_back_samples_of_a_large_calibration_set_are_the_first_32(digits_model, digits_calib):
    """256 digits: 32 held back, every candidate measured on all of them, and verification
    goes on from that measurement."""
    res = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=8)
    assert res.holdout["held_back_samples"] == 32
    assert res.held_back_comparison.samples == 32
    assert res.comparison.samples >= 32


KEEP_ENDS = "first and last layer at 8 bits"


def test_first_and_last_layer_at_8_bits_is_a_candidate_below_8_bits(digits_model, digits_calib):
    """At 4 bits the check also converts with the first and last layer at keep_bits; that
    candidate is exactly the conversion with --keep-first --keep-last (its untouched layers
    taken from the default's choices: the same held-back figure to the last bit), and it is
    kept only where it measures best. On the digits CNN it is kept at both widths."""
    for abits in (8, 4):
        res = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=abits)
        ho = res.holdout
        assert KEEP_ENDS in ho["sqnr_db"]
        assert ho["sqnr_db"][ho["kept"]] == max(ho["sqnr_db"].values())
        explicit = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=abits,
                                      keep_first=True, keep_last=True)
        assert KEEP_ENDS not in explicit.holdout["sqnr_db"]  # set by hand: nothing to try
        assert explicit.holdout["sqnr_db"]["default"] == ho["sqnr_db"][KEEP_ENDS]
        bits = [d.weight.bits for d in res.layers]
        assert ho["kept"] == KEEP_ENDS  # 30.7 against 21.8 dB (W4A8), 23.0 against 15.4 dB (W4A4)
        assert bits[0] == bits[-1] == 8 and set(bits[1:-1]) == {4}
        assert res.config.keep_first and res.config.keep_last
        if explicit.holdout["kept"] == "default":  # else it wrote another of its candidates
            assert [d.to_dict() for d in res.layers] == [d.to_dict() for d in explicit.layers]


def test_keep_ends_not_tried_at_8_bits_off_or_by_hand(digits_model, digits_calib):
    assert KEEP_ENDS not in mxqn_onnx.quantize(digits_model, digits_calib).holdout["sqnr_db"]
    off = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=8, keep_ends="off")
    assert KEEP_ENDS not in off.holdout["sqnr_db"] and {d.weight.bits for d in off.layers} == {4}
    with pytest.raises(mxqn_onnx.MxqnError, match="keep_ends must be one of auto, off"):
        mxqn_onnx.quantize(digits_model, digits_calib, keep_ends="on")


def test_keep_ends_cli(tmp_path, digits_model, digits_calib):
    from conftest import run_cli

    out = tmp_path / "q.onnx"
    r = run_cli("convert", digits_model, out, "--calib", digits_calib, "--wbits", "4", "--keep-ends", "off")
    assert r.returncode == 0, r.stderr
    assert KEEP_ENDS not in r.stdout and "checked on 32 held-back" in r.stdout
    bad = run_cli("convert", digits_model, tmp_path / "b.onnx", "--calib", digits_calib, "--keep-ends", "yes")
    assert bad.returncode == 2 and "--keep-ends" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "b.onnx").exists()
