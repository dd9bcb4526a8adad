"""CorDA cost on the real SmolLM2-135M: svdadapt vs PEFT, same model, same calibration tokens, rank 16, IPA.

- svdadapt: ``collect_covariances`` (batched, one covariance per unique input) then
  ``wrap(method="corda", mode="ipa")`` (damped Cholesky per unique input, block-Krylov or full SVD per layer).
- svdadapt, batches handed to ``wrap(calibration=batches)``: ``blockwise=True`` (one decoder block's covariances
  at a time, decomposed as soon as they are collected; ``svdadapt.blockwise``) and ``blockwise=False`` (the
  whole-model path: every covariance, then every decomposition).
- svdadapt streamed from a checkpoint: ``init_checkpoint(dir, out, method="corda", calibration=batches)`` on the
  model saved as safetensors (written by a separate job first): the model is never loaded; one decoder block's
  weights are in memory at a time (``svdadapt.stream.lazy``), the base is written tensor by tensor. Its peak RSS is the
  whole process's, and its time includes writing the new base (540 MB, in ``--shard-mb`` shards: the writer holds
  the shard it fills) and adapter.
- PEFT 0.21: ``preprocess_corda`` (hooks with batch size 1, one covariance per layer, explicit inverse, full
  SVD of every layer) then ``get_peft_model(init_lora_weights="corda")``.

Each configuration runs in a fresh process (``_common.run_job``): wall times exclude model loading. Two peak RSS
figures: the whole process's (loading included: the GGUF loader alone peaks at ~1130 MiB), and the peak of the CorDA
part with the loaded model resident (Linux: the peak is reset through ``/proc/self/clear_refs`` after loading).

    python benchmarks/bench_corda.py                 # 32 sequences x 256 tokens of pydoc text
    python benchmarks/bench_corda.py --seqs 8        # quicker

Writes ``benchmarks/results/bench_corda.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stopwatch, current_rss_mb, markdown_table, peak_rss_mb, run_job, smollm2, write_results  # noqa: E402


def _loaded() -> float:
    """The peak RSS so far (loading), then reset the peak so that the job's ``peak_rss_mb`` covers what follows
    (Linux ``clear_refs``; elsewhere the peak keeps counting the loading)."""
    loaded = peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return loaded


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(tok, seqs: int, seq_len: int):
    import svdadapt
    from pydoc_data.topics import topics

    batches = svdadapt.text_batches(tok, [topics[k] for k in sorted(topics)], seq_len=seq_len, batch_size=4,
                                    max_batches=math.ceil(seqs / 4))
    assert all(bool(b["attention_mask"].all()) for b in batches), "calibration text too short: padded batches"
    return batches


def job_svdadapt(seqs: int, seq_len: int, rank: int, svd: str) -> dict:
    import torch

    import svdadapt

    model, tok = smollm2()
    batches = _batches(tok, seqs, seq_len)
    loaded = _loaded()
    sw = Stopwatch()
    with sw("collect"):
        covs = svdadapt.collect_covariances(model, batches, progress=False)
    with sw("decompose"):
        peft_model = svdadapt.wrap(model, "corda", rank=rank, mode="ipa", calibration=covs, svd=svd, progress=False)
    energy = [r["energy"] for r in peft_model.svdadapt["report"].values()]
    return {**sw.results(), "rss_after_mb": current_rss_mb(), "layers": len(energy), "load_peak_rss_mb": loaded,
            "unique_inputs": len(covs.groups), "cov_mb": covs.nbytes / 2**20, "threads": torch.get_num_threads()}


def job_svdadapt_batches(seqs: int, seq_len: int, rank: int, blockwise: bool) -> dict:
    """``wrap(calibration=batches)``: collection and decomposition in one call (interleaved block by block with
    ``blockwise=True``)."""
    import torch

    import svdadapt

    model, tok = smollm2()
    batches = _batches(tok, seqs, seq_len)
    loaded = _loaded()
    sw = Stopwatch()
    with sw("wrap"):
        peft_model = svdadapt.wrap(model, "corda", rank=rank, mode="ipa", calibration=batches, blockwise=blockwise,
                                   progress=False)
    energy = [r["energy"] for r in peft_model.svdadapt["report"].values()]
    return {**sw.results(), "rss_after_mb": current_rss_mb(), "layers": len(energy), "load_peak_rss_mb": loaded,
            "threads": torch.get_num_threads()}


def job_save_checkpoint(path: str) -> dict:
    """SmolLM2 as a safetensors directory (model + tokenizer), for the streamed row."""
    model, tok = smollm2()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {}


def job_svdadapt_streamed(seqs: int, seq_len: int, rank: int, checkpoint: str, out: str, shard_mb: int) -> dict:
    import torch

    import svdadapt
    from svdadapt.loading import load_tokenizer

    batches = _batches(load_tokenizer(checkpoint), seqs, seq_len)
    sw = Stopwatch()
    with sw("init_checkpoint"):
        svdadapt.init_checkpoint(checkpoint, out, method="corda", mode="ipa", rank=rank, calibration=batches,
                                 max_shard_bytes=shard_mb << 20, progress=False)
    import json

    layers = len(json.loads((Path(out) / "report.json").read_text())["layers"])
    return {**sw.results(), "rss_after_mb": current_rss_mb(), "layers": layers, "load_peak_rss_mb": 0.0,
            "threads": torch.get_num_threads()}


def job_peft(seqs: int, seq_len: int, rank: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model, tok = smollm2()
    batches = _batches(tok, seqs, seq_len)
    loaded = _loaded()
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method="ipm"))

    def run_model() -> None:  # PEFT's hooks take one sequence at a time (batch size 1)
        for b in batches:
            for row in b["input_ids"]:
                model(row[None])

    import time

    import peft.tuners.lora.corda as corda_mod

    collect_s: list[float] = []
    calib = corda_mod.calib_cov_distribution

    def timed_calib(*a, **k):  # preprocess_corda looks it up as a module global: time its share
        t = time.perf_counter()
        try:
            return calib(*a, **k)
        finally:
            collect_s.append(time.perf_counter() - t)

    corda_mod.calib_cov_distribution = timed_calib
    sw = Stopwatch()
    with sw("collect_and_decompose"):
        preprocess_corda(model, config, run_model=run_model)
    with sw("init"):
        peft_model = get_peft_model(model, config)
    n = sum(1 for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    res = sw.results()
    res["collect_s"] = collect_s[0]
    res["decompose_s"] = res["collect_and_decompose_s"] - collect_s[0] + res["init_s"]  # SVDs + get_peft_model
    return {**res, "rss_after_mb": current_rss_mb(), "layers": n, "load_peak_rss_mb": loaded,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice). On a CPU shared with other jobs, 1 avoids "
                        "OpenMP oversubscription, which slows LAPACK SVDs ~10x")
    p.add_argument("--shard-mb", type=int, default=100,
                   help="output shard size of the streamed row (the writer holds one shard; default 100)")
    args = p.parse_args(argv)
    kw = dict(seqs=args.seqs, seq_len=args.seq_len, rank=args.rank)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None

    rows = []
    for svd in ("auto", "full"):
        r = run_job("bench_corda:job_svdadapt", env=env, svd=svd, **kw)
        r.update(impl=f"svdadapt (svd={svd!r})", total_s=r["collect_s"] + r["decompose_s"])
        rows.append(r)
        print(r, flush=True)
    for blockwise in (True, False):
        r = run_job("bench_corda:job_svdadapt_batches", env=env, blockwise=blockwise, **kw)
        r.update(impl=f"svdadapt wrap(calibration=batches, blockwise={blockwise})", total_s=r["wrap_s"],
                 collect_rss_start_mb=r["wrap_rss_start_mb"])
        rows.append(r)
        print(r, flush=True)
    with tempfile.TemporaryDirectory(prefix="svdadapt-bench-corda-") as tmp:
        run_job("bench_corda:job_save_checkpoint", path=f"{tmp}/ck")
        r = run_job("bench_corda:job_svdadapt_streamed", env=env, checkpoint=f"{tmp}/ck", out=f"{tmp}/out",
                    shard_mb=args.shard_mb, **kw)
    r.update(impl=f"svdadapt init_checkpoint (streamed, block by block, {args.shard_mb} MiB output shards)",
             total_s=r["init_checkpoint_s"],
             collect_rss_start_mb=r["init_checkpoint_rss_start_mb"])
    rows.append(r)
    print(r, flush=True)
    r = run_job("bench_corda:job_peft", env=env, **kw)
    r.update(impl="PEFT preprocess_corda + get_peft_model", total_s=r["collect_and_decompose_s"] + r["init_s"])
    rows.append(r)
    print(r, flush=True)

    for r in rows:
        r["corda_peak_rss_mb"] = r["peak_rss_mb"]  # the peak was reset after loading
        r["peak_rss_mb"] = max(r["peak_rss_mb"], r["load_peak_rss_mb"])
        if "collect_and_decompose_rss_start_mb" in r:
            r["collect_rss_start_mb"] = r["collect_and_decompose_rss_start_mb"]
    table = markdown_table(rows, [
        ("impl", "implementation", "{}"), ("collect_s", "collect (s)", "{:.1f}"),
        ("decompose_s", "decompose + wrap (s)", "{:.1f}"), ("total_s", "total (s)", "{:.1f}"),
        ("peak_rss_mb", "peak RSS (MiB)", "{:.0f}"),
        ("corda_peak_rss_mb", "peak RSS, loading excluded (MiB)", "{:.0f}"),
        ("collect_rss_start_mb", "RSS at start (MiB)", "{:.0f}")])
    path = write_results("bench_corda", {"config": {**kw, "model": "SmolLM2-135M-Instruct (fp32)",
                                                    "tokens": args.seqs * args.seq_len, "threads": args.threads}, "rows": rows, "table": table})
    print(table)
    print(f"\nwrote {path}")
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    main()
