"""Quantization settings: a plain object, validated once at the entry point."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Tuple

from .errors import MxqnError

GRANULARITIES = ("auto", "tensor", "channel")
ACT_MODES = ("auto", "fixed", "log")
FORMATS = ("mxqn", "qdq")
#: How the qdq format stores 8-bit codes; see :mod:`mxqn_onnx.graph.qdq`.
QDQ_ENCODINGS = ("safe", "int8", "uint8")
MIN_BITS, MAX_BITS = 2, 16
SENSITIVITIES = ("quantizer", "noise", "none")
ROUNDINGS = ("nearest", "gptq", "auto")
OBJECTIVES = ("tensor", "output")
EQUALIZE = ("off", "pow2", "float")
DEPTHWISE_SHIFTS = ("auto", "on", "off")
#: Whether ``qdq`` quantizes layer outputs no quantizer follows (see QuantConfig)
LAYER_OUTPUTS = ("auto", "on", "off")
#: Whether the held-back check tries the first and last layer at keep_bits (see QuantConfig)
KEEP_ENDS = ("auto", "off")
BIAS_MEANS = ("auto", "data", "batchnorm")
#: under rounding="auto", data-aware rounding is used at or below this weight width, and at
#: any width when the whole model's rounding is estimated under AUTO_ROUNDING_BUDGET
#: multiply-adds (about a second on two cores: small models, where it gains 2-4 dB at 8 bits)
AUTO_ROUNDING_MAX_BITS = 6
AUTO_ROUNDING_BUDGET = 2e10


@dataclass
class QuantConfig:
    """What to quantize and how. See ``mxqn-onnx convert --help`` for each field.

    Attributes:
        wbits: weight bit width (2..16).
        abits: activation bit width (2..16).
        weight_granularity: ``auto`` (per layer, by the output channels' SQNRs), ``tensor`` or
            ``channel``.
        channel_gain_db: under ``auto``, per-channel fractional lengths are used when they
            raise the mean over output channels of each channel's own weight SQNR (in dB,
            capped at ``6.02 b + 10``; all-zero channels left out) by more than this many dB.
            Not the tensor-wide SQNR, which the largest channels dominate: one step for a
            layer whose one channel is 1000x the others zeroes the small ones at ~39 dB.
        act_quant: ``auto`` (fixed or log per tensor, by SQNR), ``fixed`` or ``log``; None (the
            default) is ``auto`` for format ``mxqn`` and ``fixed`` for ``qdq`` (see :attr:`act_mode`).
        log_margin_db: under ``auto``, log is chosen only when it beats fixed point by more
            than this margin (fixed point is cheaper in hardware).
        exclude: node names or glob patterns to leave in float.
        keep_first / keep_last: keep the first / last quantizable layer at ``keep_bits``
            (or in float when ``keep_float``).
        keep_ends: ``auto`` (below ``keep_bits``, with neither of the two set, the held-back
            check also converts with the first and last layer at ``keep_bits`` and keeps that
            where it measures better) or ``off``.
        calib_count: use at most this many calibration samples (None: all).
        batch_size: samples per onnxruntime run during calibration.
        verify: after rewriting, run FP32 and quantized models and measure output SQNR.
        verify_count: samples used for that measurement.
        class_outputs: the outputs that hold class scores, whose top-1 agreement with FP32 is
            measured (empty: every output shaped ``(N, C)`` or ``(N, C, 1, 1)``; box
            regressions and feature maps get SQNR only).
        bias_correction: subtract from each bias the mean output shift that weight
            quantization causes, estimated from the calibration inputs' channel means.
        bias_means: where bias correction takes each layer input's channel means from:
            ``data`` (calibration), ``batchnorm`` (analytically from the BatchNorm before it,
            data-free; layers without one are not corrected) or ``auto`` (batchnorm when the
            calibration data is synthetic, ``--calib random``; data otherwise).
        weight_clip: let a weight's fractional length go past the no-overflow length when
            that raises the weight tensor's SQNR (clipping its largest values). Off by
            default: it raises weight SQNR but lowers output SQNR at low bit widths.
        align_channels: rescale output channels (compensated in the next layer, FP32 function
            unchanged) so each channel's weights fill its power-of-two grid; see
            :mod:`mxqn_onnx.lowbit.align`. Off by default: measured +1.7 to +3.4 dB on ResNet34 and
            VGG19 at 4-bit weights but -0.6 to -1.7 dB on ResNet18 and at 8 bits.
        rounding: how weights are rounded onto their grid: ``nearest``, ``gptq`` (each code
            chosen for the layer's output error on calibration inputs, see
            :mod:`mxqn_onnx.lowbit.rounding`) or ``auto`` (gptq at or below 6-bit weights, and at
            any width for models whose rounding is cheap, see ``AUTO_ROUNDING_BUDGET``).
        act_objective: what an activation quantizer is chosen for: ``tensor`` (its own SQNR,
            the paper's rule) or ``output`` (the SQNR at the outputs of the layers reading
            it, see :mod:`mxqn_onnx.quant.objective`).
        equalize: cross-layer equalization before calibration (:mod:`mxqn_onnx.lowbit.align`):
            ``off``, ``pow2`` (power-of-two factors: the FP32 function is exactly kept) or
            ``float``.
        depthwise_shift: shift each input channel of a depthwise conv by a power of two so
            that every channel's maximum lies within a factor 2 of the tensor's, and divide
            the conv's filters by the same (the FP32 function is exactly kept; a ``Mul`` by
            the powers of two stays in the graph), from a first FP32 pass over 16 calibration
            samples (:mod:`mxqn_onnx.lowbit.depthwise`): ``on``, ``off``, or ``auto`` (shift, and
            keep the shifts only where the held-back check measures them better than the same
            conversion without; tried only where some channel needs a shift of 4 or more, and not
            where that check cannot run). ``True``/``False``
            stand for ``on``/``off``.
        holdout: hold back the first calibration samples (a quarter, 2 to 32) from the channel
            means of bias correction and from the samples of data-aware rounding, then keep
            the default, or the conversion without bias correction, or without depthwise shifts,
            or the paper's plain method (no bias correction, round to nearest, no shifts),
            whichever has the best output SQNR
            on those held-back samples. Needs ``verify``; off with mixed precision (whose own
            measurement decides).
        data_samples: calibration samples whose layer inputs are kept for the data-aware
            steps (rounding, the output objective, per-layer output measurements); fewer
            when they would exceed 256 MB.
        allow_empty: when no layer can be quantized, still write the model (with the mxqn
            metadata listing why every layer stayed float) instead of refusing.
        format: output format: ``mxqn`` (Cast/Mul weights, custom quantizer nodes) or ``qdq``
            (standard QuantizeLinear/DequantizeLinear with scales 2^-f where expressible).
        opset: raise the output's default-domain opset to this (None: keep the model's, at
            least 13). Opset 21 allows packed int4 weights and 16-bit QDQ.
        qdq_encoding: how ``qdq`` stores 8-bit codes: ``safe`` (signed int8 weights, uint8
            activations; a layer whose 8-bit weight codes could saturate onnxruntime's int16 pair
            sums on x86 CPUs without VNNI gets 7-bit codes: exact on every CPU, int8 in
            onnxruntime and OpenVINO), ``uint8`` (full 8-bit codes, stored as uint8 with zero
            point 128 where int8 could saturate: exact on every CPU, but OpenVINO runs those
            layers in float) or ``int8`` (signed, zero point 0 everywhere: what TensorRT
            accepts; exact in onnxruntime only with VNNI or on Arm).
        qdq_layer_outputs: under ``qdq``, also quantize (fixed point, by SQNR) each layer output
            that no quantizer follows yet (a conv feeding HardSwish, a residual Add; not the
            network's head, whose output reaches a graph output through float ops only), so that
            onnxruntime fuses the layer into an integer kernel (OpenVINO runs those layers in
            int8 without it). ``on``, ``off``, or ``auto`` (default): on, unless the model without
            them is more accurate on the held-back samples (:attr:`holdout`; with the check off,
            on). True/False mean on/off.

    Mixed precision (any of these turns it on; see :mod:`mxqn_onnx.mixed.search`):
        target_sqnr_db: output SQNR to reach with the fewest bits (weights + activations).
        avg_wbits / avg_abits: budgets: average weight bits per parameter / activation bits
            per element; the highest predicted SQNR within them. A group without a budget
            (and no target) stays at ``wbits``/``abits``.
        max_size_mb: weight budget as packed storage in MB (weights at their widths + int32
            biases of the quantized layers).
        max_accuracy_drop: with labelled validation data, the smallest model whose top-1 is
            within this many points of FP32.
        bits_set: the widths a layer may get.
        sensitivity: how much each layer's noise reaches the output: ``quantizer`` (measured
            with the real quantizers, one layer at a time), ``noise`` (Gaussian noise
            injection) or ``none`` (every layer 1). See :mod:`mxqn_onnx.mixed.sensitivity`.
        probe_count / probe_sqnr_db: samples for the probe; the ``noise`` probe's level.
        refine_steps: at most this many re-allocations when the measured SQNR misses.
    """

    wbits: int = 8
    abits: int = 8
    weight_granularity: str = "auto"
    channel_gain_db: float = 0.5
    act_quant: Optional[str] = None
    log_margin_db: float = 0.0
    exclude: Tuple[str, ...] = field(default_factory=tuple)
    keep_first: bool = False
    keep_last: bool = False
    keep_float: bool = False
    keep_bits: int = 8
    keep_ends: str = "auto"
    calib_count: Optional[int] = None
    batch_size: int = 16
    verify: bool = True
    verify_count: int = 256
    class_outputs: Tuple[str, ...] = field(default_factory=tuple)
    bias_correction: bool = True
    bias_means: str = "auto"
    weight_clip: bool = False
    align_channels: bool = False
    rounding: str = "auto"
    act_objective: str = "tensor"
    equalize: str = "off"
    holdout: bool = True
    depthwise_shift: str = "auto"
    data_samples: int = 128
    allow_empty: bool = False
    format: str = "mxqn"
    opset: Optional[int] = None
    qdq_encoding: str = "safe"
    qdq_layer_outputs: str = "auto"
    target_sqnr_db: Optional[float] = None
    avg_wbits: Optional[float] = None
    avg_abits: Optional[float] = None
    max_size_mb: Optional[float] = None
    max_accuracy_drop: Optional[float] = None
    bits_set: Tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    sensitivity: str = "quantizer"
    probe_count: int = 64
    probe_sqnr_db: float = 30.0
    refine_steps: int = 3

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
        for name, allowed in (("rounding", ROUNDINGS), ("act_objective", OBJECTIVES), ("equalize", EQUALIZE),
                              ("bias_means", BIAS_MEANS), ("qdq_encoding", QDQ_ENCODINGS)):
            if getattr(self, name) not in allowed:
                raise MxqnError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.data_samples, int) or isinstance(self.data_samples, bool) or self.data_samples < 0:
            raise MxqnError(f"data_samples must be a non-negative integer, got {self.data_samples!r}")
        if self.data_samples == 0 and (self.rounding == "gptq" or self.act_objective == "output"):
            what = "rounding gptq" if self.rounding == "gptq" else "act_objective output"
            raise MxqnError(f"{what} needs kept calibration samples; data_samples must be at least 1")
        if self.keep_ends not in KEEP_ENDS:
            raise MxqnError(f"keep_ends must be one of {', '.join(KEEP_ENDS)}, got {self.keep_ends!r}")
        if isinstance(self.qdq_layer_outputs, bool):
            self.qdq_layer_outputs = "on" if self.qdq_layer_outputs else "off"
        if self.qdq_layer_outputs not in LAYER_OUTPUTS:
            raise MxqnError(f"qdq_layer_outputs must be one of {', '.join(LAYER_OUTPUTS)} (or True/False), "
                            f"got {self.qdq_layer_outputs!r}")
        if not isinstance(self.holdout, bool):
            raise MxqnError(f"holdout must be True or False, got {self.holdout!r}")
        if isinstance(self.depthwise_shift, bool):
            self.depthwise_shift = "on" if self.depthwise_shift else "off"
        if self.depthwise_shift not in DEPTHWISE_SHIFTS:
            raise MxqnError(f"depthwise_shift must be one of {', '.join(DEPTHWISE_SHIFTS)} (or True/False), "
                            f"got {self.depthwise_shift!r}")
        if self.act_quant is not None and self.act_quant not in ACT_MODES:
            raise MxqnError(f"act_quant must be one of {', '.join(ACT_MODES)}, got {self.act_quant!r}")
        for name in ("channel_gain_db", "log_margin_db"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v:
                raise MxqnError(f"{name} must be a number of dB, got {v!r}")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)
        if isinstance(self.class_outputs, str):
            self.class_outputs = (self.class_outputs,)
        self.class_outputs = tuple(self.class_outputs)
        if self.calib_count is not None and (not isinstance(self.calib_count, int) or self.calib_count < 1):
            raise MxqnError(f"calib_count must be a positive integer, got {self.calib_count!r}")
        for name in ("batch_size", "verify_count"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MxqnError(f"{name} must be a positive integer, got {v!r}")
        self._validate_mixed()
        return self

    def _validate_mixed(self) -> None:
        """The mixed-precision fields (see the class docstring)."""
        try:
            bits = tuple(sorted(set(int(b) for b in self.bits_set)))
        except (TypeError, ValueError):
            raise MxqnError(f"bits_set must be integers from {MIN_BITS} to {MAX_BITS}, got {self.bits_set!r}") from None
        if not bits or any(isinstance(b, bool) or not MIN_BITS <= b <= MAX_BITS for b in bits) \
                or any(float(b) != int(b) for b in self.bits_set):
            raise MxqnError(f"bits_set must be integers from {MIN_BITS} to {MAX_BITS}, got {self.bits_set!r}")
        self.bits_set = bits
        for name in ("target_sqnr_db", "avg_wbits", "avg_abits", "max_size_mb", "max_accuracy_drop",
                     "probe_sqnr_db"):
            v = getattr(self, name)
            if v is None and name != "probe_sqnr_db":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v in (float("inf"), float("-inf")):
                raise MxqnError(f"{name} must be a finite number, got {v!r}")
        for name in ("avg_wbits", "avg_abits"):
            v = getattr(self, name)
            if v is not None and not bits[0] <= v <= MAX_BITS:
                raise MxqnError(f"{name} must be from the smallest allowed width ({bits[0]}) to "
                                f"{MAX_BITS}, got {v!r}")
        if self.max_size_mb is not None and self.max_size_mb <= 0:
            raise MxqnError(f"max_size_mb must be positive, got {self.max_size_mb!r}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise MxqnError(f"max_accuracy_drop must be >= 0 points, got {self.max_accuracy_drop!r}")
        if self.max_accuracy_drop is not None and self.target_sqnr_db is not None:
            raise MxqnError("give either target_sqnr_db or max_accuracy_drop, not both")
        if self.sensitivity not in SENSITIVITIES:
            raise MxqnError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, got {self.sensitivity!r}")
        for name in ("probe_count",):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MxqnError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.refine_steps, int) or isinstance(self.refine_steps, bool) or self.refine_steps < 0:
            raise MxqnError(f"refine_steps must be a non-negative integer, got {self.refine_steps!r}")

    @property
    def act_mode(self) -> str:
        """The activation quantizer mode in effect: ``act_quant``, or by default ``fixed`` for
        the qdq format (standard ONNX throughout) and ``auto`` for mxqn."""
        if self.act_quant is not None:
            return self.act_quant
        return "fixed" if self.format == "qdq" else "auto"

    @property
    def quantizes_layer_outputs(self) -> bool:
        """Whether the conversion chooses quantizers for layer outputs (``qdq``, not ``off``;
        under ``auto`` the held-back check may still drop them)."""
        return self.format == "qdq" and self.qdq_layer_outputs != "off"

    @property
    def layer_outputs_on_trial(self) -> bool:
        """Whether the held-back check decides on the layer-output quantizers (``qdq``, ``auto``)."""
        return self.format == "qdq" and self.qdq_layer_outputs == "auto"

    @property
    def keep_ends_on_trial(self) -> bool:
        """Whether the held-back check also tries the first and last layer at ``keep_bits``
        (``keep_ends`` auto, uniform widths below ``keep_bits``, neither end set by hand)."""
        return (self.keep_ends == "auto" and not (self.keep_first or self.keep_last or self.keep_float)
                and self.allocation_mode is None and min(self.wbits, self.abits) < self.keep_bits)

    def rounds_with_data(self, wbits: int, model_cost: float = float("inf")) -> bool:
        """Whether weights of ``wbits`` get data-aware rounding, in a model whose rounding is
        estimated at ``model_cost`` multiply-adds (:func:`mxqn_onnx.lowbit.rounding.estimated_cost`)."""
        if self.rounding != "auto":
            return self.rounding == "gptq"
        return wbits <= AUTO_ROUNDING_MAX_BITS or model_cost <= AUTO_ROUNDING_BUDGET

    def uses_samples(self, model_cost: float = float("inf")) -> bool:
        """Whether calibration keeps real layer inputs (for rounding / the output objective)."""
        if self.data_samples == 0:
            return False
        # mixed precision may give any layer a width from bits_set
        widths = self.bits_set if self.allocates_weights else \
            (self.wbits,) + ((self.keep_bits,) if self.keep_first or self.keep_last else ())
        return self.act_objective == "output" or any(self.rounds_with_data(b, model_cost) for b in widths)

    @property
    def allocates_weights(self) -> bool:
        """Weight widths are chosen per layer (a target, or a weight budget)."""
        return (self.target_sqnr_db is not None or self.max_accuracy_drop is not None
                or self.avg_wbits is not None or self.max_size_mb is not None)

    @property
    def allocates_activations(self) -> bool:
        """Activation widths are chosen per tensor (a target, or an activation budget)."""
        return (self.target_sqnr_db is not None or self.max_accuracy_drop is not None
                or self.avg_abits is not None)

    @property
    def allocation_mode(self) -> Optional[str]:
        """``target``, ``accuracy``, ``budget`` or None (uniform widths)."""
        if self.max_accuracy_drop is not None:
            return "accuracy"
        if self.target_sqnr_db is not None:
            return "target"
        if self.allocates_weights or self.allocates_activations:
            return "budget"
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["class_outputs"] = list(self.class_outputs)
        d["bits_set"] = list(self.bits_set)
        return d

    @classmethod
    def from_kwargs(cls, **kwargs) -> "QuantConfig":
        """Build from keyword arguments, rejecting unknown names with a clear message."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise MxqnError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs).validate()
