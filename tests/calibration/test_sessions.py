"""Sessions get the large weights as arrays, not inside the serialised model (peak memory)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import mxqn_onnx
from mxqn_onnx.calibration.calibrate import _split_weights, make_session
from mxqn_onnx.graph.loading import STUB_MIN_BYTES, export_fp32, export_fp32_stubbed, normalise


def _plain(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    d = np.load(str(mxqn_onnx.__path__[0]) + "/../models/digits_test.npz")
    return np.asarray(d[d.files[0]][:16], np.float32)


def _run(s: ort.InferenceSession, x: np.ndarray, names=None) -> list:
    return s.run(names, {s.get_inputs()[0].name: x})


@pytest.mark.parametrize("opset", [13, 21])
def test_session_from_arrays_equals_the_serialised_model(digits_model, digits_calib, x, opset):
    fp32 = onnx.load(str(digits_model))
    q = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, opset=opset, verify=False).model
    for model in (fp32, q):
        before = model.SerializeToString()
        light, names, arrays = _split_weights(model, ())
        big = [t for t in model.graph.initializer if t.ByteSize() >= STUB_MIN_BYTES]
        assert big and light.ByteSize() <= model.ByteSize() - 0.9 * sum(a.nbytes for a in arrays)
        # packed 4-bit weights (opset 21) have no one-to-one numpy type: they stay inline
        packed = [t.name for t in big if t.data_type == onnx.TensorProto.INT4]
        assert bool(packed) == (model is q and opset == 21)
        assert set(names) == {t.name for t in big} - set(packed)
        np.testing.assert_array_equal(_run(make_session(model), x)[0], _run(_plain(model), x)[0])
        assert model.SerializeToString() == before  # the caller's model is untouched


def test_extra_outputs_come_back(digits_model, x):
    fp32 = onnx.load(str(digits_model))
    inner = fp32.graph.node[0].output[0]
    s = make_session(fp32, [inner])
    assert [o.name for o in s.get_outputs()][-1] == inner
    assert len(fp32.graph.output) == 1


def test_stubbed_export_hands_over_the_graphs_own_arrays(digits_model, x):
    source = onnx.load(str(digits_model))
    graph = normalise(source)
    light, weights = export_fp32_stubbed(graph, source)
    constants = {n: t for n, t in graph.tensors().items() if n in weights}
    assert weights and all(weights[n] is constants[n].values for n in weights)  # not copies
    assert all(isinstance(t.values, np.ndarray) for t in constants.values())  # restored after export
    stubs = [t for t in light.graph.initializer if t.name in weights]
    assert len(stubs) == len(weights) and not any(t.raw_data for t in stubs)
    full = export_fp32(graph, source)
    assert light.ByteSize() < full.ByteSize() / 4
    np.testing.assert_array_equal(_run(make_session(light, weights=weights), x)[0], _run(_plain(full), x)[0])


def test_calibration_session_does_not_spin_beside_its_histogram_worker(digits_model, digits_calib, x, monkeypatch):
    """The calibration session's idle threads sleep (the histogram worker needs the cores);
    other sessions keep onnxruntime's spinning default; the outputs are the same either way."""
    import mxqn_onnx.calibration.calibrate as cal

    key = "session.intra_op.allow_spinning"
    fp32 = onnx.load(str(digits_model))
    quiet, default = make_session(fp32, spinning=False), make_session(fp32)
    assert quiet.get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default, spinning
        default.get_session_options().get_session_config_entry(key)
    assert all(np.array_equal(a, b) for a, b in zip(_run(quiet, x), _run(default, x)))
    seen = []
    real = cal.make_session
    monkeypatch.setattr(cal, "make_session", lambda *a, **k: seen.append(k.get("spinning", True)) or real(*a, **k))
    mxqn_onnx.quantize(digits_model, digits_calib, verify=False)
    assert seen == [False]
