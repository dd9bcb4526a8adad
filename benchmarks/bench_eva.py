"""EVA on SmolLM2-135M-Instruct, svdadapt against PEFT, in one run: ``wrap(model, "eva", rank=16, calibration=batches,
allocate=True)`` (one covariance per shared input, collected in one pass, one fp64 eigendecomposition each, PEFT's
rank redistribution as the allocator's "eva" objective) against PEFT's ``initialize_lora_eva_weights`` (incremental
PCA hooks, ``svd_lowrank`` per batch, cycling over the batches until every component it needs has converged to
cosine similarity tau = 0.99) on the same batches, each in a fresh process on one BLAS thread: CPU time, the forward
passes run, the ranks (how many layers agree) and, per layer, the distance ‖P_svdadapt − P_PEFT‖₂ between the
projectors on the two A's row spaces (at the smaller of the two ranks: the top components).

    python benchmarks/bench_eva.py --seqs 16      # svdadapt ~1 CPU min; PEFT many times that

Writes ``benchmarks/results/bench_eva.json``. PEFT's incremental PCA only approximates the PCA of the batches it
saw (it truncates to its components at every step and stops at convergence, having seen some batches more often
than others), so the distances measure its approximation, not svdadapt's; tests/core/test_eva.py checks parity to
rounding where PEFT's PCA is exact (one batch, input widths within its sketch).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, run_job, smollm2, write_results  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(tok, seqs: int, seq_len: int):
    import svdadapt
    from pydoc_data.topics import topics

    return svdadapt.text_batches(tok, [topics[k] for k in sorted(topics)], seq_len=seq_len, batch_size=4,
                                 max_batches=math.ceil(seqs / 4))


def job_svdadapt(seqs: int, seq_len: int, rank: int, out: str) -> dict:
    import torch

    import svdadapt

    torch.set_num_threads(1)
    model, tok = smollm2()
    batches = _batches(tok, seqs, seq_len)
    t0, w0 = time.process_time(), time.perf_counter()
    pm = svdadapt.wrap(model, "eva", rank=rank, calibration=batches, target_modules=TARGETS, allocate=True,
                       progress=False)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    A = {n: layer.lora_A["default"].weight.detach().clone() for n, layer in _lora(pm).items()}
    torch.save(A, out)
    return {"cpu_s": cpu, "wall_s": wall, "passes": len(batches), "layers": len(A)}


def job_peft(seqs: int, seq_len: int, rank: int, out: str) -> dict:
    import torch
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    torch.set_num_threads(1)
    model, tok = smollm2()
    batches = _batches(tok, seqs, seq_len)
    passes = [0]

    def forward(m, inputs):  # PEFT's default forward_fn, counted
        passes[0] += 1
        return m(**inputs)

    t0, w0 = time.process_time(), time.perf_counter()
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=2.0))
    pm = get_peft_model(model, config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(pm, dataloader=batches, forward_fn=forward, show_progress_bar=False)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    A = {n: layer.lora_A["default"].weight.detach().clone() for n, layer in _lora(pm).items()}
    torch.save(A, out)
    return {"cpu_s": cpu, "wall_s": wall, "passes": passes[0], "layers": len(A)}


def _lora(pm) -> dict:
    return {n.replace("base_model.model.", ""): m for n, m in pm.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def _compare(ours: dict, theirs: dict) -> dict:
    import torch

    names = sorted(set(ours) | set(theirs))
    r = {n: (ours[n].shape[0] if n in ours else 0, theirs[n].shape[0] if n in theirs else 0) for n in names}
    dist = {}
    for n in names:
        k = min(r[n])
        if k == 0:
            continue
        a, b = ours[n][:k].double(), theirs[n][:k].double()  # orthonormal rows (k, in)
        # ‖P_a − P_b‖₂ = sin of the largest principal angle = ‖b − (b·aᵀ)·a‖₂ for equal ranks: a (k, in) matrix
        dist[n] = float(torch.linalg.matrix_norm(b - (b @ a.mT) @ a, ord=2))
    same = sum(1 for a, b in r.values() if a == b)
    d = sorted(dist.values())
    return {"ranks": {n: list(v) for n, v in r.items()}, "same_ranks": same, "layers": len(names),
            "rank_l1": sum(abs(a - b) for a, b in r.values()), "median_distance": d[len(d) // 2],
            "max_distance": d[-1], "distances": dist}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--peft-timeout", type=float, default=3600, help="wall seconds PEFT's run may take")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    kw = dict(seqs=args.seqs, seq_len=args.seq_len, rank=args.rank)
    env = {"OMP_NUM_THREADS": "1"}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="svdadapt-bench-eva-") as tmp:
        ours = run_job("bench_eva:job_svdadapt", env=env, out=f"{tmp}/ours.pt", **kw)
        ours["impl"] = "svdadapt wrap(eva, allocate=True)"
        print(ours, flush=True)
        try:
            theirs = run_job("bench_eva:job_peft", env=env, timeout=args.peft_timeout, out=f"{tmp}/peft.pt", **kw)
        except subprocess.TimeoutExpired:
            theirs = {"cpu_s": None, "wall_s": None, "note": f"did not finish within {args.peft_timeout:.0f} wall s"}
        theirs["impl"] = "PEFT initialize_lora_eva_weights"
        print(theirs, flush=True)
        cmp = None if theirs["cpu_s"] is None else _compare(torch.load(f"{tmp}/ours.pt"), torch.load(f"{tmp}/peft.pt"))
    rows = [ours, theirs]
    table = markdown_table(rows, [("impl", "implementation", "{}"), ("cpu_s", "CPU s (1 thread)", "{:.1f}"),
                                  ("wall_s", "wall s", "{:.1f}"), ("passes", "forward passes", "{}"),
                                  ("layers", "adapted layers", "{}"), ("peak_rss_mb", "peak RSS (MiB)", "{:.0f}")])
    load = f"load (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    if cmp is None:
        summary = f"PEFT {theirs['note']}; {load}"
    else:
        summary = (f"speed-up (CPU): {theirs['cpu_s'] / ours['cpu_s']:.1f}x; ranks equal on {cmp['same_ranks']} of "
                   f"{cmp['layers']} layers (Σ|Δr| = {cmp['rank_l1']}); projector distance median "
                   f"{cmp['median_distance']:.2e}, max {cmp['max_distance']:.2e}; {load}")
    print(table)
    print(summary)
    path = write_results("bench_eva", {"config": {**kw, "model": "SmolLM2-135M-Instruct (fp32)", "rho": 2.0,
                                                  "tokens": math.ceil(args.seqs / 4) * 4 * args.seq_len},
                                       "rows": rows, "comparison": cmp, "table": table, "summary": summary})
    print(f"wrote {path}")
    return {"rows": rows, "comparison": cmp}


if __name__ == "__main__":
    main()
