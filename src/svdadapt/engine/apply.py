"""Apply a plan: build the PEFT model and write the factors in.

``apply`` builds the PEFT model and writes the plan in: the LoRA factors, and for methods that rewrite the base,
``W − s·B₀·A₀`` (``methods.finish``, a deterministic function of W and the rounded factors, computed one layer at a
time so the plan never holds a second copy of the model), then runs each base layer's kind's ``after_wrap`` hook
(``layers.after_wrap``). If anything fails there, the model's module tree, attributes and trainable flags are
restored as they were.

The same ``apply`` serves ``wrap`` (factors from a plan, ``plan.py``), ``load`` (factors read from a directory) and
the ``load_adapter`` guard (``write_factors`` alone).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modules.layers import after_wrap, before_wrap, compute_dtype, kind_of, read_weight
from ..modules.layouts import as_matrices, has_lora, lora_params
from ..core.methods import finish
from ..modules.qbase import quantize_bases
from ..core.record import ADAPTER

__all__ = ["apply", "write_factors"]


class _Snapshot:
    """Enough of a model's state to undo ``get_peft_model``: every module's attributes and children, every
    parameter's trainable flag."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, dict(m.__dict__), dict(m._modules), dict(m._parameters)) for m in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        config = getattr(model, "config", None)
        self.config = None if config is None or not hasattr(config, "__dict__") else (config, dict(config.__dict__))

    def restore(self) -> None:
        if self.config is not None:
            self.config[0].__dict__.clear()
            self.config[0].__dict__.update(self.config[1])
        for m, attrs, children, params in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._modules.clear()
            m._modules.update(children)
            m._parameters.clear()
            m._parameters.update(params)
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _lora_layers(peft_model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    modules = dict(peft_model.base_model.model.named_modules())
    out = {}
    for n in names:
        layer = modules.get(n)
        if layer is None or not has_lora(layer, ADAPTER):
            raise TypeError(f"PEFT did not put a LoRA layer on module {n!r} (got {type(layer).__name__})")
        out[n] = layer
    return out


def _check_shapes(layers: Mapping[str, nn.Module], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for n, layer in layers.items():
        A, B = factors[n]
        lora_A, lora_B = as_matrices(*lora_params(layer, ADAPTER))  # a conv's kernels, an embedding's parameters
        if A.shape != lora_A.shape or B.shape != lora_B.shape:
            raise ValueError(f"factors of {n!r} have shapes {tuple(A.shape)}, {tuple(B.shape)}; its LoRA layer has "
                             f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
        if A.dtype != lora_A.dtype:
            raise TypeError(f"factors of {n!r} are {A.dtype}, its LoRA layer is {lora_A.dtype}")


@torch.no_grad()
def write_factors(peft_model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy (A (r, in), B (out, r)) into each named module's LoRA layer, in its kind's layout (``layouts.py``: a
    conv's (r, in, *k) / (out, r, 1, ...) kernels, an embedding's parameters); shapes and dtypes checked first."""
    layers = _lora_layers(peft_model, factors)
    _check_shapes(layers, factors)
    for n, layer in layers.items():
        for param, value in zip(lora_params(layer, ADAPTER), factors[n]):
            param.data.copy_(value.reshape(param.shape))


def _in_place(base: nn.Module, W: torch.Tensor) -> bool:
    """Whether the new base can be computed into the stored weight itself: ``W`` (as ``read_weight`` gave it) is
    that tensor, contiguous (out, in), already in its compute dtype (an fp32 / fp64 ``nn.Linear``)."""
    weight = getattr(base, "weight", None)
    return (isinstance(weight, torch.Tensor) and W.data_ptr() == weight.data_ptr() and W.shape == weight.shape
            and W.is_contiguous() and W.dtype == compute_dtype(W.dtype) == weight.dtype and W.device == weight.device)


@torch.no_grad()
def _write_bases(layers: Mapping[str, nn.Module], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 progress: bool) -> None:
    """base ← W − s·B₀·A₀ for each layer, from the rounded factors (exactness at init, DESIGN.md). An fp32 / fp64
    ``nn.Linear`` is updated in place (``addmm_``: the same product and rounding as ``methods.finish``'s
    ``addmm``, without a W-sized temporary and its copy back); other layers through ``finish`` and their kind's
    ``write``."""
    for n, layer in tqdm(layers.items(), desc="svdadapt write bases", disable=not progress, unit="layer"):
        base = layer.get_base_layer()
        kind = kind_of(base)
        W = read_weight(n, base)
        A, B = (t.to(W.device) for t in factors[n])
        scaling = float(layer.scaling[ADAPTER])
        if _in_place(base, W):
            W.addmm_(B.to(W.dtype), A.to(W.dtype), alpha=-scaling)
            continue
        new_base = finish(W, A, B, scaling, kind.storage_dtype(base))
        del W
        kind.write(base, new_base)


def _lora_layers_in(peft_model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in peft_model.base_model.model.named_modules()
            if has_lora(m, ADAPTER)}


def _build(model: nn.Module, config: Any, factors: Mapping[str, Any]) -> nn.Module:
    """``get_peft_model(model, config)`` without PEFT's random init of the LoRA factors that ``factors`` overwrite
    next (``init_lora_weights=False`` while it builds; the config keeps its own value, so the saved adapter config
    says what it said). A LoRA layer ``factors`` does not name gets PEFT's init of ``config``, as before."""
    from peft import get_peft_model

    init = config.init_lora_weights
    with torch.random.fork_rng(devices=[]):  # PEFT's layers draw from the global RNG; ours overwrite them
        config.init_lora_weights = False
        try:
            with warnings.catch_warnings():
                if config.target_parameters:  # PEFT 0.21 applies a pattern key to a parameter target (matched by
                    # its key), then warns it "matched no targeted module" as it checks modules only; every key
                    # was checked here to match a target (engine/experts.check_param_ranks)
                    warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not "
                                            "match any targeted module", category=RuntimeWarning)
                peft_model = get_peft_model(model, config)
        finally:
            config.init_lora_weights = init
        for n, layer in _lora_layers_in(peft_model).items():
            if n not in factors:
                layer.reset_lora_parameters(ADAPTER, init)
    return peft_model


@torch.no_grad()
def apply(model: nn.Module, config: Any, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
          rewrite_base: bool, quantize: str | None = None, progress: bool = False, params: Any = None) -> nn.Module:
    """``get_peft_model(model, config)`` with each named layer's LoRA factors set to ``factors`` and, if
    ``rewrite_base``, its base weight to W − s·B₀·A₀. With ``quantize`` (a scheme of ``qbase.SCHEMES``) the
    targets are first replaced by quantized layers holding that base (or W) (``qbase.quantize_bases``). On any failure
    the model is restored (module tree, attributes, config, trainable flags) and the error re-raised. Then each
    base layer's kind's ``after_wrap`` hook runs. ``params`` (``experts.ParamApply``, for ``target_parameters``):
    its ``check`` runs with the other checks, its ``write`` after the layers'. Returns the ``peft.PeftModel``."""
    snapshot = _Snapshot(model)
    try:
        if quantize is not None:
            quantize_bases(model, config, factors, rewrite_base, quantize, progress)
            rewrite_base = False
        before_wrap(model.get_submodule(n) for n in factors)  # the kinds' hook, e.g. compressed-tensors decompressed
        peft_model = _build(model, config, factors)
        layers = _lora_layers(peft_model, factors)
        _check_shapes(layers, factors)  # every check before the first weight is written
        if params is not None:
            params.check(peft_model)
    except Exception:
        snapshot.restore()
        raise
    if rewrite_base:
        _write_bases(layers, factors, progress)
    write_factors(peft_model, factors)
    if params is not None:
        params.write(peft_model)
    after_wrap(layer.get_base_layer() for layer in layers.values())
    return peft_model
