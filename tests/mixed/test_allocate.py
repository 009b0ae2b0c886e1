"""The bit allocator on synthetic layer-SQNR tables: against brute force, budgets, targets."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mxqn_onnx.errors import MxqnError
from mxqn_onnx.mixed.allocate import (Allocator, Unit, allocate, brute_force, build_frontier, db_to_noise,
                                noise_to_db, predict_db)

BITS = (2, 3, 4, 6, 8)


def _random_units(rng, n, bits=BITS):
    units = []
    for i in range(n):
        kind = "weight" if i % 2 == 0 else "act"
        # roughly 6 dB per bit, with noise so that SQNR(b) is not concave
        base, slope = rng.uniform(-5, 10), rng.uniform(3, 7)
        table = {b: base + slope * b + rng.normal(0, 2.5) for b in bits}
        units.append(Unit(kind, f"u{i}", int(rng.integers(1, 60)), table, float(rng.uniform(0.02, 3.0))))
    return units


def _cost(units, bits):
    return sum(u.size * bits[(u.kind, u.name)] for u in units)


def _wcost(units, bits, kind):
    return sum(u.size * bits[(u.kind, u.name)] for u in units if u.kind == kind)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 5), wq=st.integers(0, 24), aq=st.integers(0, 24))
def test_budget_matches_brute_force(seed, n, wq, aq):
    """Least noise within two budgets: the DP finds the exhaustive optimum (integer costs)."""
    rng = np.random.default_rng(seed)
    units = _random_units(rng, n)
    # average widths 2, 2.25, ..., 8: budgets exact in binary floating point
    wb = sum(u.size for u in units if u.kind == "weight") * (2 + wq / 4)
    ab = sum(u.size for u in units if u.kind == "act") * (2 + aq / 4)
    got = allocate(units, BITS, weight_budget_bits=wb, act_budget_bits=ab)
    ref = brute_force(units, BITS, weight_budget_bits=wb, act_budget_bits=ab)
    assert _wcost(units, got.bits, "weight") <= wb + 1e-9
    assert _wcost(units, got.bits, "act") <= ab + 1e-9
    assert predict_db(units, got.bits) == pytest.approx(predict_db(units, ref), abs=1e-9)
    assert got.predicted_db == pytest.approx(predict_db(units, got.bits))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 5), target=st.floats(5.0, 55.0))
def test_target_matches_brute_force(seed, n, target):
    """Least total cost reaching a target: same cost as exhaustive search, or honestly unreachable."""
    rng = np.random.default_rng(seed)
    units = _random_units(rng, n)
    got = allocate(units, BITS, target_db=target)
    ref = brute_force(units, BITS, target_db=target)
    ref_reaches = predict_db(units, ref) >= target - 1e-9
    assert got.reached == ref_reaches
    if ref_reaches:
        assert got.predicted_db >= target - 1e-9
        assert _cost(units, got.bits) == _cost(units, ref)
    else:
        # unreachable: the highest SQNR there is, which is every unit at its widest
        assert got.predicted_db == pytest.approx(predict_db(units, ref), abs=1e-9)
        assert got.notes


def test_known_optimum_by_hand():
    """Two equal layers, one ten times as sensitive: it gets the bits."""
    table = {b: 6.0 * b for b in BITS}
    units = [Unit("weight", "calm", 100, table, 0.1), Unit("weight", "touchy", 100, table, 1.0),
             Unit("act", "a", 10, table, 1.0, fixed_bits=8)]
    got = allocate(units, BITS, weight_budget_bits=100 * (4 + 6))
    assert got.of("weight", "touchy") == 6 and got.of("weight", "calm") == 4
    assert got.of("act", "a") == 8  # pinned
    # uniform 5/5 would be infeasible in the bit set; 4/6 beats 6/4 by the sensitivity ratio
    swapped = {**got.bits, ("weight", "touchy"): 4, ("weight", "calm"): 6}
    assert predict_db(units, got.bits) > predict_db(units, swapped)


def test_sensitivity_changes_the_answer():
    """Same SQNR tables and budget, sensitivities swapped: the allocation swaps with them."""
    rng = np.random.default_rng(3)
    table = {b: 6.0 * b + rng.normal(0, 1) for b in BITS}
    units = [Unit("weight", "x", 50, table, 0.05), Unit("weight", "y", 50, dict(table), 2.0)]
    budget = 50 * 10
    a = allocate(units, BITS, weight_budget_bits=budget)
    units[0].sensitivity, units[1].sensitivity = units[1].sensitivity, units[0].sensitivity
    b = allocate(units, BITS, weight_budget_bits=budget)
    assert a.of("weight", "y") > a.of("weight", "x")
    assert (b.of("weight", "x"), b.of("weight", "y")) == (a.of("weight", "y"), a.of("weight", "x"))


def test_noise_scale_is_a_target_shift():
    """Scaling every unit's noise by k equals asking for a target 10 log10(k) dB higher."""
    rng = np.random.default_rng(5)
    units = _random_units(rng, 6)
    alloc = Allocator(units, BITS)
    a = alloc.solve(25.0, noise_scale=2.0)
    b = alloc.solve(25.0 + 10 * np.log10(2.0))
    assert a.bits == b.bits


def test_large_costs_use_a_conservative_grid():
    """Costs far above the grid resolution: budgets still hold, result close to the optimum."""
    rng = np.random.default_rng(7)
    units = _random_units(rng, 5)
    for u in units:
        u.size *= 10_000
    wb = sum(u.size for u in units if u.kind == "weight") * 4.5
    got = allocate(units, BITS, weight_budget_bits=wb, resolution=64)
    ref = brute_force(units, BITS, weight_budget_bits=wb)
    assert _wcost(units, got.bits, "weight") <= wb
    assert predict_db(units, got.bits) <= predict_db(units, ref) + 1e-9
    assert predict_db(units, got.bits) >= predict_db(units, ref) - 1.5


def test_budget_below_minimum_is_refused():
    units = [Unit("weight", "w", 10, {b: 6.0 * b for b in BITS}), Unit("act", "a", 10, {b: 6.0 * b for b in BITS})]
    with pytest.raises(MxqnError, match="below the smallest possible"):
        allocate(units, BITS, weight_budget_bits=10)


def test_frontier_is_exact_least_noise_per_cost():
    """Every reachable grid cost holds the least noise among assignments of exactly that cost."""
    rng = np.random.default_rng(11)
    units = _random_units(rng, 3)
    units = [Unit("weight", u.name, u.size, u.sqnr_db, u.sensitivity) for u in units]
    f = build_frontier(units, BITS)
    assert f.quantum == 1.0
    best = {}
    for combo in itertools.product(BITS, repeat=len(units)):
        extra = sum(u.size * (b - 2) for u, b in zip(units, combo))
        noise = sum(u.noise(b) for u, b in zip(units, combo))
        best[extra] = min(best.get(extra, np.inf), noise)
    reachable = np.flatnonzero(np.isfinite(f.noise))
    assert set(reachable.tolist()) == set(best)
    for j in reachable:
        assert f.noise[j] == pytest.approx(best[int(j)])
        bits = f.assignment(int(j))
        assert sum(u.size * (bits[u.name] - 2) for u in units) == j


def test_db_noise_roundtrip():
    for db in (-3.0, 0.0, 12.5, 80.0):
        assert noise_to_db(db_to_noise(db)) == pytest.approx(db)
    assert db_to_noise(float("inf")) == 0.0 and noise_to_db(0.0) == float("inf")
