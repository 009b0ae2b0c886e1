"""The integer-only reference executor against onnxruntime and against exact arithmetic."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import mxqn_onnx
from mxqn_onnx.integer.executor import compare_with_onnxruntime
from mxqn_onnx.integer.kernels import LogTable, conv_int, shift_round
from mxqn_onnx.quant import quantizers as Q

from conftest import ROOT, run_cli

ZOO = ROOT / "cache" / "zoo"


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(-20, 30))
def test_shift_round_is_round_half_even_of_the_exact_quotient(a, s):
    got = int(shift_round(np.array([a], dtype=np.int64), s)[0])
    from fractions import Fraction

    exact = Fraction(a) / Fraction(2) ** s
    assert got == round(exact)  # Python rounds Fractions half to even


@pytest.mark.parametrize("bits,k,E,signed", [(8, 0, 3, True), (8, 2, -5, False), (6, 3, 10, True), (4, 1, 0, False)])
def test_log_table_is_shift_plus_2k_entry_table(bits, k, E, signed):
    t = LogTable(bits, k, E, signed)
    # every level is mant * 2^exp exactly, mant a 24-bit integer
    np.testing.assert_array_equal(np.ldexp(t.mant.astype(np.float64), t.exp), t.levels.astype(np.float64))
    assert np.all((t.mant >= 2**23) & (t.mant < 2**24))
    r = np.mod(t.n, 2**k)
    for j in range(2**k):  # the mantissa depends only on n mod 2^k ...
        assert len(set(t.mant[r == j].tolist())) <= 1
    # ... and the exponent is floor(n / 2^k) minus 23
    np.testing.assert_array_equal(t.exp, np.floor_divide(t.n, 2**k) - 23)
    # the threshold search reproduces the numpy quantizer on float inputs
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * np.float32(2.0 ** (E / 2**k))
    v = t.quantize_float(x)
    np.testing.assert_array_equal(v.to_float(), Q.log_quantize(x, bits, k, E, signed))


def _naive_conv(x, w, attrs):
    """Textbook loops in Python integers: the definition of ONNX Conv."""
    s = attrs.get("strides", [1, 1])
    d = attrs.get("dilations", [1, 1])
    g = attrs.get("group", 1)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if attrs.get("auto_pad") == b"SAME_UPPER":
        pads = []
        for i, (size, k) in enumerate(((h, kh), (wd, kw))):
            out = -(-size // s[i])
            tot = max((out - 1) * s[i] + (k - 1) * d[i] + 1 - size, 0)
            pads.append((tot // 2, tot - tot // 2))
        (pt, pb), (pl, pr) = pads
    else:
        pt, pl, pb, pr = attrs.get("pads", [0, 0, 0, 0])
    oh = (h + pt + pb - (kh - 1) * d[0] - 1) // s[0] + 1
    ow = (wd + pl + pr - (kw - 1) * d[1] - 1) // s[1] + 1
    y = np.zeros((n, o, oh, ow), dtype=object)
    for b in range(n):
        for oc in range(o):
            gi = oc // (o // g)
            for i in range(oh):
                for j in range(ow):
                    acc = 0
                    for ci in range(cg):
                        for u in range(kh):
                            for v in range(kw):
                                r, q = i * s[0] + u * d[0] - pt, j * s[1] + v * d[1] - pl
                                if 0 <= r < h and 0 <= q < wd:
                                    acc += int(x[b, gi * cg + ci, r, q]) * int(w[oc, ci, u, v])
                    y[b, oc, i, j] = acc
    return y


@pytest.mark.parametrize("attrs", [
    {}, {"strides": [2, 2], "pads": [1, 1, 1, 1]}, {"dilations": [2, 1], "pads": [2, 0, 1, 1]},
    {"group": 4}, {"group": 8, "strides": [2, 1], "auto_pad": b"SAME_UPPER"},
])
def test_conv_int_matches_exact_conv(attrs):
    rng = np.random.default_rng(1)
    g = attrs.get("group", 1)
    x = rng.integers(-128, 128, (2, 8, 9, 7)).astype(np.int64)
    w = rng.integers(-128, 128, (8, 8 // g, 3, 3)).astype(np.int64)
    got = conv_int(x, w, attrs)
    ref = _naive_conv(x, w, attrs)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref.astype(np.int64))


def _batches(path, n=96, size=32):
    x = np.load(path)["input"][:n]
    return [{"input": x[i:i + size]} for i in range(0, len(x), size)]


@pytest.mark.parametrize("act", ["auto", "fixed", "log"])
def test_executor_matches_onnxruntime_on_shipped_model(digits_model, digits_calib, digits_test, act):
    r = mxqn_onnx.quantize(digits_model, digits_calib, act_quant=act, verify=False)
    rep = compare_with_onnxruntime(r.model, _batches(digits_test))
    assert len(rep["layers_integer"]) == len(r.layers)  # every quantized layer ran in integers
    for q in rep["quantizers"]:
        assert q["max_code_diff"] <= 1, q
        assert q["mismatches"] <= 1e-3 * q["elements"], q  # flips are rare threshold cases
    (out,) = rep["outputs"]
    assert out["max_diff_steps"] is not None and out["max_diff_steps"] <= 1.0
    assert rep["within_one_step"]
    assert out["free_running_top1_agreement"] >= 0.99


def test_executor_at_low_bits_and_per_channel(digits_model, digits_calib, digits_test):
    r = mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=5, weight_granularity="channel",
                           verify=False)
    rep = compare_with_onnxruntime(r.model, _batches(digits_test, 64))
    assert rep["within_one_step"], rep


ZOO_MODELS = sorted(p.name for p in ZOO.glob("digits_*.onnx")) if ZOO.is_dir() else []  # the 32x32 digits zoo


def test_executor_matches_onnxruntime_on_shipped_vgg16():
    """The zoo's VGG16 ships in models/, so this runs everywhere (the rest of the zoo below)."""
    models = ROOT / "models"
    r = mxqn_onnx.quantize(models / "digits32_vgg16.onnx", models / "digits32_calib.npz", verify=False)
    rep = compare_with_onnxruntime(r.model, _batches(models / "digits32_test.npz", 8, 8))
    assert rep["within_one_step"], json.dumps(rep)[:2000]
    assert len(rep["layers_integer"]) == len(r.layers)


@pytest.mark.skipif(not ZOO_MODELS or not (ZOO / "digits_calib.npz").exists(), reason="no zoo models in cache/zoo")
@pytest.mark.parametrize("name", [n for n in ZOO_MODELS if not n.endswith("_dynamo.onnx")] or ["none"])
def test_executor_matches_onnxruntime_on_zoo(name):
    r = mxqn_onnx.quantize(ZOO / name, ZOO / "digits_calib.npz", verify=False)
    rep = compare_with_onnxruntime(r.model, _batches(ZOO / "digits_test.npz", 8, 8))
    assert rep["within_one_step"], json.dumps(rep)[:2000]
    assert len(rep["layers_integer"]) == len(r.layers)


def test_cli_simulate(tmp_path, digits_model, digits_calib, digits_test):
    out = tmp_path / "q.onnx"
    assert run_cli("convert", digits_model, out, "--calib", digits_calib, "--quiet").returncode == 0
    p = run_cli("simulate", out, "--data", digits_test, "--count", "32", "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["samples"] == 32 and rep["within_one_step"]
    p = run_cli("simulate", digits_model, "--data", digits_test)
    assert p.returncode == 2 and "not an mxqn model" in p.stderr
    q = tmp_path / "qdq.onnx"
    assert run_cli("convert", digits_model, q, "--calib", digits_calib, "--format", "qdq", "--quiet").returncode == 0
    p = run_cli("simulate", q, "--data", digits_test)
    assert p.returncode == 2 and "--format mxqn" in p.stderr
