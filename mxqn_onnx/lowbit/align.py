"""Per-channel range rescaling that keeps the FP32 function: alignment and equalization.

When a layer's output reaches exactly one next layer through ops that commute with a positive
per-channel scale (Relu, LeakyRelu, MaxPool, AveragePool, the global pools, a Flatten of a
globally pooled tensor), output channel ``c`` can be multiplied by ``s_c`` and the next layer's
input channel ``c`` by ``1 / s_c`` without changing the FP32 function (the cross-layer
equalization identity of Nagel et al., 2019, "Data-free quantization through weight
equalization and bias correction"). Two choices of ``s`` use it:

* :func:`align_channel_ranges`: with a power-of-two step, a weight channel whose largest
  magnitude lies just above a power of two uses only about half of its codes: at 4 bits, up to
  6 dB of its SQNR is lost against a free scale. Choosing ``s_c`` so that ``max|w_c| * s_c`` is
  exactly the top code of the channel's grid gives a shift-only quantizer the range use of a
  float scale.
* :func:`equalize_channel_ranges` (CLE): the next layer's grid is shared by all its input
  columns (per tensor, or per output channel), so the columns that read a small-range channel
  are crushed to a few codes, or to zero. Equalizing balances each channel's range between
  the first layer's output channel and the second layer's input column, ``s_c = sqrt(r1_c /
  r2_c)``; rounded to a power of two, the rescaling is exact in float. This matters most
  around depthwise convs (MobileNet-style nets), whose per-channel ranges differ widely.

Channels feeding an Add or Concat, a PRelu (a per-channel slope would have to be rescaled
too), or read by several layers, are left as they are. :func:`equalize_and_measure` is the
conversion's entry point for equalization: it also records each layer's weight SQNR before and
after for the report.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..config import QuantConfig
from ..graph.layers import conv_input_channels, find_layers
from ..quant import quantizers as Q
from ..quant.choose import choose_weight

#: ops through which a positive per-channel scale passes unchanged (PRelu only with a scalar
#: slope, which is not checked, so it is not here)
_SCALE_TRANSPARENT = ("Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")

#: constant names (suffixes of the node name) for the layer's weight, its bias, the next weight
_ALIGN_NAMES = ("weight_aligned", "bias_aligned", "weight_compensated")
# one name for both roles: a layer equalized as first and as second layer, or in several
# sweeps, keeps one constant that is overwritten
_EQUALIZE_NAMES = ("weight_equalized", "bias_equalized", "weight_equalized")

Pair = Tuple[gs.Node, int, gs.Node]


def _out_axis(node: gs.Node) -> Optional[int]:
    if node.op == "Conv":
        return 0
    if node.op == "Gemm" and not int(node.attrs.get("transA", 0)):
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return None


def _const_weight(node: gs.Node) -> Optional[np.ndarray]:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    w = np.asarray(node.inputs[1].values)
    return w if w.dtype == np.float32 else None


def _next_layer(node: gs.Node, graph_outputs: set) -> Optional[gs.Node]:
    """The single layer that reads ``node``'s output through scale-transparent ops, if any."""
    tensor = node.outputs[0]
    pooled = False
    while True:
        if tensor.name in graph_outputs or len(tensor.outputs) != 1:
            return None
        consumer = tensor.outputs[0]
        if consumer.inputs[0] is not tensor:
            return None
        if consumer.op in _SCALE_TRANSPARENT:
            pooled = pooled or consumer.op.startswith("Global")
        elif consumer.op == "Flatten" and pooled:
            pass  # [N, C, 1, 1] -> [N, C]: channels stay channels
        elif consumer.op in ("Conv", "Gemm"):
            return consumer
        else:
            return None
        if len(consumer.outputs) != 1:
            return None
        tensor = consumer.outputs[0]


def _pairs(graph: gs.Graph, grouped: bool) -> List[Pair]:
    """``(layer, output axis, next layer)`` in topological order, for every rescalable layer.

    Only the structure is collected: weights are read when a pair is processed, as earlier
    pairs may have changed them.
    """
    outputs = {t.name for t in graph.outputs}
    pairs = []
    for node in graph.toposort().nodes:
        axis = _out_axis(node)
        if axis is None or _const_weight(node) is None:
            continue
        if not grouped and node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            continue
        nxt = _next_layer(node, outputs)
        if nxt is None or any(t is node.outputs[0] for t in nxt.inputs[1:]):
            continue
        pairs.append((node, axis, nxt))
    return pairs


def _channel_max(w: np.ndarray, axis: int) -> np.ndarray:
    """max |w| of each slice along ``axis``, in float64."""
    return np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)).max(axis=1)


def _in_channel_index(nxt: gs.Node, w: np.ndarray, n: int) -> Optional[np.ndarray]:
    """For each entry of ``nxt``'s weight ``w``, the input channel it reads (an index array
    broadcastable to ``w``); None unless ``nxt`` reads exactly ``n`` channels."""
    if nxt.op == "Conv":
        groups = int(nxt.attrs.get("group", 1))
        out_ch, in_per_group = w.shape[0], w.shape[1]
        idx = conv_input_channels(out_ch, in_per_group, groups)
        if idx is None or in_per_group * groups != n:
            return None
        return idx.reshape(out_ch, in_per_group, *([1] * (w.ndim - 2)))
    if int(nxt.attrs.get("transA", 0)) or w.ndim != 2:
        return None
    k_axis = 1 if int(nxt.attrs.get("transB", 0)) else 0
    if w.shape[k_axis] != n:
        return None
    shape = [1, 1]
    shape[k_axis] = n
    return np.arange(n).reshape(shape)


def _set_const(node: gs.Node, index: int, values: np.ndarray, suffix: str) -> None:
    name = f"{node.name}.{suffix}"
    t = node.inputs[index]
    if isinstance(t, gs.Constant) and t.name == name and len(t.outputs) == 1:
        t.values = values  # already ours: overwrite, so a second rescale adds no duplicate name
    else:
        node.inputs[index] = gs.Constant(name, values)


def _rescale_pair(node: gs.Node, axis: int, nxt: gs.Node, s: np.ndarray, names: Tuple[str, str, str]) -> bool:
    """Multiply ``node``'s output channel ``c`` (weight and bias) by ``s[c]`` and divide
    ``nxt``'s input channel ``c`` by it. False, and nothing changed, if shapes disagree or
    the bias is not a constant."""
    w, w_next = _const_weight(node), _const_weight(nxt)
    if w is None or w_next is None or w.shape[axis] != len(s):
        return False
    idx = _in_channel_index(nxt, w_next, len(s))
    if idx is None:
        return False
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if isinstance(b, gs.Variable) and not b.name:
        b = None  # an omitted optional input
    if b is not None and (not isinstance(b, gs.Constant) or np.asarray(b.values).shape != (len(s),)):
        return False
    view = [1] * w.ndim
    view[axis] = len(s)
    _set_const(node, 1, (w.astype(np.float64) * s.reshape(view)).astype(np.float32), names[0])
    if b is not None:
        _set_const(node, 2, (np.asarray(b.values).astype(np.float64) * s).astype(np.float32), names[1])
    _set_const(nxt, 1, (w_next.astype(np.float64) / s[idx]).astype(np.float32), names[2])
    return True


def _alignment_scales(w: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Per output channel, the factor that puts its max |w| on the grid's top code."""
    top = 2 ** (bits - 1) - 1
    m = _channel_max(w, axis)
    s = np.ones_like(m)
    ok = m > 0
    f0 = np.array([Q.no_overflow_frac(float(v), bits, True) for v in m[ok]], dtype=np.float64)
    s[ok] = top * 2.0 ** -f0 / m[ok]
    return s


def align_channel_ranges(graph: gs.Graph, bits: int) -> Tuple[int, int]:
    """Rescale output channels of Conv/Gemm layers for ``bits``-bit power-of-two weights.

    Returns ``(layers_aligned, channels_rescaled)``. The FP32 function is unchanged.
    """
    layers = channels = 0
    for node, axis, nxt in _pairs(graph, grouped=False):
        s = _alignment_scales(_const_weight(node), axis, bits)
        if np.allclose(s, 1.0) or not _rescale_pair(node, axis, nxt, s, _ALIGN_NAMES):
            continue
        layers += 1
        channels += int(np.sum(~np.isclose(s, 1.0)))
    return layers, channels


def _equalization_scales(node: gs.Node, axis: int, nxt: gs.Node, power_of_two: bool) -> Optional[np.ndarray]:
    """``sqrt(r1_c / r2_c)`` per channel (1 where a range is 0); None if the pair does not fit."""
    w1, w2 = _const_weight(node), _const_weight(nxt)
    if w1 is None or w2 is None:
        return None
    r1 = _channel_max(w1, axis)
    idx = _in_channel_index(nxt, w2, len(r1))
    if idx is None:
        return None
    r2 = np.zeros_like(r1)
    np.maximum.at(r2, np.broadcast_to(idx, w2.shape).ravel(), np.abs(w2).astype(np.float64).ravel())
    s = np.ones_like(r1)
    ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    if power_of_two:
        s[ok] = 2.0 ** np.round(np.log2(s[ok]))
    return s


def equalize_channel_ranges(graph: gs.Graph, power_of_two: bool = True, sweeps: int = 8) -> Tuple[int, int]:
    """Cross-layer equalization: balance each channel's weight range between a layer's output
    channel and the next layer's input column (Nagel et al., 2019).

    Pairs are swept in topological order until no scale moves (power of two) or none moves by
    1e-3 or more (float), at most ``sweeps`` times: in a chain, a middle layer is the second
    layer of one pair and the first of the next. Returns ``(pairs_equalized,
    channels_rescaled)``, counting net changes. The FP32 function is unchanged (bit for bit
    with ``power_of_two``, barring subnormals).
    """
    pairs = _pairs(graph, grouped=True)  # a depthwise filter is its own output channel
    totals: List[Optional[np.ndarray]] = [None] * len(pairs)
    for _ in range(sweeps):
        moved = 0.0
        for i, (node, axis, nxt) in enumerate(pairs):
            s = _equalization_scales(node, axis, nxt, power_of_two)
            if s is None or np.all(s == 1.0) or not _rescale_pair(node, axis, nxt, 1.0 / s, _EQUALIZE_NAMES):
                continue
            totals[i] = s if totals[i] is None else totals[i] * s
            moved = max(moved, float(np.max(np.abs(s - 1.0))))
        if moved < 1e-3:  # a power-of-two scale other than 1 is at least 2 or at most 1/2
            break
    changed = [int(np.sum(~np.isclose(t, 1.0))) for t in totals if t is not None]
    return sum(1 for c in changed if c), sum(changed)


def equalize_and_measure(graph: gs.Graph, config: QuantConfig) -> dict:
    """Cross-layer equalization (``config.equalize``) of ``graph``, in place; returns the record
    for the report: pairs, channels and each layer's weight SQNR at ``config.wbits`` before and
    after."""

    def weight_sqnr() -> Dict[str, float]:
        layers, _ = find_layers(graph, config.exclude)
        return {l.name: choose_weight(l.weight, config.wbits, config.weight_granularity, l.channel_axis,
                                      config.channel_gain_db, config.weight_clip).sqnr_db for l in layers}

    before = weight_sqnr()
    pairs, channels = equalize_channel_ranges(graph, power_of_two=config.equalize == "pow2")
    after = weight_sqnr()
    return {"mode": config.equalize, "pairs": pairs, "channels": channels,
            "weight_sqnr_db": {n: {"before": before[n], "after": after.get(n)} for n in before}}
