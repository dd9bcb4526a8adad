"""A low-rank update re-factored at a smaller rank: the exact SVD of ΔW = B·A from its thin factors, its best rank-k
approximation (plain, or weighted by an input covariance), the rank an energy threshold needs, serving-slot rounding.

ΔW (out, in) is only ever given by factors B (out, w), A (w, in), w small (an exported adapter's [B, −B₀], [A; A₀],
w = 2r). With B = Q_B·R_B and Aᵀ = Q_A·R_A (reduced QR), ΔW = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so the SVD of the w×w core
R_B·R_Aᵀ = U_c·Σ·V_cᵀ gives ΔW's own: U = Q_B·U_c, V = Q_A·V_c. Cost O((out + in)·w²), in fp64; the dense out×in
ΔW is never formed. By Eckart–Young the rank-k truncation M = U_k·Σ_k·V_kᵀ minimizes ‖ΔW − M‖_F with the
error √(Σ_{i>k} σ_i²).

Weighted by the input covariance C = XᵀX/N of the layer (``whitening(C)`` = S, S⁺ with S·Sᵀ = C): the M of rank k
minimizing ‖(ΔW − M)·X‖_F = ‖(ΔW − M)·S‖_F is M = [ΔW·S]_k·S⁺ (EoRA's solution), and ΔW·S = B·(A·S) has thin factors
too: the same QR route on (B, A·S).

Tensors in, tensors out (torch only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["VLLM_SLOTS", "LowRankSVD", "lowrank_svd", "lowrank_norm", "energy_rank", "round_rank", "Truncation",
           "truncate"]

# the LoRA ranks vLLM serves (its ``max_lora_rank`` choices up to 256)
VLLM_SLOTS = (8, 16, 32, 64, 128, 256)
_U64 = torch.finfo(torch.float64).eps / 2  # unit roundoff of fp64


@dataclass
class LowRankSVD:
    """The SVD of B·A: U (out, p), S (p,) descending, Vh (p, in), p = min(out, in, w); ``floor``: the level below
    which a computed σ is rounding (those come back as 0), ``rank``: how many σ are above it (ΔW's numerical rank)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    floor: float
    rank: int


def _floor(B: torch.Tensor, A: torch.Tensor) -> float:
    """Rounding level of σ(B·A) computed by Householder QRs and an SVD in fp64: the computed triplets are exact for
    (B + δB)(A + δA) with ‖δB‖_F ≲ √(out·w)·u·‖B‖_F, ‖δA‖_F ≲ √(in·w)·u·‖A‖_F (Higham §19.3, probabilistic √ form),
    so each σ moves by at most (√(out·w) + √(in·w))·u·‖B‖_F·‖A‖_F; twice that is the floor."""
    (out, w), n = B.shape, A.shape[1]
    return 2.0 * (math.sqrt(out * w) + math.sqrt(n * w)) * _U64 * float(B.norm()) * float(A.norm())


def _core(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_B (out, p_B), core R_B·R_Aᵀ (p_B, p_A), Q_A (in, p_A)) of B (out, w), A (w, in), in fp64."""
    Qb, Rb = torch.linalg.qr(B.to(torch.float64), mode="reduced")
    Qa, Ra = torch.linalg.qr(A.to(torch.float64).mT, mode="reduced")
    return Qb, Rb @ Ra.mT, Qa


@torch.no_grad()
def lowrank_svd(B: torch.Tensor, A: torch.Tensor) -> LowRankSVD:
    """The exact SVD of ΔW = B·A for B (out, w), A (w, in), in fp64, without forming ΔW (the module docstring)."""
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"lowrank_svd needs B (out, w) and A (w, in), got {tuple(B.shape)} and {tuple(A.shape)}")
    Qb, core, Qa = _core(B, A)
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    floor = _floor(B, A)
    live = S > floor
    S = torch.where(live, S, torch.zeros_like(S))
    return LowRankSVD(Qb @ Uc, S, Vch @ Qa.mT, floor, int(live.sum()))


@torch.no_grad()
def lowrank_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F for B (out, w), A (w, in), from the core of the QRs (fp64; no cancellation of a Gram trace)."""
    return float(_core(B, A)[1].norm())


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest k with Σ_{i<k} σ_i² ≥ energy·Σ σ_i² (S descending), at least 1; energy in (0, 1]. With
    ``energy=1`` this is the number of nonzero σ (the running sum stops growing after the last one)."""
    cum = torch.cumsum(S.to(torch.float64).pow(2), 0)
    total = float(cum[-1]) if cum.numel() else 0.0
    if total == 0.0:
        return 1
    k = int((cum < energy * total).sum()) + 1
    return min(k, S.numel())


def round_rank(k: int, slots: tuple[int, ...], cap: int) -> int | None:
    """``k`` rounded up to the next of ``slots`` (ascending), then at most ``cap`` (the layer's available rank);
    None when ``k`` exceeds the largest slot (and ``cap``: a layer whose whole rank is below it is not rounded)."""
    if k >= cap:
        return cap
    up = next((s for s in slots if s >= k), None)
    return None if up is None else min(up, cap)


@dataclass
class Truncation:
    """The rank-k M = B_k·A_k (B_k (out, k), A_k (k, in), fp64, √σ on each side) approximating ΔW = B·A, with
    ``energy`` (its kept fraction of the criterion's ‖·‖², plain or whitened), ``error`` ‖ΔW − M‖_F / ‖ΔW‖_F,
    ``whitened_error`` ‖(ΔW − M)·S‖_F / ‖ΔW·S‖_F (None without a covariance), ``available`` ΔW's numerical rank
    (of ΔW·S when weighted)."""

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    available: int
    energy: float
    error: float
    whitened_error: float | None


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _cut(t: LowRankSVD, k: int, right: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_k, A_k) from the first k triplets of ``t``, √σ on each side; A_k·``right`` (S⁺ when weighted)."""
    root = t.S[:k].sqrt()
    Bk, Ak = t.U[:, :k] * root, root[:, None] * t.Vh[:k]
    return Bk, (Ak if right is None else Ak @ right)


@torch.no_grad()
def truncate(B: torch.Tensor, A: torch.Tensor, k: int | None = None, *, energy: float | None = None,
             whiten: tuple[torch.Tensor, torch.Tensor] | None = None, weighted: bool = False,
             slots: tuple[int, ...] | None = None) -> Truncation:
    """The best rank-k approximation of ΔW = B·A (B (out, w), A (w, in)).

    ``k``: the rank (at most the available min(out, in, w)), or ``energy``: the smallest k whose kept energy is at
    least that fraction; neither: ``energy=1`` (ΔW's numerical rank: exact). ``slots``: k rounded up to the next of
    them (``round_rank``; ``ValueError`` above the largest). ``whiten``: (S (in, c), S⁺ (c, in)) of the layer's
    input covariance (``linalg.whitening``): the whitened error is reported, and with ``weighted`` M is the
    optimum in ‖(ΔW − M)·S‖_F and the energy is ΔW·S's. Factors in fp64."""
    if weighted and whiten is None:
        raise ValueError("weighted=True needs a covariance (whiten)")
    S64 = None if whiten is None else whiten[0].to(torch.float64)
    t = lowrank_svd(B, A @ S64 if weighted else A)
    cap = t.S.numel()
    if k is None:
        k = energy_rank(t.S, 1.0 if energy is None else energy)
    k = max(1, min(k, cap))
    if slots is not None:
        up = round_rank(k, slots, cap)
        if up is None:
            raise ValueError(f"rank {k} is above the largest slot {max(slots)}")
        k = up
    Bk, Ak = _cut(t, k, whiten[1].to(torch.float64) if weighted else None)
    B64, A64 = B.to(torch.float64), A.to(torch.float64)
    kept, tail = float(t.S[:k].pow(2).sum()), float(t.S[k:].pow(2).sum())  # the tail summed: no cancellation
    total = kept + tail
    D_B, D_A = torch.cat([B64, -Bk], 1), torch.cat([A64, Ak], 0)  # ΔW − M = [B, −B_k]·[A; A_k]
    if weighted:
        error = _ratio(lowrank_norm(D_B, D_A), lowrank_norm(B64, A64))
        white = math.sqrt(_ratio(tail, total))
    else:
        error = math.sqrt(_ratio(tail, total))
        white = None if S64 is None else _ratio(lowrank_norm(D_B, D_A @ S64), lowrank_norm(B64, A64 @ S64))
    return Truncation(Bk, Ak, k, t.rank, _ratio(kept, total) if total > 0 else 1.0, error, white)
