"""A quantized base: targeted full-precision layers replaced by bitsandbytes layers holding a new base.

QPiSSA (and QMiLoRA / QCorDA) quantize the residual W − s·B₀·A₀; EoRA with ``quantize=`` quantizes W itself. The
original layers are replaced, not written into, so undoing it (the engine's restore) gives back the very modules
and weights the model had. The model is then marked the way transformers marks a model it loaded quantized, so
PEFT puts its bitsandbytes LoRA layers on top and ``save_pretrained`` writes an ordinary quantized checkpoint.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import bnb
from .layers import kind_of, read_weight
from ..core.methods import finish, layer_scaling

__all__ = ["SCHEMES", "QuantOptions", "quantize_dequantize", "replace_with_quantized", "mark_quantized",
           "quantize_bases", "missing_package"]

SCHEMES = bnb.SCHEMES  # the schemes a quantized base can have (``quantize=``, the CLI's ``--quantize``)
PACKAGE = "bitsandbytes"  # what quantized bases need installed (its import and pip name)


def missing_package() -> str | None:
    """The package a quantized base needs if it is not installed (its pip name), else None; imports nothing."""
    return PACKAGE if importlib.util.find_spec(PACKAGE) is None else None


@dataclass(frozen=True)
class QuantOptions:
    """``scheme``: a bitsandbytes scheme ("nf4", "fp4", "int8"); ``iters``: alternating steps (1: none)."""

    scheme: str
    iters: int = 1

    def __post_init__(self) -> None:
        if self.scheme not in bnb.SCHEMES:
            raise ValueError(f"quantize must be one of {', '.join(bnb.SCHEMES)} or None, got {self.scheme!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"quant_iters must be an integer >= 1, got {self.iters!r}")
        bnb.require_bnb()

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Every target (name -> (out, in)) can be a 4-bit layer that runs on any machine; the error names the
        first that cannot (bitsandbytes' CPU kernel fails on its first eval forward). int8 takes any shape."""
        if self.scheme == "int8":
            return
        for name, (out_f, in_f) in shapes.items():
            problem = bnb.cpu_layout_problem(out_f, in_f)
            if problem is not None:
                raise ValueError(f"quantize={self.scheme!r} cannot quantize module {name!r} of weight ({out_f}, "
                                 f"{in_f}): {problem} (bitsandbytes' CPU kernel fails on it); leave it out of the "
                                 "targets (exclude_modules=) or use quantize='int8'")


@torch.no_grad()
def quantize_dequantize(W: torch.Tensor, scheme: str) -> torch.Tensor:
    """deq(Q(W)) (out, in) in fp32: what a bitsandbytes layer built from ``W`` computes with (deterministic)."""
    return bnb.dequantize(bnb.quantize_linear(W.to(torch.float32), None, scheme)).to(W.device)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def replace_with_quantized(model: nn.Module, bases: dict[str, torch.Tensor | None], scheme: str) -> None:
    """Replace each named layer by a bitsandbytes layer of ``scheme`` holding ``bases[name]`` (out, in), or the
    layer's own weight where that is None; the bias is kept."""
    for name, base in bases.items():
        old = model.get_submodule(name)
        if kind_of(old).packed:
            raise TypeError(f"module {name!r} is already quantized ({type(old).__name__})")
        W = read_weight(name, old) if base is None else base
        new = bnb.quantize_linear(W, None if old.bias is None else old.bias.detach(), scheme)
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
    """Replace each target (the names of ``factors``: A₀ (r, in), B₀ (out, r)) by a bitsandbytes layer of ``scheme``
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
    mark_quantized(model, scheme, set(factors))
