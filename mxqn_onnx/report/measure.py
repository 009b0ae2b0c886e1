"""Run an FP32 and a quantized model side by side: output SQNR, top-1 accuracy, agreement.

Verification is cheap by construction: the FP32 outputs of the first calibration samples are
kept by the calibration run (:class:`~mxqn_onnx.calibration.observers.ReferenceOutputs`), so only the quantized model runs, and
it runs only until the output SQNR is known to :data:`VERIFY_TOLERANCE_DB` (a 95% interval from
the per-sample noise and signal, reported with the measurement).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort

from ..calibration.calibrate import make_session
from ..calibration.data import Feed
from ..calibration.observers import ReferenceOutputs
from ..errors import MxqnError
from ..quant.quantizers import sqnr_db

#: Verification stops once the 95% interval of the output SQNR is this many dB either side.
VERIFY_TOLERANCE_DB = 1.0
#: ... and only after at least this many samples.
MIN_VERIFY_SAMPLES = 4
#: Samples per quantized-model run are cut so that one run takes about this many input values
#: (a 736x1088 page runs alone, so verification can stop after any page).
RUN_INPUT_VALUES = 2 ** 21

# Student's t, 97.5% quantile, by degrees of freedom (normal beyond the table)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}


def _t975(df: int) -> float:
    keys = sorted(_T975)
    if df <= 0:
        return math.inf
    if df > keys[-1]:
        return 1.96
    return _T975[min(k for k in keys if k >= df)]  # the next tabulated df: a slightly wider interval


@dataclass
class Comparison:
    """Accumulated comparison of two models' outputs over batches."""

    samples: int = 0
    signal: Dict[str, float] = field(default_factory=dict)
    noise: Dict[str, float] = field(default_factory=dict)
    agree: int = 0
    correct_ref: int = 0
    correct_quant: int = 0
    labelled: int = 0
    #: per verification unit (a sample, or a whole batch for outputs without a batch axis)
    unit_signal: List[float] = field(default_factory=list)
    unit_noise: List[float] = field(default_factory=list)
    #: whether the run stopped on reaching the tolerance (the interval being tight enough)
    stopped_early: bool = False

    @property
    def output_sqnr_db(self) -> float:
        """SQNR over all outputs together."""
        return sqnr_db(sum(self.signal.values()), sum(self.noise.values()))

    def sqnr_interval_db(self) -> Tuple[float, float]:
        """95% interval of :attr:`output_sqnr_db` over the samples (ratio estimator, Student t).

        ``(-inf, inf)`` with fewer than two samples; the upper end is ``inf`` when the noise
        could be nil within the interval.
        """
        m = len(self.unit_signal)
        s = np.asarray(self.unit_signal, np.float64)
        n = np.asarray(self.unit_noise, np.float64)
        if m < 2 or s.sum() <= 0:
            return (-math.inf, math.inf)
        r = n.sum() / s.sum()
        se = math.sqrt(float(np.sum((n - r * s) ** 2)) / (m * (m - 1))) / float(s.mean())
        half = _t975(m - 1) * se
        lo = -10 * math.log10(r + half) if r + half > 0 else math.inf
        hi = -10 * math.log10(r - half) if r - half > 0 else math.inf
        return (lo, hi)

    def interval_half_width_db(self) -> float:
        lo, hi = self.sqnr_interval_db()
        mid = self.output_sqnr_db
        return max(mid - lo, hi - mid) if math.isfinite(mid) else math.inf

    def per_output_db(self) -> Dict[str, float]:
        return {k: sqnr_db(self.signal[k], self.noise[k]) for k in self.signal}

    @property
    def agreement(self) -> float:
        return self.agree / self.samples if self.samples else float("nan")

    @property
    def top1_ref(self) -> Optional[float]:
        return self.correct_ref / self.labelled if self.labelled else None

    @property
    def top1_quant(self) -> Optional[float]:
        return self.correct_quant / self.labelled if self.labelled else None

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "output_sqnr_db": self.output_sqnr_db,
            "output_sqnr_db_95": list(self.sqnr_interval_db()),
            "stopped_early": self.stopped_early,
            "per_output_sqnr_db": self.per_output_db(),
            "top1_agreement": self.agreement,
            "top1_fp32": self.top1_ref,
            "top1_quant": self.top1_quant,
        }


def _chunks(feed: Feed, n: int, splittable: bool = True):
    """The batch cut into runs of about :data:`RUN_INPUT_VALUES` input values (whole when the
    model's batch size is fixed)."""
    arrays = list(feed.values())
    if n <= 1 or not splittable or not all(np.ndim(a) and np.shape(a)[0] == n for a in arrays):
        yield feed, n
        return
    per = sum(np.asarray(a).size for a in arrays) / n
    step = max(1, int(RUN_INPUT_VALUES // max(per, 1)))
    for start in range(0, n, step):
        m = min(step, n - start)
        yield (feed if m == n else {k: v[start:start + m] for k, v in feed.items()}), m


def compare(reference: onnx.ModelProto, quantized: onnx.ModelProto, batches: Iterable[Feed],
            labels: Optional[np.ndarray] = None, kept: Optional[ReferenceOutputs] = None,
            tolerance_db: Optional[float] = None, min_samples: int = MIN_VERIFY_SAMPLES,
            resume: Optional[Comparison] = None, session: Optional[ort.InferenceSession] = None) -> Comparison:
    """Run both models on ``batches``; the first output's argmax is the predicted class.

    ``kept``: FP32 outputs of the first samples (the reference model runs only beyond them).
    ``tolerance_db``: stop once the 95% interval of the output SQNR is within this many dB
    either side, after at least ``min_samples`` samples (None: use every batch; labels and
    accuracy need every batch).
    ``resume``: a comparison of the same two models on the first samples of ``batches``; those
    samples are not run again and the measurement goes on from there.
    ``session``: a session on ``quantized`` already made (None: one is made here).
    """
    q_s = session if session is not None else make_session(quantized)
    names = [o.name for o in q_s.get_outputs()]
    ref_names = [o.name for o in reference.graph.output]
    if ref_names != names:
        raise MxqnError("the two models have different outputs; compare a model with its own conversion")
    if kept is not None and kept.names != names:
        kept = None
    ref_s = None
    # a model whose batch size is fixed takes only whole batches
    inits = {t.name for t in quantized.graph.initializer}
    splittable = not any(i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_value > 0
                         for i in quantized.graph.input if i.name not in inits)
    c = copy.deepcopy(resume) if resume is not None and labels is None else Comparison()
    skip, pos = c.samples, 0
    offset = c.samples
    for batch in batches:
        n_batch = int(np.asarray(next(iter(batch.values()))).shape[0]) if batch and \
            np.ndim(next(iter(batch.values()))) else 1
        for feed, m in _chunks(batch, n_batch, splittable):
            if pos + m <= skip:  # measured already
                pos += m
                continue
            if pos < skip:  # a run across the resumed part: only the rest of it
                cut = skip - pos
                if not splittable or not all(np.ndim(v) and np.shape(v)[0] == m for v in feed.values()):
                    raise ValueError("compare: the resumed samples end inside a batch the model takes whole")
                feed, m = {k: np.asarray(v)[cut:] for k, v in feed.items()}, m - cut
            pos += m
            ref = kept.get(offset, m) if kept is not None else None
            if ref is None:
                if ref_s is None:
                    ref_s = make_session(reference)
                ref = ref_s.run(names, feed)
            got = q_s.run(names, feed)
            _accumulate(c, names, ref, got, labels, offset)
            offset = c.samples
            if tolerance_db is not None and labels is None and c.samples >= min_samples \
                    and c.interval_half_width_db() <= tolerance_db:
                c.stopped_early = True
                return c
    return c


def _accumulate(c: Comparison, names: Sequence[str], ref: list, got: list, labels, offset: int) -> None:
    n = int(np.asarray(ref[0]).shape[0]) if np.ndim(ref[0]) else 1
    per_sample = all(np.ndim(r) and np.shape(r)[0] == n for r in ref)
    unit_s = np.zeros(n if per_sample else 1)
    unit_n = np.zeros_like(unit_s)
    for name, r, g in zip(names, ref, got):
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        rs, ns = r64 * r64, (r64 - g64) ** 2
        if per_sample:
            rs, ns = rs.reshape(n, -1).sum(1), ns.reshape(n, -1).sum(1)
        else:
            rs, ns = np.array([rs.sum()]), np.array([ns.sum()])
        unit_s += rs
        unit_n += ns
        c.signal[name] = c.signal.get(name, 0.0) + float(rs.sum())
        c.noise[name] = c.noise.get(name, 0.0) + float(ns.sum())
    c.unit_signal.extend(unit_s.tolist())
    c.unit_noise.extend(unit_n.tolist())
    if np.ndim(ref[0]) >= 2:
        pr = np.asarray(ref[0]).reshape(n, -1).argmax(1)
        pq = np.asarray(got[0]).reshape(n, -1).argmax(1)
        c.agree += int(np.sum(pr == pq))
        if labels is not None:
            lab = np.asarray(labels[offset:offset + n]).reshape(-1)
            if len(lab) == n:
                c.correct_ref += int(np.sum(pr == lab))
                c.correct_quant += int(np.sum(pq == lab))
                c.labelled += n
    c.samples += n
