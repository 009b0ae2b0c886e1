"""Shared helpers of the real-graph, model-variant, bad-input, fuzz and report-figure tests."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT_DIR = Path(__file__).resolve().parents[1]
DATA = ROOT_DIR / "tests" / "data"
NETS = DATA / "nets"
LIGHT = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - got)^2), +inf when identical."""
    r = np.asarray(ref, np.float64)
    noise = float(np.sum((r - np.asarray(got, np.float64)) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(r * r) / noise))


def session(model, extra_outputs: Sequence[str] = ()) -> ort.InferenceSession:
    """A CPU session on a path or ModelProto, optionally exposing intermediate tensors."""
    if extra_outputs:
        model = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
        model = onnx.ModelProto.FromString(model.SerializeToString())
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra_outputs if n not in have)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def photos(names: Iterable[str], size: int = 224) -> np.ndarray:
    """Real photographs shipped with scikit-image, resized and ImageNet-normalised, NCHW."""
    import skimage.data
    from PIL import Image

    out = []
    for name in names:
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size), Image.BILINEAR)
        out.append(((np.asarray(im, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def digits(scale: int = 2) -> np.ndarray:
    """scikit-learn digits in [0, 1], upscaled by pixel repetition: [N, 1, 8*scale, 8*scale].

    The same preprocessing as ``scripts/export_test_nets.py`` used for training.
    """
    from sklearn.datasets import load_digits

    x = (load_digits().images.astype(np.float32) / 16.0).repeat(scale, axis=1).repeat(scale, axis=2)
    return np.ascontiguousarray(x[:, None])


def run_both(fp32, quant, feeds: List[Dict[str, np.ndarray]], extra: Sequence[str] = ()):
    """Outputs (and ``extra`` tensors) of both models per feed: lists of lists of arrays."""
    fs, qs = session(fp32, extra), session(quant, extra)
    names = [o.name for o in fs.get_outputs()]
    return ([fs.run(names, f) for f in feeds], [qs.run(names, f) for f in feeds], names)


def stacked_sqnr(ref_runs, got_runs, index: int) -> float:
    """SQNR of output ``index`` over all runs together."""
    ref = np.concatenate([np.ravel(r[index]) for r in ref_runs])
    got = np.concatenate([np.ravel(g[index]) for g in got_runs])
    return sqnr_db(ref, got)


def small_cnn(opset: int = 13, seed: int = 0, batch="N") -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-GlobalAveragePool-Flatten-Gemm on x[N,3,8,8] -> y[N,5]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name, shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        [w("w1", (8, 3, 3, 3)), w("b1", (8,), 0.1), w("w2", (8, 8, 3, 3), 0.2), w("b2", (8,), 0.1),
         w("w3", (5, 8)), w("b3", (5,), 0.1)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def cnn_inputs(n: int = 32, seed: int = 1) -> np.ndarray:
    """Smooth random images for :func:`small_cnn` (a blurred noise field, like real images)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 10, 10)).astype(np.float32)
    x = (x[:, :, :-2, :-2] + x[:, :, 1:-1, 1:-1] + x[:, :, 2:, 2:]) / 3.0
    return np.ascontiguousarray(x, dtype=np.float32)


def independent_figures(fp32: onnx.ModelProto, quant: onnx.ModelProto, x: np.ndarray) -> dict:
    """Per-output and combined SQNR and per-output argmax agreement of two models on ``x``,
    one sample per run (independent of how mxqn-onnx batches and resumes its measurement)."""
    runs = []
    for m in (fp32, quant):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        outs = [s.run(None, {name: x[i:i + 1]}) for i in range(len(x))]
        runs.append([np.concatenate([o[j] for o in outs]).astype(np.float64) for j in range(len(outs[0]))])
    names = [o.name for o in fp32.graph.output]
    sig = {n: float(np.sum(r ** 2)) for n, r in zip(names, runs[0])}
    noise = {n: float(np.sum((r - q) ** 2)) for n, r, q in zip(names, runs[0], runs[1])}
    agree = {n: float(np.mean(r.reshape(len(x), -1).argmax(1) == q.reshape(len(x), -1).argmax(1)))
             for n, r, q in zip(names, runs[0], runs[1])}
    db = lambda s, e: 10 * np.log10(s / e)  # noqa: E731
    return {"combined": db(sum(sig.values()), sum(noise.values())),
            "per_output": {n: db(sig[n], noise[n]) for n in names}, "agree": agree}


def check_measured(measured: dict, fp32: onnx.ModelProto, quant: onnx.ModelProto, calib: np.ndarray) -> None:
    """Every figure of a report's ``measured`` entry (on the first ``samples`` of ``calib``)
    equals an independent run's: SQNR within 0.1 dB, top-1 agreement exactly."""
    n = measured["samples"]
    assert 0 < n <= len(calib)
    truth = independent_figures(fp32, quant, calib[:n])
    assert measured["output_sqnr_db"] == pytest.approx(truth["combined"], abs=0.1)
    assert measured["per_output_sqnr_db"].keys() == truth["per_output"].keys()
    for name, db in measured["per_output_sqnr_db"].items():
        assert db == pytest.approx(truth["per_output"][name], abs=0.1), name
    # top-1 agreement exactly, and only for the outputs that are class scores
    assert measured["top1_agreement_per_output"].keys() == set(measured["class_outputs"])
    for name, a in measured["top1_agreement_per_output"].items():
        assert a == pytest.approx(truth["agree"][name], abs=1e-9), name


def small_resnet(opset: int = 13, seed: int = 0, blocks: int = 2) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv-Relu -> ``blocks`` residual blocks (Conv-Relu-Conv, Add the block
    input, Relu) -> GlobalAveragePool-Flatten-Gemm -> y[N,5]: the residual Adds of a ResNet."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = []

    def w(name, shape, scale):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    nodes = [helper.make_node("Conv", ["x", w("w0", (8, 3, 3, 3), 0.3), w("b0", (8,), 0.1)], ["c0"], name="stem",
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["h0"], name="stem_relu")]
    h = "h0"
    for i in range(blocks):
        nodes += [
            helper.make_node("Conv", [h, w(f"wa{i}", (8, 8, 3, 3), 0.15), w(f"ba{i}", (8,), 0.1)], [f"a{i}"],
                             name=f"block{i}_a", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"a{i}"], [f"ra{i}"], name=f"block{i}_relu_a"),
            helper.make_node("Conv", [f"ra{i}", w(f"wb{i}", (8, 8, 3, 3), 0.15), w(f"bb{i}", (8,), 0.1)], [f"cb{i}"],
                             name=f"block{i}_b", pads=[1, 1, 1, 1]),
            helper.make_node("Add", [f"cb{i}", h], [f"s{i}"], name=f"block{i}_add"),
            helper.make_node("Relu", [f"s{i}"], [f"h{i + 1}"], name=f"block{i}_relu"),
        ]
        h = f"h{i + 1}"
    nodes += [helper.make_node("GlobalAveragePool", [h], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", w("w9", (5, 8), 0.3), w("b9", (5,), 0.1)], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "small_resnet",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
