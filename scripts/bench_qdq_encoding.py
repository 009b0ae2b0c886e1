"""The QDQ output's integer encodings: exactness of onnxruntime's fused kernels, accuracy, latency.

On x86 CPUs without VNNI, onnxruntime runs fused U8S8 products with ``VPMADDUBSW``, whose
int16 pair sums saturate when full-range int8 weights meet large uint8 activations. This
script converts each model with every candidate encoding and measures, in one run:

- **exactness**: output SQNR of the fused model (all graph optimizations: QLinearConv, QGemm)
  against the same model with optimizations off (plain DequantizeLinear + float ops, which
  compute the quantized network exactly), and the largest absolute difference;
- **accuracy**: fused output SQNR against FP32 and top-1 agreement with the labels;
- **latency**: median batch-1 time of the fused model, interleaved with FP32 and onnxruntime's
  own ``quantize_static`` QDQ model (U8 activations, S8 weights, per channel) in the same run.

Candidates: ``safe`` (the default: int8 weights, 7-bit codes in layers where 8-bit ones could
saturate), ``uint8`` (uint8 weights with zero point 128 where int8 could saturate, so the fused
kernel is U8U8), ``int8`` (signed weights, zero point 0: U8S8), and ``int8`` with 7-bit weight
codes everywhere (``--wbits 7``).
Signed activations (unsigned codes stored as int8 with zero point -128, so the kernels are
S8S8) were measured as well and dropped: on an AVX2 CPU onnxruntime saturates them exactly as
it does the int8 encoding.

Run it natively for latency, and under an emulated CPU without VNNI for exactness, e.g.::

    python scripts/bench_qdq_encoding.py
    qemu-x86_64 -cpu Haswell-noTSX $(which python) scripts/bench_qdq_encoding.py --rounds 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import mxqn_onnx  # noqa: E402
from mxqn_onnx.quant import quantizers as Q  # noqa: E402
from bench import run_ort  # noqa: E402
from bench_latency import session, time_interleaved  # noqa: E402

MODELS = {
    "digits_cnn": ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"),
    "digits32_vgg16": ("digits32_vgg16.onnx", "digits32_calib.npz", "digits32_test.npz"),
}

#: name -> quantize() keyword arguments (all with --format qdq --act-quant fixed)
CANDIDATES = {
    "safe (default)": dict(qdq_encoding="safe"),
    "uint8": dict(qdq_encoding="uint8"),
    "int8": dict(qdq_encoding="int8"),
    "int8, 7-bit weights": dict(qdq_encoding="int8", wbits=7),
}


def run(model: onnx.ModelProto, x: np.ndarray, level) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def bench_model(name: str, rounds: int, threads: int) -> list:
    model_file, calib_file, test_file = MODELS[name]
    fp32 = onnx.load(str(ROOT / "models" / model_file))
    calib = ROOT / "models" / calib_file
    test = np.load(ROOT / "models" / test_file)
    x, y = test["input"].astype(np.float32), test["labels"]
    ref = run(fp32, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    models, rows = {"fp32": fp32}, []
    for cand, kw in CANDIDATES.items():
        r = mxqn_onnx.quantize(fp32, calib, format="qdq", act_quant="fixed", verify=False, **kw)
        exact = run(r.model, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        fused = run(r.model, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        rows.append({
            "model": name, "encoding": cand,
            "fused_vs_unfused_sqnr_db": Q.sqnr_of(exact, fused),
            "fused_vs_unfused_max_abs": float(np.max(np.abs(exact - fused))),
            "sqnr_vs_fp32_db": Q.sqnr_of(ref, fused),
            "top1": float(np.mean(fused.argmax(1) == y)),
        })
        models[cand] = r.model
    rows.insert(0, {"model": name, "encoding": "fp32", "top1": float(np.mean(ref.argmax(1) == y))})
    if rounds:
        with tempfile.TemporaryDirectory() as tmp:
            ort_path = os.path.join(tmp, "ort_qdq.onnx")
            cx = np.load(calib)["input"].astype(np.float32)
            run_ort(str(ROOT / "models" / model_file), ort_path, cx, "input", 8, 8, "MinMax", True)
            models["onnxruntime quantize_static"] = onnx.load(ort_path)
        fused = run(models["onnxruntime quantize_static"], x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        rows.append({"model": name, "encoding": "onnxruntime quantize_static",
                     "sqnr_vs_fp32_db": Q.sqnr_of(ref, fused), "top1": float(np.mean(fused.argmax(1) == y))})
        sessions = {k: session(m, threads) for k, m in models.items()}
        med = time_interleaved(sessions, {"input": x[:1]}, rounds, warmup=20)
        for row in rows:
            row["latency_ms"] = 1000 * med[row["encoding"]]
            row["latency_vs_fp32"] = med[row["encoding"]] / med["fp32"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--rounds", type=int, default=300, help="latency rounds (0: skip latency)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    # (no CPU flags printed: under qemu-user /proc/cpuinfo shows the host's, not the emulated CPU's)
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s)")
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            ap.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        rows += bench_model(name, args.rounds, args.threads)
    cols = ["model", "encoding", "fused_vs_unfused_sqnr_db", "fused_vs_unfused_max_abs", "sqnr_vs_fp32_db",
            "top1", "latency_ms", "latency_vs_fp32"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
