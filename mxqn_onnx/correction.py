"""Bias correction: cancel the mean output shift that weight quantization causes.

Rounding a layer's weights from ``W`` to ``Wq`` moves each output channel's mean by
``(Wq - W) . E[x]``, where ``E[x]`` is the per-channel mean of the layer's input seen during
calibration. Subtracting that shift from the bias removes the systematic part of the weight
error (no labels, no backpropagation: a per-layer correction computed from calibration data).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .layers import Layer


def input_channel_axis(layer: Layer) -> Optional[int]:
    """Axis of the data input that the weight contracts over, or None when unsupported."""
    if layer.op == "Conv":
        return 1
    if layer.op == "Gemm":
        return 0 if int(layer.node.attrs.get("transA", 0)) else 1
    return None  # ConvTranspose (stride-dependent tap counts) and MatMul (no bias) are left alone


def weight_error_shift(layer: Layer, w: np.ndarray, wq: np.ndarray, mean_in: np.ndarray) -> Optional[np.ndarray]:
    """Expected change of each output channel caused by ``w -> wq``; None when not computable."""
    dw = wq.astype(np.float64) - w.astype(np.float64)
    if layer.op == "Conv":
        groups = int(layer.node.attrs.get("group", 1))
        out_ch, in_per_group = dw.shape[0], dw.shape[1]
        if mean_in.shape[0] != groups * in_per_group or out_ch % groups:
            return None
        per_tap = dw.reshape(out_ch, in_per_group, -1).sum(axis=2)  # [O, C/g]
        group_of = np.arange(out_ch) // (out_ch // groups)
        means = mean_in.reshape(groups, in_per_group)[group_of]  # [O, C/g]
        return np.sum(per_tap * means, axis=1)
    if layer.op == "Gemm":
        alpha = float(layer.node.attrs.get("alpha", 1.0))
        trans_b = int(layer.node.attrs.get("transB", 0))
        k = dw.shape[1] if trans_b else dw.shape[0]
        if mean_in.shape[0] != k:
            return None
        return alpha * (dw @ mean_in if trans_b else mean_in @ dw)
    return None
