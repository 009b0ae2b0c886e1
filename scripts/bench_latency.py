"""onnxruntime latency of FP32 vs the mxqn format vs the qdq format, measured in one run.

For each model: convert it four ways (FP32 as is; ``--format mxqn``; ``--format qdq
--act-quant fixed`` in the default encoding and with ``--qdq-encoding int8``), time batch-1
inference of each in onnxruntime (CPU, all graph optimizations, the same thread settings),
interleaving the models round by round so that
clock and load drift hit all of them alike, and print the median latencies with their ratios
to FP32. File sizes (including ``--opset 21 --wbits 4`` with packed int4 weights) are printed
too. Ratios are what to compare across machines; absolute times are only this machine's.

Models: the shipped digits CNN, and an ImageNet-sized ResNet-50 (224x224): taken from
``cache/r50/resnet50_224.onnx`` (written by ``scripts/train_zoo.py --resnet50-224``) when
present, otherwise built here with random weights in torch and exported.

Usage::

    python scripts/bench_latency.py                 # both models
    python scripts/bench_latency.py --models digits --rounds 50
    python scripts/bench_latency.py --json latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def build_resnet50(path: Path) -> None:
    """Export a torch ResNet-50 (random weights, BatchNorm in eval mode) at 224x224."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers, cin = [], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    net = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(2048, 1000)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():  # keep activations in range through 16 residual blocks
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(0.5)
        torch.onnx.export(net, torch.randn(1, 3, 224, 224), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}}, opset_version=13,
                          dynamo=False)


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_interleaved(sessions: dict, feed: dict, rounds: int, warmup: int) -> dict:
    """Median seconds per run of each session, the sessions taking turns every round."""
    times = {k: [] for k in sessions}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(name: str, fp32_path: Path, calib, sample: np.ndarray, rounds: int, warmup: int,
          threads: int, calib_count: int) -> dict:
    fp32 = onnx.load(str(fp32_path))
    common = dict(verify=False, calib_count=calib_count)
    t = time.perf_counter()
    mx = mxqn_onnx.quantize(fp32, calib, format="mxqn", **common)
    qdq = mxqn_onnx.quantize(fp32, calib, format="qdq", act_quant="fixed", **common)
    qdq_int8 = mxqn_onnx.quantize(fp32, calib, format="qdq", act_quant="fixed", qdq_encoding="int8", **common)
    int4 = mxqn_onnx.quantize(fp32, calib, format="qdq", act_quant="fixed", wbits=4, opset=21, **common)
    convert_s = time.perf_counter() - t
    models = {"fp32": fp32, "mxqn": mx.model, "qdq": qdq.model, "qdq-int8": qdq_int8.model}
    sessions = {k: session(m, threads) for k, m in models.items()}
    feed = {"input": sample}
    med = time_interleaved(sessions, feed, rounds, warmup)
    sizes = {"fp32": fp32.ByteSize(), "mxqn_w8": mx.model.ByteSize(), "qdq_w8": qdq.model.ByteSize(),
             "qdq_w4_int4_opset21": int4.model.ByteSize()}
    out = {"model": name, "input_shape": list(sample.shape), "rounds": rounds, "threads": threads,
           "median_ms": {k: 1000 * v for k, v in med.items()},
           "ratio_to_fp32": {k: med[k] / med["fp32"] for k in med},
           "speedup_qdq_vs_fp32": med["fp32"] / med["qdq"],
           "size_bytes": sizes, "convert_s": convert_s,
           "layers": len(qdq.layers)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,resnet50", help="comma list of: digits, resnet50")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), batch 1, median of {args.rounds} "
          "interleaved rounds", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "digits":
                calib = ROOT / "models" / "digits_calib.npz"
                sample = np.load(calib)["input"][:1]
                results.append(bench("digits_cnn", ROOT / "models" / "digits_cnn.onnx", calib, sample,
                                     args.rounds * 10, args.warmup, args.threads, 256))
            elif name == "resnet50":
                path = ROOT / "cache" / "r50" / "resnet50_224.onnx"
                calib_path = ROOT / "cache" / "r50" / "resnet50_224_calib.npy"
                if not path.exists():
                    path = Path(tmp) / "resnet50_224.onnx"
                    print("building a random-weight ResNet-50 at 224x224 with torch ...", flush=True)
                    build_resnet50(path)
                rng = np.random.default_rng(0)
                calib = np.load(calib_path, mmap_mode="r")[:8].astype(np.float32) if calib_path.exists() \
                    else rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
                results.append(bench("resnet50_224", path, calib, calib[:1].copy(), args.rounds,
                                     args.warmup, args.threads, 8))
            else:
                ap.error(f"unknown model {name}")
            r = results[-1]
            ms, ratio = r["median_ms"], r["ratio_to_fp32"]
            print(f"\n{r['model']} ({r['layers']} quantized layers, input {r['input_shape']})")
            for k in ("fp32", "mxqn", "qdq", "qdq-int8"):
                print(f"  {k:8s} {ms[k]:9.3f} ms   x{ratio[k]:.2f} of FP32")
            print(f"  qdq (fixed point, 8 bit) is {r['speedup_qdq_vs_fp32']:.2f}x as fast as FP32")
            sz = r["size_bytes"]
            print("  file sizes: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in sz.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
