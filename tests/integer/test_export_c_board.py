"""``export-c --board``: the export built with arm-none-eabi-gcc for a Cortex-M board and run
under qemu-system-arm (semihosting file I/O) gives the host build's output bit for bit.

Skipped only where the cross toolchain or QEMU is missing (.ci/run installs them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import mxqn_onnx
from mxqn_onnx.integer.c_run import arm_tools, build_board, build_c, compiler, run_board, run_c

from conftest import run_cli
from test_export_c import FAST, ZOO, convert, digits

pytestmark = [pytest.mark.skipif(compiler() is None, reason="no C compiler"),
              pytest.mark.skipif(arm_tools() is not None, reason=f"no {arm_tools()} (apt-get install gcc-arm-none-eabi "
                                                                 "libnewlib-arm-none-eabi qemu-system-arm)")]


def _board_vs_host(model, x, folder, board="mps2-an386"):
    info = mxqn_onnx.export_c(model, folder, board=board)
    assert {"startup.c", "board.ld", "Makefile"} <= {p.name for p in folder.iterdir()}
    build_board(folder)  # warning-free
    yb, insns = run_board(folder, x, info["output_size"])
    exe = folder.parent / (folder.name + "_host")
    assert build_c(folder, exe) == ""  # startup.c compiles to nothing on the host
    yh, _ = run_c(exe, x, info["output_size"])
    assert np.array_equal(yb.view(np.uint32), yh.view(np.uint32))
    return info, insns


@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an500"])
def test_digits_cnn_on_the_board_is_bit_identical_to_the_host(board, tmp_path):
    model = convert("auto")
    info, insns = _board_vs_host(model, digits(6), tmp_path / "b", board)
    sz = info["board_size"]
    assert sz["model_flash_bytes"] >= info["weight_bytes"] and sz["flash_bytes"] > sz["model_flash_bytes"]
    assert sz["model_ram_bytes"] >= info["arena_bytes"] and sz["ram_bytes"] > sz["model_ram_bytes"]
    # the instruction count is QEMU's (-icount): at least one instruction per MAC, deterministic
    assert insns >= info["macs"]
    _, again = run_board(tmp_path / "b", digits(6), info["output_size"])
    assert again == insns


def test_cli_board_summary_prints_flash_and_ram(tmp_path):
    path = tmp_path / "q.onnx"
    onnx.save(convert("fixed"), path)
    p = run_cli("export-c", path, tmp_path / "c", "--board", "mps2-an386")
    assert p.returncode == 0, p.stderr
    assert "flash" in p.stdout and "RAM" in p.stdout and "arm-none-eabi-size" in p.stdout
    p = run_cli("export-c", path, tmp_path / "c2", "--board", "stm32")
    assert p.returncode == 2 and "--board" in p.stderr and not (tmp_path / "c2").exists()
    # a host export into the board export's folder removes the board files it wrote (unchanged)
    (tmp_path / "c" / "notes.txt").write_text("mine")
    p = run_cli("export-c", path, tmp_path / "c")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "c").iterdir()) == ["main.c", "model.c", "model.h",
                                                                 "mxqn-export.json", "notes.txt"]


MODELS = Path(__file__).resolve().parents[2] / "models"


def test_shipped_zoo_vgg16_on_the_board_is_bit_identical_to_the_host(tmp_path):
    """The zoo's VGG16 that ships in models/ (32x32 digits), so CI runs it without training."""
    model = mxqn_onnx.quantize(MODELS / "digits32_vgg16.onnx", MODELS / "digits32_calib.npz", **FAST,
                               act_quant="fixed").model
    x = np.load(MODELS / "digits32_test.npz")["input"][:2]
    info, insns = _board_vs_host(model, x, tmp_path / "vgg16")
    assert insns >= info["macs"]


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(not (ZOO / f"{n}.onnx").exists(),
                                             reason="no zoo model in cache/zoo (scripts/train_zoo.py)"))
    for n in ("digits_resnet18", "digits_mobilenetv2")])
def test_zoo_net_on_the_board_is_bit_identical_to_the_host(name, tmp_path):
    model = mxqn_onnx.quantize(ZOO / f"{name}.onnx", ZOO / "digits_calib.npz", **FAST, act_quant="fixed").model
    x = np.load(ZOO / "digits_test.npz")["input"][:2]
    info, insns = _board_vs_host(model, x, tmp_path / name)
    assert insns >= info["macs"]


def test_fast_kernels_on_the_board_are_bit_identical_to_the_host(tmp_path):
    """1x1 and depthwise kernels of odd shapes (test_export_c_kernels' net): the board build
    (LDRD/SMLAD dot products, padded depthwise planes, mxqn_rq) against the host build."""
    from test_export_c_kernels import _data, _kernels_model

    model = mxqn_onnx.quantize(_kernels_model(), {"x": _data(64, 0)}, **FAST, act_quant="fixed").model
    info, insns = _board_vs_host(model, _data(3, 1), tmp_path / "k")
    assert insns >= info["macs"]
