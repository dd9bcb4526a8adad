"""What ``wrap(..., allocate=True)`` costs and buys at init: SmolLM2-135M-Instruct, PiSSA rank 16, uniform against
allocated (default ``max_rank`` = 4·16 = 64, and 32), in the same run: the wrap's CPU time (one BLAS thread; each
layer is decomposed at its maximum rank, so the sketch is larger), the adapter parameters, the mean captured
fraction per layer and the raw captured energy Σ‖s·B·A‖²_F, and the ranks by module kind. No training (the
payload of allocation on a task: bench_finetune.py).

    python benchmarks/bench_allocate_wrap.py        # ~2 min on one quiet core

Writes ``benchmarks/results/bench_allocate_wrap.json``.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, smollm2, write_results  # noqa: E402

import svdadapt  # noqa: E402

RANK = 16


def _row(name: str, model, allocate) -> dict:
    m = copy.deepcopy(model)
    t0 = time.process_time()
    pm = svdadapt.wrap(m, "pissa", RANK, allocate=allocate, progress=False)
    cpu = time.process_time() - t0
    rec = pm.svdadapt
    ranks = {n: (rec.report[n].get("rank") or RANK) for n in rec.targets}
    shapes = {n: rec.report[n]["shape"] for n in rec.targets}
    raw = 0.0
    for n, (A, B) in rec.init_factors.items():  # ‖s·B·A‖²_F, s = alpha / r (alpha = 16)
        raw += float(((RANK / ranks[n]) * (B.double() @ A.double())).pow(2).sum())
    kinds: dict[str, list[int]] = {}
    for n, r in ranks.items():
        kinds.setdefault(n.rsplit(".", 1)[-1].replace("_proj", ""), []).append(r)
    return {"row": name, "cpu_s": cpu, "params": sum(r * sum(shapes[n]) for n, r in ranks.items()),
            "mean_fraction": sum(float(rec.report[n]["energy"]) for n in ranks) / len(ranks), "raw_energy": raw,
            "ranks": " · ".join(f"{k} {min(v)}/{sum(v) / len(v):.1f}/{max(v)}" for k, v in kinds.items())}


def main() -> None:
    torch.set_num_threads(1)
    model, _ = smollm2()
    rows = [_row("uniform rank 16", model, False),
            _row("allocate=True (max_rank 64)", model, True),
            _row("allocate, max_rank 32", model, svdadapt.AllocateOptions(max_rank=32))]
    print(markdown_table(rows, [("row", "wrap", "{}"), ("cpu_s", "CPU s (1 thread)", "{:.1f}"),
                                ("params", "adapter params", "{:,}"), ("mean_fraction", "mean captured fraction",
                                                                       "{:.4f}"),
                                ("raw_energy", "raw energy captured", "{:,.0f}"), ("ranks", "ranks min/mean/max",
                                                                                  "{}")]))
    print(f"load (1 min) {machine_info().get('loadavg_1m')}")
    write_results("bench_allocate_wrap", {"rank": RANK, "rows": rows})


if __name__ == "__main__":
    main()
