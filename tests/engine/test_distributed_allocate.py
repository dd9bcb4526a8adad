"""wrap(..., allocate=True) under torch.distributed (gloo, two processes): each rank decomposes its share at the
maximum ranks, the plans are gathered, and every rank allocates from the same spectra: the one-process ranks and
factors, bit for bit (PiSSA's factors come from one rank's (seed, name) generator; the allocation is a function
of the gathered spectra)."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

import svdadapt
from dist_harness import as_rank, free_port
from helpers import make_tiny_llama

RANK = 4


def _wrap():
    return svdadapt.wrap(make_tiny_llama(6), "pissa", RANK, allocate=svdadapt.AllocateOptions(max_rank=12),
                         progress=False)


def _body(rank: int, out_dir: str) -> None:
    pm = _wrap()
    torch.save({"ranks": pm.svdadapt.rank_pattern, "allocation": pm.svdadapt.allocation,
                "init": pm.svdadapt.init_factors}, f"{out_dir}/alloc{rank}.pt")


def _worker(rank: int, size: int, port: int, out_dir: str) -> None:
    as_rank(rank, size, port, lambda: _body(rank, out_dir))


def test_two_ranks_allocate_as_one_process(tmp_path, one_thread) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _wrap()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"alloc{rank}.pt")
        assert got["ranks"] == single.svdadapt.rank_pattern
        assert got["allocation"] == single.svdadapt.allocation
        for n, (A, B) in single.svdadapt.init_factors.items():
            assert torch.equal(got["init"][n][0], A) and torch.equal(got["init"][n][1], B), n
