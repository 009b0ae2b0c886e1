"""What a conversion gives back: :class:`QuantResult`, the converted model with every decision
and measurement, and the JSON it stores as the model's ``mxqn`` metadata and writes as the
report (format: docs/FORMAT.md)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import onnx

from ._version import __version__
from .config import QuantConfig
from .graph import functions
from .graph.containers import weight_container
from .graph.layers import Skipped
from .graph.loading import METADATA_KEY
from .graph.rewrite import FORMAT_VERSION
from .quant.choose import ActDecision, LayerDecision
from .report.measure import Comparison
from .writing import save_model_atomic


def _finite(x):
    """JSON-safe number: infinities (noise-free tensors) become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


@dataclass
class QuantResult:
    """The converted model and what was decided and measured."""

    model: onnx.ModelProto
    layers: List[LayerDecision]
    activations: Dict[str, ActDecision]
    float_layers: List[Skipped]
    predicted_sqnr_db: float
    comparison: Optional[Comparison]
    calibration_samples: int
    size_before: int
    size_after: int
    timings: Dict[str, float] = field(default_factory=dict)
    config: QuantConfig = field(default_factory=QuantConfig)
    opset: int = 0  # the output's default-domain opset (decides the weight containers)
    #: mixed precision: what was allocated, predicted, measured and evaluated (None: uniform)
    allocation: Optional[dict] = None
    #: compact calibration histogram per activation tensor (for plots; report only)
    histograms: Dict[str, dict] = field(default_factory=dict)
    packed_weight_bytes: int = 0  # weights packed at their widths + int32 biases
    #: where bias correction took the input channel means: "data" or "batchnorm" (data-free)
    bias_means: str = "data"
    #: cross-layer equalization: pairs, channels and per-layer weight SQNR before/after (None: off)
    equalization: Optional[dict] = None
    #: the held-back check of the data-derived defaults: samples, SQNR per candidate, kept
    holdout: Optional[dict] = None
    #: depthwise input shifts: tensors, convs, channels per shift (None: off)
    depthwise_shift: Optional[dict] = None
    #: the kept candidate's comparison on the held-back samples (verification resumes it)
    held_back_comparison: Optional[Comparison] = None

    @property
    def measured_sqnr_db(self) -> Optional[float]:
        return self.comparison.output_sqnr_db if self.comparison else None

    def decisions(self) -> dict:
        """The per-layer decisions, as stored in the model's metadata."""
        d = self._decisions()
        if self.allocation is not None:
            d["allocation"] = _finite(self.allocation)
        if self.equalization is not None:
            d["equalization"] = _finite(self.equalization)
        if self.holdout is not None:
            d["holdout"] = _finite(self.holdout)
        if self.depthwise_shift is not None:
            d["depthwise_shift"] = self.depthwise_shift
        return d

    def _decisions(self) -> dict:
        return _finite({
            "format": self.config.format,
            "format_version": FORMAT_VERSION,
            "opset": self.opset,
            "producer": f"mxqn-onnx {__version__}",
            "domain": functions.DOMAIN,
            "config": self.config.to_dict(),
            "layers": [_with_container(d.to_dict(), self.opset) for d in self.layers],
            "activations": [vars(a) for a in self.activations.values()],
            "float_layers": [vars(s) for s in self.float_layers],
            "predicted_output_sqnr_db": self.predicted_sqnr_db,
            "calibration_samples": self.calibration_samples,
            "bias_means": self.bias_means,
        })

    def report(self) -> dict:
        """Decisions plus measurements (output SQNR, sizes, timings) as a JSON-ready dict."""
        d = self.decisions()
        d["measured"] = _finite(self.comparison.to_dict()) if self.comparison else None
        d["size_bytes"] = {"before": self.size_before, "after": self.size_after,
                           "packed_weights": self.packed_weight_bytes}
        if self.histograms:
            d["histograms"] = _finite(self.histograms)
        d["timing_s"] = _finite(self.timings)
        return d

    def save(self, path) -> None:
        """Write the model atomically (temporary file in the same folder, then rename)."""
        save_model_atomic(self.model, path)


def _with_container(layer: dict, opset: int) -> dict:
    """Add the weight's storage type: 5-7 bit codes still take a whole int8 each."""
    layer["weight"]["container"] = weight_container(layer["weight"]["bits"], opset)
    return layer


def set_metadata(model: onnx.ModelProto, decisions: dict) -> None:
    """Replace the stored decisions (the ``mxqn`` metadata entry) of a converted model."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps(decisions, sort_keys=True)
