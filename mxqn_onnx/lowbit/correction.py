"""Bias correction: cancel the mean output shift that quantization causes.

Quantizing a layer's weights ``W -> Wq`` and its input ``x -> Q(x)`` moves each output
channel's mean by ``Wq . E[Q(x)] - W . E[x]``. ``E[x]`` is the per-channel mean of the input
seen during calibration and ``E[Q(x)] ~ E[x] + m`` with ``m`` the input quantizer's mean error
on the calibration histogram (dead zones and clipping shift the mean; the two shifts may
cancel, so both are counted). Subtracting the shift from the bias removes the systematic part
of the error: a per-layer correction computed from calibration data, no labels, no
backpropagation.

Without data for a tensor, its mean can come from the BatchNormalization that produced it
(Nagel et al. 2019, "Data-free quantization through weight equalization and bias
correction"): a BN output is ``gamma * normalised + beta``, so per channel it is taken as
``N(beta, gamma^2)`` and the mean after a ReLU (or Clip) follows in closed form; see
:func:`batchnorm_priors` and :func:`prior_input_means`.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Set, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..graph.layers import Layer, conv_input_channels, find_layers


def input_channel_axis(layer: Layer) -> Optional[int]:
    """Axis of the data input that the weight contracts over, or None when unsupported."""
    if layer.op == "Conv":
        return 1
    if layer.op == "Gemm":
        return 0 if int(layer.node.attrs.get("transA", 0)) else 1
    return None  # ConvTranspose (stride-dependent tap counts) and MatMul (no bias) are left alone


def _contract(layer: Layer, w: np.ndarray, mean_in: np.ndarray) -> Optional[np.ndarray]:
    """Per output channel, the layer's weighted sum of the input channel means (no bias)."""
    w = w.astype(np.float64)
    if layer.op == "Conv":
        groups = int(layer.node.attrs.get("group", 1))
        out_ch, in_per_group = w.shape[0], w.shape[1]
        idx = conv_input_channels(out_ch, in_per_group, groups)
        if idx is None or mean_in.shape[0] != groups * in_per_group:
            return None
        per_tap = w.reshape(out_ch, in_per_group, -1).sum(axis=2)  # [O, C/g]
        return np.sum(per_tap * mean_in[idx], axis=1)
    if layer.op == "Gemm":
        alpha = float(layer.node.attrs.get("alpha", 1.0))
        trans_b = int(layer.node.attrs.get("transB", 0))
        k = w.shape[1] if trans_b else w.shape[0]
        if mean_in.shape[0] != k:
            return None
        return alpha * (w @ mean_in if trans_b else mean_in @ w)
    return None


def output_shift(layer: Layer, w: np.ndarray, wq: np.ndarray, mean_in: np.ndarray,
                 input_mean_error: float = 0.0) -> Optional[np.ndarray]:
    """Expected change of each output channel's mean; None when not computable."""
    exact = _contract(layer, w, mean_in)
    quant = _contract(layer, wq, mean_in.astype(np.float64) + input_mean_error)
    if exact is None or quant is None:
        return None
    return quant - exact


# --------------------------------------------------------------------------- BatchNorm priors

#: per BN output tensor name: (beta, |gamma|), float64, one entry per channel (axis 1)
Priors = Dict[str, Tuple[np.ndarray, np.ndarray]]


def _bn_parameter_values(model: onnx.ModelProto, wanted: Set[str]) -> Dict[str, np.ndarray]:
    """Values of the ``wanted`` constants: initializers, Constant nodes, Identity of those.

    Enough for how exporters store BN parameters; anything computed stays unknown and its
    BN simply gets no prior. Only the wanted tensors are decoded (the weights are large).
    """
    protos: Dict[str, object] = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # topological order in a valid model, so Identity chains resolve
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value":
                    protos[node.output[0]] = a.t
                elif a.name == "value_float":
                    protos[node.output[0]] = np.array(a.f, np.float32)
                elif a.name == "value_floats":
                    protos[node.output[0]] = np.array(a.floats, np.float32)
        elif node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in protos:
            protos[node.output[0]] = protos[node.input[0]]
    return {name: (v if isinstance(v, np.ndarray) else numpy_helper.to_array(v))
            for name, v in protos.items() if name in wanted}


def batchnorm_priors(model: onnx.ModelProto) -> Priors:
    """Per BatchNormalization output tensor: ``(beta, |gamma|)`` from the ORIGINAL model.

    Read before :func:`mxqn_onnx.graph.loading.normalise` folds the BNs away. The names stay valid
    in the normalised graph: ``fold_batchnorm`` gives the folded Conv/Gemm the BN's output
    tensor, an unfolded BN keeps its own, and the opset upgrade keeps tensor names.

    Only the output's distribution matters, ``y = gamma * (x - mean) / sqrt(var + eps) + beta``:
    its per-channel mean is ``beta`` and its spread ``|gamma|`` *provided the running
    statistics match the data the model sees* (true for in-distribution data of a trained
    network, which is the assumption this prior rests on). BNs in training mode, with
    parameters that are not constants, or with non-1-D parameters (pre-opset-9
    ``spatial=0``) get no entry.
    """
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
    values = _bn_parameter_values(model, {name for n in bns for name in n.input[1:3]})
    priors: Priors = {}
    for node in bns:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("training_mode", 0) or not attrs.get("spatial", 1):
            continue
        if len(node.input) < 3 or not node.output or not node.output[0]:
            continue
        gamma, beta = values.get(node.input[1]), values.get(node.input[2])
        if gamma is None or beta is None or gamma.ndim != 1 or gamma.shape != beta.shape:
            continue
        priors[node.output[0]] = (beta.astype(np.float64), np.abs(gamma.astype(np.float64)))
    return priors


def _std_normal_cdf(z: np.ndarray) -> np.ndarray:
    # erfc keeps precision in the far left tail, where 1 + erf(z) cancels
    return 0.5 * np.vectorize(math.erfc, otypes=[np.float64])(-np.asarray(z, np.float64) / math.sqrt(2.0))


def _std_normal_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.asarray(z, np.float64) ** 2) / math.sqrt(2.0 * math.pi)


def clipped_gaussian_mean(mu: np.ndarray, sigma: np.ndarray, lo: float = 0.0,
                          hi: float = math.inf) -> np.ndarray:
    """``E[clip(y, lo, hi)]`` for ``y ~ N(mu, sigma^2)``, elementwise (``lo=0, hi=inf``: ReLU).

    For ReLU this is ``mu Phi(mu/sigma) + sigma phi(mu/sigma)``; ``sigma = 0`` gives
    ``clip(mu, lo, hi)``.
    """
    mu = np.asarray(mu, np.float64)
    sigma = np.abs(np.asarray(sigma, np.float64))
    safe = np.where(sigma > 0, sigma, 1.0)  # the sigma = 0 channels are replaced below
    a = (lo - mu) / safe
    b = (hi - mu) / safe
    cdf_a, cdf_b = _std_normal_cdf(a), _std_normal_cdf(b)
    out = mu * (cdf_b - cdf_a) + safe * (_std_normal_pdf(a) - _std_normal_pdf(b))
    # the clipped tails sit at the bounds; an infinite bound holds no mass (and inf * 0 is nan)
    if math.isfinite(lo):
        out = out + lo * cdf_a
    if math.isfinite(hi):
        out = out + hi * (1.0 - cdf_b)
    return np.where(sigma > 0, out, np.clip(mu, lo, hi))


def _scalar_const(t) -> Optional[float]:
    if isinstance(t, gs.Constant) and np.asarray(t.values).size == 1:
        return float(np.asarray(t.values).reshape(()))
    return None


def _passes_through(node: gs.Node) -> bool:
    """Nodes whose output is their first input at inference: Identity, inference Dropout."""
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        mode = node.inputs[2] if len(node.inputs) > 2 else None
        return mode is None or (isinstance(mode, gs.Constant) and not np.asarray(mode.values).any())
    return False


def _clip_bounds(node: gs.Node) -> Optional[Tuple[float, float]]:
    """Constant ``(lo, hi)`` of a Clip (inputs since opset 11, attributes before), else None."""
    bounds = [float(node.attrs.get("min", -math.inf)), float(node.attrs.get("max", math.inf))]
    for i in (1, 2):
        t = node.inputs[i] if len(node.inputs) > i else None
        if t is None or (isinstance(t, gs.Variable) and not t.name):  # omitted optional input
            continue
        v = _scalar_const(t)
        if v is None:  # a computed bound: the clipped mean cannot be known
            return None
        bounds[i - 1] = v
    return bounds[0], bounds[1]


def _rank(t: gs.Tensor) -> Optional[int]:
    return len(t.shape) if getattr(t, "shape", None) is not None else None


class _PriorWalker:
    """Follows tensors back to BN outputs; memoised, since residual Adds share operands."""

    def __init__(self, priors: Priors) -> None:
        self.priors = priors
        self.means: Dict[str, Optional[np.ndarray]] = {}

    def gaussian(self, t: gs.Tensor) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """``(mu, sigma)`` of a tensor that is a BN output, possibly through Identity/Dropout."""
        for _ in range(64):  # pass-through chains are short; the bound guards against cycles
            if t.name in self.priors:
                return self.priors[t.name]
            node = t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None
            if node is None or not _passes_through(node) or not node.inputs:
                return None
            t = node.inputs[0]
        return None

    def mean(self, t: gs.Tensor) -> Optional[np.ndarray]:
        if t.name not in self.means:
            self.means[t.name] = None  # a cycle (never in a valid graph) ends as "not derivable"
            self.means[t.name] = self._mean(t)
        return self.means[t.name]

    def _mean(self, t: gs.Tensor) -> Optional[np.ndarray]:
        g = self.gaussian(t)
        if g is not None:
            return g[0]  # no activation: E = beta
        node = t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None
        if node is None or not node.inputs:
            return None
        if node.op in ("Relu", "Clip"):
            g = self.gaussian(node.inputs[0])
            bounds = (0.0, math.inf) if node.op == "Relu" else _clip_bounds(node)
            if g is None or bounds is None:
                return None
            return clipped_gaussian_mean(g[0], g[1], *bounds)
        if _passes_through(node):
            return self.mean(node.inputs[0])
        if node.op == "Add" and len(node.inputs) == 2:
            # linearity: E[a + b] = E[a] + E[b] with no independence needed; only when the
            # channel axes provably line up (equal lengths, and equal ranks when known)
            a, b = node.inputs
            ma, mb = self.mean(a), self.mean(b)
            ra, rb = _rank(a), _rank(b)
            if ma is None or mb is None or ma.shape != mb.shape or (ra is not None and rb is not None and ra != rb):
                return None
            return ma + mb
        # MaxPool (keeps the largest values: the mean goes up by an amount the prior cannot
        # give), Relu/Clip of anything but a BN output (not Gaussian any more, e.g. after a
        # residual Add), Concat, Resize, ...: not derivable
        return None


def prior_input_means(graph: gs.Graph, priors: Priors) -> Dict[str, np.ndarray]:
    """Per-channel means of layer inputs that follow from BN priors, by tensor name.

    ``graph`` is the normalised graph (:func:`mxqn_onnx.graph.loading.normalise`), ``priors`` come
    from :func:`batchnorm_priors` on the model before normalising. Supported between a BN
    output and the layer: nothing (``E = beta``), ReLU or a Clip with constant bounds
    (ReLU6) on the BN output (closed-form clipped-Gaussian mean), Identity / inference
    Dropout, and the Add of two derivable tensors (sum of means). Anything else is left out.

    Only layers contracting over axis 1 (the BN channel axis) get an entry: Conv, and Gemm
    without ``transA``. The BN prior assumes its running statistics match the data and that
    its output is near Gaussian per channel (a sum of many products, so usually close);
    like the data path, the consuming Conv's zero padding is not accounted for.
    """
    walker = _PriorWalker(priors)
    out: Dict[str, np.ndarray] = {}
    layers, _ = find_layers(graph)
    for layer in layers:
        t = layer.data
        if t.name in out or input_channel_axis(layer) != 1:
            continue
        m = walker.mean(t)
        if m is not None:
            out[t.name] = m
    return out
