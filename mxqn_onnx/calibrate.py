"""Stream calibration batches through one onnxruntime session and collect histograms."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .data import DataSource
from .errors import MxqnError
from .observers import NonFiniteError, TensorHistogram


def make_session(model: onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> ort.InferenceSession:
    """A CPU session on ``model`` that also returns the named intermediate tensors."""
    if extra_outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        present = {o.name for o in model.graph.output}
        for name in extra_outputs:
            if name not in present:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MxqnError(f"onnxruntime cannot load the model: {first}") from None


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
) -> tuple:
    """Histograms of ``tensors`` over the calibration data, batch by batch.

    Returns ``(histograms, n_samples, kept)`` where ``kept`` holds the first batches (up to
    ``keep_batches`` samples) when the source cannot be read twice, for the verification run.
    ``channel_axes`` names tensors whose per-channel means are also wanted (bias correction).
    """
    input_names = {s.name for s in source.specs}
    observed = [t for t in dict.fromkeys(tensors) if t not in input_names]
    session = make_session(model, observed)
    channel_axes = channel_axes or {}
    hists: Dict[str, TensorHistogram] = {t: TensorHistogram(t, channel_axes.get(t)) for t in dict.fromkeys(tensors)}
    n_samples = 0
    kept = []
    kept_n = 0
    total = min(x for x in (limit, source.total) if x is not None) if (limit or source.total) else None
    with progress_bar(progress, "calibrating", total) as bar:
        task = bar.add_task("calibrating", total=total) if bar is not None else None
        for feed in source.batches(limit):
            try:
                outs = session.run(observed, feed) if observed else []
            except Exception as exc:
                first = str(exc).strip().splitlines()[0]
                raise MxqnError(f"onnxruntime failed on {source.label}: {first}") from None
            try:
                for name, value in zip(observed, outs):
                    hists[name].update(value)
                for name in input_names & hists.keys():
                    hists[name].update(feed[name])
            except NonFiniteError as exc:
                raise MxqnError(str(exc)) from None
            n = int(next(iter(feed.values())).shape[0])
            n_samples += n
            if kept_n < keep_batches:
                kept.append(feed)
                kept_n += n
            if bar is not None:
                bar.update(task, advance=n)
    return hists, n_samples, kept
