"""Error bounds the numeric tests derive their tolerances from, so that a tolerance follows from the dtype, the
sizes, the number of accumulated products and the spectrum's gap, not from the CPU the suite was tuned on.

How the tests use them: an fp32 result computed by any BLAS/LAPACK kernel (any blocking, any number of threads,
FMA or not, AVX2, AVX-512 or AMX) is compared with an fp64 reference through a bound that holds for every
summation order (``gemm_error``), or, for an SVD, through LAPACK's backward error and the gap at the cut
(``truncated_svd_error``, ``subspace_angle``). Two fp32 implementations (ours and PEFT's) are compared through the
sum of their two bounds. A constant left in a test says in a comment why it needs no bound (a learning rate, a
"moved by more than" check, an fp64 comparison with orders of magnitude of margin). Import as
``from bounds import ...`` (tests/ is on sys.path).

Sources: N. J. Higham, *Accuracy and Stability of Numerical Algorithms* (2nd ed., 2002), §2.2 (u), §3.1 (γ_k,
Lemma 3.1, eq. 3.5 for dot products and matrix products), §19.3 and §20 (backward stability of Householder
methods); N. J. Higham and T. Mary, "A New Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci.
Comput. 41 (2019) (√k instead of k); P.-Å. Wedin, "Perturbation bounds in connection with singular value
decomposition", BIT 12 (1972) (sinΘ ≤ ‖E‖ / gap); H. Weyl (|σ̃_i − σ_i| ≤ ‖E‖₂).
"""

from __future__ import annotations

import math

import torch

MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}
SUBNORMAL_SPACING = {torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-(t+1) for a t-bit stored mantissa: |fl(x) − x| ≤ u·|x| for round-to-nearest (Higham §2.2).
    fp32 2^-24, fp64 2^-53, bf16 2^-8, fp16 2^-11."""
    return 2.0 ** -(MANTISSA[dtype] + 1)


def gamma(k: int, dtype: torch.dtype = torch.float32) -> float:
    """γ_k = k·u / (1 − k·u) (Higham Lemma 3.1): a dot product of length k computed in ``dtype`` in any order,
    with or without FMA, satisfies |fl(xᵀy) − xᵀy| ≤ γ_k·|x|ᵀ|y| (eq. 3.5). Needs k·u < 1."""
    ku = k * unit_roundoff(dtype)
    assert ku < 1, f"gamma({k}) undefined in {dtype}"
    return ku / (1 - ku)


def gemm_error(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype = torch.float32, *,
               C: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """Elementwise bound on |fl(C + α·A·B) − (C + α·A·B)| for A (m, k), B (k, n), C (m, n) given exactly, the
    result computed in ``dtype`` by any GEMM kernel: each entry is a dot product of length k (+1 for C, +1 for
    the product by α), so ≤ γ_{k+2}·(|C| + |α|·|A|·|B|) (Higham eq. 3.13). fp64 (m, n) out.

    It scales with |A|·|B| (a matrix product of absolute values), not with |A·B|: cancellation in A·B does not
    shrink the rounding error of forming it."""
    A, B = A.detach().double(), B.detach().double()
    bound = abs(alpha) * (A.abs() @ B.abs())
    if C is not None:
        bound = bound + C.detach().double().abs()
    return gamma(A.shape[-1] + 2, dtype) * bound


def half_ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` numbers around |v| (subnormals included): the largest error of rounding v to
    ``dtype`` to nearest. fp64 tensor in, fp64 out."""
    _, e = torch.frexp(v.abs())  # |v| = m·2^e, m in [0.5, 1)
    spacing = torch.pow(2.0, (e - 1 - MANTISSA[dtype]).double())
    return 0.5 * torch.maximum(spacing, torch.full_like(spacing, SUBNORMAL_SPACING.get(dtype, 0.0)))


def svd_backward_error(W: torch.Tensor, dtype: torch.dtype = torch.float32, c: float = 2.0) -> float:
    """‖E‖_F for the SVD of W (m, n) computed in ``dtype`` by LAPACK: the computed factors are an exact SVD of
    W + E (backward stability of Householder bidiagonalization and the QR/divide-and-conquer iteration, Higham
    §19.3, §20). The worst-case constant grows like γ_{mn}; rounding errors behave like independent random
    variables, which replaces k by √k (Higham & Mary 2019), giving ‖E‖_F ≈ c·√(m·n)·u·‖W‖_F. Measured
    ‖W − U·S·Vᵀ‖_F on this suite's matrices (tiny Llama's and 300x420 Gaussians, both orientations, MKL's
    AVX2 and AVX-512 paths) is at most 0.36 of that with c = 1: c = 2 keeps a 5x margin."""
    m, n = W.shape[-2:]
    return c * math.sqrt(m * n) * unit_roundoff(dtype) * float(W.detach().double().norm())


def cut(S: torch.Tensor, rank: int, largest: bool = True) -> tuple[float, float]:
    """(σ at the cut on the larger side, gap at the cut) for keeping the ``rank`` largest (or smallest) of the
    singular values S (descending): largest → (σ_r, σ_r − σ_{r+1}); smallest → (σ_{n−r}, σ_{n−r} − σ_{n−r+1})."""
    S = S.double()
    i = rank if largest else S.numel() - rank  # S[i - 1] is kept (largest) / discarded (smallest), S[i] the other
    if i <= 0 or i >= S.numel():
        return float(S[0]), math.inf  # nothing cut: the whole matrix (or nothing) is kept
    return float(S[i - 1]), float(S[i - 1] - S[i])


def subspace_angle(err_2: float, gap: float) -> float:
    """Wedin's bound: when the rank-r singular subspaces of W are computed from W + E, ‖sinΘ‖₂ ≤ ‖E‖₂ / δ with
    δ ≥ gap − ‖E‖₂ by Weyl (gap = σ_r − σ_{r+1} of W). ``inf`` when the gap does not exceed the error (the
    subspace is not determined)."""
    return err_2 / (gap - err_2) if gap > err_2 else math.inf


def truncated_svd_error(W: torch.Tensor, rank: int, largest: bool = True, dtype: torch.dtype = torch.float32,
                        S: torch.Tensor | None = None, drift: float = 0.0) -> float:
    """Bound on ‖[W̃]_r − [W]_r‖_F, the rank-r truncation (largest or smallest r singular triplets) of W (m, n)
    from an SVD computed in ``dtype``, with the factors B = U·√S, A = √S·Vᵀ then formed in ``dtype``:

    - the SVD is exact for W + E, ‖E‖_F ≤ ``svd_backward_error``;
    - the truncation's sensitivity: in the singular bases, a perturbation e of the pair (i kept, j cut) moves the
      kept part by at most σ_i/(σ_i − σ_j)·|e| ≤ (1 + σ_c/δ)·|e| (σ_c, gap at the cut, ``cut``; δ = gap − 2‖E‖₂
      for the second-order terms, Wedin/Weyl); the kept block moves by E itself: ≤ (1 + σ_c/δ)·‖E‖_F in all;
    - forming B and A and their product rounds each term u_i·σ_i·v_i three times: ≤ γ_3·Σσ_i (kept).
    ``inf`` when the gap is not larger than twice the error (the truncation is not determined). ``S``: the
    reference's singular values (descending) if already computed; ``drift``: ‖W − reference‖_F when W is
    itself a rounded copy of the reference (e.g. an fp64 matrix cast to fp32), added to E."""
    S = torch.linalg.svdvals(W.detach().double()) if S is None else S.double()
    E = svd_backward_error(W, dtype) + drift
    sigma_c, gap = cut(S, rank, largest)
    if gap <= 2 * E:
        return math.inf
    kept = S[:rank] if largest else S[S.numel() - rank:]
    return (1 + sigma_c / (gap - 2 * E)) * E + gamma(3, dtype) * float(kept.sum())
