"""One request, one job: the keywords ``wrap`` and ``init_checkpoint`` share, checked into the ``Job`` both run.

Every rule that turns a user's keywords into what the engine runs lives here, for both entry points: the shared
keywords and their defaults (``Request``, and each method's own keywords from its options type,
``methods.method_keywords``), the option checks (``build_job``), what a method needs (``check_needs``), which
modules are targets (``select_targets``, ``task_type_for``), what svdadapt.json records (``recorded_options``) and
the LoRA config handed to PEFT (``lora_config``). ``keywords`` publishes the shared keywords in each entry point's
signature, so that they are declared once.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch
from torch import nn

from . import checks, plan
from ..modules.layers import kind_of
from ..core.linalg import DEFAULT_NITER, DEFAULT_OVERSAMPLE
from ..core.methods import (MethodSpec, SVDOptions, check_method_keywords, lora_scaling, method_keywords,
                      recorded_keywords)
from ..core.patterns import ambiguous_keys, check_pattern, unmatched_keys
from ..modules.params import check_target_parameters
from ..modules.qbase import QuantOptions
from ..modules.targets import matches, peft_target_list, resolve_targets, saved_modules

__all__ = ["Request", "Job", "keywords", "build_job", "quant_options", "check_needs", "unmet_needs",
           "task_type_for", "select_targets", "check_patterns_match", "check_packing", "recorded_options", "lora_config", "calibrates_on"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Request:
    """The keywords both entry points take, with their defaults (docs/wrap.md describes each); the methods' own
    keywords (``mode``, ``damping``, ``calibrate_on``) come from their options types, in ``flat``."""

    alpha: float | None = None
    target_modules: str | Iterable[str] = "all-linear"
    exclude_modules: str | Iterable[str] | None = None
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] | None = None  # PEFT's: module-name pattern -> rank (core/patterns.py)
    alpha_pattern: Mapping[str, float] | None = None  # PEFT's: module-name pattern -> alpha
    svd: str = "auto"
    niter: int | None = DEFAULT_NITER
    oversample: int = DEFAULT_OVERSAMPLE
    seed: int = 0
    progress: bool = True
    calibration: Any = None
    reference: Any = None
    blockwise: Any = None
    options: Any = None  # a method's options object (e.g. CordaOptions(mode="kpa")), in place of its flat keywords
    target_parameters: Iterable[str] | None = None  # PEFT's: parameters (MoE experts) as targets (docs/experts.md)
    flat: Mapping[str, Any] = field(default_factory=lambda: _method_defaults())  # the flat method keywords as given


_SHARED = tuple(f.name for f in fields(Request) if f.name != "flat")


def _method_defaults() -> dict[str, Any]:
    return {k: default for k, (default, _) in method_keywords().items()}


def keywords(fn: F) -> F:
    """Decorator of an entry point ``fn(..., *, request: Request, ...)``: its signature shows every shared keyword
    (``Request``'s fields and the methods' keywords, with their defaults) in place of ``request``, and a call's
    shared keywords reach ``fn`` as one ``Request``. Any other keyword is ``fn``'s own (an unknown one is Python's
    ``TypeError``, naming ``fn``)."""
    own = inspect.signature(fn)
    kw_only = inspect.Parameter.KEYWORD_ONLY
    shared = [inspect.Parameter(f.name, kw_only, default=f.default, annotation=f.type)
              for f in fields(Request) if f.name in _SHARED]
    shared += [inspect.Parameter(k, kw_only, default=d, annotation=t) for k, (d, t) in method_keywords().items()]
    params = [p for p in own.parameters.values() if p.name != "request"]
    at = next((i for i, p in enumerate(params) if p.kind is kw_only and p.default is not p.empty), len(params))
    signature = own.replace(parameters=[*params[:at], *shared, *params[at:]])

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in _SHARED}
        flat = {k: kwargs.pop(k, default) for k, default in _method_defaults().items()}
        if "request" in kwargs:
            raise TypeError(f"{fn.__name__}() got an unexpected keyword argument 'request'")
        return fn(*args, request=Request(**given, flat=flat), **kwargs)

    call.__signature__ = signature  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


@dataclass(frozen=True)
class Job(plan.Job):
    """``plan.Job`` (what every layer shares, with LoRA alpha as PEFT stores it, rsLoRA and the per-layer patterns)
    plus what the entry points decide once: the quantized base, the method keywords as recorded (``mode`` resolved), and PEFT's task type and
    whole-trained modules as the user gave them."""

    quant: QuantOptions | None = None
    keywords: Mapping[str, Any] = field(default_factory=dict)
    task_type: str | None = None
    modules_to_save: tuple[str, ...] | None = None
    target_parameters: tuple[str, ...] = ()  # PEFT's target_parameters as given (checked)


def _method_options(spec: MethodSpec, request: Request) -> dict[str, Any]:
    """The flat method keywords, or those of ``options=`` (an object of the method's own options type)."""
    given = dict(request.flat)
    if request.options is None:
        return given
    if spec.options_type is None or not isinstance(request.options, spec.options_type):
        want = "takes no options object" if spec.options_type is None else f"takes a {spec.options_type.__name__}"
        raise TypeError(f"options= for method {spec.name!r}: it {want}, got {type(request.options).__name__}")
    defaults = _method_defaults()
    for f in fields(request.options):
        if given[f.name] != defaults[f.name]:
            raise ValueError(f"{f.name}={given[f.name]!r} and options= both set {f.name}: pass one of them")
        given[f.name] = getattr(request.options, f.name)
    return given


def build_job(spec: MethodSpec, rank: int, request: Request, *, quantize: str | None = None, quant_iters: Any = 1,
              task_type: str | None = None, modules_to_save: Iterable[str] | None = None) -> Job:
    """Every option checked by type and value (the quantized base's last), into the job all layers share."""
    checks.check_rank(rank)
    checks.check_alpha(request.alpha)
    checks.check_flag("use_rslora", request.use_rslora)
    rank_pattern = check_pattern("rank", request.rank_pattern)
    alpha_pattern = check_pattern("alpha", request.alpha_pattern)
    checks.check_seed(request.seed)
    given = _method_options(spec, request)
    check_method_keywords(**{k: v for k, v in given.items() if k != "mode"})
    svd_options = SVDOptions(request.svd, request.niter, request.oversample)
    mode = spec.resolve_mode(given["mode"])
    if request.svd == "randomized" and not spec.largest(mode):
        raise ValueError(f"svd='randomized' cannot find the smallest singular triplets needed by {spec.name!r}"
                         f"{f' mode={mode}' if mode else ''}; use svd='full' or 'auto'")
    alpha = rank if request.alpha is None else request.alpha
    given["mode"] = mode
    return Job(spec, rank, lora_scaling(rank, alpha, request.use_rslora), mode, svd_options,
               spec.options(**given), request.seed, alpha=alpha, use_rslora=request.use_rslora,
               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
               quant=quant_options(quantize, quant_iters), keywords=given, task_type=task_type,
               modules_to_save=None if modules_to_save is None else tuple(modules_to_save),
               target_parameters=check_target_parameters(request.target_parameters))


def quant_options(quantize: str | None, quant_iters: Any) -> QuantOptions | None:
    """``quantize=`` and ``quant_iters=`` checked; None without a quantized base."""
    if quantize is None:
        if isinstance(quant_iters, bool) or not isinstance(quant_iters, int) or quant_iters < 1:
            raise ValueError(f"quant_iters must be an integer >= 1, got {quant_iters!r}")
        if quant_iters != 1:
            raise ValueError(f"quant_iters={quant_iters!r} needs quantize= (a quantization scheme)")
        return None
    return QuantOptions(quantize, quant_iters)


# ------------------------------------------------------------------------------------------------ what it needs


def unmet_needs(spec: MethodSpec, calibration: bool, reference: bool, quantized: bool) -> list[str]:
    """What the inputs lack or hold too much of, by the method's needs, in the order they are told:
    "calibration" (missing), "no calibration" (given, not taken), "reference" (missing; a quantized base is its
    own reference), "no reference" (given, not taken), "quantized reference" (given where the quantized base is
    the reference). Each caller words them for its own surface (``check_needs``; the CLI's flags)."""
    rules = [("calibration", spec.needs_calibration and not calibration),
             ("no calibration", not spec.needs_calibration and calibration),
             ("reference", spec.needs_reference and not reference and not quantized),
             ("no reference", not spec.needs_reference and reference),
             ("quantized reference", spec.needs_reference and reference and quantized)]
    return [name for name, broken in rules if broken]


def check_needs(spec: MethodSpec, calibration: Any, reference: Any, quant: QuantOptions | None = None, *,
                streaming: bool = False) -> None:
    """The method's calibration and reference, as ``wrap`` (in memory: a calibration or reference it does not
    use is ignored) or ``init_checkpoint`` (``streaming``: batches and a reference directory) takes them."""
    unmet = unmet_needs(spec, calibration is not None, reference is not None, quant is not None)
    if streaming:
        _check_streamed_needs(spec, calibration, reference, unmet)
        return
    if "calibration" in unmet:
        raise ValueError(f"method {spec.name!r} needs calibration=: a svdadapt.Covariances or an iterable of batches")
    if "reference" in unmet:
        raise ValueError(f"method {spec.name!r} needs reference=: the uncompressed model or its state dict")
    if "quantized reference" in unmet:
        raise ValueError(f"method {spec.name!r} with quantize={quant.scheme!r} compresses the model itself, which is "
                         "then the reference: drop reference=")


def _check_streamed_needs(spec: MethodSpec, calibration: Any, reference: Any, unmet: list[str]) -> None:
    if "calibration" in unmet:
        raise ValueError(f"method {spec.name!r} needs calibration=: an iterable of batches (e.g. "
                         "svdadapt.text_batches)")
    if spec.needs_calibration and isinstance(calibration, (Mapping, str, os.PathLike, torch.Tensor)):
        raise TypeError(f"init_checkpoint calibrates block by block from batches (an iterable of dicts or token "
                        f"tensors), got {type(calibration).__name__}; precomputed covariances need the loaded model: "
                        "svdadapt.wrap")
    if "no calibration" in unmet:
        raise ValueError(f"method {spec.name!r} takes no calibration data; drop calibration=")
    if spec.needs_reference and not isinstance(reference, (str, os.PathLike)):
        raise ValueError(f"method {spec.name!r} from a checkpoint needs reference=: the directory of the uncompressed "
                         f"checkpoint (checkpoint_dir is the compressed one), got {type(reference).__name__}")
    if "no reference" in unmet:
        raise ValueError(f"reference= applies to EoRA only, not to method {spec.name!r}")


def calibrates_on(job: Job) -> str | None:
    """Which model the method's calibration batches run on ("reference", "compressed"), None if it has no say."""
    return getattr(job.options, "calibrate_on", None)


# ------------------------------------------------------------------------------------------------------ targets


def task_type_for(model: nn.Module, task_type: str | None) -> str | None:
    """PEFT's task type: the one given, else CAUSAL_LM for a ``*ForCausalLM`` model (None otherwise)."""
    if task_type is None and type(model).__name__.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return task_type


def select_targets(model: nn.Module, target_modules: Any, exclude_modules: Any, job: Job) -> dict[str, nn.Module]:
    """``resolve_targets`` less the modules PEFT trains whole for the job's task type (it never puts LoRA on them)."""
    keep_whole = saved_modules(task_type_for(model, job.task_type), job.modules_to_save)
    if job.target_parameters and not isinstance(target_modules, str) and not list(target_modules):
        return {}  # target_modules=[]: the parameters only, as in PEFT
    targets = resolve_targets(model, target_modules, exclude_modules)
    kept = {n: m for n, m in targets.items() if not (keep_whole and matches(keep_whole, n))}
    if not kept:
        raise ValueError(f"target_modules={target_modules!r} matched only modules PEFT saves whole ({keep_whole}); "
                         "nothing is left to adapt")
    if not job.target_parameters:  # with parameters: checked over the layers and the parameters together
        check_patterns_match(job, kept)  # (engine/experts.check_param_ranks)
    return kept


def check_patterns_match(job: Job, targets: Iterable[str]) -> None:
    """Every ``rank_pattern`` / ``alpha_pattern`` key matches a target (PEFT warns and ignores such a key; here a
    misspelt key would silently decompose layers at the wrong rank, so it is an error before any SVD), and no
    target's value depends on the keys' order (the first matching key applies, and PEFT saves the keys sorted: a
    reloaded adapter would give such a target the other key's value)."""
    targets = list(targets)
    for which, pattern in (("rank", job.rank_pattern), ("alpha", job.alpha_pattern)):
        stray = unmatched_keys(pattern, targets)
        if stray:
            params = ("; a target parameter by its key '<module>.<param>', e.g. "
                      "'model.layers.0.mlp.experts.down_proj', as PEFT matches it") if job.target_parameters else ""
            raise ValueError(f"{which}_pattern keys {stray} match no targeted module (a key matches a module whose "
                             f"full name ends in it, at a '.' boundary, as a regular expression{params})")
        clash = ambiguous_keys(pattern, targets)
        if clash is not None:
            name, a, b = clash
            raise ValueError(f"{which}_pattern keys {a!r} ({pattern[a]!r}) and {b!r} ({pattern[b]!r}) both match "
                             f"module {name!r}: the first applies, but PEFT saves the keys sorted and on reload "
                             f"{b!r} would; give the keys in sorted order, or make them match disjoint modules")


def check_packing(job: Job, targets: Mapping[str, nn.Module]) -> None:
    """A packed (already quantized) target can be read but not re-decomposed into a new base; with ``quantize=``
    every target must be a shape the quantized kernel runs; a method that calibrates, no target whose kind has no
    input covariance (``nn.Embedding``)."""
    packed = [n for n, m in targets.items() if kind_of(m).packed]
    if packed:
        layer = type(targets[packed[0]]).__name__
        if job.quant is not None:
            raise ValueError(f"quantize={job.quant.scheme!r} on a model that is already quantized (module "
                             f"{packed[0]!r} is a {layer}); load the full-precision model instead")
        if job.spec.rewrites_base:
            raise ValueError(f"{job.spec.name} rewrites the base weights, but module {packed[0]!r} is a quantized "
                             f"{layer}: run {job.spec.name} on the full-precision model with quantize=... (e.g. "
                             "'nf4') instead")
    if job.quant is not None:
        other = next((n for n, m in targets.items() if not kind_of(m).linear), None)
        if other is not None:
            raise ValueError(f"quantize={job.quant.scheme!r} replaces each target by a quantized linear layer, but "
                             f"module {other!r} is not a linear layer ({kind_of(targets[other]).name}): leave it out "
                             "of target_modules")
        job.quant.check_shapes({n: kind_of(m).shape(m) for n, m in targets.items()})
    blind = [n for n, m in targets.items() if not kind_of(m).calibrates] if job.spec.needs_calibration else []
    if blind:
        raise ValueError(f"method {job.spec.name!r} needs each target's input covariance, but module {blind[0]!r} is "
                         f"an {type(targets[blind[0]]).__name__}, whose input is a token index, not a vector: leave "
                         "it out of target_modules, or adapt it with pissa / milora")


# ----------------------------------------------------------------------------------------------------- outputs


def recorded_options(job: Job) -> dict[str, Any]:
    """svdadapt.json's ``options`` (and ``peft_model.svdadapt.options``): the SVD's, the seed, the methods' recorded
    keywords (``mode`` resolved), rsLoRA and the alternation steps, in this order."""
    return dict(svd=job.svd.svd, niter=job.svd.niter, oversample=job.svd.oversample, seed=job.seed,
                **{k: job.keywords[k] for k in recorded_keywords()}, use_rslora=job.use_rslora,
                quant_iters=1 if job.quant is None else job.quant.iters)


def lora_config(model: nn.Module, targets: Mapping[str, nn.Module], job: Job) -> Any:
    """The rank-r ``peft.LoraConfig`` of the job's targets in ``model``, with the job's per-layer patterns."""
    from peft import LoraConfig  # imported on first use: importing peft imports bitsandbytes, which logs to stderr

    return LoraConfig(r=job.rank, lora_alpha=job.alpha, target_modules=peft_target_list(model, list(targets)),
                      rank_pattern=dict(job.rank_pattern), alpha_pattern=dict(job.alpha_pattern),
                      use_rslora=job.use_rslora, lora_dropout=0.0, bias="none", init_lora_weights=True,
                      modules_to_save=list(job.modules_to_save) if job.modules_to_save else None,
                      fan_in_fan_out=any(kind_of(m).fan_in_fan_out for m in targets.values()),
                      task_type=task_type_for(model, job.task_type),
                      target_parameters=list(job.target_parameters) or None)
