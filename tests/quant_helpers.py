"""Shared by the QPiSSA tests (tests/quant/): norms and the targets' full-precision weights before wrap."""

from __future__ import annotations

import torch

import svdadapt


def fro(t: torch.Tensor) -> float:
    """‖t‖_F in fp64."""
    return float(t.double().norm())


def originals(model) -> dict[str, torch.Tensor]:
    """Every target's full-precision W (out, in), fp64, before wrap rewrites or replaces anything."""
    return {n: m.weight.detach().double().clone() for n, m in svdadapt.resolve_targets(model).items()}
