"""The ``svdadapt`` command line: in-process ``main([...])`` on a tiny Llama with a
tiny trained tokenizer, every documented error path, and one slow round trip on the real SmolLM2 GGUF."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from pydoc_data.topics import topics
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import svdadapt
from svdadapt.cli import main
from svdadapt.quant.compress import quantize
from svdadapt.loading import load_model, load_tokenizer

from cli_model import RANK, VOCAB
from helpers import out as outputs, rel, same_state, token_ids, train

CALIB_ARGS = ["--seq-len", "32", "--batch-size", "4", "--max-tokens", "512"]  # 4 batches of 4x32

X = token_ids(2, 16, seed=7, vocab=VOCAB)


def _logits(model) -> torch.Tensor:
    return outputs(model, X)


def _train(pm, steps: int = 5):
    return train(pm, X, steps=steps)


def _from_init(init: Path):
    """What a trainer without svdadapt does: plain transformers + PEFT."""
    base = AutoModelForCausalLM.from_pretrained(init / "base")
    return PeftModel.from_pretrained(base, init / "adapter", is_trainable=True)


# ------------------------------------------------------------------------------------------------------ init/export


def test_init_dir_is_the_wrapped_model(tiny_dir, pissa_init):
    init = pissa_init
    assert {p.name for p in init.iterdir()} == {"base", "adapter", "report.json", "svdadapt.json",
                                                "svdadapt_state.safetensors"}
    pm = _from_init(init)
    ref = svdadapt.wrap(load_model(tiny_dir), "pissa", rank=RANK, progress=False)
    assert same_state(pm.state_dict(), ref.state_dict())  # bit for bit the model svdadapt.wrap returns
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {n for n, p in ref.named_parameters() if p.requires_grad}
    # two fp32 forwards of the same effective weights
    assert rel(_logits(pm), _logits(load_model(tiny_dir))) < 1e-5
    assert (init / "base" / "tokenizer.json").is_file() and (init / "base" / "model.safetensors").is_file()
    rep = json.loads((init / "report.json").read_text())
    assert rep["method"] == "pissa" and rep["rank"] == RANK and len(rep["layers"]) == 14
    assert {n: r["energy"] for n, r in rep["layers"].items()} == {n: r["energy"] for n, r in ref.svdadapt["report"].items()}


def test_train_then_export_loads_on_the_original_model(tiny_dir, pissa_init, tmp_path, capsys):
    pm = _train(_from_init(pissa_init))
    want = _logits(pm)
    # a "moved by more than" check: training moves logits by O(1e-1)
    assert rel(want, _logits(load_model(tiny_dir))) > 1e-2
    pm.save_pretrained(tmp_path / "trained")  # plain PEFT save: the model came from plain from_pretrained
    capsys.readouterr()
    assert main(["export", str(pissa_init), "--adapter", str(tmp_path / "trained"), "--out", str(tmp_path / "lora")]) == 0
    printed = capsys.readouterr().out
    assert "  layers changed by training  14 / 14\n" in printed
    assert f"  exported rank               {2 * RANK} (= [A; A0], [B, -B0])\n" in printed
    vanilla = PeftModel.from_pretrained(load_model(tiny_dir), tmp_path / "lora")
    # fp32 merge of s·B·A into W, seen through the trained model (as in test_export)
    assert rel(_logits(vanilla), want) < 1e-4
    # the export is also a svdadapt.save directory: load resumes the trained rank-r model bit-exactly
    re = svdadapt.load(load_model(tiny_dir), tmp_path / "lora", progress=False)
    assert same_state(re.state_dict(), pm.state_dict())
    capsys.readouterr()
    assert main(["report", str(tmp_path / "lora")]) == 0  # a save directory carries the report too
    assert capsys.readouterr().out.splitlines()[0] == f"pissa, rank {RANK}, alpha {RANK}, 14 layers"


def test_export_of_an_adapter_trained_in_place(tiny_dir, tiny_dir_copy_init, tmp_path):
    init = tiny_dir_copy_init
    pm = _train(_from_init(init), steps=2)
    pm.save_pretrained(init / "adapter")  # the user trains DIR/adapter in place
    assert main(["export", str(init), "--out", str(tmp_path / "lora")]) == 0
    # fp32 merge, as above
    assert rel(_logits(PeftModel.from_pretrained(load_model(tiny_dir), tmp_path / "lora")), _logits(pm)) < 1e-4


@pytest.fixture
def tiny_dir_copy_init(tiny_dir, tmp_path) -> Path:
    out = tmp_path / "init-inplace"
    assert main(["init", str(tiny_dir), "--method", "milora", "--rank", "2", "--alpha", "4", "--out", str(out),
                 "--no-progress", "--target-modules", "q_proj", "down_proj"]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (2, 4, ["down_proj", "q_proj"])
    return out


def test_corda_from_text_equals_corda_from_calibrate(tiny_dir, calib_files, tmp_path, capsys):
    covs = tmp_path / "covs.safetensors"
    assert main(["calibrate", str(tiny_dir), "--calib", *calib_files, *CALIB_ARGS, "--out", str(covs), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    covariances = svdadapt.Covariances.load(covs)
    assert len(covariances) == 14 and len(covariances.groups) == 8  # q/k/v and gate/up share an input
    rows = printed.splitlines()[2:10]
    assert [r.split()[0] for r in rows] == [g[0] for g in covariances.groups]
    assert all(r.split()[-2] == "512" for r in rows)  # 4 batches of 4x32 tokens (--max-tokens 512), no padding
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--method", "corda", "--mode", "kpa", "--rank", str(RANK), "--no-progress", "--target-modules", "q_proj",
              "down_proj"]
    assert main(["init", str(tiny_dir), *common, "--calib", *calib_files, *CALIB_ARGS, "--out", str(a)]) == 0
    assert main(["init", str(tiny_dir), *common, "--calib", str(covs), "--out", str(b)]) == 0
    for f in ("adapter/adapter_model.safetensors", "base/model.safetensors"):
        assert same_state(load_file(a / f), load_file(b / f)), f
    # and both equal the library on the same batches
    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    texts = [Path(f).read_text() for f in calib_files]
    batches = svdadapt.text_batches(tok, texts, seq_len=32, batch_size=4, max_batches=4)
    ref = svdadapt.wrap(model, "corda", mode="kpa", rank=RANK, calibration=batches, progress=False,
                        target_modules=["q_proj", "down_proj"])
    assert same_state(_from_init(a).state_dict(), ref.state_dict())


def test_eora_init_keeps_the_compressed_base(tiny_dir, calib_files, tmp_path, capsys):
    cdir = tmp_path / "compressed"
    compressed = quantize(load_model(tiny_dir), bits=3, group_size=16)
    compressed.save_pretrained(cdir)
    load_tokenizer(tiny_dir).save_pretrained(cdir)
    out = tmp_path / "init"
    assert main(["init", str(cdir), "--method", "eora", "--rank", str(RANK), "--reference", str(tiny_dir),
                 "--calib", *calib_files, *CALIB_ARGS, "--out", str(out), "--no-progress", "--target-modules", "v_proj",
                 "up_proj"]) == 0
    assert "comp. error" in capsys.readouterr().out
    assert same_state(load_file(out / "base" / "model.safetensors"), load_file(cdir / "model.safetensors"))
    pm = _from_init(out)
    batches = svdadapt.text_batches(load_tokenizer(cdir), [Path(f).read_text() for f in calib_files], 32, 4, max_batches=4)
    ref = svdadapt.wrap(load_model(cdir), "eora", rank=RANK, reference=load_model(tiny_dir), calibration=batches,
                        progress=False, target_modules=["v_proj", "up_proj"])
    assert same_state(pm.state_dict(), ref.state_dict())
    err = {n: r["residual_error"] for n, r in json.loads((out / "report.json").read_text())["layers"].items()}
    assert err == {n: r["residual_error"] for n, r in ref.svdadapt["report"].items()}  # the library's numbers
    assert len(err) == 4 and all(0 < e < 1 for e in err.values())  # rank 4 compensates part of a 3-bit error
    assert main(["export", str(out), "--out", str(tmp_path / "lora")]) == 0
    assert "the adapter equals its initialization" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (RANK, RANK)
    assert torch.equal(_logits(PeftModel.from_pretrained(load_model(cdir), tmp_path / "lora")), _logits(pm))


def test_report(pissa_init, capsys):
    rep = json.loads((pissa_init / "report.json").read_text())["layers"]
    assert main(["report", str(pissa_init)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"pissa, rank {RANK}, alpha {RANK}, 14 layers"
    q = [line.split() for line in out if line.startswith("q_proj")]
    es = [r["energy"] for n, r in rep.items() if n.endswith("q_proj")]
    assert q == [["q_proj", "2", f"{min(es):.4f}", f"{sum(es) / 2:.4f}", f"{max(es):.4f}",
                  min(((e, n) for n, r in rep.items() if n.endswith("q_proj") for e in [r["energy"]]))[1]]]
    assert main(["report", str(pissa_init), "--layers"]) == 0
    rows = capsys.readouterr().out.splitlines()[3:]
    assert [r.split()[0] for r in rows] == list(rep)
    assert [r.split()[3] for r in rows] == [f"{x['energy']:.4f}" for x in rep.values()]


# ------------------------------------------------------------------------------------------------------ error paths

# (argv with placeholders, exit status, the last stderr line; a trailing "…" marks a prefix of a message that
# comes from the library, whose wording its own tests pin down)
ERRORS = [
    (["init", "{missing}", "--method", "pissa", "--rank", "2", "--out", "{new}"], 2,
     "svdadapt: error: no such model directory or .gguf file: '{missing}'"),
    (["init", "{missing}.gguf", "--method", "pissa", "--rank", "2", "--out", "{new}"], 2,
     "svdadapt: error: no such model directory or .gguf file: '{missing}.gguf'"),
    (["init", "{tiny}", "--method", "lora", "--rank", "2", "--out", "{new}"], 2,
     "svdadapt: error: argument --method: invalid choice: 'lora' (choose from 'pissa', 'milora', 'corda', 'eora', 'eva') "
     "(see `svdadapt init --help`)"),
    (["init", "{tiny}", "--method", "pissa", "--rank", "0", "--out", "{new}"], 2,
     "svdadapt: error: argument --rank: must be a positive integer, got '0' (see `svdadapt init --help`)"),
    (["init", "{tiny}", "--method", "pissa", "--rank", "2"], 2,
     "svdadapt: error: the following arguments are required: --out (see `svdadapt init --help`)"),
    (["init", "{tiny}", "--method", "corda", "--rank", "2", "--out", "{new}"], 2,
     "svdadapt: error: --method corda needs calibration data: --calib FILE ... (text files, or a covariances "
     ".safetensors from `svdadapt calibrate`)"),
    (["init", "{tiny}", "--method", "eora", "--rank", "2", "--calib", "{calib}", "--out", "{new}"], 2,
     "svdadapt: error: --method eora needs --reference MODEL: the uncompressed model (MODEL is the compressed one)"),
    (["init", "{tiny}", "--method", "eora", "--rank", "2", "--reference", "{tiny}", "--out", "{new}"], 2,
     "svdadapt: error: --method eora needs calibration data: --calib FILE ... (text files, or a covariances "
     ".safetensors from `svdadapt calibrate`)"),
    (["init", "{tiny}", "--method", "eora", "--rank", "2", "--reference", "{missing}", "--calib", "{calib}",
      "--out", "{new}"], 2, "svdadapt: error: no such reference model directory or .gguf file: '{missing}'"),
    (["init", "{tiny}", "--method", "corda", "--rank", "2", "--calib", "{missing}", "--out", "{new}"], 2,
     "svdadapt: error: no such calibration file: '{missing}'"),
    (["init", "{tiny}", "--method", "pissa", "--mode", "kpa", "--rank", "2", "--out", "{new}"], 2,
     "svdadapt: error: --mode applies to --method corda only, not pissa"),
    (["init", "{tiny}", "--method", "pissa", "--rank", "2", "--calib", "{calib}", "--out", "{new}"], 2,
     "svdadapt: error: --method pissa takes no calibration data; drop --calib"),
    (["init", "{tiny}", "--method", "milora", "--rank", "2", "--reference", "{tiny}", "--out", "{new}"], 2,
     "svdadapt: error: --reference applies to --method eora only, not milora"),
    (["init", "{tiny}", "--method", "pissa", "--rank", "2", "--out", "{init}"], 2,
     "svdadapt: error: output '{init}' exists and is not an empty directory"),
    (["init", "{tiny}", "--method", "pissa", "--rank", "65", "--out", "{new}", "--no-progress"], 1,
     "svdadapt: error: rank=65 exceeds min(out, in) = 32 of module 'model.layers.0.self_attn.k_proj' with weight (32, 64)"),
    (["init", "{tiny}", "--method", "pissa", "--rank", "2", "--target-modules", "nope", "--out", "{new}",
      "--no-progress"], 1, "svdadapt: error: target_modules=['nope'] matched no adaptable layer (nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/nn.Conv2d, bitsandbytes Linear4bit/Linear8bitLt, HQQ HQQLinear, torchao quantized Linear, optimum-quanto QLinear, compressed-tensors compressed Linear) in LlamaForCausalLM; …"),
    (["calibrate", "{tiny}", "--calib", "{calib}", "--out", "{new}.pt"], 2,
     "svdadapt: error: --out must be a .safetensors file, got '{new}.pt'"),
    (["calibrate", "{tiny}", "--out", "{new}.safetensors"], 2,
     "svdadapt: error: the following arguments are required: --calib (see `svdadapt calibrate --help`)"),
    (["export", "{missing}", "--out", "{new}"], 2, "svdadapt: error: no such init directory: '{missing}'"),
    (["export", "{init}", "--adapter", "{missing}", "--out", "{new}"], 2,
     "svdadapt: error: no such adapter directory: '{missing}'"),
    (["export", "{init}", "--adapter", "{tiny}", "--out", "{new}"], 2,
     "svdadapt: error: '{tiny}' is not a PEFT adapter directory (needs adapter_config.json and adapter_model.safetensors)"),
    (["export", "{init}", "--out", "{init}/adapter"], 2,
     "svdadapt: error: --out '{init}/adapter' would overwrite the input; choose a new directory"),
    (["export", "{init}", "--adapter", "{other}/adapter", "--out", "{new}"], 1,
     "svdadapt: error: trained adapter '{other}/adapter' has r=2, the init directory has 4: it was not trained from "
     "this init"),
    (["export", "{other}", "--adapter", "{init}/adapter", "--out", "{new}"], 1,
     "svdadapt: error: trained adapter '{init}/adapter' has r=4, the init directory has 2: it was not trained from "
     "this init"),
    (["report", "{tiny}"], 2,
     "svdadapt: error: '{tiny}' has no svdadapt.json (not an init or save directory)"),
    ([], 2, "svdadapt: error: the following arguments are required: COMMAND (see `svdadapt --help`)"),
]


@pytest.fixture(scope="module")
def other_init(tiny_dir_module_other) -> Path:
    return tiny_dir_module_other


@pytest.fixture(scope="module")
def tiny_dir_module_other(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("other") / "init"
    assert main(["init", str(tiny_dir), "--method", "pissa", "--rank", "2", "--out", str(out), "--no-progress",
                 "--target-modules", "q_proj"]) == 0
    return out


@pytest.mark.parametrize("argv, code, message", ERRORS, ids=[" ".join(a[:1] + a[2:4]) or "none" for a, _, _ in ERRORS])
def test_error_paths(argv, code, message, tiny_dir, calib_files, pissa_init, other_init, tmp_path, capsys):
    subs = {"{missing}": str(tmp_path / "missing"), "{new}": str(tmp_path / "new"), "{tiny}": str(tiny_dir),
            "{calib}": calib_files[0], "{init}": str(pissa_init), "{other}": str(other_init)}

    def fill(s: str) -> str:
        for k, v in subs.items():
            s = s.replace(k, v)
        return s

    capsys.readouterr()
    assert main([fill(a) for a in argv]) == code
    err = capsys.readouterr().err.strip().splitlines()
    if message.endswith("…"):
        assert err[-1].startswith(fill(message[:-1])), err[-1]
    else:
        assert err[-1] == fill(message)
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "new").exists()


def test_console_entry_point_exit_status(tmp_path):
    r = subprocess.run([sys.executable, "-m", "svdadapt.cli", "init", str(tmp_path / "nope"), "--method", "pissa",
                        "--rank", "2", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"svdadapt: error: no such model directory or .gguf file: '{tmp_path / 'nope'}'\n"
    assert r.stdout == ""


# ------------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_gguf_round_trip(_smollm2_session, tmp_path):
    """init on the real SmolLM2 GGUF; plain transformers + PEFT load base/ + adapter/ and reproduce the original
    logits; train a few steps; export; plain PEFT on the original model reproduces the trained logits."""
    from svdadapt.loading import smollm2_path

    original, tok = _smollm2_session
    x = tok(topics["assignment"][:400], return_tensors="pt")["input_ids"][:, :48]
    with torch.no_grad():
        orig_logits = original(x).logits
    init = tmp_path / "init"
    # q/v only (60 of the 210 Linears) keeps this under ~2 minutes on 2 cores; the paths are the same as all-linear
    assert main(["init", str(smollm2_path()), "--method", "pissa", "--rank", "8", "--target-modules", "q_proj", "v_proj",
                 "--out", str(init), "--no-progress"]) == 0
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(init / "base"), init / "adapter",
                                   is_trainable=True)
    with torch.no_grad():
        # exact at init: two fp32 forwards (√n·u per layer) plus one rounding of the residual base
        assert rel(pm(x).logits, orig_logits) < 1e-4
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        pm(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    with torch.no_grad():
        trained = pm(x).logits
    # a "moved by more than" check
    assert rel(trained, orig_logits) > 1e-2
    pm.save_pretrained(tmp_path / "trained")
    assert main(["export", str(init), "--adapter", str(tmp_path / "trained"), "--out", str(tmp_path / "lora")]) == 0
    vanilla = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora")
    with torch.no_grad():
        # fp32 merge, as above
        assert rel(vanilla(x).logits, trained) < 1e-4
