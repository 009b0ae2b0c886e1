"""The default QDQ file in OpenVINO: it loads, its convolutions run int8, and it computes what
onnxruntime computes from the same file (docs/OPENVINO.md)."""

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov  # the test extra installs it
import pytest

import mxqn_onnx
from mxqn_onnx.quant import quantizers as Q

LAYERS = ("Convolution", "FullyConnected", "MatMul")


def _openvino(model: onnx.ModelProto):
    core = ov.Core()
    return core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                              {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})


def _precisions(compiled) -> list:
    """Runtime precision of each Conv / Gemm / MatMul in OpenVINO's executed graph."""
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in LAYERS:
            out.append(info["runtimePrecision"].astype(str))
    return out


def _ov_run(compiled, x: np.ndarray) -> np.ndarray:
    req = compiled.create_infer_request()
    return np.concatenate([req.infer({0: x[i:i + 1]})[0] for i in range(len(x))])


def _ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def data(digits_model, digits_test):
    x = np.load(digits_test)["input"][:64]
    return x, _ort_run(onnx.load(str(digits_model)), x)


def test_default_qdq_file_runs_int8_in_openvino_as_in_onnxruntime(digits_model, digits_calib, data):
    x, fp32 = data
    r = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", verify=False)
    compiled = _openvino(r.model)  # loads: no custom domain
    prec = _precisions(compiled)
    assert len(prec) == len(r.layers) and set(prec) <= {"u8", "i8"}, prec  # every layer in int8
    got, ref = _ov_run(compiled, x), _ort_run(r.model, x)
    ort_db, ov_db = Q.sqnr_of(fp32, ref), Q.sqnr_of(fp32, got)
    assert ort_db > 30.0 and abs(ov_db - ort_db) <= 1.0, (ort_db, ov_db)
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.98


def test_log_activations_load_in_openvino_as_standard_ops(digits_model, digits_calib, data):
    x, fp32 = data
    r = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", act_quant="auto", verify=False)
    assert any(a.kind == "log" for a in r.activations.values())
    got, ref = _ov_run(_openvino(r.model), x), _ort_run(r.model, x)
    assert abs(Q.sqnr_of(fp32, got) - Q.sqnr_of(fp32, ref)) <= 1.0


def test_openvino_runs_zero_point_128_weights_in_float(digits_model, digits_calib, data):
    """The uint8 encoding keeps full 8-bit codes (uint8, zero point 128): OpenVINO runs those
    layers in float, not int8; the default's 7-bit hold is what makes them int8."""
    r = mxqn_onnx.quantize(digits_model, digits_calib, format="qdq", qdq_encoding="uint8", verify=False)
    prec = _precisions(_openvino(r.model))
    assert sum(p in ("u8", "i8") for p in prec) < len(prec)
