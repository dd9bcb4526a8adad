"""Parameters as targets: PEFT's ``target_parameters`` (``lora.ParamWrapper``) over 3-D expert stacks and 2-D
``nn.Parameter`` weights, and the coverage warning when most of a model's decoder blocks are left out.

PEFT 0.21's rules, reproduced here: ``target_parameters`` is a list of strings (a bare string is a ``TypeError``);
the key of a parameter is ``"<module path>.<param name>"`` of the lowest module holding it; a key is targeted when
it equals an entry or ends in ``"." + entry``. A 3-D parameter is (E, out, in) (``F.linear(x, p[e])``, transformers
5's ``MixtralExperts.gate_up_proj`` (E, 2·I, H) and ``down_proj`` (E, H, I)), or (E, in, out) where its module
says ``is_transposed = True`` (gpt-oss, Aria: ``x @ p[e]``); a 2-D parameter is (out, in). Expert ``e`` of key
``k`` is addressed as ``"k[e]"`` (plan inputs, covariances, reports); a 2-D target as ``k`` itself.

Leaf of ``modules``: torch only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["ParamTarget", "find_parameters", "check_target_parameters", "expert_names", "read_expert",
           "write_expert", "coverage_warning"]


@dataclass(frozen=True)
class ParamTarget:
    """One targeted parameter: ``key`` (``module.param``), its ``module`` path and ``param`` name, the number of
    ``experts`` E (1 for a 2-D target, ``stacked`` False), whether it is stored (E, in, out) (``transposed``), and
    each expert's ``shape`` (out, in)."""

    key: str
    module: str
    param: str
    experts: int
    stacked: bool
    transposed: bool
    shape: tuple[int, int]

    def name(self, e: int) -> str:
        """How expert ``e`` is addressed: ``"<key>[e]"`` (a 2-D target: ``key``)."""
        return f"{self.key}[{e}]" if self.stacked else self.key


def expert_names(target: ParamTarget) -> list[str]:
    """Every expert's name, in order."""
    return [target.name(e) for e in range(target.experts)]


def check_target_parameters(target_parameters: object) -> tuple[str, ...]:
    """``target_parameters`` as PEFT takes it: None or a list of strings (PEFT refuses a bare string)."""
    if target_parameters is None:
        return ()
    if isinstance(target_parameters, str):
        raise TypeError(f"target_parameters must be a list of strings (as in PEFT), got the string "
                        f"{target_parameters!r}; write [{target_parameters!r}]")
    values = list(target_parameters) if isinstance(target_parameters, Iterable) else None
    if values is None or not all(isinstance(v, str) and v for v in values):
        raise TypeError(f"target_parameters must be a list of non-empty strings, got {target_parameters!r}")
    return tuple(values)


def _matches(entries: Iterable[str], key: str) -> bool:
    return any(key == t or key.endswith("." + t) for t in entries)


def _target(key: str, module_name: str, module: nn.Module, param_name: str, p: torch.Tensor) -> ParamTarget:
    if module_name == "":
        raise ValueError(f"target_parameters: {key!r} is a parameter of the top-level module, which PEFT cannot "
                         "wrap; target a parameter of a submodule")
    if p.dim() not in (2, 3):
        raise ValueError(f"target_parameters: {key!r} has shape {tuple(p.shape)}; PEFT's ParamWrapper takes 2-D "
                         "(out, in) and 3-D (experts, out, in) parameters only")
    if not torch.is_floating_point(p):
        raise TypeError(f"target_parameters: {key!r} is {p.dtype}; svdadapt decomposes floating-point weights only")
    transposed = p.dim() == 3 and bool(getattr(module, "is_transposed", False))
    out_in = tuple(p.shape[-1:-3:-1]) if transposed else tuple(p.shape[-2:])
    return ParamTarget(key, module_name, param_name, p.shape[0] if p.dim() == 3 else 1, p.dim() == 3, transposed,
                       out_in)


def find_parameters(model: nn.Module, target_parameters: Iterable[str],
                    module_targets: Iterable[str] = ()) -> dict[str, ParamTarget]:
    """The parameters ``target_parameters`` selects (PEFT's matching), by key in ``named_modules()`` order.

    Raises ``ValueError`` when nothing matches (naming the candidates), when a parameter's module is also a
    ``target_modules`` target (PEFT refuses it), for a top-level parameter or one that is not 2-D / 3-D.
    """
    entries = check_target_parameters(target_parameters)
    found: dict[str, ParamTarget] = {}
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if _matches(entries, key):
                found[key] = _target(key, module_name, module, param_name, p)
    if not found:
        candidates = sorted({_suffix(k) for k, p in model.named_parameters() if p.dim() == 3})
        raise ValueError(f"target_parameters={list(entries)!r} matched no parameter of {type(model).__name__} (an "
                         f"entry matches '<module>.<param>' exactly or as a dotted suffix); 3-D parameters here: "
                         f"{candidates or 'none'}")
    both = [t.key for t in found.values() if t.module in set(module_targets)]
    if both:
        raise ValueError(f"target_parameters matched {both[0]!r}, whose module is also a target_modules target; "
                         "PEFT cannot wrap both: exclude the module (e.g. exclude_modules) or the parameter")
    return found


def _stored(model_or_param: nn.Module | torch.Tensor, target: ParamTarget) -> torch.Tensor:
    if isinstance(model_or_param, torch.Tensor):
        return model_or_param
    return getattr(model_or_param.get_submodule(target.module), target.param)


def read_expert(holder: nn.Module | torch.Tensor, target: ParamTarget, e: int) -> torch.Tensor:
    """Expert ``e``'s weight (out, in) as stored (a view: do not write into it). ``holder``: the model (or a
    module tree where ``target.module`` is) or the parameter itself."""
    p = _stored(holder, target).detach()
    w = p[e] if target.stacked else p
    return w.mT if target.transposed else w


@torch.no_grad()
def write_expert(holder: nn.Module | torch.Tensor, target: ParamTarget, e: int, base: torch.Tensor) -> None:
    """Store a new base (out, in) in expert ``e``'s slice, in place (the parameter keeps its storage)."""
    read_expert(holder, target, e).copy_(base)  # a view of the parameter's storage


# -------------------------------------------------------------------------------------------- coverage warning

_INDEX = re.compile(r"\.\d+\.")


def _suffix(key: str) -> str:
    """A parameter's name after its block index (``model.layers.3.mlp.experts.down_proj`` -> ``mlp.experts.down_proj``)."""
    parts = _INDEX.split(key)
    return parts[-1] if len(parts) > 1 else key


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder blocks: the ``nn.ModuleList`` holding the most parameters."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return None
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def coverage_warning(model: nn.Module, module_targets: Iterable[str], param_targets: Iterable[str] = ()) -> str | None:
    """The warning text when the targets (module names whose ``.weight`` is adapted, parameter keys) cover under
    half of the matrix weights (2-D and 3-D parameters) of the model's decoder blocks while some of what is left out
    can only be reached through ``target_parameters`` (a parameter of 3 dimensions: MoE experts); else None."""
    found = _blocks(model)
    if found is None:
        return None
    prefix, blocks = found
    covered_keys = {f"{n}.weight" for n in module_targets} | set(param_targets)
    weights = {f"{prefix}.{k}": p for k, p in blocks.named_parameters() if p.dim() >= 2}
    total = sum(p.numel() for p in weights.values())
    left = {k: p for k, p in weights.items() if k not in covered_keys}
    stacked = sorted({_suffix(k) for k, p in left.items() if p.dim() == 3})
    if not total or not stacked or sum(p.numel() for p in left.values()) * 2 <= total:
        return None
    groups: dict[str, int] = {}
    for k, p in left.items():
        groups[_suffix(k)] = groups.get(_suffix(k), 0) + p.numel()
    shown = ", ".join(f"{s} ({n:,})" for s, n in sorted(groups.items(), key=lambda kv: -kv[1]))
    n_left = sum(p.numel() for p in left.values())
    return (f"svdadapt: the targets cover {total - n_left:,} of the {total:,} weights of the decoder blocks "
            f"({prefix}); {n_left:,} are left out: {shown}. MoE experts are parameters, not layers: add "
            f"target_parameters={stacked!r} to adapt them")
