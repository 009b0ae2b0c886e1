"""``mxqn-onnx inspect``: what a model would have quantized, or what an mxqn model decided."""

from __future__ import annotations

import json

import numpy as np
from rich.console import Console
from rich.table import Table

from .errors import MxqnError
from .layers import find_layers
from .loading import METADATA_KEY, is_mxqn_model, normalise


def inspect_model(path) -> dict:
    """For an mxqn model, its stored decisions; otherwise the layers it would quantize."""
    import onnx

    from .loading import check_quantizable

    try:
        model = onnx.load(str(path), load_external_data=True)
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
        from .report import print_report

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
