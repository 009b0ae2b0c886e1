"""Loading and normalising: Constant-node weights, BatchNorm folding, opset upgrade."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper, version_converter

import mxqn_onnx
from mxqn_onnx.graph.layers import find_layers
from mxqn_onnx.graph import loading
from mxqn_onnx.graph.loading import load_model, normalise
import onnx_graphsurgeon as gs


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _weights_as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """What some exporters emit: every weight a Constant node, no initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def test_constant_node_weights_are_quantized(digits_model, digits_calib):
    src = load_model(digits_model)
    const = _weights_as_constant_nodes(src)
    assert not const.graph.initializer
    a = mxqn_onnx.quantize(src, digits_calib, verify=False)
    b = mxqn_onnx.quantize(const, digits_calib)
    assert [d.name for d in b.layers] == [d.name for d in a.layers]
    assert [d.weight.frac for d in b.layers] == [d.weight.frac for d in a.layers]
    assert b.measured_sqnr_db > 25


def test_batchnorm_folding_is_exact(digits_model, digits_calib):
    src = load_model(digits_model)
    assert any(n.op_type == "BatchNormalization" for n in src.graph.node)
    graph = normalise(src)
    assert not any(n.op == "BatchNormalization" for n in graph.nodes)
    folded = gs.export_onnx(graph)
    folded.ir_version = src.ir_version
    x = np.load(digits_calib)["input"][:32]
    ref, got = _run(src, x), _run(folded, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_old_opset_is_upgraded(digits_model, digits_calib):
    # every op of this model has the same signature at opset 11, so relabelling is exact
    old = load_model(digits_model)
    old.opset_import[0].version = 11
    onnx.checker.check_model(old, full_check=True)
    r = mxqn_onnx.quantize(old, digits_calib)
    assert next(i.version for i in r.model.opset_import if i.domain == "") >= 13
    onnx.checker.check_model(r.model, full_check=True)
    assert r.measured_sqnr_db > 25


def test_upgrade_passes_weights_around_the_converter(digits_model):
    # opset 9 with an Upsample (the 9 -> 10 adapter rewrites it into Resize) after the convs
    old = load_model(digits_model)
    old.opset_import[0].version = 9
    last = old.graph.node[0].output[0]
    up = helper.make_node("Upsample", [last, "scales"], ["up"], mode="nearest")
    old.graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 1, 1], np.float32), "scales"))
    for n in old.graph.node:
        n.input[:] = ["up" if i == last else i for i in n.input]
    old.graph.node.insert(1, up)
    before = old.SerializeToString()
    big = [t.name for t in old.graph.initializer if t.ByteSize() >= 4096]
    assert big  # the stubbed path runs
    new = loading._upgrade_opset(old)
    assert new.graph == version_converter.convert_version(old, loading.UPGRADE_OPSET).graph
    assert "Resize" in {n.op_type for n in new.graph.node}
    assert old.SerializeToString() == before


def test_source_model_is_not_modified(digits_model, digits_calib):
    src = load_model(digits_model)
    before = src.SerializeToString()
    mxqn_onnx.quantize(src, digits_calib, verify=False)
    assert src.SerializeToString() == before


def test_layers_left_in_float_are_listed():
    # a MatMul whose operands are both activations is a layer op without a constant weight
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Transpose", ["h"], ["ht"], name="t"),
             helper.make_node("MatMul", ["h", "ht"], ["hh"], name="gram"),
             helper.make_node("MatMul", ["hh", "h"], ["y"], name="mix")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 13)])
    layers, skipped = find_layers(normalise(m))
    assert [l.name for l in layers] == ["fc"]
    assert {s.name: s.reason for s in skipped} == {"gram": "no constant weight operand",
                                                   "mix": "no constant weight operand"}


def test_normalised_graph_shares_nothing_with_the_parsed_copy(monkeypatch):
    # a protobuf field or sub-message keeps its whole model (every weight) alive: the graph
    # must not hold any part of the copy normalise parses, or that copy lives on with it
    from graph_helpers import small_cnn

    parsed = []
    real_import = loading.gs.import_onnx

    def spy(model):
        parsed.append(model)
        return real_import(model)

    monkeypatch.setattr(loading.gs, "import_onnx", spy)
    graph = normalise(small_cnn())
    lazy = [t for t in graph.tensors().values()
            if isinstance(t, gs.Constant) and isinstance(t._values, gs.ir.tensor.LazyValues)]
    assert lazy, "the Gemm's weights stay lazily read (nothing folds into them)"
    before = {t.name: (tuple(t._values.shape), t._values.load()) for t in lazy}
    copy = parsed[0]  # change the parsed copy everywhere: the graph must not see it
    copy.opset_import[0].version = 99
    for init in copy.graph.initializer:
        init.dims[0] = 7
        init.raw_data = b""
    assert [o.version for o in graph.import_domains] == [13]
    for t in lazy:
        assert tuple(t._values.shape) == before[t.name][0]
        np.testing.assert_array_equal(t._values.load(), before[t.name][1])
