"""Every file svdadapt writes is byte-identical from run to run: the streaming init, the in-memory ``svdadapt init``
and ``svdadapt.save``, each run in a fresh interpreter with another ``PYTHONHASHSEED`` (a set written in its
iteration order, e.g. PEFT's ``target_modules``, would follow the string hash seed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import make_tiny_llama, tiny_tokenizer

VOCAB = 300

WRITERS = r"""
import sys
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))  # the parent's: the factors are bit-identical at one thread count
sys.path[:0] = [sys.argv[3], str(Path(sys.argv[3]).parent)]  # this folder, then tests/ (helpers)
from test_output_bytes import write_all
write_all(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def write_all(model: Path, out: Path) -> None:
    """The three writers, into ``out``/stream, /mem and /save."""
    import svdadapt
    from svdadapt.cli import main

    svdadapt.init_checkpoint(model, out / "stream", method="pissa", rank=4, max_shard_bytes=40_000, progress=False)
    assert main(["init", str(model), "--method", "milora", "--rank", "4", "--in-memory", "--out", str(out / "mem"),
                 "--no-progress"]) == 0
    pm = svdadapt.wrap(make_tiny_llama(4, vocab_size=VOCAB), "pissa", rank=4, progress=False)
    svdadapt.save(pm, out / "save")


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _moved(out: Path, tag: str) -> dict[str, bytes]:
    files = _files(out)
    out.rename(out.with_name(f"{out.name}-{tag}"))  # the next run writes the same paths (they are recorded)
    return files


def _write_in_a_fresh_interpreter(model: Path, out: Path) -> dict[str, bytes]:
    """The writers in a new process whose hash seed differs from this one's."""
    mine = os.environ.get("PYTHONHASHSEED", "random")
    seed = str(int(mine) + 1) if mine.isdigit() else "0"  # "random": this process hashes unlike any fixed seed
    env = {**os.environ, "PYTHONHASHSEED": seed}
    tests = str(Path(__file__).resolve().parent)
    subprocess.run([sys.executable, "-c", WRITERS, str(model), str(out), tests, str(torch.get_num_threads())],
                   env=env, check=True, capture_output=True)
    return _moved(out, "fresh")


def test_every_written_file_is_byte_identical_across_hash_seeds(tmp_path):
    model = tmp_path / "model"
    make_tiny_llama(4, vocab_size=VOCAB).save_pretrained(model)
    tiny_tokenizer(VOCAB).save_pretrained(model)
    write_all(model, tmp_path / "out")
    first = _moved(tmp_path / "out", "here")
    second = _write_in_a_fresh_interpreter(model, tmp_path / "out")
    assert sorted(first) == sorted(second)
    assert {"stream/adapter/adapter_config.json", "mem/adapter/adapter_config.json", "save/adapter_config.json",
            "stream/svdadapt.json", "mem/svdadapt.json", "save/svdadapt.json"} <= set(first)
    assert [f for f in first if first[f] != second[f]] == []
