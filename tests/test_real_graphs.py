"""Real graphs convert at W8A8, run in onnxruntime and stay close to FP32.

* The nine "light" models shipped inside the onnx package (opset 9, old IR, weights built
  by ConstantOfShape, initializers listed as graph inputs, batch fixed at 1), calibrated on
  two real photographs and checked on two others plus the input onnx's own backend test
  feeds them, against FP32 onnxruntime and against the reference outputs shipped beside them.
* The small networks of ``scripts/export_test_nets.py`` (both torch exporters, several
  opsets, dynamic batch/height/width), calibrated and checked on scikit-learn digits.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import mxqn_onnx
from graph_helpers import LIGHT, NETS, digits, photos, run_both, sqnr_db, stacked_sqnr

LIGHT_MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                "shufflenet", "squeezenet", "vgg19", "zfnet512"]
#: W8A8 should keep the pre-softmax logits within 5% RMS of FP32 on unseen inputs
LOGITS_MIN_DB = 20.0
#: and the final outputs (softmax probabilities, or DenseNet's pooled scores) within 3%
OUTPUT_MIN_DB = 30.0
NETS_MIN_DB = 25.0


def backend_test_input(vi: onnx.ValueInfoProto) -> np.ndarray:
    """The input onnx's backend test feeds a light model (``generate_dummy_data``, random=False)."""
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


@pytest.fixture(scope="module")
def calib_photos():
    return photos(["astronaut", "coffee"])


@pytest.fixture(scope="module")
def held_out_photos():
    return photos(["chelsea", "rocket"])


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_w8a8(name, calib_photos, held_out_photos):
    path = LIGHT / f"light_{name}.onnx"
    src = onnx.load(str(path))
    inits = {t.name for t in src.graph.initializer}
    data_in = [vi for vi in src.graph.input if vi.name not in inits]
    assert len(data_in) == 1 and src.ir_version < 4  # old IR: initializers are graph inputs too
    x = data_in[0].name

    # calibration in batches of 2 although the model fixes its batch at 1
    result = mxqn_onnx.quantize(path, {x: calib_photos}, batch_size=2, verify=False)
    n_layers = sum(n.op_type in ("Conv", "Gemm") for n in src.graph.node)
    assert len(result.layers) == n_layers and not result.float_layers
    assert result.calibration_samples == 2
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == [o.name for o in src.graph.output]

    softmax = [n for n in src.graph.node if n.op_type == "Softmax"]
    extra = [softmax[-1].input[0]] if softmax else []
    ramp = backend_test_input(data_in[0])
    feeds = [{x: held_out_photos[i:i + 1]} for i in range(len(held_out_photos))] + [{x: ramp}]
    ref_runs, q_runs, _ = run_both(path, result.model, feeds, extra)
    for run in q_runs:
        assert all(np.isfinite(a).all() for a in run)
    assert stacked_sqnr(ref_runs, q_runs, 0) >= OUTPUT_MIN_DB
    if extra:  # softmax of random-ish weights is nearly flat: judge the logits too
        assert stacked_sqnr(ref_runs, q_runs, 1) >= LOGITS_MIN_DB

    # against the reference output shipped with onnx (ReferenceEvaluator on that input)
    shipped = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"light_{name}_output_0.pb")))
    np.testing.assert_allclose(ref_runs[-1][0], shipped, rtol=1e-3, atol=1e-6)  # the feed is right
    assert sqnr_db(shipped, q_runs[-1][0]) >= OUTPUT_MIN_DB


def _nets():
    return sorted(NETS.glob("*.onnx"))


def test_exported_nets_cover_what_users_export():
    """The committed nets really hold the exporters, opsets and layer kinds they claim."""
    manifest = json.loads((NETS / "manifest.json").read_text())
    files = _nets()
    assert sorted(manifest["files"]) == [p.name for p in files]
    exporters, opsets, ops, attrs = set(), set(), set(), set()
    for p in files:
        m = onnx.load(str(p))
        exporters.add(manifest["files"][p.name]["exporter"])
        opsets.add(next(i.version for i in m.opset_import if i.domain in ("", "ai.onnx")))
        inits = {t.name: t for t in m.graph.initializer}
        dims = m.graph.input[0].type.tensor_type.shape.dim
        assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # dynamic N, H, W
        for n in m.graph.node:
            ops.add(n.op_type)
            a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
            if n.op_type == "Conv" and a.get("group", 1) > 1:
                w = inits.get(n.input[1])
                if w is not None:
                    attrs.add("depthwise" if w.dims[1] == 1 else "grouped")
            if n.op_type in ("Conv", "ConvTranspose") and max(a.get("dilations", [1])) > 1:
                attrs.add("dilated")
            if n.op_type == "ConvTranspose" and a.get("group", 1) > 1:
                attrs.add("grouped_transpose")
            if n.op_type == "Gemm" and a.get("transB", 0):
                attrs.add("gemm_transB")
            if n.op_type == "MatMul" and any(i in inits for i in n.input):
                attrs.add("matmul_const_weight")
    assert exporters == {"torchscript", "dynamo"}
    assert {11, 13, 17, 18, 20, 23} <= opsets
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul", "ReduceMean", "Sub", "Pow", "Sqrt", "Div", "HardSwish",
            "Softmax", "Add", "Concat", "GlobalAveragePool", "BatchNormalization"} <= ops
    assert {"depthwise", "grouped", "dilated", "grouped_transpose", "gemm_transB", "matmul_const_weight"} <= attrs


@pytest.fixture(scope="module")
def digit_sets():
    return {"calib": digits(2)[:64], "small": digits(2)[100:107], "large": digits(3)[300:303]}


@pytest.mark.parametrize("path", _nets(), ids=lambda p: p.stem)
def test_exported_net_w8a8(path, digit_sets):
    src = onnx.load(str(path))
    result = mxqn_onnx.quantize(path, digit_sets["calib"], batch_size=16, verify=False)
    onnx.checker.check_model(result.model, full_check=True)
    inits = {t.name for t in src.graph.initializer} | {
        o for n in src.graph.node if n.op_type == "Constant" for o in n.output}
    weighted = [n for n in src.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")
                or (n.op_type == "MatMul" and any(i in inits for i in n.input))]
    assert len(result.layers) == len(weighted)
    # only activation x activation products (attention scores and mixing) stay float
    assert all(s.op == "MatMul" and s.reason == "no constant weight operand" for s in result.float_layers)
    # same inputs and outputs, dynamic dims included
    assert [(i.name, i.type) for i in result.model.graph.input] == [(i.name, i.type) for i in src.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in src.graph.output]

    name = src.graph.input[0].name
    # a batch size and an image size never seen in calibration (dynamic batch, height, width)
    feeds = [{name: digit_sets["small"]}, {name: digit_sets["large"]}]
    ref_runs, q_runs, _ = run_both(path, result.model, feeds)
    assert q_runs[1][0].shape == ref_runs[1][0].shape
    for ref, got in zip(ref_runs, q_runs):
        assert np.isfinite(got[0]).all()
        assert sqnr_db(ref[0], got[0]) >= NETS_MIN_DB
