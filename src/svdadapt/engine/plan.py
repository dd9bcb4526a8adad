"""The plan: every layer's decomposition, without touching any model.

``plan_layers`` reads ``LayerInput`` (name, W, C, reference) from a source and runs the method on each layer:
every decomposition, every check that can fail. Its result, a ``LayerPlan`` per layer, is the adapter's initial
factors A₀ (r, in), B₀ (out, r), already rounded to the adapter dtype, plus the report. ``apply.py`` then writes a
plan into a PEFT model.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from ..modules.layers import compute_dtype
from ..core.methods import MethodSpec, SVDOptions, layer_scaling
from ..core.patterns import layer_value

__all__ = ["LayerInput", "LayerPlan", "Job", "Preparations", "plan_layers", "plan_layer", "layer_generator"]


@dataclass
class LayerInput:
    """One layer as a source hands it to the engine: W (out, in) in its compute dtype, the covariance C (in, in) of
    its input (layers reading one input share the tensor object), the reference weight (out, in)."""

    name: str
    W: torch.Tensor
    C: torch.Tensor | None = None
    reference: torch.Tensor | None = None


@dataclass
class LayerPlan:
    """One layer's result: A₀ (r, in) and B₀ (out, r) in the adapter dtype, and the report's numbers; ``spectrum``
    (r,) the singular values the factors hold (fp64, CPU) and ``total`` the energy they are part of (``Init.total``),
    what rank allocation reads (None where the plan has none)."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    report: dict[str, Any]
    spectrum: torch.Tensor | None = None
    total: float | None = None


@dataclass(frozen=True)
class Job:
    """What every layer of one initialization shares; a layer's own rank and scaling are ``rank_of`` /
    ``scaling_of`` (PEFT's ``rank_pattern`` / ``alpha_pattern`` over ``rank``, ``alpha``, rsLoRA)."""

    spec: MethodSpec
    rank: int
    scaling: float
    mode: str | None = None
    svd: SVDOptions = SVDOptions()
    options: Any = None  # the method's typed options (CordaOptions ...), None if it has none
    seed: int = 0
    alpha: float = 0.0  # LoRA alpha as PEFT stores it (read only where a pattern applies)
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def rank_of(self, name: str) -> int:
        """The rank PEFT gives module ``name``: its ``rank_pattern`` entry, else ``rank``."""
        return layer_value(self.rank_pattern, name, self.rank)

    def scaling_of(self, name: str) -> float:
        """The scaling PEFT gives module ``name``: alpha/r (alpha/√r with rsLoRA) of its own rank and alpha."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self.scaling
        return layer_scaling(name, self.rank, self.alpha, self.use_rslora, self.rank_pattern, self.alpha_pattern)


def layer_generator(seed: int, name: str) -> torch.Generator:
    # one stream per layer, from the seed and the layer's name: a layer's sketch does not depend on which
    # other layers are targeted, in which order they are visited, or on which process computes it
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


class Preparations:
    """Per-covariance preparations (CorDA's C_d and Cholesky factor, EoRA's whitening), computed once per input and
    dropped after its last layer, so only a few are alive at a time instead of one per unique input."""

    def __init__(self, job: Job, users: Counter) -> None:
        self.job, self.users, self.ready = job, users, {}

    def take(self, name: str, C: torch.Tensor, device: torch.device) -> dict[str, Any]:
        key = id(C)
        if key not in self.ready:
            try:
                self.ready[key] = self.job.spec.prepare(C.to(device), options=self.job.options)
            except ValueError as e:
                raise ValueError(f"covariance for {name!r}: {e}") from e
        prepared = self.ready[key]
        self.users[key] -= 1
        if self.users[key] <= 0:
            del self.ready[key]
        return prepared


def plan_layer(job: Job, layer: LayerInput, prepared: dict[str, Any] | None = None) -> LayerPlan:
    """Run ``job``'s method on one layer. Raises ``RuntimeError`` naming the module if the decomposition fails."""
    W = layer.W
    kw: dict[str, Any] = dict(rank=job.rank_of(layer.name), scaling=job.scaling_of(layer.name),
                              largest=job.spec.largest(job.mode), svd=job.svd,
                              generator=layer_generator(job.seed, layer.name))
    if job.spec.prepare is not None:
        kw["prepared"] = prepared
    if job.spec.needs_reference:
        kw["reference"] = layer.reference.detach().to(device=W.device, dtype=W.dtype)
    try:
        init = job.spec.init(W, **kw)
    except (RuntimeError, torch.linalg.LinAlgError) as e:  # e.g. an SVD that does not converge
        raise RuntimeError(f"{job.spec.name} failed on module {layer.name!r} (weight {tuple(W.shape)}): {e}") from e
    dtype = compute_dtype(W.dtype)  # the dtype PEFT gives the LoRA factors of this layer
    A, B = init.A.to(dtype), init.B.to(dtype)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise RuntimeError(f"{job.spec.name} gave non-finite factors for module {layer.name!r}")
    report = {"shape": tuple(W.shape), "sigma_max": float(init.sigma.max()) if init.sigma.numel() else 0.0,
              **init.stats}
    # contiguous, as they come back from a file: addmm rounds W − s·B·A differently for other strides
    fresh = dict(memory_format=torch.contiguous_format)
    return LayerPlan(layer.name, A.detach().cpu().clone(**fresh), B.detach().cpu().clone(**fresh), report,
                     init.sigma.detach().to("cpu", torch.float64).clone(), init.total)


def plan_layers(job: Job, layers: Iterable[LayerInput], covariance_users: Counter | None = None, *,
                total: int | None = None, progress: bool = True,
                plan_one: Callable[[Job, LayerInput, dict[str, Any] | None], LayerPlan] = plan_layer
                ) -> dict[str, LayerPlan]:
    """``plan_one`` (default :func:`plan_layer`) over a source of layers, sharing each covariance's preparation
    among its readers.

    ``covariance_users`` counts, per ``id(C)``, the layers that will read it (to drop a preparation after its last
    reader); None keeps every preparation until the end.
    """
    prep = Preparations(job, Counter() if covariance_users is None else Counter(covariance_users))
    plans: dict[str, LayerPlan] = {}
    for layer in tqdm(layers, total=total, desc=f"svdadapt {job.spec.name}", disable=not progress, unit="layer"):
        prepared = None
        if job.spec.prepare is not None:
            prepared = prep.take(layer.name, layer.C, layer.W.device)
        plans[layer.name] = plan_one(job, layer, prepared)
    return plans
