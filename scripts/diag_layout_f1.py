"""How sensitive the layout detector's F1 (against FP32's boxes) is to output noise.

Two measurements on the held-out pages of ``scripts/bench_third_party.py``:

* how many of FP32's boxes (decoded at a lower threshold) score close to the 0.5 threshold,
  where any noise flips them in or out;
* F1 against FP32 when white Gaussian noise at a given SQNR is added to each of the eight raw
  head outputs (several draws each): the F1 a quantizer would get if its error were white.

Quantization noise is not white (it is correlated over each score map), so a quantized model at
the same head SQNR usually scores lower; this gives the metric's own sensitivity.

Usage::

    python scripts/diag_layout_f1.py                  # 16 pages, 5 draws per level
    python scripts/diag_layout_f1.py --pages 8 --draws 3 --levels 20,30
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import third_party as tp  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=16, help="held-out pages (bench_third_party's default)")
    ap.add_argument("--draws", type=int, default=5, help="noise draws per level")
    ap.add_argument("--levels", default="20,25,30,35,40", help="head SQNRs in dB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = tp.model_path("layout")
    if path is None:
        print(f"layout: not installed ({tp.PIP_HINT})", file=sys.stderr)
        return 2
    x = tp.layout_set(list(tp.EVAL_SEEDS[:args.pages]))
    ref = tp.layout_outputs(str(path), x)
    boxes = sum(len(tp.decode_layout(ref, p)) for p in range(len(x)))
    low = tp.CONF_THRES - 0.2
    near = {d: 0 for d in (0.01, 0.02, 0.05, 0.1)}
    for p in range(len(x)):
        score = tp.decode_layout(ref, p, low).score
        for d in near:
            near[d] += int(np.sum(np.abs(score - tp.CONF_THRES) < d))
    print(f"FP32: {boxes} boxes above {tp.CONF_THRES} on {len(x)} pages; boxes decoded at {low:.1f} "
          f"scoring within d of {tp.CONF_THRES}: " + ", ".join(f"d={d}: {n}" for d, n in near.items()))
    rng = np.random.default_rng(args.seed)
    for db in (float(v) for v in args.levels.split(",") if v):
        f1 = []
        for _ in range(args.draws):
            noisy = []
            for r in ref:
                r = np.asarray(r, np.float64)
                sigma = np.sqrt(np.mean(r ** 2) / 10 ** (db / 10))
                noisy.append((r + rng.normal(0.0, sigma, r.shape)).astype(np.float32))
            f1.append(tp.layout_score(ref, noisy).f1)
        print(f"white noise at {db:g} dB on every head: F1 {np.mean(f1):.3f} (min {min(f1):.3f}, max {max(f1):.3f}, "
              f"{args.draws} draws)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
