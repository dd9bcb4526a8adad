"""PiSSA on MoE experts (``target_parameters``) at a realistic shape: a random Mixtral (hidden 1024, 8 experts,
4 layers, built from a config, transformers 5's 3-D ``experts.gate_up_proj`` / ``experts.down_proj``), rank 16,
experts only. In the same run, each in a fresh process (its own peak RSS):

- ``svdadapt``: ``wrap(model, "pissa", rank=16, target_modules=[], target_parameters=[...])``, each expert
  decomposed on its own (block Krylov, ``svd="auto"``);
- ``peft``: ``get_peft_model`` with ``LoraConfig(target_parameters=[...], init_lora_weights="pissa_niter_16")``,
  what PEFT 0.21 does there (measured: it fails; its error is recorded);
- ``svd_lowrank``: ``torch.svd_lowrank(W_e, q=16, niter=16)`` per expert (PEFT's ``pissa_niter_16`` for a 2-D
  layer), the decompositions only.

Reported: init time (wall and CPU, one BLAS thread), peak RSS, and the captured energy Σσ̃² of the rank-16 factors
relative to the exact Σσ² (fp32 LAPACK ``svdvals`` per expert), mean and worst over the experts.

    python benchmarks/bench_moe.py                    # ~3 min on one quiet core
    python benchmarks/bench_moe.py --intermediate 3584 --layers 2

Writes ``benchmarks/results/bench_moe.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, run_job, write_results  # noqa: E402

RANK = 16
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def _model(hidden: int, intermediate: int, layers: int, experts: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=16, num_key_value_heads=4, num_local_experts=experts,
                        num_experts_per_tok=2, max_position_embeddings=128)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # a decaying spectrum per expert, as trained weights have (a flat one makes every
        for p in model.parameters():  # rank-16 energy ~ 16/n and hides the sketches' differences)
            if p.dim() == 3:
                n = min(p.shape[1:])
                U = torch.linalg.qr(torch.randn(p.shape[0], p.shape[1], n)).Q
                V = torch.linalg.qr(torch.randn(p.shape[0], p.shape[2], n)).Q
                s = torch.logspace(0, -2, n)
                p.copy_((U * s) @ V.mT * 0.05)
    return model


def _exact_energy(model) -> list[float]:
    """Σ of the top-16 σ² of every expert (fp32 LAPACK), in model order."""
    out = []
    for p in (p for p in model.parameters() if p.dim() == 3):
        for e in range(p.shape[0]):
            out.append(float(torch.linalg.svdvals(p[e].detach()).pow(2)[:RANK].sum()))
    return out


def job_svdadapt(hidden: int, intermediate: int, layers: int, experts: int) -> dict:
    import svdadapt

    torch.set_num_threads(1)
    model = _model(hidden, intermediate, layers, experts)
    exact, keys = _exact_energy(model), [n for n, _ in _model_keys(model)]
    t0, c0 = time.perf_counter(), time.process_time()
    pm = svdadapt.wrap(model, "pissa", RANK, target_modules=[], target_parameters=EXPERTS, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    by_key = {}
    for n, (A, B) in pm.svdadapt.init_factors.items():  # per expert ‖s·B_e·A_e‖² (s = 1: alpha = rank)
        info = pm.svdadapt.parameters[n]
        E = info["experts"]  # PEFT's layout: lora_A (E·r, in) blocks, lora_B column j·E + e (docs/experts.md)
        a, b = A.double().reshape(E, RANK, -1), B.double().reshape(B.shape[0], RANK, E).permute(2, 0, 1)
        by_key[info["key"]] = [float((b[e] @ a[e]).pow(2).sum()) for e in range(E)]
    got = [v for k in keys for v in by_key[k]]
    return {"wall_s": wall, "cpu_s": cpu, "ratios": [g / x for g, x in zip(got, exact)], "ok": True}


def _model_keys(model):
    return [(n, p) for n, p in model.named_parameters() if p.dim() == 3]


def job_peft(hidden: int, intermediate: int, layers: int, experts: int) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    model = _model(hidden, intermediate, layers, experts)
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=[], target_parameters=EXPERTS,
                     init_lora_weights="pissa_niter_16")
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        get_peft_model(model, cfg)
        error = None
    except Exception as e:  # what PEFT does there, recorded
        error = f"{type(e).__name__}: {e}"
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "ok": error is None,
            "error": error}


def job_lowrank(hidden: int, intermediate: int, layers: int, experts: int) -> dict:
    torch.set_num_threads(1)
    model = _model(hidden, intermediate, layers, experts)
    exact = _exact_energy(model)
    got = []
    t0, c0 = time.perf_counter(), time.process_time()
    for _, p in _model_keys(model):
        for e in range(p.shape[0]):
            _, S, _ = torch.svd_lowrank(p[e].detach(), q=RANK, niter=16)
            got.append(float(S.pow(2).sum()))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "ratios": [g / x for g, x in zip(got, exact)], "ok": True}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    args = p.parse_args(argv)
    shape = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, experts=args.experts)
    rows = []
    for name, target in (("svdadapt pissa (per expert, block Krylov)", "bench_moe:job_svdadapt"),
                         ("PEFT target_parameters pissa_niter_16", "bench_moe:job_peft"),
                         ("torch.svd_lowrank niter 16 per expert", "bench_moe:job_lowrank")):
        r = run_job(target, env={"OMP_NUM_THREADS": "1"}, **shape)
        ratios = r.get("ratios") or []
        rows.append({"variant": name, **r, "mean_energy": sum(ratios) / len(ratios) if ratios else None,
                     "min_energy": min(ratios) if ratios else None})
    print(markdown_table(rows, [("variant", "variant", "{}"), ("wall_s", "init wall s", "{:.1f}"),
                                ("cpu_s", "init CPU s", "{:.1f}"), ("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
                                ("mean_energy", "energy / optimal (mean)", "{:.5f}"),
                                ("min_energy", "(worst expert)", "{:.5f}")]))
    for r in rows:
        if r.get("error"):
            print(f"{r['variant']}: {r['error']}")
    for r in rows:
        r.pop("ratios", None)
    path = write_results("bench_moe", {"shape": shape, "rank": RANK, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
