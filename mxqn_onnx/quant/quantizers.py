"""The quantizer math of MXQN, in one place (pure numpy).

Two quantizers:

* Fixed point ``FXP(b, f, signed)``: ``Q(x) = clip(round_half_even(x * 2^f), lo, hi) * 2^-f``
  with ``(lo, hi) = (-2^(b-1), 2^(b-1) - 1)`` signed and ``(0, 2^b - 1)`` unsigned.
* Logarithmic ``LOG(b, k, E, signed)``: magnitude levels ``L_j = 2^((E - j) / 2^k)``,
  ``j = 0 .. M-1`` with ``M = 2^(b - signed) - 1``; ``Q(x)`` is the level (or zero) nearest to
  ``|x|`` in the linear domain, carrying the sign of ``x`` (unsigned: negatives become 0).

The element-wise functions compute in float32 with exactly the operations of the ONNX
function bodies in :mod:`mxqn_onnx.graph.functions`, so the two agree bit for bit. Powers of two
with fractional exponents are evaluated in float64 and rounded once to float32, which is what
onnxruntime's ``Pow`` returns.

The scoring functions evaluate the SQNR of many candidate quantizers at once on a binned
distribution (activation histograms, see :mod:`mxqn_onnx.calibration.observers`), vectorised
over candidates; their counterparts on exact data (weight tensors, per tensor or per output
channel) are in :mod:`mxqn_onnx.quant.weight_search`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

#: Default dB margin by which log must beat fixed point before it is chosen for activations.
DEFAULT_LOG_MARGIN_DB = 0.0
#: How far beyond the no-overflow fractional length the fixed-point search looks.
FXP_SEARCH_BELOW = 2
FXP_SEARCH_ABOVE = 8
#: How many octaves below the data's maximum the log top level E is searched.
LOG_SEARCH_OCTAVES_BELOW = 3
#: Cap on log top-exponent candidates scored at once (wider ranges are searched coarse to fine).
MAX_TOP_CANDIDATES = 64
#: Largest log fractional-exponent bits k (levels 2^(1/64) apart; a 64-entry constant table).
MAX_LOG_K = 6


# --------------------------------------------------------------------------- basics


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """``10 log10(signal / noise)``; +inf for zero noise, -inf for zero signal."""
    if noise_power <= 0:
        return float("inf")
    if signal_power <= 0:
        return float("-inf")
    return float(10.0 * np.log10(signal_power / noise_power))


def sqnr_of(x: np.ndarray, q: np.ndarray) -> float:
    """SQNR in dB of a tensor ``x`` against its quantized version ``q``."""
    x64 = np.asarray(x, dtype=np.float64)
    return sqnr_db(float(np.sum(x64 * x64)), float(np.sum((x64 - q) ** 2)))


def combine_sqnr_db(terms_db) -> float:
    """Additive noise model: ``1/SQNR_out = sum_i 1/SQNR_i`` (linear ratios), in dB."""
    inv = sum(10.0 ** (-t / 10.0) for t in terms_db if np.isfinite(t))
    if any(t == float("-inf") for t in terms_db):
        return float("-inf")
    return float("inf") if inv == 0 else float(-10.0 * np.log10(inv))


def pow2(e) -> np.ndarray:
    """``2**e`` evaluated in float64 and rounded once to float32 (as onnxruntime's Pow)."""
    with np.errstate(over="ignore"):
        return np.asarray(np.power(2.0, np.asarray(e, dtype=np.float64)), dtype=np.float32)


# --------------------------------------------------------------------------- fixed point


def fxp_range(bits: int, signed: bool) -> Tuple[int, int]:
    """Integer code range ``(lo, hi)`` of a ``bits``-bit fixed-point number."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


#: Largest |f| a search may start from: ``2^(f + FXP_SEARCH_ABOVE)`` must stay a finite
#: float32 (denormal data would otherwise ask for 2^140, i.e. an infinite scale and NaN).
MAX_ABS_FRAC = 126 - FXP_SEARCH_ABOVE


def no_overflow_frac(max_abs: float, bits: int, signed: bool) -> int:
    """``f0 = b - signed - ceil(log2(max|x|))``: the largest f at which nothing clips.

    Clamped to ``[-MAX_ABS_FRAC, MAX_ABS_FRAC]`` so that every candidate scale is finite.
    """
    if not np.isfinite(max_abs) or max_abs <= 0:
        return 0
    f0 = int(bits - int(signed) - int(np.ceil(np.log2(max_abs))))
    return max(-MAX_ABS_FRAC, min(MAX_ABS_FRAC, f0))


def fxp_codes(x: np.ndarray, bits: int, frac, signed: bool) -> np.ndarray:
    """Integer codes ``clip(round_half_even(x * 2^f), lo, hi)`` (int64).

    ``frac`` may be an array broadcastable against ``x`` (per-channel fractional lengths).
    """
    lo, hi = fxp_range(bits, signed)
    scale = pow2(frac)
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.rint(np.asarray(x, dtype=np.float32) * scale)
    return np.clip(r, lo, hi).astype(np.int64)


def fxp_quantize(x: np.ndarray, bits: int, frac, signed: bool) -> np.ndarray:
    """Fixed-point quantize-dequantize, float32, bit-exact with the ``FixedQuant`` op."""
    lo, hi = fxp_range(bits, signed)
    scale = pow2(frac)
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.rint(np.asarray(x, dtype=np.float32) * scale)
        return (np.clip(r, np.float32(lo), np.float32(hi)) / scale).astype(np.float32)


# --------------------------------------------------------------------------- logarithmic


def log_num_levels(bits: int, signed: bool) -> int:
    """Number of non-zero magnitude levels ``M = 2^(b - signed) - 1``."""
    return 2 ** (bits - int(signed)) - 1


def log_max_k(bits: int) -> int:
    """Largest fractional exponent bits k searched for a bit width: about b - 2, at most 6.

    Beyond k = 6 (a 64-entry level table) the levels are finer than fixed point at the same
    width would be anyway, and onnxruntime's float ``Pow`` stops being correctly rounded.
    """
    return max(0, min(bits - 2, MAX_LOG_K))


def log_levels(bits: int, k: int, E: int, signed: bool) -> np.ndarray:
    """Magnitude levels ``L_j = 2^((E - j)/2^k)``, ``j = 0..M-1`` (descending, float32)."""
    m = log_num_levels(bits, signed)
    return pow2((E - np.arange(m, dtype=np.float64)) / 2.0**k)


def log_tables(bits: int, k: int, E: int, signed: bool) -> Tuple[np.ndarray, np.ndarray]:
    """``(V, T)``: zero and the M levels ascending, and the decision thresholds between
    neighbours, ``T[j] = (V[j] + V[j+1]) / 2`` (float32, rounded as the ``LogQuant`` body does)."""
    levels = log_levels(bits, k, E, signed)[::-1]
    v = np.concatenate([np.zeros(1, np.float32), levels]).astype(np.float32)
    return v, ((v[:-1] + v[1:]) * np.float32(0.5)).astype(np.float32)


def log_quantize(x: np.ndarray, bits: int, k: int, E: int, signed: bool) -> np.ndarray:
    """Log quantize-dequantize, float32, bit-exact with the ``LogQuant`` op.

    The nearest level is decided in the linear domain by the thresholds of
    :func:`log_tables` (a tie goes up). ``j = floor(log2|x| * 2^k)`` (relative to the table)
    only picks which threshold to test: a ``j`` off by one from log rounding lies next to a
    level, far from any threshold, and gives the same code, so the result depends only on the
    exactly computed levels and thresholds. The ``LogQuant`` body runs the same steps.
    """
    x = np.asarray(x, dtype=np.float32)
    m = log_num_levels(bits, signed)
    v, thr = log_tables(bits, k, E, signed)
    a = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.log2(a) * np.float32(2.0**k) - np.float32(E - m)
    # fmin/fmax (not clip) send NaN to a valid index: NaN inputs give no exception
    j = np.fmax(np.fmin(t, np.float32(m - 1)), np.float32(0.0)).astype(np.intp)
    q = v[j + (a >= thr[j])]
    negative = x < 0
    if np.any(negative):
        q = np.where(negative, -q if signed else np.float32(0.0), q)
    return q.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- choices


@dataclass(frozen=True)
class FixedChoice:
    """A chosen fixed-point quantizer and its SQNR."""

    bits: int
    frac: int
    signed: bool
    sqnr_db: float


@dataclass(frozen=True)
class LogChoice:
    """A chosen logarithmic quantizer and its SQNR."""

    bits: int
    k: int
    E: int
    signed: bool
    sqnr_db: float


# --------------------------------------------------------------------------- binned scoring (activations)


@dataclass(frozen=True)
class Bins:
    """A binned distribution: each bin is the signed interval ``[lo, hi)`` holding ``count`` values.

    Values inside a bin are modelled as uniform over it. Exact zeros are a bin with
    ``lo == hi == 0``.
    """

    lo: np.ndarray
    hi: np.ndarray
    count: np.ndarray

    @property
    def max_abs(self) -> float:
        if self.count.size == 0:
            return 0.0
        return float(max(np.max(np.abs(self.lo)), np.max(np.abs(self.hi))))

    @property
    def has_negative(self) -> bool:
        return bool(np.any(self.lo < 0))

    def signal_power(self) -> float:
        """``sum x^2`` under the uniform-within-bin model."""
        return float(np.sum(self.count * _mean_square(self.lo, self.hi)))


def _mean_square(a, b):
    """Mean of ``x^2`` for ``x`` uniform on ``[a, b]``."""
    return (a * a + a * b + b * b) / 3.0


def _interval_error(a, b, q):
    """Mean of ``(x - q)^2`` for ``x`` uniform on ``[a, b]``."""
    return _mean_square(a - q, b - q)


def _piecewise_error(lo, hi, count, clip_lo, clip_hi, quant, local_step, quant_clipped=None):
    """Squared-error sum of a quantizer over bins, vectorised over ``[candidates, bins]``.

    ``clip_lo``/``clip_hi`` ([candidates, 1]) bound the representable range; values beyond
    are replaced by the bound. Inside the range, a bin within one quantization cell, or
    across the threshold between two, has its error integrated exactly; a bin spanning more
    cells contributes the uniform-noise ``step^2/12``, ``local_step`` being the spacing there.
    ``quant(v, rows)``: each candidate's quantizer on ``[candidates, bins]`` values, or (with
    ``rows``, the candidate of each value) on a flat selection of them.
    ``quant_clipped(edge, v)``: ``quant(v)`` for ``v = clip(edge, clip_lo, clip_hi)``, where a
    quantizer can share work across candidates (default: ``quant(v)``).
    """
    width = hi - lo
    safe_w = np.where(width > 0, width, 1.0)
    total = np.zeros(np.broadcast(clip_lo, lo).shape, dtype=np.float64)
    # the part of each bin below the range
    b_hi = np.minimum(hi, clip_lo)
    frac_below = np.where(width > 0, np.clip((b_hi - lo) / safe_w, 0, 1), (lo < clip_lo) * 1.0)
    total += frac_below * _interval_error(lo, np.maximum(b_hi, lo), clip_lo)
    # the part above the range
    a_lo = np.maximum(lo, clip_hi)
    frac_above = np.where(width > 0, np.clip((hi - a_lo) / safe_w, 0, 1), (lo > clip_hi) * 1.0)
    total += frac_above * _interval_error(np.minimum(a_lo, hi), hi, clip_hi)
    # the part inside
    i_lo = np.clip(lo, clip_lo, clip_hi)
    i_hi = np.clip(hi, clip_lo, clip_hi)
    frac_in = np.clip(1.0 - frac_below - frac_above, 0, 1)
    if quant_clipped is None:
        q_lo, q_hi = quant(i_lo), quant(i_hi)
    else:
        q_lo, q_hi = quant_clipped(lo, i_lo), quant_clipped(hi, i_hi)
    one_level = _interval_error(i_lo, i_hi, q_lo)
    # a bin across one decision threshold (the midpoint of two adjacent levels): split there;
    # the probes around it only matter where the bin's edges quantize apart
    t = 0.5 * (q_lo + q_hi)
    split = np.nonzero(q_lo != q_hi)
    t_s = t[split]
    eps = 1e-9 * np.abs(t_s) + 1e-300
    adjacent = np.zeros(t.shape, dtype=bool)
    adjacent[split] = (quant(t_s - eps, split[0]) == q_lo[split]) & (quant(t_s + eps, split[0]) == q_hi[split])
    in_w = np.where(i_hi > i_lo, i_hi - i_lo, 1.0)
    p_low = np.clip((t - i_lo) / in_w, 0, 1)
    t_c = np.clip(t, i_lo, i_hi)
    two_levels = p_low * _interval_error(i_lo, t_c, q_lo) + (1 - p_low) * _interval_error(t_c, i_hi, q_hi)
    many = local_step(0.5 * (i_lo + i_hi)) ** 2 / 12.0
    err_in = np.where(q_lo == q_hi, one_level, np.where(adjacent, two_levels, many))
    total += frac_in * err_in
    return np.sum(total * count, axis=-1)


def fxp_errors_binned(bins: Bins, bits: int, signed: bool, fracs: np.ndarray) -> np.ndarray:
    """Squared-error sums of ``FXP(bits, f, signed)`` for each ``f`` in ``fracs``."""
    lo_c, hi_c = fxp_range(bits, signed)
    step = (2.0 ** -np.asarray(fracs, dtype=np.float64))[:, None]

    def quant(v, rows=None):
        s = step if rows is None else step[rows, 0]
        return np.rint(v / s) * s

    return _piecewise_error(
        bins.lo[None, :], bins.hi[None, :], bins.count[None, :],
        lo_c * step, hi_c * step, quant, lambda v: np.broadcast_to(step, v.shape),
    )


def log_errors_binned(bins: Bins, bits: int, k: int, signed: bool, tops: np.ndarray) -> np.ndarray:
    """Squared-error sums of ``LOG(bits, k, E, signed)`` for each ``E`` in ``tops``."""
    m = log_num_levels(bits, signed)
    steps = 2.0**k
    E = np.asarray(tops, dtype=np.float64)[:, None]
    top = 2.0 ** (E / steps)
    bottom = 2.0 ** ((E - m + 1) / steps)
    ratio = 2.0 ** (1.0 / steps)

    # 2^(n / steps) for each integer n a result can depend on: below min(E) - m the clip to
    # E - m + 1 makes the rounding irrelevant, above max(E) the clip to E; a table read
    # instead of a pow per value gives the same numbers
    n_lo, n_hi = float(E.min()) - m, float(E.max())
    table = 2.0 ** (np.arange(n_lo, n_hi + 2.0) / steps)

    def pow_n(n):
        return table[(n - n_lo).astype(np.intp)]

    def rounded_n(a):  # the level index nearest to a = |v|, before a candidate's clip
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.floor(np.log2(np.maximum(a, 1e-300)) * steps)
        n = np.clip(n, n_lo, n_hi)
        return np.where(a >= 0.5 * (pow_n(n) + pow_n(n + 1)), n + 1, n)

    def finish(v, a, n, rows):
        e = E if rows is None else E[rows, 0]
        half_bottom = 0.5 * (bottom if rows is None else bottom[rows, 0])
        return np.sign(v) * np.where(a < half_bottom, 0.0, pow_n(np.clip(n, e - m + 1, e)))

    def quant(v, rows=None):
        a = np.abs(v)
        return finish(v, a, rounded_n(a), rows)

    clip_lo = -top if signed else np.zeros_like(top)
    n_top = rounded_n(top)
    n_clip_lo = n_top if signed else rounded_n(clip_lo)

    def quant_clipped(edge, v):
        # v is the edge, or a candidate's bound where the edge lies beyond it (np.clip's
        # choice), so the logs are of the bins' edges and the bounds, not of every pair
        n = np.where(edge < clip_lo, n_clip_lo, np.where(edge > top, n_top, rounded_n(np.abs(edge))))
        return finish(v, np.abs(v), n, None)

    def local_step(v):
        a = np.maximum(np.abs(v), 0.5 * bottom)
        return a * (ratio - 1.0) / np.sqrt(ratio)

    return _piecewise_error(
        bins.lo[None, :], bins.hi[None, :], bins.count[None, :], clip_lo, top, quant, local_step, quant_clipped
    )


def fxp_candidates(max_abs: float, bits: int, signed: bool) -> np.ndarray:
    """Fractional lengths searched for data up to ``max_abs``: from two below the no-overflow
    length (coarser, unused headroom) to eight above it (finer, clipping outliers)."""
    f0 = no_overflow_frac(max_abs, bits, signed)
    return np.arange(f0 - FXP_SEARCH_BELOW, f0 + FXP_SEARCH_ABOVE + 1)


def log_tops(max_abs: float, k: int) -> np.ndarray:
    """Tops ``E`` searched for the log quantizer with ``k``: from a few octaves below the
    data's maximum to just above it."""
    top = np.log2(max_abs) if max_abs > 0 else 0.0
    steps = 2**k
    return np.arange(int(np.floor((top - LOG_SEARCH_OCTAVES_BELOW) * steps)), int(np.ceil(top * steps)) + 2)


def best_fxp_binned(bins: Bins, bits: int, signed: bool) -> FixedChoice:
    """SQNR-optimal fixed point for a binned distribution."""
    cands = fxp_candidates(bins.max_abs, bits, signed)
    errs = fxp_errors_binned(bins, bits, signed, cands)
    best = int(np.argmin(errs))
    return FixedChoice(bits, int(cands[best]), signed, sqnr_db(bins.signal_power(), float(errs[best])))


def best_log_binned(bins: Bins, bits: int, signed: bool, max_k: int | None = None) -> LogChoice:
    """SQNR-optimal (k, E) of the log quantizer for a binned distribution.

    k runs from 0 (powers of two) to ``max_k`` (default about ``bits - 2``); for each k, E is
    searched from a few octaves below the data's maximum to just above it.
    """
    max_k = log_max_k(bits) if max_k is None else max_k
    signal = bins.signal_power()
    best = None
    for k in range(max_k + 1):
        tops = log_tops(bins.max_abs, k)
        err, e = _search_tops(bins, bits, k, signed, int(tops[0]), int(tops[-1]))
        if best is None or err < best[0]:
            best = (err, k, e)
    return LogChoice(bits, best[1], best[2], signed, sqnr_db(signal, best[0]))


def _search_tops(bins: Bins, bits: int, k: int, signed: bool, e_lo: int, e_hi: int):
    """Best ``(error, E)`` in ``[e_lo, e_hi]``: coarse grid first when the range is wide."""
    stride = max(1, int(np.ceil((e_hi - e_lo + 1) / MAX_TOP_CANDIDATES)))
    cands = np.arange(e_lo, e_hi + 1, stride)
    errs = log_errors_binned(bins, bits, k, signed, cands)
    centre = int(cands[int(np.argmin(errs))])
    if stride > 1:
        cands = np.arange(max(e_lo, centre - stride), min(e_hi, centre + stride) + 1)
        errs = log_errors_binned(bins, bits, k, signed, cands)
    i = int(np.argmin(errs))
    return float(errs[i]), int(cands[i])


def mean_error_binned(bins: Bins, quantize, points: int = 8) -> float:
    """Mean of ``Q(x) - x`` over a binned distribution (``quantize``: element-wise Q).

    Each bin is sampled at ``points`` evenly spaced values; bias correction uses this to
    account for the shift an activation quantizer itself introduces (dead zones, clipping).
    """
    total = float(bins.count.sum())
    if total == 0:
        return 0.0
    t = (np.arange(points) + 0.5) / points
    x = bins.lo[:, None] + (bins.hi - bins.lo)[:, None] * t[None, :]
    err = quantize(x.astype(np.float32)).astype(np.float64) - x
    return float(np.sum(err.mean(axis=1) * bins.count) / total)


# ------------------------------------------------ onnxruntime's int16 pair sums (x86 without VNNI)

#: ``VPMADDUBSW`` adds two ``uint8 x int8`` products into a saturating int16.
INT16_MAX = 2 ** 15 - 1
#: Zero point that moves signed 8-bit codes into uint8.
UINT8_OFFSET = 128


def u8_code_max(bits: int, signed: bool) -> int:
    """Largest raw uint8 code of an activation stored as uint8 (signed codes shifted by 128)."""
    return fxp_range(bits, signed)[1] + (UINT8_OFFSET if signed else 0)


def pair_fits_int16(weight_codes: np.ndarray, act_max: int) -> bool:
    """Whether any two products ``a * w`` (``0 <= a <= act_max``) summed stay within int16.

    The bound is taken over the two largest weight magnitudes, whatever pair the kernel's
    packing puts side by side.
    """
    w = np.abs(np.asarray(weight_codes, dtype=np.int64)).ravel()
    if w.size == 0:
        return True
    top = np.sort(w)[-2:] if w.size > 1 else np.concatenate([w, [0]])
    return int(act_max) * int(top.sum()) <= INT16_MAX


def pair_safe_bits(act_max: int) -> int:
    """The widest signed weight width whose every code pair fits int16 against ``act_max``.

    Two ``b``-bit codes sum to at most ``2^b`` in magnitude: 7 bits against 8-bit activations.
    """
    b = 1
    while int(act_max) * 2 ** (b + 1) <= INT16_MAX:
        b += 1
    return b
