"""Power-of-two shifts on depthwise conv inputs: exact in FP32, and what they buy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import mxqn_onnx
from mxqn_onnx.calibration.data import DataSource, InputSpec
from mxqn_onnx.errors import MxqnError
from mxqn_onnx.graph.loading import export_fp32, normalise
from mxqn_onnx.lowbit import depthwise

C = 16


def _net(seed: int = 0) -> onnx.ModelProto:
    """Conv 3->16, HardSwish, depthwise 3x3 (group 16), Conv 1x1 16->8: the hard-swish output's
    channels span 2^0..2^-7 of the largest (the first conv's filters are scaled so), and the
    depthwise filters scale them back up."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(C, 3, 3, 3)).astype(np.float32) * 0.3
    w1 *= (2.0 ** -(np.arange(C) // 2)).astype(np.float32).reshape(-1, 1, 1, 1)
    # the depthwise filters undo the spread (as a BatchNorm folded into them does): every
    # channel of its output matters alike, the small input channels included
    wd = rng.normal(size=(C, 1, 3, 3)).astype(np.float32) * 0.5 * (2.0 ** (np.arange(C) // 2)).astype(
        np.float32).reshape(-1, 1, 1, 1)
    w3 = rng.normal(size=(8, C, 1, 1)).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (wd, "wd"), (w3, "w3"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("HardSwish", ["c1"], ["h1"], name="hswish"),
        helper.make_node("Conv", ["h1", "wd"], ["d1"], pads=[1, 1, 1, 1], group=C, name="dw"),
        helper.make_node("Conv", ["d1", "w3"], ["y"], name="pw"),
    ]
    g = helper.make_graph(nodes, "dwnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 12, 12])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _data(n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 12, 12)).astype(np.float32) * 4


def test_shifts_keep_the_fp32_function_exactly():
    source = _net()
    graph = normalise(source)
    x = _data(16)
    h1 = np.abs(_run(_with_output(source, "h1"), x))
    maxima = {"h1": h1.max(axis=(0, 2, 3))}
    record = depthwise.shift_depthwise_inputs(graph, maxima)
    assert record["tensors"] == 1 and record["convs"] == 1
    shifted = export_fp32(graph, source)
    assert [n.op_type for n in shifted.graph.node].count("Mul") == 1
    np.testing.assert_array_equal(_run(shifted, x), _run(source, x))  # bit for bit
    # every channel's maximum now within a factor 2 of the largest
    inner = next(n.output[0] for n in shifted.graph.node if n.op_type == "Mul")
    m = np.abs(_run(_with_output(shifted, inner), x)).max(axis=(0, 2, 3))
    assert np.all(m > m.max() / 2) and np.all(m <= m.max())


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    del m.graph.output[0]
    return m


def test_shifts_from_maxima():
    s = depthwise.shifts_for(np.array([8.0, 4.0, 3.9, 1.0, 0.0, 1e-30]))
    np.testing.assert_array_equal(s, [0, 1, 1, 3, 0, depthwise.MAX_SHIFT])


def test_conversion_with_shifts_measures_better(tmp_path):
    model, x = _net(), _data()
    plain = mxqn_onnx.quantize(model, x, abits=6, depthwise_shift="off")
    shifted = mxqn_onnx.quantize(model, x, abits=6, depthwise_shift="on")
    rec = shifted.report()["depthwise_shift"]
    assert rec["tensors"] == 1 and sum(rec["channels_by_shift"].values()) == C
    assert plain.depthwise_shift is None and "depthwise_shift" not in plain.report()
    # the planted 2^7 spread of channel ranges costs the per-tensor quantizer dearly
    assert shifted.measured_sqnr_db > plain.measured_sqnr_db + 6
    test = _data(32, seed=9)
    ref = _run(model, test)

    def sqnr(q):
        return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - _run(q.model, test)) ** 2))
    assert sqnr(shifted) > sqnr(plain) + 6  # on data it never saw


def test_auto_keeps_shifts_that_help_on_held_back_samples():
    """The default (``auto``) converts with and without the shifts and keeps the better on the
    held-back samples: on the planted net, the shifts."""
    model, x = _net(), _data()
    res = mxqn_onnx.quantize(model, x, abits=6)
    assert res.config.depthwise_shift == "auto"
    sq = res.holdout["sqnr_db"]
    assert res.holdout["kept"] == "default" and sq["default"] > sq["no depthwise shift"] + 6
    assert res.depthwise_shift["tensors"] == 1
    assert _shift_muls(res.model) == 1
    assert "depthwise_shift" in res.report()


def _shift_muls(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "Mul" and n.name.endswith("_dw_shift") for n in model.graph.node)


def _drift_net() -> onnx.ModelProto:
    """HardSwish on the input, depthwise 3x3 (group 4), Conv 1x1 4->2."""
    rng = np.random.default_rng(3)
    wd = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    w2 = rng.normal(size=(2, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("HardSwish", ["x"], ["h"], name="hswish"),
             helper.make_node("Conv", ["h", "wd"], ["d"], pads=[1, 1, 1, 1], group=4, name="dw"),
             helper.make_node("Conv", ["d", "w2"], ["y"], name="pw")]
    g = helper.make_graph(nodes, "drift", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 8, 8])],
                          [numpy_helper.from_array(wd, "wd"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def _drifting_data(n: int = 32) -> np.ndarray:
    """After the first quarter (the held-back samples) channels 1..3 are 2^6 smaller: the
    shifts measured there lift them 2^6, too far for the held-back samples."""
    x = np.random.default_rng(4).normal(size=(n, 4, 8, 8)).astype(np.float32) * 4
    x[n // 4:, 1:] *= 2.0 ** -6
    return x


def test_auto_drops_shifts_that_do_not_hold_on_held_back_samples():
    """Shifts measured on samples unlike the held-back ones hurt those: ``auto`` measures that
    and keeps a conversion without them (no Mul, no record), where ``on`` keeps them anyway."""
    model, x = _drift_net(), _drifting_data()
    on = mxqn_onnx.quantize(model, x, depthwise_shift="on")
    auto = mxqn_onnx.quantize(model, x)
    assert on.depthwise_shift["tensors"] == 1 and _shift_muls(on.model) == 1
    sq = auto.holdout["sqnr_db"]
    assert auto.holdout["kept"] in ("no depthwise shift", "paper") and sq["no depthwise shift"] > sq["default"]
    assert auto.depthwise_shift is None and "depthwise_shift" not in auto.report()
    assert _shift_muls(auto.model) == 0
    assert auto.config.depthwise_shift == "off"


def test_auto_without_a_held_back_check_shifts_nothing():
    model, x = _net(), _data()
    res = mxqn_onnx.quantize(model, x, abits=6, verify=False)
    assert res.depthwise_shift is None and _shift_muls(res.model) == 0


def test_nothing_to_shift_is_recorded_as_such(digits_model, digits_calib):
    r = mxqn_onnx.quantize(digits_model, digits_calib, depthwise_shift=True, verify=False)
    assert r.depthwise_shift == {"tensors": 0, "convs": 0, "channels_by_shift": {}}


def test_needs_data_that_can_be_read_twice():
    x = _data(16)
    once = DataSource(lambda: iter([{"x": x}]), [InputSpec("x", ("n", 3, 12, 12), np.dtype(np.float32))], 16,
                      False, "a reader")
    with pytest.raises(MxqnError, match="read again"):
        mxqn_onnx.quantize(_net(), once, depthwise_shift=True)
    with pytest.raises(MxqnError, match="depthwise_shift must be"):
        mxqn_onnx.quantize(_net(), x, depthwise_shift="yes")


def test_cli_flag_and_summary(tmp_path):
    from conftest import run_cli

    onnx.save(_net(), tmp_path / "dw.onnx")
    np.savez(tmp_path / "calib.npz", x=_data(32))
    p = run_cli("convert", tmp_path / "dw.onnx", tmp_path / "q.onnx", "--calib", tmp_path / "calib.npz",
                "--depthwise-shift", "on", "--report", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    assert "depthwise input shifts: 1 tensors, 1 convs" in p.stdout
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "Mul" in ops and ("LogQuant" in ops or "FixedQuant" in ops)


def test_candidates_that_only_drop_bias_correction_are_not_chosen_again(monkeypatch):
    """With shifts on trial and rounding to nearest, two of the four held-back candidates only
    drop bias correction from another (no bias correction from the default, the paper's from
    no depthwise shift): two choices in all, and the paper candidate measures exactly what a
    conversion choosing it afresh measures."""
    import mxqn_onnx.api as api
    import mxqn_onnx.quant.candidates as candidates

    calls = []
    real = api.choose_all
    counting = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(api, "choose_all", counting)  # the default's choice
    monkeypatch.setattr(candidates, "choose_all", counting)  # the held-back candidates'
    model, x = _net(), _data()
    res = mxqn_onnx.quantize(model, x, abits=6, rounding="nearest")
    assert set(res.holdout["sqnr_db"]) == {"default", "no bias correction", "no depthwise shift", "paper"}
    assert len(calls) == 2
    fresh = mxqn_onnx.quantize(model, x, abits=6, rounding="nearest", bias_correction=False)
    assert fresh.holdout["sqnr_db"]["no depthwise shift"] == res.holdout["sqnr_db"]["paper"]


def test_auto_tries_no_shifts_for_small_spreads():
    """Channel maxima within 2^3 of the tensor's: ``auto`` leaves the graph alone (no trial
    candidate), ``on`` shifts anyway."""
    x = np.random.default_rng(4).normal(size=(32, 4, 8, 8)).astype(np.float32) * 4
    x[:, 1:] *= 2.0 ** -3
    auto = mxqn_onnx.quantize(_drift_net(), x)
    assert auto.depthwise_shift is None and "no depthwise shift" not in auto.holdout["sqnr_db"]
    on = mxqn_onnx.quantize(_drift_net(), x, depthwise_shift="on")
    assert on.depthwise_shift["tensors"] == 1 and max(map(int, on.depthwise_shift["channels_by_shift"])) == 3
