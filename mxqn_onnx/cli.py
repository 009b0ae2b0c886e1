"""``mxqn-onnx`` command line: convert, inspect, evaluate. A thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from rich.console import Console

from . import __version__
from .config import ACT_MODES, GRANULARITIES, QuantConfig
from .data import PREPROCESSING
from .errors import MxqnError


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
                   help="fractional length per tensor, per output channel, or chosen per layer by SQNR (auto)")
    q.add_argument("--act-quant", choices=ACT_MODES, default="auto",
                   help="activation quantizer: fixed, log, or chosen per tensor by SQNR (auto)")
    q.add_argument("--log-margin", type=float, default=0.0, metavar="DB",
                   help="log must beat fixed point by this many dB to be chosen (default 0)")
    q.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave nodes whose name matches (glob) in float; repeatable")
    q.add_argument("--keep-first", action="store_true", help="keep the first layer at --keep-bits")
    q.add_argument("--keep-last", action="store_true", help="keep the last layer at --keep-bits")
    q.add_argument("--keep-bits", type=int, default=8, help="bits for --keep-first/--keep-last (default 8)")
    q.add_argument("--keep-float", action="store_true", help="keep those layers in float instead")
    q.add_argument("--no-bias-correction", action="store_true",
                   help="do not correct biases for the mean shift caused by weight quantization")
    o = p.add_argument_group("output")
    o.add_argument("--report", metavar="FILE", help="also write the report as JSON")
    o.add_argument("--no-verify", action="store_true",
                   help="skip running the quantized model to measure output SQNR")
    o.add_argument("--verify-count", type=int, default=256, help="samples for that measurement (default 256)")
    o.add_argument("--quiet", action="store_true", help="no progress bar and no table")


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
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mxqn-onnx", description="MXQN post-training quantization of ONNX CNNs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_convert(sub)
    _add_inspect(sub)
    _add_evaluate(sub)
    return parser


def _check_output_path(inp: str, out: str, what: str = "output") -> None:
    out_p = Path(out)
    if Path(inp).exists() and out_p.exists() and os.path.samefile(inp, out_p):
        raise MxqnError(f"{what} path {out} is the input model; choose another file name")
    if out_p.is_dir():
        raise MxqnError(f"{what} path {out} is a folder; give a file name")
    folder = out_p.parent if str(out_p.parent) else Path(".")
    if not folder.is_dir():
        raise MxqnError(f"{what} folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise MxqnError(f"{what} folder {folder} is not writable")


def cmd_convert(args, console: Console, err: Console) -> int:
    from .api import quantize, save_model_atomic

    if not Path(args.input).is_file():
        raise MxqnError(f"{args.input}: no such file; give the path of an .onnx model")
    _check_output_path(args.input, args.output)
    if args.report:
        _check_output_path(args.input, args.report, "report")
    config = QuantConfig(
        wbits=args.wbits, abits=args.abits, weight_granularity=args.weight_granularity,
        act_quant=args.act_quant, log_margin_db=args.log_margin, exclude=tuple(args.exclude),
        keep_first=args.keep_first, keep_last=args.keep_last, keep_float=args.keep_float,
        keep_bits=args.keep_bits, calib_count=args.calib_count, batch_size=args.batch_size,
        verify=not args.no_verify, verify_count=args.verify_count,
        bias_correction=not args.no_bias_correction,
    ).validate()
    if args.calib is None:
        raise MxqnError("no calibration data; give --calib FILE|FOLDER (or --calib random for a smoke test)")
    if args.calib == "random":
        err.print("[bold red]WARNING: calibrating on random data. The chosen quantizers and every SQNR "
                  "below are meaningless for real inputs; use real samples for a model you deploy.[/]")
    result = quantize(args.input, args.calib, config, progress=not args.quiet,
                      preprocess=args.preprocess,
                      image_size=tuple(args.image_size) if args.image_size else None)
    report = result.report()
    if not args.quiet:
        from .report import print_report

        print_report(report, console, title=f"mxqn-onnx: {args.input}")
    save_model_atomic(result.model, args.output)
    if args.report:
        tmp = Path(args.report).with_name(f".{Path(args.report).name}.tmp")
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, args.report)
    console.print(f"wrote {args.output}", highlight=False)
    return 0


def cmd_inspect(args, console: Console, err: Console) -> int:
    from .inspection import inspect_model

    info = inspect_model(args.model)
    if args.json:
        console.print_json(json.dumps(info))
        return 0
    from .inspection import print_inspection

    print_inspection(info, console)
    return 0


def cmd_evaluate(args, console: Console, err: Console) -> int:
    from .data import input_specs, make_source
    from .loading import is_mxqn_model
    from .measure import compare
    import onnx

    models = []
    for path in (args.fp32, args.quant):
        if not Path(path).is_file():
            raise MxqnError(f"{path}: no such file; give the path of an .onnx model")
        try:
            models.append(onnx.load(path))
        except Exception as exc:
            raise MxqnError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if is_mxqn_model(models[0]) and not is_mxqn_model(models[1]):
        err.print("note: the first model is the mxqn one; the first argument should be the FP32 model")
    source = make_source(args.data, input_specs(models[0]), args.batch_size)
    c = compare(models[0], models[1], source.batches(), source.labels)
    d = c.to_dict()
    if args.json:
        console.print_json(json.dumps(d))
        return 0
    console.print(f"samples: {c.samples}", highlight=False)
    if c.top1_ref is not None:
        console.print(f"top-1 accuracy: FP32 {100 * c.top1_ref:.2f}%  quantized {100 * c.top1_quant:.2f}%  "
                      f"(change {100 * (c.top1_quant - c.top1_ref):+.2f} points)", highlight=False)
    console.print(f"top-1 agreement: {100 * c.agreement:.2f}%", highlight=False)
    console.print(f"output SQNR: {c.output_sqnr_db:.2f} dB", highlight=False)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    err = Console(stderr=True)
    handler = {"convert": cmd_convert, "inspect": cmd_inspect, "evaluate": cmd_evaluate}[args.command]
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
