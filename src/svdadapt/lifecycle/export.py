"""The lifecycle of a wrapped model: save, load without recomputing, export to plain LoRA, unwrap.

PiSSA, MiLoRA and CorDA rewrite the frozen base, W → W_res = W − s·B₀·A₀. After training, the model computes
W_res + s·B·A, which equals W + s·(B·A − B₀·A₀) up to one rounding of W_res. The update is therefore a plain LoRA
*for the original W* of rank 2r::

    A' = [A; A₀]  (2r, in)      B' = [B, −B₀]  (out, 2r)      B'·A' = B·A − B₀·A₀

with alpha doubled (scaling alpha/r is kept; under rsLoRA alpha/√r needs alpha·√2). EoRA keeps the compressed
base W_c as it is, so its adapter already is an ordinary rank-r LoRA for W_c and is written unconverted.
``checkpoint.py`` holds the directory format.

``peft.PeftModel.from_pretrained(original_base, dir)`` gives the fine-tuned outputs, and :func:`load` resumes
rank-r training bit-exactly: the residual is rebuilt from W and the stored initial factors by the engine's
``apply``, the very arithmetic ``wrap`` used; no SVD, no RNG.

``wrap`` installs a guard on the returned model: ``peft_model.save_pretrained(dir)`` *is* :func:`save` (so the
Trainer's checkpoints are correct on the original base and resumable), and ``peft_model.load_adapter(dir, ...)``
of such a directory restores the rank-r factors (so ``Trainer(resume_from_checkpoint=...)`` works).
"""

from __future__ import annotations

import os
import types
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import experts
from ..engine.apply import apply, write_factors
from .compact import compact_options, write_compact
from .checkpoint import (META_FILE, STATE_FILE, Saved, adapter_key, adapter_keys, base_layer_keys, config_dict,
                         config_from_dict, read_checkpoint, write_checkpoint)
from ..modules.layers import before_save, kind_of, layer_checksum, layer_matches
from ..modules.layouts import from_saved, layout_of
from ..core.methods import get_method
from ..core.record import ADAPTER, AdaptRecord, Factors, checksum_algorithm, saved_pattern, weight_checksum
from ..modules.targets import is_peft

__all__ = ["save", "load", "export_lora", "unwrap", "attach", "checkpoint_meta", "record_of", "weight_checksum",
           "read_checkpoint", "write_checkpoint", "META_FILE", "STATE_FILE"]

def record_of(peft_model: nn.Module, what: str) -> AdaptRecord:
    """``peft_model.svdadapt``, or a ``TypeError`` saying that ``svdadapt.<what>`` needs a wrapped model."""
    info = getattr(peft_model, "svdadapt", None)
    if not isinstance(info, AdaptRecord):
        raise TypeError(
            f"svdadapt.{what} needs a model returned by svdadapt.wrap or svdadapt.load, got {type(peft_model).__name__} "
            "without the .svdadapt record (a model loaded with plain PeftModel.from_pretrained has no initial factors: "
            "use `svdadapt export DIR` on the init directory instead)"
        )
    return info


def _targets_of(peft_model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(peft_model.base_model.model.named_modules())
    return {n: modules[n] for n in names}


def _current_state(peft_model: nn.Module, names: list[str], state_dict: Mapping[str, torch.Tensor] | None = None
                   ) -> tuple[dict[str, Factors], dict[str, torch.Tensor]]:
    """The trained adapter, on CPU: name -> (A (r, in), B (out, r)), and PEFT's other saved tensors (the
    ``modules_to_save``, e.g. a classification head) by saved key. From ``state_dict`` when given (the Trainer
    passes a gathered one under FSDP / DeepSpeed), else from the model."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: PEFT would add a targeted embedding's base weight, here the residual
    sd = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=ADAPTER,
                                   save_embedding_layers=False)
    layouts = layouts_of(peft_model, names)
    lora = adapter_keys(names, layouts) | base_layer_keys(sd, names)
    extras = {k: v.detach().cpu() for k, v in sd.items() if k not in lora}
    out = {}
    for n in names:
        ka, kb = adapter_key(n, "A", layouts.get(n)), adapter_key(n, "B", layouts.get(n))
        try:
            out[n] = from_saved(sd[ka].detach().cpu(), sd[kb].detach().cpu())  # as matrices (r, in), (out, r)
        except KeyError:
            raise KeyError(f"the adapter state has no LoRA factors for module {n!r} (looked for {ka!r})") from None
    return out, extras


def layouts_of(peft_model: nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
    """svdadapt.json's ``layouts``: name -> the factor layout of each target whose LoRA factors are not a linear's
    (an embedding's parameters, a conv's kernels; ``modules/layouts.py``)."""
    layers = _targets_of(peft_model, names)
    return {n: lay for n in names if (lay := layout_of(layers[n], ADAPTER)) is not None}


def checkpoint_meta(peft_model: nn.Module) -> dict[str, Any]:
    """The svdadapt.json record of a wrapped model: method, options, rank-r LoRA config, the checksums of the weights
    the portable adapter applies to (the original W, or W_c for EoRA) and of the rewritten base, the report."""
    record = record_of(peft_model, "save")
    spec = get_method(record.method)
    if ADAPTER not in peft_model.peft_config:
        raise ValueError(f"the model has no adapter named {ADAPTER!r} (adapters: {list(peft_model.peft_config)})")
    _refuse_merged(peft_model, record, "save")
    layers = _targets_of(peft_model, record.targets)
    checks = record.base_checksums
    if checks is None:
        if spec.rewrites_base:
            raise ValueError(
                f"this {record.method} model carries no checksum of its original weights (it was not built by "
                "svdadapt.wrap / svdadapt.load of this version), so a portable checkpoint cannot be verified"
            )
        checks = {n: layer_checksum(m.get_base_layer()) for n, m in layers.items()}
    meta = {"method": record.method, "rank": record.rank, "alpha": record.alpha, "options": record.options,
            "targets": list(record.targets), "rewrites_base": spec.rewrites_base,
            "lora_config": config_dict(peft_model.peft_config[ADAPTER]), "base_checksums": dict(checks),
            "report": record.report, "quantize": record.quantize}
    if record.allocation is not None:
        meta["allocation"] = record.allocation
    layouts = layouts_of(peft_model, record.targets)
    if layouts:  # only where a target is not a linear: records of linear models stay as they were
        meta["layouts"] = layouts
    if record.parameters:
        meta["parameters"] = dict(record.parameters)  # target_parameters: wrapper module -> key, experts, layout
    if spec.rewrites_base:
        # what `load` should rebuild, to tell "bit-identical" from "equal up to a different BLAS's rounding"
        meta["residual_checksums"] = {n: _base_checksum(m) for n, m in layers.items()}
    return meta


def _base_checksum(layer: nn.Module) -> str:
    """sha256 of the base a LoRA layer computes with (a ParamWrapper's: its parameter)."""
    return experts.wrapper_checksum(layer) if experts.is_wrapper(layer) else layer_checksum(layer.get_base_layer())


def _base_matches(layer: nn.Module, checksum: str) -> bool:
    if experts.is_wrapper(layer):
        return experts.wrapper_checksum(layer, checksum_algorithm(checksum)) == checksum
    return layer_matches(layer.get_base_layer(), checksum)


def _refuse_merged(peft_model: nn.Module, record: AdaptRecord, what: str) -> None:
    merged = [n for n, m in _targets_of(peft_model, record.targets).items() if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"svdadapt.{what}: the adapter is merged into the base (module {merged[0]!r}); call "
                         "peft_model.unmerge_adapter() first")


def quantization_gap(quantize: str | None, report: Mapping[str, Mapping[str, Any]]) -> str | None:
    """For a quantized residual base (``quantize``, the per-layer ``report`` of the record or of svdadapt.json):
    how far the portable adapter's model (original W + s·(B·A − B₀·A₀)) is from the trained one
    (deq(Q(W_res)) + s·B·A): per layer ‖W_res − deq(Q(W_res))‖ / ‖W‖, measured at init. None if there is none."""
    errors = {n: r["residual_quant_error"] for n, r in report.items() if "residual_quant_error" in r}
    if not errors:
        return None
    worst = max(errors, key=errors.get)
    return (f"svdadapt: the exported LoRA applies to the full-precision base; the trained model's base was the "
            f"{quantize} residual, which differs from it by {sum(errors.values()) / len(errors):.4f} of ‖W‖ per "
            f"layer on average (max {errors[worst]:.4f} at {worst!r})")


def _write_portable(peft_model: nn.Module, directory: str | os.PathLike, resume: bool,
                    state_dict: Mapping[str, torch.Tensor] | None) -> Path:
    before_save(peft_model)  # e.g. reading a state dict of a CPU-repacked 4-bit layer corrupts it (modules/layers.py)
    meta = checkpoint_meta(peft_model)
    current, extras = _current_state(peft_model, meta["targets"], state_dict)
    gap = quantization_gap(peft_model.svdadapt.quantize, peft_model.svdadapt.report)
    if gap is not None:
        print(gap)
    return write_checkpoint(directory, meta, peft_model.svdadapt.init_factors, current, resume=resume, extras=extras)


@torch.no_grad()
def save(peft_model: nn.Module, directory: str | os.PathLike, *,
         state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Save a wrapped model: portable (vanilla PEFT adapter for the ORIGINAL base) and resumable (by :func:`load`).

    ``peft.PeftModel.from_pretrained(original_base, directory)`` then computes W + s·(B·A − B₀·A₀), the
    fine-tuned model (rank 2r, alpha doubled; EoRA: the rank-r LoRA for the compressed base, unconverted).
    ``state_dict`` (optional) supplies the current LoRA factors instead of the model (e.g. a gathered FSDP state).
    Returns the directory.
    """
    return _write_portable(peft_model, directory, True, state_dict)


@torch.no_grad()
def export_lora(peft_model: nn.Module, directory: str | os.PathLike, *,
                state_dict: Mapping[str, torch.Tensor] | None = None, rank: int | None = None,
                energy: float | None = None, round_to: str | list[int] | None = None, covariances: Any = None,
                weighted: bool = False) -> Path:
    """Write only the vanilla PEFT adapter for the ORIGINAL base (A' = [A; A₀], B' = [B, −B₀], alpha doubled; EoRA:
    the plain rank-r LoRA for W_c). Returns the directory.

    Compact (``lifecycle/compact.py``): with ``rank=k`` each layer's update ΔW is written at rank k (its best rank-k
    approximation; exact when rank(ΔW) ≤ k), with ``energy=f`` at the smallest rank keeping the fraction f of
    ‖ΔW‖²; ``round_to`` ("vllm" or a list of ranks) rounds each layer's rank up to the next slot; ``covariances``
    (a ``Covariances``, a mapping or its file) adds the whitened error ‖(ΔW − M)·X‖ / ‖ΔW·X‖ to the report and, with
    ``weighted=True``, M minimizes it. Per-layer ranks go to ``rank_pattern`` (scaling 1), the errors to
    svdadapt_export.json."""
    options = compact_options(rank, energy, round_to, covariances, weighted)
    if options is None:
        return _write_portable(peft_model, directory, False, state_dict)
    before_save(peft_model)
    meta = checkpoint_meta(peft_model)
    current, extras = _current_state(peft_model, meta["targets"], state_dict)
    gap = quantization_gap(peft_model.svdadapt.quantize, peft_model.svdadapt.report)
    if gap is not None:
        print(gap)
    return write_compact(directory, meta, peft_model.svdadapt.init_factors, current, options, extras)


def _verify_base(base_model: nn.Module, meta: Mapping[str, Any], directory: Path, progress: bool) -> None:
    modules = dict(base_model.named_modules())
    residual = meta.get("residual_checksums") or {}
    params = experts.recorded_targets(meta.get("parameters"))
    for n in tqdm(meta["targets"], desc="svdadapt verify base", disable=not progress, unit="layer"):
        if n in params:
            _verify_param(base_model, params[n], meta["base_checksums"][n], directory)
            continue
        m = modules.get(n)
        if m is None or kind_of(m) is None:
            raise ValueError(f"base model has no adaptable layer {n!r}, which {str(directory)!r} was saved for")
        want = meta["base_checksums"][n]
        if not layer_matches(m, want):  # in the algorithm the record names (sha256 in older records)
            got, hint = layer_checksum(m, checksum_algorithm(want)), ""
            if n in residual and layer_matches(m, residual[n]):
                hint = (" — this is the REWRITTEN base (W_res, e.g. `svdadapt init`'s DIR/base); svdadapt.load "
                        "needs the original model")
            raise ValueError(
                f"base weights do not match {str(directory)!r}: first mismatch at module {n!r} "
                f"(weight {tuple(m.weight.shape)} {m.weight.dtype}, {_short(got)}…, expected {_short(want)}…){hint}"
            )


def _verify_param(base_model: nn.Module, target: Any, want: str, directory: Path) -> None:
    p = experts.param_of(base_model, target)
    if p is None:
        raise ValueError(f"base model has no parameter {target.key!r}, which {str(directory)!r} was saved for")
    got = weight_checksum(p, checksum_algorithm(want))
    if got != want:
        raise ValueError(f"base weights do not match {str(directory)!r}: first mismatch at parameter {target.key!r} "
                         f"(shape {tuple(p.shape)} {p.dtype}, {_short(got)}…, expected {_short(want)}…)")


def _short(checksum: str) -> str:
    """A checksum as messages show it: its algorithm and first 12 hex digits ("sha256 3f2a…", "crc32 9c01…")."""
    return f"{checksum_algorithm(checksum)} {checksum.rpartition(':')[2][:12]}"


def _restore_state(peft_model: nn.Module, saved: Saved) -> None:
    """The saved current factors and ``modules_to_save`` tensors into the model."""
    from peft import set_peft_model_state_dict

    write_factors(peft_model, saved.current)
    if saved.extras:
        result = set_peft_model_state_dict(peft_model, saved.extras, adapter_name=ADAPTER)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"the saved adapter holds tensors this model has no place for: {unexpected[:3]}")


def _record_from_meta(meta: Mapping[str, Any], init: Mapping[str, Factors]) -> AdaptRecord:
    return AdaptRecord(method=meta["method"], rank=meta["rank"], alpha=meta["alpha"], options=meta["options"],
                       targets=list(meta["targets"]),
                       init_factors={n: (a.clone(), b.clone()) for n, (a, b) in init.items()},
                       report=meta.get("report", {}), base_checksums=meta["base_checksums"],
                       quantize=meta.get("quantize"),
                       rank_pattern=saved_pattern(meta), alpha_pattern=saved_pattern(meta, "alpha"),
                       allocation=meta.get("allocation"), parameters=meta.get("parameters"))


@torch.no_grad()
def load(base_model: nn.Module, directory: str | os.PathLike, *, verify: bool = True, progress: bool = True):
    """Rebuild the wrapped rank-r model from ``base_model`` (the ORIGINAL model; for EoRA the compressed one) and a
    directory written by :func:`save`, ready to resume training.

    No SVD and no RNG: the engine's ``apply`` with the saved rank-r config and the stored initial factors (the
    residual W − s·B₀·A₀ recomputed exactly as ``wrap`` did: bit-identical to the saved state on the same kind of
    device; a warning says so if not), then the saved A, B restored. With ``verify`` (default) each target weight
    is checked against the saved sha256 first, and a mismatch raises ``ValueError`` naming the first bad module.
    Every file of ``directory`` is checked against the manifest in its svdadapt.json first (an init directory's
    base/ excepted: ``svdadapt.verify`` checks it), and a file that differs raises ``ValueError`` naming it.
    ``base_model`` is modified in place (as ``wrap`` does). Returns the ``peft.PeftModel``.
    """
    d = Path(directory)
    saved = read_checkpoint(d)  # every file load reads checked against the manifest in svdadapt.json
    meta, init = saved.meta, saved.init
    if saved.verified is not None and saved.verified.trained:
        warnings.warn(f"{str(d / 'adapter')!r} changed since init (a trained adapter of this init): svdadapt.load "
                      "restores the initial factors of the state file, not it; `svdadapt export` converts it",
                      stacklevel=2)
    if is_peft(base_model):
        raise TypeError(f"base_model is already a PEFT model ({type(base_model).__name__}); pass the plain base model")
    if verify:
        _verify_base(base_model, meta, d, progress)
    config = config_from_dict(meta["lora_config"])
    config.inference_mode = False
    spec = get_method(meta["method"])
    layer_init, param_targets, param_init = experts.split_factors(init, meta.get("parameters"))
    params = experts.ParamApply(param_targets, param_init, spec.rewrites_base) if param_targets else None
    peft_model = apply(base_model, config, layer_init, rewrite_base=spec.rewrites_base,
                       quantize=meta.get("quantize"), progress=progress, params=params)
    layers = _targets_of(peft_model, meta["targets"])
    residual = meta.get("residual_checksums") or {}
    differs = [n for n, m in layers.items() if n in residual and not _base_matches(m, residual[n])]
    _restore_state(peft_model, saved)
    if differs:
        warnings.warn(
            f"the rebuilt residual of {len(differs)} module(s) (first {differs[0]!r}) is not bit-identical to the saved "
            "one: the original weights matched, so this is the rounding of a different device / BLAS, not a wrong base",
            stacklevel=2,
        )
    attach(peft_model, _record_from_meta(meta, init))
    return peft_model


@torch.no_grad()
def unwrap(peft_model: nn.Module, merge: bool = False) -> nn.Module:
    """The base model with the adapters removed (PEFT's ``unload``), its targeted weights set to

    - ``merge=False``: the original W = W_res + s·B₀·A₀ (computed in fp64, cast once: equal to the original within
      one rounding of the weight dtype; EoRA: W_c, untouched);
    - ``merge=True``: the fine-tuned W_res + s·B·A (PEFT's merge).

    A model whose adapter was merged (``merge_adapter()``) is unmerged first, so both answers hold for it too.
    ``peft_model`` is consumed (its layers are replaced in place); use the returned module.
    """
    record = record_of(peft_model, "unwrap")
    spec = get_method(record.method)
    layers = _targets_of(peft_model, record.targets)
    if any(getattr(m, "merged", False) for m in layers.values()):
        peft_model.unmerge_adapter()
    if merge:
        before_save(peft_model)  # PEFT's merge dequantizes the stored layout
        return peft_model.merge_and_unload()
    if spec.rewrites_base and record.quantize is not None:
        raise ValueError(f"svdadapt.unwrap: the base holds the {record.quantize}-quantized residual, not W, so the "
                         "original weights cannot be rebuilt from it; load the original model instead, or "
                         "unwrap(merge=True) for the fine-tuned quantized model")
    if spec.rewrites_base:
        params = experts.recorded_targets(record.parameters)
        for n, layer in layers.items():
            if n in params:
                experts.restore_original(layer, params[n], *record.init_factors[n])
                continue
            base = layer.get_base_layer()
            kind = kind_of(base)
            A0, B0 = (t.to(device=base.weight.device, dtype=torch.float64) for t in record.init_factors[n])
            s = float(layer.scaling[ADAPTER])
            W = kind.read(base).to(torch.float64) + s * (B0 @ A0)
            kind.write(base, W.to(kind.storage_dtype(base)))
    return peft_model.unload()


# ------------------------------------------------------------------------------------------------------ guard


def _guarded_save_pretrained(self: nn.Module, save_directory: str | os.PathLike, safe_serialization: bool = True,
                             selected_adapters: list[str] | None = None, save_embedding_layers: Any = "auto",
                             is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                             **kwargs: Any) -> None:
    """svdadapt's ``save_pretrained``: the same as :func:`svdadapt.save` (portable adapter for the ORIGINAL base +
    resume state). PEFT's raw rank-r save (correct only on the rewritten base) stays available as
    ``peft.PeftModel.save_pretrained(model, dir)``."""
    if path_initial_model_for_weight_conversion is not None:
        raise ValueError(
            "path_initial_model_for_weight_conversion is not needed on an svdadapt model: its save_pretrained already "
            "writes the converted adapter for the original base (it is svdadapt.save); drop the argument"
        )
    if selected_adapters is not None and list(selected_adapters) != [ADAPTER]:
        raise ValueError(f"an svdadapt model saves its {ADAPTER!r} adapter only, got selected_adapters={selected_adapters!r}; "
                         "use svdadapt.save(model, dir)")
    if not is_main_process:
        return
    save(self, save_directory, state_dict=kwargs.get("state_dict"))


def _guarded_load_adapter(self: nn.Module, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any):
    """Loading a directory written by :func:`save` into the svdadapt adapter restores the rank-r factors (the
    Trainer resumes from its checkpoints this way); anything else goes to PEFT's ``load_adapter``."""
    d = Path(model_id)
    if adapter_name != ADAPTER or not (d / META_FILE).is_file():
        return type(self).load_adapter(self, model_id, adapter_name, *args, **kwargs)
    record = record_of(self, "load_adapter")
    saved = read_checkpoint(d)
    meta, init = saved.meta, saved.init
    if meta["method"] != record.method or meta["rank"] != record.rank or list(meta["targets"]) != record.targets:
        raise ValueError(f"{str(d)!r} holds a {meta['method']} rank-{meta['rank']} adapter; this model is "
                         f"{record.method} rank-{record.rank}")
    for n in meta["targets"]:
        mine = record.init_factors[n]
        if not (torch.equal(init[n][0], mine[0]) and torch.equal(init[n][1], mine[1])):
            raise ValueError(f"{str(d)!r} was trained from different initial factors (first at module {n!r}); "
                             "load it onto the original base with svdadapt.load instead")
    _restore_state(self, saved)
    return nn.modules.module._IncompatibleKeys([], [])


def attach(peft_model: nn.Module, record: AdaptRecord) -> None:
    """Record ``peft_model.svdadapt`` and install the ``save_pretrained`` / ``load_adapter`` guard. Called at the end
    of ``wrap`` and of :func:`load`."""
    peft_model.svdadapt = record
    # instance attributes shadow PeftModel's methods; MethodType keeps copy.deepcopy working
    peft_model.save_pretrained = types.MethodType(_guarded_save_pretrained, peft_model)
    peft_model.load_adapter = types.MethodType(_guarded_load_adapter, peft_model)
