"""The zoo and benchmark scripts in their tiny CI modes, so that they cannot rot.

Runs ``scripts/train_zoo.py --quick`` (one small model, one epoch) and
``scripts/bench.py --quick`` (that model, W8A8 + W4A4, MXQN auto + onnxruntime MinMax, a few
samples, the cost part on the same model) as a user would, and checks what they write.
"""

import importlib.util
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# minutes of training, apart from the main suite, and torch, which the light test install
# leaves out: pip install -e ".[test,train]" && pytest -q -m slow (CI runs both)
pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch", reason="the training scripts need torch: pip install -e '.[train]'")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite_numbers(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    _run(SCRIPTS / "train_zoo.py", "--quick", "--out", out, cwd=tmp_path_factory.getbasetemp())
    return out


def test_zoo_quick_writes_a_model_data_and_record(tiny_zoo):
    import onnx
    import onnxruntime as ort

    record = json.loads((tiny_zoo / "zoo.json").read_text())
    assert list(record["models"]) == ["digits_resnet18"]
    entry = record["models"]["digits_resnet18"]
    assert entry["epochs"] == 1 and entry["batchnorm_nodes"] > 0
    assert 0.0 <= entry["fp32_test_top1"] <= 1.0
    assert entry["torch_onnx_agreement"] == 1.0  # the export computes what torch computes
    model = onnx.load(str(tiny_zoo / entry["onnx"]))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {13}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    ds = record["datasets"]["digits"]
    with np.load(tiny_zoo / ds["test"]) as z:
        x, y = z["input"], z["labels"]
    assert x.shape == (540, 1, 32, 32) and y.shape == (540,)
    with np.load(tiny_zoo / ds["calib"]) as z:
        assert z["input"].shape == (256, 1, 32, 32)
    # the recorded accuracy is what onnxruntime measures on the stored test split
    s = ort.InferenceSession(str(tiny_zoo / entry["onnx"]), providers=["CPUExecutionProvider"])
    acc = float((s.run(None, {"input": x})[0].argmax(1) == y).mean())
    assert acc == pytest.approx(entry["fp32_test_top1"])
    assert not (tiny_zoo / "resnet50_224.onnx").exists()  # --quick skips the big graph


def test_bench_quick_writes_tables_plots_and_targets(tiny_zoo, tmp_path):
    out = tmp_path / "bench"
    p = _run(SCRIPTS / "bench.py", "--quick", "--zoo", tiny_zoo, "--out", out, cwd=tmp_path)
    assert "PASS" in p.stdout or "MISS" in p.stdout
    res = json.loads((out / "bench.json").read_text())
    assert {"environment", "settings", "accuracy", "cost", "targets"} <= set(res)
    rows = {(r["bits"], r["method"]): r for r in res["accuracy"]}
    assert set(rows) == {("FP32", "fp32"), ("W8A8", "mxqn-auto"), ("W8A8", "ort-minmax-tensor"),
                         ("W4A4", "mxqn-auto"), ("W4A4", "ort-minmax-tensor")}
    for key in (("W8A8", "mxqn-auto"), ("W4A4", "mxqn-auto"), ("W8A8", "ort-minmax-tensor")):
        r = rows[key]
        assert "error" not in r, r
        assert 0 <= r["top1"] <= 1 and 0 <= r["agreement"] <= 1 and math.isfinite(r["sqnr_db"])
    assert rows[("W8A8", "mxqn-auto")]["sqnr_db"] > rows[("W4A4", "mxqn-auto")]["sqnr_db"]
    # a configuration onnxruntime cannot run is reported with its error, never left blank
    ort4 = rows[("W4A4", "ort-minmax-tensor")]
    assert ("error" in ort4 and ort4["error"]) or math.isfinite(ort4["sqnr_db"])
    kinds = {(r["kind"], r["samples"]) for r in res["cost"]["runs"] if "error" not in r}
    assert {("fp32", 8), ("mxqn", 8), ("mxqn_verify", 8), ("ort", 8), ("fp32", 16), ("mxqn", 16)} <= kinds
    for r in res["cost"]["runs"]:
        if "error" not in r:
            assert r["wall_s"] > 0 and r["maxrss_mb"] > 10
    lat = res["cost"]["latency"]["latency_ms"]
    assert {"fp32", "mxqn"} <= set(lat["1"]) and all(v > 0 for v in lat["1"].values())
    assert res["targets"] and all(t["pass"] in (True, False, None) for t in res["targets"])
    assert _finite_numbers(res["cost"])
    for name in ("accuracy.png", "sqnr.png", "accuracy.md", "cost.md", "targets.md"):
        assert (out / name).stat().st_size > 0


def test_zoo_reads_cifar_pickles_and_image_folders(tmp_path):
    zoo = _load_script("train_zoo")
    rng = np.random.default_rng(0)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name, n in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 4)]:
        with open(cifar / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, fh)
    x_tr, y_tr, x_te, y_te, stats = zoo.load_cifar(cifar, 10)
    assert x_tr.shape == (30, 3, 32, 32) and x_te.shape == (4, 3, 32, 32) and x_tr.dtype == np.float32
    assert np.allclose(x_tr.mean(axis=(0, 2, 3)), 0, atol=1e-5) and len(stats["mean"]) == 3
    assert y_tr.dtype == np.int64 and len(y_te) == 4

    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "inet" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                    tmp_path / "inet" / split / c / f"{i}.png")
    x_tr, y_tr, x_te, y_te, stats = zoo.load_imagefolder(tmp_path / "inet", 24)
    assert x_tr.shape == (4, 3, 24, 24) and list(y_tr) == [0, 0, 1, 1] and stats["classes"] == ["cat", "dog"]


def test_zoo_networks_have_the_paper_depths():
    """Weighted layers on the main path (ResNet shortcut projections aside): 16, 19, 18, 34, 50."""
    zoo = _load_script("train_zoo")
    depth = {}
    for name in zoo.ALL_MODELS:
        m = zoo.build(name, 1, 10, 32, width=4).eval()
        assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
        weighted = sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())
        shortcuts = sum(isinstance(x, torch.nn.Sequential) and len(x) == 2 and isinstance(x[0], torch.nn.Conv2d)
                        for x in m.modules())
        assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()) > 0
        depth[name] = weighted - shortcuts
    assert depth == {"vgg16": 16, "vgg19": 19, "resnet18": 18, "resnet34": 34, "resnet50": 50}
