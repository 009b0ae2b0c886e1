"""Stream calibration batches through one onnxruntime session and collect histograms."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from ..errors import MxqnError, first_line
from ..graph.loading import weights_left_in_file, with_weight_stubs
from ..memory import release_freed_memory
from .data import DataSource, batch_len, fixed_batch
from .observers import NonFiniteError, ReferenceOutputs, TensorHistogram, TensorSample

#: Values per tensor and batch beyond which calibration histograms a subset. 2^20 values
#: fill the 16k bins densely; larger activations (a 224x224 ResNet's first stages hold
#: 10M+ per batch of 16) cost bincount time without changing the chosen quantizers.
SAMPLE_CAP = 1 << 20
#: Bytes of observed tensors per onnxruntime run. A 224x224 ResNet-50 returns 40 MB of layer
#: inputs per sample, so a batch of 16 would hold 640 MB (twice, with the pipelining below).
OUTPUT_BUDGET = 128 << 20
#: Bytes of layer inputs kept as real samples for the data-aware steps (rounding, the
#: layer-output objective); fewer samples are kept when a sample is large.
SAMPLE_BUDGET = 256 << 20


def _split_weights(model: onnx.ModelProto, extra_outputs: Sequence[str]):
    """``model`` with a :func:`weight_stub` for each large initializer and ``extra_outputs``
    added, plus the names and arrays of what the stubs stand for."""
    light, stubbed = with_weight_stubs(model)
    names, arrays = [t.name for t in stubbed], [numpy_helper.to_array(t) for t in stubbed]
    for name, array in weights_left_in_file(model).items():  # a source model without its weights
        names.append(name)
        arrays.append(array)
    present = {o.name for o in light.graph.output}
    for name in dict.fromkeys(extra_outputs):
        if name not in present:
            light.graph.output.append(onnx.ValueInfoProto(name=name))
    return light, names, arrays


def make_session(model: onnx.ModelProto, extra_outputs: Sequence[str] = (),
                 weights: Optional[Mapping[str, np.ndarray]] = None, spinning: bool = True) -> ort.InferenceSession:
    """A CPU session on ``model`` that also returns the named intermediate tensors.

    The large weights reach onnxruntime as arrays (``add_external_initializers``), not inside
    the serialised model: serialising a 100 MB model and letting onnxruntime parse it held
    three copies of the weights at once, and left the process 100 MB larger for as long as
    the session lived (measured on the ResNet-50 graph). ``weights``: the arrays of the
    model's stubs (:func:`~mxqn_onnx.graph.loading.export_fp32_stubbed`). ``model`` itself is
    not changed. ``spinning=False``: onnxruntime's idle threads sleep instead of spin-waiting
    between operators, for sessions that run beside busy Python threads (the calibration's
    histogram worker: 10% less calibration time on the ResNet-50 graph, 2 cores).
    """
    light, names, arrays = _split_weights(model, extra_outputs)
    for name, array in (weights or {}).items():
        names.append(name)
        arrays.append(np.ascontiguousarray(array))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if names:
        opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    try:
        session = ort.InferenceSession(light.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = first_line(exc)
        raise MxqnError(f"onnxruntime cannot load the model: {first}") from None
    del light, arrays, opts
    release_freed_memory()  # building the session (optimising, prepacking) freed as much again
    return session


def progress_bar(enabled: bool, description: str, total: Optional[int]):
    """A rich progress bar on stderr (or a no-op)."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=False)


def collect_histograms(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    source: DataSource,
    limit: Optional[int] = None,
    progress: bool = False,
    keep_batches: int = 0,
    channel_axes: Optional[Dict[str, int]] = None,
    sample_cap: Optional[int] = SAMPLE_CAP,
    output_budget: int = OUTPUT_BUDGET,
    samples: Optional[Dict[str, TensorSample]] = None,
    sample_budget: int = SAMPLE_BUDGET,
    references: Optional[ReferenceOutputs] = None,
    held_back: int = 0,
    weights: Optional[Mapping[str, np.ndarray]] = None,
) -> tuple:
    """Histograms of ``tensors`` over the calibration data, batch by batch.

    Returns ``(histograms, n_samples, kept)`` where ``kept`` holds the first batches (up to
    ``keep_batches`` samples) when the source cannot be read twice, for the verification run.
    ``channel_axes`` names tensors whose per-channel means are also wanted (bias correction).
    ``sample_cap``: tensors holding more values than this per batch are histogrammed from an
    evenly spread subset of that size (:meth:`TensorHistogram.update`); ``None`` counts all.
    ``output_budget``: bytes of observed tensors per onnxruntime run; larger batches are run
    in pieces (the first piece is one sample, to measure the size). Statistics add, so the
    histograms do not depend on how batches are cut.
    ``samples``: :class:`TensorSample` per tensor, filled with the first samples; their counts
    are lowered so that each holds at most an equal share of ``sample_budget`` bytes.
    ``references``: filled with the model's own outputs of the first samples (verification
    then runs only the quantized model).
    ``held_back``: the first samples count in the histograms but not in the channel means or
    the kept samples (they judge the data-derived steps, see ``QuantConfig.holdout``).
    ``weights``: the arrays of ``model``'s weight stubs (see :func:`make_session`).
    """
    input_names = {s.name for s in source.specs}
    observed = [t for t in dict.fromkeys(tensors) if t not in input_names]
    outputs = list(references.names) if references is not None and references.wants() else []
    fetched = observed + [o for o in outputs if o not in observed]
    # the histogram worker runs beside onnxruntime: its threads must not spin away the cores
    session = make_session(model, fetched, weights, spinning=False)
    channel_axes = channel_axes or {}
    samples = samples if samples is not None else {}
    hists: Dict[str, TensorHistogram] = {t: TensorHistogram(t, channel_axes.get(t)) for t in dict.fromkeys(tensors)}
    observed_inputs = [n for n in hists if n in input_names]

    def add(outs: list, feed: dict, start: int, m: int) -> None:
        skip = max(0, min(m, held_back - start))

        def rows(a) -> int:  # held-back rows of this tensor (none without a batch axis of m)
            return skip if np.ndim(a) and np.shape(a)[0] == m else 0
        try:
            for i, name in enumerate(observed):
                hists[name].update(outs[i], sample_cap, rows(outs[i]))
                if name in samples:
                    samples[name].update(outs[i], rows(outs[i]))
                outs[i] = None  # free each tensor as soon as it is counted
            for name in observed_inputs:
                hists[name].update(feed[name], sample_cap, rows(feed[name]))
                if name in samples:
                    samples[name].update(feed[name], rows(feed[name]))
        except NonFiniteError as exc:
            raise MxqnError(str(exc)) from None

    n_samples = 0
    kept = []
    kept_n = 0
    per_sample: Optional[float] = None  # bytes of observed tensors per sample, from the first run
    total = min(x for x in (limit, source.total) if x is not None) if (limit or source.total) else None
    # One worker histograms run i while onnxruntime computes run i+1 (bincount and ORT both
    # release the GIL). Waiting for run i before submitting i+1 bounds memory to two runs of
    # observed tensors, and runs are cut to about ``output_budget`` bytes of them each, so
    # peak memory depends neither on the number of samples nor on the batch size.
    runner = _ReusingRunner(session, fetched)
    with progress_bar(progress, "calibrating", total) as bar, ThreadPoolExecutor(max_workers=1) as pool:
        task = bar.add_task("calibrating", total=total) if bar is not None else None
        pending = None
        fixed = fixed_batch(source.specs)
        for feed in source.batches(limit):
            n = batch_len(feed)

            def size() -> int:  # asked before each piece: the first one measures per_sample
                if fixed is not None:
                    return n  # the model takes exactly its fixed batch (the source already cut to it)
                return 1 if per_sample is None else max(1, int(output_budget // max(per_sample, 1.0)))

            start = n_samples
            for part, m in _split(feed, n, size):
                try:
                    outs = runner.run(part)
                except Exception as exc:
                    first = first_line(exc)
                    raise MxqnError(f"onnxruntime failed on {source.label}: {first}") from None
                if outputs and references.wants():
                    references.add([outs[fetched.index(o)] for o in outputs], m)
                if per_sample is None and m:
                    per_sample = sum(o.nbytes for o in outs) / m
                    _fit_samples(samples, {k: v for k, v in zip(observed, outs)}, part, m, sample_budget)
                if pending is not None:
                    pending.result()  # re-raises a worker's error here
                pending = pool.submit(add, outs, part, start, m)
                start += m
                del outs
            n_samples += n
            if kept_n < keep_batches:
                kept.append(feed)
                kept_n += n
            if bar is not None:
                bar.update(task, advance=n)
        if pending is not None:
            pending.result()
    return hists, n_samples, kept


def _fit_samples(samples: Dict[str, TensorSample], outs: dict, feed: dict, m: int, budget: int) -> None:
    """Lower the sample counts so the kept samples fit ``budget`` bytes in all.

    Each tensor gets an equal share: a large early activation keeps few samples (each already
    holds many positions, i.e. many input rows), a small deep one keeps many.
    """
    if not samples:
        return
    share = budget / len(samples)
    for name, s in samples.items():
        arr = outs.get(name, feed.get(name))
        if arr is None:
            continue
        per = np.asarray(arr).nbytes / m
        if per > 0:
            s.count = min(s.count, max(1, int(share // per)))


class _ReusingRunner:
    """``session.run`` of the observed tensors, into two alternating sets of reused buffers.

    Fresh output arrays on every run cost onnxruntime a third of a large CNN's inference time
    (page faults on hundreds of MB of new memory per batch). Once a feed shape recurs, its
    outputs are bound (io_binding) to preallocated arrays instead; two sets alternate because
    the histogram worker still reads run i while run i+1 is computed. Only one feed shape
    (the common chunk) gets buffers, so their memory stays bounded; anything unusual (a
    failing binding, outputs that are not numeric tensors) falls back to plain runs.
    """

    def __init__(self, session: ort.InferenceSession, names: Sequence[str]) -> None:
        self.session, self.names = session, list(names)
        self.seen: Dict[tuple, list] = {}  # feed signature -> output (shape, dtype) layout
        self.bound_sig: Optional[tuple] = None
        self.sets: list = [None, None]
        self.turn = 0
        self.enabled = True

    def run(self, feed: dict) -> list:
        if not self.names:
            return []
        sig = tuple((k, np.shape(v), np.asarray(v).dtype.str) for k, v in feed.items())
        if self.enabled and sig in self.seen and self.bound_sig in (None, sig):
            try:
                return self._bound(sig, feed)
            except Exception:  # noqa: BLE001 -- plain runs give the same numbers
                self.enabled = False
        outs = self.session.run(self.names, feed)
        if sig not in self.seen and len(self.seen) < 4 and \
                all(isinstance(o, np.ndarray) and o.dtype.kind in "fiu" for o in outs):
            self.seen[sig] = [(o.shape, o.dtype) for o in outs]
        self.turn ^= 1  # this run's arrays are fresh; the next bound run may use either set
        return outs

    def _bound(self, sig: tuple, feed: dict) -> list:
        self.bound_sig = sig
        i = self.turn
        self.turn ^= 1
        if self.sets[i] is None:
            bufs = [np.empty(shape, dtype) for shape, dtype in self.seen[sig]]
            binding = self.session.io_binding()
            for name, buf in zip(self.names, bufs):
                binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            self.sets[i] = (binding, bufs)
        binding, bufs = self.sets[i]
        for k, v in feed.items():
            binding.bind_cpu_input(k, np.ascontiguousarray(v))
        self.session.run_with_iobinding(binding)
        return list(bufs)



def _split(feed: dict, n: int, size):
    """``(part, samples)`` pieces along the batch axis, each of at most ``size()`` samples.

    ``size`` is called before each piece, so it may change after the first run. Feeds whose
    inputs do not all share that leading axis are run whole.
    """
    if not all(np.ndim(v) and v.shape[0] == n for v in feed.values()):
        yield feed, n
        return
    start = 0
    while start < n:
        m = min(size(), n - start)
        yield (feed if m == n else {k: v[start:start + m] for k, v in feed.items()}), m
        start += m
