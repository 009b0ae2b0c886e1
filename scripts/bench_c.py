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
* top-1 accuracy on the test split (FP32 in onnxruntime, the two C programs).

Models: the shipped digits CNN (28x28) and VGG16 (32x32), plus the zoo's digits models when
``cache/zoo`` holds them (``scripts/train_zoo.py``). Absolute times are this machine's; the C
is portable scalar C99 (GCC is asked to vectorize the layer loops), onnxruntime uses its
SIMD kernels.

Usage::

    python scripts/bench_c.py
    python scripts/bench_c.py --rounds 5 --samples 200 --json bench_c.json
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
from mxqn_onnx.integer.c_run import build_c, code_size, compiler, run_c  # noqa: E402


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


def bench(name, path, calib, test, work: Path, rounds: int, samples: int) -> dict:
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
        build_c(d, exe)
        obj = work / f"{name}_{k}_model.o"
        subprocess.run(  # the model object alone: what firmware links
            [compiler(), "-O2", "-std=c99", "-c", "-o", str(obj), str(d / "model.c")], check=True)
        exes[k] = (exe, info["output_size"])
        y, _ = run_c(exe, x, info["output_size"])
        meta = json.loads(next(p.value for p in m.metadata_props if p.key == "mxqn"))
        row[k] = {"code_bytes": code_size(obj), "arena_bytes": info["arena_bytes"],
                  "weight_bytes": info["weight_bytes"], "top1": float(np.mean(y.argmax(1) == labels)),
                  "log_quantizers": sum(a["kind"] == "log" for a in meta["activations"]),
                  "quantizers": len(meta["activations"]), "float_ops": info["float_ops"]}
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
    return row


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
    args = ap.parse_args(argv)
    if compiler() is None:
        print("no C compiler (cc, gcc, clang or $CC)", file=sys.stderr)
        return 2
    models = [("digits_cnn", ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_calib.npz",
               ROOT / "models" / "digits_test.npz"),
              ("digits32_vgg16", ROOT / "models" / "digits32_vgg16.onnx", ROOT / "models" / "digits32_calib.npz",
               ROOT / "models" / "digits32_test.npz")] + zoo_models()
    print(f"onnxruntime {ort.__version__}, 1 thread, batch 1; C: {compiler()} -O2 -std=c99; "
          f"CPU time per sample, median of {args.rounds} interleaved rounds of {args.samples} samples", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, calib, test in models:
            rows.append(bench(name, path, calib, test, Path(tmp), args.rounds, args.samples))
            print(f"  {name}: done", flush=True)
    print()
    print(table(rows))
    print("\ncode and arena: per-layer fixed/log model (fixed-only model in parentheses); "
          "C code = model.c object, weights included")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
