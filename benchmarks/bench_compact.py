"""Compact export on a real fine-tune: how small can the exported LoRA get before the fine-tuned model changes?

SmolLM2-135M-Instruct, PiSSA rank 8 on all linear layers, trained on bench_finetune.py's addition task (its PiSSA
rate, 1e-3, and seed 1 by default; ``--steps`` shorter than its 100 when the machine is slow). The trained model's
update ΔW = s·(B·A − B₀·A₀) is exported

* plain (``export_lora``: rank 2r = [A; A₀], [B, −B₀], exact),
* compact at ``energy=1`` (exact: each layer at ΔW's numerical rank), ``energy=0.99`` / ``0.9``, ``rank=r`` (half
  the plain export), ``rank=r/2``, ``rank=r/4``, and the last two ``weighted=True`` by the input covariances of
  the training items,

and each export is loaded by plain ``PeftModel.from_pretrained`` on the original base and scored on the 256 held-out
items (exact match, answer loss). Export time: ``export_lora(energy=0.99)`` against a dense-SVD export (each layer's
out×in ΔW formed in fp64 and decomposed by LAPACK, what a tool without the thin-factor route does).

    python benchmarks/bench_compact.py --threads 1                 # ~10–20 min here, most of it the fine-tune
    python benchmarks/bench_compact.py --threads 1 --steps 40      # shorter fine-tune on a busy machine
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "examples"))

import _tasks  # noqa: E402
from _common import machine_info, markdown_table, write_results  # noqa: E402

NAME = "bench_compact"


def variants(rank: int) -> list[tuple[str, dict]]:
    """(label, export_lora keywords); None keywords: the plain export."""
    return [("plain 2r (exact)", {}), ("energy 1 (exact)", {"energy": 1.0}), ("energy 0.99", {"energy": 0.99}),
            ("energy 0.9", {"energy": 0.9}), (f"rank {rank} (r)", {"rank": rank}),
            (f"rank {rank // 2} (r/2)", {"rank": rank // 2}), (f"rank {rank // 4} (r/4)", {"rank": rank // 4}),
            (f"rank {rank // 2} weighted", {"rank": rank // 2, "weighted": True}),
            (f"rank {rank // 4} weighted", {"rank": rank // 4, "weighted": True})]


@torch.no_grad()
def dense_export_s(pm) -> tuple[float, dict[str, float]]:
    """Seconds of a dense-SVD export of every layer's ΔW (fp64 out×in, LAPACK), and its σ tails at rank r/2 (as a
    check against the compact route's reported errors)."""
    rec = pm.svdadapt
    modules = dict(pm.base_model.model.named_modules())
    t0 = time.perf_counter()
    errors = {}
    for n in rec.targets:
        layer = modules[n]
        s = float(layer.scaling["default"])
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        A0, B0 = (t.double() for t in rec.init_factors[n])
        dW = s * (B @ A - B0 @ A0)
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        k = rec.rank // 2
        errors[n] = float(S[k:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
        _ = (U[:, :k] * S[:k].sqrt(), S[:k].sqrt()[:, None] * Vh[:k])
    return time.perf_counter() - t0, errors


def fine_tune(base, data, args) -> tuple[object, float | None]:
    """The trained PiSSA model (from ``--trained`` if it holds one) and its training seconds (None if reused)."""
    import svdadapt

    keep = Path(args.trained) if args.trained else None
    if keep is not None and (keep / "svdadapt.json").is_file():
        return svdadapt.load(copy.deepcopy(base), keep, progress=False), None
    pm = svdadapt.wrap(copy.deepcopy(base), "pissa", args.rank, seed=args.seed, progress=False)
    out = _tasks.train_addition(pm, data["train"], steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                seed=1000 + args.seed, progress=not args.no_progress, desc="pissa")
    if keep is not None:
        svdadapt.save(pm, keep)
    return pm, out["train_s"]


def score(base, d: Path, data) -> dict:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), d)
    out = _tasks.addition_eval(model, data["test"])
    del model
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trained", default=None, metavar="DIR",
                   help="keep the trained model here (svdadapt.save) and reuse it when it exists (delete it after)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import svdadapt

    base, tok = _tasks.model_or_default(None, None, None)
    base.requires_grad_(False)
    train_pairs, held = _tasks.addition_split(n_test=128 + 256, seed=0)
    data = {"train": _tasks.encode_addition(tok, train_pairs), "test": _tasks.encode_addition(tok, held[128:])}
    covs = svdadapt.collect_covariances(base, svdadapt.text_batches(tok, _tasks.task_texts(train_pairs[:512]),
                                                                    seq_len=64, batch_size=8), progress=False)
    pm, train_s = fine_tune(base, data, args)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_compact_"))
    try:
        wrapped = _tasks.addition_eval(pm, data["test"])
        for label, kw in variants(args.rank):
            d = tmp / str(len(rows))
            t0 = time.perf_counter()
            svdadapt.export_lora(pm, d, **kw, **({"covariances": covs} if kw.get("weighted") else {}))
            secs = time.perf_counter() - t0
            rep = json.loads((d / "svdadapt_export.json").read_text()) if kw else None
            row = {"variant": label, "export_s": secs, **score(base, d, data),
                   "parameters": rep["parameters"] if rep else None,
                   "plain_parameters": rep["parameters_full_export"] if rep else None,
                   "max_error": max(r["error"] for r in rep["layers"].values()) if rep else 0.0,
                   "mean_error": sum(r["error"] for r in rep["layers"].values()) / len(rep["layers"]) if rep else 0.0}
            rows.append(row)
            print(f"{label:22s} acc {row['accuracy']:.3f} loss {row['loss']:.4f} export {secs:.2f} s", flush=True)
            shutil.rmtree(d)
        full = next(r["plain_parameters"] for r in rows if r["plain_parameters"] is not None)  # rank 2r everywhere
        for r in rows:
            r["parameters"] = full if r["parameters"] is None else r["parameters"]
            r["params_pct"] = 100 * r["parameters"] / full
        dense_s, dense_err = dense_export_s(pm)
        d = tmp / "check"
        svdadapt.export_lora(pm, d, rank=args.rank // 2)
        ours = json.loads((d / "svdadapt_export.json").read_text())["layers"]
        agree = max(abs(ours[n]["error"] - e) for n, e in dense_err.items())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    compact_s = next(r["export_s"] for r in rows if r["variant"] == "energy 0.99")
    payload = {"config": vars(args), "trained_model": wrapped, "train_s": train_s, "rows": rows,
               "dense_export_s": dense_s, "compact_export_s": compact_s, "speedup": dense_s / compact_s,
               "max_error_difference_vs_dense": agree}
    print(report(payload))
    path = write_results(NAME, payload)
    print(f"wrote {path}")
    return payload


def report(payload: dict) -> str:
    cols = [("variant", "export", "{}"), ("parameters", "parameters", "{:,}"), ("params_pct", "% of plain", "{:.0f}"),
            ("accuracy", "held-out acc", "{:.3f}"), ("loss", "answer loss", "{:.4f}"),
            ("mean_error", "mean ‖ΔW−M‖/‖ΔW‖", "{:.3f}"), ("max_error", "max", "{:.3f}"),
            ("export_s", "export s", "{:.2f}")]
    t = payload["trained_model"]
    return "\n".join([markdown_table(payload["rows"], cols), "",
                      f"trained (wrapped) model: acc {t['accuracy']:.3f}, loss {t['loss']:.4f}; export of every "
                      f"layer: compact (energy 0.99) {payload['compact_export_s']:.2f} s, dense SVD "
                      f"{payload['dense_export_s']:.2f} s ({payload['speedup']:.0f}x); largest difference of the "
                      f"reported rank-r/2 errors from the dense SVD's {payload['max_error_difference_vs_dense']:.1e}"])


if __name__ == "__main__":
    main()
