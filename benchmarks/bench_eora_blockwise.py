"""EoRA with block-by-block calibration on SmolLM2-135M: which inputs should block i's covariances come from?

- reference (``BlockwiseOptions(sequential=False)``): the original model's activations, block after block: the same
  covariances as the whole-model path (``blockwise=False``, also run, to show that the adapters are identical);
- sequential (``BlockwiseOptions(sequential=True)``, what ``wrap``'s default gives for EoRA): block i reads the outputs of the compressed blocks 0..i−1
  with their compensation already applied (the EoRA paper's sequential variant), and its own layers' inputs
  come from the reference block i (``calibrate_on="reference"``) or from the compressed block i
  (``calibrate_on="compressed"``, the paper's choice);
- compressed (``calibrate_on="compressed"``, not sequential): the uncompensated compressed model's activations.

Compression: round-to-nearest, asymmetric, groups of 64 (``svdadapt.compress.quantize``) of all 210 Linears.
Calibration: pydoc prose; evaluation: perplexity on held-out standard-library source, as ``bench_eora.py`` measures it.

    python benchmarks/bench_eora_blockwise.py --threads 1                 # 3-bit g64, rank 16, 8192 eval tokens
    python benchmarks/bench_eora_blockwise.py --threads 1 --eval-tokens 4096 --calib-seqs 16   # quicker
    python benchmarks/bench_eora_blockwise.py --threads 1 --bits 2 --variants reference sequential --out NAME

Writes ``benchmarks/results/bench_eora_blockwise.json`` (after every row).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, smollm2, write_results  # noqa: E402
from bench_eora import calibration_texts, code_texts, perplexity  # noqa: E402

import svdadapt  # noqa: E402
from svdadapt.blockwise import BlockwiseOptions  # noqa: E402

VARIANTS = {  # key -> (name, wrap keywords)
    "whole": ("whole model, reference inputs", dict(blockwise=False)),
    "reference": ("blockwise, reference inputs", dict(blockwise=BlockwiseOptions(sequential=False))),
    "sequential": ("blockwise, sequential (reference block i)", dict(blockwise=BlockwiseOptions(sequential=True))),
    "sequential-compressed": ("blockwise, sequential (compressed block i)",
                              dict(blockwise=BlockwiseOptions(sequential=True), calibrate_on="compressed")),
    "compressed": ("blockwise, compressed inputs", dict(blockwise=BlockwiseOptions(sequential=False),
                                                         calibrate_on="compressed")),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens, in 512-token sequences")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="bench_eora_blockwise", help="results name (benchmarks/results/<out>.json)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = smollm2()
    calib = svdadapt.text_batches(tok, calibration_texts(), seq_len=args.calib_len, batch_size=4,
                                  max_batches=math.ceil(args.calib_seqs / 4))
    evals = svdadapt.text_batches(tok, code_texts(), seq_len=512, batch_size=4,
                                  max_batches=math.ceil(args.eval_tokens / 2048))
    qmodel = svdadapt.compress.quantize(model, bits=args.bits, group_size=args.group_size)
    rows: list[dict] = []
    payload = {"config": {**vars(args), "torch_threads": torch.get_num_threads(),
                          "calib_tokens": sum(int(b["attention_mask"].sum()) for b in calib),
                          "eval_tokens": sum(int(b["attention_mask"].sum()) for b in evals),
                          "model": "SmolLM2-135M-Instruct (fp32)"}, "rows": rows}

    def record(**row) -> None:
        rows.append(row)
        print(row, flush=True)
        write_results(args.out, payload)

    for name, m in (("original", model), (f"{args.bits}-bit g{args.group_size} RTN", qmodel)):
        record(variant=name, ppl=perplexity(m, evals)[0])
    factors = {}
    for key in args.variants:
        name, kw = VARIANTS[key]
        t = time.perf_counter()
        peft_model = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=args.rank, reference=model, calibration=calib,
                                   progress=False, **kw)
        wrap_s = time.perf_counter() - t
        factors[key] = peft_model.svdadapt["init_factors"]
        record(variant=f"+ EoRA r{args.rank}, {name}", ppl=perplexity(peft_model.merge_and_unload(), evals)[0],
               wrap_s=wrap_s)
    if "whole" in factors and "reference" in factors:
        a, b = factors["whole"], factors["reference"]
        payload["blockwise_equals_whole_model"] = all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1])
                                                      for n in a)
    table = markdown_table(rows, [("variant", "model", "{}"), ("ppl", "perplexity", "{:.2f}"),
                                  ("wrap_s", "wrap (s)", "{:.0f}")])
    payload["table"] = table
    path = write_results(args.out, payload)
    print(table)
    if "blockwise_equals_whole_model" in payload:
        print(f"blockwise factors bit-identical to the whole-model path: {payload['blockwise_equals_whole_model']}")
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
