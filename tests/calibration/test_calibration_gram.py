"""The half-work Gram product of the collection (svdadapt/calibration/gram.py): the upper block triangle of XᵀX
accumulated in place, mirrored once; equal to XᵀX within any GEMM's bound, exactly symmetric, for widths that are
no multiple of the block; and the collection built on it (masks, non-finite inputs) on inputs wider than a block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import svdadapt
from bounds import gemm_error
from helpers import raises_exactly
from svdadapt.calibration.gram import BLOCK, add_gram_upper, block_starts, mirror_upper


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _rows(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64)
            * 3 + 0.5).to(dtype)


@pytest.mark.parametrize("d, block", [(1, 4), (7, 4), (8, 4), (11, 4), (13, 5), (29, 6), (64, 16), (100, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_triangle_equals_xtx_and_is_exactly_symmetric(d, block, dtype):
    """Two batches accumulated: within γ_{n₁+n₂+2}·|X|ᵀ|X| of the fp64 XᵀX (Higham 3.5: each entry a sum of
    n₁ + n₂ products in ``dtype``, in any order, plus the two accumulations), and exactly symmetric."""
    X1, X2 = _rows(37, d, 1, dtype), _rows(23, d, 2, dtype)
    acc = torch.zeros(d, d, dtype=dtype)
    add_gram_upper(acc, X1, block)
    add_gram_upper(acc, X2, block)
    C = mirror_upper(acc, block)
    assert C is acc and torch.equal(C, C.mT)
    X = torch.cat([X1, X2]).double()
    bound = gemm_error(X.mT, X, dtype)  # γ_{60+2}·|X|ᵀ|X|
    assert bool(((C.double() - X.mT @ X).abs() <= bound).all())


@pytest.mark.parametrize("d, block", [(11, 4), (29, 6), (100, 7)])
def test_only_the_upper_block_triangle_is_computed(d, block):
    """Before mirroring, every entry below the diagonal blocks is untouched (zero): (b + 1) / (2b) of the work;
    the diagonal blocks and everything right of them hold the products."""
    acc = torch.zeros(d, d)
    add_gram_upper(acc, _rows(9, d, 3), block)
    starts = block_starts(d, block)
    for a, b in zip(starts, starts[1:] + [d]):
        assert bool((acc[b:, a:b] == 0).all())
        assert bool((acc[a:b, a:] != 0).all())  # rows offset by +0.5: no product is zero


def test_block_starts():
    """Blocks of ``block`` columns, the last taking the remainder (``block`` to 2·``block`` − 1 wide)."""
    assert block_starts(576) == [0, 192, 384] and BLOCK == 192
    assert block_starts(1536) == list(range(0, 1536, 192))
    assert block_starts(500) == [0, 192]  # 192 + 308
    for d in (1, 191, 192, 383):
        assert block_starts(d) == [0]
    for d in range(1, 60):
        starts = block_starts(d, 7)
        widths = [b - a for a, b in zip(starts, starts[1:] + [d])]
        assert starts[0] == 0 and sum(widths) == d
        assert all(w == 7 for w in widths[:-1]) and (7 <= widths[-1] < 14 or len(widths) == 1)


class _Embed(nn.Module):
    """Token ids -> (batch, seq, width) embeddings -> a Linear: one target wider than two blocks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.proj = nn.Linear(width, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.proj(self.embed(input_ids))


def test_collection_wider_than_blocks_respects_masks():
    """A 2·BLOCK + 17 wide input (three blocks, the last one no multiple of the block), one padded batch: the
    covariance is the mean XᵀX over the real tokens only, within the GEMM bound, and exactly symmetric."""
    torch.manual_seed(0)
    model = _Embed(2 * BLOCK + 17)
    ids = torch.randint(0, 50, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1, :5]}]
    covs = svdadapt.collect_covariances(model, batches, progress=False)
    C = covs["proj"]
    with torch.no_grad():
        X = torch.cat([model.embed(ids)[mask.bool()], model.embed(ids[:1, :5]).reshape(-1, 2 * BLOCK + 17)]).double()
    assert covs.token_count("proj") == X.shape[0] == 11 + 7 + 2 + 5
    assert torch.equal(C, C.mT)
    # Σ of N products per entry in fp32 (two batches), then the division by N: γ_{N+2}·|X|ᵀ|X| / N (Higham 3.5)
    bound = gemm_error(X.mT, X) / X.shape[0]
    assert bool(((C.double() - X.mT @ X / X.shape[0]).abs() <= bound).all())


@pytest.mark.parametrize("column", [0, BLOCK + 5, 2 * BLOCK + 16])
def test_non_finite_input_in_any_block_is_reported(column):
    """A NaN or inf in any column (first, middle, last block) makes its diagonal entry non-finite: reported with the
    module and the batch, as the scan of every input did."""
    model = nn.Sequential(nn.Identity(), nn.Linear(2 * BLOCK + 17, 2))
    x = torch.ones(4, 2 * BLOCK + 17)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, column] = bad
        with raises_exactly(ValueError, "non-finite activations (NaN or inf) in the input of module '1' in batch 1"):
            svdadapt.collect_covariances(model, [x, y], progress=False)


def test_finite_input_whose_squares_overflow_is_not_reported():
    """Finite activations are never called non-finite: 1e20 squares to inf in fp32 (the covariance overflows, as
    it did before; the checks of ``wrap`` report it), but the input itself is finite."""
    model = nn.Sequential(nn.Identity(), nn.Linear(5, 2))
    x = torch.ones(3, 5)
    x[1, 3] = 1e20
    covs = svdadapt.collect_covariances(model, [x, x], progress=False)
    assert torch.isinf(covs["1"][3, 3]) and torch.isfinite(covs["1"][0, :3]).all()
