"""Human-readable reports: the per-layer table and the summary lines (rich)."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.table import Table


def _db(v) -> str:
    if v is None:
        return "exact"
    return f"{v:.1f}"


def _frac(w: dict) -> str:
    f = w["frac"]
    if isinstance(f, list):
        return f"ch {min(f)}..{max(f)}" if min(f) != max(f) else f"ch {f[0]}"
    return str(f)


def _act(a: dict) -> str:
    sign = "s" if a["signed"] else "u"
    if a["kind"] == "fixed":
        return f"fxp{a['bits']}{sign} f={a['frac']}"
    return f"log{a['bits']}{sign} k={a['k']} E={a['E']}"


def layer_table(report: dict, title: Optional[str] = None) -> Table:
    """Per-layer decisions: weights, the activation quantizer chosen and both candidate SQNRs."""
    acts = {a["tensor"]: a for a in report["activations"]}
    t = Table(title=title, show_lines=False, header_style="bold")
    t.add_column("layer", overflow="fold", min_width=24)
    for col, just in [("op", "left"), ("Wb", "right"), ("W f", "right"), ("W dB", "right"),
                      ("activation", "left"), ("fxp dB", "right"), ("log dB", "right"), ("bias f", "right")]:
        t.add_column(col, justify=just, no_wrap=True)
    for layer in report["layers"]:
        w = layer["weight"]
        a = acts[layer["act"]]
        bias = layer.get("bias_frac")
        if isinstance(bias, list):
            bias = f"{min(bias)}..{max(bias)}" if min(bias) != max(bias) else str(bias[0])
        t.add_row(layer["name"], layer["op"], str(w["bits"]), _frac(w), _db(w["sqnr_db"]), _act(a),
                  _db(a["sqnr_fixed_db"]) if a["sqnr_fixed_db"] is not None or a["kind"] == "fixed" else "-",
                  _db(a["sqnr_log_db"]) if a["sqnr_log_db"] is not None else "-",
                  "-" if bias is None else str(bias))
    return t


def summary_lines(report: dict) -> list:
    """Model-level lines: split of quantizers, predicted/measured SQNR, sizes, float layers."""
    acts = report["activations"]
    n_log = sum(1 for a in acts if a["kind"] == "log")
    lines = [
        f"layers quantized: {len(report['layers'])}; activation quantizers: "
        f"{len(acts) - n_log} fixed point, {n_log} log",
        f"calibration samples: {report['calibration_samples']}",
        f"predicted output SQNR: {_db(report['predicted_output_sqnr_db'])} dB "
        "(1/SQNR_out = sum of 1/SQNR_i over weights and activations)",
    ]
    m = report.get("measured")
    if m:
        line = f"measured output SQNR:  {_db(m['output_sqnr_db'])} dB on {m['samples']} calibration samples"
        if m.get("top1_agreement") is not None:
            line += f"; top-1 agreement with FP32 {100 * m['top1_agreement']:.2f}%"
        lines.append(line)
    size = report.get("size_bytes")
    if size:
        lines.append(f"model size: {size['before'] / 1e6:.3f} MB -> {size['after'] / 1e6:.3f} MB "
                     f"({size['after'] / max(size['before'], 1):.2f}x)")
    for s in report["float_layers"]:
        lines.append(f"left in float: {s['name']} ({s['op']}): {s['reason']}")
    return lines


def print_report(report: dict, console: Optional[Console] = None, title: Optional[str] = None) -> None:
    console = console or Console()
    console.print(layer_table(report, title))
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)
