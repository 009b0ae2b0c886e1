"""Mixed precision in the conversion pipeline: SQNR tables, sensitivities, allocation,
verification with bounded refinement, and the accuracy-target search.

:func:`run` is called by :func:`mxqn_onnx.api.quantize` when the config asks for an
allocation; it gets the pipeline's own steps as callables (build a quantized model for given
per-layer widths, measure it on calibration data, evaluate it on labelled data) so this
module holds the strategy and the API keeps the plumbing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..calibration.observers import TensorHistogram
from ..config import QuantConfig
from ..errors import MxqnError
from ..graph.layers import Layer
from ..quant.choose import choose_activation, choose_weight
from . import allocate as A

#: A measured output SQNR this far above the target triggers one more round that saves bits.
OVERSHOOT_DB = 1.5
#: Output SQNR targets tried by the accuracy search (dB), before de-duplication.
SEARCH_TARGETS_DB = tuple(range(4, 61))

Bits = List[Tuple[int, int]]  # per layer (weight bits, activation bits)


def keep_indices(layers: Sequence[Layer], config: QuantConfig) -> set:
    """Layers pinned at ``keep_bits`` by ``keep_first``/``keep_last``."""
    keep = set()
    if config.keep_first and layers:
        keep.add(0)
    if config.keep_last and layers:
        keep.add(len(layers) - 1)
    return keep


def build_units(layers: Sequence[Layer], hists: Dict[str, TensorHistogram], n_samples: int,
                config: QuantConfig) -> List[A.Unit]:
    """SQNR at every candidate width for every weight and activation tensor.

    Free widths come from ``config.bits_set``; a group that is not being allocated stays at
    ``wbits``/``abits``, and kept layers at ``keep_bits``. Activation sizes are elements per
    sample, read off the calibration histograms (count / samples).
    """
    keep = keep_indices(layers, config)
    free_w, free_a = config.allocates_weights, config.allocates_activations
    units: List[A.Unit] = []
    consumers: Dict[str, List[int]] = {}
    for i, layer in enumerate(layers):
        fixed = config.keep_bits if i in keep else (None if free_w else config.wbits)
        widths = [fixed] if fixed is not None else list(config.bits_set)
        w = layer.weight
        table = {b: choose_weight(w, b, config.weight_granularity, layer.channel_axis,
                                  config.channel_gain_db, config.weight_clip).sqnr_db for b in widths}
        units.append(A.Unit("weight", layer.name, int(w.size), table, 1.0, fixed))
        consumers.setdefault(layer.data.name, []).append(i)
    act_fixed: Dict[str, Optional[int]] = {}
    for t, idx in consumers.items():
        # a tensor read by a kept layer is quantized at keep_bits for all its readers
        if any(i in keep for i in idx):
            act_fixed[t] = config.keep_bits
        else:
            act_fixed[t] = None if free_a else config.abits
    def act_table(item):
        t, fixed = item
        widths = [fixed] if fixed is not None else list(config.bits_set)
        return {b: choose_activation(hists[t], b, config.act_mode, config.log_margin_db).sqnr_db for b in widths}

    # every tensor at every width: the largest part of this step; numpy releases the GIL in
    # the binned error sums, so a thread per core shortens it (map keeps the order)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        tables = list(pool.map(act_table, act_fixed.items()))
    for (t, fixed), table in zip(act_fixed.items(), tables):
        size = max(1, int(round(hists[t].total / max(n_samples, 1))))
        units.append(A.Unit("act", t, size, table, 1.0, fixed))
    return units


def budgets(units: Sequence[A.Unit], layers: Sequence[Layer], config: QuantConfig):
    """``(weight_budget_bits, act_budget_bits)`` from the config's averages and size cap."""
    params = sum(u.size for u in units if u.kind == "weight")
    elems = sum(u.size for u in units if u.kind == "act")
    wb = None
    if config.avg_wbits is not None:
        wb = config.avg_wbits * params
    if config.max_size_mb is not None:
        bias_bits = 32 * sum(int(l.bias.size) for l in layers if l.bias is not None)
        size_bits = config.max_size_mb * 1e6 * 8 - bias_bits
        if size_bits <= 0:
            raise MxqnError(f"max_size_mb={config.max_size_mb} does not even hold the int32 biases "
                            f"({bias_bits / 8e6:.4f} MB); raise it")
        wb = size_bits if wb is None else min(wb, size_bits)
    ab = config.avg_abits * elems if config.avg_abits is not None else None
    return wb, ab


def layer_bits(layers: Sequence[Layer], alloc: A.Allocation) -> Bits:
    """Per-layer ``(wbits, abits)`` for :func:`mxqn_onnx.quant.choose.choose_all`."""
    return [(alloc.of("weight", l.name), alloc.of("act", l.data.name)) for l in layers]


def packed_weight_bytes(layers: Sequence[Layer], wbits: Sequence[int]) -> int:
    """Deployed weight storage: weights packed at their widths plus int32 biases.

    (The ONNX file keeps <= 8-bit codes in int8 containers, so its size does not shrink below
    8 bits; this is the size an edge runtime storing packed codes needs.)
    """
    bits = sum(int(l.weight.size) * b for l, b in zip(layers, wbits))
    bias = sum(4 * int(l.bias.size) for l in layers if l.bias is not None)
    return int(np.ceil(bits / 8)) + bias


@dataclass
class Outcome:
    """What :func:`run` chose, and the record stored in the metadata/report."""

    bits: Bits
    built: tuple  # whatever ``build`` returned for the chosen widths
    comparison: object  # the calibration-data Comparison of the chosen model (or None)
    record: dict = field(default_factory=dict)


def _unit_table(units: Sequence[A.Unit], alloc: A.Allocation) -> List[dict]:
    return [{"kind": u.kind, "name": u.name, "size": u.size,
             "sensitivity": u.sensitivity_at(alloc.of(u.kind, u.name)),
             "sensitivity_by_bits": {str(b): v for b, v in sorted((u.sensitivity_by_bits or {}).items())},
             "fixed": u.fixed_bits is not None, "bits": alloc.of(u.kind, u.name),
             "sqnr_db": {str(b): v for b, v in sorted(u.sqnr_db.items())}} for u in units]


def _round_record(alloc: A.Allocation, units, layers, scale: float, measured: Optional[float]) -> dict:
    params = sum(u.size for u in units if u.kind == "weight")
    elems = sum(u.size for u in units if u.kind == "act")
    wbits = [alloc.of("weight", l.name) for l in layers]
    return {
        "predicted_db": alloc.predicted_db,
        "noise_correction": scale,
        "predicted_corrected_db": A.noise_to_db(A.db_to_noise(alloc.predicted_db) * scale),
        "measured_db": measured,
        "avg_wbits": alloc.weight_bits / max(params, 1),
        "avg_abits": alloc.act_bits / max(elems, 1),
        "packed_weight_bytes": packed_weight_bytes(layers, wbits),
        "predicted_reaches_target": alloc.reached,
    }


Probe = Callable[[Dict[Tuple[str, str], List[int]]], Dict[Tuple[str, str], Dict[int, float]]]


def run(layers: Sequence[Layer], hists: Dict[str, TensorHistogram], n_samples: int,
        config: QuantConfig, probe: Optional[Probe],
        build: Callable[[Bits], tuple], measure: Callable[[tuple], Optional[object]],
        evaluate: Optional[Callable[[tuple], object]] = None,
        log: Callable[[str], None] = lambda s: None) -> Outcome:
    """Allocate widths, build and verify; refine toward a target; or search an accuracy target.

    ``probe({unit: widths}) -> {unit: {width: sensitivity}}`` measures how much of each unit's
    noise reaches the output at each candidate width (None: every sensitivity is 1).
    ``build(bits) -> built`` makes a quantized model (``built[-1]`` is the ModelProto);
    ``measure(built)`` returns the calibration-data Comparison (None when verification is
    off); ``evaluate(built)`` returns a Comparison with labels (accuracy search).
    """
    units = build_units(layers, hists, n_samples, config)
    wb, ab = budgets(units, layers, config)
    record: dict = {
        "mode": config.allocation_mode,
        "bits_set": list(config.bits_set),
        "target_sqnr_db": config.target_sqnr_db,
        "budgets": {"avg_wbits": config.avg_wbits, "avg_abits": config.avg_abits,
                    "max_size_mb": config.max_size_mb},
        "sensitivity": config.sensitivity,
        "optimiser": "exact DP over cost (multiple-choice knapsack), weights and activations as two groups",
        "rounds": [],
        "evaluations": [],
        "notes": [],
    }
    if probe is not None:
        sens = probe({(u.kind, u.name): u.options(config.bits_set) for u in units})
        for u in units:
            u.sensitivity_by_bits = {int(b): float(v) for b, v in sens.get((u.kind, u.name), {}).items()}
    allocator = A.Allocator(units, config.bits_set, weight_budget_bits=wb, act_budget_bits=ab)
    if config.max_accuracy_drop is not None:
        outcome = _accuracy_search(layers, units, allocator, config, build, measure, evaluate, record, log)
    else:
        outcome = _target_or_budget(layers, units, allocator, config, build, measure, record, log)
    chosen_alloc = outcome.pop("alloc")
    record["units"] = _unit_table(units, chosen_alloc)
    return Outcome(layer_bits(layers, chosen_alloc), outcome["built"], outcome["comparison"], record)


def _target_or_budget(layers, units, allocator: A.Allocator, config: QuantConfig, build, measure,
                      record: dict, log) -> dict:
    """Budget: one allocation, verified. Target: allocate, verify, correct, at most N times."""
    target = config.target_sqnr_db
    scale = 1.0
    s_ok: Optional[float] = None  # smallest correction whose model reached the target
    s_miss: Optional[float] = None  # largest correction whose model missed it
    best = None  # (key, alloc, built, comparison, round index)
    seen: Dict[tuple, int] = {}
    for r in range(config.refine_steps + 1):
        alloc = allocator.solve(target, noise_scale=scale)
        for n in alloc.notes:
            if n not in record["notes"]:
                record["notes"].append(n)
        key = tuple(sorted(alloc.bits.items()))
        if key in seen:
            record["notes"].append(f"round {r}: the corrected model gives the same widths as round "
                                   f"{seen[key]}; stopped refining")
            break
        seen[key] = r
        built = build(layer_bits(layers, alloc))
        comp = measure(built)
        measured = comp.output_sqnr_db if comp is not None else None
        rec = _round_record(alloc, units, layers, scale, measured)
        rec["round"] = r
        record["rounds"].append(rec)
        log(f"allocation round {r}: predicted {rec['predicted_corrected_db']:.2f} dB, measured "
            + ("-" if measured is None else f"{measured:.2f} dB")
            + f", avg W {rec['avg_wbits']:.2f} / A {rec['avg_abits']:.2f} bits")
        cost = alloc.weight_bits + alloc.act_bits
        if target is None or measured is None:
            best = (None, alloc, built, comp, r)
            if target is not None:
                record["notes"].append("verification is off: the target is predicted, not measured")
            break
        ok = measured >= target
        # prefer: reaches the target and is cheapest; otherwise the highest measured SQNR
        rank = (0, cost) if ok else (1, -measured)
        if best is None or rank < best[0]:
            best = (rank, alloc, built, comp, r)
        if ok and measured - target <= OVERSHOOT_DB:
            break
        if not ok and alloc.reached is False:
            record["notes"].append(f"round {r}: even the highest-SQNR assignment within the bit set "
                                   "and budgets misses the target; stopped")
            break
        if r == config.refine_steps:
            break
        # the measured/predicted noise ratio becomes the correction of every unit's noise;
        # once one correction missed and another reached, bisect between them instead, as
        # the measured SQNR moves in steps with the widths and the ratio alone can oscillate
        if ok:
            s_ok = scale if s_ok is None else min(s_ok, scale)
        else:
            s_miss = scale if s_miss is None else max(s_miss, scale)
        new = A.db_to_noise(measured) / max(A.db_to_noise(alloc.predicted_db), 1e-300)
        if s_ok is not None and s_miss is not None and not (s_miss < new < s_ok):
            new = float(np.sqrt(s_ok * s_miss))
        scale = new
    _, alloc, built, comp, r_best = best
    record["chosen_round"] = r_best
    if target is not None and comp is not None:
        m = comp.output_sqnr_db
        if m >= target:
            record["result"] = (f"target {target:.1f} dB reached: measured {m:.2f} dB "
                                f"(round {r_best} of {len(record['rounds'])})")
        else:
            record["result"] = (f"target {target:.1f} dB NOT reached: best measured {m:.2f} dB after "
                                f"{len(record['rounds'])} round(s); allow wider widths (--bits-set), "
                                "a larger budget or more refinement rounds")
    elif comp is not None:
        record["result"] = f"budget allocation: predicted {alloc.predicted_db:.2f} dB, measured {comp.output_sqnr_db:.2f} dB"
    else:
        record["result"] = f"predicted {alloc.predicted_db:.2f} dB (not verified)"
    return {"alloc": alloc, "built": built, "comparison": comp}


def _accuracy_search(layers, units, allocator: A.Allocator, config: QuantConfig, build, measure,
                     evaluate, record: dict, log) -> dict:
    """Smallest model within ``max_accuracy_drop`` top-1 points of FP32.

    Candidates are the allocations for a ladder of output-SQNR targets, de-duplicated and
    ordered by cost; the SQNR model orders them, real evaluations on the labelled data decide.
    Accuracy is assumed to grow with cost along the ladder, so a binary search needs about
    log2(candidates) evaluations; every evaluation is recorded.
    """
    if evaluate is None:
        raise MxqnError("max_accuracy_drop needs labelled validation data (--val FILE.npz with 'labels')")
    cands: List[A.Allocation] = []
    keys = set()
    for t in SEARCH_TARGETS_DB:
        a = allocator.solve(float(t))
        key = tuple(sorted(a.bits.items()))
        if key not in keys:
            keys.add(key)
            cands.append((t, a))
        if a.reached is False:
            break  # higher targets give the same best-within-budget assignment
    cands.sort(key=lambda ta: (ta[1].weight_bits + ta[1].act_bits, -ta[1].predicted_db))
    cache: Dict[int, tuple] = {}

    def check(i: int) -> bool:
        if i in cache:
            return cache[i][0]
        t, a = cands[i]
        built = build(layer_bits(layers, a))
        c = evaluate(built)
        if c.top1_ref is None:
            raise MxqnError("the validation data has no labels; accuracy cannot be measured")
        drop = 100.0 * (c.top1_ref - c.top1_quant)
        ok = drop <= config.max_accuracy_drop
        rec = _round_record(a, units, layers, 1.0, None)
        rec.update({"candidate": i, "of": len(cands), "target_db": float(t),
                    "val_output_sqnr_db": c.output_sqnr_db, "top1_fp32": c.top1_ref,
                    "top1_quant": c.top1_quant, "drop_points": drop, "passes": ok})
        record["evaluations"].append(rec)
        log(f"evaluation {len(record['evaluations'])}: candidate {i + 1}/{len(cands)} (target "
            f"{t} dB, predicted {a.predicted_db:.2f} dB, avg W {rec['avg_wbits']:.2f} / A "
            f"{rec['avg_abits']:.2f}): top-1 {100 * c.top1_quant:.2f}% vs FP32 {100 * c.top1_ref:.2f}% "
            f"({'pass' if ok else 'fail'})")
        cache[i] = (ok, a, built)
        return ok

    hi = len(cands) - 1
    if not check(hi):
        record["notes"].append(f"even the largest candidate drops more than {config.max_accuracy_drop} "
                               "points; it is returned")
        chosen = hi
    else:
        lo, chosen = 0, hi
        while lo < chosen:  # invariant: `chosen` passes; answer in [lo, chosen]
            mid = (lo + chosen) // 2
            if check(mid):
                chosen = mid
            else:
                lo = mid + 1
    ok, alloc, built = cache[chosen]
    comp = measure(built)
    rec = _round_record(alloc, units, layers, 1.0, comp.output_sqnr_db if comp is not None else None)
    rec["round"] = 0
    record["rounds"].append(rec)
    ev = next(e for e in record["evaluations"] if e["candidate"] == chosen)
    record["chosen_candidate"] = chosen
    record["result"] = (f"{'smallest model within' if ok else 'NO candidate within'} "
                        f"{config.max_accuracy_drop} points: top-1 {100 * ev['top1_quant']:.2f}% vs FP32 "
                        f"{100 * ev['top1_fp32']:.2f}% at avg W {ev['avg_wbits']:.2f} / A "
                        f"{ev['avg_abits']:.2f} bits ({len(record['evaluations'])} evaluations)")
    return {"alloc": alloc, "built": built, "comparison": comp}
