"""No command deletes or overwrites a file it did not write: an existing output model, report
or plot of the user's is refused in one line before any work; mxqn-onnx's own earlier outputs
are replaced; files the user keeps beside them stay as they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_helpers import cnn_inputs, small_cnn
from mxqn_onnx.cli import main


@pytest.fixture
def work(tmp_path):
    onnx.save(small_cnn(), str(tmp_path / "model.onnx"))
    np.save(tmp_path / "calib.npy", cnn_inputs(16))
    return tmp_path


def _convert(work: Path, *extra: str) -> int:
    return main(["convert", str(work / "model.onnx"), str(work / "q.onnx"), "--calib", str(work / "calib.npy"),
                 "--quiet", "--rounding", "nearest", *extra])


def _refused(code: int, capsys, word: str) -> None:
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert word in err[0] and "not written by mxqn-onnx" in err[0], err


def test_convert_replaces_its_own_model_but_not_the_users(work, capsys):
    (work / "q.onnx").write_bytes(b"the user's file")
    _refused(_convert(work), capsys, "q.onnx")
    assert (work / "q.onnx").read_bytes() == b"the user's file"
    # an FP32 model of the user's is no more ours than any other file
    onnx.save(small_cnn(seed=3), str(work / "q.onnx"))
    before = (work / "q.onnx").read_bytes()
    _refused(_convert(work), capsys, "q.onnx")
    assert (work / "q.onnx").read_bytes() == before
    (work / "q.onnx").unlink()
    assert _convert(work) == 0
    first = (work / "q.onnx").read_bytes()
    assert _convert(work, "--wbits", "6") == 0  # our own earlier output: replaced
    assert (work / "q.onnx").read_bytes() != first


def test_report_json_of_the_user_is_kept(work, capsys):
    (work / "r.json").write_text('{"mine": true}')
    _refused(_convert(work, "--report", str(work / "r.json")), capsys, "r.json")
    assert not (work / "q.onnx").exists() and json.loads((work / "r.json").read_text()) == {"mine": True}
    (work / "r.json").unlink()
    assert _convert(work, "--report", str(work / "r.json")) == 0
    assert _convert(work, "--report", str(work / "r.json"), "--wbits", "6") == 0  # ours: replaced
    assert json.loads((work / "r.json").read_text())["config"]["wbits"] == 6


def test_plot_folder_keeps_the_users_files(work, capsys):
    pytest.importorskip("matplotlib")
    plots = work / "plots"
    plots.mkdir()
    (plots / "notes.txt").write_text("mine")
    assert _convert(work, "--plot", str(plots)) == 0
    written = sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.png"))
    assert "sqnr_layers.png" in written and any(w.startswith("hist/") for w in written)
    assert (plots / "notes.txt").read_text() == "mine"
    # a second run (and `report --plot`) replaces its own plots, still not the user's file
    assert _convert(work, "--plot", str(plots), "--wbits", "6", "--report", str(work / "r.json")) == 0
    assert main(["report", str(work / "q.onnx"), "--plot", str(plots), "--quiet"]) == 0
    assert (plots / "notes.txt").read_text() == "mine"
    assert not list(plots.glob(".mxqn-staging.*"))
    # a picture of the user's where a plot would go: refused before converting anything
    (plots / "hist" / "000_mine.png").write_bytes(b"user picture")
    (work / "q.onnx").unlink()
    _refused(_convert(work, "--plot", str(plots)), capsys, "000_mine.png")
    assert not (work / "q.onnx").exists()
    _refused(main(["report", str(work / "r.json"), "--plot", str(plots), "--quiet"]), capsys, "000_mine.png")
    assert (plots / "hist" / "000_mine.png").read_bytes() == b"user picture"
