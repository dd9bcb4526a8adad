"""The compact export: a trained adapter's update ΔW written as a plain PEFT LoRA at a reduced rank per layer.

Per layer, ΔW = s·(B·A − B₀·A₀) = s·[B, −B₀]·[A; A₀] for the methods that rewrite the base (s the layer's scaling;
EoRA: s·B·A on W_c) is re-factored by ``core.compact.truncate`` (its exact SVD from the thin factors) at the rank
``rank=k`` or ``energy=f`` asks, rounded up to a serving engine's slots with ``round_to``, and weighted by the input
covariance with ``covariances=`` + ``weighted=True``. The directory holds::

    adapter_config.json, adapter_model.safetensors   PEFT LoRA: rank_pattern / alpha_pattern = each layer's rank
                                                     under its full name (scaling 1), factors U·√Σ and √Σ·Vᵀ
    svdadapt_export.json                             per layer: rank, available rank, kept energy, relative error
                                                     ‖ΔW − M‖/‖ΔW‖ (and the whitened one with covariances)

It is not a resumable save directory (no svdadapt.json): ``svdadapt.load`` needs ``svdadapt.save``'s.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..calibration.covariances import Covariances
from ..core.compact import VLLM_SLOTS, truncate
from ..core.linalg import whitening
from ..core.methods import layer_scaling
from ..core.patterns import pattern_key
from ..core.record import Factors
from .checkpoint import ADAPTER_WEIGHTS, adapter_key, config_from_dict, save_config

__all__ = ["CompactOptions", "compact_options", "write_compact", "REPORT_FILE", "ROUND_TO"]

REPORT_FILE = "svdadapt_export.json"
REPORT_FORMAT = "svdadapt.export/1"
ROUND_TO = {"vllm": VLLM_SLOTS}  # named slot lists of round_to


@dataclass(frozen=True)
class CompactOptions:
    """What the compact export keeps: ``rank`` (k per layer) or ``energy`` (a fraction in (0, 1]; neither: 1, exact),
    ``slots`` (round_to, ascending), ``covariances`` (name -> (in, in) input covariance), ``weighted``."""

    rank: int | None = None
    energy: float | None = None
    slots: tuple[int, ...] | None = None
    covariances: Mapping[str, torch.Tensor] | None = None
    weighted: bool = False

    def recorded(self) -> dict[str, Any]:
        return {"rank": self.rank, "energy": self.energy, "round_to": None if self.slots is None else list(self.slots),
                "covariances": self.covariances is not None, "weighted": self.weighted}


def _slots(round_to: Any) -> tuple[int, ...] | None:
    if round_to is None:
        return None
    if isinstance(round_to, str):
        if round_to not in ROUND_TO:
            raise ValueError(f"export_lora: round_to must be {' or '.join(map(repr, ROUND_TO))} or a list of positive "
                             f"integers, got {round_to!r}")
        return ROUND_TO[round_to]
    ok = isinstance(round_to, (list, tuple)) and round_to and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in round_to)
    if not ok:
        raise ValueError(f"export_lora: round_to must be {' or '.join(map(repr, ROUND_TO))} or a list of positive "
                         f"integers, got {round_to!r}")
    return tuple(sorted(set(round_to)))


def _covariances(covariances: Any) -> Mapping[str, torch.Tensor] | None:
    if covariances is None or isinstance(covariances, Mapping):
        return covariances
    if isinstance(covariances, (str, os.PathLike)):
        return Covariances.load(covariances)
    raise TypeError(f"export_lora: covariances must be a Covariances, a mapping of module name to (in, in) tensor or "
                    f"a covariances file path, got {type(covariances).__name__}")


def compact_options(rank: Any = None, energy: Any = None, round_to: Any = None, covariances: Any = None,
                    weighted: Any = False) -> CompactOptions | None:
    """The keywords of ``export_lora`` checked; None when none asks for a compact export (the plain rank-2r one)."""
    if rank is None and energy is None and round_to is None and covariances is None and not weighted:
        return None
    if rank is not None and energy is not None:
        raise ValueError(f"export_lora: give rank or energy, not both (got rank={rank!r}, energy={energy!r})")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ValueError(f"export_lora: rank must be a positive integer, got {rank!r}")
    if energy is not None and (not isinstance(energy, (int, float)) or isinstance(energy, bool)
                               or not 0 < energy <= 1):
        raise ValueError(f"export_lora: energy must be a number in (0, 1], got {energy!r}")
    if not isinstance(weighted, bool):
        raise TypeError(f"export_lora: weighted must be True or False, got {weighted!r}")
    covs = _covariances(covariances)
    if weighted and covs is None:
        raise ValueError("export_lora: weighted=True needs covariances (the layers' input covariances)")
    return CompactOptions(rank, None if energy is None else float(energy), _slots(round_to), covs, weighted)


def _delta(meta: Mapping[str, Any], init: Mapping[str, Factors], current: Mapping[str, Factors], name: str
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B' (out, w), A' (w, in)) in fp64 with B'·A' the layer's update as the trained model applies it: s·[B, −B₀],
    [A; A₀] when the method rewrote the base, s·B, A otherwise."""
    cfg = meta["lora_config"]
    s = layer_scaling(name, cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora")), cfg.get("rank_pattern") or {},
                      cfg.get("alpha_pattern") or {})
    A, B = (t.to(torch.float64) for t in current[name])
    if meta["rewrites_base"]:
        A0, B0 = (t.to(torch.float64) for t in init[name])
        A, B = torch.cat([A, A0]), torch.cat([B, -B0], 1)
    return s * B, A


def _whiten(options: CompactOptions, name: str, features: int, cache: dict[int, Any]):
    """(S, S⁺) of module ``name``'s input covariance (once per shared tensor), None without covariances."""
    covs = options.covariances
    if covs is None:
        return None
    if name not in covs:
        raise ValueError(f"export_lora: covariances have no entry for module {name!r}")
    C = covs[name]
    if tuple(C.shape) != (features, features):
        raise ValueError(f"export_lora: the covariance of module {name!r} is {tuple(C.shape)}, its input has "
                         f"{features} features")
    if id(C) not in cache:
        cache[id(C)] = whitening(C)
    return cache[id(C)]


def _layer(meta, init, current, name, options, cache) -> tuple[Factors, dict[str, Any]]:
    """One layer's compact (A (k, in), B (out, k)) in the trained factors' dtype, and its report row."""
    B, A = _delta(meta, init, current, name)
    whiten = _whiten(options, name, A.shape[1], cache)
    try:
        t = truncate(B, A, options.rank, energy=options.energy, whiten=whiten, weighted=options.weighted,
                     slots=options.slots)
    except ValueError as e:
        raise ValueError(f"export_lora: module {name!r}: {e}") from None
    dtype = current[name][0].dtype
    row = {"rank": t.rank, "available": t.available, "energy": t.energy, "error": t.error}
    if t.whitened_error is not None:
        row["whitened_error"] = t.whitened_error
    return (t.A.to(dtype).contiguous(), t.B.to(dtype).contiguous()), row


def _key(name: str, names: list[str]) -> str:
    """``name`` as a pattern key PEFT resolves to this module only (the first key that matches: ``pattern_key``)."""
    plain = [n for n in names if n != name]
    return name if not any(pattern_key([name], n) for n in plain) else re.escape(name)


def _config(meta: Mapping[str, Any], ranks: Mapping[str, int]):
    """The rank-r LoRA config with every layer's rank (alpha = rank: scaling 1) in the patterns, full names."""
    cfg = config_from_dict(meta["lora_config"])
    names = list(ranks)
    top = max(ranks.values())
    cfg.r, cfg.lora_alpha, cfg.use_rslora = top, top, False
    cfg.rank_pattern = {_key(n, names): k for n, k in ranks.items()}
    cfg.alpha_pattern = {_key(n, names): k for n, k in ranks.items()}
    cfg.init_lora_weights, cfg.inference_mode = True, True
    return cfg


@torch.no_grad()
def write_compact(directory: str | os.PathLike, meta: Mapping[str, Any], init: Mapping[str, Factors],
                  current: Mapping[str, Factors], options: CompactOptions,
                  extras: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the compact PEFT adapter and svdadapt_export.json into ``directory`` (module docstring); ``meta``: the
    svdadapt.json record (``lora_config``, ``rewrites_base``, ``targets``), ``init`` / ``current``: per target the
    initial and trained (A (r, in), B (out, r)), ``extras``: the adapter's other tensors (``modules_to_save``)."""
    from safetensors.torch import save_file

    d = Path(directory)
    if d.is_file():
        raise ValueError(f"{str(d)!r} is a file; svdadapt writes a directory")
    _check_linear_targets(meta)
    cache: dict[int, Any] = {}
    weights, rows = {}, {}
    for n in meta["targets"]:
        (A, B), rows[n] = _layer(meta, init, current, n, options, cache)
        weights[adapter_key(n, "A")], weights[adapter_key(n, "B")] = A, B
    weights.update({k: v.detach().cpu().contiguous().clone() for k, v in (extras or {}).items()})
    d.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    save_config(_config(meta, {n: r["rank"] for n, r in rows.items()}), d)
    _write_report(d, meta, init, options, rows)
    return d


def _check_linear_targets(meta: Mapping[str, Any]) -> None:
    """The compact export writes each target as one (out, in) product B·A under lora_A / lora_B: an MoE expert
    wrapper (its experts packed in one lora_A) or an embedding / conv (its own factor layout) is refused."""
    params, layouts = meta.get("parameters") or {}, meta.get("layouts") or {}
    names = sorted(p["key"] for p in params.values()) or sorted(layouts)
    if names:
        what = "an MoE parameter" if params else "an embedding or convolution"
        raise ValueError(f"a compact export (rank= / energy= / round_to= / covariances=) writes linear layers only; "
                         f"target {names[0]!r} is {what} (its factors have their own layout): export it without "
                         "those keywords")


def _write_report(d: Path, meta: Mapping[str, Any], init: Mapping[str, Factors], options: CompactOptions,
                  rows: Mapping[str, Mapping[str, Any]]) -> None:
    """svdadapt_export.json: the options, the adapter's parameters against the plain export's, the rows."""
    width = 2 if meta["rewrites_base"] else 1  # the plain export's rank: 2r ([A; A₀]) or r
    sides = {n: init[n][0].shape[1] + init[n][1].shape[0] for n in rows}  # in + out
    params = {n: r["rank"] * sides[n] for n, r in rows.items()}
    full = {n: width * init[n][0].shape[0] * sides[n] for n in rows}
    report = {"format": REPORT_FORMAT, "method": meta["method"], "options": options.recorded(),
              "parameters": sum(params.values()), "parameters_full_export": sum(full.values()), "layers": rows}
    (d / REPORT_FILE).write_text(json.dumps(report, indent=2))
