"""The held-back check's candidates: which of them can take another's choices, and which are tried.

A candidate that differs from one already chosen only in bias correction, the layer-output
quantizers or the widths of its two end layers takes that one's choices, so the check costs
a few layers' choices and a rewrite per candidate, not a whole conversion each.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..calibration.observers import TensorHistogram
from ..config import QuantConfig
from ..graph.layers import Layer
from .choose import ActDecision, LayerDecision, choose_all, without_bias_correction


#: the held-back check tries the first and last layer at ``keep_bits`` only where they hold at
#: most this share of the weights (at 4 bits, 0.2 bit more per weight on average at most): the
#: user's width stays the model's width. On the bench networks they hold 0.2-2%.
KEEP_ENDS_MAX_SHARE = 0.05


def ends_share(layers: List[LayerDecision]) -> float:
    """The share of the weights held by the first and the last layer (1.0 with fewer than 3)."""
    if len(layers) < 3:
        return 1.0
    return (layers[0].params + layers[-1].params) / max(1, sum(d.params for d in layers))


def choice_key(graph: gs.Graph, config: QuantConfig, cost: float) -> tuple:
    """What a candidate's choices depend on, bias correction and layer-output quantizers aside
    (``auto`` rounding that rounds no layer with data, in a model of rounding cost ``cost``,
    is round to nearest)."""
    d = {**config.to_dict(), "bias_correction": None, "depthwise_shift": None, "qdq_layer_outputs": None,
         "keep_first": None, "keep_last": None, "keep_ends": None}
    # the widths of both ends' choices: keeping the ends at keep_bits must not change the key
    widths = {config.wbits} | ({config.keep_bits} if config.keep_ends_on_trial or config.keep_first
                               or config.keep_last else set())
    if config.rounding == "auto" and not any(config.rounds_with_data(b, cost) for b in widths):
        d["rounding"] = "nearest"
    return id(graph), json.dumps(d, sort_keys=True, default=str)


def choose_candidate(layers: List[Layer], graph: gs.Graph, config: QuantConfig,
                     hists: Dict[str, TensorHistogram], samples: Dict[str, np.ndarray],
                     means: Optional[Dict[str, np.ndarray]], chosen: dict,
                     cost: float) -> Tuple[List[LayerDecision], Dict[str, ActDecision]]:
    """A held-back candidate's decisions. One that only drops bias correction or the
    layer-output quantizers from a candidate already chosen on the same graph takes its
    choices (:func:`without_bias_correction`; the output quantizers are extra entries of the
    activations, which no layer's choice depends on); one that only keeps the first and last
    layer at other widths chooses those layers again and takes the rest (``choose_all``'s
    ``reuse``). ``chosen`` maps :func:`choice_key` to the choices made so far (decisions,
    activations, config); the default's go in first."""
    key = choice_key(graph, config, cost)
    old = chosen.get(key)
    ends = lambda c: (c.keep_first, c.keep_last)  # noqa: E731
    if old is not None and ends(old[2]) == ends(config) and \
            (old[2].quantizes_layer_outputs or not config.quantizes_layer_outputs):
        decisions, acts, _ = old
        if not config.bias_correction:
            decisions = without_bias_correction(decisions, layers)
        if not config.quantizes_layer_outputs:
            inputs = {layer.data.name for layer in layers}
            acts = {t: a for t, a in acts.items() if t in inputs}
        return decisions, acts
    reuse = old if old is not None and old[2].bias_correction == config.bias_correction else None
    decisions, acts = choose_all(layers, hists, config, None, samples, means, reuse=reuse)
    if config.bias_correction and old is None:
        chosen[key] = (decisions, acts, config)
    return decisions, acts
