"""EoRA on the real SmolLM2-135M: how much of the compression loss a rank-r compensation recovers.

Calibration: English prose from ``pydoc_data.topics``. Evaluation: perplexity on held-out text of another kind,
Python standard-library source code. For the original model, 3-bit and 2-bit g128 round-to-nearest
quantization and 2:4 pruning (activation-aware, Wanda scores from the calibration covariances), and for each
compressed model plus rank-16 / rank-64 compensation by plain truncated SVD of ΔW and by EoRA. EoRA runs twice,
with covariances collected on the compressed model's inputs and on the original's, to choose ``wrap``'s
default ``calibrate_on``.

Plain SVD is EoRA with C = I (M* = [ΔW]_r), so both go through ``svdadapt.wrap``; the adapters are merged for
evaluation (``merge_and_unload``), which changes nothing but the speed.

    python benchmarks/bench_eora.py                      # the README table (~15 min on a quiet 2-core CPU)
    python benchmarks/bench_eora.py --eval-tokens 4096 --ranks 16 --compressions q3   # a quick look

Writes ``benchmarks/results/bench_eora.json`` (after every row, so an interrupted run keeps its numbers).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, smollm2, write_results  # noqa: E402

import svdadapt  # noqa: E402

COMPRESSIONS = {
    "q3": "3-bit g128 RTN",
    "q2": "2-bit g128 RTN",
    "p24": "2:4 pruning (Wanda)",
}


def calibration_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def code_texts() -> list[str]:
    """Standard-library sources, in a fixed order (a different kind of text from the calibration prose)."""
    root = os.path.dirname(os.__file__)
    names = sorted(f for f in os.listdir(root) if f.endswith(".py") and not f.startswith("_"))
    out = []
    for f in names:
        with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
            out.append(fh.read())
    return out


def prose_and_code_batches(tok, calib_len: int, calib_seqs: int, eval_tokens: int) -> tuple[list, list]:
    """(calibration, held-out) batches of 4: ``calib_seqs`` sequences of ``calib_len`` tokens of the calibration
    prose, and about ``eval_tokens`` tokens of standard-library source in sequences of 512."""
    calib = svdadapt.text_batches(tok, calibration_texts(), seq_len=calib_len, batch_size=4,
                                  max_batches=math.ceil(calib_seqs / 4))
    evals = svdadapt.text_batches(tok, code_texts(), seq_len=512, batch_size=4,
                                  max_batches=math.ceil(eval_tokens / 2048))
    return calib, evals


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(perplexity, mean next-token NLL) over the unmasked tokens of ``batches``."""
    model.eval()
    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        target = b["input_ids"][:, 1:]
        keep = b["attention_mask"][:, 1:].bool()
        nll += torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="sum").item()
        n += int(keep.sum())
    loss = nll / n
    return math.exp(loss), loss


def identity_covariances(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """C = I for every target (one tensor per input width): EoRA then reduces to plain SVD of ΔW."""
    eyes: dict[int, torch.Tensor] = {}
    return {n: eyes.setdefault(m.in_features, torch.eye(m.in_features))
            for n, m in svdadapt.resolve_targets(model).items()}


def compensated(qmodel, reference, rank: int, calibration) -> torch.nn.Module:
    peft_model = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=rank, reference=reference,
                               calibration=calibration, progress=False)
    return peft_model.merge_and_unload()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--calib-len", type=int, default=256, help="calibration sequence length (default 256)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens, in 512-token sequences")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--compressions", nargs="+", default=list(COMPRESSIONS), choices=list(COMPRESSIONS))
    p.add_argument("--no-reference-calibration", action="store_true",
                   help="skip EoRA with covariances collected on the original model")
    p.add_argument("--from-json", metavar="PATH", help="only print the tables of an earlier results file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice). On a CPU shared with other jobs, 1 avoids "
                        "OpenMP oversubscription, which slows LAPACK SVDs ~10x")
    args = p.parse_args(argv)
    if args.from_json:
        import json

        saved = json.loads(Path(args.from_json).read_text())
        summary = summarize(saved["rows"], saved["config"]["ranks"])
        print(summary["table"] + "\n\n" + summary["calibrate_on_table"])
        return saved
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    model, tok = smollm2()
    calib = svdadapt.text_batches(tok, calibration_texts(), seq_len=args.calib_len, batch_size=4,
                                  max_batches=math.ceil(args.calib_seqs / 4))
    eval_batches = svdadapt.text_batches(tok, code_texts(), seq_len=512, batch_size=4,
                                         max_batches=math.ceil(args.eval_tokens / 2048))
    calib_tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    eval_tokens = sum(int(b["attention_mask"].sum()) for b in eval_batches)
    print(f"calibration: {calib_tokens} pydoc tokens; evaluation: {eval_tokens} stdlib-source tokens", flush=True)

    rows: list[dict] = []
    payload = {"config": {**vars(args), "torch_threads": torch.get_num_threads(), "calib_tokens": calib_tokens, "eval_tokens": eval_tokens,
                          "model": "SmolLM2-135M-Instruct (fp32)"}, "rows": rows}

    def record(**row) -> None:
        row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        write_results("bench_eora", payload)

    ppl0, loss0 = perplexity(model, eval_batches)
    record(compression="none", adapter="none", rank=0, ppl=ppl0, loss=loss0)

    t = time.perf_counter()
    covs_ref = svdadapt.collect_covariances(model, calib, progress=False)
    payload["collect_s_reference"] = time.perf_counter() - t
    eye = identity_covariances(model)

    for comp in args.compressions:
        if comp == "q3":
            qmodel = svdadapt.compress.quantize(model, bits=3, group_size=128)
        elif comp == "q2":
            qmodel = svdadapt.compress.quantize(model, bits=2, group_size=128)
        else:
            qmodel = svdadapt.compress.prune(model, pattern="2:4", calibration=covs_ref)
        ppl, loss = perplexity(qmodel, eval_batches)
        record(compression=comp, adapter="none", rank=0, ppl=ppl, loss=loss)
        t = time.perf_counter()
        covs_c = svdadapt.collect_covariances(qmodel, calib, progress=False)
        payload[f"collect_s_{comp}"] = time.perf_counter() - t
        for rank in args.ranks:
            variants = [("svd", eye), ("eora", covs_c)]
            if not args.no_reference_calibration:
                variants.append(("eora_ref", covs_ref))
            for adapter, covs in variants:
                t = time.perf_counter()
                merged = compensated(qmodel, model, rank, covs)
                init_s = time.perf_counter() - t
                ppl, loss = perplexity(merged, eval_batches)
                del merged
                record(compression=comp, adapter=adapter, rank=rank, ppl=ppl, loss=loss, init_s=init_s)
        del qmodel, covs_c

    summary = summarize(rows, args.ranks)
    payload["summary"] = summary
    payload["total_s"] = time.perf_counter() - t_start
    path = write_results("bench_eora", payload)
    print(summary["table"])
    print()
    print(summary["calibrate_on_table"])
    print(f"\nwrote {path} ({payload['total_s']:.0f} s)")
    return payload


def _ppl(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"


def summarize(rows: list[dict], ranks: list[int]) -> dict:
    """The README tables: perplexity per compression and adapter, and the fraction of the compression loss
    (in next-token NLL) recovered, ``(L_c − L_adapted) / (L_c − L_original)``.

    The main table's EoRA uses ``wrap``'s default covariances (``calibrate_on="reference"``, rows
    ``eora_ref``); the second table compares them with the compressed model's (rows ``eora``).
    """
    by = {(r["compression"], r["adapter"], r["rank"]): r for r in rows}
    base = by[("none", "none", 0)]
    default = "eora_ref" if any(r["adapter"] == "eora_ref" for r in rows) else "eora"
    out_rows, cal_rows = [], []
    for comp in [c for c in COMPRESSIONS if (c, "none", 0) in by]:
        c = by[(comp, "none", 0)]
        gap = c["loss"] - base["loss"]
        row = {"compression": COMPRESSIONS[comp], "ppl_c": _ppl(c["ppl"])}

        def recovered(r: dict) -> float | None:
            return (c["loss"] - r["loss"]) / gap if gap > 0 else None

        for rank in ranks:
            for adapter, key in (("svd", "svd"), (default, "eora")):
                r = by.get((comp, adapter, rank))
                if r is not None:
                    row[f"ppl_{key}_{rank}"] = _ppl(r["ppl"])
                    row[f"rec_{key}_{rank}"] = recovered(r)
            if (comp, "eora_ref", rank) in by and (comp, "eora", rank) in by:
                a, b = by[(comp, "eora", rank)], by[(comp, "eora_ref", rank)]
                cal_rows.append({"compression": COMPRESSIONS[comp], "rank": rank, "ppl_compressed": _ppl(a["ppl"]),
                                 "ppl_reference": _ppl(b["ppl"]), "rec_compressed": recovered(a),
                                 "rec_reference": recovered(b)})
        out_rows.append(row)
    cols = [("compression", "compression", "{}"), ("ppl_c", "ppl", "{:>}")]
    for rank in ranks:
        cols += [(f"ppl_svd_{rank}", f"+SVD r{rank}", "{:>}"), (f"ppl_eora_{rank}", f"+EoRA r{rank}", "{:>}")]
    for rank in ranks:
        cols += [(f"rec_svd_{rank}", f"SVD r{rank} recovers", "{:.0%}"),
                 (f"rec_eora_{rank}", f"EoRA r{rank} recovers", "{:.0%}")]
    table = f"original: ppl {base['ppl']:.2f}\n\n" + markdown_table(out_rows, cols)
    cal_table = markdown_table(cal_rows, [
        ("compression", "compression", "{}"), ("rank", "rank", "{:d}"),
        ("ppl_compressed", "ppl, C from compressed", "{:>}"), ("ppl_reference", "ppl, C from original (default)", "{:>}"),
        ("rec_compressed", "recovers (compressed)", "{:.0%}"), ("rec_reference", "recovers (original)", "{:.0%}")])
    return {"rows": out_rows, "calibrate_on_rows": cal_rows, "table": table, "calibrate_on_table": cal_table}


if __name__ == "__main__":
    main()
