"""Integer-only reference executor for mxqn-format models: the walk over the graph.

It runs a converted model the way a shift-based accelerator would: each quantized layer
(Conv, Gemm, MatMul whose weight is ``Cast(int codes) * 2^-f`` and whose data input comes
from a ``FixedQuant``/``LogQuant`` node) is computed from integer codes with integer
multiplies, int64 accumulation and shifts only (the kernels of :mod:`mxqn_onnx.integer.kernels`);
every other node (Relu, MaxPool, Add, GlobalAveragePool, Flatten, ...) runs in float32 through
onnxruntime, one node at a time.

See docs/FORMAT.md for the arithmetic; :func:`compare_with_onnxruntime` states and checks
the claim that this executor and onnxruntime agree to one least-significant step.
"""

from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import MxqnError
from ..graph import functions
from ..graph.loading import METADATA_KEY
from ..quant import quantizers as Q
from .kernels import (AccT, FixedT, LogT, LogTable, QLayer, Value, accumulate, as_float, fixed_from_acc,
                      fixed_from_float, power_of_two_exponent)


# --------------------------------------------------------------------------- the interpreter


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class IntegerExecutor:
    """Interprets an mxqn model: integer quantized layers, onnxruntime for the rest."""

    def __init__(self, model: onnx.ModelProto):
        meta = [p.value for p in model.metadata_props if p.key == METADATA_KEY]
        if not meta:
            raise MxqnError("not an mxqn model (no 'mxqn' metadata); convert it first")
        if json.loads(meta[0]).get("format", "mxqn") != "mxqn":
            raise MxqnError("the integer executor reads --format mxqn models; convert with --format mxqn")
        self.model = model
        g = model.graph
        self.consts: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
        self.layers: Dict[str, QLayer] = {}
        self.absorbed: set = set()
        self.tables: Dict[str, LogTable] = {}
        self._find_layers()
        self._types = self._infer_types()
        self._sessions: dict = {}

    # ---------------------------------------------------------------- graph analysis
    def _dequant_const(self, name: str) -> Optional[Tuple[np.ndarray, np.ndarray, List[onnx.NodeProto]]]:
        """``(codes, frac, nodes)`` when ``name`` is ``Cast(int initializer) * 2^-f``."""
        mul = self.producer.get(name)
        if mul is None or mul.op_type != "Mul":
            return None
        cast = self.producer.get(mul.input[0])
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in self.consts:
            return None
        scale = self.consts.get(mul.input[1])
        codes = self.consts[cast.input[0]]
        if scale is None or not np.issubdtype(codes.dtype, np.integer):
            return None
        frac = power_of_two_exponent(np.asarray(scale), name)
        return codes.astype(np.int64), frac, [cast, mul]

    def _find_layers(self) -> None:
        for node in self.model.graph.node:
            if node.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
                continue
            data_i, w_i = 0, 1
            if node.op_type == "MatMul" and self._dequant_const(node.input[0]) is not None:
                data_i, w_i = 1, 0
            wq = self._dequant_const(node.input[w_i])
            src = self.producer.get(node.input[data_i])
            if wq is None or src is None or src.domain != functions.DOMAIN:
                continue  # a float layer: runs in onnxruntime
            codes, frac, nodes = wq
            bq = self._dequant_const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if len(node.input) > 2 and node.input[2] and bq is None and node.op_type != "Gemm":
                raise MxqnError(f"{node.name}: float bias on a quantized layer; not an mxqn layout")
            wbits = int(np.max(np.abs(codes))).bit_length() + 1 if codes.size else 2
            meta_bits = self._meta_bits().get(node.name)
            self.layers[node.name] = QLayer(
                node, node.input[data_i], codes, frac, meta_bits or wbits,
                None if bq is None else bq[0], None if bq is None else bq[1], weight_first=(w_i == 0))
            for n in nodes + (bq[2] if bq else []):
                if all(c.name in self.layers or c is node for c in self.consumers.get(n.output[0], [])):
                    self.absorbed.add(id(n))

    def _meta_bits(self) -> Dict[str, int]:
        if not hasattr(self, "_mb"):
            meta = json.loads(next(p.value for p in self.model.metadata_props if p.key == METADATA_KEY))
            self._mb = {l["name"]: int(l["weight"]["bits"]) for l in meta.get("layers", [])}
        return self._mb

    def _infer_types(self) -> Dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:
            inferred = self.model
        types = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        return types

    # ---------------------------------------------------------------- float nodes
    def _float_node(self, node: onnx.NodeProto, env: Dict[str, Value]) -> List[np.ndarray]:
        import onnxruntime as ort

        feeds, inputs, inits = {}, [], []
        for name in node.input:
            if not name or name in feeds:
                continue
            if name in self.consts and name not in env:
                inits.append(numpy_helper.from_array(self.consts[name], name))
                continue
            arr = as_float(env[name]) if not isinstance(env[name], np.ndarray) else env[name]
            feeds[name] = arr
            inputs.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), None))
        key = (id(node), tuple((k, v.dtype.str) for k, v in feeds.items()))
        sess = self._sessions.get(key)
        if sess is None:
            outs = [onnx.helper.make_tensor_value_info(o, self._types.get(o, onnx.TensorProto.FLOAT), None)
                    for o in node.output if o]
            g = onnx.helper.make_graph([node], "node", inputs, outs, initializer=inits)
            m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", self.opset)],
                                       ir_version=self.model.ir_version)
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            self._sessions[key] = sess
        return sess.run(None, feeds)

    # ---------------------------------------------------------------- run
    def run(self, feeds: Dict[str, np.ndarray], keep: Iterable[str] = (),
            forced: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Value]:
        """Run the graph; returns the values of the graph outputs and of ``keep`` tensors.

        ``forced`` maps quantizer outputs to values (onnxruntime's) that downstream layers
        read instead of the executor's own: each layer is then checked on identical inputs.
        The executor's own quantizer results are still returned under their names.
        """
        env: Dict[str, Value] = dict(feeds)
        own: Dict[str, Value] = {}
        keep = set(keep) | {o.name for o in self.model.graph.output}
        for node in self.model.graph.node:
            if id(node) in self.absorbed:
                continue
            if node.domain == functions.DOMAIN:
                v = self._quantizer(node, env[node.input[0]])
                own[node.output[0]] = v
                if forced is not None and node.output[0] in forced:
                    # onnxruntime's value lies on the grid: its codes are exact
                    v = self._quantizer(node, forced[node.output[0]])
                env[node.output[0]] = v
            elif node.name in self.layers:
                layer = self.layers[node.name]
                x = env[layer.data]
                attrs = _attrs(node)
                acc = accumulate(layer, x, attrs)
                if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and layer.b_codes is None:
                    c = self.consts[node.input[2]]  # a float C left unquantized
                    env[node.output[0]] = acc.to_float() + np.float32(attrs.get("beta", 1.0)) * c
                else:
                    env[node.output[0]] = acc
            else:
                outs = self._float_node(node, env)
                for name, v in zip([o for o in node.output if o], outs):
                    env[name] = v
        env.update(own)
        return {k: v for k, v in env.items() if k in keep}

    def abs_sum_bound(self, name: str, env_in: Value) -> Optional[AccT]:
        """``sum |w| |x| + |b|`` of the layer ``name`` on input ``env_in``, as an accumulator."""
        layer = self.layers[name]
        absl = QLayer(layer.node, layer.data, np.abs(layer.w_codes), layer.w_frac, layer.w_bits,
                      None if layer.b_codes is None else np.abs(layer.b_codes), layer.b_frac,
                      layer.weight_first)
        if isinstance(env_in, FixedT):
            x = FixedT(np.abs(env_in.codes), env_in.frac, env_in.bits, env_in.signed)
        else:
            x = LogT(np.abs(env_in.sign), env_in.n, env_in.table)
        return accumulate(absl, x, _attrs(layer.node))

    def _quantizer(self, node: onnx.NodeProto, x: Value) -> Union[FixedT, LogT]:
        a = _attrs(node)
        bits, signed = int(a["bits"]), bool(a["signed"])
        if node.op_type == functions.FIXED_OP:
            frac = int(a["frac"])
            if isinstance(x, AccT):
                return fixed_from_acc(x, bits, frac, signed)
            return fixed_from_float(as_float(x), bits, frac, signed)
        table = self.tables.get(node.name)
        if table is None:
            table = self.tables[node.name] = LogTable(bits, int(a["k"]), int(a["E"]), signed)
        if isinstance(x, AccT):
            return table.quantize_acc(x.acc, x.frac)
        return table.quantize_float(as_float(x))


# --------------------------------------------------------------------------- comparison


def _codes_of_float(y: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """Integer position of onnxruntime's quantizer output on the quantizer's grid.

    Fixed point: the code ``y * 2^f``. Log: the level index ``n`` (zero maps just below the
    smallest level), signed, so that adjacent grid points differ by one.
    """
    a = _attrs(node)
    if node.op_type == functions.FIXED_OP:
        return np.rint(np.ldexp(y.astype(np.float64), int(a["frac"]))).astype(np.int64)
    t = LogLookUp.get(int(a["bits"]), int(a["k"]), int(a["E"]), bool(a["signed"]))
    idx = np.searchsorted(t.levels, np.abs(y))
    exact = np.abs(y) == t.levels[np.clip(idx, 0, len(t.levels) - 1)]
    pos = np.where(exact, idx + 1, 0)  # 0 = zero, 1.. = levels
    return np.sign(y).astype(np.int64) * pos


def _codes_of_value(v: Union[FixedT, LogT]) -> np.ndarray:
    if isinstance(v, FixedT):
        return v.codes
    return v.sign * np.where(v.sign != 0, v.n - v.table.n_lo + 1, 0)


class LogLookUp:
    _cache: dict = {}

    @classmethod
    def get(cls, bits, k, E, signed) -> LogTable:
        key = (bits, k, E, signed)
        if key not in cls._cache:
            cls._cache[key] = LogTable(bits, k, E, signed)
        return cls._cache[key]


#: Unit roundoff of float32, for the error bound of onnxruntime's float accumulation.
F32_U = 2.0**-24


def compare_with_onnxruntime(model: onnx.ModelProto, batches: Iterable[Dict[str, np.ndarray]]) -> dict:
    """Run the integer executor and onnxruntime on the same batches and compare.

    The claim checked, per quantized layer on identical inputs (the executor's layers read
    onnxruntime's quantizer outputs, converted exactly to codes):

    1. the codes the executor's integer requantization produces at every activation quantizer
       differ from onnxruntime's by at most one step of that quantizer's grid (one fixed-point
       LSB or one log level); a step happens only where onnxruntime's float32 accumulation
       rounds a value across a decision threshold;
    2. every graph output computed by a quantized layer differs from the exact accumulator
       by at most one step of the output's format: ``max(2^-frac, (K + 2) u sum|w x| + |b|)``,
       i.e. the accumulator LSB or, when that is finer than float32 can resolve, the standard
       bound on float32 accumulation error (K products, unit roundoff ``u = 2^-24``).

    The free-running executor (its own codes everywhere) is also compared end to end; there a
    one-step flip can propagate, so only its agreement and output SQNR are reported.
    """
    import onnxruntime as ort

    ex = IntegerExecutor(model)
    quant_nodes = [n for n in model.graph.node if n.domain == functions.DOMAIN]
    qnames = [n.output[0] for n in quant_nodes]
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    names = [o.name for o in probe.graph.output]
    for q in qnames:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(q, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fetch = names + qnames
    out_layer = {n.output[0]: n.name for n in model.graph.node if n.name in ex.layers}
    qstats = {n.name: {"node": n.name, "kind": "log" if n.op_type == functions.LOG_OP else "fixed",
                       "elements": 0, "mismatches": 0, "max_code_diff": 0} for n in quant_nodes}
    ostats = {o: {"name": o, "max_abs_diff": 0.0, "max_diff_steps": 0.0, "frac": None}
              for o in names}
    free = {o: {"signal": 0.0, "noise": 0.0, "agree": 0, "rows": 0} for o in names}
    samples = 0
    for feed in batches:
        got = dict(zip(fetch, sess.run(fetch, feed)))
        forced = {q: got[q] for q in qnames}
        mine = ex.run(feed, keep=qnames + [ex.layers[l].data for l in ex.layers], forced=forced)
        for n in quant_nodes:
            d = np.abs(_codes_of_float(got[n.output[0]], n) - _codes_of_value(mine[n.output[0]]))
            s = qstats[n.name]
            s["elements"] += int(d.size)
            s["mismatches"] += int(np.count_nonzero(d))
            s["max_code_diff"] = max(s["max_code_diff"], int(d.max()) if d.size else 0)
        for o in names:
            v = mine[o]
            ref = got[o].astype(np.float64)
            ours = np.ldexp(v.acc.astype(np.float64), -v.frac) if isinstance(v, AccT) else \
                as_float(v).astype(np.float64)
            diff = np.abs(ref - ours)
            s = ostats[o]
            s["max_abs_diff"] = max(s["max_abs_diff"], float(diff.max()) if diff.size else 0.0)
            if isinstance(v, AccT) and o in out_layer:
                layer = ex.layers[out_layer[o]]
                bound = ex.abs_sum_bound(out_layer[o], ex._quantizer(
                    ex.producer[layer.data], forced[layer.data]))
                k_in = int(layer.w_codes.size // max(1, ex_out_channels(layer)))
                fp = (k_in + 2) * F32_U * np.ldexp(bound.acc.astype(np.float64), -bound.frac)
                step = np.maximum(np.ldexp(1.0, -np.broadcast_to(v.frac, diff.shape)), fp)
                s["max_diff_steps"] = max(s["max_diff_steps"], float((diff / step).max()) if diff.size else 0.0)
                s["frac"] = int(np.max(v.frac))
            else:
                s["max_diff_steps"] = None
        # free running: the executor on its own codes
        alone = ex.run(feed)
        for o in names:
            ref = got[o].astype(np.float64)
            ours = as_float(alone[o]).astype(np.float64)
            f = free[o]
            f["signal"] += float(np.sum(ref * ref))
            f["noise"] += float(np.sum((ref - ours) ** 2))
            if ref.ndim >= 2:
                rows = ref.shape[0]
                f["agree"] += int(np.sum(ref.reshape(rows, -1).argmax(1) == ours.reshape(rows, -1).argmax(1)))
                f["rows"] += rows
        samples += int(next(iter(feed.values())).shape[0])
    outputs = []
    for o, s in ostats.items():
        f = free[o]
        s["free_running_sqnr_db"] = Q.sqnr_db(f["signal"], f["noise"])
        s["free_running_top1_agreement"] = f["agree"] / f["rows"] if f["rows"] else None
        outputs.append(s)
    quants = list(qstats.values())
    ok = all(q["max_code_diff"] <= 1 for q in quants) and \
        all(o["max_diff_steps"] is None or o["max_diff_steps"] <= 1.0 for o in outputs)
    return {"samples": samples, "quantizers": quants, "outputs": outputs, "within_one_step": ok,
            "layers_integer": sorted(ex.layers)}


def ex_out_channels(layer: QLayer) -> int:
    """Number of output channels of a layer's weight (to get its fan-in K)."""
    op = layer.node.op_type
    w = layer.w_codes
    if op == "Conv":
        return int(w.shape[0])
    if op == "ConvTranspose":
        return int(w.shape[1]) * int(next((a.i for a in layer.node.attribute if a.name == "group"), 1))
    if op == "Gemm":
        trans_b = any(a.name == "transB" and a.i for a in layer.node.attribute)
        return int(w.shape[0] if trans_b else w.shape[1])
    return int(w.shape[-2] if layer.weight_first else w.shape[-1])


def simulate_file(model_path, data, count: int = 64, batch_size: int = 16) -> dict:
    """CLI helper: load an mxqn model and data file, compare executor and onnxruntime."""
    from ..calibration.data import input_specs, make_source
    from ..graph.loading import read_model

    try:
        model = read_model(model_path)
    except Exception as exc:
        raise MxqnError(f"{model_path}: not a readable ONNX model ({type(exc).__name__})") from None
    source = make_source(str(data), input_specs(model), batch_size)
    return compare_with_onnxruntime(model, source.batches(count))
