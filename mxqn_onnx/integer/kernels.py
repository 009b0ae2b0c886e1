"""Integer arithmetic of the mxqn format, per operation: codes, shifts and accumulators.

The values an integer datapath holds are one of:

* a float32 ``numpy`` array (float regions of the graph);
* :class:`FixedT`: fixed-point codes ``c`` meaning ``c * 2^-frac``;
* :class:`LogT`: log codes, ``sign * 2^(n / 2^k)`` with ``n`` in ``[E - M + 1, E]``;
* :class:`AccT`: a layer's int64 accumulator ``acc`` meaning ``acc * 2^-frac`` (``frac``
  may differ per output channel).

Crossing from integer to float is ``ldexp`` (an exponent change, exact in float64 while the
accumulator has at most 53 significant bits) followed by a float32 rounding, which is what
the float graph does at the same point. Crossing from float to codes is the quantizer itself:
scaling by 2^f (exact) and round half to even, or comparisons against the log thresholds.
When the accumulator feeds a quantizer directly, requantization is an integer
round-half-even right shift (fixed point) or an integer threshold search (log).

Nothing here reads a graph: :mod:`mxqn_onnx.integer.executor` walks the model and calls
these kernels. See docs/FORMAT.md for the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Tuple, Union

import numpy as np
import onnx

from ..errors import MxqnError
from ..quant import quantizers as Q

#: Accumulators are int64; stay this many bits below the sign bit so that sums cannot wrap.
ACC_BITS = 62
#: Mantissa bits of a float32 level (the log constant table entries are 24-bit integers).
LEVEL_MANTISSA_BITS = 24


# --------------------------------------------------------------------------- value types


@dataclass
class FixedT:
    """Fixed-point codes: the value is ``codes * 2^-frac``."""

    codes: np.ndarray  # int64
    frac: int
    bits: int
    signed: bool

    def to_float(self) -> np.ndarray:
        return np.ldexp(self.codes.astype(np.float64), -self.frac).astype(np.float32)


@dataclass
class LogT:
    """Log codes: the value is ``sign * 2^(n / 2^k)`` (``sign`` 0 encodes zero)."""

    sign: np.ndarray  # int64 in {-1, 0, 1}
    n: np.ndarray  # int64 exponent index, meaningful where sign != 0
    table: "LogTable"

    def to_float(self) -> np.ndarray:
        return (self.sign * self.table.level_of(self.n)).astype(np.float32)


@dataclass
class AccT:
    """A layer's accumulator: the value is ``acc * 2^-frac`` (``frac`` broadcasts over acc)."""

    acc: np.ndarray  # int64
    frac: np.ndarray  # int64, broadcastable against acc

    def to_float(self) -> np.ndarray:
        return np.ldexp(self.acc.astype(np.float64), -self.frac).astype(np.float32)


Value = Union[np.ndarray, FixedT, LogT, AccT]


def as_float(v: Value) -> np.ndarray:
    return v if isinstance(v, np.ndarray) else v.to_float()


# --------------------------------------------------------------------------- integer helpers


def shift_round(a: np.ndarray, s) -> np.ndarray:
    """``a * 2^-s`` rounded half to even, for int64 ``a`` and integer shifts ``s`` (any sign).

    ``s <= 0`` is an exact left shift; ``s > 0`` an arithmetic right shift plus the rounding
    bit: round up when the dropped bits exceed half, or equal half and the kept LSB is odd.
    """
    a = np.asarray(a, dtype=np.int64)
    s = np.broadcast_to(np.asarray(s, dtype=np.int64), a.shape)
    left = np.left_shift(a, np.maximum(-s, 0))
    r_s = np.clip(s, 1, 63)
    q = np.right_shift(a, r_s)
    rem = a - np.left_shift(q, r_s)
    half = np.left_shift(np.int64(1), r_s - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    return np.where(s > 0, q + up, left)


def _ceil_scaled(value: float, frac: int) -> int:
    """``ceil(value * 2^frac)`` exactly, for a float ``value`` (a dyadic rational)."""
    x = Fraction(value) * (Fraction(2) ** frac)
    return -((-x.numerator) // x.denominator)


class LogTable:
    """The levels of one ``LOG(bits, k, E, signed)`` quantizer, as integers.

    Level ``n`` is the float32 number ``2^(n/2^k)`` (rounded once, as the ONNX function and
    :func:`mxqn_onnx.quant.quantizers.pow2` compute it) = ``mant[n] * 2^exp[n]`` with a 24-bit
    integer mantissa. ``mant`` depends only on ``n mod 2^k``: the 2^k-entry constant table of
    a shift-based datapath; ``exp`` is ``floor(n / 2^k) - 23``: the shift.
    """

    def __init__(self, bits: int, k: int, E: int, signed: bool):
        self.bits, self.k, self.E, self.signed = bits, k, E, signed
        m = Q.log_num_levels(bits, signed)
        self.n_lo = E - m + 1
        self.n = np.arange(self.n_lo, E + 1, dtype=np.int64)
        # levels (float32, ascending) and decision thresholds exactly as the ONNX function
        # computes them; the first threshold, between zero and the lowest level, is the dead zone
        v, thr = Q.log_tables(bits, k, E, signed)
        self.levels, self.mids, self.zero_below = v[1:], thr[1:], thr[0]
        mant, ex = np.frexp(self.levels.astype(np.float64))
        self.mant = np.rint(np.ldexp(mant, LEVEL_MANTISSA_BITS)).astype(np.int64)
        self.exp = ex.astype(np.int64) - LEVEL_MANTISSA_BITS

    def level_of(self, n: np.ndarray) -> np.ndarray:
        idx = np.clip(np.asarray(n) - self.n_lo, 0, len(self.levels) - 1)
        return self.levels[idx]

    def quantize_float(self, x: np.ndarray) -> LogT:
        """Codes of a float tensor: the threshold search on ``|x|`` (comparisons only)."""
        a = np.abs(x.astype(np.float32))
        n = self.n_lo + np.searchsorted(self.mids, a, side="right")
        return self._finish(np.sign(x).astype(np.int64), n, a < self.zero_below)

    def quantize_acc(self, acc: np.ndarray, frac: np.ndarray) -> LogT:
        """Codes of an accumulator ``acc * 2^-frac``: integer thresholds ``ceil(mid * 2^frac)``."""
        a = np.abs(acc)
        frac = np.broadcast_to(frac, acc.shape)
        n = np.empty(acc.shape, dtype=np.int64)
        zero = np.empty(acc.shape, dtype=bool)
        big = 2**ACC_BITS
        for f in np.unique(frac):
            sel = frac == f
            thr = np.array([min(_ceil_scaled(float(m), int(f)), big) for m in self.mids], dtype=np.int64)
            z = min(_ceil_scaled(float(self.zero_below), int(f)), big)
            n[sel] = self.n_lo + np.searchsorted(thr, a[sel], side="right")
            zero[sel] = a[sel] < z
        return self._finish(np.sign(acc).astype(np.int64), n, zero)

    def _finish(self, sign: np.ndarray, n: np.ndarray, zero: np.ndarray) -> LogT:
        if not self.signed:
            sign = np.maximum(sign, 0)
        sign = np.where(zero, 0, sign)
        return LogT(sign.astype(np.int64), np.where(sign != 0, n, self.n_lo - 1), self)


def fixed_from_float(x: np.ndarray, bits: int, frac: int, signed: bool) -> FixedT:
    """Codes ``clip(round_half_even(x * 2^frac))``; the scaling is an exact exponent change."""
    lo, hi = Q.fxp_range(bits, signed)
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.rint(np.ldexp(x.astype(np.float64), frac))
    return FixedT(np.clip(np.nan_to_num(r, nan=0.0), lo, hi).astype(np.int64), frac, bits, signed)


def fixed_from_acc(v: AccT, bits: int, frac: int, signed: bool) -> FixedT:
    """Integer requantization: shift the accumulator to ``frac`` (round half to even), clip."""
    lo, hi = Q.fxp_range(bits, signed)
    return FixedT(np.clip(shift_round(v.acc, v.frac - frac), lo, hi), frac, bits, signed)


# --------------------------------------------------------------------------- integer layers


def _pads(node_attrs: dict, spatial_in, kernel, strides, dilations) -> Tuple[List[int], List[int]]:
    nd = len(kernel)
    auto = node_attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            out = -(-spatial_in[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial_in[i], 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else large)
            end.append(large if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * nd, [0] * nd
    pads = list(node_attrs.get("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


def conv_int(x: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    """Integer N-d convolution (ONNX Conv semantics, zero padding), int64 accumulation."""
    nd = w.ndim - 2
    kernel = list(w.shape[2:])
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    group = int(attrs.get("group", 1))
    begin, end = _pads(attrs, x.shape[2:], kernel, strides, dil)
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    sl = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dil)
    win = win[sl]  # [N, C, *out, *kernel]
    n, c = x.shape[:2]
    out_sp = win.shape[2:2 + nd]
    o = w.shape[0]
    cols = win.reshape((n, group, c // group) + out_sp + tuple(kernel))
    # move (C/G, *kernel) last and flatten them: [N, G, prod(out), C/G * prod(kernel)]
    perm = (0, 1) + tuple(range(3, 3 + nd)) + (2,) + tuple(range(3 + nd, 3 + 2 * nd))
    cols = cols.transpose(perm).reshape(n, group, int(np.prod(out_sp)), -1)
    wg = w.reshape(group, o // group, -1)  # [G, O/G, C/G * prod(kernel)]
    out = np.matmul(cols, wg.transpose(0, 2, 1)[None])  # int64 x int64 -> int64
    out = out.transpose(0, 1, 3, 2).reshape((n, o) + tuple(out_sp))
    return out


def conv_transpose_int(x: np.ndarray, w: np.ndarray, attrs: dict, name: str = "ConvTranspose") -> np.ndarray:
    """Integer 2-d transposed convolution (ONNX ConvTranspose, explicit pads), int64 sums.

    Each input pixel scatters ``x * w[c, o, ky, kx]`` to output ``(iy * s + ky * d - pad_top,
    ix * s + kx * d - pad_left)``; exact integer sums, so the order is free."""
    if w.ndim != 4:
        raise MxqnError(f"{name}: {w.ndim - 2}-d ConvTranspose (2-d only)")
    auto = attrs.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET" or "output_shape" in attrs:
        raise MxqnError(f"{name}: ConvTranspose with auto_pad or output_shape (explicit pads only)")
    s = list(attrs.get("strides", [1, 1]))
    d = list(attrs.get("dilations", [1, 1]))
    g = int(attrs.get("group", 1))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    opad = list(attrs.get("output_padding", [0, 0]))
    n, c, h, wd = x.shape
    cg, og, kh, kw = c // g, w.shape[1], w.shape[2], w.shape[3]
    full = [(h - 1) * s[0] + (kh - 1) * d[0] + 1 + opad[0], (wd - 1) * s[1] + (kw - 1) * d[1] + 1 + opad[1]]
    y = np.zeros((n, og * g, full[0] + max(0, -pads[0]), full[1] + max(0, -pads[1])), np.int64)
    for gi in range(g):
        xg = x[:, gi * cg:(gi + 1) * cg]
        for ky in range(kh):
            for kx in range(kw):
                contrib = np.einsum("nchw,co->nohw", xg, w[gi * cg:(gi + 1) * cg, :, ky, kx])
                y[:, gi * og:(gi + 1) * og, ky * d[0]:ky * d[0] + (h - 1) * s[0] + 1:s[0],
                  kx * d[1]:kx * d[1] + (wd - 1) * s[1] + 1:s[1]] += contrib
    oh, ow = full[0] - pads[0] - pads[2], full[1] - pads[1] - pads[3]
    return y[:, :, pads[0]:pads[0] + oh, pads[1]:pads[1] + ow]


@dataclass
class QLayer:
    """A quantized layer as found in the graph: its node and integer operands."""

    node: onnx.NodeProto
    data: str  # name of the quantizer output it reads
    w_codes: np.ndarray  # int64
    w_frac: np.ndarray  # int64, broadcastable against the weight
    w_bits: int
    b_codes: Optional[np.ndarray]
    b_frac: Optional[np.ndarray]
    weight_first: bool = False  # MatMul(W, x)


def power_of_two_exponent(scale: np.ndarray, what: str) -> np.ndarray:
    mant, ex = np.frexp(scale.astype(np.float64))
    if not np.all(mant == 0.5):
        raise MxqnError(f"{what}: scale is not a power of two; not an mxqn model")
    return -(ex.astype(np.int64) - 1)  # scale = 2^-frac


def _out_channel_view(frac: np.ndarray, op: str, out_ndim: int, trans_b: bool) -> np.ndarray:
    """Per-output-channel fractional lengths shaped to broadcast over the layer output."""
    flat = frac.reshape(-1)
    if flat.size == 1:
        return flat.reshape(())
    if op in ("Conv", "ConvTranspose"):
        return flat.reshape((1, -1) + (1,) * (out_ndim - 2))
    return flat.reshape((1,) * (out_ndim - 1) + (-1,))


def accumulate(layer: QLayer, x: Union[FixedT, LogT], attrs: dict) -> AccT:
    """The layer's exact integer accumulator (plus bias) and its fractional length(s)."""
    node = layer.node
    op = node.op_type
    w = layer.w_codes
    trans_b = bool(attrs.get("transB", 0))
    f_w = layer.w_frac.reshape(()) if layer.w_frac.size == 1 else layer.w_frac.reshape(-1)
    if op == "ConvTranspose" and f_w.ndim:  # per output channel of a group: the same in every group
        f_w = np.tile(f_w, int(attrs.get("group", 1)) * w.shape[1] // f_w.size)
    if layer.weight_first and f_w.ndim:
        raise MxqnError(f"{node.name}: per-channel weight on the left of a MatMul is not supported")
    if op == "Conv":
        k_in = int(np.prod(w.shape[1:]))
    elif op == "ConvTranspose":
        k_in = int(w.shape[0] // int(attrs.get("group", 1)) * np.prod(w.shape[2:]))
    elif op == "Gemm":
        k_in = int(w.shape[1] if trans_b else w.shape[0])
    else:
        k_in = int(w.shape[-1] if layer.weight_first else w.shape[-2])
    lg_k = max(1, math.ceil(math.log2(max(k_in, 2))))
    if isinstance(x, FixedT):
        a = x.codes
        f_in = x.frac
        a_bits = x.bits
    else:
        t = x.table
        # activation = sign * mant[n] * 2^exp[n]; choose a common base exponent e0 so that
        # sign * mant << (exp - e0) and the weighted sum fit the accumulator
        headroom = ACC_BITS - layer.w_bits - LEVEL_MANTISSA_BITS - lg_k
        e_max = int(t.exp.max())
        e0 = max(int(t.exp.min()), e_max - headroom)
        idx = np.clip(x.n - t.n_lo, 0, len(t.mant) - 1)
        a = x.sign * shift_round(t.mant[idx], e0 - t.exp[idx])
        f_in = -e0
        a_bits = LEVEL_MANTISSA_BITS + (e_max - e0) + 1
    if a_bits + layer.w_bits + lg_k > ACC_BITS + 1:
        raise MxqnError(f"{node.name}: accumulator would need more than {ACC_BITS} bits")
    if op == "Conv":
        acc = conv_int(a, w, attrs)
    elif op == "ConvTranspose":
        acc = conv_transpose_int(a, w, attrs, node.name)
    elif op == "Gemm":
        A = a.T if attrs.get("transA", 0) else a
        B = w.T if trans_b else w
        acc = A @ B
    else:
        acc = (w @ a) if layer.weight_first else (a @ w)
    f_acc = f_w + f_in
    f_acc = _out_channel_view(np.asarray(f_acc), op, acc.ndim, trans_b)
    if layer.b_codes is not None:
        b = layer.b_codes.astype(np.int64)
        b_frac = np.broadcast_to(layer.b_frac, b.shape)
        b_view = _out_channel_view(b, op, acc.ndim, trans_b)
        bf_view = _out_channel_view(np.asarray(b_frac, dtype=np.int64), op, acc.ndim, trans_b)
        # a common fractional length for sum and bias; the int32 bias shifted there must
        # stay within the accumulator (normally f_b == f_acc: no shift at all)
        f_sum = np.minimum(f_acc, bf_view + (ACC_BITS - 32))
        acc = shift_round(acc, f_acc - f_sum) + shift_round(b_view, bf_view - f_sum)
        f_acc = f_sum
    return AccT(acc.astype(np.int64), np.asarray(f_acc, dtype=np.int64))
