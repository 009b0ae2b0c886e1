"""The low-bit techniques beyond the paper: data-aware rounding, the layer-output objective for
activation quantizers, data-free (BatchNorm) bias correction, and how each is reported."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import mxqn_onnx
from mxqn_onnx.calibration.observers import TensorHistogram
from mxqn_onnx.config import AUTO_ROUNDING_BUDGET
from mxqn_onnx.graph.layers import find_layers
from mxqn_onnx.graph.loading import load_model, normalise
from mxqn_onnx.lowbit import rounding, unfold
from mxqn_onnx.quant import quantizers as Q
from mxqn_onnx.quant.choose import choose_activation, model_rounding_cost
from mxqn_onnx.quant.objective import consumers_sqnr, refine_activation

from conftest import ROOT, run_cli
from graph_helpers import session


def _digits_x(path, n=128):
    with np.load(path) as z:
        return z["input"][:n]


# --------------------------------------------------------------------------- unfold


def test_unfolded_rows_reproduce_the_conv_output():
    """``input_rows @ weight_rows^T`` equals onnxruntime's Conv (strides, pads, dilations, groups)."""
    rng = np.random.default_rng(0)
    for attrs, groups in [(dict(pads=[1, 1, 1, 1]), 1), (dict(strides=[2, 2], dilations=[2, 1]), 1),
                          (dict(pads=[1, 0, 1, 0], group=2), 2), (dict(auto_pad="SAME_UPPER", strides=[2, 2]), 1)]:
        w = rng.standard_normal((4, 6 // groups, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 9, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
        y = session(m).run(None, {"x": x})[0]  # [N, O, OH, OW]
        layer = find_layers(normalise(m))[0][0]
        rows = unfold.input_rows(layer, x, max_rows=10**6)
        wr = unfold.weight_rows(layer)
        got = np.concatenate([r @ wg.T for r, wg in zip(rows, wr)], axis=1)  # [N*OH*OW, O]
        want = y.transpose(0, 2, 3, 1).reshape(-1, 4)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=str(attrs))
        np.testing.assert_array_equal(unfold.rows_to_weight(layer, wr, w.shape), w)


# --------------------------------------------------------------------------- rounding


def test_gptq_lowers_the_layer_output_error_on_the_same_grid(digits_model, digits_calib):
    model = load_model(digits_model)
    graph = normalise(model)
    layers, _ = find_layers(graph)
    layer = layers[1]  # a 3x3 conv reading ReLU outputs
    x = session(model, [layer.data.name]).run([layer.data.name], {model.graph.input[0].name: _digits_x(digits_calib)})[0]
    w_rows = unfold.weight_rows(layer)
    x_rows = unfold.input_rows(layer, x, 8192)
    f = np.array([Q.no_overflow_frac(float(m), 4, True) for m in np.abs(w_rows[0]).max(axis=1)])
    res = rounding.round_layer(w_rows, x_rows, 4, [f])
    assert res.used and res.sqnr_db > res.sqnr_nearest_db + 3, (res.sqnr_nearest_db, res.sqnr_db)
    codes = res.rows[0] * Q.pow2(f)[:, None]
    np.testing.assert_array_equal(codes, np.rint(codes))  # on the power-of-two grid
    lo, hi = Q.fxp_range(4, True)
    assert codes.min() >= lo and codes.max() <= hi
    # not plain nearest rounding, but never far from it
    near = Q.fxp_quantize(w_rows[0], 4, f[:, None], True)
    assert np.any(res.rows[0] != near)


def test_gptq_falls_back_to_nearest_when_it_cannot_help():
    """A layer whose inputs are uncorrelated and equal in power: nearest is already optimal."""
    rng = np.random.default_rng(1)
    x = np.eye(16).repeat(4, axis=0)  # orthogonal inputs, H = I / 16
    w = rng.standard_normal((8, 16))
    f = np.full(8, 2)
    res = rounding.round_layer([w], [x], 4, [f])
    assert res.sqnr_db >= res.sqnr_nearest_db
    np.testing.assert_array_equal(res.rows[0], Q.fxp_quantize(w, 4, f[:, None], True))


def test_rounding_end_to_end_improves_w4_and_round_trips(digits_model, digits_calib, digits_test):
    kw = dict(wbits=4, abits=4)
    near = mxqn_onnx.quantize(digits_model, digits_calib, rounding="nearest", **kw)
    data = mxqn_onnx.quantize(digits_model, digits_calib, rounding="gptq", **kw)
    assert all(d.weight.rounding == "gptq" for d in data.layers)
    assert all(d.weight.rounding == "nearest" for d in near.layers)
    assert data.measured_sqnr_db > near.measured_sqnr_db + 2, (near.measured_sqnr_db, data.measured_sqnr_db)
    # "auto" is gptq at 4 bits; at 8 bits only where the whole model's rounding is cheap:
    # this CNN (about 7e9 multiply-adds) but not the shipped VGG16 (about 3e10)
    assert all(d.weight.rounding == "gptq" for d in mxqn_onnx.quantize(digits_model, digits_calib, **kw).layers)
    assert all(d.weight.rounding == "gptq" for d in mxqn_onnx.quantize(digits_model, digits_calib).layers)
    vgg = ROOT / "models" / "digits32_vgg16.onnx"
    layers, _ = find_layers(normalise(load_model(vgg)))
    assert model_rounding_cost(layers) > AUTO_ROUNDING_BUDGET
    r8 = mxqn_onnx.quantize(vgg, ROOT / "models" / "digits32_calib.npz", calib_count=32, verify=False)
    assert all(d.weight.rounding == "nearest" for d in r8.layers)
    # the stored integer codes are the rounded values: the model's weights equal them exactly
    inits = {i.name: numpy_helper.to_array(i) for i in data.model.graph.initializer}
    for d in data.layers:
        f = np.asarray(d.weight.frac_array(d.weight_values.shape), dtype=np.float64)
        codes = inits[f"{d.name}.weight_q"]
        np.testing.assert_array_equal(codes.astype(np.float64) * 2.0 ** -f, d.weight_values)
    assert sum(f"{d.name}.weight_q" in inits for d in data.layers) == len(data.layers)
    # and the integer executor agrees with the model
    from mxqn_onnx.integer.executor import compare_with_onnxruntime

    x = _digits_x(digits_test, 64)
    rep = compare_with_onnxruntime(data.model, [{data.model.graph.input[0].name: x}])
    assert rep["within_one_step"]


# --------------------------------------------------------------------------- output objective


def _two_channel_case(rng):
    """Channel 0: wide range, tiny weights; channel 1: narrow range, large weights."""
    n = 4096
    x = np.stack([rng.exponential(4.0, n), rng.exponential(0.25, n)], axis=1)  # [R, 2]
    w = np.array([[0.01, 1.0], [0.02, -1.0], [-0.01, 0.8]])
    return x, w


def test_output_objective_weights_channels_by_what_the_layer_reads():
    rng = np.random.default_rng(0)
    x, w = _two_channel_case(rng)
    hist = TensorHistogram("t")
    hist.update(x.astype(np.float32))
    act = choose_activation(hist, 4, "fixed", 0.0)
    better = refine_activation(act, hist, [([w], [x])], "fixed")
    assert better.objective == "output"
    # the tensor objective keeps channel 0's range; the outputs want channel 1's resolution
    assert better.frac > act.frac
    assert better.output_sqnr_db > better.output_sqnr_tensor_db + 3
    assert better.output_sqnr_db == pytest.approx(consumers_sqnr(better.quantize, [([w], [x])]))
    assert better.sqnr_db < act.sqnr_db  # worse for the tensor itself, as expected


def test_output_objective_keeps_the_choice_when_objectives_agree():
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, (4096, 2))
    hist = TensorHistogram("t")
    hist.update(x.astype(np.float32))
    act = choose_activation(hist, 6, "fixed", 0.0)
    same = refine_activation(act, hist, [([np.eye(2)], [x])], "fixed")
    assert (same.kind, same.frac) == (act.kind, act.frac)
    assert same.output_sqnr_db == same.output_sqnr_tensor_db


def test_output_objective_end_to_end(digits_model, digits_calib):
    r = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=4, rounding="nearest",
                           act_objective="output")
    for a in r.activations.values():
        assert a.objective == "output"
        assert a.output_sqnr_db >= a.output_sqnr_tensor_db - 1e-9


# --------------------------------------------------------------------------- BatchNorm priors


def _conv_bn_relu_conv(rng):
    c = 16
    w1 = rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((8, c, 3, 3)).astype(np.float32) * 0.2
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.uniform(-0.5, 1.5, c).astype(np.float32)
    x = rng.standard_normal((256, 3, 12, 12)).astype(np.float32)
    # BatchNorm statistics that match the data (what training leaves behind)
    probe = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4)], "p",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("c1", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w1, "w1")])
    c1 = session(helper.make_model(probe, opset_imports=[helper.make_opsetid("", 13)])).run(None, {"x": x})[0]
    mean, var = c1.mean(axis=(0, 2, 3)), c1.var(axis=(0, 2, 3))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w1, "w1"), (w2, "w2"), (gamma, "g"), (beta, "b"), (mean, "m"), (var, "v")]]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 10, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), x


def test_data_free_bias_correction_uses_batchnorm_priors():
    rng = np.random.default_rng(0)
    model, x = _conv_bn_relu_conv(rng)
    kw = dict(wbits=3, abits=16, act_quant="fixed", verify=False, rounding="nearest")
    free = mxqn_onnx.quantize(model, "random", **kw)
    assert free.bias_means == "batchnorm"
    conv2 = [d for d in free.layers if d.name == "conv2"][0]
    assert conv2.bias_correction
    none = mxqn_onnx.quantize(model, "random", bias_correction=False, **kw)

    def mean_shift(q):
        ref = session(model).run(None, {"x": x})[0]
        got = session(q.model).run(None, {"x": x})[0]
        return np.abs((got - ref).mean(axis=(0, 2, 3))).mean()

    # the synthetic data knows nothing of the real inputs; the BatchNorm prior does
    assert mean_shift(free) < mean_shift(none) / 2, (mean_shift(free), mean_shift(none))
    # with real data, the default takes the means from the data
    assert mxqn_onnx.quantize(model, x, **kw).bias_means == "data"
    # equalization rescales the BatchNorm outputs: their priors no longer apply
    eq = mxqn_onnx.quantize(model, "random", equalize="pow2", **kw)
    assert eq.equalization["pairs"] == 1 and eq.bias_means.startswith("none")
    assert not any(d.bias_correction for d in eq.layers)


# --------------------------------------------------------------------------- reporting


def test_cli_reports_every_technique_per_layer(tmp_path, digits_model, digits_calib):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    res = run_cli("convert", str(digits_model), str(out), "--calib", str(digits_calib), "--wbits", "4",
                  "--abits", "4", "--act-objective", "output", "--equalize", "pow2", "--report", str(rep))
    assert res.returncode == 0, res.stderr
    assert "low-bit techniques per layer" in res.stdout
    r = json.loads(rep.read_text())
    assert r["config"]["rounding"] == "auto" and r["equalization"]["pairs"] > 0
    for layer in r["layers"]:
        assert layer["weight"]["output_sqnr_nearest_db"] is not None
        assert layer["output_sqnr_db"] is not None and layer["output_sqnr_uncorrected_db"] is not None
        assert r["equalization"]["weight_sqnr_db"][layer["name"]]["after"] is not None
    assert all(a["objective"] == "output" for a in r["activations"])
    # converted with and without equalization; the better measured one was written
    eq = r["equalization"]
    assert r["measured"]["output_sqnr_db"] == pytest.approx(max(eq["measured_with_db"], eq["measured_without_db"]), abs=1e-3)
    assert eq["kept"] == (eq["measured_with_db"] >= eq["measured_without_db"])
    assert ("not kept" in res.stdout) != eq["kept"]
    bad = run_cli("convert", str(digits_model), str(out), "--calib", str(digits_calib), "--rounding", "best")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    # the data-aware steps cannot run without kept samples: refused, not silently skipped
    for opt in (["--rounding", "gptq"], ["--act-objective", "output"]):
        bad = run_cli("convert", str(digits_model), str(tmp_path / "x.onnx"), "--calib", str(digits_calib),
                      "--data-samples", "0", *opt)
        assert bad.returncode == 2 and "data_samples must be at least 1" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


# --------------------------------------------------------------------------- kept samples


def test_tensor_sample_keeps_copies_of_the_first_samples_and_merges():
    from mxqn_onnx.calibration.observers import TensorSample

    buf = np.arange(24, dtype=np.float32).reshape(6, 4)
    s = TensorSample("t", count=8)
    s.update(buf)
    buf[:] = -1  # calibration reuses its output buffers: the sample must not change
    s.update(np.full((6, 4), 7, dtype=np.float32))
    a = s.array()
    assert a.shape == (8, 4)
    np.testing.assert_array_equal(a[:6], np.arange(24).reshape(6, 4))
    np.testing.assert_array_equal(a[6:], 7)
    other = TensorSample("t", count=3)
    other.update(np.zeros((2, 4), np.float32))
    other.merge(s)
    assert other.array().shape == (3, 4) and other.array()[2, 0] == 0


def test_calibration_keeps_samples_within_the_byte_budget(digits_model, digits_calib):
    from mxqn_onnx.calibration.calibrate import collect_histograms
    from mxqn_onnx.calibration.data import input_specs, make_source
    from mxqn_onnx.calibration.observers import TensorSample

    model = load_model(digits_model)
    layers, _ = find_layers(normalise(model))
    names = [l.data.name for l in layers]
    src = make_source(str(digits_calib), input_specs(model), 16)
    full = {t: TensorSample(t, 64) for t in names}
    collect_histograms(model, names, src, samples=full)
    assert all(s.array().shape[0] == 64 for s in full.values())
    per_sample = {t: s.array()[0].nbytes for t, s in full.items()}
    budget = 10 * max(per_sample.values()) * len(names)  # an equal share per tensor
    small = {t: TensorSample(t, 64) for t in names}
    collect_histograms(model, names, src, samples=small, sample_budget=budget)
    for t in names:
        n = small[t].array().shape[0]
        assert n == min(64, budget // len(names) // per_sample[t])
        assert n * per_sample[t] <= budget / len(names)
        np.testing.assert_array_equal(small[t].array(), full[t].array()[:n])  # the same leading samples
    assert min(s.array().shape[0] for s in small.values()) == 10  # the largest tensor keeps 10
