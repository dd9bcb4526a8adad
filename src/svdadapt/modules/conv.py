"""Layer kinds beyond the linears: ``nn.Embedding`` and ``nn.Conv1d`` / ``nn.Conv2d``, as PEFT adapts them.

Each is read as an (out, in) matrix in PEFT's delta convention (the adapter adds s·B·A, A (r, in), B (out, r)), so
every method and the exactness rule of DESIGN.md apply unchanged:

- ``nn.Embedding`` (num_embeddings, dim): the matrix is ``weightᵀ`` (dim, num_embeddings). PEFT's
  ``lora.Embedding`` holds ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B`` (dim, r); its output
  for token i is ``weight[i] + s·(B·A)[:, i]`` and its ``get_delta_weight`` is ``(B·A)ᵀ``. Its input is an index,
  not a vector: it has no input covariance (CorDA / EoRA refused, ``calibrates=False`` in the table).
- ``nn.Conv1d`` / ``nn.Conv2d`` (out, in, *k): the matrix is the kernel flattened, (out, in·∏k), in
  ``F.unfold``'s order (channel, then kernel rows, then columns). PEFT's conv LoRA: ``lora_A`` is a conv
  (r, in, *k) with the layer's stride and padding, ``lora_B`` a 1×1 conv (out, r): B(A(x)) is the conv of x with
  the kernel (B·A) reshaped, so a conv's input covariance is that of its unfolded patches (``Patches.rows``).
  PEFT's ``lora_A`` takes neither dilation nor padding_mode and its merge differs for groups: those are refused
  (``check_conv``).

Leaf module: torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["is_embedding", "is_conv", "check_embedding", "embedding_shape", "embedding_read", "embedding_write", "conv_shape", "conv_read",
           "conv_write", "conv_matrix", "check_conv", "Patches", "patches_of"]


def is_embedding(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding)


def is_conv(m: nn.Module) -> bool:
    """``nn.Conv1d`` / ``nn.Conv2d`` (not ``Conv3d``, not the transposed convs)."""
    return isinstance(m, (nn.Conv1d, nn.Conv2d))


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value)


def embedding_shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) = (embedding_dim, num_embeddings)."""
    return (m.embedding_dim, m.num_embeddings)


def embedding_read(m: nn.Module) -> torch.Tensor:
    """weightᵀ (dim, num_embeddings), a view."""
    return m.weight.detach().mT


def embedding_write(m: nn.Module, base: torch.Tensor) -> None:
    """``base`` (dim, num_embeddings) stored as the weight (num_embeddings, dim)."""
    _copy_into(m.weight, base.mT)


def check_embedding(name: str, m: nn.Module) -> None:
    """``max_norm`` renormalizes the looked-up rows in place on every forward, the weight's and (PEFT's ``_embed``)
    the adapter's: no fixed base and factors can be exact there. ``ValueError`` naming the module."""
    if m.max_norm is not None:
        raise ValueError(f"module {name!r} is an Embedding with max_norm={m.max_norm!r}, which renormalizes its "
                         "weight (and PEFT's lora_embedding_A) in place on every forward; svdadapt adapts embeddings "
                         "with max_norm=None only: leave it out of target_modules")


def conv_shape(m: nn.Module) -> tuple[int, int]:
    """(out, in·∏kernel)."""
    return (m.out_channels, m.in_channels * math.prod(m.kernel_size))


def conv_matrix(w: torch.Tensor) -> torch.Tensor:
    """A kernel (out, in, *k) as the (out, in·∏k) matrix (a view of a contiguous kernel)."""
    return w.reshape(w.shape[0], -1)


def conv_read(m: nn.Module) -> torch.Tensor:
    return conv_matrix(m.weight.detach())


def conv_write(m: nn.Module, base: torch.Tensor) -> None:
    """``base`` (out, in·∏k) stored as the kernel (out, in, *k)."""
    _copy_into(m.weight, base.reshape(m.weight.shape))


def check_conv(name: str, m: nn.Module) -> None:
    """The convolutions PEFT's conv LoRA computes as B·A: ``ValueError`` naming the module and the setting otherwise
    (its ``lora_A`` takes the layer's kernel, stride and padding but neither dilation nor padding_mode; with groups
    > 1 its delta is not B·A)."""
    kind = type(m).__name__
    if m.groups != 1:
        raise ValueError(f"module {name!r} is a {kind} with groups={m.groups}; svdadapt adapts convolutions with "
                         "groups=1 only (PEFT's conv LoRA is not a product B·A there): leave it out of target_modules")
    if any(d != 1 for d in m.dilation):
        raise ValueError(f"module {name!r} is a {kind} with dilation={tuple(m.dilation)}; PEFT's conv LoRA ignores "
                         "dilation (its lora_A is undilated), so svdadapt adapts dilation=1 only: leave it out of "
                         "target_modules")
    if m.padding_mode != "zeros":
        raise ValueError(f"module {name!r} is a {kind} with padding_mode={m.padding_mode!r}; PEFT's conv LoRA pads "
                         "with zeros, so svdadapt adapts padding_mode='zeros' only: leave it out of target_modules")


@dataclass(frozen=True)
class Patches:
    """A convolution's patch geometry (2-D; a Conv1d is a Conv2d of width 1): ``kernel``, ``stride`` and the zero
    padding (top, bottom, left, right). Two convs of equal geometry reading one tensor have one covariance."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]
    dims: int  # 1 or 2: the conv's spatial dimensions

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The (N·L, in·∏k) unfolded patches of ``x`` ((batch,) in, *spatial): each output position's receptive
        field, in the kernel's flattened order, one row per position of every image."""
        if x.dim() == self.dims + 1:  # unbatched
            x = x.unsqueeze(0)
        if self.dims == 1:
            x = x.unsqueeze(-1)
        top, bottom, left, right = self.pad
        if any(self.pad):
            x = F.pad(x, (left, right, top, bottom))
        cols = F.unfold(x, self.kernel, stride=self.stride)  # (batch, in·∏k, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _padding(m: nn.Module) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dimension; ``'same'`` as PyTorch pads it (the extra one after)."""
    if m.padding == "valid":
        return [(0, 0)] * len(m.kernel_size)
    if m.padding == "same":
        return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in m.kernel_size]  # dilation 1 (check_conv)
    return [(p, p) for p in m.padding]


def patches_of(m: nn.Module) -> Patches:
    """The patch geometry of a checked ``nn.Conv1d`` / ``nn.Conv2d``."""
    pads = _padding(m)
    if len(m.kernel_size) == 1:
        return Patches((m.kernel_size[0], 1), (m.stride[0], 1), (*pads[0], 0, 0), 1)
    return Patches(tuple(m.kernel_size), tuple(m.stride), (*pads[0], *pads[1]), 2)
