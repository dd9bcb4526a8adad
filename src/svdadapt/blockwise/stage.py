"""The per-block stage of the block-by-block path: block i runs on every batch's hidden state with hooks on its
targets only (``calibration.collect`` on a small module that runs the block, so padding, shared inputs and every
check follow the whole-model rules), its covariances go to ``plan`` and are freed, and the block's outputs become
block i+1's inputs: the reference's outputs, or (EoRA's sequential variant) those of the compressed block with its
just-computed compensation W_c + s·B·A applied (forward hooks adding s·(x·Aᵀ)·Bᵀ, no PEFT model built).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..calibration import collect, eval_mode, fallback_covariances, first_tensor
from ..calibration.experts import ExpertParam
from ..engine.checks import check_covariances
from ..engine.distributed import reduce_covariances, world
from ..engine.plan import LayerPlan
from .hidden import HiddenStates

__all__ = ["Plan", "Stage"]

# one block's targets (name -> module of the adapted model) and their checked covariances -> their plans
Plan = Callable[[dict[str, nn.Module], dict[str, torch.Tensor]], dict[str, LayerPlan]]


class _BlockRun(nn.Module):
    """What ``calibration.collect`` runs for one block: ``forward(slot=j, attention_mask=m)`` runs the block on
    batch j's hidden state (the mask only tells the hooks which rows are padding) and, with ``keep``, stores the
    output as the next block's input."""

    def __init__(self, block: nn.Module, index: int, store: HiddenStates, keep: bool) -> None:
        super().__init__()
        self.block = block
        self.index, self.store, self.keep = index, store, keep

    def forward(self, slot: int, attention_mask: torch.Tensor | None = None) -> None:
        out = self.store.run(self.block, slot, self.index)
        if self.keep:
            self.store.set(slot, out)


def _add_lora(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor, *,
              A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """A forward hook: the output of W_c plus the compensation, as PEFT's LoRA layer computes it (the factors go to
    the input's device here: a block loaded only while it runs, ``svdadapt.lazy``, has no device before)."""
    x = first_tensor(args, kwargs)
    A, B = A.to(x.device), B.to(x.device)
    return out + (((x.to(A.dtype) @ A.mT) @ B.mT) * scaling).to(out.dtype)


@contextmanager
def _compensated(modules: Mapping[str, nn.Module], plans: Mapping[str, LayerPlan],
                 scaling: Callable[[str], float]) -> Iterator[None]:
    """Each named module computes W_c·x + s·B·A·x while inside."""
    handles = []
    try:
        for name, module in modules.items():
            A, B, s = plans[name].A, plans[name].B, scaling(name)
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, _A=A, _B=B, _s=s: _add_lora(m, a, k, o, A=_A, B=_B, scaling=_s), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Stage:
    """What every block's step shares."""

    store: HiddenStates
    plan: Plan
    hook_targets: dict[str, nn.Module]  # name -> the module hooked for calibration (on the hook model)
    targets: dict[str, nn.Module]  # name -> the module adapted (on the wrapped model)
    sequential: bool
    scaling: Callable[[str], float]  # name -> the layer's LoRA scaling
    centered: bool = False  # the plans read the centred covariances C − μμᵀ (EVA)
    tokens: int = 0
    # MoE expert parameters (key -> ExpertParam of the hook model) and the options of their collection: weighting,
    # min_tokens, fallback (``collect_covariances``'s); their per-expert covariances go to ``plan`` with the block's
    experts: dict[str, ExpertParam] = field(default_factory=dict)
    expert_options: dict[str, Any] = field(default_factory=dict)

    def step(self, index: int, names: list[str], collect_block: nn.Module, propagate_block: nn.Module,
             experts: list[str] | None = None) -> dict[str, LayerPlan]:
        """Plan block ``index``'s ``names`` (and ``experts``, keys of ``self.experts``) from their covariances and
        move every hidden state past the block."""
        plans: dict[str, LayerPlan] = {}
        runner = _BlockRun(collect_block, index, self.store, keep=not self.sequential)
        if names or experts:
            slots = [{"slot": j} if m is None else {"slot": j, "attention_mask": m}
                     for j, m in enumerate(self.store.masks)]
            plans = self.covariances_and_plans(runner, slots, names, experts)
        elif not self.sequential:
            with eval_mode(collect_block):
                for j in range(len(self.store)):
                    runner(slot=j)
        if self.sequential:
            with eval_mode(propagate_block), _compensated({n: self.targets[n] for n in names}, plans, self.scaling):
                for j in range(len(self.store)):
                    self.store.set(j, self.store.run(propagate_block, j, index))
        return plans

    def covariances_and_plans(self, run: nn.Module, batches: list[Any], names: list[str],
                              experts: list[str] | None = None) -> dict[str, LayerPlan]:
        """``names``' covariances from ``run`` over ``batches`` (all-reduced over the ranks of a process group),
        handed to ``plan``; they are freed on return. With ``experts``, every expert's covariance of those
        parameters too (after the all-reduce, the experts' fallback), keyed ``<param>[e]`` beside the layers'."""
        params = {k: self.experts[k] for k in experts or []}
        opts = self.expert_options
        covs = collect(run, batches, {n: self.hook_targets[n] for n in names}, torch.float32, progress=False,
                       experts=params or None, weighting=opts.get("weighting", "routing"))
        if world()[1] > 1:
            covs = reduce_covariances(covs)
        keys = [k for p in params.values() for k in p.keys()]
        if keys:
            covs = fallback_covariances(covs, keys, min_tokens=opts.get("min_tokens"),
                                        fallback=opts.get("fallback", "pooled"))
        self.tokens = max(self.tokens, covs.tokens)
        targets = {n: self.targets[n] for n in names}
        experts_covs = {k: covs.centered(k) if self.centered else covs[k] for k in keys}
        return self.plan(targets, {**check_covariances(covs, targets, self.centered), **experts_covs})
