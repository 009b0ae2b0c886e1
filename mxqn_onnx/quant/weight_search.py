"""Fixed point on exact data: weight tensors (pure numpy).

The SQNR-optimal fractional length for a whole weight tensor or for each of its output
channels (rows), scored on the weights themselves, vectorised over candidates and rows; and
what per-channel steps gain, judged on the channels' own SQNRs (``weight_granularity="auto"``).
The quantizer itself and its activation (histogram) counterparts are in
:mod:`mxqn_onnx.quant.quantizers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quantizers import FXP_SEARCH_ABOVE, FXP_SEARCH_BELOW, FixedChoice, fxp_range, no_overflow_frac, pow2, sqnr_db


def best_fxp_tensor(w: np.ndarray, bits: int, signed: bool = True,
                    above: int = FXP_SEARCH_ABOVE) -> FixedChoice:
    """SQNR-optimal tensor-wide fractional length for exact data ``w``.

    ``above`` bounds how far past the no-overflow length the search goes (0: never clip).
    """
    # the whole tensor as one channel
    fracs, db = best_fxp_channels(np.asarray(w, dtype=np.float32).reshape(1, -1), bits, signed, above)
    return FixedChoice(bits, int(fracs[0]), signed, db)


def best_fxp_channels(w2d: np.ndarray, bits: int, signed: bool = True, above: int = FXP_SEARCH_ABOVE):
    """SQNR-optimal fractional length per row of ``w2d`` (rows = output channels).

    Returns ``(fracs[int64, C], total_sqnr_db)``; candidates and channels are scored together.
    """
    w2d = np.asarray(w2d, dtype=np.float32)
    fracs, err = _best_rows(w2d, bits, signed, above)
    signal = float(np.sum(w2d.astype(np.float64) ** 2))
    return fracs, sqnr_db(signal, float(np.sum(err)))


def _best_rows(w2d: np.ndarray, bits: int, signed: bool, above: int):
    """Each row's best fractional length and its squared-error sum (``[C]`` each)."""
    max_abs = np.max(np.abs(w2d), axis=1) if w2d.shape[1] else np.zeros(w2d.shape[0])
    f0 = np.array([no_overflow_frac(float(m), bits, signed) for m in max_abs], dtype=np.int64)
    offsets = np.arange(-FXP_SEARCH_BELOW, above + 1)
    cands = f0[:, None] + offsets[None, :]
    errs = _fxp_errors_rows(w2d, bits, signed, cands) if above else _errors_below_f0(w2d, bits, signed, cands)
    best = np.argmin(errs, axis=1)  # first minimum: the smallest f, i.e. least clipping
    rows = np.arange(len(cands))
    return cands[rows, best].astype(np.int64), errs[rows, best]


def channel_sqnr_cap_db(bits: int) -> float:
    """Highest per-channel SQNR counted when channels' SQNRs are averaged: 10 dB above what a
    ``bits``-bit grid reaches on full-range uniform data (``6.02 b``). A channel above it is as
    good as exact; an exact one (SQNR +inf) counts as this, so a mean stays finite."""
    return 20.0 * np.log10(2.0) * bits + 10.0


def mean_channel_sqnr_db(signal: np.ndarray, err: np.ndarray, cap_db: float) -> float:
    """Mean over rows of each row's own SQNR in dB (``signal_c / err_c``), each capped at
    ``cap_db``. All-zero rows (exact under any step) are left out; +inf when every row is."""
    signal = np.asarray(signal, dtype=np.float64)
    live = signal > 0
    if not np.any(live):
        return float("inf")
    s, e = signal[live], np.asarray(err, dtype=np.float64)[live]
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(s / np.maximum(e, 0.0))  # +inf where a row is exact
    return float(np.mean(np.minimum(db, cap_db)))


@dataclass(frozen=True)
class GranularityScores:
    """Fixed point for a weight's rows (output channels) with one step for the whole tensor
    and with one per row, and each row's squared error under both (``[C]`` arrays)."""

    bits: int
    tensor_frac: int
    channel_fracs: np.ndarray
    signal: np.ndarray
    err_tensor: np.ndarray
    err_channel: np.ndarray

    @property
    def sqnr_tensor_db(self) -> float:
        """Tensor-wide SQNR (all signal over all error) with the per-tensor step."""
        return sqnr_db(float(np.sum(self.signal)), float(np.sum(self.err_tensor)))

    @property
    def sqnr_channel_db(self) -> float:
        """Tensor-wide SQNR with the per-channel steps."""
        return sqnr_db(float(np.sum(self.signal)), float(np.sum(self.err_channel)))

    @property
    def mean_channel_tensor_db(self) -> float:
        """Mean of the channels' own SQNRs (capped, :func:`channel_sqnr_cap_db`) with the per-tensor step."""
        return mean_channel_sqnr_db(self.signal, self.err_tensor, channel_sqnr_cap_db(self.bits))

    @property
    def mean_channel_channel_db(self) -> float:
        """Mean of the channels' own SQNRs (capped) with the per-channel steps."""
        return mean_channel_sqnr_db(self.signal, self.err_channel, channel_sqnr_cap_db(self.bits))

    @property
    def channel_gain_db(self) -> float:
        """What per-channel steps gain on the mean channel SQNR (0 for an all-zero tensor)."""
        t, c = self.mean_channel_tensor_db, self.mean_channel_channel_db
        return 0.0 if t == c else c - t  # inf == inf: all rows zero


def fxp_granularity(w2d: np.ndarray, bits: int, signed: bool = True,
                    above: int = FXP_SEARCH_ABOVE) -> GranularityScores:
    """The per-tensor (:func:`best_fxp_tensor`) and per-row (:func:`best_fxp_channels`)
    searches together, keeping each row's error under both; as many passes over the data.

    The tensor step's candidates are scored row by row and the rows' errors summed, so the
    rows' errors at the chosen step come with the choice.
    """
    w2d = np.asarray(w2d, dtype=np.float32)
    fracs, err_channel = _best_rows(w2d, bits, signed, above)
    max_abs = float(np.max(np.abs(w2d))) if w2d.size else 0.0
    f0 = no_overflow_frac(max_abs, bits, signed)
    cands = f0 + np.arange(-FXP_SEARCH_BELOW, above + 1)
    rows_cands = np.broadcast_to(cands[None, :], (w2d.shape[0], len(cands)))
    if above:
        per_row = _fxp_errors_rows(w2d, bits, signed, rows_cands)
    else:  # as _errors_below_f0 with the whole tensor as the one row
        m = len(cands)
        per_row = np.full(rows_cands.shape, np.inf)
        per_row[:, m - 2:] = _fxp_errors_rows(w2d, bits, signed, rows_cands[:, m - 2:])
        for j in range(m - 3, -1, -1):
            if not np.sum(per_row[:, j + 1]) <= np.sum(per_row[:, j + 2]):
                break
            per_row[:, j] = _fxp_errors_rows(w2d, bits, signed, rows_cands[:, j:j + 1])[:, 0]
    best = int(np.argmin(per_row.sum(axis=0)))  # first minimum: the smallest f, least clipping
    signal = np.sum(np.square(w2d, dtype=np.float64), axis=1)
    return GranularityScores(bits, int(cands[best]), fracs, signal, per_row[:, best], err_channel)


def _errors_below_f0(rows: np.ndarray, bits: int, signed: bool, cands: np.ndarray) -> np.ndarray:
    """:func:`_fxp_errors_rows` where no candidate lies above ``f0`` (the last column), with
    the columns that cannot change the first minimum left at +inf.

    Below ``f0`` nothing clips, and the grid of ``f - 1`` is a subset of the grid of ``f``, so
    rounding to it errs at least as much: the errors fall from the first column to ``f0 - 1``.
    Only ``f0`` and ``f0 - 1`` can hold the minimum, and a smaller f only where it ties the
    next one (a row of exactly representable values); those are scored on the few rows that
    tie. On ResNet-50 this halves the weight analysis (two passes over the weights, not three).
    """
    n, m = cands.shape
    errs = np.full(cands.shape, np.inf)
    errs[:, m - 2:] = _fxp_errors_rows(rows, bits, signed, cands[:, m - 2:])
    open_rows = np.flatnonzero(errs[:, m - 2] <= errs[:, m - 1])
    for j in range(m - 3, -1, -1):
        if open_rows.size == 0:
            break
        errs[open_rows, j] = _fxp_errors_rows(rows[open_rows], bits, signed, cands[open_rows, j:j + 1])[:, 0]
        open_rows = open_rows[errs[open_rows, j] <= errs[open_rows, j + 1]]
    return errs


def _fxp_errors_rows(rows: np.ndarray, bits: int, signed: bool, cands: np.ndarray) -> np.ndarray:
    """Squared error sums ``[rows, candidates]`` of fixed point at per-row candidate fracs."""
    lo, hi = fxp_range(bits, signed)
    out = np.empty(cands.shape, dtype=np.float64)
    x = np.ascontiguousarray(rows, dtype=np.float32)
    # two scratch buffers reused for every candidate, all ops in place: the same values as
    # the plain expression, without a fresh float64 copy of the weight per candidate (this
    # loop dominated the analysis time of a 25M-parameter ResNet-50)
    q = np.empty_like(x)
    d = np.empty(x.shape, dtype=np.float64)
    for j in range(cands.shape[1]):
        scale = pow2(cands[:, j])[:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(x, scale, out=q)
            np.rint(q, out=q)
            np.clip(q, lo, hi, out=q)
            np.divide(q, scale, out=q)
            np.subtract(x, q, out=d, dtype=np.float64)
            np.multiply(d, d, out=d)
        out[:, j] = d.sum(axis=1)
    return out
