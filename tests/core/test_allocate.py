"""core/allocate.py: per-layer ranks under a parameter budget, against brute force over every rank vector, never
over budget, deterministic, equal where the layers are identical, the objectives' gains, the exact errors.

The brute-force cases use integer gains (exact in fp64: every sum below 2^53 is exact), so the optimum's value is
compared with ==, no tolerance needed."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from svdadapt.core.allocate import OBJECTIVES, allocate_ranks, method_objective, objective_gains, solve
from svdadapt.core.methods import METHODS

from helpers import raises_exactly


def _value(gains, ranks):
    return sum(float(gains[n][:r].sum()) for n, r in ranks.items())


def _brute(gains, costs, budget, lo, hi):
    """The best total gain over every rank vector within the bounds and the budget."""
    names = sorted(gains)
    best = None
    for rs in itertools.product(*(range(lo[n], hi[n] + 1) for n in names)):
        if sum(costs[n] * r for n, r in zip(names, rs)) <= budget:
            v = _value(gains, dict(zip(names, rs)))
            best = v if best is None else max(best, v)
    return best


def _random_case(rng: random.Random, n_layers: int, max_len: int, cost_choices):
    gains, costs, lo, hi = {}, {}, {}, {}
    for i in range(n_layers):
        name = f"layer{i}"
        length = rng.randint(1, max_len)
        gains[name] = torch.tensor(sorted((rng.randint(0, 50) for _ in range(length)), reverse=True),
                                   dtype=torch.float64)
        costs[name] = rng.choice(cost_choices)
        lo[name] = rng.randint(0, min(1, length))
        hi[name] = rng.randint(lo[name], length)
    return gains, costs, lo, hi


@pytest.mark.parametrize("cost_choices", [(6,), (2, 3), (3, 5, 7), (4, 6, 10), (1, 9)])
def test_solve_is_optimal_against_brute_force(cost_choices) -> None:
    """Random small cases (up to 4 layers, ranks up to 5, equal and unequal costs, including costs whose ratios
    make greedy by gain / cost fail): the value is brute force's, never over budget, within the bounds."""
    rng = random.Random(sum(cost_choices))
    for _ in range(60):
        gains, costs, lo, hi = _random_case(rng, rng.randint(1, 4), 5, cost_choices)
        floor = sum(costs[n] * lo[n] for n in gains)
        top = sum(costs[n] * hi[n] for n in gains)
        budget = rng.randint(floor, top + 3)
        ranks = solve(gains, costs, budget, lo, hi)
        assert sum(costs[n] * r for n, r in ranks.items()) <= budget
        assert all(lo[n] <= ranks[n] <= hi[n] for n in gains)
        assert _value(gains, ranks) == _brute(gains, costs, budget, lo, hi)


def test_greedy_by_ratio_is_not_optimal_here_and_solve_is() -> None:
    """A case where greedy by gain / cost loses: a (cost 3, gain 4: ratio 1.33) before b (cost 5, gain 5: ratio
    1), budget 5: greedy takes a and cannot afford b (value 4), the optimum is b (5)."""
    gains = {"a": torch.tensor([4.0], dtype=torch.float64), "b": torch.tensor([5.0], dtype=torch.float64)}
    costs, lo, hi = {"a": 3, "b": 5}, {"a": 0, "b": 0}, {"a": 1, "b": 1}
    assert solve(gains, costs, 5, lo, hi) == {"a": 0, "b": 1}


def test_identical_layers_get_equal_ranks_at_the_uniform_budget() -> None:
    """Identical strictly decreasing spectra and shapes at the default budget (uniform rank R): every layer R."""
    s = torch.linspace(3.0, 0.5, 24, dtype=torch.float64)
    spectra = {f"model.layers.{i}.mlp.up_proj": s.clone() for i in range(6)}
    shapes = {n: (96, 64) for n in spectra}
    for rank in (1, 4, 7):
        got = allocate_ranks(spectra, shapes, rank, objective="energy_raw", max_rank=24)
        assert got.ranks == {n: rank for n in spectra}
        assert got.cost == got.budget == rank * 160 * 6
        assert got.gain == got.uniform_gain


def test_identical_layers_with_ties_and_zeros_get_equal_ranks() -> None:
    """Repeated singular values and a zero tail (rank-deficient weights): still equal ranks."""
    s = torch.tensor([2.0, 2.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    spectra = {n: s.clone() for n in ("a", "b", "c")}
    shapes = {n: (8, 6) for n in spectra}
    got = allocate_ranks(spectra, shapes, 5, objective="energy_raw")
    assert len(set(got.ranks.values())) == 1


def test_allocation_moves_ranks_to_the_steeper_spectrum_and_beats_uniform() -> None:
    """Flat σ² = 1 against steep σ_k = 10^(1 − 2(k−1)/15), whose first 8 gains exceed 1: at 8 ranks in all the
    steep layer takes all but the flat layer's minimum rank 1."""
    flat = torch.full((16,), 1.0, dtype=torch.float64)
    steep = torch.logspace(1, -1, 16, dtype=torch.float64)
    spectra, shapes = {"flat": flat, "steep": steep}, {"flat": (32, 32), "steep": (32, 32)}
    got = allocate_ranks(spectra, shapes, 4, objective="energy_raw", max_rank=16)
    assert got.ranks == {"flat": 1, "steep": 7}
    assert got.cost <= got.budget and got.gain > got.uniform_gain


def test_deterministic_and_independent_of_the_mappings_order() -> None:
    rng = random.Random(7)
    gains, costs, _, _ = _random_case(rng, 4, 5, (2, 3, 5))
    lo, hi = {n: 0 for n in gains}, {n: g.numel() for n, g in gains.items()}
    budget = sum(costs[n] * hi[n] for n in gains) // 2
    first = solve(gains, costs, budget, lo, hi)
    reordered = {n: gains[n].clone() for n in reversed(list(gains))}
    for _ in range(3):
        assert solve(reordered, costs, budget, lo, hi) == first
    # equal gains in two layers of equal cost: the earlier name gets the rank
    g = {"b": torch.tensor([1.0], dtype=torch.float64), "a": torch.tensor([1.0], dtype=torch.float64)}
    assert solve(g, {"a": 2, "b": 2}, 2, {"a": 0, "b": 0}, {"a": 1, "b": 1}) == {"a": 1, "b": 0}


def test_real_sized_costs_stay_within_budget() -> None:
    """SmolLM2-135M's shapes (q/o 576x576, k/v 192x576, MLP 1536x576), 4 blocks, random decaying spectra, rank 8:
    within budget, and the gain at least the uniform rank's (uniform is feasible, the solver optimal)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {}
    for i in range(4):
        for part, shape in (("q_proj", (576, 576)), ("k_proj", (192, 576)), ("v_proj", (192, 576)),
                            ("o_proj", (576, 576)), ("gate_proj", (1536, 576)), ("up_proj", (1536, 576)),
                            ("down_proj", (576, 1536))):
            shapes[f"model.layers.{i}.{part}"] = shape
    spectra = {n: torch.rand(32, generator=gen, dtype=torch.float64).sort(descending=True).values
               * torch.logspace(0, -torch.rand(1, generator=gen).item() * 3, 32, dtype=torch.float64)
               for n in shapes}
    spectra = {n: s.sort(descending=True).values for n, s in spectra.items()}
    got = allocate_ranks(spectra, shapes, 8, objective="energy_raw", max_rank=32)
    assert got.cost <= got.budget == 8 * sum(a + b for a, b in shapes.values())
    assert got.gain >= got.uniform_gain


def test_energy_objective_divides_by_each_layers_total() -> None:
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    g = objective_gains("energy", {"a": s}, {"a": 20.0})
    assert torch.equal(g["a"], torch.tensor([9.0, 1.0], dtype=torch.float64) / 20.0)
    assert torch.equal(objective_gains("energy_raw", {"a": s})["a"], torch.tensor([9.0, 1.0], dtype=torch.float64))
    assert torch.equal(objective_gains("energy", {"a": s}, {"a": 0.0})["a"], torch.zeros(2, dtype=torch.float64))


def test_energy_normalized_ignores_a_layers_scale_raw_does_not() -> None:
    """Scaling one layer's weight (a norm's gain folded into it) leaves the normalized allocation unchanged and
    moves the raw one."""
    a, b = torch.logspace(0, -2, 8, dtype=torch.float64), torch.logspace(0, -1, 8, dtype=torch.float64)
    shapes = {"a": (16, 16), "b": (16, 16)}

    def run(scale_b, objective):
        spectra = {"a": a, "b": b * scale_b}
        totals = {n: float(s.pow(2).sum()) for n, s in spectra.items()}
        return allocate_ranks(spectra, shapes, 4, objective=objective, totals=totals, max_rank=8).ranks

    assert run(1.0, "energy") == run(100.0, "energy") == run(0.01, "energy")
    assert run(100.0, "energy_raw") != run(0.01, "energy_raw")


def test_eora_gain_is_the_whitened_error_removed() -> None:
    """The eora gains of a rank-r choice sum to ‖ΔW·S‖²_F − min_M ‖(ΔW − M)·S‖²_F (Eckart–Young, fp64)."""
    gen = torch.Generator().manual_seed(1)
    dW, S = torch.randn(12, 10, generator=gen, dtype=torch.float64), torch.randn(10, 10, generator=gen,
                                                                                  dtype=torch.float64)
    U, sv, Vh = torch.linalg.svd(dW @ S)
    g = objective_gains("eora", {"l": sv})["l"]
    for r in (1, 3, 10):
        best = U[:, :r] @ torch.diag(sv[:r]) @ Vh[:r]
        removed = (dW @ S).pow(2).sum() - (dW @ S - best).pow(2).sum()
        # fp64 sums of 120 products of O(10) terms: relative error ~1e-13, 1e-9 is orders of magnitude of margin
        assert abs(float(g[:r].sum()) - float(removed)) <= 1e-9 * float((dW @ S).pow(2).sum())


def test_method_objectives() -> None:
    assert method_objective(METHODS["pissa"], None) == "energy"
    assert method_objective(METHODS["corda"], "ipa") == "energy"
    assert method_objective(METHODS["eora"], None) == "eora"
    assert all(spec.allocation in OBJECTIVES for spec in METHODS.values())


REFUSAL = ("rank allocation does not apply to {}: it keeps the bottom-r triplets, so each further rank takes a "
           "larger component and there is no objective to maximize under a budget; give per-layer ranks with "
           "rank_pattern instead")


@pytest.mark.parametrize("method, mode, what", [("milora", None, "method='milora'"),
                                                ("corda", "kpa", "method='corda', mode='kpa'")])
def test_bottom_r_methods_refuse_allocation(method, mode, what) -> None:
    with raises_exactly(ValueError, REFUSAL.format(what)):
        method_objective(METHODS[method], mode)


ONE = {"a": torch.tensor([2.0, 1.0], dtype=torch.float64)}
SHAPE = {"a": (4, 2)}


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=5, min_rank=1), "budget=5 parameters is below the 6 that the minimum ranks cost "
                                 "(Σ min_rank·(in + out) over 1 layers)"),
    (dict(min_rank=3, max_rank=2), "min_rank=3 exceeds max_rank=2"),
    (dict(min_rank=3), "min_rank=3 exceeds min(out, in) = 2 of layer 'a'"),
    (dict(min_rank=-1), "min_rank must be an integer >= 0, got -1"),
    (dict(max_rank=True), "max_rank must be a positive integer, got True"),
    (dict(objective="variance"), "unknown allocation objective 'variance'; valid objectives are: energy, "
                                 "energy_raw, eora, eva"),
    (dict(objective="energy"), "objective 'energy' divides each layer's σ² by its total energy: pass totals= "
                               "(layer -> ‖W‖²_F, or ‖W·C‖²_F for CorDA, tr C for EVA)"),
    (dict(objective="energy", totals={"b": 1.0}), "totals has no entry for layers ['a']"),
    (dict(budget=-1), "budget must be a non-negative integer number of parameters, got -1"),
])
def test_errors(kwargs, message) -> None:
    kwargs.setdefault("objective", "energy_raw")
    with raises_exactly(ValueError, message):
        allocate_ranks(ONE, SHAPE, 1, **kwargs)


def test_short_spectrum_error() -> None:
    with raises_exactly(ValueError, "layer 'a' has 2 singular values, fewer than its maximum rank 3: decompose at "
                                    "max_rank"):
        allocate_ranks(ONE, {"a": (4, 3)}, 1, objective="energy_raw", max_rank=3)


def test_rank_error() -> None:
    with raises_exactly(ValueError, "rank must be a positive integer, got 0"):
        allocate_ranks(ONE, SHAPE, 0, objective="energy_raw")


@pytest.mark.parametrize("gains, message", [
    (torch.tensor([1.0, 2.0], dtype=torch.float64),
     "gains of layer 'a' must be non-increasing (singular values in descending order): gain 2 (2.0) exceeds "
     "gain 1 (1.0)"),
    (torch.tensor([1.0, -1.0], dtype=torch.float64), "gains of layer 'a' must be a 1-D tensor of finite values >= 0"),
    (torch.tensor([float("nan")], dtype=torch.float64), "gains of layer 'a' must be a 1-D tensor of finite values >= 0"),
])
def test_bad_gains(gains, message) -> None:
    with raises_exactly(ValueError, message):
        solve({"a": gains}, {"a": 1}, 10, {"a": 0}, {"a": gains.numel()})


def test_table_limit_error(monkeypatch) -> None:
    """Costs 7 and 11 (gcd 1), budget 40: 5 + 5 ranks to place over 41 budget units = 410 table updates."""
    import svdadapt.core.allocate as allocate

    monkeypatch.setattr(allocate, "TABLE_LIMIT", 409)
    g = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    with raises_exactly(ValueError, "exact allocation needs 410 table updates (40 budget units of 1 parameters, the "
                                    "gcd of the layers' costs), above the limit 409; lower max_rank"):
        solve({"a": g, "b": g}, {"a": 7, "b": 11}, 40, {"a": 0, "b": 0}, {"a": 5, "b": 5})
