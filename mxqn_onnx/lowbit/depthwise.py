"""Per-channel power-of-two shifts on the inputs of depthwise convolutions.

A depthwise conv (``group`` = input channels = output channels) reads each input channel with
one filter, so its input's channels may have very different ranges: measured on a PicoDet
layout detector, channel maxima of one hard-swish output span 2^0..2^8 of the largest. One
per-tensor activation quantizer then leaves the small channels a few codes, and 81% of that
network's output noise came from three such tensors.

Multiplying input channel ``c`` by ``2^s_c`` and dividing the conv's filter ``c`` by ``2^s_c``
keeps the FP32 function exactly (power-of-two factors only move exponents), and brings every
channel's maximum into ``(M/2, M]`` of the tensor's largest ``M``: the activation quantizer,
chosen afterwards on the shifted tensor, serves all channels. The multiply stays in the graph
as a plain ``Mul`` by a constant ``[1, C, 1, 1]`` of powers of two (a per-channel left shift on
integer hardware); the divided filters keep their integer codes (per-channel weight fractional
lengths absorb the shift). The maxima come from a first FP32 pass over a few calibration
samples (:func:`channel_max`); where the producer passes a positive scale through (Relu,
pools), cross-layer equalization (:mod:`mxqn_onnx.lowbit.align`) can do this without the Mul.
Under the default ``auto`` the held-back check (:mod:`mxqn_onnx.api`) also converts the graph
without the shifts and keeps whichever measures better on samples the maxima never saw.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx_graphsurgeon as gs

#: samples of the first FP32 pass that measures the channel maxima
SAMPLES = 16
#: the largest shift: channels 2^12 below the tensor's maximum are as good as dead
MAX_SHIFT = 12
#: under ``auto``, the shifts are tried only where some channel needs at least this one (its
#: maximum 16x below its tensor's): smaller spreads cost those channels at most 3 bits, and on
#: the DBNet-style cost detector (shifts up to 3) the trial measured +0.0 dB for 1.6x the
#: whole conversion's time (24.4 s against 15.3 s)
AUTO_MIN_SHIFT = 4


def depthwise_inputs(graph: gs.Graph) -> Dict[str, List[gs.Node]]:
    """The tensors read by a depthwise Conv with a constant 4-D filter, with their convs
    (graph inputs excluded: those are the user's data)."""
    graph_inputs = {t.name for t in graph.inputs}
    out: Dict[str, List[gs.Node]] = {}
    for node in graph.nodes:
        if node.op != "Conv" or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        w = node.inputs[1].values
        group = int(node.attrs.get("group", 1))
        x = node.inputs[0]
        if w.ndim != 4 or group <= 1 or w.shape[0] != group or w.shape[1] != 1 or x.name in graph_inputs \
                or isinstance(x, gs.Constant):
            continue
        out.setdefault(x.name, []).append(node)
    return out


def channel_max(x: np.ndarray) -> np.ndarray:
    """Max ``|x|`` of each channel (axis 1)."""
    return np.abs(x).max(axis=tuple(i for i in range(x.ndim) if i != 1))


def shifts_for(maxima: np.ndarray) -> np.ndarray:
    """``s_c = floor(log2(M / m_c))`` clipped to ``[0, MAX_SHIFT]`` (0 for an all-zero channel)."""
    m = np.asarray(maxima, dtype=np.float64)
    top = float(m.max()) if m.size else 0.0
    s = np.zeros(m.shape, dtype=np.int64)
    live = m > 0
    if top > 0:
        s[live] = np.clip(np.floor(np.log2(top / m[live])), 0, MAX_SHIFT).astype(np.int64)
    return s


def largest_shift(maxima: Dict[str, np.ndarray]) -> int:
    """The largest shift any channel of ``maxima`` would get (0 for none)."""
    return max((int(shifts_for(m).max(initial=0)) for m in maxima.values()), default=0)


def shift_depthwise_inputs(graph: gs.Graph, maxima: Dict[str, np.ndarray]) -> dict:
    """Insert the shifts for the tensors of ``maxima`` (see the module docstring).

    Returns the record for the report: tensors and convs shifted, and how many channels got
    each shift. Tensors whose shifts are all zero are left alone.
    """
    readers = depthwise_inputs(graph)
    record = {"tensors": 0, "convs": 0, "channels_by_shift": {}}
    for name, convs in readers.items():
        if name not in maxima:
            continue
        s = shifts_for(maxima[name])
        if not s.any() or any(c.inputs[1].values.shape[0] != len(s) for c in convs):
            continue
        x = convs[0].inputs[0]
        factor = np.ldexp(np.ones(len(s), np.float32), s.astype(np.int32))
        scale = gs.Constant(f"{name}_dw_shift", factor.reshape(1, -1, 1, 1))
        shifted = gs.Variable(f"{name}_dw_shifted", dtype=x.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("Mul", f"{name}_dw_shift", {}, [x, scale], [shifted]))
        for conv in convs:
            w = conv.inputs[1]
            divided = np.ldexp(w.values, -s.astype(np.int32).reshape(-1, 1, 1, 1)).astype(w.values.dtype)
            conv.inputs[1] = gs.Constant(f"{conv.name}.weight_dw_shifted", divided)
            conv.inputs[0] = shifted
            record["convs"] += 1
        record["tensors"] += 1
        for v, n in zip(*np.unique(s, return_counts=True)):
            key = str(int(v))
            record["channels_by_shift"][key] = record["channels_by_shift"].get(key, 0) + int(n)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return record
