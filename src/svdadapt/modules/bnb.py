"""bitsandbytes primitives: read a 4-bit / 8-bit layer's weight as a float matrix, quantize a new one.

A leaf module: it imports torch only, and bitsandbytes lazily inside the functions that need it, so that
svdadapt imports without bitsandbytes installed.

The CPU repacking trap (bitsandbytes 0.50): on a CPU with AVX512-BF16, the first forward of a
``Linear4bit`` in eval mode with an input that does not require grad rewrites the layer in place into a
gemv-friendly layout (``weight.quant_state.packing_format_for_cpu = True``): the nibbles are interleaved in
32-row tiles, ``weight.data`` becomes (out, in/2), the per-block scales ``absmax`` become a transposed
(in/blocksize, out) bf16 matrix and nested (double-quantized) scales are expanded. ``dequantize_4bit`` and
PEFT's ``dequantize_module_weight`` then silently return garbage (relative error ~1.4), and bitsandbytes' own
inverse ``_convert_weight_packed_for_cpu_inverse`` leaves the scales transposed when they were not nested
(relative error ~0.25 once in_features > blocksize). ``Linear4bit._save_to_state_dict`` runs that inverse
on the layer itself, so saving after an eval forward corrupts both the layer and the checkpoint.
:func:`dequantize` undoes the nibble layout with that inverse and reorders the scales itself;
:func:`restore_layout` does the same in place (call it before saving) and repairs layers already corrupted.

The repacking rounds the scales to bf16, which cannot be undone: a layer quantized with fp32 scales reads
back after its first eval forward up to 2**-9 (relative, per block) away from before. Layers built here
(:func:`quantize_linear`, :func:`write_quantized`) store scales already rounded to bf16 (``bf16_scales``) and
without double quantization by default, so for them the repacking is lossless and :func:`dequantize` is the
same bit for bit before and after any forward.
"""

from __future__ import annotations

import copy
import sys
from types import ModuleType

import torch
from torch import nn

__all__ = [
    "SCHEMES",
    "BLOCKSIZE",
    "cpu_layout_problem",
    "require_bnb",
    "is_bnb_layer",
    "is_cpu_packed",
    "scheme_of",
    "dequantize",
    "restore_layout",
    "restore_layouts",
    "guard_training",
    "quantize_linear",
    "write_quantized",
]

SCHEMES = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # the 4-bit block size of the layers built here (bitsandbytes' default)
CPU_ROW_TILE = 32  # bitsandbytes' CPU repacking interleaves the rows of a 4-bit layer in tiles of this many

_INSTALL_HINT = "quantize= needs bitsandbytes: pip install bitsandbytes"


def require_bnb() -> ModuleType:
    """The ``bitsandbytes`` module, or ImportError with a one-line install hint."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return bitsandbytes


def is_bnb_layer(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (subclasses included).

    Never imports bitsandbytes: if it is not imported yet, no module can be one of its layers.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _check_layer(module: nn.Module) -> None:
    if not is_bnb_layer(module):
        raise TypeError(f"expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(module).__name__}")


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, sys.modules["bitsandbytes"].nn.Linear4bit)


def is_cpu_packed(module: nn.Module) -> bool:
    """True if a ``Linear4bit``'s weight was repacked into bitsandbytes' CPU (AVX512-BF16) layout."""
    qs = getattr(module.weight, "quant_state", None)
    return bool(qs is not None and getattr(qs, "packing_format_for_cpu", False))


def scheme_of(module: nn.Module) -> str:
    """The layer's scheme: ``"nf4"``, ``"fp4"`` or ``"int8"``."""
    _check_layer(module)
    if _is_4bit(module):
        qs = module.weight.quant_state
        return qs.quant_type if qs is not None else module.weight.quant_type
    return "int8"


def cpu_layout_problem(out_features: int, in_features: int, blocksize: int = BLOCKSIZE) -> str | None:
    """Why a 4-bit layer of this shape cannot run an eval forward on a CPU with AVX512-BF16 (bitsandbytes 0.50
    repacks it first, which needs in_features a multiple of ``blocksize``, every block inside one row, and
    out_features a multiple of :data:`CPU_ROW_TILE`), or None if it can."""
    if in_features % blocksize:
        return f"in_features={in_features} is not a multiple of the 4-bit block size {blocksize}"
    if out_features % CPU_ROW_TILE:
        return f"out_features={out_features} is not a multiple of {CPU_ROW_TILE}, the row tile of the CPU layout"
    return None


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")


def _check_weight(weight: torch.Tensor, shape: tuple[int, int] | None = None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {weight.dtype}")
    if shape is not None and tuple(weight.shape) != tuple(shape):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the layer's {tuple(shape)}")


# --------------------------------------------------------------------------------------------- reading


def _canonical_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """Non-nested scales in bitsandbytes' canonical order: (out * in / blocksize,), block-major by row.

    A 2-D absmax is the CPU layout (in / blocksize, out), or what bitsandbytes' inverse leaves of it (it
    forgets to transpose non-nested scales back); ``quantize_4bit`` itself only ever makes 1-D scales.
    """
    return absmax.T.reshape(-1) if absmax.dim() == 2 else absmax


def _unpack_cpu(data: torch.Tensor, qs, keep_nested: bool):
    """Undo CPU repacking: canonical packed codes and their QuantState (``qs`` is modified in place).

    ``keep_nested``: re-quantize the scales of a layer that had nested ones, as bitsandbytes does (lossy);
    otherwise they stay non-nested, exact.
    """
    F = sys.modules["bitsandbytes"].functional
    absmax = qs.absmax  # (in / blocksize, out) bf16
    nested = keep_nested and qs.original_nested
    qs.original_nested = nested
    data, qs = F._convert_weight_packed_for_cpu_inverse(data, qs)
    if not nested:
        qs.absmax = _canonical_absmax(absmax).float()  # bf16 -> fp32 is exact
        qs.nested, qs.state2, qs.offset = False, None, None
    return data, qs


def _dequantize_4bit(module: nn.Module) -> torch.Tensor:
    F = sys.modules["bitsandbytes"].functional
    w = module.weight
    if w.quant_state is None:
        raise ValueError(f"{type(module).__name__} is not quantized yet (weight.quant_state is None)")
    # a shallow copy: the layer's own state is never touched
    qs = copy.copy(w.quant_state)
    data = w.data
    if getattr(qs, "packing_format_for_cpu", False):
        data, qs = _unpack_cpu(data, qs, keep_nested=False)
    elif not qs.nested:
        qs.absmax = _canonical_absmax(qs.absmax)
    qs.dtype = torch.float32  # codes * absmax rounded once, whatever dtype the layer dequantizes to
    return F.dequantize_4bit(data, qs)


def _restore_before_training(module: nn.Module, args: tuple) -> None:
    if torch.is_grad_enabled() and is_cpu_packed(module):
        restore_layout(module)


def guard_training(module: nn.Module) -> None:
    """Make training forwards of a 4-bit layer correct after eval forwards: bitsandbytes 0.50 runs a CPU-repacked
    layer through ``gemv_4bit``, which has no autograd kernel (wrong gradients, measured 94% off); a forward pre-hook
    puts the layer back into the canonical layout whenever gradients are enabled. Eval forwards keep the fast
    repacked kernel. Idempotent."""
    if _is_4bit(module) and not getattr(module, "_svdadapt_guarded", False):
        module.register_forward_pre_hook(_restore_before_training)
        module._svdadapt_guarded = True


def restore_layouts(model: nn.Module) -> int:
    """:func:`restore_layout` on every bitsandbytes layer of ``model``; how many changed. Call it before anything
    reads the model's state dict (saving, PEFT's merge)."""
    return sum(restore_layout(m) for m in model.modules() if is_bnb_layer(m))


@torch.no_grad()
def restore_layout(module: nn.Module) -> bool:
    """Put a ``Linear4bit`` back into bitsandbytes' canonical layout, in place; True if anything changed.

    Undoes CPU repacking (scales stay the bf16 values the layer computed with) and repairs the transposed
    non-nested scales that bitsandbytes' own inverse leaves behind, e.g. in a layer whose state dict was
    saved after an eval forward on CPU, or in a model reloaded from such a checkpoint. Call it on every
    4-bit layer before saving a state dict: bitsandbytes 0.50 saves corrupted scales otherwise (for layers
    with in_features > blocksize). Nested scales are re-quantized as bitsandbytes does (not bit-exact).
    No-op for ``Linear8bitLt`` and for layers already canonical. The next eval forward on CPU repacks again.
    """
    _check_layer(module)
    if not _is_4bit(module) or module.weight.quant_state is None:
        return False
    w = module.weight
    qs = w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        w.data, qs = _unpack_cpu(w.data, qs, keep_nested=True)
    elif not qs.nested and qs.absmax.dim() == 2:
        qs.absmax = _canonical_absmax(qs.absmax).float()
    else:
        return False
    w.quant_state = qs
    module.quant_state = qs
    return True


def _int8_scales(module: nn.Module) -> torch.Tensor | None:
    # SCB lives on weight until the first forward, which moves it to module.state (weight.SCB = None)
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def _dequantize_int8(module: nn.Module) -> torch.Tensor:
    w = module.weight
    if w.data.dtype != torch.int8:  # has_fp16_weights=True, or not quantized yet: a plain float weight
        return w.data.float()
    scb = _int8_scales(module)
    if scb is None:
        raise ValueError("Linear8bitLt holds int8 data but no row scales (weight.SCB and state.SCB are None)")
    return sys.modules["bitsandbytes"].functional.int8_vectorwise_dequant(w.data, scb).float()


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` as a new fp32 (out, in) tensor.

    Correct whether or not the layer ran forward passes (4-bit: CPU repacking, see the module docstring;
    8-bit: row scales moved from ``weight.SCB`` to ``state.SCB``). Does not modify the layer. The result is
    on the layer's device and is the exact product code * scale in fp32, also when the layer's own
    dequantization dtype (``quant_state.dtype``) is bf16 or fp16.
    """
    _check_layer(module)
    return _dequantize_4bit(module) if _is_4bit(module) else _dequantize_int8(module)


# --------------------------------------------------------------------------------------------- writing


def _quantize_4bit(
    weight: torch.Tensor,
    quant_type: str,
    blocksize: int,
    compress_statistics: bool,
    quant_storage: torch.dtype,
    bf16_scales: bool,
    dtype: torch.dtype,
):
    """Packed codes ((out * in / 2) / itemsize, 1) and QuantState of ``weight`` (out, in), quantized from fp32."""
    F = require_bnb().functional
    data, qs = F.quantize_4bit(
        weight.detach().float().contiguous(),
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
    )
    if bf16_scales and not qs.nested:
        # bf16 scales survive CPU repacking bit for bit; the change is at most 2**-9 of each block's scale
        qs.absmax = qs.absmax.to(torch.bfloat16).float()
    qs.dtype = dtype  # what bitsandbytes dequantizes to in forward; codes and scales do not depend on it
    return data, qs


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 codes (out, in) and scales (out,) of ``weight``, through fp16 as ``Int8Params`` does."""
    F = require_bnb().functional
    cb, scb, _ = F.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
    return cb, scb


@torch.no_grad()
def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str,
    *,
    compute_dtype: torch.dtype = torch.float32,
    quant_storage: torch.dtype = torch.uint8,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    bf16_scales: bool = True,
) -> nn.Module:
    """A new CPU bitsandbytes layer holding ``weight`` (out, in) quantized with ``scheme``, and ``bias`` (out,).

    ``"nf4"`` / ``"fp4"``: a ``Linear4bit`` (blocksize default 64; ``compress_statistics`` double-quantizes
    the scales, as ``bnb_4bit_use_double_quant``; ``bf16_scales`` rounds the scales to bf16, see the module
    docstring). ``"int8"``: a ``Linear8bitLt`` with ``has_fp16_weights=False`` and threshold 0 (row-wise
    absmax int8 of the weight rounded to fp16; ``compute_dtype``, ``quant_storage``, ``blocksize`` unused).
    The bias is stored in ``compute_dtype`` (4-bit) or fp32 (int8). Deterministic.
    """
    _check_scheme(scheme)
    _check_weight(weight)
    bnb = require_bnb()
    out_f, in_f = weight.shape
    has_bias = bias is not None
    if has_bias and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match the weight's out features {out_f}")

    # built on the meta device: no random init of a weight that is replaced right away
    if scheme == "int8":
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=0.0,
                                    device="meta")
        cb, scb = _quantize_int8(weight.cpu())
        layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        bias_dtype = torch.float32
    else:
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=compress_statistics, quant_type=scheme,
                                  quant_storage=quant_storage, device="meta")
        bs = BLOCKSIZE if blocksize is None else blocksize
        data, qs = _quantize_4bit(weight.cpu(), scheme, bs, compress_statistics, quant_storage, bf16_scales,
                                  compute_dtype)
        _set_4bit(layer, data, qs, bs, compress_statistics, scheme, quant_storage)
        bias_dtype = compute_dtype
    if has_bias:
        layer.bias = nn.Parameter(bias.detach().to("cpu", bias_dtype).clone(), requires_grad=False)
    return layer


def _set_4bit(layer, data, qs, blocksize, compress_statistics, quant_type, quant_storage) -> None:
    bnb = sys.modules["bitsandbytes"]
    layer.weight = bnb.nn.Params4bit(
        data, requires_grad=False, quant_state=qs, blocksize=blocksize, compress_statistics=compress_statistics,
        quant_type=quant_type, quant_storage=quant_storage, module=layer, bnb_quantized=True,
    )
    layer.quant_state = qs


@torch.no_grad()
def write_quantized(module: nn.Module, weight: torch.Tensor, *, bf16_scales: bool = True) -> None:
    """Quantize ``weight`` (out, in) into the existing bitsandbytes layer ``module``, in place.

    Keeps the layer's scheme, blocksize, double quantization, storage dtype, dequantization dtype, device,
    bias and (8-bit) outlier threshold. Afterwards the layer is in bitsandbytes' canonical (not CPU-packed)
    layout, forward and :func:`dequantize` read the new weight, and on CPU ``dequantize(module)`` equals
    ``dequantize(quantize_linear(weight, None, scheme_of(module), blocksize=..., compress_statistics=...))``
    bit for bit. ``bf16_scales``: as in :func:`quantize_linear`.
    """
    _check_layer(module)
    _check_weight(weight, (module.out_features, module.in_features))
    bnb = sys.modules["bitsandbytes"]
    device = module.weight.device
    if _is_4bit(module):
        old = module.weight
        qs = old.quant_state
        if qs is None:
            raise ValueError(f"{type(module).__name__} is not quantized yet (weight.quant_state is None)")
        packed = getattr(qs, "packing_format_for_cpu", False)
        nested = qs.original_nested if packed else qs.nested
        dtype = qs.original_dtype if packed else qs.dtype
        storage = getattr(qs, "original_storage_type", None) if packed else None
        storage = storage or old.data.dtype
        data, new_qs = _quantize_4bit(weight.to(device), qs.quant_type, qs.blocksize, nested, storage,
                                      bf16_scales, dtype)
        _set_4bit(module, data, new_qs, qs.blocksize, nested, qs.quant_type, storage)
    else:
        if not isinstance(module.weight, bnb.nn.Int8Params) or module.state.has_fp16_weights:
            raise ValueError("write_quantized needs a Linear8bitLt with has_fp16_weights=False")
        cb, scb = _quantize_int8(weight.to(device))
        module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        # drop what the previous weight left in the matmul state; the next forward moves CB / SCB there
        for name in ("CB", "SCB", "SB", "CBt", "SBt", "subB", "idx"):
            setattr(module.state, name, None)
