"""Scale: models that do not fit. Wall time and peak RSS of rank-16 initialization against checkpoint size, on
synthetic random-weight Llama checkpoints (``_synthetic.write_random_llama``: fp32, sharded at 1 GiB) of about
0.5, 1, 2 and 4 GB, by

  (a) in memory: ``from_pretrained`` then ``svdadapt.wrap(method="pissa")``, and ``wrap(method="corda")`` with
      random-token calibration (4 batches of 1 x 128 tokens);
  (b) streaming: ``svdadapt.init_checkpoint(method="pissa")`` (tensor by tensor; writes base/ and adapter/), and
      ``init_checkpoint(method="corda", calibration=...)`` (the same calibration, one decoder block loaded at a time);
  (c) streaming with 2 processes: 2 gloo ranks (``torch.multiprocessing.spawn``) each call ``init_checkpoint``;
      each rank decomposes the layers of its shards of the base and writes those shards, rank 0 then joins them and
      writes the adapter (CorDA: the calibration batches split over the ranks, covariances all-reduced);
  (d) PEFT ``init_lora_weights="pissa_niter_16"`` on the loaded model (``get_peft_model``), the reference;

and one point past the machine: a Llama-7B-shaped checkpoint (bf16 on disk, 13.5 GB; 27 GB in fp32) initialized
by streaming PiSSA; and MiLoRA's decompositions on that model (bottom-16 triplets, ``svd="auto"``: the fp64 Gram
eigendecomposition), timed on one 4096 x 4096 and one 4096 x 11008 layer (``plan_layer``, the call streaming makes
per layer) and extrapolated to the model's 32 x (4 + 3) Linears: stated as extrapolated, not a run of the model.

What is measured. Every row runs in a fresh subprocess (``_common.run_job``). Each job first imports torch,
transformers, peft and svdadapt and records the RSS then (``rss_imports_mb``); ``peak_rss_mb`` is the process's
peak RSS (``ru_maxrss``, includes file-backed pages mapped into it), ``growth_mb`` = peak - RSS after imports, and
``growth_per_largest`` its ratio to the checkpoint's largest tensor (``largest_tensor_mb``: the embeddings / output
head here), the unit streaming memory is bounded in.
``wall_s``: (a) and (d) load + init (the model is not saved), (b) the ``init_checkpoint`` call, which reads the
checkpoint and writes a new base and the adapter; (c) from ``spawn`` to ``join`` in the coordinating process,
so it includes starting 2 interpreters, their imports and the process group; ``rank_init_s`` is the slowest rank's
``init_checkpoint`` call alone. (c)'s peak RSS is the largest of the two ranks' own peaks (each rank a separate
process; the coordinator, which only waits, is reported apart); ``cpu_s`` there is the sum over ranks. CPU time
is the process's (all threads). The checkpoints are freshly written before their rows, so they are read from the
page cache where it holds them (this measures the work, not a cold disk).

    python benchmarks/bench_scale.py                        # 0.5 1 2 4 GB, then the 7B point (~45 min, 2 cores)
    python benchmarks/bench_scale.py --sizes 0.5 1 2 --skip-7b  # the small sizes only (~20 min)
    python benchmarks/bench_scale.py --paths stream_corda stream2_corda --rerun --skip-7b   # measure these again
    python benchmarks/bench_scale.py --report-only          # reprint the table, redraw the PNG from the JSON
    python benchmarks/bench_scale.py --milora-7b-layers --skip-7b --sizes  # only MiLoRA's 7B extrapolation (~3 min)

Resumable: the JSON is written after every row, and a rerun skips the rows already there with the same rank,
threads and calibration (``--fresh`` starts over). Each row records when it was measured (``measured_at``) and
the commit it measured (``commit``; ``+dirty`` with uncommitted changes under src/): rows of earlier runs are kept
as they were. Checkpoints and outputs go to a temporary directory (``--tmp``,
default the system's) and are deleted afterwards, also on failure.

Writes ``benchmarks/results/bench_scale.json`` and ``benchmarks/results/bench_scale.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS_DIR, current_rss_mb, machine_info, markdown_table, peak_rss_mb,  # noqa: E402
                     run_job, write_results)

NAME = "bench_scale"
RANK = 16
SIZES = (0.5, 1.0, 2.0, 4.0)
CALIB_BATCHES, CALIB_TOKENS = 4, 128
PATHS = ("memory_pissa", "memory_corda", "stream_pissa", "stream_corda", "stream2_pissa", "stream2_corda",
         "peft_pissa_niter_16")
LABELS = {
    "memory_pissa": "(a) in memory: from_pretrained + wrap pissa",
    "memory_corda": "(a) in memory: from_pretrained + wrap corda",
    "stream_pissa": "(b) streaming init_checkpoint pissa",
    "stream_corda": "(b) streaming init_checkpoint corda",
    "stream2_pissa": "(c) streaming pissa, 2 processes",
    "stream2_corda": "(c) streaming corda, 2 processes",
    "peft_pissa_niter_16": "(d) PEFT pissa_niter_16 (get_peft_model)",
    "stream_pissa_7b": "(b) streaming init_checkpoint pissa",
    "milora_7b_extrapolated": "MiLoRA decompositions, 2 layers timed, extrapolated to 224",
}
MILORA_SHAPES = {(4096, 4096): 4, (4096, 11008): 3}  # (out, in) -> Linears per Llama-7B layer (q k v o; gate up down)
MILORA_REPEATS = 2
JOB_TIMEOUT = 3 * 3600


# ----------------------------------------------------------------------------------------------- child jobs
def _imports(threads: int | None) -> float:
    """Import what every path needs (the same set in every job, so the baselines compare) and return the RSS."""
    import torch
    import transformers  # noqa: F401
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (the lazy module's real import)
    import svdadapt  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    return current_rss_mb()


def _dir_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_checkpoint(out: str, gb: float | None = None, llama7b: bool = False, dtype: str = "float32") -> dict:
    """Write the synthetic checkpoint (``_synthetic.write_random_llama``, 1 GiB shards)."""
    import torch
    from _synthetic import LLAMA_7B, llama_for_size, write_random_llama

    cfg = dict(LLAMA_7B) if llama7b else llama_for_size(gb)
    t0 = time.perf_counter()
    write_random_llama(out, **cfg, dtype=getattr(torch, dtype), max_shard_bytes=1 << 30)
    return {"config": cfg, "dtype": dtype, "bytes": _dir_bytes(out), "write_s": time.perf_counter() - t0,
            "shards": len(list(Path(out).glob("*.safetensors")))}


def _calibration(vocab: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (1, CALIB_TOKENS), generator=g),
             "attention_mask": torch.ones(1, CALIB_TOKENS, dtype=torch.long)} for _ in range(CALIB_BATCHES)]


def job_memory(ckpt: str, method: str, threads: int | None = None, rank: int = RANK) -> dict:
    """(a) and (d): load the whole model, then ``svdadapt.wrap`` (pissa / corda) or PEFT's ``pissa_niter_16``."""
    rss0 = _imports(threads)
    import torch
    from transformers import AutoModelForCausalLM

    t0, c0 = time.perf_counter(), time.process_time()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mb()
    with torch.no_grad():
        if method == "peft_pissa_niter_16":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)  # PEFT's svd_lowrank draws from the global RNG
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear",
                                init_lora_weights="pissa_niter_16", task_type="CAUSAL_LM")
            t1 = time.perf_counter()
            pm = get_peft_model(model, config)
        else:
            import svdadapt

            kw = {"calibration": _calibration(model.config.vocab_size)} if method == "corda" else {}
            t1 = time.perf_counter()
            pm = svdadapt.wrap(model, method, rank, progress=False, **kw)
    init_s = time.perf_counter() - t1
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    layers = sum(1 for _, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    return {"rss_imports_mb": rss0, "rss_loaded_mb": rss_loaded, "load_s": load_s, "init_s": init_s,
            "wall_s": wall_s, "cpu_s": cpu_s, "layers": layers, "threads": torch.get_num_threads()}


def _stream(ckpt: str, out: str, method: str, rank: int) -> None:
    import svdadapt

    vocab = json.loads(Path(ckpt, "config.json").read_text())["vocab_size"]
    kw = {"calibration": _calibration(vocab)} if method == "corda" else {}
    svdadapt.init_checkpoint(ckpt, out, method=method, rank=rank, progress=False, **kw)


def job_stream(ckpt: str, out: str, threads: int | None = None, rank: int = RANK, method: str = "pissa") -> dict:
    """(b): ``init_checkpoint`` in this process; the output's size and adapter checksum, then the output deleted."""
    rss0 = _imports(threads)
    import torch

    try:
        t0, c0 = time.perf_counter(), time.process_time()
        _stream(ckpt, out, method, rank)
        wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        info = _output_info(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"rss_imports_mb": rss0, "wall_s": wall_s, "cpu_s": cpu_s, "threads": torch.get_num_threads(), **info}


def _output_info(out: str) -> dict:
    o = Path(out)
    return {"out_bytes": _dir_bytes(o), "base_bytes": _dir_bytes(o / "base"),
            "adapter_bytes": _dir_bytes(o / "adapter"),
            "adapter_sha256": _sha256(o / "adapter" / "adapter_model.safetensors"),
            "layers": len(json.loads((o / "report.json").read_text())["layers"])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream2_worker(rank: int, size: int, port: int, ckpt: str, out: str, result_dir: str, threads: int | None,
                    lora_rank: int, t_spawn: float, method: str) -> None:
    """One rank of (c): its RSS after imports, its ``init_checkpoint`` time and CPU time, its own peak RSS, and
    when (seconds after the spawn) it had imported everything and joined the process group."""
    rss0 = _imports(threads)
    imported_s = time.time() - t_spawn
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        dist.barrier()
        ready_s = time.time() - t_spawn
        t0, c0 = time.perf_counter(), time.process_time()
        _stream(ckpt, out, method, lora_rank)
        init_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    finally:
        dist.destroy_process_group()
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(
        {"rss_imports_mb": rss0, "init_s": init_s, "cpu_s": cpu_s, "peak_rss_mb": peak_rss_mb(),
         "threads": torch.get_num_threads(), "imported_s": imported_s, "ready_s": ready_s}))


def job_stream2(ckpt: str, out: str, threads: int | None = None, rank: int = RANK, nprocs: int = 2,
                method: str = "pissa") -> dict:
    """(c): ``nprocs`` gloo ranks spawned from here; wall time from spawn to join, each rank's own peak RSS."""
    rss0 = _imports(threads)
    import torch.multiprocessing as mp

    result_dir = tempfile.mkdtemp(prefix="bench_scale_ranks_")
    try:
        t0 = time.perf_counter()
        mp.spawn(_stream2_worker, args=(nprocs, _free_port(), ckpt, out, result_dir, threads, rank, time.time(),
                                        method), nprocs=nprocs, join=True)
        wall_s = time.perf_counter() - t0
        ranks = [json.loads(Path(result_dir, f"rank{r}.json").read_text()) for r in range(nprocs)]
        info = _output_info(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(result_dir, ignore_errors=True)
    worst = max(range(nprocs), key=lambda r: ranks[r]["peak_rss_mb"] - ranks[r]["rss_imports_mb"])
    return {"coordinator_rss_imports_mb": rss0, "coordinator_peak_rss_mb": peak_rss_mb(), "wall_s": wall_s,
            "rank_init_s": max(r["init_s"] for r in ranks), "startup_s": max(r["ready_s"] for r in ranks),
            "cpu_s": sum(r["cpu_s"] for r in ranks),
            "ranks": ranks, "nprocs": nprocs, "threads": ranks[0]["threads"], **info,
            # the row's memory: the rank with the largest growth (each rank is its own process)
            "rank_peak_rss_mb": ranks[worst]["peak_rss_mb"], "rss_imports_mb": ranks[worst]["rss_imports_mb"]}


def job_milora_layers(threads: int | None = None, rank: int = RANK, repeats: int = MILORA_REPEATS) -> dict:
    """MiLoRA (``svd="auto"``) on one Linear of each Llama-7B shape (N(0, 0.02) rounded to bf16, as the 7B
    checkpoint stores it), through ``plan_layer``; the best of ``repeats`` per shape, then the 7B model's 32 layers
    extrapolated from them. (4096, 11008) stands for gate/up (11008, 4096) too: the Gram matrix is on the short side,
    4096, for all three."""
    rss0 = _imports(threads)
    import torch
    from svdadapt.core.methods import get_method
    from svdadapt.engine.job import Request, build_job
    from svdadapt.engine.plan import LayerInput, plan_layer

    job = build_job(get_method("milora"), rank, Request(progress=False))
    per_shape = {}
    for (out, inp), count in MILORA_SHAPES.items():
        g = torch.Generator().manual_seed(out + inp)
        W = torch.randn(out, inp, generator=g).mul_(0.02).to(torch.bfloat16).float()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            plan_layer(job, LayerInput(f"layer{out}x{inp}", W))
            times.append(time.perf_counter() - t0)
        per_shape[f"{out}x{inp}"] = {"best_s": min(times), "times_s": times, "per_7b_layer": count}
    layer_s = sum(v["best_s"] * v["per_7b_layer"] for v in per_shape.values())
    return {"rss_imports_mb": rss0, "shapes": per_shape, "per_7b_layer_s": layer_s, "extrapolated_7b_s": 32 * layer_s,
            "extrapolated": True, "threads": torch.get_num_threads(), "svd": job.svd.svd}


# ----------------------------------------------------------------------------------------------- driver
def _row_key(r: dict) -> tuple:
    return (r["path"], r.get("size_gb"))


def _peak(r: dict) -> float | None:
    return r.get("rank_peak_rss_mb", r.get("peak_rss_mb"))


def _largest_mb(r: dict) -> float | None:
    """The checkpoint's largest tensor in MiB (from the row's config and dtype)."""
    cfg = r.get("ckpt_config")
    if not cfg:
        return None
    from _synthetic import llama_tensor_specs

    size = 2 if r.get("ckpt_dtype") == "bf16" else 4
    return max(size * math.prod(shape) for _, shape in llama_tensor_specs(**cfg)) / 2**20


def _ratio(r: dict) -> dict:
    """The row's largest tensor and its growth / largest tensor (computed for rows of runs that did not record it)."""
    largest = r.get("largest_tensor_mb") or _largest_mb(r)
    if largest is None or r.get("growth_mb") is None:
        return {}
    return {"largest_tensor_mb": largest, "growth_per_largest": r["growth_mb"] / largest}


def _finish_row(row: dict) -> dict:
    peak = _peak(row)
    if peak is not None and row.get("rss_imports_mb") is not None:
        row["row_peak_rss_mb"] = peak
        row["growth_mb"] = peak - row["rss_imports_mb"]
    row.update(_ratio(row))
    row["loadavg_1m"] = os.getloadavg()[0]
    git = _git_state()
    row["commit"] = git.get("commit", "?")[:12] + ("+dirty" if git.get("src_uncommitted") else "")
    row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return row


def _git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, capture_output=True,
                               text=True).stdout.splitlines()
        return {"commit": head, "src_uncommitted": dirty}
    except OSError:
        return {}


COLUMNS = [
    ("size", "checkpoint", "{}"),
    ("label", "path", "{}"),
    ("wall_s", "wall (s)", "{:.1f}"),
    ("cpu_s", "CPU (s)", "{:.1f}"),
    ("load_s", "of which load (s)", "{:.1f}"),
    ("row_peak_rss_mb", "peak RSS (MiB)", "{:.0f}"),
    ("rss_imports_mb", "after imports (MiB)", "{:.0f}"),
    ("growth_mb", "growth (MiB)", "{:.0f}"),
    ("largest_tensor_mb", "largest tensor (MiB)", "{:.0f}"),
    ("growth_per_largest", "growth / largest", "{:.1f}×"),
    ("loadavg_1m", "load avg", "{:.1f}"),
    ("measured_at", "measured", "{}"),
]


def report(payload: dict) -> str:
    rows = payload["rows"]
    out = []
    table = []
    def order(r: dict) -> tuple:
        return r.get("size_gb") or 1e9, PATHS.index(r["path"]) if r["path"] in PATHS else 99

    for r in sorted((r for r in rows if r["path"] != "milora_7b_extrapolated"), key=order):
        t = {**r, **_ratio(r)}
        t["measured_at"] = (r.get("measured_at") or "earlier run")[:16]
        t["size"] = f"{r['ckpt_gb']:.2f} GB ({r['ckpt_dtype']})" if r.get("ckpt_gb") else "—"
        t["label"] = LABELS.get(r["path"], r["path"])
        if r["path"] == "stream_corda" and not r.get("supported", True):  # rows of before it was supported
            t["label"] += ": not supported (ValueError)"
        if r["path"].startswith("stream2_") and r.get("startup_s") is not None:
            t["label"] += (f" (start-up {r['startup_s']:.1f} s, then the slowest rank's call "
                           f"{r['rank_init_s']:.1f} s)")
        table.append(t)
    out.append(f"### Rank {payload.get('rank', RANK)}, {payload.get('threads')} torch thread(s) per process\n")
    out.append(markdown_table(table, COLUMNS))
    same = {r["size_gb"]: r.get("adapter_sha256") for r in rows if r["path"] == "stream_pissa"}
    checks = [f"{g:g} GB: {'identical' if same.get(g) == r.get('adapter_sha256') else 'DIFFERENT'}"
              for r in rows if r["path"] == "stream2_pissa" and (g := r["size_gb"]) in same]
    if checks:
        out.append("\nPiSSA adapter_model.safetensors of 2 processes vs 1 process: " + ", ".join(checks)
                   + " (CorDA's differ in the last bits: its covariances are sums all-reduced in another order)")
    streaming = [(r, _ratio(r)) for r in rows if r["path"].startswith("stream") and _ratio(r)]
    if streaming:
        worst, q = max(streaming, key=lambda t: t[1]["growth_per_largest"])
        out.append(f"\nStreaming rows: peak RSS growth at most {q['growth_per_largest']:.1f}× the largest tensor "
                   f"({LABELS[worst['path']]}, {worst['ckpt_gb']:.2f} GB; target ≤ 8×)")
    for r in rows:
        if r["path"] == "milora_7b_extrapolated":
            shapes = ", ".join(f"{k}: {v['best_s']:.1f} s" for k, v in r["shapes"].items())
            out.append(f"\nMiLoRA (svd={r['svd']!r}, rank {payload.get('rank', RANK)}, {r['threads']} thread) per layer "
                       f"({shapes}, best of {len(next(iter(r['shapes'].values()))['times_s'])}): Llama-7B's 32 layers "
                       f"EXTRAPOLATED to {r['extrapolated_7b_s'] / 60:.1f} min of decompositions "
                       f"(load {r['loadavg_1m']:.1f}, {r.get('measured_at', '')})")
    for r in rows:
        if r.get("out_bytes"):
            out.append(f"output of {LABELS[r['path']]} at {r['ckpt_gb']:.2f} GB: {r['out_bytes'] / 1e9:.2f} GB "
                       f"(adapter {r['adapter_bytes'] / 1e6:.1f} MB)")
    return "\n".join(out)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    fig, (ax_m, ax_t, ax_c) = plt.subplots(1, 3, figsize=(16, 5.4))
    styles = {"memory_pissa": ("C0", "o", "-"), "memory_corda": ("C1", "s", "-"), "stream_pissa": ("C2", "^", "-"),
              "stream_corda": ("C4", "<", "-"), "stream2_pissa": ("C3", "v", "--"), "stream2_corda": ("C5", ">", "--"),
              "peft_pissa_niter_16": ("C7", "D", ":")}
    for p, (color, marker, ls) in styles.items():
        pts = sorted(((r["ckpt_gb"], r) for r in rows if r["path"] == p and r.get("growth_mb") is not None),
                     key=lambda t: t[0])
        if not pts:
            continue
        x = [g for g, _ in pts]
        label = LABELS[p].replace(" (get_peft_model)", "")
        ax_m.plot(x, [r["growth_mb"] / 1024 for _, r in pts], color=color, marker=marker, ls=ls, label=label)
        ax_t.plot(x, [r["wall_s"] for _, r in pts], color=color, marker=marker, ls=ls, label=label)
        ax_c.plot(x, [r["cpu_s"] for _, r in pts], color=color, marker=marker, ls=ls, label=label)
    for r in (r for r in rows if r["path"] == "stream_pissa_7b" and r.get("growth_mb") is not None):
        lab = f"Llama-7B shape, bf16 ({r['ckpt_gb']:.1f} GB): streaming pissa"
        for ax, v in ((ax_m, r["growth_mb"] / 1024), (ax_t, r["wall_s"]), (ax_c, r["cpu_s"])):
            ax.plot([r["ckpt_gb"]], [v], "*", color="C2", ms=14, label=lab)
    ax_m.axhline(24, color="k", lw=0.8, ls="-.")
    ax_m.text(0.5, 22, "this machine's RAM (24 GiB)", fontsize=8, va="top")
    ax_m.set(xlabel="checkpoint size on disk (GB, log)", ylabel="GiB (log)",
             title="peak RSS above the interpreter after imports")
    ax_t.set(xlabel="checkpoint size on disk (GB, log)", ylabel="s (log)", title="wall time (in memory: load + init)")
    ax_c.set(xlabel="checkpoint size on disk (GB, log)", ylabel="s (log)",
             title="CPU time (2 processes: sum of the ranks)")
    # log-log: a line of slope 1 is linear in size, a horizontal one flat; the 7B point fits on the same axes
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    for ax in (ax_m, ax_t, ax_c):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.5, 1, 2, 4, 8, 13.5]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(alpha=0.3, which="both")
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    load = sorted(r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None)
    fig.suptitle(f"rank-{payload.get('rank', RANK)} init of random Llama checkpoints (fp32; 7B: bf16), "
                 f"{payload.get('threads')} torch thread per process, shared 2-core CPU"
                 + (f" (load average {load[0]:.1f}–{load[-1]:.1f})" if load else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="*", type=float, default=list(SIZES), help="checkpoint sizes in GB (fp32)")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--skip-7b", action="store_true", help="leave out the Llama-7B-shaped point (13.5 GB bf16)")
    ap.add_argument("--milora-7b-layers", action="store_true",
                    help="time MiLoRA on one layer of each Llama-7B shape and extrapolate (also without --skip-7b)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--tmp", default=None, help="where the checkpoints go (default: the system's temporary dir)")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows already in the JSON")
    ap.add_argument("--rerun", action="store_true",
                    help="measure the selected --paths and --sizes again, replacing their rows (others are kept)")
    ap.add_argument("--report-only", action="store_true", help="reprint the table and redraw the PNG from the JSON")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)

    json_path, png_path = RESULTS_DIR / f"{NAME}.json", RESULTS_DIR / f"{NAME}.png"
    if args.report_only:
        payload = json.loads(json_path.read_text())
        print(report(payload))
        plot(payload, png_path)
        return payload

    config = {"rank": RANK, "threads": args.threads, "calibration": [CALIB_BATCHES, CALIB_TOKENS]}
    rows: list[dict] = []
    if json_path.exists() and not args.fresh:
        old = json.loads(json_path.read_text())
        if {k: old.get(k) for k in config} == config:
            rows = old.get("rows", [])
            print(f"resuming: {len(rows)} rows in {json_path}", file=sys.stderr)
        else:
            print(f"{json_path} holds another configuration; starting over", file=sys.stderr)
    done = {_row_key(r) for r in rows}
    if args.rerun:
        done -= {(p, gb) for p in args.paths for gb in args.sizes}
    loads: list[float] = []

    def save() -> None:
        write_results(NAME, {**config, "note": args.note, "git": _git_state(), "rows": rows})

    def add(row: dict) -> None:
        loads.append(row["loadavg_1m"])
        rows[:] = [r for r in rows if _row_key(r) != _row_key(row)] + [row]
        done.add(_row_key(row))
        save()
        print(f"[{NAME}] {row['path']} {row.get('size_gb')} GB: wall {row.get('wall_s', float('nan')):.1f} s, "
              f"peak {row.get('row_peak_rss_mb', float('nan')):.0f} MiB, "
              f"growth {row.get('growth_mb', float('nan')):.0f} MiB, load {row['loadavg_1m']:.1f}",
              file=sys.stderr, flush=True)

    tmp = tempfile.mkdtemp(prefix="bench_scale_", dir=args.tmp)
    t_all = time.perf_counter()
    try:
        for gb in args.sizes:
            todo = [p for p in args.paths if (p, gb) not in done]
            if not todo:
                continue
            ckpt = os.path.join(tmp, f"llama-{gb:g}gb")
            print(f"[{NAME}] writing the {gb:g} GB checkpoint", file=sys.stderr, flush=True)
            made = run_job(f"{NAME}:make_checkpoint", out=ckpt, gb=gb, timeout=JOB_TIMEOUT)
            common = {"size_gb": gb, "ckpt_gb": made["bytes"] / 1e9, "ckpt_dtype": "fp32",
                      "ckpt_config": made["config"], "ckpt_write_s": made["write_s"], "ckpt_shards": made["shards"]}
            try:
                for p in todo:
                    print(f"[{NAME}] {gb:g} GB / {p}", file=sys.stderr, flush=True)
                    out = os.path.join(tmp, "out")
                    kw = dict(threads=args.threads, rank=RANK, timeout=JOB_TIMEOUT)
                    if p == "memory_pissa":
                        r = run_job(f"{NAME}:job_memory", ckpt=ckpt, method="pissa", **kw)
                    elif p == "memory_corda":
                        r = run_job(f"{NAME}:job_memory", ckpt=ckpt, method="corda", **kw)
                    elif p == "peft_pissa_niter_16":
                        r = run_job(f"{NAME}:job_memory", ckpt=ckpt, method="peft_pissa_niter_16", **kw)
                    elif p == "stream_pissa":
                        r = run_job(f"{NAME}:job_stream", ckpt=ckpt, out=out, **kw)
                    elif p == "stream_corda":
                        r = run_job(f"{NAME}:job_stream", ckpt=ckpt, out=out, method="corda", **kw)
                    elif p == "stream2_pissa":
                        r = run_job(f"{NAME}:job_stream2", ckpt=ckpt, out=out, **kw)
                    else:
                        r = run_job(f"{NAME}:job_stream2", ckpt=ckpt, out=out, method="corda", **kw)
                    add(_finish_row({"path": p, **common, **r}))
            finally:
                shutil.rmtree(ckpt, ignore_errors=True)
        if (args.milora_7b_layers or not args.skip_7b) and (
                args.rerun or ("milora_7b_extrapolated", None) not in done):
            print(f"[{NAME}] MiLoRA on Llama-7B's layer shapes", file=sys.stderr, flush=True)
            r = run_job(f"{NAME}:job_milora_layers", threads=args.threads, rank=RANK, timeout=JOB_TIMEOUT)
            add(_finish_row({"path": "milora_7b_extrapolated", "size_gb": None, **r}))
        if not args.skip_7b and ("stream_pissa_7b", None) not in done:
            ckpt, out = os.path.join(tmp, "llama-7b"), os.path.join(tmp, "out-7b")
            print(f"[{NAME}] writing the Llama-7B-shaped checkpoint (bf16)", file=sys.stderr, flush=True)
            try:
                made = run_job(f"{NAME}:make_checkpoint", out=ckpt, llama7b=True, dtype="bfloat16",
                               timeout=JOB_TIMEOUT)
                print(f"[{NAME}] 7B / stream_pissa", file=sys.stderr, flush=True)
                r = run_job(f"{NAME}:job_stream", ckpt=ckpt, out=out, threads=args.threads, rank=RANK,
                            timeout=JOB_TIMEOUT)
            finally:
                shutil.rmtree(ckpt, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
            add(_finish_row({"path": "stream_pissa_7b", "size_gb": None, "ckpt_gb": made["bytes"] / 1e9,
                             "ckpt_dtype": "bf16", "ckpt_config": made["config"], "ckpt_write_s": made["write_s"],
                             "ckpt_shards": made["shards"], **r}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    payload = json.loads(json_path.read_text()) if json_path.exists() else {**config, "rows": rows}
    if loads:
        payload["loadavg_this_invocation"] = [min(loads), max(loads)]
        payload["bench_s_this_invocation"] = time.perf_counter() - t_all
        write_results(NAME, {k: v for k, v in payload.items() if k != "machine"})
    print(report(payload))
    plot(payload, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return payload


if __name__ == "__main__":
    main()
