"""C export: the operators between quantized layers, and the plan's tensor and step types.

See :mod:`mxqn_onnx.integer.c_plan` for the representation. Ops exact in float32 run on integer
tensors; averaging pools, Softmax and float layers run in float C (:mod:`mxqn_onnx.integer.c_steps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx

from ..errors import MxqnError
from .executor import _attrs
from .kernels import _pads

#: accumulators at or above this magnitude may not be float32 values (24-bit mantissa)
F32_EXACT = 2 ** 24
#: integer tensors, sums and shifted operands stay below this (int64 with headroom)
INT_LIMIT = 2 ** 62
CTYPE_BYTES = {"int8_t": 1, "uint8_t": 1, "int16_t": 2, "uint16_t": 2, "int32_t": 4, "int64_t": 8,
               "float": 4}


def code_ctype(bits: int, signed: bool) -> str:
    if bits <= 8:
        return "int8_t" if signed else "uint8_t"
    return "int16_t" if signed else "uint16_t"


def acc_ctype(bound: int) -> str:
    return "int32_t" if bound < 2 ** 31 else "int64_t"


class Buf:
    """A region of the arena (or the caller's input buffer when ``external``)."""

    def __init__(self, size: int, first: int, external: bool = False):
        self.size, self.first, self.last, self.external = size, first, first, external
        self.offset = 0


@dataclass
class Val:
    name: str
    shape: Tuple[int, ...]
    kind: str  # "int" | "log" | "float"
    ctype: str
    frac: Optional[np.ndarray] = None  # int: int64 [nch]
    inner: int = 1
    bound: int = 0
    raw: bool = False
    direct: bool = False  # the layer's accumulator itself (quantizers requantize it exactly)
    table: Any = None  # log: LogTable
    quant: Optional[dict] = None  # codes: the quantizer's attributes
    buf: Optional[Buf] = None
    last: int = -1

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * CTYPE_BYTES[self.ctype]

    @property
    def nch(self) -> int:
        return 1 if self.frac is None else int(self.frac.size)

    def needs_r24(self) -> bool:
        return self.kind == "int" and self.raw and self.bound >= F32_EXACT


@dataclass
class Step:
    op: str
    node: str  # ONNX node name (for comments and messages)
    ins: List[Val]
    outs: List[Val]
    p: Dict[str, Any] = field(default_factory=dict)
    scratch: List[Tuple[str, int]] = field(default_factory=list)  # (name, bytes)
    inplace: bool = False  # the output may share the first input's buffer


def f32_bound(v: Val) -> int:
    """Bound of ``v`` after rounding to float32 (rounding may step just past the bound)."""
    return v.bound + (1 << max(0, v.bound.bit_length() - 24)) if v.needs_r24() else v.bound


def widen(ctype: str, bound: int) -> str:
    """``ctype``, or a wider accumulator type when ``bound`` does not fit it."""
    if ctype in ("int32_t", "int64_t"):
        return ctype if bound < 2 ** 31 or ctype == "int64_t" else "int64_t"
    return ctype


def refuse(node: onnx.NodeProto, why: str) -> MxqnError:
    return MxqnError(f"node '{node.name or node.output[0]}' ({node.op_type}): {why}; cannot export it to C")


def _channel_pow2(factor, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    """The exponents of a constant broadcast over a tensor of ``shape`` that is one positive
    power of two per channel (axis 1) or for the whole tensor; None otherwise."""
    f = np.asarray(factor, np.float64)
    if len(shape) < 2 or f.ndim > len(shape) or any(
            d != 1 and (ax != 1 or d != shape[1]) for ax, d in enumerate((1,) * (len(shape) - f.ndim) + f.shape)):
        return None
    mant, exp = np.frexp(f.reshape(-1))
    if not np.all(mant == 0.5):
        return None
    return (exp - 1).astype(np.int64)


def _channel_ok(v: Val, axis: int = 1) -> bool:
    """The per-channel fractional lengths follow ``axis`` of the tensor's shape."""
    if v.nch == 1:
        return True
    return len(v.shape) > axis and v.shape[axis] == v.nch and v.inner == int(np.prod(v.shape[axis + 1:]))


class BetweenOps:
    """Handlers ``op_<OpType>`` for the nodes between (and after) quantized layers."""

    def _like(self, v: Val, name: str, shape=None, **kw) -> Val:
        d = dict(kind=v.kind, ctype=v.ctype, frac=v.frac, inner=v.inner, bound=v.bound, raw=v.raw,
                 table=v.table, quant=None)
        if kw.get("raw") is False and v.needs_r24():  # an int op standing for a float op rounds first
            d["bound"] = f32_bound(v)
            d["ctype"] = widen(v.ctype, d["bound"])
        d.update(kw)
        return Val(name, tuple(shape if shape is not None else v.shape), **d)

    def _view(self, node):
        v = self.val(node.input[0], node)
        out = self._like(v, node.output[0], self.shape(node.output[0]), quant=v.quant)
        self.add(Step("view", node.name, [v], [out]))

    op_Flatten = op_Reshape = op_Squeeze = op_Unsqueeze = op_Identity = _view

    def op_Mul(self, node):
        """A constant power-of-two factor per channel (the depthwise input shifts of
        :mod:`mxqn_onnx.lowbit.depthwise`) on integer values: exact, and free, as only the
        fractional lengths change (``x * 2^s`` has ``frac - s``)."""
        if node.input[0] not in self.vals:
            return self.float_binary(node)
        v = self.val(node.input[0], node)
        shape = self.shape(node.output[0])
        factor = self.const.get(node.input[1]) if len(node.input) > 1 and node.input[1] not in self.vals else None
        shifts = _channel_pow2(factor, shape) if factor is not None and v.kind == "int" else None
        if shifts is None or shape != v.shape or not _channel_ok(v):
            return self.float_binary(node)  # anything else: a float32 multiply, as onnxruntime does
        nch = max(v.nch, shifts.size)
        frac = (np.broadcast_to(v.frac, (nch,)) - np.broadcast_to(shifts, (nch,))).astype(np.int64)
        inner = v.inner if nch == v.nch else int(np.prod(shape[2:]))
        out = self._like(v, node.output[0], shape, frac=frac, inner=inner, quant=None)
        self.add(Step("view", node.name, [v], [out]))

    def op_Dropout(self, node):
        if len(node.output) > 1 and node.output[1]:
            raise refuse(node, "Dropout with a mask output")
        self._view(node)

    def op_Relu(self, node):
        v = self.val(node.input[0], node)
        if v.kind == "log":
            v = self.as_float(v, node)
        if v.kind == "int":
            out = self._like(v, node.output[0], raw=False)
            self.add(Step("int_relu", node.name, [v], [out], inplace=True))
        else:
            out = Val(node.output[0], v.shape, "float", "float")
            self.add(Step("float_relu", node.name, [v], [out], inplace=True))

    def _clip_bounds(self, node) -> Tuple[float, float]:
        a = _attrs(node)
        lo, hi = float(a.get("min", -np.inf)), float(a.get("max", np.inf))
        for i, attr in ((1, "lo"), (2, "hi")):
            if len(node.input) > i and node.input[i]:
                if node.input[i] not in self.const:
                    raise refuse(node, f"Clip {attr} bound is not a constant")
                val = float(np.asarray(self.const[node.input[i]]).reshape(-1)[0])
                lo, hi = (val, hi) if i == 1 else (lo, val)
        return float(np.float32(lo)), float(np.float32(hi))

    def op_Clip(self, node):
        v = self.val(node.input[0], node)
        lo, hi = self._clip_bounds(node)
        if v.kind == "int":
            ilo, ihi = [], []
            ok = True
            for f in v.frac.tolist():
                for b, dst in ((lo, ilo), (hi, ihi)):
                    if math.isinf(b):
                        dst.append(None)
                        continue
                    s = b * 2.0 ** f
                    ok &= s == math.floor(s) and abs(s) < INT_LIMIT
                    dst.append(int(s) if ok else 0)
            if ok:
                ihi_max = max([abs(h) for h in ihi if h is not None] + [0])
                bound = v.bound if any(h is None for h in ihi) else min(v.bound, max(ihi_max, max(
                    [abs(x) for x in ilo if x is not None] + [0])))
                out = self._like(v, node.output[0], raw=False)
                out.bound = max(min(out.bound, bound), 1)
                self.add(Step("int_clip", node.name, [v], [out], p=dict(lo=ilo, hi=ihi), inplace=True))
                return
        v = self.as_float(v, node)
        out = Val(node.output[0], v.shape, "float", "float")
        self.add(Step("float_clip", node.name, [v], [out], p=dict(lo=lo, hi=hi), inplace=True))

    def _pool_params(self, node, v: Val, glob: bool) -> dict:
        if len(v.shape) not in (3, 4):
            raise refuse(node, "pooling over other than 1 or 2 spatial dimensions")
        out_shape = self.shape(node.output[0])
        sp_in = v.shape[2:] if len(v.shape) == 4 else (1,) + v.shape[2:]
        sp_out = out_shape[2:] if len(out_shape) == 4 else (1,) + out_shape[2:]
        if glob:
            return dict(C=v.shape[1], H=sp_in[0], W=sp_in[1], KH=sp_in[0], KW=sp_in[1], SH=1, SW=1, DH=1, DW=1,
                        PT=0, PL=0, OH=1, OW=1, glob=True)
        a = _attrs(node)
        k = list(a["kernel_shape"])
        nd = len(k)
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        begin, _ = _pads(a, v.shape[2:], k, strides, dil)
        if nd == 1:
            k, strides, dil, begin = [1] + k, [1] + strides, [1] + dil, [0] + list(begin)
        return dict(C=v.shape[1], H=sp_in[0], W=sp_in[1], KH=k[0], KW=k[1], SH=strides[0], SW=strides[1],
                    DH=dil[0], DW=dil[1], PT=begin[0], PL=begin[1], OH=sp_out[0], OW=sp_out[1], glob=False,
                    include_pad=bool(a.get("count_include_pad", 0)))

    def _max_pool(self, node, glob: bool):
        if len(node.output) > 1 and node.output[1]:
            raise refuse(node, "MaxPool with an indices output")
        v = self.val(node.input[0], node)
        p = self._pool_params(node, v, glob)
        out_shape = self.shape(node.output[0])
        if v.kind == "int" and _channel_ok(v):
            out = self._like(v, node.output[0], out_shape, raw=False,
                             inner=1 if v.nch == 1 else p["OH"] * p["OW"])
            self.add(Step("int_maxpool", node.name, [v], [out], p=p))
        else:
            v = self.as_float(v, node)
            out = Val(node.output[0], out_shape, "float", "float")
            self.add(Step("float_maxpool", node.name, [v], [out], p=p))

    def op_MaxPool(self, node):
        self._max_pool(node, False)

    def op_GlobalMaxPool(self, node):
        self._max_pool(node, True)

    def _avg_pool(self, node, glob: bool):
        v = self.as_float(self.val(node.input[0], node), node)
        p = self._pool_params(node, v, glob)
        if not glob and _attrs(node).get("ceil_mode", 0):
            raise refuse(node, "AveragePool with ceil_mode=1")
        if p["DH"] != 1 or p["DW"] != 1:
            raise refuse(node, "dilated AveragePool")
        out = Val(node.output[0], self.shape(node.output[0]), "float", "float")
        self.add(Step("float_gap" if glob else "float_avgpool", node.name, [v], [out], p=p,
                      scratch=[] if glob else [("col", 4 * p["W"])]))

    def op_AveragePool(self, node):
        self._avg_pool(node, False)

    def op_GlobalAveragePool(self, node):
        self._avg_pool(node, True)

    def op_ReduceMean(self, node):
        """A mean over both spatial axes of an NCHW tensor, as the dynamo exporter writes a
        global average pool: that pool's float step (same memory layout with keepdims 0)."""
        v = self.val(node.input[0], node)
        a = _attrs(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in self.const:
                raise refuse(node, "ReduceMean with computed axes")
            axes = np.asarray(self.const[node.input[1]]).reshape(-1).tolist()
        if len(v.shape) != 4 or axes is None or sorted(int(x) % 4 for x in axes) != [2, 3]:
            raise refuse(node, "ReduceMean over other than the two spatial axes of an NCHW tensor")
        self._avg_pool(node, True)

    def op_Add(self, node):
        if any(i not in self.vals for i in node.input[:2]):
            return self.float_binary(node)  # a constant operand
        a, b = (self.val(i, node) for i in node.input[:2])
        shape = self.shape(node.output[0])
        if a.shape != shape or b.shape != shape:
            return self.float_binary(node)  # broadcasting
        if a.kind == "int" and b.kind == "int" and (a.nch == 1 or b.nch == 1 or a.inner == b.inner) \
                and (a.nch == 1 or b.nch == 1 or a.nch == b.nch):
            nch = max(a.nch, b.nch)
            inner = a.inner if a.nch > 1 else b.inner
            fa = np.broadcast_to(a.frac, (nch,))
            fb = np.broadcast_to(b.frac, (nch,))
            fm = np.maximum(fa, fb)
            sa, sb = fm - fa, fm - fb
            bound = max(f32_bound(a) * 2 ** int(x) + f32_bound(b) * 2 ** int(y) for x, y in zip(sa, sb))
            if bound < INT_LIMIT:
                out = Val(node.output[0], shape, "int", acc_ctype(bound), fm.astype(np.int64) if nch > 1 else fm[:1],
                          inner if nch > 1 else 1, bound)
                self.add(Step("int_add", node.name, [a, b], [out], p=dict(sa=sa, sb=sb)))
                return
        self.float_binary(node)

    def op_Sum(self, node):
        if len([i for i in node.input if i]) != 2:
            raise refuse(node, "Sum of other than two tensors")
        self.op_Add(node)

    def op_Concat(self, node):
        vs = [self.val(i, node) for i in node.input if i]
        shape = self.shape(node.output[0])
        axis = int(_attrs(node)["axis"]) % len(shape)
        if all(v.kind == "int" for v in vs):
            frac, inner = self._concat_frac(vs, shape, axis)
            if frac is not None:
                bound = max(f32_bound(v) for v in vs)
                ct = widen(vs[0].ctype, bound) if len({v.ctype for v in vs}) == 1 else acc_ctype(bound)
                out = Val(node.output[0], shape, "int", ct, frac, inner, bound)
                self.add(Step("int_concat", node.name, vs, [out], p=dict(axis=axis)))
                return
        vs = [self.as_float(v, node) for v in vs]
        out = Val(node.output[0], shape, "float", "float")
        self.add(Step("float_concat", node.name, vs, [out], p=dict(axis=axis)))

    @staticmethod
    def _concat_frac(vs: List[Val], shape, axis) -> Tuple[Optional[np.ndarray], int]:
        """Fractional-length structure of a Concat of int tensors (None: not expressible)."""
        scal = {int(v.frac[0]) for v in vs if v.nch == 1}
        if all(v.nch == 1 for v in vs) and len(scal) == 1:
            return vs[0].frac[:1], 1
        if int(np.prod(shape[:axis])) != 1:
            return None, 1  # blocks of different inputs interleave
        inners = {v.inner for v in vs if v.nch > 1}
        if len(inners) > 1:
            return None, 1
        inner = inners.pop() if inners else math.gcd(*[v.numel for v in vs])
        if any(v.nch == 1 and v.numel % inner for v in vs):
            return None, 1
        frac = np.concatenate([v.frac if v.nch > 1 else np.full(v.numel // inner, v.frac[0]) for v in vs])
        return frac.astype(np.int64), inner

    def op_Transpose(self, node):
        v = self.val(node.input[0], node)
        perm = list(_attrs(node).get("perm", list(range(len(v.shape)))[::-1]))
        if v.kind == "log" or (v.kind == "int" and (v.nch > 1 or v.needs_r24())):
            v = self.as_float(v, node)  # per-channel lengths do not follow a transpose
        out = self._like(v, node.output[0], self.shape(node.output[0]))
        self.add(Step("transpose", node.name, [v], [out], p=dict(perm=perm)))

    def op_Softmax(self, node):
        v = self.as_float(self.val(node.input[0], node), node)
        a = _attrs(node)
        opset = self.ex.opset
        axis = int(a.get("axis", -1 if opset >= 13 else 1)) % len(v.shape)
        if opset >= 13:
            if axis != len(v.shape) - 1 and int(np.prod(v.shape[axis + 1:])) != 1:
                raise refuse(node, "Softmax over other than the last axis")
            n = v.shape[axis]
        else:
            n = int(np.prod(v.shape[axis:]))
        out = Val(node.output[0], v.shape, "float", "float")
        self.add(Step("float_softmax", node.name, [v], [out], p=dict(n=n, rows=v.numel // n)))

    # float layers left unquantized (keep_float, exclude): plain float C
    def _float_weight(self, node, i) -> np.ndarray:
        if len(node.input) <= i or not node.input[i]:
            return None
        if node.input[i] not in self.const:
            raise refuse(node, f"float layer whose input {i} is not a constant")
        return np.asarray(self.const[node.input[i]], np.float32)

    def op_Conv(self, node):
        x = self.as_float(self.val(node.input[0], node), node)
        w, b = self._float_weight(node, 1), self._float_weight(node, 2)
        if w.ndim != 4:
            raise refuse(node, "float convolution other than 2-d")
        a = _attrs(node)
        strides = list(a.get("strides", [1, 1]))
        dil = list(a.get("dilations", [1, 1]))
        begin, _ = _pads(a, x.shape[2:], list(w.shape[2:]), strides, dil)
        out_shape = self.shape(node.output[0])
        p = dict(conv=dict(C=x.shape[1], H=x.shape[2], W=x.shape[3], KH=w.shape[2], KW=w.shape[3],
                           SH=strides[0], SW=strides[1], DH=dil[0], DW=dil[1], PT=begin[0], PL=begin[1],
                           G=int(a.get("group", 1)), OH=out_shape[2], OW=out_shape[3]),
                 w=w.reshape(w.shape[0], -1), b=b, O=w.shape[0], K=int(np.prod(w.shape[1:])))
        out = Val(node.output[0], out_shape, "float", "float")
        self.add(Step("float_layer", node.name, [x], [out], p=p))

    def op_Gemm(self, node):
        a = _attrs(node)
        x = self.as_float(self.val(node.input[0], node), node)
        if a.get("transA", 0):
            raise refuse(node, "float Gemm with transA")
        w, c = self._float_weight(node, 1), self._float_weight(node, 2)
        wm = w if a.get("transB", 0) else w.T
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        out_shape = self.shape(node.output[0])
        if c is not None and c.size not in (1, out_shape[-1]):
            raise refuse(node, "float Gemm with a 2-d C")
        b = None if c is None else np.broadcast_to(c.reshape(-1), (out_shape[-1],)).astype(np.float32)
        out = Val(node.output[0], out_shape, "float", "float")
        self.add(Step("float_layer", node.name, [x], [out],
                      p=dict(w=np.ascontiguousarray(wm), b=b, alpha=alpha, beta=beta, O=wm.shape[0], K=wm.shape[1],
                             rows=int(np.prod(out_shape[:-1])))))

    def op_MatMul(self, node):
        x = self.as_float(self.val(node.input[0], node), node)
        w = self._float_weight(node, 1)
        if w is None or w.ndim != 2:
            raise refuse(node, "float MatMul whose right operand is not a constant matrix")
        out_shape = self.shape(node.output[0])
        out = Val(node.output[0], out_shape, "float", "float")
        self.add(Step("float_layer", node.name, [x], [out],
                      p=dict(w=np.ascontiguousarray(w.T), b=None, O=w.shape[1], K=w.shape[0],
                             rows=int(np.prod(out_shape[:-1])))))
