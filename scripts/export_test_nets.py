"""Build the small networks of the real-graph tests and export them to ONNX with torch.

Three tiny networks, each covering layer types and graph shapes that exporters produce in
the wild, trained for a few seconds on scikit-learn's bundled ``load_digits`` (8x8 digits
scaled to [0, 1] and upscaled 2x by pixel repetition to 16x16), so their weights and
activations look like a trained model's rather than like noise:

* ``mobile``: MobileNet-style classifier: BatchNorm after every conv (folded by mxqn-onnx),
  HardSwish, depthwise conv, grouped conv with dilation 2, ReLU6, residual Add, Concat of
  two branches, global average pooling, ``nn.Linear`` head (Gemm with transB=1).
* ``hybrid``: CNN/attention hybrid: conv stem, tokens, LayerNorm written out as
  ReduceMean/Sub/Pow/Sqrt/Div, single-head self-attention (MatMul with constant weights on
  3-D tensors, Softmax), HardSwish MLP, residual Adds, mean pooling, linear head.
* ``unet``: denoising encoder-decoder: strided conv, ConvTranspose (plain and grouped),
  skip Concat, image output.

Every network has a dynamic batch, height and width. Each is exported with both torch
exporters (TorchScript: ``dynamo=False``; dynamo: ``dynamo=True``) asked for opsets 11, 13,
17 and the newest each supports (20 and 23), to ``tests/data/nets/<net>_<exporter>_op<N>.onnx``
where N is the opset the file really has: the dynamo exporter builds opset 18 and keeps it
when it cannot convert down, so its files are op17 (where conversion worked), op18 and op23.
``manifest.json`` lists what was written and what each exporter could not produce. Every written file is
checked against torch with onnxruntime (same outputs, at two input sizes).

The test suite only reads the ONNX files (it does not need torch). Rebuild them with::

    python scripts/export_test_nets.py [--out tests/data/nets]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import set_determinism  # noqa: E402

SEED = 0
OPSETS = (11, 13, 17)
NEWEST = {"torchscript": 20, "dynamo": 23}


def digits_images(scale: int = 2) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as float32 [N, 1, 8*scale, 8*scale] in [0, 1], and labels.

    The tests rebuild their calibration data with this same function (numpy only).
    """
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0).repeat(scale, axis=1).repeat(scale, axis=2)
    return x[:, None], d.target.astype(np.int64)


class Mobile(nn.Module):
    """Depthwise, grouped+dilated convs, BN, HardSwish/ReLU6, residual, concat, GAP, Gemm head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),
                                nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4, bias=False),
                                     nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=3), nn.BatchNorm2d(24), nn.Hardswish())
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        x = x + self.grouped(x)
        x = torch.cat([x, self.branch(x)], dim=1)
        x = self.mix(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ManualLayerNorm(nn.Module):
    """LayerNorm spelled out, so it exports as ReduceMean/Sub/Pow/Sqrt/Div (as many models do)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - x.mean(-1, keepdim=True)
        var = d.pow(2).mean(-1, keepdim=True)
        return d / torch.sqrt(var + self.eps) * self.weight + self.bias


class Hybrid(nn.Module):
    """Conv stem, then a transformer block on the feature-map tokens, then a linear head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim), nn.Hardswish())
        self.ln1 = ManualLayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = ManualLayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)
        self.scale = dim ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)  # [B, N, C]
        q, k, v = self.qkv(self.ln1(t)).chunk(3, dim=-1)
        att = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scale, dim=-1)
        t = t + self.proj(torch.matmul(att, v))
        t = t + self.fc2(F.hardswish(self.fc1(self.ln2(t))))
        return self.head(t.mean(1))


class UNet(nn.Module):
    """Tiny encoder-decoder with ConvTranspose upsampling and a skip concat."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU())
        self.refine = nn.Sequential(nn.ConvTranspose2d(16, 16, 3, padding=1, groups=2), nn.ReLU())
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        u = self.up(self.down(e))
        return self.out(self.refine(torch.cat([u, e], dim=1)))


NETS = {"mobile": Mobile, "hybrid": Hybrid, "unet": UNet}


def train(name: str, net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    """A few epochs of Adam: classification for the classifiers, denoising for the U-Net."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            xb = xt[idx]
            if name == "unet":
                noisy = xb + 0.2 * torch.randn(xb.shape, generator=gen)
                loss = F.mse_loss(net(noisy), xb)
            else:
                loss = F.cross_entropy(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def export(net: nn.Module, exporter: str, opset: int, path: Path) -> None:
    """Export with a dynamic batch, height and width; raise if the exporter cannot."""
    example = torch.zeros(2, 1, 16, 16)
    if exporter == "torchscript":
        torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["output"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "output": {0: "batch"}})
        return
    # dynamo: height and width must stay even for the stride-2 / ConvTranspose round trip
    batch = torch.export.Dim("batch", min=1, max=1024)
    half_h = torch.export.Dim("half_h", min=2, max=256)
    half_w = torch.export.Dim("half_w", min=2, max=256)
    program = torch.onnx.export(net, (example,), dynamo=True, opset_version=opset,
                                input_names=["image"], output_names=["output"],
                                dynamic_shapes={"x": {0: batch, 2: 2 * half_h, 3: 2 * half_w}})
    program.save(str(path), external_data=False)


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' warnings, prints and log lines (they are not ours to fix)."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def check_against_torch(net: nn.Module, path: Path) -> float:
    """Largest |onnxruntime - torch| over two batch sizes and input sizes."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(SEED)
    worst = 0.0
    for shape in ((3, 1, 16, 16), (2, 1, 24, 20)):
        x = rng.random(shape, dtype=np.float32)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        worst = max(worst, float(np.max(np.abs(got - ref))))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "nets"))
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = digits_images()
    written: Dict[str, dict] = {}
    missing: List[str] = []
    for name, cls in NETS.items():
        set_determinism(SEED, threads=1)
        net = train(name, cls(), x, y, args.epochs)
        for exporter in ("torchscript", "dynamo"):
            for opset in (*OPSETS, NEWEST[exporter]):
                tmp = out / f".{name}_{exporter}.tmp.onnx"
                try:
                    with quiet():
                        export(net, exporter, opset, tmp)
                    got = onnx.load(str(tmp))
                    real_opset = next(i.version for i in got.opset_import if i.domain in ("", "ai.onnx"))
                    err = check_against_torch(net, tmp)
                except Exception as exc:  # an exporter limitation, reported and left out
                    tmp.unlink(missing_ok=True)
                    reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                    missing.append(f"{name} {exporter} opset {opset}: {type(exc).__name__}: {reason}")
                    print(f"not exported: {name} {exporter} opset {opset}: {reason}")
                    continue
                # the dynamo exporter builds opset 18 and falls back to it when it cannot
                # convert down: name files by the opset they really have, keep one of each
                path = out / f"{name}_{exporter}_op{real_opset}.onnx"
                if real_opset != opset:
                    missing.append(f"{name} {exporter} opset {opset}: exporter produced opset {real_opset}")
                if path.name in written:
                    tmp.unlink()
                    continue
                tmp.replace(path)
                if err > 1e-3:
                    path.unlink()
                    raise SystemExit(f"{path.name}: onnxruntime differs from torch by {err:g}")
                written[path.name] = {"net": name, "exporter": exporter, "opset": real_opset,
                                      "bytes": path.stat().st_size, "max_abs_diff_vs_torch": err}
                print(f"wrote {path.name} (opset {real_opset}, {path.stat().st_size} bytes, "
                      f"max |ort - torch| = {err:.2e})")
    for old in out.glob("*.onnx"):  # files of an earlier run that this one did not produce
        if old.name not in written:
            old.unlink()
    (out / "manifest.json").write_text(json.dumps(
        {"torch": torch.__version__, "onnx": onnx.__version__, "files": written, "not_exported": missing},
        indent=2, sort_keys=True) + "\n")
    total = sum(v["bytes"] for v in written.values())
    print(f"{len(written)} files, {total / 1e6:.2f} MB total; {len(missing)} requests not met as asked "
          "(listed in manifest.json)")


if __name__ == "__main__":
    main()
