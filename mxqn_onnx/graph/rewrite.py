"""Rewrite the normalised FP32 graph into an mxqn model.

Per quantized layer (format ``mxqn``): the weight becomes an integer initializer (int4 packed
at opset >= 21 for <= 4 bits, else int8/int16) followed by ``Cast -> Mul(2^-f)``, the bias an
int32 initializer likewise, and the layer's data input passes through a ``FixedQuant`` or
``LogQuant`` node (domain ``ai.mxqn``), shared by every quantized layer reading that tensor.
The custom ops ship as model-local functions. Format ``qdq`` writes the fixed-point tensors
as standard QuantizeLinear/DequantizeLinear instead (see :mod:`mxqn_onnx.graph.qdq`).
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import inliner

from .._version import __version__
from ..quant import quantizers as Q
from ..quant.choose import ActDecision, LayerDecision
from . import functions, qdq
from .containers import Container, container_for, qdq_supports, retype_initializers
from .layers import Layer
from .loading import METADATA_KEY, MIN_OPSET

FORMAT_VERSION = 1
MIN_IR_VERSION = 8  # model-local functions


def int_dtype(bits: int) -> type:
    """Integer container for a bit width: int8 up to 8 bits, int16 up to 16, else int32."""
    return np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32


def _dequantized(graph: gs.Graph, name: str, codes: np.ndarray, frac: np.ndarray,
                 container: Optional[Container] = None,
                 retype: Optional[Dict[str, Container]] = None) -> gs.Variable:
    """``Cast(codes) * 2^-frac`` as nodes; returns the float tensor.

    With a 4-bit ``container`` the codes are recorded in ``retype`` to be packed on export.
    """
    if container is not None:
        codes = codes.astype(container.placeholder)
        if retype is not None:
            retype[f"{name}_q"] = container
    q = gs.Constant(f"{name}_q", codes)
    scale = gs.Constant(f"{name}_scale", Q.pow2(-np.asarray(frac, dtype=np.float64)))
    cast = gs.Variable(f"{name}_int_as_float", dtype=np.float32, shape=codes.shape)
    out = gs.Variable(f"{name}_dq", dtype=np.float32, shape=codes.shape)
    graph.nodes.append(gs.Node("Cast", f"{name}_cast", {"to": onnx.TensorProto.FLOAT}, [q], [cast]))
    graph.nodes.append(gs.Node("Mul", f"{name}_dequant", {}, [cast, scale], [out]))
    return out


def _act_node(graph: gs.Graph, tensor: gs.Variable, dec: ActDecision) -> gs.Variable:
    out = gs.Variable(f"{tensor.name}_mxqn", dtype=np.float32, shape=tensor.shape)
    if dec.kind == "fixed":
        op, attrs = functions.FIXED_OP, {"bits": dec.bits, "frac": int(dec.frac), "signed": int(dec.signed)}
    else:
        op, attrs = functions.LOG_OP, {"bits": dec.bits, "k": int(dec.k), "E": int(dec.E),
                                       "signed": int(dec.signed)}
    node = gs.Node(op, f"{tensor.name}_{op}", attrs, [tensor], [out], domain=functions.DOMAIN)
    graph.nodes.append(node)
    return out


def _uses_qdq_act(dec: ActDecision, fmt: str, opset: int) -> bool:
    """Whether an activation quantizer is emitted as standard QuantizeLinear/DequantizeLinear."""
    return fmt == "qdq" and dec.kind == "fixed" and qdq_supports(dec.bits, opset)


def _bias_frac_for_qdq(dec: LayerDecision, shape) -> Optional[np.ndarray]:
    """The bias fractional lengths when they equal ``f_w + f_a`` (what integer kernels assume)."""
    if dec.act.kind != "fixed" or dec.bias_frac is None:
        return None
    target = np.broadcast_to(np.asarray(dec.weight.frac, dtype=np.int64), shape) + int(dec.act.frac)
    got = np.broadcast_to(np.asarray(dec.bias_frac, dtype=np.int64), shape)
    return target if np.array_equal(target, got) else None


def _inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its ``ai.mxqn`` function calls replaced by their standard-op bodies."""
    model = inliner.inline_local_functions(model)
    del model.functions[:]
    kept = [i for i in model.opset_import if i.domain != functions.DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def rewrite(graph: gs.Graph, layers: List[Layer], decisions: List[LayerDecision],
            acts: Dict[str, ActDecision], source: onnx.ModelProto, metadata: dict,
            fmt: str = "mxqn", qdq_encoding: str = "safe", layer_outputs: bool = False) -> onnx.ModelProto:
    """Quantize ``graph`` in place per ``decisions`` and export it as a ModelProto.

    ``fmt`` is ``"mxqn"`` (Cast/Mul dequantization, custom quantizer nodes) or ``"qdq"``
    (standard QuantizeLinear/DequantizeLinear wherever the opset can express the tensor;
    log quantizers, and widths the opset lacks, become the standard ops of their function
    bodies, inlined, and Cast+Mul).
    ``qdq_encoding`` is how ``qdq`` stores 8-bit codes (see :mod:`mxqn_onnx.graph.qdq`).
    """
    opset = max(int(graph.opset), MIN_OPSET)  # the normalised graph's opset (upgraded if it was older)
    retype: Dict[str, Container] = {}
    quantized: Dict[str, gs.Variable] = {}
    qdq_acts: Dict[str, ActDecision] = {}
    fusable = set()
    for layer, dec in zip(layers, decisions):
        node = layer.node
        w = layer.weight
        wd = dec.weight
        frac = wd.frac_array(w.shape)
        wcont = container_for(wd.bits, True, opset)
        # data-aware rounding chose the grid values itself; they are exact multiples of 2^-f
        codes = Q.fxp_codes(w if dec.weight_values is None else dec.weight_values, wd.bits, frac, True)
        in_qdq = _uses_qdq_act(acts[layer.data.name], fmt, opset)
        if fmt == "qdq" and qdq_supports(wd.bits, opset):
            wcont, zero_point = qdq.weight_storage(wcont, codes, acts[layer.data.name] if in_qdq else None,
                                                   qdq_encoding, opset)
            node.inputs[layer.weight_index] = qdq.dequantize_constant(
                graph, f"{dec.name}.weight", codes, wd.frac, wd.axis, wcont, retype, zero_point)
        else:
            node.inputs[layer.weight_index] = _dequantized(graph, f"{dec.name}.weight", codes, frac,
                                                           wcont, retype)
        bias_qdq = True
        if dec.bias_frac is not None:
            b = layer.bias if dec.bias_values is None else dec.bias_values
            bfrac = np.broadcast_to(np.asarray(dec.bias_frac, dtype=np.int64), b.shape)
            bcodes = Q.fxp_codes(b, 32, bfrac, True).astype(np.int32)
            qdq_frac = _bias_frac_for_qdq(dec, b.shape) if in_qdq else None
            if qdq_frac is not None:
                scalar = wd.granularity == "tensor" and np.all(qdq_frac == qdq_frac.flat[0])
                bias = qdq.dequantize_constant(graph, f"{dec.name}.bias", bcodes,
                                               int(qdq_frac.flat[0]) if scalar else qdq_frac,
                                               None if scalar else 0, container_for(32, True, opset), retype)
            else:
                # a bias at any other scale must not look like an integer kernel's bias
                bias_qdq = False
                bias = _dequantized(graph, f"{dec.name}.bias", bcodes, bfrac)
            if layer.bias_index is None:  # bias correction gave a bias-free layer one
                node.inputs.append(bias)
            else:
                node.inputs[layer.bias_index] = bias
        data = layer.data
        if data.name not in quantized:
            if in_qdq:
                quantized[data.name] = qdq.quantize_activation(graph, data, acts[data.name], opset, retype,
                                                               encoding=qdq_encoding)
                qdq_acts[data.name] = acts[data.name]
            else:
                quantized[data.name] = _act_node(graph, data, acts[data.name])
        node.inputs[layer.data_index] = quantized[data.name]
        if in_qdq and bias_qdq and qdq_supports(wd.bits, opset):
            fusable.add(node.name)
    if fmt == "qdq":
        qdq.add_producer_quantizers(graph, qdq_acts, fusable, opset, retype, qdq_encoding)
        qdq.quantize_layer_outputs(graph, layers, acts, fusable, opset, retype, qdq_encoding)
        if layer_outputs:
            qdq.share_quantized_with_adds(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()

    graph.opset = opset
    model = gs.export_onnx(graph, do_type_check=True)
    retype_initializers(model, retype)
    custom = any(n.domain == functions.DOMAIN for n in model.graph.node)
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    if custom or fmt == "mxqn":
        model.opset_import.append(onnx.helper.make_opsetid(functions.DOMAIN, functions.DOMAIN_VERSION))
    for imp in source.opset_import:
        if imp.domain not in ("", "ai.onnx", functions.DOMAIN):
            model.opset_import.append(imp)
    if custom or fmt == "mxqn":
        model.functions.extend(functions.all_functions(opset))
    if custom and fmt == "qdq":  # standard ONNX only: the quantizers' bodies go inline
        model = _inlined(model)
    model.ir_version = max(MIN_IR_VERSION, source.ir_version,
                           onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    model.producer_name = "mxqn-onnx"
    model.producer_version = __version__
    model.doc_string = source.doc_string
    for prop in source.metadata_props:
        if prop.key != METADATA_KEY:
            model.metadata_props.append(prop)
    model.metadata_props.append(
        onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(metadata, sort_keys=True))
    )
    return model
