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
        helper.make_node("Div", ["c", "scale"], ["y"]),
    ]
    return helper.make_function(
        DOMAIN, FIXED_OP, ["x"], ["y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["bits", "frac", "signed"],
    )


def log_quant_function(opset: int) -> onnx.FunctionProto:
    """Nearest of the levels ``2^((E - j)/2^k)``, j < 2^(bits - signed) - 1, or zero."""
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
        helper.make_node("Pow", ["two", "k"], ["steps"]),
        # n_lo = E - M + 1 with M = 2^(b - s) - 1
        helper.make_node("Sub", ["b", "s"], ["b_mag"]),
        helper.make_node("Pow", ["two", "b_mag"], ["p_m"]),
        helper.make_node("Sub", ["p_m", "one"], ["m"]),
        helper.make_node("Sub", ["e", "m"], ["e_m"]),
        helper.make_node("Add", ["e_m", "one"], ["n_lo"]),
        # n = floor(log2|x| * 2^k), bracketing |x| between 2^(n/2^k) and 2^((n+1)/2^k)
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("Log", ["a"], ["ln_a"]),
        helper.make_node("Mul", ["ln_a", "inv_ln2"], ["log2_a"]),
        helper.make_node("Mul", ["log2_a", "steps"], ["t"]),
        helper.make_node("Floor", ["t"], ["n_raw"]),
        # log(0) = -inf: any n below the range works, the zero test below decides
        helper.make_node("Sub", ["n_lo", "one"], ["n_under"]),
        helper.make_node("Max", ["n_raw", "n_under"], ["n"]),
        helper.make_node("Div", ["n", "steps"], ["n_s"]),
        helper.make_node("Pow", ["two", "n_s"], ["lower"]),
        helper.make_node("Add", ["n", "one"], ["n1"]),
        helper.make_node("Div", ["n1", "steps"], ["n1_s"]),
        helper.make_node("Pow", ["two", "n1_s"], ["upper"]),
        helper.make_node("Add", ["lower", "upper"], ["sum_lu"]),
        helper.make_node("Mul", ["sum_lu", "half"], ["mid"]),
        helper.make_node("Less", ["a", "mid"], ["below_mid"]),
        helper.make_node("Where", ["below_mid", "n", "n1"], ["n_sel"]),
        helper.make_node("Clip", ["n_sel", "n_lo", "e"], ["n_c"]),
        helper.make_node("Div", ["n_c", "steps"], ["n_c_s"]),
        helper.make_node("Pow", ["two", "n_c_s"], ["level"]),
        helper.make_node("Div", ["n_lo", "steps"], ["n_lo_s"]),
        helper.make_node("Pow", ["two", "n_lo_s"], ["l_min"]),
        helper.make_node("Mul", ["l_min", "half"], ["z_thr"]),
        helper.make_node("Less", ["a", "z_thr"], ["is_zero"]),
        helper.make_node("Where", ["is_zero", "zero", "level"], ["q"]),
        # sign; unsigned quantizers send negatives to 0: max(sign, -signed)
        helper.make_node("Sign", ["x"], ["sg"]),
        helper.make_node("Neg", ["s"], ["neg_s"]),
        helper.make_node("Max", ["sg", "neg_s"], ["sg_c"]),
        helper.make_node("Mul", ["q", "sg_c"], ["y"]),
    ]
    return helper.make_function(
        DOMAIN, LOG_OP, ["x"], ["y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["bits", "k", "E", "signed"],
    )


def all_functions(opset: int) -> List[onnx.FunctionProto]:
    """Both quantizer functions, with bodies at the model's default-domain opset."""
    return [fixed_quant_function(opset), log_quant_function(opset)]
