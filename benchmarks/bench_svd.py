"""The SVD engine per matrix, one torch thread, every method on every matrix in the same run:

  (top)    rank-16 top triplets: the engine PiSSA runs, ``truncated_svd(svd="auto")`` with its defaults (the
           block-Krylov sketch, ⌊1.5·log2 n⌋ − 5 steps, or the exact fp64 Gram route at a short side up to 256),
           against PEFT's ``torch.svd_lowrank(q=16, niter=16)`` (``pissa_niter_16``) and ``niter=4``; captured
           energy Σσ̃² over the optimum (Σ of the top-16 σ², exact), worst matrix; CPU time in total and per shape.
           On SmolLM2-135M's 210 Linears, the random Llama h2048/i5632's 28 (4 layers) and Gaussian matrices of
           several shapes.
  (bottom) rank-16 bottom triplets: ``gram_bottom_svd`` (fp64 Gram, what svd="auto" picks) against LAPACK's fp32
           SVD (svd="full"), both measured against the fp64 SVD of the same matrix: the sine of the largest
           principal angle between the bottom-16 right singular subspaces, the relative error of the bottom-16
           energy, time. On SmolLM2's 150 Linears with a short side above 256 and Gaussian 576×1536, 2048×5632
           (and 4096×11008 with ``--big``: ~2 min for LAPACK alone on a quiet core, plus the fp64 reference).

    python benchmarks/bench_svd.py                 # both tables (~10 min on a loaded 2-core machine)
    python benchmarks/bench_svd.py --only top      # or --only bottom
    python benchmarks/bench_svd.py --big           # adds the 4096×11008 bottom row

Writes ``benchmarks/results/bench_svd.json``: one summary per table row (worst, mean or sum over its matrices), and
for the top table the per-shape times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, markdown_table, random_llama, smollm2, write_results  # noqa: E402

from svdadapt.core.linalg import auto_niter, choose_svd, full_svd, gram_bottom_svd, truncated_svd  # noqa: E402

RANK = 16
GAUSS_SHAPES = ((576, 1536), (1536, 576), (576, 576), (192, 576), (1024, 2816), (2048, 2048), (2048, 5632), (5632, 2048),
                (300, 4000))


def linears(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, fp32 weight) of every nn.Linear but the output head."""
    return [(n, m.weight.detach().float()) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


def gaussians(shapes, seed: int = 1) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"gauss {m}x{n}", torch.randn(m, n, generator=g) * 0.02) for m, n in shapes]


def timed(f: Callable[[], Any]) -> tuple[Any, float]:
    t = time.process_time()
    out = f()
    return out, time.process_time() - t


def peft_lowrank(W: torch.Tensor, niter: int) -> torch.Tensor:
    """The singular values PEFT's ``pissa_niter_{niter}`` computes (its own seeding aside)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.svd_lowrank(W, q=RANK, niter=niter)[1]


TOP = {"svdadapt": lambda W: truncated_svd(W, RANK, generator=torch.Generator().manual_seed(0)).S,
       "niter16": lambda W: peft_lowrank(W, 16), "niter4": lambda W: peft_lowrank(W, 4)}


def optimum(W: torch.Tensor) -> float:
    """Σ of the top-RANK σ² of W, exact: eigenvalues of the fp64 Gram matrix on the short side."""
    W = W.double()
    gram = W @ W.mT if W.shape[0] <= W.shape[1] else W.mT @ W
    return float(torch.linalg.eigvalsh(gram)[-RANK:].sum())


def top_one(W: torch.Tensor) -> dict[str, Any]:
    """One matrix: energy ratios and CPU seconds of the top-r methods. Each runs three times, in rotated order
    (the first call after the reference finds a cold cache), and keeps its fastest run."""
    best_e = optimum(W)
    out: dict[str, Any] = {}
    best = {k: float("inf") for k in TOP}
    names = list(TOP)
    for shift in range(len(names)):
        for k in names[shift:] + names[:shift]:
            out[k], t = timed(lambda: TOP[k](W))
            best[k] = min(best[k], t)
    route = choose_svd(tuple(W.shape), RANK, True, None, 0)
    return {"shape": "×".join(map(str, W.shape)), "route": route,
            "steps": auto_niter(min(W.shape)) if route == "randomized" else None,
            **{f"energy_{k}": float(S.double().pow(2).sum()) / best_e for k, S in out.items()},
            **{f"t_{k}": v for k, v in best.items()}}


def top_table(label: str, mats: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    rows = [top_one(W) for _, W in mats]
    out: dict[str, Any] = {"model": label, "matrices": len(rows)}
    for k in TOP:
        out[f"worst_{k}"] = min(r[f"energy_{k}"] for r in rows)
        out[f"s_{k}"] = sum(r[f"t_{k}"] for r in rows)
    out["speedup_niter16"] = out["s_niter16"] / out["s_svdadapt"]
    out["speedup_niter4"] = out["s_niter4"] / out["s_svdadapt"]
    out["worst_layer"] = mats[min(range(len(rows)), key=lambda i: rows[i]["energy_svdadapt"])][0]
    shapes: dict[str, dict[str, Any]] = {}
    for r in rows:
        d = shapes.setdefault(r["shape"], {"model": label, "shape": r["shape"], "route": r["route"],
                                           "steps": r["steps"], "count": 0, **{f"ms_{k}": 0.0 for k in TOP}})
        d["count"] += 1
        for k in TOP:
            d[f"ms_{k}"] += 1e3 * r[f"t_{k}"]
    for d in shapes.values():
        for k in TOP:
            d[f"ms_{k}"] /= d["count"]
    out["shapes"] = list(shapes.values())
    print(f"  {label}: {out['s_svdadapt']:.2f} s vs niter16 {out['s_niter16']:.2f} s / niter4 {out['s_niter4']:.2f} s; "
          f"worst {out['worst_svdadapt']:.5f} vs {out['worst_niter16']:.5f} / {out['worst_niter4']:.5f}", flush=True)
    return out


def sin_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of the orthonormal A and B."""
    A, B = A.double(), B.double()
    return float(torch.linalg.matrix_norm(A - B @ (B.mT @ A), ord=2))


def bottom_one(W: torch.Tensor) -> dict[str, float]:
    """One matrix: the Gram route and fp32 LAPACK against the fp64 SVD, bottom RANK triplets."""
    _, S64, Vh64 = torch.linalg.svd(W.double(), full_matrices=False)
    ref_V, ref_E = Vh64[-RANK:].mT, float(S64[-RANK:].pow(2).sum())
    gram, t_gram = timed(lambda: gram_bottom_svd(W, RANK))
    lap, t_lap = timed(lambda: full_svd(W, RANK, largest=False))
    err = lambda t: abs(float(t.S.double().pow(2).sum()) - ref_E) / ref_E  # noqa: E731
    return {"sin_gram": sin_angle(gram.Vh.mT, ref_V), "sin_lapack": sin_angle(lap.Vh.mT, ref_V),
            "energy_err_gram": err(gram), "energy_err_lapack": err(lap), "t_gram": t_gram, "t_lapack": t_lap,
            "fallback": bool(torch.equal(gram.S, lap.S)), "smin_over_smax": float(S64[-1] / S64[0]),
            "rel_gap": float((S64[-RANK - 1] - S64[-RANK]) / S64[0])}


def bottom_table(label: str, mats: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    rows = [bottom_one(W) for _, W in mats]
    worst = lambda k: max(r[k] for r in rows)  # noqa: E731
    out = {"case": label, "matrices": len(rows), "sin_gram": worst("sin_gram"), "sin_lapack": worst("sin_lapack"),
           "energy_err_gram": worst("energy_err_gram"), "energy_err_lapack": worst("energy_err_lapack"),
           "s_gram": sum(r["t_gram"] for r in rows), "s_lapack": sum(r["t_lapack"] for r in rows),
           "fallbacks": sum(r["fallback"] for r in rows), "min_smin_over_smax": min(r["smin_over_smax"] for r in rows)}
    out["speedup"] = out["s_lapack"] / out["s_gram"]
    print(f"  {label}: gram {out['s_gram']:.2f} s vs LAPACK {out['s_lapack']:.2f} s, sin {out['sin_gram']:.1e} vs "
          f"{out['sin_lapack']:.1e}", flush=True)
    return out


TOP_COLUMNS = [("model", "matrices", "{}"), ("matrices", "n", "{}"),
               ("worst_svdadapt", "worst energy svdadapt", "{:.2%}"), ("worst_niter16", "niter=16", "{:.2%}"),
               ("worst_niter4", "niter=4", "{:.2%}"), ("s_svdadapt", "CPU s svdadapt", "{:.2f}"),
               ("s_niter16", "niter=16", "{:.2f}"), ("s_niter4", "niter=4", "{:.2f}"),
               ("speedup_niter16", "faster than niter=16", "{:.2f}×")]
SHAPE_COLUMNS = [("model", "matrices", "{}"), ("shape", "shape", "{}"), ("count", "n", "{}"), ("route", "route", "{}"),
                 ("steps", "steps", "{}"), ("ms_svdadapt", "ms svdadapt", "{:.1f}"), ("ms_niter16", "ms niter=16", "{:.1f}"),
                 ("ms_niter4", "ms niter=4", "{:.1f}")]
BOTTOM_COLUMNS = [("case", "matrices", "{}"), ("matrices", "n", "{}"), ("s_lapack", "LAPACK fp32 s", "{:.2f}"),
                  ("s_gram", "Gram fp64 s", "{:.2f}"), ("speedup", "speed-up", "{:.2f}×"),
                  ("sin_lapack", "sin θ LAPACK", "{:.1e}"), ("sin_gram", "sin θ Gram", "{:.1e}"),
                  ("energy_err_lapack", "energy err LAPACK", "{:.1e}"), ("energy_err_gram", "energy err Gram", "{:.1e}"),
                  ("fallbacks", "fallbacks", "{}"), ("min_smin_over_smax", "min σ_min/σ₁", "{:.1e}")]


def previous(only: str) -> dict[str, Any]:
    """The table ``--only`` does not rerun, from the stored results, under ``<table>_run`` its machine info."""
    path = RESULTS_DIR / "bench_svd.json"
    other = "bottom" if only == "top" else "top"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if other not in old:
        return {}
    return {other: old[other], f"{other}_run": old.get(f"{other}_run", old.get("machine"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["top", "bottom"], default=None)
    p.add_argument("--big", action="store_true", help="add the 4096×11008 bottom row")
    args = p.parse_args()
    torch.set_num_threads(1)
    smol = linears(smollm2()[0])
    payload: dict[str, Any] = {"rank": RANK}
    if args.only in (None, "top"):
        llama = linears(random_llama())
        payload["top"] = [top_table("SmolLM2-135M (all Linears)", smol),
                          top_table("random Llama h2048/i5632 (4 layers)", llama),
                          top_table(f"Gaussian ({len(GAUSS_SHAPES)} shapes)", gaussians(GAUSS_SHAPES))]
    if args.only in (None, "bottom"):
        shapes = [(576, 1536), (2048, 5632)] + ([(4096, 11008)] if args.big else [])
        rows = [bottom_table("SmolLM2-135M (short side > 256)", [(n, W) for n, W in smol if min(W.shape) > 256])]
        rows += [bottom_table(f"Gaussian {m}×{n}", gaussians([(m, n)])) for m, n in shapes]
        payload["bottom"] = rows
    payload["loadavg_1m_end"] = machine_info().get("loadavg_1m")
    if args.only:  # keep the other table of an earlier run, with the machine it was measured on
        kept = previous(args.only)
        payload.update(kept)
    path = write_results("bench_svd", payload)
    if "top" in payload:
        print("\nTop-16 triplets, one thread:\n" + markdown_table(payload["top"], TOP_COLUMNS))
        print("\nPer shape (mean ms per matrix):\n" + markdown_table([d for row in payload["top"] for d in row["shapes"]],
                                                                     SHAPE_COLUMNS))
    if "bottom" in payload:
        print("\nBottom-16 triplets, one thread, against the fp64 SVD:\n" + markdown_table(payload["bottom"],
                                                                                          BOTTOM_COLUMNS))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
