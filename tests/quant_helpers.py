"""Shared by the quantized-base tests (tests/quant/, tests/modules/test_backends.py): norms, the targets'
full-precision weights before wrap, each layer's inputs and the fp64 EoRA optimum."""

from __future__ import annotations

import torch

import svdadapt


def fro(t: torch.Tensor) -> float:
    """‖t‖_F in fp64."""
    return float(t.double().norm())


def originals(model) -> dict[str, torch.Tensor]:
    """Every target's full-precision W (out, in), fp64, before wrap rewrites or replaces anything."""
    return {n: m.weight.detach().double().clone() for n, m in svdadapt.resolve_targets(model).items()}


def layer_inputs(model, names, ids) -> dict[str, torch.Tensor]:
    """The inputs X (N, in) each named Linear of ``model`` sees on token ids ``ids``, fp64."""
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: xs.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for n in names]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def eora_optimum(dW: torch.Tensor, X: torch.Tensor, rank: int) -> torch.Tensor:
    """argmin over rank-r M of ‖(ΔW − M)·Xᵀ‖_F in fp64: C = XᵀX/N = S·Sᵀ (S = Q·Λ^½), M* = [ΔW·S]_r·S⁺."""
    C = X.T @ X / X.shape[0]
    evals, Q = torch.linalg.eigh(C)
    keep = evals > evals[-1] * 1e-12  # fp64 eigenvalues below 1e-12·λ_max are rounding (d·u64 ≈ 1e-14)
    evals, Q = evals[keep], Q[:, keep]
    U, s, Vh = torch.linalg.svd(dW @ (Q * evals.sqrt()), full_matrices=False)
    return (U[:, :rank] * s[:rank]) @ Vh[:rank] @ (Q / evals.sqrt()).T
