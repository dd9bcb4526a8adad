"""Fine-tune SmolLM2-135M with the Hugging Face ``Trainer`` on an svdadapt-wrapped model, then save and export.

Shows that an svdadapt model is an ordinary PEFT model: ``Trainer`` with gradient checkpointing trains it
unchanged, ``svdadapt.save`` writes a resumable checkpoint, and ``svdadapt.export_lora`` writes a plain PEFT LoRA
for the *original* model, which ``PeftModel.from_pretrained`` loads without svdadapt — the script checks that
the reloaded model reproduces the fine-tuned outputs.

Task: 2-digit addition (``"47+58=105"``, loss on the answer digits only; see ``_tasks.py``), held-out exact match.

    python examples/finetune.py --method pissa                 # ~6 minutes on 2 CPU cores
    python examples/finetune.py --method corda --max-steps 20  # CorDA-IPA, calibrated on the training items
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tasks  # noqa: E402

# the best learning rates of the seed-0 sweep in benchmarks/bench_finetune.py (same task, rank, targets, batch)
DEFAULT_LR = {"lora": 3e-3, "pissa": 1e-3, "milora": 3e-3, "corda": 3e-4}


class AdditionDataset(torch.utils.data.Dataset):
    """Addition items as ``Trainer`` wants them: ``input_ids`` (9,), ``labels`` (9,) with -100 on the prompt."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[: _tasks.PROMPT_LEN] = -100  # loss on the answer only
        return {"input_ids": self.ids[i], "labels": labels}


def wrap_model(model, tok, method: str, rank: int, train_pairs, seed: int = 0, targets="all-linear"):
    """``method`` applied to ``model`` (modified in place); ``lora`` is PEFT's own default init, for comparison."""
    import svdadapt

    if method == "lora":
        return _tasks.default_lora(model, rank, targets, seed)
    if method == "corda":  # instruction-previewed: calibrate on the task's own training items
        batches = svdadapt.text_batches(tok, _tasks.task_texts(train_pairs[:512]), seq_len=64, batch_size=8)
        return svdadapt.wrap(model, "corda", rank, mode="ipa", calibration=batches, seed=seed, target_modules=targets)
    return svdadapt.wrap(model, method, rank, seed=seed, target_modules=targets)


def main(argv: list[str] | None = None, model=None, tokenizer=None) -> dict:
    """Run the example; ``model``/``tokenizer`` may be passed in (tests), else ``--model`` or the bundled SmolLM2.
    Returns the measured numbers."""
    from transformers import Trainer, TrainingArguments

    import svdadapt

    p = argparse.ArgumentParser(description="Fine-tune an svdadapt-wrapped SmolLM2 with the HF Trainer.")
    p.add_argument("--method", choices=["lora", "pissa", "milora", "corda"], default="pissa")
    p.add_argument("--max-steps", type=int, default=150)
    _tasks.add_finetune_args(p)
    p.add_argument("--output-dir", default=None, help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]

    model, tokenizer = _tasks.model_or_default(model, tokenizer, args.model)
    original = copy.deepcopy(model)  # wrap rewrites the base in place; keep W to check the exported LoRA on it
    train_pairs, test_pairs = _tasks.addition_split(n_test=args.n_test)
    train_ids, test_ids = _tasks.encode_addition(tokenizer, train_pairs), _tasks.encode_addition(tokenizer, test_pairs)

    t0 = time.perf_counter()
    peft_model = wrap_model(model, tokenizer, args.method, args.rank, train_pairs, args.seed,
                            _tasks.parse_targets(args.targets))
    init_s = time.perf_counter() - t0
    before = _tasks.addition_eval(peft_model, test_ids)

    out_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="svdadapt-finetune-"))
    targs = TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=min(10, args.max_steps // 10),
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=max(1, args.max_steps // 10), save_strategy="no",
        report_to="none", use_cpu=True, seed=args.seed, dataloader_num_workers=0,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        # non-reentrant checkpointing: the frozen embeddings give inputs without grad, which it handles
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = Trainer(model=peft_model, args=targs, train_dataset=AdditionDataset(train_ids))
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    peft_model.eval()
    after = _tasks.addition_eval(peft_model, test_ids)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    # save: resumable svdadapt checkpoint + a plain PEFT LoRA for the ORIGINAL model
    if args.method == "lora":
        peft_model.save_pretrained(out_dir / "lora")
    else:
        svdadapt.save(peft_model, out_dir / "svdadapt")
        svdadapt.export_lora(peft_model, out_dir / "lora")
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(original, out_dir / "lora").eval()
    with torch.no_grad():
        probe = test_ids[:32, :-1]
        diff = float((reloaded(input_ids=probe).logits - peft_model(input_ids=probe).logits).abs().max())
    reloaded_acc = _tasks.addition_eval(reloaded, test_ids)["accuracy"]

    res = {"method": args.method, "rank": args.rank, "lr": lr, "steps": args.max_steps, "init_s": init_s,
           "train_s": train_s, "acc_before": before["accuracy"], "acc_after": after["accuracy"],
           "loss_before": before["loss"], "loss_after": after["loss"], "logged_losses": losses,
           "reload_max_logit_diff": diff, "reload_acc": reloaded_acc, "output_dir": str(out_dir),
           "gradient_checkpointing": not args.no_gradient_checkpointing}
    print(f"\n| method | rank | lr | steps | held-out acc before | after | answer loss before | after | init (s) | train (s) |\n"
          f"|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {args.method} | {args.rank} | {lr:g} | {args.max_steps} | {before['accuracy']:.3f} | {after['accuracy']:.3f} "
          f"| {before['loss']:.3f} | {after['loss']:.3f} | {init_s:.1f} | {train_s:.0f} |")
    print(f"exported plain LoRA reloaded on the original model with PeftModel.from_pretrained: held-out acc "
          f"{reloaded_acc:.3f}, max |logit difference| {diff:.2e}\nsaved to {out_dir}")
    return res


if __name__ == "__main__":
    main()
