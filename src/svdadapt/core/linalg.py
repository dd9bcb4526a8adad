"""Dense linear algebra for svdadapt: truncated SVDs, covariance whitening, damped solves.

Tensors in, tensors out; nothing here knows about ``nn.Module``. Every routine works in the dtype it is
given (callers pass fp32 or fp64) and never touches the global RNG: randomness comes from an explicit
``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "TruncatedSVD",
    "full_svd",
    "gram_bottom_svd",
    "gram_top_svd",
    "randomized_svd",
    "truncated_svd",
    "choose_svd",
    "whitening",
    "damped_cholesky",
    "DEFAULT_NITER",
    "auto_niter",
    "DEFAULT_OVERSAMPLE",
]

# Block-Krylov defaults. niter=None picks ⌊1.5·log2(n)⌋ − 5 Krylov steps for a short side n (7 at n = 300, 8 at 576,
# 10 at 1024, 11 at 2048, 13 at 4096): block Krylov needs O(log n / sqrt(eps)) steps for a given accuracy whatever
# the spectrum (Musco & Musco 2015), and on Gaussian matrices (the flattest spectra there are) the steps needed for
# 99.5% of the optimal rank-16 energy grow faster than log2(n): 7, 8, 9, 11 at n = 300, 576, 1024, 2048 (the
# basis covers less of a larger space). The rule is the smallest of that slope measured to clear 99.5% on every
# matrix tried, SmolLM2's weights, a random h2048 Llama's and Gaussian ones; round(log2 n), used before, spent a
# step too many at n ≤ 1024. Wider blocks with fewer steps were as accurate but slower per captured digit, and an
# adaptive stop (Ritz-energy increments) saved steps only on decaying spectra, at the price of eigensolves about
# as costly as the steps saved. The measurements: docs/benchmarks.md, "Behind the defaults".
DEFAULT_NITER: int | None = None
DEFAULT_OVERSAMPLE = 0
# the block is never thinner than this: on CPU BLAS a (·, 8) product costs about as much as a (·, 16) one,
# and the wider block converges faster
MIN_BLOCK = 16
# below this short side the exact fp64 Gram route (gram_top_svd) beats any sketch: 192×576, 2.9 ms against
# 5.4 ms for LAPACK's SVD and ~4 ms for a block-Krylov sketch on one core
SMALL_SIDE = 256
# a matrix of at least this many elements (16 MiB in fp32, beyond a core's L2 cache) is read once per Krylov step,
# in row chunks of CHUNK_BYTES that stay in cache between the chunk's two products: 5632×2048, 10 vs 14 ms per
# step on one core; below it two whole products are as fast
FUSE_ELEMENTS = 1 << 22
CHUNK_BYTES = 1 << 20
# a Krylov direction whose new part is below this fraction of its block's norm is rounding noise (fp32)
_DEAD = 1e-5


@dataclass
class TruncatedSVD:
    """``U`` (m, k), ``S`` (k,) descending, ``Vh`` (k, n) with ``M ≈ U @ diag(S) @ Vh``."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def auto_niter(short_side: int) -> int:
    """Krylov steps for ``niter=None``: ⌊1.5·log2(short side)⌋ − 5, at least 2."""
    return max(2, math.floor(1.5 * math.log2(max(short_side, 1))) - 5)


def _take(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, largest: bool) -> TruncatedSVD:
    idx = slice(0, rank) if largest else slice(S.shape[0] - rank, S.shape[0])
    return TruncatedSVD(U[:, idx].contiguous(), S[idx].contiguous(), Vh[idx, :].contiguous())


def _transposed(t: TruncatedSVD) -> TruncatedSVD:
    """The SVD of Mᵀ from ``t``, the SVD of M: U and Vh swapped (and transposed)."""
    return TruncatedSVD(t.Vh.mT.contiguous(), t.S, t.U.mT.contiguous())


def _gram_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M in fp64, eigenvalues ascending, eigenvectors) of the fp64 Gram matrix MᵀM of a tall ``M`` (m, n)."""
    M64 = M.to(torch.float64)
    evals, Q = torch.linalg.eigh(M64.mT @ M64)
    return M64, evals, Q


def full_svd(M: torch.Tensor, rank: int, largest: bool = True) -> TruncatedSVD:
    """Exact truncated SVD of ``M`` (m, n): the ``rank`` largest (or smallest) singular triplets.

    LAPACK is 2-3.5x slower on wide matrices than on their transpose, so a wide ``M`` is decomposed as
    ``Mᵀ`` and the factors swapped back.
    """
    if M.shape[0] < M.shape[1]:
        t = full_svd(M.mT, rank, largest)
        return _transposed(t)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return _take(U, S, Vh, rank, largest)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _project_out(X: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """X − done·(doneᵀ·X) for X (n, b) and an orthonormal ``done`` (n, j): two GEMMs, the subtraction fused."""
    return torch.addmm(X, done, done.mT @ X, alpha=-1)


def _extend(X: torch.Tensor, done: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """An orthonormal (n, b) block, orthogonal to the orthonormal ``done`` (n, j), spanning what ``X``
    (n, b) adds to ``span(done)``.

    Block Gram-Schmidt, twice ("twice is enough"): one pass loses orthogonality once directions converge.
    Columns of ``X`` that add nothing above rounding level (``M`` of rank below the basis size, or an
    invariant subspace reached) are replaced by Gaussian directions before the second pass: a QR would
    otherwise invent directions orthonormal among themselves but not to ``done``. Householder QR of the
    (n, b) blocks, not CholeskyQR2: at b = 16 one QR costs about what one more small op does (25–130 µs on
    n = 576..2048), and it needs no conditioning check.
    """
    floor = _DEAD * float(torch.linalg.vector_norm(X))
    Q, R = torch.linalg.qr(_project_out(X, done), mode="reduced")
    diag = R.diagonal().abs()
    if float(diag.min()) <= floor:
        dead = diag <= floor
        fresh = torch.randn(X.shape[0], int(dead.sum()), generator=generator, dtype=X.dtype)
        Q[:, dead] = fresh.to(X.device)
    return _orth(_project_out(Q, done))


def _power_step(M: torch.Tensor, V: torch.Tensor, Y: torch.Tensor, chunk: int) -> torch.Tensor:
    """``Y ← M·V`` (written in place) and ``Mᵀ·Y`` returned, for M (m, n), V (n, b), Y (m, b): in row chunks of
    ``chunk`` rows, each chunk's second product reading it from cache (one pass over M instead of two); two whole
    products when ``chunk >= m``."""
    m = M.shape[0]
    if chunk >= m:
        torch.mm(M, V, out=Y)
        return M.mT @ Y
    X = None
    for s in range(0, m, chunk):
        Mc, Yc = M[s:s + chunk], Y[s:s + chunk]
        torch.mm(Mc, V, out=Yc)
        X = Mc.mT @ Yc if X is None else X.addmm_(Mc.mT, Yc)
    return X


def _orientation(M: torch.Tensor) -> tuple[bool, int]:
    """(work on ``Mᵀ``?, rows per chunk) for ``randomized_svd``. Below ``FUSE_ELEMENTS`` the basis goes on the
    short side (the cheap orthogonalization) and each step is two whole products; above it the matrix is read in
    its contiguous orientation, row chunks of ``CHUNK_BYTES``, whichever side the basis then lands on (the
    orthogonalization, a few % of a step, matters less than reading M once per step). Off the CPU the chunks would
    only add kernel launches: two whole products there."""
    m, n = M.shape
    if m * n < FUSE_ELEMENTS or M.device.type != "cpu" or not (M.is_contiguous() or M.mT.is_contiguous()):
        return m < n, max(m, n)
    flip = not M.is_contiguous()
    cols = m if flip else n
    return flip, max(1, CHUNK_BYTES // (M.element_size() * cols))


def randomized_svd(
    M: torch.Tensor,
    rank: int,
    *,
    niter: int | None = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE,
    generator: torch.Generator | None = None,
) -> TruncatedSVD:
    """Top-``rank`` SVD of ``M`` (m, n) by randomized block Krylov (block Lanczos on MᵀM).

    A Gaussian block Ω of b = max(rank + oversample, MIN_BLOCK) columns spans the first block of the Krylov space
    ``[Ω, (MᵀM)Ω, …, (MᵀM)^niter Ω]`` on the basis side of ``M`` (the short side; for a matrix above
    ``FUSE_ELEMENTS`` its contiguous column side, the first block then ``Mᵀ·Ω`` when that is the long side, one
    more product and half a step more accurate). Unlike plain subspace iteration (Halko et al. 2011;
    ``torch.svd_lowrank``), which keeps only its last block, every block is kept: on the flat spectra of pretrained
    weights this converges far faster per matrix product (Musco & Musco 2015).

    Each new block is orthogonalized against all earlier ones (block Gram-Schmidt, two passes) *before*
    it is multiplied on, so the basis ``K`` (n, (niter+1)·b) comes out orthonormal and the products
    ``Y = M·K`` are the ones the iteration computed anyway: the Rayleigh-Ritz step needs no further pass
    over ``M`` and no QR of the whole basis, only the small Gram matrix ``YᵀY`` and its eigenvectors.
    Cost: 2·niter + 1 products of ``M`` with a (·, b) block (one pass over M per step above ``FUSE_ELEMENTS``).

    The Ritz approximation ``U·diag(S)·Vh = M·V·Vᵀ`` (V = K·W) is the best rank-``rank`` approximation of
    ``M`` restricted to the row space ``span(K)``; its energy ‖U S Vh‖² = Σ S² never exceeds the optimum.

    Args:
        M: (m, n) floating matrix (fp32 or fp64; the work is done in its dtype).
        rank: number of triplets returned.
        niter: Krylov blocks beyond the first; None: ``auto_niter(min(m, n))``.
        oversample: extra columns per block.
        generator: source of the Gaussian sketch (drawn on the CPU, so a seed gives the same sketch on any
            device); the same generator state gives bit-identical results.
    Returns:
        ``TruncatedSVD`` with U (m, rank), S (rank,), Vh (rank, n). If ``M`` has fewer than ``rank`` nonzero
        singular values, the extra triplets have S = 0 and zero U columns.
    """
    m, n = M.shape
    if niter is None:
        niter = auto_niter(min(m, n))
    b = min(max(rank + oversample, MIN_BLOCK), min(m, n))
    if (niter + 1) * b >= min(m, n):  # the Krylov space would span everything: exact is cheaper
        return full_svd(M, rank)
    flip, chunk = _orientation(M)
    if flip:
        t = _block_krylov(M.mT, rank, niter, b, chunk, generator)
        return _transposed(t)
    return _block_krylov(M, rank, niter, b, chunk, generator)


def _block_krylov(M: torch.Tensor, rank: int, niter: int, b: int, chunk: int,
                  generator: torch.Generator | None) -> TruncatedSVD:
    """``randomized_svd``'s iteration on M (m, n) with the basis on its column side (n), blocks of ``b`` columns,
    ``niter`` steps, ``chunk`` rows per pass (``_power_step``)."""
    m, n = M.shape
    k = (niter + 1) * b
    # preallocated: the basis grows block by block into views, without re-concatenating each step
    K = torch.empty(n, k, dtype=M.dtype, device=M.device)  # orthonormal basis of the Krylov space
    Y = torch.empty(m, k, dtype=M.dtype, device=M.device)  # M @ K, filled as the iteration goes
    if n > m:  # basis on the long side: start in M's row space (MᵀΩ), not in its null space
        omega = torch.randn(m, b, generator=generator, dtype=M.dtype).to(M.device)
        K[:, :b] = _orth(M.mT @ omega)
    else:
        K[:, :b] = _orth(torch.randn(n, b, generator=generator, dtype=M.dtype).to(M.device))
    for j in range(niter + 1):
        blk = slice(j * b, (j + 1) * b)
        if j == niter:
            torch.mm(M, K[:, blk], out=Y[:, blk])
            break
        # (MᵀM)·block; Y needs no normalization: the block it came from is orthonormal, so the growth
        # per step is at most σ₁², and the QR below rescales
        X = _power_step(M, K[:, blk], Y[:, blk], chunk)  # (n, b)
        K[:, (j + 1) * b : (j + 2) * b] = _extend(X, K[:, : (j + 1) * b], generator)
    # Ritz values/vectors of M on span(K): eigenpairs of KᵀMᵀMK = YᵀY, (k, k), in M's dtype. Forming the
    # Gram matrix costs absolute accuracy ~eps·σ₁² in σ², harmless for the top triplets this returns
    # (fp64 here was slower for the same captured energy).
    evals, W = torch.linalg.eigh(Y.mT @ Y)
    W = W[:, -rank:].flip(1)  # (k, rank), descending
    S = evals[-rank:].flip(0).clamp_min(0).sqrt()
    # U = M V / S. The Gram matrix resolves σ² only to ~k·eps·σ₁², so Ritz values below √(k·eps)·σ₁ are
    # noise: they come back as S = 0 with a zero U column rather than a unit vector of rounding error
    tiny = S[0].clamp_min(torch.finfo(M.dtype).tiny) * (k * torch.finfo(M.dtype).eps) ** 0.5
    live = S > tiny
    S = torch.where(live, S, torch.zeros_like(S))
    inv = torch.where(live, 1.0 / S.clamp_min(tiny), torch.zeros_like(S))
    U = (Y @ W) * inv
    return TruncatedSVD(U.contiguous(), S.contiguous(), (K @ W).mT.contiguous())


def gram_top_svd(M: torch.Tensor, rank: int) -> TruncatedSVD:
    """The ``rank`` largest singular triplets of ``M`` (m, n) from the fp64 eigendecomposition of the Gram matrix on
    its short side: G = MᵀM (n, n) for a tall M, V = G's top eigenvectors, σ = √λ, U = M·V/σ (in fp64).

    Exact (no sketch). Squaring does not hurt the top triplets: fp64 rounding moves σ_i² by ~n·eps64·σ₁², i.e.
    σ_i by n·eps64·σ₁²/(2σ_i), below fp32 LAPACK's eps32·σ₁ while σ_i ≥ n·(eps64/eps32)·σ₁/2 (~2·10⁻⁷·σ₁ at
    n = 192), and the subspaces by the same ratio; values below √(n·eps64)·σ₁, which the Gram does not resolve,
    come back as S = 0 with zero U columns (as ``randomized_svd``'s). fp64 input goes to ``full_svd`` (its LAPACK
    SVD is more accurate than this). Output in M's dtype, S descending.
    """
    m, n = M.shape
    if m < n:
        t = gram_top_svd(M.mT, rank)
        return _transposed(t)
    if M.dtype == torch.float64:
        return full_svd(M, rank)
    M64, evals, Q = _gram_eigh(M)  # ascending
    S = evals[-rank:].flip(0).clamp_min(0).sqrt()
    V = Q[:, -rank:].flip(1)
    tiny = float(S[0]) * math.sqrt(n * torch.finfo(torch.float64).eps)
    live = S > tiny
    inv = torch.where(live, 1.0 / S.clamp_min(max(tiny, torch.finfo(torch.float64).tiny)), torch.zeros_like(S))
    S = torch.where(live, S, torch.zeros_like(S))
    U = (M64 @ V) * inv
    return TruncatedSVD(U.to(M.dtype).contiguous(), S.to(M.dtype).contiguous(), V.mT.to(M.dtype).contiguous())


# The bottom-r Gram route (svd="auto", largest=False) is taken while the smallest returned σ is at least
# GRAM_FLOOR·n·σ₁ (n the short side). Forming G = MᵀM in fp64 and its eigh perturb σ² by ‖ΔG‖ ≈ n·eps64·σ₁²
# (typical constant; the worst case is larger), so σ_i moves by n·eps64·σ₁²/(2σ_i) and the bottom subspace by
# n·eps64·σ₁² / (σ²_{n-r} − σ²_{n-r+1}); fp32 LAPACK moves σ_i by ~eps32·σ₁ and the subspace by
# eps32·σ₁ / (σ_{n-r} − σ_{n-r+1}). The Gram route is the more accurate one of the two while
# σ_i ≥ n·(eps64/eps32)·σ₁ ≈ n·1.9e-9·σ₁ (machine epsilons); the floor keeps a factor 10 above that (n·1.9e-8:
# 1.1e-5 at n = 576, 7.6e-5 at n = 4096), where σ_i² is still ~n·1.6 times the Gram's rounding n·eps64·σ₁², so the
# test itself reads a resolved value.
GRAM_FLOOR = 10 * torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps


def gram_bottom_svd(M: torch.Tensor, rank: int) -> TruncatedSVD:
    """The ``rank`` smallest singular triplets of ``M`` (m, n) from the fp64 eigendecomposition of the Gram matrix
    on its short side: G = MᵀM (n, n) for a tall M, V = G's bottom eigenvectors, σ = √λ, U = M·V/σ (in fp64).

    Exact (no sketch), 1.4–1.8x faster than fp32 LAPACK's SVD on SmolLM2's and 2048×5632 matrices
    (docs/benchmarks.md, "Behind the defaults"). Squaring the condition number is what it costs: the result is
    returned only where it is at least as accurate as fp32 LAPACK's (``GRAM_FLOOR``); below that, and for fp64
    input (whose LAPACK SVD the Gram route cannot match), it is ``full_svd(M, rank, largest=False)``, bit for bit.
    Output in M's dtype, S descending like full_svd's.
    """
    m, n = M.shape
    if m < n:
        t = gram_bottom_svd(M.mT, rank)
        return _transposed(t)
    if M.dtype == torch.float64:
        return full_svd(M, rank, largest=False)
    M64, evals, Q = _gram_eigh(M)  # ascending
    top = float(evals[-1].clamp_min(0).sqrt())
    S = evals[:rank].clamp_min(0).sqrt().flip(0)  # descending, like full_svd's bottom
    if top == 0 or float(S[-1]) < GRAM_FLOOR * n * top:
        return full_svd(M, rank, largest=False)
    V = Q[:, :rank].flip(1)
    U = (M64 @ V) / S
    return TruncatedSVD(U.to(M.dtype).contiguous(), S.to(M.dtype).contiguous(), V.mT.to(M.dtype).contiguous())


def choose_svd(shape: tuple[int, int], rank: int, largest: bool, niter: int | None, oversample: int) -> str:
    """The ``svd="auto"`` rule: ``"full"``, ``"gram"`` or ``"randomized"`` for a matrix of ``shape`` at ``rank``.

    A short side of at most 256 (``SMALL_SIDE``) takes the fp64 Gram route, exact: ``gram_top_svd`` for the largest
    triplets, LAPACK (``"full"``) for the smallest (whose accuracy the squared condition number would cost).
    Above it, bottom-r triplets (MiLoRA, CorDA-KPA) need the full spectrum: ``"gram"`` (``gram_bottom_svd``, which
    falls back to LAPACK itself where it would be less accurate); top-r triplets use the block-Krylov sketch unless
    its basis, (niter + 1)·max(rank + oversample, 16) columns, would cover more than 3/4 of the short side: at 3/4
    coverage the sketch still costs about half of LAPACK's SVD on one CPU core, near full coverage as much
    (timings in docs/benchmarks.md, "Behind the defaults").
    """
    short = min(shape)
    if short <= SMALL_SIDE:
        return "gram" if largest else "full"
    if not largest:
        return "gram"
    if niter is None:
        niter = auto_niter(short)
    basis = (niter + 1) * max(rank + oversample, MIN_BLOCK)
    return "randomized" if 4 * basis <= 3 * short else "full"


def truncated_svd(
    M: torch.Tensor,
    rank: int,
    *,
    largest: bool = True,
    svd: str = "auto",
    niter: int | None = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE,
    generator: torch.Generator | None = None,
) -> TruncatedSVD:
    """Rank-``rank`` truncated SVD of ``M`` by ``svd`` in {"auto", "full", "randomized"} (and ``"gram"``, what
    "auto" picks for the smallest triplets of a large matrix, ``gram_bottom_svd``, and for the largest of a matrix
    with a short side up to 256, ``gram_top_svd``).

    ``largest=False`` (the smallest triplets) only exists exactly (LAPACK or the fp64 Gram route): a randomized
    sketch cannot find the bottom of a spectrum, so asking for it raises ``ValueError``.
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
    if svd == "gram":
        return gram_top_svd(M, rank) if largest else gram_bottom_svd(M, rank)
    raise ValueError(f"svd must be 'auto', 'full' or 'randomized', got {svd!r}")


def shift_diagonal(C: torch.Tensor, shift: torch.Tensor | float, inplace: bool = False) -> torch.Tensor:
    """C + shift·I (d, d), without building the identity (a d×d fp64 matrix for each covariance); in place with
    ``inplace``. The same values as ``C + shift * eye``."""
    out = C if inplace else C.clone()
    out.diagonal().add_(shift)
    return out


def damped_cholesky(C: torch.Tensor, damping: float = 0.01, max_cond: float = 1e6, *,
                    inplace: bool = False) -> tuple[torch.Tensor, float]:
    """Cholesky factor of ``C_d = C + λ·mean(diag C)·I`` with λ doubled from ``damping`` until C_d is
    positive definite and its condition number is at most ``max_cond``.

    Args:
        C: (d, d) symmetric positive semi-definite covariance.
        inplace: form C_d in ``C`` itself (no second d×d matrix): on return ``C`` holds C_d. A failed attempt
            restores C's diagonal exactly before the next.
    Returns:
        ``(L, λ)``: the lower factor (d, d) with ``L Lᵀ = C_d``, and the damping factor used.
    """
    d = C.shape[0]
    scale = C.diagonal().mean()
    if not torch.isfinite(scale) or scale <= 0:
        raise ValueError(f"covariance has non-positive or non-finite mean diagonal {scale.item()}")
    diagonal = C.diagonal().clone() if inplace else None

    def attempt(shift: torch.Tensor) -> torch.Tensor | None:
        L, info = torch.linalg.cholesky_ex(shift_diagonal(C, shift, inplace))
        if info.item() == 0:
            return L
        if inplace:
            C.diagonal().copy_(diagonal)
        return None

    if damping > 0 and d / damping + 1 <= max_cond:
        # for PSD C, λ_max ≤ trace = d·mean(diag), so cond(C_d) ≤ d/λ + 1 already: skip the eigenvalues
        # (an fp64 eigvalsh per input would dominate CorDA's decomposition time)
        L = attempt(damping * scale)
        if L is not None:
            return L, damping
    eig = torch.linalg.eigvalsh(C)  # ascending; C is symmetric
    lam = damping
    for _ in range(64):
        shift = lam * scale
        lo, hi = eig[0] + shift, eig[-1] + shift
        if lo > 0 and hi / lo <= max_cond:
            L = attempt(shift)
            if L is not None:
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
