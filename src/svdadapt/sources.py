"""Where the engine's layers come from: a ``LayerInput`` (name, W, C, reference) per target.

``ModelSource`` reads an in-memory model. Other sources (checkpoint shards read tensor by tensor, one process's
share of the targets) yield the same ``LayerInput`` and plug into ``engine.plan_layers`` unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .engine import LayerInput
from .layers import read_weight

__all__ = ["ModelSource"]


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
