"""init_checkpoint with target_parameters for CorDA and EoRA: MoE experts calibrated one decoder block at a time.

The key property (as for the data-free methods, tests/stream/test_stream_experts.py): the init directory the
streamed run writes is the one ``svdadapt.wrap(model, ..., calibration=batches, target_parameters=...)`` + the
in-memory init-dir writer give, bit for bit: each expert's covariance is collected from the tokens routed to it in a
block-by-block pass on the skeleton (each block loaded from the checkpoint, the per-expert tensors of transformers'
layout stacked as ``from_pretrained`` stacks them), which computes what wrap's whole-model pass computes, in the
same order. Also: the adapter equals a brute-force per-expert reference from an independent routed-token covariance,
a resumed run, the CLI, and EoRA against the uncompressed checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import svdadapt
from svdadapt.cli import main as cli_main
from svdadapt.lifecycle.initdir import write_init_dir
from svdadapt.stream.init import STREAM_DIR

from helpers import safetensors_dict
from moe_models import EXPERTS, moe
from test_stream_experts import _assert_same, interrupted_then_resumed


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-identity with the in-memory path holds at equal thread counts."""


def _batches(vocab: int = 64, n: int = 3, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, 10), generator=g)} for _ in range(n)]


def _wrapped_dir(ck: Path, out: Path, method: str, **kw) -> Path:
    """What ``svdadapt init --in-memory`` does: the model (and EoRA's reference) loaded, wrapped, written."""
    model, ref = AutoModelForCausalLM.from_pretrained(ck).eval(), kw.get("reference")
    if ref is not None:
        kw["reference"] = AutoModelForCausalLM.from_pretrained(ref).eval()
    pm = svdadapt.wrap(model, method, rank=2, target_parameters=EXPERTS, calibration=_batches(), progress=False,
                       **kw)
    return write_init_dir(out, pm, model_path=ck, reference_path=ref)


def _compressed(tmp: Path, family: str) -> tuple[Path, Path]:
    """(the uncompressed checkpoint, the 3-bit one: attention and every expert quantized), both in transformers'
    per-expert layout."""
    model = moe(family)
    model.save_pretrained(tmp / "ref", max_shard_size="20KB")
    q = svdadapt.compress.quantize(model, bits=3, group_size=8, target_parameters=EXPERTS)
    q.save_pretrained(tmp / "q", max_shard_size="20KB")
    return tmp / "ref", tmp / "q"


@pytest.mark.parametrize("family, mode", [("mixtral", "ipa"), ("mixtral", "kpa"), ("qwen3_moe", "ipa"),
                                          ("olmoe", "kpa")])
def test_streamed_corda_experts_equal_in_memory_init(tmp, family, mode):
    ck = tmp / "ck"
    moe(family).save_pretrained(ck, max_shard_size="20KB")
    svdadapt.init_checkpoint(ck, tmp / "s", method="corda", rank=2, mode=mode, target_parameters=EXPERTS,
                             calibration=_batches(), progress=False, max_shard_bytes=30_000)
    _wrapped_dir(ck, tmp / "m", "corda", mode=mode)
    _assert_same(tmp / "s", tmp / "m")
    _assert_experts_adapted(tmp / "s")


def _assert_experts_adapted(d: Path) -> None:
    """Four targeted parameters (two layers x gate_up_proj, down_proj), each with a non-zero packed adapter."""
    meta = json.loads((d / "svdadapt.json").read_text())
    assert sorted(p["key"].rsplit(".", 1)[1] for p in meta["parameters"].values()) == ["down_proj"] * 2 + [
        "gate_up_proj"] * 2
    adapter = safetensors_dict(d / "adapter" / "adapter_model.safetensors")
    experts = [v for k, v in adapter.items() if ".experts." in k]
    assert len(experts) == 8 and all(torch.count_nonzero(v) > 0 for v in experts)


@pytest.mark.parametrize("family, calibrate_on", [("mixtral", "reference"), ("qwen3_moe", "reference"),
                                                  ("mixtral", "compressed")])
def test_streamed_eora_experts_equal_in_memory_init(tmp, family, calibrate_on):
    ref, q = _compressed(tmp, family)
    svdadapt.init_checkpoint(q, tmp / "s", method="eora", rank=2, reference=ref, calibrate_on=calibrate_on,
                             target_parameters=EXPERTS, calibration=_batches(), progress=False)
    _wrapped_dir(q, tmp / "m", "eora", reference=ref, calibrate_on=calibrate_on)
    _assert_same(tmp / "s", tmp / "m")
    # EoRA keeps the base: base/ holds the compressed checkpoint's tensors as stored
    base, stored = safetensors_dict(tmp / "s" / "base" / "model.safetensors"), {}
    for f in sorted(q.glob("*.safetensors")):
        stored.update(safetensors_dict(f))
    assert base.keys() == stored.keys() and all(torch.equal(base[k], stored[k]) for k in base)


def test_streamed_experts_only(tmp):
    """target_modules=[]: no layer pass at all, the experts' pass alone."""
    ck = tmp / "ck"
    moe("mixtral").save_pretrained(ck)
    svdadapt.init_checkpoint(ck, tmp / "s", method="corda", rank=2, target_modules=[], target_parameters=EXPERTS,
                             calibration=_batches(), progress=False)
    _wrapped_dir(ck, tmp / "m", "corda", target_modules=[])
    _assert_same(tmp / "s", tmp / "m")
    _assert_experts_adapted(tmp / "s")
    assert json.loads((tmp / "s" / "svdadapt.json").read_text())["targets"] == list(
        json.loads((tmp / "s" / "svdadapt.json").read_text())["parameters"])  # the experts' wrappers only


def test_a_router_weight_streams_and_a_2d_target_needs_given_covariances(tmp):
    """A 2-D parameter stored under the name transformers renames (Mixtral's block_sparse_moe.gate.weight for
    mlp.gate.weight) streams for PiSSA as wrap computes it; CorDA on it has no routed tokens: the error wrap gives."""
    ck = tmp / "ck"
    moe("mixtral").save_pretrained(ck)
    router = ["mlp.gate.weight"]
    svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=2, target_parameters=router, progress=False)
    pm = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(ck).eval(), "pissa", rank=2, target_parameters=router,
                       progress=False)
    write_init_dir(tmp / "m", pm, model_path=ck)
    _assert_same(tmp / "s", tmp / "m")
    message = ("target parameter 'model.layers.0.mlp.gate.weight' is 2-D (not an MoE expert): its input covariance "
               "cannot be collected from routed tokens; pass calibration= a Covariances holding it")
    with pytest.raises(ValueError) as e:
        svdadapt.init_checkpoint(ck, tmp / "c", method="corda", rank=2, target_parameters=router,
                                 calibration=_batches(), progress=False)
    assert str(e.value) == message and not (tmp / "c").exists()
    with pytest.raises(ValueError) as e:
        svdadapt.wrap(AutoModelForCausalLM.from_pretrained(ck).eval(), "corda", rank=2, target_parameters=router,
                      calibration=_batches(), progress=False)
    assert str(e.value) == message


def test_a_resumed_calibrated_run_equals_in_memory_init(tmp, monkeypatch):
    """Killed while the base is written (after the first parameters' tensors went into a shard): the resumed run
    calibrates again (the same covariances, the same plans) and keeps the verified shards, bit for bit."""
    ck = tmp / "ck"
    moe("mixtral").save_pretrained(ck, max_shard_size="20KB")
    interrupted_then_resumed(monkeypatch, lambda: svdadapt.init_checkpoint(
        ck, tmp / "s", method="corda", rank=2, target_parameters=EXPERTS, calibration=_batches(), progress=False,
        max_shard_bytes=6_000))
    assert not (tmp / "s" / STREAM_DIR).exists()  # the resumed run completed: its journal is gone
    _wrapped_dir(ck, tmp / "m", "corda")
    _assert_same(tmp / "s", tmp / "m")


def test_cli_init_streams_corda_experts(tmp, capsys):
    """``svdadapt init --method corda --calib ... --target-parameters``: streamed (not loaded), and the directory
    ``--in-memory`` writes, bit for bit."""
    from helpers import tiny_tokenizer
    from pydoc_data.topics import topics

    ck = tmp / "ck"
    moe("mixtral", vocab=300).save_pretrained(ck)
    tiny_tokenizer(300).save_pretrained(ck)
    (tmp / "calib.txt").write_text(topics["assignment"])
    args = ["init", str(ck), "--method", "corda", "--rank", "2", "--no-progress", "--target-parameters", *EXPERTS,
            "--calib", str(tmp / "calib.txt"), "--seq-len", "16", "--batch-size", "2", "--max-tokens", "96"]
    assert cli_main([*args, "--out", str(tmp / "s")]) == 0
    assert f"streaming {ck} one decoder block at a time" in capsys.readouterr().err
    assert cli_main([*args, "--in-memory", "--out", str(tmp / "m")]) == 0
    _assert_same(tmp / "s", tmp / "m")


def test_wrap_collects_the_experts_block_by_block_as_the_whole_model_pass(tmp):
    """wrap's default (the experts' routed covariances one decoder block at a time) and ``blockwise=False`` (one
    whole-model pass) run the same block forwards on the same hidden states and sum the same rows in the same order:
    the same adapters, bit for bit."""
    model = moe("qwen3_moe")
    kw = dict(rank=2, target_modules=[], target_parameters=EXPERTS, progress=False)
    blocks = svdadapt.wrap(model, "corda", calibration=_batches(), **kw).state_dict()
    whole = svdadapt.wrap(moe("qwen3_moe"), "corda", calibration=_batches(), blockwise=False, **kw).state_dict()
    assert blocks.keys() == whole.keys() and all(torch.equal(blocks[k], whole[k]) for k in blocks)
    assert any(torch.count_nonzero(v) for k, v in blocks.items() if "lora_A" in k)
