"""``svdadapt init --target-parameters`` on a tiny Mixtral directory: the init directory (base/ + adapter/) loads
with PEFT exact at init, ``svdadapt export`` of a trained adapter loads with PEFT on the original model, and
``svdadapt.load`` resumes from the export bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import svdadapt
from helpers import out, rel, same_state, tiny_tokenizer, token_ids, train
from moe_models import moe
from svdadapt.cli import main

X = token_ids(2, 12, seed=7, vocab=64)
RANK = 2


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    moe("mixtral", vocab=300).save_pretrained(d)
    tiny_tokenizer(300).save_pretrained(d)  # a byte-level BPE needs 256 + tokens
    return d


def _original(d):
    return AutoModelForCausalLM.from_pretrained(d).eval()


@pytest.fixture(scope="module")
def init(moe_dir, tmp_path_factory):
    o = tmp_path_factory.mktemp("init") / "init"
    assert main(["init", str(moe_dir), "--method", "pissa", "--rank", str(RANK), "--target-parameters",
                 "experts.gate_up_proj", "experts.down_proj", "--out", str(o), "--no-progress"]) == 0
    return o


def test_init_dir_loads_with_peft_exact_at_init(moe_dir, init, capsys):
    pm = PeftModel.from_pretrained(_original(init / "base"), init / "adapter")
    # two fp32 forwards of the same effective weights (as test_cli's init check)
    assert rel(out(pm, X), out(_original(moe_dir), X)) < 1e-5
    meta = json.loads((init / "svdadapt.json").read_text())
    assert sorted(v["key"] for v in meta["parameters"].values()) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    capsys.readouterr()
    assert main(["report", str(init)]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert rows["gate_up_proj"] == rows["down_proj"] == "8"  # 2 layers x 4 experts, one kind each


def test_train_then_export_loads_on_the_original_model(moe_dir, init, tmp_path):
    pm = train(PeftModel.from_pretrained(_original(init / "base"), init / "adapter", is_trainable=True), X)
    want = out(pm, X)
    assert rel(want, out(_original(moe_dir), X)) > 1e-2  # a "moved by more than" check: training moved it
    pm.save_pretrained(tmp_path / "trained")
    assert main(["export", str(init), "--adapter", str(tmp_path / "trained"), "--out", str(tmp_path / "lora")]) == 0
    vanilla = PeftModel.from_pretrained(_original(moe_dir), tmp_path / "lora")
    # W + s·(B·A − B₀·A₀) against W_res + s·B·A in fp32 (as test_cli's export check)
    assert rel(out(vanilla, X), want) < 1e-4
    re = svdadapt.load(_original(moe_dir), tmp_path / "lora", progress=False)
    assert torch.equal(out(re, X), want) or rel(out(re, X), want) < 1e-6  # bit-exact factors, same base rounding
    assert same_state({k: v for k, v in re.state_dict().items() if "lora_" in k},
                      {k: v for k, v in pm.state_dict().items() if "lora_" in k})


def test_corda_from_text_collects_each_experts_routed_tokens(moe_dir, tmp_path):
    """--calib with --target-parameters: each expert's covariance from the tokens routed to it; the init directory
    loads with PEFT exact at init (CorDA rewrote the experts' bases)."""
    text = tmp_path / "calib.txt"
    text.write_text("a b c d e f g h " * 100)
    o = tmp_path / "o"
    with pytest.warns(UserWarning):  # the coverage warning: gate_up_proj left out
        code = main(["init", str(moe_dir), "--method", "corda", "--rank", str(RANK), "--target-parameters",
                     "experts.down_proj", "--calib", str(text), "--seq-len", "16", "--out", str(o), "--no-progress"])
    assert code == 0
    pm = PeftModel.from_pretrained(_original(o / "base"), o / "adapter")
    assert rel(out(pm, X), out(_original(moe_dir), X)) < 1e-5  # as test_init_dir_loads_with_peft_exact_at_init
    assert not torch.equal(_original(o / "base").model.layers[0].mlp.experts.down_proj,
                           _original(moe_dir).model.layers[0].mlp.experts.down_proj)
