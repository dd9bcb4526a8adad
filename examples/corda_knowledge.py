"""CorDA-KPA: keep world knowledge while fine-tuning. Calibrate on knowledge text, fine-tune on a task, probe.

CorDA's knowledge-preserved adaptation decomposes W·C, with C the input covariance of text whose knowledge should
survive, and puts the *bottom* r directions in the adapter: the directions that this text uses most stay frozen in
the residual. Here the knowledge is capital cities and general facts (``_tasks.KNOWLEDGE_TEXTS``), the task is
2-digit addition, and the probe is 60 capital-city cloze items *disjoint* from the calibration text. Plain LoRA
(PEFT's default init) runs the same recipe for comparison.

    python examples/corda_knowledge.py                       # KPA and LoRA, 100 steps each, ~8 minutes here
    python examples/corda_knowledge.py --methods corda-kpa --steps 20
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tasks  # noqa: E402

# the best learning rates of the seed-0 sweep in benchmarks/bench_finetune.py (same task, rank, targets, batch)
DEFAULT_LR = {"corda-kpa": 3e-4, "lora": 3e-3}


def main(argv: list[str] | None = None, model=None, tokenizer=None) -> dict:
    """Run the example; ``model``/``tokenizer`` may be passed in (tests; not modified), else ``--model`` or the
    bundled SmolLM2. Returns ``{method: numbers}``."""
    import svdadapt

    p = argparse.ArgumentParser(description="CorDA-KPA vs LoRA: task accuracy and knowledge kept.")
    p.add_argument("--methods", default="corda-kpa,lora")
    p.add_argument("--steps", type=int, default=100)
    _tasks.add_finetune_args(p)
    p.add_argument("--plot", default=None, help="write a PNG of the training-loss curves and the probe here")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in DEFAULT_LR:
            p.error(f"unknown method {m!r}; choose from {', '.join(DEFAULT_LR)}")

    model, tokenizer = _tasks.model_or_default(model, tokenizer, args.model)
    model.requires_grad_(False)
    targets = _tasks.parse_targets(args.targets)
    train_pairs, test_pairs = _tasks.addition_split(n_test=args.n_test)
    train_ids, test_ids = _tasks.encode_addition(tokenizer, train_pairs), _tasks.encode_addition(tokenizer, test_pairs)

    probe_before = _tasks.knowledge_probe(model, tokenizer)
    task_before = _tasks.addition_eval(model, test_ids)
    covs = None
    if "corda-kpa" in methods:
        t0 = time.perf_counter()
        batches = svdadapt.text_batches(tokenizer, _tasks.KNOWLEDGE_TEXTS, seq_len=64, batch_size=8)
        covs = svdadapt.collect_covariances(model, batches, target_modules=targets)
        print(f"knowledge calibration: {covs.tokens} tokens in {time.perf_counter() - t0:.1f} s")

    results = {}
    for m in methods:
        work = copy.deepcopy(model)
        t0 = time.perf_counter()
        if m == "lora":
            peft_model = _tasks.default_lora(work, args.rank, targets, args.seed)
        else:
            peft_model = svdadapt.wrap(work, "corda", args.rank, mode="kpa", calibration=covs, seed=args.seed,
                                       target_modules=targets)
        init_s = time.perf_counter() - t0
        at_init = _tasks.knowledge_probe(peft_model, tokenizer)  # exact init: equals the base model's probe
        lr = args.lr if args.lr is not None else DEFAULT_LR[m]
        out = _tasks.train_addition(peft_model, train_ids, steps=args.steps, lr=lr, batch_size=args.batch_size,
                                    seed=1000 + args.seed, desc=m)
        task = _tasks.addition_eval(peft_model, test_ids)
        probe = _tasks.knowledge_probe(peft_model, tokenizer)
        last = out["losses"][-10:]
        results[m] = {"lr": lr, "init_s": init_s, "train_s": out["train_s"], "probe_at_init": at_init,
                      "probe_after": probe, "task_after": task, "losses": out["losses"],
                      "final_train_loss": sum(last) / len(last)}
        del peft_model, work

    print(f"\nbase model: held-out addition acc {task_before['accuracy']:.3f}; knowledge probe (60 items) "
          f"logp {probe_before['logprob']:.3f}, acc {probe_before['accuracy']:.3f}\n")
    print("| method | lr | addition acc after | probe logp before | after | probe acc before | after | train (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        print(f"| {m} | {r['lr']:g} | {r['task_after']['accuracy']:.3f} | {probe_before['logprob']:.3f} | "
              f"{r['probe_after']['logprob']:.3f} | {probe_before['accuracy']:.3f} | {r['probe_after']['accuracy']:.3f} "
              f"| {r['train_s']:.0f} |")
    if args.plot:
        plot(results, probe_before, args.plot)
        print(f"wrote {args.plot}")
    return {"probe_before": probe_before, "task_before": task_before, "methods": results}


def plot(results: dict, probe_before: dict, path: str) -> None:
    """Training loss (10-step moving average) per method, and the knowledge probe before / after, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_p) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for m, r in results.items():
        ax_l.plot(range(1, len(r["losses"]) + 1), _tasks.smooth(r["losses"]), label=f"{m} (lr {r['lr']:g})")
    ax_l.set(yscale="log", xlabel="step", ylabel="training loss (answer tokens, 10-step avg)",
             title="fine-tuning on 2-digit addition")
    ax_l.legend()
    names = ["base", *results]
    ax_p.bar(names, [probe_before["logprob"], *[r["probe_after"]["logprob"] for r in results.values()]],
             color=["grey", *[f"C{i}" for i in range(len(results))]])
    ax_p.set(ylabel="mean answer log-prob, 60 capital cloze items", title="knowledge probe after fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
