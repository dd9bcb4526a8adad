"""The init directory from Python (``svdadapt.lifecycle.initdir``): ``write_init_dir`` writes what ``svdadapt init --in-memory``
writes, byte for byte; ``export_init_dir`` is ``svdadapt export``: the same save directory, the same refusals, a
missing adapter file as ``NotAnAdapter``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import svdadapt
from svdadapt.lifecycle.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_checkpoint
from svdadapt.cli import main
from svdadapt.lifecycle.initdir import (BASE_DIR, META_FILE, REPORT_FILE, STATE_FILE, TRAINED_DIR, NotAnAdapter,
                              export_init_dir, write_init_dir)

from helpers import make_tiny_llama, save_tiny_model, token_ids, train

SEED, VOCAB, RANK = 5, 300, 4
TARGETS = ["q_proj", "v_proj"]  # 2 layers x 2 = 4 targets


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", SEED, VOCAB, tokenizer=False)


def _python_init(model_dir: Path, out: Path, messages: list[str]) -> Path:
    pm = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(model_dir), "pissa", rank=RANK, target_modules=TARGETS,
                       progress=False)
    return write_init_dir(out, pm, model_path=model_dir, log=messages.append)


def test_write_init_dir_writes_what_the_cli_writes(model_dir, tmp_path):
    out = tmp_path / "run"  # one path for both: adapter_config.json names its own base/
    messages: list[str] = []
    assert _python_init(model_dir, out, messages) == out
    assert messages == [f"saving base to {out / BASE_DIR}"]
    mine = _files(out)
    shutil.rmtree(out)
    assert main(["init", str(model_dir), "--method", "pissa", "--rank", str(RANK), "--target-modules", *TARGETS,
                 "--in-memory", "--no-progress", "--out", str(out)]) == 0
    theirs = _files(out)
    assert sorted(mine) == sorted(theirs)
    assert {META_FILE, STATE_FILE, REPORT_FILE, f"{TRAINED_DIR}/{ADAPTER_CONFIG}", f"{TRAINED_DIR}/{ADAPTER_WEIGHTS}",
            f"{BASE_DIR}/config.json", f"{BASE_DIR}/model.safetensors"} <= set(mine)
    assert [f for f in mine if mine[f] != theirs[f]] == []
    assert len(svdadapt.verify(out).checked) == len(mine) - 1  # every file but svdadapt.json itself


def _trained_adapter(init: Path, to: Path) -> Path:
    """DIR/base + DIR/adapter trained 3 steps, saved with plain PEFT."""
    base = AutoModelForCausalLM.from_pretrained(init / BASE_DIR)
    pm = PeftModel.from_pretrained(base, init / TRAINED_DIR, is_trainable=True)
    train(pm, token_ids(2, 16, seed=1, vocab=VOCAB), steps=3)
    pm.save_pretrained(to)
    return to


def test_export_init_dir_is_svdadapt_export(model_dir, tmp_path):
    init = _python_init(model_dir, tmp_path / "run", [])
    trained = _trained_adapter(init, tmp_path / "trained")
    done = export_init_dir(init, tmp_path / "lora", trained)
    assert (done.out, done.adapter, done.changed, done.layers) == (tmp_path / "lora", trained, 4, 4)
    assert main(["export", str(init), "--adapter", str(trained), "--out", str(tmp_path / "cli")]) == 0
    mine, theirs = _files(tmp_path / "lora"), _files(tmp_path / "cli")
    assert sorted(mine) == sorted(theirs) and [f for f in mine if mine[f] != theirs[f]] == []
    saved = read_checkpoint(tmp_path / "lora")
    assert saved.meta["method"] == done.meta["method"] == "pissa" and saved.meta["rank"] == RANK
    assert all(torch.equal(a, b) for n in saved.init for a, b in zip(saved.init[n], read_checkpoint(init).init[n]))


def test_export_init_dir_refusals(model_dir, tmp_path):
    init = _python_init(model_dir, tmp_path / "run", [])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAnAdapter, match=re.escape(f"{str(empty)!r} is not a PEFT adapter directory (needs "
                                                     f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")):
        export_init_dir(init, tmp_path / "lora", empty)
    assert issubclass(NotAnAdapter, FileNotFoundError)
    other = svdadapt.wrap(make_tiny_llama(SEED + 1, vocab_size=VOCAB), "pissa", rank=RANK, target_modules=TARGETS,
                          progress=False)
    svdadapt.save(other, tmp_path / "other")  # an svdadapt.save directory of another init
    with pytest.raises(ValueError, match=re.escape(f"trained adapter {str(tmp_path / 'other')!r} comes from a "
                                                   "different init: its initial factors")):
        export_init_dir(init, tmp_path / "lora2", tmp_path / "other")
