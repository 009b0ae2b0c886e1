"""Train the MXQN paper's networks (VGG16/19, ResNet18/34/50) and a MobileNetV2, export them to ONNX.

The networks are defined here (no torchvision) with CIFAR-style 32x32 stems (3x3 first
convolution, no stride-2 stem, no max-pool stem) and widths reduced so that each trains in
minutes on two CPU cores. Every convolution is followed by BatchNorm, which the exports keep
(mxqn-onnx folds it itself). Besides the paper's five, ``mobilenetv2`` (a small MobileNetV2 with
plain ReLU, see ``MobileNetV2``) puts depthwise convolutions in the zoo.

Data (first one given wins):

* default: scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits, bundled, no
  download), fixed stratified split (``test_size=0.3``, ``random_state=0``), scaled to [0, 1],
  upscaled bilinearly to 32x32 and normalised with the train split's scalar mean/std;
* ``--cifar10 DIR`` / ``--cifar100 DIR``: the python-pickle CIFAR folders
  (``data_batch_1..5``/``test_batch`` or ``train``/``test``);
* ``--imagenet DIR``: an ImageFolder layout (``DIR/train/<class>/*.jpg``, ``DIR/val/<class>/*``),
  resized and centre-cropped to ``--image-size`` (default 32) and loaded into memory, so
  meant for subsets.

Written to ``--out`` (default ``cache/zoo``, git-ignored), per model ``<name>`` (for example
``digits_resnet18``; ``digits_mobilenetv2`` for the MobileNetV2):

* ``<name>.onnx``: TorchScript exporter, opset 13, dynamic batch, BatchNormalization kept
  (``do_constant_folding=False``, ``training=EVAL``);
* ``<name>_dynamo.onnx``: dynamo exporter (opset 18) where it works (skipped with the reason);
* ``<dataset>_calib.npz`` (``input``: 256 train samples) and ``<dataset>_test.npz``
  (``input``, ``labels``: the whole test split);
* ``zoo.json``: FP32 test top-1 of each model (torch and onnxruntime), sizes, training time.
  An existing ``zoo.json`` is updated, not replaced: training a subset (``--models``) adds or
  refreshes only those entries and keeps the others. A full run on digits also copies this
  record to ``models/zoo.json`` (small, tracked).

``--resnet50-224`` additionally writes ``resnet50_224.onnx``: an ImageNet-sized ResNet-50
(224x224, 1000 classes, random weights with BatchNorm statistics set from one random batch)
and ``resnet50_224_calib.npy`` (random normal inputs) for speed and memory measurements.

Usage::

    python scripts/train_zoo.py                      # the six models on digits (+ ResNet-50-224)
    python scripts/train_zoo.py --models mobilenetv2 --no-resnet50-224   # add one model to zoo.json
    python scripts/train_zoo.py --quick              # CI: resnet18 (width 8), one epoch, no dynamo
    python scripts/train_zoo.py --models vgg16,resnet18 --epochs 5
    python scripts/train_zoo.py --cifar10 ~/data/cifar-10-batches-py --epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import set_determinism, train_epoch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
N_CALIB = 256
ALL_MODELS = ("vgg16", "vgg19", "resnet18", "resnet34", "resnet50")  # the MXQN paper's networks
EXTRA_MODELS = ("mobilenetv2",)  # beyond the paper: depthwise convolutions
ZOO_MODELS = ALL_MODELS + EXTRA_MODELS

# --------------------------------------------------------------------------- networks

VGG_CFG = {
    "vgg16": [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"],
    "vgg19": [1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG: 3x3 conv+BN+ReLU stacks, five max-pools (32 -> 1), three linear layers.

    Widths are ``base * (1, 2, 4, 8, 8)``; the paper's VGG has ``base = 64``.
    """

    def __init__(self, cfg: Sequence, base: int, in_ch: int, num_classes: int, image: int) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c = in_ch
        pools = 0
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                pools += 1
            else:
                layers += [nn.Conv2d(c, base * v, 3, padding=1, bias=False),
                           nn.BatchNorm2d(base * v), nn.ReLU()]
                c = base * v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # 1x1 already at 32x32; keeps other sizes working
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(),
                                        nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.short = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.short = _shortcut(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.short(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """ResNet with either a CIFAR stem (3x3 conv, stride 1) or the ImageNet stem (7x7/2 + max-pool)."""

    def __init__(self, block, counts: Sequence[int], base: int, in_ch: int, num_classes: int,
                 imagenet_stem: bool = False) -> None:
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(in_ch, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_ch, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU())
        stages: List[nn.Module] = []
        c = base
        for i, n in enumerate(counts):
            planes = base * 2**i
            for j in range(n):
                stages.append(block(c, planes, 2 if (j == 0 and i > 0) else 1))
                c = planes * block.expansion
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion conv + BN + ReLU (absent when ``expand == 1``, as in the
    paper), 3x3 depthwise conv (``groups`` = channels) + BN + ReLU, 1x1 linear projection + BN,
    and a residual Add (no activation after it) when the stride is 1 and the channels match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: List[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


# (expansion, channels as a multiple of the stem width, blocks, stride of the first block):
# 16-24-32-64 channels at the default width 16; the three stride-2 stages take 32x32 to 4x4.
MBV2_CFG = [(1, 1.0, 1, 1), (4, 1.5, 2, 2), (4, 2.0, 3, 2), (4, 4.0, 3, 2)]


class MobileNetV2(nn.Module):
    """Small CIFAR-style MobileNetV2 (Sandler et al. 2018): 3x3 stem conv (stride 1) + BN + ReLU,
    nine inverted-residual blocks (``MBV2_CFG``), 1x1 conv to ``8 * base`` + BN + ReLU, global
    average pool, Linear.

    Plain ReLU instead of MobileNetV2's ReLU6, on purpose: ReLU6 exports as a Clip, and a clip at
    6 does not commute with per-channel rescaling, so it would block the cross-layer equalization
    mxqn-onnx can apply (``--equalize``) across conv -> activation -> conv pairs. Nagel et al.
    (2019, data-free quantization) replaced ReLU6 by ReLU for the same reason.
    """

    def __init__(self, base: int, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU())
        blocks: List[nn.Module] = []
        c = base
        for expand, mult, n, stride in MBV2_CFG:
            cout = int(round(base * mult))
            for j in range(n):
                blocks.append(InvertedResidual(c, cout, stride if j == 0 else 1, expand))
                c = cout
        self.blocks = nn.Sequential(*blocks)
        head = 8 * base
        self.head = nn.Sequential(nn.Conv2d(c, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


def build(name: str, in_ch: int, num_classes: int, image: int, width: Optional[int] = None) -> nn.Module:
    """One zoo network. ``width`` overrides the reduced base width (the paper's is 64)."""
    if name in VGG_CFG:
        return VGG(VGG_CFG[name], width or 8, in_ch, num_classes, image)
    if name == "mobilenetv2":
        return MobileNetV2(width or 16, in_ch, num_classes)
    specs = {"resnet18": (BasicBlock, (2, 2, 2, 2), 16), "resnet34": (BasicBlock, (3, 4, 6, 3), 16),
             "resnet50": (Bottleneck, (3, 4, 6, 3), 8)}
    if name not in specs:
        raise SystemExit(f"unknown model '{name}'; choose from {', '.join(ZOO_MODELS)}")
    block, counts, base = specs[name]
    return ResNet(block, counts, width or base, in_ch, num_classes)


# --------------------------------------------------------------------------- data

Data = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]


def _normalise(x_tr: np.ndarray, x_te: np.ndarray) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Per-channel mean/std of the train split, applied to both splits."""
    mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
    std = x_tr.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    stats = {"mean": mean.ravel().tolist(), "std": std.ravel().tolist()}
    return ((x_tr - mean) / std).astype(np.float32), ((x_te - mean) / std).astype(np.float32), stats


def load_digits32(image: int = 32) -> Data:
    """scikit-learn digits, fixed stratified 70/30 split, upscaled to ``image`` x ``image``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)

    def up(a: np.ndarray) -> np.ndarray:
        t = F.interpolate(torch.from_numpy(np.ascontiguousarray(a)), size=(image, image),
                          mode="bilinear", align_corners=False)
        return t.numpy()

    x_tr, x_te, stats = _normalise(up(x_tr), up(x_te))
    return x_tr, y_tr, x_te, y_te, stats


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def load_cifar(folder: Path, classes: int) -> Data:
    """CIFAR-10/100 python-pickle folder -> NCHW float32 in [0, 1], normalised."""
    if classes == 10:
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = [folder / "test_batch"], b"labels"
    else:
        train_files, test_files, key = [folder / "train"], [folder / "test"], b"fine_labels"
    for p in train_files + test_files:
        if not p.exists():
            raise SystemExit(f"{p}: missing; give the extracted python-pickle CIFAR-{classes} folder")

    def read(files: List[Path]) -> Tuple[np.ndarray, np.ndarray]:
        parts = [_unpickle(p) for p in files]
        x = np.concatenate([np.asarray(p[b"data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[key], dtype=np.int64) for p in parts])
        return x.astype(np.float32) / 255.0, y

    x_tr, y_tr = read(train_files)
    x_te, y_te = read(test_files)
    x_tr, x_te, stats = _normalise(x_tr, x_te)
    return x_tr, y_tr, x_te, y_te, stats


def load_imagefolder(folder: Path, image: int) -> Data:
    """ImageFolder layout (``train/`` and ``val/``, one sub-folder per class), loaded into memory."""
    from PIL import Image

    splits = {}
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir()) if (folder / "train").is_dir() else []
    if not classes:
        raise SystemExit(f"{folder}: expected train/<class>/ and val/<class>/ sub-folders of images")
    for split in ("train", "val"):
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for p in sorted((folder / split / c).glob("*")):
                if not p.is_file():
                    continue
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    s = image / min(im.size)
                    im = im.resize((max(image, round(im.size[0] * s)), max(image, round(im.size[1] * s))),
                                   Image.BILINEAR)
                    left, top = (im.size[0] - image) // 2, (im.size[1] - image) // 2
                    im = im.crop((left, top, left + image, top + image))
                    xs.append(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0)
                ys.append(ci)
        if not xs:
            raise SystemExit(f"{folder / split}: no images")
        splits[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    x_tr, x_te, stats = _normalise(splits["train"][0], splits["val"][0])
    stats["classes"] = classes
    return x_tr, splits["train"][1], x_te, splits["val"][1], stats


# --------------------------------------------------------------------------- training


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge-replicated padding)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([pad[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offs.tolist())])


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy()
                           for i in range(0, len(x), batch)])


def train(model: nn.Module, x_tr: np.ndarray, y_tr: np.ndarray, epochs: int, batch: int = 64,
          lr: float = 3e-3) -> nn.Module:
    """Adam + one-cycle learning rate, random-shift augmentation."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(x_tr) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for ep in range(epochs):
        loss_sum, correct = train_epoch(model, xt, yt, batch, opt, sched, gen, lambda x: random_shift(x, 2, gen))
        print(f"    epoch {ep + 1}/{epochs}  loss {loss_sum / len(xt):.4f}  train top-1 {correct / len(xt):.4f}",
              flush=True)
    return model.eval()


# --------------------------------------------------------------------------- export


def op_counts(path: Path) -> Dict[str, int]:
    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


def export_torchscript(model: nn.Module, path: Path, shape: Tuple[int, ...]) -> None:
    """TorchScript exporter, opset 13, dynamic batch, BatchNormalization kept.

    ``do_constant_folding=False`` keeps the exporter from fusing Conv+BN (the eval peephole).
    """
    torch.onnx.export(
        model, (torch.zeros(1, *shape),), str(path), dynamo=False, opset_version=13,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
    )
    if op_counts(path).get("BatchNormalization", 0) == 0:
        raise RuntimeError(f"{path}: the exporter folded BatchNormalization away")


def export_dynamo(model: nn.Module, path: Path, shape: Tuple[int, ...]) -> Optional[str]:
    """Dynamo exporter (opset 18, dynamic batch, one self-contained file); the error text if it fails."""
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        prog = torch.onnx.export(model, (torch.zeros(2, *shape),), dynamo=True, opset_version=18,
                                 input_names=["input"], output_names=["logits"],
                                 dynamic_shapes={"x": {0: batch}}, external_data=False, verbose=False)
        prog.save(str(path), external_data=False)
        return None
    except Exception as exc:  # noqa: BLE001 -- optional artefact: report why and go on
        for p in (path, Path(str(path) + ".data")):
            if p.exists():
                p.unlink()
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def ort_predict(path: Path, x: np.ndarray, batch: int = 256) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])


def build_resnet50_224(out: Path) -> dict:
    """ImageNet-sized ResNet-50 (random weights) and random calibration inputs, for cost measurements."""
    set_determinism(SEED)
    model = ResNet(Bottleneck, (3, 4, 6, 3), 64, 3, 1000, imagenet_stem=True)
    # BatchNorm statistics from one random batch, so activations stay in a realistic range
    # instead of growing block after block (running stats 0/1 would not normalise anything).
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 224, 224))
    model.eval()
    path = out / "resnet50_224.onnx"
    export_torchscript(model, path, (3, 224, 224))
    rng = np.random.default_rng(SEED)
    calib = out / "resnet50_224_calib.npy"
    np.save(calib, rng.standard_normal((256, 3, 224, 224), dtype=np.float32))
    info = {"onnx": path.name, "calib": calib.name, "bytes": path.stat().st_size,
            "params": int(sum(p.numel() for p in model.parameters()))}
    print(f"  resnet50_224: {info['params']:,} parameters, {info['bytes'] / 2**20:.1f} MiB -> {path}")
    return info


def _replace_atomically(path: Path, write) -> None:
    """``write(fh)`` into a temporary file next to ``path``, then rename it over ``path``, so that
    readers running meanwhile (benchmarks) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed``, skipped when ``path`` already holds exactly these arrays (the split
    is fixed, so re-running for one model leaves the shared calibration/test files untouched)."""
    if path.exists():
        try:
            with np.load(path) as old:
                if set(old.files) == set(arrays) and all(
                        old[k].dtype == v.dtype and np.array_equal(old[k], v) for k, v in arrays.items()):
                    return
        except Exception:  # noqa: BLE001 -- unreadable: rewrite it
            pass
    _replace_atomically(path, lambda fh: np.savez_compressed(fh, **arrays))


def write_json(path: Path, obj: dict) -> None:
    _replace_atomically(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


# --------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "cache" / "zoo"), help="output folder (default cache/zoo)")
    ap.add_argument("--models", default=",".join(ZOO_MODELS),
                    help="comma-separated subset of " + ",".join(ZOO_MODELS) + " (default: all); the entries "
                         "of other models already in <out>/zoo.json are kept")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 8; 1 with --quick)")
    ap.add_argument("--width", type=int, default=None, help="override the base width of every network")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke run: resnet18 only (unless --models), width 8, 1 epoch, no dynamo, no ResNet-50-224")
    ap.add_argument("--no-dynamo", action="store_true", help="skip the dynamo exporter")
    ap.add_argument("--resnet50-224", dest="r50", action=argparse.BooleanOptionalAction, default=None,
                    help="also build the ImageNet-sized ResNet-50 (default: on, off with --quick)")
    ap.add_argument("--summary", default=None,
                    help="also copy zoo.json here (default: models/zoo.json for a full digits run)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--cifar10", metavar="DIR", help="python-pickle CIFAR-10 folder instead of digits")
    src.add_argument("--cifar100", metavar="DIR", help="python-pickle CIFAR-100 folder instead of digits")
    src.add_argument("--imagenet", metavar="DIR", help="ImageFolder (train/, val/) instead of digits")
    ap.add_argument("--image-size", type=int, default=32, help="--imagenet: side of the centre crop (default 32)")
    args = ap.parse_args(argv)

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.quick:
        if args.models == ap.get_default("models"):
            names = ["resnet18"]
        args.no_dynamo = True
        args.width = args.width or 8
    if args.epochs is None:
        args.epochs = 1 if args.quick else 8
    for n in names:
        if n not in ZOO_MODELS:
            ap.error(f"unknown model '{n}'; choose from {', '.join(ZOO_MODELS)}")
    r50 = (not args.quick) if args.r50 is None else args.r50
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_determinism(SEED, args.threads)

    if args.cifar10:
        dataset, data = "cifar10", load_cifar(Path(args.cifar10), 10)
    elif args.cifar100:
        dataset, data = "cifar100", load_cifar(Path(args.cifar100), 100)
    elif args.imagenet:
        dataset, data = "imagenet", load_imagefolder(Path(args.imagenet), args.image_size)
    else:
        dataset, data = "digits", load_digits32()
    x_tr, y_tr, x_te, y_te, stats = data
    n_classes = int(max(y_tr.max(), y_te.max()) + 1)
    shape = tuple(x_tr.shape[1:])
    print(f"{dataset}: train {x_tr.shape} test {x_te.shape}, {n_classes} classes")

    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(len(x_tr), size=min(N_CALIB, len(x_tr)), replace=False))
    save_npz(out / f"{dataset}_calib.npz", input=np.ascontiguousarray(x_tr[calib_idx]))
    save_npz(out / f"{dataset}_test.npz", input=np.ascontiguousarray(x_te), labels=y_te)

    # Merge into an existing record: models not trained in this run keep their entries.
    record_path = out / "zoo.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.setdefault("models", {})
    record.update({"script": "scripts/train_zoo.py", "seed": SEED, "torch": torch.__version__})
    record.setdefault("datasets", {})[dataset] = {
        "calib": f"{dataset}_calib.npz", "test": f"{dataset}_test.npz", "n_train": int(len(x_tr)),
        "n_test": int(len(x_te)), "classes": n_classes, "input_shape": list(shape),
        "normalisation": {k: v for k, v in stats.items() if k in ("mean", "std")},
    }
    for name in names:
        key = f"{dataset}_{name}"
        print(f"== {key}")
        set_determinism(SEED, args.threads)
        model = build(name, shape[0], n_classes, shape[1], args.width)
        params = int(sum(p.numel() for p in model.parameters()))
        t0 = time.perf_counter()
        train(model, x_tr, y_tr, args.epochs)
        train_s = time.perf_counter() - t0
        pred_t = predict(model, x_te)
        acc = float((pred_t == y_te).mean())
        path = out / f"{key}.onnx"
        export_torchscript(model, path, shape)
        pred_o = ort_predict(path, x_te)
        ort_acc = float((pred_o == y_te).mean())
        entry = {
            "onnx": path.name, "dataset": dataset, "arch": name, "params": params, "epochs": args.epochs,
            "train_seconds": round(train_s, 1), "fp32_test_top1_torch": acc, "fp32_test_top1": ort_acc,
            "torch_onnx_agreement": float((pred_o == pred_t).mean()), "bytes": path.stat().st_size,
            "batchnorm_nodes": op_counts(path).get("BatchNormalization", 0),
        }
        if not args.no_dynamo:
            dpath = out / f"{key}_dynamo.onnx"
            err = export_dynamo(model, dpath, shape)
            if err is None:
                entry["dynamo_onnx"] = dpath.name
                entry["dynamo_fp32_test_top1"] = float((ort_predict(dpath, x_te) == y_te).mean())
            else:
                entry["dynamo_error"] = err
                print(f"  dynamo export failed: {err}")
        record["models"][key] = entry
        print(f"  {params:,} parameters, {train_s:.0f} s; FP32 test top-1 torch {acc:.4f}, "
              f"onnxruntime {ort_acc:.4f} -> {path}")
        write_json(record_path, record)

    if r50:
        print("== resnet50_224 (ImageNet-sized, random weights)")
        record["resnet50_224"] = build_resnet50_224(out)
    write_json(record_path, record)
    summary = args.summary
    if summary is None and dataset == "digits" and not args.quick and set(names) >= set(ALL_MODELS) \
            and Path(args.out).resolve() == (ROOT / "cache" / "zoo").resolve():
        summary = str(ROOT / "models" / "zoo.json")
    if summary:
        shutil.copyfile(record_path, summary)
        print(f"record copied to {summary}")
    print(f"wrote {record_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
