"""Cross-layer equalization balances ranges between layers and keeps the FP32 function."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mxqn_onnx.graph.loading import load_model, normalise
from mxqn_onnx.lowbit.align import equalize_channel_ranges

IR = 8


def _conv(rng, c_out: int, c_in: int, k: int, groups: int = 1) -> np.ndarray:
    return (rng.standard_normal((c_out, c_in // groups, k, k)) * 0.3).astype(np.float32)


def _model(nodes, inits: Dict[str, np.ndarray], c_in: int, outputs: Sequence[str] = ("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "cle",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c_in, 8, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", None, 8, 8]) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = IR
    onnx.checker.check_model(model, full_check=True)
    return model


def _chain(rng, channels: List[int], groups: List[int], kernels: List[int], mid: str = "Relu",
           **mid_attrs) -> onnx.ModelProto:
    """input -> Conv -> mid -> Conv -> mid -> ... -> Conv -> y, with biases."""
    nodes, inits, x = [], {}, "input"
    for i in range(len(channels) - 1):
        k = kernels[i]
        inits[f"w{i}"] = _conv(rng, channels[i + 1], channels[i], k, groups[i])
        inits[f"b{i}"] = (rng.standard_normal(channels[i + 1]) * 0.1).astype(np.float32)
        y = "y" if i == len(channels) - 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], name=f"conv{i}",
                                      pads=[k // 2] * 4, group=groups[i]))
        x = y
        if y != "y":
            nodes.append(helper.make_node(mid, [y], [f"a{i}"], name=f"{mid.lower()}{i}", **mid_attrs))
            x = f"a{i}"
    return _model(nodes, inits, channels[0])


def _in_channel(w: np.ndarray, groups: int) -> np.ndarray:
    """Input channel read by each [out, in/g] entry of a grouped conv weight."""
    out_ch, per = w.shape[:2]
    return (np.arange(out_ch) // (out_ch // groups))[:, None] * per + np.arange(per)[None, :]


def _ranges(w1: np.ndarray, w2: np.ndarray, groups2: int):
    """r1_c = max |w1[c]|, r2_c = max |w2 entries that read channel c|."""
    r1 = np.abs(w1).reshape(len(w1), -1).max(axis=1).astype(np.float64)
    r2 = np.zeros_like(r1)
    np.maximum.at(r2, _in_channel(w2, groups2).ravel(), np.abs(w2).reshape(*w2.shape[:2], -1).max(axis=2).ravel())
    return r1, r2


def _plant(model: onnx.ModelProto, i: int, k: np.ndarray, groups2: int) -> None:
    """Conv i's output channel c times 2**k_c, conv i+1's input channel c times 2**-k_c."""
    inits = {t.name: t for t in model.graph.initializer}
    w1, b1, w2 = (numpy_helper.to_array(inits[n]) for n in (f"w{i}", f"b{i}", f"w{i + 1}"))
    s = 2.0 ** k
    w1 = w1 * s[:, None, None, None].astype(np.float32)
    b1 = b1 * s.astype(np.float32)
    w2 = w2 / s[_in_channel(w2, groups2)][..., None, None].astype(np.float32)
    for name, v in ((f"w{i}", w1), (f"b{i}", b1), (f"w{i + 1}", w2)):
        inits[name].CopyFrom(numpy_helper.from_array(v.astype(np.float32), name))


def _weights(graph: gs.Graph) -> Dict[str, np.ndarray]:
    """Conv name -> its current weight."""
    return {n.name: np.asarray(n.inputs[1].values) for n in graph.nodes if n.op == "Conv"}


def _run(graph: gs.Graph, x: np.ndarray, ir: int = IR) -> np.ndarray:
    m = gs.export_onnx(graph)
    m.ir_version = ir
    names = [t.name for t in m.graph.initializer] + [o for n in m.graph.node for o in n.output]
    assert len(names) == len(set(names)), "duplicate tensor names"
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _inputs(c: int, n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, c, 8, 8)).astype(np.float32)


K_PLANT = np.array([-6, -4, -3, -1, 0, 2, 4, 6], dtype=np.float64)


def test_planted_scales_are_undone_exactly():
    model = _chain(np.random.default_rng(0), [3, 8, 4], [1, 1], [3, 3])
    _plant(model, 0, K_PLANT, 1)
    plain, eq = normalise(model), normalise(model)
    r1, r2 = _ranges(*_weights(plain).values(), 1)
    assert np.max(np.abs(np.log2(r1 / r2))) > 8  # up to 2**12 from the planting

    assert equalize_channel_ranges(eq) == (1, int(np.sum(np.abs(np.round(np.log2(r1 / r2) / 2)) > 0)))
    x = _inputs(3)
    np.testing.assert_array_equal(_run(eq, x), _run(plain, x))
    e1, e2 = _ranges(*_weights(eq).values(), 1)
    # s_c = 2**round(log2(r1/r2) / 2) leaves |log2(r1/r2)| <= 1
    assert np.all(np.abs(np.log2(e1 / e2)) <= 1)
    # the product is invariant, so each range sits near the geometric mean of the pair
    np.testing.assert_allclose(e1 * e2, r1 * r2, rtol=1e-6)
    assert (r2.max() / r2.min()) / (e2.max() / e2.min()) > 2 ** 6


def test_float_mode_balances_ranges():
    model = _chain(np.random.default_rng(2), [3, 8, 4], [1, 1], [3, 3])
    _plant(model, 0, K_PLANT + 0.3, 1)  # not a power of two: only float scales undo it
    plain, eq = normalise(model), normalise(model)
    pairs, channels = equalize_channel_ranges(eq, power_of_two=False)
    assert pairs == 1 and channels == 8
    e1, e2 = _ranges(*_weights(eq).values(), 1)
    np.testing.assert_allclose(e1, e2, rtol=1e-5)
    x = _inputs(3)
    ref = _run(plain, x)
    np.testing.assert_allclose(_run(eq, x), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("channels,groups,kernels", [
    ([4, 4, 8], [4, 1], [3, 1]),   # depthwise -> pointwise (MobileNet)
    ([4, 8, 8], [1, 8], [1, 3]),   # pointwise -> depthwise
    ([4, 8, 6], [2, 2], [3, 3]),   # grouped -> grouped
], ids=["dw_first", "dw_second", "grouped"])
def test_grouped_and_depthwise_pairs(channels, groups, kernels):
    model = _chain(np.random.default_rng(3), channels, groups, kernels)
    k = np.resize(K_PLANT, channels[1])
    _plant(model, 0, k, groups[1])
    plain, eq = normalise(model), normalise(model)
    pairs, n = equalize_channel_ranges(eq)
    assert pairs == 1 and n > 0
    x = _inputs(channels[0])
    np.testing.assert_array_equal(_run(eq, x), _run(plain, x))
    e1, e2 = _ranges(*_weights(eq).values(), groups[1])
    assert np.all(np.abs(np.log2(e1 / e2)) <= 1)


@pytest.mark.parametrize("mid,attrs", [
    ("LeakyRelu", {"alpha": 0.1}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1] * 4, "count_include_pad": 1}),
    ("MaxPool", {"kernel_shape": [3, 3], "pads": [1] * 4}),
])
def test_scale_transparent_ops(mid, attrs):
    model = _chain(np.random.default_rng(7), [3, 8, 4], [1, 1], [3, 3], mid, **attrs)
    _plant(model, 0, K_PLANT, 1)
    plain, eq = normalise(model), normalise(model)
    assert equalize_channel_ranges(eq)[0] == 1
    x = _inputs(3)
    np.testing.assert_array_equal(_run(eq, x), _run(plain, x))


def _skip_models():
    rng = np.random.default_rng(4)
    w1, b1, w2, w3 = _conv(rng, 8, 3, 3), np.zeros(8, np.float32), _conv(rng, 4, 8, 3), _conv(rng, 4, 8, 3)
    w1 *= (2.0 ** K_PLANT)[:, None, None, None].astype(np.float32)  # much to equalize, if allowed
    conv1 = helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4)
    conv2 = helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2", pads=[1] * 4)
    base = {"w1": w1, "b1": b1, "w2": w2}
    two_readers = _model(
        [conv1, helper.make_node("Relu", ["c1"], ["a1"]), conv2,
         helper.make_node("Conv", ["a1", "w3"], ["z"], name="conv3", pads=[1] * 4),
         helper.make_node("Add", ["y", "z"], ["s"])],
        {**base, "w3": w3}, 3, ("s",))
    through_add = _model([conv1, helper.make_node("Add", ["c1", "shift"], ["a1"]), conv2],
                         {**base, "shift": np.full((1, 8, 1, 1), 0.5, np.float32)}, 3)
    through_sigmoid = _model([conv1, helper.make_node("Sigmoid", ["c1"], ["a1"]), conv2], base, 3)
    through_prelu = _model([conv1, helper.make_node("PRelu", ["c1", "slope"], ["a1"]), conv2],
                           {**base, "slope": np.full((8, 1, 1), 0.1, np.float32)}, 3)
    through_relu = _model([conv1, helper.make_node("Relu", ["c1"], ["a1"]), conv2], base, 3)
    return {"two_readers": two_readers, "add": through_add, "sigmoid": through_sigmoid,
            "prelu": through_prelu, "relu": through_relu}


@pytest.mark.parametrize("case", ["two_readers", "add", "sigmoid", "prelu"])
def test_unsafe_pairs_are_skipped(case):
    graph = normalise(_skip_models()[case])
    before = {t.name: np.array(t.values) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    assert equalize_channel_ranges(graph) == (0, 0)
    after = {t.name: np.asarray(t.values) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    assert before.keys() == after.keys()
    for name, v in before.items():
        np.testing.assert_array_equal(after[name], v)


def test_non_constant_bias_is_skipped():
    graph = normalise(_skip_models()["relu"])
    conv1 = next(n for n in graph.nodes if n.name == "conv1")
    assert equalize_channel_ranges(graph.copy())[0] == 1  # with its constant bias it would be equalized
    conv1.inputs[2] = gs.Variable("runtime_bias", np.float32, [8])  # as if computed at run time
    graph.inputs.append(conv1.inputs[2])
    w = np.array(conv1.inputs[1].values)
    assert equalize_channel_ranges(graph) == (0, 0)
    np.testing.assert_array_equal(conv1.inputs[1].values, w)


def test_chain_converges_and_middle_layer_keeps_one_constant():
    rng = np.random.default_rng(5)
    model = _chain(rng, [3, 8, 8, 4], [1, 1, 1], [3, 3, 3])
    _plant(model, 0, K_PLANT, 1)
    _plant(model, 1, K_PLANT[::-1], 1)
    plain, eq = normalise(model), normalise(model)
    assert equalize_channel_ranges(eq)[0] == 2
    x = _inputs(3)
    np.testing.assert_array_equal(_run(eq, x), _run(plain, x))  # _run also checks names are unique
    assert equalize_channel_ranges(eq) == (0, 0)  # converged: another pass moves nothing
    w = list(_weights(eq).values())
    for a, b in zip(w, w[1:]):
        r1, r2 = _ranges(a, b, 1)
        assert np.all(np.abs(np.log2(r1 / r2)) <= 1)
    middle = next(n for n in eq.nodes if n.name == "conv1")
    assert middle.inputs[1].name == "conv1.weight_equalized"


def test_chain_float_mode_approaches_balance():
    model = _chain(np.random.default_rng(6), [3, 8, 8, 4], [1, 1, 1], [3, 3, 3])
    _plant(model, 0, K_PLANT, 1)
    _plant(model, 1, K_PLANT[::-1], 1)
    plain, eq = normalise(model), normalise(model)
    equalize_channel_ranges(eq, power_of_two=False, sweeps=50)
    w = list(_weights(eq).values())
    for a, b in zip(w, w[1:]):
        r1, r2 = _ranges(a, b, 1)
        np.testing.assert_allclose(r1, r2, rtol=1e-2)
    x = _inputs(3)
    ref = _run(plain, x)
    np.testing.assert_allclose(_run(eq, x), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_digits_model_keeps_fp32(digits_model, digits_calib):
    src = load_model(digits_model)
    x = np.load(digits_calib)["input"][:64]
    plain, eq = normalise(src), normalise(src)
    pairs, channels = equalize_channel_ranges(eq)
    assert pairs > 0 and channels > 0
    np.testing.assert_allclose(_run(eq, x, src.ir_version), _run(plain, x, src.ir_version), rtol=1e-5, atol=1e-6)
