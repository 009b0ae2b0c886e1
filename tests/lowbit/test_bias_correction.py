"""Bias correction removes the mean output shift that weight quantization causes."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import mxqn_onnx


def _conv_gemm_model(rng, with_bias: bool) -> onnx.ModelProto:
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    g = rng.standard_normal((10, 8 * 6 * 6)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(g, "g")]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"))
        conv_inputs.append("b")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[0, 0, 0, 0]),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "g"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _mean_error(fp32, quant, x):
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return np.abs((run(quant) - run(fp32)).mean(axis=0))


def test_bias_correction_cancels_mean_shift():
    rng = np.random.default_rng(0)
    for with_bias in (True, False):
        model = _conv_gemm_model(rng, with_bias)
        # inputs with a large common mean: the weight error's mean shift dominates
        x = (rng.standard_normal((256, 3, 8, 8)) * 0.3 + 2.0).astype(np.float32)
        kw = dict(wbits=3, abits=16, act_quant="fixed", weight_granularity="tensor", verify=False)
        plain = mxqn_onnx.quantize(model, x, bias_correction=False, **kw)
        fixed = mxqn_onnx.quantize(model, x, bias_correction=True, **kw)
        assert all(d.bias_correction for d in fixed.layers)
        assert not any(d.bias_correction for d in plain.layers)
        before = _mean_error(model, plain.model, x).mean()
        after = _mean_error(model, fixed.model, x).mean()
        assert after < before / 3, (with_bias, before, after)
        onnx.checker.check_model(fixed.model, full_check=True)


def test_bias_correction_helps_the_shipped_model(digits_model, digits_calib):
    # the technique itself, on all samples (the held-back check would pick between the two)
    on = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=4, holdout=False)
    off = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=4, bias_correction=False, holdout=False)
    assert on.measured_sqnr_db > off.measured_sqnr_db
