"""scripts/bench_deploy.py's measuring half on the digits model (no NNCF: the bench extra has it),
so that the deployment benchmark cannot rot."""

import importlib.util
import math
from pathlib import Path

import onnx

import mxqn_onnx

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_deploy_measures_both_runtimes(tmp_path):
    bd = _load_script("bench_deploy")
    case = bd.load_case("digits_cnn", quick=True, zoo=tmp_path)
    r = mxqn_onnx.quantize(str(case.path), {case.input_name: case.calib}, format="qdq", verify=False)
    onnx.save(r.model, str(tmp_path / "mxqn.onnx"))
    rows = bd.measure(case, {"fp32": case.path, "mxqn": tmp_path / "mxqn.onnx"}, tmp_path, rounds=3)
    by = {(row["method"], row["runtime"]): row for row in rows}
    assert set(by) == {(m, rt) for m in ("fp32", "mxqn") for rt in ("ort", "ov")}
    n = len(r.layers)
    # FP32 runs in float; our file's layers all run int8 in OpenVINO, and fuse in onnxruntime
    assert by[("fp32", "ort")]["int8_layers"] == by[("fp32", "ov")]["int8_layers"] == 0
    assert by[("mxqn", "ov")]["int8_layers"] == by[("mxqn", "ov")]["layers"] == n
    assert by[("mxqn", "ort")]["int8_layers"] >= n - 1 and by[("mxqn", "ort")]["layers"] == n
    # the same file in both runtimes: same accuracy within 1 dB
    assert by[("mxqn", "ort")]["sqnr_db"] > 30 and abs(by[("mxqn", "ort")]["sqnr_db"] - by[("mxqn", "ov")]["sqnr_db"]) <= 1
    assert all(math.isfinite(row["ratio_to_fp32"]) and row["ratio_to_fp32"] > 0 for row in rows)
    assert by[("fp32", "ort")]["ratio_to_fp32"] == 1.0
    # the targets compare ours with NNCF's rows when present (absent here: nothing claimed)
    assert bd.targets(rows) == []
