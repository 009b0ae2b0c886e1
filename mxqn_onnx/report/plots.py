"""Pictures of a conversion: where the noise comes from and what each quantizer looks like.

Everything is drawn from the report dict (:meth:`mxqn_onnx.result.QuantResult.report`, or the
JSON stored in a converted model's metadata), so a converted model can be plotted later.
matplotlib is an optional extra (``pip install mxqn-onnx[plot]``); it is imported only when
a plot is drawn. :func:`histogram_summary` (used by the converter) needs numpy only.

Files written by :func:`write_plots`:

* ``sqnr_layers.png``: per layer, weight SQNR and both activation candidates (fixed, log),
  the chosen activation quantizer solid, the other hatched;
* ``bits.png``: weight and activation bits per layer;
* ``output_sqnr.png``: predicted vs measured output SQNR (each allocation round, the
  target, and the accuracy-search evaluations when there were any);
* ``hist/<n>_<tensor>.png``: per activation tensor, the calibration histogram with the
  chosen quantizer's levels drawn over it. The model's metadata holds no histogram (only the
  calibrated range), so plots made from a converted model show the levels over that range;
  a ``--report`` JSON has the histograms.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import MxqnError
from ..writing import check_folder_files, write_folder_files
from ..quant import quantizers as Q
from ..quant.choose import describe_activation

#: Histogram summary resolution: bins per octave of |x|.
SUMMARY_BINS_PER_OCTAVE = 4
#: Octaves below the largest calibration value shown on the log2 axis.
LOG_AXIS_OCTAVES = 16


def histogram_summary(hist, bins_per_octave: int = SUMMARY_BINS_PER_OCTAVE) -> dict:
    """A compact, JSON-ready histogram: the fine calibration bins merged to a few per octave."""
    b = hist.bins()
    zero = (b.lo == 0) & (b.hi == 0)
    lo, hi, cnt = b.lo[~zero], b.hi[~zero], b.count[~zero]
    mid = 0.5 * (lo + hi)
    with np.errstate(divide="ignore"):
        octave = np.floor(np.log2(np.maximum(np.abs(mid), 1e-300)) * bins_per_octave).astype(np.int64)
    key = np.sign(mid).astype(np.int64) * (octave + 100000)
    keys, inv = np.unique(key, return_inverse=True)
    g_lo = np.full(len(keys), np.inf)
    g_hi = np.full(len(keys), -np.inf)
    np.minimum.at(g_lo, inv, lo)
    np.maximum.at(g_hi, inv, hi)
    g_cnt = np.bincount(inv, weights=cnt, minlength=len(keys))
    order = np.argsort(g_lo)

    def r(v):
        return [float(f"{x:.5g}") for x in v]

    return {
        "lo": r(g_lo[order]), "hi": r(g_hi[order]), "count": [int(c) for c in g_cnt[order]],
        "zeros": int(np.sum(b.count[zero])), "min": float(hist.min), "max": float(hist.max),
        "bins_per_octave": bins_per_octave,
    }


def _save(fig, path: Path, dpi: int = 100) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MxqnError("plots need matplotlib: pip install 'mxqn-onnx[plot]'") from None
    return plt


def require_matplotlib() -> None:
    """Raise the one-line :class:`MxqnError` when matplotlib is not installed."""
    _plt()


def short_name(name: str, parts: int = 2) -> str:
    """The last ``parts`` components of an exporter's slash-separated node name."""
    bits = [p for p in name.split("/") if p]
    return "/".join(bits[-parts:]) if bits else name


def quantizer_levels(act: dict) -> np.ndarray:
    """All representable values of an activation decision (sorted)."""
    bits, signed = int(act["bits"]), bool(act["signed"])
    if act["kind"] == "fixed":
        lo, hi = Q.fxp_range(bits, signed)
        return np.arange(lo, hi + 1, dtype=np.float64) * 2.0 ** (-int(act["frac"]))
    mags = Q.log_levels(bits, int(act["k"]), int(act["E"]), signed).astype(np.float64)
    vals = np.concatenate([mags, [0.0], -mags if signed else []])
    return np.sort(vals)


def _bar_sqnr(v) -> float:
    return np.nan if v is None else float(v)


def plot_sqnr_layers(report: dict, path: Path) -> Path:
    """Per-layer SQNR bars: weights, activation fixed and log candidates (chosen one solid)."""
    plt = _plt()
    acts = {a["tensor"]: a for a in report["activations"]}
    layers = report["layers"]
    x = np.arange(len(layers))
    wdb = [_bar_sqnr(l["weight"]["sqnr_db"]) for l in layers]
    fx = [_bar_sqnr(acts[l["act"]]["sqnr_fixed_db"]) for l in layers]
    lg = [_bar_sqnr(acts[l["act"]]["sqnr_log_db"]) for l in layers]
    kinds = [acts[l["act"]]["kind"] for l in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(layers) + 2), 4))
    ax.bar(x - 0.27, wdb, 0.27, color="#4c72b0", label="weight (fixed point)")
    for i in range(len(layers)):
        chosen_fx = kinds[i] == "fixed"
        ax.bar(x[i], fx[i], 0.27, color="#55a868" if chosen_fx else "white", edgecolor="#55a868",
               hatch=None if chosen_fx else "//", label="activation fixed" if i == 0 else None)
        ax.bar(x[i] + 0.27, lg[i], 0.27, color="#c44e52" if not chosen_fx else "white", edgecolor="#c44e52",
               hatch=None if not chosen_fx else "//", label="activation log" if i == 0 else None)
        best = fx[i] if chosen_fx else lg[i]
        if np.isfinite(best):
            ax.plot(x[i] + (0 if chosen_fx else 0.27), best + 0.8, marker="v", color="black", ms=5)
    ax.set_xticks(x)
    ax.set_xticklabels([short_name(l["name"]) for l in layers], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("per-layer SQNR (solid, marked: chosen activation quantizer; hatched: not chosen)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_bits(report: dict, path: Path) -> Path:
    """Weight and activation bit widths per layer."""
    plt = _plt()
    acts = {a["tensor"]: a for a in report["activations"]}
    layers = report["layers"]
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers) + 2), 3.5))
    ax.bar(x - 0.2, [l["weight"]["bits"] for l in layers], 0.4, label="weight bits", color="#4c72b0")
    ax.bar(x + 0.2, [acts[l["act"]]["bits"] for l in layers], 0.4, label="activation bits", color="#dd8452")
    ax.set_xticks(x)
    ax.set_xticklabels([short_name(l["name"]) for l in layers], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("bits")
    ax.set_yticks(range(0, 17, 2))
    alloc = report.get("allocation")
    ax.set_title("bit widths per layer" + (f" ({alloc['mode']} allocation)" if alloc else " (uniform)"), fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_output_sqnr(report: dict, path: Path) -> Path:
    """Predicted vs measured output SQNR per allocation round, and accuracy evaluations."""
    plt = _plt()
    alloc = report.get("allocation") or {}
    rounds = alloc.get("rounds") or []
    evals = alloc.get("evaluations") or []
    measured = (report.get("measured") or {}).get("output_sqnr_db")
    ncols = 2 if evals else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.6), squeeze=False)
    ax = axes[0][0]
    if rounds:
        labels = [f"round {r.get('round', i)}" for i, r in enumerate(rounds)]
        pred = [_bar_sqnr(r.get("predicted_corrected_db", r.get("predicted_db"))) for r in rounds]
        meas = [_bar_sqnr(r.get("measured_db")) for r in rounds]
    else:
        labels = ["uniform"]
        pred = [_bar_sqnr(report.get("predicted_output_sqnr_db"))]
        meas = [_bar_sqnr(measured)]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, pred, 0.4, label="predicted (with the round's correction)", color="#8172b3")
    ax.bar(x + 0.2, meas, 0.4, label="measured (calibration data)", color="#64b5cd")
    for xi, p, m in zip(x, pred, meas):
        for dx, v in ((-0.2, p), (0.2, m)):
            if np.isfinite(v):
                ax.text(xi + dx, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    if alloc.get("target_sqnr_db") is not None:
        ax.axhline(alloc["target_sqnr_db"], color="black", ls="--", lw=1, label="target")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title("predicted vs measured output SQNR", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if evals:
        ax2 = axes[0][1]
        bits = [e["avg_wbits"] + e["avg_abits"] for e in evals]
        acc = [100 * e["top1_quant"] for e in evals]
        for i, (b, a, e) in enumerate(zip(bits, acc, evals)):
            ax2.scatter(b, a, color="#55a868" if e["passes"] else "#c44e52", zorder=3)
            ax2.annotate(str(i + 1), (b, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ref = 100 * evals[0]["top1_fp32"]
        ax2.axhline(ref, color="black", lw=1, label="FP32")
        drop = (report.get("config") or {}).get("max_accuracy_drop") or 0.0
        ax2.axhline(ref - drop, color="black", ls="--", lw=1, label="allowed drop")
        ax2.set_xlabel("avg weight bits + avg activation bits")
        ax2.set_ylabel("validation top-1 (%)")
        ax2.set_title("accuracy search: evaluations in order (green pass, red fail)", fontsize=9)
        ax2.legend(fontsize=7)
    return _save(fig, path)


def plot_histogram(act: dict, summary: Optional[dict], path: Path, title: str = "") -> Path:
    """Calibration histogram of one activation with its quantizer's levels drawn over it.

    Two panels: the values on a linear axis, and |x| on a log2 axis (where the log
    quantizer's levels are evenly spaced). Without a ``summary`` only the calibrated range
    is known and is shaded instead.
    """
    plt = _plt()
    levels = quantizer_levels(act)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    top = max(abs(act.get("min", 0.0)), abs(act.get("max", 0.0)), 1e-30)
    log_lo = np.log2(top) - LOG_AXIS_OCTAVES  # what lies further down is invisible anyway
    if summary is not None and summary["count"]:
        lo, hi = np.asarray(summary["lo"]), np.asarray(summary["hi"])
        cnt = np.asarray(summary["count"], dtype=np.float64)
        # linear panel: counts re-binned on a uniform grid (bins of 2^-n width would spike)
        edges = np.linspace(min(0.0, summary["min"]), max(0.0, summary["max"]), 81)
        w = np.maximum(hi - lo, 1e-30)
        cdf = np.sum(cnt * np.clip((edges[:, None] - lo) / w, 0.0, 1.0), axis=1)  # spread uniformly
        a1.bar(edges[:-1], np.diff(cdf), width=np.diff(edges), align="edge", color="#999999",
               label="calibration values (non-zero)")
        mag_lo = np.log2(np.maximum(np.minimum(np.abs(lo), np.abs(hi)), 1e-30))
        mag_hi = np.log2(np.maximum(np.maximum(np.abs(lo), np.abs(hi)), 1e-30))
        neg = hi <= 0
        vis = mag_hi > log_lo
        for sel, color, lab in ((~neg & vis, "#999999", "x > 0"), (neg & vis, "#c0a080", "x < 0")):
            if np.any(sel):
                a2.bar(mag_lo[sel], cnt[sel], width=mag_hi[sel] - mag_lo[sel], align="edge", color=color,
                       alpha=0.8, label=lab)
        note = f"{summary['zeros']} exact zeros not shown" if summary.get("zeros") else ""
    else:
        a1.axvspan(act.get("min", 0.0), act.get("max", 0.0), color="#dddddd",
                   label="calibrated range (no histogram in the model's metadata)")
        note = "histogram not stored in the model; plot a --report JSON for it"
    a2.set_xlim(log_lo, np.log2(top) + 1)
    for lv in levels:
        a1.axvline(lv, color="#c44e52", lw=0.5, alpha=0.6)
    mags = np.unique(np.abs(levels[levels != 0]))
    for lv in mags[np.log2(mags) > log_lo]:
        a2.axvline(np.log2(lv), color="#c44e52", lw=0.5, alpha=0.6)
    a1.set_xlabel("value")
    a1.set_ylabel("count")
    a2.set_xlabel("log2 |value|")
    a2.set_ylabel("count")
    a1.legend(fontsize=7, loc="upper right")
    if summary is not None:
        a2.legend(fontsize=7, loc="upper left")
    desc = describe_activation(act)
    sq = act.get("sqnr_db")
    fig.suptitle(f"{title or act['tensor']}: {desc} (red: levels), SQNR "
                 f"{'exact' if sq is None else f'{sq:.1f} dB'}" + (f"; {note}" if note else ""), fontsize=8)
    return _save(fig, path, dpi=90)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "tensor"


#: the plot files of every report; one histogram per activation tensor goes into ``hist/``
FIXED_PLOTS = ("sqnr_layers.png", "bits.png", "output_sqnr.png")


def check_plot_folder(outdir) -> None:
    """Refuse, before a long conversion, a plot folder where a plot would replace a file of the
    user's (a plot name, or any picture in ``hist/``, not written there by mxqn-onnx)."""
    out = Path(outdir)
    hist = sorted(p.relative_to(out).as_posix() for p in (out / "hist").glob("*.png")) \
        if (out / "hist").is_dir() else []
    check_folder_files(out, list(FIXED_PLOTS) + hist, "plots")


def write_plots(report: dict, outdir) -> List[Path]:
    """All the pictures for a report (see the module docstring); returns the files written.
    They are written as a set or not at all, and replace no file of the user's
    (:func:`mxqn_onnx.writing.write_folder_files`)."""
    _plt()  # fail early, with the one-line message, when matplotlib is missing

    def render(out: Path) -> List[Path]:
        (out / "hist").mkdir()
        written = [plot_sqnr_layers(report, out / FIXED_PLOTS[0]), plot_bits(report, out / FIXED_PLOTS[1]),
                   plot_output_sqnr(report, out / FIXED_PLOTS[2])]
        hists: Dict[str, dict] = report.get("histograms") or {}
        for i, act in enumerate(report["activations"]):
            written.append(plot_histogram(act, hists.get(act["tensor"]),
                                          out / "hist" / f"{i:03d}_{_safe(short_name(act['tensor'], 3))}.png"))
        return written

    return write_folder_files(outdir, render, "plots")
