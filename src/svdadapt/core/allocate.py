"""Per-layer ranks under a parameter budget, optimal for a method's own objective.

Layer i at rank r costs ``c_i·r`` adapter parameters (``c_i`` = in + out) and gains ``G_i(r) = g_i[1] + … +
g_i[r]``, where ``g_i`` (the gain of each further rank) is non-increasing: a singular value squared. The problem,
maximize Σ G_i(r_i) subject to Σ c_i·r_i ≤ budget and min_i ≤ r_i ≤ max_i, is an integer separable concave
knapsack; greedy by gain / cost is exact only where all costs are equal. ``solve`` is exact for any costs:

1. layers with the same cost form a class; inside a class the best t extra ranks are the t largest gains of its
   layers (each layer's gains are non-increasing, so those are prefixes), sorted by (gain desc, name, rank);
2. the classes (a handful in a transformer: q/o, k/v, the MLP) share the budget by dynamic programming over the
   budget in units of the costs' gcd: one table row per class, each entry the best gain at a cost at most b units.

Ties keep the smaller rank and then the earlier name, so the result is a function of the inputs only. Leaf
module: torch only. Shapes: a spectrum is a 1-D tensor of singular values, descending.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OBJECTIVES", "OBJECTIVE_DEFAULTS", "COSTS", "Allocation", "allocate_ranks", "solve", "check_floor",
           "objective_gains", "method_objective", "layer_costs"]

OBJECTIVES = {
    "energy": "the fraction of each layer's energy captured, σ_i² / ‖W‖²_F (‖W·C‖²_F for CorDA), summed over layers",
    "energy_raw": "the energy captured, σ_i², summed over layers (layers with larger norms weigh more)",
    "eora": "the whitened compensation error removed, σ_i² of (W_ref − W_c)·S, summed: Σ‖(ΔW − M)·X‖² is "
            "Σ‖ΔW·S‖²_F minus it",
    "eva": "PEFT's EVA redistribution: the explained variance ratio λ_i / tr C of each layer's centred input "
           "covariance, summed; one per rank (PEFT's budget Σ r), ranks 0 .. 2·r (rho = 2), ties in target order",
}
COSTS = ("params", "ranks")  # what a rank costs: in + out adapter parameters, or one (a budget of ranks, as EVA's)


@dataclass(frozen=True)
class ObjectiveDefaults:
    """What an objective's allocation takes when not told: the cost of a rank (``COSTS``), the minimum rank, the
    maximum rank as a multiple of the uniform rank, how ties between layers are broken ("name": the earlier name;
    "order": the earlier layer in the given order, as PEFT's EVA keeps a stable sort's order), and whether each
    layer keeps the uniform rank's scaling alpha/r (alpha scaled by r_layer / r, PEFT's ``adjust_scaling_factors``)."""

    cost: str = "params"
    min_rank: int = 1
    max_factor: int = 4
    ties: str = "name"
    keep_scaling: bool = False


OBJECTIVE_DEFAULTS = {name: ObjectiveDefaults() for name in OBJECTIVES}
OBJECTIVE_DEFAULTS["eva"] = ObjectiveDefaults(cost="ranks", min_rank=0, max_factor=2, ties="order", keep_scaling=True)
TABLE_LIMIT = 2 * 10 ** 9  # table updates (ranks to place × budget units) beyond which solve refuses


@dataclass(frozen=True)
class Allocation:
    """The chosen ranks, what they cost and gain, and the gain of the uniform rank at the same budget."""

    ranks: dict[str, int]
    budget: int
    cost: int
    gain: float
    uniform_gain: float | None  # None where some layer cannot take the uniform rank
    objective: str


def method_objective(spec, mode: str | None) -> str:
    """The objective allocation optimizes for method ``spec`` (a ``MethodSpec``) in ``mode`` (resolved).
    ``ValueError`` for the bottom-r methods (MiLoRA, CorDA-KPA): they take the smallest components, so one more
    rank takes a larger one; no quantity grows with the rank that the budget could buy."""
    if not spec.largest(mode):
        what = f"method={spec.name!r}" + ("" if mode is None else f", mode={mode!r}")
        raise ValueError(f"rank allocation does not apply to {what}: it keeps the bottom-r triplets, so each "
                         f"further rank takes a larger component and there is no objective to maximize under a "
                         f"budget; give per-layer ranks with rank_pattern instead")
    return spec.allocation


def objective_gains(objective: str, spectra: Mapping[str, torch.Tensor],
                    totals: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Each layer's gain per rank (fp64, 1-D) under ``objective``: σ² for "energy_raw" / "eora", σ² / total for
    "energy" and "eva" (``totals``: layer -> ‖W‖²_F, or ‖W·C‖²_F; EVA: σ² = λ and total = tr C, so σ² / total
    is the explained variance ratio; a zero total gives zero gains)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown allocation objective {objective!r}; valid objectives are: {', '.join(OBJECTIVES)}")
    gains = {n: s.detach().to(torch.float64).cpu().pow(2) for n, s in spectra.items()}
    if objective not in ("energy", "eva"):
        return gains
    if totals is None:
        raise ValueError(f"objective {objective!r} divides each layer's σ² by its total energy: pass totals= "
                         "(layer -> ‖W‖²_F, or ‖W·C‖²_F for CorDA, tr C for EVA)")
    missing = sorted(set(gains) - set(totals))
    if missing:
        raise ValueError(f"totals has no entry for layers {missing}")
    return {n: g / float(totals[n]) if float(totals[n]) > 0 else torch.zeros_like(g) for n, g in gains.items()}


def _check_gains(name: str, g: torch.Tensor) -> None:
    if g.ndim != 1 or not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
        raise ValueError(f"gains of layer {name!r} must be a 1-D tensor of finite values >= 0")
    if g.numel() > 1 and bool((g[1:] > g[:-1]).any()):
        k = int(torch.nonzero(g[1:] > g[:-1])[0]) + 1
        raise ValueError(f"gains of layer {name!r} must be non-increasing (singular values in descending order): "
                         f"gain {k + 1} ({float(g[k])!r}) exceeds gain {k} ({float(g[k - 1])!r})")


def _class_order(names: list[str], gains: Mapping[str, torch.Tensor], lo: Mapping[str, int],
                 hi: Mapping[str, int], position: Mapping[str, Any]) -> list[tuple[float, str, int]]:
    """A class's extra ranks, best first: (gain, layer, rank) sorted by gain desc, then the layer's ``position``
    (its name, or its place in a given order), then rank."""
    items = [(float(gains[n][k - 1]), n, k) for n in names for k in range(lo[n] + 1, hi[n] + 1)]
    return sorted(items, key=lambda it: (-it[0], position[it[1]], it[2]))


def _dp(classes: list[tuple[int, list[float]]], units: int) -> list[int]:
    """Extra ranks per class maximizing Σ prefix gains with Σ w·t ≤ ``units``; ``classes``: (w, sorted gains)."""
    best = torch.zeros(units + 1, dtype=torch.float64)
    choices = []
    for w, g in classes:
        prefix = [0.0] + list(torch.tensor(g, dtype=torch.float64).cumsum(0).tolist())
        new, pick = best.clone(), torch.zeros(units + 1, dtype=torch.int64)
        for t in range(1, min(len(g), units // w) + 1):
            cand = best[:units + 1 - t * w] + prefix[t]
            better = cand > new[t * w:]  # strict: ties keep the smaller t
            new[t * w:] = torch.where(better, cand, new[t * w:])
            pick[t * w:] = torch.where(better, t, pick[t * w:])
        best = new
        choices.append(pick)
    out, b = [], units
    for (w, _), pick in zip(reversed(classes), reversed(choices)):
        t = int(pick[b])
        out.append(t)
        b -= t * w
    return out[::-1]


def check_floor(budget: int, costs: Mapping[str, int], lo: Mapping[str, int]) -> int:
    """What the minimum ranks cost, Σ costs[n]·lo[n] over the layers of ``lo``; ``ValueError`` above ``budget``."""
    floor = sum(costs[n] * lo[n] for n in lo)
    if floor > budget:
        raise ValueError(f"budget={budget} parameters is below the {floor} that the minimum ranks cost "
                         f"(Σ min_rank·(in + out) over {len(lo)} layers)")
    return floor


def solve(gains: Mapping[str, torch.Tensor], costs: Mapping[str, int], budget: int, lo: Mapping[str, int],
          hi: Mapping[str, int], order: Sequence[str] | None = None) -> dict[str, int]:
    """Ranks r (layer -> int, ``lo[n] <= r[n] <= hi[n]``) maximizing Σ_n Σ_{k<=r[n]} gains[n][k-1] subject to
    Σ costs[n]·r[n] <= budget; exact (see the module docstring). ``gains[n]``: 1-D, non-increasing, >= 0, at least
    ``hi[n]`` long; ``order``: every layer, ties going to the earlier one (None: the earlier name). ``ValueError``
    if the minimum ranks cost more than ``budget``."""
    names = sorted(gains)
    if order is not None and sorted(order) != names:
        raise ValueError("order must list every layer of gains exactly once")
    position: dict[str, Any] = {n: n for n in names} if order is None else {n: i for i, n in enumerate(order)}
    for n in names:
        _check_gains(n, gains[n])
    floor = check_floor(budget, costs, lo)
    ranks = {n: lo[n] for n in names}
    by_cost: dict[int, list[str]] = {}
    for n in names:
        if hi[n] > lo[n]:
            by_cost.setdefault(costs[n], []).append(n)
    if not by_cost:
        return ranks
    unit = math.gcd(*by_cost)
    orders = {c: _class_order(ns, gains, lo, hi, position) for c, ns in sorted(by_cost.items())}
    units = min((budget - floor) // unit, sum(c * len(o) for c, o in orders.items()) // unit)
    work = sum(len(o) for o in orders.values()) * (units + 1)
    if work > TABLE_LIMIT:
        raise ValueError(f"exact allocation needs {work} table updates ({units} budget units of {unit} parameters, "
                         f"the gcd of the layers' costs), above the limit {TABLE_LIMIT}; lower max_rank")
    extra = _dp([(c // unit, [g for g, _, _ in o]) for c, o in orders.items()], units)
    for t, o in zip(extra, orders.values()):
        for _, n, _ in o[:t]:
            ranks[n] += 1
    return ranks


def _bounds(spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], min_rank: int,
            max_rank: int | None) -> tuple[dict[str, int], dict[str, int]]:
    """Each layer's (min, max) rank: max = min(max_rank, min(out, in)); its spectrum must be that long."""
    if not isinstance(min_rank, int) or isinstance(min_rank, bool) or min_rank < 0:
        raise ValueError(f"min_rank must be an integer >= 0, got {min_rank!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1):
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if max_rank is not None and min_rank > max_rank:
        raise ValueError(f"min_rank={min_rank} exceeds max_rank={max_rank}")
    lo, hi = {}, {}
    for n in sorted(spectra):
        out_f, in_f = shapes[n]
        cap = min(out_f, in_f) if max_rank is None else min(max_rank, out_f, in_f)
        if min_rank > cap:
            raise ValueError(f"min_rank={min_rank} exceeds min(out, in) = {min(out_f, in_f)} of layer {n!r}")
        if spectra[n].numel() < cap:
            raise ValueError(f"layer {n!r} has {spectra[n].numel()} singular values, fewer than its maximum rank "
                             f"{cap}: decompose at max_rank")
        lo[n], hi[n] = min_rank, cap
    return lo, hi


def layer_costs(shapes: Mapping[str, tuple[int, int]], cost: str = "params") -> dict[str, int]:
    """What one rank of each layer costs: in + out adapter parameters (``cost="params"``) or one (``"ranks"``)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(map(repr, COSTS))}, got {cost!r}")
    return {n: (o + i if cost == "params" else 1) for n, (o, i) in shapes.items()}


def allocate_ranks(spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], rank: int, *,
                   budget: int | None = None, min_rank: int = 1, max_rank: int | None = None,
                   objective: str = "energy", totals: Mapping[str, float] | None = None, cost: str = "params",
                   order: Sequence[str] | None = None) -> Allocation:
    """Per-layer ranks maximizing ``objective`` (``OBJECTIVES``) within ``budget``.

    ``spectra``: layer -> its leading singular values (1-D, descending; of W for PiSSA, W·C for CorDA-IPA, the
    whitened ΔW for EoRA, √λ of the centred input covariance for EVA), at least min(max_rank, out, in) long;
    ``shapes``: layer -> (out, in); ``cost``: a rank costs in + out parameters ("params") or one ("ranks", the
    budget a number of ranks); ``budget``: default what uniform ``rank`` costs; ``totals``: layer -> total energy,
    for "energy" / "eva"; ``order``: ties go to the earlier layer in it (None: the earlier name); ``min_rank`` 0
    lets a layer have no adapter. Never over budget; bit-identical for the same inputs."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    gains = objective_gains(objective, spectra, totals)
    lo, hi = _bounds(spectra, shapes, min_rank, max_rank)
    costs = layer_costs({n: shapes[n] for n in spectra}, cost)
    budget = rank * sum(costs.values()) if budget is None else budget
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget must be a non-negative integer number of parameters, got {budget!r}")
    ranks = solve(gains, costs, budget, lo, hi, order)
    uniform = None
    if all(hi[n] >= rank for n in gains):
        uniform = sum(float(gains[n][:rank].sum()) for n in sorted(gains))
    return Allocation(ranks=ranks, budget=budget, cost=sum(costs[n] * r for n, r in ranks.items()),
                      gain=sum(float(gains[n][:r].sum()) for n, r in sorted(ranks.items())),
                      uniform_gain=uniform, objective=objective)
