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
    return (mxqn_onnx.quantize(digits_model, digits_calib, format="mxqn", **kw),
            mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", **kw))


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


def test_qdq_keeps_log_quantizers_as_custom_nodes(digits_model, digits_calib, test_x):
    mx = mxqn_onnx.quantize(digits_model, digits_calib, verify=False)
    q = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", verify=False)
    n_log = sum(a.kind == "log" for a in q.activations.values())
    assert n_log > 0  # the shipped model picks log for some tensors
    onnx.checker.check_model(q.model, full_check=True)
    ops = [n.op_type for n in q.model.graph.node]
    assert ops.count("LogQuant") == n_log and "FixedQuant" not in ops
    assert "QuantizeLinear" in ops
    assert any(i.domain == DOMAIN for i in q.model.opset_import)
    assert _sqnr(_run(mx.model, test_x), _run(q.model, test_x)) > 60.0


def test_narrow_activations_get_a_clip(digits_model, digits_calib, test_x):
    kw = dict(act_quant="fixed", abits=6, verify=False)
    mx = mxqn_onnx.quantize(digits_model, digits_calib, **kw)
    q = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", **kw)
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
    assert "FixedQuant" in ops13 and "QuantizeLinear" not in ops13  # no 16-bit QDQ before opset 21
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


# ------------------------------------------------------------------ integer encoding (issue: VNNI)
#
# On x86 CPUs without VNNI, onnxruntime's fused U8S8 kernels add two adjacent uint8 x int8
# products into a saturating int16 (VPMADDUBSW). These tests check the encoding itself, so they
# fail on an unsafe encoding whatever CPU runs them; the fused-vs-unfused comparison above and
# below catches the symptom on CPUs where it shows.

_INT16_MAX = 2 ** 15 - 1


def _fused_layer_operands(model: onnx.ModelProto):
    """(layer, activation codes range, activation type, weight codes, weight type) per QDQ layer."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x_dq, w_dq = producer.get(n.input[0]), producer.get(n.input[1])
        if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        q = producer[x_dq.input[0]]
        assert q.op_type == "QuantizeLinear"
        act_zp = inits[q.input[2]]
        lo, hi = (0, 255) if act_zp.dtype == np.uint8 else (-128, 127)
        clip = producer.get(q.input[0])
        if clip is not None and clip.op_type == "Clip":  # narrower than the container
            scale = float(inits[q.input[1]])
            lo = max(lo, int(round(float(inits[clip.input[1]]) / scale)) + int(act_zp))
            hi = min(hi, int(round(float(inits[clip.input[2]]) / scale)) + int(act_zp))
        w_codes = inits[w_dq.input[0]]
        w_zp = inits[w_dq.input[2]] if len(w_dq.input) > 2 else np.zeros((), w_codes.dtype)
        out.append((n.name, (lo, hi), act_zp.dtype, w_codes.astype(np.int64), w_codes.dtype,
                    w_zp.astype(np.int64)))
    return out


def _int16_pair_safe(act_range, act_type, w_codes, w_type) -> bool:
    """Whether the layer's fused product is exact on every x86 CPU.

    U8U8 runs on int16-widened operands (exact). For U8S8 the raw uint8 codes a in act_range
    meet raw int8 codes w: every pair a1*w1 + a2*w2 must fit int16.
    """
    if act_type == np.uint8 and w_type == np.uint8:
        return True
    if act_type == np.uint8 and w_type == np.int8:
        top2 = np.sort(np.abs(w_codes).ravel())[-2:].sum()
        return act_range[1] * top2 <= _INT16_MAX
    return False  # S8S8 is not claimed exact


@pytest.mark.parametrize("kw", [dict(), dict(wbits=7), dict(abits=7), dict(wbits=6, abits=6),
                                dict(weight_granularity="tensor")])
def test_default_encoding_cannot_saturate_int16_pairs(digits_model, digits_calib, test_x, kw):
    r = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", act_quant="fixed", verify=False, **kw)
    layers = _fused_layer_operands(r.model)
    assert len(layers) == len(r.layers)  # every layer has QDQ operands
    for name, act_range, act_type, w_codes, w_type, w_zp in layers:
        assert _int16_pair_safe(act_range, act_type, w_codes - w_zp.reshape((-1,) + (1,) * (w_codes.ndim - 1))
                                if w_zp.ndim else w_codes - w_zp, w_type), name
    # the codes are the same grid whatever the encoding: outputs equal the mxqn format's
    mx = mxqn_onnx.quantize(digits_model, digits_calib, act_quant="fixed", verify=False, **kw)
    ref = _run(mx.model, test_x)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = _run(r.model, test_x, level)
        assert _sqnr(ref, got) > 60.0
        assert np.mean(ref.argmax(1) == got.argmax(1)) == 1.0


def test_8bit_weights_become_uint8_only_where_int8_could_saturate(digits_model, digits_calib):
    kw = dict(format="qdq", act_quant="fixed", verify=False)
    w8 = mxqn_onnx.quantize(digits_model, digits_calib, **kw)
    w7 = mxqn_onnx.quantize(digits_model, digits_calib, wbits=7, **kw)
    # 8-bit weights against 8-bit activations could overflow: U8U8; 7-bit weights cannot: int8 kept
    assert {t for _, _, _, _, t, _ in _fused_layer_operands(w8.model)} == {np.dtype(np.uint8)}
    assert {t for _, _, _, _, t, _ in _fused_layer_operands(w7.model)} == {np.dtype(np.int8)}
    # signed activations (the normalised input) are offset into uint8 as well
    assert {t for _, _, t, _, _, _ in _fused_layer_operands(w8.model)} == {np.dtype(np.uint8)}
    # the offset codes are the signed codes + 128: same weights after dequantization
    legacy = mxqn_onnx.quantize(digits_model, digits_calib, qdq_encoding="int8", **kw)
    for (_, _, _, a, _, za), (_, _, _, b, _, zb) in zip(_fused_layer_operands(w8.model),
                                                        _fused_layer_operands(legacy.model)):
        shape = (-1,) + (1,) * (a.ndim - 1) if za.ndim else ()
        np.testing.assert_array_equal(a - za.reshape(shape), b - zb.reshape(shape))


def test_int8_encoding_is_the_unsafe_one_the_check_catches(digits_model, digits_calib, test_x):
    """The legacy signed encoding breaks the int16 pair bound, so the check above can fail."""
    r = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", act_quant="fixed", verify=False,
                           qdq_encoding="int8")
    layers = _fused_layer_operands(r.model)
    assert not all(_int16_pair_safe(a, at, w, wt) for _, a, at, w, wt, _ in layers)
    # and it is still exact where no fusion happens
    mx = mxqn_onnx.quantize(digits_model, digits_calib, act_quant="fixed", verify=False)
    assert _sqnr(_run(mx.model, test_x), _run(r.model, test_x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)) > 60.0


def test_cli_qdq_encoding(tmp_path, digits_model, digits_calib):
    out = tmp_path / "q.onnx"
    p = run_cli("convert", digits_model, out, "--calib", digits_calib, "--format", "qdq", "--act-quant",
                "fixed", "--qdq-encoding", "int8", "--quiet", "--no-verify")
    assert p.returncode == 0, p.stderr
    types = {t.data_type for t in onnx.load(str(out)).graph.initializer if t.name.endswith(".weight_q")}
    assert types == {onnx.TensorProto.INT8}
    p = run_cli("convert", digits_model, out, "--calib", digits_calib, "--qdq-encoding", "u4")
    assert p.returncode == 2 and "Traceback" not in p.stderr
