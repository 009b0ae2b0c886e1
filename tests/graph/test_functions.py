"""The ONNX function bodies of FixedQuant/LogQuant compute exactly what the numpy module does."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from mxqn_onnx.graph import functions as F
from mxqn_onnx.quant import quantizers as Q

BITS = [2, 3, 4, 5, 6, 7, 8, 16]


def _session(op, attrs, opset):
    node = helper.make_node(op, ["x"], ["y"], domain=F.DOMAIN, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [None])],
                          [helper.make_tensor_value_info("y", 1, [None])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(F.DOMAIN, 1)],
                          functions=F.all_functions(opset), ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def x():
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(20_000) * rng.lognormal(0, 2, 20_000)).astype(np.float32)
    special = np.float32([0, -0.0, 1, -1, 0.5, 2 ** -10, 2.5, -2.5, 3.5, 1e-30, 1e6, -1e6])
    return np.concatenate([v, special])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [0, 1])
def test_fixed_quant_body_matches_numpy(x, bits, signed):
    for frac in (-4, 0, 3, 9):
        y = _session(F.FIXED_OP, dict(bits=bits, frac=frac, signed=signed), 13).run(None, {"x": x})[0]
        np.testing.assert_array_equal(y, Q.fxp_quantize(x, bits, frac, bool(signed)))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [0, 1])
def test_log_quant_body_matches_numpy(x, bits, signed):
    for k in range(Q.log_max_k(bits) + 1):
        for E in (-5, 0, 3 * 2 ** k):
            y = _session(F.LOG_OP, dict(bits=bits, k=k, E=E, signed=signed), 13).run(None, {"x": x})[0]
            np.testing.assert_array_equal(y, Q.log_quantize(x, bits, k, E, bool(signed)),
                                          err_msg=f"bits={bits} k={k} E={E} signed={signed}")


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_bodies_run_at_other_opsets(x, opset):
    y = _session(F.LOG_OP, dict(bits=4, k=1, E=2, signed=1), opset).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, Q.log_quantize(x, 4, 1, 2, True))
    y = _session(F.FIXED_OP, dict(bits=8, frac=4, signed=0), opset).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, Q.fxp_quantize(x, 8, 4, False))


@pytest.mark.parametrize("bits,k,E,signed", [(4, 0, 2, 1), (5, 1, -3, 0), (8, 2, 4, 0), (8, 5, 10, 1),
                                             (7, 0, -5, 0), (6, 3, 0, 1)])
def test_log_quant_body_at_levels_and_thresholds(bits, k, E, signed):
    """Inputs on every level and every decision threshold, and one float32 step either side."""
    m = Q.log_num_levels(bits, bool(signed))
    levels = Q.pow2((E - np.arange(m)) / 2.0 ** k)[::-1]  # ascending
    v = np.concatenate([[0.0], levels]).astype(np.float32)
    thr = ((v[:-1] + v[1:]) * np.float32(0.5)).astype(np.float32)
    pts = np.concatenate([v, thr])
    pts = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(0))])
    x = np.concatenate([pts, -pts]).astype(np.float32)
    y = _session(F.LOG_OP, dict(bits=bits, k=k, E=E, signed=signed), 13).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, Q.log_quantize(x, bits, k, E, bool(signed)))
    # ties at a threshold go to the upper level, as the format defines
    up = Q.log_quantize(thr[1:], bits, k, E, bool(signed))
    np.testing.assert_array_equal(up, v[2:])


def _session_nd(op, attrs, rank):
    node = helper.make_node(op, ["x"], ["y"], domain=F.DOMAIN, **attrs)
    dims = [None] * rank
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, dims)],
                          [helper.make_tensor_value_info("y", 1, dims)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(F.DOMAIN, 1)],
                          functions=F.all_functions(13), ir_version=8)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shape", [(2, 2, 1667, 3), (20004,), (1, 4, 5001)])
def test_log_quant_body_keeps_shape(x, shape):
    """The body flattens to index its tables; every element must come back where it was."""
    xs = x[:20004].reshape(shape)
    y = _session_nd(F.LOG_OP, dict(bits=6, k=2, E=8, signed=1), len(shape)).run(None, {"x": xs})[0]
    assert y.shape == xs.shape
    np.testing.assert_array_equal(y, Q.log_quantize(xs, 6, 2, 8, True))


@pytest.mark.parametrize("signed", [0, 1])
def test_log_quant_body_with_subnormal_levels(signed):
    """Levels down in float32's subnormal range (a layer with tiny activations)."""
    E = -135 * 4
    m = Q.log_num_levels(8, bool(signed))
    levels = Q.pow2((E - np.arange(m)) / 4.0)
    assert levels.min() < np.finfo(np.float32).tiny
    x = np.concatenate([levels, -levels, levels * np.float32(1.1), np.float32([0.0, 1.0, -1e-45])])
    y = _session(F.LOG_OP, dict(bits=8, k=2, E=E, signed=signed), 13).run(None, {"x": x.astype(np.float32)})[0]
    np.testing.assert_array_equal(y, Q.log_quantize(x, 8, 2, E, bool(signed)))
