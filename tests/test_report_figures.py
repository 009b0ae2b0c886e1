"""Every measured figure of a conversion's report is true: checked against an independent run
of the FP32 and the quantized model, one sample at a time, on the very samples the report names
(the first N calibration samples), across batch sizes, sample counts, the held-back check on
and off, ``verify_count``, and single- and multi-output models.
"""

import json

import numpy as np
import onnx
import pytest

import mxqn_onnx
from mxqn_onnx.report import measure
from mxqn_onnx.report.tables import measured_lines

from conftest import MODELS, run_cli
from graph_helpers import check_measured as _check
from graph_helpers import independent_figures


def _two_output_model() -> onnx.ModelProto:
    """The shipped digits CNN with its second conv's feature map as a second output."""
    m = onnx.load(str(MODELS / "digits_cnn.onnx"))
    conv = [n for n in m.graph.node if n.op_type == "Conv"][1]
    shapes = onnx.shape_inference.infer_shapes(m).graph.value_info
    m.graph.output.append(next(v for v in shapes if v.name == conv.output[0]))
    return m


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.load(MODELS / "digits_calib.npz")["input"]


# (samples, batch size, extra settings): sample counts below, at and above what the held-back
# check needs (it holds back a quarter, 2 to 8, of at least 8), batch sizes that do and do not
# divide the held-back count or the sample count, and batches larger than the sample count
CASES = [
    (37, 5, {}), (37, 1, {}), (37, 8, {}), (37, 16, {}), (37, 64, {}),
    (13, 5, {}), (8, 3, {}), (7, 2, {}), (64, 5, {"verify_count": 5}), (64, 7, {"verify_count": 20}),
    (37, 5, {"holdout": False}), (256, 5, {}),
]


@pytest.mark.parametrize("count,batch,extra", CASES)
def test_measured_figures_are_true_on_a_single_output_model(count, batch, extra, calib):
    fp32 = onnx.load(str(MODELS / "digits_cnn.onnx"))
    r = mxqn_onnx.quantize(fp32, {"input": calib[:count]}, batch_size=batch, rounding="nearest", **extra)
    measured = r.report()["measured"]
    if count >= 8 and extra.get("holdout", True):
        # the check ran (verification resumed from it), and the figure it printed for the
        # candidate it kept is that model's on the held-back samples
        held = r.holdout["held_back_samples"]
        assert held > 0
        truth = independent_figures(fp32, r.model, calib[:held])["combined"]
        assert r.holdout["sqnr_db"][r.holdout["kept"]] == pytest.approx(truth, abs=0.1)
    _check(measured, fp32, r.model, calib)
    assert measured["class_outputs"] == [fp32.graph.output[0].name]  # (N, 10) logits


@pytest.mark.parametrize("batch", [1, 5, 16, 64])
def test_measured_figures_are_true_on_a_multi_output_model(batch, calib):
    fp32 = _two_output_model()
    r = mxqn_onnx.quantize(fp32, {"input": calib[:37]}, batch_size=batch, rounding="nearest")
    measured = r.report()["measured"]
    _check(measured, fp32, r.model, calib)
    logits, feature = [o.name for o in fp32.graph.output]
    # the feature map is no class score: SQNR only; the logits get their agreement
    assert measured["class_outputs"] == [logits]
    assert measured["outputs"] == 2
    lines = measured_lines(measured)
    assert "2 outputs combined" in lines[0]
    assert any(feature in line and "agreement" not in line for line in lines[1:])
    assert any(logits in line and "agreement" in line for line in lines[1:])


def test_class_output_named_by_the_user(calib):
    fp32 = _two_output_model()
    feature = fp32.graph.output[1].name
    r = mxqn_onnx.quantize(fp32, {"input": calib[:37]}, batch_size=5, rounding="nearest",
                           class_outputs=[feature])
    assert r.report()["measured"]["class_outputs"] == [feature]
    with pytest.raises(mxqn_onnx.MxqnError, match="not an output of the model"):
        mxqn_onnx.quantize(fp32, {"input": calib[:37]}, class_outputs=["nope"])


def test_class_scores_rule():
    assert measure.is_class_scores(["N", 10]) and measure.is_class_scores([1, 4, 1, 1])
    assert not measure.is_class_scores([1, 7600, 10])  # a detector's per-anchor scores or boxes
    assert not measure.is_class_scores(["N", 16, 14, 14])  # a feature map
    assert not measure.is_class_scores(["N", 1])  # one score: nothing to take the argmax of


def test_cli_figures_are_true_and_the_table_keeps_every_column(tmp_path, calib):
    """Through the CLI as a user runs it, stdout redirected: the printed SQNR and the JSON
    report are those of an independent run, and the table keeps all its columns."""
    fp32_path = MODELS / "digits_cnn.onnx"
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    np.savez(tmp_path / "c.npz", input=calib[:40])
    p = run_cli("convert", fp32_path, out, "--calib", tmp_path / "c.npz", "--batch-size", "5",
                "--rounding", "nearest", "--report", rep)
    assert p.returncode == 0, p.stderr
    measured = json.loads(rep.read_text())["measured"]
    _check(measured, onnx.load(str(fp32_path)), onnx.load(str(out)), calib)
    header = next(line for line in p.stdout.splitlines() if "layer" in line and "op" in line)
    for col in ("W dB", "activation", "fxp dB", "log dB", "bias f"):
        assert col in header
    line = next(line for line in p.stdout.splitlines() if line.startswith("measured output SQNR"))
    assert f"{measured['output_sqnr_db']:.1f} dB on {measured['samples']}" in line


def test_evaluate_reports_each_output(tmp_path, calib):
    fp32 = _two_output_model()
    r = mxqn_onnx.quantize(fp32, {"input": calib[:37]}, rounding="nearest")
    onnx.save(fp32, tmp_path / "f.onnx")
    r.save(tmp_path / "q.onnx")
    np.savez(tmp_path / "d.npz", input=calib[:30])
    p = run_cli("evaluate", tmp_path / "f.onnx", tmp_path / "q.onnx", "--data", tmp_path / "d.npz",
                "--batch-size", "7", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["samples"] == 30
    _check(d, fp32, r.model, calib)
    p = run_cli("evaluate", tmp_path / "f.onnx", tmp_path / "q.onnx", "--data", tmp_path / "d.npz")
    assert p.returncode == 0 and "2 outputs combined" in p.stdout
    assert sum("  output " in line for line in p.stdout.splitlines()) == 2


def test_an_output_without_a_shape_gets_one(calib):
    """An output appended by hand without a shape (onnxruntime runs it, onnx's checker does
    not accept it): the conversion takes the inferred shape and measures that output too; the
    caller's model is not changed."""
    fp32 = onnx.load(str(MODELS / "digits_cnn.onnx"))
    conv = [n for n in fp32.graph.node if n.op_type == "Conv"][1]
    fp32.graph.output.append(onnx.helper.make_tensor_value_info(conv.output[0], onnx.TensorProto.FLOAT, None))
    before = fp32.SerializeToString()
    r = mxqn_onnx.quantize(fp32, {"input": calib[:16]}, rounding="nearest")
    assert fp32.SerializeToString() == before
    onnx.checker.check_model(r.model, full_check=True)
    assert [d.dim_value for d in r.model.graph.output[1].type.tensor_type.shape.dim][1:] == [16, 28, 28]
    assert conv.output[0] in r.report()["measured"]["per_output_sqnr_db"]
