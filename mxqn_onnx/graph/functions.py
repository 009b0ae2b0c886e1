"""The custom activation-quantizer ops, as model-local ONNX functions.

``FixedQuant(bits, frac, signed)`` and ``LogQuant(bits, k, E, signed)`` live in the
``ai.mxqn`` domain. Each ships inside the converted model as a FunctionProto whose body uses
only standard ops (opset >= 13), so stock onnxruntime runs it, while a runtime that knows
the domain maps the node onto its own shift hardware. Attributes reach the body through
``ref_attr_name``. The bodies repeat, op for op, :func:`mxqn_onnx.quant.quantizers.fxp_quantize`
and :func:`mxqn_onnx.quant.quantizers.log_quantize`; the tests check that they agree bit for bit.
"""

from __future__ import annotations

import math
from typing import List

import onnx
from onnx import AttributeProto, TensorProto, helper

DOMAIN = "ai.mxqn"
DOMAIN_VERSION = 1
FIXED_OP = "FixedQuant"
LOG_OP = "LogQuant"


def _attr_constant(out: str, attr: str) -> onnx.NodeProto:
    """``Constant`` whose int value is the calling node's attribute ``attr``."""
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(
        AttributeProto(name="value_int", ref_attr_name=attr, type=AttributeProto.INT)
    )
    return node


def _float_constant(out: str, value: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value_float=value)


def _float_attr(prefix: str, attr: str) -> List[onnx.NodeProto]:
    """Nodes producing ``prefix`` = float(attribute)."""
    return [
        _attr_constant(prefix + "_i", attr),
        helper.make_node("Cast", [prefix + "_i"], [prefix], to=TensorProto.FLOAT),
    ]


def fixed_quant_function(opset: int) -> onnx.FunctionProto:
    """``y = clip(round(x * 2^frac), lo, hi) / 2^frac`` with lo/hi from bits and signed."""
    nodes = [
        *_float_attr("f", "frac"),
        *_float_attr("b", "bits"),
        *_float_attr("s", "signed"),
        _float_constant("two", 2.0),
        _float_constant("one", 1.0),
        helper.make_node("Pow", ["two", "f"], ["scale"]),
        helper.make_node("Neg", ["f"], ["neg_f"]),
        helper.make_node("Pow", ["two", "neg_f"], ["step"]),  # 1 / scale, exact: a power of two
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Round", ["xs"], ["r"]),
        # hi = 2^(b - s) - 1 ; lo = -s * 2^(b - 1)
        helper.make_node("Sub", ["b", "s"], ["b_mag"]),
        helper.make_node("Pow", ["two", "b_mag"], ["p_hi"]),
        helper.make_node("Sub", ["p_hi", "one"], ["hi"]),
        helper.make_node("Sub", ["b", "one"], ["b_m1"]),
        helper.make_node("Pow", ["two", "b_m1"], ["p_lo"]),
        helper.make_node("Mul", ["s", "p_lo"], ["neg_lo"]),
        helper.make_node("Neg", ["neg_lo"], ["lo"]),
        helper.make_node("Clip", ["r", "lo", "hi"], ["c"]),
        helper.make_node("Mul", ["c", "step"], ["y"]),
    ]
    return helper.make_function(
        DOMAIN, FIXED_OP, ["x"], ["y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["bits", "frac", "signed"],
    )


def log_quant_function(opset: int) -> onnx.FunctionProto:
    """Nearest of the levels ``2^((E - j)/2^k)``, j < 2^(bits - signed) - 1, or zero.

    Per element the body reads two small tables instead of raising 2 to tensor powers: ``V``
    holds zero and the M levels in ascending order, ``T[j] = (V[j] + V[j+1]) / 2`` the decision
    thresholds (both built once per call from the attributes, with ``Pow`` on M+1 values).
    ``j = floor(log2|x| * 2^k)`` (as an index into ``V``, clipped to the table) brackets ``|x|``
    between ``V[j]`` and ``V[j+1]``; the code is ``j + (|x| >= T[j])``. A ``j`` off by one from
    log rounding lies next to a level, far from any threshold, and gives the same code, so the
    result depends only on the exactly computed levels and thresholds, as in
    :func:`mxqn_onnx.quant.quantizers.log_quantize`. The tables are read with
    ``GatherElements`` on the flattened tensor. The per-element part is an ``If`` on
    ``signed``: signed, a negative input reads the second half of each table (``-V``), so no
    per-element ``Where`` or sign multiply; unsigned, ``Relu`` sends negatives to the zero
    level and the sign costs nothing (four passes fewer: 6-11% of a ReLU network's time).
    """
    nodes = [
        *_float_attr("b", "bits"),
        *_float_attr("k", "k"),
        *_float_attr("e", "E"),
        *_float_attr("s", "signed"),
        _float_constant("two", 2.0),
        _float_constant("one", 1.0),
        _float_constant("half", 0.5),
        _float_constant("zero", 0.0),
        _float_constant("inv_ln2", 1.0 / math.log(2.0)),
        helper.make_node("Constant", [], ["first"], value_ints=[0]),
        helper.make_node("Constant", [], ["second"], value_ints=[1]),
        helper.make_node("Constant", [], ["last"], value_ints=[-1]),
        helper.make_node("Constant", [], ["end"], value_ints=[2 ** 62]),
        helper.make_node("Pow", ["two", "k"], ["steps"]),
        # M = 2^(b - s) - 1 levels; the lowest is 2^(n_lo / 2^k) with n_lo = E - M + 1
        helper.make_node("Sub", ["b", "s"], ["b_mag"]),
        helper.make_node("Pow", ["two", "b_mag"], ["p_m"]),
        helper.make_node("Sub", ["p_m", "one"], ["m"]),
        helper.make_node("Sub", ["e", "m"], ["n_below"]),  # n_lo - 1: the exponent V[0] stands in for
        # V = [0, 2^(n_lo/2^k), ..., 2^(E/2^k)]; T = midpoints of neighbours
        helper.make_node("Add", ["m", "one"], ["m1"]),
        helper.make_node("Range", ["zero", "m1", "one"], ["idx"]),
        helper.make_node("Add", ["idx", "n_below"], ["n_tab"]),
        helper.make_node("Div", ["n_tab", "steps"], ["n_tab_s"]),
        helper.make_node("Pow", ["two", "n_tab_s"], ["v_raw"]),
        helper.make_node("Min", ["idx", "one"], ["not_first"]),
        helper.make_node("Mul", ["v_raw", "not_first"], ["v"]),
        helper.make_node("Slice", ["v", "first", "last"], ["v_lo"]),
        helper.make_node("Slice", ["v", "second", "end"], ["v_hi"]),
        helper.make_node("Add", ["v_lo", "v_hi"], ["v_sum"]),
        helper.make_node("Mul", ["v_sum", "half"], ["thr"]),
        helper.make_node("Sub", ["m", "one"], ["j_max"]),
        helper.make_node("Mul", ["steps", "inv_ln2"], ["log_scale"]),
        helper.make_node("Constant", [], ["flat"], value_ints=[-1]),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        # The per-element part runs on the flattened tensor: GatherElements needs the rank of
        # its 1-D tables, and is about 6x faster in onnxruntime than Gather (which copies
        # element by element through a generic block loop, about 4 ns per element)
        helper.make_node("Reshape", ["x", "flat"], ["xf"]),
        helper.make_node("Cast", ["s"], ["is_signed"], to=TensorProto.BOOL),
        helper.make_node("If", ["is_signed"], ["yf"], then_branch=_signed_part(), else_branch=_unsigned_part()),
        helper.make_node("Reshape", ["yf", "x_shape"], ["y"]),
    ]
    return helper.make_function(
        DOMAIN, LOG_OP, ["x"], ["y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["bits", "k", "E", "signed"],
    )


def _bracket(a: str, p: str) -> List[onnx.NodeProto]:
    """``{p}j_c`` = clip(floor(log2(a) * 2^k) - (n_lo - 1), 0, M - 1) as a float; after the
    clip the value is non-negative, so Cast's truncation is the floor; log(0) = -inf clips to 0."""
    return [
        helper.make_node("Log", [a], [p + "ln_a"]),
        helper.make_node("Mul", [p + "ln_a", "log_scale"], [p + "t"]),
        helper.make_node("Sub", [p + "t", "n_below"], [p + "t_rel"]),
        helper.make_node("Clip", [p + "t_rel", "zero", "j_max"], [p + "j_c"]),
    ]


def _code_and_level(a: str, j_f: str, thr: str, v: str, p: str, out: str) -> List[onnx.NodeProto]:
    """``out = v[j + (a >= thr[j])]`` for the float index ``j_f``."""
    return [
        helper.make_node("Cast", [j_f], [p + "j"], to=TensorProto.INT32),
        helper.make_node("GatherElements", [thr, p + "j"], [p + "t_j"]),
        helper.make_node("GreaterOrEqual", [a, p + "t_j"], [p + "up"]),
        helper.make_node("Cast", [p + "up"], [p + "up_i"], to=TensorProto.INT32),
        helper.make_node("Add", [p + "j", p + "up_i"], [p + "code"]),
        helper.make_node("GatherElements", [v, p + "code"], [out]),
    ]


def _signed_part() -> onnx.GraphProto:
    """The If branch for signed tensors: negatives read second halves of the tables, thr2 =
    [T, 0, T] and v2 = [V, -V] (the zero sits where no index of a negative lands), their index
    offset by M + 1 (exact small integers in float), which costs fewer passes than a multiply
    by the sign; onnxruntime's Where costs about 30x a Mul."""
    nodes = [
        helper.make_node("Neg", ["v"], ["sv_neg"]),
        helper.make_node("Concat", ["v", "sv_neg"], ["sv2"], axis=0),
        helper.make_node("Slice", ["v", "first", "second"], ["sv_zero"]),
        helper.make_node("Concat", ["thr", "sv_zero", "thr"], ["sthr2"], axis=0),
        helper.make_node("Abs", ["xf"], ["sa"]),
        *_bracket("sa", "s"),
        helper.make_node("Less", ["xf", "zero"], ["sneg"]),
        helper.make_node("Cast", ["sneg"], ["sneg_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sneg_f", "m1"], ["soffset"]),
        helper.make_node("Add", ["sj_c", "soffset"], ["sj_s"]),
        *_code_and_level("sa", "sj_s", "sthr2", "sv2", "s", "syf"),
    ]
    return helper.make_graph(nodes, "signed", [], [helper.make_tensor_value_info("syf", TensorProto.FLOAT, None)])


def _unsigned_part() -> onnx.GraphProto:
    """The If branch for unsigned tensors: Relu sends negatives (and -0) to 0, whose log clips to
    the zero level's bracket and whose code is the zero level."""
    nodes = [
        helper.make_node("Relu", ["xf"], ["ua"]),
        *_bracket("ua", "u"),
        *_code_and_level("ua", "uj_c", "thr", "v", "u", "uyf"),
    ]
    return helper.make_graph(nodes, "unsigned", [], [helper.make_tensor_value_info("uyf", TensorProto.FLOAT, None)])


def all_functions(opset: int) -> List[onnx.FunctionProto]:
    """Both quantizer functions, with bodies at the model's default-domain opset."""
    return [fixed_quant_function(opset), log_quant_function(opset)]
