"""Initialization speed and accuracy: ``svdadapt.wrap(method="pissa", rank=16)`` with its defaults against PEFT's
own PiSSA, ``init_lora_weights="pissa"`` (full SVD), ``"pissa_niter_4"`` and ``"pissa_niter_16"``
(``torch.svd_lowrank``), in the same run, on

  (a) SmolLM2-135M-Instruct (30 layers, 210 Linears), and
  (b) a random-weight Llama: hidden 2048, intermediate 5632, 4 layers, 32 heads (28 Linears).

Every row runs in a fresh subprocess (``_common.run_job``), so its peak RSS is its own. Wall and CPU time cover
the initialization call only (``wrap`` or ``get_peft_model``), not model loading nor ``import peft`` (and ``import
svdadapt``; ``import_s``, ``import_cpu_s`` in the JSON: svdadapt imports peft on its first call, so its row imports
peft before timing, as PEFT's rows do); the svdadapt row gives the first call in the process and the
second, on a freshly loaded model (the steady state; its energy is the first call's); with ``--threads 1`` the
speedups are taken from CPU time, which other jobs on a shared machine disturb far less than wall time. The captured energy of a layer is
‖s·B·A‖²_F; the full-SVD row's is the optimum (Σ of the top-16 σ²), and each row reports its worst layer's
ratio to it.

    python benchmarks/bench_init.py                 # both models, all rows (~5 min quiet on 2 cores)
    python benchmarks/bench_init.py --threads 1     # one BLAS thread (use when other jobs share the CPU)
    python benchmarks/bench_init.py --repeats 3    # the fastest of 3 runs per row (the full-SVD rows: --full-repeats)

Writes ``benchmarks/results/bench_init.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stopwatch, markdown_table, random_llama, run_job, write_results  # noqa: E402

RANK = 16
IMPLS = ("svdadapt", "pissa", "pissa_niter_4", "pissa_niter_16")
LABELS = {
    "svdadapt": "svdadapt `wrap(method=\"pissa\")` defaults",
    "pissa": "PEFT `pissa` (full SVD)",
    "pissa_niter_4": "PEFT `pissa_niter_4`",
    "pissa_niter_16": "PEFT `pissa_niter_16`",
}
MODELS = {
    "smollm2": "SmolLM2-135M (210 Linears)",
    "llama2048": "random Llama h2048/i5632/4 layers (28 Linears)",
}


# ----------------------------------------------------------------------------------------- child jobs
def save_smollm2(path: str) -> dict[str, Any]:
    """Load the GGUF once (~25 s) and save a plain checkpoint that every row reloads in about a second."""
    from svdadapt.loading import load_smollm2

    model, _ = load_smollm2()
    model.save_pretrained(path)
    return {}


def _load(model: str, smollm2_dir: str | None):
    if model == "smollm2":
        from svdadapt.loading import load_model

        return load_model(smollm2_dir)
    if model == "llama2048":
        return random_llama(hidden=2048, intermediate=5632, layers=4, heads=32)
    raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")


def job(model: str, impl: str, threads: int | None = None, smollm2_dir: str | None = None,
        seed: int = 0) -> dict[str, Any]:
    """One row: load ``model``, initialize rank-16 PiSSA by ``impl``, return its time and per-layer energies."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    net = _load(model, smollm2_dir)
    sw = Stopwatch()
    with torch.no_grad():
        if impl == "svdadapt":
            with sw("import"):  # both rows time the call with the libraries it runs on imported
                import peft  # noqa: F401  (svdadapt imports it on the first call; PEFT's row imports it here)

                import svdadapt

            with sw("init"):  # the first call in the process
                peft_model = svdadapt.wrap(net, "pissa", RANK, seed=seed, progress=False)
            del peft_model, net
            gc.collect()  # PEFT models hold reference cycles: the first one freed before the second load
            net = _load(model, smollm2_dir)  # a fresh model: the second call is the steady state
            with sw("steady"):
                peft_model = svdadapt.wrap(net, "pissa", RANK, seed=seed, progress=False)
        else:
            with sw("import"):
                from peft import LoraConfig, get_peft_model

            torch.manual_seed(seed)  # PEFT's svd_lowrank draws from the global RNG
            config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", init_lora_weights=impl,
                                task_type="CAUSAL_LM")
            with sw("init"):
                peft_model = get_peft_model(net, config)
        energy = {}
        for name, layer in peft_model.base_model.model.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                A = layer.lora_A["default"].weight.double()  # (r, in)
                B = layer.lora_B["default"].weight.double()  # (out, r)
                s = float(layer.scaling["default"])
                # ‖s·B·A‖² = s²·tr((BᵀB)(AAᵀ)), without forming the (out, in) product
                energy[name] = s * s * float(((B.mT @ B) * (A @ A.mT)).sum())
    return {"model": model, "impl": impl, "threads": torch.get_num_threads(), "energy": energy, **sw.results()}


# ----------------------------------------------------------------------------------------- driver
def summarize(rows: list[dict[str, Any]], key: str = "init_s") -> list[dict[str, Any]]:
    """Worst-layer energy ratio against the full-SVD row of the same model, and speedups against svdadapt
    measured by ``key`` (``init_s`` wall or ``init_cpu_s``)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        ref = next((r for r in group if r["impl"] == "pissa"), None)
        ours = next((r for r in group if r["impl"] == "svdadapt"), None)
        for r in group:
            row = {k: v for k, v in r.items() if k != "energy"}
            row["layers"] = len(r["energy"])
            if ref is not None:
                ratios = {n: e / ref["energy"][n] for n, e in r["energy"].items()}
                worst = min(ratios, key=ratios.get)
                row.update(worst_energy=ratios[worst], worst_layer=worst,
                           mean_energy=sum(ratios.values()) / len(ratios))
            if ours is not None and r is not ours:
                row["ours_speedup"] = r[key] / ours[key]
            row["init_extra_mb"] = r["peak_rss_mb"] - r["init_rss_start_mb"]
            row["label"] = LABELS[r["impl"]]
            out.append(row)
    return out


COLUMNS = [
    ("label", "initialization", "{}"),
    ("init_s", "wall (s)", "{:.2f}"),
    ("init_cpu_s", "CPU (s)", "{:.2f}"),
    ("steady_s", "2nd call wall (s)", "{:.2f}"),
    ("steady_cpu_s", "2nd call CPU (s)", "{:.2f}"),
    ("ours_speedup", "svdadapt faster by", "{:.1f}×"),
    ("peak_rss_mb", "peak RSS (MiB)", "{:.0f}"),
    ("worst_energy", "worst-layer energy", "{:.2%}"),
    ("mean_energy", "mean energy", "{:.3%}"),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads per job (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per row; the fastest is kept")
    ap.add_argument("--full-repeats", type=int, default=1, help="runs of PEFT's full-SVD rows (minutes each)")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'CPU shared')")
    args = ap.parse_args(argv)

    # with one thread, CPU time is what the work costs; wall time also counts other jobs on a shared machine
    key = "init_cpu_s" if args.threads == 1 else "init_s"
    tmp = tempfile.mkdtemp(prefix="bench_init_")
    rows: list[dict[str, Any]] = []
    try:
        smollm2_dir = None
        if "smollm2" in args.models:
            smollm2_dir = os.path.join(tmp, "smollm2")
            run_job("bench_init:save_smollm2", path=smollm2_dir)
        for model in args.models:
            for impl in args.impls:
                runs = []
                for _ in range(args.full_repeats if impl == "pissa" else args.repeats):
                    print(f"[bench_init] {model} / {impl}", file=sys.stderr, flush=True)
                    runs.append(run_job("bench_init:job", model=model, impl=impl, threads=args.threads,
                                        smollm2_dir=smollm2_dir))
                best = min(runs, key=lambda r: r[key])
                best["init_s_all"] = [r["init_s"] for r in runs]
                best["init_cpu_s_all"] = [r["init_cpu_s"] for r in runs]
                rows.append(best)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table = summarize(rows, key)
    for model in args.models:
        print(f"\n### {MODELS[model]}, rank {RANK} (speedups by {'CPU' if key == 'init_cpu_s' else 'wall'} time)\n")
        print(markdown_table([r for r in table if r["model"] == model], COLUMNS))
    path = write_results("bench_init", {
        "rank": RANK,
        "threads": args.threads,
        "speedup_by": key,
        "repeats": args.repeats,
        "full_repeats": args.full_repeats,
        "note": args.note,
        "rows": table,
        "energy": {f"{r['model']}/{r['impl']}": r["energy"] for r in rows},
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
