"""``weight_granularity="auto"``: per tensor or per channel, judged on the channels' own SQNRs."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mxqn_onnx.quant import quantizers as Q
from mxqn_onnx.quant import weight_search as W
from mxqn_onnx.quant.choose import choose_weight


def _one_huge_channel(seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    w[0] *= 1000.0
    return w


def _channel_sqnrs(w, q):
    w64 = w.reshape(len(w), -1).astype(np.float64)
    e = (w64 - q.reshape(len(w), -1)) ** 2
    return 10 * np.log10(np.sum(w64 ** 2, axis=1) / np.sum(e, axis=1))


@pytest.mark.parametrize("bits", [8, 4])
def test_auto_goes_per_channel_when_one_channel_dwarfs_the_others(bits):
    w = _one_huge_channel()
    d = choose_weight(w, bits, "auto", 0, 0.5)
    assert d.granularity == "channel"
    q = Q.fxp_quantize(w, bits, d.frac_array(w.shape), True)
    assert np.all(np.count_nonzero(q[1:].reshape(3, -1), axis=1) > 0.8 * q[0].size)  # small channels kept
    assert np.all(_channel_sqnrs(w, q)[1:] > 6.02 * bits - 15)
    # the channels' own SQNRs, not the tensor-wide one, made the call
    assert d.sqnr_channels_mean_channel_db > d.sqnr_channels_mean_tensor_db + 10
    assert d.sqnr_channel_db < d.sqnr_tensor_db + 0.5


def test_the_tensor_wide_sqnr_alone_hides_the_lost_channels():
    # the old rule's failure, explicitly: one step for all channels keeps the tensor-wide SQNR
    # high (the large channel dominates it) while every small channel quantizes to zero
    w = _one_huge_channel()
    tensor = W.best_fxp_tensor(w, 8, True, above=0)
    _, ch_db = W.best_fxp_channels(w.reshape(4, -1), 8, True, above=0)
    assert tensor.sqnr_db > 35 and ch_db < tensor.sqnr_db + 0.5  # no tensor-wide gain to speak of
    q = Q.fxp_quantize(w, 8, tensor.frac, True)
    assert not np.any(q[1:])
    np.testing.assert_allclose(_channel_sqnrs(w, q)[1:], 0.0, atol=1e-9)
    # forced per tensor it is still so
    d = choose_weight(w, 8, "tensor", 0, 0.5)
    assert d.granularity == "tensor" and d.frac == tensor.frac


@pytest.mark.parametrize("bits", [8, 4])
def test_auto_keeps_one_step_when_the_channels_share_a_range(bits):
    rng = np.random.default_rng(1)
    w = rng.uniform(-1, 1, size=(16, 8, 3, 3)).astype(np.float32)
    w.reshape(16, -1)[:, 0] = 0.9  # every channel's largest magnitude in (0.5, 1]: one f0 for all
    d = choose_weight(w, bits, "auto", 0, 0.5)
    assert d.granularity == "tensor"
    assert abs(d.sqnr_channels_mean_channel_db - d.sqnr_channels_mean_tensor_db) < 0.5
    assert d.sqnr_channel_db is not None  # scored, not chosen


def test_zero_and_exact_channels_stay_finite():
    w = np.zeros((4, 6), np.float32)
    w[1] = 0.5  # exact on any grid that holds 0.5
    w[2] = np.linspace(-1e-3, 1e-3, 6)
    w[3] = np.linspace(-1, 1, 6)
    d = choose_weight(w, 8, "auto", 0, 0.5)
    cap = W.channel_sqnr_cap_db(8)
    for v in (d.sqnr_channels_mean_tensor_db, d.sqnr_channels_mean_channel_db):
        assert np.isfinite(v) and 0.0 <= v <= cap
    assert d.granularity == "channel"  # the tiny channel 2 is lost under the shared step
    z = choose_weight(np.zeros((3, 5), np.float32), 8, "auto", 0, 0.5)
    assert z.granularity == "tensor" and z.sqnr_channels_mean_tensor_db == z.sqnr_channels_mean_channel_db
    assert W.fxp_granularity(np.zeros((3, 5), np.float32), 8, True, 0).channel_gain_db == 0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10), st.integers(1, 30), st.sampled_from([2, 4, 8]), st.booleans(), st.integers(0, 2 ** 31))
def test_scores_agree_with_the_separate_searches(rows, cols, bits, clip, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, cols)).astype(np.float32) * 2.0 ** rng.integers(-8, 4, size=(rows, 1))
    if rng.random() < 0.3:
        w[rng.integers(0, rows)] = 0
    above = Q.FXP_SEARCH_ABOVE if clip else 0
    sc = W.fxp_granularity(w, bits, True, above)
    t = W.best_fxp_tensor(w, bits, True, above)
    fr, db = W.best_fxp_channels(w, bits, True, above)
    assert sc.tensor_frac == t.frac and np.array_equal(sc.channel_fracs, fr)
    assert sc.sqnr_tensor_db == pytest.approx(t.sqnr_db, abs=1e-9)
    assert sc.sqnr_channel_db == pytest.approx(db, abs=1e-9)
    # each row's errors are those of its stored step, and per-channel steps never do worse
    np.testing.assert_allclose(sc.err_tensor, np.sum((w - Q.fxp_quantize(w, bits, t.frac, True)) ** 2, axis=1,
                                                     dtype=np.float64), rtol=1e-6, atol=1e-30)
    assert np.all(sc.err_channel <= sc.err_tensor * (1 + 1e-9))
    assert sc.channel_gain_db >= -1e-9 and np.isfinite(sc.channel_gain_db)
