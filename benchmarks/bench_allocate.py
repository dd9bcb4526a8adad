"""Does per-layer rank allocation pay off for EoRA? SmolLM2-135M-Instruct compressed two ways, compensated at equal
adapter parameters by uniform rank r and by ``wrap(..., allocate=True)`` (budget = what uniform rank r costs,
``max_rank`` = 4r, the method's own objective ``"eora"``), in one run.

Compressions (all 210 Linears of the blocks):

* ``nf4``   bitsandbytes nf4 (blocks of 64), through ``wrap(model, "eora", r, quantize="nf4", calibration=covs)``: the
            base is a real ``Linear4bit`` (kept on the fp32 dequantize path on CPU, see bench_quant.py); the
            no-adapter row is the same model with the adapter disabled
* ``q3g64`` simulated 3-bit round-to-nearest, groups of 64 (``svdadapt.compress.quantize(bits=3, group_size=64)``),
            compensated with ``wrap(qmodel, "eora", r, reference=model, calibration=covs)``

Calibration and evaluation as ``bench_eora.py``: covariances of the original model (``calibrate_on="reference"``,
wrap's default) on ``pydoc_data.topics`` prose; perplexity on held-out text of another kind, Python standard-library
source. Each row also gives the allocator's objective, the total whitened compensation error
Σ_layers ‖(ΔW − M)·S‖²_F (S·Sᵀ = C): Σ‖ΔW·S‖²_F minus the gain the ranks capture, for the uniform and the
allocated ranks (the uniform one computed two ways: from the allocator's ``uniform_gain`` and from the uniform
model's own per-layer report; they agree).

    python benchmarks/bench_allocate.py --threads 1                  # r16 and r64, both compressions
    python benchmarks/bench_allocate.py --threads 1 --ranks 16 --compressions q3g64   # one pair

Writes ``benchmarks/results/bench_allocate.json`` after every row (an interrupted run keeps its numbers).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, smollm2, write_results  # noqa: E402
from bench_eora import perplexity, prose_and_code_batches  # noqa: E402

import svdadapt  # noqa: E402

NAME = "bench_allocate"
COMPRESSIONS = {"nf4": "bitsandbytes nf4", "q3g64": "3-bit g64 RTN"}


def no_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes 4-bit layers on the fp32 dequantize path for eval (bench_quant.py's docstring says why)."""
    from svdadapt.modules.bnb import is_bnb_layer

    for m in model.modules():
        if is_bnb_layer(m) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def compensate(comp: str, model, qmodel, rank: int, covs, allocate: bool):
    """The EoRA PEFT model of one row (not merged: merging into an nf4 base would re-quantize)."""
    kw = dict(rank=rank, calibration=covs, allocate=allocate, progress=False)
    if comp == "nf4":
        pm = svdadapt.wrap(copy.deepcopy(model), "eora", quantize="nf4", **kw)
        no_cpu_repacking(pm)
        return pm
    return svdadapt.wrap(copy.deepcopy(qmodel), "eora", reference=model, **kw)


def kinds(ranks: dict[str, int]) -> str:
    """Ranks min/mean/max by module kind (q, k, v, o, gate, up, down)."""
    by: dict[str, list[int]] = {}
    for n, r in ranks.items():
        by.setdefault(n.rsplit(".", 1)[-1].replace("_proj", ""), []).append(r)
    return " · ".join(f"{k} {min(v)}/{sum(v) / len(v):.1f}/{max(v)}" for k, v in by.items())


def layer_totals(pm) -> dict[str, float]:
    """Each layer's Σ‖ΔW·S‖²_F, from an allocated model's report: its gain over the captured fraction."""
    rep = pm.svdadapt.report
    return {n: rep[n]["gain"] / rep[n]["energy"] if rep[n]["energy"] > 0 else 0.0 for n in pm.svdadapt.targets}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens, in 512-token sequences")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--compressions", nargs="+", default=["q3g64", "nf4"], choices=list(COMPRESSIONS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-json", metavar="PATH", help="only print the table of an earlier results file")
    args = p.parse_args(argv)
    if args.from_json:
        import json

        saved = json.loads(Path(args.from_json).read_text())
        print(table(saved["rows"]))
        return saved
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = smollm2()
    calib, evals = prose_and_code_batches(tok, args.calib_len, args.calib_seqs, args.eval_tokens)
    rows: list[dict] = []
    payload = {"config": {**vars(args), "calib_tokens": sum(int(b["attention_mask"].sum()) for b in calib),
                          "eval_tokens": sum(int(b["attention_mask"].sum()) for b in evals),
                          "model": "SmolLM2-135M-Instruct (fp32)"}, "rows": rows}

    def record(**row) -> None:
        row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        row["loadavg_1m"] = machine_info().get("loadavg_1m")
        rows.append(row)
        print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                       if k != "ranks"), flush=True)
        write_results(NAME, payload)

    ppl, loss = perplexity(model, evals)
    record(compression="none", adapter="none", rank=0, ppl=ppl, loss=loss)
    covs = svdadapt.collect_covariances(model, calib, progress=False)
    qmodels = {c: svdadapt.compress.quantize(model, bits=3, group_size=64) if c == "q3g64" else None
               for c in args.compressions}
    for rank in args.ranks:  # every compression at the first rank before the next rank
        for comp in args.compressions:
            run_pair(comp, model, qmodels[comp], rank, covs, evals, record, baseline=rank == args.ranks[0])
    payload["table"] = table(rows)
    payload["total_s"] = time.perf_counter() - t_start
    path = write_results(NAME, payload)
    print(payload["table"])
    print(f"\nwrote {path} ({payload['total_s']:.0f} s)")
    return payload


def run_pair(comp, model, qmodel, rank, covs, evals, record, baseline: bool) -> None:
    """Allocated then uniform rank ``rank`` on one compression (and the no-adapter row once)."""
    t = time.perf_counter()
    pm = compensate(comp, model, qmodel, rank, covs, True)
    init_s = time.perf_counter() - t
    if baseline:
        if comp == "nf4":
            with pm.disable_adapter():
                ppl, loss = perplexity(pm, evals)
        else:
            ppl, loss = perplexity(qmodel, evals)
        record(compression=comp, adapter="none", rank=0, ppl=ppl, loss=loss)
    rec = pm.svdadapt
    a = rec.allocation
    totals = layer_totals(pm)
    total = sum(totals.values())
    ranks = {n: rec.report[n]["rank"] for n in rec.targets}
    ppl, loss = perplexity(pm, evals)
    params = sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel()
                 for m in pm.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    record(compression=comp, adapter="allocated", rank=rank, ppl=ppl, loss=loss, init_s=init_s,
           params=params, budget=a["budget"], cost=a["cost"], whitened_error=total - a["gain"],
           whitened_total=total, uniform_error_allocator=total - a["uniform_gain"], max_rank=a["max_rank"],
           ranks_by_kind=kinds(ranks), ranks=ranks)
    del pm
    t = time.perf_counter()
    pm = compensate(comp, model, qmodel, rank, covs, False)
    init_s = time.perf_counter() - t
    err = sum(totals[n] * (1.0 - pm.svdadapt.report[n]["energy"]) for n in pm.svdadapt.targets)
    ppl, loss = perplexity(pm, evals)
    params = sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel()
                 for m in pm.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    record(compression=comp, adapter="uniform", rank=rank, ppl=ppl, loss=loss, init_s=init_s, params=params,
           whitened_error=err, whitened_total=total)
    del pm


def table(rows: list[dict]) -> str:
    """One line per (compression, rank): perplexities, the fraction of the compression loss (NLL) recovered, and
    the whitened error, uniform vs allocated."""
    by = {(r["compression"], r["adapter"], r["rank"]): r for r in rows}
    base = by.get(("none", "none", 0))
    out = []
    for comp in COMPRESSIONS:
        c = by.get((comp, "none", 0))
        for rank in sorted({r["rank"] for r in rows if r["compression"] == comp and r["rank"]}):
            u, a = by.get((comp, "uniform", rank)), by.get((comp, "allocated", rank))
            row = {"compression": COMPRESSIONS[comp], "rank": rank, "ppl_c": c and c["ppl"]}
            for key, r in (("u", u), ("a", a)):
                if r is None:
                    continue
                row[f"ppl_{key}"] = r["ppl"]
                row[f"err_{key}"] = r["whitened_error"] / r["whitened_total"]
                if c and base and c["loss"] > base["loss"]:
                    row[f"rec_{key}"] = (c["loss"] - r["loss"]) / (c["loss"] - base["loss"])
                row[f"params_{key}"] = r["params"]
            if a is not None:
                row["kinds"] = a["ranks_by_kind"]
            out.append(row)
    head = f"original: ppl {base['ppl']:.3f}\n\n" if base else ""
    return head + markdown_table(out, [
        ("compression", "compression", "{}"), ("rank", "budget = uniform rank", "{:d}"), ("ppl_c", "ppl, no adapter", "{:.3f}"),
        ("ppl_u", "ppl uniform", "{:.3f}"), ("ppl_a", "ppl allocated", "{:.3f}"),
        ("rec_u", "uniform recovers", "{:.1%}"), ("rec_a", "allocated recovers", "{:.1%}"),
        ("err_u", "whitened error left, uniform", "{:.4f}"), ("err_a", "allocated", "{:.4f}"),
        ("params_u", "params uniform", "{:,}"), ("params_a", "params allocated", "{:,}"),
        ("kinds", "allocated ranks min/mean/max", "{}")])


if __name__ == "__main__":
    main()
