"""The capture of block inputs: block 0's inputs (the hidden state and the other arguments) for every calibration
batch, and the chain check on the first.

A forward pre-hook records block 0's call and stops the forward (which runs with ``use_cache=False`` where the model
takes it; a cache left in the arguments, positional as GPT-2 passes it or keyword, is dropped: a block run again
must not attend to the keys of an earlier run). On batch 0 the forward runs through the whole stack first, to check
that the blocks form a chain (``stack.Chain``): block j reads block j−1's output (the same tensor, unchanged).
Blocks called with arguments of their own (per-layer attention masks: Gemma2's sliding-window and full layers) have
every block's call recorded: on batch 0 from the real forward, on the others by stand-ins for the blocks, so the
stack is not run twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..calibration import eval_mode, first_tensor, model_device, run_batch, token_mask
from .hidden import HiddenStates
from .stack import BlockwiseUnsupported, Chain

__all__ = ["capture"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | None, torch.Tensor, tuple, dict]:
    """(keyword of the hidden state or None for the first positional argument, the hidden state, the other
    positional arguments, the other keyword arguments) of a block call."""
    if args and isinstance(args[0], torch.Tensor):
        return None, args[0], args[1:], kwargs
    x = first_tensor((), kwargs)
    if x is None:
        raise BlockwiseUnsupported("the first block was called without a tensor input")
    key = next(k for k, v in kwargs.items() if v is x)
    return key, x, args, {k: v for k, v in kwargs.items() if k != key}


def _is_cache(v: Any) -> bool:
    """A KV cache object (transformers' ``Cache`` classes, ``DynamicCache``, ``EncoderDecoderCache`` ...)."""
    return any(c.__name__.endswith("Cache") for c in type(v).__mro__)


def _without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block run on its own must not append to the forward's KV cache: caches become None, positional (GPT-2
    passes its cache second) or keyword, and ``use_cache`` False (attention then reads the new keys and values
    themselves, the values the cache would have handed back)."""
    args = tuple(None if _is_cache(v) else v for v in args)
    return args, {k: None if _is_cache(v) else (False if k == "use_cache" else v) for k, v in kwargs.items()}


def _same(a: Any, b: Any) -> bool:
    """The same call arguments: tensors (and caches) the same objects, other values equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:  # a comparison that does not give a bool
        return False


class _Capture:
    """Hooks on the blocks: record block 0's call for every batch (then stop the forward); on the first batch, run
    the whole stack and check that it is a chain (``chain``). Blocks called with arguments of their
    own (``varies``: per-layer attention masks, as Gemma2's sliding-window and full layers) have every block's call
    recorded: on the first batch from the real forward, on the others by ``_Recorder`` stand-ins."""

    def __init__(self, blocks: nn.ModuleList, store: HiddenStates) -> None:
        self.blocks, self.store = blocks, store
        self.checking, self.varies, self.mask = True, False, None
        self.chain = Chain(len(blocks))
        self.first: Any = None  # block 0's (keyword, other args, kwargs) in the checked forward
        self.template: Any = None  # the last block's output in the checked forward (what a stand-in returns)

    def pre(self, j: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key, hidden, rest, kw = _split(args, kwargs)
        self.chain.enter(j)
        self.record(j, key, hidden, rest, kw)
        if j == 0:
            self.first = (key, rest, kw)
            if not self.checking:
                raise _Stop
            return
        self.chain.check_input(j, hidden)
        self.varies = self.varies or not _same((key, rest, kw), self.first)

    def record(self, j: int, key: str | None, hidden: torch.Tensor, rest: tuple[Any, ...],
               kw: dict[str, Any]) -> None:
        call = (key, *_without_cache(rest, kw))
        if j == 0:
            self.store.add(hidden, call, self.mask)
        else:
            self.store.add_call(len(self.store) - 1, call)

    def post(self, j: int, out: Any) -> None:
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        self.chain.leave(hidden)
        if j == len(self.blocks) - 1:
            self.template = out
            raise _Stop

    def end_check(self) -> None:
        """After the checked forward: one call for every block unless their arguments differ."""
        self.checking = False
        if not self.varies:
            del self.store.calls[0][1:]

    def begin(self, batch: Any) -> None:
        self.chain.begin()
        self.mask = token_mask(batch)  # attention_mask and labels != -100


class _Recorder(nn.Module):
    """Stands in for block j while the calls of blocks with arguments of their own are recorded: records the call
    and hands the hidden state on unchanged (shaped like the real block's output), so no block runs or is loaded.
    Other attributes are the block's own (a model may read e.g. ``layer.attention_type``)."""

    def __init__(self, j: int, block: nn.Module, cap: _Capture) -> None:
        super().__init__()
        object.__setattr__(self, "_stand_in", (j, block, cap))  # not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        j, _, cap = self._stand_in
        key, hidden, rest, kw = _split(args, kwargs)
        cap.record(j, key, hidden, rest, kw)
        if j == len(cap.blocks) - 1:
            raise _Stop
        out = cap.template
        return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._stand_in[1], name)


class _Batch:
    """The ``calibration.BatchState`` of a capture: nothing to collect."""

    def begin(self, batch: int, masks: Any) -> None:
        pass

    def end(self) -> None:
        pass


def capture(model: nn.Module, blocks: nn.ModuleList, batches: list[Any], store: HiddenStates) -> None:
    """Block 0's inputs and the blocks' calls for every batch into ``store``; :class:`BlockwiseUnsupported` when the
    stack is not a chain."""
    cap = _Capture(blocks, store)
    handles = []
    for j, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, _j=j: cap.pre(_j, m, a, k), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, _j=j: cap.post(_j, o)))
    originals = list(blocks)
    device = model_device(model)
    try:
        with eval_mode(model):
            for i, batch in enumerate(batches):
                if i == 1 and cap.varies:  # the other batches' calls, without running any block
                    for j, block in enumerate(originals):
                        blocks[j] = _Recorder(j, block, cap)
                cap.begin(batch)
                try:
                    run_batch(model, batch, i, device, _Batch())
                except _Stop:
                    if i == 0:
                        cap.end_check()
                    continue
                raise BlockwiseUnsupported("the forward pass ended without running the whole stack of blocks")
    finally:
        for j, block in enumerate(originals):
            blocks[j] = block
        for h in handles:
            h.remove()
