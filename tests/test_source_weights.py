"""The source model's weights are dropped once the graph is built, when read from a file
(peak memory); a session on the source reads them from the file again."""

import os

import numpy as np
import onnx
import pytest

import mxqn_onnx
from mxqn_onnx.calibration import calibrate
from mxqn_onnx.graph.loading import SOURCE_FILE, with_weights_left_in_file

from graph_helpers import small_cnn


def _big_cnn(tmp_path):
    """small_cnn with weights large enough to be stubs, saved to a file."""
    m = small_cnn()
    rng = np.random.default_rng(3)
    for i, t in enumerate(m.graph.initializer):
        if t.name == "w2":  # 8x8x3x3 -> 64x8x3x3 in, so the conv and Gemm grow with it
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(
                (rng.standard_normal((64, 8, 3, 3)) * 0.1).astype(np.float32), "w2"))
        elif t.name == "b2":
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(np.zeros(64, np.float32), "b2"))
        elif t.name == "w3":
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(
                (rng.standard_normal((5, 64)) * 0.3).astype(np.float32), "w3"))
    onnx.checker.check_model(m, full_check=True)
    path = tmp_path / "big.onnx"
    onnx.save(m, str(path))
    return path


def test_a_session_on_the_stubbed_source_reads_the_file_again(tmp_path):
    path = _big_cnn(tmp_path)
    full = onnx.load(str(path))
    light = with_weights_left_in_file(full, path)
    stubs = [t.name for t in light.graph.initializer
             if any(e.key == "location" and e.value == SOURCE_FILE for e in t.external_data)]
    assert stubs == ["w2"] and light.ByteSize() < full.ByteSize() // 2
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    want = calibrate.make_session(full).run(None, {"x": x})[0]
    np.testing.assert_array_equal(calibrate.make_session(light).run(None, {"x": x})[0], want)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten since
    with pytest.raises(mxqn_onnx.MxqnError, match="changed during the conversion"):
        calibrate.make_session(light)


def test_converting_a_file_equals_converting_its_proto_which_stays_untouched(tmp_path, monkeypatch):
    path = _big_cnn(tmp_path)
    proto = onnx.load(str(path))
    before = proto.SerializeToString()
    reread = []
    real = calibrate.weights_left_in_file

    def spy(model):
        out = real(model)
        reread.append(sorted(out))
        return out

    monkeypatch.setattr(calibrate, "weights_left_in_file", spy)
    x = np.abs(np.random.default_rng(1).standard_normal((32, 3, 8, 8))).astype(np.float32)
    # verify_count 2 < 8 held-back samples: the check runs the FP32 source itself
    a = mxqn_onnx.quantize(str(path), {"x": x}, verify_count=2)
    assert a.holdout is not None and ["w2"] in reread  # the source's session read the file
    b = mxqn_onnx.quantize(proto, {"x": x}, verify_count=2)
    assert proto.SerializeToString() == before
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.size_before == b.size_before == len(before)
