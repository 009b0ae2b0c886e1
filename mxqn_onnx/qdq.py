"""Standard QuantizeLinear/DequantizeLinear emitters for the ``qdq`` output format.

Every fixed-point tensor becomes ``DequantizeLinear(codes, scale=2^-f, zero_point=0)``:
weights as integer initializers (per output channel through ``axis`` when the fractional
lengths are per channel), biases as int32 at ``f_w + f_a`` (the scale onnxruntime assumes when
it fuses a QDQ Conv/Gemm into an integer kernel), activations as a ``QuantizeLinear ->
DequantizeLinear`` pair. Since ``x / 2^-f`` is exact and both ops round half to even and
saturate, the pair is bit-exact with ``FixedQuant`` whenever the container's range equals the
quantizer's (8, 16 bits; 4 bits at opset >= 21); other widths add a ``Clip`` to the range first.

onnxruntime fuses ``DQ -> Conv -> Q`` only when the Conv's output feeds a QuantizeLinear
directly. :func:`add_producer_quantizers` therefore repeats an activation quantizer at the
output of the quantized layer that produces it, when only quantization-transparent ops
(Relu, MaxPool, reshapes) sit between them; the result is unchanged because a monotone
quantizer commutes with those ops (see docs/FORMAT.md).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set

import numpy as np
import onnx_graphsurgeon as gs

from . import quantizers as Q
from .choose import ActDecision
from .containers import Container, container_for

#: Ops through which a fixed-point quantizer can be moved unchanged: Q(op(x)) == op(Q(x))
#: for a monotone Q with Q(0) = 0 and an op that only selects, reorders or clamps at 0.
TRANSPARENT_OPS = {"Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                   "Identity"}


def _scale_constant(name: str, frac) -> gs.Constant:
    return gs.Constant(name, Q.pow2(-np.asarray(frac, dtype=np.float64)).astype(np.float32))


def dequantize_constant(graph: gs.Graph, name: str, codes: np.ndarray, frac, axis: Optional[int],
                        container: Container, retype: Dict[str, Container]) -> gs.Variable:
    """``DequantizeLinear(codes, 2^-frac, 0, axis)`` for a constant; returns its float output.

    ``frac`` is a scalar or a 1-D array along ``axis``.
    """
    frac = np.asarray(frac, dtype=np.int64)
    q = gs.Constant(f"{name}_q", np.ascontiguousarray(codes.astype(container.placeholder)))
    scale = _scale_constant(f"{name}_scale", frac)
    inputs = [q, scale]
    if container.name != "int32":  # int32 zero point must be 0 and may be omitted
        zp = gs.Constant(f"{name}_zero_point", np.zeros(frac.shape, dtype=container.placeholder))
        inputs.append(zp)
        retype[zp.name] = container
    retype[q.name] = container
    out = gs.Variable(f"{name}_dq", dtype=np.float32, shape=codes.shape)
    attrs = {"axis": int(axis)} if frac.ndim == 1 and axis is not None else {}
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}_dequantize", attrs, inputs, [out]))
    return out


def quantize_activation(graph: gs.Graph, tensor: gs.Variable, dec: ActDecision, opset: int,
                        retype: Dict[str, Container], suffix: str = "qdq") -> gs.Variable:
    """``[Clip ->] QuantizeLinear -> DequantizeLinear`` for a fixed-point activation."""
    assert dec.kind == "fixed"
    c = container_for(dec.bits, dec.signed, opset)
    base = f"{tensor.name}_{suffix}"
    x = tensor
    lo, hi = Q.fxp_range(dec.bits, dec.signed)
    if (lo, hi) != Q.fxp_range(c.width, c.signed):
        # the container saturates wider than the quantizer: clip to the quantizer's range
        # first (exact: the bounds are multiples of the step 2^-f)
        step = float(Q.pow2(-dec.frac))
        clipped = gs.Variable(f"{base}_clipped", dtype=np.float32, shape=tensor.shape)
        graph.nodes.append(gs.Node("Clip", f"{base}_clip", {}, [
            x, gs.Constant(f"{base}_min", np.array(lo * step, dtype=np.float32)),
            gs.Constant(f"{base}_max", np.array(hi * step, dtype=np.float32))], [clipped]))
        x = clipped
    scale = _scale_constant(f"{base}_scale", dec.frac)
    zp = gs.Constant(f"{base}_zero_point", np.zeros((), dtype=c.placeholder))
    retype[zp.name] = c
    q = gs.Variable(f"{base}_q")  # no value_info: 4-bit types have no numpy placeholder
    out = gs.Variable(f"{base}_dq", dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}_quantize", {}, [x, scale, zp], [q]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}_dequantize", {}, [q, scale, zp], [out]))
    return out


def needs_clip(dec: ActDecision, opset: int) -> bool:
    c = container_for(dec.bits, dec.signed, opset)
    return Q.fxp_range(dec.bits, dec.signed) != Q.fxp_range(c.width, c.signed)


def add_producer_quantizers(graph: gs.Graph, qdq_acts: Dict[str, ActDecision], fusable: Set[str],
                            opset: int, retype: Dict[str, Container]) -> List[str]:
    """Repeat each QDQ activation quantizer at the output of the layer producing it.

    ``qdq_acts`` maps the original activation tensor names to their fixed-point decisions;
    ``fusable`` names the quantized layer nodes whose inputs are all QDQ. The quantizer is
    moved back only through :data:`TRANSPARENT_OPS` whose outputs have no other reader, so
    no float consumer ever sees a quantized value it did not see before. When a Relu follows
    the layer the pair goes after the Relu (onnxruntime drops a Relu before an unsigned
    QuantizeLinear with zero point 0). Returns the names of the layers given an output pair.
    """
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    done = []
    for name, dec in sorted(qdq_acts.items()):
        if needs_clip(dec, opset):  # a Clip between layer and Q blocks the fusion anyway
            continue
        t = tensors.get(name)
        if t is None or name in outputs or len(t.outputs) != 1 or not t.inputs:
            continue
        chain = []
        cur = t
        producer = None
        while cur.inputs:
            node = cur.inputs[0]
            if node.name in fusable:
                producer = node
                break
            if node.op not in TRANSPARENT_OPS or not node.inputs or not isinstance(node.inputs[0], gs.Variable):
                break
            prev = node.inputs[0]
            if prev.name in outputs or len(prev.outputs) != 1:
                break
            chain.append(node)
            cur = prev
        if producer is None or not chain:
            continue  # nothing to move, or the quantizer already follows the layer
        y = producer.outputs[0]
        first = chain[-1]  # the op right after the producer
        if first.op == "Relu" and not dec.signed and len(first.outputs[0].outputs) == 1:
            y = first.outputs[0]
        readers = list(y.outputs)
        dq = quantize_activation(graph, y, dec, opset, retype, suffix="out_qdq")
        for node in readers:
            for i, inp in enumerate(node.inputs):
                if inp is y:
                    node.inputs[i] = dq
        done.append(producer.name)
    return done
