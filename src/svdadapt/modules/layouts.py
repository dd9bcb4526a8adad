"""Where PEFT keeps a LoRA layer's factors, and in which shape, for each layer kind.

svdadapt computes, records and stores every layer's factors as matrices, A (r, in) and B (out, r). PEFT keeps them
as ``lora_A[adapter].weight`` / ``lora_B[adapter].weight`` of that shape for linears, as the parameters
``lora_embedding_A[adapter]`` (r, num_embeddings) / ``lora_embedding_B[adapter]`` (dim, r) for embeddings, and as
conv kernels (r, in, *k) / (out, r, 1, ...) for convolutions. A *layout* says which and how:

    {"A": "lora_A.weight", "B": "lora_B.weight", "A_shape": [in, *k], "B_shape": [1, ...]}

(the saved-adapter key suffixes, and each factor's shape after its first dimension (A) or its first two (B)).
A linear's layout is the default and is never recorded; svdadapt.json's ``layouts`` holds the others, so an
adapter can be written and read back without the model (``svdadapt export`` on an init directory).

Leaf module: torch only.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["LINEAR", "lora_params", "layout_of", "to_saved", "from_saved", "suffixes", "has_lora"]

Layout = Mapping[str, Any]
LINEAR: Layout = {"A": "lora_A.weight", "B": "lora_B.weight", "A_shape": None, "B_shape": []}


def has_lora(layer: nn.Module, adapter: str) -> bool:
    """Whether ``layer`` is a PEFT LoRA layer holding ``adapter`` (an embedding's factors are parameters)."""
    return any(adapter in getattr(layer, d, {}) for d in ("lora_A", "lora_embedding_A"))


def lora_params(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameters holding ``adapter``'s A and B in a PEFT LoRA layer, in PEFT's shapes."""
    if adapter in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def as_matrices(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT-shaped factors as A (r, in), B (out, r) (views; trailing dimensions of B are ones)."""
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])


def layout_of(layer: nn.Module, adapter: str) -> dict[str, Any] | None:
    """The layout of a PEFT LoRA layer's factors; None for a linear's (the default)."""
    A, B = lora_params(layer, adapter)
    if adapter in getattr(layer, "lora_embedding_A", {}):
        return {"A": "lora_embedding_A", "B": "lora_embedding_B", "A_shape": list(A.shape[1:]), "B_shape": []}
    if A.dim() == 2 and B.dim() == 2:
        return None
    return {"A": "lora_A.weight", "B": "lora_B.weight", "A_shape": list(A.shape[1:]), "B_shape": list(B.shape[2:])}


def suffixes(layout: Layout | None) -> tuple[str, str]:
    """The saved-adapter key suffixes of A and B (after ``<module>.``)."""
    layout = layout or LINEAR
    return layout["A"], layout["B"]


def to_saved(A: torch.Tensor, B: torch.Tensor, layout: Layout | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices A (r, in), B (out, r) in the layout's shapes (r may differ from the recorded one: an export's 2r)."""
    if layout is None or layout["A_shape"] is None:
        return A, B
    return A.reshape(A.shape[0], *layout["A_shape"]), B.reshape(B.shape[0], B.shape[1], *layout["B_shape"])


def from_saved(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Saved factors of any layout as matrices A (r, in), B (out, r)."""
    return as_matrices(A, B)
