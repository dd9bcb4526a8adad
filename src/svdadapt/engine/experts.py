"""Per-expert plans for ``target_parameters`` (PEFT's ``lora.ParamWrapper``): every method on each expert's own
matrix, the factors packed into PEFT's layout, the residual written into each expert's slice of the base.

An expert is one plan input, named ``"<module path>.<param name>[e]"`` (``params.ParamTarget.name``): its weight
(out, in), its covariance and its reference are looked up under that name. PEFT's layout of a parameter with E
experts at rank r (read off ``ParamWrapper.get_delta_weight``: ``lora_A.reshape(E, r, in)``,
``lora_B.reshape(out, r, E)``)::

    lora_A (E·r, in):  rows e·r .. e·r + r − 1 are expert e's A_e (r, in)
    lora_B (out, r·E): column j·E + e is column j of expert e's B_e (out, r)

so PEFT's delta of expert e is s·B_e·A_e, in the (out, in) orientation the parameter is read in (an
``is_transposed`` module stores its transpose).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from . import plan
from .job import check_patterns_match
from .distributed import gather_plans, my_batches, my_share, reduce_covariances, world
from ..calibration.collect import collect
from ..calibration.covariances import Covariances
from ..calibration.experts import expert_parameters, fallback_covariances
from ..calibration.forward import caller_level
from ..core.methods import finish
from ..core.patterns import layer_entry, layer_value
from ..core.record import ADAPTER, weight_checksum
from ..modules.layers import compute_dtype
from ..modules.params import (ParamTarget, coverage_warning, expert_names, find_parameters, read_expert,
                              write_expert)

__all__ = ["ExpertPlan", "pack", "unpack", "param_job", "expert_covariances", "expert_references", "plan_experts",
           "ParamApply", "check_routable", "wrappers", "portable_factors", "refuse_unsupported", "param_checksums", "check_param_ranks", "select",
           "plan_parameters", "record_parameters", "is_wrapper", "recorded_targets", "split_factors", "param_of",
           "wrapper_checksum", "restore_original"]


@dataclass
class ExpertPlan:
    """One targeted parameter's result: its target, the packed A (E·r, in) and B (out, r·E) in the adapter dtype,
    and each expert's report (by expert name)."""

    target: ParamTarget
    A: torch.Tensor
    B: torch.Tensor
    report: dict[str, dict[str, Any]]


def pack(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert A_e (r, in) and B_e (out, r) into PEFT's lora_A (E·r, in) and lora_B (out, r·E)."""
    A = torch.cat(As, dim=0)
    B = torch.stack(Bs, dim=2)  # (out, r, E): column j·E + e once flattened
    return A.contiguous(), B.reshape(B.shape[0], -1).contiguous()


def unpack(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's lora_A (E·r, in), lora_B (out, r·E) back into (E, r, in) and (E, out, r)."""
    return A.reshape(experts, -1, A.shape[-1]), B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)


def portable_factors(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor,
                     experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-2r packed adapter of B·A − B₀·A₀ per expert, for the ORIGINAL base (lifecycle/export.py's
    [A; A₀], [B, −B₀], expert by expert)."""
    a, b = unpack(A, B, experts)
    a0, b0 = unpack(A0.to(A.dtype), B0.to(B.dtype), experts)
    return pack(list(torch.cat([a, a0], dim=1)), list(torch.cat([b, -b0], dim=2)))


def param_job(job: plan.Job, key: str) -> plan.Job:
    """The job of one targeted parameter: its own rank and scaling (PEFT matches ``rank_pattern`` /
    ``alpha_pattern`` against the parameter's key), shared by all its experts."""
    rank, alpha = job.rank_of(key), layer_value(job.alpha_pattern, key, job.alpha)
    return replace(job, rank=rank, alpha=alpha, scaling=job.scaling_of(key), rank_pattern={}, alpha_pattern={})


def refuse_unsupported(target_parameters: Any, *, quantize: Any = None, rewrites_base: bool = True,
                       target_modules: Any = None, allocate: Any = False) -> None:
    """What ``target_parameters`` does not combine with, each a ``ValueError`` (docs/experts.md). ``quantize=``
    applies to the layers of ``target_modules`` only (bitsandbytes, HQQ and torchao have no 3-D expert layer PEFT's
    ParamWrapper wraps, so the experts keep their float residual): fine for a method that rewrites the base
    (QPiSSA), refused for EoRA, whose experts would have no quantization error to compensate."""
    if not target_parameters:
        return
    if quantize is not None and not rewrites_base:
        raise ValueError(f"target_parameters={list(target_parameters)!r} with quantize={quantize!r} and a method "
                         "that compensates compression (EoRA): quantize= quantizes the layers of target_modules "
                         "only (bitsandbytes, HQQ and torchao have no 3-D expert layer PEFT can wrap), so the "
                         "experts would have no quantization error to compensate; compress them with "
                         "svdadapt.compress.quantize(..., target_parameters=...) and pass reference=, or drop "
                         "target_parameters (docs/experts.md)")
    if quantize is not None and not isinstance(target_modules, (str, type(None))) and not list(target_modules):
        raise ValueError(f"quantize={quantize!r} quantizes the layers of target_modules, and target_modules=[] "
                         "selects none: the parameters of target_parameters stay float; drop quantize= or target "
                         "some layers (docs/experts.md)")
    if allocate not in (False, None):
        raise ValueError(f"target_parameters={list(target_parameters)!r} with allocate= is not supported: PEFT "
                         "builds one ParamWrapper per parameter, whose rank all its experts share, while the "
                         "allocation chooses a rank per layer; drop allocate= and give the parameters' ranks with "
                         "rank_pattern= (docs/experts.md)")


# ---------------------------------------------------------------------------------------------------- inputs


def _check_cov(name: str, C: torch.Tensor, d: int) -> torch.Tensor:
    if tuple(C.shape) != (d, d):
        raise ValueError(f"covariance for {name!r} has shape {tuple(C.shape)}, expected ({d}, {d})")
    if not torch.isfinite(C).all():
        raise ValueError(f"covariance for {name!r} contains NaN or inf")
    if not C.diagonal().sum() > 0:
        raise ValueError(f"covariance for {name!r} is zero: calibration saw no signal for this expert")
    return C


def expert_covariances(calibration: Any, targets: Mapping[str, ParamTarget]) -> dict[str, torch.Tensor]:
    """Expert name -> C (in, in), from a mapping (a ``Covariances``, a dict, a saved file) holding ``"<key>[e]"``
    (in, in) or ``"<key>"`` stacked (E, in, in) (a 2-D target: ``"<key>"`` (in, in)); checked as for layers."""
    if isinstance(calibration, str) or hasattr(calibration, "__fspath__"):
        calibration = Covariances.load(calibration)
    if not isinstance(calibration, Mapping):
        raise ValueError("target_parameters with CorDA / EoRA needs each expert's covariance: pass calibration= "
                         "batches, or a mapping (or svdadapt.Covariances) with keys '<module>.<param>[e]' (in, in) "
                         "or '<module>.<param>' (experts, in, in)")
    out = {}
    for t in targets.values():
        stacked = calibration.get(t.key) if t.stacked else None
        for e, name in enumerate(expert_names(t)):
            if name in calibration:
                C = calibration[name]
            elif stacked is not None and stacked.dim() == 3 and stacked.shape[0] == t.experts:
                C = stacked[e]
            else:
                raise ValueError(f"calibration has no covariance for expert {name!r} of target parameter "
                                 f"{t.key!r} (give {name!r} (in, in), or {t.key!r} stacked ({t.experts}, in, in))")
            out[name] = _check_cov(name, C, t.shape[1])
    return out


def expert_references(reference: Any, targets: Mapping[str, ParamTarget]) -> dict[str, torch.Tensor]:
    """Expert name -> reference weight (out, in), sliced from the reference model's parameter of the same key (an
    ``nn.Module``) or its state dict entry."""
    out = {}
    for t in targets.values():
        if isinstance(reference, nn.Module):
            try:
                p = getattr(reference.get_submodule(t.module), t.param)
            except AttributeError:
                p = None
        elif isinstance(reference, Mapping):
            p = reference.get(t.key)
        else:
            raise TypeError(f"reference must be an nn.Module or a state dict, got {type(reference).__name__}")
        if p is None:
            raise ValueError(f"reference has no parameter {t.key!r} (targeted by target_parameters)")
        want = (t.experts, *t.shape[::-1]) if t.transposed else ((t.experts, *t.shape) if t.stacked else t.shape)
        if tuple(p.shape) != tuple(want):
            raise ValueError(f"reference parameter {t.key!r} has shape {tuple(p.shape)}, the model's has {tuple(want)}")
        if not torch.isfinite(p).all():
            raise ValueError(f"reference parameter {t.key!r} contains NaN or inf")
        out.update({name: read_expert(p, t, e) for e, name in enumerate(expert_names(t))})
    return out


def _inputs(model: nn.Module, t: ParamTarget, covariances: Mapping[str, torch.Tensor] | None,
            references: Mapping[str, torch.Tensor] | None) -> Iterator[plan.LayerInput]:
    """Expert by expert: W_e (out, in) in its compute dtype (a view for fp32 storage), C_e, W_ref_e."""
    for e, name in enumerate(expert_names(t)):
        W = read_expert(model, t, e)
        yield plan.LayerInput(name, W.to(compute_dtype(W.dtype)), None if covariances is None else covariances[name],
                              None if references is None else references[name])


def plan_experts(job: plan.Job, model: nn.Module, targets: Mapping[str, ParamTarget],
                 covariances: Mapping[str, torch.Tensor] | None = None,
                 references: Mapping[str, torch.Tensor] | None = None) -> dict[str, ExpertPlan]:
    """Every targeted parameter's experts decomposed one by one (``plan.plan_layers``, each expert seeded from
    (seed, expert name)) and packed; the model untouched. Inside a process group each rank decomposes its share of
    all the experts (split by cost, as the layers are) and the plans are all-gathered: the same factors as one
    process."""
    names = {name: key for key, t in targets.items() for name in expert_names(t)}
    mine = set(my_share({name: targets[key].shape for name, key in names.items()}, job))
    local: dict[str, plan.LayerPlan] = {}
    for key, t in targets.items():
        inputs = (x for x in _inputs(model, t, covariances, references) if x.name in mine)
        local.update(plan.plan_layers(param_job(job, key), inputs, Counter(), progress=False))
    plans = gather_plans(local, list(names))
    out = {}
    for key, t in targets.items():
        ps = [plans[name] for name in expert_names(t)]
        out[key] = ExpertPlan(t, *pack([p.A for p in ps], [p.B for p in ps]), {n: plans[n].report
                                                                              for n in expert_names(t)})
    return out


def param_checksums(model: nn.Module, targets: Mapping[str, ParamTarget], algorithm: str = "crc32"
                    ) -> dict[str, str]:
    """key -> checksum of the whole stored parameter, before any rewrite."""
    return {k: weight_checksum(getattr(model.get_submodule(t.module), t.param), algorithm) for k, t in targets.items()}


# ----------------------------------------------------------------------------------------------------- apply


def _is_wrapper(m: nn.Module) -> bool:
    return type(m).__name__ == "ParamWrapper" and hasattr(m, "parameter_name")


def wrappers(peft_model: nn.Module, targets: Mapping[str, ParamTarget]) -> dict[str, tuple[str, nn.Module]]:
    """key -> (the ParamWrapper's module name in the PEFT model (``<module>`` or ``<module>.base_layer``... when
    PEFT nests the wrappers of one module), the wrapper). ``TypeError`` if PEFT did not wrap a target, or wrapped a
    parameter that is not one."""
    root = peft_model.base_model.model
    found = {}
    for key, t in targets.items():
        name, m = t.module, root.get_submodule(t.module)
        while _is_wrapper(m) and m.parameter_name != t.param:
            name, m = f"{name}.base_layer", m.base_layer
        if not _is_wrapper(m) or ADAPTER not in m.lora_A:
            raise TypeError(f"PEFT did not put a ParamWrapper on parameter {key!r}")
        found[key] = (name, m)
    ours = {id(m) for _, m in found.values()}
    stray = [n for n, m in root.named_modules() if _is_wrapper(m) and id(m) not in ours]
    if stray:
        raise TypeError(f"PEFT wrapped a parameter at {stray[0]!r} that svdadapt's target_parameters matching did "
                        "not select")
    return found


class ParamApply:
    """``engine.apply``'s part for targeted parameters: ``check`` (before any write: every wrapper found, shapes
    and dtypes) and ``write`` (each expert's residual W_e − s·B_e·A_e into its slice if ``rewrite_base``, then the
    packed factors). ``factors``: key -> (A (E·r, in), B (out, r·E))."""

    def __init__(self, targets: Mapping[str, ParamTarget], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 rewrite_base: bool) -> None:
        self.targets, self.factors, self.rewrite_base = dict(targets), dict(factors), rewrite_base
        self.found: dict[str, tuple[str, nn.Module]] = {}
        self.stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> the factors as written (CPU)

    def check(self, peft_model: nn.Module) -> None:
        self.found = wrappers(peft_model, self.targets)
        for key, (_, w) in self.found.items():
            A, B = self.factors[key]
            lora_A, lora_B = w.lora_A[ADAPTER].weight, w.lora_B[ADAPTER].weight
            if A.shape != lora_A.shape or B.shape != lora_B.shape:
                raise ValueError(f"factors of {key!r} have shapes {tuple(A.shape)}, {tuple(B.shape)}; its "
                                 f"ParamWrapper has {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")

    def names(self) -> dict[str, str]:
        """key -> the wrapper's module name (what the saved adapter's keys name)."""
        return {k: n for k, (n, _) in self.found.items()}

    @torch.no_grad()
    def write(self, peft_model: nn.Module) -> None:
        for key, (_, w) in self.found.items():
            t, (A, B) = self.targets[key], self.factors[key]
            lora_A, lora_B = w.lora_A[ADAPTER].weight, w.lora_B[ADAPTER].weight
            A, B = A.to(lora_A.dtype), B.to(lora_B.dtype)  # PEFT's ParamWrapper factors take the parameter's dtype
            if self.rewrite_base:
                write_residuals(w.get_param(), t, A, B, float(w.scaling[ADAPTER]))
            lora_A.copy_(A)
            lora_B.copy_(B)
            self.stored[key] = (A.detach().cpu().clone(), B.detach().cpu().clone())


@torch.no_grad()
def write_residuals(param: torch.Tensor, t: ParamTarget, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
    """Each expert's slice of ``param`` (the stored 3-D or 2-D parameter) replaced in place by its residual
    W_e − s·B_e·A_e, computed from the packed factors A (E·r, in), B (out, r·E) as PEFT stores them."""
    As, Bs = unpack(A, B, t.experts)
    for e in range(t.experts):
        W = read_expert(param, t, e)
        new = finish(W.to(compute_dtype(W.dtype)), As[e].to(W.device), Bs[e].to(W.device), scaling, W.dtype)
        write_expert(param, t, e, new)


# ------------------------------------------------------------------------------------------- wrap's entry points


def warn_coverage(model: nn.Module, targets: Iterable[str], params: Iterable[str]) -> None:
    """The warning of ``params.coverage_warning`` (most of the decoder blocks' weights are MoE experts left out),
    for ``wrap`` on the model and ``init_checkpoint`` on its meta-device skeleton."""
    message = coverage_warning(model, targets, params)
    if message is not None:
        warnings.warn(message, stacklevel=caller_level())


def check_param_ranks(job: Any, module_targets: Iterable[str], targets: Mapping[str, ParamTarget]) -> None:
    """The patterns and ranks of the job over its layers and parameters together: every ``rank_pattern`` /
    ``alpha_pattern`` key matches a target (a parameter by its key ``<module>.<param>``, as PEFT matches it), no
    target's value depends on the keys' order (``job.check_patterns_match``), and each parameter's rank (its
    pattern entry, else ``rank``; shared by its experts) within min(out, in) of an expert."""
    check_patterns_match(job, [*module_targets, *targets])
    for key, t in targets.items():
        pattern_key, rank = layer_entry(job.rank_pattern, key, job.rank)
        if rank > min(t.shape):
            said = f"rank {rank}" if pattern_key is None else f"rank_pattern[{pattern_key!r}] = {rank}"
            raise ValueError(f"{said} exceeds min(out, in) = {min(t.shape)} of target parameter {key!r} "
                             f"(each expert {t.shape[0]}x{t.shape[1]})")


def select(model: nn.Module, job: Any, module_targets: Mapping[str, nn.Module]) -> dict[str, ParamTarget]:
    """The job's ``target_parameters`` in ``model`` (``params.find_parameters``), each checked before anything is
    computed: finite, and the rank within min(out, in) of an expert."""
    if not job.target_parameters:
        return {}
    targets = find_parameters(model, job.target_parameters, module_targets)
    check_param_ranks(job, module_targets, targets)
    for key, t in targets.items():
        p = getattr(model.get_submodule(t.module), t.param)
        if not torch.isfinite(p).all():
            raise ValueError(f"target parameter {key!r} contains NaN or inf")
    return targets


def check_routable(targets: Mapping[str, ParamTarget]) -> None:
    """Every target an MoE expert parameter, whose covariances come from routed tokens; a 2-D one is a
    ``ValueError``: it has no router, its covariance must be given."""
    flat = [t.key for t in targets.values() if not t.stacked]
    if flat:
        raise ValueError(f"target parameter {flat[0]!r} is 2-D (not an MoE expert): its input covariance cannot be "
                         "collected from routed tokens; pass calibration= a Covariances holding it")


def routed_covariances(hook_model: nn.Module, batches: list, targets: Mapping[str, ParamTarget],
                       progress: bool = False) -> Covariances:
    """Every targeted expert's covariance from calibration ``batches`` run on ``hook_model``: the tokens the
    router sends to it (``calibration/experts.py``, weighted by the squared routing weight), all-reduced under
    ``torch.distributed`` (each rank runs its share of the batches), then the fallback for experts with fewer
    tokens than their input width (the parameter's pooled covariance, with a warning naming them).

    A 2-D parameter target (no router) has no routed tokens: its covariance must be given (a ``Covariances``)."""
    check_routable(targets)
    params = expert_parameters(hook_model, [t.key for t in targets.values()])
    mine = my_batches(batches) if world()[1] > 1 else batches
    covs = reduce_covariances(collect(hook_model, mine, {}, torch.float32, progress, params, "routing"))
    return fallback_covariances(covs, [k for p in params.values() for k in p.keys()])


def plan_parameters(job: Any, model: nn.Module, targets: Mapping[str, ParamTarget], calibration: Any,
                    reference: Any) -> dict[str, ExpertPlan]:
    """Every targeted parameter planned expert by expert, with the method's per-expert covariances
    (``expert_covariances``) and reference slices (``expert_references``) where it needs them."""
    if not targets:
        return {}
    covariances = expert_covariances(calibration, targets) if job.spec.needs_calibration else None
    references = expert_references(reference, targets) if job.spec.needs_reference else None
    return plan_experts(job, model, targets, covariances, references)


def record_parameters(record: Any, applied: ParamApply, plans: Mapping[str, ExpertPlan],
                      checksums: Mapping[str, str]) -> None:
    """Add the targeted parameters to ``peft_model.svdadapt``: each wrapper's module name among ``targets``, its
    factors as written (``init_factors``), its experts' reports, the checksum of the parameter before any rewrite,
    and ``parameters`` (wrapper name -> key, experts, stacked, transposed, expert shape (out, in))."""
    names = applied.names()
    record.parameters = {}
    for key, t in applied.targets.items():
        n = names[key]
        record.targets.append(n)
        record.init_factors[n] = applied.stored[key]
        record.report.update(plans[key].report)
        if record.base_checksums is not None:
            record.base_checksums[n] = checksums[key]
        record.parameters[n] = {"key": key, "experts": t.experts, "stacked": t.stacked, "transposed": t.transposed,
                                "shape": list(t.shape)}


# ------------------------------------------------------------------------------------ the lifecycle's part


def is_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT ``ParamWrapper`` (a targeted parameter's LoRA layer)."""
    return _is_wrapper(module)


def recorded_targets(parameters: Mapping[str, Mapping[str, Any]] | None) -> dict[str, ParamTarget]:
    """svdadapt.json's ``parameters`` (wrapper module name -> key, experts, stacked, transposed, shape) back into
    ``ParamTarget``s, by wrapper module name."""
    out = {}
    for name, info in (parameters or {}).items():
        module, _, param = info["key"].rpartition(".")
        out[name] = ParamTarget(info["key"], module, param, int(info["experts"]), bool(info["stacked"]),
                                bool(info["transposed"]), tuple(info["shape"]))
    return out


def split_factors(factors: Mapping[str, Any], parameters: Mapping[str, Any] | None
                  ) -> tuple[dict[str, Any], dict[str, ParamTarget], dict[str, Any]]:
    """(the layers' factors, the parameters' targets by key, their factors by key) of a record's factors keyed by
    module name (a wrapper's name for a parameter)."""
    targets = recorded_targets(parameters)
    layers = {n: f for n, f in factors.items() if n not in targets}
    return layers, {t.key: t for t in targets.values()}, {t.key: factors[n] for n, t in targets.items()}


def param_of(module: nn.Module, target: ParamTarget) -> torch.Tensor | None:
    """The parameter ``target`` names in a (plain) model, or None."""
    try:
        return getattr(module.get_submodule(target.module), target.param)
    except AttributeError:
        return None


def wrapper_checksum(layer: nn.Module, algorithm: str = "sha256") -> str:
    """The checksum of the (current) base parameter a ParamWrapper wraps."""
    return weight_checksum(layer.get_param(), algorithm)


@torch.no_grad()
def restore_original(layer: nn.Module, target: ParamTarget, A0: torch.Tensor, B0: torch.Tensor) -> None:
    """``unwrap``: each expert's base set back to W_res,e + s·B₀,e·A₀,e (fp64, cast once)."""
    param, s = layer.get_param(), float(layer.scaling[ADAPTER])
    As, Bs = unpack(A0.double(), B0.double(), target.experts)
    for e in range(target.experts):
        W = read_expert(param, target, e)
        write_expert(param, target, e, (W.double() + s * (Bs[e].to(W.device) @ As[e].to(W.device))).to(W.dtype))
