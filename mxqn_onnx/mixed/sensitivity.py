"""How much of one tensor's quantization noise reaches the model's output.

Two methods, both on the FP32 graph with the calibration data:

**Real quantizers** (``sensitivity="quantizer"``, the default): a probe model in which each
weight is ``W + a * (Q(W) - W)`` and each quantized layer's data input
``x + a * (Q(x) - x)``, ``Q`` being the quantizer the converter would choose at the probed
width and ``a`` a scalar input per unit. With one unit's ``a = 1`` the run measures the
output noise that unit's real quantization causes; divided by that unit's own
noise-to-signal ratio (the same SQNR table the allocator uses) it gives the sensitivity.
This keeps what Gaussian noise loses: quantization error at low widths is correlated with
the signal and across neighbouring elements (dead zone, clipping, smooth feature maps), and
such error adds up coherently in the next convolution. Because that depends strongly on the
width (a 2-bit quantizer is not a small perturbation), every unit is probed at every
candidate width: the sensitivity is a table ``s_i(b)``, and the allocator's model is
``1/SQNR_out = sum_i s_i(b_i) / SQNR_i(b_i)``, i.e. each unit's measured output noise at
each width. Cost: one probe session, and one run per unit, width and probe batch; the probe
batches hold at most :data:`PROBE_INPUT_VALUES` input values (high-resolution samples are
centre-cropped where the model accepts other sizes), so the cost does not grow with the
resolution.

**Noise injection** (``sensitivity="noise"``, cheaper, width-independent): one *probe model* is built once, in which every
quantized layer's weight ``W`` becomes ``W + a_W * RandomNormalLike(W)`` and every quantized
layer's data input ``x`` becomes ``x + a_x * RandomNormalLike(x)``, each ``a`` being a scalar
graph input. With all ``a = 0`` the probe computes exactly the FP32 model. For each unit in
turn its ``a`` is set so that the injected noise sits ``probe_db`` below the tensor's power
(from the exact weights, or from the calibration histogram for activations), all others
stay 0, and the probe runs on a few calibration batches. Then

    sensitivity = (noise/signal at the output) / (noise/signal injected)

i.e. the factor ``s_i`` in ``1/SQNR_out = sum_i s_i / SQNR_i``. Cost: one session and one
run per unit and batch. The noise is masked to the non-zero elements, because both
quantizers keep exact zeros (half of a post-ReLU tensor) exact. Gaussian noise stands in for quantization noise (both are roughly
white and independent of the signal at the widths of interest); the difference, and the
interaction between layers at large noise, is what the verification run measures and the
refinement corrects.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper

from ..calibration.calibrate import make_session
from ..calibration.data import Feed
from ..calibration.observers import TensorHistogram
from ..graph.layers import Layer

#: Default injected noise level: small enough to stay in the linear regime.
DEFAULT_PROBE_DB = 30.0
_PREFIX = "mxqn_probe"

UnitKey = Tuple[str, str]  # ("weight", layer name) | ("act", tensor name)


def _with_probes(fp32: onnx.ModelProto, layers: Sequence[Layer],
                 insert: Callable[[onnx.GraphProto, str, UnitKey, List[onnx.NodeProto]], str]) -> onnx.ModelProto:
    """A copy of ``fp32`` where each layer's weight and (shared) data input pass through
    ``insert(graph, tensor, unit, new_nodes) -> probed tensor``."""
    model = onnx.ModelProto.FromString(fp32.SerializeToString())
    g = model.graph
    by_name = {n.name: n for n in g.node}
    new_nodes: List[onnx.NodeProto] = []
    act_out: Dict[str, str] = {}
    for layer in layers:
        node = by_name[layer.name]
        node.input[layer.weight_index] = insert(g, node.input[layer.weight_index], ("weight", layer.name), new_nodes)
        t = node.input[layer.data_index]
        if t not in act_out:
            act_out[t] = insert(g, t, ("act", t), new_nodes)
        node.input[layer.data_index] = act_out[t]
    # the probe nodes read activations produced further down: sort properly
    g.node.extend(new_nodes)
    _toposort(g)
    return model


def build_probe(fp32: onnx.ModelProto, layers: Sequence[Layer]) -> Tuple[onnx.ModelProto, Dict[UnitKey, str]]:
    """The probe model and the scale input's name for each unit."""
    scales: Dict[UnitKey, str] = {}

    def noisy(g: onnx.GraphProto, src: str, key: UnitKey, new_nodes: List[onnx.NodeProto]) -> str:
        i = len(scales)
        scale = f"{_PREFIX}_scale_{i}"
        scales[key] = scale
        g.input.append(helper.make_tensor_value_info(scale, onnx.TensorProto.FLOAT, []))
        p = f"{_PREFIX}_{i}"
        new_nodes.extend([
            # a fixed seed per unit keeps the probe deterministic for a given run sequence
            helper.make_node("RandomNormalLike", [src], [p + "_rnd"], name=p + "_rn", seed=float(i + 1)),
            # quantization maps exact zeros (post-ReLU activations) to zero: so does the probe
            helper.make_node("Sign", [src], [p + "_sign"], name=p + "_signop"),
            helper.make_node("Abs", [p + "_sign"], [p + "_mask"], name=p + "_abs"),
            helper.make_node("Mul", [p + "_rnd", p + "_mask"], [p + "_masked"], name=p + "_maskmul"),
            helper.make_node("Mul", [p + "_masked", scale], [p + "_scaled"], name=p + "_mul"),
            helper.make_node("Add", [src, p + "_scaled"], [p + "_out"], name=p + "_add"),
        ])
        return p + "_out"

    return _with_probes(fp32, layers, noisy), scales


def _toposort(g: onnx.GraphProto) -> None:
    """Sort ``g.node`` topologically (stable)."""
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes = list(g.node)
    ordered: List[onnx.NodeProto] = []
    pending = nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            ordered.extend(rest)  # a cycle or an outer-scope name: leave the rest as it was
            break
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def probe_sensitivities(fp32: onnx.ModelProto, layers: Sequence[Layer],
                        hists: Dict[str, TensorHistogram], batches: Sequence[Feed],
                        probe_db: float = DEFAULT_PROBE_DB) -> Dict[UnitKey, float]:
    """Sensitivity of every weight and activation unit (see the module docstring)."""
    model, scales = build_probe(fp32, layers)
    session = make_session(model)
    outputs = [o.name for o in session.get_outputs()]
    zeros = {name: np.zeros((), dtype=np.float32) for name in scales.values()}
    refs = [session.run(outputs, {**feed, **zeros}) for feed in batches]
    signal = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for ref in refs for r in ref)
    rel = 10.0 ** (-probe_db / 20.0)  # injected noise RMS relative to the tensor's RMS
    weights = {l.name: l.weight for l in layers}
    out: Dict[UnitKey, float] = {}
    for key, scale_name in scales.items():
        kind, name = key
        # noise of RMS `a` on the non-zero elements only: a = rel * sqrt(sum x^2 / nonzeros)
        if kind == "weight":
            w = weights[name].astype(np.float64)
            nnz = int(np.count_nonzero(w))
            rms = float(np.sqrt(np.sum(w * w) / nnz)) if nnz else 0.0
        else:
            bins = hists[name].bins()
            nnz = float(np.sum(bins.count[(bins.lo != 0) | (bins.hi != 0)]))
            rms = float(np.sqrt(bins.signal_power() / nnz)) if nnz else 0.0
        if rms == 0 or signal == 0:
            out[key] = 0.0  # an all-zero tensor quantizes exactly: its noise is nil
            continue
        feeds_scale = dict(zeros)
        feeds_scale[scale_name] = np.asarray(rms * rel, dtype=np.float32)
        noise = 0.0
        for feed, ref in zip(batches, refs):
            got = session.run(outputs, {**feed, **feeds_scale})
            noise += sum(float(np.sum((np.asarray(g, np.float64) - np.asarray(r, np.float64)) ** 2))
                         for g, r in zip(got, ref))
        out[key] = (noise / signal) / (rel * rel)
    return out


# --------------------------------------------------------------------------- real-quantizer probe


def build_error_probe(fp32: onnx.ModelProto, layers: Sequence[Layer],
                      kind: str) -> Tuple[onnx.ModelProto, Dict[UnitKey, str]]:
    """Probe model taking an additive error per unit of one ``kind``: ``x + e_x`` on each
    (shared) layer input (``"act"``), or ``y + e_y`` on each layer output (``"weight"``).

    A layer is linear in its weight, so ``W + e_W`` changes its output by ``e_y = op(x, e_W)``
    (see :func:`weight_error_model`): the weight unit's error enters at the output and every
    weight stays a constant, which onnxruntime prepacks (a probe with ``W + e_W`` in the
    graph ran 2.3x slower per run on a MobileNetV3 detector). The two kinds are separate
    models because an Add after every layer output splits each Conv from its activation
    (the activation-only probe runs as fast as FP32, the output one about 2x slower). Each
    ``e`` is a graph input backed by a scalar zero initializer, so a run feeds only the error
    of the unit being probed and every other unit stays exactly FP32.
    """
    errs = error_inputs(layers, kind)
    model = onnx.ModelProto.FromString(fp32.SerializeToString())
    g = model.graph
    by_name = {n.name: n for n in g.node}
    new_nodes: List[onnx.NodeProto] = []
    for name in errs.values():
        g.input.append(onnx.ValueInfoProto(name=name, type=helper.make_tensor_type_proto(
            onnx.TensorProto.FLOAT, None)))
        g.initializer.append(onnx.numpy_helper.from_array(np.zeros((), np.float32), name))
    done = set()
    for layer in layers:
        node = by_name[layer.name]
        if kind == "act":
            t = node.input[layer.data_index]
            e = errs[("act", t)]
            if t not in done:
                done.add(t)
                new_nodes.append(helper.make_node("Add", [t, e], [e + "_out"], name=e + "_add"))
            node.input[layer.data_index] = e + "_out"
        else:
            e = errs[("weight", layer.name)]
            new_nodes.append(helper.make_node("Add", [e + "_raw", e], [node.output[0]], name=e + "_add"))
            node.output[0] = e + "_raw"
    g.node.extend(new_nodes)
    _toposort(g)  # the probe nodes read activations produced further down
    model.ir_version = max(model.ir_version, 4)  # initializers as overridable input defaults
    return model, errs


def error_inputs(layers: Sequence[Layer], kind: str) -> Dict[UnitKey, str]:
    """The error input of each unit of ``kind`` in :func:`build_error_probe`'s model."""
    if kind == "act":
        keys = [("act", t) for t in dict.fromkeys(l.data.name for l in layers)]
    else:
        keys = [("weight", l.name) for l in layers]
    return {key: f"{_PREFIX}_{kind}_{i}_e" for i, key in enumerate(keys)}


def weight_error_model(fp32: onnx.ModelProto, layer: Layer) -> onnx.ModelProto:
    """One-node model ``(x, e_W) -> op(x, e_W)``: the layer's output change for a weight
    error (the layer's own attributes, no bias)."""
    node = helper.make_node(layer.op, ["x" if i == layer.data_index else "w" for i in range(2)], ["y"],
                            name="layer")
    for key, value in layer.node.attrs.items():
        if layer.op == "Gemm" and key == "beta":
            continue  # no C input
        node.attribute.append(helper.make_attribute(key, value))
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph([node], "weight_error", [helper.make_tensor_value_info("x", f, None),
                                                      helper.make_tensor_value_info("w", f, None)],
                              [helper.make_tensor_value_info("y", f, None)])
    return helper.make_model(graph, opset_imports=[o for o in fp32.opset_import if o.domain in ("", "ai.onnx")],
                             ir_version=fp32.ir_version)


class QuantizerProbe:
    """Sensitivity of every unit, quantizing one unit at a time with its real quantizer.

    The probe model, its session, the FP32 outputs and the FP32 activations of the probe
    batches are made once and serve every width. The activation errors ``Q(x) - x`` are
    computed in numpy from those activations (:meth:`ActDecision.quantize` is bit-exact with
    the quantizer ops), so the probe runs no quantizer op.
    """

    def __init__(self, fp32: onnx.ModelProto, layers: Sequence[Layer], batches: Sequence[Feed],
                 tensors: Sequence[str]) -> None:
        self.fp32 = fp32
        self.layers = {l.name: l for l in layers}
        self.sessions: Dict[str, object] = {}  # per unit kind, made on first use
        self.errs: Dict[UnitKey, str] = {}
        for kind in ("act", "weight"):
            self.errs.update(error_inputs(layers, kind))
        self.layer_sessions: Dict[str, object] = {}
        self.outputs = [o.name for o in fp32.graph.output]
        self.batches = list(batches)
        inner = [t for t in dict.fromkeys(tensors) if not self.batches or t not in self.batches[0]]
        ref_session = make_session(fp32, inner)
        self.refs, self.values = [], []
        for feed in self.batches:
            got = ref_session.run(self.outputs + inner, feed)
            self.refs.append(got[:len(self.outputs)])
            values = dict(zip(inner, got[len(self.outputs):]))
            values.update({k: v for k, v in feed.items() if k in tensors})
            self.values.append(values)
        del ref_session
        self.signal = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for ref in self.refs for r in ref)

    def _session(self, kind: str):
        if kind not in self.sessions:
            self.sessions[kind] = make_session(build_error_probe(self.fp32, self.layers.values(), kind)[0])
        return self.sessions[kind]

    def _output_error(self, layer_name: str, weight_error: np.ndarray, values: Dict[str, np.ndarray]) -> np.ndarray:
        """``op(x, e_W)`` on this batch's FP32 layer input: the output error ``W + e_W`` makes."""
        layer = self.layers[layer_name]
        if layer_name not in self.layer_sessions:
            self.layer_sessions[layer_name] = make_session(weight_error_model(self.fp32, layer))
        x = values[layer.data.name]
        return self.layer_sessions[layer_name].run(["y"], {"x": x, "w": np.asarray(weight_error, np.float32)})[0]

    def run(self, weight_error: Dict[str, np.ndarray], act_quant: Dict[str, object],
            unit_noise: Dict[UnitKey, float], only: Optional[set] = None) -> Dict[UnitKey, float]:
        """``unit_noise`` is each unit's own noise-to-signal ratio under its quantizer
        (1/SQNR_i); the sensitivity is the output's noise-to-signal ratio divided by it.
        ``only`` restricts the runs to those units."""
        out: Dict[UnitKey, float] = {}
        for key, err_name in self.errs.items():
            if only is not None and key not in only:
                continue
            own = unit_noise.get(key, 0.0)
            if own <= 0 or self.signal == 0:
                out[key] = 1.0  # a noise-free unit: its sensitivity never matters
                continue
            kind, name = key
            noise = 0.0
            for feed, ref, values in zip(self.batches, self.refs, self.values):
                if kind == "weight":
                    e = self._output_error(name, weight_error[name], values)
                else:
                    x = values[name]
                    e = act_quant[name].quantize(x) - x
                got = self._session(kind).run(self.outputs, {**feed, err_name: np.asarray(e, np.float32)})
                noise += sum(float(np.sum((np.asarray(q, np.float64) - np.asarray(r, np.float64)) ** 2))
                             for q, r in zip(got, ref))
            out[key] = (noise / self.signal) / own
        return out


#: Input values (all inputs of one sample together) the probe runs per unit and width: as
#: many as 64 samples of 64x64 grayscale, or one of 3x295x295. High-resolution samples are
#: cropped to fit, where the model takes other sizes (its spatial dims are symbolic).
PROBE_INPUT_VALUES = 2 ** 18
#: Crops keep sizes that are multiples of this (the strides of an FPN / U-Net).
CROP_MULTIPLE = 32


def _sample_values(feed: Feed) -> Tuple[int, int]:
    """(samples in the batch, input values per sample)."""
    arrays = [np.asarray(a) for a in feed.values()]
    n = int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1
    return n, sum(int(a.size // max(n, 1)) for a in arrays)


def _symbolic_spatial(fp32: onnx.ModelProto, name: str) -> bool:
    for vi in fp32.graph.input:
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            return len(dims) >= 3 and all(not d.HasField("dim_value") for d in dims[2:])
    return False


def probe_batches(fp32: onnx.ModelProto, batches: Sequence[Feed],
                  budget: Optional[int] = None) -> Tuple[List[Feed], bool]:
    """The calibration batches the probe runs on (at most ``budget`` input values in all),
    and whether they were cropped.

    Whole samples are taken first; a single sample over the budget is centre-cropped (sizes
    multiples of :data:`CROP_MULTIPLE`) when every input has symbolic spatial dims, since a
    sensitivity is a noise ratio that a window of the image estimates as well as the whole.
    """
    budget = PROBE_INPUT_VALUES if budget is None else budget
    out: List[Feed] = []
    used = 0
    for feed in batches:
        n, per = _sample_values(feed)
        take = min(n, max(0, (budget - used) // max(per, 1)))
        if take == 0 and not out:
            first = {k: np.asarray(v)[:1] for k, v in feed.items()}
            crop = _crop(fp32, first, budget)
            return [crop], crop is not first
        if take == 0:
            break
        out.append(feed if take == n else {k: np.asarray(v)[:take] for k, v in feed.items()})
        used += take * per
        if take < n:
            break
    return out, False


def _crop(fp32: onnx.ModelProto, feed: Feed, budget: int) -> Feed:
    arrays = {k: np.asarray(v) for k, v in feed.items()}
    if not all(a.ndim >= 3 and _symbolic_spatial(fp32, k) for k, a in arrays.items()):
        return feed
    _, per = _sample_values(arrays)
    ratio = (budget / per) ** (1.0 / max(a.ndim - 2 for a in arrays.values()))
    out = {}
    for k, a in arrays.items():
        idx = [slice(None), slice(None)]
        for size in a.shape[2:]:
            keep = int(size * ratio) // CROP_MULTIPLE * CROP_MULTIPLE
            keep = size if keep <= 0 or size % CROP_MULTIPLE else min(size, keep)
            start = (size - keep) // 2 // CROP_MULTIPLE * CROP_MULTIPLE
            idx.append(slice(start, start + keep))
        out[k] = np.ascontiguousarray(a[tuple(idx)])
    return out


def make_probe(fp32: onnx.ModelProto, layers: Sequence[Layer], hists: Dict[str, TensorHistogram],
               batches: Sequence[Feed], config, opset: int):
    """The ``probe({unit: widths}) -> {unit: {width: sensitivity}}`` of :func:`mxqn_onnx.mixed.search.run`.

    ``config.sensitivity``: ``quantizer`` measures every unit at every one of its candidate
    widths with the real quantizer (one probe model for all widths, one run per unit, width and
    probe batch); ``noise`` injects Gaussian noise once and uses that for every width; ``none``
    returns None.
    """
    from ..quant import quantizers as Q
    from .allocate import db_to_noise
    from ..quant.choose import choose_activation, choose_weight

    if config.sensitivity == "none":
        return None
    feeds, cropped = probe_batches(fp32, batches)
    if config.sensitivity == "noise":
        def noise_probe(unit_widths):
            s = probe_sensitivities(fp32, layers, hists, feeds, config.probe_sqnr_db)
            return {k: {b: s.get(k, 1.0) for b in ws} for k, ws in unit_widths.items()}

        return noise_probe

    tensors = [layer.data.name for layer in layers]
    state: Dict[str, QuantizerProbe] = {}

    def quant_probe(unit_widths):
        if "probe" not in state:  # built on first use, shared by every width
            try:
                state["probe"] = QuantizerProbe(fp32, layers, feeds, tensors)
            except Exception:
                if not cropped:
                    raise
                # the model refused the crop (a fixed size inside): probe one whole sample
                whole = {k: np.asarray(v)[:1] for k, v in batches[0].items()}
                state["probe"] = QuantizerProbe(fp32, layers, [whole], tensors)
        out: Dict[UnitKey, Dict[int, float]] = {k: {} for k in unit_widths}
        all_widths = sorted({b for ws in unit_widths.values() for b in ws})
        run_values = sum(int(np.prod(_sample_values(f))) for f in state["probe"].batches)
        measured = measured_widths(all_widths, len(unit_widths), run_values)
        for width in all_widths:
            # units that have this width to measure (a unit none of whose widths is in
            # ``measured`` is measured at all of them); the others stay switched off
            todo = {k for k, ws in unit_widths.items()
                    if width in ws and (width in measured or not set(ws) & set(measured))}
            if not todo:
                continue
            werr: Dict[str, np.ndarray] = {}
            acts: Dict[str, object] = {}
            own: Dict[UnitKey, float] = {}
            for layer in layers:
                if ("weight", layer.name) in todo:
                    w = layer.weight
                    wd = choose_weight(w, width, config.weight_granularity,
                                       layer.channel_axis, config.channel_gain_db, config.weight_clip)
                    werr[layer.name] = Q.fxp_quantize(w, wd.bits, wd.frac_array(w.shape), True) - w
                    own[("weight", layer.name)] = db_to_noise(wd.sqnr_db)
                t = layer.data.name
                if ("act", t) in todo and t not in acts:
                    acts[t] = choose_activation(hists[t], width, config.act_mode, config.log_margin_db)
                    own[("act", t)] = db_to_noise(acts[t].sqnr_db)
            sens = state["probe"].run(werr, acts, own, only=todo)
            for k in todo:
                out[k][width] = sens[k]
        return {k: interpolate_widths(out[k], unit_widths[k]) for k in unit_widths}

    return quant_probe


#: Input values the quantizer probe may process in all (units x widths x values per run)
#: before it measures a subset of the widths and interpolates the others. Generous for the
#: networks on small inputs (80 units at 7 widths on 64 samples of 3x32x32 fit 3 times over),
#: it bounds a 140-unit network on 736x1088 pages (probed on a crop) to three widths.
PROBE_TOTAL_VALUES = 2 ** 27


def measured_widths(widths: Sequence[int], units: int, run_values: int,
                    budget: Optional[int] = None) -> List[int]:
    """The widths the probe measures: all of them when the probe fits ``budget``
    (:data:`PROBE_TOTAL_VALUES`), else the lowest, the highest and evenly spaced ones in
    between (at least three)."""
    budget = PROBE_TOTAL_VALUES if budget is None else budget
    widths = sorted(widths)
    n = max(3, budget // max(units * run_values, 1))
    if n >= len(widths):
        return widths
    idx = np.unique(np.round(np.linspace(0, len(widths) - 1, n)).astype(int))
    return [widths[i] for i in idx]


def interpolate_widths(measured: Dict[int, float], widths: Sequence[int]) -> Dict[int, float]:
    """Sensitivities at every width from those measured, log-linear in the width between the
    nearest measured neighbours (the nearest one beyond the ends)."""
    if not measured:
        return {}
    known = sorted(measured)
    logs = np.log(np.maximum([measured[b] for b in known], 1e-300))
    out = {}
    for b in widths:
        if b in measured:
            out[b] = measured[b]
        else:
            out[b] = float(np.exp(np.interp(b, known, logs)))
    return out
