"""Shared fixtures: tiny random models (fast) and the real SmolLM2-135M (slow, loaded once per session)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A small random LlamaForCausalLM, the same weights for the same seed, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.to(dtype).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture(scope="session")
def _smollm2_session():
    from svdadapt.loading import load_smollm2

    return load_smollm2()


@pytest.fixture
def smollm2(_smollm2_session):
    """``(model, tokenizer)``: a private deep copy of the real SmolLM2-135M-Instruct (fp32, eval), so tests
    may wrap or train it freely. Mark tests that use it ``@pytest.mark.slow``."""
    model, tok = _smollm2_session
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def smollm2_dir(_smollm2_session, tmp_path_factory):
    """The real model saved once as an ordinary Hugging Face directory (reloads in ~1 s)."""
    model, tok = _smollm2_session
    d = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def one_thread():
    """Many small BLAS/LAPACK calls: with other processes on the CPU, a second OpenMP thread makes them
    up to 100x slower (spin-waiting), and one thread is as fast when the machine is quiet."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
