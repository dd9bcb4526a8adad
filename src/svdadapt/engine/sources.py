"""Where the engine's layers come from: a ``LayerInput`` (name, W, C, reference) per target.

``ModelSource`` reads an in-memory model; ``CheckpointSource`` reads a safetensors checkpoint one tensor at a time
(``shards.CheckpointReader``), for the streaming init of ``stream/init.py``. Other sources (one process's share of the
targets) yield the same ``LayerInput`` and plug into ``plan.plan_layers`` unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .plan import LayerInput
from ..modules.layers import compute_dtype, kind_of, read_weight
from ..storage.shards import CheckpointReader

__all__ = ["ModelSource", "CheckpointSource"]


class ModelSource:
    """The targets of an in-memory model, with their covariances and reference weights (each optional).

    ``targets``: name -> module; ``covariances``: name -> C (in, in); ``references``: name -> W_ref (out, in).
    Weights are read when a layer is reached, so at most one layer's float copy is alive at a time.
    """

    def __init__(self, targets: Mapping[str, nn.Module], covariances: Mapping[str, torch.Tensor] | None = None,
                 references: Mapping[str, torch.Tensor] | None = None) -> None:
        self.targets, self.covariances, self.references = dict(targets), covariances, references

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self) -> Iterator[LayerInput]:
        for name, module in self.targets.items():
            yield LayerInput(name, read_weight(name, module),
                             None if self.covariances is None else self.covariances[name],
                             None if self.references is None else self.references[name])

    def covariance_users(self) -> Counter:
        """Per ``id(C)``, how many targets read that covariance."""
        if self.covariances is None:
            return Counter()
        return Counter(id(self.covariances[n]) for n in self.targets)


class CheckpointSource:
    """The targets of a safetensors checkpoint, read one tensor at a time.

    ``reader``: the checkpoint; ``targets``: module name -> module of the model the checkpoint belongs to (a
    meta-device skeleton will do: only its layer kind and shape are used). Each target's weight is the tensor
    ``<name>.weight``, stored (out, in), or (in, out) for a ``fan_in_fan_out`` kind (transformers ``Conv1D``).
    Every target is checked here, before any data is read: present, floating point, of the module's shape.
    Iteration yields ``LayerInput`` (W (out, in) in its compute dtype, no covariance) in checkpoint order.
    """

    def __init__(self, reader: CheckpointReader, targets: Mapping[str, nn.Module]) -> None:
        self.reader = reader
        self.keys: dict[str, str] = {}  # module name -> tensor name
        self.transposed: dict[str, bool] = {}
        self.shapes: dict[str, tuple[int, int]] = {}  # module name -> (out, in)
        for name, module in targets.items():
            self._check(name, module)
        modules = {key: name for name, key in self.keys.items()}
        # checkpoint order: the order a streaming writer visits them
        self.names = [modules[key] for key in reader.names if key in modules]

    def _check(self, name: str, module: nn.Module) -> None:
        kind, key = kind_of(module), name + ".weight"
        if kind is not None and not kind.linear:
            raise TypeError(f"module {name!r} is not a linear layer ({kind.name}): a checkpoint is streamed for "
                            "Linear / Conv1D weights only; adapt it in memory (svdadapt.wrap, svdadapt init --in-memory)")
        if kind is None or kind.packed:
            raise TypeError(f"module {name!r} is a {type(module).__name__}, which svdadapt cannot read from a "
                            "checkpoint (float Linear / Conv1D weights only)")
        if key not in self.reader:
            raise ValueError(f"targeted module {name!r} has no weight {key!r} in checkpoint {self.reader.path} "
                             "(tied to another weight, or saved under another name?)")
        dtype, shape = self.reader.dtype(key), tuple(self.reader.shape(key))
        if not dtype.is_floating_point:
            raise TypeError(f"{key!r} in checkpoint {self.reader.path} is {dtype}; svdadapt decomposes "
                            "floating-point weights only (a packed-quantized checkpoint?)")
        out_in = tuple(kind.shape(module))
        stored = out_in[::-1] if kind.fan_in_fan_out else out_in
        if shape != stored:
            raise ValueError(f"{key!r} in checkpoint {self.reader.path} has shape {shape}; module {name!r} of "
                             f"the model's config expects {stored}")
        self.keys[name], self.transposed[name], self.shapes[name] = key, kind.fan_in_fan_out, out_in

    def __len__(self) -> int:
        return len(self.names)

    def module_of(self, key: str) -> str | None:
        """The target whose weight is tensor ``key``, or None."""
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        return name if name in self.keys and self.keys[name] == key else None

    def read(self, name: str) -> tuple[LayerInput, torch.Tensor]:
        """(the layer, its weight as stored): W (out, in) in its compute dtype as ``layers.read_weight`` gives it
        (a transposed view for ``fan_in_fan_out``; no copy for fp32), and the stored tensor (for checksums and
        its storage dtype)."""
        stored = self.reader.get(self.keys[name])
        W = stored.mT if self.transposed[name] else stored
        return LayerInput(name, W.to(compute_dtype(W.dtype))), stored

    def as_stored(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """A new base (out, in) in the checkpoint's layout of ``name`` (contiguous)."""
        return base.mT.contiguous() if self.transposed[name] else base.contiguous()

    def __iter__(self) -> Iterator[LayerInput]:
        for name in self.names:
            yield self.read(name)[0]
