"""C export, stage 1: read an mxqn model into a plan of typed C tensors and steps.

The plan mirrors :class:`mxqn_onnx.integer.executor.IntegerExecutor` (the specification): the same
quantized layers (found by the executor itself), the same integer operands, and between
layers the same values, so that the generated C reproduces the executor's codes exactly.

Each tensor of the C program (:class:`Val`) is one of

* ``int``: integers ``a`` meaning ``a * 2^-F`` where ``F`` is one fractional length or one per
  channel (``frac[(i // inner) % nch]`` for the flat index ``i``); fixed-point codes and layer
  accumulators are both of this kind. ``raw`` marks an accumulator straight out of a layer:
  the float graph (and the executor) round it to float32 before any float op reads it, so an
  integer op that stands for a float op first rounds it to 24 significant bits;
* ``log``: log codes ``sign * (n - n_lo + 1)`` (0 = zero), the executor's code positions;
* ``float``: float32, for the float regions (averaging pools, Softmax, float layers).

Ops exact in float32 (Relu, Clip on grid points, MaxPool, reshapes, Concat) and the residual
Add (exact sum, then one rounding to float32) run on ``int`` tensors; averaging pools,
Softmax and float layers run in float C. Anything else is refused with one line naming it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import functions
from .c_fast import fast_ok, fast_scratch
from .c_float import FloatOps, sigmoid_reaches_only_outputs
from .c_ops import BetweenOps, Buf, Step, Val, acc_ctype, code_ctype, refuse, CTYPE_BYTES, INT_LIMIT
from ..errors import MxqnError
from .executor import IntegerExecutor, _attrs
from .kernels import ACC_BITS, LEVEL_MANTISSA_BITS, LogTable, _ceil_scaled, _pads, shift_round

INT4_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
#: log codes with at most this many levels are read through a per-layer table of their
#: expanded values (built at the start of the layer); wider ones are expanded tensor-wide
LUT_MAX = 4096


def executor_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as the reference executor should read it: packed int4 weight codes stored as
    int8 (same codes, same graph). The executor recognises integer initializers by numpy
    integer dtype, which onnx's int4 arrays are not, and would otherwise leave those layers
    in float. Returns ``model`` itself when it has no int4 initializer."""
    if not any(t.data_type in INT4_TYPES for t in model.graph.initializer):
        return model
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for i, t in enumerate(m.graph.initializer):
        if t.data_type in INT4_TYPES:
            arr = numpy_helper.to_array(t).astype(np.int8 if t.data_type == onnx.TensorProto.INT4 else np.uint8)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
    return m


class Planner(BetweenOps, FloatOps):
    """Walks the graph once, in order, and builds the steps."""

    def __init__(self, model: onnx.ModelProto, input_shape: Optional[Tuple[int, ...]] = None):
        self.ex = IntegerExecutor(executor_model(model))  # the executor's parsing: layers, constants
        self.model = model
        g = model.graph
        inits = {t.name for t in g.initializer}
        ins = [i for i in g.input if i.name not in inits]
        if len(ins) != 1:
            raise MxqnError(f"the model has {len(ins)} data inputs; the C export takes exactly one")
        self.input = ins[0]
        if self.input.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise MxqnError(f"input '{self.input.name}' is not float32; the C export reads float32 samples")
        self.in_shape = self._input_shape(input_shape)
        self.values = self._probe()
        self.const = self._constants()
        self.vals: Dict[str, Val] = {}
        self.steps: List[Step] = []
        self.inits = {t.name: t for t in g.initializer}
        self.sigmoids: list = []

    # ------------------------------------------------------------------ shapes and constants
    def _input_shape(self, given) -> Tuple[int, ...]:
        dims = self.input.type.tensor_type.shape.dim
        if given is not None:
            shape = tuple(int(d) for d in given)
            if len(shape) != len(dims):
                raise MxqnError(f"input_shape {shape} has {len(shape)} dimensions; the model's input has {len(dims)}")
            return shape
        shape = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            elif i == 0:
                shape.append(1)  # the batch: one sample per mxqn_run call
            else:
                raise MxqnError(f"input '{self.input.name}' dimension {i} is dynamic ('{d.dim_param}'); "
                                "give the sample shape (input_shape=..., --input-shape)")
        if shape and shape[0] != 1:
            raise MxqnError(f"input batch dimension is fixed at {shape[0]}; mxqn_run runs one sample (batch 1)")
        return tuple(shape)

    def _probe(self) -> Dict[str, np.ndarray]:
        """Every tensor's value on a zero sample: shapes, and the values of constant subgraphs."""
        import onnxruntime as ort

        m = onnx.ModelProto.FromString(self.model.SerializeToString())
        have = {o.name for o in m.graph.output}
        names = [o for n in m.graph.node for o in n.output if o and o not in have]
        m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            fetch = [o.name for o in sess.get_outputs()]
            out = sess.run(fetch, {self.input.name: np.zeros(self.in_shape, np.float32)})
        except Exception as exc:  # noqa: BLE001
            raise MxqnError(f"onnxruntime cannot run the model on a {self.in_shape} sample "
                            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
        vals = dict(zip(fetch, out))
        vals[self.input.name] = np.zeros(self.in_shape, np.float32)
        return vals

    def _constants(self) -> Dict[str, np.ndarray]:
        const = dict(self.ex.consts)
        for node in self.model.graph.node:
            ins = [i for i in node.input if i]
            if node.op_type == "Shape" or all(i in const for i in ins):
                for o in node.output:
                    if o in self.values:
                        const[o] = self.values[o]
        return const

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(int(d) for d in np.shape(self.values[name]))

    # ------------------------------------------------------------------ building
    def add(self, step: Step) -> Step:
        self.steps.append(step)
        for v in step.outs:
            self.vals[v.name] = v
        return step

    def val(self, name: str, node: onnx.NodeProto) -> Val:
        v = self.vals.get(name)
        if v is None and name in self.const:
            src = self.ex.producer.get(name)
            what = f"the output of Constant node '{src.name}'" if src is not None and src.op_type == "Constant" \
                else "a constant"
            raise refuse(node, f"input '{name}' is {what}; the C export takes constants only as operands "
                               "of Add/Sub/Mul/Div, as Clip bounds and as shape, slice and resize parameters")
        if v is None:
            raise refuse(node, f"input '{name}' is neither the model input nor computed by an exported node")
        return v

    def as_float(self, v: Val, node: onnx.NodeProto) -> Val:
        """The float32 tensor of ``v`` (what the float graph holds), converting if needed."""
        if v.kind == "float":
            return v
        key = v.name + "__f32"
        if key in self.vals:
            return self.vals[key]
        out = Val(key, v.shape, "float", "float")
        self.add(Step("to_float", node.name, [v], [out], inplace=CTYPE_BYTES[v.ctype] == 4 and v.kind == "int"))
        return out

    def plan(self) -> "Planner":
        g = self.model.graph
        x = Val(self.input.name, self.in_shape, "float", "float")
        x.buf = Buf(x.nbytes, 0, external=True)
        self.vals[x.name] = x
        for node in g.node:
            if id(node) in self.ex.absorbed or node.op_type == "Constant":
                continue
            if all(o in self.const for o in node.output if o):
                continue  # a constant subgraph (shape arithmetic, dequantized weights)
            if node.domain == functions.DOMAIN:
                self.quantizer(node)
            elif node.name in self.ex.layers:
                self.layer(node)
            elif node.domain not in ("", "ai.onnx"):
                raise refuse(node, f"custom domain '{node.domain}'")
            else:
                handler = getattr(self, "op_" + node.op_type, None)
                if handler is None:
                    raise refuse(node, "operator not supported by the C export")
                handler(node)
        self.outputs = []
        for o in g.output:
            if o.name not in self.vals:
                raise MxqnError(f"graph output '{o.name}' is a constant; nothing to export")
            self.outputs.append(self.vals[o.name])
        bad = sigmoid_reaches_only_outputs(self.steps, self.outputs, [])
        if bad is not None:
            node = next(n for n in self.sigmoids if n.name == bad)
            raise refuse(node, "a Sigmoid whose result is computed further (onnxruntime's approximation "
                               "is bit-exact only on FMA machines; exported only where it leaves the network)")
        return self

    # ------------------------------------------------------------------ quantizers
    def quantizer(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        bits, signed = int(a["bits"]), bool(a["signed"])
        src = self.val(node.input[0], node)
        out_shape = src.shape
        name = node.output[0]
        if node.op_type == functions.FIXED_OP:
            frac = int(a["frac"])
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
            out = Val(name, out_shape, "int", code_ctype(bits, signed), np.array([frac], np.int64), 1,
                      max(-lo, hi), quant=dict(kind="fixed", bits=bits, frac=frac, signed=signed, lo=lo, hi=hi,
                                               node=node.name))
        elif node.op_type == functions.LOG_OP:
            t = LogTable(bits, int(a["k"]), int(a["E"]), signed)
            out = Val(name, out_shape, "log", code_ctype(bits, signed), table=t,
                      quant=dict(kind="log", bits=bits, k=t.k, E=t.E, signed=signed, node=node.name))
        else:
            raise refuse(node, "unknown ai.mxqn operator")
        if src.kind == "log":
            raise refuse(node, "a quantizer reading log codes")
        if src.kind == "float":
            self.add(Step("quant_float", node.name, [src], [out]))
        else:
            self.add(Step("quant_int", node.name, [src], [out], p=self._requant_params(src, out)))

    def _requant_params(self, src: Val, out: Val) -> dict:
        q = out.quant
        if q["kind"] == "fixed":
            return {"shift": (src.frac - q["frac"]).astype(np.int64)}
        t: LogTable = out.table

        def table(f: int):
            thr = [min(_ceil_scaled(float(m), f), INT_LIMIT) for m in t.mids]
            return np.array(thr, np.int64), int(min(_ceil_scaled(float(t.zero_below), f), INT_LIMIT))

        fs = sorted(set(int(f) for f in src.frac))
        if len(fs) > 1 and src.bound * 2 ** (fs[-1] - fs[0]) < INT_LIMIT:
            # one table at the largest length: for an integer a, a >= ceil(m 2^F) exactly when
            # a 2^(Fmax - F) >= ceil(m 2^Fmax); each channel shifts its value left instead
            return {"tables": {fs[-1]: table(fs[-1])}, "lshift": (fs[-1] - src.frac).astype(np.int64)}
        return {"tables": {f: table(f) for f in fs}}

    # ------------------------------------------------------------------ quantized layers
    def layer(self, node: onnx.NodeProto) -> None:
        L = self.ex.layers[node.name]
        x = self.val(L.data, node)
        a = _attrs(node)
        op = node.op_type
        if L.weight_first:
            raise refuse(node, "MatMul with the constant weight on the left")
        if x.kind == "float" or x.quant is None:
            raise refuse(node, "quantized layer whose input is not a quantizer's codes")
        if op == "Gemm" and (a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0):
            raise refuse(node, "Gemm with transA or alpha != 1")
        if op == "Gemm" and len(node.input) > 2 and node.input[2] and L.b_codes is None:
            raise refuse(node, "Gemm with a float C on a quantized layer")
        if op == "Gemm" and L.b_codes is not None and float(a.get("beta", 1.0)) != 1.0:
            raise refuse(node, "Gemm with beta != 1")
        w = L.w_codes
        trans_b = bool(a.get("transB", 0))
        if op == "Conv":
            if w.ndim not in (3, 4):
                raise refuse(node, f"{w.ndim - 2}-d convolution (1-d and 2-d only)")
            wm = w.reshape(w.shape[0], -1)
        elif op == "ConvTranspose":
            if w.ndim != 4:
                raise refuse(node, f"{w.ndim - 2}-d ConvTranspose (2-d only)")
            G = int(a.get("group", 1))
            cg, og = w.shape[0] // G, w.shape[1]
            # one row per output channel o = g * og + j: w[g * cg + ci, j, ky, kx] over (ci, ky, kx)
            wm = np.concatenate([w[g * cg:(g + 1) * cg].transpose(1, 0, 2, 3).reshape(og, -1) for g in range(G)])
        elif op == "Gemm":
            wm = w if trans_b else w.T
        else:
            if w.ndim != 2:
                raise refuse(node, "MatMul with a batched weight")
            wm = w.T
        wm = np.ascontiguousarray(wm)  # [O, K]: one row per output channel
        n_out, k_in = wm.shape
        f_w = L.w_frac.reshape(-1)
        f_w = np.tile(f_w, n_out // f_w.size).astype(np.int64)  # ConvTranspose: per channel of a group
        lg_k = max(1, math.ceil(math.log2(max(k_in, 2))))
        p: Dict[str, Any] = {"w": wm, "O": n_out, "K": k_in, "wbits": L.w_bits}
        if x.kind == "int":
            q = x.quant
            xmax, f_in = max(-q["lo"], q["hi"]), q["frac"]
            a_bits = q["bits"]
        else:
            t: LogTable = x.table
            headroom = ACC_BITS - L.w_bits - LEVEL_MANTISSA_BITS - lg_k
            e_max = int(t.exp.max())
            e0 = max(int(t.exp.min()), e_max - headroom)
            steps = 2 ** t.k
            q0, r0 = t.n_lo // steps, t.n_lo % steps
            t24 = np.zeros(steps, np.int64)
            for r in range(steps):
                sel = np.mod(t.n, steps) == r
                if sel.any():
                    t24[r] = t.mant[sel][0]
            if not np.array_equal(t.exp, np.floor_divide(t.n, steps) - (LEVEL_MANTISSA_BITS - 1)) or \
                    not all(len(set(t.mant[np.mod(t.n, steps) == r].tolist())) <= 1 for r in range(steps)):
                raise refuse(node, "log levels that are not a shift times a 2^k-entry table")
            expanded = shift_round(t.mant, e0 - t.exp)
            xmax = int(np.abs(expanded).max())
            f_in = -e0
            a_bits = LEVEL_MANTISSA_BITS + (e_max - e0) + 1
            p.update(log=dict(t24=t24, k=t.k, r0=int(r0), sbase=int(q0 - (LEVEL_MANTISSA_BITS - 1) - e0),
                              M=len(t.n)))
        if a_bits + L.w_bits + lg_k > ACC_BITS + 1:
            raise refuse(node, f"accumulator would need more than {ACC_BITS} bits")
        f_acc = f_w + f_in
        sum_bound = np.abs(wm).sum(axis=1).astype(object) * xmax
        rs = np.zeros(n_out, np.int64)
        bias = None
        if L.b_codes is not None:
            b = np.broadcast_to(L.b_codes.reshape(-1).astype(np.int64), (n_out,))
            bf = np.broadcast_to(np.asarray(L.b_frac, np.int64).reshape(-1), (n_out,))
            f_sum = np.minimum(f_acc, bf + (ACC_BITS - 32))
            rs = (f_acc - f_sum).astype(np.int64)
            bias = shift_round(b, bf - f_sum).astype(np.int64)
            f_acc = f_sum
            p["bias_is_stored"] = bool(np.array_equal(bias, b) and np.all(np.abs(b) < 2 ** 31))
        bound = max(int(-(-int(s) // (1 << int(r)))) + 1 + (0 if bias is None else abs(int(bb)))
                    for s, r, bb in zip(sum_bound, rs, bias if bias is not None else [0] * n_out))
        p.update(rs=rs, bias=bias, sum_type=acc_ctype(int(max(sum_bound))), f_acc=f_acc)
        out_shape = self.shape(node.output[0])
        if op == "ConvTranspose":
            pads = list(a.get("pads", [0, 0, 0, 0]))
            st, dl = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or "output_shape" in a:
                raise refuse(node, "ConvTranspose with auto_pad or output_shape (explicit pads only)")
            p.update(convT=dict(C=x.shape[1], H=x.shape[2], W=x.shape[3], KH=w.shape[2], KW=w.shape[3], SH=st[0],
                                SW=st[1], DH=dl[0], DW=dl[1], PT=pads[0], PL=pads[1], G=int(a.get("group", 1)),
                                OH=out_shape[2], OW=out_shape[3]))
            inner = int(out_shape[2] * out_shape[3])
        elif op == "Conv":
            nd = w.ndim - 2
            if nd == 1:
                x_sh = (x.shape[0], x.shape[1], 1, x.shape[2])
                kernel = (1, w.shape[2])
            else:
                x_sh, kernel = x.shape, w.shape[2:]
            strides = list(a.get("strides", [1] * nd))
            dil = list(a.get("dilations", [1] * nd))
            begin, _ = _pads(a, x.shape[2:], list(w.shape[2:]), strides, dil)
            if nd == 1:
                strides, dil, begin = [1] + strides, [1] + dil, [0] + list(begin)
            o_sp = out_shape[2:] if nd == 2 else (1, out_shape[2])
            p.update(conv=dict(C=x_sh[1], H=x_sh[2], W=x_sh[3], KH=kernel[0], KW=kernel[1], SH=strides[0],
                               SW=strides[1], DH=dil[0], DW=dil[1], PT=begin[0], PL=begin[1],
                               G=int(a.get("group", 1)), OH=o_sp[0], OW=o_sp[1]))
            inner = int(o_sp[0] * o_sp[1])
        else:
            rows = int(np.prod(out_shape[:-1])) if len(out_shape) > 1 else 1
            if out_shape[-1] != n_out or int(np.prod(x.shape)) != rows * k_in:
                raise refuse(node, "unexpected operand shapes")
            p.update(rows=rows)
            inner = 1
        frac = f_acc if len(set(f_acc.tolist())) > 1 else f_acc[:1]
        out = Val(node.output[0], out_shape, "int", acc_ctype(bound), frac.astype(np.int64),
                  inner if frac.size > 1 else 1, bound, raw=True, direct=True)
        p["container"] = self._container(node, L)
        p["layer"] = node.name
        scratch = []
        if x.kind == "log" and p["log"]["M"] <= LUT_MAX:
            p["log"]["lut"] = True
            scratch.append(("lut", 8 * (2 * p["log"]["M"] + 1 if x.quant["signed"] else p["log"]["M"] + 1)))
        elif x.kind == "log":
            scratch.append(("xe", x.numel * 8))
        if p["container"] == "int4":
            scratch.append(("wrow", k_in))
        if op in ("Conv", "ConvTranspose"):
            scratch.append(("plane", p.get("conv", p.get("convT"))["OH"] * p.get("conv", p.get("convT"))["OW"] * (4 if p["sum_type"] == "int32_t" else 8)))
        step = Step("layer", node.name, [x], [out], p=p, scratch=scratch)
        if fast_ok(step):  # the int16 dot-product kernel: two im2col columns instead of a sum plane
            p["fast"] = True
            step.scratch = [sc for sc in scratch if sc[0] != "plane"] + \
                ([("col", fast_scratch(p))] if fast_scratch(p) else [])
        self.add(step)

    def _container(self, node: onnx.NodeProto, L) -> str:
        data_i, w_i = (1, 0) if L.weight_first else (0, 1)
        mul = self.ex.producer.get(node.input[w_i])
        cast = self.ex.producer.get(mul.input[0]) if mul is not None else None
        init = self.inits.get(cast.input[0]) if cast is not None else None
        if init is not None and init.data_type in INT4_TYPES:
            return "int4"
        small = L.w_codes.size == 0 or (L.w_codes.min() >= -128 and L.w_codes.max() <= 127)
        return "int8" if small and L.w_bits <= 8 else "int16"


# ---------------------------------------------------------------------- after planning


def fuse(steps: List[Step], outputs: List[Val]) -> List[Step]:
    """Fold the elementwise ops and the quantizer that follow a layer into its epilogue.

    ``layer -> [Relu|Clip]* -> [quantizer]`` where each intermediate tensor has one reader and
    is not a graph output: the layer then writes the final values (usually codes) directly,
    and the accumulator tensor never exists in the arena.
    """
    out_names = {v.name for v in outputs}
    readers: Dict[str, List[Step]] = {}
    for s in steps:
        for v in s.ins:
            readers.setdefault(v.name, []).append(s)
    removed = set()
    for s in steps:
        if s.op != "layer":
            continue
        v = s.outs[0]
        s.p["acc"], s.p["epi"] = v, []
        while v.name not in out_names and len(readers.get(v.name, [])) == 1:
            c = readers[v.name][0]
            if c.op not in ("int_relu", "int_clip", "quant_int"):
                break
            s.p["epi"].append(c)
            removed.add(id(c))
            v = c.outs[0]
            if c.op == "quant_int":
                break
        s.outs = [v]
    return [s for s in steps if id(s) not in removed]


ALIGN = 16


def allocate(steps: List[Step], outputs: List[Val]) -> int:
    """Place every tensor and scratch buffer in one arena by liveness; returns its size in bytes.

    A tensor lives from the step that writes it to the last step that reads it (the graph
    outputs until the end). Views (Flatten, Reshape, ...) share their input's buffer; an
    elementwise op whose input dies there writes in place. Buffers are placed first-fit by
    offset in order of definition.
    """
    last: Dict[str, int] = {}
    for i, s in enumerate(steps):
        for v in s.ins:
            last[v.name] = i
    for v in outputs:
        last[v.name] = len(steps)
    bufs: List[Buf] = []
    for i, s in enumerate(steps):
        for j, v in enumerate(s.outs):
            src = s.ins[0].buf if s.ins else None
            if s.op == "view":
                v.buf = src
            elif (s.inplace and j == 0 and src is not None and not src.external and src.last <= i
                  and s.ins[0].nbytes == v.nbytes and s.ins[0].ctype == v.ctype):
                v.buf = src
            else:
                v.buf = Buf(v.nbytes, i)
                bufs.append(v.buf)
            v.buf.last = max(v.buf.last, last.get(v.name, i))
        s.scratch_bufs = []
        for _name, size in s.scratch:
            b = Buf(size, i)
            s.scratch_bufs.append(b)
            bufs.append(b)
    placed: List[Buf] = []
    top = 0
    for b in sorted(bufs, key=lambda b: (b.first, -b.size)):
        live = sorted((p for p in placed if p.last >= b.first), key=lambda p: p.offset)
        off = 0
        for p in live:
            if off + b.size <= p.offset:
                break
            off = max(off, -(-(p.offset + p.size) // ALIGN) * ALIGN)
        b.offset = off
        placed.append(b)
        top = max(top, off + b.size)
    return -(-top // ALIGN) * ALIGN
