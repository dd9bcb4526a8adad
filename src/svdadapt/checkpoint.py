"""The on-disk format of a saved svdadapt model: what a directory holds, written and read tensor-exactly.

A directory written by ``svdadapt.save`` (or ``svdadapt export``) holds::

    adapter_config.json, adapter_model.safetensors   vanilla PEFT adapter for the ORIGINAL base (EoRA: W_c)
    svdadapt.json                                    method, options, rank-r LoRA config, checksums, report
    svdadapt_state.safetensors                       "<module>.A0/.B0" initial factors, "<module>.A/.B" current

``read_metadata`` reads svdadapt.json alone (the CLI's ``report``); ``read_checkpoint`` reads everything and checks
it: a missing, truncated or foreign file is an error naming the file, and the initial factors must match the
checksum stored next to them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .record import Factors, factors_checksum

__all__ = ["META_FILE", "STATE_FILE", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FORMAT", "adapter_key", "config_dict",
           "config_from_dict", "write_checkpoint", "read_checkpoint", "read_metadata", "Saved", "adapter_keys"]

META_FILE = "svdadapt.json"
STATE_FILE = "svdadapt_state.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "svdadapt.lifecycle/1"
_PREFIX = "base_model.model."  # PEFT's state-dict prefix in front of the module name
EXTRA = "extra:"  # resume-state prefix of the adapter's other tensors (modules_to_save)


def adapter_key(name: str, which: str) -> str:
    """PEFT's saved-adapter key of ``lora_A``/``lora_B`` of module ``name`` (adapter name stripped)."""
    return f"{_PREFIX}{name}.lora_{which}.weight"


def adapter_keys(names: Any) -> set[str]:
    """The saved keys of the LoRA A and B of each of ``names``."""
    return {adapter_key(n, which) for n in names for which in "AB"}


def config_dict(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict()
    for k, v in d.items():
        if isinstance(v, set):  # as PeftConfig.save_pretrained does
            d[k] = sorted(v)
    d["peft_type"] = str(getattr(d["peft_type"], "value", d["peft_type"]))
    if d.get("task_type") is not None:
        d["task_type"] = str(getattr(d["task_type"], "value", d["task_type"]))
    return d


def config_from_dict(d: Mapping[str, Any]):
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


@torch.no_grad()
def write_checkpoint(directory: str | os.PathLike, meta: Mapping[str, Any],
                     init: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     current: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, resume: bool = True,
                     portable: bool = True, extras: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the portable adapter (if ``portable``) and the svdadapt resume files (if ``resume``) into ``directory``.

    ``meta`` is the svdadapt.json record (``method``, ``rank``, ``alpha``, ``options``, ``targets``,
    ``rewrites_base``, ``lora_config`` (rank-r PEFT config dict), ``base_checksums`` ...); ``init`` and ``current``
    map each target to (A (r, in), B (out, r)). ``extras`` are the other tensors of PEFT's adapter state (the
    trained ``modules_to_save``, e.g. a classification head), under PEFT's saved keys: written as they are into the
    portable adapter and kept in the resume state. Used by :func:`save` and by ``svdadapt export``.
    """
    extras = dict(extras or {})
    from safetensors.torch import save_file

    d = Path(directory)
    if d.is_file():
        raise ValueError(f"{str(d)!r} is a file; svdadapt writes a directory")
    d.mkdir(parents=True, exist_ok=True)
    rewrites = bool(meta["rewrites_base"])
    if portable:
        cfg = config_from_dict(meta["lora_config"])
        weights: dict[str, torch.Tensor] = {}
        for n in meta["targets"]:
            A, B = current[n]
            if rewrites:  # ΔW = B·A − B₀·A₀ = [B, −B₀]·[A; A₀]
                A0, B0 = init[n]
                A, B = torch.cat([A, A0.to(A.dtype)], dim=0), torch.cat([B, -B0.to(B.dtype)], dim=1)
            weights[adapter_key(n, "A")] = A.contiguous().clone()
            weights[adapter_key(n, "B")] = B.contiguous().clone()
        weights.update({k: v.detach().cpu().contiguous().clone() for k, v in extras.items()})
        save_file(weights, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _portable_config(cfg, rewrites).save_pretrained(str(d))
    if resume:
        state = {}
        for n in meta["targets"]:
            for tag, t in zip(("A0", "B0", "A", "B"), (*init[n], *current[n])):
                state[f"{n}.{tag}"] = t.detach().cpu().contiguous().clone()
        state.update({EXTRA + k: v.detach().cpu().contiguous().clone() for k, v in extras.items()})
        save_file(state, str(d / STATE_FILE), metadata={"format": FORMAT})
        record = {"format": FORMAT, **meta, "init_checksum": factors_checksum({n: init[n] for n in meta["targets"]})}
        (d / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=False, default=_json_default))
    return d


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to {META_FILE}")


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The svdadapt.json record of a directory written by ``svdadapt.save`` / ``svdadapt init`` / ``export``: method,
    rank, alpha, options, targets, rewrites_base, lora_config, checksums, report.

    Raises ``FileNotFoundError`` naming what is missing, ``ValueError`` naming the file if it is not such a record.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no such directory: {str(d)!r}")
    path = d / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(d)!r} has no {META_FILE}: it was not written by svdadapt.save "
                                "(a plain PEFT adapter loads with peft.PeftModel.from_pretrained)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a valid svdadapt record (truncated or not JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{str(path)!r} has format {got!r}, this svdadapt reads {FORMAT!r}")
    missing = [k for k in ("method", "rank", "alpha", "targets", "rewrites_base", "lora_config") if k not in meta]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}: not a complete svdadapt record")
    return meta


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{str(path.parent)!r} has no {path.name}: it was not written by svdadapt.save "
                                "(a plain PEFT adapter loads with peft.PeftModel.from_pretrained)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt: {e})") from None


@dataclass
class Saved:
    """What a save directory holds: the svdadapt.json record, per target the initial and the current
    (A (r, in), B (out, r)), and the adapter's other tensors (``modules_to_save``) under PEFT's saved keys."""

    meta: dict[str, Any]
    init: dict[str, Factors]
    current: dict[str, Factors]
    extras: dict[str, torch.Tensor]


def read_checkpoint(directory: str | os.PathLike) -> Saved:
    """Everything in a directory written by ``svdadapt.save`` (or ``svdadapt export``), checked.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file that is missing, truncated or inconsistent; the
    initial factors must match the checksum the record holds.
    """
    d = Path(directory)
    meta = read_metadata(d)
    state = _load_state(d / STATE_FILE)
    init, current = {}, {}
    for n in meta["targets"]:
        try:
            init[n] = (state[f"{n}.A0"], state[f"{n}.B0"])
            current[n] = (state[f"{n}.A"], state[f"{n}.B"])
        except KeyError:
            raise ValueError(f"{str(d / STATE_FILE)!r} has no factors for module {n!r}") from None
    want = meta.get("init_checksum")
    if want is not None and factors_checksum(init) != want:
        raise ValueError(f"{str(d / STATE_FILE)!r}: the initial factors do not match the checksum in {META_FILE} "
                         "(the file was changed or mixed with another run's)")
    extras = {k[len(EXTRA):]: v for k, v in state.items() if k.startswith(EXTRA)}
    return Saved(meta, init, current, extras)
