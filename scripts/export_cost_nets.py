"""Build the two networks of the cost benchmark (``scripts/bench_cost.py``, issue 12).

Neither is committed: they are written to ``--out`` (default ``/tmp/mxqn-cost-nets``).

* ``detector.onnx``: a DBNet-style text-detection / segmentation network for high-resolution
  pages. Backbone: MobileNetV3-large at width 0.5 (PaddleOCR's ``det_mv3`` configuration):
  3x3 stride-2 stem, 15 inverted-residual blocks with depthwise 3x3/5x5 convs, ReLU or
  hard-swish, squeeze-excite (GlobalAveragePool, 1x1 convs, HardSigmoid, Mul) in six of them,
  BatchNorm after every conv. Neck: DBFPN, 1x1 lateral convs to 96 channels, top-down
  nearest x2 ``Resize`` + ``Add``, 3x3 smoothing convs to 24 channels per level, bilinear
  x8/x4/x2 ``Resize`` to stride 4, ``Concat``. Head: 3x3 conv + BN + ReLU, two stride-2
  ``ConvTranspose`` (the first followed by BN + ReLU) back to full resolution, ``Sigmoid``:
  one probability map [N, 1, H, W].
  Exported with the TorchScript exporter at opset 12 in eval mode with constant folding
  (BatchNorm folded into the convolutions by the exporter), **dynamic batch, height and
  width** (H and W must be multiples of 32, as for DBNet), then every initializer is turned
  into a ``Constant`` node (as some third-party exporters write weights), so the file has no
  initializers at all.
  Weights: torch's default initialisation, then a short training (``--det-steps`` Adam steps,
  batch 4, 256x256 random crops of scikit-image's photographs) on a synthetic dense-prediction
  objective: the map of high-local-contrast pixels (edges, text strokes; |gray - 7x7 box
  blur| in the top 7% of the image, dilated by a pixel). In train mode this also sets every BatchNorm's running
  statistics from real images, so activations and the output map have the ranges of a
  trained network: most of the map near 0, edge/text regions near 1, not a flat 0.5.
* ``resnet50_b1.onnx``: the onnx package's light ResNet-50
  (``onnx/backend/test/data/light/light_resnet50.onnx``: opset 9, batch fixed at 1, every
  weight a ``ConstantOfShape`` filled with 0.02) with its weights folded into real
  initializers: conv and FC weights He-normal (std sqrt(2 / fan_in); FC 1 / fan_in), biases 0,
  BatchNorm scale 1 and shift 0, and BatchNorm running mean/variance measured on real photos
  (8 random 224x224 crops, ImageNet-normalised), one BatchNorm depth at a time, so every
  BatchNorm output is zero-mean unit-variance per channel as in a trained network. The
  BatchNormalization nodes stay in the graph (the quantizers fold them). The file is written
  at IR version 4 with the initializers no longer listed as graph inputs (the light file's
  IR 3 convention): onnxruntime treats an initializer that is also a graph input as
  overridable and then neither constant-folds nor fuses it, which would slow FP32 and every
  quantized model alike in a way no current exporter produces.

Usage::

    python scripts/export_cost_nets.py [--out /tmp/mxqn-cost-nets] [--only detector,resnet50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(ROOT / "tests"))
from graph_helpers import IMAGENET_MEAN, IMAGENET_STD, LIGHT  # noqa: E402

SEED = 0
DEFAULT_OUT = Path("/tmp/mxqn-cost-nets")
#: colour photographs shipped inside scikit-image (no download); grey ones are repeated to RGB
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "stereo_motorcycle", "camera", "coins", "clock", "moon", "page", "text")
#: photographs held back from the detector's training, used for calibration only
CALIB_ONLY = ("rocket", "text")


# --------------------------------------------------------------------------- real images


def _load_photo(name: str) -> np.ndarray:
    import skimage.data

    im = getattr(skimage.data, name)()
    if isinstance(im, tuple):  # stereo_motorcycle: (left, right, disparity)
        im = im[0]
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    return np.ascontiguousarray(im[..., :3].astype(np.uint8))


def photo_crops(count: int, height: int, width: int, seed: int = SEED,
                names: Sequence[str] = PHOTOS) -> np.ndarray:
    """``count`` random crops of scikit-image's photographs, ImageNet-normalised, float32 NCHW.

    Each crop cycles through ``names``; the photo is rescaled by a random factor so that it
    covers ``height x width`` (upscaled where it is smaller: 512-pixel photos become pages),
    then a random window is cut and randomly flipped left-right.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    cache: Dict[str, np.ndarray] = {}
    out = np.empty((count, 3, height, width), np.float32)
    for i in range(count):
        name = names[i % len(names)]
        im = cache.setdefault(name, _load_photo(name))
        h, w = im.shape[:2]
        scale = max(height / h, width / w) * rng.uniform(1.0, 1.5)
        nh, nw = max(height, int(round(h * scale))), max(width, int(round(w * scale)))
        big = np.asarray(Image.fromarray(im).resize((nw, nh), Image.BILINEAR), np.float32) / 255.0
        y, x = rng.integers(0, nh - height + 1), rng.integers(0, nw - width + 1)
        crop = big[y:y + height, x:x + width]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


# --------------------------------------------------------------------------- detector (torch)


def build_detector_module():
    """The DBNet-style network as a torch module (torch imported here only)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def div8(c: float) -> int:
        return max(8, int(c + 4) // 8 * 8)

    class ConvBN(nn.Sequential):
        def __init__(self, cin, cout, k, s=1, groups=1, act: Optional[str] = None):
            layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
            if act == "relu":
                layers.append(nn.ReLU())
            elif act == "hswish":
                layers.append(nn.Hardswish())
            super().__init__(*layers)

    class SE(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.fc1 = nn.Conv2d(c, c // 4, 1)
            self.fc2 = nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            s = F.adaptive_avg_pool2d(x, 1)
            return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))

    class Block(nn.Module):
        def __init__(self, cin, k, exp, cout, se, act, stride):
            super().__init__()
            self.expand = ConvBN(cin, exp, 1, act=act) if exp != cin else nn.Identity()
            self.dw = ConvBN(exp, exp, k, stride, groups=exp, act=act)
            self.se = SE(exp) if se else nn.Identity()
            self.project = ConvBN(exp, cout, 1)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.project(self.se(self.dw(self.expand(x))))
            return x + y if self.residual else y

    # MobileNetV3-large: kernel, expansion, out channels, SE, activation, stride
    cfg = [(3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2), (3, 72, 24, False, "relu", 1),
           (5, 72, 40, True, "relu", 2), (5, 120, 40, True, "relu", 1), (5, 120, 40, True, "relu", 1),
           (3, 240, 80, False, "hswish", 2), (3, 200, 80, False, "hswish", 1),
           (3, 184, 80, False, "hswish", 1), (3, 184, 80, False, "hswish", 1),
           (3, 480, 112, True, "hswish", 1), (3, 672, 112, True, "hswish", 1),
           (5, 672, 160, True, "hswish", 2), (5, 960, 160, True, "hswish", 1),
           (5, 960, 160, True, "hswish", 1)]
    scale = 0.5
    taps = (2, 5, 11)  # stride 4, 8, 16 outputs; the last stage (after the 1x1 conv) is stride 32

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            c = div8(16 * scale)
            self.stem = ConvBN(3, c, 3, 2, act="hswish")
            blocks, self.channels = [], []
            for i, (k, e, o, se, act, s) in enumerate(cfg):
                blocks.append(Block(c, k, div8(e * scale), div8(o * scale), se, act, s))
                c = div8(o * scale)
                if i in taps:
                    self.channels.append(c)
            self.blocks = nn.ModuleList(blocks)
            self.last = ConvBN(c, div8(960 * scale), 1, act="hswish")
            self.channels.append(div8(960 * scale))

        def forward(self, x):
            x, feats = self.stem(x), []
            for i, b in enumerate(self.blocks):
                x = b(x)
                if i in taps:
                    feats.append(x)
            feats.append(self.last(x))
            return feats

    class DBFPN(nn.Module):
        def __init__(self, channels: Sequence[int], inner: int = 96):
            super().__init__()
            self.lateral = nn.ModuleList(nn.Conv2d(c, inner, 1, bias=False) for c in channels)
            self.smooth = nn.ModuleList(nn.Conv2d(inner, inner // 4, 3, padding=1, bias=False) for _ in channels)

        def forward(self, feats):
            c2, c3, c4, c5 = (lat(f) for lat, f in zip(self.lateral, feats))
            o4 = c4 + F.interpolate(c5, scale_factor=2.0, mode="nearest")
            o3 = c3 + F.interpolate(o4, scale_factor=2.0, mode="nearest")
            o2 = c2 + F.interpolate(o3, scale_factor=2.0, mode="nearest")
            p5, p4, p3, p2 = (sm(o) for sm, o in zip(self.smooth[::-1], (c5, o4, o3, o2)))
            up = lambda t, f: F.interpolate(t, scale_factor=float(f), mode="bilinear", align_corners=False)  # noqa: E731
            return torch.cat([up(p5, 8), up(p4, 4), up(p3, 2), p2], dim=1)

    class DBHead(nn.Module):
        def __init__(self, cin: int = 96):
            super().__init__()
            mid = cin // 4
            self.conv = ConvBN(cin, mid, 3, act="relu")
            self.up1 = nn.ConvTranspose2d(mid, mid, 2, 2)
            self.bn = nn.BatchNorm2d(mid)
            self.up2 = nn.ConvTranspose2d(mid, 1, 2, 2)

        def forward(self, x):
            x = F.relu(self.bn(self.up1(self.conv(x))))
            return self.up2(x)  # logits; the exported model ends in Sigmoid

    class DBNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.neck = DBFPN(self.backbone.channels)
            self.head = DBHead()
            self.export_probabilities = False

        def forward(self, x):
            logits = self.head(self.neck(self.backbone(x)))
            return torch.sigmoid(logits) if self.export_probabilities else logits

    return DBNet()


def edge_targets(x):
    """The synthetic objective: 1 on the 7% of pixels with the highest local contrast (edges,
    strokes) of each image, dilated by 1 pixel."""
    import torch.nn.functional as F

    gray = x.mean(1, keepdim=True)
    contrast = (gray - F.avg_pool2d(gray, 7, 1, 3, count_include_pad=False)).abs()
    thr = contrast.flatten(1).quantile(0.93, dim=1).view(-1, 1, 1, 1)
    return (F.max_pool2d((contrast > thr).float(), 3, 1, 1) > 0).float()


def train_detector(steps: int, size: int = 256, batch: int = 4) -> Tuple[object, List[float]]:
    """Build, train briefly on the edge objective (BatchNorm statistics from real photos), eval."""
    import torch
    import torch.nn.functional as F
    from training import set_determinism

    set_determinism(SEED, threads=2)
    torch.use_deterministic_algorithms(False)  # bilinear upsampling backward has no deterministic CPU kernel
    net = build_detector_module()
    names = [n for n in PHOTOS if n not in CALIB_ONLY]
    pool = torch.from_numpy(photo_crops(max(64, batch * 8), size, size, seed=SEED + 1, names=names))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(SEED)
    losses: List[float] = []
    net.train()
    for step in range(steps):
        xb = pool[torch.randint(len(pool), (batch,), generator=gen)]
        loss = F.binary_cross_entropy_with_logits(net(xb), edge_targets(xb))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # a few passes without gradients at the training size, cumulative average: the running
    # statistics then describe the final weights, not a mix along the training path
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for i in range(0, len(pool), batch):
            net(pool[i:i + batch])
    net.eval()
    net.export_probabilities = True
    return net, losses


def initializers_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer becomes a ``Constant`` node at the top of the graph (none stay)."""
    g = model.graph
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{i}", value=t)
              for i, t in enumerate(g.initializer)]
    inits = {t.name for t in g.initializer}
    keep_inputs = [vi for vi in g.input if vi.name not in inits]
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    del g.input[:]
    g.input.extend(keep_inputs)
    return model


def export_detector(out: Path, steps: int, check_size: Tuple[int, int] = (320, 480)) -> dict:
    """Train, export at opset 12 with dynamic N/H/W, weights as Constant nodes; check vs torch."""
    import torch
    from export_test_nets import quiet

    t0 = time.perf_counter()
    net, losses = train_detector(steps)
    path = out / "detector.onnx"
    tmp = out / ".detector.tmp.onnx"
    with quiet():
        torch.onnx.export(net, (torch.zeros(1, 3, 256, 256),), str(tmp), dynamo=False, opset_version=12,
                          do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL,
                          input_names=["x"], output_names=["maps"],
                          dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"},
                                        "maps": {0: "batch", 2: "height", 3: "width"}})
    m = initializers_to_constants(onnx.load(str(tmp)))
    tmp.unlink()
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    ops: Dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    # onnxruntime against torch on held-back photos at a size other than the export's
    import onnxruntime as ort

    x = photo_crops(2, *check_size, seed=SEED + 2, names=CALIB_ONLY)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    err = float(np.abs(got - ref).max())
    if err > 1e-3:
        raise SystemExit(f"detector.onnx: onnxruntime differs from torch by {err:g}")
    info = {"path": str(path), "bytes": path.stat().st_size, "opset": 12, "ops": ops,
            "params": int(sum(p.numel() for p in net.parameters())), "train_steps": steps,
            "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
            "max_abs_diff_vs_torch": err,
            "output_on_held_back": {"mean": float(got.mean()), "p05": float(np.quantile(got, 0.05)),
                                    "p50": float(np.quantile(got, 0.5)), "p95": float(np.quantile(got, 0.95)),
                                    "frac_above_0.5": float((got > 0.5).mean())},
            "seconds": round(time.perf_counter() - t0, 1)}
    print(f"wrote {path} ({info['bytes'] / 1e6:.1f} MB, {info['params']:,} parameters, "
          f"{ops.get('Constant', 0)} Constant nodes, loss {info['loss_first_last']}, "
          f"max |ort - torch| {err:.1e}); output on held-back photos: {info['output_on_held_back']}")
    return info


# --------------------------------------------------------------------------- ResNet-50 (onnx light)


def _bn_depth_order(g: onnx.GraphProto) -> List[List[onnx.NodeProto]]:
    """BatchNormalization nodes grouped by how many BatchNorms lie upstream of them."""
    producer = {o: n for n in g.node for o in n.output}
    depth: Dict[str, int] = {}

    def tensor_depth(name: str) -> int:  # BN count on the deepest path to this tensor
        n = producer.get(name)
        if n is None:
            return 0
        key = n.output[0]
        if key not in depth:
            d = max((tensor_depth(i) for i in n.input[:1 if n.op_type == "BatchNormalization" else None]),
                    default=0)
            depth[key] = d + (n.op_type == "BatchNormalization")
        return depth[key]

    sys.setrecursionlimit(10000)
    levels: Dict[int, List[onnx.NodeProto]] = {}
    for n in g.node:
        if n.op_type == "BatchNormalization":
            levels.setdefault(tensor_depth(n.input[0]), []).append(n)
    return [levels[k] for k in sorted(levels)]


def export_resnet50(out: Path, bn_samples: int = 8) -> dict:
    """light_resnet50 with He-random weights, data-measured BatchNorm statistics, batch 1."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    src = onnx.load(str(LIGHT / "light_resnet50.onnx"))
    g = src.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    rng = np.random.default_rng(SEED)
    bn_param = {}
    for n in g.node:
        if n.op_type == "BatchNormalization":
            for role, name in zip(("scale", "bias", "mean", "var"), n.input[1:]):
                bn_param[name] = role
    weight_of = {n.input[1]: n.op_type for n in g.node if n.op_type in ("Conv", "Gemm")}
    values: Dict[str, np.ndarray] = {}
    for n in g.node:  # the ConstantOfShape weights, and the BN parameters stored as initializers
        if n.op_type != "ConstantOfShape":
            continue
        name, shape = n.output[0], tuple(int(s) for s in inits[n.input[0]])
        values[name] = np.empty(shape, np.float32)
    for name in bn_param:
        if name not in values:
            values[name] = inits[name].astype(np.float32)
    for name, arr in values.items():
        if name in weight_of:
            fan_in = int(np.prod(arr.shape[1:]))
            std = np.sqrt((2.0 if weight_of[name] == "Conv" else 1.0) / fan_in)
            values[name] = (rng.standard_normal(arr.shape) * std).astype(np.float32)
        else:
            values[name] = {"scale": np.ones, "var": np.ones}.get(bn_param.get(name), np.zeros)(
                arr.shape, np.float32)
    data_in = g.input[0].name
    # BatchNorm statistics from real photos, one depth at a time, every weight fed as an input:
    # one session for every pass
    probe = _with_values_as_inputs(onnx.ModelProto.FromString(src.SerializeToString()), values)
    bns = [n for n in probe.graph.node if n.op_type == "BatchNormalization"]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n.input[0]) for n in bns)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    photos = photo_crops(bn_samples, 224, 224, seed=SEED + 3)
    for level in _bn_depth_order(g):
        sums = {n.input[0]: [0.0, 0.0, 0] for n in level}
        for i in range(bn_samples):
            feeds = {data_in: photos[i:i + 1], **values}
            outs = sess.run([n.input[0] for n in level], feeds)
            for n, a in zip(level, outs):
                a = a.astype(np.float64)
                s = sums[n.input[0]]
                s[0] = s[0] + a.sum(axis=(0, 2, 3))
                s[1] = s[1] + (a * a).sum(axis=(0, 2, 3))
                s[2] += a.shape[0] * a.shape[2] * a.shape[3]
        for n in level:
            s1, s2, cnt = sums[n.input[0]]
            mean = s1 / cnt
            values[n.input[3]] = mean.astype(np.float32)
            values[n.input[4]] = np.maximum(s2 / cnt - mean * mean, 1e-6).astype(np.float32)
    # the written model: ConstantOfShape nodes gone, every weight an initializer, IR 4, batch 1
    keep_nodes = [n for n in g.node if n.op_type != "ConstantOfShape"]
    used = {i for n in keep_nodes for i in n.input}
    new_inits = [numpy_helper.from_array(values[k] if k in values else inits[k], k)
                 for k in list(values) + [k for k in inits if k not in values] if k in used]
    graph = helper.make_graph(keep_nodes, g.name, [g.input[0]], list(g.output), new_inits)
    model = helper.make_model(graph, opset_imports=list(src.opset_import),
                              producer_name="mxqn-onnx scripts/export_cost_nets.py")
    model.ir_version = 4
    onnx.checker.check_model(model, full_check=True)
    path = out / "resnet50_b1.onnx"
    onnx.save(model, str(path))
    # sanity: the written model's logits and probabilities on held-back photos
    softmax_in = [n for n in keep_nodes if n.op_type == "Softmax"][0].input[0]
    probe2 = onnx.load(str(path))
    probe2.graph.output.extend([onnx.ValueInfoProto(name=softmax_in)])
    sess = ort.InferenceSession(probe2.SerializeToString(), providers=["CPUExecutionProvider"])
    held = photo_crops(4, 224, 224, seed=SEED + 4)
    probs, logits = zip(*(sess.run(None, {data_in: held[i:i + 1]}) for i in range(len(held))))
    probs, logits = np.concatenate(probs), np.concatenate(logits)
    info = {"path": str(path), "bytes": path.stat().st_size, "opset": 9, "input": data_in,
            "params": int(sum(v.size for k, v in values.items() if k in weight_of)),
            "logits_std": float(logits.std()), "max_prob_mean": float(probs.max(1).mean()),
            "top1_distinct_on_4": int(len(set(probs.argmax(1).tolist()))),
            "seconds": round(time.perf_counter() - t0, 1)}
    print(f"wrote {path} ({info['bytes'] / 1e6:.1f} MB, {info['params']:,} weights); held-back photos: "
          f"logits std {info['logits_std']:.2f}, mean max-probability {info['max_prob_mean']:.3f}")
    return info


def _with_values_as_inputs(model: onnx.ModelProto, values: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """The light model with every weight in ``values`` a plain graph input, fed on each run
    (onnxruntime treats the initializers of an IR 3 model as constants, not as overridable)."""
    g = model.graph
    have = {i.name for i in g.input}
    nodes = [n for n in g.node if n.op_type != "ConstantOfShape"]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name not in values]
    del g.initializer[:]
    g.initializer.extend(inits)
    for name, v in values.items():
        if name not in have:
            g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(v.shape)))
    return model


def build(out: Path, only: Sequence[str] = ("detector", "resnet50"), det_steps: int = 200) -> dict:
    """Write the requested networks to ``out`` and ``out/nets.json``; returns the record."""
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "nets.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if "resnet50" in only:
        record["resnet50"] = export_resnet50(out)
    if "detector" in only:
        record["detector"] = export_detector(out, det_steps)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="cache folder (default /tmp/mxqn-cost-nets)")
    ap.add_argument("--only", default="detector,resnet50", help="comma-separated: detector, resnet50")
    ap.add_argument("--det-steps", type=int, default=200, help="training steps of the detector")
    args = ap.parse_args(argv)
    build(Path(args.out), [s for s in args.only.split(",") if s], args.det_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
