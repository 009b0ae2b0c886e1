"""The qdq output format, packed int4 weights and --opset."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import mxqn_onnx
from mxqn_onnx.graph.functions import DOMAIN
from mxqn_onnx.graph.loading import METADATA_KEY
from mxqn_onnx.quant import quantizers as Q

from conftest import run_cli


def _run(model: onnx.ModelProto, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def _optimized_ops(model: onnx.ModelProto, tmp_path, level) -> set:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}


def _sqnr(ref, got) -> float:
    return Q.sqnr_of(ref, got)


@pytest.fixture(scope="module")
def test_x(digits_test):
    return np.load(digits_test)["input"][:200]


@pytest.fixture(scope="module")
def fixed_pair(digits_model, digits_calib):
    kw = dict(act_quant="fixed", verify=False)
    # the uint8 encoding keeps the mxqn format's 8-bit codes (safe may hold some to 7 bits); the
    # layer-output quantizers (for onnxruntime's fusion) are extra, not in the mxqn format
    return (mxqn_onnx.quantize(digits_model, digits_calib, format="mxqn", **kw),
            mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", qdq_encoding="uint8",
                               qdq_layer_outputs="off", **kw))


def test_qdq_fixed_is_standard_onnx(fixed_pair):
    _, q = fixed_pair
    m = q.model
    onnx.checker.check_model(m, full_check=True)
    assert all(i.domain in ("", "ai.onnx") for i in m.opset_import)
    assert not any(n.domain == DOMAIN for n in m.graph.node) and len(m.functions) == 0
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    nq = 0
    for n in m.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        nq += 1
        scale = inits[n.input[1]].astype(np.float64)
        mant, _ = np.frexp(scale)
        assert np.all(mant == 0.5), f"{n.name}: scale is not a power of two"
        if len(n.input) > 2:
            zp = inits[n.input[2]]
            # zero point 0, or 128 on uint8 codes (the safe encoding's offset for signed codes)
            assert np.all(zp == 0) or (zp.dtype == np.uint8 and np.all(zp == 128))
    assert nq > 0
    meta = json.loads(next(p.value for p in m.metadata_props if p.key == METADATA_KEY))
    assert meta["format"] == "qdq"


@pytest.mark.parametrize("level", [ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   ort.GraphOptimizationLevel.ORT_ENABLE_ALL])
def test_onnxruntime_fuses_integer_kernels(fixed_pair, tmp_path, level):
    mx, q = fixed_pair
    ops = _optimized_ops(q.model, tmp_path, level)
    assert "QLinearConv" in ops
    assert {"QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat"} & ops
    # the mxqn format, by contrast, has nothing for onnxruntime to fuse into integer kernels
    assert "QLinearConv" not in _optimized_ops(mx.model, tmp_path, level)


def test_qdq_matches_mxqn_outputs(fixed_pair, test_x):
    mx, q = fixed_pair
    ref = _run(mx.model, test_x)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = _run(q.model, test_x, level)
        assert _sqnr(ref, got) > 60.0
        assert np.mean(ref.argmax(1) == got.argmax(1)) == 1.0


def test_qdq_default_is_fixed_point_and_log_is_inlined_standard_onnx(digits_model, digits_calib, test_x):
    # by default the qdq format chooses fixed-point activations only: QDQ pairs throughout
    d = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", verify=False)
    assert {a.kind for a in d.activations.values()} == {"fixed"}
    assert {n.op_type for n in d.model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    # log, where asked for, is written as its function body's standard ops, inlined
    mx = mxqn_onnx.quantize(digits_model, digits_calib, act_quant="auto", qdq_encoding="uint8", verify=False)
    q = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", act_quant="auto", qdq_encoding="uint8",
                           qdq_layer_outputs="off", verify=False)
    n_log = sum(a.kind == "log" for a in q.activations.values())
    assert n_log > 0  # the shipped model picks log for some tensors under auto
    onnx.checker.check_model(q.model, full_check=True)
    ops = [n.op_type for n in q.model.graph.node]
    assert "LogQuant" not in ops and "FixedQuant" not in ops and "QuantizeLinear" in ops
    assert all(n.domain in ("", "ai.onnx") for n in q.model.graph.node)
    assert all(i.domain in ("", "ai.onnx") for i in q.model.opset_import) and len(q.model.functions) == 0
    assert _sqnr(_run(mx.model, test_x), _run(q.model, test_x)) > 60.0


def test_narrow_activations_get_a_clip(digits_model, digits_calib, test_x):
    kw = dict(act_quant="fixed", abits=6, verify=False)
    mx = mxqn_onnx.quantize(digits_model, digits_calib, **kw)
    q = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", qdq_encoding="uint8", qdq_layer_outputs="off",
                           **kw)
    ops = [n.op_type for n in q.model.graph.node]
    assert ops.count("Clip") == ops.count("QuantizeLinear") > 0
    assert _sqnr(_run(mx.model, test_x), _run(q.model, test_x)) > 60.0


def _weight_types(model):
    return {t.name: t.data_type for t in model.graph.initializer if t.name.endswith(".weight_q")}


@pytest.mark.parametrize("fmt", ["mxqn", "qdq"])
def test_int4_packed_weights_at_opset_21(digits_model, digits_calib, test_x, fmt):
    kw = dict(wbits=4, verify=False, format=fmt)
    r13 = mxqn_onnx.quantize(digits_model, digits_calib, **kw)
    r21 = mxqn_onnx.quantize(digits_model, digits_calib, opset=21, **kw)
    onnx.checker.check_model(r21.model, full_check=True)
    assert set(_weight_types(r13.model).values()) == {onnx.TensorProto.INT8}
    assert set(_weight_types(r21.model).values()) == {onnx.TensorProto.INT4}
    assert r21.model.ir_version >= 10
    # packed: the weights take half the bytes
    n_weights = sum(d.params for d in r21.layers)
    assert r13.size_after - r21.size_after >= 0.45 * n_weights
    # same codes, same results
    np.testing.assert_array_equal(_run(r13.model, test_x), _run(r21.model, test_x))
    meta = json.loads(next(p.value for p in r21.model.metadata_props if p.key == METADATA_KEY))
    assert meta["opset"] == 21 and {l["weight"]["container"] for l in meta["layers"]} == {"int4"}


def test_5_to_7_bits_stay_in_int8_containers(digits_model, digits_calib):
    r = mxqn_onnx.quantize(digits_model, digits_calib, wbits=6, opset=21, verify=False)
    assert set(_weight_types(r.model).values()) == {onnx.TensorProto.INT8}
    rep = r.report()
    assert {(l["weight"]["bits"], l["weight"]["container"]) for l in rep["layers"]} == {(6, "int8")}


def test_16_bit_qdq_needs_opset_21(digits_model, digits_calib, test_x):
    kw = dict(wbits=12, abits=12, act_quant="fixed", format="qdq", verify=False)
    r13 = mxqn_onnx.quantize(digits_model, digits_calib, **kw)
    r21 = mxqn_onnx.quantize(digits_model, digits_calib, opset=21, **kw)
    ops13 = {n.op_type for n in r13.model.graph.node}
    # no 16-bit QDQ before opset 21: the FixedQuant body is inlined (Round, Clip) instead
    assert "QuantizeLinear" not in ops13 and {"Round", "Clip"} <= ops13 and len(r13.model.functions) == 0
    ops21 = {n.op_type for n in r21.model.graph.node}
    assert "FixedQuant" not in ops21 and "QuantizeLinear" in ops21
    assert onnx.TensorProto.INT16 in set(_weight_types(r21.model).values())
    assert _sqnr(_run(r13.model, test_x), _run(r21.model, test_x)) > 60.0


def test_opset_can_only_be_raised(digits_model, digits_calib):
    with pytest.raises(mxqn_onnx.MxqnError):
        mxqn_onnx.quantize(digits_model, digits_calib, opset=12, verify=False)
    with pytest.raises(mxqn_onnx.MxqnError):
        mxqn_onnx.quantize(digits_model, digits_calib, format="int8", verify=False)


def test_cli_qdq_opset(tmp_path, digits_model, digits_calib, digits_test):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    p = run_cli("convert", digits_model, out, "--calib", digits_calib, "--format", "qdq", "--act-quant",
                "fixed", "--opset", "21", "--report", rep, "--quiet")
    assert p.returncode == 0, p.stderr
    m = onnx.load(str(out))
    assert m.opset_import[0].version == 21 and len(m.opset_import) == 1
    assert json.loads(rep.read_text())["format"] == "qdq"
    p = run_cli("evaluate", digits_model, out, "--data", digits_test, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["output_sqnr_db"] > 25
    p = run_cli("convert", digits_model, out, "--calib", digits_calib, "--format", "nope")
    assert p.returncode == 2
