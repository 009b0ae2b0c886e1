"""Data-free input means from BatchNorm priors (Nagel et al. 2019) for bias correction.

Every expectation is measured with onnxruntime on real tensors, never assumed.
"""

from typing import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_helpers import session
from mxqn_onnx.graph.layers import find_layers
from mxqn_onnx.graph.loading import normalise
from mxqn_onnx.lowbit import correction
from mxqn_onnx.quant import quantizers as Q
from mxqn_onnx.quant import weight_search as W

C_IN, C_MID, C_OUT, HW = 16, 8, 12, 12
EPS = 1e-5


def _out(name: str) -> onnx.ValueInfoProto:
    """A 4-D float graph output of unspecified size."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "c", "h", "w"])


def _data(n: int = 192, seed: int = 1) -> np.ndarray:
    """Skewed, non-Gaussian inputs (shifted exponential): only the conv's fan-in makes them Gaussian-ish."""
    rng = np.random.default_rng(seed)
    return (rng.exponential(1.0, (n, C_IN, HW, HW)) - 0.3).astype(np.float32)


def _bn_params(rng, c: int, beta_range=(-0.5, 1.5)):
    """Random gamma (both signs: the prior must use |gamma|) and beta in ``beta_range`` * |gamma|."""
    gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.uniform(*beta_range, c) * np.abs(gamma)
    return gamma.astype(np.float32), beta.astype(np.float32)


def _model(tail: Sequence[str], opset: int = 13, seed: int = 0, stats=None, conv2_pads: int = 1,
           beta_range=(-0.5, 1.5)) -> onnx.ModelProto:
    """x -> conv1(3x3, 16 -> 8) -> BN -> ``tail`` ops -> conv2(3x3, 8 -> 12) -> y.

    ``tail`` is a list of unary op names applied to the BN output ("Relu", "MaxPool", "Clip6").
    ``stats`` is the BN's (running mean, running var); default ones are placeholders.
    """
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((C_MID, C_IN, 3, 3)) * 0.2).astype(np.float32)
    b1 = (rng.standard_normal(C_MID) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((C_OUT, C_MID, 3, 3)) * 0.3).astype(np.float32)
    b2 = (rng.standard_normal(C_OUT) * 0.1).astype(np.float32)
    gamma, beta = _bn_params(rng, C_MID, beta_range)
    mean, var = stats if stats is not None else (np.zeros(C_MID), np.ones(C_MID))
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (gamma, "gamma"), (beta, "beta"),
        (np.asarray(mean, np.float32), "mean"), (np.asarray(var, np.float32), "var"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"], name="bn",
                         epsilon=EPS),
    ]
    t = "bn"
    for i, op in enumerate(tail):
        out = f"{op.lower()}{i}"
        if op == "MaxPool":
            nodes.append(helper.make_node("MaxPool", [t], [out], name=out, kernel_shape=[2, 2], strides=[2, 2]))
        elif op == "Clip6":
            if opset >= 11:
                inits += [numpy_helper.from_array(np.float32(0), f"lo{i}"), numpy_helper.from_array(np.float32(6), f"hi{i}")]
                nodes.append(helper.make_node("Clip", [t, f"lo{i}", f"hi{i}"], [out], name=out))
            else:
                nodes.append(helper.make_node("Clip", [t], [out], name=out, min=0.0, max=6.0))
        else:
            nodes.append(helper.make_node(op, [t], [out], name=out))
        t = out
    nodes.append(helper.make_node("Conv", [t, "w2", "b2"], ["y"], name="conv2", pads=[conv2_pads] * 4))
    graph = helper.make_graph(nodes, "bn_prior", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C_IN, HW, HW])],
                              [_out("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _with_true_stats(tail: Sequence[str], x: np.ndarray, **kw) -> onnx.ModelProto:
    """The model with the BN's running statistics measured on ``x`` (what training would converge to)."""
    c1 = session(_model(tail, **kw), ["c1"]).run(["c1"], {"x": x})[0].astype(np.float64)
    return _model(tail, stats=(c1.mean(axis=(0, 2, 3)), c1.var(axis=(0, 2, 3))), **kw)


def _tensor(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    return session(model, [name]).run([name], {"x": x})[0]


def _conv2(graph):
    layers, _ = find_layers(graph)
    return next(l for l in layers if l.name == "conv2")


def _priors_means(model: onnx.ModelProto):
    graph = normalise(model)
    return graph, correction.prior_input_means(graph, correction.batchnorm_priors(model))


@pytest.mark.parametrize("opset", [13, 11, 9])
def test_relu_mean_matches_measured(opset):
    # old opsets are upgraded by normalise: priors keyed by name must still find their tensor
    x = _data()
    model = _with_true_stats(["Relu"], x, opset=opset)
    graph, means = _priors_means(model)
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert not any(n.op == "BatchNormalization" for n in graph.nodes)  # folded: the stats are gone
    assert _conv2(graph).data.name == "relu0"
    assert set(means) == {"relu0"}
    measured = _tensor(model, "relu0", x).astype(np.float64).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(means["relu0"], measured, rtol=0.03)
    # the prior is not trivially right: beta alone (ignoring the ReLU) is far off
    beta = correction.batchnorm_priors(model)["bn"][0]
    assert np.max(np.abs(beta - measured) / measured) > 0.2


def test_relu6_clip_mean_matches_measured():
    x = _data()
    model = _with_true_stats(["Clip6"], x, seed=3)
    # scale gamma/beta up so that the upper bound 6 actually clips a good share
    for t in model.graph.initializer:
        if t.name in ("gamma", "beta"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 4.0, t.name))
    _, means = _priors_means(model)
    out = _tensor(model, "clip60", x).astype(np.float64)
    assert (out == 6.0).mean() > 0.02
    np.testing.assert_allclose(means["clip60"], out.mean(axis=(0, 2, 3)), rtol=0.03)


def test_maxpool_gives_no_entry():
    x = _data(n=32)
    model = _with_true_stats(["Relu", "MaxPool"], x)
    graph, means = _priors_means(model)
    assert _conv2(graph).data.name == "maxpool1"
    assert means == {}
    # and rightly so: the max of a window sits well above the ReLU mean
    relu = _tensor(model, "relu0", x).mean(axis=(0, 2, 3))
    pooled = _tensor(model, "maxpool1", x).mean(axis=(0, 2, 3))
    assert np.all(pooled > relu * 1.2)


def test_identity_mean_is_beta():
    model = _model([], seed=5)
    graph, means = _priors_means(model)
    assert _conv2(graph).data.name == "bn"  # the folded conv1 carries the BN's output name
    beta = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "beta"))
    np.testing.assert_array_equal(means["bn"], beta.astype(np.float64))
    # exporters that emit every weight as a Constant node (no initializers): same prior
    consts = onnx.ModelProto()
    consts.CopyFrom(model)
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in consts.graph.initializer]
    nodes += list(consts.graph.node)
    del consts.graph.initializer[:], consts.graph.node[:]
    consts.graph.node.extend(nodes)
    _, means = _priors_means(consts)
    np.testing.assert_array_equal(means["bn"], beta.astype(np.float64))
    # through an Identity the BN output is still Gaussian, so a ReLU after it is derivable
    _, means = _priors_means(_model(["Identity", "Relu"], seed=5))
    assert set(means) == {"relu1"}


def test_unfolded_batchnorm_still_gives_a_prior():
    # a BN on the graph input has no conv to fold into: it stays, and keeps its output name
    x = _data(n=64)
    x_stats = (x.astype(np.float64).mean(axis=(0, 2, 3)), x.astype(np.float64).var(axis=(0, 2, 3)))
    rng = np.random.default_rng(7)
    gamma, beta = _bn_params(rng, C_IN)
    w2 = (rng.standard_normal((C_OUT, C_IN, 3, 3)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (gamma, "gamma"), (beta, "beta"), (x_stats[0], "mean"), (x_stats[1], "var"), (w2, "w2"))]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
         helper.make_node("Relu", ["bn"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1] * 4)],
        "unfolded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C_IN, HW, HW])],
        [_out("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    g, means = _priors_means(model)
    assert any(n.op == "BatchNormalization" for n in g.nodes)
    # x is exponential, not Gaussian: the value is the prior's, checked against the formula only
    np.testing.assert_allclose(means["r"], correction.clipped_gaussian_mean(beta, np.abs(gamma)))


def test_residual_add_of_two_priors_sums_their_means():
    rng = np.random.default_rng(11)
    g1, b1 = _bn_params(rng, C_IN)
    g2, b2 = _bn_params(rng, C_IN)
    w = (rng.standard_normal((C_OUT, C_IN, 1, 1)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (g1, "g1"), (b1, "b1"), (g2, "g2"), (b2, "b2"), (np.zeros(C_IN), "m"), (np.ones(C_IN), "v"), (w, "w"))]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "g1", "b1", "m", "v"], ["bn1"], name="bn1"),
         helper.make_node("BatchNormalization", ["x", "g2", "b2", "m", "v"], ["bn2"], name="bn2"),
         helper.make_node("Relu", ["bn2"], ["r2"], name="relu"),
         helper.make_node("Add", ["bn1", "r2"], ["s"], name="add"),
         helper.make_node("Conv", ["s", "w"], ["y"], name="conv"),
         helper.make_node("Relu", ["s"], ["rs"], name="relu_s"),
         helper.make_node("Conv", ["rs", "w"], ["y2"], name="conv_after_add_relu")],
        "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C_IN, HW, HW])],
        [_out("y"),
         _out("y2")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    _, means = _priors_means(model)
    expect = b1.astype(np.float64) + correction.clipped_gaussian_mean(b2, np.abs(g2))
    np.testing.assert_allclose(means["s"], expect)
    assert "rs" not in means  # ReLU of a sum: no longer a BN's Gaussian


def test_clipped_gaussian_mean_limits():
    mu = np.array([-1.0, 0.0, 2.0, 3.0])
    np.testing.assert_allclose(correction.clipped_gaussian_mean(mu, np.zeros(4)), np.maximum(mu, 0))
    # sigma -> 0 is continuous, and a wide clip window changes nothing
    np.testing.assert_allclose(correction.clipped_gaussian_mean(mu, np.full(4, 1e-9)), np.maximum(mu, 0), atol=1e-8)
    np.testing.assert_allclose(correction.clipped_gaussian_mean(mu, np.ones(4), -1e3, 1e3), mu, atol=1e-12)
    # ReLU of N(0, s^2) has mean s / sqrt(2 pi)
    np.testing.assert_allclose(correction.clipped_gaussian_mean(0.0, 2.0), 2.0 / np.sqrt(2 * np.pi))


def _single_conv(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["r", "w", "b"], ["y"], name="c")], "one_conv",
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", C_MID, HW, HW])],
        [_out("y")],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b.astype(np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _conv_out(w: np.ndarray, b: np.ndarray, r: np.ndarray) -> np.ndarray:
    s = session(_single_conv(w, b))
    return s.run(None, {"r": r})[0].astype(np.float64)


def test_planted_weight_shift_is_removed_with_prior_means():
    x = _data()
    # conv2 without padding: every output sees all 3x3 taps, as the shift model assumes;
    # mostly negative betas, where the ReLU moves the mean far from beta
    model = _with_true_stats(["Relu"], x, conv2_pads=0, seed=2, beta_range=(-1.0, 0.5))
    graph, means = _priors_means(model)
    layer = _conv2(graph)
    w, b = layer.weight, layer.bias
    fracs, _ = W.best_fxp_channels(w.reshape(w.shape[0], -1), 4, True)
    wq = Q.fxp_quantize(w, 4, fracs.reshape(-1, 1, 1, 1), True)
    shift = correction.output_shift(layer, w, wq, means[layer.data.name])
    assert shift is not None

    r = _tensor(model, layer.data.name, x)
    ref = _conv_out(w, b, r)
    plain = _conv_out(wq, b, r)
    fixed = _conv_out(wq, (b.astype(np.float64) - shift), r)
    before = np.abs((plain - ref).mean(axis=(0, 2, 3)))
    after = np.abs((fixed - ref).mean(axis=(0, 2, 3)))
    # a shift worth removing was planted: relative to the output's spread it is not noise
    assert before.mean() > 0.01 * ref.std()
    assert after.sum() <= 0.2 * before.sum(), (before, after)
    # the ReLU term matters: taking E[x] = beta (ignoring the activation) does much worse
    beta = correction.batchnorm_priors(model)["bn"][0]
    naive = _conv_out(wq, b.astype(np.float64) - correction.output_shift(layer, w, wq, beta), r)
    assert np.abs((naive - ref).mean(axis=(0, 2, 3))).sum() > 2 * after.sum()


def test_gemm_batchnorm1d_relu_gemm():
    # BatchNorm1d between fully connected layers: folded into the first Gemm, prior on the second's input
    rng = np.random.default_rng(13)
    gamma, beta = _bn_params(rng, 6)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (rng.standard_normal((6, 10)), "w1"), (gamma, "gamma"), (beta, "beta"), (np.zeros(6), "mean"),
        (np.ones(6), "var"), (rng.standard_normal((3, 6)), "w2"))]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
         helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
         helper.make_node("Relu", ["bn"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    g, means = _priors_means(model)
    assert not any(n.op == "BatchNormalization" for n in g.nodes)
    np.testing.assert_allclose(means["r"], correction.clipped_gaussian_mean(beta, np.abs(gamma)))
