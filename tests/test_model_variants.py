"""Models shaped unlike our own: external data, float16, If/Loop subgraphs, several inputs
and outputs, a fixed batch size; and calibration data that is all zero, constant, or not finite."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mxqn_onnx
from graph_helpers import cnn_inputs, run_both, small_cnn, sqnr_db, stacked_sqnr
from mxqn_onnx import MxqnError
from mxqn_onnx.cli import main

MIN_DB = 30.0  # W8A8 on these small, smooth models


def _w(rng, name, shape, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _close_to_fp32(src, quant, feeds, min_db=MIN_DB):
    ref, got, names = run_both(src, quant, feeds)
    for run in got:
        assert all(np.isfinite(a).all() for a in run)
    for i in range(len(names)):
        assert stacked_sqnr(ref, got, i) >= min_db, names[i]


# --------------------------------------------------------------------------- external data


def test_external_data_model_converts_like_the_inline_one(tmp_path):
    model = small_cnn()
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    path = src_dir / "model.onnx"
    # save_model converts the proto it is given to external references: give it a copy
    onnx.save_model(small_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.weights", size_threshold=0)
    assert sorted(p.name for p in src_dir.iterdir()) == ["model.onnx", "model.weights"]
    assert path.stat().st_size < 2000  # the weights really are outside
    before = {p.name: p.read_bytes() for p in src_dir.iterdir()}

    x = cnn_inputs()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "q.onnx"
    assert main(["convert", str(path), str(out), "--calib", _npy(tmp_path, x), "--quiet"]) == 0
    inline = mxqn_onnx.quantize(model, x)
    assert out.read_bytes() == inline.model.SerializeToString()
    assert sorted(p.name for p in out_dir.iterdir()) == ["q.onnx"]  # self-contained output
    assert {p.name: p.read_bytes() for p in src_dir.iterdir()} == before  # input untouched
    _close_to_fp32(model, onnx.load(str(out)), [{"x": x}])


def _npy(folder, x) -> str:
    p = folder / "calib.npy"
    np.save(p, x)
    return str(p)


# --------------------------------------------------------------------------- float16


def _to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(m, full_check=True)
    return m


def test_float16_model_is_refused_clearly(tmp_path, capsys):
    path = tmp_path / "fp16.onnx"
    onnx.save(_to_float16(small_cnn()), str(path))
    out = tmp_path / "q.onnx"
    assert main(["convert", str(path), str(out), "--calib", "random", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([l for l in err if l.startswith("mxqn-onnx: error:")]) == 1
    assert "'x' is float16" in err[-1] and "float32" in err[-1]
    assert not out.exists()


def test_float16_weights_behind_casts_are_reported_not_quantized():
    """FP32 inputs, but float16 layers inside (Cast in, Cast out): nothing to quantize, said so."""
    m = _to_float16(small_cnn())
    g = m.graph
    g.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    g.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    g.node[0].input[0] = "x16"
    g.node[-1].output[0] = "y16"
    g.node.insert(0, helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16))
    g.node.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT))
    onnx.checker.check_model(m, full_check=True)
    with pytest.raises(MxqnError, match="no quantizable layer.*weight dtype float16 is not float32"):
        mxqn_onnx.quantize(m, cnn_inputs())


# --------------------------------------------------------------------------- If / Loop


def _control_flow_model() -> onnx.ModelProto:
    """Conv -> If(then: Conv, else: Relu) -> GAP -> Loop(2x MatMul+Relu) -> Gemm."""
    rng = np.random.default_rng(3)
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["r", "w_then"], ["t_out"], name="then_conv", pads=[1, 1, 1, 1])],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
        [_w(rng, "w_then", (8, 8, 3, 3), 0.2)])
    else_g = helper.make_graph([helper.make_node("Relu", ["r"], ["e_out"], name="else_relu")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "w_loop"], ["mm"], name="loop_matmul"),
         helper.make_node("Relu", ["mm"], ["s_out"], name="loop_relu"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)],
        [_w(rng, "w_loop", (8, 8), 0.4)])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"], name="relu1"),
        helper.make_node("ReduceSum", ["r"], ["total"], name="sum", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y_if"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("GlobalAveragePool", ["y_if"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Loop", ["trips", "", "f"], ["s_final"], name="loop", body=body),
        helper.make_node("Gemm", ["s_final", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "control_flow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [_w(rng, "w1", (8, 3, 3, 3)), _w(rng, "b1", (8,), 0.1), numpy_helper.from_array(np.array(0, np.float32), "zero"),
         numpy_helper.from_array(np.array(2, np.int64), "trips"), _w(rng, "w2", (5, 8)), _w(rng, "b2", (5,), 0.1)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _subgraphs(model: onnx.ModelProto) -> dict:
    """Each subgraph's nodes (in any order: a toposort may reorder them), weights and signature."""
    def canon(g: onnx.GraphProto):
        return (sorted(n.SerializeToString() for n in g.node),
                sorted(t.SerializeToString() for t in g.initializer),
                [i.SerializeToString() for i in g.input], [o.SerializeToString() for o in g.output])
    return {(n.name, a.name): canon(a.g) for n in model.graph.node for a in n.attribute
            if a.type == onnx.AttributeProto.GRAPH}


def test_if_and_loop_main_graph_quantized_subgraphs_intact():
    model = _control_flow_model()
    x = cnn_inputs()
    r = mxqn_onnx.quantize(model, x)
    onnx.checker.check_model(r.model, full_check=True)
    assert [(d.name, d.op) for d in r.layers] == [("conv1", "Conv"), ("fc", "Gemm")]
    floats = {s.name: s.reason for s in r.float_layers}
    assert set(floats) == {"then_conv", "loop_matmul"}
    assert "If node 'branch'" in floats["then_conv"] and "Loop node 'loop'" in floats["loop_matmul"]
    assert _subgraphs(r.model) == _subgraphs(model)  # node for node, float weights and all
    _close_to_fp32(model, r.model, [{"x": x}, {"x": -x}])  # -x: also the else branch


# --------------------------------------------------------------------------- several inputs and outputs


def _two_in_two_out() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["features"], name="relu"),
        helper.make_node("GlobalAveragePool", ["features"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["meta", "w_meta"], ["m1"], name="meta_proj"),
        helper.make_node("Concat", ["f", "m1"], ["joined"], name="join", axis=1),
        helper.make_node("Gemm", ["joined", "w2", "b2"], ["logits"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "two_in_two_out",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8]),
         helper.make_tensor_value_info("meta", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [_w(rng, "w1", (8, 3, 3, 3)), _w(rng, "b1", (8,), 0.1), _w(rng, "w_meta", (4, 6)),
         _w(rng, "w2", (5, 14)), _w(rng, "b2", (5,), 0.1)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_several_inputs_and_outputs(tmp_path):
    model = _two_in_two_out()
    src = tmp_path / "multi.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(5)
    data = {"image": cnn_inputs(24), "meta": rng.standard_normal((24, 4)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", **data)
    out = tmp_path / "q.onnx"
    assert main(["convert", str(src), str(out), "--calib", str(tmp_path / "calib.npz"), "--quiet"]) == 0
    q = onnx.load(str(out))
    assert [i.name for i in q.graph.input] == ["image", "meta"]
    assert [o.name for o in q.graph.output] == ["logits", "features"]
    r = mxqn_onnx.quantize(model, data)
    assert {d.name for d in r.layers} == {"conv", "meta_proj", "head"}
    assert set(r.comparison.per_output_db()) == {"logits", "features"}
    _close_to_fp32(model, q, [{k: v[:8] for k, v in data.items()}, {k: v[8:] for k, v in data.items()}])


# --------------------------------------------------------------------------- fixed batch size


def test_fixed_batch_model_is_fed_in_its_batch_size():
    model = small_cnn(batch=2)
    with pytest.warns(UserWarning, match="exactly 2 samples; dropped the last 1"):
        r = mxqn_onnx.quantize(model, cnn_inputs(5), batch_size=16)
    assert r.calibration_samples == 4
    _close_to_fp32(model, r.model, [{"x": cnn_inputs(2, seed=9)}])
    with pytest.raises(MxqnError, match=r"input 'x' has shape \[1, 3, 8, 8\], the model expects float32\[2,3,8,8\]"):
        mxqn_onnx.quantize(model, cnn_inputs(1))


# --------------------------------------------------------------------------- calibration data


def _quantize_strict(model, data):
    """quantize() with numpy's RuntimeWarnings (log of zero, 0/0) turned into errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return mxqn_onnx.quantize(model, data)


def _all_finite_decisions(r):
    for a in r.activations.values():
        assert a.kind in ("fixed", "log")
        assert a.sqnr_db == a.sqnr_db  # not NaN
        if a.kind == "fixed":
            assert isinstance(a.frac, int)
        else:
            assert isinstance(a.k, int) and isinstance(a.E, int)


def test_all_zero_calibration_gives_exact_quantizers():
    model = small_cnn()
    r = _quantize_strict(model, np.zeros((8, 3, 8, 8), np.float32))
    _all_finite_decisions(r)
    first = r.activations["x"]
    assert first.kind == "fixed" and first.sqnr_db == float("inf")
    # on zeros the network computes its biases only; those survive quantization
    _close_to_fp32(model, r.model, [{"x": np.zeros((2, 3, 8, 8), np.float32)}])


def test_constant_calibration():
    model = small_cnn()
    r = _quantize_strict(model, np.full((8, 3, 8, 8), 0.75, np.float32))
    _all_finite_decisions(r)
    first = r.activations["x"]
    assert not first.signed
    assert first.quantize(np.array([0.75], np.float32))[0] == np.float32(0.75)  # the one value is exact
    _close_to_fp32(model, r.model, [{"x": np.full((2, 3, 8, 8), 0.75, np.float32)}])


def test_layer_whose_input_is_always_zero():
    """One branch is Relu(-|x|) == 0 everywhere; its conv still gets a sane quantizer."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Abs", ["x"], ["a"], name="abs"),
        helper.make_node("Neg", ["a"], ["na"], name="neg"),
        helper.make_node("Relu", ["na"], ["zeros"], name="relu_dead"),
        helper.make_node("Conv", ["zeros", "w0", "b0"], ["c0"], name="dead_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="live_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c0", "c1"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "dead_branch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [_w(rng, "w0", (4, 3, 3, 3)), _w(rng, "b0", (4,), 0.1), _w(rng, "w1", (4, 3, 3, 3)), _w(rng, "b1", (4,), 0.1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = cnn_inputs()
    r = _quantize_strict(model, x)
    _all_finite_decisions(r)
    assert r.activations["zeros"].sqnr_db == float("inf")
    assert r.activations["zeros"].max == 0.0
    _close_to_fp32(model, r.model, [{"x": x}])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_data_names_the_input(bad):
    x = cnn_inputs(8)
    x[5, 1, 2, 3] = bad
    with pytest.raises(MxqnError, match=r"input 'x' holds 1 NaN or Inf value\(s\)"):
        mxqn_onnx.quantize(small_cnn(), x)


def test_non_finite_inner_tensor_is_named():
    """Finite data, but the model makes NaN from it (log of negatives): name that tensor."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Log", ["x"], ["log_x"], name="log"),
             helper.make_node("Conv", ["log_x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(
        nodes, "log_then_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], [_w(rng, "w", (4, 3, 3, 3))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(MxqnError, match="'log_x' contains NaN or Inf"):
        mxqn_onnx.quantize(model, cnn_inputs(4))
    # with positive data the same model converts fine
    r = mxqn_onnx.quantize(model, np.abs(cnn_inputs(4)) + 0.1)
    assert sqnr_db(*[run[0][0] for run in run_both(model, r.model, [{"x": np.abs(cnn_inputs(4, 2)) + 0.1}])[:2]]) > MIN_DB
