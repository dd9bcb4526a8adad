"""Exit codes of the ``svdadapt`` command line and the rule behind them (docs/cli.md#exit-codes):

- 2: the command line is wrong, decidable from the arguments, the machine (its torch device backends, whether
  bitsandbytes is installed) and the existence and kind of the named paths alone; checked before anything is loaded;
- 1: the run failed on what the inputs hold (a model's shapes or config, a file's contents).

Every exit-2 case (here and test_cli.py's) is run with the loaders replaced by a trap, which proves it is decided
before any model, tokenizer or config is read. The tiny Llama, its tokenizer and the init directory are the fixtures
of tests/cli/conftest.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import svdadapt.cli.commands
import svdadapt.loading
import svdadapt.stream.init
from svdadapt.cli import main

from helpers import make_tiny_llama, tiny_tokenizer
from cli_model import VOCAB
from test_cli import ERRORS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: many small BLAS calls

INIT = ["init", "{tiny}", "--rank", "2", "--out", "{new}", "--no-progress"]

# (argv with placeholders, the stderr line after "svdadapt: error: "): every one exits 2
USAGE = [
    ([*INIT, "--method", "milora", "--svd", "randomized"],
     "--svd randomized cannot find the smallest singular triplets that --method milora keeps; use --svd full or auto"),
    ([*INIT, "--method", "corda", "--mode", "kpa", "--calib", "{calib}", "--svd", "randomized"],
     "--svd randomized cannot find the smallest singular triplets that --method corda --mode kpa keeps; use --svd "
     "full or auto"),
    ([*INIT, "--method", "pissa", "--device", "tpu9"],
     "--device 'tpu9' is not a torch device (Invalid device string: 'tpu9'); e.g. cpu, cuda, cuda:1"),
    ([*INIT, "--method", "pissa", "--device", "meta"],
     "--device 'meta': this machine has no available meta device; drop --device to run on the CPU"),
    ([*INIT, "--method", "pissa", "--device", "cuda"],  # torch.cuda.is_available() is False in this test
     "--device 'cuda': this machine has no available cuda device; drop --device to run on the CPU"),
    (["init", "{bare}", "--method", "pissa", "--rank", "2", "--out", "{new}"],
     "model directory '{bare}' has no config.json (not a Hugging Face model directory)"),
    ([*INIT, "--method", "eora", "--reference", "{bare}", "--calib", "{calib}"],
     "reference model directory '{bare}' has no config.json (not a Hugging Face model directory)"),
    ([*INIT[:-3], "--out", "{file}/run", "--method", "pissa"],
     "output '{file}/run' cannot be created: '{file}' is not a directory"),
    (["calibrate", "{tiny}", "--calib", "{calib}", "--out", "{file}/c.safetensors"],
     "output '{file}/c.safetensors' cannot be created: '{file}' is not a directory"),
    (["calibrate", "{tiny}", "--calib", "{calib}", "--out", "{covs}"], "output '{covs}' exists"),
    (["export", "{bare}", "--out", "{new}"],  # {bare} holds an adapter/ directory, but no svdadapt.json
     "'{bare}' has no svdadapt.json (not a directory written by `svdadapt init`)"),
]


@pytest.fixture
def paths(tiny_dir, calib_files, pissa_init, tmp_path) -> dict[str, str]:
    bare = tmp_path / "bare"
    (bare / "adapter").mkdir(parents=True)
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "c.safetensors").write_bytes(b"")
    return {"{missing}": str(tmp_path / "missing"), "{new}": str(tmp_path / "new"), "{tiny}": str(tiny_dir),
            "{calib}": calib_files[0], "{init}": str(pissa_init), "{bare}": str(bare),
            "{file}": str(tmp_path / "file"), "{covs}": str(tmp_path / "c.safetensors")}


def _fill(s: str, paths: dict[str, str]) -> str:
    for k, v in paths.items():
        s = s.replace(k, v)
    return s


def _run(argv: list, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    return code, err


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every way the CLI reads a model, tokenizer or config fails the test."""
    def trap(*args, **kwargs):
        raise AssertionError(f"loaded {args}")

    for module, name in ((svdadapt.loading, "load_model"), (svdadapt.loading, "load_tokenizer"),
                         (svdadapt.stream.init, "init_checkpoint"), (svdadapt.cli.commands, "_config")):
        monkeypatch.setattr(module, name, trap)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


USAGE_ALL = USAGE + [(argv, m.removeprefix("svdadapt: error: ")) for argv, code, m in ERRORS
                     if code == 2 and "{other}" not in " ".join(argv)]


@pytest.mark.parametrize("argv, message", USAGE_ALL, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USAGE_ALL])
def test_usage_errors_exit_2_before_loading(argv, message, paths, nothing_loads, tmp_path, capsys):
    code, err = _run([_fill(a, paths) for a in argv], capsys)
    assert code == 2, err
    assert err == [f"svdadapt: error: {_fill(message, paths)}"]
    assert not (tmp_path / "new").exists()


def test_export_of_a_directory_without_record_names_it(tiny_dir, tmp_path, capsys):
    # the model directory itself: before, "no such adapter directory" for a directory that is no init at all
    code, err = _run(["export", tiny_dir, "--out", tmp_path / "new"], capsys)
    assert (code, err) == (2, [f"svdadapt: error: '{tiny_dir}' has no svdadapt.json (not a directory written by "
                               "`svdadapt init`)"])


def test_device_index_beyond_the_machine(paths, nothing_loads, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = _run([_fill(a, paths) for a in [*INIT, "--method", "pissa", "--device", "cuda:1"]], capsys)
    assert (code, err) == (2, ["svdadapt: error: --device 'cuda:1': this machine has 1 cuda device(s), cuda:0 to "
                               "cuda:0"])


def test_quantize_without_bitsandbytes(paths, nothing_loads, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))
    code, err = _run([_fill(a, paths) for a in [*INIT, "--method", "pissa", "--quantize", "nf4"]], capsys)
    assert (code, err) == (2, ["svdadapt: error: --quantize needs bitsandbytes, which is not installed: pip install "
                               "bitsandbytes"])


def test_randomized_svd_where_it_applies_is_no_error(paths, nothing_loads, capsys):
    # pissa and corda ipa keep the top of the spectrum: the command gets past the checks to loading (the trap)
    for method in (["pissa"], ["corda", "--mode", "ipa", "--calib", "{calib}"]):
        code, err = _run([_fill(a, paths) for a in [*INIT, "--svd", "randomized", "--method", *method]], capsys)
        assert code == 1 and err[-1].startswith("svdadapt: error: AssertionError: loaded"), err


# ------------------------------------------------------------------------------------- exit 1: the model's limits


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 with 32 positions (its learned position table is indexed out of range beyond them)."""
    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=1, n_head=2)).save_pretrained(d)
    tiny_tokenizer(VOCAB).save_pretrained(d)
    return d


SEQ_LEN = [  # (command, extra arguments): streamed init, in-memory init, calibrate
    ("init", ["--method", "corda", "--rank", "2"]),
    ("init", ["--method", "corda", "--rank", "2", "--in-memory"]),
    ("calibrate", []),
]


@pytest.mark.parametrize("command, extra", SEQ_LEN, ids=["init", "init-in-memory", "calibrate"])
def test_seq_len_beyond_the_positions(command, extra, tiny_dir, gpt2_dir, calib_files, tmp_path, capsys):
    out = tmp_path / ("new.safetensors" if command == "calibrate" else "new")
    for model, key, limit in ((tiny_dir, "max_position_embeddings", 64), (gpt2_dir, "n_positions", 32)):
        code, err = _run([command, model, *extra, "--calib", calib_files[0], "--seq-len", limit + 1,
                          "--batch-size", 1, "--max-tokens", 64, "--out", out, "--no-progress"], capsys)
        assert code == 1, err
        assert err[-1] == (f"svdadapt: error: --seq-len {limit + 1} exceeds the {key} = {limit} of '{model}'; use "
                           f"--seq-len {limit} or less")
        assert not out.exists()


def test_seq_len_at_the_limit_runs(gpt2_dir, calib_files, tmp_path, capsys):
    from svdadapt.calibration import Covariances

    out = tmp_path / "c.safetensors"
    code, err = _run(["calibrate", gpt2_dir, "--calib", calib_files[0], "--seq-len", 32, "--batch-size", 2,
                      "--max-tokens", 64, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert Covariances.load(out).token_count("transformer.h.0.attn.c_attn") == 64  # one batch of 2 x 32, no padding


def test_eora_reference_seq_len(tiny_dir, calib_files, tmp_path, capsys):
    # the reference runs the calibration text too: its limit counts (here the smaller one)
    short = tmp_path / "short"
    make_tiny_llama(5, vocab_size=VOCAB, max_position_embeddings=32).save_pretrained(short)
    code, err = _run(["init", tiny_dir, "--method", "eora", "--rank", 2, "--reference", short, "--calib",
                      calib_files[0], "--seq-len", 48, "--out", tmp_path / "new", "--no-progress"], capsys)
    assert (code, err[-1]) == (1, f"svdadapt: error: --seq-len 48 exceeds the max_position_embeddings = 32 of "
                                  f"'{short}'; use --seq-len 32 or less")


def test_quantize_a_layer_bitsandbytes_cannot_run(calib_files, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    model = tmp_path / "model"
    make_tiny_llama(5, vocab_size=VOCAB, intermediate_size=96).save_pretrained(model)  # down_proj: in 96
    code, err = _run(["init", model, "--method", "pissa", "--rank", 2, "--quantize", "nf4", "--out",
                      tmp_path / "new", "--no-progress"], capsys)
    assert code == 1, err
    assert err[-1] == ("svdadapt: error: quantize='nf4' cannot quantize module 'model.layers.0.mlp.down_proj' of "
                       "weight (64, 96): in_features=96 is not a multiple of the 4-bit block size 64 (bitsandbytes' "
                       "CPU kernel fails on it); leave it out of the targets (exclude_modules=) or use "
                       "quantize='int8'")
    assert not (tmp_path / "new").exists()
