"""Layer kinds: how svdadapt reads a layer's weight as a float (out, in) matrix and writes a new base back.

One table keyed by layer type. Everything that touches a targeted layer's weight goes through its entry, so a new
layer type is one entry here, not a branch elsewhere:

- ``torch.nn.Linear``: weight (out, in), read and written as it is;
- transformers ``Conv1D`` (GPT-2 family): weight stored transposed, (in, out) — PEFT's ``fan_in_fan_out``;
- bitsandbytes ``Linear4bit`` / ``Linear8bitLt``: read by dequantizing, written by quantizing (``bnb.py``); its
  hooks guard training forwards after wrapping and restore the canonical storage layout before a save;
- ``torch.nn.Embedding`` (read as weightᵀ) and ``torch.nn.Conv1d`` / ``nn.Conv2d`` (the kernel as (out, in·∏k)):
  ``conv.py``; not selected by ``"all-linear"``.
- HQQ ``HQQLinear``, torchao weight-only tensor subclasses, optimum-quanto ``QLinear``, compressed-tensors
  compressed Linears: read through each backend's own dequantization (``backends.py``), not written;
- kinds registered at run time (:func:`register_kind`; ``probe.register_linear``: any module whose forward is
  linear, read by probing it) come before the table.

The hooks are what the rest of the package calls instead of naming a backend: :func:`after_wrap` (``apply``, on
each base layer once PEFT wrapped it) and :func:`before_save` (the lifecycle and the CLI, on a whole model before
anything reads its state dict).

Leaf module: imports torch and ``bnb`` (which imports bitsandbytes only when asked); transformers only if the
model already did.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import backends, bnb, conv
from ..core.record import checksum_matches, scan_weight, weight_checksum

__all__ = ["LayerKind", "LAYER_KINDS", "kind_of", "is_target_type", "read_weight", "float_weight", "compute_dtype",
           "layer_checksum", "layer_matches", "scan_layer", "before_wrap", "after_wrap", "before_save", "register_kind", "unregister_kind",
           "kind_names"]


@dataclass(frozen=True)
class LayerKind:
    """How to handle one layer type.

    ``read(module)`` gives the weight as a floating (out, in) tensor (a view where the layout allows: callers
    must not write into it); ``write(module, base)`` stores a new base given as (out, in) in ``storage_dtype``;
    ``storage_dtype(module)`` is the dtype a new base is rounded to before ``write``.

    Hooks (None: nothing to do): ``before_wrap(module)`` runs on a target just before PEFT wraps it (e.g. a
    compressed-tensors layer decompressed, as its library does on a first forward); ``after_wrap(module)`` runs on a base layer once PEFT put a LoRA layer on it;
    ``before_save(module)`` runs before anything reads the layer's state dict (saving, PEFT's merge) and returns
    whether it changed the layer.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    shape: Callable[[nn.Module], tuple[int, int]]  # (out, in)
    read: Callable[[nn.Module], torch.Tensor]
    write: Callable[[nn.Module, torch.Tensor], None]
    storage_dtype: Callable[[nn.Module], torch.dtype]
    packed: bool = False  # the weight is stored quantized: read dequantizes, write re-quantizes
    fan_in_fan_out: bool = False  # PEFT's flag for weights stored (in, out)
    after_wrap: Callable[[nn.Module], None] | None = None
    before_save: Callable[[nn.Module], bool] | None = None
    linear: bool = True  # selected by target_modules="all-linear"
    check: Callable[[str, nn.Module], None] | None = None  # refuses a layer's settings (name, module), before any read
    as_matrix: Callable[[torch.Tensor], torch.Tensor] | None = None  # a stored weight (state dict) as (out, in)
    calibrates: bool = True  # has an input covariance (CorDA / EoRA); False: the input is not a vector
    patches: Callable[[nn.Module], Any] | None = None  # calibration rows: ``patches(m).rows(x)`` (n, in), hashable
    before_wrap: Callable[[nn.Module], None] | None = None


def _is_conv1d(m: nn.Module) -> bool:
    mod = sys.modules.get("transformers.pytorch_utils")  # never imported here: a Conv1D exists only if it was
    return mod is not None and isinstance(m, mod.Conv1D)


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value)  # in place: a memory-mapped checkpoint's pages are not kept alive by a new tensor


LAYER_KINDS: tuple[LayerKind, ...] = (
    # bitsandbytes layers subclass nn.Linear: they come first
    LayerKind("bitsandbytes Linear4bit/Linear8bitLt", bnb.is_bnb_layer, lambda m: (m.out_features, m.in_features), bnb.dequantize,
              bnb.write_quantized, lambda m: torch.float32, packed=True, after_wrap=bnb.guard_training,
              before_save=bnb.restore_layout),
    # other quantized backends (backends.py): read through their own dequantization, never written
    LayerKind("HQQ HQQLinear", backends.is_hqq, backends.hqq_shape, backends.hqq_read, backends.not_writable,
              lambda m: torch.float32, packed=True),
    LayerKind("torchao quantized Linear", backends.is_torchao, lambda m: tuple(m.weight.shape), backends.torchao_read,
              backends.not_writable, lambda m: torch.float32, packed=True),
    LayerKind("optimum-quanto QLinear", backends.is_quanto, lambda m: (m.out_features, m.in_features),
              backends.quanto_read, backends.not_writable, lambda m: torch.float32, packed=True),
    LayerKind("compressed-tensors compressed Linear", backends.is_compressed, backends.compressed_shape,
              backends.compressed_read, backends.not_writable, lambda m: torch.float32, packed=True,
              before_wrap=backends.decompress),
    LayerKind("nn.Linear", lambda m: isinstance(m, nn.Linear), lambda m: tuple(m.weight.shape),
              lambda m: m.weight.detach(), lambda m, w: _copy_into(m.weight, w), lambda m: m.weight.dtype),
    LayerKind("transformers Conv1D", _is_conv1d, lambda m: tuple(m.weight.shape[::-1]), lambda m: m.weight.detach().mT,
              lambda m, w: _copy_into(m.weight, w.mT), lambda m: m.weight.dtype, fan_in_fan_out=True),
    LayerKind("nn.Embedding", conv.is_embedding, conv.embedding_shape, conv.embedding_read, conv.embedding_write,
              lambda m: m.weight.dtype, linear=False, check=conv.check_embedding, as_matrix=lambda w: w.mT,
              calibrates=False),
    LayerKind("nn.Conv1d/nn.Conv2d", conv.is_conv, conv.conv_shape, conv.conv_read, conv.conv_write,
              lambda m: m.weight.dtype, linear=False, check=conv.check_conv, as_matrix=conv.conv_matrix,
              patches=conv.patches_of),
)


KIND_NAMES = ", ".join(k.name for k in sorted(LAYER_KINDS, key=lambda k: k.packed))  # messages: plain layers first
_REGISTERED: list[LayerKind] = []  # register_kind's, newest first: looked at before the table


def register_kind(kind: LayerKind) -> None:
    """Add ``kind`` before the table (and before earlier registered kinds): a module it matches is handled by it."""
    _REGISTERED.insert(0, kind)


def unregister_kind(kind: LayerKind) -> None:
    """Remove a kind :func:`register_kind` added (nothing if it is not registered)."""
    if kind in _REGISTERED:
        _REGISTERED.remove(kind)


def kind_names() -> str:
    """The kinds that exist, for messages: the registered ones, then the table's (``KIND_NAMES``)."""
    return ", ".join([k.name for k in _REGISTERED] + [KIND_NAMES])


def kind_of(module: nn.Module) -> LayerKind | None:
    """The entry for ``module``'s type (a registered kind first, then the table), or None if svdadapt cannot adapt
    it."""
    return next((k for k in (*_REGISTERED, *LAYER_KINDS) if k.matches(module)), None)


def is_target_type(module: nn.Module) -> bool:
    return kind_of(module) is not None


def _checked(module: nn.Module) -> torch.Tensor:
    """The tensor a layer's checksum is of: the stored weight, or for packed layers the dequantized matrix
    (bitsandbytes changes a 4-bit layer's storage layout on its first CPU forward)."""
    kind = kind_of(module)
    return kind.read(module) if kind is not None and kind.packed else module.weight


def layer_checksum(module: nn.Module, algorithm: str = "sha256") -> str:
    """``record.weight_checksum`` of the weight a layer computes with (``_checked``)."""
    return weight_checksum(_checked(module), algorithm)


def layer_matches(module: nn.Module, checksum: str) -> bool:
    """Whether the layer's weight has the stored ``checksum``, in the algorithm that checksum names."""
    return checksum_matches(_checked(module), checksum)


def scan_layer(name: str, module: nn.Module, algorithm: str) -> tuple[tuple[int, int], str, bool]:
    """(the weight's (out, in) shape, ``layer_checksum(module, algorithm)``, whether the weight is finite): the
    checks of ``float_weight`` and one pass over the weight (``record.scan_weight``; a packed layer dequantized
    once)."""
    W = float_weight(name, module)
    checksum, finite = scan_weight(W if kind_of(module).packed else module.weight, algorithm)
    return tuple(W.shape), checksum, finite


def before_wrap(modules: Iterable[nn.Module]) -> None:
    """Each module's kind's ``before_wrap`` hook (``modules``: the targets PEFT is about to wrap)."""
    for m in modules:
        kind = kind_of(m)
        if kind is not None and kind.before_wrap is not None:
            kind.before_wrap(m)


def after_wrap(modules: Iterable[nn.Module]) -> None:
    """Each module's kind's ``after_wrap`` hook (``modules``: the base layers PEFT just wrapped)."""
    for m in modules:
        kind = kind_of(m)
        if kind is not None and kind.after_wrap is not None:
            kind.after_wrap(m)


def before_save(model: nn.Module) -> int:
    """Each of ``model``'s modules' kind's ``before_save`` hook; how many changed. Call it before anything reads
    the model's state dict (saving, PEFT's merge)."""
    changed = 0
    for m in model.modules():
        kind = kind_of(m)
        if kind is not None and kind.before_save is not None:
            changed += bool(kind.before_save(m))
    return changed


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype decompositions run in, and the dtype PEFT gives the LoRA factors of a layer whose base weight has
    ``dtype``: fp64 for fp64 weights, fp32 for every other float and for packed storage (PEFT's autocast of
    half-precision adapters)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def float_weight(name: str, module: nn.Module) -> torch.Tensor:
    """``module``'s weight as an (out, in) float tensor as stored (a view where the layout allows; packed layers
    dequantized), not converted.

    Raises ``TypeError`` naming the module for a layer type svdadapt does not know or a non-float weight, and the
    kind's ``check`` error (``ValueError``: a convolution's groups, dilation, padding_mode).
    """
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"module {name!r} is a {type(module).__name__}, which no layer kind of svdadapt reads "
                        f"(kinds: {kind_names()}); if its forward is linear in its input: "
                        f"svdadapt.register_linear({type(module).__name__})")
    if kind.check is not None:
        kind.check(name, module)
    w = getattr(module, "weight", None)
    packed = not kind.packed and (type(w).__name__ in {"Params4bit", "Int8Params"} or hasattr(w, "quant_state"))
    W = kind.read(module)
    if packed or not torch.is_floating_point(W):
        raise TypeError(
            f"module {name!r} has a {'packed-quantized ' if packed else ''}weight of dtype {W.dtype} "
            f"({type(module).__name__}); svdadapt decomposes floating-point weights only: load or dequantize the "
            "model in float32/bfloat16/float16 first")
    return W


def read_weight(name: str, module: nn.Module) -> torch.Tensor:
    """``module``'s weight as an (out, in) tensor in its compute dtype (fp32, or fp64 for fp64 weights); the
    errors of ``float_weight``."""
    W = float_weight(name, module)
    return W.to(compute_dtype(W.dtype))
