"""``export-c``'s fast kernels on shapes the zoo does not cover: 1x1 convs (odd fan-in), depthwise
convs of odd plane sizes, strides 1 and 2, symmetric and asymmetric padding, none, dilation, a
5x5 window, Relu6 (Clip) and plain Relu epilogues; 8-bit and 12-bit (int16) codes. The host build
is compared with the integer reference executor code for code (every quantizer's codes and every
layer's exact sum), and the kernels the planner should pick are checked in the C text. The row
kernels (depthwise everywhere but Cortex-M, 1x1 with few input channels on x86) are compared
with the output-stationary ones under -DMXQN_ROW_KERNELS=0 / -DMXQN_ROW_1X1=1, accumulator for
accumulator, and so are the x86 SSE2 (pmaddwd) row kernels, the default on x86, with the portable
C under -DMXQN_NO_SIMD."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mxqn_onnx
from mxqn_onnx.integer.c_run import build_c, compiler, read_records, run_c

from test_export_c import FAST, assert_code_for_code

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler")


def _kernels_model(seed: int = 5, rows: bool = False) -> onnx.ModelProto:
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
    if rows:  # the row kernels' other shapes: 1x1 over several position blocks, stride 2 with dilation, no pad
        h = conv(h, "pw_wide", 8, 16, (1, 1))                                           # 143 positions
        h = conv(h, "dw_s2_dil", 16, 16, (3, 3), group=16, pads=[2, 2, 2, 2], strides=[2, 2],
                 dilations=[2, 2])                                                      # 6x7
        h = conv(h, "dw_s2_valid", 16, 16, (3, 3), group=16, strides=[2, 2], act="relu6")  # 2x3
        h = conv(h, "dw_5x5_s2", 16, 16, (5, 5), group=16, pads=[2, 1, 2, 3], strides=[2, 2])  # 1x2
        conv(h, "y", 16, 4, (1, 1), act="none")
        g = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 11, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
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


def _dump(folder, exe_name, x, out_size, extra):
    exe = folder / exe_name
    build_c(folder, exe, debug=True, extra=extra)
    dump = folder / (exe_name + ".dump")
    y, _ = run_c(exe, x, out_size, env={"MXQN_DUMP": str(dump)})
    return y, read_records(dump)


@pytest.mark.parametrize("rows", [False, True], ids=["kernels", "rows"])
@pytest.mark.parametrize("variant", [dict(act_quant="fixed"), dict(act_quant="fixed", wbits=12, abits=12)],
                         ids=["8bit", "int16"])
def test_row_kernels_match_the_output_stationary_ones(rows, variant, tmp_path):
    model = mxqn_onnx.quantize(_kernels_model(rows=rows), {"x": _data(64, 0)}, **FAST, **variant).model
    x = _data(6, 2)
    info, y, ref = assert_code_for_code(model, x, tmp_path / "k")  # the default build: row kernels on
    assert np.array_equal(y.view(np.uint32), ref.view(np.uint32))
    src = (tmp_path / "k" / "model.c").read_text()
    if "abits" not in variant:  # 12-bit codes: the planner's bound keeps the generic requantization
        assert "(depthwise, row kernel" in src and "(1x1, row kernel" in src
        if rows:
            assert "columns split into 2 phases" in src
        assert "(1x1, SSE2 pmaddwd kernel" in src and "_mm_madd_epi16" in src
    _, base = _dump(tmp_path / "k", "dbg_rows", x, info["output_size"], ("-DMXQN_ROW_1X1=1",))
    for flags in [("-DMXQN_ROW_KERNELS=0",), ("-DMXQN_ROW_KERNELS=1", "-DMXQN_ROW_1X1=0"),
                  ("-DMXQN_NO_SIMD", "-DMXQN_ROW_1X1=1"), ("-DMXQN_NO_SIMD", "-DMXQN_ROW_1X1=0")]:
        y2, recs = _dump(tmp_path / "k", "dbg", x, info["output_size"], flags)
        assert np.array_equal(y2.view(np.uint32), y.view(np.uint32)), flags
        assert len(recs) == len(base)
        for a, b in zip(recs, base):
            assert a[0] == b[0] and np.array_equal(a[2], b[2]), (flags, a[0])
