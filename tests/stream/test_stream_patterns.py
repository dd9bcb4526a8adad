"""init_checkpoint with rank_pattern / alpha_pattern: what the in-memory wrap gives, bit for bit (PiSSA, MiLoRA
through the CLI's in-memory init; CorDA and sequential EoRA, block by block, against wrap on the loaded models), and
the same files from two torch.distributed ranks as from one process."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import svdadapt
from svdadapt.cli import main as cli_main
from svdadapt.storage.shards import CheckpointReader

from dist_harness import as_rank, free_port
from helpers import bits, make_tiny_llama, output_bytes, safetensors_dict, token_ids

RANK, ALPHA = 4, 8.0
RANKS = {r"layers\.0\.self_attn\.q_proj": 2, "down_proj": 6, "v_proj": 8}
ALPHAS = {"k_proj": 3.0, r"layers\.1\.mlp\.up_proj": 20.0}
PATTERNS = dict(alpha=ALPHA, rank_pattern=RANKS, alpha_pattern=ALPHAS)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-identity with the in-memory path holds at equal thread counts."""


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)


def _same_base(a: Path, b: Path) -> None:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.names) == sorted(rb.names)
    for n in ra.names:
        assert torch.equal(bits(ra.get(n)), bits(rb.get(n))), n


def _calibration() -> list[dict]:
    return [{"input_ids": token_ids(2, 16, s), "attention_mask": torch.ones(2, 16, dtype=torch.long)} for s in (0, 1)]


def _flags() -> list[str]:
    return ["--alpha", str(ALPHA), "--rank-pattern", *[f"{k}={v}" for k, v in RANKS.items()],
            "--alpha-pattern", *[f"{k}={v}" for k, v in ALPHAS.items()]]


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_streamed_equals_the_in_memory_init(tmp_path, method):
    ck = tmp_path / "ck"
    make_tiny_llama(0).save_pretrained(ck, max_shard_size="100KB")
    svdadapt.init_checkpoint(ck, tmp_path / "s", method=method, rank=RANK, max_shard_bytes=40_000, progress=False,
                             **PATTERNS)
    assert cli_main(["init", str(ck), "--method", method, "--rank", str(RANK), *_flags(), "--in-memory",
                     "--no-progress", "--out", str(tmp_path / "m")]) == 0
    _same_base(tmp_path / "s" / "base", tmp_path / "m" / "base")
    for f in ("adapter/adapter_model.safetensors", "svdadapt_state.safetensors"):
        assert _same_tensors(safetensors_dict(tmp_path / "s" / f), safetensors_dict(tmp_path / "m" / f)), f
    ms, mm = (json.loads((tmp_path / d / "svdadapt.json").read_text()) for d in ("s", "m"))
    ms.pop("files"), mm.pop("files")
    assert ms == mm and ms["lora_config"]["rank_pattern"] == RANKS and ms["lora_config"]["alpha_pattern"] == ALPHAS
    assert (tmp_path / "s" / "report.json").read_text() == (tmp_path / "m" / "report.json").read_text()
    factors = safetensors_dict(tmp_path / "s" / "adapter" / "adapter_model.safetensors")
    assert factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    assert factors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (6, 128)


def _assert_adapters_equal(out: Path, pm) -> None:
    factors = safetensors_dict(out / "adapter" / "adapter_model.safetensors")
    assert len(factors) == 2 * 14
    for n, (A, B) in pm.svdadapt.init_factors.items():
        key = next(k for k in factors if f".{n}.lora_A." in k)
        assert torch.equal(factors[key], A) and torch.equal(factors[key.replace("lora_A", "lora_B")], B), n


def test_streamed_corda_equals_wrap_on_the_loaded_model(tmp_path):
    ck = tmp_path / "ck"
    make_tiny_llama(6).save_pretrained(ck, max_shard_size="100KB")
    svdadapt.init_checkpoint(ck, tmp_path / "s", method="corda", rank=RANK, calibration=_calibration(),
                             max_shard_bytes=40_000, progress=False, **PATTERNS)
    pm = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(ck), "corda", RANK, calibration=_calibration(),
                       progress=False, **PATTERNS)
    _assert_adapters_equal(tmp_path / "s", pm)
    base, state = CheckpointReader(tmp_path / "s" / "base"), pm.get_base_model().state_dict()
    for key in base.names:
        mine = key.replace(".weight", ".base_layer.weight")
        assert torch.equal(base.get(key), state[mine if mine in state else key]), key


def test_streamed_sequential_eora_equals_wrap(tmp_path):
    """EoRA's sequential inputs: each block runs compensated by the earlier blocks' adapters, each at its own rank
    and scaling; streamed block by block and in memory, the same bits."""
    model = make_tiny_llama(10)
    qmodel = svdadapt.compress.quantize(model, bits=3, group_size=16)
    ref, ck = tmp_path / "ref", tmp_path / "q"
    model.save_pretrained(ref, max_shard_size="100KB")
    qmodel.save_pretrained(ck, max_shard_size="100KB")
    svdadapt.init_checkpoint(ck, tmp_path / "s", method="eora", rank=RANK, reference=ref, calibration=_calibration(),
                             max_shard_bytes=40_000, progress=False, **PATTERNS)
    pm = svdadapt.wrap(copy.deepcopy(qmodel), "eora", RANK, reference=model, calibration=_calibration(),
                       progress=False, **PATTERNS)
    _assert_adapters_equal(tmp_path / "s", pm)
    # the sequential inputs are really compensated: the whole-model (uncompensated) run differs in block 1
    whole = svdadapt.wrap(copy.deepcopy(qmodel), "eora", RANK, reference=model, calibration=_calibration(),
                          blockwise=False, progress=False, **PATTERNS)
    block1 = [n for n in pm.svdadapt.init_factors if ".layers.1." in n]
    assert not any(torch.equal(pm.svdadapt.init_factors[n][1], whole.svdadapt.init_factors[n][1]) for n in block1)


# ------------------------------------------------------------------------------------------ torch.distributed


def _stream(src: str, out: str) -> None:
    svdadapt.init_checkpoint(src, out, method="pissa", rank=RANK, max_shard_bytes=1 << 20, progress=False, **PATTERNS)


def _wrap_and_save(out: str, rank: int) -> None:
    pm = svdadapt.wrap(make_tiny_llama(1, hidden_size=256, intermediate_size=512), "pissa", RANK, progress=False,
                       **PATTERNS)
    torch.save({"init": pm.svdadapt.init_factors, "state": pm.state_dict()}, f"{out}/wrap{rank}.pt")


def _worker(rank: int, size: int, port: int, src: str, out: str) -> None:
    as_rank(rank, size, port, lambda: (_stream(src, out + "/two"), _wrap_and_save(out, rank)))


def test_two_ranks_give_the_one_process_files_and_model(tmp_path):
    """Each rank decomposes its share of the layers (split by their cost at their own ranks): the streamed files
    byte for byte, and wrap's factors and model bit for bit, as one process."""
    src = tmp_path / "model"
    make_tiny_llama(1, hidden_size=256, intermediate_size=512).save_pretrained(src, max_shard_size="1MB")
    mp.spawn(_worker, args=(2, free_port(), str(src), str(tmp_path)), nprocs=2, join=True)
    _stream(str(src), str(tmp_path / "one"))
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for f in files:
        if f.name != "adapter_config.json":  # names its own base directory
            assert output_bytes(tmp_path / "one" / f) == output_bytes(tmp_path / "two" / f), f
    single = svdadapt.wrap(make_tiny_llama(1, hidden_size=256, intermediate_size=512), "pissa", RANK, progress=False,
                           **PATTERNS)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"wrap{rank}.pt")
        assert got["init"].keys() == single.svdadapt.init_factors.keys()
        for n, (A, B) in single.svdadapt.init_factors.items():
            assert torch.equal(got["init"][n][0], A) and torch.equal(got["init"][n][1], B), n
        assert all(torch.equal(v, got["state"][k]) for k, v in single.state_dict().items())


def test_a_resumed_run_keeps_its_patterns(tmp_path, monkeypatch):
    """An interrupted run resumes only with the same patterns (they decide the factors), and then gives the
    uninterrupted run's files."""
    import svdadapt.stream.journal as stream_journal

    ck = tmp_path / "ck"
    make_tiny_llama(2).save_pretrained(ck, max_shard_size="100KB")
    run = dict(method="pissa", rank=RANK, max_shard_bytes=40_000, progress=False)
    svdadapt.init_checkpoint(ck, tmp_path / "whole", **run, **PATTERNS)
    real, calls = stream_journal.plan_layer, []

    def crash_after_5(job, layer, *a, **kw):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(layer.name)
        return real(job, layer, *a, **kw)

    monkeypatch.setattr(stream_journal, "plan_layer", crash_after_5)
    with pytest.raises(KeyboardInterrupt):
        svdadapt.init_checkpoint(ck, tmp_path / "s", **run, **PATTERNS)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"another job \(rank_pattern differ\)"):
        svdadapt.init_checkpoint(ck, tmp_path / "s", **run, alpha=ALPHA, rank_pattern={"down_proj": 6},
                                 alpha_pattern=ALPHAS)
    with pytest.raises(ValueError, match=r"another job \(alpha_pattern differ\)"):
        svdadapt.init_checkpoint(ck, tmp_path / "s", **run, alpha=ALPHA, rank_pattern=RANKS)
    svdadapt.init_checkpoint(ck, tmp_path / "s", **run, **PATTERNS)
    for f in ("adapter/adapter_model.safetensors", "svdadapt_state.safetensors"):
        assert _same_tensors(safetensors_dict(tmp_path / "s" / f), safetensors_dict(tmp_path / "whole" / f)), f
    _same_base(tmp_path / "s" / "base", tmp_path / "whole" / "base")
