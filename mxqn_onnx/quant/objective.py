"""The layer-output objective for activation quantizers.

The core chooses an activation's quantizer by the SQNR of the tensor itself. What matters is
the error at the outputs of the layers that read it: ``||W (Q(x) - x)||``, where channels the
weights amplify count more and errors on correlated inputs can cancel. With real input
patches of each consumer layer (:mod:`mxqn_onnx.lowbit.unfold`), this module scores every candidate
the tensor search considers (every fixed-point length; log with each k at its best top, and
two tops either side for the two best k) by the consumers' output SQNR and keeps the best. Where the
two objectives agree nothing changes; the report shows both numbers either way.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Sequence, Tuple

import numpy as np

from ..calibration.observers import TensorHistogram
from ..lowbit import unfold
from . import quantizers as Q

#: input rows per consumer layer used to score the candidates (fewer for very wide layers,
#: so that a layer's rows stay within 64 MB)
OBJECTIVE_ROWS = 2048
ROWS_BYTES = 64 << 20
#: log candidates are scored at the outputs only within this many dB of the
#: best tensor SQNR, which bounds the cost; the 11 fixed-point lengths are always all scored
CANDIDATE_WINDOW_DB = 6.0

Consumer = Tuple[List[np.ndarray], List[np.ndarray]]  # (weight rows, input rows) per group


def rows_for_scoring(d: int) -> int:
    """Input rows used to score a layer of fan-in ``d``."""
    return int(max(256, min(OBJECTIVE_ROWS, ROWS_BYTES // (8 * max(d, 1)))))


def _candidates(act, hist: TensorHistogram, mode: str) -> List[dict]:
    bins = hist.bins()
    bits, signed = act.bits, act.signed
    out: List[dict] = []
    if mode in ("auto", "fixed"):
        fracs = Q.fxp_candidates(bins.max_abs, bits, signed)
        errs = Q.fxp_errors_binned(bins, bits, signed, fracs)
        out += [dict(kind="fixed", frac=int(f), k=None, E=None, err=float(e)) for f, e in zip(fracs, errs)]
    if mode in ("auto", "log"):
        per_k = []
        for k in range(Q.log_max_k(bits) + 1):
            tops = Q.log_tops(bins.max_abs, k)
            errs = Q.log_errors_binned(bins, bits, k, signed, tops)
            per_k.append((k, tops, errs, int(np.argmin(errs))))
        # every k at its best top, and the two best k with two tops either side
        ranked = sorted(per_k, key=lambda t: t[2][t[3]])
        for rank, (k, tops, errs, best) in enumerate(ranked):
            span = range(max(0, best - 2), min(len(tops), best + 3)) if rank < 2 else (best,)
            out += [dict(kind="log", frac=None, k=k, E=int(tops[j]), err=float(errs[j])) for j in span]
    signal = bins.signal_power()
    for c in out:
        c["sqnr_db"] = Q.sqnr_db(signal, c["err"])
    best = max((c["sqnr_db"] for c in out), default=0.0)
    return [c for c in out if c["kind"] == "fixed" or c["sqnr_db"] >= best - CANDIDATE_WINDOW_DB]


def _quantize(c: dict, bits: int, signed: bool, x: np.ndarray) -> np.ndarray:
    if c["kind"] == "fixed":
        return Q.fxp_quantize(x, bits, c["frac"], signed)
    return Q.log_quantize(x, bits, c["k"], c["E"], signed)


def consumers_sqnr(quantize, consumers: Sequence[Consumer]) -> float:
    """Output SQNR (dB) of the consumer layers when their input goes through ``quantize``.

    Several consumers: their noise-to-signal ratios are averaged.
    """
    ratios = []
    for w_rows, x_rows in consumers:
        sig, err = unfold.output_error(w_rows, x_rows, [quantize(x.astype(np.float32)) for x in x_rows])
        noise = float(np.sum(np.square(err, dtype=np.float64)))
        ratios.append(noise / sig if sig > 0 else 0.0)
    mean = float(np.mean(ratios))
    return float("inf") if mean == 0 else float(-10 * np.log10(mean))


def refine_activation(act, hist: TensorHistogram, consumers: Sequence[Consumer], mode: str):
    """``act`` re-chosen for the consumers' output SQNR (an :class:`ActDecision`).

    The returned decision records ``objective="output"``, the output SQNR of the choice and
    that of the tensor-SQNR choice (``output_sqnr_tensor_db``).
    """
    if not consumers or hist.bins().max_abs == 0:
        return act
    before = consumers_sqnr(act.quantize, consumers)
    best, best_db = None, before
    for c in _candidates(act, hist, mode):
        db = consumers_sqnr(lambda x, c=c: _quantize(c, act.bits, act.signed, x), consumers)
        if db > best_db + 1e-9:
            best, best_db = c, db
    if best is None:
        return replace(act, objective="output", output_sqnr_db=before, output_sqnr_tensor_db=before)
    new = replace(act, kind=best["kind"], frac=best["frac"], k=best["k"], E=best["E"], sqnr_db=best["sqnr_db"],
                  objective="output", output_sqnr_db=best_db, output_sqnr_tensor_db=before)
    new.mean_error = Q.mean_error_binned(hist.bins(), new.quantize)
    return new
