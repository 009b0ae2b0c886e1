"""``mxqn-onnx`` command line: convert, inspect, evaluate, report, simulate, export-c. A thin layer over the API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from rich.console import Console

from ._version import __version__
from .calibration.data import PREPROCESSING
from .config import (ACT_MODES, AUTO_ROUNDING_MAX_BITS, BIAS_MEANS, DEPTHWISE_SHIFTS, EQUALIZE, FORMATS,
                     KEEP_ENDS, LAYER_OUTPUTS, QDQ_ENCODINGS, GRANULARITIES, OBJECTIVES, ROUNDINGS, SENSITIVITIES,
                     QuantConfig)
from .errors import MxqnError
from .writing import check_replaceable


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="quantize an FP32 ONNX model with MXQN",
                       description="Quantize an FP32 ONNX model: fixed-point weights, fixed-point "
                                   "or log activations chosen per layer by SQNR.")
    p.add_argument("input", help="FP32 .onnx model")
    p.add_argument("output", help="where to write the quantized .onnx model")
    d = p.add_argument_group("calibration data")
    d.add_argument("--calib", help=".npy (single input), .npz (one key per input), a folder of images, "
                                   "or 'random' (smoke tests only: results are meaningless)")
    d.add_argument("--calib-count", type=int, default=None, help="use at most N samples (default: all)")
    d.add_argument("--batch-size", type=int, default=16, help="samples per onnxruntime run (default 16)")
    d.add_argument("--preprocess", choices=PREPROCESSING, default="none",
                   help="image folders: none (0..255), unit ([0,1]) or imagenet (resize, crop, normalise)")
    d.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="image size when the model's input size is dynamic")
    q = p.add_argument_group("quantization")
    q.add_argument("--wbits", type=int, default=8, help="weight bits (default 8)")
    q.add_argument("--abits", type=int, default=8, help="activation bits (default 8)")
    q.add_argument("--weight-granularity", choices=GRANULARITIES, default="auto",
                   help="fractional length per tensor, per output channel, or chosen per layer (auto: per "
                        "channel where that raises the mean of the output channels' own weight SQNRs "
                        "by more than 0.5 dB)")
    q.add_argument("--act-quant", choices=ACT_MODES, default=None,
                   help="activation quantizer: fixed, log, or chosen per tensor by SQNR (auto); "
                        "default auto for --format mxqn, fixed for --format qdq")
    q.add_argument("--log-margin", type=float, default=0.0, metavar="DB",
                   help="log must beat fixed point by this many dB to be chosen (default 0)")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave nodes whose name matches (glob) in float; repeatable")
    q.add_argument("--keep-first", action="store_true", help="keep the first layer at --keep-bits")
    q.add_argument("--keep-last", action="store_true", help="keep the last layer at --keep-bits")
    q.add_argument("--keep-bits", type=int, default=8, help="bits for --keep-first/--keep-last (default 8)")
    q.add_argument("--keep-float", action="store_true", help="keep those layers in float instead")
    q.add_argument("--keep-ends", choices=KEEP_ENDS, default=QuantConfig.keep_ends,
                   help="auto: below --keep-bits, the held-back check also tries the first and last layer "
                        "at --keep-bits and keeps them there where that measures better; off: never "
                        "(default auto)")
    q.add_argument("--weight-clip", action="store_true",
                   help="let weight fractional lengths clip the largest weights when that raises "
                        "weight SQNR (off: it usually lowers output SQNR at low bit widths)")
    q.add_argument("--align-channels", action="store_true",
                   help="rescale output channels (compensated in the next layer) so their weights "
                        "fill the power-of-two grid; often better at 4-bit weights, see README")
    q.add_argument("--no-bias-correction", action="store_true",
                   help="do not correct biases for the mean output shift that quantization causes")
    q.add_argument("--bias-means", choices=BIAS_MEANS, default=QuantConfig.bias_means,
                   help="input channel means for bias correction: calibration data, the preceding "
                        "BatchNorm (data-free), or auto: batchnorm with --calib random, data otherwise")
    q.add_argument("--rounding", choices=ROUNDINGS, default=QuantConfig.rounding,
                   help="weight rounding: nearest, gptq (codes chosen for the layer's output error on "
                        f"calibration inputs) or auto (gptq at <= {AUTO_ROUNDING_MAX_BITS}-bit weights, and at any "
                        "width where it is cheap: small models; default)")
    q.add_argument("--act-objective", choices=OBJECTIVES, default=QuantConfig.act_objective,
                   help="choose activation quantizers for their own SQNR (tensor) or for the SQNR at "
                        f"the outputs of the layers reading them (output); default {QuantConfig.act_objective}")
    q.add_argument("--equalize", choices=EQUALIZE, default=QuantConfig.equalize,
                   help="cross-layer equalization before calibration: off, pow2 (exact) or float; "
                        f"default {QuantConfig.equalize}")
    q.add_argument("--depthwise-shift", choices=DEPTHWISE_SHIFTS, default=QuantConfig.depthwise_shift,
                   help="shift each input channel of a depthwise conv by a power of two (exact; the "
                        "filters are divided by the same) so one activation quantizer serves every channel: "
                        "on, off, or auto (kept where the held-back check measures it better; default)")
    q.add_argument("--no-holdout", action="store_true",
                   help="use every calibration sample for bias correction and rounding, and keep them "
                        "without checking on held-back samples that they help (default: checked)")
    q.add_argument("--data-samples", type=int, default=QuantConfig.data_samples, metavar="N",
                   help="calibration samples whose layer inputs feed rounding and --act-objective output "
                        f"(default {QuantConfig.data_samples}, capped at 256 MB)")
    _add_mixed_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--report", metavar="FILE", help="also write the report as JSON")
    o.add_argument("--allow-empty", action="store_true",
                   help="write the model even when no layer can be quantized (default: refuse)")
    o.add_argument("--plot", metavar="DIR", help="write PNG plots (per-layer SQNR and bits, predicted vs "
                                                 "measured output SQNR, activation histograms) to DIR; "
                                                 "needs matplotlib (pip install 'mxqn-onnx[plot]')")
    o.add_argument("--no-verify", action="store_true",
                   help="skip running the quantized model to measure output SQNR")
    o.add_argument("--verify-count", type=int, default=256,
                   help="at most this many samples for that measurement (default 256); it stops earlier once "
                        "the output SQNR's 95%% interval is within 1 dB either side, and reports the interval")
    o.add_argument("--class-output", action="append", default=[], metavar="NAME",
                   help="an output holding class scores, whose top-1 agreement with FP32 is reported; "
                        "repeatable (default: every output shaped (N, C); others get SQNR only)")
    o.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    o.add_argument("--format", choices=FORMATS, default="mxqn",
                   help="mxqn: Cast/Mul weights and FixedQuant/LogQuant nodes (default); qdq: standard "
                        "QuantizeLinear/DequantizeLinear with scales 2^-f for fixed-point tensors "
                        "(always standard ONNX: activations fixed point by default, log ones asked for "
                        "with --act-quant auto/log written as inlined standard ops)")
    o.add_argument("--qdq-encoding", choices=QDQ_ENCODINGS, default="safe",
                   help="how --format qdq stores 8-bit codes: safe (default; int8 weights, 7-bit codes "
                        "in layers whose 8-bit ones could saturate onnxruntime's int16 pair sums on x86 "
                        "CPUs without VNNI: exact on every CPU, int8 in onnxruntime and OpenVINO), uint8 "
                        "(full 8-bit codes, uint8 with zero point 128 where int8 could saturate: exact "
                        "everywhere, onnxruntime only) or int8 (signed, zero point 0: for TensorRT; "
                        "exact in onnxruntime only with VNNI or on Arm)")
    o.add_argument("--qdq-layer-outputs", choices=LAYER_OUTPUTS, nargs="?", const="on",
                   default=QuantConfig.qdq_layer_outputs,
                   help="--format qdq: also quantize layer outputs no quantizer follows (a conv before "
                        "HardSwish or a residual Add) so that onnxruntime fuses those layers too; auto "
                        "(default): unless the held-back samples measure the model without them as more "
                        "accurate (the bare flag: on)")
    o.add_argument("--opset", type=int, default=None, metavar="N",
                   help="raise the output's opset to N (21+ stores <=4-bit weights as packed int4 "
                        "and allows 16-bit QDQ)")


def _bits_set(text: str) -> tuple:
    """``2,4,8`` or ``2-8`` (or a mix: ``2-4,8``) as a tuple of widths."""
    out = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of widths such as 2,4,8 or 2-8") from None
    if not out:
        raise argparse.ArgumentTypeError("empty bit set")
    return tuple(out)


def _add_mixed_args(p) -> None:
    m = p.add_argument_group("mixed precision (per-layer widths from the SQNR noise model; see README)")
    m.add_argument("--target-sqnr", type=float, metavar="DB",
                   help="reach this output SQNR with the fewest bits; verified and refined on calibration data")
    m.add_argument("--avg-wbits", type=float, metavar="B", help="budget: average weight bits per parameter")
    m.add_argument("--avg-abits", type=float, metavar="B", help="budget: average activation bits per element")
    m.add_argument("--max-size", type=float, metavar="MB",
                   help="budget: packed weight storage in MB (weights at their widths + int32 biases)")
    m.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                   help="smallest model whose top-1 on --val is within POINTS of FP32 (each try is evaluated)")
    m.add_argument("--val", metavar="FILE", help="labelled validation data (.npz with 'labels') for --max-accuracy-drop")
    m.add_argument("--bits-set", type=_bits_set, default=(2, 3, 4, 5, 6, 7, 8), metavar="LIST",
                   help="widths a layer may get, e.g. 4,6,8 or 2-8 (default 2-8)")
    m.add_argument("--sensitivity", choices=SENSITIVITIES, default="quantizer",
                   help="how each layer's noise reaches the output: quantizer (measured with the real "
                        "quantizers, one layer at a time; default), noise (Gaussian noise injection), "
                        "none (plain 1/SQNR_out = sum 1/SQNR_i)")
    m.add_argument("--refine", type=int, default=3, metavar="N",
                   help="at most N re-allocations when the measured SQNR misses --target-sqnr (default 3)")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="print (and plot) the decisions of a converted model or a --report JSON")
    p.add_argument("model", help="an mxqn .onnx model, or a JSON report written by convert --report")
    p.add_argument("--plot", metavar="DIR", help="write the PNG plots to DIR (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no table")


def cmd_report(args, console: Console, err: Console) -> int:
    from .report.inspection import load_report
    from .report.tables import print_report

    report, kind = load_report(args.model)
    if args.plot:
        from .report.plots import check_plot_folder

        check_plot_folder(args.plot)
    if not args.quiet:
        print_report(report, console, title=f"mxqn-onnx: {args.model}")
    if args.plot:
        from .report.plots import write_plots

        files = write_plots(report, args.plot)
        console.print(f"wrote {len(files)} plots to {args.plot}", highlight=False)
        if kind == "model":
            console.print("note: a model's metadata holds no calibration histograms, so the histogram "
                          "plots show the quantizer levels over the calibrated range only; plot the "
                          "--report JSON of the conversion for the histograms", highlight=False)
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list the layers a model would quantize, or an mxqn model's decisions")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="compare an FP32 model and its quantized version on data")
    p.add_argument("fp32")
    p.add_argument("quant")
    p.add_argument("--data", required=True, help=".npz with the model inputs (and 'labels' for accuracy), or .npy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--class-output", action="append", default=[], metavar="NAME",
                   help="an output holding class scores (top-1 agreement and accuracy); repeatable "
                        "(default: every output shaped (N, C))")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="run an mxqn model with the integer-only reference executor "
                                        "and compare it with onnxruntime")
    p.add_argument("model", help="a model written by mxqn-onnx convert (--format mxqn)")
    p.add_argument("--data", required=True, help=".npz with the model inputs, or .npy")
    p.add_argument("--count", type=int, default=64, help="samples to run (default 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_simulate(args, console: Console, err: Console) -> int:
    from .integer.executor import simulate_file

    if not Path(args.model).is_file():
        raise MxqnError(f"{args.model}: no such file; give the path of an mxqn .onnx model")
    rep = simulate_file(args.model, args.data, count=args.count, batch_size=args.batch_size)
    if args.json:
        console.print_json(json.dumps(rep))
        return 0
    console.print(f"samples: {rep['samples']}; {len(rep['layers_integer'])} layers run in integer arithmetic; "
                  "each layer compared with onnxruntime on identical inputs", highlight=False)
    for q in rep["quantizers"]:
        console.print(f"  {q['node']}: {q['kind']} codes differing {q['mismatches']}/{q['elements']}, "
                      f"max |diff| {q['max_code_diff']} step(s)", highlight=False, markup=False)
    for o in rep["outputs"]:
        steps = "n/a (float output)" if o["max_diff_steps"] is None else f"{o['max_diff_steps']:.3g} step(s)"
        agree = o["free_running_top1_agreement"]
        console.print(f"  output {o['name']}: max |diff| {o['max_abs_diff']:.3g} = {steps}; free-running: "
                      f"SQNR vs onnxruntime {o['free_running_sqnr_db']:.1f} dB"
                      + (f", top-1 agreement {100 * agree:.2f}%" if agree is not None else ""),
                      highlight=False, markup=False)
    console.print("within one step everywhere" if rep["within_one_step"] else
                  "DIFFERS by more than one step somewhere (see above)", highlight=False)
    return 0 if rep["within_one_step"] else 1


def _add_export_c(sub) -> None:
    p = sub.add_parser("export-c", help="write an mxqn model as integer-only C99 (model.h, model.c, main.c)",
                       description="Write a converted (--format mxqn) model as portable C99: integer "
                                   "layers, one static arena, a ./run IN.bin OUT.bin harness. Build with "
                                   "cc -O2 -std=c99 -o run DIR/*.c -lm")
    p.add_argument("model", help="a model written by mxqn-onnx convert (--format mxqn)")
    p.add_argument("dir", help="folder to write (only this command's own files in it are replaced)")
    p.add_argument("--input-shape", nargs="+", metavar="D",
                   help="sample shape, batch 1 (1,3,224,224 or 1 3 224 224) when the input has dynamic dimensions")
    p.add_argument("--board", choices=("mps2-an386", "mps2-an500"),
                   help="also write startup code, linker script and Makefile for this Cortex-M board "
                        "(make -C DIR qemu IN=in.bin OUT=out.bin runs it under qemu-system-arm)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def _shape_arg(parts: Optional[List[str]]) -> Optional[List[int]]:
    """``--input-shape 1,3,48,192``, ``1 3 48 192`` or ``"1 3 48 192"``: a list of ints."""
    if parts is None:
        return None
    items = " ".join(parts).replace(",", " ").split()
    try:
        dims = [int(d) for d in items]
    except ValueError:
        raise MxqnError(f"--input-shape {' '.join(parts)!r}: give whole numbers, e.g. 1,3,48,192 or 1 3 48 192") from None
    if not dims or any(d <= 0 for d in dims):
        raise MxqnError(f"--input-shape {' '.join(parts)!r}: every dimension must be a positive whole number")
    return dims


def cmd_export_c(args, console: Console, err: Console) -> int:
    from .integer.c_export import export_c

    info = export_c(args.model, args.dir, input_shape=_shape_arg(args.input_shape), board=args.board)
    if args.json:
        console.print_json(json.dumps({k: v for k, v in info.items() if k != "debug_records"}))
        return 0
    console.print(f"wrote {info['dir']}: {info['layers']} integer layers, activation arena {info['arena_bytes']} "
                  f"bytes, weights {info['weight_bytes']} bytes; build: cc -O2 -std=c99 -o run {info['dir']}/*.c -lm",
                  highlight=False, markup=False, soft_wrap=True)
    if info["float_ops"]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(info["float_summary"].items(), key=lambda kv: -kv[1]))
        console.print(f"float C ({len(info['float_ops'])} steps, --json lists them): {kinds}",
                      highlight=False, markup=False, soft_wrap=True)
    if info.get("board"):
        sz = info.get("board_size")
        if sz and "error" in sz:
            console.print(f"{info['board']}: the board build failed here ({sz['error']})", highlight=False,
                          markup=False, soft_wrap=True)
        elif sz:
            console.print(f"{info['board']}: flash {sz['flash_bytes']} bytes (model {sz['model_flash_bytes']}), RAM "
                          f"{sz['ram_bytes']} bytes (model {sz['model_ram_bytes']}; the rest: newlib stdio, 16 KiB "
                          f"heap, 16 KiB stack), from arm-none-eabi-size; run: make -C {info['dir']} qemu IN=in.bin "
                          "OUT=out.bin", highlight=False, markup=False, soft_wrap=True)
        else:
            console.print(f"{info['board']}: no arm-none-eabi-gcc/qemu here, so no flash/RAM figures; build: "
                          f"make -C {info['dir']}", highlight=False, markup=False, soft_wrap=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mxqn-onnx", description="MXQN post-training quantization of ONNX CNNs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_convert(sub)
    _add_inspect(sub)
    _add_evaluate(sub)
    _add_report(sub)
    _add_simulate(sub)
    _add_export_c(sub)
    return parser


def _check_output_path(inp: str, out: str, what: str = "output") -> None:
    out_p = Path(out)
    if Path(inp).exists() and out_p.exists() and os.path.samefile(inp, out_p):
        raise MxqnError(f"{what} path {out} is the input model; choose another file name")
    if out_p.is_dir():
        raise MxqnError(f"{what} path {out} is a folder; give a file name")
    folder = out_p.parent if str(out_p.parent) else Path(".")
    if not folder.is_dir():
        if folder.exists():
            raise MxqnError(f"{what} folder {folder} is not a folder; give a path inside a folder")
        raise MxqnError(f"{what} folder {folder} does not exist; create it first")
    # try a real file before the (long) conversion: os.access() says yes to root even
    # where nothing can be written (read-only mounts, /proc)
    try:
        fd, probe = tempfile.mkstemp(prefix=".mxqn-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MxqnError(f"{what} folder {folder} is not writable ({exc.strerror or exc})") from None


def _is_our_model(path: Path) -> bool:
    """An earlier output of ``convert`` (an ONNX model holding our decisions)."""
    import onnx

    from .graph.loading import is_mxqn_model

    try:
        return is_mxqn_model(onnx.load(str(path), format="protobuf", load_external_data=False))
    except Exception:  # not ONNX at all: certainly not ours
        return False


def _is_our_report(path: Path) -> bool:
    """An earlier ``--report`` JSON."""
    try:
        return str(json.loads(path.read_text()).get("producer", "")).startswith("mxqn-onnx")
    except (OSError, ValueError, AttributeError):
        return False


def cmd_convert(args, console: Console, err: Console) -> int:
    from .api import quantize
    from .writing import save_model_atomic, write_atomic

    if not Path(args.input).is_file():
        raise MxqnError(f"{args.input}: no such file; give the path of an .onnx model")
    _check_output_path(args.input, args.output)
    check_replaceable(args.output, _is_our_model, "output model")
    if args.report:
        _check_output_path(args.input, args.report, "report")
        check_replaceable(args.report, _is_our_report, "report")
    if args.plot:
        from .report.plots import check_plot_folder, require_matplotlib

        require_matplotlib()  # fail before the conversion, not after it
        check_plot_folder(args.plot)
    config = QuantConfig(
        wbits=args.wbits, abits=args.abits, weight_granularity=args.weight_granularity,
        act_quant=args.act_quant, log_margin_db=args.log_margin, exclude=tuple(args.exclude),
        keep_first=args.keep_first, keep_last=args.keep_last, keep_float=args.keep_float,
        keep_ends=args.keep_ends,
        keep_bits=args.keep_bits, calib_count=args.calib_count, batch_size=args.batch_size,
        verify=not args.no_verify, verify_count=args.verify_count, class_outputs=tuple(args.class_output),
        bias_correction=not args.no_bias_correction, weight_clip=args.weight_clip,
        align_channels=args.align_channels, allow_empty=args.allow_empty,
        bias_means=args.bias_means, rounding=args.rounding, act_objective=args.act_objective,
        equalize=args.equalize, data_samples=args.data_samples, holdout=not args.no_holdout,
        depthwise_shift=args.depthwise_shift,
        format=args.format, opset=args.opset, qdq_encoding=args.qdq_encoding,
        qdq_layer_outputs=args.qdq_layer_outputs,
        target_sqnr_db=args.target_sqnr, avg_wbits=args.avg_wbits, avg_abits=args.avg_abits,
        max_size_mb=args.max_size, max_accuracy_drop=args.max_accuracy_drop, bits_set=args.bits_set,
        sensitivity=args.sensitivity, refine_steps=args.refine,
    ).validate()
    if args.max_accuracy_drop is not None and not args.val:
        raise MxqnError("--max-accuracy-drop needs labelled validation data: --val FILE.npz (with 'labels')")
    if args.calib is None:
        raise MxqnError("no calibration data; give --calib FILE|FOLDER (or --calib random for a smoke test)")
    if args.calib == "random":
        err.print("[bold red]WARNING: calibrating on random data. The chosen quantizers and every SQNR "
                  "below are meaningless for real inputs; use real samples for a model you deploy.[/]")
    result = quantize(args.input, args.calib, config, progress=not args.quiet,
                      preprocess=args.preprocess,
                      image_size=tuple(args.image_size) if args.image_size else None,
                      validation=args.val)
    report = result.report()
    if not args.quiet:
        from .report.tables import print_report

        print_report(report, console, title=f"mxqn-onnx: {args.input}")
    save_model_atomic(result.model, args.output)
    if args.report:
        write_atomic(args.report, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode(), "report")
    console.print(f"wrote {args.output}", highlight=False)
    if args.plot:
        from .report.plots import write_plots

        files = write_plots(report, args.plot)
        console.print(f"wrote {len(files)} plots to {args.plot}", highlight=False)
    return 0


def cmd_inspect(args, console: Console, err: Console) -> int:
    from .report.inspection import inspect_model

    info = inspect_model(args.model)
    if args.json:
        console.print_json(json.dumps(info))
        return 0
    from .report.inspection import print_inspection

    print_inspection(info, console)
    return 0


def cmd_evaluate(args, console: Console, err: Console) -> int:
    from .calibration.data import input_specs, make_source
    from .graph.loading import is_mxqn_model, read_model
    from .report.measure import compare

    models = []
    for path in (args.fp32, args.quant):
        if not Path(path).is_file():
            raise MxqnError(f"{path}: no such file; give the path of an .onnx model")
        try:
            models.append(read_model(path))
        except Exception as exc:
            raise MxqnError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if is_mxqn_model(models[0]) and not is_mxqn_model(models[1]):
        err.print("note: the first model is the mxqn one; the first argument should be the FP32 model")
    if args.batch_size < 1:
        raise MxqnError(f"--batch-size must be a positive integer, got {args.batch_size}")
    source = make_source(args.data, input_specs(models[0]), args.batch_size)
    c = compare(models[0], models[1], source.batches(), source.labels, classes=args.class_output or None)
    d = c.to_dict()
    if args.json:
        console.print_json(json.dumps(d))
        return 0
    from .report.tables import measured_lines

    console.print(f"samples: {c.samples}", highlight=False)
    if c.top1_ref is not None:
        console.print(f"top-1 accuracy ({next(iter(c.agree))}): FP32 {100 * c.top1_ref:.2f}%  quantized "
                      f"{100 * c.top1_quant:.2f}%  (change {100 * (c.top1_quant - c.top1_ref):+.2f} points)",
                      highlight=False, markup=False)
    for line in measured_lines(d, "samples"):
        console.print(line, highlight=False, markup=False)
    return 0


#: the width of what is printed when stdout is a file or pipe: wide enough that no table loses a
#: column and no line is cut (a log is read whole, not in an 80-column window)
PIPE_WIDTH = 10_000


def _console() -> Console:
    """Standard output; outside a terminal (logs, CI) at a width that keeps every column."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPE_WIDTH)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    console = _console()
    err = Console(stderr=True)
    handler = {"convert": cmd_convert, "inspect": cmd_inspect, "evaluate": cmd_evaluate, "report": cmd_report,
               "simulate": cmd_simulate, "export-c": cmd_export_c}[args.command]
    try:
        return handler(args, console, err)
    except MxqnError as exc:
        print(f"mxqn-onnx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mxqn-onnx: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
