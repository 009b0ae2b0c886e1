"""Mixed precision on real models: sensitivities, allocation, verification, accuracy search, plots."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mxqn_onnx
from mxqn_onnx.calibration.data import input_specs, make_source
from mxqn_onnx.config import QuantConfig
from mxqn_onnx.errors import MxqnError
from mxqn_onnx.graph.loading import METADATA_KEY
from mxqn_onnx.mixed.allocate import db_to_noise
from mxqn_onnx.quant.choose import choose_all
from mxqn_onnx.report.measure import compare

from conftest import ROOT, run_cli


def _acc(fp32_path, qmodel, data_path):
    fp32 = onnx.load(str(fp32_path))
    src = make_source(str(data_path), input_specs(fp32), 128)
    return compare(fp32, qmodel, src.batches(), src.labels)


def _avg_bits(result):
    units = {(u["kind"], u["name"]): u["size"] for u in result.allocation["units"]}
    params = sum(d.params for d in result.layers)
    avg_w = sum(d.params * d.weight.bits for d in result.layers) / params
    elems = sum(units[("act", t)] for t in result.activations)
    avg_a = sum(units[("act", t)] * a.bits for t, a in result.activations.items()) / elems
    return avg_w, avg_a


@pytest.fixture(scope="module")
def budget4(digits_model, digits_calib):
    return mxqn_onnx.quantize(digits_model, digits_calib, avg_wbits=4, avg_abits=4)


@pytest.fixture(scope="module")
def uniform4(digits_model, digits_calib):
    return mxqn_onnx.quantize(digits_model, digits_calib, wbits=4, abits=4)


def test_budget_respected_and_widths_mixed(budget4):
    avg_w, avg_a = _avg_bits(budget4)
    assert avg_w <= 4.0 + 1e-9 and avg_a <= 4.0 + 1e-9
    wbits = {d.weight.bits for d in budget4.layers}
    assert len(wbits) > 1 and wbits <= set(range(2, 9))
    # the decisions carry the allocated widths, and the stored quantizers use them
    units = {(u["kind"], u["name"]): u["bits"] for u in budget4.allocation["units"]}
    for d in budget4.layers:
        assert units[("weight", d.name)] == d.weight.bits
        assert units[("act", d.act.tensor)] == d.act.bits
    onnx.checker.check_model(budget4.model, full_check=True)


def test_allocated_beats_uniform_at_same_size(budget4, uniform4):
    assert budget4.packed_weight_bytes <= uniform4.packed_weight_bytes
    assert budget4.measured_sqnr_db > uniform4.measured_sqnr_db


def test_predicted_vs_measured_on_shipped_model(budget4):
    """The sensitivity-weighted prediction is close to the measurement and beats the plain sum."""
    rnd = budget4.allocation["rounds"][0]
    measured = budget4.measured_sqnr_db
    assert rnd["measured_db"] == pytest.approx(measured)
    weighted_err = abs(rnd["predicted_db"] - measured)
    plain_err = abs(budget4.predicted_sqnr_db - measured)
    assert weighted_err < 5.0
    assert weighted_err < plain_err
    # the report carries both numbers, and the model's metadata the whole allocation record
    rep = budget4.report()
    meta = json.loads(next(p.value for p in budget4.model.metadata_props if p.key == METADATA_KEY))
    assert meta["allocation"]["rounds"][0]["measured_db"] == pytest.approx(measured, abs=1e-3)
    assert meta["config"]["avg_wbits"] == 4 and meta["format_version"] == rep["format_version"]
    assert "histograms" in rep and "histograms" not in meta


@pytest.mark.parametrize("target", [28.0, 33.0])
def test_target_reached_or_reported(digits_model, digits_calib, target):
    r = mxqn_onnx.quantize(digits_model, digits_calib, target_sqnr_db=target, refine_steps=3)
    rec = r.allocation
    assert 1 <= len(rec["rounds"]) <= 4
    assert all(x["measured_db"] is not None for x in rec["rounds"])
    chosen = rec["rounds"][rec["chosen_round"]]
    assert chosen["measured_db"] == pytest.approx(r.measured_sqnr_db)
    # the returned model is the one that was measured (the conversion measured it against the
    # FP32 outputs of its calibration run, i.e. of the BatchNorm-folded graph: equal to the
    # source model's up to float rounding, 1e-5 dB here)
    again = compare(onnx.load(str(digits_model)), r.model,
                    make_source(str(digits_calib), input_specs(r.model), 16).batches())
    assert again.output_sqnr_db == pytest.approx(r.measured_sqnr_db, abs=1e-3)
    if r.measured_sqnr_db >= target:
        assert "reached" in rec["result"] and "NOT" not in rec["result"]
        # the cheapest (weight bits + activation bits) of the rounds that reached it
        params = sum(u["size"] for u in rec["units"] if u["kind"] == "weight")
        elems = sum(u["size"] for u in rec["units"] if u["kind"] == "act")

        def cost(x):
            return x["avg_wbits"] * params + x["avg_abits"] * elems

        reached = [x for x in rec["rounds"] if x["measured_db"] >= target]
        assert cost(chosen) <= min(cost(x) for x in reached) + 1e-6 * cost(chosen)
    else:
        assert "NOT reached" in rec["result"]


def test_unreachable_target_is_reported(digits_model, digits_calib):
    r = mxqn_onnx.quantize(digits_model, digits_calib, target_sqnr_db=45.0, bits_set=(2, 3, 4))
    rec = r.allocation
    assert r.measured_sqnr_db < 45.0
    assert "NOT reached" in rec["result"]
    assert any("reach" in n for n in rec["notes"])
    assert {d.weight.bits for d in r.layers} <= {2, 3, 4}


def test_accuracy_search(digits_model, digits_calib, digits_test):
    r = mxqn_onnx.quantize(digits_model, digits_calib, max_accuracy_drop=1.0, validation=digits_test)
    rec = r.allocation
    evals = rec["evaluations"]
    assert len(evals) >= 2
    chosen = next(e for e in evals if e["candidate"] == rec["chosen_candidate"])
    assert chosen["passes"] and chosen["drop_points"] <= 1.0
    # every cheaper candidate that was tried failed (so the search really looked lower)
    for e in evals:
        if e["candidate"] < chosen["candidate"]:
            assert not e["passes"]
    # confirmed independently on the validation data
    c = _acc(digits_model, r.model, digits_test)
    assert 100 * (c.top1_ref - c.top1_quant) <= 1.0
    assert c.top1_quant == pytest.approx(chosen["top1_quant"])
    assert chosen["avg_wbits"] < 8.0


def test_accuracy_search_needs_labels(digits_model, digits_calib):
    with pytest.raises(MxqnError, match="labelled validation data"):
        mxqn_onnx.quantize(digits_model, digits_calib, max_accuracy_drop=1.0)


def test_choose_all_per_layer_bits_generalises_uniform(digits_model, digits_calib):
    from mxqn_onnx.calibration.calibrate import collect_histograms
    from mxqn_onnx.graph.layers import find_layers
    from mxqn_onnx.graph.loading import export_fp32 as _normalised_fp32, load_model, normalise

    m = load_model(digits_model)
    g = normalise(m)
    layers, _ = find_layers(g)
    src = make_source(str(digits_calib), input_specs(m), 64)
    hists, _, _ = collect_histograms(_normalised_fp32(g, m), [l.data.name for l in layers], src)
    cfg = QuantConfig(wbits=6, abits=5, keep_first=True, keep_bits=8).validate()
    d0, a0 = choose_all(layers, hists, cfg)
    bits = [(8, 8)] + [(6, 5)] * (len(layers) - 1)
    d1, a1 = choose_all(layers, hists, cfg, bits)
    assert [d.to_dict() for d in d0] == [d.to_dict() for d in d1]
    mixed = [(2 + i % 7, 8 - i % 5) for i in range(len(layers))]
    d2, a2 = choose_all(layers, hists, cfg, mixed)
    assert [(d.weight.bits, d.act.bits) for d in d2] == mixed


def _orthogonal_matmul_model(n=32, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = numpy_helper.from_array(q.astype(np.float32), "W")
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_probe_sensitivity_of_an_orthogonal_layer_is_one():
    """y = x Q with Q orthogonal: noise on x or on Q reaches y at the same relative power."""
    from mxqn_onnx.calibration.calibrate import collect_histograms
    from mxqn_onnx.graph.layers import find_layers
    from mxqn_onnx.graph.loading import export_fp32 as _normalised_fp32, normalise
    from mxqn_onnx.mixed.sensitivity import probe_sensitivities

    model = _orthogonal_matmul_model()
    g = normalise(model)
    layers, _ = find_layers(g)
    x = np.random.default_rng(1).standard_normal((512, 32)).astype(np.float32)
    src = make_source({"x": x}, input_specs(model), 128)
    fp32 = _normalised_fp32(g, model)
    hists, _, _ = collect_histograms(fp32, ["x"], src)
    sens = probe_sensitivities(fp32, layers, hists, list(src.batches()), probe_db=30.0)
    assert set(sens) == {("weight", "mm"), ("act", "x")}
    for v in sens.values():
        assert v == pytest.approx(1.0, rel=0.1)
    # and the probe is deterministic
    assert probe_sensitivities(fp32, layers, hists, list(src.batches()), probe_db=30.0) == sens
    # the real-quantizer probe: output noise of one quantized unit over its own noise; the
    # orthogonal layer passes it on unchanged, at every width
    from mxqn_onnx.mixed.sensitivity import make_probe

    probe = make_probe(fp32, layers, hists, list(src.batches()), QuantConfig().validate(), 17)
    table = probe({("weight", "mm"): [3, 6], ("act", "x"): [3, 6]})
    for key in (("weight", "mm"), ("act", "x")):
        for b in (3, 6):
            assert table[key][b] == pytest.approx(1.0, rel=0.1)


def test_histogram_summary_keeps_counts(digits_model, digits_calib):
    from mxqn_onnx.calibration.observers import TensorHistogram
    from mxqn_onnx.report.plots import histogram_summary

    x = np.concatenate([np.zeros(100), np.random.default_rng(0).standard_normal(5000)]).astype(np.float32)
    h = TensorHistogram("t")
    h.update(x)
    s = histogram_summary(h)
    assert s["zeros"] == 100 and sum(s["count"]) == 5000
    assert s["lo"][0] == pytest.approx(float(x.min()), rel=1e-4) and s["hi"][-1] == pytest.approx(float(x.max()), rel=1e-4)
    assert len(s["count"]) < 200  # compact


def test_plots_written(budget4, tmp_path):
    pytest.importorskip("matplotlib")
    from mxqn_onnx.report.plots import write_plots

    files = write_plots(budget4.report(), tmp_path / "p")
    names = {f.name for f in files}
    assert {"sqnr_layers.png", "bits.png", "output_sqnr.png"} <= names
    assert len([f for f in files if f.parent.name == "hist"]) == len(budget4.activations)
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 2000


def test_cli_convert_plot_and_report_model(tmp_path, digits_model, digits_calib):
    pytest.importorskip("matplotlib")
    out, rep, pdir = tmp_path / "q.onnx", tmp_path / "r.json", tmp_path / "plots"
    p = run_cli("convert", digits_model, out, "--calib", digits_calib, "--target-sqnr", "26",
                "--bits-set", "3-8", "--refine", "1", "--report", rep, "--plot", pdir)
    assert p.returncode == 0, p.stderr
    assert "predicted" in p.stdout and "round 0" in p.stdout and "result: target 26.0 dB" in p.stdout
    report = json.loads(rep.read_text())
    assert report["allocation"]["bits_set"] == [3, 4, 5, 6, 7, 8]
    assert all(l["weight"]["bits"] >= 3 for l in report["layers"])
    assert (pdir / "output_sqnr.png").is_file() and len(list((pdir / "hist").glob("*.png"))) == 7
    p = run_cli("report", out, "--plot", tmp_path / "p2")
    assert p.returncode == 0, p.stderr
    assert "no calibration histograms" in p.stdout and "round 0" in p.stdout
    assert (tmp_path / "p2" / "sqnr_layers.png").is_file()
    p = run_cli("report", rep, "--plot", tmp_path / "p3", "--quiet")
    assert p.returncode == 0 and "no calibration histograms" not in p.stdout


def test_cli_mixed_errors_are_one_line(tmp_path, digits_model, digits_calib):
    cases = [
        ("--max-accuracy-drop", "1"),
        ("--bits-set", "1-4"),
        ("--bits-set", "x"),
        ("--avg-wbits", "1.5"),
        ("--target-sqnr", "30", "--max-accuracy-drop", "1", "--val", "models/digits_test.npz"),
        ("--max-size", "0.000001"),
    ]
    for extra in cases:
        p = run_cli("convert", digits_model, tmp_path / "o.onnx", "--calib", digits_calib, "--quiet", *extra)
        assert p.returncode == 2, (extra, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "o.onnx").exists()


def test_missing_matplotlib_is_one_clear_error(monkeypatch):
    from mxqn_onnx.report import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MxqnError, match=r"pip install 'mxqn-onnx\[plot\]'"):
        plots.require_matplotlib()


def test_core_imports_neither_torch_nor_matplotlib():
    code = ("import sys, mxqn_onnx, mxqn_onnx.cli, mxqn_onnx.mixed.search, mxqn_onnx.report.plots, "
            "mxqn_onnx.mixed.sensitivity;"
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


def test_config_validation():
    with pytest.raises(MxqnError, match="bits_set"):
        QuantConfig(bits_set=(1, 4)).validate()
    with pytest.raises(MxqnError, match="avg_abits"):
        QuantConfig(avg_abits=20).validate()
    with pytest.raises(MxqnError, match="sensitivity"):
        QuantConfig(sensitivity="guess").validate()
    with pytest.raises(MxqnError, match="refine_steps"):
        QuantConfig(refine_steps=-1).validate()
    c = QuantConfig(bits_set=[8, 4, 4, 6]).validate()
    assert c.bits_set == (4, 6, 8) and c.allocation_mode is None
    assert QuantConfig(max_size_mb=0.1).validate().allocation_mode == "budget"
    assert db_to_noise(10.0) == pytest.approx(0.1)
