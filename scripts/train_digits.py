"""Train a small VGG-style CNN on scikit-learn's ``load_digits`` and export it to ONNX.

The digits data set (1797 real handwritten 8x8 digits, bundled with scikit-learn,
no download needed) is split into a fixed stratified train/test split
(``test_size=0.3``, ``random_state=0``), scaled to [0, 1], upscaled to 28x28 with
bilinear interpolation and normalised with the train-set mean/std (one scalar each).

A small ``DigitsCNN`` (5 conv+BatchNorm+ReLU blocks, global average pooling, two
linear layers) is trained deterministically on CPU, then exported to:

* ``<out>/digits_cnn.onnx``         -- TorchScript exporter, opset 13, BatchNormalization
  nodes kept (``do_constant_folding=False`` so the Conv+BN eval-peephole fusion
  pass is not run), dynamic batch dimension.
* ``<out>/digits_cnn_dynamo.onnx``  -- dynamo exporter, opset 18, dynamic batch
  dimension, single self-contained file (skipped with a message if export fails).
* ``<out>/digits_calib.npz``        -- ``input``: 256 train samples, float32 [256,1,28,28].
* ``<out>/digits_test.npz``         -- ``input``: all test samples (float32),
  ``labels``: int64.
* ``<out>/digits_cnn.json``         -- measured FP32 test top-1 and metadata.

Every exported model is checked with onnxruntime against the torch model on the
test split (top-1 accuracy must match).

Usage::

    python scripts/train_digits.py [--out models] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training import set_determinism, train_epoch  # noqa: E402

SEED = 0
IMG = 28
N_CALIB = 256


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Return (x_train, y_train, x_test, y_test, stats) as float32 NCHW 28x28 / int64.

    Pixels are divided by 16, upscaled bilinearly (align_corners=False) to 28x28 and
    normalised with the scalar mean/std of the upscaled train split.
    """
    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )

    def up(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)  # [N,1,8,8]
        return F.interpolate(t, size=(IMG, IMG), mode="bilinear", align_corners=False)

    t_tr, t_te = up(x_tr), up(x_te)
    mean = float(t_tr.mean())
    std = float(t_tr.std())
    t_tr = (t_tr - mean) / std
    t_te = (t_te - mean) / std
    stats = {"mean": mean, "std": std}
    return (
        t_tr.numpy().astype(np.float32),
        y_tr,
        t_te.numpy().astype(np.float32),
        y_te,
        stats,
    )


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """3x3 same-padding conv (no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    )


class DigitsCNN(nn.Module):
    """Small VGG-style CNN for 1x28x28 inputs and 10 classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 16),
            conv_bn_relu(16, 16),
            nn.MaxPool2d(2),
            conv_bn_relu(16, 32),
            conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
            conv_bn_relu(32, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.ReLU(inplace=False),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, num_classes]."""
        return self.classifier(self.pool(self.features(x)))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift] per axis.

    The fill value is the normalised background (the per-batch minimum, i.e. what a
    zero pixel maps to), so shifted borders look like the original background.
    """
    n = x.shape[0]
    bg = float(x.min())
    pad = F.pad(x, (max_shift,) * 4, value=bg)
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    h, w = x.shape[-2:]
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = pad[i, :, dy : dy + h, dx : dx + w]
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Return (top-1 accuracy, predictions) of ``model`` in eval mode."""
    model.eval()
    logits = model(torch.from_numpy(x))
    pred = logits.argmax(1).numpy()
    return float((pred == y).mean()), pred


def train(
    x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, epochs: int
) -> DigitsCNN:
    """Train DigitsCNN with Adam + OneCycle LR and random-shift augmentation."""
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = int(np.ceil(len(x_tr) / 64))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch
    )
    gen = torch.Generator().manual_seed(SEED)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    for ep in range(epochs):
        loss_sum, correct = train_epoch(model, xt, yt, 64, opt, sched, gen, lambda x: random_shift(x, 2, gen))
        te_acc, _ = evaluate(model, x_te, y_te)
        print(
            f"epoch {ep + 1:3d}/{epochs}  loss {loss_sum / len(xt):.4f}  "
            f"train_acc {correct / len(xt):.4f}  test_acc {te_acc:.4f}",
            flush=True,
        )
    model.eval()
    return model


def op_counts(path: str) -> dict[str, int]:
    """Return op-type counts of an ONNX model's main graph."""
    m = onnx.load(path)
    return dict(sorted(Counter(n.op_type for n in m.graph.node).items()))


def ort_accuracy(path: str, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Run an ONNX model with onnxruntime (CPU) and return (top-1, predictions)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    logits = sess.run(None, {in_name: x})[0]
    pred = logits.argmax(1)
    return float((pred == y).mean()), pred


def describe(path: str) -> None:
    """Print opset, IO names/shapes and op counts of an ONNX model."""
    m = onnx.load(path)
    onnx.checker.check_model(m)

    def shp(v: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    print(f"  {path}: {os.path.getsize(path)} bytes, opset {opsets}")
    for v in m.graph.input:
        print(f"    input  {v.name} {shp(v)}")
    for v in m.graph.output:
        print(f"    output {v.name} {shp(v)}")
    print(f"    ops {op_counts(path)}")


def export_torchscript(model: nn.Module, path: str) -> None:
    """Export with the TorchScript exporter (opset 13), keeping BatchNormalization.

    ``do_constant_folding=False`` prevents ``_jit_pass_onnx_eval_peephole`` (the
    pass that fuses Conv+BatchNorm) from running, even with TrainingMode.EVAL.
    """
    dummy = torch.zeros(1, 1, IMG, IMG)
    torch.onnx.export(
        model,
        (dummy,),
        path,
        dynamo=False,
        opset_version=13,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
    )
    n_bn = op_counts(path).get("BatchNormalization", 0)
    if n_bn == 0:
        # Fallback: PRESERVE with model.eval() also skips the eval peephole pass.
        print("  BatchNormalization folded with EVAL; retrying with TrainingMode.PRESERVE")
        torch.onnx.export(
            model,
            (dummy,),
            path,
            dynamo=False,
            opset_version=13,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
        )
        n_bn = op_counts(path).get("BatchNormalization", 0)
    if n_bn == 0:
        raise RuntimeError(f"{path}: BatchNormalization nodes were folded away")
    print(f"  TorchScript export OK ({n_bn} BatchNormalization nodes kept)")


def export_dynamo(model: nn.Module, path: str) -> bool:
    """Export with the dynamo exporter (opset 18, dynamic batch). Return success."""
    dummy = torch.zeros(2, 1, IMG, IMG)
    data_path = path + ".data"
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        prog = torch.onnx.export(
            model,
            (dummy,),
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
            verbose=False,
        )
        # Save as one self-contained protobuf (model is tiny, well below 2 GB).
        prog.save(path, external_data=False)
        if os.path.exists(data_path):
            os.remove(data_path)
        m = onnx.load(path)  # fails if weights live in a missing external file
        if any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer
        ):
            raise RuntimeError("dynamo export produced external data")
        # Note: the default onnxscript optimisation (optimize=True) fuses
        # BatchNormalization into Conv; optimize=False keeps BN but leaves many
        # Shape/Expand/CastLike helper nodes, so the optimised graph is kept.
        print(f"  dynamo export OK ({op_counts(path).get('BatchNormalization', 0)} "
              "BatchNormalization nodes; onnxscript optimizer fuses BN into Conv)")
        return True
    except Exception as exc:  # noqa: BLE001 -- optional artefact, report and skip
        print(f"  dynamo export failed, skipping: {type(exc).__name__}: {exc}")
        for p in (path, data_path):
            if os.path.exists(p):
                os.remove(p)
        return False


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models", help="output directory (default: models)")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    args = ap.parse_args()

    set_determinism(SEED)
    os.makedirs(args.out, exist_ok=True)

    x_tr, y_tr, x_te, y_te, stats = load_data()
    print(f"train {x_tr.shape} test {x_te.shape}  mean {stats['mean']:.6f} "
          f"std {stats['std']:.6f}")

    t0 = time.perf_counter()
    model = train(x_tr, y_tr, x_te, y_te, args.epochs)
    train_s = time.perf_counter() - t0
    acc, pred_t = evaluate(model, x_te, y_te)
    print(f"training took {train_s:.1f} s; torch FP32 test top-1 {acc:.4f}")
    if acc < 0.97:
        print("WARNING: test accuracy below 0.97 -- try more --epochs")

    # Calibration / test data.
    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(len(x_tr), size=N_CALIB, replace=False))
    np.savez_compressed(os.path.join(args.out, "digits_calib.npz"),
             input=np.ascontiguousarray(x_tr[calib_idx], dtype=np.float32))
    np.savez_compressed(os.path.join(args.out, "digits_test.npz"),
             input=np.ascontiguousarray(x_te, dtype=np.float32),
             labels=y_te.astype(np.int64))

    # Exports + onnxruntime verification.
    ts_path = os.path.join(args.out, "digits_cnn.onnx")
    dy_path = os.path.join(args.out, "digits_cnn_dynamo.onnx")
    print("exporting:")
    export_torchscript(model, ts_path)
    paths = [ts_path]
    if export_dynamo(model, dy_path):
        paths.append(dy_path)
    for p in paths:
        describe(p)
        ort_acc, pred_o = ort_accuracy(p, x_te, y_te)
        agree = float((pred_o == pred_t).mean())
        print(f"    onnxruntime test top-1 {ort_acc:.4f} (torch {acc:.4f}, "
              f"prediction agreement {agree:.4f})")
        if ort_acc != acc:
            raise RuntimeError(f"{p}: onnxruntime accuracy {ort_acc} != torch {acc}")

    meta = {
        "fp32_test_top1": acc,
        "n_train": int(len(x_tr)),
        "n_test": int(len(x_te)),
        "seed": SEED,
        "script": "scripts/train_digits.py",
        "torch": torch.__version__,
        "epochs": args.epochs,
        "norm_mean": stats["mean"],
        "norm_std": stats["std"],
    }
    with open(os.path.join(args.out, "digits_cnn.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"FP32 test top-1: {acc:.4f}")
    for name in sorted(os.listdir(args.out)):
        print(f"  {name}: {os.path.getsize(os.path.join(args.out, name))} bytes")


if __name__ == "__main__":
    main()
