"""The Gram matrix XᵀX at about half the work of ``X.mT @ X``: the accumulation of the covariances (``collect.py``).

XᵀX is symmetric, so only its upper block triangle is computed (a ``syrk``-like product from GEMMs): the columns
of X (n, d) are cut into blocks of ``BLOCK`` columns (the last block takes the remainder, ``BLOCK`` to
2·``BLOCK`` − 1 wide), and block row i of the accumulator, from its diagonal block to the right edge, gets
X_iᵀ · X[:, i:] in one in-place GEMM (``addmm_``: no temporaries). With b blocks this is (b + 1) / (2b) of the
full product's multiply-adds: 2/3 for d = 576, 9/16 for d = 1536. Accumulating batch after batch touches only
that upper part; :func:`mirror_upper` fills the strict lower triangle from it once at the end, so the result is
exactly symmetric.

Why 192 columns: a GEMM of few rows runs at a lower rate (576 and 1536 wide inputs, 1024 tokens, one MKL thread
on AVX-512: 96-wide blocks save no time over 192-wide ones), and with 192-wide blocks or wider every entry of the
upper triangle is bit-identical to the full product's on that machine, so the covariances, and the adapters, did
not change (docs/benchmarks.md, CorDA cost). On another BLAS or CPU the last bits may differ from a full GEMM's;
both are within the summation-order bound of any GEMM (γ_{n+2}·|X|ᵀ|X|).
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK", "block_starts", "add_gram_upper", "mirror_upper"]

BLOCK = 192


def block_starts(d: int, block: int = BLOCK) -> list[int]:
    """The first column of each block of a width-``d`` input: 0, block, 2·block, ... (the last block takes the
    remainder, ``block`` to 2·``block`` − 1 wide; a single block when ``d`` < 2·``block``)."""
    return list(range(0, d - block + 1, block)) or [0]


def add_gram_upper(acc: torch.Tensor, rows: torch.Tensor, block: int = BLOCK) -> None:
    """``acc`` (d, d) += the upper block triangle of ``rowsᵀ · rows`` (rows: (n, d), same dtype and device), in
    place: for each block [a, b) of columns, ``acc[a:b, a:] += rows[:, a:b]ᵀ · rows[:, a:]``. The blocks below
    the diagonal blocks are not touched (:func:`mirror_upper` fills them)."""
    starts = block_starts(rows.shape[1], block)
    ends = starts[1:] + [rows.shape[1]]
    for a, b in zip(starts, ends):
        acc[a:b, a:].addmm_(rows[:, a:b].mT, rows[:, a:])


def mirror_upper(acc: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``acc`` (d, d) made exactly symmetric from its upper triangle, in place (the strict lower triangle is
    overwritten by the transposed strict upper one), block by block (temporaries of one diagonal block). Returns
    ``acc``."""
    starts = block_starts(acc.shape[0], block)
    ends = starts[1:] + [acc.shape[0]]
    for a, b in zip(starts, ends):
        diag = acc[a:b, a:b]
        diag.copy_(diag.triu() + diag.triu(1).mT)
        acc[b:, a:b].copy_(acc[a:b, b:].mT)
    return acc
