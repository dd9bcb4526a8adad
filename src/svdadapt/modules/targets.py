"""Which modules of a model are adapted: PEFT's matching rules over the layer kinds of ``layers.py``.

``target_modules`` / ``exclude_modules`` follow PEFT: a string is a full-match regex over module names, a list
matches exact names or dotted suffixes, ``"all-linear"`` is every adaptable layer except the output head.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .layers import KIND_NAMES, is_target_type, kind_names, kind_of

__all__ = ["resolve_targets", "matches", "output_head_names", "peft_target_list", "is_peft", "shared_weights",
           "shared_modules", "saved_modules"]

Selector = str | Iterable[str]


def matches(selector: Selector, name: str) -> bool:
    """PEFT's rules: a string is a full-match regex; a list matches exact names or dotted suffixes."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == t or name.endswith("." + t) for t in selector)


def _as_selector(selector: Selector) -> str | list[str]:
    return selector if isinstance(selector, str) else list(selector)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) that ``model.get_output_embeddings()`` returns (empty if it has none)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, m in model.named_modules() if m is head}


def _is_all_linear(selector: Selector) -> bool:
    return isinstance(selector, str) and selector.lower() == "all-linear"


def resolve_targets(model: nn.Module, target_modules: Selector = "all-linear",
                    exclude_modules: Selector | None = None) -> dict[str, nn.Module]:
    """The adaptable modules of ``model`` that ``target_modules`` selects and ``exclude_modules`` does not, by full
    module name, in ``named_modules()`` order.

    Adaptable means a layer kind of ``svdadapt.layers`` (``nn.Linear``, transformers ``Conv1D``, bitsandbytes
    linears, ``nn.Embedding``, ``nn.Conv1d`` / ``nn.Conv2d``; ``"all-linear"`` selects the linear kinds only, as
    PEFT's does). Raises ``ValueError`` if nothing matches.
    """
    layers = {n: m for n, m in model.named_modules() if n and is_target_type(m)}
    if _is_all_linear(target_modules):
        skip = output_head_names(model)
        found = {n: m for n, m in layers.items() if n not in skip and kind_of(m).linear}
    else:
        target_modules = _as_selector(target_modules)
        found = {n: m for n, m in layers.items() if matches(target_modules, n)}
    if exclude_modules is not None:
        exclude_modules = _as_selector(exclude_modules)
        found = {n: m for n, m in found.items() if not matches(exclude_modules, n)}
    if not _is_all_linear(target_modules):
        _refuse_parameters(model, target_modules, layers)
    if not found:
        _refuse_unreadable(model, target_modules, exclude_modules)
        raise ValueError(
            f"target_modules={target_modules!r}{'' if exclude_modules is None else f' minus exclude_modules={exclude_modules!r}'} "
            f"matched no adaptable layer ({KIND_NAMES}) in {type(model).__name__}; adaptable layers are: "
            f"{', '.join(list(layers)[:12])}{' ...' if len(layers) > 12 else ''}"
        )
    return found


def _refuse_unreadable(model: nn.Module, target_modules: Selector, exclude_modules: Selector | None) -> None:
    """The one-line error for a selected module no layer kind reads (a leaf, or a module with no adaptable layer
    inside): its name, its type, the kinds that exist and the probing fallback. A regex (a string) that also
    matches weightless modules (activations, dropout) is not asking for those: the "matched no" error speaks for it;
    a module named in a list, or one holding tensors of its own (a foreign quantized layer), gets this error."""
    if _is_all_linear(target_modules):
        return
    regex = isinstance(target_modules, str)
    for n, m in model.named_modules():
        if (n and matches(target_modules, n) and not (exclude_modules is not None and matches(exclude_modules, n))
                and not any(is_target_type(c) for c in m.modules()) and (not regex or _holds_tensors(m))):
            kind = type(m).__name__
            raise ValueError(f"module {n!r} is a {kind}, which no layer kind of svdadapt reads (kinds: "
                             f"{kind_names()}); if its forward is linear in its input: svdadapt.register_linear({kind})")


def _holds_tensors(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def _stacked_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(full name, parameter) of every parameter of 3 or more dimensions outside convolutions (whose kernels are
    3-D / 4-D weights of layers PEFT wraps as modules): stacked per-expert weights."""
    convs = (nn.modules.conv._ConvNd,)
    return [(f"{m_name}.{p_name}" if m_name else p_name, p) for m_name, m in model.named_modules()
            if not isinstance(m, convs) for p_name, p in m.named_parameters(recurse=False) if p.dim() >= 3]


def _refuse_parameters(model: nn.Module, selector: str | list[str], layers: dict[str, nn.Module]) -> None:
    """A selector (a regex, or one entry of a list) that matches no adaptable layer but names parameters of 3 or
    more dimensions (transformers 5's MoE experts: ``experts.gate_up_proj`` (E, 2·I, H), ``experts.down_proj``
    (E, H, I)) or the module holding them: ``ValueError`` saying that these are parameters."""
    for sel in [selector] if isinstance(selector, str) else [[t] for t in selector]:
        if any(matches(sel, n) for n in layers):
            continue
        hits = [(n, tuple(p.shape)) for n, p in _stacked_parameters(model)
                if matches(sel, n) or matches(sel, n.rpartition(".")[0])]
        if hits:
            shown = ", ".join(f"{n} {shape}" for n, shape in hits[:2]) + (" ..." if len(hits) > 2 else "")
            what = f"target_modules={sel!r}" if isinstance(selector, str) else f"target_modules entry {sel[0]!r}"
            raise ValueError(
                f"{what} matched no adaptable layer but {len(hits)} parameters of 3 or more dimensions in "
                f"{type(model).__name__} ({shown}; MoE expert weights), which are parameters, not layers: pass them as "
                f"target_parameters={_param_suffixes(n for n, _ in hits)!r} (PEFT's meaning; docs/experts.md)")


def _param_suffixes(keys: Iterable[str]) -> list[str]:
    """``<module>.<param>`` of each full parameter key, the module's last name only (``experts.down_proj``)."""
    return sorted({".".join(k.split(".")[-2:]) for k in keys})


def peft_target_list(model: nn.Module, names: list[str]) -> list[str] | str:
    """What to give PEFT's ``target_modules`` so that it selects exactly ``names``: the short suffixes
    (``q_proj`` ...) when they match no other module at all (containers included: PEFT refuses a match that is not
    a layer it can wrap), else a regex of the exact names (a list of full names would still match them as
    suffixes of other modules, e.g. ``1`` inside ``0.1``)."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen = {n for n, _ in model.named_modules() if n and matches(suffixes, n)}
    return suffixes if chosen == set(names) else "|".join(re.escape(n) for n in sorted(names))


# the heads PEFT itself adds to modules_to_save for these task types (PeftModelFor<Task>.__init__)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def saved_modules(task_type: str | None, modules_to_save: Iterable[str] | None) -> list[str]:
    """The modules PEFT trains and saves whole for this task type (it never puts LoRA on them)."""
    return [*(modules_to_save or ()), *_TASK_HEADS.get(str(task_type), ())]


def is_peft(model: nn.Module) -> bool:
    """True for a ``PeftModel`` or a model that already holds PEFT tuner layers."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules())


def shared_weights(model: nn.Module, names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs (target, other module) whose weight is the same tensor storage: a tied output head and input embedding,
    or one Parameter used by two layers. Rewriting one of them would silently rewrite the other. On the meta
    device (a skeleton, no storage) tied weights are the same Parameter object."""
    def key(w: object) -> tuple[str, int, int] | None:
        if isinstance(w, torch.Tensor) and w.device.type == "meta":
            return ("meta", id(w), 0)
        if not isinstance(w, torch.Tensor) or not w.numel():
            return None
        return (str(w.device), w.untyped_storage().data_ptr(), w.storage_offset())

    owners: dict[tuple[str, int, int], list[str]] = {}
    for n, m in model.named_modules():
        k = key(getattr(m, "weight", None))
        if k is not None:
            owners.setdefault(k, []).append(n)
    modules = dict(model.named_modules())
    pairs, seen = [], set()
    for n in names:
        for other in owners.get(key(modules[n].weight), []):
            if other != n and (other, n) not in seen:
                pairs.append((n, other))
                seen.add((n, other))
    return pairs


def shared_modules(model: nn.Module, names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs (target, another place holding the same module object): one module used in two places (two parents, or
    two attributes of one parent). ``named_modules()`` names such a module once, and PEFT replaces it in that place
    only: the other place would keep the bare layer, whose weight a method may rewrite. A parent reachable under two
    names (an alias of a whole submodule) is one place: replacing its child changes both paths."""
    places: dict[int, dict[tuple[int, str], str]] = {}  # id(module) -> (id(parent), attribute) -> full name
    for prefix, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), {}).setdefault((id(parent), attr), f"{prefix}.{attr}" if prefix else attr)
    modules = dict(model.named_modules())
    pairs = []
    for n in names:
        others = [p for p in places.get(id(modules[n]), {}).values() if p != n]
        if others:
            pairs.append((n, others[0]))
    return pairs
