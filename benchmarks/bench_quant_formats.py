"""EoRA on SmolLM2-135M quantized at 4 bits by real backends other than bitsandbytes: HQQ, torchao, optimum-quanto.

Every targeted Linear (all 210, the tied head excepted) is quantized by the backend itself; svdadapt reads each
layer's W_c through the backend's own dequantization (``svdadapt.modules.backends``) and EoRA compensates
ΔW = W − W_c with covariances of the original model's inputs (``calibrate_on="reference"``, the default). The adapted
model is evaluated as PEFT built it: the backend's layer as the base (HqqLoraLinear, TorchaoLoraLinear, lora.Linear
over quanto's QLinear), nothing merged. Held-out text and calibration are ``bench_eora.py``'s (pydoc prose to
calibrate, standard-library Python source to evaluate).

    python benchmarks/bench_quant_formats.py --threads 1                       # the docs/benchmarks.md table
    python benchmarks/bench_quant_formats.py --threads 1 --formats hqq4 --ranks 16 --eval-tokens 4096

Writes ``benchmarks/results/bench_quant_formats.json`` after every row.
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
from _common import markdown_table, smollm2, write_results  # noqa: E402
from bench_eora import perplexity, prose_and_code_batches  # noqa: E402

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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = smollm2()
    calib, evals = prose_and_code_batches(tok, args.calib_len, args.calib_seqs, args.eval_tokens)
    rows: list[dict] = []
    payload = {"config": {**vars(args), "torch_threads": torch.get_num_threads(),
                          "load_at_start": os.getloadavg(), "model": "SmolLM2-135M-Instruct (fp32)"}, "rows": rows}

    def record(**row) -> None:
        row["elapsed_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        write_results("bench_quant_formats", payload)

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


if __name__ == "__main__":
    main()
