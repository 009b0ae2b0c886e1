"""How much of one tensor's quantization noise reaches the model's output.

Method (noise injection, on the FP32 graph): one *probe model* is built once, in which every
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

from typing import Dict, List, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper

from .calibrate import make_session
from .data import Feed
from .layers import Layer
from .observers import TensorHistogram

#: Default injected noise level: small enough to stay in the linear regime.
DEFAULT_PROBE_DB = 30.0
_PREFIX = "mxqn_probe"

UnitKey = Tuple[str, str]  # ("weight", layer name) | ("act", tensor name)


def build_probe(fp32: onnx.ModelProto, layers: Sequence[Layer]) -> Tuple[onnx.ModelProto, Dict[UnitKey, str]]:
    """The probe model and the scale input's name for each unit."""
    model = onnx.ModelProto.FromString(fp32.SerializeToString())
    g = model.graph
    by_name = {n.name: n for n in g.node}
    scales: Dict[UnitKey, str] = {}
    new_nodes: List[onnx.NodeProto] = []
    seed = 0

    def noisy(src: str, key: UnitKey) -> str:
        nonlocal seed
        i = len(scales)
        scale = f"{_PREFIX}_scale_{i}"
        scales[key] = scale
        g.input.append(helper.make_tensor_value_info(scale, onnx.TensorProto.FLOAT, []))
        seed += 1
        p = f"{_PREFIX}_{i}"
        new_nodes.extend([
            # a fixed seed per unit keeps the probe deterministic for a given run sequence
            helper.make_node("RandomNormalLike", [src], [p + "_rnd"], name=p + "_rn", seed=float(seed)),
            # quantization maps exact zeros (post-ReLU activations) to zero: so does the probe
            helper.make_node("Sign", [src], [p + "_sign"], name=p + "_signop"),
            helper.make_node("Abs", [p + "_sign"], [p + "_mask"], name=p + "_abs"),
            helper.make_node("Mul", [p + "_rnd", p + "_mask"], [p + "_masked"], name=p + "_maskmul"),
            helper.make_node("Mul", [p + "_masked", scale], [p + "_scaled"], name=p + "_mul"),
            helper.make_node("Add", [src, p + "_scaled"], [p + "_out"], name=p + "_add"),
        ])
        out = p + "_out"
        return out

    act_out: Dict[str, str] = {}
    for layer in layers:
        node = by_name[layer.name]
        w_name = node.input[layer.weight_index]
        node.input[layer.weight_index] = noisy(w_name, ("weight", layer.name))
        t = node.input[layer.data_index]
        if t not in act_out:
            act_out[t] = noisy(t, ("act", t))
        node.input[layer.data_index] = act_out[t]
    # the noise nodes read only initializers and existing tensors: putting them first keeps
    # the graph topologically sorted except for activations, so sort properly
    g.node.extend(new_nodes)
    _toposort(g)
    return model, scales


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
