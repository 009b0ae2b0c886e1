"""Why bias correction hurts on the third-party networks (issue 13): measurements, no fixes.

Bias correction (``mxqn_onnx.lowbit.correction``, applied in ``quant.choose.decide_layer``) subtracts from
each layer's bias the predicted mean output shift

    shift = Wq . (mu + m) - W . mu  =  (Wq - W) . mu   +   Wq . m
            ^ weight term               ^ input term

with ``mu`` the per-channel mean of the layer's FP32 input on the calibration data and ``m``
the mean of ``Q(x) - x`` of its input quantizer: per channel from kept samples when the
conversion keeps samples (data-aware rounding on), otherwise ONE tensor-wide number from the
histogram (``ActDecision.mean_error``) spread over every channel.

This script patches those two functions (the package itself is not changed) to run:

- ``variants``: held-out task metrics with the correction off / as is / weight term only /
  input term only / per-channel ``m`` (samples kept) / restricted to layer groups;
- ``noise``: the shifts estimated from disjoint calibration sets of 8, 16, 32/64 pages
  (split-half consistency of each term);
- ``trace``: inside the quantized networks on held-out pages, per layer: the input
  quantizer's actual mean error per channel (on the quantized network's own inputs) against
  the one predicted from FP32 calibration data, and the layer output's SQNR and mean error
  with and without the correction.

Usage::

    python scripts/diag_bias_correction.py variants --models orientation,layout
    python scripts/diag_bias_correction.py noise --models orientation
    python scripts/diag_bias_correction.py trace --models layout
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import third_party as tp  # noqa: E402
from bench_third_party import INPUTS, calib_pages, evaluate  # noqa: E402

import mxqn_onnx  # noqa: E402
from mxqn_onnx.lowbit import correction  # noqa: E402
from mxqn_onnx.quant import choose  # noqa: E402
from mxqn_onnx.config import QuantConfig  # noqa: E402

_orig_shift = correction.output_shift
_orig_mean_error = choose._input_mean_error
_orig_uses = QuantConfig.uses_samples


@contextlib.contextmanager
def patched(m_mode: str = "as-is", terms: str = "both", keep_samples: bool = False,
            only: Optional[Callable] = None, record: Optional[dict] = None):
    """Bias correction with one change at a time.

    m_mode: ``as-is`` (the code's choice), ``scalar`` (always the histogram's tensor-wide
    mean error), ``zero``; terms: ``both``, ``weight``, ``input``; keep_samples: keep layer
    inputs (as data-aware rounding does), so ``as-is`` uses per-channel ``m``; only: layers
    to correct (others keep their bias); record: filled with each layer's terms.
    """
    def mean_error(layer, act, sample, mean_in):
        if m_mode == "scalar":
            return act.mean_error
        if m_mode == "zero":
            return 0.0
        return _orig_mean_error(layer, act, sample, mean_in)

    def shift(layer, w, wq, mean_in, m=0.0):
        if only is not None and not only(layer):
            return None
        mu = np.asarray(mean_in, np.float64)
        a = correction._contract(layer, wq, mu)
        b = correction._contract(layer, w, mu)
        c = correction._contract(layer, wq, mu + m)
        if a is None or b is None or c is None:
            return None
        wt, it = a - b, c - a
        if record is not None:
            record[layer.name] = {"layer": layer, "w": w, "wq": wq, "mu": mu,
                                  "m": np.broadcast_to(np.asarray(m, np.float64), mu.shape).copy(),
                                  "weight_term": wt, "input_term": it}
        return {"both": wt + it, "weight": wt, "input": it}[terms]

    correction.output_shift = shift
    choose._input_mean_error = mean_error
    if keep_samples:
        QuantConfig.uses_samples = lambda self, model_cost=float("inf"): self.data_samples > 0
    try:
        yield
    finally:
        correction.output_shift = _orig_shift
        choose._input_mean_error = _orig_mean_error
        QuantConfig.uses_samples = _orig_uses


def held_out(name: str, pages: int):
    if name == "orientation":
        return tp.orientation_set(list(tp.EVAL_SEEDS[:pages]))
    return tp.layout_set(list(tp.EVAL_SEEDS[:pages])), None


def convert(name: str, calib: np.ndarray, **cfg):
    return mxqn_onnx.quantize(str(tp.model_path(name)), {INPUTS[name]: calib}, verify=False, **cfg)


def _fmt(d: dict) -> str:
    keep = ("top1", "agreement", "sqnr_db", "median_page_sqnr_db", "prob_sqnr_db", "f1", "f1_tolerant", "score_sqnr_db", "box_sqnr_db", "convert_s")
    return "  ".join(f"{k}={d[k]:.4f}" if isinstance(d[k], float) else f"{k}={d[k]}" for k in keep if k in d)


# --------------------------------------------------------------------------- variants

def _is_depthwise(layer) -> bool:
    return layer.op == "Conv" and int(layer.node.attrs.get("group", 1)) > 1


VARIANTS = {
    # name: (config overrides, patch kwargs)
    "off": ({"bias_correction": False}, {}),
    "as-is": ({}, {}),
    "weight-term-only": ({}, {"terms": "weight"}),
    "input-term-only": ({}, {"terms": "input"}),
    "per-channel-m": ({}, {"keep_samples": True}),
    "scalar-m": ({}, {"m_mode": "scalar"}),
    "per-channel-m+input-only": ({}, {"keep_samples": True, "terms": "input"}),
    "gptq+off": ({"rounding": "gptq", "bias_correction": False}, {}),
    "nearest+off": ({"rounding": "nearest", "bias_correction": False}, {}),
    "nearest": ({"rounding": "nearest"}, {}),
    "gptq": ({"rounding": "gptq"}, {}),
    "depthwise-only": ({}, {"only": _is_depthwise}),
    # orientation network only (PP-LCNet node names): its layers on 1x1 maps (SE blocks and the
    # last conv, after global pooling: one value per sample and channel), and its last two convs
    "orient:no-1x1-maps": ({}, {"only": lambda l: l.name not in ("Conv.24", "Conv.25", "Conv.28", "Conv.29", "Conv.31")}),
    "orient:no-last-two": ({}, {"only": lambda l: l.name not in ("Conv.30", "Conv.31")}),
    "pointwise-only": ({}, {"only": lambda l: not _is_depthwise(l)}),
}


def run_variants(name: str, args) -> List[dict]:
    x, y = held_out(name, args.eval_pages)
    import onnx

    fp32 = onnx.load(str(tp.model_path(name)))
    ref = tp.predict(tp.with_logits(fp32) if name == "orientation" else fp32, x, INPUTS[name],
                     batch=16 if name == "orientation" else 1)
    rows = []
    for bits in args.bits.split(","):
        wb, ab = tp_bits(bits)
        for cs in range(args.calib_sets):
            calib = calib_pages(name, args.calib_pages, cs)
            for v in args.variants.split(","):
                cfg, patch = VARIANTS[v]
                t0 = time.perf_counter()
                with patched(**patch):
                    res = convert(name, calib, wbits=wb, abits=ab, **cfg)
                secs = time.perf_counter() - t0
                row = {"model": name, "bits": bits, "calib_set": cs, "variant": v, "convert_s": round(secs, 1),
                       "corrected": sum(d.bias_correction for d in res.layers),
                       "gptq": sum(d.weight.rounding == "gptq" for d in res.layers),
                       **evaluate(name, res.model, x, y, ref)}
                rows.append(row)
                print(f"{name} {bits} set{cs} {v:26s} corrected={row['corrected']:3d} gptq={row['gptq']:3d}  {_fmt(row)}",
                      flush=True)
    return rows


def tp_bits(tag: str):
    w, a = tag.upper().lstrip("W").split("A")
    return int(w), int(a)


# --------------------------------------------------------------------------- noise of the estimates

def run_noise(name: str, args) -> List[dict]:
    """Shifts estimated from disjoint calibration sets of each size: how consistent are they?"""
    sizes = [int(s) for s in args.sizes.split(",")]
    wb, ab = tp_bits(args.bits.split(",")[0])
    rows = []
    for keep in (False, True):
        est: Dict[int, List[dict]] = {}
        for n in sizes:
            est[n] = []
            for half in range(2):
                seeds = list(tp.CALIB_SEEDS[1000 + half * 1000:1000 + half * 1000 + n])
                calib = tp.orientation_calib(seeds) if name == "orientation" else tp.layout_set(seeds)
                rec: dict = {}
                with patched(keep_samples=keep, record=rec):
                    convert(name, calib, wbits=wb, abits=ab)
                est[n].append(rec)
        for n in sizes:
            a, b = est[n]
            for term in ("weight_term", "input_term"):
                rel, cos = [], []
                for lname in a:
                    if lname not in b:
                        continue
                    sa, sb = a[lname][term], b[lname][term]
                    na, nb = np.linalg.norm(sa), np.linalg.norm(sb)
                    if na + nb == 0:
                        continue
                    rel.append(np.linalg.norm(sa - sb) / (0.5 * (na + nb)))
                    cos.append(float(sa @ sb / (na * nb)) if na * nb > 0 else 0.0)
                row = {"model": name, "bits": args.bits.split(",")[0],
                       "m": "per-channel (samples kept)" if keep else "as-is", "pages": n, "term": term,
                       "median_rel_diff": float(np.median(rel)), "p90_rel_diff": float(np.percentile(rel, 90)),
                       "median_cos": float(np.median(cos)), "layers": len(rel)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------- trace inside the networks

def _channel_stats(arr: np.ndarray, axis: int = 1):
    a = np.asarray(arr, np.float64)
    a = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    return a.sum(1), (a * a).sum(1), a.shape[1]


class Stats:
    """Per-channel sums of a tensor over pages (mean, mean square)."""

    def __init__(self) -> None:
        self.s = self.s2 = None
        self.n = 0

    def add(self, arr) -> None:
        s, s2, n = _channel_stats(arr)
        self.s = s if self.s is None else self.s + s
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += n

    @property
    def mean(self):
        return self.s / self.n


def _run_tensors(model, names: List[str], x: np.ndarray, input_name: str, chunk: int, fn) -> None:
    """``fn(page_index, {name: array})`` for every page, the tensors fetched ``chunk`` at a time."""
    sess = tp.session(_with_outputs(model, names))
    for start in range(0, len(names), chunk):
        part = names[start:start + chunk]
        for i in range(len(x)):
            outs = sess.run(part, {input_name: x[i:i + 1]})
            fn(i, dict(zip(part, outs)))


def run_trace(name: str, args) -> List[dict]:
    import onnx

    x, _ = held_out(name, args.trace_pages)
    inp = INPUTS[name]
    calib = calib_pages(name, args.calib_pages, 0)
    wb, ab = tp_bits(args.bits.split(",")[0])
    rec_scalar: dict = {}
    with patched(m_mode="scalar", record=rec_scalar):
        qd = convert(name, calib, wbits=wb, abits=ab)  # tensor-wide m (the default without kept samples)
    rec_ch: dict = {}
    with patched(keep_samples=True, record=rec_ch):
        qc = convert(name, calib, wbits=wb, abits=ab)  # per-channel m from kept samples
    qn = convert(name, calib, wbits=wb, abits=ab, bias_correction=False)
    fp32 = onnx.load(str(tp.model_path(name)))
    layers = [r["layer"] for r in rec_scalar.values()]
    acts = qd.activations

    def in_name(l):  # the rewrite replaced the layer's input by its quantizer's output
        n = l.data.name
        return n[:-len("_mxqn")] if n.endswith("_mxqn") else n

    outs = [l.node.outputs[0].name for l in layers]
    ins = list(dict.fromkeys(in_name(l) for l in layers))
    chunk = 400 if name == "orientation" else 40
    # FP32: per-channel input and output stats; the act quantizer applied to FP32 inputs
    fp_out = {t: Stats() for t in outs}
    fp_in = {t: Stats() for t in ins}
    fp_qerr = {t: Stats() for t in ins}
    ref_pages: Dict[str, list] = {t: [None] * len(x) for t in outs}
    keep_ref = name == "orientation"

    def take_fp(i, d):
        for t, a in d.items():
            if t in fp_out:
                fp_out[t].add(a)
                if keep_ref:
                    ref_pages[t][i] = a
            if t in fp_in:
                fp_in[t].add(a)
                fp_qerr[t].add(acts[t].quantize(a) - a)

    _run_tensors(fp32, list(dict.fromkeys(outs + [t for t in ins if t != inp])), x, inp, chunk, take_fp)
    if inp in fp_in:
        fp_in[inp].add(x)
        fp_qerr[inp].add(acts[inp].quantize(x) - x)

    def quant_stats(qmodel):
        q_in, q_qv, err = ({t: Stats() for t in ins}, {t: Stats() for t in ins}, {t: Stats() for t in outs})
        names = [t for t in ins if t != inp] + [f"{t}_mxqn" for t in ins] + outs
        names = [n for n in dict.fromkeys(names)]
        fp_sess = None if keep_ref else tp.session(_with_outputs(fp32, outs))

        def take(i, d):
            ref_here = None
            for t, a in d.items():
                if t in q_in:
                    q_in[t].add(a)
                elif t.endswith("_mxqn") and t[:-5] in q_qv:
                    q_qv[t[:-5]].add(a)
                if t in err:
                    if keep_ref:
                        r = ref_pages[t][i]
                    else:
                        if ref_here is None:
                            ref_here = dict(zip(outs, fp_sess.run(outs, {inp: x[i:i + 1]})))
                        r = ref_here[t]
                    err[t].add(a - r)
        _run_tensors(qmodel, names, x, inp, chunk, take)
        if inp in q_in:
            q_in[inp].add(x)
        return q_in, q_qv, err

    qn_in, qn_qv, qn_err = quant_stats(qn.model)
    qd_in, qd_qv, qd_err = quant_stats(qd.model)
    qc_in, qc_qv, qc_err = quant_stats(qc.model)
    rows = []
    for l in layers:
        t_in, t_out = in_name(l), l.node.outputs[0].name
        r, rc = rec_scalar[l.name], rec_ch.get(l.name)
        m_act = qn_qv[t_in].mean - qn_in[t_in].mean  # E[Q(x~) - x~] in the uncorrected network
        m_fp = fp_qerr[t_in].mean  # E[Q(x) - x] on FP32 inputs (held out)
        wq = r["wq"]

        def through(m):
            return correction._contract(l, wq, m)

        ideal = through(m_act)  # the input term the quantized network actually has
        sig_out = float(np.sum(fp_out[t_out].s2) / fp_out[t_out].n)

        def resid(pred):  # how much of the actual input term a predicted one leaves (1 = none)
            den = float(ideal @ ideal)
            return float((ideal - pred) @ (ideal - pred)) / den if den > 0 else float("nan")

        def sqnr(e: Stats):
            return 10 * np.log10(sig_out / (float(np.sum(e.s2)) / e.n))

        def bias_share(e: Stats):  # share of the layer output's error that is a per-channel mean
            return float(np.sum(e.mean ** 2) / (np.sum(e.s2) / e.n))

        rows.append({
            "layer": l.name, "op": l.op, "groups": int(l.node.attrs.get("group", 1)),
            "kernel": list(r["w"].shape[2:]), "act": acts[t_in].describe(),
            "m_scalar": float(r["m"][0]) if r["m"].size else 0.0,
            "m_actual_rms": float(np.sqrt(np.mean(m_act ** 2))),
            "m_fp32_rms": float(np.sqrt(np.mean(m_fp ** 2))),
            "m_calib_channel_rms": float(np.sqrt(np.mean(rc["m"] ** 2))) if rc else None,
            # residual of the input term after subtracting each prediction (1: no gain, >1: worse)
            "resid_scalar_m": resid(r["input_term"]),
            "resid_channel_m_calib": resid(rc["input_term"]) if rc else None,
            "resid_channel_m_fp32_heldout": resid(through(m_fp)),
            "weight_term_rms": float(np.sqrt(np.mean(r["weight_term"] ** 2))),
            "input_term_actual_rms": float(np.sqrt(np.mean(ideal ** 2))),
            "out_rms": float(np.sqrt(sig_out)),
            "input_term_calib_channel_rms": float(np.sqrt(np.mean(rc["input_term"] ** 2))) if rc else None,
            "sqnr_off": sqnr(qn_err[t_out]), "sqnr_scalar_m": sqnr(qd_err[t_out]),
            "sqnr_channel_m": sqnr(qc_err[t_out]),
            "bias_share_off": bias_share(qn_err[t_out]), "bias_share_scalar_m": bias_share(qd_err[t_out]),
            "bias_share_channel_m": bias_share(qc_err[t_out]),
        })
    _print_trace(rows)
    return rows


def _with_outputs(model, names):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for nm in names:
        if nm not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(nm))
    return m


def _print_trace(rows: List[dict]) -> None:
    cols = ["layer", "groups", "kernel", "act", "m_scalar", "m_actual_rms", "m_fp32_rms", "resid_scalar_m",
            "resid_channel_m_calib", "resid_channel_m_fp32_heldout", "weight_term_rms", "input_term_actual_rms",
            "input_term_calib_channel_rms", "out_rms", "sqnr_off", "sqnr_scalar_m", "sqnr_channel_m",
            "bias_share_off", "bias_share_scalar_m", "bias_share_channel_m"]
    print("\t".join(c.replace("_", "-") for c in cols))
    for r in rows:
        print("\t".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]).replace(" ", "_") for c in cols))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["variants", "noise", "trace"])
    ap.add_argument("--models", default="orientation,layout")
    ap.add_argument("--bits", default="W8A8")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib-pages", type=int, default=16)
    ap.add_argument("--calib-sets", type=int, default=1)
    ap.add_argument("--eval-pages", type=int, default=16)
    ap.add_argument("--trace-pages", type=int, default=8)
    ap.add_argument("--sizes", default="8,16,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        rows += {"variants": run_variants, "noise": run_noise, "trace": run_trace}[args.part](name, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
