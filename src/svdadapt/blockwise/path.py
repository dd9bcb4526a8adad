"""The block-by-block path: its options (``BlockwiseOptions``, ``resolve``) and ``plan_blockwise``, which runs the
pieces in turn: the stack (``stack.py``), the capture of block 0's inputs (``capture.py``) into the hidden-state store
(``hidden.py``), then the per-block stage (``stage.py``) block after block.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import fmt_bytes, hooked_targets
from ..engine.distributed import my_batches, world
from ..engine.plan import LayerPlan
from ..core.methods import MethodSpec
from .capture import capture
from .hidden import HiddenStates
from .stack import BlockwiseUnsupported, block_of, select_stack
from .stage import Plan, Stage

__all__ = ["BlockwiseOptions", "Compensation", "resolve", "plan_blockwise"]


@dataclass(frozen=True)
class BlockwiseOptions:
    """How ``wrap(blockwise=...)`` calibrates block by block.

    memory_budget_mb: hidden states (and the per-batch keyword arguments) kept in memory up to this many MiB; the
        hidden states of the batches past it go to disk.
    offload_dir: where the temporary directory for those goes (None: the system's temporary directory).
    sequential: EoRA only: block i+1 reads the outputs of the compressed, already compensated block i (the paper's
        sequential variant) instead of the reference's (or, with ``calibrate_on="compressed"``, the uncompensated
        compressed block's). None: sequential where it applies (EoRA without ``quantize=``): it gave the lower
        perplexity in every setting measured (docs/calibration.md).
    """

    memory_budget_mb: float = 1024.0
    offload_dir: str | os.PathLike | None = None
    sequential: bool | None = None

    def __post_init__(self) -> None:
        budget = self.memory_budget_mb
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0 or math.isinf(budget):
            raise ValueError(f"memory_budget_mb must be a finite number ≥ 0, got {budget!r}")
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise TypeError(f"sequential must be None, True or False, got {self.sequential!r}")
        if self.offload_dir is not None and not os.path.isdir(self.offload_dir):
            raise ValueError(f"offload_dir={os.fspath(self.offload_dir)!r} is not a directory")


@dataclass(frozen=True)
class Compensation:
    """The model being adapted, for EoRA's sequential variant (``BlockwiseOptions(sequential=True)``): its blocks,
    compensated by the plans (W_c + s·B·A, s = ``scaling``, the LoRA scaling), carry the hidden states on.
    Ignored without ``sequential``."""

    model: nn.Module
    scaling: float | Callable[[str], float] = 1.0  # one for all layers, or name -> the layer's (``Job.scaling_of``)


def resolve(blockwise: bool | BlockwiseOptions | None, spec: MethodSpec, calibration: Any,
            quantized: bool) -> BlockwiseOptions | None:
    """The options of the block-by-block path, or None for the whole-model one.

    None (automatic) and True take the block-by-block path when the method needs calibration and ``calibration`` is
    an iterable of batches (precomputed covariances need no forward pass); whether the model is a supported decoder
    stack is decided later, by :func:`plan_blockwise`. An explicit request (True or options) that cannot apply raises.
    ``sequential=None`` becomes True where it applies (a method that keeps the base, EoRA, without ``quantize=``):
    it gave the lower perplexity in every setting measured, so the automatic mode takes it too.
    """
    if blockwise is False:
        return None
    if blockwise is not None and not isinstance(blockwise, (bool, BlockwiseOptions)):
        raise TypeError("blockwise must be None, True, False or a svdadapt.blockwise.BlockwiseOptions, "
                        f"got {blockwise!r}")
    if spec.needs_calibration and not isinstance(calibration, Iterable):
        return None  # the whole-model path says what calibration must be
    batches = spec.needs_calibration and not isinstance(calibration, (Mapping, str, os.PathLike, torch.Tensor))
    if not batches:
        if blockwise is None:
            return None
        raise ValueError(f"blockwise={blockwise!r} calibrates from batches: method {spec.name!r} "
                         + ("was given precomputed covariances" if spec.needs_calibration else "needs no calibration"))
    options = blockwise if isinstance(blockwise, BlockwiseOptions) else BlockwiseOptions()
    if options.sequential is None:
        options = replace(options, sequential=not spec.rewrites_base and not quantized)
    if options.sequential and spec.rewrites_base:
        raise ValueError(f"sequential=True compensates a base left as it is (EoRA); {spec.name} rewrites the base "
                         "so that the wrapped model equals the original at init: its blocks already see the "
                         "original's inputs")
    if options.sequential and quantized:
        raise ValueError("sequential=True with quantize=: the compressed blocks exist only after the plan; "
                         "quantize the model first (a bitsandbytes model) and pass reference=")
    return options


def _note(progress: bool, stage: Stage, stack: str, n_blocks: int) -> None:
    if progress:
        store = stage.store
        print(f"svdadapt calibration: block by block over {stack!r} ({n_blocks} blocks), {len(stage.targets)} layers, "
              f"{stage.tokens:,} tokens; hidden states {fmt_bytes(store.used)} in memory, "
              f"{fmt_bytes(store.on_disk)} on disk")


@torch.no_grad()
def plan_blockwise(hook_model: nn.Module, targets: Mapping[str, nn.Module], batches: Iterable[Any], plan: Plan,
                   options: BlockwiseOptions = BlockwiseOptions(), *, compensation: Compensation | None = None,
                   progress: bool = True, centered: bool = False, experts: Mapping[str, Any] | None = None,
                   expert_options: Mapping[str, Any] | None = None) -> dict[str, LayerPlan]:
    """Every target's plan, the covariances collected one decoder block at a time.

    Args:
        hook_model: the model the batches run on (the reference, or the model itself).
        targets: name -> module of the model being adapted (``compensation.model``, default ``hook_model``);
            ``hook_model`` has modules of the same names.
        batches: as for ``collect_covariances`` (dicts run as ``hook_model(**batch)``, or tensors).
        plan: (one block's targets, their covariances) -> their ``LayerPlan``s (``wrap``'s: a ``ModelSource`` into
            ``plan.plan_layers``, covariance users counted per block).
        options: memory budget, offload directory, EoRA's sequential variant (None here: not sequential; ``resolve``
            decides it for ``wrap``).
        compensation: with ``options.sequential``, the model being adapted and the LoRA scaling of its
            compensation (default: ``hook_model``, scaling 1).
        centered: hand ``plan`` the centred covariances C − μμᵀ (a method's ``MethodSpec.centered``: EVA).
        experts: MoE expert parameters of ``hook_model`` (``calibration.experts.expert_parameters``): each block's
            per-expert covariances (keys ``<param>[e]``) are collected with its layers' and handed to ``plan`` in
            the same mapping (not with ``sequential``: the experts' compensation is not applied to the blocks).
        expert_options: ``weighting``, ``min_tokens``, ``fallback`` of their collection (``collect_covariances``'s).
    Returns:
        name -> ``LayerPlan``, in the order of ``targets``.
    Raises:
        BlockwiseUnsupported (a ``ValueError``): the model is not a decoder stack this path runs (the reason is in
            the message); the caller may fall back to the whole-model path (``wrap`` does in its automatic mode).
    """
    model = hook_model if compensation is None else compensation.model
    scaling = 1.0 if compensation is None else compensation.scaling
    scaling_of = scaling if callable(scaling) else (lambda _name: scaling)
    sequential = bool(options.sequential)
    batches, names = list(batches), list(targets)
    experts = dict(experts or {})
    if experts and sequential:
        raise BlockwiseUnsupported("sequential=True with expert parameters: the blocks would carry on without the "
                                   "experts' compensation")
    mine = my_batches(batches) if world()[1] > 1 else batches  # a process group: each rank runs its share
    hook_targets = hooked_targets(hook_model, names)
    store = HiddenStates(options.memory_budget_mb * 2 ** 20, options.offload_dir)
    try:
        stack, blocks, carriers = select_stack(hook_model, model, sequential,
                                               names + [p.key.rpartition(".")[0] for p in experts.values()])
        capture(model if sequential else hook_model, carriers, mine, store)
    except BlockwiseUnsupported:
        store.close()
        raise
    stage = Stage(store, plan, hook_targets, dict(targets), sequential, scaling_of, centered, experts=experts,
                  expert_options=dict(expert_options or {}))
    try:
        plans = _run_blocks(stage, hook_model, mine, stack, blocks, carriers, progress)
    finally:
        store.close()
    _note(progress, stage, stack, len(blocks))
    return plans


def routed_blockwise(hook_model: nn.Module, batches: Iterable[Any], experts: Mapping[str, Any],
                     options: BlockwiseOptions, take: Callable[[dict[str, torch.Tensor]], None],
                     progress: bool = True) -> None:
    """Every expert's routed-token covariance of ``experts`` (``calibration.experts.expert_parameters``), collected
    one decoder block at a time on ``hook_model`` (never sequential: the model's own forward, as a whole-model pass
    computes it), handed block by block to ``take`` (``"<param>[e]"`` -> (in, in), after the fallback) and freed.
    ``BlockwiseUnsupported`` as :func:`plan_blockwise`."""
    def plan(_targets: dict[str, nn.Module], covs: dict[str, torch.Tensor]) -> dict[str, LayerPlan]:
        take(covs)
        return {}

    plan_blockwise(hook_model, {}, batches, plan, replace(options, sequential=False), progress=progress,
                   experts=experts)


def _run_blocks(stage: Stage, hook_model: nn.Module, batches: list[Any], stack: str, blocks: nn.ModuleList,
                carriers: nn.ModuleList, progress: bool) -> dict[str, LayerPlan]:
    """The targets outside the stack (one whole-model pass with hooks on them alone), then block after block up to
    the last one holding a target."""
    names = list(stage.targets)
    where = {n: block_of(n, stack, len(blocks)) for n in names}
    held = {k: block_of(p.key, stack, len(blocks)) for k, p in stage.experts.items()}  # expert parameters' blocks
    plans: dict[str, LayerPlan] = {}
    outside = [n for n in names if where[n] is None]
    outside_experts = [k for k, i in held.items() if i is None]
    if outside or outside_experts:
        plans.update(stage.covariances_and_plans(hook_model, batches, outside, outside_experts))
    last = max(i for i in [*where.values(), *held.values()] if i is not None)
    for i in tqdm(range(last + 1), desc="svdadapt blocks", unit="block", disable=not progress):
        plans.update(stage.step(i, [n for n in names if where[n] == i], blocks[i], carriers[i],
                                [k for k, b in held.items() if b == i]))
    return {n: plans[n] for n in names} | {k: v for k, v in plans.items() if k not in where}
