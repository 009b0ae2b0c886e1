"""Rounding that sees the data: choose each weight's grid value for the layer's output error.

Round-to-nearest minimises each weight's own error, but the layer's output error is
``E ||(W - Wq) x||^2 = tr(E H E^T)`` with ``H = E[x x^T]`` the second moment of the layer's
input patches: errors on correlated inputs can cancel or add up. This module implements the
closed-form sequential variant of that idea (OBQ / GPTQ, Frantar et al. 2022-2023): the
columns of ``W`` are rounded one at a time, in order of decreasing input energy, and each
column's rounding error is spread over the columns not yet rounded through the Cholesky
factor of ``H^-1``, the least-squares optimal compensation. The grid (power-of-two step per
row, clipped to the ``bits``-bit range) is exactly the one round-to-nearest uses, so the
output format does not change; only which code each weight gets.

Cost per layer: one ``D x D`` Cholesky and ``O * D^2`` multiply-adds (D = fan-in), plus
``R * D^2`` to form ``H`` from ``R`` sampled input rows; numpy/BLAS only. A layer keeps the
data-aware result only if its output error on the calibration rows is lower than
round-to-nearest's, so on those rows it never does worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ..quant import quantizers as Q

#: relative damping of H's diagonal (GPTQ's default): keeps the inverse well conditioned when
#: some inputs are (nearly) collinear or the sampled rows are few
DAMP = 0.01
#: widest fan-in rounded with data: ``H`` and its inverse take ``16 * D^2`` bytes (330 MB at
#: 4608, a 3x3 conv over 512 channels); wider layers (VGG's 25088-input classifier) round to
#: nearest, with a note in the report
MAX_FAN_IN = 4608
#: under ``rounding="auto"`` only layers up to this fan-in are rounded with data (a 3x3 conv
#: over 128 channels): the D^3 inverse and the R*D^2 moment of wider layers cost seconds each
#: on a CPU (ResNet-50 at 224x224 would convert ~10x slower); ``"gptq"`` takes them too
AUTO_MAX_FAN_IN = 1152
#: columns rounded per block before the lazy update of the rest (BLAS-3 efficiency)
BLOCK = 128


@dataclass
class RoundingResult:
    """Rounded weight rows per group and the layer-output SQNR before and after."""

    rows: List[np.ndarray]
    sqnr_nearest_db: float
    sqnr_db: float
    used: bool  # False: round-to-nearest was kept (it was as good or better)


def rows_for(d: int) -> int:
    """Input rows sampled to form a layer's ``H`` (fan-in ``d``): more for small layers,
    bounded so that forming ``H`` costs at most about 2^32 multiply-adds, and at least 2d
    (fewer rows than inputs leave ``H`` singular)."""
    return int(np.clip((1 << 32) // max(d * d, 1), max(2 * d, 2048), 32768))


def layer_cost(d: int, outputs: int, groups: int = 1) -> float:
    """Multiply-adds of rounding one layer: ``H`` from the rows, the inverse, the updates."""
    return float(groups) * (rows_for(d) * d * d + 2.0 * d ** 3 + outputs / groups * d * d)


def estimated_cost(shapes) -> float:
    """Rounding cost of a model: ``shapes`` yields ``(fan-in, outputs, groups)`` per layer;
    layers wider than :data:`AUTO_MAX_FAN_IN` are not rounded under ``auto`` and not counted."""
    return sum(layer_cost(d, o, g) for d, o, g in shapes if d <= AUTO_MAX_FAN_IN)


def second_moment(x_rows: np.ndarray) -> np.ndarray:
    """``H = X^T X / R`` of input rows ``[R, D]`` (float64; the product in float32, twice as
    fast and ample for a damped second moment)."""
    x = np.asarray(x_rows, dtype=np.float32)
    return (x.T @ x).astype(np.float64) / max(len(x), 1)


def output_noise(err_rows: np.ndarray, h: np.ndarray) -> float:
    """``tr(E H E^T)``: the mean squared output error caused by weight error ``E``."""
    return float(np.einsum("od,od->", err_rows @ h, err_rows))


def _quantize_column(w: np.ndarray, scale: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.rint(w * scale), lo, hi) / scale


def gptq_rows(w_rows: np.ndarray, h: np.ndarray, bits: int, fracs: np.ndarray) -> np.ndarray:
    """Grid values for ``w_rows [O, D]`` minimising ``tr(E H E^T)`` greedily column by column.

    ``fracs [O]``: each row's fractional length (step ``2^-f``); ``bits``: signed width.
    """
    w = np.array(w_rows, dtype=np.float64)
    o, d = w.shape
    lo, hi = Q.fxp_range(bits, True)
    scale = Q.pow2(np.asarray(fracs, dtype=np.int64)).astype(np.float64)
    h = np.array(h, dtype=np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0
    # inputs that are always zero carry no output: their weights round to nearest
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")  # most energetic inputs first
    inv_order = np.argsort(order)
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices(d)] += DAMP * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
        if not np.all(np.isfinite(hinv)):
            raise np.linalg.LinAlgError("non-finite factor")
    except np.linalg.LinAlgError:
        return _quantize_column(np.asarray(w_rows, dtype=np.float64), scale[:, None], lo, hi)
    q = np.empty_like(w)
    for i1 in range(0, d, BLOCK):
        i2 = min(i1 + BLOCK, d)
        w1 = w[:, i1:i2].copy()
        err = np.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = _quantize_column(col, scale, lo, hi)
            q[:, i1 + i] = qc
            e = (col - qc) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q[:, inv_order]


def round_layer(w_rows: List[np.ndarray], x_rows: List[np.ndarray], bits: int,
                fracs: List[np.ndarray]) -> Optional[RoundingResult]:
    """Data-aware rounding of one layer, group by group (see the module docstring).

    ``w_rows``/``x_rows``/``fracs``: per group, the weight rows ``[O_g, D]``, input rows
    ``[R, D]`` and row fractional lengths. None when there are no input rows.
    """
    if not x_rows or any(len(x) == 0 for x in x_rows):
        return None
    lo, hi = Q.fxp_range(bits, True)
    out, noise_near, noise_new, signal = [], 0.0, 0.0, 0.0
    for w, x, f in zip(w_rows, x_rows, fracs):
        h = second_moment(x)
        scale = Q.pow2(np.asarray(f, dtype=np.int64)).astype(np.float64)[:, None]
        near = _quantize_column(w, scale, lo, hi)
        data = gptq_rows(w, h, bits, f)
        n_near, n_data = output_noise(w - near, h), output_noise(w - data, h)
        signal += output_noise(w, h)
        noise_near += n_near
        noise_new += min(n_near, n_data)
        out.append(data if n_data < n_near else near)
    used = noise_new < noise_near
    return RoundingResult(out, Q.sqnr_db(signal, noise_near), Q.sqnr_db(signal, noise_new), used)
