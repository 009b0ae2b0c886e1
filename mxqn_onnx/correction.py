"""Bias correction: cancel the mean output shift that quantization causes.

Quantizing a layer's weights ``W -> Wq`` and its input ``x -> Q(x)`` moves each output
channel's mean by ``Wq . E[Q(x)] - W . E[x]``. ``E[x]`` is the per-channel mean of the input
seen during calibration and ``E[Q(x)] ~ E[x] + m`` with ``m`` the input quantizer's mean error
on the calibration histogram (dead zones and clipping shift the mean; the two shifts may
cancel, so both are counted). Subtracting the shift from the bias removes the systematic part
of the error: a per-layer correction computed from calibration data, no labels, no
backpropagation.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .layers import Layer, conv_input_channels


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
