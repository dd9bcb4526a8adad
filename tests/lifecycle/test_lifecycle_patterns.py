"""save / load / export_lora / unwrap and the init directory with rank_pattern / alpha_pattern: the patterns
travel in the LoRA config, an exported adapter doubles each layer's rank and alpha (rewriting methods), and plain
PEFT on the original model reproduces the trained wrapped model."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import svdadapt
from svdadapt.cli import main
from svdadapt.lifecycle.initdir import BASE_DIR, TRAINED_DIR, export_init_dir

from helpers import make_tiny_llama, out, rel, same_state, save_tiny_model, token_ids, train

RANK, ALPHA, SEED = 4, 8.0, 3
RANKS = {r"layers\.0\.self_attn\.q_proj": 2, "down_proj": 6, "v_proj": 8}
ALPHAS = {"k_proj": 3.0, r"layers\.1\.mlp\.up_proj": 20.0}
X = token_ids(2, 16, seed=100)
CALIB = [token_ids(4, 16, seed=200 + i) for i in range(3)]


def _base(method: str):
    model = make_tiny_llama(SEED)
    return svdadapt.compress.quantize(model, bits=3, group_size=16) if method == "eora" else model


def _wrap(method: str, **kw):
    extra = {"corda": dict(calibration=CALIB), "eora": dict(calibration=CALIB, reference=make_tiny_llama(SEED))}
    return svdadapt.wrap(_base(method), method, RANK, alpha=ALPHA, rank_pattern=RANKS, alpha_pattern=ALPHAS,
                         progress=False, **extra.get(method, {}), **kw)


@pytest.fixture(scope="module", params=[("pissa", False), ("corda", False), ("eora", False), ("pissa", True)],
                ids=["pissa", "corda", "eora", "pissa-rslora"])
def trained(request, tmp_path_factory):
    """(method, use_rslora, trained wrapped model, its logits, save dir)."""
    method, rslora = request.param
    pm = train(_wrap(method, use_rslora=rslora), X, steps=5)
    d = tmp_path_factory.mktemp(f"save-{method}")
    svdadapt.save(pm, d)
    return method, rslora, pm, out(pm, X), d


def test_plain_peft_on_the_original_model_reproduces_the_trained_model(trained):
    method, rslora, pm, want, d = trained
    base = _base(method)
    # a "moved by more than" check: training moves logits by O(1e-1), rounding by ~1e-6
    assert rel(want, out(base, X)) > 1e-2
    vanilla = PeftModel.from_pretrained(base, d)
    # as tests/lifecycle/test_export.py: the fp32 merge of s·B·A into W (γ_{r+2}·(|W| + s|B||A|)) seen in the
    # trained logits, ~1e-6 measured
    assert rel(out(vanilla, X), want) < 1e-4
    cfg = json.loads((d / "adapter_config.json").read_text())
    if method == "eora":  # EoRA's adapter is a plain LoRA for the compressed base, written as it is
        assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (RANK, ALPHA, RANKS, ALPHAS)
        return
    grow = math.sqrt(2.0) if rslora else 2
    assert (cfg["r"], cfg["lora_alpha"]) == (2 * RANK, ALPHA * grow)
    assert cfg["rank_pattern"] == {k: 2 * v for k, v in RANKS.items()}
    assert cfg["alpha_pattern"] == {k: v * grow for k, v in ALPHAS.items()}
    sd = load_file(d / "adapter_model.safetensors")
    mine = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    theirs = {n: m for n, m in vanilla.base_model.model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}
    for name, (A0, B0) in pm.svdadapt.init_factors.items():
        r = A0.shape[0]
        A = sd[f"base_model.model.{name}.lora_A.weight"]
        B = sd[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape == (2 * r, A0.shape[1]) and torch.equal(A[r:], A0) and torch.equal(B[:, r:], -B0), name
        # each layer's scaling is kept: PEFT computes it from the doubled rank and alpha (one rounding apart)
        assert theirs[name].scaling["default"] == pytest.approx(mine[name].scaling["default"], rel=1e-15), name


def test_load_is_bit_identical_and_keeps_the_patterns(trained):
    method, _, pm, want, d = trained
    re_ = svdadapt.load(_base(method), d, progress=False)
    assert same_state(pm.state_dict(), re_.state_dict())
    assert torch.equal(out(re_, X), want)
    assert re_.svdadapt.rank_pattern == RANKS and re_.svdadapt.alpha_pattern == ALPHAS
    assert re_.peft_config["default"].rank_pattern == RANKS


def test_export_lora_is_the_saved_adapter(trained, tmp_path):
    _, _, pm, _, d = trained
    svdadapt.export_lora(pm, tmp_path)
    assert same_state(load_file(d / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors"))
    assert json.loads((d / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "adapter_config.json").read_text())


def test_unwrap_gives_the_original_weights(trained):
    method, _, pm, want, _ = trained
    original = _base(method)
    u = svdadapt.unwrap(copy.deepcopy(pm))
    so, su = original.state_dict(), u.state_dict()
    eps = torch.finfo(torch.float32).eps
    for k in so:  # as tests/lifecycle/test_export.py: within fp32 rounding of the weight (a few ulps of its max)
        assert (su[k] - so[k]).abs().max() <= 4 * eps * so[k].abs().max(), k
    # one fp32 rounding of the merged weight per layer, through 2 blocks (√n·u per layer, ~10x margin)
    assert rel(out(svdadapt.unwrap(copy.deepcopy(pm), merge=True), X), want) < 1e-5


# ---------------------------------------------------------------------------------------------- the init directory


VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", SEED, VOCAB, tokenizer=False)


def _pattern_flags() -> list[str]:
    return ["--alpha", str(ALPHA), "--rank-pattern", *[f"{k}={v}" for k, v in RANKS.items()],
            "--alpha-pattern", *[f"{k}={v}" for k, v in ALPHAS.items()]]


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_cli_init_train_with_plain_peft_export(model_dir, tmp_path, in_memory, capsys):
    init = tmp_path / "run"
    assert main(["init", str(model_dir), "--method", "pissa", "--rank", str(RANK), *_pattern_flags(),
                 *(["--in-memory"] if in_memory else []), "--no-progress", "--out", str(init)]) == 0
    assert "rank pattern" in capsys.readouterr().out
    wrapped = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(model_dir), "pissa", RANK, alpha=ALPHA,
                            rank_pattern=RANKS, alpha_pattern=ALPHAS, progress=False)
    # DIR/base + DIR/adapter is the wrapped model, layer by layer at its own rank
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(init / BASE_DIR), init / TRAINED_DIR,
                                   is_trainable=True)
    assert torch.equal(out(pm, X), out(wrapped, X))
    assert pm.peft_config["default"].rank_pattern == RANKS and pm.peft_config["default"].alpha_pattern == ALPHAS
    train(pm, X, steps=3)
    want = out(pm, X)
    pm.save_pretrained(tmp_path / "trained")
    done = export_init_dir(init, tmp_path / "lora", tmp_path / "trained")
    assert done.changed == done.layers == 14
    vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "lora")
    assert rel(out(vanilla, X), want) < 1e-4  # as above: the fp32 merge, ~1e-6 measured
    # svdadapt.load of the export resumes rank-r training: the trained factors, bit for bit
    re_ = svdadapt.load(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "lora", progress=False)
    assert torch.equal(out(re_, X), want)


def test_export_refuses_an_adapter_trained_with_other_patterns(model_dir, tmp_path):
    init = tmp_path / "run"
    assert main(["init", str(model_dir), "--method", "pissa", "--rank", str(RANK), *_pattern_flags(),
                 "--no-progress", "--out", str(init)]) == 0
    other = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(model_dir), "pissa", RANK, alpha=ALPHA,
                          rank_pattern={"down_proj": 6}, alpha_pattern=ALPHAS, progress=False)
    from peft import PeftModel as P
    P.save_pretrained(other, tmp_path / "other")  # PEFT's own rank-r save, as a trainer writes it
    with pytest.raises(ValueError, match=re.escape(
            f"trained adapter {str(tmp_path / 'other')!r} has rank_pattern={{'down_proj': 6}}, the init directory "
            f"has {RANKS!r}: it was not trained from this init")):
        export_init_dir(init, tmp_path / "lora", tmp_path / "other")


@pytest.mark.parametrize("flags, message", [
    (["--rank-pattern", "q_proj=0"], "argument --rank-pattern: q_proj: must be a positive integer, got '0'"),
    (["--rank-pattern", "q_proj=2.5"], "argument --rank-pattern: q_proj: must be a positive integer, got '2.5'"),
    (["--rank-pattern", "q_proj"], "argument --rank-pattern: must be KEY=VALUE (a module name or regular "
                                   "expression, '=', the value), got 'q_proj'"),
    (["--alpha-pattern", "q_proj=x"], "argument --alpha-pattern: q_proj: must be a positive number, got 'x'"),
    (["--rank-pattern", "q_proj=2", "q_proj=3"], "--rank-pattern names key 'q_proj' twice"),
])
def test_cli_pattern_usage_errors(model_dir, tmp_path, capsys, flags, message):
    assert main(["init", str(model_dir), "--method", "pissa", "--rank", "4", *flags, "--out",
                 str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"svdadapt: error: {message} (see `svdadapt init --help`)\n" \
        if "twice" not in message else f"svdadapt: error: {message}\n"


def test_cli_pattern_that_matches_nothing(model_dir, tmp_path, capsys):
    assert main(["init", str(model_dir), "--method", "pissa", "--rank", "4", "--rank-pattern", "qproj=2",
                 "--no-progress", "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip().endswith(
        "rank_pattern keys ['qproj'] match no targeted module (a key matches a module whose full name ends in it, "
        "at a '.' boundary, as a regular expression)")
