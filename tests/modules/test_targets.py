"""Target selection on MoE models: transformers 5 stores the routed experts as 3-D parameters of one module
(``experts.gate_up_proj`` (E, 2·I, H), ``experts.down_proj`` (E, H, I)), not as layers; a selector naming them
says so and names the ``target_parameters`` that would select them."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import svdadapt
from helpers import raises_exactly

def _way_out(suggested: list[str]) -> str:
    return (f"which are parameters, not layers: pass them as target_parameters={suggested!r} (PEFT's meaning; "
            "docs/experts.md)")


def _model(kind: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "mixtral":
            return MixtralForCausalLM(MixtralConfig(
                vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


@pytest.mark.parametrize("kind, cls, gate_up", [("mixtral", "MixtralForCausalLM", (4, 32, 32)),
                                                ("qwen2_moe", "Qwen2MoeForCausalLM", (4, 32, 32))])
def test_expert_parameters_are_named_as_parameters(kind, cls, gate_up):
    model = _model(kind)
    down = tuple(model.model.layers[0].mlp.experts.down_proj.shape)
    first = f"model.layers.0.mlp.experts.gate_up_proj {gate_up}"
    with raises_exactly(ValueError, f"target_modules entry 'experts' matched no adaptable layer but 4 parameters of 3 "
                        f"or more dimensions in {cls} ({first}, model.layers.0.mlp.experts.down_proj {down} ...; MoE "
                        f"expert weights), {_way_out(['experts.down_proj', 'experts.gate_up_proj'])}"):
        svdadapt.resolve_targets(model, ["experts"])
    with raises_exactly(ValueError, f"target_modules entry 'gate_up_proj' matched no adaptable layer but 2 parameters "
                        f"of 3 or more dimensions in {cls} ({first}, model.layers.1.mlp.experts.gate_up_proj "
                        f"{gate_up}; MoE expert weights), {_way_out(['experts.gate_up_proj'])}"):
        svdadapt.wrap(model, "pissa", rank=2, target_modules=["gate_up_proj"], progress=False)
    with pytest.raises(ValueError, match=r"^target_modules='\.\*experts\.\*' matched no adaptable layer but 4 "):
        svdadapt.resolve_targets(model, ".*experts.*")
    with pytest.raises(ValueError, match=r"^target_modules entry 'experts' matched no adaptable layer but 4 "):
        svdadapt.resolve_targets(model, ["q_proj", "experts"])  # not silently dropped beside a layer that matches


def test_other_selectors_are_unchanged():
    model = _model("qwen2_moe")
    assert len(svdadapt.resolve_targets(model, ["q_proj", "no_such_layer"])) == 2  # PEFT's rule: any entry may miss
    shared = svdadapt.resolve_targets(model, ["shared_expert.up_proj"])
    assert list(shared) == [f"model.layers.{i}.mlp.shared_expert.up_proj" for i in range(2)]
    with pytest.raises(ValueError, match=r"^target_modules=\['qkv'\] matched no adaptable layer \(nn\.Linear"):
        svdadapt.resolve_targets(model, ["qkv"])
    assert "model.layers.0.mlp.experts.down_proj" not in svdadapt.resolve_targets(model)  # all-linear: layers only


def test_convolution_kernels_are_not_called_expert_parameters():
    """A Conv3d's 5-D kernel (a conv kind svdadapt does not adapt) is a layer's weight, not stacked expert weights:
    the one-line message for a module no kind reads."""
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with raises_exactly(ValueError, "module '0' is a Conv3d, which no layer kind of svdadapt reads (kinds: nn.Linear, "
                        "transformers Conv1D, nn.Embedding, nn.Conv1d/nn.Conv2d, bitsandbytes Linear4bit/Linear8bitLt, "
                        "HQQ HQQLinear, torchao quantized Linear, optimum-quanto QLinear, compressed-tensors compressed "
                        "Linear); if its forward is linear in its input: svdadapt.register_linear(Conv3d)"):
        svdadapt.resolve_targets(model, ["0"])
    with raises_exactly(ValueError, "target_modules=['nope'] matched no adaptable layer (nn.Linear, transformers Conv1D, "
                        "nn.Embedding, nn.Conv1d/nn.Conv2d, bitsandbytes Linear4bit/Linear8bitLt, HQQ HQQLinear, "
                        "torchao quantized Linear, optimum-quanto QLinear, compressed-tensors compressed Linear) in "
                        "Sequential; adaptable layers are: 2"):
        svdadapt.resolve_targets(model, ["nope"])
