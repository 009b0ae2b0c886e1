"""Uniform vs allocated bit widths: output SQNR and top-1 against weight size, per zoo model.

For each model and each width b, two conversions with the same bits on average:

* uniform: every weight and activation at b bits (``wbits = abits = b``);
* allocated: ``avg_wbits = avg_abits = b`` (the same total weight bits, hence the same packed
  size or less, and the same activation bits per sample), widths chosen per layer from
  {2..8} by the sensitivity-weighted SQNR model.

Both are measured the same way: output SQNR against FP32 on the calibration data, top-1 on
the test split. Size is the packed weight storage (weights at their widths + int32 biases).

Models: every model listed in ``cache/zoo/zoo.json`` (written by ``scripts/train_zoo.py``),
plus the shipped ``models/digits_cnn.onnx``. Prints the table, writes one plot and a JSON.

    python scripts/bench_mixed.py                     # all models, widths 3..7
    python scripts/bench_mixed.py --models digits_cnn --widths 4,6
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mxqn_onnx  # noqa: E402
from mxqn_onnx.calibration.data import input_specs, make_source  # noqa: E402
from mxqn_onnx.report.measure import compare  # noqa: E402


def zoo_models(zoo_dir: Path) -> Dict[str, dict]:
    """name -> {onnx, calib, test} for the shipped model and every zoo model present."""
    out = {"digits_cnn": {"onnx": ROOT / "models/digits_cnn.onnx", "calib": ROOT / "models/digits_calib.npz",
                          "test": ROOT / "models/digits_test.npz"}}
    index = zoo_dir / "zoo.json"
    if index.is_file():
        for name, m in json.loads(index.read_text()).get("models", {}).items():
            path = zoo_dir / m["onnx"]
            calib, test = zoo_dir / f"{m['dataset']}_calib.npz", zoo_dir / f"{m['dataset']}_test.npz"
            if path.is_file() and calib.is_file() and test.is_file():
                out[name] = {"onnx": path, "calib": calib, "test": test}
    return out


def run_one(paths: dict, width: int, mode: str) -> dict:
    kw = dict(wbits=width, abits=width) if mode == "uniform" else dict(avg_wbits=width, avg_abits=width)
    t = time.perf_counter()
    r = mxqn_onnx.quantize(paths["onnx"], paths["calib"], **kw)
    seconds = time.perf_counter() - t
    fp32 = onnx.load(str(paths["onnx"]))
    src = make_source(str(paths["test"]), input_specs(fp32), 128)
    c = compare(fp32, r.model, src.batches(), src.labels)
    acts = r.report()["activations"]
    elems = {a["tensor"]: a for a in acts}
    alloc = r.allocation or {}
    units = {(u["kind"], u["name"]): u["size"] for u in alloc.get("units", [])}
    params = sum(d.params for d in r.layers)
    return {
        "mode": mode, "width": width, "packed_kb": r.packed_weight_bytes / 1e3,
        "avg_wbits": sum(d.params * d.weight.bits for d in r.layers) / params,
        "avg_abits": (sum(units[("act", t)] * a["bits"] for t, a in elems.items()) / sum(units[("act", t)] for t in elems)
                      if units else float(width)),
        "predicted_db": (alloc.get("rounds") or [{}])[0].get("predicted_db") if alloc else None,
        "measured_db": r.measured_sqnr_db, "test_sqnr_db": c.output_sqnr_db,
        "top1": c.top1_quant, "top1_fp32": c.top1_ref, "seconds": seconds,
    }


def plot(results: Dict[str, List[dict]], path: Path, dpi: int = 90) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 5.6), squeeze=False)
    for j, name in enumerate(names):
        rows = results[name]
        for mode, color in (("uniform", "#4c72b0"), ("allocated", "#dd8452")):
            sel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["packed_kb"])
            x = [r["packed_kb"] for r in sel]
            axes[0][j].plot(x, [r["measured_db"] for r in sel], "o-", color=color, label=mode)
            axes[1][j].plot(x, [100 * r["top1"] for r in sel], "o-", color=color, label=mode)
            for r in sel:
                axes[0][j].annotate(str(r["width"]), (r["packed_kb"], r["measured_db"]), fontsize=6,
                                    xytext=(2, -8), textcoords="offset points")
        axes[1][j].axhline(100 * rows[0]["top1_fp32"], color="black", lw=0.8, ls="--", label="FP32")
        axes[0][j].set_title(name, fontsize=9)
        axes[1][j].set_xlabel("packed weights (kB)")
    axes[0][0].set_ylabel("output SQNR, calibration (dB)")
    axes[1][0].set_ylabel("test top-1 (%)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle("uniform W=A=b bits vs allocated (same average bits b; labels: b)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(ROOT / "cache/zoo"), help="folder with zoo.json and the models")
    ap.add_argument("--models", help="comma-separated subset of model names")
    ap.add_argument("--widths", default="3,4,5,6,7", help="average widths b to compare (default 3,4,5,6,7)")
    ap.add_argument("--out", default=str(ROOT / "cache/bench_mixed"), help="folder for the plot and JSON")
    ap.add_argument("--resume", action="store_true",
                    help="keep the models already in OUT/bench_mixed.json and run only the others")
    args = ap.parse_args()
    models = zoo_models(Path(args.zoo))
    if args.models:
        wanted = args.models.split(",")
        missing = [m for m in wanted if m not in models]
        if missing:
            print(f"unknown or missing model(s): {', '.join(missing)}; have {', '.join(models)}", file=sys.stderr)
            return 2
        models = {m: models[m] for m in wanted}
    widths = [int(w) for w in args.widths.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, List[dict]] = {}
    store = out / "bench_mixed.json"
    if args.resume and store.is_file():
        results = json.loads(store.read_text())
    header = (f"{'model':<16} {'b':>2} {'mode':<9} {'packed kB':>9} {'avgW':>5} {'avgA':>5} "
              f"{'pred dB':>7} {'calib dB':>8} {'test dB':>7} {'top1 %':>7}")
    print(header)
    for name in results:
        for r in results[name]:
            pred = "-" if r["predicted_db"] is None else f"{r['predicted_db']:.2f}"
            print(f"{name:<16} {r['width']:>2} {r['mode']:<9} {r['packed_kb']:>9.2f} {r['avg_wbits']:>5.2f} "
                  f"{r['avg_abits']:>5.2f} {pred:>7} {r['measured_db']:>8.2f} {r['test_sqnr_db']:>7.2f} "
                  f"{100 * r['top1']:>7.2f}  (kept)")
    wins = [(name, u["width"], a["measured_db"] > u["measured_db"] and a["packed_kb"] <= u["packed_kb"] + 1e-9,
             a["measured_db"] - u["measured_db"])
            for name, rows in results.items()
            for u in rows if u["mode"] == "uniform"
            for a in rows if a["mode"] == "allocated" and a["width"] == u["width"]]
    for name, paths in models.items():
        if name in results:
            continue
        results[name] = []
        for w in widths:
            pair = {}
            for mode in ("uniform", "allocated"):
                r = run_one(paths, w, mode)
                pair[mode] = r
                results[name].append(r)
                pred = "-" if r["predicted_db"] is None else f"{r['predicted_db']:.2f}"
                print(f"{name:<16} {w:>2} {mode:<9} {r['packed_kb']:>9.2f} {r['avg_wbits']:>5.2f} "
                      f"{r['avg_abits']:>5.2f} {pred:>7} {r['measured_db']:>8.2f} {r['test_sqnr_db']:>7.2f} "
                      f"{100 * r['top1']:>7.2f}", flush=True)
            u, a = pair["uniform"], pair["allocated"]
            wins.append((name, w, a["measured_db"] > u["measured_db"] and a["packed_kb"] <= u["packed_kb"] + 1e-9,
                         a["measured_db"] - u["measured_db"]))
        print(f"{name:<16} FP32 top-1 {100 * results[name][0]['top1_fp32']:.2f}%")
        store.write_text(json.dumps(results, indent=1) + "\n")  # after each model: resumable
    try:
        plot(results, out / "bench_mixed.png")
        print(f"plot: {out / 'bench_mixed.png'}")
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    n_win = sum(1 for w in wins if w[2])
    print(f"allocated beats uniform (higher calibration output SQNR at <= the same size) in {n_win}/{len(wins)} "
          f"cases; SQNR gain min {min(w[3] for w in wins):+.2f} dB, median {np.median([w[3] for w in wins]):+.2f} dB")
    for name, w, ok, gain in wins:
        if not ok:
            print(f"  not better: {name} at b={w} ({gain:+.2f} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
