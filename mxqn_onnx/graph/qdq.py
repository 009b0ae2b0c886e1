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

**Integer encoding of 8-bit codes** (``QuantConfig.qdq_encoding``). On x86 CPUs without VNNI,
onnxruntime's fused U8S8 kernels multiply with ``VPMADDUBSW``, which adds two adjacent
``uint8 x int8`` products into an int16 and saturates: ``2 * 255 * 128`` does not fit.
Activations are stored as uint8 in every encoding but ``int8`` (signed codes with zero point
128: int8 activations would force int8 weights). The default ``safe`` encoding stores
weights as signed int8 with zero point 0 (what OpenVINO and every int8 runtime run in
integers), and :func:`mxqn_onnx.quant.choose.decide_layer` gives a layer whose 8-bit codes
could leave int16 (:func:`pair_fits_int16`) 7-bit codes instead (:func:`mxqn_onnx.quant.quantizers.pair_safe_bits`):
exact on every CPU. ``uint8`` keeps the 8-bit codes and stores such a layer's weights as
uint8 with zero point 128 (a U8U8 kernel, exact in onnxruntime, but OpenVINO runs those
layers in float). The codes, and so the grid, are unchanged: ``q + 128`` with zero point 128
dequantizes to the same value. ``int8`` keeps every 8-bit tensor signed with zero point 0:
what TensorRT's explicit quantization accepts, exact in onnxruntime on CPUs with VNNI or Arm
dot-product instructions.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..quant import quantizers as Q
from ..quant.choose import ActDecision
from .containers import Container, container_for
from .functions import DOMAIN
from .layers import Layer

#: Ops through which a fixed-point quantizer can be moved unchanged: Q(op(x)) == op(Q(x))
#: for a monotone Q with Q(0) = 0 and an op that only selects, reorders or clamps at 0.
TRANSPARENT_OPS = {"Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                   "Identity"}

INT16_MAX = Q.INT16_MAX
UINT8_OFFSET = Q.UINT8_OFFSET
pair_fits_int16 = Q.pair_fits_int16


def act_code_max(dec: ActDecision) -> int:
    """Largest raw uint8 code the activation can take in the ``safe``/``uint8`` encodings."""
    return Q.u8_code_max(dec.bits, dec.signed)


def weight_storage(container: Container, codes: np.ndarray, act: Optional[ActDecision],
                   encoding: str, opset: int) -> Tuple[Container, int]:
    """The container and zero point of a layer's weight codes in the QDQ output.

    ``act`` is the layer's input quantizer when it is QDQ (the layer may fuse), else None.
    Under ``safe`` the codes were already chosen within the pair bound
    (:func:`mxqn_onnx.quant.choose.decide_layer`); this checks it.
    """
    if (encoding == "safe" and act is not None and container.name == "int8" and act.bits <= 8
            and not pair_fits_int16(codes, act_code_max(act))):
        raise AssertionError("safe QDQ encoding: weight codes outside the int16 pair bound")
    if (encoding == "uint8" and act is not None and container.name == "int8"
            and act.bits <= 8 and not pair_fits_int16(codes, act_code_max(act))):
        return container_for(8, False, opset), UINT8_OFFSET
    return container, 0


def act_storage(dec: ActDecision, opset: int, encoding: str) -> Tuple[Container, int]:
    """The container and zero point of an activation's QuantizeLinear in the QDQ output."""
    c = container_for(dec.bits, dec.signed, opset)
    if encoding in ("safe", "uint8") and c.name == "int8":
        return container_for(8, False, opset), UINT8_OFFSET
    return c, 0


def _scale_constant(name: str, frac) -> gs.Constant:
    return gs.Constant(name, Q.pow2(-np.asarray(frac, dtype=np.float64)).astype(np.float32))


def dequantize_constant(graph: gs.Graph, name: str, codes: np.ndarray, frac, axis: Optional[int],
                        container: Container, retype: Dict[str, Container],
                        zero_point: int = 0) -> gs.Variable:
    """``DequantizeLinear(codes + zp, 2^-frac, zp, axis)`` for a constant; returns its float output.

    ``frac`` is a scalar or a 1-D array along ``axis``.
    """
    frac = np.asarray(frac, dtype=np.int64)
    stored = np.asarray(codes, dtype=np.int64) + zero_point
    q = gs.Constant(f"{name}_q", np.ascontiguousarray(stored.astype(container.placeholder)))
    scale = _scale_constant(f"{name}_scale", frac)
    inputs = [q, scale]
    if container.name != "int32":  # int32 zero point must be 0 and may be omitted
        zp = gs.Constant(f"{name}_zero_point", np.full(frac.shape, zero_point, dtype=container.placeholder))
        inputs.append(zp)
        retype[zp.name] = container
    retype[q.name] = container
    out = gs.Variable(f"{name}_dq", dtype=np.float32, shape=codes.shape)
    attrs = {"axis": int(axis)} if frac.ndim == 1 and axis is not None else {}
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}_dequantize", attrs, inputs, [out]))
    return out


def quantize_activation(graph: gs.Graph, tensor: gs.Variable, dec: ActDecision, opset: int,
                        retype: Dict[str, Container], suffix: str = "qdq",
                        encoding: str = "safe") -> gs.Variable:
    """``[Clip ->] QuantizeLinear -> DequantizeLinear`` for a fixed-point activation."""
    assert dec.kind == "fixed"
    c, offset = act_storage(dec, opset, encoding)
    base = f"{tensor.name}_{suffix}"
    x = tensor
    if needs_clip(dec, opset):
        lo, hi = Q.fxp_range(dec.bits, dec.signed)
        # the container saturates wider than the quantizer: clip to the quantizer's range
        # first (exact: the bounds are multiples of the step 2^-f)
        step = float(Q.pow2(-dec.frac))
        clipped = gs.Variable(f"{base}_clipped", dtype=np.float32, shape=tensor.shape)
        graph.nodes.append(gs.Node("Clip", f"{base}_clip", {}, [
            x, gs.Constant(f"{base}_min", np.array(lo * step, dtype=np.float32)),
            gs.Constant(f"{base}_max", np.array(hi * step, dtype=np.float32))], [clipped]))
        x = clipped
    scale = _scale_constant(f"{base}_scale", dec.frac)
    zp = gs.Constant(f"{base}_zero_point", np.array(offset, dtype=c.placeholder))
    retype[zp.name] = c
    q = gs.Variable(f"{base}_q")  # no value_info: 4-bit types have no numpy placeholder
    out = gs.Variable(f"{base}_dq", dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{base}_quantize", {}, [x, scale, zp], [q]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{base}_dequantize", {}, [q, scale, zp], [out]))
    return out


def needs_clip(dec: ActDecision, opset: int) -> bool:
    """Whether the quantizer's range is narrower than its container's (the offset keeps the range)."""
    c = container_for(dec.bits, dec.signed, opset)
    return Q.fxp_range(dec.bits, dec.signed) != Q.fxp_range(c.width, c.signed)


def add_producer_quantizers(graph: gs.Graph, qdq_acts: Dict[str, ActDecision], fusable: Set[str],
                            opset: int, retype: Dict[str, Container], encoding: str = "safe") -> List[str]:
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
        _quantize_for_readers(graph, y, dec, opset, retype, encoding)
        done.append(producer.name)
    return done


#: name suffix of the pairs :func:`quantize_layer_outputs` adds (see :func:`layer_output_pairs`)
LAYER_OUTPUT_SUFFIX = "layer_out_qdq"


def _quantize_for_readers(graph: gs.Graph, y: gs.Variable, dec: ActDecision, opset: int,
                          retype: Dict[str, Container], encoding: str, suffix: str = "out_qdq") -> None:
    """A QDQ pair on a layer output ``y``, read by every node that read ``y``."""
    readers = list(y.outputs)
    dq = quantize_activation(graph, y, dec, opset, retype, suffix=suffix, encoding=encoding)
    for node in readers:
        for i, inp in enumerate(node.inputs):
            if inp is y:
                node.inputs[i] = dq


def quantize_layer_outputs(graph: gs.Graph, layers: List[Layer], acts: Dict[str, ActDecision], fusable: Set[str],
                           opset: int, retype: Dict[str, Container], encoding: str = "safe") -> List[str]:
    """A QDQ pair on the output of each fusable layer that no quantizer follows yet.

    ``acts`` holds the output quantizers chosen for them (``QuantConfig.qdq_layer_outputs``),
    keyed by :attr:`Layer.output` (after a Relu that alone reads the layer). Graph outputs
    and outputs already followed by a QuantizeLinear are left alone, and so are outputs from
    which a graph output is reached through float ops only (the network's head, e.g. the
    logits before a Softmax): no later quantizer bounds their error, and the few largest
    values the SQNR choice lets clip are the ones a Softmax keeps (the ResNet-50 cost net's
    output SQNR fell from 16.2 to 5.9 dB). Returns the names of the layers given a pair.
    """
    outputs = {t.name for t in graph.outputs}
    done = []

    def reaches_output(t: gs.Variable) -> bool:
        """Whether a graph output is reached from ``t`` without passing an activation quantizer."""
        seen, todo = set(), [t]
        while todo:
            cur = todo.pop()
            if cur.name in outputs:
                return True
            for r in cur.outputs:
                if r.op == "QuantizeLinear" or r.domain == DOMAIN or id(r) in seen:
                    continue
                seen.add(id(r))
                todo.extend(o for o in r.outputs if isinstance(o, gs.Variable))
        return False

    for layer in layers:
        if layer.name not in fusable:
            continue
        y = layer.output
        dec = acts.get(y.name)
        if dec is None or dec.kind != "fixed" or y.name in outputs or not y.outputs or needs_clip(dec, opset):
            continue
        if any(r.op == "QuantizeLinear" for r in y.outputs) or reaches_output(y):
            continue
        _quantize_for_readers(graph, y, dec, opset, retype, encoding, suffix=LAYER_OUTPUT_SUFFIX)
        done.append(layer.name)
    return done


def share_quantized_with_adds(graph: gs.Graph) -> List[str]:
    """Let the Adds that read a quantized activation read its dequantized value too.

    A residual Add reads the block input in float beside the conv that reads it through its
    QDQ pair, so onnxruntime can fuse neither the Add (``QLinearAdd`` needs both operands
    dequantized and its output quantized) nor the Relu before the next block's quantizer (it
    has two readers). Sharing the pair gives the Add the values the conv sees (the same
    quantizer, no new one) and the whole block runs in integers. Part of the layer-output
    quantizers (``QuantConfig.qdq_layer_outputs``), so the held-back check judges them
    together. Returns the names of the Adds rewired.
    """
    done = []
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        x = q.inputs[0]
        dqs = [r for r in q.outputs[0].outputs if r.op == "DequantizeLinear"]
        if not isinstance(x, gs.Variable) or len(dqs) != 1:
            continue
        d = dqs[0].outputs[0]
        for r in list(x.outputs):
            if r.op != "Add":
                continue
            for i, inp in enumerate(r.inputs):
                if inp is x:
                    r.inputs[i] = d
            done.append(r.name)
    return done


def layer_output_pairs(model: onnx.ModelProto) -> int:
    """How many layer-output QDQ pairs (:func:`quantize_layer_outputs`) a written model has."""
    end = f"_{LAYER_OUTPUT_SUFFIX}_quantize"
    return sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear" and n.name.endswith(end))
