"""Quantized bases on SmolLM2-135M (bitsandbytes nf4): how close each start is to the full-precision model, and
what fine-tuning makes of it.

Part 1, at initialization (ranks 16 and 64, all 210 Linears but the output head, alpha = rank):

* ``fp``        the full-precision model (fp32)
* ``qlora``     nf4(W) as transformers loads it (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``),
                zero adapter
* ``loftq1/5``  PEFT's LoftQ (``init_lora_weights="loftq"``, ``LoftQConfig(loftq_bits=4, loftq_iter=1 | 5)``). PEFT 0.21
                hard-codes a CUDA (or XPU) device in ``loftq_init``, so on a CPU-only machine it raises; the error is
                recorded, and the rows are then measured with PEFT's own ``loftq_init`` source with that one device
                string changed to ``"cpu"`` (same bitsandbytes nf4 quantizer, same full SVD)
* ``qpissa1/5`` ``svdadapt.wrap(model, "pissa", r, quantize="nf4", quant_iters=1 | 5)``
* ``eora``      ``svdadapt.wrap(model, "eora", r, quantize="nf4", calibration=covs)``, covariances of the full-precision
                model (``calibrate_on="reference"``)

Each row: perplexity on held-out text of a different kind than the calibration (calibration: ``pydoc_data.topics``
prose; evaluation: Python standard-library source, as ``bench_eora.py``), and the mean (and worst) per-layer relative
error ‖W − W_eff‖ / ‖W‖ with W_eff = deq(base) + s·B·A.

Part 2, fine-tuning from those starts on the shared addition task (``examples/_tasks.py``, the protocol of
``bench_finetune.py``: every start runs every learning rate of a sweep on seed 0, its best validation rate then runs
on the other seeds): ``qlora`` (PEFT's default LoRA on the nf4 model), ``loftq`` (5 iterations), ``qpissa``
(5 iterations) and ``eora`` ("EoRA then fine-tune"). Held-out exact match, loss curves and accuracy in one PNG.

The CPU trap this benchmark steps around: on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` on its
first eval-mode forward and then computes in bf16 — and a training step after that back-propagates through the
repacked weight without an autograd kernel, giving wrong gradients silently (docs/quantization.md). Every bitsandbytes
layer here gets ``support_avx512bf16_for_cpu = False``: eval and training both use the fp32 dequantize-then-matmul
path, so the periodic evaluation cannot corrupt training and every perplexity is computed the same way.

Resumable: every finished row / run is written to ``benchmarks/results/bench_quant.json`` at once; a rerun skips what
is there with the same configuration (``--fresh`` starts over). ``--report-only`` reprints and redraws the PNG.

    python benchmarks/bench_quant.py --threads 1                    # everything: 3-rate sweep, 2 seeds, 100 steps
    python benchmarks/bench_quant.py --threads 1 --parts init --eval-tokens 4096   # part 1 as last run (~48 min, loaded)
    python benchmarks/bench_quant.py --threads 1 --parts finetune   # part 2 as last run (16 runs, ~75 min)
    python benchmarks/bench_quant.py --report-only                  # reprint the tables, redraw the PNG

LoftQ needs scipy (PEFT's ``LoraConfig`` checks for it when ``init_lora_weights="loftq"``): ``pip install scipy``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "examples"))

import _tasks  # noqa: E402
from _common import (RESULTS_DIR, add_finetune_arguments, best_lr, machine_info, markdown_table,  # noqa: E402
                     parse_seeds, report_only, show, smollm2, sweep_grid, write_results)
from bench_eora import calibration_texts, code_texts  # noqa: E402

NAME = "bench_quant"
INIT_STARTS = ("qpissa1", "qpissa5", "eora", "loftq1", "loftq5")  # per rank, after fp and qlora
FT_METHODS = ("qlora", "loftq", "qpissa", "eora")
LABELS = {"fp": "full precision (fp32)", "qlora": "QLoRA: nf4(W), zero adapter", "loftq1": "LoftQ, 1 iteration",
          "loftq5": "LoftQ, 5 iterations", "qpissa1": "QPiSSA, 1 iteration", "qpissa5": "QPiSSA, 5 iterations",
          "eora": "EoRA on nf4(W)"}


# --------------------------------------------------------------------------------------------------- helpers
def no_cpu_repacking(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer on the fp32 dequantize path (see the module docstring). Returns how many."""
    from svdadapt.modules.bnb import is_bnb_layer

    n = 0
    for m in model.modules():
        if is_bnb_layer(m) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


@torch.no_grad()
def perplexity(model, batches) -> tuple[float, float]:
    """(perplexity, mean next-token NLL) over the unmasked tokens."""
    model.eval()
    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        target, keep = b["input_ids"][:, 1:], b["attention_mask"][:, 1:].bool()
        nll += torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="sum").item()
        n += int(keep.sum())
    return math.exp(nll / n), nll / n


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def lora_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@torch.no_grad()
def effective_errors(model, W0: dict[str, torch.Tensor], covs=None) -> tuple[dict[str, float], dict[str, float]]:
    """Per layer ‖W − W_eff‖ / ‖W‖ with W_eff = base + s·B·A in fp64 (base dequantized for bitsandbytes layers), and
    with ``covs`` the same on the calibration inputs, ‖(W − W_eff)·Xᵀ‖ / ‖W·Xᵀ‖ = √(tr(E·C·Eᵀ) / tr(W·C·Wᵀ)).
    ``model`` is a PEFT model, or a plain model whose targets are bitsandbytes layers (no adapter)."""
    from svdadapt.modules.bnb import dequantize, is_bnb_layer

    layers = lora_modules(model) if is_peft(model) else {}
    out, act = {}, {}
    for name, W in W0.items():
        if layers:
            layer = layers[name]
            base = layer.get_base_layer()
            A = layer.lora_A["default"].weight.double()
            B = layer.lora_B["default"].weight.double()
            delta = layer.scaling["default"] * (B @ A)
        else:
            base, delta = model.get_submodule(name), 0.0
        D = dequantize(base).double() if is_bnb_layer(base) else base.weight.double()
        E = W - D - delta
        out[name] = float(E.norm() / W.norm())
        if covs is not None:
            C = covs[name].double()
            act[name] = float(((E @ C) * E).sum().clamp_min(0).sqrt() / ((W @ C) * W).sum().sqrt())
    return out, act


def cpu_loftq_init():
    """PEFT's ``loftq_init`` (peft/utils/loftq_utils.py), its source with the hard-coded accelerator device string
    replaced by "cpu"; nothing else changed. Raises if the source no longer has that line."""
    from peft.utils import loftq_utils

    src = inspect.getsource(loftq_utils.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    if line not in src:
        raise RuntimeError("peft's loftq_init changed; cannot run it on CPU this way")
    namespace = dict(vars(loftq_utils))
    exec(compile(src.replace(line, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


def loftq_model(model, rank: int, iters: int, record: dict) -> torch.nn.Module:
    """PEFT LoftQ on a copy of ``model``; on CPU-only torch the PEFT call fails and is retried with
    :func:`cpu_loftq_init` (the error goes to ``record["peft_error"]``)."""
    from peft import LoftQConfig, LoraConfig, get_peft_model
    from peft.tuners.lora import layer as lora_layer

    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM",
                     init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=iters))
    try:
        return get_peft_model(copy.deepcopy(model), cfg)
    except Exception as e:  # noqa: BLE001 — recorded and reported
        record["peft_error"] = f"{type(e).__name__}: {e}"
    original = lora_layer.loftq_init
    lora_layer.loftq_init = cpu_loftq_init()
    try:
        out = get_peft_model(copy.deepcopy(model), cfg)
    finally:
        lora_layer.loftq_init = original
    record["loftq_impl"] = "peft loftq_init source, device 'cpu'"
    return out


def load_nf4(path: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")
    no_cpu_repacking(model)
    return model.eval()


def build_start(start: str, rank: int, model, fp_dir: Path, covs, record: dict):
    """The model of one start (PEFT model, or the plain nf4 / fp32 model for ``fp`` / ``qlora``)."""
    import svdadapt

    if start == "fp":
        return model
    if start == "qlora":
        return load_nf4(fp_dir)
    if start.startswith("loftq"):
        return loftq_model(model, rank, int(start[5:]), record)
    if start.startswith("qpissa"):
        pm = svdadapt.wrap(copy.deepcopy(model), "pissa", rank, quantize="nf4", quant_iters=int(start[6:]),
                           progress=False)
    elif start == "eora":
        pm = svdadapt.wrap(copy.deepcopy(model), "eora", rank, quantize="nf4", calibration=covs, progress=False)
    else:
        raise ValueError(start)
    no_cpu_repacking(pm)
    return pm


# --------------------------------------------------------------------------------------------------- part 1
def run_init(args, model, tok, payload: dict, save) -> None:
    import svdadapt

    rows = payload["init"]
    cfg = payload["config"]
    have = {(r["start"], r["rank"]) for r in rows}
    plan = [("fp", 0), ("qlora", 0)] + [(s, r) for r in cfg["ranks"] for s in INIT_STARTS]
    plan = [(s, r) for s, r in plan if s in args.starts]
    if all(p in have for p in plan):
        return
    calib = svdadapt.text_batches(tok, calibration_texts(), seq_len=cfg["calib_len"], batch_size=4,
                                  max_batches=math.ceil(cfg["calib_seqs"] / 4))
    evals = svdadapt.text_batches(tok, code_texts(), seq_len=512, batch_size=4,
                                  max_batches=math.ceil(cfg["eval_tokens"] / 2048))
    payload["calib_tokens"] = sum(int(b["attention_mask"].sum()) for b in calib)
    payload["eval_tokens"] = sum(int(b["attention_mask"].sum()) for b in evals)
    W0 = {n: m.weight.detach().double().clone() for n, m in svdadapt.resolve_targets(model).items()}
    t = time.perf_counter()
    covs = svdadapt.collect_covariances(model, calib, progress=False)  # EoRA's, and the activation-weighted errors
    payload["collect_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        fp_dir = Path(tmp) / "fp32"
        model.save_pretrained(fp_dir)
        for start, rank in plan:
            if (start, rank) in have:
                continue
            row: dict[str, Any] = {"start": start, "rank": rank}
            t = time.perf_counter()
            m = build_start(start, rank, model, fp_dir, covs, row)
            row["init_s"] = time.perf_counter() - t
            errs, act = effective_errors(m, W0, covs) if start != "fp" else ({n: 0.0 for n in W0},) * 2
            row["err_mean"] = statistics.fmean(errs.values())
            row["err_max"] = max(errs.values())
            row["act_err_mean"] = statistics.fmean(act.values())
            row["layers"] = len(errs)
            t = time.perf_counter()
            row["ppl"], row["loss"] = perplexity(m, evals)
            row["eval_s"] = time.perf_counter() - t
            row["loadavg_1m"] = machine_info().get("loadavg_1m")
            if start != "fp":
                del m
            rows.append(row)
            save()
            print(f"init {start:8s} r={rank:<3d} ppl {row['ppl']:.3f}  mean rel err {row['err_mean']:.4f}  on inputs "
                  f"{row['act_err_mean']:.4f}  init {row['init_s']:.1f} s", flush=True)


# --------------------------------------------------------------------------------------------------- part 2
def make_ft_model(method: str, rank: int, seed: int, model, fp_dir: Path, covs):
    """A fresh start for fine-tuning: 5 alternating iterations for LoftQ and QPiSSA."""
    if method == "qlora":
        return _tasks.default_lora(load_nf4(fp_dir), rank, "all-linear", seed)
    if method == "loftq":
        return loftq_model(model, rank, 5, {})
    import svdadapt

    if method == "qpissa":
        pm = svdadapt.wrap(copy.deepcopy(model), "pissa", rank, quantize="nf4", quant_iters=5, seed=seed,
                           progress=False)
    else:
        pm = svdadapt.wrap(copy.deepcopy(model), "eora", rank, quantize="nf4", calibration=covs, seed=seed,
                           progress=False)
    no_cpu_repacking(pm)
    return pm


class StartCache:
    """One initialized start per (start, seed): the sweep's rates reuse it instead of re-running the initialization
    (LoftQ-5 alone takes minutes). The start's trainable tensors are kept and copied back before each run, so every
    run begins from exactly the tensors a fresh initialization gives (the initializations are deterministic)."""

    def __init__(self) -> None:
        self.key, self.model, self.init_s, self.tensors = None, None, 0.0, {}

    def get(self, method: str, seed: int, build) -> tuple[torch.nn.Module, float]:
        if self.key != (method, seed):
            self.model = None
            t0 = time.perf_counter()
            self.model = build()
            self.init_s = time.perf_counter() - t0
            self.key = (method, seed)
            self.tensors = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        else:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in self.tensors:
                        p.copy_(self.tensors[n])
        return self.model, self.init_s


def run_finetune(args, model, tok, payload: dict, save) -> None:
    import svdadapt

    ft = payload["finetune"]
    cfg = ft["config"]
    runs = ft["runs"]
    train_pairs, held = _tasks.addition_split(n_test=cfg["n_val"] + cfg["n_test"], seed=0)
    data = {"train": _tasks.encode_addition(tok, train_pairs),
            "val": _tasks.encode_addition(tok, held[:cfg["n_val"]]),
            "test": _tasks.encode_addition(tok, held[cfg["n_val"]:])}
    if "base_task" not in ft:
        ft["base_task"] = _tasks.addition_eval(model, data["test"])
    covs = None

    def lrs_of(m: str) -> list[float]:
        return cfg["method_lrs"].get(m, cfg["lrs"])

    def have(m: str, lr: float, s: int) -> bool:
        return any(r["method"] == m and r["lr"] == lr and r["seed"] == s for r in runs)

    starts = StartCache()
    with tempfile.TemporaryDirectory() as tmp:
        fp_dir = Path(tmp) / "fp32"
        model.save_pretrained(fp_dir)
        for phase in ("sweep", "seeds"):
            if phase == "sweep":
                plan = [(m, lr, 0) for m in cfg["methods"] for lr in lrs_of(m)]
            else:
                plan = [(m, best_lr(runs, m), s) for m in cfg["methods"] for s in cfg["seeds"] if s != 0]
            for m, lr, s in plan:
                if lr is None or have(m, lr, s):
                    continue
                if m == "eora" and covs is None:  # EoRA's covariances, on the full-precision model
                    calib = svdadapt.text_batches(tok, calibration_texts(), seq_len=payload["config"]["calib_len"],
                                                  batch_size=4, max_batches=math.ceil(payload["config"]["calib_seqs"] / 4))
                    covs = svdadapt.collect_covariances(model, calib, progress=False)
                pm, init_s = starts.get(m, s, lambda: make_ft_model(m, cfg["rank"], s, model, fp_dir, covs))
                at_init = _tasks.addition_eval(pm, data["val"])
                out = _tasks.train_addition(pm, data["train"], steps=cfg["steps"], lr=lr, batch_size=cfg["batch_size"],
                                            seed=1000 + s, eval_ids=data["val"], eval_every=cfg["eval_every"],
                                            progress=not args.no_progress, desc=f"{m} lr={lr:g} seed={s}")
                test = _tasks.addition_eval(pm, data["test"])
                losses = out["losses"]
                runs.append({
                    "method": m, "lr": lr, "seed": s, "init_s": init_s, "train_s": out["train_s"],
                    "s_per_step": out["train_s"] / len(losses), "losses": losses,
                    "curve": [(0, at_init["accuracy"], at_init["loss"])] + [tuple(c) for c in out["curve"]],
                    "val_accuracy": out["curve"][-1][1], "test_accuracy": test["accuracy"], "test_loss": test["loss"],
                    "final_train_loss": statistics.fmean(losses[-10:]),
                    "steps_to_target": _tasks.steps_to(losses, cfg["target_loss"]),
                    "trainable": sum(p.numel() for p in pm.parameters() if p.requires_grad),
                    "loadavg_1m": machine_info().get("loadavg_1m"), "torch_threads": torch.get_num_threads(),
                })
                del pm
                save()
                r = runs[-1]
                print(f"ft {m:7s} lr={lr:<7g} seed={s}: val acc at init {at_init['accuracy']:.3f}, test acc "
                      f"{r['test_accuracy']:.3f}, final loss {r['final_train_loss']:.3f}, {r['train_s']:.0f} s",
                      flush=True)


# --------------------------------------------------------------------------------------------------- report
INIT_COLUMNS = [("label", "start", "{}"), ("rank", "rank", "{}"), ("ppl", "perplexity", "{:.3f}"),
                ("err_mean", "mean ‖W − W_eff‖/‖W‖", "{:.4f}"), ("err_max", "worst layer", "{:.4f}"),
                ("act_err_mean", "mean ‖(W − W_eff)Xᵀ‖/‖WXᵀ‖ (calibration X)", "{:.4f}"),
                ("init_s", "init (s)", "{:.1f}")]


def init_table(payload: dict) -> str:
    rows = []
    order = ["fp", "qlora", "loftq1", "loftq5", "qpissa1", "qpissa5", "eora"]
    for r in sorted(payload["init"], key=lambda r: (r["rank"], order.index(r["start"]))):
        rows.append({**r, "label": LABELS[r["start"]], "rank": r["rank"] or "—"})
    return markdown_table(rows, INIT_COLUMNS)


def ft_summary(ft: dict) -> list[dict]:
    rows = []
    for m in ft["config"]["methods"]:
        lr = best_lr(ft["runs"], m)
        rs = [r for r in ft["runs"] if r["method"] == m and r["lr"] == lr]
        if not rs:
            continue
        accs = [r["test_accuracy"] for r in rs]
        steps = [r["steps_to_target"] for r in rs]
        reached = [s for s in steps if s is not None]
        rows.append({"method": m, "lr": lr, "seeds": len(rs), "test_acc": statistics.fmean(accs),
                     "acc_range": f"{min(accs):.3f}–{max(accs):.3f}",
                     "val_at_init": statistics.fmean(r["curve"][0][1] for r in rs),
                     "loss_at_init": statistics.fmean(r["curve"][0][2] for r in rs),
                     "steps_to_target": statistics.fmean(reached) if reached else None,
                     "not_reached": len(steps) - len(reached),
                     "final_train_loss": statistics.fmean(r["final_train_loss"] for r in rs),
                     "s_per_step": statistics.fmean(r["s_per_step"] for r in rs)})
    return rows


FT_COLUMNS = [("method", "start", "{}"), ("lr", "lr", "{:g}"), ("seeds", "seeds", "{:d}"),
              ("loss_at_init", "answer loss at init", "{:.3f}"), ("test_acc", "held-out exact match", "{:.3f}"),
              ("acc_range", "min–max", "{}"), ("steps_to_target", "steps to loss", "{:.0f}"),
              ("not_reached", "runs never reaching it", "{:d}"), ("final_train_loss", "final train loss", "{:.3f}"),
              ("s_per_step", "s/step", "{:.2f}")]


def report(payload: dict) -> str:
    parts = []
    if payload.get("init"):
        parts.append(f"at initialization (nf4; perplexity on {payload.get('eval_tokens', '?')} held-out stdlib-source "
                     f"tokens):\n{init_table(payload)}")
        errors = {r.get("peft_error") for r in payload["init"] if r.get("peft_error")}
        for e in errors:
            parts.append(f"PEFT's LoftQ on this CPU: {e}")
    ft = payload.get("finetune")
    if ft and ft.get("runs"):
        parts.append(f"fine-tuning sweep (seed 0), validation / test exact match:\n{sweep_grid(ft['runs'], ft['config']['methods'], 'start')}")
        parts.append(f"each start at its best rate (steps to loss = first step whose 10-step average training loss "
                     f"is <= {ft['config']['target_loss']}):\n{markdown_table(ft_summary(ft), FT_COLUMNS)}")
    return "\n\n".join(parts)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"qlora": "black", "loftq": "tab:orange", "qpissa": "tab:blue", "eora": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax_i, ax_l, ax_a = axes
    init = payload.get("init", [])
    fp = next((r for r in init if r["start"] == "fp"), None)
    ranks = sorted({r["rank"] for r in init if r["rank"]})
    starts = ["qlora", "loftq1", "loftq5", "qpissa1", "qpissa5", "eora"]
    width = 0.8 / max(1, len(ranks))
    for j, rank in enumerate(ranks):
        ys = []
        for s in starts:
            r = next((r for r in init if r["start"] == s and r["rank"] in ((0,) if s == "qlora" else (rank,))), None)
            ys.append(r["ppl"] if r else float("nan"))
        ax_i.bar([i + (j - (len(ranks) - 1) / 2) * width for i in range(len(starts))], ys, width=width,
                 label=f"rank {rank}")
    if fp:
        ax_i.axhline(fp["ppl"], color="grey", ls=":", label=f"fp32 {fp['ppl']:.2f}")
    if init:
        lo = min(r["ppl"] for r in init) * 0.97
        ax_i.set_ylim(bottom=lo)
    ax_i.set_xticks(range(len(starts)), starts, rotation=20)
    ax_i.set(ylabel="held-out perplexity (stdlib source)", title="SmolLM2-135M nf4: at initialization")
    ax_i.legend(fontsize=8)
    ft = payload.get("finetune") or {}
    for m in (ft.get("config") or {}).get("methods", []):
        lr = best_lr(ft["runs"], m)
        rs = [r for r in ft["runs"] if r["method"] == m and r["lr"] == lr]
        if not rs:
            continue
        curves = torch.tensor([_tasks.smooth(r["losses"]) for r in rs])
        x = range(1, curves.shape[1] + 1)
        ax_l.plot(x, curves.mean(0), color=colors.get(m), label=f"{m} (lr {lr:g}, {len(rs)} seed{'s' * (len(rs) > 1)})")
        ax_l.fill_between(x, curves.min(0).values, curves.max(0).values, color=colors.get(m), alpha=0.2)
        acc = torch.tensor([[c[1] for c in r["curve"]] for r in rs])
        xs = [c[0] for c in rs[0]["curve"]]
        ax_a.plot(xs, acc.mean(0), marker="o", color=colors.get(m), label=m)
        ax_a.fill_between(xs, acc.min(0).values, acc.max(0).values, color=colors.get(m), alpha=0.2)
    if ft.get("config"):
        c = ft["config"]
        ax_l.axhline(c["target_loss"], color="grey", ls=":", lw=1)
        ax_l.set(yscale="log", xlabel="step", ylabel="training loss (answer tokens, 10-step avg)",
                 title=f"fine-tuning on addition, r={c['rank']}, batch {c['batch_size']}")
        ax_l.legend(fontsize=8)
        ax_a.set(xlabel="step", ylabel="validation exact match", ylim=(-0.02, 1.02), title="held-out addition accuracy")
        ax_a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main
def parse_method_lrs(spec: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m, _, v = item.partition("=")
        if m not in FT_METHODS or not v:
            raise ValueError(f"--method-lrs items look like qpissa=1e-3 (methods {', '.join(FT_METHODS)}), got {item!r}")
        out.setdefault(m, []).extend(float(x) for x in v.split("/"))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="init,finetune", help="init, finetune or both (default)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="ranks at initialization")
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens, in 512-token sequences")
    p.add_argument("--starts", default="fp,qlora," + ",".join(INIT_STARTS), help="part 1's starts")
    p.add_argument("--methods", default=",".join(FT_METHODS), help="fine-tuning starts")
    p.add_argument("--ft-rank", type=int, default=16)
    p.add_argument("--method-lrs", default="", help="per-start rates instead of the sweep, e.g. qpissa=1e-3/3e-4,qlora=3e-3")
    add_finetune_arguments(p, lrs="3e-4,1e-3,3e-3", out=RESULTS_DIR / f"{NAME}.json")
    args = p.parse_args(argv)

    out = Path(args.out)
    if args.report_only:
        return report_only(out, report, plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not parts <= {"init", "finetune"}:
        p.error(f"--parts takes init and/or finetune, got {args.parts!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in FT_METHODS for m in methods):
        p.error(f"--methods: choose from {', '.join(FT_METHODS)}")
    args.starts = [s.strip() for s in args.starts.split(",") if s.strip()]
    if any(s not in LABELS for s in args.starts):
        p.error(f"--starts: choose from {', '.join(LABELS)}")
    seeds = parse_seeds(p, args.seeds)

    config = {"model": "SmolLM2-135M-Instruct (fp32)", "scheme": "nf4", "ranks": args.ranks,
              "calib_seqs": args.calib_seqs, "calib_len": args.calib_len, "eval_tokens": args.eval_tokens,
              "targets": "all-linear", "alpha": "rank"}
    ft_config = {"methods": methods, "rank": args.ft_rank, "lrs": [float(x) for x in args.lrs.split(",")],
                 "method_lrs": parse_method_lrs(args.method_lrs), "seeds": seeds, "steps": args.steps,
                 "batch_size": args.batch_size, "eval_every": args.eval_every, "target_loss": args.target_loss,
                 "n_val": args.n_val, "n_test": args.n_test, "loftq_iter": 5, "qpissa_iters": 5}
    payload: dict[str, Any] = {"config": config, "init": [], "finetune": {"config": ft_config, "runs": []}}
    if out.exists() and not args.fresh:
        old = json.loads(out.read_text())
        init_key = ("calib_seqs", "calib_len", "eval_tokens")
        if all(old.get("config", {}).get(k) == config[k] for k in init_key):
            payload["init"] = [r for r in old.get("init", []) if r["rank"] in (0, *args.ranks)]
            for k in ("calib_tokens", "eval_tokens", "collect_s"):
                if k in old:
                    payload[k] = old[k]
        old_ft = old.get("finetune") or {}
        ft_key = ("rank", "steps", "batch_size", "eval_every", "target_loss", "n_val", "n_test")
        if all((old_ft.get("config") or {}).get(k) == ft_config[k] for k in ft_key):
            payload["finetune"]["runs"] = [r for r in old_ft.get("runs", []) if r["method"] in methods]
        # a part that is not run this time is carried over as it is, whatever its configuration
        if "init" not in parts:
            payload["config"] = old.get("config", config)
            payload["init"] = old.get("init", [])
            for k in ("calib_tokens", "eval_tokens", "collect_s"):
                if k in old:
                    payload[k] = old[k]
        if "finetune" not in parts and old_ft:
            payload["finetune"] = old_ft
        print(f"resuming: {len(payload['init'])} init rows, {len(payload['finetune']['runs'])} fine-tuning runs")

    def save() -> None:
        if out.resolve() == (RESULTS_DIR / f"{NAME}.json").resolve():
            write_results(NAME, payload)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2, default=float) + "\n")

    t0 = time.perf_counter()
    model, tok = smollm2()
    model.requires_grad_(False)
    if "init" in parts:
        run_init(args, model, tok, payload, save)
    if "finetune" in parts:
        run_finetune(args, model, tok, payload, save)
    payload["bench_s_this_invocation"] = time.perf_counter() - t0
    save()
    return show(out, payload, report, plot)


if __name__ == "__main__":
    main()
