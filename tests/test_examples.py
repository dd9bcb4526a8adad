"""The examples and the fine-tuning benchmark, shortened to a handful of steps on the real SmolLM2, so they never rot.

Each runs its ``main()`` on the session's model (passed in, never reloaded) and checks numbers the example promises:
exact init (the knowledge probe at init equals the base model's), the exported plain LoRA reproducing the
fine-tuned model on the original weights, EoRA beating plain SVD of ΔW on held-out perplexity.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tasks():
    sys.path.insert(0, str(ROOT / "examples"))
    import _tasks

    return _tasks


# ------------------------------------------------------------------------------------------- fast: the task data
def test_addition_items_have_fixed_layout_and_disjoint_split(tasks):
    train, test = tasks.addition_split(n_test=256)
    assert len(train) + len(test) == 4860  # all 2-digit pairs with a 3-digit sum
    assert not set(train) & set(test)
    assert all(100 <= a + b <= 198 for a, b in train + test)
    assert tasks.addition_split(n_test=256) == (train, test)  # deterministic


def test_knowledge_calibration_text_is_disjoint_from_probe(tasks):
    import re

    words = list(tasks.PROBE_CAPITALS) + list(tasks.PROBE_CAPITALS.values())
    for text in tasks.KNOWLEDGE_TEXTS:
        for w in words:
            assert not re.search(rf"\b{re.escape(w)}\b", text), (w, text)
    assert len(tasks.probe_items()) == 2 * len(tasks.PROBE_CAPITALS) == 60


def test_smooth_and_steps_to(tasks):
    vals = [4.0, 2.0, 0.0, 0.0]
    assert tasks.smooth(vals, window=2) == [4.0, 3.0, 1.0, 0.0]
    assert tasks.steps_to(vals, 1.0, window=2) == 3
    assert tasks.steps_to(vals, -1.0, window=2) is None


# ------------------------------------------------------------------------------------------- slow: real model
@pytest.mark.slow
def test_addition_tokens_and_exact_match_equals_greedy(tasks, smollm2):
    model, tok = smollm2
    _, test = tasks.addition_split(n_test=16)
    ids = tasks.encode_addition(tok, test)
    assert ids.shape == (16, 9)
    assert tok.decode(ids[0]) == f"{test[0][0]}+{test[0][1]}={sum(test[0])}"
    # teacher-forced argmax of all answer digits == greedy completion of the prompt
    with torch.no_grad():
        gen = model.generate(ids[:, :6], max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    greedy = (gen[:, 6:9] == ids[:, 6:9]).all(-1).float().mean().item()
    assert tasks.addition_eval(model, ids)["accuracy"] == greedy


@pytest.mark.slow
def test_finetune_example_trainer_save_export(smollm2, tmp_path):
    model, tok = smollm2
    ex = _load(ROOT / "examples" / "finetune.py", "ex_finetune")
    # lr pinned: the example's default (1e-3, tuned for 150 steps with warm-up) takes 4 un-warmed steps into a
    # regime where the model amplifies the one fp32 rounding of the residual base to ~1e-3 in the logits
    res = ex.main(["--method", "pissa", "--max-steps", "4", "--batch-size", "4", "--n-test", "32", "--lr", "3e-4",
                   "--targets", "q_proj,v_proj", "--output-dir", str(tmp_path)], model=model, tokenizer=tok)
    assert res["gradient_checkpointing"] is True
    assert res["loss_after"] < res["loss_before"]  # 4 Trainer steps move the answer loss
    # the exported rank-2r LoRA on the ORIGINAL model reproduces the fine-tuned model
    # the fp32 rounding of the residual base amplified by a few training steps (see the lr comment above)
    assert res["reload_max_logit_diff"] < 1e-3
    assert res["reload_acc"] == res["acc_after"]
    assert (tmp_path / "svdadapt" / "svdadapt.json").is_file()
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 16  # 2 × rank


@pytest.mark.slow
def test_corda_knowledge_example(smollm2, tmp_path):
    model, tok = smollm2
    ex = _load(ROOT / "examples" / "corda_knowledge.py", "ex_corda_knowledge")
    res = ex.main(["--methods", "corda-kpa", "--steps", "3", "--batch-size", "4", "--n-test", "32",
                   "--targets", "q_proj,v_proj", "--plot", str(tmp_path / "kpa.png")],
                  model=model, tokenizer=tok)
    assert (tmp_path / "kpa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["methods"]["corda-kpa"]["losses"]) == 3
    r = res["methods"]["corda-kpa"]
    # CorDA-KPA is exact at init: the probe equals the base model's (the base was not modified either)
    assert r["probe_at_init"]["accuracy"] == res["probe_before"]["accuracy"]
    # log-probabilities of the same model: two fp32 forwards (~1e-6) summed over the probe's tokens
    assert abs(r["probe_at_init"]["logprob"] - res["probe_before"]["logprob"]) < 1e-4
    assert res["probe_before"]["accuracy"] >= 0.9  # the probe tests knowledge the model has (58 of 60)
    # three steps of addition at the example's rate: the held-out answer loss falls (measured 2.218 -> 2.162) and
    # the probed knowledge stays (log-prob moved 2e-4)
    assert r["task_after"]["loss"] < res["task_before"]["loss"], (r["task_after"], res["task_before"])
    assert abs(r["probe_after"]["logprob"] - res["probe_before"]["logprob"]) < 5e-3
    assert (r["task_after"]["accuracy"] * 32).is_integer()  # exact matches out of the 32 held-out items


@pytest.mark.slow
def test_eora_example_beats_plain_svd(smollm2, tmp_path):
    model, tok = smollm2
    ex = _load(ROOT / "examples" / "eora_compensate.py", "ex_eora")
    res = ex.main(["--compress", "q3", "--ranks", "16", "--calib-seqs", "8", "--eval-seqs", "4",
                   "--seq-len", "128", "--targets", "q_proj,k_proj,v_proj,o_proj", "--plot",
                   str(tmp_path / "eora.png")], model=model, tokenizer=tok)
    assert (tmp_path / "eora.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ppl = {r["config"]: r["ppl"] for r in res["rows"]}
    assert ppl["original"] < ppl["q3 compressed"]
    assert ppl["q3 + EoRA"] < ppl["q3 + SVD of ΔW"] < ppl["q3 compressed"]


@pytest.mark.slow
def test_bench_finetune_protocol_resume_and_plot(smollm2, tmp_path, tasks, monkeypatch):
    """The benchmark's protocol on 2 steps a run: the lr sweep on seed 0, then each method's best lr on seed 1;
    a rerun resumes (runs nothing new), and the PNG is written. (8 probe items, 16 held-out items: for speed.)"""
    model, tok = smollm2
    monkeypatch.setattr(tasks, "probe_items", lambda items=tasks.probe_items(): items[:8])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench = _load(ROOT / "benchmarks" / "bench_finetune.py", "bench_finetune_t")
    out = tmp_path / "ft.json"
    argv = ["--methods", "lora,pissa", "--lrs", "1e-3,3e-3", "--seeds", "0,1", "--steps", "2", "--batch-size", "2",
            "--eval-every", "1", "--n-val", "16", "--n-test", "16", "--targets", "q_proj,v_proj", "--out", str(out), "--no-progress"]
    payload = bench.main(argv, model=model, tokenizer=tok)
    runs = payload["runs"]
    assert sorted((r["method"], r["lr"], r["seed"]) for r in runs if r["seed"] == 0) == [
        ("lora", 1e-3, 0), ("lora", 3e-3, 0), ("pissa", 1e-3, 0), ("pissa", 3e-3, 0)]
    for m in ("lora", "pissa"):
        best = bench.best_lr(runs, m)
        sweep = [r for r in runs if r["method"] == m and r["seed"] == 0]
        assert max(r["val_accuracy"] for r in sweep) == next(r["val_accuracy"] for r in sweep if r["lr"] == best)
        assert [r["lr"] for r in runs if r["method"] == m and r["seed"] == 1] == [best]
    assert len(runs) == 6 and all(len(r["losses"]) == 2 and r["trainable"] == runs[0]["trainable"] for r in runs)
    # PiSSA is exact at init: the probe at init is the base model's
    pissa0 = next(r for r in runs if r["method"] == "pissa")
    # as above
    assert abs(pissa0["probe_at_init"]["logprob"] - payload["probe_before"]["logprob"]) < 1e-4
    saved = json.loads(out.read_text())
    assert [s["method"] for s in saved["summary"]] == ["lora", "pissa"] and all(s["seeds"] == 2 for s in saved["summary"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = bench.main(argv, model=model, tokenizer=tok)  # resumes: the same six runs, nothing retrained
    assert [(r["method"], r["lr"], r["seed"], r["losses"]) for r in again["runs"]] == \
        [(r["method"], r["lr"], r["seed"], r["losses"]) for r in runs]


@pytest.mark.slow
def test_bench_finetune_allocated_and_eva_methods_per_method_rates_and_merge(smollm2, tmp_path, tasks, monkeypatch):
    """The allocation methods of the benchmark on 2 steps a run: ``--method-lrs`` gives a method its own rates, run
    in the order given; pissa-alloc spends at most the uniform rank's parameters and starts at the base model (exact
    at init); PEFT's EVA runs on the task batches; ``--merge`` unites two results files in ``--methods``' order."""
    model, tok = smollm2
    monkeypatch.setattr(tasks, "probe_items", lambda items=tasks.probe_items(): items[:8])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench = _load(ROOT / "benchmarks" / "bench_finetune.py", "bench_finetune_a")
    common = ["--seeds", "0", "--steps", "2", "--batch-size", "2", "--eval-every", "1", "--n-val", "16", "--n-test",
              "16", "--targets", "q_proj,v_proj", "--no-progress"]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    a = bench.main(["--methods", "pissa,pissa-alloc", "--lrs", "1e-3", "--method-lrs", "pissa-alloc=3e-3,1e-3",
                    "--out", str(first), *common], model=model, tokenizer=tok)
    assert [(r["method"], r["lr"]) for r in a["runs"]] == [("pissa", 1e-3), ("pissa-alloc", 3e-3),
                                                           ("pissa-alloc", 1e-3)]
    uniform, alloc = a["runs"][0], a["runs"][1]
    targets = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    budget = 8 * sum(m.in_features + m.out_features for m in targets)
    assert uniform["trainable"] == budget and 0 < alloc["trainable"] <= budget  # never over the budget
    # exact at init, as above
    assert abs(alloc["probe_at_init"]["logprob"] - a["probe_before"]["logprob"]) < 1e-4
    b = bench.main(["--methods", "eva-peft", "--lrs", "1e-3", "--out", str(second), *common], model=model,
                   tokenizer=tok)
    assert [(r["method"], r["lr"]) for r in b["runs"]] == [("eva-peft", 1e-3)]
    # EVA starts with B = 0: each adapted layer adds exact zeros to the base layer's output, so bit for bit
    assert b["runs"][0]["probe_at_init"]["logprob"] == b["probe_before"]["logprob"]
    merged = bench.main(["--methods", "eva-peft,pissa-alloc", "--merge", str(first), str(second), "--out",
                         str(tmp_path / "m.json")])
    assert [s["method"] for s in merged["summary"]] == ["eva-peft", "pissa-alloc"]
    assert sorted((r["method"], r["lr"]) for r in merged["runs"]) == [("eva-peft", 1e-3), ("pissa-alloc", 1e-3),
                                                                      ("pissa-alloc", 3e-3)]
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
