"""Simulated compression of MoE expert parameters (svdadapt.compress with target_parameters): each expert's
(out, in) matrix quantized or pruned on its own equals quantize_weight / prune_weight on that matrix; Linear
targets and the original model are untouched; gpt-oss's transposed layout is read as (out, in)."""

from __future__ import annotations

import warnings

import pytest
import torch

import svdadapt
from helpers import raises_exactly, tiny_gpt_oss, tiny_mixtral, tiny_qwen2_moe, token_ids
from svdadapt.calibration.experts import expert_key
from svdadapt.quant.compress import prune_weight, quantize_weight

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def _matrices(model, transposed: bool = False) -> dict[str, torch.Tensor]:
    """``<param>[e]`` -> expert e's (out, in) matrix (a copy), read independently of the library."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for p in ("gate_up_proj", "down_proj"):
            W = getattr(layer.mlp.experts, p).detach()
            for e in range(W.shape[0]):
                out[expert_key(f"model.layers.{i}.mlp.experts.{p}", e)] = (W[e].mT if transposed else W[e]).clone()
    return out


@pytest.mark.parametrize("make, transposed", [(tiny_mixtral, False), (tiny_qwen2_moe, False), (tiny_gpt_oss, True)])
def test_quantize_each_expert_on_its_own(make, transposed):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = svdadapt.compress.quantize(model, bits=3, group_size=8, target_modules=None, target_parameters=PARAMS)
    got, orig = _matrices(q, transposed), _matrices(model, transposed)
    for k, W in orig.items():
        assert torch.equal(got[k], quantize_weight(W, 3, group_size=8)), k  # the same function on the same matrix
        assert not torch.equal(got[k], W)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original untouched
    # nothing else changed: attention and the routers are the original's
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}


def test_linear_targets_and_experts_together():
    model = tiny_mixtral()
    both = svdadapt.compress.quantize(model, bits=4, target_modules=["q_proj"], target_parameters=["down_proj"])
    alone = svdadapt.compress.quantize(model, bits=4, target_modules=["q_proj"])
    for i in range(2):
        assert torch.equal(both.model.layers[i].self_attn.q_proj.weight, alone.model.layers[i].self_attn.q_proj.weight)
        experts, original = both.model.layers[i].mlp.experts, model.model.layers[i].mlp.experts
        assert torch.equal(experts.gate_up_proj, original.gate_up_proj)
        W = model.model.layers[i].mlp.experts.down_proj.detach()
        assert all(torch.equal(both.model.layers[i].mlp.experts.down_proj[e], quantize_weight(W[e], 4))
                   for e in range(W.shape[0]))


@pytest.mark.parametrize("kw", [{"pattern": "2:4"}, {"sparsity": 0.5}])
def test_prune_each_expert_on_its_own(kw):
    model = tiny_qwen2_moe()
    p = svdadapt.compress.prune(model, target_modules=None, target_parameters=PARAMS, **kw)
    got = _matrices(p)
    for k, W in _matrices(model).items():
        assert torch.equal(got[k], prune_weight(W, **kw)), k


def test_wanda_scores_from_each_experts_covariance():
    model = tiny_mixtral()
    batches = [{"input_ids": token_ids(4, 24, 5)}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few routed tokens per expert: pooled fallback, warned
        covs = svdadapt.collect_covariances(model, batches, target_modules=None, target_parameters=PARAMS,
                                            progress=False)
    p = svdadapt.compress.prune(model, "2:4", calibration=covs, target_modules=None, target_parameters=PARAMS)
    got = _matrices(p)
    for k, W in _matrices(model).items():
        norm = covs[k].diagonal().clamp_min(0).sqrt()
        assert torch.equal(got[k], prune_weight(W, pattern="2:4", input_norm=norm)), k
    partial = {k: v for k, v in covs.items() if not k.endswith("down_proj[1]")}
    with raises_exactly(ValueError, "calibration has no covariance for targeted module "
                                    "'model.layers.0.mlp.experts.down_proj[1]'"):
        svdadapt.compress.prune(model, "2:4", calibration=partial, target_modules=None, target_parameters=PARAMS)


def test_refusals():
    model = tiny_mixtral()
    with raises_exactly(ValueError, "target_modules=None and no target_parameters: nothing to compress"):
        svdadapt.compress.quantize(model, bits=4, target_modules=None)
    with raises_exactly(ValueError, "target_parameters entry 'experts.w2' matched no parameter of MixtralForCausalLM"):
        svdadapt.compress.quantize(model, bits=4, target_modules=None, target_parameters=["experts.w2"])
    with raises_exactly(ValueError, "module 'model.layers.0.mlp.experts.down_proj[0]' has in_features=24, not a "
                                    "multiple of M in pattern '5:7'"):
        svdadapt.compress.prune(model, "5:7", target_modules=None, target_parameters=["down_proj"])
    model.model.layers[1].mlp.experts.gate_up_proj.data[2, 0, 0] = float("nan")
    with raises_exactly(ValueError, "expert 'model.layers.1.mlp.experts.gate_up_proj[2]' has a weight with NaN or "
                                    "inf; cannot compress it"):
        svdadapt.compress.quantize(model, bits=4, target_modules=None, target_parameters=PARAMS)
