"""Verification: FP32 outputs from the calibration run, only as many samples as needed."""

import math

import numpy as np
import pytest

import mxqn_onnx
from mxqn_onnx import api
from mxqn_onnx.calibration.data import input_specs, make_source
from mxqn_onnx.calibration.observers import ReferenceOutputs
from mxqn_onnx.graph.loading import load_model
from mxqn_onnx.report import measure


def test_reference_outputs_keep_the_first_samples_within_budget():
    ref = ReferenceOutputs(["y"], limit=5)
    ref.add([np.arange(12, dtype=np.float32).reshape(3, 4)], 3)
    ref.add([np.arange(12, 24, dtype=np.float32).reshape(3, 4)], 3)
    assert ref.count == 5 and not ref.wants()
    np.testing.assert_array_equal(ref.get(2, 3)[0], np.arange(8, 20, dtype=np.float32).reshape(3, 4))
    assert ref.get(4, 2) is None  # the sixth sample was not kept
    small = ReferenceOutputs(["y"], limit=10, budget=100)
    small.add([np.zeros((2, 10), np.float32)], 2)  # 80 bytes
    small.add([np.zeros((2, 10), np.float32)], 2)  # would pass 100 bytes: stops keeping
    assert small.count == 2 and not small.wants()
    no_batch = ReferenceOutputs(["y", "z"], limit=4)
    no_batch.add([np.zeros((2, 3), np.float32), np.zeros(7, np.float32)], 2)
    assert no_batch.count == 0 and not no_batch.wants()


def test_interval_shrinks_with_agreeing_samples():
    c = measure.Comparison()
    c.unit_signal, c.unit_noise = [1.0], [0.01]
    assert c.sqnr_interval_db() == (-math.inf, math.inf)
    c.unit_signal, c.unit_noise = [1.0] * 4, [0.01] * 4  # every sample at exactly 20 dB
    lo, hi = c.sqnr_interval_db()
    assert lo == pytest.approx(20.0) and hi == pytest.approx(20.0)
    rng = np.random.default_rng(0)
    c.unit_signal = list(rng.uniform(1, 2, 40))
    c.unit_noise = list(np.array(c.unit_signal) * rng.uniform(0.005, 0.02, 40))
    c.signal, c.noise = {"y": sum(c.unit_signal)}, {"y": sum(c.unit_noise)}
    lo, hi = c.sqnr_interval_db()
    assert lo < c.output_sqnr_db < hi and hi - lo < 2.0


def test_verification_runs_only_the_quantized_model(digits_model, digits_calib, monkeypatch):
    loaded = []
    real = measure.make_session

    def counting(model, *a, **kw):
        loaded.append(model.producer_name)
        return real(model, *a, **kw)

    monkeypatch.setattr(measure, "make_session", counting)
    monkeypatch.setattr(api, "make_session", counting)
    for kw in (dict(rounding="nearest"), dict(rounding="nearest", holdout=False)):
        loaded.clear()
        r = mxqn_onnx.quantize(digits_model, digits_calib, **kw)
        # the FP32 outputs came with calibration: only quantized models are loaded, one per
        # candidate of the held-back check; verification goes on with the kept one's session
        # when it is the last made (the default, checked last), else makes its own
        checked = len(r.holdout["sqnr_db"]) if r.holdout and "note" not in r.holdout else 0
        reused = checked and r.holdout["kept"] == "default"
        assert loaded == ["mxqn-onnx"] * (checked + (0 if reused else 1))
        assert r.comparison.samples >= measure.MIN_VERIFY_SAMPLES


def test_verification_stops_when_the_sqnr_is_known(digits_model, digits_calib):
    kw = dict(rounding="nearest", verify_count=256)
    r = mxqn_onnx.quantize(digits_model, digits_calib, **kw)
    c = r.comparison
    assert c.stopped_early and c.samples < 256
    lo, hi = c.sqnr_interval_db()
    tol = measure.VERIFY_TOLERANCE_DB
    assert hi - c.output_sqnr_db <= tol and c.output_sqnr_db - lo <= tol
    # every sample, FP32 run again: the full measurement lies inside the early one's interval
    fp32 = load_model(digits_model)
    full = measure.compare(fp32, r.model, make_source(str(digits_calib), input_specs(fp32), 16).batches(256))
    assert full.samples == 256 and not full.stopped_early
    assert lo <= full.output_sqnr_db <= hi
    assert r.report()["measured"]["output_sqnr_db_95"] == [round(lo, 4), round(hi, 4)]


def test_verification_goes_on_from_the_held_back_samples(digits_model, digits_calib):
    """The held-back check measured the written model on the first samples; verification
    continues from there, and the total equals a fresh run over as many samples."""
    r = mxqn_onnx.quantize(digits_model, digits_calib, rounding="nearest")
    n = r.comparison.samples
    assert r.holdout and n > r.holdout["held_back_samples"]
    fp32 = load_model(digits_model)
    fresh = measure.compare(fp32, r.model, make_source(str(digits_calib), input_specs(fp32), 16).batches(n))
    assert fresh.samples == n
    # (the FP32 outputs of calibration come from other batch sizes: equal to float rounding)
    assert fresh.output_sqnr_db == pytest.approx(r.comparison.output_sqnr_db, rel=1e-6)
