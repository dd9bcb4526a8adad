"""The typed record of what svdadapt did to a model: ``peft_model.svdadapt`` and the directory metadata.

Leaf module (torch and the standard library only), so the engine, the lifecycle and the CLI all read the same
record without importing each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = ["ADAPTER", "AdaptRecord", "Factors", "weight_checksum", "factors_checksum"]

ADAPTER = "default"  # the PEFT adapter name svdadapt fills

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, in), B (out, r))


def weight_checksum(w: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (any device; bit-exact, so a re-quantized or re-cast base
    does not match)."""
    t = w.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}:{tuple(w.shape)}:".encode())
    h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def factors_checksum(factors: dict[str, Factors]) -> str:
    """One sha256 over every layer's initial (A, B), in target order: identifies an initialization."""
    h = hashlib.sha256()
    for name, (A, B) in factors.items():
        h.update(name.encode())
        h.update(weight_checksum(A).encode())
        h.update(weight_checksum(B).encode())
    return h.hexdigest()


@dataclass
class AdaptRecord:
    """What ``wrap`` (or ``load``) did, kept on the model as ``peft_model.svdadapt``.

    Attributes:
        method, rank, alpha: as passed to ``wrap`` (alpha resolved: None means rank).
        options: the options that determine the factors (svd, niter, oversample, seed, mode, damping, use_rslora).
        targets: full module names of the adapted layers, in model order.
        init_factors: name -> (A₀ (r, in), B₀ (out, r)) on CPU, in the adapter dtype.
        report: name -> per-layer numbers (shape, sigma_max, energy, ...).
        base_checksums: name -> sha256 of the weight the portable adapter applies to (the original W, or W_c for
            a method that keeps the base); None when unknown.
        quantize: the bitsandbytes scheme of a quantized residual base, or None.
    Dict-style reads (``record["method"]``) are supported for code written against the old dict record.
    """

    method: str
    rank: int
    alpha: float
    options: dict[str, Any]
    targets: list[str]
    init_factors: dict[str, Factors]
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_checksums: dict[str, str] | None = None
    quantize: str | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def summary(self) -> dict[str, Any]:
        """The JSON-able part (everything but the factor tensors)."""
        return {k: getattr(self, k) for k in self.keys() if k != "init_factors"}
