"""core/linalg.py: block-Krylov and exact truncated SVDs, the "auto" rule, whitening and damped Cholesky."""

from __future__ import annotations

import math

import pytest
import torch

from svdadapt.core.linalg import (
    DEFAULT_NITER,
    DEFAULT_OVERSAMPLE,
    CHUNK_BYTES,
    FUSE_ELEMENTS,
    auto_niter,
    choose_svd,
    damped_cholesky,
    full_svd,
    gram_top_svd,
    randomized_svd,
    truncated_svd,
    whitening,
)

from bounds import svd_backward_error, truncated_svd_error, unit_roundoff
from helpers import rel


pytestmark = pytest.mark.usefixtures("one_thread")


def known(m: int, n: int, s: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M fp32 (m, n), U (m, k), V (n, k)) with M = U·diag(s)·Vᵀ exactly in fp64, k = len(s)."""
    g = torch.Generator().manual_seed(seed)
    k = s.numel()
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return ((U * s.double()) @ V.mT).float(), U, V


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def product(t) -> torch.Tensor:
    return (t.U.double() * t.S.double()) @ t.Vh.double()


def sin_max_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of A and B (both orthonormal):
    ‖(I − B·Bᵀ)·A‖₂, which keeps its digits where 1 − cos² would cancel."""
    A, B = A.double(), B.double()
    return float(torch.linalg.matrix_norm(A - B @ (B.mT @ A), ord=2))


# ------------------------------------------------------------------------------------------ randomized
@pytest.mark.parametrize("m,n", [(700, 400), (400, 700)])  # tall and wide
def test_randomized_matches_exact_on_decaying_spectrum(m: int, n: int) -> None:
    r = 16
    # a decaying spectrum with a gap after the 16th value, so that the top subspaces are well defined
    s = torch.cat([torch.linspace(1, 0.5, r), 0.4 * torch.logspace(0, -2, min(m, n) - r)]).double()
    M, U, V = known(m, n, s)
    t = randomized_svd(M, r, generator=gen())
    assert t.U.shape == (m, r) and t.S.shape == (r,) and t.Vh.shape == (r, n)
    best = (U[:, :r] * s[:r]) @ V[:, :r].mT
    # Krylov convergence, not rounding, sets these: gap ratio σ_17/σ_16 = 0.8 after 2q+1 = 21 powers leaves
    # 0.8^21 ≈ 1e-2 of the cut-off energy in the basis, 0.4·that relative (Halko et al. 2011 Thm 9.2); measured
    # 1e-6..1e-5 on AVX2/AVX-512 at 1-2 threads: the constants keep 10x over fp32's SVD floor (~1e-6)
    assert rel(product(t), best) < 1e-4
    assert float((t.S.double() - s[:r]).abs().max()) < 1e-5
    assert sin_max_angle(t.U, U[:, :r]) < 1e-3
    assert sin_max_angle(t.Vh.mT, V[:, :r]) < 1e-3
    eye = torch.eye(r)
    # orthonormality after an fp32 Householder QR: ‖QᵀQ − I‖ ≤ c·√m·u ≈ 26·6e-8 = 1.6e-6 (Higham §19.3)
    assert float((t.U.mT @ t.U - eye).abs().max()) < 1e-5
    assert float((t.Vh @ t.Vh.mT - eye).abs().max()) < 1e-5


def test_randomized_energy_on_flat_spectrum_beats_subspace_iteration() -> None:
    """A Gaussian matrix has the flattest spectrum there is (Marchenko-Pastur): the hard case."""
    r = 16
    M = torch.randn(1200, 600, generator=gen(3)) * 0.02
    optimum = float(torch.linalg.svdvals(M.double())[:r].pow(2).sum())
    ours = float(randomized_svd(M, r, generator=gen()).S.double().pow(2).sum()) / optimum
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, S_peft, _ = torch.svd_lowrank(M, q=r, niter=16)  # what PEFT's pissa_niter_16 runs
    theirs = float(S_peft.double().pow(2).sum()) / optimum
    assert ours >= 0.995
    assert ours <= 1 + 1e-6  # a Ritz approximation never beats the optimum: 1e-6 > 2r·‖E‖/σ² (fp32 SVD, ~1e-7)
    assert ours > theirs


def test_ritz_values_never_exceed_singular_values() -> None:
    s = torch.linspace(1.0, 0.2, 500, dtype=torch.float64)
    M, _, _ = known(800, 500, s, seed=1)
    t = randomized_svd(M, 12, niter=3, oversample=4, generator=gen())
    # Ritz values are ≤ σ_i exactly; fp32 adds ≤ ‖E‖₂ (Weyl) + M's own rounding: 1e-5·0.2 > 1.5e-6 = that bound
    tol = svd_backward_error(M) + unit_roundoff(torch.float32) * float(M.double().norm())
    assert bool((t.S.double() <= s[:12] + tol).all())
    assert bool((t.S[:-1] >= t.S[1:]).all())  # descending


def test_randomized_is_deterministic_and_leaves_global_rng_alone() -> None:
    M = torch.randn(900, 500, generator=gen(5))
    state = torch.get_rng_state()
    a = randomized_svd(M, 16, generator=gen(7))
    b = randomized_svd(M, 16, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)
    c = randomized_svd(M, 16, generator=gen(8))
    assert not torch.equal(a.Vh, c.Vh)  # the seed matters...
    assert float((a.S - c.S).abs().max() / a.S[0]) < 0.05  # ...but not much


def test_randomized_wide_is_the_transpose_of_tall() -> None:
    M = torch.randn(800, 450, generator=gen(2))
    tall = randomized_svd(M, 8, generator=gen(1))
    wide = randomized_svd(M.mT, 8, generator=gen(1))
    assert torch.equal(wide.U, tall.Vh.mT) and torch.equal(wide.S, tall.S) and torch.equal(wide.Vh, tall.U.mT)


def test_randomized_falls_back_to_exact_when_basis_covers_the_short_side() -> None:
    M = torch.randn(300, 100, generator=gen(4))
    t = randomized_svd(M, 8, niter=9, oversample=2, generator=gen())  # basis 100 = short side
    e = full_svd(M, 8)
    assert torch.equal(t.S, e.S) and torch.equal(t.U, e.U)


@pytest.mark.parametrize("transpose", [False, True])
def test_randomized_on_rank_deficient_matrix(transpose: bool) -> None:
    """Rank 5 < rank 16 < basis: the exact low-rank part comes back, the rest as exact zeros."""
    s = torch.cat([torch.linspace(2, 1, 5), torch.zeros(395)]).double()
    M, U, V = known(600, 400, s, seed=6)
    if transpose:
        M = M.mT
    t = randomized_svd(M, 16, generator=gen())
    # the basis holds the whole range: only rounding is left, Weyl on an fp32 SVD of M (rounded from fp64)
    tol = svd_backward_error(M) + unit_roundoff(torch.float32) * float(M.double().norm())
    assert float((t.S[:5].double() - s[:5]).abs().max()) < tol
    assert torch.equal(t.S[5:], torch.zeros(11))
    assert bool(torch.isfinite(t.U).all() and torch.isfinite(t.Vh).all())
    # two backward-stable fp32 steps (range QR, then the small SVD): 2·‖E‖_F relative
    assert rel(product(t), M.double()) < 2 * svd_backward_error(M) / float(M.double().norm())


def test_randomized_on_zero_matrix() -> None:
    t = randomized_svd(torch.zeros(500, 300), 4, generator=gen())
    assert torch.equal(t.S, torch.zeros(4))
    assert torch.equal(product(t), torch.zeros(500, 300, dtype=torch.float64))


def test_randomized_keeps_fp64() -> None:
    s = torch.logspace(0, -1, 300, dtype=torch.float64)
    M, U, V = known(500, 300, s)
    t = randomized_svd(M.double(), 8, niter=8, generator=gen())
    assert t.U.dtype == t.S.dtype == t.Vh.dtype == torch.float64
    # fp64 rounding is ~1e-14; the Krylov error at gap ratio s_9/s_8 ≈ 0.9924 after 8 steps sets this (measured
    # ~1e-8; the default 7 steps at n = 300 leave 1.2e-5 on this nearly gapless spectrum, 1e-5 of σ₁² in energy)
    assert float((t.S - s[:8]).abs().max()) < 1e-6


# ------------------------------------------------------------------------------------------ full
@pytest.mark.parametrize("m,n", [(60, 40), (40, 60)])
def test_full_svd_top_and_bottom(m: int, n: int) -> None:
    s = torch.linspace(3, 0.5, min(m, n), dtype=torch.float64)
    M, U, V = known(m, n, s, seed=9)
    top = full_svd(M, 5)
    bottom = full_svd(M, 5, largest=False)
    # M is U·diag(s)·Vᵀ rounded to fp32 (‖ΔM‖_F ≤ u·‖M‖_F), then an fp32 SVD (backward error ‖E‖_F): Weyl for
    # the values, truncated_svd_error (gap 2.5/39 at either cut) for the products
    u = unit_roundoff(torch.float32)
    drift = u * float(M.double().norm())
    tol = svd_backward_error(M) + drift
    assert float((top.S.double() - s[:5]).abs().max()) < tol
    assert float((bottom.S.double() - s[-5:]).abs().max()) < tol
    best_top = (U[:, :5] * s[:5]) @ V[:, :5].mT
    best_bottom = (U[:, -5:] * s[-5:]) @ V[:, -5:].mT
    for t, best, largest in ((top, best_top, True), (bottom, best_bottom, False)):
        bound = truncated_svd_error(M, 5, largest, S=s, drift=drift)
        assert rel(product(t), best) < bound / float(best.norm())
    assert top.U.shape == (m, 5) and top.Vh.shape == (5, n)


# ------------------------------------------------------------------------------------------ dispatch
def test_truncated_svd_dispatch_and_errors() -> None:
    M = torch.randn(80, 50, generator=gen())
    exact = full_svd(M, 4)
    assert torch.equal(truncated_svd(M, 4, svd="full").S, exact.S)
    # short side 50: exact, by the fp64 Gram route
    assert torch.equal(truncated_svd(M, 4, svd="auto").S, gram_top_svd(M, 4).S)
    with pytest.raises(ValueError, match=r"svd='randomized' cannot compute the smallest singular triplets"):
        truncated_svd(M, 4, largest=False, svd="randomized")
    with pytest.raises(ValueError, match=r"svd must be 'auto', 'full' or 'randomized', got 'lanczos'"):
        truncated_svd(M, 4, svd="lanczos")


def test_auto_niter_grows_with_log_of_the_short_side() -> None:
    assert DEFAULT_NITER is None and DEFAULT_OVERSAMPLE == 0
    # ⌊1.5·log2 n⌋ − 5
    assert [auto_niter(n) for n in (192, 300, 576, 1024, 2048, 4096, 11008)] == [6, 7, 8, 10, 11, 13, 15]
    # niter=None resolves per matrix, from its short side, for tall and wide alike
    M = torch.randn(1200, 600, generator=gen(1))
    for t in (M, M.mT):
        auto = randomized_svd(t, 16, generator=gen(2))
        explicit = randomized_svd(t, 16, niter=auto_niter(600), generator=gen(2))
        assert torch.equal(auto.U, explicit.U) and torch.equal(auto.S, explicit.S)


def test_choose_svd_rule() -> None:
    d = dict(niter=DEFAULT_NITER, oversample=DEFAULT_OVERSAMPLE)
    assert choose_svd((576, 1536), 16, True, **d) == "randomized"  # SmolLM2 MLP: 9 blocks of 16 on 576
    assert choose_svd((2048, 5632), 16, True, **d) == "randomized"
    assert choose_svd((576, 1536), 16, False, **d) == "gram"  # bottom triplets: exact, the fp64 Gram route
    assert choose_svd((192, 576), 16, True, **d) == "gram"  # short side <= 256: the exact fp64 Gram route
    assert choose_svd((576, 576), 32, True, **d) == "randomized"  # basis 9·32 = 288 <= 432
    assert choose_svd((576, 576), 64, True, **d) == "full"  # basis 576 > 3/4 of 576
    # the 3/4 boundary on a 300 short side: basis 15·16 = 240 > 225 is exact, 14·16 = 224 is sketched
    assert choose_svd((300, 4000), 16, True, niter=14, oversample=0) == "full"
    assert choose_svd((300, 4000), 16, True, niter=13, oversample=0) == "randomized"


# ------------------------------------------------------------------------------------------ covariances
def test_whitening_full_rank() -> None:
    X = torch.randn(200, 12, generator=gen(1), dtype=torch.float64)
    C = X.mT @ X
    S, S_pinv = whitening(C)
    assert S.dtype == torch.float64 and S.shape == (12, 12)
    # fp64 (u = 1.1e-16): a 12x12 eigendecomposition's error ~12·u·cond, cond(C) ≈ 3: 1e-12 leaves 100x+
    assert float((S @ S.mT - C).abs().max() / C.abs().max()) < 1e-12
    assert float((S_pinv @ S - torch.eye(12, dtype=torch.float64)).abs().max()) < 1e-10


def test_whitening_rank_deficient_drops_directions() -> None:
    X = torch.randn(50, 3, generator=gen(2), dtype=torch.float64) @ torch.randn(3, 10, generator=gen(3),
                                                                                dtype=torch.float64)
    C = (X.mT @ X).float()  # rank 3 of 10, in fp32 as calibration produces it
    S, S_pinv = whitening(C)
    assert S.shape == (10, 3) and S_pinv.shape == (3, 10)
    assert bool(torch.isfinite(S_pinv).all())
    # computed in fp64 from C; the dropped 7 eigenvalues are C's fp32 rounding (~u32·‖C‖ = 6e-8 relative)
    assert float((S @ S.mT - C.double()).abs().max() / C.abs().max()) < 1e-6
    assert float((S_pinv @ S - torch.eye(3, dtype=torch.float64)).abs().max()) < 1e-8  # fp64 pinv, cond ~1e2
    with pytest.raises(ValueError, match="covariance is zero"):
        whitening(torch.zeros(4, 4))


def test_damped_cholesky() -> None:
    X = torch.randn(100, 8, generator=gen(4), dtype=torch.float64)
    C = X.mT @ X
    L, lam = damped_cholesky(C, damping=0.01)
    assert lam == 0.01  # well conditioned already: the first damping is kept
    Cd = C + lam * C.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    assert float((L @ L.mT - Cd).abs().max() / Cd.abs().max()) < 1e-12  # fp64 Cholesky: ≤ γ_9 ≈ 1e-15 (Higham 10.3)
    assert bool((L.triu(1) == 0).all())

    # a badly conditioned covariance: λ doubles until cond(C_d) <= max_cond
    D = torch.diag(torch.tensor([1.0, 1e-9, 1e-9, 1.0], dtype=torch.float64))  # inputs, not tolerances
    L, lam = damped_cholesky(D, damping=1e-6, max_cond=1e3)
    k = math.log2(lam / 1e-6)
    assert k == int(k) and k > 0
    Dd = L @ L.mT
    evals = torch.linalg.eigvalsh(Dd)
    assert float(evals[-1] / evals[0]) <= 1e3
    assert float(evals[-1] / evals[0]) > 1e3 / 2.1  # and not damped further than needed (one doubling less fails)

    with pytest.raises(ValueError, match="non-positive or non-finite mean diagonal"):
        damped_cholesky(torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("damping", [0.01, 0.0])
def test_damped_cholesky_in_place_is_the_same_and_leaves_c_damped(damping) -> None:
    """inplace=True forms C_d in C itself (no second d×d matrix): the same L and λ bit for bit, C = C + λ·mean·I on
    return, even after failed attempts (an indefinite C fails the first Cholesky; its diagonal is restored)."""
    X = torch.randn(30, 6, generator=gen(5), dtype=torch.float64)
    for C in (X.mT @ X, torch.diag(torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64))):
        L, lam = damped_cholesky(C.clone(), damping=damping)
        work = C.clone()
        L2, lam2 = damped_cholesky(work, damping=damping, inplace=True)
        assert lam2 == lam and torch.equal(L2, L)
        expected = C + lam * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
        assert torch.equal(work, expected)
    assert lam > damping  # the indefinite one needed more damping than the first attempt
