"""New quantized layers of backends other than bitsandbytes, built with each backend's own quantizer.

What QPiSSA on an HQQ or torchao base writes: a full-precision (out, in) matrix (the residual W − s·B·A, or W)
becomes that backend's packed layer, which ``backends.py`` then reads back and PEFT's LoRA layer of that backend
(``HqqLoraLinear``, ``TorchaoLoraLinear``) wraps:

- HQQ: ``HQQLinear`` of a CPU ``nn.Linear`` with ``BaseQuantizeConfig(nbits, group_size)`` (HQQ's half-quadratic
  optimizer, deterministic), compute dtype fp32;
- torchao: ``torchao.quantization.quantize_`` of a CPU ``nn.Linear`` with a weight-only config
  (``Int8WeightOnlyConfig``: per-row int8; ``IntxWeightOnlyConfig(int4, PerGroup(g))``: int4 in groups, both run on
  CPU in torchao 0.18; ``Int4WeightOnlyConfig`` needs a GPU kernel package there).

Leaf module: imports torch only, each backend lazily inside the function that needs it; a missing backend raises
``ImportError`` naming the svdadapt extra that installs it.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

__all__ = ["require", "hqq_linear", "torchao_linear", "torchao_config", "mark_torchao"]


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or ImportError with the pip extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"quantize= with this scheme needs {extra}: pip install \"svdadapt[{extra}]\"") from e


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A CPU fp32 ``nn.Linear`` holding ``weight`` (out, in) and ``bias`` (out,), built on meta (no random init)."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().to("cpu", torch.float32).clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", torch.float32).clone(), requires_grad=False)
    return layer


@torch.no_grad()
def hqq_linear(weight: torch.Tensor, bias: torch.Tensor | None, nbits: int, group_size: int) -> nn.Module:
    """An ``HQQLinear`` (CPU, compute dtype fp32) of ``weight`` (out, in) quantized by HQQ to ``nbits`` in groups of
    ``group_size`` along the input, and ``bias`` (out,). Deterministic."""
    quantize = require("hqq.core.quantize", "hqq")
    config = quantize.BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    layer = quantize.HQQLinear(_float_linear(weight, bias), quant_config=config, compute_dtype=torch.float32,
                               device="cpu", del_orig=True)
    return layer.requires_grad_(False)


def torchao_config(name: str, group_size: int):
    """torchao's weight-only config of ``name`` ("int8": per row; "int4": groups of ``group_size``)."""
    quantization = require("torchao.quantization", "torchao")
    if name == "int8":
        return quantization.Int8WeightOnlyConfig()
    from torchao.quantization.granularity import PerGroup

    return quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


@torch.no_grad()
def torchao_linear(weight: torch.Tensor, bias: torch.Tensor | None, name: str, group_size: int) -> nn.Module:
    """An ``nn.Linear`` (CPU) whose weight is torchao's weight-only tensor of ``weight`` (out, in): ``name`` "int8"
    (per row) or "int4" (groups of ``group_size``), quantized by ``torchao.quantization.quantize_``; ``bias``
    (out,) stays fp32. Deterministic."""
    config = torchao_config(name, group_size)
    layer = _float_linear(weight, bias)
    sys_quantize = require("torchao.quantization", "torchao").quantize_
    sys_quantize(layer, config)
    return layer.requires_grad_(False)


class _ApplyConfig:
    """The one method of a ``TorchAoConfig`` PEFT calls, for a model that is not a transformers one."""

    def __init__(self, quant_type) -> None:
        self.quant_type = quant_type

    def get_apply_tensor_subclass(self):
        return self.quant_type


def _quantizer(qc):
    """transformers' own torchao quantizer of ``qc`` where qc is a ``TorchAoConfig``, else a holder of ``qc``."""
    if isinstance(qc, _ApplyConfig):
        return type("TorchaoMark", (), {"quantization_config": qc})()
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    return TorchAoHfQuantizer(qc)


def mark_torchao(model: nn.Module, name: str, group_size: int, quantized: set[str]) -> None:
    """Mark ``model`` as transformers marks a model it loaded with a ``TorchAoConfig`` of the same config: for a
    transformers model ``config.quantization_config`` (a ``TorchAoConfig`` whose ``modules_to_not_convert`` holds
    every other linear) and ``hf_quantizer`` (transformers' ``TorchAoHfQuantizer``), where PEFT finds
    ``get_apply_tensor_subclass`` (without it PEFT's ``TorchaoLoraLinear`` cannot merge, which re-quantizes)."""
    skip = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    quant_type = torchao_config(name, group_size)
    config = getattr(model, "config", None)
    qc = _ApplyConfig(quant_type)
    if config is not None and hasattr(config, "to_dict"):
        from transformers import TorchAoConfig

        qc = TorchAoConfig(quant_type=quant_type, modules_to_not_convert=skip)
        config.quantization_config = qc
    model.hf_quantizer = _quantizer(qc)
