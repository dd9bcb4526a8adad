"""``svdadapt export DIR --out LORA --rank K | --energy F --round-to ... --covariances FILE --weighted``: the compact
export from an init directory after training, and its usage errors (exit 2, decided before anything is loaded)."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from svdadapt.cli import main
from svdadapt.loading import load_model

from cli_model import RANK, VOCAB
from helpers import out, rel, token_ids, train

X = token_ids(2, 16, seed=7, vocab=VOCAB)
CALIB_ARGS = ["--seq-len", "32", "--batch-size", "4", "--max-tokens", "512"]


@pytest.fixture(scope="module")
def trained(pissa_init, tmp_path_factory):
    """(the trained adapter directory, the trained model's logits): plain PEFT training of DIR/base + DIR/adapter."""
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pissa_init / "base"), pissa_init / "adapter",
                                   is_trainable=True)
    pm = train(pm, X, steps=5)
    d = tmp_path_factory.mktemp("trained") / "adapter"
    pm.save_pretrained(d)
    return d, out(pm, X)


def test_compact_export_at_full_rank_reproduces_the_trained_model(tiny_dir, pissa_init, trained, tmp_path, capsys):
    adapter, want = trained
    capsys.readouterr()
    assert main(["export", str(pissa_init), "--adapter", str(adapter), "--out", str(tmp_path / "lora"),
                 "--rank", str(2 * RANK)]) == 0
    printed = capsys.readouterr().out
    assert f"  ranks                   {2 * RANK} over 14 layers\n" in printed
    assert "  largest relative error  0\n" in printed
    v = PeftModel.from_pretrained(load_model(tiny_dir), tmp_path / "lora")
    # the factors' fp32 rounding merged into W, seen through the trained model (as test_export's plain export)
    assert rel(out(v, X), want) < 1e-4
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                               "svdadapt_export.json"}


def test_compact_export_with_energy_slots_and_covariances(tiny_dir, calib_files, pissa_init, trained, tmp_path):
    adapter, _ = trained
    cov = tmp_path / "c.safetensors"
    assert main(["calibrate", str(tiny_dir), "--calib", *calib_files, *CALIB_ARGS, "--out", str(cov),
                 "--no-progress"]) == 0
    assert main(["export", str(pissa_init), "--adapter", str(adapter), "--out", str(tmp_path / "lora"),
                 "--energy", "0.9", "--round-to", "2,4,8", "--covariances", str(cov), "--weighted"]) == 0
    rep = json.loads((tmp_path / "lora" / "svdadapt_export.json").read_text())
    assert rep["options"] == {"rank": None, "energy": 0.9, "round_to": [2, 4, 8], "covariances": True,
                              "weighted": True}
    assert {r["rank"] for r in rep["layers"].values()} <= {2, 4, 8}
    assert all(r["energy"] >= 0.9 and "whitened_error" in r for r in rep["layers"].values())


USAGE = [
    (["--rank", "0"], "--rank must be a positive integer, got 0"),
    (["--rank", "2", "--energy", "0.5"], "give --rank or --energy, not both (got --rank 2, --energy 0.5)"),
    (["--energy", "1.5"], "--energy must be a number in (0, 1], got 1.5"),
    (["--round-to", "tgi"], "--round-to must be 'vllm' or a list of positive integers, got 'tgi'"),
    (["--round-to", "8,x"], "--round-to must be 'vllm' or a list of positive integers, got '8,x'"),
    (["--rank", "2", "--weighted"], "--weighted needs --covariances (the layers' input covariances, `svdadapt "
                                    "calibrate`)"),
    (["--rank", "2", "--covariances", "{missing}"], "no such covariances file: '{missing}'"),
]


@pytest.mark.parametrize("extra, message", USAGE, ids=[m[:30] for _, m in USAGE])
def test_compact_usage_errors_exit_2(pissa_init, tmp_path, capsys, extra, message):
    missing = str(tmp_path / "nope.safetensors")
    extra = [a.replace("{missing}", missing) for a in extra]
    capsys.readouterr()
    assert main(["export", str(pissa_init), "--out", str(tmp_path / "lora"), *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "svdadapt: error: " + message.replace("{missing}",
                                                                                                     missing)
    assert not (tmp_path / "lora").exists()


def test_an_unreadable_covariances_file_exits_1(pissa_init, tmp_path, capsys):
    bad = tmp_path / "c.safetensors"
    bad.write_text("not a safetensors file")
    capsys.readouterr()
    assert main(["export", str(pissa_init), "--out", str(tmp_path / "lora"), "--rank", "2",
                 "--covariances", str(bad)]) == 1  # what a named file holds: exit 1 (docs/cli.md#exit-codes)
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"svdadapt: error: {str(bad)!r} is not a readable safetensors file (truncated or corrupt)")
