"""Spawned gloo process groups for the tests: a free port, a body run as one rank, and several ranks run under a
hard time limit, so that a hang fails the test instead of blocking the suite.

Import as ``from dist_harness import ...`` (tests/ is on ``sys.path``, as for helpers.py); worker functions live
at module level of a test file so that the spawned processes can import them.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import TEST_THREADS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(rank: int, size: int, port: int, body: Callable[[], None], timeout_s: float = 120) -> None:
    """Run ``body()`` as one rank of a gloo process group (collectives time out after ``timeout_s``), then leave
    the process at once.

    A clean return would let the interpreter tear the process group down through the objects that hold it (DDP's
    Reducer): its destructor joins a gloo worker thread that may be waiting for the GIL the main thread holds — a
    hang seen once in CI after the DDP steps. ``os._exit(0)`` after a successful body skips that teardown; a failure
    still destroys the group and propagates to the parent."""
    torch.set_num_threads(TEST_THREADS)  # the parent computes its one-process reference at this count
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    try:
        body()
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker: Callable[..., None], args: tuple, nprocs: int = 2, timeout_s: float = 120) -> None:
    """``worker(rank, *args)`` in ``nprocs`` spawned processes (as ``mp.spawn``), all joined within ``timeout_s``
    seconds in total; a process still running then is killed and the call fails naming it, as does one that exits
    with a non-zero status."""
    import time

    context = mp.get_context("spawn")
    procs = [context.Process(target=worker, args=(r, *args), daemon=True) for r in range(nprocs)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    assert not hung, f"ranks {hung} still running after {timeout_s} s (killed)"
    failed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    assert not failed, f"ranks exited with status {failed}"
