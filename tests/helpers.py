"""What several test files need, in one place: tiny models, token batches, the LoRA product of a PEFT layer,
comparisons, a short training loop.

Import as ``from helpers import ...``: pyproject's ``[tool.pytest.ini_options] pythonpath = ["tests"]`` puts this
folder on ``sys.path``. Fixtures stay in conftest.py; plain functions live here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

TOY_SIZES = (24, 40, 32, 16)
# BLAS threads of the tests that fix a count (the one_thread fixture, spawned ranks): 1, or SVDADAPT_TEST_THREADS to
# run them at another summation order (.ci/run does); bit-identity between processes needs the same count on both
TEST_THREADS = int(os.environ.get("SVDADAPT_TEST_THREADS", "1"))


# ------------------------------------------------------------------------------------------------------ models
def tiny_llama_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_tokenizer(vocab: int = 300):
    """A byte-level BPE with ``vocab`` tokens trained in memory on a few pydoc topics (no download)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:8]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A small random LlamaForCausalLM (2 layers, hidden 64, vocab 128), the same weights for the same seed,
    without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.to(dtype).eval()


def save_tiny_model(d, seed: int, vocab: int, tokenizer: bool = True):
    """A tiny Llama (``make_tiny_llama(seed, vocab_size=vocab)``) saved as a Hugging Face directory ``d``, with a
    ``tiny_tokenizer(vocab)`` beside it unless ``tokenizer`` is False; returns ``d``."""
    make_tiny_llama(seed, vocab_size=vocab).save_pretrained(d)
    if tokenizer:
        tiny_tokenizer(vocab).save_pretrained(d)
    return d


@torch.no_grad()
def set_dynamic_scales(model: nn.Module, names) -> None:
    """Each module of ``names`` (quantization scheme applied by compressed-tensors) given the scale and zero point
    of its own weight by the library's ``compute_dynamic_scales_and_zp``."""
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    for n in names:
        m = model.get_submodule(n)
        scale, zp = compute_dynamic_scales_and_zp(m.weight.detach(), m.quantization_scheme.weights, m)
        m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.copy_(zp.reshape(m.weight_zero_point.shape))


def save_compressed_llama(d, model: LlamaForCausalLM, symmetric: bool = True):
    """``model`` (a tiny Llama, changed) W4A16 pack-quantized in groups of 32 (its Linears but lm_head), scales from
    compressed-tensors' own ``compute_dynamic_scales_and_zp``, compressed by its ModelCompressor and saved into ``d``
    as transformers saves it (config.json with the ``quantization_config``); returns ``d``."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    import svdadapt

    names = list(svdadapt.resolve_targets(model))
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=32, symmetric=symmetric)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    set_dynamic_scales(model, names)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(d)
    compressor.update_config(d)
    return d


def toy(seed: int = 0, sizes: tuple[int, ...] = TOY_SIZES, dtype: torch.dtype = torch.float32,
        bias: bool = True) -> nn.Sequential:
    """Linears ``sizes[0] -> sizes[1] -> ...`` with a GELU between each two, weights from a private generator
    (the global RNG is left alone). One Linear for two sizes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(a, b, bias=bias)] + ([nn.GELU()] if i < len(sizes) - 2 else [])
        return nn.Sequential(*layers).to(dtype).eval()


def toy_input(sizes: tuple[int, ...] = TOY_SIZES, dtype: torch.dtype = torch.float32, rows: int = 5,
              seed: int = 1) -> torch.Tensor:
    """(rows, sizes[0]) Gaussian inputs for ``toy(sizes=sizes)``."""
    return torch.randn(rows, sizes[0], generator=torch.Generator().manual_seed(seed)).to(dtype)


def token_ids(rows: int, seq: int, seed: int, vocab: int = 128) -> torch.Tensor:
    """(rows, seq) random token ids from a private generator."""
    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ running
@torch.no_grad()
def out(model: nn.Module, x: Any) -> torch.Tensor:
    """The model's output on ``x`` as fp32, without autograd: logits for token ids (a long tensor) or a batch
    dict, the plain output for a float tensor."""
    if isinstance(x, Mapping):
        return model(**x).logits.float()
    if x.dtype == torch.long:
        return model(input_ids=x).logits.float()
    return model(x).float()


def train(peft_model: nn.Module, x: torch.Tensor, steps: int = 5, lr: float = 2e-2) -> nn.Module:
    """A few AdamW steps of next-token loss on the fixed batch ``x``; the adapter moves well away from its init.
    Returns the model, in eval mode."""
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        peft_model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval()


# ------------------------------------------------------------------------------------------------------ LoRA layers
def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA layers (adapter "default") of a PEFT model, by module name. Fails when there are none, so
    a test that loops over them can never pass on an empty loop."""
    layers = {n: m for n, m in peft_model.base_model.model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert layers, f"no LoRA layers in {type(peft_model).__name__}"
    return layers


def lora_product(layer: nn.Module) -> torch.Tensor:
    """s·B·A of a PEFT LoRA layer: what it adds to the base weight, fp64 (out, in), detached."""
    A = layer.lora_A["default"].weight.detach().double()  # (r, in)
    B = layer.lora_B["default"].weight.detach().double()  # (out, r)
    return layer.scaling["default"] * (B @ A)

def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def matrix_with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M fp32 (m, n), U (m, k), V (n, k)) with M = U·diag(s)·Vᵀ in fp64 before the fp32 rounding, k = len(s)."""
    g = gen(seed)
    U = torch.linalg.qr(torch.randn(m, s.numel(), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=torch.float64)).Q
    return ((U * s.double()) @ V.mT).float(), U, V



# ------------------------------------------------------------------------------------------------------ comparisons
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius, in fp64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (in fp64): the largest entrywise change relative to b's largest entry."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def same_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Two state dicts (or any name -> tensor maps: a safetensors file comes back sorted by name) hold the same
    names and bit-identical tensors under each."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_init_factors(a: nn.Module, b: nn.Module) -> bool:
    """Two svdadapt-wrapped models started from bit-identical (A0, B0) on the same, non-empty set of layers."""
    fa, fb = a.svdadapt["init_factors"], b.svdadapt["init_factors"]
    return bool(fa) and list(fa) == list(fb) and all(
        torch.equal(fa[n][0], fb[n][0]) and torch.equal(fa[n][1], fb[n][1]) for n in fa)


def raises_exactly(exc: type[BaseException], message: str):
    """``pytest.raises`` that wants exactly ``message`` (the whole text, not a pattern)."""
    return pytest.raises(exc, match=r"\A" + re.escape(message) + r"\Z")


def output_bytes(path) -> bytes:
    """An output file's bytes, for comparing two output directories of one job: of svdadapt.json without the
    manifest's entry of adapter/adapter_config.json, which names its own base directory (so its hash differs
    between two directories); every other file as it is."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.name != "svdadapt.json":
        return path.read_bytes()
    meta = json.loads(path.read_text())
    meta.get("files", {}).pop("adapter/adapter_config.json", None)
    return json.dumps(meta).encode()


# ------------------------------------------------------------------------------------------------------ MoE models
def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def random_routers(model: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Router weights (and biases) drawn N(0, scale²) (the configs' init gives near-uniform routing): peaked,
    unequal routing weights, so that weighting by them changes the covariances."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        router = getattr(layer.mlp, "gate", None) or layer.mlp.router
        for p in router.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def tiny_mixtral(seed: int = 0, **overrides) -> nn.Module:
    """A tiny MixtralForCausalLM: 2 layers, hidden 32, 4 experts of intermediate 24, top-2."""
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    cfg = transformers.MixtralConfig(**{**kw, **overrides})
    return random_routers(_seeded(seed, lambda: transformers.MixtralForCausalLM(cfg)), seed)


def tiny_qwen2_moe(seed: int = 0) -> nn.Module:
    """A tiny Qwen2MoeForCausalLM: 2 MoE layers, 6 experts of intermediate 16, top-2 with the raw softmax
    probabilities as weights (norm_topk_prob=False), a shared expert (nn.Linear) of 40."""
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=40,
        intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, max_position_embeddings=64)
    return random_routers(_seeded(seed, lambda: transformers.Qwen2MoeForCausalLM(cfg)), seed)


def tiny_gpt_oss(seed: int = 0) -> nn.Module:
    """A tiny GptOssForCausalLM: experts stored transposed, (E, H, 2·I) with interleaved gate/up columns and
    biases, its own clamped SwiGLU, routing by a softmax over the top-k logits; its experts' forward is
    (hidden_states, router_indices, routing_weights)."""
    cfg = transformers.GptOssConfig(
        vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["full_attention"] * 2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = random_routers(_seeded(seed, lambda: transformers.GptOssForCausalLM(cfg)), seed)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        b = layer.mlp.experts.gate_up_proj_bias
        b.data.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return model


def tiny_qwen3_moe(seed: int = 0) -> nn.Module:
    """A tiny Qwen3MoeForCausalLM: 2 MoE layers, 8 experts of intermediate 16, top-2 renormalized
    (norm_topk_prob=True), no shared expert."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, moe_intermediate_size=16, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=64)
    return random_routers(_seeded(seed, lambda: transformers.Qwen3MoeForCausalLM(cfg)), seed)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (flat uint8): equal for two tensors exactly when they are equal bit for bit."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def safetensors_dict(path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, by name."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
