"""A quantized base: targeted full-precision layers replaced by quantized layers holding a new base.

QPiSSA (and QMiLoRA / QCorDA) quantize the residual W − s·B₀·A₀; EoRA with ``quantize=`` quantizes W itself. The
original layers are replaced, not written into, so undoing it (the engine's restore) gives back the very modules
and weights the model had. ``SCHEMES`` is the one table of what ``quantize=`` takes: per scheme, the backend's own
quantizer building the layer (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, HQQ ``HQQLinear``, torchao
weight-only ``nn.Linear``), the package it needs and how the model is marked. A bitsandbytes model is marked the way
transformers marks a model it loaded quantized, so PEFT puts its bitsandbytes LoRA layers on top and
``save_pretrained`` writes an ordinary quantized checkpoint; PEFT picks its HQQ / torchao LoRA layers by the layer's
type, and a torchao model is marked as transformers marks one it loaded with a ``TorchAoConfig`` (where PEFT finds the
config it re-quantizes with on merge); HQQ needs no mark.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import bnb, qwrite
from .layers import kind_of, read_weight
from ..core.methods import finish, layer_scaling

__all__ = ["SCHEMES", "Scheme", "QuantOptions", "quantize_dequantize", "replace_with_quantized", "mark_quantized",
           "quantize_bases", "missing_package", "scheme"]


def _no_mark(model: nn.Module, scheme: str, quantized: set[str]) -> None:
    """PEFT dispatches its HQQ LoRA layer by the base layer's type and merges with the layer's own config."""


def _bnb_problem(name: str, out_f: int, in_f: int) -> str | None:
    problem = bnb.cpu_layout_problem(out_f, in_f)
    return None if problem is None else f"{problem} (bitsandbytes' CPU kernel fails on it)"


def _group_problem(group: int, name: str, out_f: int, in_f: int) -> str | None:
    return None if in_f % group == 0 else f"in_features={in_f} is not a multiple of the group size {group}"


@dataclass(frozen=True)
class Scheme:
    """One ``quantize=`` scheme. ``build(W (out, in), bias (out,) | None)``: a new CPU quantized layer, the
    backend's own quantizer (deterministic); ``package``: the package it needs (its import and pip name);
    ``require()``: that import or ImportError with the install hint; ``problem(name, out, in)``: why a shape
    cannot be quantized (None: it can); ``mark(model, scheme, quantized names)``: after the layers are replaced;
    ``fallback``: the scheme an error suggests for a shape this one refuses."""

    build: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]
    package: str
    require: Callable[[], Any]
    problem: Callable[[str, int, int], str | None] | None = None
    mark: Callable[[nn.Module, str, set[str]], None] = _no_mark
    fallback: str = "int8"


def _bnb_scheme(name: str) -> Scheme:
    return Scheme(partial(_bnb_build, scheme=name), "bitsandbytes", bnb.require_bnb,
                  None if name == "int8" else _bnb_problem, lambda m, s, q: mark_quantized(m, s, q))


def _bnb_build(W: torch.Tensor, bias: torch.Tensor | None, scheme: str) -> nn.Module:
    return bnb.quantize_linear(W, bias, scheme)


def _torchao_mark(name: str, model: nn.Module, scheme: str, quantized: set[str]) -> None:
    qwrite.mark_torchao(model, name, GROUP, quantized)


GROUP = 64  # the group size of the HQQ and torchao int4 schemes (bitsandbytes' 4-bit block size too)

_TABLE: dict[str, Scheme] = {
    **{name: _bnb_scheme(name) for name in bnb.SCHEMES},
    "hqq4": Scheme(partial(qwrite.hqq_linear, nbits=4, group_size=GROUP), "hqq",
                   partial(qwrite.require, "hqq.core.quantize", "hqq"), partial(_group_problem, GROUP),
                   fallback="torchao-int8"),
    "torchao-int4": Scheme(partial(qwrite.torchao_linear, name="int4", group_size=GROUP), "torchao",
                           partial(qwrite.require, "torchao.quantization", "torchao"),
                           partial(_group_problem, GROUP), mark=partial(_torchao_mark, "int4"),
                           fallback="torchao-int8"),
    "torchao-int8": Scheme(partial(qwrite.torchao_linear, name="int8", group_size=GROUP), "torchao",
                           partial(qwrite.require, "torchao.quantization", "torchao"),
                           mark=partial(_torchao_mark, "int8")),
}
SCHEMES = tuple(_TABLE)  # the schemes a quantized base can have (``quantize=``, the CLI's ``--quantize``)


def _check_name(name: str) -> None:
    if name not in _TABLE:
        raise ValueError(f"quantize must be one of {', '.join(SCHEMES)} or None, got {name!r}")


def scheme(name: str) -> Scheme:
    """The table's entry of scheme ``name``; ValueError listing the valid ones if there is none."""
    _check_name(name)
    return _TABLE[name]


def missing_package(name: str = "nf4") -> str | None:
    """The package scheme ``name`` needs if it is not installed (its pip name), else None; imports nothing."""
    entry = scheme(name)
    return entry.package if importlib.util.find_spec(entry.package) is None else None


@dataclass(frozen=True)
class QuantOptions:
    """``scheme``: a scheme of :data:`SCHEMES` ("nf4", "hqq4", "torchao-int8", …); ``iters``: alternating steps
    (1: none)."""

    scheme: str
    iters: int = 1

    def __post_init__(self) -> None:
        _check_name(self.scheme)
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"quant_iters must be an integer >= 1, got {self.iters!r}")
        _TABLE[self.scheme].require()

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Every target (name -> (out, in)) can be quantized with the scheme into a layer that runs on any machine;
        the error names the first that cannot."""
        entry = _TABLE[self.scheme]
        if entry.problem is None:
            return
        for name, (out_f, in_f) in shapes.items():
            problem = entry.problem(name, out_f, in_f)
            if problem is not None:
                raise ValueError(f"quantize={self.scheme!r} cannot quantize module {name!r} of weight ({out_f}, "
                                 f"{in_f}): {problem}; leave it out of the targets (exclude_modules=) or use "
                                 f"quantize={entry.fallback!r}")


@torch.no_grad()
def quantize_dequantize(W: torch.Tensor, scheme: str) -> torch.Tensor:
    """deq(Q(W)) (out, in) in fp32: what the layer of ``scheme`` built from ``W`` computes with, read through its
    layer kind (the backend's own dequantization; deterministic)."""
    layer = _TABLE[scheme].build(W.to(torch.float32), None)
    return kind_of(layer).read(layer).to(W.device, torch.float32)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def replace_with_quantized(model: nn.Module, bases: dict[str, torch.Tensor | None], scheme: str) -> None:
    """Replace each named layer by a quantized layer of ``scheme`` holding ``bases[name]`` (out, in), or the
    layer's own weight where that is None; the bias is kept."""
    for name, base in bases.items():
        old = model.get_submodule(name)
        if kind_of(old).packed:
            raise TypeError(f"module {name!r} is already quantized ({type(old).__name__})")
        W = read_weight(name, old) if base is None else base
        new = _TABLE[scheme].build(W, None if old.bias is None else old.bias.detach())
        _set_child(model, name, new.to(old.weight.device).train(old.training))


def mark_quantized(model: nn.Module, scheme: str, quantized: set[str]) -> None:
    """Mark ``model`` as transformers marks a model loaded with bitsandbytes: the ``is_loaded_in_*bit`` flag PEFT
    looks at, and (for a transformers model) a ``quantization_config`` whose skip list holds every other linear,
    so ``from_pretrained`` of the saved model quantizes exactly the layers quantized here."""
    setattr(model, "is_loaded_in_8bit" if scheme == "int8" else "is_loaded_in_4bit", True)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    from transformers import BitsAndBytesConfig

    skip = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    if scheme == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=skip)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=skip)
    config.quantization_config = qc


def config_scaling(config: Any, name: str) -> float:
    """The scaling PEFT gives module ``name`` under the ``LoraConfig`` ``config`` (``rank_pattern`` /
    ``alpha_pattern`` matched as ``LoraModel`` matches them)."""
    return layer_scaling(name, config.r, config.lora_alpha, config.use_rslora,
                         getattr(config, "rank_pattern", None) or {}, getattr(config, "alpha_pattern", None) or {})


@torch.no_grad()
def quantize_bases(model: nn.Module, config: Any, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   rewrite_base: bool, scheme: str, progress: bool) -> None:
    """Replace each target (the names of ``factors``: A₀ (r, in), B₀ (out, r)) by a quantized layer of ``scheme``
    holding W − s·B₀·A₀ if ``rewrite_base``, else W, computed in fp32, and mark the model quantized; ``config``
    is the ``LoraConfig`` (each layer's r and alpha, its patterns' or the config's, and rsLoRA give s).
    ``apply``'s quantized-base step."""
    for n in tqdm(factors, desc=f"svdadapt quantize bases ({scheme})", disable=not progress, unit="layer"):
        base = None
        if rewrite_base:
            W = read_weight(n, model.get_submodule(n))
            A, B = (t.to(W.device) for t in factors[n])
            base = finish(W, A, B, config_scaling(config, n), torch.float32)
        replace_with_quantized(model, {n: base}, scheme)
    _TABLE[scheme].mark(model, scheme, set(factors))
