"""A layer as a matrix product: its weight as rows, its input as unfolded patches.

Every supported layer computes ``out[o] = sum_d W[o, d] * x_patch[d]`` per output position.
:func:`weight_rows` gives ``W`` as ``[groups][O_g, D]`` and :func:`input_rows` gives the
patches as ``[groups][R, D]`` in the same ``d`` order (PyTorch's ``unfold``/im2col), so the
data-aware steps (rounding, the layer-output objective of activation quantizers) work on one
form for Conv, Gemm and MatMul. ConvTranspose and a MatMul whose weight is its left operand
are not supported (None).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ..graph.layers import Layer


def _conv_geometry(layer: Layer, x_shape) -> Optional[dict]:
    """Kernel, strides, dilations, groups and explicit pads of a 1-D or 2-D Conv."""
    w = layer.weight
    if w.ndim not in (3, 4) or len(x_shape) != w.ndim:
        return None
    a = layer.node.attrs
    spatial = w.ndim - 2
    k = list(w.shape[2:])
    s = list(a.get("strides", [1] * spatial))
    d = list(a.get("dilations", [1] * spatial))
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = list(a.get("pads", [0] * 2 * spatial))
    elif auto == "VALID":
        pads = [0] * 2 * spatial
    else:  # SAME_UPPER / SAME_LOWER
        begin, end = [], []
        for i in range(spatial):
            size = x_shape[2 + i]
            out = -(-size // s[i])
            total = max(0, (out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(large if auto == "SAME_LOWER" else small)
            end.append(small if auto == "SAME_LOWER" else large)
        pads = begin + end
    if spatial == 1:  # treat as 2-D with a height of one
        k, s, d, pads = [1] + k, [1] + s, [1] + d, [0, pads[0], 0, pads[1]]
    return {"k": k, "s": s, "d": d, "pads": pads, "groups": int(a.get("group", 1))}


def _matrix_form(layer: Layer, shape) -> Optional[Tuple[int, bool]]:
    """``(groups, transposed)`` of a weight of ``shape`` as rows ``[O, D]``: a Conv's output
    channels are its rows; Gemm (without transB) and MatMul hold ``[K, N]``, the transpose.
    None when unsupported."""
    attrs = layer.node.attrs
    if layer.op == "Conv" and len(shape) in (3, 4):
        groups = int(attrs.get("group", 1))
        return None if shape[0] % groups else (groups, False)
    if layer.op == "Gemm" and not int(attrs.get("transA", 0)) and len(shape) == 2:
        return 1, not int(attrs.get("transB", 0))
    if layer.op == "MatMul" and layer.weight_index == 1 and len(shape) == 2:
        return 1, True
    return None


def weight_rows(layer: Layer, w: Optional[np.ndarray] = None) -> Optional[List[np.ndarray]]:
    """``W`` as rows ``[O_g, D]`` per group (float64), or None when unsupported."""
    w = layer.weight if w is None else w
    form = _matrix_form(layer, np.shape(w))
    if form is None:
        return None
    groups, transposed = form
    w = np.asarray(w, dtype=np.float64)
    rows = w.T if transposed else w.reshape(w.shape[0], -1)
    return list(rows.reshape(groups, rows.shape[0] // groups, -1))


def rows_to_weight(layer: Layer, rows: List[np.ndarray], shape) -> np.ndarray:
    """Inverse of :func:`weight_rows`: the weight of ``shape`` (float32)."""
    _, transposed = _matrix_form(layer, shape)
    w = np.concatenate(rows, axis=0)
    return np.ascontiguousarray(w.T if transposed else w).reshape(shape).astype(np.float32)


def input_rows(layer: Layer, x: np.ndarray, max_rows: int,
               rng: Optional[np.random.Generator] = None) -> Optional[List[np.ndarray]]:
    """Patches of ``x`` (the layer's data input) as rows ``[R, D]`` per group, R <= max_rows.

    Rows are an evenly random subset of all output positions (fixed seed by default, so the
    same data gives the same rows). None when the layer or this input is unsupported.
    """
    rng = rng or np.random.default_rng(0)
    x = np.asarray(x, dtype=np.float32)
    if layer.op in ("Gemm", "MatMul"):
        rows_w = weight_rows(layer)
        if rows_w is None:
            return None
        d = rows_w[0].shape[1]
        if x.shape[-1] != d:
            return None
        flat = x.reshape(-1, d)
        if len(flat) > max_rows:
            flat = flat[np.sort(rng.choice(len(flat), max_rows, replace=False))]
        return [flat.astype(np.float64)]
    if layer.op != "Conv":
        return None
    geo = _conv_geometry(layer, x.shape)
    if geo is None:
        return None
    if x.ndim == 3:
        x = x[:, :, None, :]
    (kh, kw), (sh, sw), (dh, dw), p = geo["k"], geo["s"], geo["d"], geo["pads"]
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    oh, ow = (xp.shape[2] - eh) // sh + 1, (xp.shape[3] - ew) // sw + 1
    if oh < 1 or ow < 1:
        return None
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh, :ow]  # [N, C, OH, OW, kh, kw]
    total = x.shape[0] * oh * ow
    pick = np.arange(total) if total <= max_rows else np.sort(rng.choice(total, max_rows, replace=False))
    n_i, rest = np.divmod(pick, oh * ow)
    h_i, w_i = np.divmod(rest, ow)
    patches = win[n_i, :, h_i, w_i]  # [R, C, kh, kw]: materialises only the picked rows
    groups = geo["groups"]
    c = x.shape[1]
    if c % groups or layer.weight.shape[1] * groups != c:
        return None
    flat = patches.reshape(len(pick), groups, -1).astype(np.float64)
    return [flat[:, g] for g in range(groups)]


def frac_rows(layer: Layer, frac: np.ndarray, shape) -> Optional[List[np.ndarray]]:
    """Per-row fractional lengths ``[O_g]`` per group, from ``frac`` broadcast against ``shape``."""
    full = np.broadcast_to(np.asarray(frac, dtype=np.float64), shape)
    rows = weight_rows(layer, full)
    if rows is None:
        return None
    return [r[:, 0].astype(np.int64) for r in rows]


def rounding_shape(layer: Layer) -> Optional[Tuple[int, int, int]]:
    """``(fan-in, outputs, groups)`` of a layer in its matrix form (None: unsupported); from
    the shape alone, so estimating a model's rounding cost copies no weights."""
    shape = layer.weight.shape
    form = _matrix_form(layer, shape)
    if form is None:
        return None
    groups, transposed = form
    if transposed:
        return shape[0], shape[1], 1
    return int(np.prod(shape[1:])), shape[0], groups


def output_error(w_rows: List[np.ndarray], x_rows: List[np.ndarray], xq_rows: List[np.ndarray],
                 wq_rows: Optional[List[np.ndarray]] = None,
                 bias: Optional[np.ndarray] = None) -> Tuple[float, np.ndarray]:
    """Power of the output ``W x + bias`` and the rows of the error ``Wq Q(x) - W x``, groups
    side by side (``wq_rows`` None: exact weights, the input quantizer's error alone).

    Float32 products: ample for an SQNR, and twice as fast.
    """
    sig, errs, start = 0.0, [], 0
    for g, (w, x, xq) in enumerate(zip(w_rows, x_rows, xq_rows)):
        x32, xq32, w32 = (np.asarray(a, dtype=np.float32) for a in (x, xq, w))
        ref = x32 @ w32.T
        if bias is not None:
            ref = ref + np.asarray(bias[start:start + len(w)], dtype=np.float32)
            start += len(w)
        sig += float(np.sum(np.square(ref, dtype=np.float64)))
        err = (xq32 - x32) @ w32.T  # W (Q(x) - x) + (Wq - W) Q(x) = Wq Q(x) - W x
        if wq_rows is not None:
            err += xq32 @ (np.asarray(wq_rows[g], dtype=np.float32) - w32).T
        errs.append(err)
    return sig, np.concatenate(errs, axis=1)
