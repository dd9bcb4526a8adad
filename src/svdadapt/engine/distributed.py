"""Several processes through ``torch.distributed``: each rank plans its share of the layers, all gather the plans.

Inside an initialized process group (``torchrun``, ``accelerate launch``: gloo on CPU, NCCL on GPUs, the same
code), the targets are split over the ranks balanced by estimated decomposition cost, not by count; each rank runs
the engine on its share and the plans are all-gathered, so every rank ends with the identical factors at about
1/N of the work. A layer's sketch is seeded from (seed, layer name) alone, so the factors are bit-identical to one
process with the same seed and per-process thread count. Covariances are all-reduced sums of the ranks' shares
of the calibration batches (equal to one process up to the order of the float additions).

Every rank must pass the same arguments, and one rank's failure must not leave the others waiting in a
collective. ``same_job`` (a decorator on ``wrap`` and ``init_checkpoint``) gives both: the call's arguments
(calibration batches by their sha256) are compared with rank 0's before any work, and every collective below first
exchanges each rank's outcome (``check_in``), so a rank that raised between two collectives meets the others at
the next one; every rank then raises the first failing rank's error ("rank 1: ValueError: ...").

No process pool or socket protocol of our own: ``torch.distributed`` is the engine.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import heapq
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any, TypeVar

import torch
from torch import nn

from ..calibration import Covariances
from .plan import Job, LayerPlan
from ..core.linalg import MIN_BLOCK, auto_niter, choose_svd
from ..core.record import weight_checksum

__all__ = ["world", "barrier", "check_in", "same_job", "fingerprint", "layer_cost", "split_by_cost", "my_share",
           "gather_plans", "all_reduce_sum", "my_batches", "reduce_covariances"]

F = TypeVar("F", bound=Callable[..., Any])


def world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, else (0, 1)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (nothing outside a process group); raises, on every rank, the error of a rank that
    failed since the last collective (``check_in``)."""
    check_in()


# ------------------------------------------------------------------------------------------- failing together
_CPU_GROUP: list[Any] = []  # [default group, a gloo group over its ranks] once made (NCCL jobs)


def _object_group() -> Any:
    """The group that small Python objects (outcomes, jobs, CPU plans) travel through: the default group when it
    has a CPU backend (gloo, or "cpu:gloo,cuda:nccl"), else a gloo group over the same ranks, made once by every
    rank at the same point (the first exchange, on entering ``wrap`` / ``init_checkpoint``), so that an object
    collective never depends on which GPU each rank has selected."""
    dist = torch.distributed
    if "gloo" in str(dist.get_backend()):
        return None
    default = dist.group.WORLD
    if not _CPU_GROUP or _CPU_GROUP[0] is not default:
        _CPU_GROUP[:] = [default, dist.new_group(backend="gloo")]
    return _CPU_GROUP[1]


def _outcome(error: BaseException | None) -> tuple[str, str | None, str] | None:
    """What a rank tells the others: None, or (type name, the nearest builtin exception type it derives from other
    than Exception itself (None for none), message)."""
    if error is None:
        return None
    kind = type(error)
    base = next((k for k in kind.__mro__ if getattr(builtins, k.__name__, None) is k
                 and k not in (Exception, BaseException)), None)
    return kind.__name__, None if base is None else base.__name__, str(error)


def _shared_error(outcomes: list[tuple[str, str | None, str] | None]) -> Exception:
    """The exception every rank raises: the first failing rank's, named by rank, of its builtin type (a subclass of
    a builtin, e.g. a ``ValueError`` of svdadapt's, is rebuilt as that builtin; anything else as RuntimeError);
    ``failed_ranks`` lists the ranks that failed."""
    failed = [r for r, o in enumerate(outcomes) if o is not None]
    name, base, message = outcomes[failed[0]]
    ranks = f"rank {failed[0]}" if len(failed) == 1 else "ranks " + ", ".join(map(str, failed))
    text = f"{ranks}: {name}: {message}"
    try:
        error = getattr(builtins, base)(text) if base is not None else RuntimeError(text)
    except Exception:  # noqa: BLE001 - a builtin that takes other arguments (UnicodeDecodeError)
        error = RuntimeError(text)
    error.failed_ranks = failed
    return error


def _exchange(payload: Any = None, error: BaseException | None = None) -> list[Any]:
    """One all_gather of (this rank's outcome, ``payload``): every rank's payload, in rank order, when no rank
    failed; else, on every rank, the first failing rank's error (``_shared_error``), raised from ``error`` on the
    rank that raised it."""
    parts: list[Any] = [None] * world()[1]
    torch.distributed.all_gather_object(parts, (_outcome(error), payload), group=_object_group())
    outcomes = [p[0] for p in parts]
    if any(o is not None for o in outcomes):
        raise _shared_error(outcomes) from error
    return [p[1] for p in parts]


def check_in(error: BaseException | None = None) -> None:
    """Tell every rank this rank's outcome (``error``: its failure, None: it is fine), and hear theirs: returns
    when no rank failed, else raises the first failing rank's error on every rank (``_exchange``). Nothing outside
    a process group (``error`` is then the caller's to raise)."""
    if world()[1] > 1:
        _exchange(None, error)


def layer_cost(shape: tuple[int, int], job: Job, rank: int | None = None) -> float:
    """Estimated flops of one layer's decomposition at ``rank`` (None: the job's): m·n·min(m, n) for an exact SVD (LAPACK or the Gram route),
    ~(2·niter + 1)·b·m·n for a block-Krylov sketch with blocks of b columns, plus W·C (m·n²) for methods that
    multiply by a covariance."""
    m, n = shape
    rank = job.rank if rank is None else rank
    largest = job.spec.largest(job.mode)
    chosen = choose_svd(shape, rank, largest, job.svd.niter, job.svd.oversample) if job.svd.svd == "auto" \
        else job.svd.svd
    if chosen in ("full", "gram"):
        cost = float(m) * n * min(m, n)
    else:
        niter = job.svd.niter if job.svd.niter is not None else auto_niter(min(m, n))
        cost = float(m) * n * max(rank + job.svd.oversample, MIN_BLOCK) * (2 * niter + 1)
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
    return split_by_cost({n: layer_cost(s, job, job.rank_of(n)) for n, s in shapes.items()}, size)[rank]


def gather_plans(local: Mapping[str, LayerPlan], order: Sequence[str]) -> dict[str, LayerPlan]:
    """Every rank's plans, on every rank, in ``order`` (CPU tensors, pickled by ``all_gather_object``)."""
    if world()[1] == 1:
        return {n: local[n] for n in order}
    parts = _exchange(dict(local))  # a rank that failed before this point raises here, on every rank
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
    """This rank's share of the calibration batches (every rank passes the same list, ``same_job`` checks it):
    every size-th one, from its rank on."""
    rank, size = world()
    batches = list(batches)
    if size > 1 and len(batches) < size:
        raise ValueError(f"calibration has {len(batches)} batch{'es' if len(batches) != 1 else ''} for {size} ranks: "
                         f"svdadapt splits the batches over the ranks (rank i collects on batches i, i+{size}, ...), "
                         f"so every rank needs one: pass at least {size} batches (or run in one process)")
    return batches[rank::size]


def reduce_covariances(covs: Covariances) -> Covariances:
    """The covariances of all ranks' batches: per shared input, C = Σ_ranks (C_rank · N_rank) / Σ_ranks N_rank
    (all-reduced sums of XᵀX and of the token counts), the token means likewise from the sums of x; names that
    shared a tensor still share one. An input no rank saw (an MoE expert no token was routed to) stays zeros with a
    count of 0: the experts' fallback (``calibration.experts.fallback_covariances``) comes after this, on the
    reduced counts."""
    if world()[1] == 1:
        return covs
    check_in(ValueError("reduce the covariances before their experts' fallback (fallback_covariances): "
                        f"{next(iter(covs.fallbacks))!r} is already a fallback") if covs.fallbacks else None)
    matrices: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    means: dict[str, torch.Tensor] = {}
    for group in covs.groups:
        n = covs.token_count(group[0])
        total = all_reduce_sum(covs[group[0]].to(torch.float64) * n)
        tokens = int(all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64)).item())
        C = (total / tokens if tokens else total).to(covs[group[0]].dtype)
        if covs.has_means:  # Σ x, all-reduced like Σ x xᵀ
            mu = all_reduce_sum(covs.mean(group[0]).to(torch.float64) * n)
            mu = (mu / tokens if tokens else mu).to(C.dtype)
        for name in group:
            matrices[name], counts[name] = C, tokens
            if covs.has_means:
                means[name] = mu
    return Covariances({n: matrices[n] for n in covs}, counts, means if covs.has_means else None)


# ------------------------------------------------------------------------------------------- the same job
_PER_RANK = {"model", "progress"}  # each rank's own copy of the model; progress bars shown on some ranks only


def fingerprint(obj: Any) -> str:
    """sha256 of calibration data: every tensor by ``record.weight_checksum``, mappings by sorted key, sequences in
    order, anything else by its repr. The ranks compare their batches by it, and a resumed ``init_checkpoint`` its
    calibration."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(weight_checksum(x).encode())
        elif isinstance(x, Mapping):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()


def _comparable(value: Any) -> Any:
    """An argument as ranks compare it: plain values as they are, sets sorted, tensors by dtype and shape, modules
    by class (their weights are each rank's copy), anything else by a repr without a memory address."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (PurePath, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    if isinstance(value, nn.Module):
        return type(value).__name__
    if isinstance(value, Mapping):
        return {str(k): _comparable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, (set, frozenset)):  # a set's order follows each process's hash seed
        return sorted((_comparable(v) for v in value), key=repr)
    text = repr(value)
    return type(value).__name__ if " at 0x" in text else text


def _is_batches(calibration: Any) -> bool:
    return isinstance(calibration, Iterable) and not isinstance(calibration, (Mapping, str, os.PathLike,
                                                                              torch.Tensor))


def _job(arguments: dict[str, Any]) -> dict[str, Any]:
    """The fields ranks compare: every argument but the per-rank ones, calibration by its ``fingerprint``."""
    job = {k: _comparable(v) for k, v in arguments.items() if k not in _PER_RANK and k != "calibration"}
    if arguments.get("calibration") is not None:
        job["calibration"] = fingerprint(arguments["calibration"])
    return job


def _difference(what: str, jobs: list[dict[str, Any]]) -> ValueError | None:
    """The first argument in which a rank's job differs from rank 0's, as the error every rank raises."""
    for rank, job in enumerate(jobs[1:], 1):
        key = next((k for k in jobs[0] if job.get(k) != jobs[0][k]), None)
        if key == "calibration":
            return ValueError(
                f"{what}: the ranks were given different calibration data (sha256 {str(jobs[0][key])[:12]} on rank 0, "
                f"{str(job[key])[:12]} on rank {rank}): under torch.distributed every rank passes the same batches, "
                f"and svdadapt splits them over the ranks (rank i collects on batches i, i+{len(jobs)}, ...)")
        if key is not None:
            return ValueError(f"{what}: the ranks disagree on {key}: {jobs[0][key]!r} on rank 0, {job[key]!r} on rank "
                              f"{rank}; every rank must pass the same arguments")
    return None


def _agree(what: str, job: Callable[[], dict[str, Any]]) -> None:
    """One all_gather of every rank's job (or the error computing it): raises on every rank the first failing
    rank's error, else the first difference from rank 0's job."""
    try:
        mine, error = job(), None
    except Exception as e:  # noqa: BLE001 - told to every rank by the exchange
        mine, error = None, e
    difference = _difference(what, _exchange(mine, error))
    if difference is not None:
        raise difference


def same_job(fn: F) -> F:
    """Decorator of the entry points (``wrap``, ``init_checkpoint``). Under a process group: the call's arguments
    are compared with rank 0's first (``_agree``: one collective; an iterable of calibration batches is listed once
    and passed on as that list); a rank that raises tells the others at their next collective (``check_in``), and
    every rank checks in once more on leaving, so all ranks return, or all raise the same error."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if world()[1] == 1:
            return fn(*args, **kwargs)
        bound: list[inspect.BoundArguments] = []

        def job() -> dict[str, Any]:
            b = signature.bind(*args, **kwargs)
            b.apply_defaults()
            if _is_batches(b.arguments.get("calibration")):
                b.arguments["calibration"] = list(b.arguments["calibration"])
            bound.append(b)
            return _job(dict(b.arguments))

        _agree(fn.__name__, job)
        try:
            result = fn(*bound[0].args, **bound[0].kwargs)
        except Exception as e:
            # told already (raised by a check-in), or the group itself broke (nothing can be told through it)
            if not hasattr(e, "failed_ranks") and not isinstance(e, torch.distributed.DistError):
                check_in(e)
            raise
        check_in()
        return result

    return call  # type: ignore[return-value]
