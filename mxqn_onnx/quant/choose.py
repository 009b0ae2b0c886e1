"""Choose each layer's quantizers by SQNR: weights fixed point (per tensor or per channel),
activations fixed point or log, bias int32."""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..calibration.observers import TensorHistogram
from ..config import QuantConfig
from ..graph.layers import Layer
from ..lowbit import correction, rounding, unfold
from . import objective, quantizers as Q, weight_search as W

BIAS_BITS = 32


@dataclass
class WeightDecision:
    bits: int
    granularity: str  # "tensor" | "channel"
    frac: Union[int, List[int]]
    axis: Optional[int]
    sqnr_db: float
    sqnr_tensor_db: float
    sqnr_channel_db: Optional[float]
    #: mean over output channels of each channel's own SQNR (capped at
    #: :func:`~mxqn_onnx.quant.weight_search.channel_sqnr_cap_db`, all-zero channels left out),
    #: with the per-tensor step / with per-channel steps: what ``auto`` decides on
    #: (None: not scored, i.e. no channel axis or ``tensor`` granularity)
    sqnr_channels_mean_tensor_db: Optional[float] = None
    sqnr_channels_mean_channel_db: Optional[float] = None
    #: "nearest" or "gptq" (data-aware, :mod:`mxqn_onnx.lowbit.rounding`)
    rounding: str = "nearest"
    #: the layer's output SQNR from weight quantization alone, on calibration inputs:
    #: with round-to-nearest and with the rounding used (None: not measured)
    output_sqnr_nearest_db: Optional[float] = None
    output_sqnr_db: Optional[float] = None

    def frac_array(self, shape) -> np.ndarray:
        """Fractional lengths broadcastable against a weight of ``shape``."""
        if self.granularity == "tensor":
            return np.array(self.frac, dtype=np.int64)
        view = [1] * len(shape)
        view[self.axis] = shape[self.axis]
        return np.asarray(self.frac, dtype=np.int64).reshape(view)


def describe_activation(act: dict) -> str:
    """Short form of an activation quantizer (a decision's fields): ``fxp8u f=6``, ``log4s k=2 E=7``."""
    sign = "s" if act["signed"] else "u"
    if act["kind"] == "fixed":
        return f"fxp{act['bits']}{sign} f={act['frac']}"
    return f"log{act['bits']}{sign} k={act['k']} E={act['E']}"


@dataclass
class ActDecision:
    tensor: str
    kind: str  # "fixed" | "log"
    bits: int
    signed: bool
    sqnr_db: float
    sqnr_fixed_db: Optional[float]
    sqnr_log_db: Optional[float]
    frac: Optional[int] = None
    k: Optional[int] = None
    E: Optional[int] = None
    min: float = 0.0
    max: float = 0.0
    #: mean of Q(x) - x on the calibration data (used by bias correction)
    mean_error: float = 0.0
    #: what the quantizer was chosen for: "tensor" (its own SQNR) or "output" (the SQNR at
    #: the outputs of the layers reading it, :mod:`mxqn_onnx.quant.objective`)
    objective: str = "tensor"
    #: under "output": the consumers' output SQNR of this choice and of the tensor-SQNR choice
    output_sqnr_db: Optional[float] = None
    output_sqnr_tensor_db: Optional[float] = None

    def describe(self) -> str:
        return describe_activation(vars(self))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "fixed":
            return Q.fxp_quantize(x, self.bits, self.frac, self.signed)
        return Q.log_quantize(x, self.bits, self.k, self.E, self.signed)


@dataclass
class LayerDecision:
    name: str
    op: str
    params: int
    weight: WeightDecision
    act: ActDecision
    bias_frac: Optional[Union[int, List[int]]] = None
    bias_sqnr_db: Optional[float] = None
    bias_correction: bool = False
    #: the whole layer's output SQNR on calibration inputs (quantized weights, input and
    #: bias against FP32), without and with bias correction (None: not measured)
    output_sqnr_uncorrected_db: Optional[float] = None
    output_sqnr_db: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    #: the bias to store when it differs from the model's (bias correction); not serialised
    bias_values: Optional[np.ndarray] = field(default=None, repr=False)
    #: the quantized weight values when not round-to-nearest's (data-aware rounding)
    weight_values: Optional[np.ndarray] = field(default=None, repr=False)
    #: seconds spent in data-aware rounding (timing, not serialised: outputs stay reproducible)
    rounding_seconds: float = field(default=0.0, repr=False)

    def to_dict(self) -> dict:
        # not dataclasses.asdict: it deep-copies the arrays and every per-channel list, 0.6 s
        # a conversion on ResNet-50 (the lists are shared here; serialising copies them anyway)
        skip = {"bias_values", "weight_values", "rounding_seconds"}
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["weight"] = dict(vars(self.weight))
        d["act"] = self.act.tensor
        d["notes"] = list(self.notes)
        return d


def _channels_first(w: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def choose_weight(w: np.ndarray, bits: int, granularity: str, axis: Optional[int],
                  channel_gain_db: float, clip: bool = False) -> WeightDecision:
    """Fixed point for a weight tensor, per tensor or per output channel.

    Under ``auto`` per-channel steps are chosen when they raise the mean of the output
    channels' own SQNRs (in dB, each channel's signal over its own error) by more than
    ``channel_gain_db``. Not the tensor-wide SQNR: that is dominated by the largest channels,
    and a layer whose one channel is 1000x the others keeps it at ~39 dB with one step while
    the small channels all quantize to zero (their SQNR 0 dB), channels a later BatchNorm or
    Mul may scale back up. Per-channel steps never do worse on a channel than the shared one.

    Without ``clip`` the fractional length never clips a weight: the search stops at the
    no-overflow length. Clipping the largest weights maximises the weight tensor's own SQNR
    but, measured on the zoo at 4 bits, costs up to 10 dB of output SQNR (the clipped
    weights are the ones that matter most, and the error they get is systematic).
    """
    above = Q.FXP_SEARCH_ABOVE if clip else 0
    if axis is None or granularity == "tensor" or w.ndim == 0:
        tensor = W.best_fxp_tensor(w, bits, signed=True, above=above)
        return WeightDecision(bits, "tensor", tensor.frac, None, tensor.sqnr_db, tensor.sqnr_db, None)
    sc = W.fxp_granularity(_channels_first(w, axis), bits, signed=True, above=above)
    t_db, ch_db = sc.sqnr_tensor_db, sc.sqnr_channel_db
    means = dict(sqnr_channels_mean_tensor_db=sc.mean_channel_tensor_db,
                 sqnr_channels_mean_channel_db=sc.mean_channel_channel_db)
    if granularity == "channel" or sc.channel_gain_db > channel_gain_db:
        return WeightDecision(bits, "channel", [int(f) for f in sc.channel_fracs], axis, ch_db, t_db, ch_db,
                              **means)
    return WeightDecision(bits, "tensor", sc.tensor_frac, None, t_db, t_db, ch_db, **means)


def choose_activation(hist: TensorHistogram, bits: int, mode: str, log_margin_db: float) -> ActDecision:
    """Fixed point or log for an activation tensor, by SQNR on its histogram.

    Remembered on the histogram (mixed precision asks again for every candidate model);
    callers get their own copy.
    """
    key = ("activation", bits, mode, log_margin_db)
    if key not in hist.derived:
        hist.derived[key] = _choose_activation(hist, bits, mode, log_margin_db)
    return dataclasses.replace(hist.derived[key])


def _choose_activation(hist: TensorHistogram, bits: int, mode: str, log_margin_db: float) -> ActDecision:
    bins = hist.bins()
    signed = hist.signed
    common = dict(tensor=hist.name, bits=bits, signed=signed, min=float(hist.min), max=float(hist.max))
    if bins.max_abs == 0:
        # all zeros: any quantizer is exact; fixed point with f=0 is the cheapest
        return ActDecision(kind="fixed", frac=0, sqnr_db=float("inf"), sqnr_fixed_db=float("inf"),
                           sqnr_log_db=None, **common)
    fx = Q.best_fxp_binned(bins, bits, signed) if mode in ("auto", "fixed") else None
    lg = Q.best_log_binned(bins, bits, signed) if mode in ("auto", "log") else None
    use_log = lg is not None and (fx is None or lg.sqnr_db > fx.sqnr_db + log_margin_db)
    fx_db = fx.sqnr_db if fx else None
    lg_db = lg.sqnr_db if lg else None
    if use_log:
        dec = ActDecision(kind="log", k=lg.k, E=lg.E, sqnr_db=lg.sqnr_db, sqnr_fixed_db=fx_db,
                          sqnr_log_db=lg_db, **common)
    else:
        dec = ActDecision(kind="fixed", frac=fx.frac, sqnr_db=fx.sqnr_db, sqnr_fixed_db=fx_db,
                          sqnr_log_db=lg_db, **common)
    dec.mean_error = Q.mean_error_binned(bins, dec.quantize)
    return dec


def choose_bias(b: np.ndarray, wdec: WeightDecision, act: ActDecision):
    """int32 fractional length(s) for a bias: ``f_w + f_a`` when the input is fixed point.

    An integer pipeline then adds the bias to the accumulator without rescaling. Where that
    would overflow int32 (or the input is log quantized) the largest fractional length that
    fits is used instead. Returns ``(frac, sqnr_db, note)``.
    """
    b64 = np.abs(b.astype(np.float64))
    safe = np.array([Q.no_overflow_frac(float(m), BIAS_BITS, True) if m > 0 else BIAS_BITS - 1
                     for m in b64], dtype=np.int64)
    note = None
    if act.kind == "fixed":
        f_w = np.broadcast_to(np.asarray(wdec.frac, dtype=np.int64), b.shape)
        target = f_w + act.frac
        f = np.minimum(target, safe)
        if np.any(f != target):
            note = "bias f_w + f_a would overflow int32 in some channels; used the largest fitting f"
    else:
        f = safe
        note = "input is log quantized: bias fractional length set by its int32 range"
    sqnr = Q.sqnr_of(b, Q.fxp_quantize(b, BIAS_BITS, f, True))
    uniform = bool(np.all(f == f.flat[0])) and wdec.granularity == "tensor"
    frac_out: Union[int, List[int]] = int(f.flat[0]) if uniform else [int(v) for v in f]
    return frac_out, sqnr, note


def _with_bias(sig: float, err: np.ndarray, delta: Optional[np.ndarray]) -> float:
    """SQNR once the quantized output's bias differs from the FP32 one by ``delta`` (None:
    neither has a bias): ``sum (e + d)^2 = sum e^2 + 2 d . sum_rows e + R |d|^2``."""
    noise = float(np.sum(np.square(err, dtype=np.float64)))
    if delta is not None:
        noise += 2 * float(err.sum(axis=0, dtype=np.float64) @ delta) + len(err) * float(delta @ delta)
    return Q.sqnr_db(sig, max(noise, 0.0))


def decide_layer(layer: Layer, act: ActDecision, wbits: int, config: QuantConfig,
                 mean_in: Optional[np.ndarray] = None, sample: Optional[np.ndarray] = None,
                 model_cost: float = float("inf"), hist: Optional[TensorHistogram] = None) -> LayerDecision:
    """All decisions for one layer whose input quantizer is ``act``.

    With ``config.bias_correction`` and the input's per-channel means, the bias is corrected
    for the mean output shift of weight and input quantization (see :mod:`mxqn_onnx.lowbit.correction`)
    before its fractional length is chosen; the corrected values travel in
    ``LayerDecision.bias_values``. With ``sample`` (real inputs of the layer) and
    ``config.rounding`` the weights are rounded for the layer's output error
    (:mod:`mxqn_onnx.lowbit.rounding`), and the layer's output SQNR is measured on those inputs;
    ``model_cost`` is the whole model's estimated rounding cost (see ``rounds_with_data``).
    ``hist`` (the input's histogram) remembers the input quantizer's mean error per channel.
    """
    w = layer.weight
    wdec = choose_weight(w, wbits, config.weight_granularity, layer.channel_axis, config.channel_gain_db,
                         config.weight_clip)
    note = None
    safe_bits = _pair_safe_bits(w, wdec, act, config)
    if safe_bits < wbits:
        note = (f"{wbits}-bit weights held to {safe_bits}-bit codes: two {wbits}-bit products could "
                f"saturate onnxruntime's int16 pair sums on x86 CPUs without VNNI (--qdq-encoding safe)")
        wbits = safe_bits
        wdec = choose_weight(w, wbits, config.weight_granularity, layer.channel_axis, config.channel_gain_db,
                             config.weight_clip)
    dec = LayerDecision(layer.name, layer.op, int(w.size), wdec, act)
    if note:
        dec.notes.append(note)
    wq = Q.fxp_quantize(w, wbits, wdec.frac_array(w.shape), True)
    w_rows = unfold.weight_rows(layer) if sample is not None else None
    x_rows = None
    gptq = False
    if w_rows is not None:
        d = w_rows[0].shape[1]
        cap = rounding.AUTO_MAX_FAN_IN if config.rounding == "auto" else rounding.MAX_FAN_IN
        wanted = config.rounds_with_data(wbits, model_cost)
        gptq = wanted and d <= cap
        if wanted and not gptq:
            why = "--rounding gptq includes it" if d <= rounding.MAX_FAN_IN else \
                f"its {d}x{d} input moment would take {8 * d * d / 2**20:.0f} MB"
            dec.notes.append(f"fan-in {d} > {cap}: weights rounded to nearest ({why})")
        x_rows = unfold.input_rows(layer, sample, rounding.rows_for(d) if gptq else MEASURE_ROWS)
    if x_rows is not None and gptq:
        fr = unfold.frac_rows(layer, wdec.frac_array(w.shape), w.shape)
        t0 = time.perf_counter()
        res = rounding.round_layer(w_rows, x_rows, wbits, fr) if fr is not None else None
        dec.rounding_seconds = time.perf_counter() - t0
        if res is not None:
            wdec.output_sqnr_nearest_db, wdec.output_sqnr_db = res.sqnr_nearest_db, res.sqnr_db
            rounded = unfold.rows_to_weight(layer, res.rows, w.shape) if res.used else None
            if rounded is not None and _pair_safe_bits(rounded, wdec, act, config) < wbits:
                dec.notes.append("data-aware rounding dropped: its codes break the int16 pair bound")
                wdec.output_sqnr_db = res.sqnr_nearest_db
                rounded = None
            if rounded is not None:
                wq = rounded
                wdec.rounding = "gptq"
                wdec.sqnr_db = Q.sqnr_of(w, wq)
                dec.weight_values = wq
    b = layer.bias
    can_add_bias = layer.bias_index is None and len(layer.node.inputs) == 2 and layer.op in ("Conv", "Gemm")
    if config.bias_correction and mean_in is not None and (b is not None or can_add_bias):
        if b is None:
            out_axis = 0 if layer.op == "Conv" or int(layer.node.attrs.get("transB", 0)) else 1
            b = np.zeros(w.shape[out_axis], dtype=np.float32)
        shift = correction.output_shift(layer, w, wq, mean_in, _input_mean_error(layer, act, sample, mean_in, hist))
        if shift is not None:
            b = (b.astype(np.float64) - shift).astype(np.float32)
            dec.bias_values = b
            dec.bias_correction = True
        elif layer.bias is None:
            b = None
    if b is not None:
        dec.bias_frac, dec.bias_sqnr_db, note = choose_bias(b, wdec, act)
        if note:
            dec.notes.append(note)
    if x_rows is not None:
        _measure_layer(dec, layer, w_rows, wq, x_rows, b)
    return dec


def _pair_safe_bits(w: np.ndarray, wdec: WeightDecision, act: ActDecision, config: QuantConfig) -> int:
    """``wdec.bits``, or fewer when the qdq ``safe`` encoding's int16 pair bound needs them.

    Applies where the layer can fuse into a U8S8 integer kernel: fixed-point input of at most
    8 bits (stored as uint8) and weights of at most 8 bits (stored as int8).
    """
    if (config.format != "qdq" or config.qdq_encoding != "safe" or act.kind != "fixed"
            or act.bits > 8 or wdec.bits > 8):
        return wdec.bits
    act_max = Q.u8_code_max(act.bits, act.signed)
    if Q.pair_fits_int16(Q.fxp_codes(w, wdec.bits, wdec.frac_array(w.shape), True), act_max):
        return wdec.bits
    return min(wdec.bits, Q.pair_safe_bits(act_max))


def without_bias_correction(decisions: List[LayerDecision], layers: List[Layer]) -> List[LayerDecision]:
    """What :func:`choose_all` decides with ``bias_correction`` off, from its decisions with it
    on (``layers`` in the same order): weights, rounding and activation quantizers do not
    depend on bias correction, so only the corrected layers change (the model's own bias, its
    fractional length, the layer's output measurement). The held-back check's candidate
    without bias correction so skips a whole second choice."""
    out = []
    for dec, layer in zip(decisions, layers):
        if not dec.bias_correction:
            out.append(dec)
            continue
        old_note = choose_bias(dec.bias_values, dec.weight, dec.act)[2]
        frac, sqnr, note = (None, None, "") if layer.bias is None else choose_bias(layer.bias, dec.weight, dec.act)
        notes = [n for n in dec.notes if n != old_note] + ([note] if note else [])
        out.append(dataclasses.replace(
            dec, bias_frac=frac, bias_sqnr_db=sqnr, bias_correction=False, bias_values=None, notes=notes,
            output_sqnr_db=dec.output_sqnr_uncorrected_db))
    return out


def _input_mean_error(layer: Layer, act: ActDecision, sample: Optional[np.ndarray], mean_in: np.ndarray,
                      hist: Optional[TensorHistogram] = None):
    """Mean of ``Q(x) - x`` per input channel, from the kept samples when there are any.

    A coarse quantizer zeroes a small-valued channel (error ``-E[x_c]``) while barely moving a
    large one: one tensor-wide mean error (the histogram's, used without samples) spreads that
    over every channel.
    """
    axis = correction.input_channel_axis(layer)
    if sample is None or axis is None or sample.ndim <= axis or sample.shape[axis] != len(mean_in):
        return act.mean_error
    key = ("input_mean_error", axis, sample.shape, act.kind, act.bits, act.signed, act.frac, act.k, act.E)
    if hist is not None and key in hist.derived:
        return hist.derived[key]
    err = act.quantize(sample) - sample
    other = tuple(i for i in range(err.ndim) if i != axis)
    out = err.mean(axis=other, dtype=np.float64)
    if hist is not None:
        hist.derived[key] = out
    return out


#: input rows for the per-layer output measurements of the report
MEASURE_ROWS = 512
def _measure_layer(dec: LayerDecision, layer: Layer, w_rows, wq: np.ndarray, x_rows, b) -> None:
    """The layer's output SQNR on its sampled inputs, without and with bias correction."""
    if float(layer.node.attrs.get("alpha", 1.0)) != 1.0:
        return
    n = min(len(x_rows[0]), MEASURE_ROWS)
    xs = [x[:n] for x in x_rows]
    xq = [dec.act.quantize(x.astype(np.float32)) for x in xs]

    def stored(bias, frac):  # the bias as the quantized model holds it (int32 at frac)
        f = np.broadcast_to(np.asarray(frac, dtype=np.int64), bias.shape)
        return Q.fxp_quantize(bias, BIAS_BITS, f, True).astype(np.float64)

    b0 = None if layer.bias is None else layer.bias.astype(np.float64)
    # without the correction the model's own bias is stored at the length chosen for it
    frac0 = dec.bias_frac if b0 is None or not dec.bias_correction else \
        choose_bias(layer.bias, dec.weight, dec.act)[0]
    sig, err = unfold.output_error(w_rows, xs, xq, unfold.weight_rows(layer, wq), b0)

    def sqnr(bias, frac) -> float:  # with ``bias`` stored in the quantized model (None: no bias)
        if bias is None and b0 is None:
            return _with_bias(sig, err, None)
        return _with_bias(sig, err, (0.0 if bias is None else stored(bias, frac)) - (0.0 if b0 is None else b0))

    dec.output_sqnr_db = sqnr(b, dec.bias_frac)
    dec.output_sqnr_uncorrected_db = sqnr(b0, frac0) if dec.bias_correction else dec.output_sqnr_db


def choose_all(layers: List[Layer], hists: Dict[str, TensorHistogram], config: QuantConfig,
               bits: Optional[Sequence[Tuple[int, int]]] = None,
               samples: Optional[Dict[str, np.ndarray]] = None,
               means: Optional[Dict[str, np.ndarray]] = None,
               reuse: Optional[Tuple[List[LayerDecision], Dict[str, ActDecision], QuantConfig]] = None):
    """Decisions for every layer; activation quantizers shared by tensor name.

    ``bits`` gives each layer's ``(weight bits, activation bits)`` (mixed precision, see
    :mod:`mxqn_onnx.mixed.search`); without it every layer gets ``wbits``/``abits``, and
    ``keep_first``/``keep_last`` layers get ``keep_bits`` (the float case is handled by the
    caller, which never passes them here). A tensor feeding several layers gets the highest
    of their activation bit widths. ``samples`` (tensor name -> real calibration inputs)
    enables the data-aware steps: the layer-output objective for activations
    (``config.act_objective``), data-aware rounding and per-layer output measurements.
    ``means`` replaces the measured input channel means of bias correction (BatchNorm
    priors, :func:`mxqn_onnx.lowbit.correction.prior_input_means`; tensors missing: no correction).
    ``reuse``: the decisions, activations and config of a choice for the same layers, data and
    settings that differs from ``config`` in ``keep_first``/``keep_last`` at most: a tensor
    whose width did not change keeps its quantizer, and a layer whose widths and input
    quantizer did not change keeps its decision (each is a function of exactly those), so
    only the layers whose width changed are chosen again.
    """
    samples = samples or {}
    cost = model_rounding_cost(layers)
    if bits is not None and len(bits) != len(layers):
        raise ValueError(f"bits has {len(bits)} entries for {len(layers)} layers")
    bits_for = layer_widths(layers, config, bits)
    act_bits = input_widths(layers, bits_for)
    old_decisions, old_acts, old_bits, old_act_bits = [], {}, {}, {}
    if reuse is not None and bits is None:
        old_decisions, old_acts, old_config = reuse
        old_bits = layer_widths(layers, old_config)
        old_act_bits = input_widths(layers, old_bits)
    again = [t for t in act_bits if old_act_bits.get(t) != act_bits[t] or t not in old_acts]
    # Tensors and layers are scored independently and numpy releases the GIL in the large
    # array operations, so a thread per core shortens this step (map keeps the order).
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        fresh = dict(zip(again, pool.map(
            lambda t: choose_activation(hists[t], act_bits[t], config.act_mode, config.log_margin_db), again)))
        if config.act_objective == "output" and samples:
            by_tensor: Dict[str, List[Layer]] = {}
            for layer in layers:
                by_tensor.setdefault(layer.data.name, []).append(layer)
            refined = pool.map(lambda t: _refine(fresh[t], hists[t], by_tensor[t], samples.get(t), config),
                               list(fresh))
            fresh = dict(zip(list(fresh), refined))
        acts = {t: fresh[t] if t in fresh else old_acts[t] for t in act_bits}
        redo = [i for i, layer in enumerate(layers)
                if i >= len(old_decisions) or old_bits.get(i) != bits_for[i] or layer.data.name in fresh]
        redone = dict(zip(redo, pool.map(
            lambda i: decide_layer(layers[i], acts[layers[i].data.name], bits_for[i][0], config,
                                   _mean_in(layers[i].data.name, hists, means), samples.get(layers[i].data.name),
                                   cost, hists[layers[i].data.name]),
            redo)))
        decisions = [redone[i] if i in redone else old_decisions[i] for i in range(len(layers))]
    if config.quantizes_layer_outputs:
        # a fixed-point quantizer on each layer output that other ops read (the rewrite puts it
        # only where no quantizer follows the layer yet), so the layer can fuse
        for i, layer in enumerate(layers):
            y = layer.output
            if y.name not in acts and y.name in hists and y.outputs:
                acts[y.name] = choose_activation(hists[y.name], bits_for[i][1], "fixed", config.log_margin_db)
    return decisions, acts


def layer_widths(layers: List[Layer], config: QuantConfig,
                 bits: Optional[Sequence[Tuple[int, int]]] = None) -> Dict[int, Tuple[int, int]]:
    """Each layer's ``(weight bits, activation bits)``: ``bits`` when given (mixed precision),
    else ``wbits``/``abits``, and ``keep_bits`` for the ``keep_first``/``keep_last`` layers."""
    out = {}
    for i in range(len(layers)):
        keep = (config.keep_first and i == 0) or (config.keep_last and i == len(layers) - 1)
        if bits is not None:
            out[i] = (int(bits[i][0]), int(bits[i][1]))
        else:
            out[i] = (config.keep_bits, config.keep_bits) if keep else (config.wbits, config.abits)
    return out


def input_widths(layers: List[Layer], widths: Dict[int, Tuple[int, int]]) -> Dict[str, int]:
    """Each layer input tensor's activation width: the highest its readers ask for."""
    out: Dict[str, int] = {}
    for i, layer in enumerate(layers):
        t = layer.data.name
        out[t] = max(out.get(t, 0), widths[i][1])
    return out


def model_rounding_cost(layers: List[Layer]) -> float:
    """Estimated multiply-adds of rounding every layer of a model with data."""
    return rounding.estimated_cost(s for s in map(unfold.rounding_shape, layers) if s is not None)


def _mean_in(tensor: str, hists: Dict[str, TensorHistogram], means: Optional[Dict[str, np.ndarray]]):
    return hists[tensor].channel_mean if means is None else means.get(tensor)


def _refine(act: ActDecision, hist: TensorHistogram, readers: List[Layer], sample, config: QuantConfig):
    """``act`` re-chosen for its readers' output SQNR (unchanged without usable samples)."""
    if sample is None:
        return act
    consumers = []
    for layer in readers:
        w_rows = unfold.weight_rows(layer)
        x_rows = None if w_rows is None else \
            unfold.input_rows(layer, sample, objective.rows_for_scoring(w_rows[0].shape[1]))
        if x_rows is None:
            return act  # a reader the objective cannot model: keep the tensor choice
        consumers.append((w_rows, x_rows))
    return objective.refine_activation(act, hist, consumers, config.act_mode)
