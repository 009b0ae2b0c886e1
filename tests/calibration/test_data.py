"""Calibration inputs: files, folders, Python objects, and clear errors when they do not fit."""

import numpy as np
import onnx
import pytest

import mxqn_onnx
from mxqn_onnx import MxqnError
from mxqn_onnx.calibration.data import input_specs
from mxqn_onnx.calibration.observers import TensorHistogram


@pytest.fixture(scope="module")
def calib(digits_calib):
    return np.load(digits_calib)["input"]


@pytest.fixture(scope="module")
def specs(digits_model):
    return input_specs(onnx.load(str(digits_model)))


def _hist_counts(result):
    return [(a.kind, a.frac, a.k, a.E) for a in result.activations.values()]


def test_all_forms_give_the_same_decisions(tmp_path, digits_model, calib):
    """npz, npy, array, dict, list of batches and a CalibrationDataReader agree."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.it, None)

    np.save(tmp_path / "c.npy", calib)
    np.savez(tmp_path / "c.npz", input=calib)
    forms = [str(tmp_path / "c.npy"), tmp_path / "c.npz", calib, {"input": calib},
             [calib[i:i + 50] for i in range(0, len(calib), 50)], Reader(),
             (c for c in calib)]
    results = [mxqn_onnx.quantize(digits_model, f, verify=True, verify_count=64) for f in forms]
    ref = _hist_counts(results[0])
    for r in results[1:]:
        assert _hist_counts(r) == ref
        assert r.calibration_samples == len(calib)
        assert r.comparison.samples >= 64 or r.comparison.stopped_early


def test_calib_count_and_batch_size(digits_model, digits_calib):
    r = mxqn_onnx.quantize(digits_model, digits_calib, calib_count=40, batch_size=7, verify=False)
    assert r.calibration_samples == 40


def test_image_folder(tmp_path, digits_model):
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(20):
        Image.fromarray((d.images[i] * 16).astype(np.uint8)).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    r = mxqn_onnx.quantize(digits_model, tmp_path, preprocess="unit", verify=False)
    assert r.calibration_samples == 20
    acts = list(r.activations.values())
    assert 0.0 <= acts[0].min and acts[0].max <= 1.0  # first layer sees [0, 1] pixels


def test_unreadable_image_and_empty_folder(tmp_path, digits_model):
    with pytest.raises(MxqnError, match="no images"):
        mxqn_onnx.quantize(digits_model, tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(MxqnError, match="broken.png: cannot read this image"):
        mxqn_onnx.quantize(digits_model, tmp_path)


def test_mismatched_data_is_named(tmp_path, digits_model, calib):
    with pytest.raises(MxqnError, match=r"input 'input' has shape \[4, 1, 8, 8\].*float32\[\?,1,28,28\]"):
        mxqn_onnx.quantize(digits_model, np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(MxqnError, match="unknown name"):
        mxqn_onnx.quantize(digits_model, {"image": calib})
    with pytest.raises(MxqnError, match="dtype int64"):
        mxqn_onnx.quantize(digits_model, calib.astype(np.int64))
    with pytest.raises(MxqnError, match="no calibration data"):
        mxqn_onnx.quantize(digits_model, None)


def test_random_needs_to_be_asked_for(digits_model):
    r = mxqn_onnx.quantize(digits_model, "random", calib_count=8, verify=False)
    assert r.calibration_samples == 8


def test_histograms_merge_like_concatenation():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(1000).astype(np.float32), rng.laplace(size=500).astype(np.float32)
    h1, h2, h = TensorHistogram("a"), TensorHistogram("b"), TensorHistogram("ab")
    h1.update(a)
    h2.update(b)
    h.update(np.concatenate([a, b]))
    m = h1.merge(h2)
    np.testing.assert_array_equal(m.counts, h.counts)
    assert (m.min, m.max) == (h.min, h.max)
    assert m.total == 1500
    bins = h.bins()
    assert bins.count.sum() == 1500 and np.all(bins.lo <= bins.hi)


def test_nan_is_reported_with_tensor_name():
    h = TensorHistogram("conv3_out")
    with pytest.raises(ValueError, match="conv3_out.*NaN or Inf"):
        h.update(np.float32([1.0, np.nan]))
