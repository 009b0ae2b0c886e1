"""Run an FP32 and a quantized model side by side: output SQNR, top-1 accuracy, agreement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import numpy as np
import onnx

from ..calibration.calibrate import make_session
from ..calibration.data import Feed
from ..errors import MxqnError
from ..quant.quantizers import sqnr_db


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

    @property
    def output_sqnr_db(self) -> float:
        """SQNR over all outputs together."""
        return sqnr_db(sum(self.signal.values()), sum(self.noise.values()))

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
            "per_output_sqnr_db": self.per_output_db(),
            "top1_agreement": self.agreement,
            "top1_fp32": self.top1_ref,
            "top1_quant": self.top1_quant,
        }


def compare(reference: onnx.ModelProto, quantized: onnx.ModelProto, batches: Iterable[Feed],
            labels: Optional[np.ndarray] = None) -> Comparison:
    """Run both models on ``batches``; the first output's argmax is the predicted class."""
    ref_s = make_session(reference)
    q_s = make_session(quantized)
    names = [o.name for o in ref_s.get_outputs()]
    if [o.name for o in q_s.get_outputs()] != names:
        raise MxqnError("the two models have different outputs; compare a model with its own conversion")
    c = Comparison()
    offset = 0
    for feed in batches:
        ref = ref_s.run(names, feed)
        got = q_s.run(names, feed)
        for name, r, g in zip(names, ref, got):
            r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
            c.signal[name] = c.signal.get(name, 0.0) + float(np.sum(r64 * r64))
            c.noise[name] = c.noise.get(name, 0.0) + float(np.sum((r64 - g64) ** 2))
        n = int(np.asarray(ref[0]).shape[0]) if np.ndim(ref[0]) else 1
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
        offset += n
    return c
