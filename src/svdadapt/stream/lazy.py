"""A model on the meta device whose weights come from a safetensors checkpoint, one decoder block at a time.

The streaming CorDA / EoRA init (``calibrated.py``) runs calibration batches through a model it never
loads whole. It takes the meta-device skeleton built from config.json and

* loads what comes before the decoder stack at once (the embeddings), and what comes after it (final norm, output
  head, rotary embedding) on its first call (a forward pre-hook): a calibration that stops after the last block
  never reads the output head. Tied weights are shared as ``from_pretrained`` shares them; the buffers a checkpoint
  does not hold (rotary ``inv_freq``, Gemma's ``embed_scale``) are computed with the model's own
  ``_init_weights``, as ``from_pretrained`` does;
* loads a block of the stack only when it is called and puts the previous one back on the meta device, so at most
  one block's weights are in memory.

``blockwise.plan_blockwise`` runs such a model exactly as a loaded one: block 0's inputs are captured for every
batch, then each block runs once over all batches (one load per block; the capture's chain check on the first batch
loads every block once more). Floating parameters take the skeleton's dtype (the config's ``dtype``, which is what
``from_pretrained``'s default ``dtype="auto"`` gives them): a checkpoint stored in mixed dtypes (norms in fp32,
projections in bf16) runs as the loaded model runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..blockwise.stack import block_of
from ..storage.shards import CheckpointReader

__all__ = ["LazyBlocks"]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Loader:
    """Loads modules' own parameters and buffers from the checkpoint. A tied parameter (several names, one tensor)
    is read under whichever of its names the checkpoint holds and loaded once for all of them; a buffer the
    checkpoint lacks is computed by ``init_weights`` on its module (its parameters loaded first and left as loaded)."""

    def __init__(self, model: nn.Module, reader: CheckpointReader,
                 init_weights: Callable[[nn.Module], None] | None) -> None:
        self.reader, self.init_weights = reader, init_weights
        names: dict[int, tuple[nn.Parameter, list[str]]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), (p, []))[1].append(name)
        # only tied parameters are remembered (the meta parameter is kept, so its id is never reused)
        self.tied = {k: v for k, v in names.items() if len(v[1]) > 1}
        self.loaded: dict[int, nn.Parameter] = {}

    def load(self, modules: Iterable[tuple[str, nn.Module]]) -> None:
        for name, module in modules:
            for pname, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    module._parameters[pname] = self._parameter(_join(name, pname), p)
            missing = False
            for bname, b in list(module._buffers.items()):
                if b is None or not b.is_meta:
                    continue
                key = _join(name, bname)
                if key in self.reader:
                    module._buffers[bname] = self.reader.get(key)
                else:
                    missing = True
            if missing:
                _compute_buffers(name, module, self.init_weights)

    def _parameter(self, key: str, p: nn.Parameter) -> nn.Parameter:
        if id(p) in self.loaded:
            return self.loaded[id(p)]
        keys = self.tied[id(p)][1] if id(p) in self.tied else [key]
        found = next((k for k in keys if k in self.reader), None)
        if found is None:
            raise ValueError(f"checkpoint {self.reader.path} has no tensor {key!r}"
                             + (", nor under the names of the tensor it is tied to" if len(keys) > 1 else ""))
        loaded = nn.Parameter(_as_loaded(self.reader.get(found), p.dtype), requires_grad=False)
        if id(p) in self.tied:
            self.loaded[id(p)] = loaded
        return loaded


def _as_loaded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor in the dtype ``from_pretrained`` gives the parameter (floating tensors only)."""
    return t.to(dtype) if t.is_floating_point() and dtype.is_floating_point and t.dtype != dtype else t


def _compute_buffers(name: str, module: nn.Module, init_weights: Callable[[nn.Module], None] | None) -> None:
    """The buffers of ``module`` that no checkpoint holds (``persistent=False``: rotary ``inv_freq``, Gemma's
    ``embed_scale``), computed as ``from_pretrained`` computes them: the model's ``_init_weights`` on the module, the
    tensors already loaded (its parameters, persistent buffers) flagged ``_is_hf_initialized`` so that
    transformers' init functions leave them as they are."""
    if init_weights is None:
        raise ValueError(f"module {name!r} ({type(module).__name__}) has buffers the checkpoint does not hold; "
                         "svdadapt cannot compute them without loading the model")
    loaded = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None and not t.is_meta]
    for t in loaded:
        t._is_hf_initialized = True  # what from_pretrained sets on every tensor it loaded
    for bname, b in list(module._buffers.items()):
        if b is not None and b.is_meta:
            module._buffers[bname] = torch.empty_like(b, device="cpu")
    init_weights(module)


class LazyBlocks:
    """``model`` (on the meta device) made runnable from ``reader``. The modules registered before ``blocks`` (the
    embeddings) are loaded now; each block is loaded when called, the block before it unloaded; the modules after
    the stack (final norm, output head, rotary embedding) are loaded on their first call, so a calibration that stops
    after the last block never reads the output head. ``close()`` (or the ``with`` block's end) puts every weight back
    on the meta device and removes the hooks.

    Args:
        model: the skeleton, built on the meta device from the checkpoint's config.
        reader: the checkpoint.
        stack: the name of ``blocks`` in ``model`` (e.g. ``"model.layers"``).
        blocks: the decoder stack.
    """

    def __init__(self, model: nn.Module, reader: CheckpointReader, stack: str, blocks: nn.ModuleList) -> None:
        self.model, self.stack, self.blocks = model, stack, blocks
        self.loader = _Loader(model, reader, getattr(model, "_init_weights", None))
        self.current: int | None = None
        self.loads = 0
        self.handles = [block.register_forward_pre_hook(lambda m, a, _j=j: self.use(_j))
                        for j, block in enumerate(blocks)]
        before, after = _around(model, stack)
        self.loader.load(before)
        for name, module in after:
            self.handles.append(module.register_forward_pre_hook(
                lambda m, a, _n=name: self.loader.load([(_n, m)])))

    def use(self, j: int) -> None:
        """Block ``j`` in memory, the previous one back on the meta device."""
        if self.current == j:
            return
        self.release()
        self.loader.load(self.blocks[j].named_modules(prefix=f"{self.stack}.{j}"))
        self.current = j
        self.loads += 1

    def ensure(self, names: Iterable[str]) -> None:
        """The modules called ``names`` in memory (without running them): inside the stack, the block holding them
        (one block at a time: the names of one block); outside it, each module's own tensors."""
        modules = dict(self.model.named_modules())
        for name in names:
            j = block_of(name, self.stack, len(self.blocks))
            if j is not None:
                self.use(j)
            else:
                self.loader.load([(name, modules[name])])

    def release(self) -> None:
        if self.current is not None:
            self.blocks[self.current].to("meta")
            self.current = None

    def close(self) -> None:
        """Every weight back on the meta device (the skeleton keeps its names and shapes), the hooks removed."""
        self.release()
        self.model.to("meta")
        self.loader.loaded.clear()
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "LazyBlocks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _around(model: nn.Module, stack: str) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """The modules registered before the stack and those after it (with tensors of their own), in order."""
    before: list[tuple[str, nn.Module]] = []
    after: list[tuple[str, nn.Module]] = []
    seen_stack = False
    for name, module in model.named_modules():
        if name == stack or name.startswith(stack + "."):
            seen_stack = True
            continue
        if not (module._parameters or module._buffers):
            continue
        (after if seen_stack else before).append((name, module))
    return before, after
