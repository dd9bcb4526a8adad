"""Which models the block-by-block path runs: the decoder stack (``find_stack``), the block holding a module
(``block_of``), the stack a calibration runs on (``select_stack``) and the chain check (``Chain``); anything else is
:class:`BlockwiseUnsupported`, which says why.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import version
from ..modules.targets import shared_modules

__all__ = ["BlockwiseUnsupported", "find_stack", "block_of", "select_stack", "Chain"]


class BlockwiseUnsupported(ValueError):
    """The model is not a chain of blocks the block-by-block path can run one at a time: ``reason`` says why, the
    message is ``"blockwise calibration: <reason>"``. ``wrap``'s automatic mode (``blockwise=None``) catches it and
    calibrates on the whole model; an explicit ``blockwise=True`` lets it through."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"blockwise calibration: {reason}")
        self.reason = reason


def find_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder stack of ``model``: (its name, the ModuleList of blocks), or None.

    ``model.model.layers`` when it is a ModuleList (transformers Llama-family models), else the ModuleList of at least
    two blocks of one type holding the most parameters. Encoder–decoder models have two stacks: None.
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList) and len(inner.layers):
        for name, module in model.named_modules():
            if module is inner.layers:
                return name, module
    best, size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) != 1:
            continue
        n = sum(p.numel() for p in module.parameters())
        if n > size:
            best, size = (name, module), n
    return best


def block_of(name: str, stack: str, n_blocks: int) -> int | None:
    """The index of the block holding module ``name``, or None when it is outside the stack."""
    if not name.startswith(stack + "."):
        return None
    head = name[len(stack) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < n_blocks else None


def select_stack(hook_model: nn.Module, model: nn.Module, sequential: bool, names: list[str]
                 ) -> tuple[str, nn.ModuleList, nn.ModuleList]:
    """(the stack's name, the blocks calibrated (``hook_model``'s), the blocks whose outputs are carried on:
    ``model``'s with ``sequential``, else the same), or :class:`BlockwiseUnsupported`."""
    found = find_stack(hook_model)
    if found is None:
        raise BlockwiseUnsupported(f"{type(hook_model).__name__} has no decoder stack (a ModuleList of identical "
                                   "blocks)")
    stack, blocks = found
    if not any(block_of(n, stack, len(blocks)) is not None for n in names):
        raise BlockwiseUnsupported(f"no targeted layer lies inside the decoder stack {stack!r}")
    for a, b in shared_modules(hook_model, names)[:1]:  # one block's pass would see one of its uses only
        raise BlockwiseUnsupported(f"module {a!r} is also used as {b!r}: its covariance comes from both uses")
    if not sequential or model is hook_model:
        return stack, blocks, blocks
    other = find_stack(model)
    if other is None or other[0] != stack or len(other[1]) != len(blocks):
        raise BlockwiseUnsupported(f"the compressed model's decoder stack is not {stack!r} with {len(blocks)} "
                                   "blocks")
    return stack, blocks, other[1]


class Chain:
    """The chain check, hook by hook during one forward pass: the blocks run in order, once each, and block j reads
    block j−1's output as it left it (the same tensor object, at the same version)."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.begin()

    def begin(self) -> None:
        """A new forward pass."""
        self.calls = [0] * self.n_blocks
        self.last: tuple[torch.Tensor, object] | None = None  # the previous block's output and its version

    def enter(self, j: int) -> None:
        """Block j starts: after block j−1, and once."""
        if self.calls[j] or (j and self.calls[j - 1] != 1):
            raise BlockwiseUnsupported(f"block {j} of the stack ran out of order or more than once per forward pass")
        self.calls[j] += 1

    def check_input(self, j: int, hidden: torch.Tensor) -> None:
        """Block j (> 0) was handed ``hidden``: it must be block j−1's output, unchanged."""
        if self.last is None or hidden is not self.last[0] or version(hidden) != self.last[1]:
            raise BlockwiseUnsupported(f"block {j} of the stack does not read block {j - 1}'s output as it left it")

    def leave(self, hidden: torch.Tensor) -> None:
        """A block returned ``hidden`` (its output hidden state)."""
        self.last = (hidden, version(hidden))
