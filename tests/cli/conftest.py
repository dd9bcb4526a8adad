"""The command-line tests' fixtures: the tiny Llama saved with its tokenizer, three calibration text files and a
PiSSA init directory of it. Module-scoped: each test file builds its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydoc_data.topics import topics

from cli_model import RANK, SEED, VOCAB
from helpers import save_tiny_model
from svdadapt.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), SEED, VOCAB)


@pytest.fixture(scope="module")
def calib_files(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("calib")
    files = []
    for k in ("assignment", "for", "class"):
        (d / f"{k}.txt").write_text(topics[k])
        files.append(str(d / f"{k}.txt"))
    return files


@pytest.fixture(scope="module")
def pissa_init(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pissa") / "init"
    assert main(["init", str(tiny_dir), "--method", "pissa", "--rank", str(RANK), "--out", str(out), "--no-progress"]) == 0
    return out
