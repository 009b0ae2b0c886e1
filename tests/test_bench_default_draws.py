"""scripts/bench_default_draws.py: the default conversion's test-split accuracy over calibration
draws, and the comparison of two runs (how the held-back size change was measured)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_default_draws.py"


def test_runs_draws_and_compares_two_runs(tmp_path):
    out = tmp_path / "a.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--models", "cnn", "--bits", "W8A8", "--draws", "2",
                        "--calib", "16", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert list(rows) == ["cnn W8A8 d0", "cnn W8A8 d1"]
    assert rows["cnn W8A8 d0"]["samples"] == 256 and rows["cnn W8A8 d1"]["samples"] == 16
    assert all(20 < v["sqnr_db"] < 60 and 0.9 < v["top1"] <= 1 for v in rows.values())
    # a second run 1 dB better on the first conversion and 3 dB worse on the second
    b = {k: dict(v) for k, v in rows.items()}
    b["cnn W8A8 d0"]["sqnr_db"] += 1.0
    b["cnn W8A8 d1"]["sqnr_db"] -= 3.0
    (tmp_path / "b.json").write_text(json.dumps(b))
    c = subprocess.run([sys.executable, str(SCRIPT), "--compare", str(out), str(tmp_path / "b.json")],
                       capture_output=True, text=True, cwd=ROOT)
    assert c.returncode == 0, c.stderr
    assert "2 conversions: mean -1.00 dB, median -1.00 dB, range -3.00 to +1.00; up > 0.1 dB: 1, down: 1" in c.stdout
