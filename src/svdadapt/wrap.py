"""``wrap()``: check everything, plan every layer (``engine.plan_layers``), then apply the plan to a PEFT model."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any, Iterable

import torch
from torch import nn

from . import checks
from .blockwise import BlockwiseOptions, BlockwiseUnsupported, Compensation, plan_blockwise
from .blockwise import resolve as resolve_blockwise
from .calibration import as_covariances, caller_level
from .distributed import gather_plans, my_batches, my_share, reduce_covariances, same_job, world
from .engine import Job, LayerPlan, apply, lora_scaling, plan_layer, plan_layers
from .export import attach
from .layers import kind_of, layer_checksum
from .linalg import DEFAULT_NITER, DEFAULT_OVERSAMPLE
from .methods import SVD_CHOICES, MethodSpec, SVDOptions, check_method_keywords, get_method
from .qbase import QuantOptions
from .quant import compressed_inputs, plan_quantized_layer
from .record import AdaptRecord
from .sources import ModelSource
from .targets import is_peft, matches, peft_target_list, resolve_targets, saved_modules

__all__ = ["wrap", "resolve_targets", "SVD_CHOICES", "build_job", "select_targets", "lora_config"]


def select_targets(model: nn.Module, target_modules: Any, exclude_modules: Any, keep_whole: list[str]) -> dict[str, nn.Module]:
    """``resolve_targets`` less the modules PEFT trains whole (it never puts LoRA on them)."""
    targets = resolve_targets(model, target_modules, exclude_modules)
    kept = {n: m for n, m in targets.items() if not (keep_whole and matches(keep_whole, n))}
    if not kept:
        raise ValueError(f"target_modules={target_modules!r} matched only modules PEFT saves whole ({keep_whole}); "
                         "nothing is left to adapt")
    return kept


def _check_not_peft(model: nn.Module) -> None:
    if is_peft(model):
        raise TypeError(
            f"model is already a PEFT model ({type(model).__name__}); pass the base model (e.g. peft_model.get_base_model() "
            "after svdadapt.unwrap) to svdadapt.wrap"
        )


def build_job(spec: MethodSpec, rank: int, alpha: float | None, use_rslora: bool, svd: str, niter: int | None,
         oversample: int, seed: int, mode: str | None, damping: float, calibrate_on: str) -> Job:
    """Every option checked by type and value, into the job all layers share."""
    checks.check_rank(rank)
    checks.check_alpha(alpha)
    checks.check_flag("use_rslora", use_rslora)
    checks.check_seed(seed)
    check_method_keywords(damping=damping, calibrate_on=calibrate_on)
    svd_options = SVDOptions(svd, niter, oversample)
    mode = spec.resolve_mode(mode)
    if svd == "randomized" and not spec.largest(mode):
        raise ValueError(f"svd='randomized' cannot find the smallest singular triplets needed by {spec.name!r}"
                         f"{f' mode={mode}' if mode else ''}; use svd='full' or 'auto'")
    scaling = lora_scaling(rank, rank if alpha is None else alpha, use_rslora)
    options = spec.options(mode, damping=damping, calibrate_on=calibrate_on)
    return Job(spec, rank, scaling, mode, svd_options, options, seed)


def _check_needs(spec: MethodSpec, calibration: Any, reference: Any, quant: QuantOptions | None) -> None:
    if spec.needs_calibration and calibration is None:
        raise ValueError(f"method {spec.name!r} needs calibration=: a svdadapt.Covariances or an iterable of batches")
    if spec.needs_reference and reference is None and quant is None:
        raise ValueError(f"method {spec.name!r} needs reference=: the uncompressed model or its state dict")
    if spec.needs_reference and reference is not None and quant is not None:
        raise ValueError(f"method {spec.name!r} with quantize={quant.scheme!r} compresses the model itself, which is "
                         "then the reference: drop reference=")


def _quant_options(quantize: str | None, quant_iters: Any) -> QuantOptions | None:
    if quantize is None:
        if isinstance(quant_iters, bool) or not isinstance(quant_iters, int) or quant_iters < 1:
            raise ValueError(f"quant_iters must be an integer >= 1, got {quant_iters!r}")
        if quant_iters != 1:
            raise ValueError(f"quant_iters={quant_iters!r} needs quantize= (a bitsandbytes scheme)")
        return None
    return QuantOptions(quantize, quant_iters)


def _check_packing(spec: MethodSpec, targets: dict[str, nn.Module], quant: QuantOptions | None) -> None:
    """A packed (already quantized) target can be read but not re-decomposed into a new base."""
    packed = [n for n, m in targets.items() if kind_of(m).packed]
    if not packed:
        return
    layer = type(targets[packed[0]]).__name__
    if quant is not None:
        raise ValueError(f"quantize={quant.scheme!r} on a model that is already quantized (module {packed[0]!r} is a "
                         f"{layer}); load the full-precision model instead")
    if spec.rewrites_base:
        raise ValueError(f"{spec.name} rewrites the base weights, but module {packed[0]!r} is a quantized {layer}: "
                         f"run {spec.name} on the full-precision model with quantize=... (e.g. 'nf4') instead")


def _hook_model(job: Job, model: nn.Module, calibration: Any, reference: Any, quant: QuantOptions | None) -> nn.Module:
    """The model the calibration batches run on, as the method's options name it (with ``quantize=``, the model
    itself is the full-precision reference)."""
    on = getattr(job.options, "calibrate_on", None)
    given = isinstance(calibration, (Mapping, str))
    if on == "reference" and quant is None:
        if not isinstance(reference, nn.Module) and not given:
            raise ValueError("calibrate_on='reference' (the default) collects on the reference model: pass "
                             "reference= as an nn.Module (not a state dict), pass precomputed Covariances, or "
                             "set calibrate_on='compressed'")
        return reference
    if on == "compressed" and quant is not None and not given:
        raise ValueError("calibrate_on='compressed' with quantize=: the model is quantized after calibration; use "
                         "calibrate_on='reference' (the default) or pass precomputed Covariances")
    return model


def _covariances(job: Job, model: nn.Module, targets: dict[str, nn.Module], calibration: Any, reference: Any,
                 quant: QuantOptions | None, progress: bool) -> dict[str, torch.Tensor] | None:
    """The checked covariance of every target, collected on the whole model (``_hook_model``)."""
    if not job.spec.needs_calibration:
        return None
    hook_model = _hook_model(job, model, calibration, reference, quant)
    given = isinstance(calibration, (Mapping, str))
    if not given and world()[1] > 1:  # each rank collects on its share of the batches; the sums are all-reduced
        covs = reduce_covariances(as_covariances(my_batches(calibration), hook_model, list(targets), progress=progress))
    else:
        covs = as_covariances(calibration, hook_model, list(targets), progress=progress)
    return checks.check_covariances(covs, targets)


def lora_config(model: nn.Module, targets: dict[str, nn.Module], job: Job, alpha: float, use_rslora: bool,
                 task_type: str | None, modules_to_save: list[str] | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=job.rank, lora_alpha=alpha, target_modules=peft_target_list(model, list(targets)),
                      use_rslora=use_rslora, lora_dropout=0.0, bias="none", init_lora_weights=True,
                      modules_to_save=list(modules_to_save) if modules_to_save else None,
                      fan_in_fan_out=any(kind_of(m).fan_in_fan_out for m in targets.values()), task_type=task_type)


def _plan(job: Job, targets: dict[str, nn.Module], covariances: dict[str, torch.Tensor] | None,
          references: dict[str, torch.Tensor] | None, quant: QuantOptions | None, progress: bool
          ) -> dict[str, LayerPlan]:
    """Every layer's factors and report, the model untouched; inside a process group each rank plans its share
    and the plans are all-gathered."""
    mine = my_share({n: kind_of(m).shape(m) for n, m in targets.items()}, job)
    source = ModelSource({n: targets[n] for n in mine}, covariances, references)
    layers, plan_one = iter(source), plan_layer
    if quant is not None and job.spec.rewrites_base:
        plan_one = partial(plan_quantized_layer, quant=quant)
    elif quant is not None:
        layers = compressed_inputs(layers, quant.scheme)
    plans = plan_layers(job, layers, source.covariance_users(), total=len(source), progress=progress,
                        plan_one=plan_one)
    return gather_plans(plans, list(targets))


def _plans(job: Job, model: nn.Module, targets: dict[str, nn.Module], calibration: Any, reference: Any,
           references: dict[str, torch.Tensor] | None, quant: QuantOptions | None, blockwise: Any,
           progress: bool) -> dict[str, LayerPlan]:
    """Every layer's plan; CorDA / EoRA covariances collected one decoder block at a time where
    ``blockwise.resolve`` and the model allow (svdadapt/blockwise/), else on the whole model: automatic
    (``blockwise=None``) with a one-line warning saying why, explicit (True or options) with the error."""
    def whole_model(batches: Any) -> dict[str, LayerPlan]:
        covariances = _covariances(job, model, targets, batches, reference, quant, progress)
        return _plan(job, targets, covariances, references, quant, progress)

    options = resolve_blockwise(blockwise, job.spec, calibration, quant is not None)
    if options is None:
        return whole_model(calibration)
    hook_model = _hook_model(job, model, calibration, reference, quant)
    batches = list(calibration)  # read once: the whole-model path, should it take over, gets the same batches
    try:
        return plan_blockwise(hook_model, targets, batches, partial(_plan, job, references=references, quant=quant,
                              progress=False), options, compensation=Compensation(model, job.scaling),
                              progress=progress)
    except BlockwiseUnsupported as e:
        if blockwise is not None:
            raise
        warnings.warn(f"svdadapt: {e.reason}: calibrating on the whole model", stacklevel=caller_level())
        return whole_model(batches)


@same_job  # under torch.distributed: the ranks' arguments compared first, one rank's error raised on all
@torch.no_grad()
def wrap(
    model: nn.Module,
    method: str,
    rank: int,
    *,
    alpha: float | None = None,
    target_modules: str | Iterable[str] = "all-linear",
    exclude_modules: str | Iterable[str] | None = None,
    use_rslora: bool = False,
    svd: str = "auto",
    niter: int | None = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE,
    seed: int = 0,
    progress: bool = True,
    mode: str | None = None,
    damping: float = 0.01,
    calibration: Any = None,
    reference: Any = None,
    calibrate_on: str = "reference",
    task_type: str | None = None,
    modules_to_save: Iterable[str] | None = None,
    quantize: str | None = None,
    quant_iters: int = 1,
    blockwise: bool | BlockwiseOptions | None = None,
):
    """Wrap ``model`` in a PEFT LoRA model whose adapters are initialized by ``method``. Every keyword is described
    in docs/wrap.md (and docs/calibration.md, docs/quantization.md); in short:

    Args:
        model: any ``nn.Module`` with ``nn.Linear`` / transformers ``Conv1D`` (/ bitsandbytes, for EoRA) layers;
            targeted weights are rewritten in place by the methods that rewrite the base.
        method, rank, alpha: a key of ``svdadapt.METHODS``; LoRA rank (1 ≤ r ≤ min(out, in) of every target);
            LoRA alpha (None: rank). ``use_rslora``: scaling alpha/√r.
        target_modules, exclude_modules, modules_to_save, task_type: as in PEFT's ``LoraConfig``
            (``"all-linear"`` leaves out the output head; ``task_type`` None picks CAUSAL_LM for ``*ForCausalLM``).
        svd, niter, oversample, seed: ``"auto"`` / ``"full"`` / ``"randomized"``, Krylov steps (None:
            round(log2(short side))), extra columns per block, and the seed of each layer's private generator.
        mode, damping: CorDA's ``"ipa"`` (top-r, default) or ``"kpa"`` (bottom-r), and its initial damping λ.
        calibration, reference, calibrate_on, blockwise: CorDA/EoRA's covariances (a ``Covariances``, a mapping,
            a saved file or an iterable of batches), EoRA's uncompressed model or state dict, which model EoRA's
            batches run on, and whether batches are collected one decoder block at a time (None: where supported).
        quantize, quant_iters: a bitsandbytes scheme ("nf4", "fp4", "int8") for the new base (QPiSSA: the
            residual; EoRA: W itself, compensated), and LoftQ-style alternation steps (the best step is kept).
        progress: progress bars.

    Returns:
        ``peft.PeftModel``; only the LoRA factors require grad. ``peft_model.svdadapt`` is an
        ``svdadapt.record.AdaptRecord``: method, options, the initial factors (on CPU) and a per-layer report.

    Every check runs before the model is touched, and a failure while the PEFT model is built restores it.
    """
    spec = get_method(method)
    _check_not_peft(model)
    checks.check_flag("progress", progress)
    job = build_job(spec, rank, alpha, use_rslora, svd, niter, oversample, seed, mode, damping, calibrate_on)
    quant = _quant_options(quantize, quant_iters)
    _check_needs(spec, calibration, reference, quant)
    if task_type is None and type(model).__name__.endswith("ForCausalLM"):
        task_type = "CAUSAL_LM"
    targets = select_targets(model, target_modules, exclude_modules, saved_modules(task_type, modules_to_save))
    _check_packing(spec, targets, quant)
    if quant is not None:
        quant.check_shapes({n: kind_of(m).shape(m) for n, m in targets.items()})
    checks.check_target_weights(model, targets, rank, spec.rewrites_base)
    references = checks.reference_weights(reference, targets) if reference is not None else None
    plans = _plans(job, model, targets, calibration, reference, references, quant, blockwise, progress)
    base_checksums = {n: layer_checksum(m) for n, m in targets.items()}  # W before any rewrite
    alpha = rank if alpha is None else alpha
    peft_model = apply(model, lora_config(model, targets, job, alpha, use_rslora, task_type, modules_to_save),
                       {n: (p.A, p.B) for n, p in plans.items()}, rewrite_base=spec.rewrites_base,
                       quantize=None if quant is None else quant.scheme, progress=progress)
    options = dict(svd=svd, niter=niter, oversample=oversample, seed=seed, mode=job.mode, damping=damping,
                   use_rslora=use_rslora, quant_iters=quant_iters)
    record = AdaptRecord(method=spec.name, rank=rank, alpha=alpha, options=options, targets=list(targets),
                         init_factors={n: (p.A, p.B) for n, p in plans.items()},
                         report={n: p.report for n, p in plans.items()}, base_checksums=base_checksums,
                         quantize=None if quant is None else quant.scheme)
    attach(peft_model, record)  # save_pretrained guard, see export.py
    return peft_model
