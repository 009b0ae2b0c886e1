"""Whole-process conversion cost at real-model scale (issue 12), all references in the same run.

Two networks, built by ``scripts/export_cost_nets.py`` into ``--nets`` (default
``/tmp/mxqn-cost-nets``, built on first use):

* ``resnet50``: the onnx package's light ResNet-50 with He-random weights, batch fixed at 1,
  calibrated on 64 random 224x224 crops of scikit-image's photographs;
* ``detector``: the DBNet-style network (MobileNetV3 backbone, FPN with Resize and
  ConvTranspose, opset 12, every weight a Constant node, dynamic N/H/W), calibrated on 8
  photographs resized/cropped to 3x736x1088.

The calibration samples are written once to an ``.npz`` (key = the model's input name), which
every method reads. Each measurement is a separate whole process started as a user would start
it, wall time and peak RSS taken by ``/usr/bin/time`` (its own ``fork``, so the child's
``ru_maxrss`` does not inherit this process's footprint), interpreter start and imports included:

1. ``mxqn-onnx convert in.onnx out.onnx --calib data.npz --report r.json`` with default options
   (verification included), the same with ``--format qdq``, and on the detector with
   ``--avg-wbits 6 --avg-abits 6`` (stopped after ``--timeout`` seconds and reported as
   ``timeout``, with the peak RSS it had reached; that run's Python stacks are sampled every
   60 s, so the table says where a stopped run was spending its time). The phase timings of
   the report JSON are printed beside each row.
2. onnxruntime's ``quantize_static`` (QDQ, MinMax, per tensor, uint8 activations, int8 weights,
   i.e. its defaults) on the same model and samples, fed one sample per batch, in a helper
   process (``--worker``).
3. Plain FP32 onnxruntime inference over the same samples, one sample per run, in a helper
   process: the floor.
4. onnxruntime inference of every converted model over the same samples (same helper): its
   inference-loop time against FP32's (after one untimed run, whose time is in the JSON as
   ``first_run_s``), and its output SQNR against FP32's outputs. Then all of them and FP32 in
   one process, each model's loop in turn, five rounds: the median ratio to FP32, which the
   targets use (single runs on a shared machine drift by tens of percent).

Beside wall time, each row has the process's CPU time (user + sys, from ``time``) and the
1-minute load average before and after it (in the JSON): on a shared machine wall-time ratios
are only as good as the load was even; CPU time is less sensitive to it.

The ``mxqn``-format model's inference also runs once with onnxruntime's profiler (time per
operator type, FP32 beside it; not timed): the node time of ``Log`` and ``GatherElements``,
which every exact ``LogQuant`` body needs, gives the floor of the converted model's speed.
``mxqn --no-verify --no-holdout`` is timed too (the conversion alone, checking nothing, as
``quantize_static`` does), and so are the two ways to trade accuracy for the converted model's
speed, ``--log-margin 6`` and ``--act-quant fixed``, with their models' inference. With
``--profile``, each model's default ``convert`` also runs once under cProfile (not timed; top
functions by cumulative and by own time). Results go to ``--out``
(default ``/tmp/mxqn-cost-bench``): ``bench_cost.json``, ``cost.md``, one log per process,
the profiles.

Usage::

    python scripts/bench_cost.py                       # both networks, about 15-25 min on 2 cores
    python scripts/bench_cost.py --models resnet50 --profile
    python scripts/bench_cost.py --timeout 300 --skip-mixed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
from bench import NpzReader, _cost_cell, _ratio, environment, finite, markdown, print_table, session  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

TIME = "/usr/bin/time"
DEFAULT_NETS = Path("/tmp/mxqn-cost-nets")
MODELS = {
    "resnet50": {"file": "resnet50_b1.onnx", "samples": 64, "size": (224, 224), "seed": 100},
    "detector": {"file": "detector.onnx", "samples": 8, "size": (736, 1088), "seed": 200},
}
MIXED = ["--avg-wbits", "6", "--avg-abits", "6"]
NO_CHECKS = "mxqn --no-verify --no-holdout"
ALTERNATE_ROUNDS = 5  # loops of every converted model and FP32, in turn (median ratio)
#: the operators every exact LogQuant body needs (the log of |x| and two table reads, see
#: mxqn_onnx/graph/functions.py): their node time alone bounds the mxqn model's speed
LOG_FLOOR_OPS = ("Log", "GatherElements")


# --------------------------------------------------------------------------- helper processes


def _samples(data: str):
    """(input name, samples) of a calibration .npz with one key."""
    with np.load(data) as z:
        name = z.files[0]
        return name, z[name]


def _batches(data: str):
    """(input name, one-sample batches) of a calibration .npz with one key."""
    name, x = _samples(data)
    return name, [x[i:i + 1] for i in range(len(x))]


def worker(task: dict) -> dict:
    """One helper measurement in this fresh process (the parent times the whole process)."""
    import onnxruntime as ort

    out: dict = {}
    if task["kind"] == "infer":
        t0 = time.perf_counter()
        if task.get("profile"):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.enable_profiling = True
            so.profile_file_prefix = task["profile"]
            s = ort.InferenceSession(task["model"], so, providers=["CPUExecutionProvider"])
        else:
            s = session(task["model"])
        name, batches = _batches(task["data"])
        out["session_s"] = time.perf_counter() - t0
        # one untimed run first: the first run of a session also grows its memory arena
        # (0.1-0.35 s on the 736x1088 detector's models), which is not the model's speed
        t1 = time.perf_counter()
        s.run(None, {name: batches[0]})
        out["first_run_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        first = [s.run(None, {name: b})[0] for b in batches]
        out["run_s"] = time.perf_counter() - t1
        if task.get("save"):  # the first output, for the parent's SQNR against FP32 (after timing)
            np.save(task["save"], np.concatenate(first))
        if task.get("profile"):
            out["profile_file"] = s.end_profiling()
    elif task["kind"] == "alternate":
        # every model's loop over the samples, in turn, ``rounds`` times: the median ratios to
        # FP32 survive the machine's speed drifting during the run (other tenants)
        name, batches = _batches(task["data"])
        sessions = {label: session(path) for label, path in task["models"].items()}
        for s in sessions.values():
            s.run(None, {name: batches[0]})
        loops: Dict[str, List[float]] = {label: [] for label in sessions}
        for _ in range(int(task["rounds"])):
            for label, s in sessions.items():
                t1 = time.perf_counter()
                for b in batches:
                    s.run(None, {name: b})
                loops[label].append(time.perf_counter() - t1)
        out["loops_s"] = loops
        out["median_ratio"] = {label: float(np.median(np.array(v) / np.array(loops["fp32"])))
                               for label, v in loops.items()}
    elif task["kind"] == "ort":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        name, x = _samples(task["data"])
        t0 = time.perf_counter()
        quantize_static(task["model"], task["output"], NpzReader(name, x, batch=1), quant_format=QuantFormat.QDQ,
                        calibrate_method=CalibrationMethod.MinMax, per_channel=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        out["quantize_s"] = time.perf_counter() - t0
    elif task["kind"] == "sweep":  # a default conversion (verified) fed n samples from a stream
        import mxqn_onnx
        from mxqn_onnx.calibration.data import DataSource, InputSpec

        name, x = _samples(task["data"])
        n = int(task["samples"])

        def stream():  # the photo crops again and again, each pass a little brighter: no copy in memory
            for i in range(n):
                yield {name: x[i % len(x)][None] * np.float32(1.0 + 0.01 * (i // len(x)))}

        src = DataSource(stream, [InputSpec(name, (1,) + x.shape[1:], np.dtype(np.float32))], n, True,
                         f"{n} streamed crops")
        t0 = time.perf_counter()
        res = mxqn_onnx.quantize(task["model"], src, progress=False)
        res.save(task["output"])
        out["convert_s"] = time.perf_counter() - t0
        out["timings"] = {k: round(v, 3) for k, v in res.timings.items()}
        out["output_sqnr_db"] = res.measured_sqnr_db
    else:
        raise SystemExit(f"unknown worker task {task['kind']}")
    return out


def rss_sweep(key: str, nets: Path, work: Path, counts: Sequence[int], timeout: float) -> dict:
    """Peak RSS of default conversions (verification included) at each sample count, the
    samples streamed (a folder of images or a reader behaves so), in fresh processes."""
    spec = MODELS[key]
    data = work / f"{key}_calib_{spec['samples']}x{spec['size'][0]}x{spec['size'][1]}.npz"
    out: dict = {}
    for n in counts:
        r = _worker_result(timed(_worker_cmd({"kind": "sweep", "model": str(nets / spec["file"]), "data": str(data),
                                              "samples": n, "output": str(work / f"{key}_sweep{n}.onnx")}),
                                 work / f"{key}_sweep{n}.log", timeout))
        out[str(n)] = r
        cell = r.get("error") or f"{r['wall_s']:7.1f} s {r['maxrss_mb']:7.0f} MB"
        print(f"  {key:9s} {'sweep ' + str(n) + ' samples':24s} {cell}", flush=True)
    return out


# --------------------------------------------------------------------------- timing whole processes


def _children(pid: int) -> List[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def timed(cmd: List[str], log: Path, timeout: Optional[float] = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time``: wall seconds, peak RSS (MB) of the whole process.

    Past ``timeout`` the command (not ``time``) is killed, so its peak RSS is still reported.
    """
    rusage = log.with_suffix(".time")
    full = [TIME, "-o", str(rusage), "-f", "TIME %e %M %x %U %S", *cmd]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "w") as lf:
        lf.write(" ".join(cmd) + "\n")
        lf.flush()
        p = subprocess.Popen(full, stdout=lf, stderr=subprocess.STDOUT, env=_env(), cwd=str(ROOT))
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for pid in _children(p.pid):
                os.kill(pid, signal.SIGKILL)
            p.wait()
        finally:  # this script stopped (Ctrl-C, SIGTERM): leave no measured process behind
            if p.poll() is None:
                for pid in _children(p.pid) + [p.pid]:
                    os.kill(pid, signal.SIGKILL)
                p.wait()
    wall = time.perf_counter() - t0
    lines = [l for l in rusage.read_text().splitlines() if l.startswith("TIME ")] if rusage.exists() else []
    r: dict = {"wall_s": wall, "cmd": " ".join(cmd), "log": str(log),
               "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
    if lines:
        _, _, kb, code, user, system = lines[-1].split()
        r["maxrss_mb"] = int(kb) / 1024.0
        r["exit"] = int(code)
        r["cpu_s"] = float(user) + float(system)
    if timed_out:
        r["error"] = f"timeout ({timeout:.0f} s; peak {r.get('maxrss_mb', float('nan')):.0f} MB so far)"
    elif p.returncode != 0 or "maxrss_mb" not in r:
        tail = [l for l in log.read_text().splitlines() if l.strip()]
        r["error"] = (tail[-1] if tail else f"exit code {p.returncode}")[:200]
    return r


def _worker_cmd(task: dict) -> List[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]


def _worker_result(r: dict) -> dict:
    """Merge the JSON line a helper printed into its timing record."""
    if "error" in r:
        return r
    lines = [l for l in Path(r["log"]).read_text().splitlines() if l.startswith("{")]
    if lines:
        r.update(json.loads(lines[-1]))
    return r


def _mxqn_cmd(model: Path, out: Path, data: Path, report: Path, extra: Sequence[str] = (),
              stacks: Optional[Path] = None, every: float = 60.0) -> List[str]:
    """``python -m mxqn_onnx.cli convert ...``; with ``stacks``, the same CLI run from a wrapper
    whose watchdog thread appends every thread's Python stack to that file every ``every`` s
    (``faulthandler.dump_traceback_later``: one wake-up per interval, no measurable cost), so a
    run stopped at the timeout still says where its time went."""
    args = ["convert", str(model), str(out), "--calib", str(data), "--report", str(report), *extra]
    if stacks is None:
        return [sys.executable, "-m", "mxqn_onnx.cli", *args]
    wrapper = ("import faulthandler, runpy, sys; f = open(sys.argv.pop(1), 'w'); "
               f"faulthandler.dump_traceback_later({every}, repeat=True, file=f); "
               "sys.argv[0] = 'mxqn-onnx'; runpy.run_module('mxqn_onnx.cli', run_name='__main__')")
    return [sys.executable, "-c", wrapper, str(stacks), *args]


def stack_summary(path: Path, top: int = 8) -> dict:
    """Where the sampled stacks of a run were: innermost mxqn_onnx frame, and the api stage."""
    if not path.exists():
        return {}
    inner: Dict[str, int] = {}
    stage: Dict[str, int] = {}
    samples = 0
    for block in re.split(r"(?:Current thread|Thread) 0x", path.read_text())[1:]:
        frames = [l.strip() for l in block.splitlines() if l.strip().startswith("File ")]
        ours = [f for f in frames if "/mxqn_onnx/" in f]
        if not ours:
            continue
        samples += 1
        name = lambda f: f.split("/mxqn_onnx/")[1].replace('", line ', ":")  # noqa: E731
        inner[name(ours[0])] = inner.get(name(ours[0]), 0) + 1
        api = [f for f in ours if "/mxqn_onnx/api.py" in f]
        if api:
            stage[name(api[0])] = stage.get(name(api[0]), 0) + 1
    srt = lambda d: [[k, v] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]  # noqa: E731
    return {"thread_samples": samples, "innermost_mxqn_frame": srt(inner), "api_frame": srt(stage)}


def _read_report(r: dict, report: Path) -> dict:
    if "error" not in r and report.exists():
        rep = json.loads(report.read_text())
        r["timings"] = {k: round(v, 2) for k, v in (rep.get("timing_s") or {}).items() if v}
        m = rep.get("measured") or {}
        r["output_sqnr_db"] = m.get("output_sqnr_db")
        r["verify_samples"] = m.get("samples")
        r["layers"] = len(rep.get("layers") or [])
        acts = rep.get("activations") or {}
        kinds = [a.get("kind") for a in (acts.values() if isinstance(acts, dict) else acts)]
        r["activations"] = {k: kinds.count(k) for k in sorted(set(map(str, kinds)))}
    return r


def _qdq_summary(path: Path) -> dict:
    """What onnxruntime's output holds: its Q/DQ nodes and int8 weight tensors."""
    import onnx

    m = onnx.load(str(path))
    ops: Dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    int8 = sum(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) == 4
               for t in m.graph.initializer)
    return {"QuantizeLinear": ops.get("QuantizeLinear", 0), "DequantizeLinear": ops.get("DequantizeLinear", 0),
            "int8_conv_weights": int(int8), "Conv": ops.get("Conv", 0)}


# --------------------------------------------------------------------------- profiles


def cprofile_convert(model: Path, data: Path, work: Path, top: int = 15) -> dict:
    """Default convert once under cProfile (not timed): top functions by cumulative and own time."""
    import io
    import pstats

    prof = work / f"{model.stem}_convert.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "mxqn_onnx.cli", "convert", str(model),
           str(work / f"{model.stem}_prof_out.onnx"), "--calib", str(data), "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(ROOT))
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    out: dict = {"wall_s": round(time.perf_counter() - t0, 1), "file": str(prof)}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        st = pstats.Stats(str(prof), stream=buf)
        st.sort_stats(key).print_stats(top)
        (work / f"{model.stem}_convert_{key}.txt").write_text(buf.getvalue())
        rows = []
        entries = [kv for kv in st.stats.items() if not _launcher_frame(*kv[0])]
        entries.sort(key=lambda kv: -kv[1][3 if key == "cumulative" else 2])
        for (fn, line, func), (cc, nc, tt, ct, _) in entries[:top]:
            rows.append({"function": f"{_short_path(fn)}:{line}({func})", "calls": nc,
                         "tottime_s": round(tt, 2), "cumtime_s": round(ct, 2)})
        out[key] = rows
    return out


def _launcher_frame(fn: str, line: int, func: str) -> bool:
    """Frames above the CLI's main (runpy, exec, the module body): 100% cumulative, no news."""
    return fn in ("<frozen runpy>", "<string>") or "builtins.exec" in func or \
        (fn.endswith("mxqn_onnx/cli.py") and func in ("<module>", "main"))


def _short_path(fn: str) -> str:
    for marker in ("/mxqn_onnx/", "/site-packages/", "/lib/python3"):
        if marker in fn:
            return fn.split(marker, 1)[1] if marker != "/mxqn_onnx/" else "mxqn_onnx/" + fn.split(marker, 1)[1]
    return fn


def ort_op_profile(model: Path, data: Path, work: Path, label: str) -> dict:
    """The model's inference over the samples with onnxruntime's profiler: time per op type."""
    r = _worker_result(timed(_worker_cmd({"kind": "infer", "model": str(model), "data": str(data),
                                          "profile": str(work / f"ortprof_{label}")}),
                             work / f"ortprof_{label}.log"))
    if "error" in r:
        return {"error": r["error"]}
    events = json.loads(Path(r["profile_file"]).read_text())
    by_op: Dict[str, float] = {}
    count: Dict[str, int] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e6
            count[op] = count.get(op, 0) + 1
    total = sum(by_op.values())
    rows = [{"op": k, "seconds": round(v, 3), "share": round(v / total, 3) if total else None,
             "kernels_run": count[k]} for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])]
    return {"run_s": r.get("run_s"), "node_seconds": round(total, 3), "ops": rows}


# --------------------------------------------------------------------------- one model


def bench_model(key: str, nets: Path, work: Path, timeout: float, mixed: bool, profile: bool) -> dict:
    import onnx
    from graph_helpers import sqnr_db

    spec = MODELS[key]
    model = nets / spec["file"]
    m = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    in_name = [v.name for v in m.graph.input if v.name not in inits][0]
    del m
    n, (h, w) = spec["samples"], spec["size"]
    data = work / f"{key}_calib_{n}x{h}x{w}.npz"
    if not data.exists():
        from export_cost_nets import photo_crops

        np.savez(data, **{in_name: photo_crops(n, h, w, seed=spec["seed"])})
    res: dict = {"model": str(model), "input": in_name, "samples": n, "sample_shape": [3, h, w],
                 "data_mb": round(data.stat().st_size / 2**20, 1), "runs": {}, "inference": {}}
    runs, infer = res["runs"], res["inference"]

    def show(label: str, r: dict, extra: str = "") -> None:
        cell = r.get("error") or f"{r['wall_s']:7.1f} s {r['maxrss_mb']:7.0f} MB"
        load = "load {}->{}".format(*r["loadavg_1min"]) if "loadavg_1min" in r else ""
        print(f"  {key:9s} {label:24s} {cell} {load} {extra}", flush=True)

    fp32_out = work / f"{key}_fp32_outputs.npy"
    r = _worker_result(timed(_worker_cmd({"kind": "infer", "model": str(model), "data": str(data),
                                          "save": str(fp32_out)}), work / f"{key}_fp32.log"))
    if "first_run_s" in r:  # the process as a plain pass over the samples: without the extra warm-up run
        r["wall_s"] = round(r["wall_s"] - r["first_run_s"], 2)
    runs["fp32"] = infer["fp32"] = r
    show("FP32 inference", r, f"(loop {r.get('run_s', float('nan')):.2f} s)")

    out = work / f"{key}_ort.onnx"
    r = _worker_result(timed(_worker_cmd({"kind": "ort", "model": str(model), "data": str(data),
                                          "output": str(out)}), work / f"{key}_ort.log", timeout))
    if "error" not in r:
        r["output_model"] = _qdq_summary(out)
    runs["quantize_static"] = r
    show("quantize_static", r, str(r.get("output_model", "")))

    variants = [("mxqn", [], False), ("mxqn --format qdq", ["--format", "qdq"], False),
                # the conversion alone, checking nothing, as quantize_static: what the checks cost
                (NO_CHECKS, ["--no-verify", "--no-holdout"], False),
                # the user's speed knobs: fewer log quantizers (each must win by 6 dB), or none
                ("mxqn --log-margin 6", ["--log-margin", "6"], False),
                ("mxqn --act-quant fixed", ["--act-quant", "fixed"], False)]
    if mixed:
        variants.append(("mxqn --avg-wbits 6 --avg-abits 6", MIXED, True))
    for label, extra, sample in variants:
        tag = label.replace(" --", "_").replace(" ", "").replace("-", "")
        out, report, stacks = work / f"{key}_{tag}.onnx", work / f"{key}_{tag}.json", work / f"{key}_{tag}.stacks"
        for stale in (out, report, stacks):
            stale.unlink(missing_ok=True)
        r = _read_report(timed(_mxqn_cmd(model, out, data, report, extra, stacks if sample else None),
                               work / f"{key}_{tag}.log", timeout), report)
        r["output"] = str(out)
        if sample:
            r["stacks"] = stack_summary(stacks)
        runs[label] = r
        show(label, r, json.dumps(r.get("timings", {})))

    converted = {"quantize_static QDQ": work / f"{key}_ort.onnx"}
    converted.update({label: Path(r["output"]) for label, r in runs.items()
                      if label.startswith("mxqn") and label != NO_CHECKS and "error" not in r})
    for label, path in converted.items():
        if not path.exists():
            continue
        saved = work / f"{path.stem}_outputs.npy"
        r = _worker_result(timed(_worker_cmd({"kind": "infer", "model": str(path), "data": str(data),
                                              "save": str(saved)}), work / f"{key}_infer_{path.stem}.log"))
        if "error" not in r and fp32_out.exists() and saved.exists():
            r["output_sqnr_db"] = sqnr_db(np.load(fp32_out), np.load(saved))
        infer[label] = r
        show(f"inference: {label}"[:24], r, f"(loop {r.get('run_s', float('nan')):.2f} s)")

    models = {"fp32": str(model), **{label: str(p) for label, p in converted.items() if label in infer
                                      and "error" not in infer[label]}}
    r = _worker_result(timed(_worker_cmd({"kind": "alternate", "models": models, "data": str(data),
                                          "rounds": ALTERNATE_ROUNDS}), work / f"{key}_alternate.log"))
    res["alternation"] = r
    if "median_ratio" in r:
        show("alternation", r, json.dumps({k: round(v, 2) for k, v in r["median_ratio"].items()}))

    # per-operator time of both models (not timed): the floor of the quantizer bodies
    res["profile_ort"] = {"mxqn": ort_op_profile(work / f"{key}_mxqn.onnx", data, work, f"{key}_mxqn"),
                          "fp32": ort_op_profile(model, data, work, f"{key}_fp32")}
    if profile:
        print(f"  {key}: profiling convert (not timed)", flush=True)
        res["profile_convert"] = cprofile_convert(model, data, work)
    return res


# --------------------------------------------------------------------------- tables


def cost_rows(key: str, res: dict) -> List[List[str]]:
    runs = res["runs"]
    fp, qs = runs.get("fp32"), runs.get("quantize_static")
    rows = []
    for label, r in runs.items():
        name = {"fp32": "FP32 inference (process)", "quantize_static": "quantize_static QDQ"}.get(label, label)
        notes = ""
        if r.get("timings"):
            t = r["timings"]
            notes = ", ".join(f"{k} {t[k]:.1f}" for k in ("load", "calibrate", "choose", "mixed_precision",
                                                           "rewrite", "verify") if t.get(k))
            if r.get("output_sqnr_db") is not None:
                notes += f"; SQNR {r['output_sqnr_db']:.1f} dB on {r.get('verify_samples')}"
        elif r.get("stacks", {}).get("api_frame"):
            st = r["stacks"]
            notes = "stack samples every 60 s: " + ", ".join(f"{k} x{v}" for k, v in st["api_frame"][:3]) + \
                "; innermost " + ", ".join(f"{k} x{v}" for k, v in st["innermost_mxqn_frame"][:2])
        elif label == "fp32" and "run_s" in r:
            notes = f"session {r['session_s']:.1f}, loop {r['run_s']:.1f}"
        elif label == "quantize_static" and "output_model" in r:
            o = r["output_model"]
            notes = f"{o['DequantizeLinear']} DQ nodes, {o['int8_conv_weights']}/{o['Conv']} conv weights int8"
        cpu = f"{r['cpu_s']:.1f}" if "cpu_s" in r else ""
        rows.append([key, name, _cost_cell(r), _ratio(r, qs, "wall_s"), _ratio(r, qs, "maxrss_mb"),
                     _ratio(r, fp, "wall_s"), cpu,
                     _ratio(r, qs, "cpu_s") if qs and "cpu_s" in r and "cpu_s" in qs else "", notes])
    return rows


def infer_rows(key: str, res: dict) -> List[List[str]]:
    inf = res["inference"]
    fp = inf.get("fp32")
    rows = []
    alt = res.get("alternation", {}).get("median_ratio", {})
    for label, r in inf.items():
        loop = "" if "error" in r else f"{r['run_s']:.2f} s"
        ratio = f"{r['run_s'] / fp['run_s']:.2f}x" if "run_s" in r and fp and "run_s" in fp else ""
        sq = r.get("output_sqnr_db")
        rows.append([key, label, f"{res['samples']} x {'x'.join(map(str, res['sample_shape']))}",
                     r.get("error", loop)[:60], ratio, f"{alt[label]:.2f}x" if label in alt else "", _cost_cell(r),
                     "" if label == "fp32" or sq is None else f"{sq:.1f} dB"])
    return rows


def profile_tables(results: dict) -> List[tuple]:
    out = []
    for key, res in results.items():
        pc = res.get("profile_convert")
        if pc and "error" not in pc:
            for sort in ("cumulative", "tottime"):
                t = [["function", "calls", "own s", "cumulative s"]]
                t += [[r["function"][:90], str(r["calls"]), f"{r['tottime_s']:.2f}", f"{r['cumtime_s']:.2f}"]
                      for r in pc[sort]]
                out.append((f"{key}: convert under cProfile ({pc['wall_s']} s with profiler), top by {sort}", t))
        po = res.get("profile_ort")
        if po:
            mx, fp = po.get("mxqn", {}), po.get("fp32", {})
            if "ops" in mx:
                fp_ops = {r["op"]: r["seconds"] for r in fp.get("ops", [])}
                t = [["op type", "mxqn s", "share", "kernels run", "FP32 s"]]
                t += [[r["op"], f"{r['seconds']:.3f}", f"{r['share'] * 100:.1f}%", str(r["kernels_run"]),
                       f"{fp_ops[r['op']]:.3f}" if r["op"] in fp_ops else ""] for r in mx["ops"][:15]]
                t.append(["total (node time)", f"{mx['node_seconds']:.3f}", "", "", f"{fp.get('node_seconds', 0):.3f}"])
                out.append((f"{key}: onnxruntime profile of the mxqn-format model over the samples", t))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default=str(DEFAULT_NETS), help="folder of export_cost_nets.py (built if missing)")
    ap.add_argument("--out", default="/tmp/mxqn-cost-bench", help="results, logs, data and converted models")
    ap.add_argument("--models", default="resnet50,detector")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds before a conversion is killed and reported as timeout (default 900)")
    ap.add_argument("--skip-mixed", action="store_true", help="no --avg-wbits 6 --avg-abits 6 row")
    ap.add_argument("--profile", action="store_true", help="also cProfile convert and profile onnxruntime")
    ap.add_argument("--render", metavar="JSON", default=None, help="only print the tables of an earlier run")
    ap.add_argument("--rss-sweep", default="16,1024", metavar="N,N",
                    help="sample counts of the ResNet-50 peak-RSS sweep (streamed samples; '' skips it)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run timed()'s clean-up on kill
    if args.worker:
        print(json.dumps(finite(worker(json.loads(args.worker)))))
        return 0
    if args.render:
        render(json.loads(Path(args.render).read_text()), None)
        return 0
    if not Path(TIME).exists():
        ap.error(f"{TIME} not found (Debian package 'time'): it measures each process's peak RSS")
    keys = [k for k in args.models.split(",") if k]
    for k in keys:
        if k not in MODELS:
            ap.error(f"unknown model {k}; choose from {', '.join(MODELS)}")
    nets, out = Path(args.nets), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    missing = [k for k in keys if not (nets / MODELS[k]["file"]).exists()]
    if missing:
        from export_cost_nets import build

        print(f"building {', '.join(missing)} into {nets}", flush=True)
        build(nets, missing)
    import mxqn_onnx

    result: dict = {"environment": {**environment(), "mxqn_onnx_path": mxqn_onnx.__file__},
                    "settings": {"timeout_s": args.timeout, "models": keys, "nets": str(nets)}, "models": {}}
    t0 = time.perf_counter()
    for k in keys:
        print(f"# {k}", flush=True)
        result["models"][k] = bench_model(k, nets, out, args.timeout,
                                          mixed=(k == "detector" and not args.skip_mixed), profile=args.profile)
        if k == "resnet50" and args.rss_sweep:
            counts = [int(c) for c in args.rss_sweep.split(",") if c]
            result["models"][k]["rss_sweep"] = rss_sweep(k, nets, out, counts, args.timeout)
        (out / "bench_cost.json").write_text(json.dumps(finite(result), indent=1) + "\n")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "bench_cost.json").write_text(json.dumps(finite(result), indent=1) + "\n")
    render(result, out)
    return 0


def _verdict(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def target_rows(result: dict) -> List[List[str]]:
    """Issue 12's targets, each PASS or MISS from this run's own measurements."""
    rows = []
    for k, res in result["models"].items():
        runs, inf = res["runs"], res["inference"]
        mx, qs, fp = runs.get("mxqn", {}), runs.get("quantize_static", {}), runs.get("fp32", {})

        def ratio(a: dict, b: dict, key: str) -> Optional[float]:
            return a[key] / b[key] if key in a and key in b and b[key] else None

        alt = res.get("alternation", {}).get("median_ratio", {})
        speed = alt.get("mxqn", ratio(inf.get("mxqn", {}), inf.get("fp32", {}), "run_s"))
        for what, value, limit in (
                ("convert (verified) wall / quantize_static", ratio(mx, qs, "wall_s"), 1.0),
                ("convert (verified) peak RSS / quantize_static", ratio(mx, qs, "maxrss_mb"), 1.0),
                ("stretch: convert wall / FP32 inference", ratio(mx, fp, "wall_s"), 2.0),
                ("mxqn model inference loop / FP32 loop" + (f" (median of {ALTERNATE_ROUNDS} alternating rounds)"
                                                            if "mxqn" in alt else ""), speed, 2.0)):
            rows.append([k, what, "" if value is None else f"{value:.2f}x", f"<= {limit:g}x",
                         _verdict(None if value is None else value <= limit)])
        no_checks = runs.get(NO_CHECKS, {})
        if "wall_s" in no_checks:
            value = ratio(no_checks, qs, "wall_s")
            rows.append([k, "for reference: convert without verification and held-back check, wall / "
                         "quantize_static", "" if value is None else f"{value:.2f}x", "", "-"])
        for label in ("mxqn --log-margin 6", "mxqn --act-quant fixed"):
            r, fp_inf = inf.get(label, {}), inf.get("fp32", {})
            value = alt.get(label, ratio(r, fp_inf, "run_s"))
            if value is not None:
                sq = r.get("output_sqnr_db")
                rows.append([k, f"for reference: {label[5:]} model inference loop / FP32 loop (output SQNR "
                             f"{sq:.1f} dB)" if sq is not None else f"for reference: {label[5:]} model / FP32",
                             f"{value:.2f}x", "", "-"])
        mx_ops = res.get("profile_ort", {}).get("mxqn", {})
        fp_node = res.get("profile_ort", {}).get("fp32", {}).get("node_seconds")
        if "ops" in mx_ops and fp_node:
            floor = sum(r["seconds"] for r in mx_ops["ops"] if r["op"] in LOG_FLOOR_OPS) / fp_node
            rows.append([k, "floor: FP32 node time + the " + " and ".join(LOG_FLOOR_OPS) + " nodes of the "
                         "LogQuant bodies alone, / FP32 node time", f"{1 + floor:.2f}x", "", "-"])
        sweep = {int(n): r["maxrss_mb"] for n, r in res.get("rss_sweep", {}).items() if "maxrss_mb" in r}
        if len(sweep) >= 2:
            lo, hi = min(sweep.values()), max(sweep.values())
            rows.append([k, f"convert peak RSS over {min(sweep)}..{max(sweep)} samples: (max - min) / min",
                         f"{(hi - lo) / lo:.1%} ({lo:.0f}..{hi:.0f} MB)", "<= 10%", _verdict((hi - lo) / lo <= 0.10)])
        mixed = runs.get("mxqn --avg-wbits 6 --avg-abits 6")
        if mixed is not None:
            for what, key, limit in (("mixed W6/A6 wall / uniform convert", "wall_s", 3.0),
                                     ("mixed W6/A6 peak RSS / uniform convert", "maxrss_mb", 1.5)):
                value = ratio(mixed, mx, key) if "error" not in mixed else None
                rows.append([k, what, mixed.get("error", "") if value is None else f"{value:.2f}x",
                             f"<= {limit:g}x", "MISS" if "error" in mixed else _verdict(None if value is None
                                                                                        else value <= limit)])
    return rows


def render(result: dict, out: Optional[Path]) -> None:
    ct = [["model", "run (whole process)", "wall, peak RSS", "wall / quantize_static", "RSS / quantize_static",
           "wall / FP32", "CPU s (user+sys)", "CPU / quantize_static", "phases (s) / notes"]]
    it = [["model", "onnxruntime inference of", "samples", "inference loop", "/ FP32 loop",
           f"/ FP32, median of {ALTERNATE_ROUNDS} alternating rounds", "whole process", "output SQNR vs FP32"]]
    for k, res in result["models"].items():
        ct += cost_rows(k, res)
        it += infer_rows(k, res)
    env = result.get("environment", {})
    print_table(f"conversion cost, whole processes ({env.get('cpus')} CPUs, onnxruntime {env.get('onnxruntime')})", ct)
    print_table("inference of the converted models over the calibration samples, one sample per run", it)
    tt = [["model", "target", "measured", "limit", "verdict"]] + target_rows(result)
    print_table("issue 12 targets (ratios from this run)", tt)
    md = [markdown(ct), markdown(it), markdown(tt)]
    for title, t in profile_tables(result["models"]):
        print_table(title, t)
        md.append(f"**{title}**\n\n" + markdown(t))
    if out is not None:
        (out / "cost.md").write_text("\n".join(md))
        print(f"wrote {out}/bench_cost.json and cost.md in {result.get('seconds')} s")


if __name__ == "__main__":
    sys.exit(main())
