"""Quantized backends other than bitsandbytes: read a packed layer's effective weight W_c through the backend's own
dequantization.

Each backend is three functions the layer-kind table (``layers.py``) builds a ``LayerKind`` from: ``is_*``
(whether a module is that backend's packed layer), ``*_shape`` ((out, in)) and ``*_read`` (W_c as an (out, in)
float tensor, a new tensor: the backend's own dequantization, never an unpacking written here):

- HQQ ``hqq.core.quantize.HQQLinear``: ``HQQLinear.dequantize()`` (what its PyTorch forward multiplies with);
- torchao weight-only tensor subclasses on ``nn.Linear`` (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``, … any
  ``TorchAOBaseTensor``): ``weight.dequantize()``;
- optimum-quanto ``QLinear``: ``qweight.dequantize()`` (frozen or not);
- compressed-tensors: an ``nn.Linear`` whose ``quantization_status`` is COMPRESSED (``weight_packed``,
  ``weight_scale``, …): the compressor of its format's own ``decompress`` on the module's state (the module is
  not changed); ``compressed_schemes`` and ``decompress_weight`` do the same from a checkpoint's tensors (the
  streamed EoRA of ``stream/quantized.py``).

A layer whose forward also quantizes its *input* (quanto activations, compressed-tensors input activations) is not
linear in its input: its read raises ``TypeError`` naming the module type.

Leaf module: imports torch only; a backend's package is looked up in ``sys.modules`` (a layer of it can exist only
if it was imported) and imported inside the read functions.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["is_hqq", "hqq_shape", "hqq_read", "is_torchao", "torchao_read", "is_quanto", "quanto_read",
           "is_compressed", "compressed_shape", "compressed_read", "compressed_format", "compressed_schemes",
           "decompress_weight", "decompress", "not_writable"]


def _weight_only(module: nn.Module, quantizes_input: bool) -> None:
    if quantizes_input:
        raise TypeError(f"a {type(module).__name__} that quantizes its input activations is not linear in its input; "
                        "svdadapt reads weight-only quantized layers only")


# ------------------------------------------------------------------------------------------------ HQQ

def is_hqq(m: nn.Module) -> bool:
    mod = sys.modules.get("hqq.core.quantize")
    return mod is not None and isinstance(m, mod.HQQLinear)


def hqq_shape(m: nn.Module) -> tuple[int, int]:
    return int(m.out_features), int(m.in_features)


@torch.no_grad()
def hqq_read(m: nn.Module) -> torch.Tensor:
    """W_c (out, in) in the layer's compute dtype: ``HQQLinear.dequantize``."""
    return m.dequantize().reshape(hqq_shape(m))


# ------------------------------------------------------------------------------------------------ torchao

def is_torchao(m: nn.Module) -> bool:
    mod = sys.modules.get("torchao.utils")
    return (mod is not None and isinstance(m, nn.Linear)
            and isinstance(getattr(m, "weight", None), mod.TorchAOBaseTensor))


@torch.no_grad()
def torchao_read(m: nn.Module) -> torch.Tensor:
    """W_c (out, in): the tensor subclass's own ``dequantize()``."""
    return m.weight.dequantize()


# ------------------------------------------------------------------------------------------------ optimum-quanto

def is_quanto(m: nn.Module) -> bool:
    mod = sys.modules.get("optimum.quanto.nn.qlinear")
    return mod is not None and isinstance(m, mod.QLinear)


@torch.no_grad()
def quanto_read(m: nn.Module) -> torch.Tensor:
    """W_c (out, in): ``QLinear.qweight.dequantize()`` (the quantized weight its forward uses, frozen or not)."""
    _weight_only(m, getattr(m, "activation_qtype", None) is not None)
    return m.qweight.dequantize()


# ------------------------------------------------------------------------------------------------ compressed-tensors

def is_compressed(m: nn.Module) -> bool:
    mod = sys.modules.get("compressed_tensors.quantization.quant_config")
    return (mod is not None and isinstance(m, nn.Linear) and hasattr(m, "quantization_scheme")
            and getattr(m, "quantization_status", None) == mod.QuantizationStatus.COMPRESSED)


def compressed_shape(m: nn.Module) -> tuple[int, int]:
    return int(m.out_features), int(m.in_features)


def _compressor(module_type: type, scheme) -> tuple[str, type]:
    """(format, compressor class) of a compressed-tensors scheme, the format found as ``decompress_module`` finds
    it: the scheme's own, else ``infer_module_format``."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format

    fmt = scheme.format or infer_module_format(module_type, scheme)
    fmt = getattr(fmt, "value", fmt)
    return fmt, BaseCompressor.get_value_from_registry(fmt)


def compressed_format(module_type: type, scheme) -> str:
    """The compressed-tensors format (``"pack-quantized"``, …) a module of ``module_type`` with ``scheme`` is
    stored in."""
    return _compressor(module_type, scheme)[0]


@torch.no_grad()
def decompress_weight(state: dict[str, torch.Tensor], scheme, module_type: type = nn.Linear) -> torch.Tensor:
    """W_c (out, in): the format's compressor's own ``decompress`` of one module's compressed state (its local
    names: ``weight_packed``, ``weight_scale``, ``weight_shape``, …; the state is not changed). Meta tensors give
    a meta W_c of the dtype the data would give."""
    return _compressor(module_type, scheme)[1].decompress(state, scheme)["weight"]


def compressed_schemes(model: nn.Module, quantization_config: dict) -> dict[str, object]:
    """module name -> compressed-tensors ``QuantizationScheme`` of every module that ``quantization_config`` (a
    checkpoint's config.json entry) quantizes, matched by the library's ``apply_quantization_config`` (what
    transformers runs on loading) on a copy of ``model`` (a meta-device skeleton will do; ``model`` is not
    changed)."""
    import copy

    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    config = QuantizationConfig.model_validate(quantization_config)
    marked = copy.deepcopy(model)
    apply_quantization_config(marked, config, show_progress=False)
    return {n: m.quantization_scheme for n, m in marked.named_modules()
            if getattr(m, "quantization_scheme", None) is not None}


@torch.no_grad()
def compressed_read(m: nn.Module) -> torch.Tensor:
    """W_c (out, in): the format's compressor's ``decompress`` of the module's own state dict (a copy: the module
    stays compressed), the format found as compressed-tensors' ``decompress_module`` finds it."""
    from compressed_tensors.utils.module import get_direct_state_dict

    scheme = m.quantization_scheme
    _weight_only(m, scheme.input_activations is not None)
    return decompress_weight(get_direct_state_dict(m), scheme, type(m))


def not_writable(m: nn.Module, base: torch.Tensor) -> None:
    """The write of a kind svdadapt reads but does not re-quantize (only EoRA, which keeps the base, runs on it)."""
    raise TypeError(f"svdadapt reads {type(m).__name__} layers but cannot write a new base into one")


@torch.no_grad()
def decompress(m: nn.Module) -> None:
    """Decompress a compressed-tensors layer in place with the library's ``decompress_module`` (what its model
    hook does to every layer on the model's first forward), its quantization cleared: PEFT's LoRA layer needs the
    float ``weight``, which is then W_c as :func:`compressed_read` gave it, and the model's decompression hook
    skips the layer (it would fail on a layer decompressed already)."""
    from compressed_tensors.compressors.base import decompress_module

    decompress_module(m, leave_decompressed=False)
