"""EoRA on SmolLM2-135M quantized at 4 bits by real backends other than bitsandbytes: HQQ, torchao, optimum-quanto.

Every targeted Linear (all 210, the tied head excepted) is quantized by the backend itself; svdadapt reads each
layer's W_c through the backend's own dequantization (``svdadapt.modules.backends``) and EoRA compensates
ΔW = W − W_c with covariances of the original model's inputs (``calibrate_on="reference"``, the default). The adapted
model is evaluated as PEFT built it: the backend's layer as the base (HqqLoraLinear, TorchaoLoraLinear, lora.Linear
over quanto's QLinear), nothing merged. Held-out text and calibration are ``bench_eora.py``'s (pydoc prose to
calibrate, standard-library Python source to evaluate).

    python benchmarks/bench_quant_formats.py --threads 1                       # the docs/benchmarks.md table
    python benchmarks/bench_quant_formats.py --threads 1 --formats hqq4 --ranks 16 --eval-tokens 4096
    python benchmarks/bench_quant_formats.py --threads 1 --gptq --eval-tokens 4096   # the GPTQ side by side

Writes ``benchmarks/results/bench_quant_formats.json`` after every row (``--gptq``: ``bench_quant_formats_gptq.json``).

``--gptq`` (GPTQModel does not install here, so its algorithm as its code states it, ``gptqmodel_ref.py``): the 210
Linears quantized by GPTQ at 4 bits, group 128, GPTQModel's defaults, block by block on the calibration batches
(``gptq_sequential.py``), W_c kept as fp32 ``nn.Linear`` weights; then on that one model, at each rank: svdadapt's
EoRA (``wrap(qmodel, "eora", reference=original, calibration=covs)``), GPTQModel's EoRA (``eora_compute_lora``) with
the same covariances and with the statistics GPTQModel collects itself (the quantized model's inputs, batches weighted
geometrically), its A, B in a PEFT LoRA (alpha = r, scaling 1, as GPTQModel adds B·A) at the same targets, the ACT-S
baseline (SVD of ΔW·D, D = diag(√diag C): EoRA with the covariance's diagonal alone) and plain SVD of ΔW. Each init
is timed in CPU seconds (set ``--threads 1``) with its peak RSS sampled (``_common.Measured``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Measured, markdown_table, smollm2, write_results  # noqa: E402
from bench_eora import identity_covariances, perplexity, prose_and_code_batches  # noqa: E402

import svdadapt  # noqa: E402

FORMATS = {
    "hqq4": "HQQ 4-bit g64 (hqq)",
    "ao4": "torchao int4 weight-only g64 (IntxWeightOnlyConfig)",
    "quanto4": "optimum-quanto qint4 (its default groups: 128, 96 where in = 576)",
}


def _set_child(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    """A copy of ``model`` with every target quantized by the backend of ``fmt`` (the library's own quantizer)."""
    q = copy.deepcopy(model)
    names = list(svdadapt.resolve_targets(q))
    if fmt == "hqq4":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        for n in names:
            _set_child(q, n, HQQLinear(q.get_submodule(n), BaseQuantizeConfig(nbits=4, group_size=64),
                                       compute_dtype=torch.float32, device="cpu"))
    elif fmt == "ao4":
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        quantize_(q, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)),
                  filter_fn=lambda m, fqn: fqn in set(names))
    else:
        from optimum.quanto import freeze, qint4, quantize

        quantize(q, weights=qint4, include=names)
        freeze(q)
    return q


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens, in 512-token sequences")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gptq", action="store_true", help="the GPTQ side by side with GPTQModel's EoRA (only that)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = smollm2()
    calib, evals = prose_and_code_batches(tok, args.calib_len, args.calib_seqs, args.eval_tokens)
    rows: list[dict] = []
    payload = {"config": {**vars(args), "torch_threads": torch.get_num_threads(),
                          "load_at_start": os.getloadavg(), "model": "SmolLM2-135M-Instruct (fp32)"}, "rows": rows}
    name = "bench_quant_formats_gptq" if args.gptq else "bench_quant_formats"

    def record(**row) -> None:
        row["elapsed_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        write_results(name, payload)

    if args.gptq:
        return gptq_side_by_side(args, model, calib, evals, payload, record, t0)
    ppl, _ = perplexity(model, evals)
    record(format="none", adapter="none", rank=0, ppl=ppl)
    covs = svdadapt.collect_covariances(model, calib, progress=False)
    for fmt in args.formats:
        t = time.perf_counter()
        qmodel = quantized(model, fmt)
        quant_s = time.perf_counter() - t
        ppl, _ = perplexity(qmodel, evals)
        record(format=fmt, adapter="none", rank=0, ppl=ppl, quantize_s=round(quant_s, 1))
        for rank in args.ranks:
            t = time.perf_counter()
            pm = svdadapt.wrap(quantized(model, fmt), "eora", rank, reference=model, calibration=covs,
                               progress=False)
            init_s = time.perf_counter() - t
            ppl, _ = perplexity(pm, evals)
            record(format=fmt, adapter="eora", rank=rank, ppl=ppl, init_s=round(init_s, 1))
            del pm
        del qmodel
    payload["load_at_end"] = os.getloadavg()
    payload["table"] = table(rows, args.ranks)
    path = write_results("bench_quant_formats", payload)
    print(payload["table"])
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s; load {payload['config']['load_at_start']} -> "
          f"{payload['load_at_end']})")
    return payload


def table(rows: list[dict], ranks: list[int]) -> str:
    by = {(r["format"], r["adapter"], r["rank"]): r for r in rows}
    base = by[("none", "none", 0)]["ppl"]
    out = []
    for fmt in FORMATS:
        if (fmt, "none", 0) not in by:
            continue
        row = {"format": FORMATS[fmt], "orig": f"{base:.3f}", "q": f"{by[(fmt, 'none', 0)]['ppl']:.3f}"}
        for r in ranks:
            if (fmt, "eora", r) in by:
                row[f"e{r}"] = f"{by[(fmt, 'eora', r)]['ppl']:.3f}"
        out.append(row)
    cols = [("format", "format", "{}"), ("orig", "original", "{}"), ("q", "quantized", "{}")]
    cols += [(f"e{r}", f"EoRA r{r}", "{}") for r in ranks]
    return markdown_table(out, cols)


# --------------------------------------------------------------------------------------------- --gptq
GPTQ_ADAPTERS = {
    "eora": "svdadapt EoRA",
    "gptqmodel": "GPTQModel EoRA, same covariances",
    "gptqmodel_own": "GPTQModel EoRA, its own statistics",
    "acts": "ACT-S (SVD of ΔW·diag(√diag C))",
    "svd": "plain SVD of ΔW",
}


def with_factors(qmodel: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int):
    """A PEFT LoRA model on ``qmodel`` (r = alpha = ``rank``: scaling 1) whose layer n holds ``factors[n]`` = (A, B)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(qmodel, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(factors), lora_dropout=0.0,
                                           init_lora_weights=False))
    for n, (A, B) in factors.items():
        layer = pm.base_model.model.get_submodule(n)
        layer.lora_A["default"].weight.data.copy_(A)
        layer.lora_B["default"].weight.data.copy_(B)
    return pm


def diagonal_covariances(covs) -> dict[str, torch.Tensor]:
    """diag(diag C) for every layer (one tensor per shared covariance): EoRA with it whitens by D = diag(√diag C),
    M* = [ΔW·D]_r·D⁻¹, the ACT-S baseline."""
    made: dict[int, torch.Tensor] = {}
    return {n: made.setdefault(id(covs[n]), torch.diag(covs[n].diagonal())) for n in covs}


def gptq_adapter(kind: str, rank: int, model, qmodel, covs, own_stats):
    """The PEFT model of adapter ``kind`` at ``rank`` on a fresh copy of the GPTQ model."""
    from gptqmodel_ref import gptqmodel_eora

    q = copy.deepcopy(qmodel)
    if kind in ("gptqmodel", "gptqmodel_own"):
        stats = covs if kind == "gptqmodel" else own_stats
        factors = {n: gptqmodel_eora(model.get_submodule(n).weight, m.weight, stats[n], rank)
                   for n, m in svdadapt.resolve_targets(q).items()}
        return with_factors(q, factors, rank)
    cal = {"eora": lambda: covs, "acts": lambda: diagonal_covariances(covs),
           "svd": lambda: identity_covariances(model)}[kind]()
    return svdadapt.wrap(q, "eora", rank, reference=model, calibration=cal, progress=False)


def gptq_side_by_side(args, model, calib, evals, payload: dict, record, t0: float) -> dict:
    """The ``--gptq`` rows: original, GPTQ alone, and every adapter of ``GPTQ_ADAPTERS`` at every rank."""
    from gptq_sequential import gptq_model

    ppl, _ = perplexity(model, evals)
    record(format="none", adapter="none", rank=0, ppl=ppl)
    with Measured() as m:
        qmodel, own_stats = gptq_model(model, calib)
    ppl, _ = perplexity(qmodel, evals)
    record(format="gptq4", adapter="none", rank=0, ppl=ppl, quantize_cpu_s=round(m.cpu_s, 1))
    covs = svdadapt.collect_covariances(model, calib, progress=False)
    for rank in args.ranks:
        for kind in GPTQ_ADAPTERS:
            with Measured() as m:
                pm = gptq_adapter(kind, rank, model, qmodel, covs, own_stats)
            ppl, _ = perplexity(pm, evals)
            record(format="gptq4", adapter=kind, rank=rank, ppl=ppl, init_cpu_s=round(m.cpu_s, 1),
                   init_wall_s=round(m.wall_s, 1), rss_start_mb=round(m.rss_start_mb), rss_peak_mb=round(m.rss_peak_mb))
            del pm
    payload["load_at_end"] = os.getloadavg()
    payload["table"] = gptq_table(payload["rows"], args.ranks)
    path = write_results("bench_quant_formats_gptq", payload)
    print(payload["table"])
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f} s; load {payload['config']['load_at_start']} -> "
          f"{payload['load_at_end']})")
    return payload


def gptq_table(rows: list[dict], ranks: list[int]) -> str:
    """Per adapter: perplexity, init CPU s and peak RSS above the RSS at the start of the init, at each rank; the
    original and GPTQ alone in the first rank's perplexity column."""
    by = {(r["format"], r["adapter"], r["rank"]): r for r in rows}
    first = f"p{ranks[0]}"
    out = [{"adapter": "original fp32", first: f"{by[('none', 'none', 0)]['ppl']:.3f}"},
           {"adapter": "GPTQ 4-bit g128, no adapter", first: f"{by[('gptq4', 'none', 0)]['ppl']:.3f}"}]
    for kind, label in GPTQ_ADAPTERS.items():
        row = {"adapter": label}
        for r in ranks:
            x = by.get(("gptq4", kind, r))
            if x is not None:
                row |= {f"p{r}": f"{x['ppl']:.3f}", f"t{r}": f"{x['init_cpu_s']:.1f}",
                        f"m{r}": f"{x['rss_peak_mb'] - x['rss_start_mb']:.0f}"}
        out.append(row)
    cols = [("adapter", "adapter", "{}")]
    cols += [(f"p{r}", f"ppl r{r}", "{:>}") for r in ranks]
    cols += [(f"t{r}", f"init CPU s r{r}", "{:>}") for r in ranks]
    cols += [(f"m{r}", f"peak RSS +MiB r{r}", "{:>}") for r in ranks]
    return markdown_table(out, cols)


if __name__ == "__main__":
    main()
