"""The inputs ``svdadapt.init_checkpoint`` accepts: checked before any work.

An index may name shards inside its directory only; a checkpoint holds only tensors its config.json explains; EoRA's
reference is the same architecture with the same shapes; Gemma's computed buffers are rebuilt as ``from_pretrained``
rebuilds them (streamed CorDA / EoRA equal ``wrap`` bit for bit); MoE checkpoints stored in transformers' converted
key layout are refused by the block-by-block calibration, naming the layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, Gemma2Config, GemmaConfig, MistralConfig, MistralForCausalLM,
                          MixtralConfig, Qwen2MoeConfig)

import svdadapt
from svdadapt.storage.shards import INDEX_FILE, CheckpointReader

from helpers import make_tiny_llama, token_ids


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-identity with the in-memory path holds at equal thread counts."""


def _calibration() -> list[dict]:
    return [{"input_ids": token_ids(2, 16, s, vocab=64), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
            for s in (0, 1)]


def _seeded(config, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()


# ------------------------------------------------------------------------------------------- index paths


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp, where):
    ck = tmp / "ck"
    make_tiny_llama(0).save_pretrained(ck, max_shard_size="100KB")
    index = json.loads((ck / INDEX_FILE).read_text())
    key, shard = next(iter(index["weight_map"].items()))
    shutil.copy(ck / shard, tmp / "outside.safetensors")
    name = "../outside.safetensors" if where == "parent" else str(tmp / "outside.safetensors")
    index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
    (ck / INDEX_FILE).write_text(json.dumps(index))
    message = rf"^{ck / INDEX_FILE} maps tensor '{key}' to shard '{name}', outside the checkpoint directory {ck}: "
    with pytest.raises(ValueError, match=message):
        CheckpointReader(ck)
    with pytest.raises(ValueError, match=message):
        svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=4, progress=False)
    assert not (tmp / "s").exists()


# ------------------------------------------------------------------------------------------- the config


def test_tensors_the_config_does_not_explain_are_refused(tmp):
    ck = tmp / "ck"
    make_tiny_llama(0, num_hidden_layers=3).save_pretrained(ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=2)))
    with pytest.raises(ValueError, match=rf"^checkpoint {ck} holds 9 tensors the model of its config.json does not "
                                         r"have: 'model.layers.2.input_layernorm.weight', 'model.layers.2.mlp."
                                         r"down_proj.weight', 'model.layers.2.mlp.gate_proj.weight' \(and 6 more\); "):
        svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=4, progress=False)
    assert not (tmp / "s").exists()


# ------------------------------------------------------------------------------------------- EoRA's reference


def _eora(tmp: Path, ref: Path) -> None:
    ck = tmp / "q"
    svdadapt.compress.quantize(make_tiny_llama(0), bits=3, group_size=16).save_pretrained(ck)
    svdadapt.init_checkpoint(ck, tmp / "s", method="eora", rank=4, reference=ref, calibration=_calibration(),
                             progress=False)


def test_a_reference_of_other_shapes_is_refused(tmp):
    make_tiny_llama(0, intermediate_size=96).save_pretrained(tmp / "ref")
    with pytest.raises(ValueError, match=rf"^the reference checkpoint '{tmp / 'ref'}' has module "
                                         r"'model.layers.0.mlp.gate_proj' of shape \(out, in\) = \(96, 64\), the "
                                         r"compressed model \(128, 64\)$"):
        _eora(tmp, tmp / "ref")
    assert not (tmp / "s").exists()


def test_a_reference_of_another_architecture_is_refused(tmp):
    llama = make_tiny_llama(0).config
    mistral = MistralConfig(**{k: getattr(llama, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                             "num_hidden_layers", "num_attention_heads",
                                                             "num_key_value_heads", "max_position_embeddings")})
    MistralForCausalLM(mistral).save_pretrained(tmp / "ref")  # the same module names and shapes
    with pytest.raises(ValueError, match=rf"^the reference checkpoint '{tmp / 'ref'}' is a 'mistral' model, the "
                                         r"compressed one a 'llama': EoRA compensates a model with its own "
                                         r"uncompressed weights$"):
        _eora(tmp, tmp / "ref")


# ------------------------------------------------------------------------------------------- Gemma


_GEMMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=64)


def _adapter(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_equals_wrap(out_dir: Path, pm) -> None:
    """Streamed factors equal wrap's bit for bit, and the streamed base is wrap's base."""
    factors = _adapter(out_dir)
    assert len(factors) == 2 * len(pm.svdadapt.init_factors)
    for n, (A, B) in pm.svdadapt.init_factors.items():
        key = next(k for k in factors if f".{n}.lora_A." in k)
        assert torch.equal(factors[key], A) and torch.equal(factors[key.replace("lora_A", "lora_B")], B), n
    state = pm.get_base_model().state_dict()
    reader = CheckpointReader(out_dir / "base")
    for key in reader.names:
        mine = key.replace(".weight", ".base_layer.weight")
        assert torch.equal(reader.get(key), state[mine if mine in state else key]), key


_GEMMAS = [GemmaConfig(**_GEMMA), Gemma2Config(**_GEMMA)]


@pytest.mark.parametrize("config", _GEMMAS, ids=["gemma", "gemma2"])
def test_gemma_embed_scale_is_rebuilt_as_from_pretrained_does(tmp, config):
    """Gemma scales its embeddings by a non-persistent buffer (embed_scale = sqrt(hidden), in fp32), which no
    checkpoint holds: the lazily loaded skeleton computes it with the model's own _init_weights."""
    from svdadapt.blockwise import find_stack
    from svdadapt.stream.lazy import LazyBlocks

    _seeded(config).save_pretrained(tmp / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp / "ck")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    x = token_ids(2, 8, 0, vocab=64)
    with LazyBlocks(skeleton, CheckpointReader(tmp / "ck"), *find_stack(skeleton)):
        got = skeleton.model.embed_tokens
        want = loaded.model.embed_tokens
        assert got.embed_scale.dtype == want.embed_scale.dtype and torch.equal(got.embed_scale, want.embed_scale)
        assert torch.equal(got.weight, want.weight)  # the loaded weight, not re-initialized by _init_weights
        assert torch.equal(got(x), want(x))


@pytest.mark.parametrize("config", _GEMMAS, ids=["gemma", "gemma2"])
def test_streamed_corda_on_gemma_equals_wrap(tmp, config):
    _seeded(config).save_pretrained(tmp / "ck")
    svdadapt.init_checkpoint(tmp / "ck", tmp / "s", method="corda", rank=4, calibration=_calibration(),
                             progress=False)
    pm = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(tmp / "ck"), "corda", 4, calibration=_calibration(),
                       progress=False)
    _assert_equals_wrap(tmp / "s", pm)


def test_streamed_eora_on_gemma_equals_wrap(tmp):
    model = _seeded(GemmaConfig(**_GEMMA))
    qmodel = svdadapt.compress.quantize(model, bits=3, group_size=16)
    model.save_pretrained(tmp / "ref")
    qmodel.save_pretrained(tmp / "q")
    svdadapt.init_checkpoint(tmp / "q", tmp / "s", method="eora", rank=4, reference=tmp / "ref",
                             calibration=_calibration(), progress=False)
    pm = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(tmp / "q"), "eora", 4,
                       reference=AutoModelForCausalLM.from_pretrained(tmp / "ref"), calibration=_calibration(),
                       progress=False)
    _assert_equals_wrap(tmp / "s", pm)


# ------------------------------------------------------------------------------------------- MoE layouts


_MOE = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)


@pytest.mark.parametrize("config", [MixtralConfig(**_MOE, num_local_experts=2),
                                    Qwen2MoeConfig(**_MOE, moe_intermediate_size=8, shared_expert_intermediate_size=16,
                                                   num_experts=2, num_experts_per_tok=2)], ids=["mixtral", "qwen2_moe"])
def test_streamed_corda_on_a_converted_moe_layout_equals_wrap(tmp, config, one_thread):
    """A checkpoint in transformers' per-expert key layout (Mixtral's block_sparse_moe.experts.{e}.w1 and the
    block_sparse_moe -> mlp renaming; Qwen2-MoE's experts.{e}.gate_proj / up_proj) is calibrated block by block
    through stream/experts.ModuleView (each block's experts stacked as from_pretrained stacks them): the adapter and
    the rewritten layers are wrap's on the loaded model, bit for bit, and the experts are copied as stored."""
    from safetensors.torch import load_file

    model = _seeded(config)
    model.save_pretrained(tmp / "ck")  # per-expert tensors: transformers' conversion reversed
    kw = dict(rank=2, calibration=_calibration(), progress=False, exclude_modules=["shared_expert_gate"])  # (1, 16)
    svdadapt.init_checkpoint(tmp / "ck", tmp / "s", method="corda", **kw)
    pm = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(tmp / "ck").eval(), "corda", **kw)
    adapter = load_file(str(tmp / "s" / "adapter" / "adapter_model.safetensors"))
    state = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert len(adapter) == len(state) > 0
    assert all(torch.equal(v, state[k.replace(".weight", ".default.weight")]) for k, v in adapter.items())
    base, stored = load_file(str(tmp / "s" / "base" / "model.safetensors")), load_file(str(tmp / "ck" / "model.safetensors"))
    assert base.keys() == stored.keys()
    assert all(torch.equal(base[k], stored[k]) for k in base if "experts" in k)


def test_streamed_pissa_on_a_converted_moe_layout_copies_the_experts_in_it(tmp):
    """Data-free methods read only the targets: the experts are copied in the checkpoint's layout, which
    from_pretrained converts as it loads the base."""
    model = _seeded(MixtralConfig(**_MOE, num_local_experts=2))
    model.save_pretrained(tmp / "ck")
    svdadapt.init_checkpoint(tmp / "ck", tmp / "s", method="pissa", rank=2, progress=False)
    targets = json.loads((tmp / "s" / "svdadapt.json").read_text())["targets"]
    assert sorted(targets) == [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]
    base = AutoModelForCausalLM.from_pretrained(tmp / "s" / "base").state_dict()
    for key, want in model.state_dict().items():
        if "experts" in key or "mlp.gate" in key:
            assert torch.equal(base[key], want), key
