"""Quantization settings: a plain object, validated once at the entry point."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Tuple

from .errors import MxqnError

GRANULARITIES = ("auto", "tensor", "channel")
ACT_MODES = ("auto", "fixed", "log")
FORMATS = ("mxqn", "qdq")
MIN_BITS, MAX_BITS = 2, 16


@dataclass
class QuantConfig:
    """What to quantize and how. See ``mxqn-onnx convert --help`` for each field.

    Attributes:
        wbits: weight bit width (2..16).
        abits: activation bit width (2..16).
        weight_granularity: ``auto`` (per layer, by SQNR), ``tensor`` or ``channel``.
        channel_gain_db: under ``auto``, per-channel fractional lengths are used when they
            raise the weight SQNR by more than this many dB.
        act_quant: ``auto`` (fixed or log per tensor, by SQNR), ``fixed`` or ``log``.
        log_margin_db: under ``auto``, log is chosen only when it beats fixed point by more
            than this margin (fixed point is cheaper in hardware).
        exclude: node names or glob patterns to leave in float.
        keep_first / keep_last: keep the first / last quantizable layer at ``keep_bits``
            (or in float when ``keep_float``).
        calib_count: use at most this many calibration samples (None: all).
        batch_size: samples per onnxruntime run during calibration.
        verify: after rewriting, run FP32 and quantized models and measure output SQNR.
        verify_count: samples used for that measurement.
        bias_correction: subtract from each bias the mean output shift that weight
            quantization causes, estimated from the calibration inputs' channel means.
        format: output format: ``mxqn`` (Cast/Mul weights, custom quantizer nodes) or ``qdq``
            (standard QuantizeLinear/DequantizeLinear with scales 2^-f where expressible).
        opset: raise the output's default-domain opset to this (None: keep the model's, at
            least 13). Opset 21 allows packed int4 weights and 16-bit QDQ.
    """

    wbits: int = 8
    abits: int = 8
    weight_granularity: str = "auto"
    channel_gain_db: float = 0.5
    act_quant: str = "auto"
    log_margin_db: float = 0.0
    exclude: Tuple[str, ...] = field(default_factory=tuple)
    keep_first: bool = False
    keep_last: bool = False
    keep_float: bool = False
    keep_bits: int = 8
    calib_count: Optional[int] = None
    batch_size: int = 16
    verify: bool = True
    verify_count: int = 256
    bias_correction: bool = True
    format: str = "mxqn"
    opset: Optional[int] = None

    def validate(self) -> "QuantConfig":
        """Check every field; raise :class:`MxqnError` naming the first bad one."""
        for name in ("wbits", "abits", "keep_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not MIN_BITS <= v <= MAX_BITS:
                raise MxqnError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {v!r}")
        if self.weight_granularity not in GRANULARITIES:
            raise MxqnError(
                f"weight_granularity must be one of {', '.join(GRANULARITIES)}, "
                f"got {self.weight_granularity!r}"
            )
        if self.format not in FORMATS:
            raise MxqnError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.opset is not None:
            import onnx

            newest = onnx.defs.onnx_opset_version()
            if not isinstance(self.opset, int) or isinstance(self.opset, bool) or not 13 <= self.opset <= newest:
                raise MxqnError(f"opset must be an integer from 13 to {newest}, got {self.opset!r}")
        if self.act_quant not in ACT_MODES:
            raise MxqnError(f"act_quant must be one of {', '.join(ACT_MODES)}, got {self.act_quant!r}")
        for name in ("channel_gain_db", "log_margin_db"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v:
                raise MxqnError(f"{name} must be a number of dB, got {v!r}")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)
        if self.calib_count is not None and (not isinstance(self.calib_count, int) or self.calib_count < 1):
            raise MxqnError(f"calib_count must be a positive integer, got {self.calib_count!r}")
        for name in ("batch_size", "verify_count"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MxqnError(f"{name} must be a positive integer, got {v!r}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_kwargs(cls, **kwargs) -> "QuantConfig":
        """Build from keyword arguments, rejecting unknown names with a clear message."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise MxqnError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs).validate()
