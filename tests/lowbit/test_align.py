"""Power-of-two range alignment keeps the FP32 function and fills each channel's grid."""

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

import mxqn_onnx
from mxqn_onnx.graph.layers import find_layers
from mxqn_onnx.graph.loading import load_model, normalise
from mxqn_onnx.lowbit.align import align_channel_ranges
from mxqn_onnx.quant import quantizers as Q


def _run(graph, ir, x):
    m = gs.export_onnx(graph)
    m.ir_version = ir
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_alignment_keeps_fp32_and_fills_the_grid(digits_model, digits_calib):
    src = load_model(digits_model)
    x = np.load(digits_calib)["input"][:64]
    plain, aligned = normalise(src), normalise(src)
    n_layers, n_channels = align_channel_ranges(aligned, 4)
    # Conv->Relu->Conv chains and the Gemm->Relu->Gemm head: everything but the last Gemm
    # and the convs whose output feeds a layer through an op the scale cannot pass
    assert n_layers >= 4 and n_channels > 0
    np.testing.assert_allclose(_run(aligned, src.ir_version, x), _run(plain, src.ir_version, x),
                               rtol=1e-4, atol=1e-4)
    changed = 0
    for layer in find_layers(aligned)[0]:
        if not layer.node.inputs[1].name.endswith("weight_aligned"):
            continue
        w = layer.weight
        rows = np.moveaxis(w, layer.channel_axis, 0).reshape(w.shape[layer.channel_axis], -1)
        for row in rows:
            m = float(np.abs(row).max())
            f0 = Q.no_overflow_frac(m, 4, True)
            assert abs(m * 2.0 ** f0 - 7) < 1e-3  # the top code, exactly
        changed += 1
    assert changed == n_layers


def test_alignment_option_runs_end_to_end(digits_model, digits_calib):
    r = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=8, align_channels=True)
    assert r.measured_sqnr_db > 8
    assert r.config.align_channels
