"""Rewrite the normalised FP32 graph into an mxqn model.

Per quantized layer: the weight becomes an int8/int16 initializer followed by
``Cast -> Mul(2^-f)``, the bias an int32 initializer likewise, and the layer's data input
passes through a ``FixedQuant`` or ``LogQuant`` node (domain ``ai.mxqn``), shared by every
quantized layer reading that tensor. The custom ops ship as model-local functions.
"""

from __future__ import annotations

import json
from typing import Dict, List

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import functions, quantizers as Q
from .choose import ActDecision, LayerDecision
from .layers import Layer
from .loading import METADATA_KEY, MIN_OPSET

FORMAT_VERSION = 1
MIN_IR_VERSION = 8  # model-local functions


def int_dtype(bits: int) -> type:
    """Integer container for a bit width: int8 up to 8 bits, int16 up to 16, else int32."""
    return np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32


def _dequantized(graph: gs.Graph, name: str, codes: np.ndarray, frac: np.ndarray) -> gs.Variable:
    """``Cast(codes) * 2^-frac`` as nodes; returns the float tensor."""
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


def rewrite(graph: gs.Graph, layers: List[Layer], decisions: List[LayerDecision],
            acts: Dict[str, ActDecision], source: onnx.ModelProto, metadata: dict) -> onnx.ModelProto:
    """Quantize ``graph`` in place per ``decisions`` and export it as an mxqn ModelProto."""
    quantized: Dict[str, gs.Variable] = {}
    for layer, dec in zip(layers, decisions):
        node = layer.node
        w = layer.weight
        wd = dec.weight
        frac = wd.frac_array(w.shape)
        codes = Q.fxp_codes(w, wd.bits, frac, True).astype(int_dtype(wd.bits))
        node.inputs[layer.weight_index] = _dequantized(graph, f"{dec.name}.weight", codes, frac)
        if layer.bias_index is not None and dec.bias_frac is not None:
            b = layer.bias
            bfrac = np.broadcast_to(np.asarray(dec.bias_frac, dtype=np.int64), b.shape)
            bcodes = Q.fxp_codes(b, 32, bfrac, True).astype(np.int32)
            node.inputs[layer.bias_index] = _dequantized(graph, f"{dec.name}.bias", bcodes, bfrac)
        data = layer.data
        if data.name not in quantized:
            quantized[data.name] = _act_node(graph, data, acts[data.name])
        node.inputs[layer.data_index] = quantized[data.name]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()

    opset = max(int(graph.opset), MIN_OPSET)  # the normalised graph's opset (upgraded if it was older)
    graph.opset = opset
    model = gs.export_onnx(graph, do_type_check=True)
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", opset),
                               onnx.helper.make_opsetid(functions.DOMAIN, functions.DOMAIN_VERSION)])
    for imp in source.opset_import:
        if imp.domain not in ("", "ai.onnx", functions.DOMAIN):
            model.opset_import.append(imp)
    model.functions.extend(functions.all_functions(opset))
    model.ir_version = max(MIN_IR_VERSION, source.ir_version)
    model.producer_name = "mxqn-onnx"
    from . import __version__

    model.producer_version = __version__
    model.doc_string = source.doc_string
    for prop in source.metadata_props:
        if prop.key != METADATA_KEY:
            model.metadata_props.append(prop)
    model.metadata_props.append(
        onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(metadata, sort_keys=True))
    )
    return model
