"""``export-c``'s fast kernels on shapes the zoo does not cover: 1x1 convs (odd fan-in), depthwise
convs of odd plane sizes, strides 1 and 2, symmetric and asymmetric padding, none, dilation, a
5x5 window, Relu6 (Clip) and plain Relu epilogues; 8-bit and 12-bit (int16) codes. The host build
is compared with the integer reference executor code for code (every quantizer's codes and every
layer's exact sum), and the kernels the planner should pick are checked in the C text."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mxqn_onnx
from mxqn_onnx.integer.c_run import compiler

from test_export_c import FAST, assert_code_for_code

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler")


def _kernels_model(seed: int = 5) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(x, y, cin, cout, k, group=1, act="relu", **kw):
        w = rng.standard_normal((cout, cin // group, *k)).astype(np.float32) * (2.0 / (cin // group * k[0] * k[1])) ** 0.5
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, y + "_w"), numpy_helper.from_array(b, y + "_b")])
        nodes.append(helper.make_node("Conv", [x, y + "_w", y + "_b"], [y + "_c"], name=y, kernel_shape=list(k),
                                      group=group, **kw))
        if act == "relu":
            nodes.append(helper.make_node("Relu", [y + "_c"], [y], name=y + "_relu"))
        elif act == "relu6":
            nodes.append(helper.make_node("Clip", [y + "_c", "zero", "six"], [y], name=y + "_clip"))
        else:
            nodes.append(helper.make_node("Identity", [y + "_c"], [y], name=y + "_id"))
        return y

    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    h = conv("x", "stem", 3, 8, (3, 3), pads=[1, 1, 1, 1])                              # 11x13
    h = conv(h, "dw_s2", 8, 8, (3, 3), group=8, pads=[1, 1, 1, 1], strides=[2, 2])     # 6x7, padded copy
    h = conv(h, "pw_odd", 8, 5, (1, 1), act="relu6")                                    # 1x1, K = 8
    h = conv(h, "pw_k5", 5, 12, (1, 1))                                                 # 1x1, odd K = 5
    h = conv(h, "dw_5x5", 12, 12, (5, 5), group=12, pads=[2, 2, 2, 2], act="relu6")     # 5x5 window
    h = conv(h, "dw_asym", 12, 12, (3, 3), group=12, pads=[0, 1, 1, 0], strides=[1, 2])  # asymmetric
    h = conv(h, "dw_valid", 12, 12, (3, 3), group=12, act="none")                       # no padding
    h = conv(h, "dw_dil", 12, 12, (3, 3), group=12, pads=[2, 2, 2, 2], dilations=[2, 2])
    conv(h, "y", 12, 4, (1, 1), act="none")
    g = helper.make_graph(nodes, "kernels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 11, 13])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 11, 13)).astype(np.float32)


@pytest.mark.parametrize("variant", [dict(act_quant="fixed"), dict(act_quant="fixed", wbits=12, abits=12)],
                         ids=["8bit", "int16"])
def test_1x1_and_depthwise_kernels_code_for_code(variant, tmp_path):
    model = mxqn_onnx.quantize(_kernels_model(), {"x": _data(64, 0)}, **FAST, **variant).model
    info, y, ref = assert_code_for_code(model, _data(8, 1), tmp_path / "k")
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
    src = (tmp_path / "k" / "model.c").read_text()
    assert "zero-padded" in src                       # depthwise with padding: the padded copy
    assert "without bounds checks" in src             # depthwise without padding: straight from the plane
    assert "/* 1x1: the channel vector */" in src   # 1x1 convs gather no window
    assert "mxqn_rq(" in src                          # the one-shift requantization
    assert "(int16 dot products)" in src
