"""core/linalg.py: the fp64 Gram route for the smallest singular triplets (gram_bottom_svd) and svd="auto" picking it."""

from __future__ import annotations

import pytest
import torch

from svdadapt.core.linalg import (
    GRAM_FLOOR,
    choose_svd,
    gram_top_svd,
    full_svd,
    gram_bottom_svd,
    truncated_svd,
)

from helpers import gen, matrix_with_spectrum

pytestmark = pytest.mark.usefixtures("one_thread")

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps




def sin_max_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of the orthonormal A and B."""
    A, B = A.double(), B.double()
    return float(torch.linalg.matrix_norm(A - B @ (B.mT @ A), ord=2))


@pytest.mark.parametrize("m,n", [(900, 400), (400, 900)])
def test_gram_bottom_matches_fp64_lapack(m: int, n: int) -> None:
    """Against the fp64 SVD of the same fp32 matrix: the bottom-8 subspace within ‖ΔG‖/gap, ‖ΔG‖ ≈ n·eps64·σ₁²
    and gap = σ²_{n-8} − σ²_{n-7}, plus the fp32 rounding of the returned vectors (2·eps32); each σ within
    n·eps64·σ₁²/(2σ²) relative plus its fp32 rounding; U·diag(S)·Vh the exact bottom part to the same order."""
    r, k = 8, min(m, n)
    s = torch.cat([torch.linspace(3, 0.3, k - r), torch.linspace(0.2, 0.1, r)]).double()  # gap below the 8
    M, _, _ = matrix_with_spectrum(m, n, s, seed=2)
    U64, S64, Vh64 = torch.linalg.svd(M.double(), full_matrices=False)
    t = gram_bottom_svd(M, r)
    assert t.U.shape == (m, r) and t.S.shape == (r,) and t.Vh.shape == (r, n) and t.S.dtype == torch.float32
    dG = k * EPS64 * float(S64[0]) ** 2
    gap = float(S64[-r - 1] ** 2 - S64[-r] ** 2)
    assert sin_max_angle(t.Vh.mT, Vh64[-r:].mT) <= dG / gap + 2 * EPS32
    assert sin_max_angle(t.U, U64[:, -r:]) <= dG / gap + 2 * EPS32
    rel_err = ((t.S.double() - S64[-r:]) / S64[-r:]).abs()
    assert bool((rel_err <= dG / (2 * S64[-r:] ** 2) + EPS32).all())
    assert bool((t.S[:-1] >= t.S[1:]).all())  # descending, as full_svd's bottom
    exact = (U64[:, -r:] * S64[-r:]) @ Vh64[-r:]
    ours = (t.U.double() * t.S.double()) @ t.Vh.double()
    assert float(torch.linalg.matrix_norm(ours - exact) / torch.linalg.matrix_norm(exact)) <= 2 * (dG / gap) + 4 * EPS32


def test_gram_bottom_falls_back_to_lapack_when_ill_conditioned() -> None:
    """σ_min/σ₁ = 1e-7, below GRAM_FLOOR·n (5.6e-6 at n = 300): the Gram route would lose to fp32 LAPACK, so the
    result is LAPACK's bit for bit; the same for fp64 input and for a zero matrix."""
    s = torch.cat([torch.linspace(1, 0.1, 296), torch.tensor([1e-3, 1e-5, 1e-6, 1e-7])]).double()
    M, _, _ = matrix_with_spectrum(700, 300, s, seed=4)
    assert 1e-7 < GRAM_FLOOR * 300
    for X in (M, M.mT, M.double(), torch.zeros(500, 300)):
        t, ref = gram_bottom_svd(X, 4), full_svd(X, 4, largest=False)
        assert torch.equal(t.U, ref.U) and torch.equal(t.S, ref.S) and torch.equal(t.Vh, ref.Vh)
    # well above the floor (σ_min/σ₁ = 0.1): the Gram route itself, which differs from LAPACK in the last bits
    W, _, _ = matrix_with_spectrum(700, 300, torch.linspace(1, 0.1, 300).double(), seed=4)
    assert not torch.equal(gram_bottom_svd(W, 4).S, full_svd(W, 4, largest=False).S)


def test_auto_picks_the_gram_route_for_large_bottom_triplets() -> None:
    assert choose_svd((576, 1536), 16, False, None, 0) == "gram"
    assert choose_svd((4096, 11008), 16, False, None, 0) == "gram"
    assert choose_svd((192, 576), 16, False, None, 0) == "full"  # short side <= 256: LAPACK is as fast
    M = torch.randn(600, 300, generator=gen(3))
    t, g = truncated_svd(M, 4, largest=False), gram_bottom_svd(M, 4)
    assert torch.equal(t.S, g.S) and torch.equal(t.U, g.U) and torch.equal(t.Vh, g.Vh)
    assert torch.equal(truncated_svd(M, 4, largest=False, svd="full").S, full_svd(M, 4, largest=False).S)
    # svd="gram" with the largest triplets is the top-r Gram route
    assert torch.equal(truncated_svd(M, 4, svd="gram").S, gram_top_svd(M, 4).S)
