"""The quantizer math: hand-computed values, properties, and the SQNR-based choices."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from mxqn_onnx.calibration.observers import TensorHistogram
from mxqn_onnx.quant import quantizers as Q
from mxqn_onnx.quant import weight_search as W
from mxqn_onnx.quant.choose import choose_activation

floats = arrays(np.float32, st.integers(1, 200),
                elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32))
bits_st = st.sampled_from([2, 3, 4, 5, 6, 7, 8, 16])


def test_fixed_point_hand_computed():
    x = np.float32([0.3, -1.7, 5.0])
    # x*4 = 1.2, -6.8, 20 -> 1, -7, 20 -> clip to [-8, 7] -> /4
    np.testing.assert_array_equal(Q.fxp_quantize(x, 4, 2, True), np.float32([0.25, -1.75, 1.75]))
    # unsigned 3 bits, f=1: x*2 = -1, 1.48, 1.5 (half to even: 2), 10 -> clip [0, 7]
    y = Q.fxp_quantize(np.float32([-0.5, 0.74, 0.75, 5.0]), 3, 1, False)
    np.testing.assert_array_equal(y, np.float32([0.0, 0.5, 1.0, 3.5]))
    # half to even at 2.5 -> 2 and 3.5 -> 4
    np.testing.assert_array_equal(Q.fxp_quantize(np.float32([2.5, 3.5]), 8, 0, True), [2.0, 4.0])
    # negative fractional length: step 4
    np.testing.assert_array_equal(Q.fxp_quantize(np.float32([5.0, 7.0]), 8, -2, True), [4.0, 8.0])


def test_no_overflow_frac():
    assert Q.no_overflow_frac(1.0, 8, True) == 7  # 127/128 < 1: top code just below 1
    assert Q.no_overflow_frac(3.0, 8, True) == 5  # ceil(log2 3) = 2
    assert Q.no_overflow_frac(3.0, 8, False) == 6
    assert Q.no_overflow_frac(0.01, 4, True) == 9


def test_log_levels_and_hand_computed():
    np.testing.assert_allclose(Q.log_levels(3, 1, 2, True), [2.0, 2 ** 0.5, 1.0], rtol=1e-7)
    assert len(Q.log_levels(8, 2, 0, False)) == 255
    assert len(Q.log_levels(8, 2, 0, True)) == 127
    x = np.float32([1.7, 0.6, 0.4, -3.0, 1.2, 0.0])
    # levels 2, 1.414, 1; 1.7 < midpoint 1.707 -> 1.414; 0.6 >= 0.5 -> 1; 0.4 -> 0; 1.2 < 1.207 -> 1
    np.testing.assert_allclose(Q.log_quantize(x, 3, 1, 2, True),
                               [2 ** 0.5, 1.0, 0.0, -2.0, 1.0, 0.0], rtol=1e-6)
    # unsigned: negatives become zero
    assert Q.log_quantize(np.float32([-3.0]), 3, 1, 2, False)[0] == 0.0


@settings(max_examples=60, deadline=None)
@given(floats, bits_st, st.integers(-6, 10), st.booleans())
def test_fixed_point_idempotent_and_half_step(x, bits, frac, signed):
    q = Q.fxp_quantize(x, bits, frac, signed)
    np.testing.assert_array_equal(Q.fxp_quantize(q, bits, frac, signed), q)
    lo, hi = Q.fxp_range(bits, signed)
    step = 2.0 ** -frac
    inside = (x >= lo * step) & (x <= hi * step)
    assert np.all(np.abs(x[inside].astype(np.float64) - q[inside]) <= step / 2 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(floats, st.sampled_from([2, 3, 4, 5, 6, 8]), st.integers(0, 6), st.integers(-20, 20), st.booleans())
def test_log_idempotent_on_levels_and_half_step(x, bits, k, E, signed):
    k = min(k, Q.log_max_k(bits))
    q = Q.log_quantize(x, bits, k, E, signed)
    np.testing.assert_array_equal(Q.log_quantize(q, bits, k, E, signed), q)
    levels = Q.log_levels(bits, k, E, signed).astype(np.float64)
    a = np.abs(x.astype(np.float64))
    if not signed:
        a = np.where(x < 0, np.nan, a)
    inside = (a >= levels[-1]) & (a <= levels[0])
    # every result is zero or a level, and inside the range the error is at most half the gap
    mags = np.abs(q.astype(np.float64))
    assert np.all(np.isin(mags[mags > 0].astype(np.float32), levels.astype(np.float32)))
    for ai, qi in zip(a[inside], mags[inside]):
        j = np.searchsorted(-levels, -ai)
        gap = levels[max(j - 1, 0)] - levels[min(j, len(levels) - 1)]
        assert abs(ai - qi) <= gap / 2 * (1 + 1e-6) + 1e-30


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(2, 300), elements=st.floats(-50, 50, width=32)), bits_st, st.booleans())
def test_optimal_frac_never_worse_than_no_overflow(w, bits, signed):
    if not signed:
        w = np.abs(w)
    if not np.any(w):
        return
    best = W.best_fxp_tensor(w, bits, signed)
    f0 = Q.no_overflow_frac(float(np.max(np.abs(w))), bits, signed)
    assert best.sqnr_db >= Q.sqnr_of(w, Q.fxp_quantize(w, bits, f0, signed)) - 1e-9


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.sampled_from([2, 3, 4, 5, 8]), st.booleans(),
       st.sampled_from(["normal", "zero row", "on the grid", "powers of two"]), st.integers(0, 2 ** 31))
def test_weight_search_without_clipping_equals_scoring_every_candidate(rows, cols, bits, signed, kind, seed):
    # the pruned search (f0 and f0 - 1, lower only on ties) against all candidates, first minimum
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, cols)).astype(np.float32) * 2.0 ** rng.integers(-10, 5, size=(rows, 1))
    if kind == "zero row":
        w[rng.integers(0, rows)] = 0
    elif kind == "on the grid":
        w = np.round(w * 4) / 4
    elif kind == "powers of two":
        w = np.sign(w) * 2.0 ** rng.integers(-3, 3, size=w.shape).astype(np.float32)
    if not signed:
        w = np.abs(w)
    fracs, db = W.best_fxp_channels(w, bits, signed, above=0)
    f0 = np.array([Q.no_overflow_frac(float(m), bits, signed) for m in np.abs(w).max(axis=1)])
    cands = f0[:, None] + np.arange(-Q.FXP_SEARCH_BELOW, 1)[None, :]
    errs = W._fxp_errors_rows(w, bits, signed, cands)
    best = np.argmin(errs, axis=1)
    np.testing.assert_array_equal(fracs, cands[np.arange(rows), best])
    total = float(np.sum(errs[np.arange(rows), best]))
    assert db == Q.sqnr_db(float(np.sum(w.astype(np.float64) ** 2)), total)


def test_binned_log_top_never_worse_than_data_max():
    rng = np.random.default_rng(1)
    x = rng.laplace(size=50_000).astype(np.float32)
    h = TensorHistogram("x")
    h.update(x)
    for bits in (4, 6, 8):
        best = Q.best_log_binned(h.bins(), bits, True)
        e_max = int(np.ceil(np.log2(np.abs(x).max()) * 2 ** best.k))
        no_clip = Q.sqnr_of(x, Q.log_quantize(x, bits, best.k, e_max, True))
        assert Q.sqnr_of(x, Q.log_quantize(x, bits, best.k, best.E, True)) >= no_clip - 0.1


@pytest.mark.parametrize("bits", [4, 8])
def test_histogram_sqnr_matches_exact(bits):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * rng.lognormal(0, 1, 100_000)).astype(np.float32)
    h = TensorHistogram("x")
    h.update(x)
    fx = Q.best_fxp_binned(h.bins(), bits, True)
    lg = Q.best_log_binned(h.bins(), bits, True)
    exact_fx = Q.sqnr_of(x, Q.fxp_quantize(x, bits, fx.frac, True))
    exact_lg = Q.sqnr_of(x, Q.log_quantize(x, bits, lg.k, lg.E, True))
    assert abs(fx.sqnr_db - exact_fx) < 0.3
    assert abs(lg.sqnr_db - exact_lg) < 0.7
    # the chosen f is the exact optimum (or within 0.2 dB of it)
    exact = max(Q.sqnr_of(x, Q.fxp_quantize(x, bits, f, True)) for f in range(fx.frac - 3, fx.frac + 4))
    assert exact_fx >= exact - 0.2


def test_choice_heavy_tail_gets_log_uniform_gets_fixed():
    rng = np.random.default_rng(0)
    heavy = TensorHistogram("heavy")
    heavy.update((rng.standard_normal(100_000) * np.exp(rng.standard_normal(100_000) * 1.5)).astype(np.float32))
    uniform = TensorHistogram("uniform")
    uniform.update(rng.uniform(-1, 1, 100_000).astype(np.float32))
    for bits in (4, 6, 8):
        h = choose_activation(heavy, bits, "auto", 0.0)
        u = choose_activation(uniform, bits, "auto", 0.0)
        assert h.kind == "log" and h.sqnr_log_db > h.sqnr_fixed_db
        assert u.kind == "fixed" and u.sqnr_fixed_db > u.sqnr_log_db
    # a margin larger than log's advantage keeps fixed point
    h = choose_activation(heavy, 8, "auto", 100.0)
    assert h.kind == "fixed"


def test_combine_sqnr_additive_noise():
    assert Q.combine_sqnr_db([30.0, 30.0]) == pytest.approx(30.0 - 10 * np.log10(2))
    assert Q.combine_sqnr_db([40.0]) == pytest.approx(40.0)


def _log_quantize_by_definition(x, bits, k, E, signed):
    """The quantizer as DESIGN.md defines it: nearest level 2^(n/2^k) in the linear domain,
    from the bracketing exponents (the implementation uses tables instead)."""
    x = np.asarray(x, dtype=np.float32)
    m = Q.log_num_levels(bits, signed)
    steps = float(2**k)
    n_lo, n_hi = float(E - m + 1), float(E)
    a = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        n = np.floor(np.log2(a.astype(np.float64)) * steps)
        n = np.maximum(n, n_lo - 1.0)
        lower, upper = Q.pow2(n / steps), Q.pow2((n + 1.0) / steps)
        mid = (lower + upper) * np.float32(0.5)
        q = Q.pow2(np.clip(np.where(a >= mid, n + 1.0, n), n_lo, n_hi) / steps)
        q = np.where(a < Q.pow2(n_lo / steps) * np.float32(0.5), np.float32(0.0), q)
    sign = np.sign(x) if signed else np.maximum(np.sign(x), np.float32(0.0))
    return (q * sign).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_log_quantize_tables_match_the_definition(bits, signed):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(50_000) * rng.lognormal(0, 3, 50_000)).astype(np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, 1e-38, -1e-38, 1e-45, 3e38, -3e38])])
    for k in range(Q.log_max_k(bits) + 1):
        for E in (-140 * 2**k, -3, 0, 5 * 2**k):
            np.testing.assert_array_equal(Q.log_quantize(x, bits, k, E, signed),
                                          _log_quantize_by_definition(x, bits, k, E, signed),
                                          err_msg=f"bits={bits} k={k} E={E}")


def _reference_piecewise_error(lo, hi, count, clip_lo, clip_hi, quant, local_step):
    """The binned error as first written: every quantizer call on every [candidate, bin] pair."""
    width = hi - lo
    safe_w = np.where(width > 0, width, 1.0)
    total = np.zeros(np.broadcast(clip_lo, lo).shape, dtype=np.float64)
    b_hi = np.minimum(hi, clip_lo)
    frac_below = np.where(width > 0, np.clip((b_hi - lo) / safe_w, 0, 1), (lo < clip_lo) * 1.0)
    total += frac_below * Q._interval_error(lo, np.maximum(b_hi, lo), clip_lo)
    a_lo = np.maximum(lo, clip_hi)
    frac_above = np.where(width > 0, np.clip((hi - a_lo) / safe_w, 0, 1), (lo > clip_hi) * 1.0)
    total += frac_above * Q._interval_error(np.minimum(a_lo, hi), hi, clip_hi)
    i_lo, i_hi = np.clip(lo, clip_lo, clip_hi), np.clip(hi, clip_lo, clip_hi)
    frac_in = np.clip(1.0 - frac_below - frac_above, 0, 1)
    q_lo, q_hi = quant(i_lo), quant(i_hi)
    one_level = Q._interval_error(i_lo, i_hi, q_lo)
    t = 0.5 * (q_lo + q_hi)
    eps = 1e-9 * np.abs(t) + 1e-300
    adjacent = (quant(t - eps) == q_lo) & (quant(t + eps) == q_hi)
    in_w = np.where(i_hi > i_lo, i_hi - i_lo, 1.0)
    p_low = np.clip((t - i_lo) / in_w, 0, 1)
    t_c = np.clip(t, i_lo, i_hi)
    two_levels = p_low * Q._interval_error(i_lo, t_c, q_lo) + (1 - p_low) * Q._interval_error(t_c, i_hi, q_hi)
    many = local_step(0.5 * (i_lo + i_hi)) ** 2 / 12.0
    total += frac_in * np.where(q_lo == q_hi, one_level, np.where(adjacent, two_levels, many))
    return np.sum(total * count, axis=-1)


def _reference_log_errors(bins, bits, k, signed, tops):
    m, steps = Q.log_num_levels(bits, signed), 2.0**k
    E = np.asarray(tops, dtype=np.float64)[:, None]
    top, bottom, ratio = 2.0 ** (E / steps), 2.0 ** ((E - m + 1) / steps), 2.0 ** (1.0 / steps)

    def quant(v):
        a = np.abs(v)
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.floor(np.log2(np.maximum(a, 1e-300)) * steps)
            lower, upper = 2.0 ** (n / steps), 2.0 ** ((n + 1) / steps)
            n = np.where(a >= 0.5 * (lower + upper), n + 1, n)
        return np.sign(v) * np.where(a < 0.5 * bottom, 0.0, 2.0 ** (np.clip(n, E - m + 1, E) / steps))

    def local_step(v):
        return np.maximum(np.abs(v), 0.5 * bottom) * (ratio - 1.0) / np.sqrt(ratio)

    return _reference_piecewise_error(bins.lo[None, :], bins.hi[None, :], bins.count[None, :],
                                      -top if signed else np.zeros_like(top), top, quant, local_step)


@pytest.mark.parametrize("shape", ["relu", "gaussian", "hardswish", "laplace"])
def test_binned_errors_equal_the_plain_evaluation_bit_for_bit(shape):
    """The binned error search reads level tables and evaluates the threshold probes only where
    a bin's edges quantize apart: every candidate's error is the one the plain evaluation (one
    pow and log per [candidate, bin] pair) gives, to the last bit, so no choice can move."""
    rng = np.random.default_rng(7)
    for scale in (1e-3, 0.7, 40.0):
        x = rng.standard_normal(50_000) * scale
        x = {"relu": np.maximum(x, 0), "gaussian": x, "hardswish": np.maximum(x, -0.375 * scale) * (x > -3 * scale),
             "laplace": rng.laplace(size=50_000) * scale}[shape].astype(np.float32)
        h = TensorHistogram()
        h.update(x)
        b = h.bins()
        for bits in (2, 3, 4, 6, 8):
            for signed in (False, True):
                for k in range(Q.log_max_k(bits) + 1):
                    tops = Q.log_tops(b.max_abs, k)
                    assert np.array_equal(Q.log_errors_binned(b, bits, k, signed, tops),
                                          _reference_log_errors(b, bits, k, signed, tops)), (scale, bits, signed, k)
                fracs = Q.fxp_candidates(b.max_abs, bits, signed)
                step = (2.0 ** -fracs.astype(np.float64))[:, None]
                lo_c, hi_c = Q.fxp_range(bits, signed)
                ref = _reference_piecewise_error(b.lo[None, :], b.hi[None, :], b.count[None, :], lo_c * step,
                                                 hi_c * step, lambda v: np.rint(v / step) * step,
                                                 lambda v: np.broadcast_to(step, v.shape))
                assert np.array_equal(Q.fxp_errors_binned(b, bits, signed, fracs), ref), (scale, bits, signed)
