"""The lifecycle of a wrapped model: save, load without recomputing, export to plain LoRA, unwrap.

PiSSA, MiLoRA and CorDA rewrite the frozen base, W → W_res = W − s·B₀·A₀. After training, the model computes
W_res + s·B·A, which equals W + s·(B·A − B₀·A₀) up to one rounding of W_res. The update is therefore a plain LoRA
*for the original W* of rank 2r::

    A' = [A; A₀]  (2r, in)      B' = [B, −B₀]  (out, 2r)      B'·A' = B·A − B₀·A₀

with alpha doubled (scaling alpha/r is kept; under rsLoRA alpha/√r needs alpha·√2). EoRA keeps the compressed
base W_c as it is, so its adapter already is an ordinary rank-r LoRA for W_c and is written unconverted.

A directory written by :func:`save` holds both halves::

    adapter_config.json, adapter_model.safetensors   vanilla PEFT adapter for the ORIGINAL base (EoRA: W_c)
    svdadapt.json                                    method, options, rank-r LoRA config, checksums, report
    svdadapt_state.safetensors                       "<module>.A0/.B0" initial factors, "<module>.A/.B" current

so ``peft.PeftModel.from_pretrained(original_base, dir)`` gives the fine-tuned outputs, and
:func:`load` resumes rank-r training bit-exactly (the residual is rebuilt from W and the stored initial factors by
:func:`svdadapt.methods.finish`, the very arithmetic ``wrap`` used; no SVD, no RNG).

``wrap`` installs a guard on the returned model: ``peft_model.save_pretrained(dir)`` *is* :func:`save` (so the
Trainer's checkpoints are correct on the original base and resumable), and ``peft_model.load_adapter(dir, ...)``
of such a directory restores the rank-r factors (so ``Trainer(resume_from_checkpoint=...)`` works).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import types
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .methods import Init, finish, get_method
from .wrap import ADAPTER

__all__ = ["save", "load", "export_lora", "unwrap", "weight_checksum", "attach", "read_checkpoint",
           "write_checkpoint", "META_FILE", "STATE_FILE"]

META_FILE = "svdadapt.json"
STATE_FILE = "svdadapt_state.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "svdadapt.lifecycle/1"
_PREFIX = "base_model.model."  # PEFT's state-dict prefix in front of the module name


# ----------------------------------------------------------------------------------------------------- helpers


def weight_checksum(w: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (any device; bit-exact, so a re-quantized or re-cast base
    does not match)."""
    t = w.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}:{tuple(w.shape)}:".encode())
    h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _info(peft_model: nn.Module, what: str) -> dict[str, Any]:
    info = getattr(peft_model, "svdadapt", None)
    if not isinstance(info, dict) or "init_factors" not in info:
        raise TypeError(
            f"svdadapt.{what} needs a model returned by svdadapt.wrap or svdadapt.load, got {type(peft_model).__name__} "
            "without the .svdadapt record (a model loaded with plain PeftModel.from_pretrained has no initial factors: "
            "use `svdadapt export DIR` on the init directory instead)"
        )
    return info


def _key(name: str, which: str) -> str:
    """PEFT's saved-adapter key of ``lora_A``/``lora_B`` of module ``name`` (adapter name stripped)."""
    return f"{_PREFIX}{name}.lora_{which}.weight"


def _config_dict(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict()
    for k, v in d.items():
        if isinstance(v, set):  # as PeftConfig.save_pretrained does
            d[k] = sorted(v)
    d["peft_type"] = str(getattr(d["peft_type"], "value", d["peft_type"]))
    if d.get("task_type") is not None:
        d["task_type"] = str(getattr(d["task_type"], "value", d["task_type"]))
    return d


def _config_from_dict(d: Mapping[str, Any]):
    from peft import LoraConfig

    return LoraConfig.from_peft_type(**dict(d))


def _portable_config(cfg: Any, rewrites: bool):
    """The config of the exported adapter: rank 2r and alpha scaled so alpha/r (or alpha/√r) is unchanged."""
    cfg = copy.deepcopy(cfg)
    if cfg.rank_pattern or cfg.alpha_pattern:
        raise ValueError("svdadapt export does not support rank_pattern / alpha_pattern in the LoRA config")
    cfg.init_lora_weights = True  # a loader must not rerun any data-dependent init
    cfg.inference_mode = True
    if rewrites:
        cfg.r *= 2
        cfg.lora_alpha = cfg.lora_alpha * (math.sqrt(2.0) if cfg.use_rslora else 2)
    return cfg


def _current_factors(peft_model: nn.Module, names: list[str], state_dict: Mapping[str, torch.Tensor] | None = None
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (A (r, in), B (out, r)) of the trained adapter, on CPU; from ``state_dict`` when given (the Trainer
    passes a gathered one under FSDP / DeepSpeed), else from the model."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=ADAPTER)
    out = {}
    for n in names:
        try:
            out[n] = (sd[_key(n, "A")].detach().cpu(), sd[_key(n, "B")].detach().cpu())
        except KeyError:
            raise KeyError(f"the adapter state has no LoRA factors for module {n!r} (looked for {_key(n, 'A')!r})") from None
    return out


# ---------------------------------------------------------------------------------------------- directory I/O


@torch.no_grad()
def write_checkpoint(directory: str | os.PathLike, meta: Mapping[str, Any],
                     init: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     current: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, resume: bool = True,
                     portable: bool = True) -> Path:
    """Write the portable adapter (if ``portable``) and the svdadapt resume files (if ``resume``) into ``directory``.

    ``meta`` is the svdadapt.json record (``method``, ``rank``, ``alpha``, ``options``, ``targets``,
    ``rewrites_base``, ``lora_config`` (rank-r PEFT config dict), ``base_checksums`` ...); ``init`` and ``current``
    map each target to (A (r, in), B (out, r)). Used by :func:`save` and by ``svdadapt export``.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    if d.is_file():
        raise ValueError(f"{str(d)!r} is a file; svdadapt writes a directory")
    d.mkdir(parents=True, exist_ok=True)
    rewrites = bool(meta["rewrites_base"])
    if portable:
        cfg = _config_from_dict(meta["lora_config"])
        weights: dict[str, torch.Tensor] = {}
        for n in meta["targets"]:
            A, B = current[n]
            if rewrites:  # ΔW = B·A − B₀·A₀ = [B, −B₀]·[A; A₀]
                A0, B0 = init[n]
                A, B = torch.cat([A, A0.to(A.dtype)], dim=0), torch.cat([B, -B0.to(B.dtype)], dim=1)
            weights[_key(n, "A")] = A.contiguous().clone()
            weights[_key(n, "B")] = B.contiguous().clone()
        save_file(weights, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _portable_config(cfg, rewrites).save_pretrained(str(d))
    if resume:
        state = {}
        for n in meta["targets"]:
            for tag, t in zip(("A0", "B0", "A", "B"), (*init[n], *current[n])):
                state[f"{n}.{tag}"] = t.detach().cpu().contiguous().clone()
        save_file(state, str(d / STATE_FILE), metadata={"format": FORMAT})
        record = {"format": FORMAT, **meta}
        (d / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=False, default=_json_default))
    return d


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to {META_FILE}")


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                           dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(meta, init, current)`` from a directory written by :func:`save` (or ``svdadapt export``).

    Raises ``FileNotFoundError`` naming what is missing (a plain PEFT adapter directory has no svdadapt.json).
    """
    from safetensors.torch import load_file

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no such directory: {str(d)!r}")
    if not (d / META_FILE).is_file() or not (d / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{str(d)!r} has no {META_FILE} / {STATE_FILE}: it was not written by svdadapt.save "
            "(a plain PEFT adapter loads with peft.PeftModel.from_pretrained)"
        )
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(d / META_FILE)!r} has format {meta.get('format')!r}, this svdadapt reads {FORMAT!r}")
    state = load_file(str(d / STATE_FILE))
    init, current = {}, {}
    for n in meta["targets"]:
        try:
            init[n] = (state[f"{n}.A0"], state[f"{n}.B0"])
            current[n] = (state[f"{n}.A"], state[f"{n}.B"])
        except KeyError:
            raise ValueError(f"{str(d / STATE_FILE)!r} has no factors for module {n!r}") from None
    return meta, init, current


# -------------------------------------------------------------------------------------------------- public API


def _meta(peft_model: nn.Module) -> dict[str, Any]:
    info = _info(peft_model, "save")
    spec = get_method(info["method"])
    if ADAPTER not in peft_model.peft_config:
        raise ValueError(f"the model has no adapter named {ADAPTER!r} (adapters: {list(peft_model.peft_config)})")
    modules = dict(peft_model.base_model.model.named_modules())
    checks = info.get("base_checksums")
    if checks is None:
        if spec.rewrites_base:
            raise ValueError(
                f"this {info['method']} model carries no checksum of its original weights (it was not built by "
                "svdadapt.wrap / svdadapt.load of this version), so a portable checkpoint cannot be verified"
            )
        checks = {n: weight_checksum(modules[n].get_base_layer().weight) for n in info["targets"]}
    meta = {
        "method": info["method"],
        "rank": info["rank"],
        "alpha": info["alpha"],
        "options": info["options"],
        "targets": list(info["targets"]),
        "rewrites_base": spec.rewrites_base,
        "lora_config": _config_dict(peft_model.peft_config[ADAPTER]),
        # the weights the portable adapter applies to: the original W (pissa/milora/corda) or W_c (eora)
        "base_checksums": dict(checks),
        "report": info.get("report", {}),
    }
    if spec.rewrites_base:
        # what `load` should rebuild, to tell "bit-identical" from "equal up to a different BLAS's rounding"
        meta["residual_checksums"] = {n: weight_checksum(modules[n].get_base_layer().weight) for n in info["targets"]}
    return meta


@torch.no_grad()
def save(peft_model: nn.Module, directory: str | os.PathLike, *,
         state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Save a wrapped model: portable (vanilla PEFT adapter for the ORIGINAL base) and resumable (by :func:`load`).

    ``peft.PeftModel.from_pretrained(original_base, directory)`` then computes W + s·(B·A − B₀·A₀), the
    fine-tuned model (rank 2r, alpha doubled; EoRA: the rank-r LoRA for the compressed base, unconverted).
    ``state_dict`` (optional) supplies the current LoRA factors instead of the model (e.g. a gathered FSDP state).
    Returns the directory.
    """
    meta = _meta(peft_model)
    info = peft_model.svdadapt
    current = _current_factors(peft_model, meta["targets"], state_dict)
    return write_checkpoint(directory, meta, info["init_factors"], current, resume=True)


@torch.no_grad()
def export_lora(peft_model: nn.Module, directory: str | os.PathLike, *,
                state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write only the vanilla PEFT adapter for the ORIGINAL base (A' = [A; A₀], B' = [B, −B₀], alpha doubled; EoRA:
    the plain rank-r LoRA for W_c). Returns the directory."""
    meta = _meta(peft_model)
    current = _current_factors(peft_model, meta["targets"], state_dict)
    return write_checkpoint(directory, meta, peft_model.svdadapt["init_factors"], current, resume=False)


def _verify_base(base_model: nn.Module, meta: Mapping[str, Any], directory: Path, progress: bool) -> None:
    modules = dict(base_model.named_modules())
    residual = meta.get("residual_checksums") or {}
    for n in tqdm(meta["targets"], desc="svdadapt verify base", disable=not progress, unit="layer"):
        m = modules.get(n)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"base model has no nn.Linear {n!r}, which {str(directory)!r} was saved for")
        got, want = weight_checksum(m.weight), meta["base_checksums"][n]
        if got != want:
            hint = ""
            if residual.get(n) == got:
                hint = (" — this is the REWRITTEN base (W_res, e.g. `svdadapt init`'s DIR/base); svdadapt.load "
                        "needs the original model")
            raise ValueError(
                f"base weights do not match {str(directory)!r}: first mismatch at module {n!r} "
                f"(weight {tuple(m.weight.shape)} {m.weight.dtype}, sha256 {got[:12]}…, expected {want[:12]}…){hint}"
            )


@torch.no_grad()
def load(base_model: nn.Module, directory: str | os.PathLike, *, verify: bool = True, progress: bool = True):
    """Rebuild the wrapped rank-r model from ``base_model`` (the ORIGINAL model; for EoRA the compressed one) and a
    directory written by :func:`save`, ready to resume training.

    No SVD and no RNG: ``get_peft_model`` with the saved rank-r config, the residual W − s·B₀·A₀ recomputed by
    :func:`svdadapt.methods.finish` exactly as ``wrap`` did (bit-identical to the saved state on the same kind of
    device; a warning says so if not), then the saved A, B restored. With ``verify`` (default) each target weight
    is checked against the saved sha256 first, and a mismatch raises ``ValueError`` naming the first bad module.
    ``base_model`` is modified in place (as ``wrap`` does). Returns the ``peft.PeftModel``.
    """
    from peft import get_peft_model

    from .wrap import _is_peft

    d = Path(directory)
    meta, init, current = read_checkpoint(d)
    if _is_peft(base_model):
        raise TypeError(f"base_model is already a PEFT model ({type(base_model).__name__}); pass the plain base model")
    if verify:
        _verify_base(base_model, meta, d, progress)
    spec = get_method(meta["method"])
    config = _config_from_dict(meta["lora_config"])
    config.inference_mode = False
    with torch.random.fork_rng(devices=[]):  # PEFT's default init draws from the global RNG; it is overwritten
        peft_model = get_peft_model(base_model, config)
    modules = dict(peft_model.base_model.model.named_modules())
    residual = meta.get("residual_checksums") or {}
    differs = []
    for n in tqdm(meta["targets"], desc=f"svdadapt load {meta['method']}", disable=not progress, unit="layer"):
        layer = modules[n]
        base = layer.get_base_layer()
        lora_A, lora_B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        A0, B0 = init[n]
        A, B = current[n]
        if A0.shape != lora_A.shape or B0.shape != lora_B.shape:
            raise ValueError(f"saved factors of {n!r} have shapes {tuple(A0.shape)}, {tuple(B0.shape)}; the rebuilt "
                             f"layer has {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
        if spec.rewrites_base:
            W = base.weight.detach().to(torch.float32)
            # the same call, on the same operands, that wrap() made: the residual comes out bit-identical
            dev = W.device
            _, _, new_base = finish(W, Init(A0.to(dev), B0.to(dev), A0.new_zeros(0)), float(layer.scaling[ADAPTER]),
                                    lora_A.dtype, base.weight.dtype, True)
            base.weight.data.copy_(new_base)
            if n in residual and weight_checksum(base.weight) != residual[n]:
                differs.append(n)
        lora_A.data.copy_(A)
        lora_B.data.copy_(B)
    if differs:
        warnings.warn(
            f"the rebuilt residual of {len(differs)} module(s) (first {differs[0]!r}) is not bit-identical to the saved "
            "one: the original weights matched, so this is the rounding of a different device / BLAS, not a wrong base",
            stacklevel=2,
        )
    attach(peft_model, {
        "method": meta["method"], "rank": meta["rank"], "alpha": meta["alpha"], "options": meta["options"],
        "targets": list(meta["targets"]), "init_factors": {n: (a.clone(), b.clone()) for n, (a, b) in init.items()},
        "report": meta.get("report", {}),
    }, meta["base_checksums"])
    return peft_model


@torch.no_grad()
def unwrap(peft_model: nn.Module, merge: bool = False) -> nn.Module:
    """The base model with the adapters removed (PEFT's ``unload``), its targeted weights set to

    - ``merge=False``: the original W = W_res + s·B₀·A₀ (computed in fp64, cast once: equal to the original within
      one rounding of the weight dtype; EoRA: W_c, untouched);
    - ``merge=True``: the fine-tuned W_res + s·B·A (PEFT's merge).

    ``peft_model`` is consumed (its layers are replaced in place); use the returned module.
    """
    info = _info(peft_model, "unwrap")
    spec = get_method(info["method"])
    if merge:
        return peft_model.merge_and_unload()
    if spec.rewrites_base:
        modules = dict(peft_model.base_model.model.named_modules())
        for n in info["targets"]:
            layer = modules[n]
            w = layer.get_base_layer().weight
            A0, B0 = (t.to(device=w.device, dtype=torch.float64) for t in info["init_factors"][n])
            s = float(layer.scaling[ADAPTER])
            w.data.copy_((w.to(torch.float64) + s * (B0 @ A0)).to(w.dtype))
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
    info = _info(self, "load_adapter")
    meta, init, current = read_checkpoint(d)
    if meta["method"] != info["method"] or meta["rank"] != info["rank"] or list(meta["targets"]) != list(info["targets"]):
        raise ValueError(f"{str(d)!r} holds a {meta['method']} rank-{meta['rank']} adapter; this model is "
                         f"{info['method']} rank-{info['rank']}")
    for n in meta["targets"]:
        mine = info["init_factors"][n]
        if not (torch.equal(init[n][0], mine[0]) and torch.equal(init[n][1], mine[1])):
            raise ValueError(f"{str(d)!r} was trained from different initial factors (first at module {n!r}); "
                             "load it onto the original base with svdadapt.load instead")
    modules = dict(self.base_model.model.named_modules())
    with torch.no_grad():
        for n in meta["targets"]:
            modules[n].lora_A[ADAPTER].weight.data.copy_(current[n][0])
            modules[n].lora_B[ADAPTER].weight.data.copy_(current[n][1])
    return nn.modules.module._IncompatibleKeys([], [])


def attach(peft_model: nn.Module, info: dict[str, Any], base_checksums: Mapping[str, str] | None) -> None:
    """Record ``peft_model.svdadapt`` (with the checksums of the weights the portable adapter applies to) and install
    the ``save_pretrained`` / ``load_adapter`` guard. Called at the end of ``wrap`` and of :func:`load`."""
    info = dict(info)
    if base_checksums is not None:
        info["base_checksums"] = dict(base_checksums)
    peft_model.svdadapt = info
    # instance attributes shadow PeftModel's methods; MethodType keeps copy.deepcopy working
    peft_model.save_pretrained = types.MethodType(_guarded_save_pretrained, peft_model)
    peft_model.load_adapter = types.MethodType(_guarded_load_adapter, peft_model)
