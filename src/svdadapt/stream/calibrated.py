"""CorDA and EoRA from checkpoints, one decoder block at a time: the calibration of ``init_checkpoint``.

The batches run block by block (``blockwise.plan_blockwise``, the path ``wrap`` takes on a loaded model) on the
meta-device skeleton of the checkpoint, each block's weights read only while it runs (``lazy.LazyBlocks``). A block's
targets are planned from its covariances while it is loaded and journaled (``journal.layer_base``); the base
is then written from the journal as for the data-free methods.

MoE experts (``target_parameters``): a pass of their own over the blocks of the model the method calibrates on
(never sequential: the whole-model pass ``wrap`` makes, one block at a time), each block's per-expert covariances
from the tokens routed to each expert; each parameter is planned from them while its block runs
(``experts.StreamedParams.plan_with``), its residual written later with the base.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from ..blockwise import BlockwiseOptions, Compensation, find_stack, plan_blockwise, routed_blockwise
from ..engine.distributed import barrier, my_share
from ..engine.plan import LayerInput, LayerPlan, Preparations, plan_layer
from ..calibration.experts import expert_parameters, parse_expert_key
from ..engine.job import Job, calibrates_on
from .experts import ModuleView
from .lazy import LazyBlocks
from ..modules.layers import read_weight
from .journal import Journal, journal_plan

__all__ = ["plan_calibrated"]


def _stack(model: nn.Module, what: str) -> tuple[str, nn.ModuleList]:
    found = find_stack(model)
    if found is None:
        raise ValueError(f"init_checkpoint calibrates one decoder block at a time, and the {what} "
                         f"({type(model).__name__}) has no decoder stack (a ModuleList of identical blocks): load the "
                         "model and use svdadapt.wrap")
    return found


def plan_calibrated(job: Job, ck: Any, journal: Journal, calibration: Iterable[Any], options: BlockwiseOptions,
                    progress: bool, reference: Any = None) -> None:
    """Every target's factors into the journal, the covariances collected one decoder block at a time.

    ``ck`` (``stream._Checkpoint``) is the model adapted (CorDA: the original; EoRA: the compressed one), its
    skeleton run with each block loaded only while it runs (``lazy.LazyBlocks``); a block's targets are planned from
    its covariances while it is loaded. EoRA: ``reference`` is the uncompressed checkpoint, opened the same way; its
    blocks are run when ``calibrate_on="reference"``, each target's reference weight is read from it, and with
    ``options.sequential`` the hidden states are carried on by the compensated compressed blocks (as ``wrap``).
    Under ``torch.distributed`` the batches are split over the ranks (covariances all-reduced) and each rank plans
    its share of every block's targets."""
    stack = _stack(ck.model, "model")
    ref_stack = None if reference is None else _stack(reference.model, "reference")
    if ref_stack is not None and (ref_stack[0] != stack[0] or len(ref_stack[1]) != len(stack[1])):
        raise ValueError(f"the reference's decoder stack {ref_stack[0]!r} ({len(ref_stack[1])} blocks) is not the "
                         f"model's {stack[0]!r} ({len(stack[1])} blocks)")

    def plan(block: dict[str, nn.Module], covs: dict[str, torch.Tensor]) -> dict[str, LayerPlan]:
        """This rank's share of the block's targets, planned from the loaded block's own weights (the checkpoint is
        not read again) and journaled; the base is built later, when it is written."""
        # EoRA on the reference's inputs ran the reference's modules: load the model's own (sequential: they run next)
        lazy_model.ensure(block)
        mine = my_share({n: ck.source.shapes[n] for n in block}, job)
        prep = Preparations(job, Counter(id(covs[n]) for n in mine))
        entries = {}

        def plan_one(layer: LayerInput) -> LayerPlan:
            prepared = prep.take(layer.name, layer.C, layer.W.device) if job.spec.prepare is not None else None
            return plan_layer(job, layer, prepared)

        for n in mine:
            W_ref = None if reference is None else reference.source.read(n)[0].W
            layer = LayerInput(n, read_weight(n, block[n]), covs[n], W_ref)
            entries[n], fresh = journal_plan(job, journal, layer, block[n].weight, str(ck.reader.file_of(
                ck.source.keys[n])), plan_one)
            if fresh:
                journal.put(n, entries[n])
        barrier()
        entries.update({n: journal.require(n) for n in block if n not in entries})  # the other ranks' share
        return {n: LayerPlan(n, entries[n].A, entries[n].B, entries[n].report) for n in block}

    with ExitStack() as lazy:
        lazy_model = lazy.enter_context(LazyBlocks(ck.model, ModuleView(ck.reader, ck.model), *stack))
        hook_model = ck.model
        if reference is not None:
            lazy.enter_context(LazyBlocks(reference.model, ModuleView(reference.reader, reference.model), *ref_stack))
            hook_model = reference.model if calibrates_on(job) == "reference" else ck.model
        if ck.params is not None:
            _plan_experts(ck, hook_model, calibration, options, progress, reference)
        if ck.targets:
            plan_blockwise(hook_model, ck.targets, calibration, plan, options,
                           compensation=Compensation(ck.model, job.scaling_of), progress=progress,
                           centered=job.spec.centered)


def _plan_experts(ck: Any, hook_model: nn.Module, calibration: Iterable[Any], options: BlockwiseOptions,
                  progress: bool, reference: Any) -> None:
    """Every targeted expert parameter planned from the covariances of the tokens routed to each expert, collected
    block by block on ``hook_model`` (not sequential), each parameter while its block runs."""
    params = ck.params

    def plan(covs: dict[str, torch.Tensor]) -> None:
        keys = {parse_expert_key(k)[0] for k in covs}
        for key in (k for k in params.parameters() if k in keys):
            params.plan_with(key, covs, None if reference is None else reference.params)

    routed_blockwise(hook_model, calibration, expert_parameters(hook_model, params.parameters()), options, plan,
                     progress)
