"""The per-layer engine: plan, then apply.

``plan_layers`` reads ``LayerInput`` (name, W, C, reference) from a source and runs the method on each layer:
every decomposition, every check that can fail, without touching any model. Its result, a ``LayerPlan`` per layer,
is the adapter's initial factors A₀ (r, in), B₀ (out, r), already rounded to the adapter dtype, plus the report.

``apply`` builds the PEFT model and writes the plan in: the LoRA factors, and for methods that rewrite the base,
``W − s·B₀·A₀`` (``methods.finish``, a deterministic function of W and the rounded factors, computed one layer at a
time so the plan never holds a second copy of the model). If anything fails there, the model's module tree,
attributes and trainable flags are restored as they were.

The same ``apply`` serves ``wrap`` (factors from a plan), ``load`` (factors read from a directory) and the
``load_adapter`` guard (``write_factors`` alone).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import bnb
from .layers import kind_of, read_weight
from .methods import MethodSpec, SVDOptions, finish
from .qbase import mark_quantized, replace_with_quantized
from .record import ADAPTER

__all__ = ["LayerInput", "LayerPlan", "Job", "Preparations", "plan_layers", "plan_layer", "apply", "write_factors",
           "layer_generator", "adapter_dtype", "lora_scaling"]


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
    """One layer's result: A₀ (r, in) and B₀ (out, r) in the adapter dtype, and the report's numbers."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    report: dict[str, Any]


@dataclass(frozen=True)
class Job:
    """What every layer of one initialization shares."""

    spec: MethodSpec
    rank: int
    scaling: float
    mode: str | None = None
    svd: SVDOptions = SVDOptions()
    options: Any = None  # the method's typed options (CordaOptions ...), None if it has none
    seed: int = 0


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling s: alpha / r, or alpha / √r under rsLoRA (the same float PEFT computes)."""
    return alpha / (rank ** 0.5) if use_rslora else alpha / rank


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT gives the LoRA factors of a layer whose base weight has ``weight_dtype``: fp64 stays fp64,
    every other float (and packed storage) gets fp32 (PEFT's autocast of half-precision adapters)."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


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
    kw: dict[str, Any] = dict(rank=job.rank, scaling=job.scaling, largest=job.spec.largest(job.mode), svd=job.svd,
                              generator=layer_generator(job.seed, layer.name))
    if job.spec.prepare is not None:
        kw["prepared"] = prepared
    if job.spec.needs_reference:
        kw["reference"] = layer.reference.detach().to(device=W.device, dtype=W.dtype)
    try:
        init = job.spec.init(W, **kw)
    except (RuntimeError, torch.linalg.LinAlgError) as e:  # e.g. an SVD that does not converge
        raise RuntimeError(f"{job.spec.name} failed on module {layer.name!r} (weight {tuple(W.shape)}): {e}") from e
    dtype = adapter_dtype(W.dtype)
    A, B = init.A.to(dtype), init.B.to(dtype)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise RuntimeError(f"{job.spec.name} gave non-finite factors for module {layer.name!r}")
    report = {"shape": tuple(W.shape), "sigma_max": float(init.sigma.max()) if init.sigma.numel() else 0.0,
              **init.stats}
    # contiguous, as they come back from a file: addmm rounds W − s·B·A differently for other strides
    fresh = dict(memory_format=torch.contiguous_format)
    return LayerPlan(layer.name, A.detach().cpu().clone(**fresh), B.detach().cpu().clone(**fresh), report)


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


# ---------------------------------------------------------------------------------------------------------- apply


class _Snapshot:
    """Enough of a model's state to undo ``get_peft_model``: every module's attributes and children, every
    parameter's trainable flag."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, dict(m.__dict__), dict(m._modules), dict(m._parameters)) for m in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        config = getattr(model, "config", None)
        self.config = None if config is None or not hasattr(config, "__dict__") else (config, dict(config.__dict__))

    def restore(self) -> None:
        if self.config is not None:
            self.config[0].__dict__.clear()
            self.config[0].__dict__.update(self.config[1])
        for m, attrs, children, params in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._modules.clear()
            m._modules.update(children)
            m._parameters.clear()
            m._parameters.update(params)
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _lora_layers(peft_model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    modules = dict(peft_model.base_model.model.named_modules())
    out = {}
    for n in names:
        layer = modules.get(n)
        if layer is None or not hasattr(layer, "lora_A") or ADAPTER not in layer.lora_A:
            raise TypeError(f"PEFT did not put a LoRA layer on module {n!r} (got {type(layer).__name__})")
        out[n] = layer
    return out


def _check_shapes(layers: Mapping[str, nn.Module], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for n, layer in layers.items():
        A, B = factors[n]
        lora_A, lora_B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if A.shape != lora_A.shape or B.shape != lora_B.shape:
            raise ValueError(f"factors of {n!r} have shapes {tuple(A.shape)}, {tuple(B.shape)}; its LoRA layer has "
                             f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
        if A.dtype != lora_A.dtype:
            raise TypeError(f"factors of {n!r} are {A.dtype}, its LoRA layer is {lora_A.dtype}")


@torch.no_grad()
def write_factors(peft_model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy (A (r, in), B (out, r)) into each named module's LoRA layer (shapes and dtypes checked first)."""
    layers = _lora_layers(peft_model, factors)
    _check_shapes(layers, factors)
    for n, layer in layers.items():
        layer.lora_A[ADAPTER].weight.data.copy_(factors[n][0])
        layer.lora_B[ADAPTER].weight.data.copy_(factors[n][1])


@torch.no_grad()
def _write_bases(layers: Mapping[str, nn.Module], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 progress: bool) -> None:
    """base ← W − s·B₀·A₀ for each layer, from the rounded factors (exactness at init, DESIGN.md)."""
    for n, layer in tqdm(layers.items(), desc="svdadapt write bases", disable=not progress, unit="layer"):
        base = layer.get_base_layer()
        kind = kind_of(base)
        W = read_weight(n, base)
        A, B = (t.to(W.device) for t in factors[n])
        new_base = finish(W, A, B, float(layer.scaling[ADAPTER]), kind.storage_dtype(base))
        del W
        kind.write(base, new_base)


@torch.no_grad()
def _quantize_bases(model: nn.Module, config: Any, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    rewrite_base: bool, scheme: str, progress: bool) -> None:
    """Replace each target by a bitsandbytes layer of ``scheme`` holding W − s·B₀·A₀ (or W), in fp32."""
    scaling = lora_scaling(config.r, config.lora_alpha, config.use_rslora)
    for n in tqdm(factors, desc=f"svdadapt quantize bases ({scheme})", disable=not progress, unit="layer"):
        base = None
        if rewrite_base:
            W = read_weight(n, model.get_submodule(n))
            A, B = (t.to(W.device) for t in factors[n])
            base = finish(W, A, B, scaling, torch.float32)
        replace_with_quantized(model, {n: base}, scheme)
    mark_quantized(model, scheme, set(factors))


@torch.no_grad()
def apply(model: nn.Module, config: Any, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
          rewrite_base: bool, quantize: str | None = None, progress: bool = False) -> nn.Module:
    """``get_peft_model(model, config)`` with each named layer's LoRA factors set to ``factors`` and, if
    ``rewrite_base``, its base weight to W − s·B₀·A₀. With ``quantize`` (a bitsandbytes scheme) the targets are
    first replaced by quantized layers holding that base (or W). On any failure the model is restored (module
    tree, attributes, config, trainable flags) and the error re-raised. Returns the ``peft.PeftModel``."""
    from peft import get_peft_model

    snapshot = _Snapshot(model)
    try:
        if quantize is not None:
            _quantize_bases(model, config, factors, rewrite_base, quantize, progress)
            rewrite_base = False
        with torch.random.fork_rng(devices=[]):  # PEFT's default init draws from the global RNG; ours overwrites it
            peft_model = get_peft_model(model, config)
        layers = _lora_layers(peft_model, factors)
        _check_shapes(layers, factors)  # every check before the first weight is written
    except Exception:
        snapshot.restore()
        raise
    if rewrite_base:
        _write_bases(layers, factors, progress)
    write_factors(peft_model, factors)
    for layer in layers.values():
        if bnb.is_bnb_layer(layer.get_base_layer()):
            bnb.guard_training(layer.get_base_layer())
    return peft_model
