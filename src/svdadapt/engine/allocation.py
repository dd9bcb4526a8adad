"""Rank allocation inside ``wrap(..., allocate=...)``: every layer decomposed once at its maximum rank, the ranks
chosen from those spectra (``core.allocate.allocate_ranks``), each layer's factors cut to its rank.

The steps, around the plan: ``resolve`` checks the options against the job (``AllocateOptions``: budget, minimum
and maximum rank, objective); ``max_rank_job`` is the job every layer is planned at (its maximum rank,
min(max_rank, out, in), with the scaling of that rank); ``allocate_plans`` runs the allocator on the plans'
spectra (``LayerPlan.spectrum``, ``total``) and cuts each plan to its rank: the first r rows of A₀ and columns of
B₀, rescaled by √(s_max / s_r) so that s_r·B·A is the top-r part of the max-rank decomposition (no second
decomposition), and returns the job with the ranks as its ``rank_pattern`` (what PEFT's config, svdadapt.json and
every later step carry). Torch and the engine's plan only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..core.allocate import (COSTS, OBJECTIVE_DEFAULTS, OBJECTIVES, Allocation, allocate_ranks, check_floor,
                             layer_costs, method_objective, objective_gains)
from ..core.methods import truncated_stats
from ..core.patterns import layer_value
from .plan import Job, LayerPlan

__all__ = ["AllocateOptions", "MAX_RANK_FACTOR", "resolve", "layer_caps", "max_rank_job", "allocate_plans",
           "rank_keys", "kept_alphas"]

# max_rank=None: 4·rank (capped at each layer's min(out, in)). Each layer is decomposed at its maximum rank and
# its factors are held at that rank until the allocation: the sketch's cost and the plans' memory grow with it (4×
# the adapter's), and so does the allocator's table. On SmolLM2-135M at rank 16 the normalized objective takes
# k / v up to 64 = 4·16 (docs/wrap.md): a larger cap moves more budget there, give max_rank= for that.
MAX_RANK_FACTOR = OBJECTIVE_DEFAULTS["energy"].max_factor  # 4
# the objectives defined on the spectrum and total of every method whose own objective is one of them or "eora"
# (the fraction, or the amount, of the decomposed matrix's energy); "eora" itself only for EoRA
_RAW = ("energy", "energy_raw")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class AllocateOptions:
    """``wrap(..., allocate=AllocateOptions(...))`` (``allocate=True``: the defaults).

    budget: adapter parameters, Σ rank·(in + out) over the targets (with ``cost="ranks"``: Σ rank); None: what
        uniform ``rank`` costs.
    min_rank, max_rank: each layer's rank bounds; None: the objective's defaults (``OBJECTIVE_DEFAULTS``: 1 and
        ``MAX_RANK_FACTOR``·rank; EVA's 0 and 2·rank); a layer's maximum is also at most its min(out, in); a layer
        allocated rank 0 gets no adapter.
    objective: a key of ``core.allocate.OBJECTIVES``; None: the method's own (``method_objective``).
    cost: what a rank costs, ``"params"`` (in + out) or ``"ranks"`` (one); None: the objective's default.
    """

    budget: int | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    objective: str | None = None
    cost: str | None = None

    def __post_init__(self) -> None:
        if self.budget is not None and (not isinstance(self.budget, int) or isinstance(self.budget, bool)
                                        or self.budget < 0):
            raise ValueError(f"AllocateOptions: budget must be None or an integer number of parameters >= 0, got "
                             f"{self.budget!r}")
        if self.min_rank is not None and not (_positive_int(self.min_rank) or self.min_rank == 0
                                              and not isinstance(self.min_rank, bool)):
            raise ValueError(f"AllocateOptions: min_rank must be None or an integer >= 0, got {self.min_rank!r}")
        if self.cost is not None and self.cost not in COSTS:
            raise ValueError(f"AllocateOptions: cost must be None or one of {', '.join(map(repr, COSTS))}, got "
                             f"{self.cost!r}")
        if self.max_rank is not None and not _positive_int(self.max_rank):
            raise ValueError(f"AllocateOptions: max_rank must be None or a positive integer, got {self.max_rank!r}")
        if self.max_rank is not None and self.min_rank is not None and self.min_rank > self.max_rank:
            raise ValueError(f"AllocateOptions: min_rank={self.min_rank} exceeds max_rank={self.max_rank}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"AllocateOptions: unknown allocation objective {self.objective!r}; valid objectives "
                             f"are: {', '.join(OBJECTIVES)}")


def resolve(allocate: Any, job: Job, quantized_residual: bool = False) -> AllocateOptions | None:
    """``allocate=`` checked against ``job``: None for no allocation, else the options with ``objective`` and
    ``max_rank`` filled in. ``quantized_residual``: the base is a quantized residual (QPiSSA), refused."""
    if allocate is None or allocate is False:
        return None
    if allocate is True:
        allocate = AllocateOptions()
    if not isinstance(allocate, AllocateOptions):
        raise TypeError(f"allocate must be True, False or a svdadapt.AllocateOptions, got {allocate!r}")
    if job.rank_pattern:
        raise ValueError("allocate= writes every layer's rank as the rank_pattern; drop rank_pattern= (or "
                         "allocate=), or bound a layer's rank with AllocateOptions(min_rank=, max_rank=)")
    if quantized_residual:
        raise ValueError(f"allocate= with quantize= and method {job.spec.name!r}: the quantized residual base "
                         f"(QPiSSA) alternates with the rank's own decomposition, so a cut max-rank plan is not it")
    own = method_objective(job.spec, job.mode)  # ValueError for the bottom-r methods
    objective = own if allocate.objective is None else allocate.objective
    allowed = tuple(dict.fromkeys((own, *(_RAW if own in (*_RAW, "eora") else ()))))
    if objective not in allowed:
        raise ValueError(f"allocation objective {objective!r} does not apply to method {job.spec.name!r}: its "
                         f"objectives are {', '.join(allowed)}")
    d = OBJECTIVE_DEFAULTS[objective]
    max_rank = d.max_factor * job.rank if allocate.max_rank is None else allocate.max_rank
    min_rank = d.min_rank if allocate.min_rank is None else allocate.min_rank
    if min_rank > max_rank:
        raise ValueError(f"AllocateOptions: min_rank={min_rank} exceeds max_rank={max_rank} "
                         f"(the default, {d.max_factor}·rank)")
    return replace(allocate, objective=objective, max_rank=max_rank, min_rank=min_rank,
                   cost=d.cost if allocate.cost is None else allocate.cost)


def layer_caps(options: AllocateOptions, shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Each layer's maximum rank, min(max_rank, out, in): the rank it is decomposed at. ``ValueError`` before any
    decomposition for a budget below what the minimum ranks cost (``allocate_ranks``' own check, early)."""
    if options.budget is not None:
        check_floor(options.budget, layer_costs(shapes, options.cost), dict.fromkeys(shapes, options.min_rank))
    return {n: min(options.max_rank, *shape) for n, shape in shapes.items()}


def rank_keys(ranks: Mapping[str, int]) -> dict[str, int]:
    """``ranks`` (full module name -> rank) as a ``rank_pattern`` keyed by the full names (as PEFT's EVA writes
    them), checked to give every module its own rank under PEFT's rule in the given and in sorted order (PEFT
    saves the keys sorted): ``ValueError`` naming the module where a name, as a regular expression, matches
    another module first."""
    pattern = {n: ranks[n] for n in sorted(ranks)}
    for n, r in ranks.items():
        if layer_value(pattern, n, None) != r:
            raise ValueError(f"the allocated rank_pattern cannot give module {n!r} its own rank: another module's "
                             f"name matches it first as a regular expression")
    return pattern


def max_rank_job(job: Job, caps: Mapping[str, int]) -> Job:
    """``job`` with every layer at its maximum rank (``caps``; its scaling that rank's), for the plan."""
    return replace(job, rank_pattern=rank_keys(caps))


def _spectra(plans: Mapping[str, LayerPlan], caps: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Each plan's singular values, zero-padded to its maximum rank (EoRA with fewer usable calibration
    directions than the rank pads its factors with zeros: those ranks gain nothing)."""
    out = {}
    for n, p in plans.items():
        if p.spectrum is None:
            raise ValueError(f"the plan of module {n!r} holds no spectrum to allocate ranks from")
        s = p.spectrum.to(torch.float64)
        out[n] = torch.cat([s, s.new_zeros(max(0, caps[n] - s.numel()))])
    return out


def _totals(plans: Mapping[str, LayerPlan], objective: str) -> dict[str, float] | None:
    if objective not in ("energy", "eva"):
        return None
    missing = next((n for n, p in plans.items() if p.total is None), None)
    if missing is not None:
        raise ValueError(f"objective {objective!r} needs each layer's total energy; the plan of module "
                         f"{missing!r} has none")
    return {n: float(p.total) for n, p in plans.items()}


def _cut(plan: LayerPlan, rank: int, s_max: float, s_rank: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rank`` rows of A₀ (r_max, in) and columns of B₀ (out, r_max), each times √(s_max / s_rank)
    (one rounding in the adapter dtype; none where the scalings are equal): s_rank·B·A = the top-``rank`` part
    of s_max·B₀·A₀."""
    c = math.sqrt(s_max / s_rank)
    A, B = plan.A[:rank], plan.B[:, :rank]
    if c != 1.0:
        A, B = (A.to(torch.float64) * c).to(A.dtype), (B.to(torch.float64) * c).to(B.dtype)
    fresh = dict(memory_format=torch.contiguous_format)
    return A.clone(**fresh), B.clone(**fresh)


def _layer_report(plan: LayerPlan, rank: int, gains: torch.Tensor, uniform: int) -> dict[str, Any]:
    """The layer's report at its allocated ``rank``: the method's numbers recomputed at that rank, the rank, the
    objective's gain there and at the uniform rank (None where the layer cannot take it)."""
    captured = float(plan.spectrum[:rank].pow(2).sum())
    total = plan.total
    energy = 1.0 if not total else captured / float(total)
    report = truncated_stats(plan.report, energy) if total is not None else dict(plan.report)
    report.update(rank=rank, gain=float(gains[:rank].sum()),
                  uniform_gain=float(gains[:uniform].sum()) if uniform <= gains.numel() else None)
    return report


def allocate_plans(job: Job, plan_job: Job, plans: Mapping[str, LayerPlan], options: AllocateOptions,
                   shapes: Mapping[str, tuple[int, int]]) -> tuple[Job, dict[str, LayerPlan], dict[str, Any]]:
    """The ranks for ``plans`` (planned by ``plan_job`` at each layer's maximum rank), the plans cut to them,
    and ``job`` with the ranks as its ``rank_pattern``; with the allocation's summary (the record's
    ``allocation``). The same on every process for the same plans (a function of the spectra only)."""
    caps = layer_caps(options, shapes)
    spectra = _spectra(plans, caps)
    totals = _totals(plans, options.objective)
    d = OBJECTIVE_DEFAULTS[options.objective]
    a = allocate_ranks(spectra, shapes, job.rank, budget=options.budget, min_rank=options.min_rank,
                       max_rank=options.max_rank, objective=options.objective, totals=totals, cost=options.cost,
                       order=list(plans) if d.ties == "order" else None)
    kept = {n: r for n, r in a.ranks.items() if r > 0}  # rank 0: no adapter on that layer
    if not kept:
        raise ValueError(f"the allocation gave every layer rank 0 (budget={a.budget}): raise the budget or min_rank")
    final = replace(job, rank_pattern=rank_keys(kept))
    if d.keep_scaling:
        final = replace(final, alpha_pattern=kept_alphas(job, kept))
    gains = objective_gains(options.objective, spectra, totals)
    cut = {}
    for n, p in plans.items():
        r = a.ranks[n]
        if r == 0:
            continue
        s_max, s_r = (plan_job.scaling_of(n), final.scaling_of(n)) if job.spec.scaled_factors else (1.0, 1.0)
        A, B = _cut(p, r, s_max, s_r)
        cut[n] = LayerPlan(n, A, B, _layer_report(p, r, gains[n], job.rank), p.spectrum[:r].clone(), p.total)
    return final, cut, summary(a, options, job.rank, shapes)


def kept_alphas(job: Job, ranks: Mapping[str, int]) -> dict[str, float]:
    """The ``alpha_pattern`` that keeps every layer's scaling at the uniform rank's (PEFT's EVA
    ``adjust_scaling_factors``): layer n's alpha times r_n / rank where r_n differs from ``rank``, the entries that
    differ from ``alpha`` (full module names, as PEFT's EVA writes them)."""
    out = {}
    for n in sorted(ranks):
        alpha = layer_value(job.alpha_pattern, n, job.alpha)
        if ranks[n] != job.rank:
            alpha *= ranks[n] / job.rank
        if alpha != job.alpha:
            out[n] = alpha
    return out


def summary(a: Allocation, options: AllocateOptions, rank: int, shapes: Mapping[str, tuple[int, int]]
            ) -> dict[str, Any]:
    """The record's ``allocation``: the options as resolved, the budget, the cost and gain of the ranks, and those
    of uniform ``rank``."""
    opts = asdict(options)
    opts["cost_unit"] = opts.pop("cost")  # "params" or "ranks"; "cost" is what the ranks cost
    return {**opts, "budget": a.budget, "cost": a.cost, "gain": a.gain,
            "uniform_rank": rank, "uniform_cost": rank * sum(layer_costs(shapes, options.cost).values()),
            "uniform_gain": a.uniform_gain}
