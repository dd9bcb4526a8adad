"""A model on the meta device whose weights come from a safetensors checkpoint, one decoder block at a time.

The streaming CorDA init (``stream.py``) runs calibration batches through a model it never loads whole. It takes
the meta-device skeleton built from config.json and

* loads everything outside the decoder stack at once (embeddings, final norm, output head: small next to the
  stack), tied weights shared as ``from_pretrained`` shares them, and computes the buffers a checkpoint does not
  hold (rotary ``inv_freq``) with the model's own ``_init_weights``, as ``from_pretrained`` does;
* loads a block of the stack only when it is called (a forward pre-hook) and puts the previous one back on the
  meta device, so at most one block's weights are in memory.

``blockwise.plan_blockwise`` runs such a model exactly as a loaded one: block 0's inputs are captured for every
batch, then each block runs once over all batches (one load per block; the capture's chain check on the first batch
loads every block once more). Tensors keep the checkpoint's dtype, as ``from_pretrained`` keeps it by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .shards import CheckpointReader

__all__ = ["LazyBlocks"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _load_tensors(module: nn.Module, prefix: str, reader: CheckpointReader, skip: Callable[[str], bool],
                  init_weights: Callable[[nn.Module], None] | None) -> None:
    """Every parameter and buffer under ``module`` (names from ``prefix``, except those ``skip`` names) from the
    checkpoint; a parameter the checkpoint lacks takes the loaded tensor of the parameter it is tied to, a buffer
    the checkpoint lacks is computed by ``init_weights`` on its module (which must hold no parameters)."""
    loaded: dict[int, nn.Parameter] = {}  # id of the meta parameter -> its loaded replacement
    missing: list[tuple[str, nn.Module, str, nn.Parameter]] = []
    computed: dict[str, nn.Module] = {}
    for mname, m in module.named_modules(prefix=prefix):
        if skip(mname):
            continue
        for pname, p in list(m._parameters.items()):
            key = _join(mname, pname)
            if p is None:
                continue
            if key not in reader:
                missing.append((key, m, pname, p))
                continue
            new = loaded.get(id(p)) or nn.Parameter(reader.get(key), requires_grad=False)
            loaded[id(p)] = new
            m._parameters[pname] = new
        for bname, b in list(m._buffers.items()):
            if b is None:
                continue
            key = _join(mname, bname)
            if key in reader:
                m._buffers[bname] = reader.get(key)
            elif b.is_meta:
                computed[mname] = m
    for key, m, pname, p in missing:
        if id(p) not in loaded:
            raise ValueError(f"checkpoint {reader.path} has no tensor {key!r}, and the model ties it to no tensor "
                             "the checkpoint holds")
        m._parameters[pname] = loaded[id(p)]
    for mname, m in computed.items():
        _compute_buffers(mname, m, init_weights)


def _compute_buffers(name: str, module: nn.Module, init_weights: Callable[[nn.Module], None] | None) -> None:
    """The buffers of ``module`` that no checkpoint holds (``persistent=False``), computed as transformers does."""
    if init_weights is None or any(p is not None for p in module._parameters.values()):
        raise ValueError(f"module {name!r} ({type(module).__name__}) has buffers the checkpoint does not hold; "
                         "svdadapt cannot compute them without loading the model")
    for bname, b in list(module._buffers.items()):
        if b is not None and b.is_meta:
            module._buffers[bname] = torch.empty_like(b, device="cpu")
    init_weights(module)


class LazyBlocks:
    """``model`` (on the meta device) made runnable from ``reader``: outside ``blocks`` loaded now, each block
    loaded when called, the block before it unloaded. ``close()`` (or the ``with`` block's end) puts every weight
    back on the meta device and removes the hooks.

    Args:
        model: the skeleton, built on the meta device from the checkpoint's config.
        reader: the checkpoint.
        stack: the name of ``blocks`` in ``model`` (e.g. ``"model.layers"``).
        blocks: the decoder stack.
    """

    def __init__(self, model: nn.Module, reader: CheckpointReader, stack: str, blocks: nn.ModuleList) -> None:
        self.model, self.reader, self.stack, self.blocks = model, reader, stack, blocks
        self.init_weights = getattr(model, "_init_weights", None)
        self.current: int | None = None
        self.loads = 0
        inside = stack + "."
        _load_tensors(model, "", reader, lambda n: n == stack or n.startswith(inside), self.init_weights)
        self.handles = [block.register_forward_pre_hook(lambda m, a, _j=j: self.use(_j))
                        for j, block in enumerate(blocks)]

    def use(self, j: int) -> None:
        """Block ``j`` in memory, the previous one back on the meta device."""
        if self.current == j:
            return
        self.release()
        _load_tensors(self.blocks[j], f"{self.stack}.{j}", self.reader, lambda n: False, self.init_weights)
        self.current = j
        self.loads += 1

    def release(self) -> None:
        if self.current is not None:
            self.blocks[self.current].to("meta")
            self.current = None

    def close(self) -> None:
        """Every weight back on the meta device (the skeleton keeps its names and shapes), the hooks removed."""
        self.release()
        self.model.to("meta")
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "LazyBlocks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
