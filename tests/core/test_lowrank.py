"""core/compact.py on random thin factors: the SVD of B·A from its factors against a dense SVD, the numerical rank,
the energy rank, slot rounding."""

from __future__ import annotations

import pytest
import torch

from svdadapt.core.compact import energy_rank, lowrank_norm, lowrank_svd, round_rank, truncate

from bounds import svd_backward_error, unit_roundoff
from helpers import gen

U64 = unit_roundoff(torch.float64)


def _factors(out: int, w: int, n: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, w), A (w, n) fp64 with rank(B·A) = ``rank`` ≤ w (B's last w − rank columns repeat the first ones)."""
    g = gen(seed)
    B = torch.randn(out, w, generator=g, dtype=torch.float64)
    A = torch.randn(w, n, generator=g, dtype=torch.float64)
    if rank < w:
        B[:, rank:] = B[:, : w - rank]
        A[rank:] = 0.0
    return B, A


@pytest.mark.parametrize("out, w, n, rank", [(40, 8, 30, 8), (40, 8, 30, 5), (6, 8, 30, 6), (40, 8, 5, 5)])
def test_the_thin_svd_is_the_dense_one(out, w, n, rank):
    B, A = _factors(out, w, n, rank)
    D = B @ A
    t = lowrank_svd(B, A)
    S = torch.linalg.svdvals(D)
    # both are backward stable in fp64: the σ differ by at most the two backward errors (Weyl)
    tol = 2 * svd_backward_error(D, torch.float64) + t.floor
    assert t.rank == rank
    assert (t.S[:rank] - S[:rank]).abs().max() <= tol
    assert (t.S[rank:] == 0).all()  # below the floor: exactly zero
    assert ((t.U * t.S) @ t.Vh - D).norm() <= tol * (1 + out + n)
    assert abs(lowrank_norm(B, A) - float(D.norm())) <= tol


def test_truncate_at_rank_k_has_the_eckart_young_error():
    B, A = _factors(50, 8, 40, 8, seed=1)
    D = B @ A
    S = torch.linalg.svdvals(D)
    for k in range(1, 9):
        t = truncate(B, A, k)
        tail = float(S[k:].pow(2).sum().sqrt())
        tol = 2 * svd_backward_error(D, torch.float64) + 8 * (50 + 40 + 8) * U64 * float(D.norm())
        assert abs(float((D - t.B @ t.A).norm()) - tail) <= tol
        assert abs(t.error * float(D.norm()) - tail) <= tol


def test_energy_rank_is_the_smallest_rank_reaching_the_fraction():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # σ² = 9, 4, 1, 0: total 14
    assert [energy_rank(S, f) for f in (0.5, 9 / 14, 0.7, 13 / 14, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert energy_rank(torch.zeros(4, dtype=torch.float64), 0.5) == 1  # nothing to keep: rank 1 of zeros


def test_round_rank_goes_up_to_the_next_slot_within_the_cap():
    slots = (8, 16, 32)
    assert [round_rank(k, slots, 64) for k in (1, 8, 9, 17, 32)] == [8, 8, 16, 32, 32]
    assert round_rank(33, slots, 64) is None  # above the largest slot
    assert round_rank(5, slots, 6) == 6  # the whole layer is smaller than the slot
    assert round_rank(40, slots, 40) == 40  # the whole rank: nothing to round


def test_truncate_refuses_weighted_without_a_covariance():
    B, A = _factors(10, 4, 12, 4)
    with pytest.raises(ValueError, match=r"\Aweighted=True needs a covariance \(whiten\)\Z"):
        truncate(B, A, 2, weighted=True)
