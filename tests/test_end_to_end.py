"""The shipped digits model through the whole pipeline, API and CLI."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import mxqn_onnx
from mxqn_onnx.calibration.data import input_specs, make_source
from mxqn_onnx.graph.functions import DOMAIN
from mxqn_onnx.graph.loading import METADATA_KEY
from mxqn_onnx.report.measure import compare

from conftest import run_cli


def _accuracy(fp32_path, qmodel, test_path):
    fp32 = onnx.load(str(fp32_path))
    src = make_source(str(test_path), input_specs(fp32), 128)
    return compare(fp32, qmodel, src.batches(), src.labels)


@pytest.fixture(scope="module")
def w8(digits_model, digits_calib):
    return mxqn_onnx.quantize(digits_model, digits_calib, wbits=8, abits=8)


def test_w8a8_accuracy_and_sqnr(w8, digits_model, digits_test):
    onnx.checker.check_model(w8.model, full_check=True)
    c = _accuracy(digits_model, w8.model, digits_test)
    assert c.top1_quant >= c.top1_ref - 0.01
    assert w8.measured_sqnr_db > 25.0
    assert c.output_sqnr_db > 25.0


def test_output_format(w8, digits_model):
    src = onnx.load(str(digits_model))
    m = w8.model
    assert [(i.name, i.type) for i in m.graph.input] == [(i.name, i.type) for i in src.graph.input]
    assert [o.name for o in m.graph.output] == [o.name for o in src.graph.output]
    ops = {(n.domain, n.op_type) for n in m.graph.node}
    assert {(DOMAIN, "FixedQuant"), (DOMAIN, "LogQuant")} & ops
    assert {f.name for f in m.functions} == {"FixedQuant", "LogQuant"}
    assert "BatchNormalization" not in {op for _, op in ops}
    # weights are int8, biases int32; no float32 weight of a quantized layer remains
    dtypes = {t.name: t.data_type for t in m.graph.initializer}
    for d in w8.layers:
        assert dtypes[f"{d.name}.weight_q"] == onnx.TensorProto.INT8
        assert dtypes[f"{d.name}.bias_q"] == onnx.TensorProto.INT32
    meta = json.loads(next(p.value for p in m.metadata_props if p.key == METADATA_KEY))
    assert meta["format_version"] == 1 and len(meta["layers"]) == 7
    assert w8.size_after < w8.size_before / 2


def test_stored_weights_decode_to_the_chosen_fixed_point(w8, digits_model):
    from mxqn_onnx.graph.layers import find_layers
    from mxqn_onnx.graph.loading import load_model, normalise
    from mxqn_onnx.quant import quantizers as Q

    graph = normalise(load_model(digits_model))
    layers, _ = find_layers(graph)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in w8.model.graph.initializer}
    for layer, d in zip(layers, w8.layers):
        codes = inits[f"{d.name}.weight_q"].astype(np.float64)
        scale = inits[f"{d.name}.weight_scale"]
        f = d.weight.frac_array(layer.weight.shape)
        np.testing.assert_array_equal(scale, Q.pow2(-f))
        # round-to-nearest, or the grid values data-aware rounding chose (this small model is
        # rounded with data even at 8 bits)
        chosen = Q.fxp_quantize(layer.weight, 8, f, True) if d.weight.rounding == "nearest" else d.weight_values
        np.testing.assert_array_equal((codes * scale).astype(np.float32), chosen)
        assert np.abs(codes).max() <= 128
    assert {d.weight.rounding for d in w8.layers} == {"gptq"}


def test_deterministic_bytes(w8, digits_model, digits_calib):
    again = mxqn_onnx.quantize(digits_model, digits_calib, wbits=8, abits=8)
    assert again.model.SerializeToString() == w8.model.SerializeToString()


def test_w4a4_runs_and_report_consistent(digits_model, digits_calib, digits_test):
    # every layer at 4 bits (the held-back check's first-and-last-layer-at-8-bits candidate off;
    # tests/test_holdout.py covers it)
    r = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=4, keep_ends="off")
    onnx.checker.check_model(r.model, full_check=True)
    rep = r.report()
    assert all(l["weight"]["bits"] == 4 for l in rep["layers"])
    for a in rep["activations"]:
        assert a["bits"] == 4
        best = max(v for v in (a["sqnr_fixed_db"], a["sqnr_log_db"]) if v is not None)
        assert a["sqnr_db"] == pytest.approx(best)
    # weights count with the layer-output SQNR measured on calibration inputs (rounding is data-aware at 4 bits)
    assert all(l["weight"]["output_sqnr_db"] is not None for l in rep["layers"])
    terms = [l["weight"]["output_sqnr_db"] for l in rep["layers"]] + [a["sqnr_db"] for a in rep["activations"]]
    assert rep["predicted_output_sqnr_db"] == pytest.approx(mxqn_onnx.quant.quantizers.combine_sqnr_db(terms), abs=1e-3)
    assert rep["predicted_output_sqnr_db"] < min(terms)
    # fewer bits, more noise
    r8 = mxqn_onnx.quantize(digits_model, digits_calib, wbits=8, abits=8, verify=False)
    assert r.predicted_sqnr_db < r8.predicted_sqnr_db
    c = _accuracy(digits_model, r.model, digits_test)
    assert c.top1_quant > 0.9
    assert abs(c.output_sqnr_db - r.measured_sqnr_db) < 3.0  # calibration vs test data


@pytest.mark.parametrize("mode", ["fixed", "log"])
def test_forced_activation_quantizer(digits_model, digits_calib, mode):
    r = mxqn_onnx.quantize(digits_model, digits_calib, act_quant=mode, verify=False)
    assert {a.kind for a in r.activations.values()} == {mode}


def test_granularity_modes(digits_model, digits_calib):
    t = mxqn_onnx.quantize(digits_model, digits_calib, weight_granularity="tensor", verify=False)
    c = mxqn_onnx.quantize(digits_model, digits_calib, weight_granularity="channel", verify=False)
    assert {d.weight.granularity for d in t.layers} == {"tensor"}
    assert {d.weight.granularity for d in c.layers} == {"channel"}
    for dt, dc in zip(t.layers, c.layers):
        assert dc.weight.sqnr_db >= dt.weight.sqnr_db - 1e-9


def test_exclude_and_keep(digits_model, digits_calib):
    r = mxqn_onnx.quantize(digits_model, digits_calib, exclude=["*classifier.3*"], keep_first=True,
                           keep_float=True, verify=False)
    reasons = {s.name: s.reason for s in r.float_layers}
    assert reasons["/classifier/classifier.3/Gemm"] == "excluded"
    assert "kept in float" in reasons["/features/features.0/features.0.0/Conv"]
    assert len(r.layers) == 5
    r = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=4, keep_first=True, keep_last=True,
                           verify=False)
    assert r.layers[0].weight.bits == 8 and r.layers[-1].weight.bits == 8 and r.layers[1].weight.bits == 4


def test_dynamo_export_converts(digits_calib):
    from conftest import MODELS

    r = mxqn_onnx.quantize(MODELS / "digits_cnn_dynamo.onnx", digits_calib)
    onnx.checker.check_model(r.model, full_check=True)
    assert r.measured_sqnr_db > 25


def test_cli_convert_inspect_evaluate(tmp_path, digits_model, digits_calib, digits_test):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    p = run_cli("convert", digits_model, out, "--calib", digits_calib, "--report", rep, "--quiet")
    assert p.returncode == 0, p.stderr
    report = json.loads(rep.read_text())
    assert report["measured"]["output_sqnr_db"] > 25
    # the atomic write must not leave the temporary file's private 0600 mode behind
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert report["size_bytes"]["after"] == out.stat().st_size
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(digits_calib)["input"][:3]
    assert s.run(None, {"input": x})[0].shape == (3, 10)
    p = run_cli("inspect", out)
    assert p.returncode == 0 and "LogQuant" not in p.stderr and "stored decisions" in p.stdout
    p = run_cli("inspect", digits_model)
    assert p.returncode == 0 and "7 layers" in p.stdout
    p = run_cli("evaluate", digits_model, out, "--data", digits_test, "--json")
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)
    assert ev["top1_quant"] >= ev["top1_fp32"] - 0.01 and ev["output_sqnr_db"] > 25


def test_cli_bad_input_one_line(tmp_path, digits_model, digits_calib):
    cases = [
        ("convert", tmp_path / "missing.onnx", tmp_path / "o.onnx", "--calib", digits_calib),
        ("convert", digits_model, tmp_path / "o.onnx"),
        ("convert", digits_model, tmp_path / "o.onnx", "--calib", digits_calib, "--wbits", "1"),
        ("convert", digits_model, digits_model, "--calib", digits_calib),
        ("convert", digits_model, tmp_path / "nodir" / "o.onnx", "--calib", digits_calib),
        ("convert", digits_model, tmp_path / "o.onnx", "--calib", tmp_path / "nothing.npz"),
    ]
    before = digits_model.read_bytes()
    for args in cases:
        p = run_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "o.onnx").exists()
    assert digits_model.read_bytes() == before


def test_weights_never_clip_unless_asked(digits_model, digits_calib):
    from mxqn_onnx.graph.layers import find_layers
    from mxqn_onnx.graph.loading import load_model, normalise
    from mxqn_onnx.quant import quantizers as Q
    from mxqn_onnx.quant.choose import _channels_first

    layers, _ = find_layers(normalise(load_model(digits_model)))
    plain = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=8, verify=False)
    clip = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=8, verify=False, weight_clip=True)
    went_past = 0
    for layer, d, c in zip(layers, plain.layers, clip.layers):
        w = layer.weight
        if d.weight.granularity == "channel":
            maxes = np.abs(_channels_first(w, layer.channel_axis)).max(axis=1)
            assert d.weight.frac == [Q.no_overflow_frac(float(m), 4, True) for m in maxes]
        else:
            assert d.weight.frac == Q.no_overflow_frac(float(np.abs(w).max()), 4, True)
        # clipping search: never below the no-overflow length, and better weight SQNR
        assert c.weight.sqnr_db >= d.weight.sqnr_db - 1e-9
        went_past += np.sum(np.asarray(c.weight.frac) > np.asarray(d.weight.frac)) if \
            c.weight.granularity == d.weight.granularity else 1
    assert went_past > 0


@pytest.mark.parametrize("bits,min_db,max_drop", [(8, 35.0, 0.005), (4, 15.0, 0.02)])
def test_shipped_vgg16_from_the_zoo(bits, min_db, max_drop):
    """The paper's VGG16 (zoo copy in models/): W8A8 keeps top-1, W4A4 stays usable."""
    from conftest import MODELS

    r = mxqn_onnx.quantize(MODELS / "digits32_vgg16.onnx", MODELS / "digits32_calib.npz",
                           wbits=bits, abits=bits, verify=False)
    c = _accuracy(MODELS / "digits32_vgg16.onnx", r.model, MODELS / "digits32_test.npz")
    assert c.top1_quant >= c.top1_ref - max_drop
    assert c.output_sqnr_db > min_db
