"""Several processes through ``torch.distributed``: each rank plans its share of the layers, all gather the plans.

Inside an initialized process group (``torchrun``, ``accelerate launch``: gloo on CPU, NCCL on GPUs, the same
code), the targets are split over the ranks balanced by estimated decomposition cost, not by count; each rank runs
the engine on its share and the plans are all-gathered, so every rank ends with the identical factors at about
1/N of the work. A layer's sketch is seeded from (seed, layer name) alone, so the factors are bit-identical to one
process with the same seed and per-process thread count. Covariances are all-reduced sums of the ranks' shares
of the calibration batches (equal to one process up to the order of the float additions).

No process pool or socket protocol of our own: ``torch.distributed`` is the engine.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import torch

from .calibration import Covariances
from .engine import Job, LayerPlan
from .linalg import MIN_BLOCK, auto_niter, choose_svd

__all__ = ["world", "barrier", "layer_cost", "split_by_cost", "my_share", "gather_plans", "all_reduce_sum", "my_batches",
           "reduce_covariances"]


def world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, else (0, 1)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if world()[1] > 1:
        torch.distributed.barrier()


def layer_cost(shape: tuple[int, int], job: Job) -> float:
    """Estimated flops of one layer's decomposition: m·n·min(m, n) for an exact SVD (LAPACK or the Gram route),
    ~(2·niter + 1)·b·m·n for a block-Krylov sketch with blocks of b columns, plus W·C (m·n²) for methods that
    multiply by a covariance."""
    m, n = shape
    largest = job.spec.largest(job.mode)
    chosen = choose_svd(shape, job.rank, largest, job.svd.niter, job.svd.oversample) if job.svd.svd == "auto" \
        else job.svd.svd
    if chosen in ("full", "gram"):
        cost = float(m) * n * min(m, n)
    else:
        niter = job.svd.niter if job.svd.niter is not None else auto_niter(min(m, n))
        cost = float(m) * n * max(job.rank + job.svd.oversample, MIN_BLOCK) * (2 * niter + 1)
    return cost + (float(m) * n * n if job.spec.prepare is not None else 0.0)


def split_by_cost(costs: Mapping[str, float], size: int) -> list[list[str]]:
    """Layers over ``size`` ranks, largest first to the least loaded (LPT); each share keeps the given order.
    Deterministic: every rank computes the same split."""
    load = [(0.0, r) for r in range(size)]
    owner: dict[str, int] = {}
    position = {n: i for i, n in enumerate(costs)}
    for name in sorted(costs, key=lambda n: (-costs[n], position[n])):
        total, r = heapq.heappop(load)
        owner[name] = r
        heapq.heappush(load, (total + costs[name], r))
    return [[n for n in costs if owner[n] == r] for r in range(size)]


def my_share(shapes: Mapping[str, tuple[int, int]], job: Job) -> list[str]:
    """The layer names this rank plans (all of them outside a process group)."""
    rank, size = world()
    if size == 1:
        return list(shapes)
    return split_by_cost({n: layer_cost(s, job) for n, s in shapes.items()}, size)[rank]


def gather_plans(local: Mapping[str, LayerPlan], order: Sequence[str]) -> dict[str, LayerPlan]:
    """Every rank's plans, on every rank, in ``order`` (CPU tensors, pickled by ``all_gather_object``)."""
    rank, size = world()
    if size == 1:
        return {n: local[n] for n in order}
    parts: list[dict[str, LayerPlan] | None] = [None] * size
    torch.distributed.all_gather_object(parts, dict(local))
    merged = {n: p for part in parts for n, p in (part or {}).items()}
    missing = [n for n in order if n not in merged]
    if missing:
        raise RuntimeError(f"no rank planned module {missing[0]!r} ({len(missing)} missing)")
    return {n: merged[n] for n in order}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks (in place; ``t`` itself outside a process group)."""
    if world()[1] > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def my_batches(batches: Sequence) -> list:
    """This rank's share of the calibration batches: every size-th one, from its rank on."""
    rank, size = world()
    return list(batches)[rank::size]


def reduce_covariances(covs: Covariances) -> Covariances:
    """The covariances of all ranks' batches: per shared input, C = Σ_ranks (C_rank · N_rank) / Σ_ranks N_rank
    (all-reduced sums of XᵀX and of the token counts); names that shared a tensor still share one."""
    if world()[1] == 1:
        return covs
    matrices: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for group in covs.groups:
        n = covs.token_count(group[0])
        total = all_reduce_sum(covs[group[0]].to(torch.float64) * n)
        tokens = int(all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64)).item())
        C = (total / tokens).to(covs[group[0]].dtype)
        for name in group:
            matrices[name], counts[name] = C, tokens
    return Covariances({n: matrices[n] for n in covs}, counts)
