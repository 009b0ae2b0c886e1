"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written, input untouched.

Each case runs ``mxqn-onnx convert`` in-process (``cli.main``) with the output going to an
empty folder, then checks the folder is still empty (no model, no temporary file) and the
input files did not change. A few cases also run as a real subprocess.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from conftest import run_cli
from graph_helpers import cnn_inputs, small_cnn
from mxqn_onnx import writing
from mxqn_onnx.cli import main


@pytest.fixture
def work(tmp_path):
    """A folder with a good model and calibration data, and an empty output folder."""
    onnx.save(small_cnn(), str(tmp_path / "model.onnx"))
    np.save(tmp_path / "calib.npy", cnn_inputs(16))
    (tmp_path / "out").mkdir()
    return tmp_path


def _snapshot(folder: Path) -> Dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if "out" not in p.relative_to(folder).parts}


def _fails_cleanly(work: Path, capsys, args: List[str], expect: List[str]) -> str:
    """Run the CLI, check the failure contract, return the message."""
    before = _snapshot(work)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors exit from parse_args
        code = exc.code
    captured = capsys.readouterr()
    lines = [l for l in captured.err.splitlines() if l.strip()]
    assert code == 2, captured.err
    # argparse's usage errors say "mxqn-onnx convert: error:", ours "mxqn-onnx: error:"
    assert len(lines) == 1 and re.match(r"mxqn-onnx( convert)?: error: ", lines[0]), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "wrote" not in captured.out
    assert list((work / "out").iterdir()) == []  # nothing written, no temporary file left
    assert _snapshot(work) == before  # inputs untouched
    for word in expect:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _convert(work: Path, model="model.onnx", out="out/q.onnx", calib="calib.npy", *extra: str) -> List[str]:
    return ["convert", str(work / model), str(work / out), "--calib", str(work / calib), "--quiet", *extra]


# --------------------------------------------------------------------------- the model file


def test_input_missing(work, capsys):
    _fails_cleanly(work, capsys, _convert(work, model="nope.onnx"), ["nope.onnx", "no such file"])


def test_input_is_a_folder(work, capsys):
    (work / "folder.onnx").mkdir()
    _fails_cleanly(work, capsys, _convert(work, model="folder.onnx"), ["folder.onnx", "no such file"])


def test_input_not_onnx(work, capsys):
    (work / "notes.onnx").write_text("these are my notes, not a model\n" * 20)
    _fails_cleanly(work, capsys, _convert(work, model="notes.onnx"), ["notes.onnx"])


# onnx.load picks a JSON or text parser by these extensions; models are read as binary whatever the name
TEXT_EXTENSIONS = [".json", ".txt", ".onnxjson", ".textproto", ".pbtxt", ".prototxt", ".txtpb", ".onnxtxt",
                   ".onnxtext"]


@pytest.mark.parametrize("ext", TEXT_EXTENSIONS)
def test_input_text_file_with_a_text_extension(work, capsys, ext):
    (work / f"notes{ext}").write_text('{"graph": {"node": []}, "notes": "not a model"}\n')
    _fails_cleanly(work, capsys, _convert(work, model=f"notes{ext}"), [f"notes{ext}", "not a readable ONNX model"])


@pytest.mark.parametrize("fmt, ext", [("json", ".json"), ("textproto", ".textproto"), ("onnxtxt", ".onnxtxt")])
def test_input_json_or_text_model(work, capsys, fmt, ext):
    """A model saved in one of onnx's text formats: refused in one line, like any non-binary file."""
    onnx.save(small_cnn(), str(work / f"text_model{ext}"), format=fmt)
    _fails_cleanly(work, capsys, _convert(work, model=f"text_model{ext}"),
                   [f"text_model{ext}", "not a readable ONNX model", "binary"])


@pytest.mark.parametrize("ext", [".json", ".txt", ".onnxtxt"])
def test_binary_model_with_a_text_extension_converts(work, capsys, ext):
    (work / f"model{ext}").write_bytes((work / "model.onnx").read_bytes())
    assert main(_convert(work, model=f"model{ext}")) == 0, capsys.readouterr().err


def test_input_truncated(work, capsys):
    data = (work / "model.onnx").read_bytes()
    (work / "cut.onnx").write_bytes(data[: len(data) // 2])
    _fails_cleanly(work, capsys, _convert(work, model="cut.onnx"), ["cut.onnx", "not a readable ONNX model"])


def test_input_empty_file(work, capsys):
    (work / "empty.onnx").write_bytes(b"")
    _fails_cleanly(work, capsys, _convert(work, model="empty.onnx"), ["empty.onnx", "empty"])


def test_empty_graph(work, capsys):
    m = helper.make_model(helper.make_graph([], "nothing", [], []), opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, str(work / "hollow.onnx"))
    _fails_cleanly(work, capsys, _convert(work, model="hollow.onnx"), ["hollow.onnx", "graph is empty"])


def test_no_quantizable_layer(work, capsys):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu_only",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(work / "relu.onnx"))
    _fails_cleanly(work, capsys, _convert(work, model="relu.onnx"), ["no quantizable layer", "nothing to do"])


def test_missing_external_data(work, capsys):
    ext = work / "ext"
    ext.mkdir()
    onnx.save_model(small_cnn(), str(ext / "m.onnx"), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    (ext / "m.data").unlink()
    _fails_cleanly(work, capsys, _convert(work, model="ext/m.onnx"), ["m.onnx", "not a readable ONNX model"])


def test_model_proto_with_unloaded_external_data():
    """A ModelProto loaded without its external data: say so instead of failing deep inside."""
    import tempfile

    import mxqn_onnx
    from mxqn_onnx import MxqnError

    with tempfile.TemporaryDirectory() as d:
        onnx.save_model(small_cnn(), f"{d}/m.onnx", save_as_external_data=True, location="m.data",
                        size_threshold=0)
        model = onnx.load(f"{d}/m.onnx", load_external_data=False)
    with pytest.raises(MxqnError, match="external data file that was not loaded"):
        mxqn_onnx.quantize(model, cnn_inputs(4))


def test_already_quantized_model_is_refused(work, capsys):
    assert main(_convert(work, out="q.onnx")) == 0
    capsys.readouterr()
    _fails_cleanly(work, capsys, _convert(work, model="q.onnx"), ["already quantized by mxqn-onnx"])


# --------------------------------------------------------------------------- calibration data


def test_no_calibration_given(work, capsys):
    args = ["convert", str(work / "model.onnx"), str(work / "out" / "q.onnx"), "--quiet"]
    _fails_cleanly(work, capsys, args, ["no calibration data", "--calib"])


def test_calibration_file_missing(work, capsys):
    _fails_cleanly(work, capsys, _convert(work, calib="gone.npy"), ["gone.npy", "not found"])


def test_calibration_wrong_shape_names_input_and_expectation(work, capsys):
    np.save(work / "bad.npy", cnn_inputs(4)[:, :2])
    _fails_cleanly(work, capsys, _convert(work, calib="bad.npy"),
                   ["input 'x'", "[4, 2, 8, 8]", "float32[?,3,8,8]"])


def test_calibration_wrong_rank(work, capsys):
    np.save(work / "flat.npy", cnn_inputs(4).reshape(4, -1))
    _fails_cleanly(work, capsys, _convert(work, calib="flat.npy"), ["input 'x'", "float32[?,3,8,8]"])


def test_calibration_wrong_name(work, capsys):
    np.savez(work / "bad.npz", image=cnn_inputs(4))
    _fails_cleanly(work, capsys, _convert(work, calib="bad.npz"),
                   ["no data for input(s) x", "unknown name(s) image", "x float32[?,3,8,8]"])


def test_calibration_wrong_dtype(work, capsys):
    np.save(work / "ints.npy", (cnn_inputs(4) * 100).astype(np.int32))
    _fails_cleanly(work, capsys, _convert(work, calib="ints.npy"), ["input 'x'", "int32", "float32[?,3,8,8]"])


def test_calibration_not_numpy(work, capsys):
    (work / "junk.npy").write_bytes(b"\x00\x01 definitely not numpy")
    _fails_cleanly(work, capsys, _convert(work, calib="junk.npy"), ["junk.npy", "cannot read as .npy"])


def test_calibration_unknown_format(work, capsys):
    (work / "data.csv").write_text("1,2,3\n")
    _fails_cleanly(work, capsys, _convert(work, calib="data.csv"), ["data.csv", "unknown calibration format"])


def test_calibration_with_nan(work, capsys):
    x = cnn_inputs(8)
    x[3, 0, 0, 0] = np.nan
    np.save(work / "nan.npy", x)
    _fails_cleanly(work, capsys, _convert(work, calib="nan.npy"), ["input 'x'", "NaN or Inf"])


def test_empty_calibration_folder(work, capsys):
    (work / "images").mkdir()
    (work / "images" / "README.txt").write_text("no pictures here")
    _fails_cleanly(work, capsys, _convert(work, calib="images"), ["images", "no images found"])


def test_empty_calibration_array(work, capsys):
    np.save(work / "none.npy", np.zeros((0, 3, 8, 8), np.float32))
    _fails_cleanly(work, capsys, _convert(work, calib="none.npy"), ["none.npy", "no samples"])


def test_unreadable_image(work, capsys):
    folder = work / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / "a_good.png")
    (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing sensible")
    _fails_cleanly(work, capsys, _convert(work, calib="images") + ["--batch-size", "1"],
                   ["b_broken.png", "cannot read this image"])


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("flag,value", [("--wbits", "1"), ("--wbits", "17"), ("--abits", "0"), ("--abits", "33"),
                                        ("--keep-bits", "-4")])
def test_bits_out_of_range(work, capsys, flag, value):
    _fails_cleanly(work, capsys, _convert(work) + [flag, value], [flag.lstrip("-").replace("-", "_"), "2 to 16"])


def test_bits_not_a_number(work, capsys):
    _fails_cleanly(work, capsys, _convert(work) + ["--wbits", "eight"], ["--wbits", "invalid int value"])


# --------------------------------------------------------------------------- the output


def test_output_equals_input(work, capsys):
    _fails_cleanly(work, capsys, _convert(work, out="model.onnx"), ["is the input model"])


def test_output_equals_input_by_another_path(work, capsys):
    _fails_cleanly(work, capsys, _convert(work, out="out/../model.onnx"), ["is the input model"])


def test_output_folder_missing(work, capsys):
    _fails_cleanly(work, capsys, _convert(work, out="out/missing/q.onnx"), ["missing", "does not exist"])


def test_output_folder_is_a_file(work, capsys):
    (work / "plain").write_text("a file, not a folder")
    _fails_cleanly(work, capsys, _convert(work, out="plain/q.onnx"), ["plain", "is not a folder"])


def test_output_path_is_a_folder(work, capsys):
    _fails_cleanly(work, capsys, _convert(work, out="out"), ["is a folder"])


def test_output_folder_read_only(work, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root, which may write into read-only folders; "
                    "test_output_folder_unwritable_even_for_root covers the refusal")
    ro = work / "out" / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        before = _snapshot(work)
        assert main(_convert(work, out="out/ro/q.onnx")) == 2
        err = capsys.readouterr().err
        assert "is not writable" in err and "Traceback" not in err
        assert list(ro.iterdir()) == [] and _snapshot(work) == before
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_folder_unwritable_even_for_root(work, capsys):
    """/proc accepts no new files, whoever asks: refused before any work, in one line."""
    before = _snapshot(work)
    assert main(_convert(work, out="../../../../../../proc/q.onnx")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable" in err[0] and "/proc" in err[0]
    assert not Path("/proc/q.onnx").exists() and _snapshot(work) == before


def test_report_folder_missing(work, capsys):
    _fails_cleanly(work, capsys, _convert(work) + ["--report", str(work / "nowhere" / "r.json")],
                   ["report folder", "does not exist"])


# --------------------------------------------------------------------------- atomic write


class _Interrupting:
    """A file object that writes part of the data, then fails as ``exc`` says."""

    def __init__(self, fh, exc: BaseException) -> None:
        self.fh, self.exc = fh, exc

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.fh.close()

    def write(self, data: bytes) -> None:
        self.fh.write(data[: len(data) // 2])
        raise self.exc


def _break_writes(monkeypatch, exc: BaseException) -> None:
    real = os.fdopen

    def fdopen(fd, mode="r", *a, **k):
        return _Interrupting(real(fd, mode, *a, **k), exc)

    monkeypatch.setattr(writing.os, "fdopen", fdopen)


def test_interrupted_write_leaves_no_output(work, capsys, monkeypatch):
    _break_writes(monkeypatch, KeyboardInterrupt())
    before = _snapshot(work)
    assert main(_convert(work)) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert list((work / "out").iterdir()) == [] and _snapshot(work) == before


def test_failed_write_keeps_the_old_output(work, capsys, monkeypatch):
    old = work / "out" / "q.onnx"
    earlier = small_cnn()  # an earlier output of ours (the only kind convert replaces)
    onnx.helper.set_model_props(earlier, {"mxqn": "{}"})
    onnx.save(earlier, str(old))
    before = old.read_bytes()
    _break_writes(monkeypatch, OSError(28, "No space left on device"))
    code = main(_convert(work))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0]
    assert [p.name for p in (work / "out").iterdir()] == ["q.onnx"]  # no temporary file left
    assert old.read_bytes() == before


# --------------------------------------------------------------------------- as a real process


@pytest.mark.parametrize("case", ["not_onnx", "no_layer", "bad_calib"])
def test_subprocess_exit_code_and_single_line(work, case):
    (work / "notes.onnx").write_text("not a model")
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu_only",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(work / "relu.onnx"))
    np.save(work / "bad.npy", cnn_inputs(4)[:, :1])
    args: Dict[str, Callable[[], List[str]]] = {
        "not_onnx": lambda: _convert(work, model="notes.onnx"),
        "no_layer": lambda: _convert(work, model="relu.onnx"),
        "bad_calib": lambda: _convert(work, calib="bad.npy")[:-1],  # without --quiet
    }
    before = _snapshot(work)
    proc = run_cli(*args[case]())
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("mxqn-onnx: error: "), proc.stderr
    assert list((work / "out").iterdir()) == [] and _snapshot(work) == before


@pytest.mark.parametrize("ext", [".json", ".txt"])
def test_subprocess_text_extension_is_one_line(work, ext):
    (work / f"notes{ext}").write_text("these are my notes, not a model\n")
    before = _snapshot(work)
    proc = run_cli(*_convert(work, model=f"notes{ext}"))
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("mxqn-onnx: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert list((work / "out").iterdir()) == [] and _snapshot(work) == before


def test_no_quantizable_layer_written_when_asked(work, capsys):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu_only",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(work / "relu.onnx"))
    assert main(_convert(work, "relu.onnx", "out/q.onnx", "calib.npy", "--allow-empty")) == 0
    out = onnx.load(str(work / "out" / "q.onnx"))
    onnx.checker.check_model(out, full_check=True)
    meta = json.loads(next(p.value for p in out.metadata_props if p.key == "mxqn"))
    assert meta["layers"] == [] and [n.op_type for n in out.graph.node] == ["Relu"]
