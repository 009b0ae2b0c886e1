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
    #: per class-score output (see :func:`class_outputs`): predictions equal / predictions made
    agree: Dict[str, int] = field(default_factory=dict)
    predictions: Dict[str, int] = field(default_factory=dict)
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

    def agreement_per_output(self) -> Dict[str, float]:
        """Top-1 agreement with FP32 of each class-score output."""
        return {k: self.agree[k] / self.predictions[k] for k in self.agree if self.predictions[k]}

    @property
    def agreement(self) -> Optional[float]:
        """Top-1 agreement of the first class-score output (None: the model has none)."""
        per = self.agreement_per_output()
        return next(iter(per.values())) if per else None

    @property
    def top1_ref(self) -> Optional[float]:
        return self.correct_ref / self.labelled if self.labelled else None

    @property
    def top1_quant(self) -> Optional[float]:
        return self.correct_quant / self.labelled if self.labelled else None

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            # every output's signal and noise summed: with several outputs, the combined figure
            "output_sqnr_db": self.output_sqnr_db,
            "output_sqnr_db_95": list(self.sqnr_interval_db()),
            "stopped_early": self.stopped_early,
            "outputs": len(self.signal),
            "per_output_sqnr_db": self.per_output_db(),
            "class_outputs": list(self.agree),
            "top1_agreement": self.agreement,
            "top1_agreement_per_output": self.agreement_per_output(),
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


def is_class_scores(shape: Sequence) -> bool:
    """Whether an output of this shape (batch axis first) holds one score vector per sample:
    ``(N, C)`` or ``(N, C, 1, 1)`` with C >= 2. Box regressions, sequences and maps (two or more
    axes longer than one after the batch) are not class scores: their argmax means nothing."""
    rest = [d for d in list(shape)[1:] if not (isinstance(d, int) and d == 1)]
    return len(rest) == 1 and (not isinstance(rest[0], int) or rest[0] >= 2)


def class_outputs(model: onnx.ModelProto, named: Optional[Sequence[str]] = None) -> List[str]:
    """The outputs whose top-1 agreement is measured: ``named`` (checked against the model's
    outputs), else every output whose declared shape is class scores (:func:`is_class_scores`)."""
    outputs = [o.name for o in model.graph.output]
    if named:
        unknown = [n for n in named if n not in outputs]
        if unknown:
            raise MxqnError(f"class output {unknown[0]!r} is not an output of the model; its outputs are "
                            + ", ".join(outputs))
        return list(named)
    out = []
    for o in model.graph.output:
        dims = o.type.tensor_type.shape.dim
        if o.type.tensor_type.HasField("shape") and dims:
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            if is_class_scores(shape):
                out.append(o.name)
    return out


def compare(reference: onnx.ModelProto, quantized: onnx.ModelProto, batches: Iterable[Feed],
            labels: Optional[np.ndarray] = None, kept: Optional[ReferenceOutputs] = None,
            tolerance_db: Optional[float] = None, min_samples: int = MIN_VERIFY_SAMPLES,
            resume: Optional[Comparison] = None, session: Optional[ort.InferenceSession] = None,
            classes: Optional[Sequence[str]] = None) -> Comparison:
    """Run both models on ``batches``: output SQNR per output and combined, and top-1 agreement
    (and accuracy against ``labels``, on the first) of the class-score outputs.

    ``kept``: FP32 outputs of the first samples (the reference model runs only beyond them).
    ``tolerance_db``: stop once the 95% interval of the output SQNR is within this many dB
    either side, after at least ``min_samples`` samples (None: use every batch; labels and
    accuracy need every batch).
    ``resume``: a comparison of the same two models on the first samples of ``batches``; those
    samples are not run again and the measurement goes on from there.
    ``session``: a session on ``quantized`` already made (None: one is made here).
    ``classes``: the class-score outputs (None: found by :func:`class_outputs`); a ``resume``
    keeps those of the resumed comparison.
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
    classes = list(c.agree) if c.samples else class_outputs(reference, classes)
    for name in classes:
        c.agree.setdefault(name, 0)
        c.predictions.setdefault(name, 0)
    skip, pos = c.samples, 0
    offset = c.samples
    for batch in batches:
        n_batch = int(np.asarray(next(iter(batch.values()))).shape[0]) if batch and \
            np.ndim(next(iter(batch.values()))) else 1
        for feed, m in _chunks(batch, n_batch, splittable):
            start, pos = pos, pos + m  # this run holds samples start .. pos - 1 of the data
            if pos <= skip:  # measured already
                continue
            if start < skip:  # a run across the resumed part: only the rest of it
                cut = skip - start
                if not splittable or not all(np.ndim(v) and np.shape(v)[0] == m for v in feed.values()):
                    raise ValueError("compare: the resumed samples end inside a batch the model takes whole")
                feed, m = {k: np.asarray(v)[cut:] for k, v in feed.items()}, m - cut
            if offset != pos - m:  # a bug of ours: every figure would compare different samples
                raise AssertionError("compare: the FP32 references are out of step with the samples")
            ref = kept.get(offset, m) if kept is not None else None
            if ref is None:
                if ref_s is None:
                    ref_s = make_session(reference)
                ref = ref_s.run(names, feed)
            got = q_s.run(names, feed)
            _accumulate(c, names, ref, got, labels, offset, m)
            offset = c.samples
            if tolerance_db is not None and labels is None and c.samples >= min_samples \
                    and c.interval_half_width_db() <= tolerance_db:
                c.stopped_early = True
                return c
    return c


def _accumulate(c: Comparison, names: Sequence[str], ref: list, got: list, labels, offset: int, n: int) -> None:
    """Add one run of ``n`` samples (samples ``offset .. offset + n - 1`` of the data)."""
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
    first = True
    for name, r, g in zip(names, ref, got):
        if name not in c.agree or not (np.ndim(r) >= 2 and np.shape(r)[0] == n):
            continue
        pr, pq = _predictions(np.asarray(r), n), _predictions(np.asarray(g), n)
        c.agree[name] += int(np.sum(pr == pq))
        c.predictions[name] += int(pr.size)
        if first and labels is not None and pr.ndim == 1:
            lab = np.asarray(labels[offset:offset + n]).reshape(-1)
            if len(lab) == n:
                c.correct_ref += int(np.sum(pr == lab))
                c.correct_quant += int(np.sum(pq == lab))
                c.labelled += n
        first = False
    c.samples += n


def _predictions(scores: np.ndarray, n: int) -> np.ndarray:
    """The predicted class of each score vector: argmax over the last axis longer than one.
    One per sample, ``(n,)``, for ``(N, C)`` or ``(N, C, 1, 1)``; ``(n, positions)`` for a
    sequence of score vectors (an output the user names, such as ``(N, T, C)``)."""
    shape = list(scores.shape[1:])
    while len(shape) > 1 and shape[-1] == 1:
        shape.pop()
    pred = scores.reshape([n] + shape).argmax(-1).reshape(n, -1)
    return pred[:, 0] if pred.shape[1] == 1 else pred
