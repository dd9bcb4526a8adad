"""One pure function per initialization method, and the registry ``METHODS``.

Every method maps one weight matrix (plus, where it needs them, a covariance and a reference weight) to LoRA
factors in PEFT's convention: ``B`` (out, r), ``A`` (r, in), with the adapter adding ``s·B·A`` (s the LoRA
scaling). Whether the frozen base is rewritten to ``W − s·B·A`` is a property of the method
(``MethodSpec.rewrites_base``); :func:`finish` applies it with the rounding rules of DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .linalg import DEFAULT_NITER, DEFAULT_OVERSAMPLE, TruncatedSVD, damped_cholesky, truncated_svd, whitening

__all__ = ["Init", "MethodSpec", "METHODS", "get_method", "pissa", "milora", "corda", "eora", "finish"]


@dataclass
class Init:
    """Result of one method on one layer.

    ``A`` (r, in) and ``B`` (out, r) in fp32 or fp64; ``sigma`` (r,) the singular values the adapter took;
    ``stats`` small per-layer numbers for reports (captured energy, damping, kept rank).
    """

    A: torch.Tensor
    B: torch.Tensor
    sigma: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def _factors(t: TruncatedSVD, scaling: float, right: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U·diag(√(S/s)), A = diag(√(S/s))·Vh (·right): s·B·A = U·diag(S)·Vh (·right)."""
    root = (t.S / scaling).sqrt()
    B = t.U * root  # (out, r)
    Vh = t.Vh if right is None else t.Vh @ right
    A = root[:, None] * Vh  # (r, in)
    return A, B


def _svd_options(svd: str, niter: int | None, oversample: int, generator: torch.Generator | None) -> dict[str, Any]:
    return dict(svd=svd, niter=niter, oversample=oversample, generator=generator)


@torch.no_grad()
def pissa(W: torch.Tensor, *, rank: int, scaling: float, svd: str = "auto", niter: int | None = DEFAULT_NITER,
          oversample: int = DEFAULT_OVERSAMPLE, generator: torch.Generator | None = None, largest: bool = True,
          **_: Any) -> Init:
    """PiSSA: the top-``rank`` singular triplets of ``W`` (out, in); s·B·A = [W]_r."""
    t = truncated_svd(W, rank, largest=largest, **_svd_options(svd, niter, oversample, generator))
    A, B = _factors(t, scaling)
    total = torch.linalg.vector_norm(W).square()  # ‖W‖², without a W-sized temporary
    return Init(A, B, t.S, {"energy": float(t.S.pow(2).sum() / total)})


@torch.no_grad()
def milora(W: torch.Tensor, **kw: Any) -> Init:
    """MiLoRA: the bottom-``rank`` singular triplets of ``W`` (out, in)."""
    kw["largest"] = False
    return pissa(W, **kw)


@torch.no_grad()
def prepare_corda(C: torch.Tensor, damping: float = 0.01, **_: Any) -> dict[str, Any]:
    """Per-covariance work shared by every layer that reads the same input: C_d and its Cholesky factor."""
    C64 = C.to(torch.float64)
    L, lam = damped_cholesky(C64, damping)
    eye = torch.eye(C64.shape[0], dtype=C64.dtype, device=C64.device)
    Cd = C64 + lam * C64.diagonal().mean() * eye  # as damped_cholesky formed it; cheaper than L @ Lᵀ
    return {"Cd": Cd, "L": L, "damping": lam}


@torch.no_grad()
def corda(W: torch.Tensor, *, rank: int, scaling: float, prepared: dict[str, Any], mode: str = "ipa",
          svd: str = "auto", niter: int | None = DEFAULT_NITER, oversample: int = DEFAULT_OVERSAMPLE,
          generator: torch.Generator | None = None, **_: Any) -> Init:
    """CorDA: SVD of W·C_d (out, in); IPA keeps the top ``rank`` triplets, KPA the bottom.

    With V̂ᵀ = Vᵀ·C_d⁻¹ (a Cholesky solve, no explicit inverse), W = U·S·V̂ᵀ exactly and
    s·B·A = U_r·S_r·V̂_rᵀ.
    """
    Cd, L = prepared["Cd"], prepared["L"]
    WC = (W.to(torch.float64) @ Cd).to(W.dtype)  # (out, in)
    t = truncated_svd(WC, rank, largest=(mode == "ipa"), **_svd_options(svd, niter, oversample, generator))
    Vhat_h = torch.cholesky_solve(t.Vh.to(torch.float64).mT, L).mT.to(W.dtype)  # (r, in) = Vh_r·C_d⁻¹
    t = TruncatedSVD(t.U, t.S, Vhat_h)
    A, B = _factors(t, scaling)
    return Init(A, B, t.S, {"energy": float(t.S.pow(2).sum() / WC.pow(2).sum()), "damping": prepared["damping"]})


@torch.no_grad()
def prepare_eora(C: torch.Tensor, rtol: float | None = None, **_: Any) -> dict[str, Any]:
    """Per-covariance whitening S (d, k) and S⁺ (k, d) in fp64."""
    S, S_pinv = whitening(C, rtol)
    return {"S": S, "S_pinv": S_pinv}


@torch.no_grad()
def eora(W: torch.Tensor, *, rank: int, scaling: float, prepared: dict[str, Any], reference: torch.Tensor,
         svd: str = "auto", niter: int | None = DEFAULT_NITER, oversample: int = DEFAULT_OVERSAMPLE,
         generator: torch.Generator | None = None, **_: Any) -> Init:
    """EoRA: the rank-``rank`` M minimizing ‖(ΔW − M)·X‖_F, ΔW = reference − W (out, in).

    M* = [ΔW·S]_r·S⁺ with S·Sᵀ = C; the base (the compressed ``W``) is left untouched. If C has fewer
    than ``rank`` usable directions the extra adapter rows are zero.
    """
    S, S_pinv = prepared["S"], prepared["S_pinv"]
    dW = reference.to(torch.float64) - W.to(torch.float64)
    M = (dW @ S).to(W.dtype)  # (out, k)
    k = min(rank, *M.shape)
    t = truncated_svd(M, k, **_svd_options(svd, niter, oversample, generator))
    A, B = _factors(t, scaling, right=S_pinv.to(W.dtype))
    if k < rank:  # rank-deficient calibration: pad with zero directions
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    err0 = M.pow(2).sum()
    resid = (err0 - t.S.pow(2).sum()).clamp_min(0)
    return Init(A, B, t.S, {"energy": float(t.S.pow(2).sum() / err0) if err0 > 0 else 1.0,
                            "residual_error": float((resid / err0).sqrt()) if err0 > 0 else 0.0,
                            "kept_rank": float(S.shape[1])})


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: what a method computes and what it needs."""

    name: str
    init: Callable[..., Init]
    needs_calibration: bool
    needs_reference: bool
    rewrites_base: bool
    description: str
    prepare: Callable[..., dict[str, Any]] | None = None


METHODS: dict[str, MethodSpec] = {
    "pissa": MethodSpec("pissa", pissa, False, False, True, "top-r singular triplets of W (principal components)"),
    "milora": MethodSpec("milora", milora, False, False, True, "bottom-r singular triplets of W (minor components)"),
    "corda": MethodSpec("corda", corda, True, False, True,
                        "context-oriented SVD of W·C: mode='ipa' top-r, mode='kpa' bottom-r", prepare_corda),
    "eora": MethodSpec("eora", eora, True, True, False,
                       "rank-r compensation of W_ref − W_c in the calibration-whitened space", prepare_eora),
}


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods are: {', '.join(METHODS)}")
    return METHODS[name]


@torch.no_grad()
def finish(W: torch.Tensor, init: Init, scaling: float, adapter_dtype: torch.dtype, base_dtype: torch.dtype,
           rewrite: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round A and B to the adapter dtype, then (if ``rewrite``) base = W − s·B·A in fp32 from the *rounded*
    factors, cast to the base dtype once: the wrapped layer's output then equals the original's up to
    one rounding of the base.

    Returns ``(A, B, base)``; base is None when the method keeps the base as it is.
    """
    A = init.A.to(adapter_dtype)
    B = init.B.to(adapter_dtype)
    if not rewrite:
        return A, B, None
    compute = torch.float64 if W.dtype == torch.float64 else torch.float32
    base = torch.addmm(W.to(compute), B.to(compute), A.to(compute), alpha=-scaling)  # one pass over W
    return A, B, base.to(base_dtype)
