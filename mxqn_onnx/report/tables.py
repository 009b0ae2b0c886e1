"""Human-readable reports: the per-layer table and the summary lines (rich)."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.table import Table

from ..quant.choose import describe_activation


def _db(v) -> str:
    if v is None:
        return "exact"
    return f"{v:.1f}"


def _frac(w: dict) -> str:
    f = w["frac"]
    if isinstance(f, list):
        return f"ch {min(f)}..{max(f)}" if min(f) != max(f) else f"ch {f[0]}"
    return str(f)


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
        t.add_row(layer["name"], layer["op"], str(w["bits"]), _frac(w), _db(w["sqnr_db"]), describe_activation(a),
                  _db(a["sqnr_fixed_db"]) if a["sqnr_fixed_db"] is not None or a["kind"] == "fixed" else "-",
                  _db(a["sqnr_log_db"]) if a["sqnr_log_db"] is not None else "-",
                  "-" if bias is None else str(bias))
    return t


def _change(before, after) -> str:
    if before is None and after is None:
        return "-"
    return f"{_db(before)} -> {_db(after)}"


def technique_table(report: dict) -> Optional[Table]:
    """Per layer, what each low-bit technique bought, as before -> after dB (None: none ran).

    Columns: weight SQNR before/after cross-layer equalization; the layer's output SQNR from
    weight quantization with round-to-nearest / the rounding used; its readers' output SQNR
    with the tensor-SQNR / output-SQNR activation choice; the whole layer's output SQNR
    without / with bias correction (all on calibration inputs).
    """
    acts = {a["tensor"]: a for a in report["activations"]}
    eq = (report.get("equalization") or {}).get("weight_sqnr_db") or {}
    layers = report["layers"]
    measured = any(l.get("output_sqnr_db") is not None or l["weight"].get("output_sqnr_db") is not None
                   for l in layers)
    if not measured and not eq:
        return None
    t = Table(title="low-bit techniques per layer (dB, before -> after)", header_style="bold")
    t.add_column("layer", overflow="fold", min_width=24)
    for col in ("equalization W", "rounding", "act objective", "bias correction"):
        t.add_column(col, justify="right", no_wrap=True)
    for layer in layers:
        w, a = layer["weight"], acts[layer["act"]]
        e = eq.get(layer["name"]) or {}
        rounding = _change(w.get("output_sqnr_nearest_db"), w.get("output_sqnr_db"))
        if w.get("rounding", "nearest") != "nearest":
            rounding += f" ({w['rounding']})"
        objective = "-" if a.get("objective", "tensor") == "tensor" else \
            _change(a.get("output_sqnr_tensor_db"), a.get("output_sqnr_db"))
        bias = _change(layer.get("output_sqnr_uncorrected_db"), layer.get("output_sqnr_db")) \
            if layer.get("bias_correction") else ("-" if layer.get("output_sqnr_db") is None
                                                   else f"off ({_db(layer['output_sqnr_db'])})")
        t.add_row(layer["name"], _change(e.get("before"), e.get("after")) if e else "-",
                  rounding, objective, bias)
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
        lines.extend(measured_lines(m))
    size = report.get("size_bytes")
    if size:
        lines.append(f"model size: {size['before'] / 1e6:.3f} MB -> {size['after'] / 1e6:.3f} MB "
                     f"({size['after'] / max(size['before'], 1):.2f}x)")
    if size and size.get("packed_weights"):
        lines.append(f"packed weight storage (weights at their widths + int32 biases): "
                     f"{size['packed_weights'] / 1e6:.4f} MB")
    n_gptq = sum(1 for l in report["layers"] if l["weight"].get("rounding") == "gptq")
    t_round = (report.get("timing_s") or {}).get("rounding_layer_seconds")
    if n_gptq:
        lines.append(f"data-aware rounding (gptq) kept in {n_gptq} of {len(report['layers'])} layers"
                     + (f"; {t_round:.1f} s of rounding (summed over layers)" if t_round else ""))
    eq = report.get("equalization")
    if eq:
        line = f"cross-layer equalization ({eq['mode']}): {eq['pairs']} layer pairs, {eq['channels']} channels rescaled"
        if "kept" in eq:
            line += (f"; {'kept' if eq['kept'] else 'not kept'}: measured {_db(eq['measured_with_db'])} dB with it, "
                     f"{_db(eq['measured_without_db'])} dB without")
        lines.append(line)
    cfg = report.get("config") or {}
    if cfg:
        bias = f"on ({report.get('bias_means', 'data')} means)" if cfg.get("bias_correction") else "off"
        lines.append(f"techniques: bias correction {bias}, rounding {cfg.get('rounding', 'nearest')}, "
                     f"activation objective {cfg.get('act_objective', 'tensor')}, "
                     f"equalization {cfg.get('equalize', 'off')}")
    dw = report.get("depthwise_shift")
    if dw is not None:
        spread = ", ".join(f"{k}: {v}" for k, v in sorted(dw["channels_by_shift"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"depthwise input shifts: {dw['tensors']} tensors, {dw['convs']} convs; channels per shift "
                     f"{{{spread}}}")
    ho = report.get("holdout")
    lo = (ho or {}).get("layer_output_quantizers")
    if lo:
        lines.append(f"layer-output quantizers (so that onnxruntime fuses those layers): {lo['written']} written"
                     + ("" if lo["written"] else f" (the {lo['default']} tried were less accurate on held-back "
                                                 f"samples)"))
    if ho and ho.get("sqnr_db"):
        each = ", ".join(f"{k} {_db(v)} dB" for k, v in ho["sqnr_db"].items())
        lines.append(f"checked on {ho['held_back_samples']} held-back calibration samples: {each}; "
                     f"kept {ho['kept']}")
    for s in report["float_layers"]:
        lines.append(f"left in float: {s['name']} ({s['op']}): {s['reason']}")
    lines.extend(allocation_lines(report.get("allocation")))
    return lines


def measured_lines(m: dict, where: str = "calibration samples") -> list:
    """The measured comparison with FP32: output SQNR (each output's and, with several, the
    combined figure, labelled so), its interval, and top-1 agreement of the class-score outputs."""
    per = m.get("per_output_sqnr_db") or {}
    several = len(per) > 1
    label = f"measured output SQNR, {len(per)} outputs combined:" if several else "measured output SQNR:"
    line = f"{label}  {_db(m['output_sqnr_db'])} dB on {m['samples']} {where}"
    ci = m.get("output_sqnr_db_95")
    if ci and all(v is not None for v in ci):
        line += f" (95% interval {_db(ci[0])} to {_db(ci[1])} dB" + \
                ("; stopped there, the interval being tight enough)" if m.get("stopped_early") else ")")
    agree = m.get("top1_agreement_per_output")
    if agree is None and m.get("top1_agreement") is not None:  # a report of an earlier version
        agree = {"": m["top1_agreement"]}
    agree = agree or {}
    if not several and agree:
        line += f"; top-1 agreement with FP32 {100 * next(iter(agree.values())):.2f}%"
    lines = [line]
    if several:
        for name, db in per.items():
            lines.append(f"  output {name}: {_db(db)} dB"
                         + (f"; top-1 agreement with FP32 {100 * agree[name]:.2f}%" if name in agree else ""))
        if not agree:
            lines.append("  (no output holds class scores, so no top-1 agreement; name one with --class-output)")
    return lines


def allocation_lines(alloc: Optional[dict]) -> list:
    """Mixed precision: each round's predicted vs measured SQNR, each evaluation, the outcome."""
    if not alloc:
        return []
    b = alloc.get("budgets") or {}
    limits = ", ".join(f"{k} {v}" for k, v in b.items() if v is not None)
    lines = [f"mixed precision ({alloc['mode']}): widths from {alloc['bits_set']}"
             + (f", target {alloc['target_sqnr_db']} dB" if alloc.get("target_sqnr_db") is not None else "")
             + (f", budgets: {limits}" if limits else "")
             + f"; sensitivity: {alloc['sensitivity']} (round predictions weight each term by it;"
             " the line above weights all terms equally)"]
    for r in alloc.get("rounds") or []:
        lines.append(f"  round {r.get('round', 0)}: predicted {_db(r['predicted_db'])} dB"
                     f" (x{r['noise_correction']:.3g} correction: {_db(r['predicted_corrected_db'])} dB),"
                     f" measured {_db(r['measured_db']) if r['measured_db'] is not None else '-'} dB;"
                     f" avg W {r['avg_wbits']:.2f} / A {r['avg_abits']:.2f} bits,"
                     f" packed weights {r['packed_weight_bytes'] / 1e3:.1f} kB")
    for i, e in enumerate(alloc.get("evaluations") or []):
        lines.append(f"  evaluation {i + 1}: candidate {e['candidate'] + 1}/{e['of']} (target {e['target_db']:.0f} dB,"
                     f" predicted {_db(e['predicted_db'])} dB, avg W {e['avg_wbits']:.2f} / A {e['avg_abits']:.2f}):"
                     f" top-1 {100 * e['top1_quant']:.2f}% vs FP32 {100 * e['top1_fp32']:.2f}%"
                     f" (drop {e['drop_points']:.2f} points) {'pass' if e['passes'] else 'fail'}")
    for n in alloc.get("notes") or []:
        lines.append(f"  note: {n}")
    if alloc.get("result"):
        lines.append(f"  result: {alloc['result']}")
    return lines


def print_report(report: dict, console: Optional[Console] = None, title: Optional[str] = None) -> None:
    console = console or Console()
    console.print(layer_table(report, title))
    techniques = technique_table(report)
    if techniques is not None:
        console.print(techniques)
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)
