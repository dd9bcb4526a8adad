"""The hidden states of the block-by-block path: per calibration batch, the hidden state entering the current
block, how the blocks are called, and the batch's attention mask; in memory up to a budget, on disk beyond.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["HiddenStates", "Call"]


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj``: a tensor, or tuples / lists / mappings of them (nested), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)


def _nbytes(obj: Any) -> int:
    """The bytes of every tensor in ``obj`` (as :func:`_tensors` finds them)."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


Call = tuple[str | None, tuple[Any, ...], dict[str, Any]]  # (keyword of the hidden state or None, args, kwargs)


class HiddenStates:
    """Per batch: the hidden state entering the current block (batch, seq, d), how the blocks are called (a
    ``Call``: the keyword carrying the hidden state, or None for the first positional argument, and the other
    arguments; one for every block, or one per block where they differ, e.g. per-layer attention masks) and the
    batch's attention mask. Hidden states stay in memory while the running total (the calls' tensors included, each
    counted once) is within ``budget`` bytes, and go to one file per batch beyond it."""

    def __init__(self, budget: float, offload_dir: str | os.PathLike | None) -> None:
        self.budget, self.offload_dir = budget, offload_dir
        self.used = self.on_disk = 0
        self.items: list[torch.Tensor | str] = []
        self.devices: list[torch.device] = []
        self.calls: list[list[Call]] = []  # per batch: [the call of every block] or [block 0's, block 1's, ...]
        self.masks: list[torch.Tensor | None] = []
        self._counted: set[int] = set()  # ids of the call tensors counted in ``used`` (held here: ids stay valid)
        self._dir: tempfile.TemporaryDirectory | None = None

    def __len__(self) -> int:
        return len(self.items)

    def add(self, hidden: torch.Tensor, call: Call, mask: torch.Tensor | None) -> None:
        """A batch: its hidden state entering block 0 and block 0's call."""
        self.calls.append([])
        self.add_call(len(self.calls) - 1, call)
        self.masks.append(mask)
        self.devices.append(hidden.device)
        if self.used + _nbytes(hidden) <= self.budget:
            self.used += _nbytes(hidden)
            self.items.append(hidden)
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="svdadapt-hidden-", dir=self.offload_dir)
        self.items.append(os.path.join(self._dir.name, f"batch{len(self.items)}.pt"))
        self.on_disk += _nbytes(hidden)
        self.set(len(self.items) - 1, hidden)

    def add_call(self, i: int, call: Call) -> None:
        """Batch i's call of the next block (after block 0's: blocks called with arguments of their own)."""
        self.calls[i].append(call)
        for t in _tensors(call[1:]):
            if id(t) not in self._counted:
                self._counted.add(id(t))
                self.used += _nbytes(t)

    def get(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return item if isinstance(item, torch.Tensor) else torch.load(item, map_location=self.devices[i],
                                                                        weights_only=True)

    def set(self, i: int, hidden: torch.Tensor) -> None:
        if isinstance(self.items[i], torch.Tensor):
            self.items[i] = hidden
            return
        hidden = hidden.detach().cpu()
        if hidden.untyped_storage().nbytes() != _nbytes(hidden):  # a view: save the tensor, not its whole storage
            hidden = hidden.clone()
        torch.save(hidden, self.items[i])

    def run(self, block: nn.Module, i: int, j: int) -> torch.Tensor:
        """``block`` (block j of the stack) on batch i's hidden state; returns its output hidden state."""
        calls = self.calls[i]
        key, args, kwargs = calls[j if len(calls) > 1 else 0]
        hidden = self.get(i)
        out = block(hidden, *args, **kwargs) if key is None else block(*args, **{key: hidden}, **kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
