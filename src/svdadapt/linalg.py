"""Dense linear algebra for svdadapt: truncated SVDs, covariance whitening, damped solves.

Tensors in, tensors out; nothing here knows about ``nn.Module``. Every routine works in the dtype it is
given (callers pass fp32 or fp64) and never touches the global RNG: randomness comes from an explicit
``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "TruncatedSVD",
    "full_svd",
    "randomized_svd",
    "truncated_svd",
    "choose_svd",
    "whitening",
    "damped_cholesky",
    "DEFAULT_NITER",
    "DEFAULT_OVERSAMPLE",
]

# Block-Krylov defaults: 4 power steps with a 16-column oversampled block capture >= 99.9% of the optimal
# rank-16 energy on every Linear of SmolLM2-135M (see benchmarks/bench_init.py), at a few ms per matrix.
DEFAULT_NITER = 4
DEFAULT_OVERSAMPLE = 16


@dataclass
class TruncatedSVD:
    """``U`` (m, k), ``S`` (k,) descending, ``Vh`` (k, n) with ``M ≈ U @ diag(S) @ Vh``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def _take(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, largest: bool) -> TruncatedSVD:
    idx = slice(0, rank) if largest else slice(S.shape[0] - rank, S.shape[0])
    return TruncatedSVD(U[:, idx].contiguous(), S[idx].contiguous(), Vh[idx, :].contiguous())


def full_svd(M: torch.Tensor, rank: int, largest: bool = True) -> TruncatedSVD:
    """Exact truncated SVD of ``M`` (m, n): the ``rank`` largest (or smallest) singular triplets.

    LAPACK is 2-3.5x slower on wide matrices than on their transpose, so a wide ``M`` is decomposed as
    ``Mᵀ`` and the factors swapped back.
    """
    if M.shape[0] < M.shape[1]:
        t = full_svd(M.mT, rank, largest)
        return TruncatedSVD(t.Vh.mT.contiguous(), t.S, t.U.mT.contiguous())
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return _take(U, S, Vh, rank, largest)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def randomized_svd(
    M: torch.Tensor,
    rank: int,
    *,
    niter: int = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE,
    generator: torch.Generator | None = None,
) -> TruncatedSVD:
    """Top-``rank`` SVD of ``M`` (m, n) by a randomized block-Krylov method.

    A Gaussian block Ω (n, b), b = rank + oversample, is pushed through ``niter`` power steps
    ``(M Mᵀ)^i M Ω``, each re-orthonormalized by QR. Unlike plain subspace iteration (Halko et al. 2011),
    which keeps only the last block, every block is kept: the Krylov space
    ``[MΩ, (MMᵀ)MΩ, …]`` of (niter + 1)·b columns is orthonormalized and the triplets come from the SVD of
    the small projection ``Qᵀ M`` (Rayleigh-Ritz). On the flat spectra of pretrained weights this converges
    far faster per matrix product (Musco & Musco 2015).

    Args:
        M: (m, n) floating matrix.
        rank: number of triplets returned.
        niter: power steps (Krylov blocks beyond the first).
        oversample: extra columns per block.
        generator: source of the Gaussian sketch; the same generator state gives bit-identical results.
    Returns:
        ``TruncatedSVD`` with U (m, rank), S (rank,), Vh (rank, n).
    """
    m, n = M.shape
    if m < n:  # sketch the short side: the Krylov basis then lives in the smaller space
        t = randomized_svd(M.mT, rank, niter=niter, oversample=oversample, generator=generator)
        return TruncatedSVD(t.Vh.mT.contiguous(), t.S, t.U.mT.contiguous())
    b = min(rank + oversample, n)
    if (niter + 1) * b >= n:  # the Krylov space would span everything: exact is cheaper
        return full_svd(M, rank)
    # drawn on the generator's device (CPU by default), so a seed gives the same sketch on any device
    omega = torch.randn(n, b, generator=generator, dtype=M.dtype).to(M.device)
    Q = _orth(M @ omega)  # (m, b)
    blocks = [Q]
    for _ in range(niter):
        Z = _orth(M.mT @ Q)  # (n, b)
        Q = _orth(M @ Z)  # (m, b)
        blocks.append(Q)
    K = _orth(torch.cat(blocks, dim=1))  # (m, (niter+1)·b)
    Ub, S, Vh = torch.linalg.svd(K.mT @ M, full_matrices=False)  # small: ((niter+1)b, n)
    return TruncatedSVD((K @ Ub[:, :rank]).contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous())


def choose_svd(shape: tuple[int, int], rank: int, largest: bool, niter: int, oversample: int) -> str:
    """The ``svd="auto"`` rule: ``"full"`` or ``"randomized"`` for a matrix of ``shape`` at ``rank``.

    Bottom-r triplets (MiLoRA, CorDA-KPA) need the full spectrum. Top-r triplets use the block-Krylov sketch
    unless its basis would cover a large part of the short side, where LAPACK is as fast and exact.
    """
    if not largest:
        return "full"
    short = min(shape)
    return "full" if (niter + 1) * (rank + oversample) * 2 > short else "randomized"


def truncated_svd(
    M: torch.Tensor,
    rank: int,
    *,
    largest: bool = True,
    svd: str = "auto",
    niter: int = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE,
    generator: torch.Generator | None = None,
) -> TruncatedSVD:
    """Rank-``rank`` truncated SVD of ``M`` by ``svd`` in {"auto", "full", "randomized"}.

    ``largest=False`` (the smallest triplets) only exists as an exact SVD: a randomized sketch cannot find
    the bottom of a spectrum, so asking for it raises ``ValueError``.
    """
    if svd == "auto":
        svd = choose_svd(tuple(M.shape), rank, largest, niter, oversample)
    if svd == "full":
        return full_svd(M, rank, largest)
    if svd == "randomized":
        if not largest:
            raise ValueError(
                "svd='randomized' cannot compute the smallest singular triplets (milora, corda mode='kpa'); "
                "use svd='full' or 'auto'"
            )
        return randomized_svd(M, rank, niter=niter, oversample=oversample, generator=generator)
    raise ValueError(f"svd must be 'auto', 'full' or 'randomized', got {svd!r}")


def damped_cholesky(C: torch.Tensor, damping: float = 0.01, max_cond: float = 1e6) -> tuple[torch.Tensor, float]:
    """Cholesky factor of ``C_d = C + λ·mean(diag C)·I`` with λ doubled from ``damping`` until C_d is
    positive definite and its condition number is at most ``max_cond``.

    Args:
        C: (d, d) symmetric positive semi-definite covariance.
    Returns:
        ``(L, λ)``: the lower factor (d, d) with ``L Lᵀ = C_d``, and the damping factor used.
    """
    d = C.shape[0]
    scale = C.diagonal().mean()
    if not torch.isfinite(scale) or scale <= 0:
        raise ValueError(f"covariance has non-positive or non-finite mean diagonal {scale.item()}")
    eig = torch.linalg.eigvalsh(C)  # ascending; C is symmetric
    lam = damping
    for _ in range(64):
        shift = lam * scale
        lo, hi = eig[0] + shift, eig[-1] + shift
        if lo > 0 and hi / lo <= max_cond:
            L, info = torch.linalg.cholesky_ex(C + shift * torch.eye(d, dtype=C.dtype, device=C.device))
            if info.item() == 0:
                return L, lam
        lam = lam * 2 if lam > 0 else 1e-6  # damping=0 that fails must still grow
    raise ValueError(f"could not damp the covariance to a condition number below {max_cond:g}")


def whitening(C: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Square root and pseudo-inverse square root of a covariance, in fp64.

    With ``C = Q Λ Qᵀ``: ``S = Q Λ^½`` (d, k) satisfies ``S Sᵀ = C`` on the kept space and
    ``S⁺ = Λ^-½ Qᵀ`` (k, d). Eigenvalues below ``λ_max·rtol`` (default ``d·eps(fp32)``) are dropped, never
    divided by, so rank-deficient covariances (few tokens, dead channels) give finite factors.

    Returns:
        ``(S, S_pinv)`` in fp64, shapes (d, k) and (k, d) with k the number of kept eigenvalues.
    """
    C64 = C.to(torch.float64)
    C64 = (C64 + C64.mT) / 2
    evals, Q = torch.linalg.eigh(C64)
    if rtol is None:
        rtol = C.shape[0] * torch.finfo(torch.float32).eps
    keep = evals > evals[-1].clamp_min(0) * rtol
    if not keep.any():
        raise ValueError("covariance is zero: calibration saw no signal for this layer")
    evals, Q = evals[keep], Q[:, keep]
    root = evals.sqrt()
    return Q * root, (Q / root).mT
