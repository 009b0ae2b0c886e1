"""The Python API: ``quantize(model, calibration, config) -> QuantResult``.

Data flows one way, one stage function each (see :func:`_quantize`): load and normalise the
graph -> find layers -> calibrate -> (mixed precision: per-layer widths) -> choose quantizers
-> rewrite -> verify. The stages call into the subpackages (``graph``, ``calibration``,
``quant``, ``lowbit``, ``mixed``, ``report``); this module only strings them together. The CLI
is a thin layer over it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .calibration.calibrate import collect_histograms, make_session
from .calibration.data import (CalibrationLike, DataSource, first_samples, held_back_count, input_specs,
                               make_source, take_batches)
from .calibration.observers import ReferenceOutputs, TensorHistogram, TensorSample
from .config import QuantConfig
from .errors import MxqnError
from .graph import qdq
from .graph.layers import Layer, Skipped, find_layers, keep_ends_in_float
from .graph.loading import (MIN_OPSET, ModelLike, export_fp32, export_fp32_stubbed, load_model,
                            normalise, raise_opset, with_weights_left_in_file)
from .graph.rewrite import rewrite
from .lowbit import correction, depthwise
from .lowbit.align import align_channel_ranges, equalize_and_measure
from .memory import release_freed_memory
from .mixed import search as mixed
from .mixed.search import packed_weight_bytes
from .mixed.sensitivity import make_probe
from .quant.candidates import KEEP_ENDS_MAX_SHARE, choice_key, choose_candidate, ends_share
from .quant.choose import ActDecision, LayerDecision, choose_all, model_rounding_cost
from .quant.quantizers import combine_sqnr_db
from .report.measure import VERIFY_TOLERANCE_DB, Comparison, class_outputs, compare
from .report.plots import histogram_summary
from .result import QuantResult, set_metadata


def quantize(
    model: ModelLike,
    calibration: CalibrationLike,
    config: Optional[QuantConfig] = None,
    *,
    progress: bool = False,
    preprocess: str = "none",
    image_size: Optional[Tuple[int, int]] = None,
    validation: Optional[CalibrationLike] = None,
    **overrides,
) -> QuantResult:
    """Quantize an FP32 ONNX model with MXQN.

    Args:
        model: path to an .onnx file or an ``onnx.ModelProto``.
        calibration: an .npy/.npz path, a folder of images, ``"random"`` (smoke tests only),
            a numpy array, a dict of arrays, an iterable of ``{input: array}`` batches, or an
            onnxruntime ``CalibrationDataReader``.
        config: a :class:`QuantConfig`; keyword ``overrides`` replace its fields.
        progress: show a progress bar on stderr.
        preprocess: for image folders: ``none``, ``unit`` ([0, 1]) or ``imagenet``.
        image_size: (H, W) for image folders when the model's input size is dynamic.
        validation: labelled data (an .npz with ``labels``, or a dict of arrays with
            ``labels``) for ``max_accuracy_drop``.
    """
    t0 = time.perf_counter()
    if config is None:
        config = QuantConfig.from_kwargs(**overrides)
    else:
        config = QuantConfig.from_kwargs(**{**config.to_dict(), **overrides})
    source_model = load_model(model)
    class_outputs(source_model, config.class_outputs)  # names checked before the long part
    source = make_source(calibration, input_specs(source_model), config.batch_size, preprocess, image_size,
                         random_count=config.calib_count)
    if config.equalize == "off" or not config.verify or not source.reiterable:
        handed = [source_model]  # read from a file, it is ours: no reference may stay here
        del source_model
        return _quantize(handed.pop(), source, config, t0, progress, validation,
                         None if isinstance(model, onnx.ModelProto) else Path(model))
    return _with_and_without_equalization(source_model, source, config, t0, progress, validation)


def _with_and_without_equalization(source_model: onnx.ModelProto, source: DataSource, config: QuantConfig,
                                   t0: float, progress: bool, validation) -> QuantResult:
    """Two conversions, with and without cross-layer equalization: the one whose measured
    output SQNR is better.

    Equalization changes every activation range, so whether it helps is only known after
    quantizing. The result's equalization record (and its stored metadata) says whether it was
    kept and what each conversion measured.
    """
    with_eq = _quantize(source_model, source, config, t0, progress, validation)
    without = _quantize(source_model, source, dataclasses.replace(config, equalize="off"),
                        time.perf_counter(), progress, validation)
    kept = with_eq.measured_sqnr_db >= without.measured_sqnr_db
    result = with_eq if kept else without
    result.equalization = {**with_eq.equalization, "kept": kept,
                           "measured_with_db": with_eq.measured_sqnr_db,
                           "measured_without_db": without.measured_sqnr_db}
    set_metadata(result.model, result.decisions())
    result.timings["convert_total"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- the pipeline


def _quantize(source_model: onnx.ModelProto, source: DataSource, config: QuantConfig, t0: float, progress: bool,
              validation, source_path: Optional[Path] = None) -> QuantResult:
    """One conversion of a loaded model (see :func:`quantize`), stage by stage. ``source_path``: the
    file of a model nothing else holds, whose weights go once the graph is built (peak memory)."""
    prepared = _prepare_graph(source_model, source, config)
    if source_path is not None and validation is None:  # labelled validation runs the source often
        source_model = with_weights_left_in_file(source_model, source_path)
    layers, skipped = _find_layers(prepared.graph, config)
    release_freed_memory()  # the parse, upgrade and fold leave freed blocks behind
    t_load = time.perf_counter()

    stats = _calibrate(prepared, layers, source, source_model, config, progress)
    t_calib = time.perf_counter()

    outcome = None
    if config.allocation_mode is not None:
        outcome = _mixed_precision(prepared.graph, layers, skipped, stats, export_fp32(prepared.graph, source_model),
                                   source_model, source, config, validation, progress)
    release_freed_memory()  # the calibration (and probe) sessions are gone
    t_mixed = time.perf_counter()

    decisions, acts = _choose(layers, stats, outcome, config)
    t_choose = time.perf_counter()

    result = _result(prepared, layers, skipped, decisions, acts, stats, outcome, config)
    pristine = prepared.graph.copy() if stats.held_back else None  # rewrite edits the graph it gets
    result.model = _rewrite(prepared.graph, layers, result, source_model)
    del layers  # their nodes hold the rewritten graph, which is done with now
    t_rewrite = time.perf_counter()
    session = None  # on the written model, when the held-back check has made one
    if pristine is not None:
        prepared = dataclasses.replace(prepared, graph=pristine)  # the rewritten graph can go
        result, session = _check_on_held_back(result, pristine, prepared, skipped, stats, source_model, source,
                                              config)
    stats.samples = {}  # the data-aware steps are done with the kept layer inputs
    del pristine, prepared
    release_freed_memory()
    result.size_after = result.model.ByteSize()
    t_holdout = time.perf_counter()

    result.comparison = _verify(result.model, source_model, source, stats.kept, stats.references, config,
                                outcome, result.held_back_comparison, session)
    del session
    t_verify = time.perf_counter()
    result.timings = {
        "load": t_load - t0, "calibrate": t_calib - t_load, "mixed_precision": t_mixed - t_calib,
        "choose": t_choose - t_mixed,
        # summed over layers (they run on several threads, so it can exceed "choose")
        "rounding_layer_seconds": sum(d.rounding_seconds for d in decisions),
        "rewrite": t_rewrite - t_choose, "holdout": t_holdout - t_rewrite, "convert_total": t_holdout - t0,
        "verify": t_verify - t_holdout,
    }
    return result


@dataclass
class _Prepared:
    """The normalised graph and what preparing it decided."""

    graph: gs.Graph
    #: cross-layer equalization: pairs, channels, weight SQNR before/after (None: off)
    equalization: Optional[dict]
    #: BatchNorm output priors for data-free bias correction (None: means from the data)
    priors: Optional[correction.Priors]
    #: depthwise input shifts: tensors, convs, channels per shift (None: off)
    depthwise_shift: Optional[dict] = None
    #: the graph before the depthwise shifts, when the held-back check judges them (``auto``)
    unshifted: Optional[gs.Graph] = None
    source_bytes: int = 0  # the source model's serialised size (its weights may go later)


def _prepare_graph(source_model: onnx.ModelProto, source: DataSource, config: QuantConfig) -> _Prepared:
    """Stage 1: the loaded FP32 model as a normalised graph, ready to find layers in.

    Raises the opset when asked; reads the BatchNorm priors (data-free bias correction) before
    normalising folds the BatchNorms away; then the FP32-preserving channel rescalings of
    ``lowbit``: cross-layer equalization and power-of-two alignment, when switched on.
    """
    upgraded = raise_opset(source_model, config.opset)
    use_priors = config.bias_correction and (
        config.bias_means == "batchnorm" or (config.bias_means == "auto" and source.synthetic))
    priors = correction.batchnorm_priors(upgraded) if use_priors else None
    graph = normalise(upgraded)
    equalization = equalize_and_measure(graph, config) if config.equalize != "off" else None
    if config.align_channels and config.weight_granularity != "tensor":
        align_channel_ranges(graph, config.wbits)
    shifts, unshifted = _shift_depthwise_inputs(graph, source_model, source, config) \
        if config.depthwise_shift != "off" else (None, None)
    return _Prepared(graph, equalization, priors, shifts, unshifted, source_model.ByteSize())


def _shift_depthwise_inputs(graph: gs.Graph, source_model: onnx.ModelProto, source: DataSource,
                            config: QuantConfig) -> Tuple[Optional[dict], Optional[gs.Graph]]:
    """Per-channel power-of-two shifts on depthwise conv inputs (:mod:`mxqn_onnx.lowbit.depthwise`),
    from the channel maxima of a first FP32 pass over a few calibration samples (after the
    held-back ones, which judge the result).

    Returns the record (None: no shifts) and, for ``auto``, the graph as it was before, which
    the held-back check converts too. ``auto`` shifts nothing where that check cannot run.
    """
    tensors = list(depthwise.depthwise_inputs(graph))
    auto = config.depthwise_shift == "auto"
    if not tensors:
        return (None if auto else {"tensors": 0, "convs": 0, "channels_by_shift": {}}), None
    if not source.reiterable:
        if auto:
            return None, None
        raise MxqnError("depthwise_shift reads the first calibration samples twice; give data that can be "
                        "read again (a file or folder), or leave depthwise_shift off")
    skip = held_back_count(config, source, shifts=auto)
    if auto and skip == 0:
        return None, None
    model, weights = export_fp32_stubbed(graph, source_model)
    session = make_session(model, tensors, weights)
    maxima: Dict[str, np.ndarray] = {}
    seen = 0
    for feed in first_samples(source, [], skip + depthwise.SAMPLES):
        for i in range(int(np.shape(next(iter(feed.values())))[0])):  # one sample a run: fixed batches too
            seen += 1
            if seen <= skip:
                continue
            outs = session.run(tensors, {k: np.asarray(v)[i:i + 1] for k, v in feed.items()})
            for name, out in zip(tensors, outs):
                m = depthwise.channel_max(out)
                maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    del session
    if auto and depthwise.largest_shift(maxima) < depthwise.AUTO_MIN_SHIFT:
        return None, None  # nothing worth a trial (see AUTO_MIN_SHIFT)
    before = graph.copy() if auto else None  # shares the weight arrays; the shifts make new ones
    record = depthwise.shift_depthwise_inputs(graph, maxima)
    if auto and record["tensors"] == 0:
        return None, None
    return record, before


def _find_layers(graph: gs.Graph, config: QuantConfig) -> Tuple[List[Layer], List[Skipped]]:
    """Stage 2: the layers to quantize, and the layer-type nodes left in float with the reason.

    Excluded names and, with ``keep_float``, the first/last layer stay float. A model with
    nothing to quantize is refused unless ``allow_empty``.
    """
    layers, skipped = find_layers(graph, config.exclude)
    layers, skipped = _keep_float(layers, skipped, config)
    if not layers and not config.allow_empty:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5])
        raise MxqnError(
            "no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a constant weight) "
            "in this model" + (f" ({detail})" if detail else "") + "; nothing to do "
            "(--allow-empty writes it unquantized anyway)"
        )
    return layers, skipped


def _layers_of(graph: gs.Graph, config: QuantConfig) -> List[Layer]:
    """The layers ``config`` quantizes in ``graph`` (read only)."""
    return _keep_float(find_layers(graph, config.exclude)[0], [], config)[0]


def _layers_of_copy(graph: gs.Graph, config: QuantConfig) -> Tuple[gs.Graph, List[Layer]]:
    """A copy of the normalised graph and its layers, for a candidate model (rewriting edits
    the graph it is given; the original stays for the final rewrite)."""
    g = graph.copy()
    return g, _layers_of(g, config)


def _keep_float(layers: List[Layer], skipped: List[Skipped], config: QuantConfig):
    return keep_ends_in_float(layers, skipped, config.keep_float and config.keep_first,
                              config.keep_float and config.keep_last)


@dataclass
class _Statistics:
    """What calibration measured."""

    hists: Dict[str, TensorHistogram]  # per layer input tensor
    n_samples: int
    kept: list  # the first batches, when the data cannot be read twice (verification, probes)
    samples: Dict[str, np.ndarray]  # the first samples of each layer input (data-aware steps)
    means: Optional[Dict[str, np.ndarray]]  # input channel means from BatchNorm priors (None: data)
    bias_means: str  # where bias correction takes its input means, as reported
    references: Optional[ReferenceOutputs] = None  # FP32 outputs of the first samples (verification)
    held_back: int = 0  # first samples kept out of the channel means and kept samples (holdout)


def _calibrate(prepared: _Prepared, layers: List[Layer], source: DataSource, source_model: onnx.ModelProto,
               config: QuantConfig, progress: bool) -> _Statistics:
    """Stage 3: stream the calibration data through the normalised FP32 model (whose session
    takes the graph's weight arrays as they are, see :func:`export_fp32_stubbed`).

    Gives a histogram of every layer input (with per-channel means where bias correction needs
    them), the first samples of each layer input when data-aware rounding or the output
    objective will use them, the batches kept for verification and the sensitivity probe when
    the data cannot be read twice, and, for data-free bias correction, the input channel means
    from the BatchNorm priors.
    """
    # with depthwise shifts on trial, the unshifted tensors too (read by the Muls of the shifts)
    all_layers = layers + (_layers_of(prepared.unshifted, config) if prepared.unshifted is not None else [])
    inputs = list(dict.fromkeys(l.data.name for l in all_layers))
    tensors = inputs
    if config.quantizes_layer_outputs:  # output quantizers (choose_all): histograms only
        tensors = list(dict.fromkeys(inputs + [l.output.name for l in all_layers]))
    keep = 0 if source.reiterable else config.verify_count
    if config.allocation_mode is not None and not source.reiterable:
        keep = max(keep, config.probe_count)  # the sensitivity probe needs batches too
    channel_axes = {}
    if config.bias_correction:
        for layer in all_layers:
            axis = correction.input_channel_axis(layer)
            if axis is not None:
                channel_axes[layer.data.name] = axis
    keep_samples = config.uses_samples(model_rounding_cost(layers))
    samples = {t: TensorSample(t, config.data_samples) for t in inputs} if keep_samples else {}
    fp32, weights = export_fp32_stubbed(prepared.graph, source_model)
    # the FP32 outputs of the samples verification will use come with this run
    references = ReferenceOutputs([o.name for o in fp32.graph.output],
                                  config.verify_count if config.verify else 0)
    held_back = held_back_count(config, source, shifts=prepared.unshifted is not None)
    hists, n_samples, kept = collect_histograms(
        fp32, tensors, source, config.calib_count, progress,
        keep_batches=keep if (config.verify or config.allocation_mode is not None) else 0,
        channel_axes=channel_axes, samples=samples, references=references, held_back=held_back,
        weights=weights)
    arrays = {t: a for t, a in ((t, s.array()) for t, s in samples.items()) if a is not None}
    # data-free bias correction: channel means from the BatchNorm priors instead of the data;
    # equalization rescaled the BN outputs' channels, so the priors no longer describe them
    means, bias_means = None, "data"
    if prepared.priors is not None:
        if prepared.equalization is None:
            means, bias_means = correction.prior_input_means(prepared.graph, prepared.priors), "batchnorm"
            if prepared.unshifted is not None:
                means = {**correction.prior_input_means(prepared.unshifted, prepared.priors), **means}
        else:
            means, bias_means = {}, "none (BatchNorm priors do not hold after equalization)"
    return _Statistics(hists, n_samples, kept, arrays, means, bias_means, references, held_back)


def _check_on_held_back(default: QuantResult, graph: gs.Graph, prepared: "_Prepared", skipped: List[Skipped],
                        stats: "_Statistics", source_model: onnx.ModelProto, source: DataSource,
                        config: QuantConfig) -> Tuple[QuantResult, Optional[ort.InferenceSession]]:
    """Stage 7b: keep the data-derived defaults only where they help on held-back samples.

    Bias correction's channel means, data-aware rounding's samples and the depthwise shifts
    came from the other calibration samples; here the default conversion, the one without bias
    correction, the one without layer-output quantizers (``auto``), the one with the first and
    last layer at ``keep_bits`` (``keep_ends`` auto, below ``keep_bits``), the one without
    depthwise shifts (``auto``) and the paper's plain method (no bias correction, round to
    nearest, no shifts) are compared by output SQNR on the held-back samples, and the best is
    kept (a tie keeps the default). Candidates that would equal one already built are not
    built. Also gives the kept model's session when it is still open (verification goes on
    with it).
    """
    used_bc = any(d.bias_correction for d in default.layers)
    used_rounding = any(d.weight.rounding != "nearest" for d in default.layers)
    unshifted = prepared.unshifted
    # layer-output quantizers (qdq) are for the runtime's fused kernels, not the paper's method
    pairs = qdq.layer_output_pairs(default.model)
    outputs_on_trial = config.layer_outputs_on_trial and pairs > 0
    # what was asked for ("on") is no data-derived default: the plain candidate keeps it
    plain = dataclasses.replace(config, bias_correction=False, rounding="nearest", act_objective="tensor",
                                depthwise_shift="off" if unshifted is not None else config.depthwise_shift,
                                qdq_layer_outputs="off" if outputs_on_trial else config.qdq_layer_outputs)
    variants: List[Tuple[str, Optional[QuantConfig], gs.Graph]] = [("default", None, graph)]
    if used_bc:
        variants.append(("no bias correction", dataclasses.replace(config, bias_correction=False), graph))
    if outputs_on_trial:
        variants.append(("no layer-output quantizers", dataclasses.replace(config, qdq_layer_outputs="off"), graph))
    if config.keep_ends_on_trial and ends_share(default.layers) <= KEEP_ENDS_MAX_SHARE:
        variants.append((f"first and last layer at {config.keep_bits} bits",
                         dataclasses.replace(config, keep_first=True, keep_last=True), graph))
    refined = used_bc or used_rounding or config.act_objective != "tensor"
    if unshifted is not None:
        variants.append(("no depthwise shift", dataclasses.replace(config, depthwise_shift="off"), unshifted))
        if refined or outputs_on_trial:
            variants.append(("paper", plain, unshifted))
    elif used_rounding or (used_bc and config.act_objective != "tensor") or (outputs_on_trial and refined):
        variants.append(("paper", plain, graph))
    record: dict = {"held_back_samples": stats.held_back, "sqnr_db": {}, "kept": "default"}
    if pairs:  # how many the default had, and how many the kept model has
        record["layer_output_quantizers"] = {"default": pairs, "written": pairs}
    if len(variants) == 1:
        record["note"] = "nothing data-derived to check"
        default.holdout = record
        return default, None
    feeds = first_samples(source, stats.kept, stats.held_back)
    # every candidate has these layers (shifts change no shape), so this rounding cost
    cost = model_rounding_cost(_layers_of(graph, config))
    # the default's choices, for the candidates that only drop bias correction or layer-output
    # quantizers from them, or only change the widths of the two ends
    chosen = {choice_key(graph, config, cost): (default.layers, default.activations, config)}
    best, best_db, session = default, None, None
    # the default goes last, winning ties: its session, the last made, then serves verification
    for name, cfg, base in variants[1:] + variants[:1]:
        if cfg is None:
            cand = default
        else:
            g, ls = _layers_of_copy(base, cfg)
            d, a = choose_candidate(ls, base, cfg, stats.hists, stats.samples, stats.means, chosen, cost)
            cand = _result(prepared, ls, skipped, d, a, stats, None, cfg)
            cand.model = _rewrite(g, ls, cand, source_model)
        session = None  # one candidate session at a time
        release_freed_memory()
        session = make_session(cand.model)
        c = compare(source_model, cand.model, iter(feeds), kept=stats.references, session=session,
                    classes=config.class_outputs or None)
        record["sqnr_db"][name] = c.output_sqnr_db
        if best_db is None or c.output_sqnr_db > best_db or (cfg is None and c.output_sqnr_db >= best_db):
            best, best_db, record["kept"], best_c = cand, c.output_sqnr_db, name, c
    record["sqnr_db"] = {name: record["sqnr_db"][name] for name, _, _ in variants}  # in the report's order
    if pairs:
        record["layer_output_quantizers"]["written"] = qdq.layer_output_pairs(best.model)
    best.holdout = record
    best.held_back_comparison = best_c  # verification goes on from it
    set_metadata(best.model, best.decisions())
    return best, session if best is cand else None


def _mixed_precision(graph: gs.Graph, layers: List[Layer], skipped: List[Skipped], stats: _Statistics,
                     fp32: onnx.ModelProto, source_model: onnx.ModelProto, source: DataSource,
                     config: QuantConfig, validation, progress: bool) -> mixed.Outcome:
    """Stage 4 (mixed precision only): a bit width per layer, from sensitivities and the
    allocation of :mod:`mxqn_onnx.mixed.search`, verified (and refined) on calibration data.

    Candidate models are rewritten from copies of the normalised graph, which stays untouched
    for the final rewrite. Gives the widths, the comparison of the chosen model and the record.
    """
    def log(msg: str) -> None:
        if progress:
            print(f"mxqn-onnx: {msg}", file=sys.stderr)

    def batches(limit: int):
        return list(source.batches(min(limit, config.calib_count or limit))) if source.reiterable \
            else take_batches(stats.kept, limit)

    opset = max(int(graph.opset), MIN_OPSET)
    probe = make_probe(fp32, layers, stats.hists, batches(config.probe_count), config, opset)

    def build(bits):
        g, ls = _layers_of_copy(graph, config)
        d, a = choose_all(ls, stats.hists, config, bits, stats.samples, stats.means)
        meta = QuantResult(onnx.ModelProto(), d, a, skipped, 0.0, None, stats.n_samples, 0, 0,
                           config=config, opset=opset).decisions()
        qm = rewrite(g, ls, d, a, source_model, meta, fmt=config.format,
                     qdq_encoding=config.qdq_encoding)
        return d, a, qm

    def measure(built):
        if not config.verify:
            return None
        # the allocation is refined and judged on this measurement: every sample counts
        return compare(source_model, built[-1], iter(batches(config.verify_count)), kept=stats.references,
                       classes=config.class_outputs or None)

    evaluate = None
    if validation is not None:
        val = make_source(validation, input_specs(source_model), config.batch_size)
        if val.labels is None:
            raise MxqnError("the validation data has no labels (an array named 'labels'); "
                            "accuracy cannot be measured")

        def evaluate(built):
            return compare(source_model, built[-1], val.batches(), val.labels, classes=config.class_outputs or None)

    elif config.max_accuracy_drop is not None:
        raise MxqnError("max_accuracy_drop needs labelled validation data (--val FILE.npz with 'labels')")
    return mixed.run(layers, stats.hists, stats.n_samples, config, probe, build, measure, evaluate, log)


def _choose(layers: List[Layer], stats: _Statistics, outcome: Optional[mixed.Outcome],
            config: QuantConfig) -> Tuple[List[LayerDecision], Dict[str, ActDecision]]:
    """Stage 5: every layer's quantizers, chosen by SQNR (:func:`mxqn_onnx.quant.choose.choose_all`).

    Weight bits and fractional length(s), the activation quantizer (fixed or log, shared by
    tensor) and the bias length, with the low-bit steps the config switches on (data-aware
    rounding and the output objective on the kept samples, bias correction with data or prior
    means). Widths come from the mixed-precision outcome when there is one.
    """
    return choose_all(layers, stats.hists, config, outcome.bits if outcome else None, stats.samples,
                      stats.means)


def _result(prepared: _Prepared, layers: List[Layer], skipped: List[Skipped],
            decisions: List[LayerDecision], acts: Dict[str, ActDecision], stats: _Statistics,
            outcome: Optional[mixed.Outcome], config: QuantConfig) -> QuantResult:
    """Stage 6: the record of what was decided and predicted, before the model exists.

    The predicted output SQNR combines every quantizer's SQNR by the additive noise model; the
    calibration, mixed-precision and equalization records and the histogram summaries go in
    for the report.
    """
    # a weight's noise as the layer's output sees it, where measured on calibration inputs
    # (data-aware rounding trades weight SQNR for exactly that)
    terms = [d.weight.sqnr_db if d.weight.output_sqnr_db is None else d.weight.output_sqnr_db
             for d in decisions] + [a.sqnr_db for a in acts.values()]
    return QuantResult(
        model=onnx.ModelProto(), layers=decisions, activations=acts, float_layers=skipped,
        predicted_sqnr_db=combine_sqnr_db(terms), comparison=None, calibration_samples=stats.n_samples,
        size_before=prepared.source_bytes, size_after=0, config=config,
        opset=max(int(prepared.graph.opset), MIN_OPSET),
        allocation=outcome.record if outcome else None,
        equalization=prepared.equalization,
        # a candidate converted without the shifts has none (``off``)
        depthwise_shift=prepared.depthwise_shift if config.depthwise_shift != "off" else None,
        bias_means=stats.bias_means,
        histograms={t: histogram_summary(h) for t, h in stats.hists.items()},
        packed_weight_bytes=packed_weight_bytes(layers, [d.weight.bits for d in decisions]),
    )


def _rewrite(graph: gs.Graph, layers: List[Layer], result: QuantResult,
             source_model: onnx.ModelProto) -> onnx.ModelProto:
    """Stage 7: the quantized model: the normalised graph rewritten with the decisions of
    ``result`` (stored as its metadata) in the configured format, checked by onnx's checker."""
    config = result.config
    qmodel = rewrite(graph, layers, result.layers, result.activations, source_model, result.decisions(),
                     fmt=config.format, qdq_encoding=config.qdq_encoding,
                     layer_outputs=config.quantizes_layer_outputs)
    try:
        onnx.checker.check_model(qmodel)
    except onnx.checker.ValidationError as exc:  # a bug of ours, not bad input
        raise RuntimeError(f"mxqn-onnx produced an invalid model: {exc}") from exc
    return qmodel


def _verify(qmodel: onnx.ModelProto, source_model: onnx.ModelProto, source: DataSource, kept: list,
            references: Optional[ReferenceOutputs], config: QuantConfig,
            outcome: Optional[mixed.Outcome], resume: Optional[Comparison] = None,
            session: Optional[ort.InferenceSession] = None) -> Optional[Comparison]:
    """Stage 8: the quantized model's outputs against the FP32 ones on calibration samples
    (None: ``verify`` off). The FP32 outputs come from the calibration run where it kept them;
    the run stops once the output SQNR is known to :data:`VERIFY_TOLERANCE_DB` (its 95%
    interval is in the comparison). Mixed precision has already measured this very model; the
    held-back check has measured it on the first samples (``resume``), which are not run again."""
    if outcome is not None and outcome.comparison is not None:
        return outcome.comparison
    if not config.verify:
        return None
    batches = source.batches(min(config.verify_count, config.calib_count or config.verify_count)) \
        if source.reiterable else iter(kept)
    return compare(source_model, qmodel, batches, kept=references, tolerance_db=VERIFY_TOLERANCE_DB, resume=resume,
                   session=session, classes=config.class_outputs or None)
