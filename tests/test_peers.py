"""The benchmarks' peer helpers (scripts/peers.py): power-of-two rounding of a QDQ model's scales.

The QDQ model is onnxruntime's own quantize_static output of the digits network (NNCF writes the
same QuantizeLinear / DequantizeLinear form; NNCF itself is a bench extra, not needed here).
"""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import peers  # noqa: E402


@pytest.fixture(scope="module")
def qdq(tmp_path_factory, digits_model, digits_calib):
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from bench import NpzReader

    d = tmp_path_factory.mktemp("peers")
    pre = peers.prepare(str(digits_model), str(d / "pre.onnx"))
    x = np.load(digits_calib)["input"][:32]
    name = onnx.load(pre).graph.input[0].name
    quantize_static(pre, str(d / "q.onnx"), NpzReader(name, x), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["Conv", "Gemm"])
    return onnx.load(str(d / "q.onnx")), name


def _scales(m):
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.input[1]: inits[n.input[1]] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}


def _weights(m):
    """Dequantized weights of the DequantizeLinear nodes fed by integer initializers."""
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q, s = inits[n.input[0]].astype(np.float64), inits[n.input[1]].astype(np.float64)
            shape = [1] * q.ndim
            if s.ndim:
                shape[next((a.i for a in n.attribute if a.name == "axis"), 1)] = s.size
            out[n.output[0]] = (q * s.reshape(shape), s.reshape(shape))
    return out


@pytest.mark.parametrize("mode", ["nearest", "up"])
def test_every_scale_becomes_a_power_of_two_and_weights_keep_their_values(qdq, mode):
    model, _ = qdq
    before, after = _scales(model), _scales(peers.pow2_scales(model, mode))
    assert before.keys() == after.keys() and len(after) > 4
    for k, s in after.items():
        assert all(peers.is_pow2(float(v)) for v in np.ravel(s))
        ratio = np.ravel(s).astype(np.float64) / np.ravel(before[k])
        if mode == "up":
            assert np.all(ratio >= 1.0) and np.all(ratio < 2.0)
        else:
            assert np.all(ratio >= 2 ** -0.5 - 1e-6) and np.all(ratio <= 2 ** 0.5 + 1e-6)
    w0, w1 = _weights(model), _weights(peers.pow2_scales(model, mode))
    assert w0.keys() == w1.keys() and w0
    for k, (w, _) in w0.items():
        got, step = w1[k]
        inside = np.abs(w) <= 127 * step  # not clipped by the narrower grid
        # requantized, not rescaled: every weight within half a new step of its value
        assert np.all(np.abs(got - w)[inside] <= 0.5 * np.broadcast_to(step, w.shape)[inside] + 1e-9)


def test_rounded_model_still_computes_the_network(qdq, digits_model, digits_test):
    import onnxruntime as ort

    model, name = qdq
    x = np.load(digits_test)["input"][:64]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {name: x})[0]
    ref = ort.InferenceSession(str(digits_model), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    sqnr = lambda y: 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2))  # noqa: E731
    up = sqnr(run(peers.pow2_scales(model, "up")))
    assert up > 15.0 and np.isfinite(sqnr(run(model)))


def test_qdq_models_run_as_written(qdq, digits_model):
    """The benchmarks run peers' QDQ models with graph optimizations off (float arithmetic on
    the dequantized values, what the method gives), other models as usual."""
    import onnxruntime as ort

    import third_party

    model, _ = qdq
    assert third_party.has_qdq(model) and not third_party.has_qdq(onnx.load(str(digits_model)))
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert third_party.session(model).get_session_options().graph_optimization_level == off
    assert third_party.session(onnx.load(str(digits_model))).get_session_options().graph_optimization_level != off


def test_nncf_flow_where_installed(tmp_path, digits_model, digits_calib, digits_test):
    """NNCF's flow (a bench extra): a QDQ model of the digits network that runs as written close
    to FP32, and its power-of-two version holds powers of two only."""
    pytest.importorskip("nncf")
    import third_party

    name = onnx.load(str(digits_model)).graph.input[0].name
    pre = peers.prepare(str(digits_model), str(tmp_path / "pre.onnx"))
    peers.run_nncf(pre, str(tmp_path / "q.onnx"), np.load(digits_calib)["input"][:32], name)
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert third_party.has_qdq(q)
    x = np.load(digits_test)["input"][:64]
    ref = third_party.session(onnx.load(str(digits_model))).run(None, {name: x})[0]
    for m in (q, peers.pow2_scales(q, "up")):
        y = third_party.session(m).run(None, {name: x})[0]
        assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - y) ** 2)) > 15.0
    assert all(peers.is_pow2(float(v)) for s in _scales(peers.pow2_scales(q)).values() for v in np.ravel(s))


def test_weights_sharing_one_scale_are_each_requantized_from_the_original_scale():
    """Two integer weights behind DequantizeLinear nodes that share one scale initializer (NNCF
    shares equal constants): both keep their values up to the new step, not the first node's
    rounded scale read back as the second one's old scale."""
    from onnx import TensorProto, helper

    s = np.float32(0.0123)
    q1 = np.arange(-60, 60, dtype=np.int8).reshape(8, 15)
    q2 = (q1[::-1] // 2).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["q1", "s"], ["w1"]),
             helper.make_node("DequantizeLinear", ["q2", "s"], ["w2"]),
             helper.make_node("Add", ["w1", "w2"], ["y"])]
    g = helper.make_graph(nodes, "shared", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 15])],
                          [numpy_helper.from_array(q1, "q1"), numpy_helper.from_array(q2, "q2"),
                           numpy_helper.from_array(np.array(s), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    w = _weights(m)
    for mode in ("up", "nearest"):
        got = _weights(peers.pow2_scales(m, mode))
        for k in ("w1", "w2"):
            step = float(np.ravel(got[k][1])[0])
            assert peers.is_pow2(step)
            inside = np.abs(w[k][0]) <= 127 * step
            assert np.all(np.abs(got[k][0] - w[k][0])[inside] <= step / 2 + 1e-9)
