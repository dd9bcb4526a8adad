"""Does SVD-based initialization pay off? Fine-tuning SmolLM2-135M on a small task, five ways, on this CPU.

Task: 2-digit addition with a 3-digit sum (``"47+58=105"``, see ``examples/_tasks.py``); the base model scores 0 %.
Held-out exact match on 256 never-seen items (test) and 128 more (validation, used only to pick learning rates).
Knowledge probe: 60 capital-city cloze items the base model mostly passes, scored before and after fine-tuning.

Methods, all at the same rank, alpha = rank, all linear layers, so the same trainable-parameter count:

* ``lora``       PEFT's default init (B = 0, A Kaiming-uniform), seeded
* ``pissa``      top-r singular triplets of W
* ``milora``     bottom-r singular triplets of W
* ``corda-ipa``  CorDA, top-r of W·C with C from task items (the training split)
* ``corda-kpa``  CorDA, bottom-r of W·C with C from knowledge text disjoint from the probe items

Not in the default ``--methods``, for rank allocation (docs/wrap.md; benchmarks/results/bench_finetune_allocate.json):

* ``pissa-alloc``      ``wrap(..., "pissa", rank, allocate=True)``: per-layer ranks at the parameter budget of uniform
                       ``rank`` (the method's objective, the captured fraction per layer; max rank 4·rank)
* ``corda-ipa-alloc``  the same for CorDA-IPA, on corda-ipa's covariances
* ``eva-peft``         PEFT's own EVA (``init_lora_weights="eva"``, ``EvaConfig()`` defaults: rho 2, i.e. ranks
                       redistributed up to 2·rank with the total rank count kept; the batches carry no labels, so
                       the attention mask alone selects tokens), ``initialize_lora_eva_weights`` on the same task batches as corda-ipa's covariances

Protocol: every method runs every learning rate of a shared sweep on seed 0; the learning rate with the best
validation accuracy (ties: lower mean training loss over the last 20 steps) then runs on the remaining seeds. Each
finished run is written to ``benchmarks/results/bench_finetune.json`` at once; rerunning skips runs already
there with the same configuration (``--fresh`` starts over), so the benchmark can be stopped and resumed.
``--report-only`` rebuilds the table and the PNG from the JSON.

    python benchmarks/bench_finetune.py --threads 1           # the full protocol, ~2 h here (see benchmarks/README.md)
    python benchmarks/bench_finetune.py --steps 20 --lrs 1e-3 --seeds 0 --methods lora,pissa --out /tmp/ft.json  # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "examples"))

import _tasks  # noqa: E402
from _common import (RESULTS_DIR, add_finetune_arguments, best_lr, machine_info, markdown_table,  # noqa: E402
                     parse_seeds, report_only, show, sweep_grid, write_results)

NAME = "bench_finetune"
DEFAULT_METHODS = ("lora", "pissa", "milora", "corda-ipa", "corda-kpa")
METHODS = (*DEFAULT_METHODS, "pissa-alloc", "corda-ipa-alloc", "eva-peft")


def calib_key(method: str) -> str:
    """The calibration a method uses: an allocated variant and PEFT's EVA share corda-ipa's task items."""
    return "corda-ipa" if method == "eva-peft" else method.removesuffix("-alloc")


# --------------------------------------------------------------------------------------------------- set-up
@torch.no_grad()
def calibrations(base, tok, train_pairs, methods, targets, progress: bool) -> tuple[dict[str, Any], dict[str, float]]:
    """Covariances for the CorDA variants, collected once on the unmodified base model.

    IPA: 512 training items (the task the adapter should learn), KPA: ``_tasks.KNOWLEDGE_TEXTS`` (facts to keep,
    none of them a probe item). Returns ({"corda-ipa": Covariances, ...}, {"corda-ipa": seconds, ...}).
    """
    import svdadapt

    texts = {"corda-ipa": _tasks.task_texts(train_pairs[:512]), "corda-kpa": _tasks.KNOWLEDGE_TEXTS}
    covs, secs = {}, {}
    for key in dict.fromkeys(calib_key(m) for m in methods):
        if key in texts:
            t0 = time.perf_counter()
            batches = svdadapt.text_batches(tok, texts[key], seq_len=64, batch_size=8)
            covs[key] = svdadapt.collect_covariances(base, batches, target_modules=targets, progress=progress)
            secs[key] = time.perf_counter() - t0
            covs[f"{key}-batches"] = batches
    return covs, secs


def eva_peft(model, rank: int, targets, batches) -> Any:
    """PEFT's EVA on ``model``: ``LoraConfig(init_lora_weights="eva")`` then ``initialize_lora_eva_weights`` over
    ``batches`` (dicts of input_ids / attention_mask); alpha = rank (EVA adjusts it per layer to keep alpha / r)."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM",
                     init_lora_weights="eva", eva_config=EvaConfig())
    pm = get_peft_model(model, cfg)
    initialize_lora_eva_weights(pm, [dict(b) for b in batches], show_progress_bar=False)
    return pm


def make_model(base, method: str, rank: int, seed: int, covs: dict[str, Any], targets, progress: bool):
    """A fresh deep copy of ``base`` wrapped for ``method`` on ``targets`` (``"all-linear"`` or module-name
    suffixes), alpha = rank."""
    import svdadapt

    model = copy.deepcopy(base)
    if method == "lora":
        return _tasks.default_lora(model, rank, targets, seed)
    if method == "eva-peft":
        return eva_peft(model, rank, targets, covs["corda-ipa-batches"])
    allocate = method.endswith("-alloc")
    name = method.removesuffix("-alloc")
    if name in ("pissa", "milora"):
        return svdadapt.wrap(model, name, rank, target_modules=targets, seed=seed, progress=progress,
                             allocate=allocate)
    mode = name.split("-")[1]
    return svdadapt.wrap(model, "corda", rank, mode=mode, calibration=covs[name], target_modules=targets, seed=seed,
                         progress=progress, allocate=allocate)


def one_run(base, tok, data, covs, *, method: str, lr: float, seed: int, cfg: dict, progress: bool) -> dict:
    """Wrap, train, evaluate one (method, lr, seed); returns the JSON row."""
    t0 = time.perf_counter()
    model = make_model(base, method, cfg["rank"], seed, covs, _tasks.parse_targets(cfg["target_modules"]), progress=False)
    init_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    at_init = _tasks.knowledge_probe(model, tok)
    out = _tasks.train_addition(model, data["train"], steps=cfg["steps"], lr=lr, batch_size=cfg["batch_size"],
                                seed=1000 + seed, eval_ids=data["val"], eval_every=cfg["eval_every"],
                                progress=progress, desc=f"{method} lr={lr:g} seed={seed}")
    test = _tasks.addition_eval(model, data["test"])
    after = _tasks.knowledge_probe(model, tok)
    losses = out["losses"]
    return {
        "method": method, "lr": lr, "seed": seed, "trainable": trainable,
        "init_s": init_s, "train_s": out["train_s"], "s_per_step": out["train_s"] / len(losses),
        "losses": losses, "curve": out["curve"],
        "val_accuracy": out["curve"][-1][1], "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "final_train_loss": statistics.fmean(losses[-20:]),
        "steps_to_target": _tasks.steps_to(losses, cfg["target_loss"]),
        "probe_at_init": at_init, "probe_after": after,
    }


# --------------------------------------------------------------------------------------------------- protocol
def _stats(xs: list[float | None]) -> tuple[float | None, float | None, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return None, None, None
    return statistics.fmean(vals), min(vals), max(vals)


def summarize(runs: list[dict], methods, probe_before: dict) -> list[dict]:
    """One row per method at its best learning rate: means and min–max over seeds."""
    rows = []
    for m in methods:
        lr = best_lr(runs, m)
        rs = [r for r in runs if r["method"] == m and r["lr"] == lr]
        if not rs:
            continue
        acc, acc_lo, acc_hi = _stats([r["test_accuracy"] for r in rs])
        st = [r["steps_to_target"] for r in rs]
        steps, st_lo, st_hi = _stats(st)
        plp, plp_lo, plp_hi = _stats([r["probe_after"]["logprob"] for r in rs])
        pacc, _, _ = _stats([r["probe_after"]["accuracy"] for r in rs])
        rows.append({
            "method": m, "lr": lr, "seeds": len(rs), "trainable": rs[0]["trainable"],
            "test_acc": acc, "test_acc_range": f"{acc_lo:.3f}–{acc_hi:.3f}",
            "steps_to_target": steps, "steps_range": "—" if steps is None else f"{st_lo:.0f}–{st_hi:.0f}",
            "not_reached": sum(s is None for s in st),
            "final_train_loss": statistics.fmean(r["final_train_loss"] for r in rs),
            "test_loss": statistics.fmean(r["test_loss"] for r in rs),
            "probe_lp_before": probe_before["logprob"], "probe_lp_after": plp,
            "probe_lp_range": f"{plp_lo:.3f}–{plp_hi:.3f}",
            "probe_acc_before": probe_before["accuracy"], "probe_acc_after": pacc,
            "init_s": statistics.fmean(r["init_s"] for r in rs), "train_s": statistics.fmean(r["train_s"] for r in rs),
        })
    return rows


COLUMNS = [
    ("method", "method", "{}"), ("lr", "best lr", "{:g}"), ("seeds", "seeds", "{:d}"),
    ("test_acc", "held-out acc (mean)", "{:.3f}"), ("test_acc_range", "acc min–max", "{}"),
    ("steps_to_target", "steps to loss", "{:.0f}"), ("steps_range", "steps min–max", "{}"),
    ("not_reached", "runs never reaching it", "{:d}"),
    ("final_train_loss", "final train loss", "{:.3f}"),
    ("probe_lp_before", "probe logp before", "{:.3f}"), ("probe_lp_after", "probe logp after", "{:.3f}"),
    ("probe_acc_before", "probe acc before", "{:.3f}"), ("probe_acc_after", "probe acc after", "{:.3f}"),
    ("init_s", "init (s)", "{:.1f}"), ("train_s", "train (s)", "{:.0f}"),
]
SWEEP_COLUMNS = [("method", "method", "{}"), ("lr", "lr", "{:g}"), ("val_accuracy", "val acc", "{:.3f}"),
                 ("test_accuracy", "test acc", "{:.3f}"), ("final_train_loss", "final train loss", "{:.3f}"),
                 ("steps_to_target", "steps to loss", "{}"), ("s_per_step", "s/step", "{:.2f}")]


def plot(payload: dict, path: Path) -> None:
    """One PNG: training-loss curves (10-step moving average; line = seed mean, band = seed min–max) and held-out
    accuracy during training, for every method at its best learning rate; the probe before/after as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, cfg = payload["runs"], payload["config"]
    methods = [m for m in cfg["methods"] if best_lr(runs, m) is not None]
    fig, (ax_l, ax_a, ax_p) = plt.subplots(1, 3, figsize=(17, 5))
    colors = dict(zip(METHODS, ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:cyan", "tab:olive",
                                "tab:purple"]))
    for m in methods:
        lr = best_lr(runs, m)
        rs = [r for r in runs if r["method"] == m and r["lr"] == lr]
        curves = torch.tensor([_tasks.smooth(r["losses"]) for r in rs])
        x = range(1, curves.shape[1] + 1)
        label = f"{m} (lr {lr:g}, {len(rs)} seed{'s' if len(rs) > 1 else ''})"
        ax_l.plot(x, curves.mean(0), color=colors.get(m), label=label)
        ax_l.fill_between(x, curves.min(0).values, curves.max(0).values, color=colors.get(m), alpha=0.2)
        acc = torch.tensor([[c[1] for c in r["curve"]] for r in rs])
        xs = [c[0] for c in rs[0]["curve"]]
        ax_a.plot(xs, acc.mean(0), marker="o", color=colors.get(m), label=m)
        ax_a.fill_between(xs, acc.min(0).values, acc.max(0).values, color=colors.get(m), alpha=0.2)
    ax_l.axhline(cfg["target_loss"], color="grey", ls=":", lw=1)
    ax_l.set(yscale="log", xlabel="step", ylabel="training loss (answer tokens, 10-step avg)",
             title=f"SmolLM2-135M, r={cfg['rank']}, batch {cfg['batch_size']}")
    ax_l.legend(fontsize=8)
    ax_a.set(xlabel="step", ylabel="validation exact match", ylim=(-0.02, 1.02), title="held-out addition accuracy")
    ax_a.legend(fontsize=8)
    rows = summarize(runs, methods, payload["probe_before"])
    ax_p.bar([-0.6], [payload["probe_before"]["logprob"]], width=0.5, color="grey", label="base model")
    for i, r in enumerate(rows):
        ax_p.bar([i], [r["probe_lp_after"]], width=0.5, color=colors.get(r["method"]))
    ax_p.set_xticks([-0.6, *range(len(rows))], ["base", *[r["method"] for r in rows]], rotation=30)
    ax_p.set(ylabel="mean answer log-prob (higher = more kept)", title="knowledge probe after fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(payload: dict) -> str:
    runs, cfg = payload["runs"], payload["config"]
    sweep = sorted([r for r in runs if r["seed"] == 0], key=lambda r: (cfg["methods"].index(r["method"]), r["lr"]))
    rows = summarize(runs, cfg["methods"], payload["probe_before"])
    return (f"learning-rate sweep (seed 0), held-out exact match validation / test:\n"
            f"{sweep_grid(runs, cfg['methods'])}\n\n"
            f"learning-rate sweep (seed 0):\n{markdown_table(sweep, SWEEP_COLUMNS)}\n\n"
            f"best learning rate per method, over seeds (steps to loss = first step whose 10-step average training "
            f"loss is <= {cfg['target_loss']}):\n{markdown_table(rows, COLUMNS)}")


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, model=None, tokenizer=None) -> dict:
    """Run the protocol; ``model``/``tokenizer`` may be passed in (tests; never modified), else ``--model`` or the
    bundled SmolLM2. Returns the payload written to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--method-lrs", action="append", default=[], metavar="METHOD=LR,LR,...",
                   help="this method's seed-0 rates instead of --lrs, run in the order given (repeatable)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="write --out from the runs of these results files "
                   "(same configuration), print the tables and draw the PNG; nothing is run")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="all-linear", help=_tasks.TARGETS_HELP)
    p.add_argument("--model", default=None, help=_tasks.MODEL_HELP)
    add_finetune_arguments(p, lrs="1e-4,3e-4,1e-3,3e-3,1e-2", out=RESULTS_DIR / f"{NAME}.json")
    args = p.parse_args(argv)

    out = Path(args.out)
    if args.report_only:
        return report_only(out, report, plot)
    if args.merge:
        return merge(p, args.merge, out, [m.strip() for m in args.methods.split(",") if m.strip()])
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    lrs = [float(x) for x in args.lrs.split(",")]
    method_lrs = parse_method_lrs(p, args.method_lrs, methods)
    seeds = parse_seeds(p, args.seeds)
    cfg = dict(methods=methods, lrs=sorted({x for m in methods for x in method_lrs.get(m, lrs)}), seeds=seeds, steps=args.steps, batch_size=args.batch_size, rank=args.rank,
               eval_every=args.eval_every, target_loss=args.target_loss, model=args.model or "SmolLM2-135M-Instruct",
               target_modules=args.targets, alpha="rank", n_val=args.n_val, n_test=args.n_test)
    # a run is reused only if everything that shapes it is unchanged
    key_cfg = {k: cfg[k] for k in ("steps", "batch_size", "rank", "eval_every", "target_loss", "model", "target_modules",
                                       "n_val", "n_test")}
    runs: list[dict] = []
    if out.exists() and not args.fresh:
        old = json.loads(out.read_text())
        if {k: old.get("config", {}).get(k) for k in key_cfg} == key_cfg:
            runs = [r for r in old.get("runs", []) if r["method"] in methods]
            print(f"resuming: {len(runs)} finished runs in {out}")
        else:
            print(f"{out} holds another configuration; starting over (it will be overwritten)")
    progress = not args.no_progress

    t_load = time.perf_counter()
    base, tok = _tasks.model_or_default(model, tokenizer, args.model)
    base.requires_grad_(False)
    load_s = time.perf_counter() - t_load
    train_pairs, held = _tasks.addition_split(n_test=cfg["n_val"] + cfg["n_test"], seed=0)
    data = {"train": _tasks.encode_addition(tok, train_pairs),
            "val": _tasks.encode_addition(tok, held[:cfg["n_val"]]),
            "test": _tasks.encode_addition(tok, held[cfg["n_val"]:])}
    probe_before = _tasks.knowledge_probe(base, tok)
    base_task = _tasks.addition_eval(base, data["test"])
    covs, calib_s = calibrations(base, tok, train_pairs, methods, _tasks.parse_targets(args.targets), progress)
    print(f"base model: held-out addition accuracy {base_task['accuracy']:.3f}, knowledge probe "
          f"logp {probe_before['logprob']:.3f} acc {probe_before['accuracy']:.3f}")

    payload: dict[str, Any] = {"config": cfg, "probe_before": probe_before, "base_task": base_task,
                               "calibration_s": calib_s, "load_s": load_s, "runs": runs}
    json_path = out

    def save() -> None:
        payload["summary"] = summarize(runs, methods, probe_before)
        payload["best_lr"] = {m: best_lr(runs, m) for m in methods}
        if json_path.resolve() == (RESULTS_DIR / f"{NAME}.json").resolve():
            write_results(NAME, payload)
        else:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2, default=float) + "\n")

    def have(m: str, lr: float, s: int) -> bool:
        return any(r["method"] == m and r["lr"] == lr and r["seed"] == s for r in runs)

    t_all = time.perf_counter()
    plan = [(m, lr, 0) for m in methods for lr in method_lrs.get(m, lrs)]
    for phase in ("sweep", "seeds"):
        if phase == "seeds":
            plan = [(m, best_lr(runs, m), s) for m in methods for s in seeds if s != 0]
        for m, lr, s in plan:
            if have(m, lr, s):
                continue
            row = one_run(base, tok, data, covs, method=m, lr=lr, seed=s, cfg=cfg, progress=progress)
            row["loadavg_1m"] = machine_info().get("loadavg_1m")  # other processes slow a run down: keep the load
            row["torch_threads"] = torch.get_num_threads()
            runs.append(row)
            save()
            print(f"{m:10s} lr={lr:<7g} seed={s}: test acc {row['test_accuracy']:.3f}, final loss "
                  f"{row['final_train_loss']:.3f}, probe logp {row['probe_after']['logprob']:.3f}, "
                  f"{row['train_s']:.0f} s", flush=True)
    payload["bench_s_this_invocation"] = time.perf_counter() - t_all
    save()
    return show(out, payload, report, plot)


def parse_method_lrs(p, items: list[str], methods: list[str]) -> dict[str, list[float]]:
    """``--method-lrs METHOD=LR,LR`` items as {method: [rates]}; a method not in ``--methods`` is an error."""
    out = {}
    for item in items:
        m, sep, rates = item.partition("=")
        if not sep or m.strip() not in methods:
            p.error(f"--method-lrs {item!r}: expected METHOD=LR,LR,... with METHOD one of --methods")
        out[m.strip()] = [float(x) for x in rates.split(",")]
    return out


def merge(p, paths: list[str], out: Path, methods: list[str]) -> dict:
    """``--merge``: one payload from the runs of ``methods`` (in that order) in several results files of the same
    configuration (a run found twice: the first file's), written to ``out``, reported and plotted."""
    loaded = [json.loads(Path(x).read_text()) for x in paths]
    keys = ("steps", "batch_size", "rank", "eval_every", "target_loss", "model", "target_modules", "n_val", "n_test")
    first = loaded[0]
    for x, d in zip(paths, loaded):
        if {k: d["config"].get(k) for k in keys} != {k: first["config"].get(k) for k in keys}:
            p.error(f"--merge: {x} holds another configuration than {paths[0]}")
    runs, seen = [], set()
    for d in loaded:
        for r in d["runs"]:
            if r["method"] in methods and (r["method"], r["lr"], r["seed"]) not in seen:
                seen.add((r["method"], r["lr"], r["seed"]))
                runs.append(r)
    cfg = dict(first["config"], methods=methods, lrs=sorted({r["lr"] for r in runs}),
               seeds=sorted({r["seed"] for r in runs}))
    payload = {"config": cfg, "probe_before": first["probe_before"], "base_task": first["base_task"],
               "merged_from": [str(x) for x in paths], "runs": runs,
               "summary": summarize(runs, methods, first["probe_before"]),
               "best_lr": {m: best_lr(runs, m) for m in methods}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2, default=float) + "\n")
    return show(out, payload, report, plot)


if __name__ == "__main__":
    main()
