"""Per-layer bit allocation from the additive noise model (pure numpy, no ONNX).

The model: every quantized tensor ("unit": a layer's weight, or an activation tensor) adds
noise, and to first order the output noise-to-signal ratio is the weighted sum

    1/SQNR_out = sum_i s_i / SQNR_i(b_i)

where ``SQNR_i(b)`` is the unit's own SQNR at ``b`` bits (read off the calibration histogram
or the exact weights for every candidate width) and ``s_i`` its *sensitivity*: how strongly
its noise reaches the output (1 for every unit is the plain MXQN model; see
:mod:`mxqn_onnx.mixed.sensitivity` for how it is measured). A unit's cost is ``size_i * b_i``
bits: parameters for weights, elements per sample for activations.

The optimiser is an exact dynamic programme over cost (the multiple-choice knapsack): for
every total cost it keeps the least achievable noise, so one table answers both questions
(least noise within a budget, least cost reaching a target). Why not greedy: SQNR(b) is
not concave in b (per-channel/clipping choices and the fixed/log switch make the gain per
bit uneven), and greedy marginal-gain-per-cost can then stop one expensive step short of
the optimum; the DP cannot. Costs are counted on a grid of at most ``resolution`` steps per
group; with integer costs that fit the grid (small models, the tests) the answer is exact,
otherwise each option's cost is rounded *up* to the grid, so a budget is never exceeded and
the loss is at most one grid step per unit.

Weights and activations are separate groups because they have separate budgets
(``avg_wbits``/``max_size`` vs ``avg_abits``); the objective is a sum, so the groups are
solved independently and combined along their two cost/noise frontiers for a target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MxqnError

#: Default candidate bit widths.
DEFAULT_BITS_SET = (2, 3, 4, 5, 6, 7, 8)
#: Grid steps per group for the DP (cost resolution).
DEFAULT_RESOLUTION = 4096


def db_to_noise(db: float) -> float:
    """Noise-to-signal ratio (linear) of an SQNR in dB; an exact tensor (+inf dB) is 0."""
    if db is None or db == float("inf"):
        return 0.0
    if db == float("-inf") or db != db:
        return float("inf")
    return float(10.0 ** (-db / 10.0))


def noise_to_db(noise: float) -> float:
    """SQNR in dB of a linear noise-to-signal ratio."""
    if noise <= 0:
        return float("inf")
    if not math.isfinite(noise):
        return float("-inf")
    return float(-10.0 * math.log10(noise))


@dataclass
class Unit:
    """One quantized tensor: its SQNR at each candidate width, its size and sensitivity.

    ``fixed_bits`` pins the width (``keep_first``/``keep_last`` layers, or a group that is not
    being allocated); ``sqnr_db`` must then hold that width.
    """

    kind: str  # "weight" | "act"
    name: str
    size: int
    sqnr_db: Dict[int, float]
    sensitivity: float = 1.0
    fixed_bits: Optional[int] = None
    #: per-width sensitivity (measured with the real quantizer at each width); overrides
    #: ``sensitivity`` for the widths it holds
    sensitivity_by_bits: Optional[Dict[int, float]] = None

    def sensitivity_at(self, bits: int) -> float:
        if self.sensitivity_by_bits and bits in self.sensitivity_by_bits:
            return self.sensitivity_by_bits[bits]
        return self.sensitivity

    def options(self, bits_set: Sequence[int]) -> List[int]:
        if self.fixed_bits is not None:
            return [self.fixed_bits]
        return sorted(b for b in bits_set if b in self.sqnr_db)

    def noise(self, bits: int) -> float:
        """This unit's contribution to ``1/SQNR_out`` at ``bits``."""
        return self.sensitivity_at(bits) * db_to_noise(self.sqnr_db[bits])


@dataclass
class Frontier:
    """Least noise for every grid cost of one group of units (exact-cost DP table)."""

    units: List[Unit]
    options: List[List[int]]
    quantum: float  # cost (bits) of one grid step
    base_cost: float  # cost with every unit at its cheapest option
    noise: np.ndarray  # [G+1] least noise at exactly this grid cost (inf: unreachable)
    choice: List[np.ndarray]  # per unit, [len] index into its options (-1: unreachable)
    steps: List[List[int]]  # per unit, grid cost of each option above its cheapest

    @property
    def best_within(self) -> np.ndarray:
        """Least noise at grid cost <= j (non-increasing in j)."""
        return np.minimum.accumulate(self.noise)

    def max_steps(self) -> int:
        return len(self.noise) - 1

    def steps_for_budget(self, budget_bits: Optional[float]) -> int:
        """Largest grid cost whose true cost is surely within ``budget_bits``."""
        if budget_bits is None:
            return self.max_steps()
        room = budget_bits - self.base_cost
        if room < -1e-9 * max(1.0, abs(budget_bits)):
            return -1
        return min(self.max_steps(), int(math.floor(max(room, 0.0) / self.quantum + 1e-9)))

    def at_most(self, j_max: int) -> int:
        """Grid cost in ``[0, j_max]`` with the least noise (the cheapest on ties)."""
        within = self.noise[: j_max + 1]
        return int(np.argmin(within))  # argmin returns the first (cheapest) minimum

    def assignment(self, j: int) -> Dict[str, int]:
        """Bits per unit name for the solution at exactly grid cost ``j``."""
        out: Dict[str, int] = {}
        for u in range(len(self.units) - 1, -1, -1):
            o = int(self.choice[u][j])
            if o < 0:
                raise ValueError(f"grid cost {j} is not reachable")
            out[self.units[u].name] = self.options[u][o]
            j -= self.steps[u][o]
        return out


def build_frontier(units: List[Unit], bits_set: Sequence[int],
                   resolution: int = DEFAULT_RESOLUTION) -> Frontier:
    """The DP table of one group: least noise at every grid cost."""
    options = [u.options(bits_set) for u in units]
    for u, opts in zip(units, options):
        if not opts:
            raise MxqnError(f"{u.kind} '{u.name}': no SQNR for any width in {list(bits_set)}")
    extra = [[u.size * (b - opts[0]) for b in opts] for u, opts in zip(units, options)]
    total_extra = sum(e[-1] for e in extra)
    # a grid of `resolution` steps over the largest possible extra cost; costs round up
    quantum = max(1.0, total_extra / resolution) if total_extra > resolution else 1.0
    steps = [[int(math.ceil(c / quantum - 1e-9)) for c in e] for e in extra]
    base = float(sum(u.size * opts[0] for u, opts in zip(units, options)))
    dp = np.zeros(1, dtype=np.float64)
    choices: List[np.ndarray] = []
    for unit, opts, st in zip(units, options, steps):
        size = len(dp) + st[-1]
        new = np.full(size, np.inf)
        arg = np.full(size, -1, dtype=np.int16)
        for o, (b, s) in enumerate(zip(opts, st)):
            cand = np.full(size, np.inf)
            cand[s:s + len(dp)] = dp + unit.noise(b)
            better = cand < new  # strict: on ties the fewer-bit option (listed first) stays
            new[better] = cand[better]
            arg[better] = o
        dp = new
        choices.append(arg)
    return Frontier(units, options, quantum, base, dp, choices, steps)


@dataclass
class Allocation:
    """Chosen widths and what the noise model predicts for them."""

    bits: Dict[Tuple[str, str], int]  # (kind, name) -> bits
    predicted_db: float
    weight_bits: float  # total weight bits (sum params * bits)
    act_bits: float  # total activation bits per sample
    reached: Optional[bool] = None  # target mode: does the prediction reach the target
    notes: List[str] = field(default_factory=list)

    def of(self, kind: str, name: str) -> int:
        return self.bits[(kind, name)]


def _group(units: List[Unit], kind: str) -> List[Unit]:
    return [u for u in units if u.kind == kind]


def predict_db(units: List[Unit], bits: Dict[Tuple[str, str], int]) -> float:
    """Predicted output SQNR (dB) of an assignment under the weighted noise model."""
    return noise_to_db(sum(u.noise(bits[(u.kind, u.name)]) for u in units))


class Allocator:
    """Frontiers of one problem, built once; :meth:`solve` then answers any target cheaply.

    Multiplying every unit's noise by ``noise_scale`` (the refinement's correction) is the
    same as dividing the target noise by it, so the frontiers do not depend on it.
    """

    def __init__(self, units: List[Unit], bits_set: Sequence[int] = DEFAULT_BITS_SET, *,
                 weight_budget_bits: Optional[float] = None, act_budget_bits: Optional[float] = None,
                 resolution: int = DEFAULT_RESOLUTION) -> None:
        self.units = units
        self.fronts: Dict[str, Frontier] = {}
        self.limits: Dict[str, int] = {}
        for kind, budget in (("weight", weight_budget_bits), ("act", act_budget_bits)):
            f = build_frontier(_group(units, kind), bits_set, resolution)
            j = f.steps_for_budget(budget)
            if j < 0:
                what = "weight" if kind == "weight" else "activation"
                raise MxqnError(
                    f"the {what} budget ({budget:.0f} bits) is below the smallest possible "
                    f"({f.base_cost:.0f} bits, every {what} at its lowest allowed width); raise it"
                )
            self.fronts[kind], self.limits[kind] = f, j

    def solve(self, target_db: Optional[float] = None, noise_scale: float = 1.0) -> Allocation:
        """Least cost reaching ``target_db`` (or, without a target, least noise) within budgets."""
        fw, fa = self.fronts["weight"], self.fronts["act"]
        jw_max, ja_max = self.limits["weight"], self.limits["act"]
        reached = None
        notes: List[str] = []
        if target_db is None:
            jw, ja = fw.at_most(jw_max), fa.at_most(ja_max)
        else:
            jw, ja, reached = _cheapest_reaching(fw, fa, jw_max, ja_max,
                                                 db_to_noise(target_db) / noise_scale)
            if not reached:
                notes.append(f"no assignment within the bit set and budgets is predicted to reach "
                             f"{target_db:.1f} dB; used the highest predicted SQNR instead")
        bits = {("weight", n): b for n, b in fw.assignment(jw).items()}
        bits.update({("act", n): b for n, b in fa.assignment(ja).items()})
        units = self.units
        return Allocation(
            bits=bits, predicted_db=predict_db(units, bits),
            weight_bits=float(sum(u.size * bits[(u.kind, u.name)] for u in units if u.kind == "weight")),
            act_bits=float(sum(u.size * bits[(u.kind, u.name)] for u in units if u.kind == "act")),
            reached=reached, notes=notes,
        )


def allocate(units: List[Unit], bits_set: Sequence[int] = DEFAULT_BITS_SET, *,
             target_db: Optional[float] = None, weight_budget_bits: Optional[float] = None,
             act_budget_bits: Optional[float] = None, noise_scale: float = 1.0,
             resolution: int = DEFAULT_RESOLUTION) -> Allocation:
    """Choose a width per unit.

    * ``target_db`` given: the least total cost (weight bits + activation bits per sample)
      whose predicted output SQNR reaches the target, within any budgets given; when no
      assignment reaches it, the highest predicted SQNR within the budgets (``reached=False``).
    * otherwise: the highest predicted SQNR within the budgets.

    ``noise_scale`` multiplies every unit's noise (the refinement's correction factor);
    ``predicted_db`` is reported without it. A group without a budget is unconstrained up to
    the largest width (callers pin units with ``fixed_bits`` to keep a group out of the
    allocation). Raises :class:`MxqnError` when a budget is below the cheapest assignment.
    """
    return Allocator(units, bits_set, weight_budget_bits=weight_budget_bits,
                     act_budget_bits=act_budget_bits, resolution=resolution).solve(target_db, noise_scale)


def _cheapest_reaching(fw: Frontier, fa: Frontier, jw_max: int, ja_max: int, target_noise: float):
    """Grid costs ``(jw, ja, reached)`` of the cheapest pair whose noise sum is <= target."""
    nw = fw.best_within[: jw_max + 1]
    na = fa.best_within[: ja_max + 1]
    # for each weight cost, the cheapest activation cost with na <= target - nw
    room = target_noise * (1 + 1e-12) - nw
    # na is non-increasing: search on its negation (non-decreasing)
    ja = np.searchsorted(-na, -room, side="left")
    ok = (ja <= ja_max) & np.isfinite(nw)
    if not np.any(ok):
        return fw.at_most(jw_max), fa.at_most(ja_max), False
    jw_idx = np.flatnonzero(ok)
    ja_ok = ja[ok]
    total = jw_idx * fw.quantum + ja_ok * fa.quantum
    best = int(np.argmin(total))
    jw_best, ja_best = int(jw_idx[best]), int(ja_ok[best])
    # best_within is a prefix minimum: pick the grid cost that actually attains it
    return fw.at_most(jw_best), fa.at_most(ja_best), True


def brute_force(units: List[Unit], bits_set: Sequence[int], *, target_db: Optional[float] = None,
                weight_budget_bits: Optional[float] = None,
                act_budget_bits: Optional[float] = None) -> Optional[Dict[Tuple[str, str], int]]:
    """Exhaustive reference optimiser for small cases (tests): same objective as :func:`allocate`."""
    import itertools

    opts = [u.options(bits_set) for u in units]
    best_key, best = None, None
    for combo in itertools.product(*opts):
        wcost = sum(u.size * b for u, b in zip(units, combo) if u.kind == "weight")
        acost = sum(u.size * b for u, b in zip(units, combo) if u.kind == "act")
        if weight_budget_bits is not None and wcost > weight_budget_bits:
            continue
        if act_budget_bits is not None and acost > act_budget_bits:
            continue
        noise = sum(u.noise(b) for u, b in zip(units, combo))
        if target_db is None:
            key = (noise, wcost + acost)
        else:
            key = (0 if noise <= db_to_noise(target_db) * (1 + 1e-12) else 1,
                   wcost + acost if noise <= db_to_noise(target_db) * (1 + 1e-12) else noise)
        if best_key is None or key < best_key:
            best_key, best = key, {(u.kind, u.name): b for u, b in zip(units, combo)}
    return best
