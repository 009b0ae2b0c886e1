"""Find the layers to quantize: Conv, ConvTranspose, Gemm and MatMul with a constant weight."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Layer:
    """One quantizable node and where its operands sit."""

    node: gs.Node
    data_index: int  # input index of the activation
    weight_index: int  # input index of the constant weight
    channel_axis: Optional[int]  # weight axis of output channels (None: per-tensor only)
    bias_index: Optional[int] = None  # input index of a constant 1-D bias, if any

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def data(self) -> gs.Variable:
        return self.node.inputs[self.data_index]

    @property
    def weight(self) -> np.ndarray:
        return np.asarray(self.node.inputs[self.weight_index].values)

    @property
    def bias(self) -> Optional[np.ndarray]:
        if self.bias_index is None:
            return None
        return np.asarray(self.node.inputs[self.bias_index].values)

    @property
    def output(self) -> gs.Variable:
        """Where a quantizer of the layer's result goes: its output, or the output of a Relu
        that alone reads it (non-negative there, so unsigned codes, one bit finer; onnxruntime
        drops a Relu before an unsigned zero-point-0 QuantizeLinear and still fuses)."""
        y = self.node.outputs[0]
        if len(y.outputs) == 1 and y.outputs[0].op == "Relu" and y.outputs[0].outputs:
            return y.outputs[0].outputs[0]
        return y


@dataclass
class Skipped:
    """A layer-type node left in float, and why."""

    name: str
    op: str
    reason: str


def conv_input_channels(out_ch: int, in_per_group: int, groups: int) -> Optional[np.ndarray]:
    """For each output channel of a (grouped) Conv, the input channels it reads: ``[O, C/g]``.

    None when the output channels do not split evenly into the groups.
    """
    if groups < 1 or out_ch % groups:
        return None
    group_of = np.arange(out_ch) // (out_ch // groups)
    return group_of[:, None] * in_per_group + np.arange(in_per_group)[None, :]


def _is_float_const(t) -> bool:
    return isinstance(t, gs.Constant) and np.asarray(t.values).dtype == np.float32


def _inspect(node: gs.Node) -> Tuple[Optional[Layer], Optional[str]]:
    """A Layer for ``node``, or the reason it cannot be quantized."""
    ins = node.inputs
    if node.op in ("Conv", "ConvTranspose"):
        if len(ins) < 2 or not isinstance(ins[1], gs.Constant):
            return None, "weight not constant"
        if not _is_float_const(ins[1]):
            return None, f"weight dtype {np.asarray(ins[1].values).dtype} is not float32"
        if isinstance(ins[0], gs.Constant):
            return None, "data input is constant"
        if node.op == "Conv":
            axis = 0
        else:
            axis = 1 if int(node.attrs.get("group", 1)) == 1 else None
        bias = 2 if len(ins) > 2 and _is_float_const(ins[2]) and np.asarray(ins[2].values).ndim == 1 else None
        if len(ins) > 2 and ins[2] is not None and not isinstance(ins[2], gs.Constant) and ins[2].name:
            return None, "bias not constant"
        return Layer(node, 0, 1, axis, bias), None
    if node.op == "Gemm":
        if len(ins) < 2:
            return None, "malformed Gemm"
        if not isinstance(ins[1], gs.Constant):
            if isinstance(ins[0], gs.Constant):
                return None, "constant operand is A, not B (unsupported)"
            return None, "weight not constant"
        if not _is_float_const(ins[1]):
            return None, f"weight dtype {np.asarray(ins[1].values).dtype} is not float32"
        if isinstance(ins[0], gs.Constant):
            return None, "data input is constant"
        axis = 0 if int(node.attrs.get("transB", 0)) else 1
        n_out = np.asarray(ins[1].values).shape[axis]
        bias = None
        if len(ins) > 2 and _is_float_const(ins[2]):
            c = np.asarray(ins[2].values)
            if c.ndim == 1 and c.shape[0] == n_out and float(node.attrs.get("beta", 1.0)) == 1.0:
                bias = 2
        return Layer(node, 0, 1, axis, bias), None
    if node.op == "MatMul":
        a_const, b_const = (isinstance(t, gs.Constant) for t in ins[:2])
        if a_const == b_const:
            return None, "no constant weight operand" if not a_const else "both operands constant"
        w_index = 1 if b_const else 0
        if not _is_float_const(ins[w_index]):
            return None, f"weight dtype {np.asarray(ins[w_index].values).dtype} is not float32"
        nd = np.asarray(ins[w_index].values).ndim
        if nd < 2:
            axis = None
        else:
            axis = nd - 1 if b_const else nd - 2
        return Layer(node, 1 - w_index, w_index, axis, None), None
    return None, "not a layer op"


def _subgraphs(node: gs.Node) -> List[gs.Graph]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    found: List[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


def _subgraph_layers(node: gs.Node, where: str) -> List[Skipped]:
    """Layer-type nodes inside ``node``'s subgraphs: they stay float and are reported."""
    out: List[Skipped] = []
    for sub in _subgraphs(node):
        for i, inner in enumerate(sub.nodes):
            label = inner.name or f"{sub.name or 'subgraph'}/{inner.op}_{i}"
            if inner.op in LAYER_OPS:
                out.append(Skipped(label, inner.op, f"inside the subgraph of {where}; subgraphs stay float"))
            out.extend(_subgraph_layers(inner, where))
    return out


def find_layers(
    graph: gs.Graph,
    exclude: Sequence[str] = (),
) -> Tuple[List[Layer], List[Skipped]]:
    """Quantizable layers in topological order, and the layer-type nodes left in float.

    Only the main graph is quantized; layers inside If/Loop/Scan subgraphs are listed as
    left in float (control flow bodies are rare in CNNs and their tensors cannot be
    observed as graph outputs during calibration).
    """
    layers: List[Layer] = []
    skipped: List[Skipped] = []
    for node in graph.nodes:
        skipped.extend(_subgraph_layers(node, f"{node.op} node '{node.name}'"))
        if node.op not in LAYER_OPS:
            continue
        if any(fnmatch.fnmatchcase(node.name, pat) for pat in exclude):
            skipped.append(Skipped(node.name, node.op, "excluded"))
            continue
        layer, reason = _inspect(node)
        if layer is None:
            skipped.append(Skipped(node.name, node.op, reason))
        else:
            layers.append(layer)
    return layers, skipped


def keep_ends_in_float(layers: List[Layer], skipped: List[Skipped], first: bool,
                       last: bool) -> Tuple[List[Layer], List[Skipped]]:
    """``layers`` without the first and/or last one, which join ``skipped`` (``--keep-float``)."""
    if not layers:
        return layers, skipped
    drop = set()
    if first:
        drop.add(0)
    if last:
        drop.add(len(layers) - 1)
    for i in sorted(drop):
        which = "first" if i == 0 else "last"
        skipped.append(Skipped(layers[i].name, layers[i].op, f"kept in float ({which} layer, --keep-float)"))
    return [l for i, l in enumerate(layers) if i not in drop], skipped
