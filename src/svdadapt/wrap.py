"""``wrap()``: check everything, plan every layer (``plan.plan_layers``), then apply the plan to a PEFT model."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Iterable

import torch
from torch import nn

from .engine import checks
from .blockwise import BlockwiseOptions, BlockwiseUnsupported, Compensation, plan_blockwise, routed_blockwise
from .blockwise import resolve as resolve_blockwise
from .calibration import as_covariances, caller_level
from .calibration.experts import expert_parameters
from .engine.distributed import gather_plans, my_batches, my_share, reduce_covariances, same_job, world
from .engine.apply import apply
from .engine import allocation, experts
from .engine.plan import LayerPlan, plan_layer, plan_layers
from .lifecycle.export import attach
from .engine.job import (Job, Request, build_job, calibrates_on, check_needs, check_packing, keywords, lora_config,
                  recorded_options, select_targets)
from .modules.layers import kind_of
from .core.methods import SVD_CHOICES, get_method
from .quant.quantized import compressed_inputs, plan_quantized_layer
from .core.record import AdaptRecord
from .engine.sources import ModelSource
from .modules.targets import is_peft, resolve_targets

__all__ = ["wrap", "resolve_targets", "SVD_CHOICES", "build_job", "select_targets", "lora_config"]


def _check_not_peft(model: nn.Module) -> None:
    if is_peft(model):
        raise TypeError(
            f"model is already a PEFT model ({type(model).__name__}); pass the base model (e.g. peft_model.get_base_model() "
            "after svdadapt.unwrap) to svdadapt.wrap"
        )


@dataclass
class _Inputs:
    """What one ``wrap`` call plans from: the model, its targets, the calibration and reference as given, the
    reference's weights of the targets (out, in), whether to show progress bars, and the checksum of every target's
    weight before any rewrite (read in the pass that checks it is finite)."""

    model: nn.Module
    targets: dict[str, nn.Module]
    calibration: Any
    reference: Any
    references: dict[str, torch.Tensor] | None
    progress: bool
    base_checksums: dict[str, str]


def _hook_model(job: Job, inputs: _Inputs, calibration: Any) -> nn.Module:
    """The model the calibration batches run on, as the method's options name it (with ``quantize=``, the model
    itself is the full-precision reference)."""
    on, quantized = calibrates_on(job), job.quant is not None
    given = isinstance(calibration, (Mapping, str))
    if on == "reference" and not quantized:
        if not isinstance(inputs.reference, nn.Module) and not given:
            raise ValueError("calibrate_on='reference' (the default) collects on the reference model: pass "
                             "reference= as an nn.Module (not a state dict), pass precomputed Covariances, or "
                             "set calibrate_on='compressed'")
        return inputs.reference
    if on == "compressed" and quantized and not given:
        raise ValueError("calibrate_on='compressed' with quantize=: the model is quantized after calibration; use "
                         "calibrate_on='reference' (the default) or pass precomputed Covariances")
    return inputs.model


def _covariances(job: Job, inputs: _Inputs, calibration: Any) -> dict[str, torch.Tensor] | None:
    """The checked covariance of every target, collected on the whole model (``_hook_model``)."""
    if not job.spec.needs_calibration:
        return None
    hook_model, targets, progress = _hook_model(job, inputs, calibration), inputs.targets, inputs.progress
    given = isinstance(calibration, (Mapping, str))
    if not given and world()[1] > 1:  # each rank collects on its share of the batches; the sums are all-reduced
        covs = reduce_covariances(as_covariances(my_batches(calibration), hook_model, list(targets), progress=progress))
    else:
        covs = as_covariances(calibration, hook_model, list(targets), progress=progress)
    return checks.check_covariances(covs, targets, job.spec.centered)


def _plan(job: Job, references: dict[str, torch.Tensor] | None, targets: dict[str, nn.Module],
          covariances: dict[str, torch.Tensor] | None, progress: bool = False) -> dict[str, LayerPlan]:
    """Every layer's factors and report, the model untouched; inside a process group each rank plans its share
    and the plans are all-gathered."""
    mine = my_share({n: kind_of(m).shape(m) for n, m in targets.items()}, job)
    source = ModelSource({n: targets[n] for n in mine}, covariances, references)
    layers, plan_one = iter(source), plan_layer
    if job.quant is not None and job.spec.rewrites_base:
        plan_one = partial(plan_quantized_layer, quant=job.quant)
    elif job.quant is not None:
        layers = compressed_inputs(layers, job.quant.scheme)
    plans = plan_layers(job, layers, source.covariance_users(), total=len(source), progress=progress,
                        plan_one=plan_one)
    return gather_plans(plans, list(targets))


def _not_sequential(options: Any, blockwise: Any) -> Any:
    """Rank allocation's block-by-block options: EoRA's sequential inputs (block i+1 reads block i compensated at
    its rank) need the ranks before the allocation has them, so the default turns it off and an explicit
    ``sequential=True`` is an error."""
    if options is None or not options.sequential:
        return options
    if isinstance(blockwise, BlockwiseOptions) and blockwise.sequential:
        raise ValueError("allocate= with BlockwiseOptions(sequential=True): block i+1's inputs would depend on the "
                         "ranks of block i, which the allocation picks after every layer is decomposed; use "
                         "sequential=False (the default with allocate=)")
    return replace(options, sequential=False)


def _plans(job: Job, inputs: _Inputs, blockwise: Any, allocating: bool = False) -> dict[str, LayerPlan]:
    """Every layer's plan; CorDA / EoRA covariances collected one decoder block at a time where
    ``blockwise.resolve`` and the model allow (svdadapt/blockwise/), else on the whole model: automatic
    (``blockwise=None``) with a one-line warning saying why, explicit (True or options) with the error."""
    def whole_model(batches: Any) -> dict[str, LayerPlan]:
        covariances = _covariances(job, inputs, batches)
        return _plan(job, inputs.references, inputs.targets, covariances, inputs.progress)

    options = resolve_blockwise(blockwise, job.spec, inputs.calibration, job.quant is not None)
    if allocating:
        options = _not_sequential(options, blockwise)
    if options is None:
        return whole_model(inputs.calibration)
    batches = list(inputs.calibration)  # read once: the whole-model path, should it take over, gets the same batches
    try:
        return plan_blockwise(_hook_model(job, inputs, batches), inputs.targets, batches,
                              partial(_plan, job, inputs.references), options,
                              compensation=Compensation(inputs.model, job.scaling_of), progress=inputs.progress,
                              centered=job.spec.centered)
    except BlockwiseUnsupported as e:
        if blockwise is not None:
            raise
        warnings.warn(f"svdadapt: {e.reason}: calibrating on the whole model", stacklevel=caller_level())
        return whole_model(batches)


def _inputs(job: Job, model: nn.Module, request: Request) -> _Inputs:
    """The targets, checked against the job (packed layers, quantizable shapes, weights, rank), and the reference's
    weights."""
    targets = select_targets(model, request.target_modules, request.exclude_modules, job)
    check_packing(job, targets)
    base_checksums = checks.check_target_weights(model, targets, job.rank, job.spec.rewrites_base,
                                                 job.rank_pattern)
    reference = request.reference
    references = checks.reference_weights(reference, targets) if reference is not None else None
    return _Inputs(model, targets, request.calibration, reference, references, request.progress, base_checksums)


def _allocated_plans(job: Job, inputs: _Inputs, blockwise: Any, options: allocation.AllocateOptions
                     ) -> tuple[Job, dict[str, LayerPlan], dict[str, Any]]:
    """Every layer planned once at its maximum rank, the ranks allocated from those spectra, the plans cut to
    them (engine/allocation.py): (the job with the ranks as its rank_pattern, the plans, the summary)."""
    shapes = {n: kind_of(m).shape(m) for n, m in inputs.targets.items()}
    plan_job = allocation.max_rank_job(job, allocation.layer_caps(options, shapes))
    plans = _plans(plan_job, inputs, blockwise, allocating=True)
    return allocation.allocate_plans(job, plan_job, plans, options, shapes)


def _record(job: Job, targets: dict[str, nn.Module], plans: dict[str, LayerPlan],
            base_checksums: dict[str, str], allocated: dict[str, Any] | None = None) -> AdaptRecord:
    return AdaptRecord(method=job.spec.name, rank=job.rank, alpha=job.alpha, options=recorded_options(job),
                       targets=list(targets), init_factors={n: (p.A, p.B) for n, p in plans.items()},
                       report={n: p.report for n, p in plans.items()}, base_checksums=base_checksums,
                       quantize=None if job.quant is None else job.quant.scheme,
                       rank_pattern=dict(job.rank_pattern), alpha_pattern=dict(job.alpha_pattern),
                       allocation=allocated)


@same_job  # under torch.distributed: the ranks' arguments compared first, one rank's error raised on all
@keywords  # alpha ... blockwise, mode, damping, calibrate_on: declared once, in job.Request and the method options
@torch.no_grad()
def wrap(
    model: nn.Module,
    method: str,
    rank: int,
    *,
    request: Request,
    task_type: str | None = None,
    modules_to_save: Iterable[str] | None = None,
    quantize: str | None = None,
    quant_iters: int = 1,
    allocate: bool | allocation.AllocateOptions = False,
):
    """Wrap ``model`` in a PEFT LoRA model whose adapters are initialized by ``method``. Every keyword is described
    in docs/wrap.md (and docs/calibration.md, docs/quantization.md); in short:

    Args:
        model: any ``nn.Module`` with ``nn.Linear`` / transformers ``Conv1D`` (/ bitsandbytes, for EoRA) layers;
            targeted weights are rewritten in place by the methods that rewrite the base.
        method, rank, alpha: a key of ``svdadapt.METHODS``; LoRA rank (1 ≤ r ≤ min(out, in) of every target);
            LoRA alpha (None: rank). ``use_rslora``: scaling alpha/√r. ``rank_pattern``, ``alpha_pattern``:
            PEFT's per-layer ranks and alphas (key -> value, matched as PEFT matches them; docs/wrap.md).
        target_modules, exclude_modules, modules_to_save, task_type: as in PEFT's ``LoraConfig``
            (``"all-linear"`` leaves out the output head; ``task_type`` None picks CAUSAL_LM for ``*ForCausalLM``).
        svd, niter, oversample, seed: ``"auto"`` / ``"full"`` / ``"randomized"``, Krylov steps (None:
            round(log2(short side))), extra columns per block, and the seed of each layer's private generator.
        mode, damping: CorDA's ``"ipa"`` (top-r, default) or ``"kpa"`` (bottom-r), and its initial damping λ.
        options: the method's options as one object instead (``methods.CordaOptions``, ``EoraOptions``).
        calibration, reference, calibrate_on, blockwise: CorDA/EoRA's covariances (a ``Covariances``, a mapping,
            a saved file or an iterable of batches), EoRA's uncompressed model or state dict, which model EoRA's
            batches run on, and whether batches are collected one decoder block at a time (None: where supported).
        quantize, quant_iters: a scheme of ``modules.qbase.SCHEMES`` (bitsandbytes "nf4", "fp4", "int8"; HQQ
            "hqq4"; torchao "torchao-int4", "torchao-int8") for the new base (QPiSSA: the
            residual; EoRA: W itself, compensated), and LoftQ-style alternation steps (the best step is kept).
        progress: progress bars.
        target_parameters: PEFT's: parameters as targets, matched as ``<module>.<param>`` or a dotted suffix
            (MoE experts: ``["experts.gate_up_proj", "experts.down_proj"]``); each expert decomposed on its own
            (docs/experts.md). ``target_modules=[]`` adapts the parameters only.
        allocate: True or ``svdadapt.AllocateOptions(budget=, min_rank=, max_rank=, objective=)``: each layer's
            rank chosen to maximize the method's objective within a parameter budget (default: what uniform
            ``rank`` costs), written as the ``rank_pattern`` (docs/wrap.md, "Allocating ranks under a budget").

    Returns:
        ``peft.PeftModel``; only the LoRA factors require grad. ``peft_model.svdadapt`` is an
        ``svdadapt.record.AdaptRecord``: method, options, the initial factors (on CPU) and a per-layer report.

    Every check runs before the model is touched, and a failure while the PEFT model is built restores it.
    """
    spec = get_method(method)
    _check_not_peft(model)
    checks.check_flag("progress", request.progress)
    job = build_job(spec, rank, request, quantize=quantize, quant_iters=quant_iters, task_type=task_type,
                    modules_to_save=modules_to_save)
    experts.refuse_unsupported(job.target_parameters, quantize=quantize, rewrites_base=spec.rewrites_base,
                               target_modules=request.target_modules, allocate=allocate)
    options = allocation.resolve(allocate, job, job.quant is not None and spec.rewrites_base)
    check_needs(spec, request.calibration, request.reference, job.quant)
    inputs = _inputs(job, model, request)
    inputs, param_targets, checksums, param_plans = _expert_plans(job, model, inputs, request)
    job, inputs, plans, allocated = _layer_plans(job, inputs, request.blockwise, options)
    params = experts.ParamApply(param_targets, {k: (p.A, p.B) for k, p in param_plans.items()},
                                spec.rewrites_base) if param_targets else None
    peft_model = apply(model, lora_config(model, inputs.targets, job), {n: (p.A, p.B) for n, p in plans.items()},
                       rewrite_base=spec.rewrites_base, quantize=None if job.quant is None else job.quant.scheme,
                       progress=request.progress, params=params)
    record = _record(job, inputs.targets, plans, inputs.base_checksums, allocated)
    if params is not None:
        experts.record_parameters(record, params, param_plans, checksums)
    attach(peft_model, record)  # save_pretrained guard, see lifecycle/export.py
    return peft_model


def _expert_plans(job: Job, model: nn.Module, inputs: _Inputs, request: Request
                  ) -> tuple[_Inputs, dict[str, Any], dict[str, str], dict[str, Any]]:
    """``target_parameters`` (engine/experts.py): the parameters selected (with the coverage warning), their
    checksums, and every expert planned; the inputs with the calibration batches read into a list if the experts
    collected on them."""
    param_targets = experts.select(model, job, inputs.targets)
    experts.warn_coverage(model, inputs.targets, param_targets)
    checksums = experts.param_checksums(model, param_targets)
    inputs, expert_calibration = _expert_calibration(job, inputs, param_targets, request.blockwise)
    return inputs, param_targets, checksums, experts.plan_parameters(job, model, param_targets, expert_calibration,
                                                                     request.reference)


def _layer_plans(job: Job, inputs: _Inputs, blockwise: Any, options: allocation.AllocateOptions | None
                 ) -> tuple[Job, _Inputs, dict[str, LayerPlan], dict[str, Any] | None]:
    """The target layers' plans, uniform or allocated (then the job carries the ranks as its rank_pattern and a
    layer allocated rank 0 leaves the targets): (job, inputs, plans, the allocation summary or None)."""
    if not inputs.targets:
        return job, inputs, {}, None
    if options is None:
        return job, inputs, _plans(job, inputs, blockwise), None
    job, plans, allocated = _allocated_plans(job, inputs, blockwise, options)
    inputs = replace(inputs, targets={n: m for n, m in inputs.targets.items() if n in plans},
                     base_checksums={n: c for n, c in inputs.base_checksums.items() if n in plans})
    return job, inputs, plans, allocated


def _expert_calibration(job: Job, inputs: _Inputs, param_targets: Mapping[str, Any], blockwise: Any
                        ) -> tuple[_Inputs, Any]:
    """What the experts' plans read as calibration: given covariances as they are; from batches, the routed-token
    covariances of every expert, collected in a pass of their own on the model the method calibrates on: one
    decoder block at a time where the layers' calibration would be (``blockwise.routed_blockwise``, never
    sequential: what ``init_checkpoint`` computes), else on the whole model (``experts.routed_covariances``). The
    batches are read once into a list, which the layers' calibration reuses."""
    calibration = inputs.calibration
    if not (param_targets and job.spec.needs_calibration) or isinstance(calibration, (Mapping, str, os.PathLike)):
        return inputs, calibration
    inputs = replace(inputs, calibration=list(calibration))
    hook_model = _hook_model(job, inputs, inputs.calibration)
    options = resolve_blockwise(blockwise, job.spec, inputs.calibration, job.quant is not None)
    if options is not None:
        experts.check_routable(param_targets)
        covs: dict[str, torch.Tensor] = {}
        try:
            routed_blockwise(hook_model, inputs.calibration, expert_parameters(hook_model, list(param_targets)),
                             options, covs.update, inputs.progress)
            return inputs, covs
        except BlockwiseUnsupported:
            if blockwise is not None:
                raise
    return inputs, experts.routed_covariances(hook_model, inputs.calibration, param_targets, inputs.progress)
