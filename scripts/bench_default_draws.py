"""Test-split accuracy of the default conversion over calibration draws, to compare two versions.

Each model is converted with the defaults at each width, once on the whole calibration file and
on ``--draws - 1`` random draws of ``--calib`` samples from it; each conversion's output SQNR
against FP32 and top-1 on the whole test split are printed with the candidate the held-back
check kept, and written to ``--out``. Run it once per checkout (``PYTHONPATH=<checkout>``), then
``--compare A.json B.json`` prints B - A per conversion and the mean, median and counts.

Usage::

    PYTHONPATH=/path/to/old python scripts/bench_default_draws.py --out /tmp/old.json
    PYTHONPATH=. python scripts/bench_default_draws.py --out /tmp/new.json
    python scripts/bench_default_draws.py --compare /tmp/old.json /tmp/new.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"cnn": ("models/digits_cnn.onnx", "models/digits_calib.npz", "models/digits_test.npz"),
          "vgg16": ("models/digits32_vgg16.onnx", "models/digits32_calib.npz", "models/digits32_test.npz"),
          "resnet18": ("{zoo}/digits_resnet18.onnx", "{zoo}/digits_calib.npz", "{zoo}/digits_test.npz"),
          "mobilenetv2": ("{zoo}/digits_mobilenetv2.onnx", "{zoo}/digits_calib.npz", "{zoo}/digits_test.npz")}


def run(args) -> dict:
    import onnx

    import mxqn_onnx
    from mxqn_onnx.report.measure import compare

    print(f"mxqn_onnx from {Path(mxqn_onnx.__file__).parent}", flush=True)
    out = {}
    for key in args.models.split(","):
        mpath, cpath, tpath = (ROOT / p.format(zoo=args.zoo) for p in MODELS[key])
        model = onnx.load(str(mpath))
        pool = np.load(str(cpath))["input"]
        test = np.load(str(tpath))
        name = model.graph.input[0].name
        batches = [{name: test["input"][i:i + 64]} for i in range(0, len(test["input"]), 64)]
        for bits in args.bits.split(","):
            wb, ab = (int(v) for v in bits.upper().lstrip("W").split("A"))
            for draw in range(args.draws):
                calib = pool if draw == 0 else \
                    pool[np.random.default_rng(1000 * draw + 7).permutation(len(pool))[:args.calib]]
                res = mxqn_onnx.quantize(model, {name: calib}, wbits=wb, abits=ab)
                t = compare(model, res.model, batches, labels=test["labels"])
                row = f"{key} {bits} d{draw}"
                out[row] = {"sqnr_db": t.output_sqnr_db, "top1": t.top1_quant,
                            "kept": (res.holdout or {}).get("kept"), "samples": len(calib)}
                print(f"{row} ({len(calib)} samples): {t.output_sqnr_db:.2f} dB, top-1 {t.top1_quant:.4f}, "
                      f"kept {out[row]['kept']}", flush=True)
    return out


def compare_runs(a_path: str, b_path: str) -> None:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    rows = [k for k in a if k in b]
    d = [b[k]["sqnr_db"] - a[k]["sqnr_db"] for k in rows]
    for k, v in zip(rows, d):
        print(f"{k}: {a[k]['sqnr_db']:.2f} -> {b[k]['sqnr_db']:.2f} dB ({v:+.2f}); "
              f"kept {a[k]['kept']} -> {b[k]['kept']}")
    if d:
        top = sum(b[k]["top1"] - a[k]["top1"] for k in rows)
        print(f"{len(rows)} conversions: mean {statistics.mean(d):+.2f} dB, median {statistics.median(d):+.2f} dB, "
              f"range {min(d):+.2f} to {max(d):+.2f}; up > 0.1 dB: {sum(x > 0.1 for x in d)}, "
              f"down: {sum(x < -0.1 for x in d)}; top-1 summed {top:+.4f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,vgg16", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--zoo", default=str(ROOT / "cache" / "zoo"), help="folder of the zoo models (train_zoo.py)")
    ap.add_argument("--bits", default="W8A8,W4A8,W4A4")
    ap.add_argument("--draws", type=int, default=4, help="the whole file, then random draws")
    ap.add_argument("--calib", type=int, default=64, help="samples per random draw")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--compare", nargs=2, metavar="JSON", help="print the second run minus the first")
    args = ap.parse_args(argv)
    if args.compare:
        compare_runs(*args.compare)
        return
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
