"""``export-c``: the generated C, compiled with the system compiler, against the integer
reference executor (code for code on every quantized layer) and onnxruntime (one step)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import mxqn_onnx
from mxqn_onnx.integer.c_plan import executor_model
from mxqn_onnx.integer.c_run import build_c, compiler, read_records, run_c, write_records
from mxqn_onnx.integer.executor import IntegerExecutor, _codes_of_float, _codes_of_value, compare_with_onnxruntime
from mxqn_onnx.integer.kernels import AccT, as_float

from conftest import MODELS, run_cli

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler")

#: fast conversions: the point here is the C, not the choice of quantizers
FAST = dict(verify=False, calib_count=64, rounding="nearest", data_samples=32)
VARIANTS = {
    "fixed": dict(act_quant="fixed"),
    "log": dict(act_quant="log"),
    "auto": dict(),
    "int4": dict(wbits=4, opset=21),  # packed int4 weights
    "mixed": dict(avg_wbits=5, avg_abits=6, sensitivity="none"),
    "wide": dict(wbits=12, abits=12, weight_granularity="tensor"),  # int16 codes and weights
    "float_tail": dict(keep_last=True, keep_float=True),  # the last Gemm stays float
}


@functools.lru_cache(maxsize=None)
def convert(tag: str) -> onnx.ModelProto:
    if tag == "vgg16":
        return mxqn_onnx.quantize(MODELS / "digits32_vgg16.onnx", MODELS / "digits32_calib.npz", **FAST).model
    if tag == "fallbacks":
        return mxqn_onnx.quantize(synth_fallbacks_model(), {"x": synth_data(64, 0)}, **FAST, exclude=("c4", "y")).model
    if tag.startswith("synth"):
        kw = {"synth_log": dict(act_quant="log")}.get(tag, {})
        return mxqn_onnx.quantize(synth_model(), {"x": synth_data(64, 0)}, **FAST, **kw).model
    return mxqn_onnx.quantize(MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz", **FAST, **VARIANTS[tag]).model


def digits(n: int, name: str = "digits_test.npz") -> np.ndarray:
    return np.load(MODELS / name)["input"][:n]


def export_and_build(model, folder, input_shape=None):
    info = mxqn_onnx.export_c(model, folder, input_shape=input_shape)
    exe, dbg = folder.parent / (folder.name + "_run"), folder.parent / (folder.name + "_dbg")
    assert build_c(folder, exe) == ""  # warning-free under -Wall -Wextra
    assert build_c(folder, dbg, debug=True) == ""
    return info, exe, dbg


def assert_code_for_code(model, x, folder, input_shape=None):
    """Every quantizer's codes and every layer's accumulator equal the executor's, per sample."""
    info, exe, dbg = export_and_build(model, folder, input_shape)
    n = len(x)
    dump = folder.parent / (folder.name + ".dump")
    y, _ = run_c(exe, x, info["output_size"])
    yd, _ = run_c(dbg, x, info["output_size"], env={"MXQN_DUMP": str(dump)})
    assert np.array_equal(y.view(np.uint32), yd.view(np.uint32))  # the debug hooks change nothing
    recs = read_records(dump)
    per = len(info["debug_records"])
    assert len(recs) == per * n
    ex = IntegerExecutor(executor_model(model))
    env = ex.run({info["input_name"]: x}, keep=[r["name"] for r in info["debug_records"]])
    for k, r in enumerate(info["debug_records"]):
        got = np.stack([recs[i * per + k][2] for i in range(n)]).astype(np.int64)
        v = env[r["name"]]
        ref = (v.acc if isinstance(v, AccT) else _codes_of_value(v)).reshape(n, -1)
        assert np.array_equal(got, ref), (r, int(np.count_nonzero(got != ref)))
    # every quantized layer is in the C, in integers
    assert {r["name"] for r in info["debug_records"] if r["role"] == 1} == \
        {L.node.output[0] for L in ex.layers.values()}
    ref_out = np.concatenate([as_float(env[o.name]).reshape(n, -1) for o in model.graph.output], axis=1)
    return info, y, ref_out


@pytest.mark.parametrize("tag", ["fixed", "log", "auto", "int4", "mixed", "wide"])
def test_digits_code_for_code_with_the_executor(tag, tmp_path):
    model = convert(tag)
    info, y, ref = assert_code_for_code(model, digits(32), tmp_path / tag)
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))  # the dequantized output, bit for bit
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "mxqn"))
    kinds = {a["kind"] for a in meta["activations"]}
    src = (tmp_path / tag / "model.c").read_text()
    if tag == "log":
        assert kinds == {"log"}
    if tag == "fixed":
        assert kinds == {"fixed"} and "= mxqn_logx(" not in src and "mxqn_logq(v" not in src
    if tag == "int4":
        assert {L["weight"]["container"] for L in meta["layers"]} == {"int4"}
        assert "static const uint8_t w4_" in src and "static const int8_t w_" not in src
        params = sum(L["params"] for L in meta["layers"])
        assert info["weight_bytes"] < params  # two weights per byte (plus int32 biases)
    if tag == "mixed":
        assert len({L["weight"]["bits"] for L in meta["layers"]}) > 1
        assert len({a["bits"] for a in meta["activations"]}) > 1
    if tag == "wide":
        assert ("static const int16_t w_" in src or "static const int16_t w16_" in src) and "int16_t *y" in src
    assert info["arena_bytes"] > 0 and "static uint64_t mxqn_arena_words" in src and "malloc" not in src


def test_digits_within_one_step_of_onnxruntime(tmp_path):
    """On identical layer inputs (onnxruntime's quantizer outputs forced into the C program,
    as the executor's own check does), the C output equals the executor's and is within one
    step of onnxruntime's; running free, it agrees with onnxruntime on top-1."""
    model = convert("auto")
    x = digits(48)
    info, exe, dbg = export_and_build(model, tmp_path / "c")
    rep = compare_with_onnxruntime(model, [{"input": x}])
    assert rep["within_one_step"], rep
    quant = {n.output[0]: n for n in model.graph.node if n.domain == "ai.mxqn"}
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(onnx.ValueInfoProto(name=q) for q in quant)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {"input": x})))
    recs = []
    for i in range(len(x)):
        for r in info["debug_records"]:
            if r["role"] == 0:
                codes = _codes_of_float(got[r["name"]][i:i + 1], quant[r["name"]])
                recs.append((r["name"], 0, r["type"], codes))
    force = tmp_path / "force.bin"
    write_records(force, recs)
    y, _ = run_c(dbg, x, info["output_size"], env={"MXQN_FORCE": str(force)})
    ex = IntegerExecutor(model)
    env = ex.run({"input": x}, forced={q: got[q] for q in quant})
    out = model.graph.output[0].name
    assert np.array_equal(y.view(np.uint32), as_float(env[out]).reshape(len(x), -1).view(np.uint32))
    (o,) = rep["outputs"]
    assert o["max_diff_steps"] <= 1.0
    step = 2.0 ** -o["frac"]
    assert np.abs(y - got[out]).max() <= max(step, o["max_abs_diff"])
    free, _ = run_c(exe, x, info["output_size"])
    assert np.mean(free.argmax(1) == got[out].argmax(1)) >= 0.97


def test_vgg16_code_for_code(tmp_path):
    model = convert("vgg16")
    _, y, ref = assert_code_for_code(model, digits(12, "digits32_test.npz"), tmp_path / "vgg16")
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))


ZOO = MODELS.parent / "cache" / "zoo"
ZOO_MODELS = sorted(p.name for p in ZOO.glob("digits_*.onnx") if not p.stem.endswith("_dynamo")) \
    if (ZOO / "digits_calib.npz").exists() else []


@pytest.mark.skipif(not ZOO_MODELS, reason="no zoo models in cache/zoo (scripts/train_zoo.py)")
@pytest.mark.parametrize("name", ZOO_MODELS or ["none"])
def test_zoo_code_for_code(name, tmp_path):
    """ResNets (residual Adds), MobileNetV2 (depthwise), VGGs of the zoo, when trained."""
    model = mxqn_onnx.quantize(ZOO / name, ZOO / "digits_calib.npz", **FAST).model
    x = np.load(ZOO / "digits_test.npz")["input"][:8]
    _, y, ref = assert_code_for_code(model, x, tmp_path / "zoo")
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))


def test_float_tail_runs_in_float_c(tmp_path):
    model = convert("float_tail")
    info, y, ref = assert_code_for_code(model, digits(32), tmp_path / "tail")
    assert any("float_layer" in f for f in info["float_ops"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)  # float32 sums in another order


# ---------------------------------------------------------------- ops between layers


def synth_model(seed: int = 0) -> onnx.ModelProto:
    """A small net with the ops the zoo and the onnx light models put between layers:
    residual Add, Clip, MaxPool, Concat, channel shuffle (Reshape/Transpose), AveragePool
    (onnxruntime's vector and generic kernels), GlobalAveragePool, Gemm, MatMul, Softmax."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, *shape, scale=None):
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * (scale or (2.0 / fan) ** 0.5)).astype(np.float32), name))
        return name

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], name=out, **kw))

    def conv(x, y, cin, cout, k, pad, stride=1, group=1):
        node("Conv", [x, w(y + "_w", cout, cin // group, k, k), w(y + "_b", cout, scale=0.1)], y,
             kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=group)

    conv("x", "c1", 3, 8, 3, 1)
    node("Relu", ["c1"], "r1")
    conv("r1", "c2", 8, 8, 3, 1)
    node("Add", ["c2", "r1"], "s2")
    node("Relu", ["s2"], "r2")
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    node("Clip", ["r2", "lo", "hi"], "k2")
    node("MaxPool", ["k2"], "m", kernel_shape=[2, 2], strides=[2, 2])
    conv("m", "a", 8, 4, 1, 0)
    conv("m", "b", 8, 4, 3, 1, group=4)
    node("Concat", ["a", "b"], "cat0", axis=1)
    node("Relu", ["cat0"], "cat")
    inits += [numpy_helper.from_array(np.array(s, np.int64), n) for n, s in
              (("sh5", [0, 2, 4, 8, 8]), ("sh4", [0, 8, 8, 8]))]
    node("Reshape", ["cat", "sh5"], "r5")
    node("Transpose", ["r5"], "t5", perm=[0, 2, 1, 3, 4])
    node("Reshape", ["t5", "sh4"], "shuf")
    node("AveragePool", ["shuf"], "ap", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    conv("ap", "c3", 8, 8, 3, 1, stride=2)
    node("Relu", ["c3"], "r3")
    node("AveragePool", ["r3"], "ap2", kernel_shape=[3, 3], strides=[3, 3], count_include_pad=1, pads=[1, 1, 1, 1])
    node("GlobalAveragePool", ["ap2"], "g")
    node("Flatten", ["g"], "f", axis=1)
    node("Gemm", ["f", w("fc1_w", 16, 8), w("fc1_b", 16, scale=0.1)], "fc1", transB=1)
    node("Relu", ["fc1"], "h")
    node("MatMul", ["h", w("fc2_w", 16, 10)], "logits")
    node("Softmax", ["logits"], "prob", axis=-1)
    g = helper.make_graph(nodes, "synth", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def synth_fallbacks_model(seed: int = 1) -> onnx.ModelProto:
    """Float ops between layers (Add, Clip and MaxPool on the float outputs of AveragePools),
    GlobalMaxPool on integers, Squeeze, and a Conv and a Gemm left in float at the end."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * (2.0 / np.prod(shape[1:])) ** 0.5)
                                             .astype(np.float32), name))
        return name

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], name=out, **kw))

    node("Conv", ["x", w("c1_w", 8, 3, 3, 3), w("c1_b", 8)], "c1", pads=[1, 1, 1, 1])
    node("Relu", ["c1"], "r1")
    node("AveragePool", ["r1"], "ap", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    node("AveragePool", ["r1"], "ap2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], count_include_pad=1)
    node("Add", ["ap", "ap2"], "s")
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 0.7))]
    node("Clip", ["s", "lo", "hi"], "k")
    node("MaxPool", ["k"], "mp", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    node("Conv", ["mp", w("c2_w", 8, 8, 3, 3)], "c2", pads=[1, 1, 1, 1])
    node("Relu", ["c2"], "r2")
    node("Conv", ["r2", w("c3_w", 8, 8, 3, 3), w("c3_b", 8)], "c3", pads=[1, 1, 1, 1])
    node("Relu", ["c3"], "r3")
    node("GlobalMaxPool", ["r3"], "gm")
    node("Conv", ["gm", w("c4_w", 6, 8, 1, 1)], "c4")  # excluded: float
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "ax"))
    node("Squeeze", ["c4", "ax"], "sq")
    node("Gemm", ["sq", w("fc_w", 10, 6)], "y", transB=1)  # excluded: float
    g = helper.make_graph(nodes, "fallbacks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def synth_data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("tag", ["synth", "synth_log"])
def test_ops_between_layers_code_for_code(tag, tmp_path):
    model = convert(tag)
    info, y, ref = assert_code_for_code(model, synth_data(32, 1), tmp_path / tag)
    src = (tmp_path / tag / "model.c").read_text()
    for op in ("int_add", "int_clip", "int_maxpool", "int_concat", "float_avgpool", "float_gap", "float_softmax"):
        assert f"/* {op} '" in src, op
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)  # Softmax: expf against onnxruntime's exp
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": synth_data(32, 1)})[0]
    assert np.mean(y.argmax(1) == got.argmax(1)) >= 0.9


def test_float_fallbacks_between_layers(tmp_path):
    model = convert("fallbacks")
    info, y, ref = assert_code_for_code(model, synth_data(24, 3), tmp_path / "fb")
    src = (tmp_path / "fb" / "model.c").read_text()
    for op in ("float_clip", "float_maxpool", "float_binary", "float_layer", "int_maxpool"):
        assert f"/* {op} '" in src, op
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)  # float layers at the end: float rounding


def _depthwise_model(seed: int = 2) -> onnx.ModelProto:
    """Conv 3->8 whose output channels span 2^0..2^-7 of the largest, Relu, depthwise 3x3,
    Relu, Conv 1x1 8->4: the depthwise input gets per-channel shifts."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * (2.0 ** -np.arange(8)).reshape(-1, 1, 1, 1)
    wd = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * (2.0 ** np.arange(8)).reshape(-1, 1, 1, 1)
    w3 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "w1"), (wd, "wd"), (w3, "w3"))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="c1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "wd"], ["d"], pads=[1] * 4, group=8, name="dw"),
             helper.make_node("Relu", ["d"], ["r2"], name="r2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="pw")]
    g = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_depthwise_shifts_are_free_in_c(tmp_path):
    """The shifts' Mul by per-channel powers of two becomes fractional lengths: no step in the
    C, codes equal to the executor's, outputs equal to onnxruntime's to float rounding."""
    model = mxqn_onnx.quantize(_depthwise_model(), {"x": synth_data(32, 0)}, **FAST, depthwise_shift="on").model
    muls = [n for n in model.graph.node if n.name.endswith("_dw_shift")]
    assert len(muls) == 1
    info, y, ref = assert_code_for_code(model, synth_data(8, 1), tmp_path / "dw")
    assert info["float_ops"] == []
    src = (tmp_path / "dw" / "model.c").read_text()
    assert f"'{muls[0].name}' */" not in src  # a view: no step runs for it
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": synth_data(8, 1)})[0]
    np.testing.assert_allclose(y.reshape(got.shape), got, rtol=1e-5, atol=1e-5 * np.abs(got).max())


# ---------------------------------------------------------------- refusals and the CLI


def _lrn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 3, 3)).astype(np.float32), "w2")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("LRN", ["c1"], ["n1"], name="the_lrn", size=3),
         helper.make_node("Conv", ["n1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])],
        "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])], initializer=[w1, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    return mxqn_onnx.quantize(m, {"x": x}, **FAST).model


def test_refuses_an_op_it_cannot_express_without_writing(tmp_path):
    q = _lrn_model()
    out = tmp_path / "c"
    with pytest.raises(mxqn_onnx.MxqnError) as e:
        mxqn_onnx.export_c(q, out)
    msg = str(e.value)
    assert "the_lrn" in msg and "LRN" in msg and "\n" not in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []
    path = tmp_path / "lrn.onnx"
    onnx.save(q, path)
    p = run_cli("export-c", path, out)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "the_lrn" in p.stderr
    assert not out.exists()


def test_refuses_models_that_are_not_mxqn(tmp_path):
    with pytest.raises(mxqn_onnx.MxqnError, match="not an mxqn model"):
        mxqn_onnx.export_c(MODELS / "digits_cnn.onnx", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_cli_export_c_replaces_only_its_own_files(tmp_path):
    path = tmp_path / "q.onnx"
    onnx.save(convert("fixed"), path)
    out = tmp_path / "c"
    p = run_cli("export-c", path, out)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.iterdir()) == ["main.c", "model.c", "model.h", "mxqn-export.json"]
    # a file the user adds to an earlier export survives a second export into the folder
    (out / "notes.txt").write_text("keep")
    (out / "model.c").write_text("stale")  # (not ours any more: changed since the export)
    p = run_cli("export-c", path, out)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "model.c" in p.stderr
    assert (out / "model.c").read_text() == "stale" and (out / "notes.txt").read_text() == "keep"
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temporary file left
    (out / "model.c").unlink()
    p = run_cli("export-c", path, out, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["arena_bytes"] > 0, p.stderr
    assert (out / "notes.txt").read_text() == "keep"
    assert sorted(f.name for f in out.iterdir()) == ["main.c", "model.c", "model.h", "mxqn-export.json", "notes.txt"]
    # a folder of the user's own with a file named like one of the export's: refused, untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "main.c").write_text("int main(void) { return 0; }")
    p = run_cli("export-c", path, mine)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "main.c" in p.stderr
    assert sorted(f.name for f in mine.iterdir()) == ["main.c"]
    # ... and with unrelated files only: the export goes next to them
    (mine / "main.c").rename(mine / "app.c")
    p = run_cli("export-c", path, mine)
    assert p.returncode == 0, p.stderr
    assert (mine / "app.c").read_text().startswith("int main") and (mine / "model.c").is_file()
    x = digits(4)
    info = mxqn_onnx.export_c(path, out)
    build_c(out, tmp_path / "run")
    y, _ = run_c(tmp_path / "run", x, info["output_size"])
    assert y.shape == (4, 10) and np.isfinite(y).all()


def test_export_into_an_earlier_export_keeps_a_planted_user_file(tmp_path):
    """Issue #22: a second export into the folder of the first, where the user has put a file."""
    out = tmp_path / "c"
    mxqn_onnx.export_c(convert("fixed"), out)
    (out / "README.txt").write_text("my notes")
    first = (out / "model.c").read_text()
    info = mxqn_onnx.export_c(convert("log"), out)
    assert (out / "README.txt").read_text() == "my notes"
    assert (out / "model.c").read_text() != first
    assert sorted(Path(f).name for f in info["files"]) == ["main.c", "model.c", "model.h", "mxqn-export.json"]


@pytest.mark.parametrize("shape", [["1,1,28,28"], ["1", "1", "28", "28"], ["1 1 28 28"]])
def test_cli_input_shape_takes_commas_and_spaces(shape, tmp_path):
    m = convert("fixed")
    m = onnx.ModelProto.FromString(m.SerializeToString())
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "side"  # dynamic height and width: the shape must be given
    path = tmp_path / "q.onnx"
    onnx.save(m, path)
    p = run_cli("export-c", path, tmp_path / "none")
    assert p.returncode == 2 and "dynamic" in p.stderr and not (tmp_path / "none").exists()
    p = run_cli("export-c", path, tmp_path / "c", "--input-shape", *shape, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["input_shape"] == [1, 1, 28, 28]
    p = run_cli("export-c", path, tmp_path / "bad", "--input-shape", "1,x,28,28")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--input-shape" in p.stderr


def test_only_powers_of_two_per_channel_count_as_shifts():
    from mxqn_onnx.integer.c_ops import _channel_pow2

    shape = (1, 3, 4, 4)
    np.testing.assert_array_equal(_channel_pow2(np.array([1, 8, 0.25], np.float32).reshape(1, 3, 1, 1), shape),
                                  [0, 3, -2])
    np.testing.assert_array_equal(_channel_pow2(np.float32(0.5), shape), [-1])
    assert _channel_pow2(np.array([1, 3, 4], np.float32).reshape(1, 3, 1, 1), shape) is None  # 3 is no shift
    assert _channel_pow2(np.array([1, -2, 4], np.float32).reshape(3, 1, 1), shape) is None  # a sign flip
    assert _channel_pow2(np.ones((1, 1, 4, 1), np.float32), shape) is None  # along another axis
