"""Properties of the converter as a whole: determinism and the already-quantized guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import mxqn_onnx
from graph_helpers import NETS, ROOT_DIR, cnn_inputs, digits, small_cnn
from mxqn_onnx import MxqnError


def _cli(*args: str, hash_seed: str) -> subprocess.CompletedProcess:
    """``mxqn-onnx`` in a fresh process; a different hash seed shuffles any set/dict-order bug."""
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    return subprocess.run([sys.executable, "-m", "mxqn_onnx.cli", *args], capture_output=True, text=True,
                          cwd=ROOT_DIR, env=env)


@pytest.mark.parametrize("fmt", ["mxqn", "qdq"])
def test_same_command_twice_gives_identical_bytes(tmp_path, fmt):
    model = NETS / "hybrid_torchscript_op17.onnx"  # conv, attention, log and fixed quantizers
    np.save(tmp_path / "calib.npy", digits(2)[:48])
    outs = []
    for run, seed in enumerate(("1", "2")):
        out, rep = tmp_path / f"q{run}.onnx", tmp_path / f"r{run}.json"
        proc = _cli("convert", str(model), str(out), "--calib", str(tmp_path / "calib.npy"), "--quiet",
                    "--format", fmt, "--act-quant", "auto", "--report", str(rep), hash_seed=seed)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(rep.read_text())
        report.pop("timing_s", None)  # wall-clock times are the one thing allowed to differ
        outs.append((out.read_bytes(), report))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1] == outs[1][1]
    kinds = {a["kind"] for a in outs[0][1]["activations"]}
    assert kinds == {"fixed", "log"}  # both quantizer kinds were exercised


def test_api_is_deterministic_in_process():
    a = mxqn_onnx.quantize(small_cnn(), cnn_inputs(), verify=False)
    b = mxqn_onnx.quantize(small_cnn(), cnn_inputs(), verify=False)
    assert a.model.SerializeToString() == b.model.SerializeToString()


@pytest.mark.parametrize("fmt", ["mxqn", "qdq"])
def test_converting_a_converted_model_is_refused(fmt):
    q = mxqn_onnx.quantize(small_cnn(), cnn_inputs(), verify=False, format=fmt).model
    with pytest.raises(MxqnError, match="already quantized by mxqn-onnx; convert the FP32 model"):
        mxqn_onnx.quantize(q, cnn_inputs())


def test_refused_even_without_metadata():
    """Tools that rewrite models often drop metadata; the quantizer nodes still give it away."""
    q = mxqn_onnx.quantize(small_cnn(), cnn_inputs(), verify=False).model
    del q.metadata_props[:]
    with pytest.raises(MxqnError, match="already quantized by mxqn-onnx .*ai.mxqn quantizer nodes"):
        mxqn_onnx.quantize(q, cnn_inputs())


def test_other_quantizers_output_is_refused():
    """A QDQ model from any tool (here: onnxruntime's quantize_static) is not an FP32 model."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": cnn_inputs(4)}])

        def get_next(self):
            return next(self.items, None)

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, dst = f"{d}/m.onnx", f"{d}/q.onnx"
        onnx.save(small_cnn(), src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ)
        model = onnx.load(dst)
    with pytest.raises(MxqnError, match=r"already quantized \(it has (Quantize|Dequantize)Linear nodes\)"):
        mxqn_onnx.quantize(model, cnn_inputs())
