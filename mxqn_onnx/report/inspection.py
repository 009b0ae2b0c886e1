"""What a file holds: the layers a model would quantize, an mxqn model's stored decisions, or a
JSON report (``mxqn-onnx inspect`` and ``mxqn-onnx report`` read files through here; printing the
decisions is :mod:`mxqn_onnx.report.tables`' job)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..errors import MxqnError
from ..graph.layers import find_layers
from ..graph.loading import METADATA_KEY, is_mxqn_model, normalise
from .tables import print_report


def inspect_model(path) -> dict:
    """For an mxqn model, its stored decisions; otherwise the layers it would quantize."""
    from ..graph.loading import check_quantizable, read_model

    try:
        model = read_model(path)
    except FileNotFoundError:
        raise MxqnError(f"{path}: no such file; give the path of an .onnx model") from None
    except Exception as exc:
        raise MxqnError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if is_mxqn_model(model):
        meta = next(p.value for p in model.metadata_props if p.key == METADATA_KEY)
        return {"kind": "mxqn", "decisions": json.loads(meta)}
    check_quantizable(model, str(path))
    graph = normalise(model)
    layers, skipped = find_layers(graph)
    return {
        "kind": "fp32",
        "layers": [
            {"name": l.name, "op": l.op, "weight_shape": list(l.weight.shape), "params": int(l.weight.size),
             "input": l.data.name, "channel_axis": l.channel_axis, "bias": l.bias_index is not None}
            for l in layers
        ],
        "float_layers": [vars(s) for s in skipped],
    }


def print_inspection(info: dict, console: Console) -> None:
    if info["kind"] == "mxqn":
        print_report(info["decisions"], console, title="mxqn model: stored decisions")
        return
    t = Table(title="layers mxqn-onnx would quantize", header_style="bold")
    for col in ("layer", "op", "weight shape", "params", "input tensor", "bias"):
        t.add_column(col, overflow="fold")
    for l in info["layers"]:
        t.add_row(l["name"], l["op"], "x".join(map(str, l["weight_shape"])), str(l["params"]), l["input"],
                  "yes" if l["bias"] else "no")
    console.print(t)
    total = int(np.sum([l["params"] for l in info["layers"]])) if info["layers"] else 0
    console.print(f"{len(info['layers'])} layers, {total} weights", highlight=False)
    for s in info["float_layers"]:
        console.print(f"left in float: {s['name']} ({s['op']}): {s['reason']}", highlight=False, markup=False)


def load_report(path) -> tuple:
    """``(report, kind)`` from an mxqn model's metadata (``model``) or a JSON report (``json``)."""
    p = Path(path)
    if not p.is_file():
        raise MxqnError(f"{path}: no such file; give an mxqn .onnx model or a JSON report")
    if p.suffix.lower() == ".json":
        try:
            return json.loads(p.read_text()), "json"
        except ValueError as exc:
            raise MxqnError(f"{path}: not a JSON report ({exc})") from None
    info = inspect_model(p)
    if info["kind"] != "mxqn":
        raise MxqnError(f"{path}: not a model converted by mxqn-onnx (no decisions in its metadata)")
    return info["decisions"], "model"
