"""Tiny MoE models built from configs (transformers 5: experts as 3-D parameters) and per-expert covariances under
svdadapt's naming, and PEFT ParamWrapper readers (each expert's delta, base, factors), shared by the
target_parameters tests."""

from __future__ import annotations

import torch
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def moe(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, vocab: int = 64):
    """A tiny MoE model (4 experts, 2 of them per token, 2 layers, ``vocab`` tokens), eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "mixtral":
            cfg = MixtralConfig(vocab_size=vocab, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2, max_position_embeddings=32)
            model = MixtralForCausalLM(cfg)
        elif family == "olmoe":
            cfg = OlmoeConfig(vocab_size=vocab, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                              max_position_embeddings=32, eos_token_id=None, pad_token_id=None, bos_token_id=None)
            model = OlmoeForCausalLM(cfg)
        else:
            cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=16, intermediate_size=20, moe_intermediate_size=8,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                 num_experts_per_tok=2, head_dim=4, max_position_embeddings=32)
            model = Qwen3MoeForCausalLM(cfg)
    return model.to(dtype).eval()


def covariances(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random well-conditioned per-expert covariances under the naming contract ``<module>.<param>[e]``; gate_up_proj
    given one (in, in) per expert, down_proj one stacked (E, in, in)."""
    g = torch.Generator().manual_seed(seed)
    covs = {}
    for name, m in model.named_modules():  # the attention projections ("all-linear")
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            X = torch.randn(4 * m.in_features, m.in_features, generator=g)
            covs[name] = X.mT @ X
    for name, p in model.named_parameters():
        if p.dim() != 3:
            continue
        E, _, d = p.shape
        X = torch.randn(E, 4 * d, d, generator=g)
        C = X.mT @ X
        if name.endswith("down_proj"):
            covs[name] = C
        else:
            covs.update({f"{name}[{e}]": C[e] for e in range(E)})
    return covs


def wrappers(peft_model) -> dict[str, torch.nn.Module]:
    """key ``<module>.<param>`` -> PEFT ParamWrapper; fails when there are none."""
    found = {}
    for n, m in peft_model.base_model.model.named_modules():
        if type(m).__name__ == "ParamWrapper":
            module = n.replace(".base_layer", "")
            found[f"{module}.{m.parameter_name}"] = m
    assert found
    return found


def delta(w) -> torch.Tensor:
    """PEFT's own s·B_e·A_e of every expert, (E, out, in) fp64 (a 2-D target: (1, out, in))."""
    d = w.get_delta_weight("default").detach().double()
    return d if d.dim() == 3 else d[None]


def abs_product(w) -> torch.Tensor:
    """s·|B_e|·|A_e| of every expert, (E, out, in) fp64: PEFT's get_delta_weight formula (einsum "o r e, e r i ->
    e o i" of lora_B (out, r, E) and lora_A (E, r, in)) on the absolute values, what rounding bounds scale with."""
    A, B = (t.detach().double().abs() for t in (w.lora_A["default"].weight, w.lora_B["default"].weight))
    E = w.num_experts
    return w.scaling["default"] * torch.einsum("ore,eri->eoi", B.reshape(B.shape[0], -1, E),
                                               A.reshape(E, -1, A.shape[-1]))


def base_of(w) -> torch.Tensor:
    """The (rewritten) base parameter a ParamWrapper wraps, as (E, out, in) fp64."""
    p = w.get_param().detach().double()
    return p if p.dim() == 3 else p[None]


def stored(model, key: str) -> torch.Tensor:
    """The parameter ``key`` of ``model`` as (E, out, in) fp64."""
    module, _, param = key.rpartition(".")
    p = getattr(model.get_submodule(module), param).detach().double()
    return p if p.dim() == 3 else p[None]
