"""Load an FP32 ONNX model and normalise its graph for quantization.

Normalising means: weights become constants (Constant nodes and constant subgraphs are
folded), BatchNormalization is folded into the Conv/ConvTranspose/Gemm before it, and every
node has a unique name. The source's inputs and outputs are kept as they are.
"""

from __future__ import annotations

import copy

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from ..errors import MxqnError, first_line
from .functions import DOMAIN as MXQN_DOMAIN

METADATA_KEY = "mxqn"
#: The quantizer functions need Constant's value_int (opset 13 in practice, as that is the
#: oldest opset the torch exporters still default to); older models are upgraded to it.
MIN_OPSET = 13
UPGRADE_OPSET = 13

ModelLike = Union[str, os.PathLike, onnx.ModelProto]
#: extensions onnx.load would read as JSON or text (and the plain .txt the name suggests)
TEXT_SUFFIXES = frozenset({".json", ".onnxjson", ".txt", ".textproto", ".pbtxt", ".prototxt", ".txtpb",
                           ".onnxtxt", ".onnxtext"})
#: ops that only appear in models some quantizer already processed
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "QLinearMatMul", "ConvInteger", "MatMulInteger"})


def load_model(src: ModelLike) -> onnx.ModelProto:
    """Read a model (path or ModelProto, external data included) and check it can be quantized."""
    if isinstance(src, onnx.ModelProto):
        model = src
        label = "the model"
    else:
        path = Path(src)
        label = str(path)
        if not path.exists():
            raise MxqnError(f"{path}: no such file; give the path of an .onnx model")
        if not path.is_file():
            raise MxqnError(f"{path}: not a file; give the path of an .onnx model")
        try:
            model = read_model(path)
        except (DecodeError, RuntimeError, ValueError, OSError, onnx.checker.ValidationError) as exc:
            # ValidationError: a tensor's external data file is missing or not a file
            first = first_line(exc)
            hint = ""
            if path.suffix.lower() in TEXT_SUFFIXES:
                hint = ("; mxqn-onnx reads binary .onnx models whatever the name "
                        "(save a JSON or text model as .onnx first)")
            raise MxqnError(f"{path}: not a readable ONNX model ({first}){hint}") from None
    check_quantizable(model, label)
    return _with_output_shapes(model, label)


def _with_output_shapes(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """The model with a shape on every graph output (a copy where one had none).

    onnxruntime runs a model whose output type has no shape, but onnx's checker, which every
    converted model passes, requires one: shape inference supplies it."""
    missing = {o.name for o in model.graph.output
               if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")}
    if not missing:
        return model
    fixed = copy.deepcopy(model)  # the caller's model is not changed
    outputs = list(fixed.graph.output)
    # inference leaves graph outputs as they are: it gives their shapes as inner values
    del fixed.graph.output[:]
    fixed.graph.output.extend(o for o in outputs if o.name not in missing)
    try:
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(fixed).graph.value_info}
    except Exception:  # inference fails on the odd model: the message below says what to do
        inferred = {}
    del fixed.graph.output[:]
    fixed.graph.output.extend(outputs)
    for o in fixed.graph.output:
        if o.name in missing:
            v = inferred.get(o.name)
            if v is None or not v.type.tensor_type.HasField("shape"):
                raise MxqnError(f"{label}: output '{o.name}' has no shape and shape inference cannot give it "
                                "one; export the model with output shapes (or run onnx.shape_inference)")
            o.type.tensor_type.shape.CopyFrom(v.type.tensor_type.shape)
    return fixed


def read_model(path) -> onnx.ModelProto:
    """The binary protobuf model at ``path``, external data included, whatever the file name.

    ``onnx.load`` picks a JSON or text parser by the extension (``.json``, ``.txt``-like
    ``.textproto``/``.pbtxt``/``.onnxtxt``, ...), whose errors are not the protobuf decode errors
    the callers turn into one-line messages; every model is an ``.onnx`` file here.
    """
    return onnx.load(str(path), format="protobuf", load_external_data=True)


def raise_opset(model: onnx.ModelProto, opset: Optional[int]) -> onnx.ModelProto:
    """The model converted to default-domain ``opset`` (None or its own: unchanged).

    onnx's version converter rewrites the ops whose signature changed (for example the
    ReduceMean axes attribute that became an input at opset 18).
    """
    current = default_opset(model)
    if opset is None or opset == current:
        return model
    if opset < current:
        raise MxqnError(f"the model already uses opset {current}; --opset can only raise it (got {opset})")
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        first = first_line(exc)
        raise MxqnError(f"could not convert the model from opset {current} to {opset} ({first})") from None


def is_mxqn_model(model: onnx.ModelProto) -> bool:
    """True when the model was written by mxqn-onnx."""
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def check_quantizable(model: onnx.ModelProto, label: str) -> None:
    """Refuse what we cannot convert, with one line saying why."""
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise MxqnError(f"{label}: the ONNX graph is empty; export the model again")
    if is_mxqn_model(model):
        raise MxqnError(f"{label}: already quantized by mxqn-onnx; convert the FP32 model instead")
    # the metadata may have been stripped by another tool; the graph still tells
    if any(n.domain == MXQN_DOMAIN for n in model.graph.node):
        raise MxqnError(f"{label}: already quantized by mxqn-onnx (it has {MXQN_DOMAIN} quantizer nodes); "
                        "convert the FP32 model instead")
    q_op = next((n.op_type for n in model.graph.node
                 if n.op_type in QUANTIZED_OPS and n.domain in ("", "ai.onnx")), None)
    if q_op:
        raise MxqnError(f"{label}: already quantized (it has {q_op} nodes); convert the FP32 model instead")
    for vi in model.graph.input:
        et = vi.type.tensor_type.elem_type
        if et == onnx.TensorProto.FLOAT16 or et == onnx.TensorProto.BFLOAT16:
            raise MxqnError(
                f"{label}: input '{vi.name}' is {onnx.TensorProto.DataType.Name(et).lower()}; "
                "mxqn-onnx needs an FP32 model (export it in float32)"
            )
    if default_opset(model) == 0:
        raise MxqnError(f"{label}: the model imports no default-domain opset; it is not a valid ONNX model")
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise MxqnError(
            f"{label}: weight '{external[0]}' is stored in an external data file that was not loaded; "
            "pass the model's path, or load it with onnx.load(path, load_external_data=True)"
        )


#: the initializers that go through the version converter as stubs: float weights
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` converted to :data:`UPGRADE_OPSET` (a new model; ``model`` is not changed).

    The converter serialises and parses the whole model twice; the large float weights (which
    no adapter reads: they change nodes and attributes) go through it as data-less stubs and
    are put back after (on the ResNet-50 graph: 0.85 s and 200 MB less).
    """
    from onnx import version_converter

    light, stubbed = with_weight_stubs(model, _FLOATS)
    weights = {t.name: t for t in stubbed}
    try:
        upgraded = version_converter.convert_version(light, UPGRADE_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise MxqnError(
            f"the model uses opset {default_opset(model)}, which could not be "
            f"upgraded to {UPGRADE_OPSET} ({first_line(exc)}); re-export it at opset {MIN_OPSET} or newer"
        ) from None
    restored = set()
    for t in upgraded.graph.initializer:
        if t.name in weights and t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data:
            t.CopyFrom(weights[t.name])
            restored.add(t.name)
    if restored != set(weights):  # an adapter did touch a weight: convert the whole model
        upgraded = version_converter.convert_version(model, UPGRADE_OPSET)
    return upgraded


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Old IR lists initializers as graph inputs; treat them as the constants they are."""
    inits = {t.name for t in model.graph.initializer}
    keep = [vi for vi in model.graph.input if vi.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)


@contextmanager
def _quiet_graphsurgeon() -> Iterator[None]:
    logger = gs.logger.G_LOGGER
    before = logger.severity
    logger.severity = logger.ERROR
    try:
        yield
    finally:
        logger.severity = before


def normalise(model: onnx.ModelProto) -> gs.Graph:
    """A graphsurgeon graph with folded constants and BatchNorm, ready to find layers in."""
    if default_opset(model) < MIN_OPSET:
        model = _upgrade_opset(model)  # a new model
    else:
        model = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's
    _drop_initializer_inputs(model)
    graph = gs.import_onnx(model)
    with _quiet_graphsurgeon():
        # its warnings (large folded weights, missing 'colored') are noise to our users
        graph.fold_constants(fold_shapes=False, error_ok=True)
    graph.cleanup(remove_unused_graph_inputs=False)
    fold_batchnorm(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    name_nodes(graph)
    detach_from_model(graph)
    return graph


def _constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """The graph's constants, those of node attributes and subgraphs included."""
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            yield t
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Constant):
                yield value
            elif isinstance(value, gs.Graph):
                yield from _constants(value)


def _own_copy(message):
    """A copy of a protobuf message that does not belong to any other message."""
    own = type(message)()
    own.CopyFrom(message)
    return own


def detach_from_model(graph: gs.Graph) -> None:
    """Let the graph hold nothing of the parsed model it was imported from.

    A protobuf message keeps the memory of the whole message it belongs to: the graph's
    ``import_domains`` (the model's own opset_import field) and the tensor and dims of a lazily
    read 16-byte shape each kept the parsed copy of the model, every weight in it, alive for the whole conversion
    (98 MB on the ResNet-50 graph). The copies export to the same bytes.
    """
    if graph.import_domains is not None:
        graph.import_domains = [_own_copy(o) for o in graph.import_domains]
    for const in _constants(graph):
        lazy = const._values
        if isinstance(lazy, gs.ir.tensor.LazyValues):
            lazy.tensor = _own_copy(lazy.tensor)
            lazy.shape = getattr(lazy.tensor, "dims", lazy.shape)  # the field, not the old one's


def export_fp32(graph: gs.Graph, source: onnx.ModelProto) -> onnx.ModelProto:
    """The normalised graph as an FP32 ONNX model (what calibration and the probes run)."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = max(source.ir_version, 7)
    return model


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if isinstance(value, (str, bytes, int, float)):
            setattr(dst, fd.name, value)
        elif hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        else:
            getattr(dst, fd.name).CopyFrom(value)


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with no graph initializers (copying only the rest: no weights)."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    return light


#: Element types a weight stub may stand for (one numpy element per ONNX element).
STUB_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
              onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
              onnx.TensorProto.INT32, onnx.TensorProto.INT64}
#: Weights at least this large (bytes) are worth a stub.
STUB_MIN_BYTES = 1 << 12


def weight_stub(name: str, data_type: int, dims) -> onnx.TensorProto:
    """An initializer without data (external data that is never read): onnxruntime gets the
    values as an array (``SessionOptions.add_external_initializers``)."""
    stub = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims),
                            data_location=onnx.TensorProto.EXTERNAL)
    stub.external_data.add(key="location", value="mxqn-in-memory")
    return stub


def with_weight_stubs(model: onnx.ModelProto, types=STUB_TYPES) -> Tuple[onnx.ModelProto, List[onnx.TensorProto]]:
    """A copy of ``model`` with a :func:`weight_stub` in place of each initializer of ``types``
    holding at least :data:`STUB_MIN_BYTES` of raw data, and those initializers (not copied)."""
    light = without_initializers(model)
    stubbed = []
    for t in model.graph.initializer:
        if t.data_type in types and t.HasField("raw_data") and t.ByteSize() >= STUB_MIN_BYTES:
            light.graph.initializer.append(weight_stub(t.name, t.data_type, t.dims))
            stubbed.append(t)
        else:
            light.graph.initializer.append(t)
    return light, stubbed


#: External-data location of a weight left in the model file it was read from (a stub of
#: :func:`with_weights_left_in_file`; the file's path, size and mtime are its other entries).
SOURCE_FILE = "mxqn-source-file"


def with_weights_left_in_file(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """A copy of ``model`` (read from ``path``) whose large weights are stubs pointing back at
    the file (:func:`weights_left_in_file` reads them again, should a session need them)."""
    light, stubbed = with_weight_stubs(model)
    st = os.stat(path)
    where = {"location": SOURCE_FILE, "path": str(Path(path).resolve()), "size": str(st.st_size),
             "mtime_ns": str(st.st_mtime_ns)}
    names = {t.name for t in stubbed}
    for t in light.graph.initializer:
        if t.name in names:
            del t.external_data[:]
            for key, value in where.items():
                t.external_data.add(key=key, value=value)
    return light


def weights_left_in_file(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    """The arrays of ``model``'s :func:`with_weights_left_in_file` stubs, read from their file
    again (which must not have changed since)."""
    wanted: Dict[str, Dict[str, str]] = {}
    for t in model.graph.initializer:
        entries = {e.key: e.value for e in t.external_data}
        if t.data_location == onnx.TensorProto.EXTERNAL and entries.get("location") == SOURCE_FILE:
            wanted[t.name] = entries
    out: Dict[str, np.ndarray] = {}
    for path in {e["path"] for e in wanted.values()}:
        first = next(e for e in wanted.values() if e["path"] == path)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or (str(st.st_size), str(st.st_mtime_ns)) != (first["size"], first["mtime_ns"]):
            raise MxqnError(f"{path}: the model file changed during the conversion; convert it again")
        for t in read_model(path).graph.initializer:
            if t.name in wanted:
                out[t.name] = onnx.numpy_helper.to_array(t)
    return out


def export_fp32_stubbed(graph: gs.Graph, source: onnx.ModelProto) -> Tuple[onnx.ModelProto, Dict[str, np.ndarray]]:
    """:func:`export_fp32` with every large weight a :func:`weight_stub`, and the graph's own
    arrays for them (not copies): a session needs no second copy of the weights."""
    swapped = []
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, np.ndarray) and t._values.nbytes >= STUB_MIN_BYTES:
            data_type = onnx.helper.np_dtype_to_tensor_dtype(t._values.dtype)
            if data_type in STUB_TYPES:
                swapped.append((t, t._values))
                t.values = gs.ir.tensor.LazyValues(weight_stub(t.name, data_type, t._values.shape))
    try:
        model = export_fp32(graph, source)
    finally:
        for t, values in swapped:
            t.values = values
    return model, {t.name: values for t, values in swapped}


def name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, deterministic name (exporters often leave them empty)."""
    seen = set()
    for i, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _const(t) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def fold_batchnorm(graph: gs.Graph) -> int:
    """Fold inference-mode BatchNormalization into the Conv/ConvTranspose/Gemm feeding it.

    Returns the number of BatchNorm nodes folded.
    """
    folded = 0
    out_names = {t.name for t in graph.outputs}
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        if len(bn.outputs) != 1 or not bn.inputs[0].inputs:
            continue
        prev = bn.inputs[0].inputs[0]
        if prev.op not in ("Conv", "ConvTranspose", "Gemm") or len(prev.outputs[0].outputs) != 1:
            continue
        if prev.outputs[0].name in out_names or bn.attrs.get("training_mode", 0):
            continue
        params = [_const(t) for t in bn.inputs[1:5]]
        w = _const(prev.inputs[1]) if len(prev.inputs) > 1 else None
        if any(p is None for p in params) or w is None or w.dtype != np.float32:
            continue
        bias_t = prev.inputs[2] if len(prev.inputs) > 2 else None
        bias = _const(bias_t) if bias_t is not None else None
        if bias_t is not None and bias is None:
            continue
        scale, shift, mean, var = (p.astype(np.float64) for p in params)
        s = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        w64 = w.astype(np.float64)
        if prev.op == "Conv":
            w_new = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        elif prev.op == "ConvTranspose":
            g = int(prev.attrs.get("group", 1))
            cin, cout_g = w.shape[0], w.shape[1]
            w_new = (w64.reshape((g, cin // g, cout_g) + w.shape[2:])
                     * s.reshape((g, 1, cout_g) + (1,) * (w.ndim - 2))).reshape(w.shape)
        else:  # Gemm: y = alpha A B + beta C
            if prev.attrs.get("transA", 0) or len(s) != (w.shape[0] if prev.attrs.get("transB", 0) else w.shape[1]):
                continue
            if bias is not None and bias.ndim != 1:
                continue
            alpha = float(prev.attrs.get("alpha", 1.0))
            beta = float(prev.attrs.get("beta", 1.0))
            w_new = w64 * (s[:, None] if prev.attrs.get("transB", 0) else s[None, :]) * alpha
            prev.attrs["alpha"] = 1.0
            bias = None if bias is None else bias.astype(np.float64) * beta
            prev.attrs["beta"] = 1.0
        b_old = np.zeros_like(s) if bias is None else bias.astype(np.float64)
        b_new = (b_old - mean) * s + shift
        base = prev.name or bn.name or f"bn{folded}"
        prev.inputs[1] = gs.Constant(f"{base}.weight_bnfold", w_new.astype(np.float32))
        b_const = gs.Constant(f"{base}.bias_bnfold", b_new.astype(np.float32))
        if len(prev.inputs) > 2:
            prev.inputs[2] = b_const
        else:
            prev.inputs.append(b_const)
        prev.outputs = bn.outputs
        bn.outputs.clear()
        folded += 1
    return folded
