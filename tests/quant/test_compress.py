"""Simulated compression: k-bit round-to-nearest group quantization and N:M / unstructured pruning."""

from __future__ import annotations

import math

import pytest
import torch

import svdadapt
from svdadapt.quant.compress import prune_weight, quantize_weight

from helpers import make_tiny_llama, raises_exactly, same_state, token_ids, toy


def _uniform(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(out, inp, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _groups(W: torch.Tensor, g: int) -> list[torch.Tensor]:
    """The (out, width) column blocks quantized together (the last one may be narrower)."""
    return list(W.split(g, dim=1))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_grid_and_error_bound(bits, symmetric):
    W = torch.randn(16, 80, generator=torch.Generator().manual_seed(bits))  # 80 = 2 groups of 32 + one of 16
    Q = quantize_weight(W, bits, group_size=32, symmetric=symmetric)
    assert Q.shape == W.shape and Q.dtype == W.dtype
    q_max = 2**bits - 1
    for Wg, Qg in zip(_groups(W, 32), _groups(Q, 32)):
        lo, hi = Wg.amin(1, keepdim=True).clamp(max=0), Wg.amax(1, keepdim=True).clamp(min=0)
        scale = (2 * torch.maximum(-lo, hi) if symmetric else hi - lo) / q_max
        for row in range(Wg.shape[0]):
            assert Qg[row].unique().numel() <= 2**bits
        codes = Qg / scale
        # values are integer multiples of the scale (offset by the integer zero point), 0 exactly representable
        # codes are integers stored in fp32: only fp32 division noise (≤ u·|code| ≤ 1e-5 for |code| ≤ 127)
        assert (codes - codes.round()).abs().max() < 1e-3
        # round to nearest: at most half a step (reached exactly at the top of a symmetric grid), + fp32 noise
        # round-to-nearest is within half a step; 1e-6·max is the fp32 scale division's rounding (a few u)
        assert ((Wg - Qg).abs() <= scale / 2 + 1e-6 * Wg.abs().max()).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_rms_error_is_what_k_bits_give(bits):
    """Uniform weights on [-1, 1]: step 2 / (2^k − 1), RMS error step / √12 (within 3%)."""
    W = _uniform(256, 512)
    Q = quantize_weight(W, bits, group_size=128)
    # each group's range is within a hair of [-1, 1], so the step is ~2 / (2^k - 1)
    expected = 2 / (2**bits - 1) / math.sqrt(12)
    rms = (W - Q).pow(2).mean().sqrt().item()
    assert abs(rms / expected - 1) < 0.03, (rms, expected)


def test_quantize_exact_small_example():
    W = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.4, 0.6, 2.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    Q = quantize_weight(W, bits=2, group_size=4)
    # row 0: scale 1, zero 0 -> exact. row 1: lo=-1, hi=2, scale 1, zero 1 -> [-1, 0, 1, 2]
    # row 2: all zero stays zero. row 3: lo=0 (0 on the grid), hi=0.5, scale 1/6 -> 0.5 is code 3
    assert torch.equal(Q, torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 1.0, 2.0], [0.0] * 4, [0.5] * 4]))
    assert torch.equal(quantize_weight(W, bits=8, group_size=None), quantize_weight(W, bits=8, group_size=4))


def test_quantize_model_copy_original_untouched():
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = svdadapt.compress.quantize(model, bits=3, group_size=32)
    assert q is not model
    assert same_state(model.state_dict(), before)
    qs = q.state_dict()
    for name in svdadapt.resolve_targets(model):
        w, wq = model.get_submodule(name).weight, q.get_submodule(name).weight
        assert wq.data_ptr() != w.data_ptr()
        assert torch.equal(wq, quantize_weight(w, 3, 32))
        assert not torch.equal(wq, w)
    # embeddings, norms and the output head are not targets
    assert torch.equal(qs["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(qs["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(svdadapt.compress.quantize(model, bits=3, group_size=32).state_dict()["model.layers.0.mlp.up_proj.weight"],
                       qs["model.layers.0.mlp.up_proj.weight"])  # deterministic


def test_quantize_keeps_dtype():
    model = make_tiny_llama(dtype=torch.bfloat16)
    q = svdadapt.compress.quantize(model, bits=4, group_size=64, target_modules=["q_proj"])
    assert q.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(q.model.layers[0].self_attn.k_proj.weight, model.model.layers[0].self_attn.k_proj.weight)


def test_quantize_errors():
    model = toy(sizes=(8, 4))
    for bits in (1, 9, 3.0, True):
        with raises_exactly(ValueError, f"bits must be an integer from 2 to 8, got {bits!r}"):
            svdadapt.compress.quantize(model, bits=bits)
    for g in (0, -1, 2.5):
        with raises_exactly(ValueError, f"group_size must be a positive integer or None (one group per row), got {g!r}"):
            svdadapt.compress.quantize(model, bits=4, group_size=g)
    with pytest.raises(ValueError, match=r"^target_modules=\['nope'\] matched no adaptable layer \(nn.Linear"):
        svdadapt.compress.quantize(model, bits=4, target_modules=["nope"])


# ------------------------------------------------------------------------------------------------------------ prune
def test_prune_2_4_magnitude():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    P = prune_weight(W, pattern="2:4")
    blocks_w, blocks_p = W.reshape(32, 16, 4), P.reshape(32, 16, 4)
    assert ((blocks_p == 0).sum(-1) == 2).all()  # exactly 2 zeros in every 4 along the input dimension
    kept = blocks_p != 0
    assert torch.equal(blocks_p[kept], blocks_w[kept])  # survivors unchanged
    kept_min = torch.where(kept, blocks_w.abs(), torch.inf).amin(-1)
    dropped_max = torch.where(kept, -torch.inf, blocks_w.abs()).amax(-1)
    assert (kept_min >= dropped_max).all()  # the two largest magnitudes survive


def test_prune_activation_aware_uses_input_norms():
    """|W|·√diag(C): a column whose input is 100x larger survives though its weights are smaller."""
    W = torch.tensor([[1.0, 0.9, 0.5, 0.1]] * 3)
    norms = torch.tensor([1.0, 1.0, 100.0, 1.0])
    assert torch.equal(prune_weight(W, pattern="2:4") != 0, torch.tensor([[True, True, False, False]] * 3))
    assert torch.equal(prune_weight(W, pattern="2:4", input_norm=norms) != 0,
                       torch.tensor([[True, False, True, False]] * 3))

    model = make_tiny_llama()
    covs = svdadapt.collect_covariances(model, [token_ids(2, 16, seed=0)], progress=False)
    pm = svdadapt.compress.prune(model, pattern="2:4", calibration=covs)
    mm = svdadapt.compress.prune(model, pattern="2:4")
    name = "model.layers.0.mlp.down_proj"
    W = model.get_submodule(name).weight
    expected = prune_weight(W, pattern="2:4", input_norm=covs[name].diagonal().sqrt())
    assert torch.equal(pm.get_submodule(name).weight, expected)
    assert not torch.equal(pm.get_submodule(name).weight, mm.get_submodule(name).weight)
    assert ((pm.get_submodule(name).weight.reshape(-1, 4) == 0).sum(-1) == 2).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_prune_unstructured_per_row(sparsity):
    W = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    P = prune_weight(W, sparsity=sparsity)
    zeros = (P == 0).sum(1)
    assert (zeros == round(sparsity * 40)).all()
    if 0 < sparsity:
        assert (torch.where(P != 0, W.abs(), torch.inf).amin(1) >= torch.where(P == 0, W.abs(), -torch.inf).amax(1)).all()


def test_prune_model_copy_original_untouched_and_deterministic():
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p1 = svdadapt.compress.prune(model)  # 2:4 by default
    p2 = svdadapt.compress.prune(model, pattern="2:4")
    assert same_state(model.state_dict(), before)
    for name in svdadapt.resolve_targets(model):
        w1 = p1.get_submodule(name).weight
        assert torch.equal(w1, p2.get_submodule(name).weight)
        assert (w1 == 0).float().mean().item() == 0.5
    half = svdadapt.compress.prune(model, sparsity=0.5)
    assert (half.get_submodule("model.layers.1.mlp.up_proj").weight == 0).float().mean().item() == 0.5


def test_prune_errors():
    model = toy(sizes=(6, 4))
    cases = [
        (dict(pattern="3:2"), "pattern must look like 'N:M' with 0 < N < M (e.g. '2:4'), got '3:2'"),
        (dict(pattern="half"), "pattern must look like 'N:M' with 0 < N < M (e.g. '2:4'), got 'half'"),
        (dict(pattern="2:4", sparsity=0.5), "pass either pattern= or sparsity=, not both (got pattern='2:4', sparsity=0.5)"),
        (dict(sparsity=1.0), "sparsity must be a number in [0, 1), got 1.0"),
        (dict(sparsity=-0.1), "sparsity must be a number in [0, 1), got -0.1"),
        (dict(pattern="2:4"), "module '0' has in_features=6, not a multiple of M in pattern '2:4'"),
        (dict(pattern="1:3", calibration={}), "calibration has no covariance for targeted module '0'"),
        (dict(pattern="1:3", calibration={"0": torch.eye(4)}), "covariance for '0' has shape (4, 4), expected (6, 6)"),
    ]
    for kw, msg in cases:
        with raises_exactly(ValueError, msg):
            svdadapt.compress.prune(model, **kw)
