"""EoRA: compress SmolLM2-135M, then repair it with a low-rank compensation, and compare perplexity.

The compressed weight W_c stays as it is; EoRA puts a rank-r LoRA on top that best cancels the compression error
ΔW = W − W_c *on the calibration inputs* (‖(ΔW − B·A)·X‖ minimal). For comparison, the plain truncated SVD of
ΔW (EoRA with C = I, the same function with identity covariances) at the same rank. The covariances come from
the original model's inputs, ``wrap``'s default. Calibration and held-out evaluation text are disjoint halves of
Python's documentation (``pydoc_data.topics``).

    python examples/eora_compensate.py                          # 3-bit g64 RTN, ranks 16 and 64, ~7 minutes here
    python examples/eora_compensate.py --compress 2:4 --ranks 32
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tasks  # noqa: E402


def compress(model, how: str, covs, targets="all-linear"):
    """A compressed copy: ``q<bits>`` (RTN, groups of 64 input columns) or ``N:M`` pruning (Wanda scores)."""
    import svdadapt

    if how.startswith("q") and how[1:].isdigit():
        return svdadapt.compress.quantize(model, bits=int(how[1:]), group_size=64, target_modules=targets)
    if ":" in how:
        return svdadapt.compress.prune(model, how, calibration=covs, target_modules=targets)
    raise ValueError(f"--compress must look like q4 / q3 (bits) or 2:4 (N:M pruning), got {how!r}")


def main(argv: list[str] | None = None, model=None, tokenizer=None) -> dict:
    """Run the example; ``model``/``tokenizer`` may be passed in (tests; not modified), else ``--model`` or the
    bundled SmolLM2. Returns ``{"rows": [...]}`` with one perplexity per configuration."""
    import svdadapt

    p = argparse.ArgumentParser(description="Compress, compensate with EoRA, compare perplexity.")
    p.add_argument("--compress", default="q3", help="q<bits> (RTN g64) or N:M pruning (default q3)")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--targets", default="all-linear", help=_tasks.TARGETS_HELP)
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--eval-seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--model", default=None, help=_tasks.MODEL_HELP)
    p.add_argument("--plot", default=None, help="write a PNG of perplexity vs rank here")
    args = p.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = _tasks.parse_targets(args.targets)

    model, tokenizer = _tasks.model_or_default(model, tokenizer, args.model)
    texts = _tasks.pydoc_texts()
    calib_texts, eval_texts = texts[0::2], texts[1::2]  # disjoint documents
    calib = svdadapt.text_batches(tokenizer, calib_texts, seq_len=args.seq_len, batch_size=8,
                                  max_batches=-(-args.calib_seqs // 8))
    evalb = svdadapt.text_batches(tokenizer, eval_texts, seq_len=args.seq_len, batch_size=8,
                                  max_batches=-(-args.eval_seqs // 8))

    rows = [{"config": "original", "rank": 0, "ppl": _tasks.perplexity(model, evalb, progress=True)}]
    # one set of covariances, from the ORIGINAL model's inputs: Wanda pruning scores with it, and EoRA whitens by
    # it (wrap's default calibrate_on="reference", which recovered more in benchmarks/bench_eora.py)
    covs = svdadapt.collect_covariances(model, calib, target_modules=targets)
    t0 = time.perf_counter()
    compressed = compress(model, args.compress, covs, targets)
    rows.append({"config": f"{args.compress} compressed", "rank": 0, "ppl": _tasks.perplexity(compressed, evalb),
                 "time_s": time.perf_counter() - t0})
    eyes: dict[int, torch.Tensor] = {}  # one identity per width, shared like the covariances
    identity = {n: eyes.setdefault(c.shape[0], torch.eye(c.shape[0], dtype=c.dtype)) for n, c in covs.items()}
    for rank in ranks:
        for label, cal in (("SVD of ΔW", identity), ("EoRA", covs)):
            t0 = time.perf_counter()
            pm = svdadapt.wrap(copy.deepcopy(compressed), "eora", rank, calibration=cal, reference=model,
                               target_modules=targets, progress=False)
            init_s = time.perf_counter() - t0
            rows.append({"config": f"{args.compress} + {label}", "rank": rank, "ppl": _tasks.perplexity(pm, evalb),
                         "time_s": init_s})
            del pm

    base_ppl, comp_ppl = rows[0]["ppl"], rows[1]["ppl"]
    for r in rows:
        # share of the perplexity increase that compression caused and the adapter removed
        r["recovered"] = None if r["rank"] == 0 else (comp_ppl - r["ppl"]) / (comp_ppl - base_ppl)
    n_eval = sum(int(b["attention_mask"].sum()) for b in evalb)
    print(f"\nheld-out perplexity on {n_eval} pydoc tokens (calibration: {covs.tokens} other pydoc tokens)\n")
    print("| configuration | rank | perplexity | recovered | init (s) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        rec = "—" if r["recovered"] is None else f"{100 * r['recovered']:.0f} %"
        t = f"{r['time_s']:.1f}" if "time_s" in r else "—"
        print(f"| {r['config']} | {r['rank'] or '—'} | {r['ppl']:.3f} | {rec} | {t} |")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, style in (("SVD of ΔW", "s--"), ("EoRA", "o-")):
            rs = [r for r in rows if r["config"].endswith(label)]
            ax.plot([r["rank"] for r in rs], [r["ppl"] for r in rs], style, label=f"{args.compress} + {label}")
        ax.axhline(base_ppl, color="black", lw=1, label="original")
        ax.axhline(comp_ppl, color="grey", ls=":", label=f"{args.compress}, no adapter")
        ax.set(xlabel="rank", ylabel="held-out perplexity", title="SmolLM2-135M: compensation of compression")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return {"rows": rows, "eval_tokens": n_eval, "calib_tokens": covs.tokens}


if __name__ == "__main__":
    main()
