"""Peer quantizers for the benchmarks: NNCF's post-training quantization of ONNX models, and the
same output with every quantizer scale rounded to a power of two.

NNCF's documented ONNX flow: a model at opset 13 or later (per-channel weight quantizers need
it), after onnxruntime's ``quant_pre_process`` (shape inference and graph clean-up), quantized by
``nncf.quantize`` with the calibration samples as an ``nncf.Dataset`` (``subset_size``: all of
them). Its defaults: 8-bit symmetric per-channel weights, 8-bit per-tensor activations (mixed
preset: asymmetric where the input can be negative), fast bias correction. NNCF is a benchmark
dependency only (``pip install .[bench]``); nothing in ``mxqn_onnx`` imports it.

``pow2_scales`` separates the cost of MXQN's power-of-two constraint from the rest of its
method: NNCF's model with each QuantizeLinear / DequantizeLinear scale rounded to the nearest
power of two (zero points and everything else as NNCF left them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

#: how the NNCF rows were made, for the tables
NNCF_FLOW = "opset 13 + quant_pre_process, nncf.quantize defaults (8-bit, fast bias correction)"


def prepare(path: str, out: str, opset: int = 13) -> str:
    """The model at ``opset`` (at least) after ``quant_pre_process``: NNCF's documented input."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    m = onnx.load(path)
    cur = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    if cur < opset:
        m = version_converter.convert_version(m, opset)
    up = str(Path(out).with_suffix(".opset.onnx"))
    onnx.save(m, up)
    quant_pre_process(up, out)
    return out


def run_nncf(pre_path: str, out_path: str, calib: np.ndarray, input_name: str, batch: int = 16,
             fast_bias_correction: Optional[bool] = True, preset: Optional[str] = None,
             activation_ranges: Optional[str] = None, weight_bits: int = 8, act_bits: int = 8) -> None:
    """``nncf.quantize`` on every calibration sample (in batches of ``batch``); saved to ``out_path``.
    ``fast_bias_correction=None``: no bias correction at all. ``activation_ranges="minmax"``:
    activation ranges from the minimum and maximum over all batches (NNCF's default,
    ``MEAN_MINMAX``, averages each batch's minimum and maximum: it clips, more so the smaller
    the batches). ``weight_bits`` / ``act_bits`` other than 8 are passed as NNCF's
    ``QuantizationParameters(num_bits=...)`` (its ONNX backend refuses them: see the tables)."""
    import nncf
    import onnx

    model = onnx.load(pre_path)
    fixed = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    b = fixed if fixed > 0 else batch
    batches = [calib[i:i + b] for i in range(0, len(calib) - (len(calib) % b if fixed > 0 else 0), b)]
    ds = nncf.Dataset(batches, lambda x: {input_name: x})
    kw, adv = {}, {}
    if fast_bias_correction is None:
        adv["disable_bias_correction"] = True
    else:
        kw["fast_bias_correction"] = fast_bias_correction
    if activation_ranges == "minmax":
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        adv["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
    if weight_bits != 8 or act_bits != 8:
        from nncf.quantization.advanced_parameters import QuantizationParameters

        adv["weights_quantization_params"] = QuantizationParameters(num_bits=weight_bits)
        adv["activations_quantization_params"] = QuantizationParameters(num_bits=act_bits)
    if adv:
        kw["advanced_parameters"] = nncf.AdvancedQuantizationParameters(**adv)
    if preset is not None:
        kw["preset"] = getattr(nncf.QuantizationPreset, preset.upper())
    q = nncf.quantize(model, ds, subset_size=len(batches), **kw)
    onnx.save(q, out_path)


def _pow2(s: np.ndarray, mode: str) -> np.ndarray:
    l2 = np.log2(np.where(s > 0, s, 1.0))
    r = np.ceil(l2 - 1e-9) if mode == "up" else np.round(l2)
    return np.where(s > 0, np.exp2(r), s)


def _axis_shape(scale: np.ndarray, ndim: int, axis: int):
    shape = [1] * ndim
    if scale.ndim:
        shape[axis % ndim] = scale.size
    return shape


def pow2_scales(model, mode: str = "nearest"):
    """A copy of ``model`` with every QuantizeLinear / DequantizeLinear scale rounded to a power
    of two: ``nearest`` in the log domain, or ``up`` (never a narrower range: no new clipping).

    Activation quantizers keep their integer grid (Q and DQ change together). Weights stored as
    integers behind a DequantizeLinear are requantized onto the new step (dequantized with the
    old scale, rounded to the nearest code of the new one, clipped to the type's range), so the
    weights stay the same values up to the new step's rounding.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if any(n.op_type == "Constant" and n.output[0] in {q.input[1] for q in qdq} for n in m.graph.node):
        raise ValueError("pow2_scales: scales given by Constant nodes are not handled")
    # the values as NNCF left them: an initializer may serve several nodes (each changed once)
    original = {name: numpy_helper.to_array(i) for name, i in inits.items()}
    done = set()
    for n in qdq:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        s_init = inits[n.input[1]]
        s = original[n.input[1]]
        new = _pow2(s.astype(np.float64), mode).astype(s.dtype)
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[0] not in done:
            done.add(n.input[0])  # integer weights: requantize
            q_init = inits[n.input[0]]
            q = original[n.input[0]]
            zp = original[n.input[2]].astype(np.float64) \
                if len(n.input) > 2 and n.input[2] else np.zeros(1)
            shape = _axis_shape(s, q.ndim, axis)
            w = (q.astype(np.float64) - zp.reshape(shape if zp.ndim else [1])) * s.reshape(shape)
            info = np.iinfo(q.dtype)
            q2 = np.clip(np.round(w / new.reshape(shape)) + zp.reshape(shape if zp.ndim else [1]),
                         info.min, info.max)
            q_init.CopyFrom(numpy_helper.from_array(q2.astype(q.dtype), q_init.name))
        if s_init.name not in done:
            s_init.CopyFrom(numpy_helper.from_array(new, s_init.name))
            done.add(s_init.name)
    return m


def is_pow2(x: float) -> bool:
    return x > 0 and math.log2(x) == round(math.log2(x))
