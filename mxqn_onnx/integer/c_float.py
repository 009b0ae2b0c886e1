"""C export: float32 steps for the ops that integer arithmetic cannot reproduce exactly, and
copies (Slice, Split, nearest Resize) that work on any tensor.

The reference executor runs these nodes in onnxruntime, one node at a time, on float32. The C
here does what onnxruntime's CPU kernels do, operation for operation, so that the results are
the same float32 numbers: element-wise Add/Sub/Mul/Div with broadcasting (each one correctly
rounded IEEE operation), HardSigmoid ``max(0, min(1, alpha * x + beta))`` as a multiply and
an add (not fused), HardSwish ``x * HardSigmoid(x, 1/6, 1/2)``. Sigmoid follows MLAS's
rational approximation with fused multiply-adds (``fmaf``), which is what onnxruntime runs on
x86-64 with FMA; elsewhere onnxruntime's result may differ in the last bit, so a Sigmoid is
accepted only where its result leaves the network (a graph output, possibly through copies)
and never feeds a quantizer. Every such step is listed in the export summary as float C.

Copies (``gather`` steps) move elements without changing them: the output element at
coordinates ``(d0, d1, ...)`` is the input element at ``(idx0[d0], idx1[d1], ...)``, one
index table per axis. Slice, Split and Resize (mode ``nearest``) are such copies.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnx

from .c_kernels import Consts, ptr
from .c_ops import Step, Val, refuse
from .executor import _attrs

BINARY = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/"}
#: MLAS's logistic approximation: odd numerator p(x^2) x over even denominator q(x^2)
SIGMOID_P = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
             2.48287947061529e-01)
SIGMOID_Q = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
             1.16817656904453e-01, 9.93151921023180e-01)


def _f(v: float) -> str:
    """A float32 constant as an exact C literal."""
    s = repr(float(np.float32(v)))
    return (s if ("e" in s or "." in s) else s + ".0") + "f"


def _strides(shape: Sequence[int], out: Sequence[int]) -> List[int]:
    """Element strides of a tensor of ``shape`` broadcast to ``out`` (0 along broadcast axes)."""
    nd = len(out)
    s = (1,) * (nd - len(shape)) + tuple(shape)
    st, acc = [0] * nd, 1
    for d in reversed(range(nd)):
        st[d] = 0 if s[d] == 1 and out[d] != 1 else acc
        acc *= s[d]
    return st


def _collapse(out: Sequence[int], strides: List[List[int]]) -> Tuple[List[int], List[List[int]]]:
    """Merge neighbouring axes along which every operand is contiguous (fewer, longer loops)."""
    dims, sts = [int(out[0])] if out else [1], [[s[0]] for s in strides] if out else [[0] for _ in strides]
    for d in range(1, len(out)):
        if all(s[-1] == s_full[d] * out[d] for s, s_full in zip(sts, strides)):
            dims[-1] *= int(out[d])
            for s, s_full in zip(sts, strides):
                s[-1] = s_full[d]
        else:
            dims.append(int(out[d]))
            for s, s_full in zip(sts, strides):
                s.append(s_full[d])
    return dims, sts


class FloatOps:
    """Planner handlers for float element-wise ops and copies (mixed into the planner)."""

    def _operand(self, name: str, node: onnx.NodeProto):
        """A computed tensor (as float32) or a constant (a float32 array)."""
        if name in self.vals:
            return self.as_float(self.vals[name], node)
        if name in self.const:
            c = np.asarray(self.const[name])
            if not np.issubdtype(c.dtype, np.floating):
                raise refuse(node, f"constant operand '{name}' of type {c.dtype} (float32 only)")
            return c.astype(np.float32)
        return self.val(name, node)  # refuses, naming the input

    def float_binary(self, node: onnx.NodeProto) -> None:
        ops = [self._operand(i, node) for i in node.input[:2]]
        shape = self.shape(node.output[0])
        if not any(isinstance(o, Val) for o in ops):
            raise refuse(node, "both operands are constants")
        out = Val(node.output[0], shape, "float", "float")
        ins = [o for o in ops if isinstance(o, Val)]
        self.add(Step("float_binary", node.name, ins, [out], p=dict(op=BINARY[node.op_type], operands=ops),
                      inplace=isinstance(ops[0], Val) and ops[0].shape == shape))

    def _unary(self, node: onnx.NodeProto, kind: str, **p) -> None:
        v = self.as_float(self.val(node.input[0], node), node)
        out = Val(node.output[0], v.shape, "float", "float")
        self.add(Step("float_unary", node.name, [v], [out], p=dict(kind=kind, **p), inplace=True))

    def op_HardSigmoid(self, node):
        a = _attrs(node)
        self._unary(node, "hardsigmoid", alpha=float(a.get("alpha", 0.2)), beta=float(a.get("beta", 0.5)))

    def op_HardSwish(self, node):
        self._unary(node, "hardswish", alpha=1.0 / 6.0, beta=0.5)

    def op_Sigmoid(self, node):
        self._unary(node, "sigmoid")
        self.sigmoids.append(node)

    def op_Sub(self, node):
        self.float_binary(node)

    def op_Div(self, node):
        self.float_binary(node)

    # ------------------------------------------------------------------ copies
    def _gather(self, node: onnx.NodeProto, src: Val, out_name: str, index: List[np.ndarray]) -> None:
        shape = tuple(len(i) for i in index)
        if shape != self.shape(out_name):
            raise refuse(node, f"unexpected output shape {self.shape(out_name)} (expected {shape})")
        if src.kind == "int" and src.nch > 1:
            src = self.as_float(src, node)  # per-channel lengths do not follow an arbitrary copy
        out = self._like(src, out_name, shape, quant=src.quant if src.kind == "log" else None)
        if src.kind == "int" and src.quant is not None:
            out.quant = src.quant
        self.add(Step("gather", node.name, [src], [out], p=dict(index=index)))

    def op_Slice(self, node):
        v = self.val(node.input[0], node)
        a = _attrs(node)
        if "starts" in a:  # opset < 10
            starts, ends = a["starts"], a["ends"]
            axes = a.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            vals = []
            for i in range(1, 5):
                name = node.input[i] if len(node.input) > i else ""
                if name and name not in self.const:
                    raise refuse(node, f"Slice input '{name}' is not a constant")
                vals.append(None if not name else np.asarray(self.const[name]).reshape(-1).tolist())
            starts, ends, axes, steps = vals
            axes = axes if axes is not None else list(range(len(starts)))
            steps = steps if steps is not None else [1] * len(starts)
        index = []
        shape = v.shape
        for d in range(len(shape)):
            index.append(np.arange(shape[d]))
        for s, e, ax, st in zip(starts, ends, axes, steps):
            ax = int(ax) % len(shape)
            e = max(min(int(e), shape[ax] + 1), -shape[ax] - 2)
            index[ax] = np.arange(shape[ax])[slice(int(s), int(e), int(st))]
        self._gather(node, v, node.output[0], index)

    def op_Split(self, node):
        v = self.val(node.input[0], node)
        axis = int(_attrs(node).get("axis", 0)) % len(v.shape)
        start = 0
        for o in node.output:
            if not o:
                continue
            n = self.shape(o)[axis]
            index = [np.arange(d) for d in v.shape]
            index[axis] = np.arange(start, start + n)
            start += n
            self._gather(node, v, o, index)

    def op_Resize(self, node):
        a = _attrs(node)
        mode = a.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "nearest":
            raise refuse(node, f"Resize mode '{mode}' (only nearest, an exact copy, is exported)")
        v = self.val(node.input[0], node)
        out_shape = self.shape(node.output[0])
        ctm = a.get("coordinate_transformation_mode", b"half_pixel")
        ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
        nm = a.get("nearest_mode", b"round_prefer_floor")
        nm = nm.decode() if isinstance(nm, bytes) else nm
        scales = None
        if len(node.input) > 2 and node.input[2] and np.asarray(self.const.get(node.input[2], [])).size:
            scales = np.asarray(self.const[node.input[2]], np.float32).reshape(-1)
        index = []
        for d, (n_in, n_out) in enumerate(zip(v.shape, out_shape)):
            s = np.float32(scales[d]) if scales is not None else np.float32(n_out) / np.float32(n_in)
            o = np.arange(n_out, dtype=np.float32)
            if ctm == "asymmetric":
                x = o / s
            elif ctm == "half_pixel":
                x = (o + np.float32(0.5)) / s - np.float32(0.5)
            elif ctm == "align_corners":
                x = o * np.float32(n_in - 1) / np.float32(max(n_out - 1, 1))
            else:
                raise refuse(node, f"Resize coordinate_transformation_mode '{ctm}'")
            if nm == "floor":
                i = np.floor(x)
            elif nm == "ceil":
                i = np.ceil(x)
            elif nm == "round_prefer_ceil":
                i = np.floor(x + np.float32(0.5))
            else:
                i = np.ceil(x - np.float32(0.5))
            index.append(np.clip(i, 0, n_in - 1).astype(np.int64))
        self._gather(node, v, node.output[0], index)


# ---------------------------------------------------------------------- C text


def _fn(name: str, s: Step, body: List[str]) -> str:
    return (f"/* {s.op} '{s.node}' */\nstatic MXQN_NOINLINE void {name}(void)\n{{\n"
            + "\n".join(body) + "\n}\n")


def _loops(dims: List[int], strides: List[List[int]], names: List[str], stmt: str) -> List[str]:
    """Nested loops over ``dims`` keeping each operand's element index in ``names``."""
    nd = len(dims)
    lines = ["    long " + ", ".join(f"d{i}" for i in range(nd)) + ", o = 0;"]
    for i in range(nd):
        lines.append("    " + "    " * i + f"for (d{i} = 0; d{i} < {dims[i]}L; d{i}++)")
    pad = "    " + "    " * nd
    idx = {n: " + ".join([f"d{i} * {st[i]}L" for i in range(nd) if st[i]] or ["0"]) for n, st in zip(names, strides)}
    lines.append(pad + stmt.format(**idx))
    return lines


def emit_float_binary(consts: Consts, s: Step, name: str) -> str:
    y = s.outs[0]
    ops = s.p["operands"]
    body, names, sts = [f"    float *y = {ptr(y)};"], [], []
    for k, o in enumerate(ops):
        n = "ab"[k]
        if isinstance(o, Val):
            body.insert(k, f"    const float *{n} = {ptr(o, True)};")
            shp = o.shape
        else:
            body.insert(k, f"    const float *{n} = {consts.array('float', o, 'fc', f'{s.node}: constant operand')};")
            shp = o.shape
        names.append(n)
        sts.append(_strides(shp, y.shape))
    dims, sts = _collapse(y.shape, sts)
    body += _loops(dims, sts, names, f"y[o++] = a[{{a}}] {s.p['op']} b[{{b}}];")
    return _fn(name, s, body)


def emit_float_unary(consts: Consts, s: Step, name: str) -> str:
    x, y, p = s.ins[0], s.outs[0], s.p
    body = [f"    const float *x = {ptr(x, True)};", f"    float *y = {ptr(y)};", "    long i;", "    float v, t;"]
    if p["kind"] in ("hardsigmoid", "hardswish"):
        # onnxruntime: alpha * x, then + beta (two roundings), then the clamp
        calc = (f"t = v * {_f(p['alpha'])}; t = t + {_f(p['beta'])}; "
                "t = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);")
        res = "t" if p["kind"] == "hardsigmoid" else "v * t"
    else:  # sigmoid, MLAS's approximation
        P, Q = [_f(c) for c in SIGMOID_P], [_f(c) for c in SIGMOID_Q]
        body.append("    float v2, pp, qq;")
        calc = ("v = v < -18.0f ? -18.0f : (v > 18.0f ? 18.0f : v); v2 = v * v; "
                f"pp = fmaf(v2, {P[0]}, {P[1]}); pp = fmaf(pp, v2, {P[2]}); pp = fmaf(pp, v2, {P[3]}); "
                f"pp = fmaf(pp, v2, {P[4]}); pp = pp * v; "
                f"qq = fmaf(v2, {Q[0]}, {Q[1]}); qq = fmaf(qq, v2, {Q[2]}); qq = fmaf(qq, v2, {Q[3]}); "
                f"qq = fmaf(qq, v2, {Q[4]}); qq = fmaf(qq, v2, {Q[5]}); "
                "t = pp / qq + 0.5f; t = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);")
        res = "t"
    body += [f"    for (i = 0; i < {x.numel}L; i++) {{", f"        v = x[i]; {calc}", f"        y[i] = {res};", "    }"]
    return _fn(name, s, body)


def emit_gather(consts: Consts, s: Step, name: str) -> str:
    x, y = s.ins[0], s.outs[0]
    index: List[np.ndarray] = s.p["index"]
    nd = len(index)
    in_strides = [int(np.prod(x.shape[d + 1:])) for d in range(nd)]
    body = [f"    const {x.ctype} *x = {ptr(x, True)};", f"    {y.ctype} *y = {ptr(y)};",
            "    long " + ", ".join(f"d{i}" for i in range(nd)) + ", o = 0;"]
    terms = []
    for d, idx in enumerate(index):
        idx = np.asarray(idx, np.int64)
        if len(idx) == 1:
            terms.append(f"{int(idx[0]) * in_strides[d]}L")
        elif np.all(np.diff(idx) == idx[1] - idx[0]):  # an arithmetic progression: no table
            terms.append(f"({int(idx[0])}L + d{d} * {int(idx[1] - idx[0])}L) * {in_strides[d]}L")
        else:
            tab = consts.array("int32_t", idx, "gi", f"{s.node}: source index along axis {d}")
            terms.append(f"(long){tab}[d{d}] * {in_strides[d]}L")
    for d in range(nd):
        body.append("    " + "    " * d + f"for (d{d} = 0; d{d} < {len(index[d])}L; d{d}++)")
    body.append("    " + "    " * nd + f"y[o++] = x[{' + '.join(terms) or '0'}];")
    return _fn(name, s, body)


def sigmoid_reaches_only_outputs(steps: List[Step], outputs: List[Val], sig_nodes: List[str]) -> Optional[str]:
    """The first Sigmoid whose result feeds anything but copies to a graph output (None if none)."""
    out_names = {v.name for v in outputs}
    readers = {}
    for st in steps:
        for v in st.ins:
            readers.setdefault(v.name, []).append(st)
    for st in steps:
        if st.op != "float_unary" or st.p["kind"] != "sigmoid":
            continue
        todo = [st.outs[0]]
        while todo:
            v = todo.pop()
            for r in readers.get(v.name, []):
                if r.op not in ("view", "gather", "transpose"):
                    return st.node
                todo.extend(r.outs)
            if not readers.get(v.name) and v.name not in out_names:
                return st.node
    return None
