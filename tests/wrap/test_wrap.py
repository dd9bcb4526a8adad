"""wrap() with PiSSA and MiLoRA: exact at init, the right components, parity with PEFT, determinism,
trainability, target matching and errors."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import svdadapt
from svdadapt import METHODS, wrap

from bounds import gamma, gemm_error, half_ulp, svd_backward_error, truncated_svd_error
from helpers import lora_layers, lora_product, max_rel, out, rel, token_ids, toy, toy_input

RANK = 4
IDS = token_ids(2, 12, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# ------------------------------------------------------------------------------- 1. exact at init
def change_at_init(model: nn.Module, x: torch.Tensor, method: str, rank: int = RANK):
    """(max |output change| relative to the largest output, the wrapped model)."""
    before = out(model, x)
    peft_model = wrap(model, method, rank, progress=False)
    return max_rel(out(peft_model, x), before), peft_model


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_exact_at_init_fp32_tiny_llama(tiny_llama, method: str) -> None:
    change, peft_model = change_at_init(tiny_llama(seed=0), IDS, method)
    # two fp32 forwards (W·x vs base·x + B·(A·x)): per layer γ_{n+r}·|W||x| (n ≤ 128: ≤ 8e-6 worst case, ~√n·u =
    # 7e-7 typical, Higham & Mary), through 2 blocks and the head; measured 2-6e-7 on AVX2/AVX-512, 1-2 threads
    assert change <= 1e-5
    assert len(lora_layers(peft_model)) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); lm_head excluded


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_exact_at_init_fp32_toy_linears(method: str) -> None:
    assert change_at_init(toy(), toy_input(), method)[0] <= 1e-5  # as above: 3 fp32 layers, n ≤ 40


def test_exact_at_init_fp32_randomized_path() -> None:
    """Matrices large enough that svd='auto' takes the block-Krylov sketch."""
    sizes = (300, 420, 300)
    # as above, n ≤ 420: √n·u ≈ 1.2e-6 per layer, two layers
    assert change_at_init(toy(sizes=sizes), toy_input(sizes), "pissa", rank=16)[0] <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_half_precision_change_no_larger_than_casting(tiny_llama, dtype: torch.dtype, method: str) -> None:
    """A bf16/fp16 model: the residual base is fl32(W − s·B·A) (one fp32 addmm of length r) rounded once to the
    dtype, so per element the effective weight base + s·B·A is off the model's weight by at most one rounding
    of the residual plus the fp32 accumulation error γ_{r+2}·(|W| + s·|B|·|A|). In RMS it moves no more than
    casting the fp32 weights to the dtype moved them: a statistical claim (the fp32 term is ~2^-14 of a half
    ulp). PiSSA's residual is smaller than W, so its rounding error is clearly smaller; MiLoRA's is W less its
    smallest components, the same size as W, so the two roundings are equally distributed and agree up to
    their sampling noise."""
    W32 = linear_weights(tiny_llama(seed=1))
    model = tiny_llama(seed=1, dtype=dtype)
    peft_model = wrap(model, method, RANK, progress=False)
    wrap_sq = cast_sq = 0.0
    n = 0
    for name, layer in lora_layers(peft_model).items():
        base = layer.get_base_layer().weight.detach()
        assert base.dtype == dtype and layer.lora_A["default"].weight.dtype == torch.float32
        Wd = W32[name].to(dtype).double()  # the weight the wrapped model started from
        d = lora_product(layer)
        residual = Wd - d  # what the base should hold, before rounding
        err = base.double() - residual
        # fp32 addmm error (Higham 3.13: scales with |B|·|A|, not |B·A|), then one round-to-nearest of the
        # fp32 value, whose magnitude is at most |residual| + that error
        fp32 = gemm_error(layer.lora_B["default"].weight, layer.lora_A["default"].weight, C=Wd,
                          alpha=layer.scaling["default"])
        assert bool((err.abs() <= half_ulp(residual.abs() + fp32, dtype) + fp32).all()), name
        wrap_sq += float(err.pow(2).sum())  # = ‖(base + s·B·A) − W_dtype‖²
        cast_sq += float((Wd - W32[name].double()).pow(2).sum())
        n += err.numel()
    ratio = math.sqrt(wrap_sq / cast_sq)
    if method == "pissa":
        assert ratio <= 1.0  # measured ~0.6-0.8: the residual's ulps are smaller than W's
    else:
        # the RMS of n uniform rounding errors fluctuates by about 0.63/√n relative: allow 3 of those
        assert ratio <= 1.0 + 3 * 0.63 / math.sqrt(n)


# ------------------------------------------------------------------------------- 2. right components
@pytest.mark.parametrize("method,alpha", [("pissa", None), ("pissa", 16.0), ("milora", None), ("milora", 2.0)])
def test_adapter_is_the_truncated_svd(tiny_llama, method: str, alpha: float | None) -> None:
    model = tiny_llama(seed=2)
    W0 = linear_weights(model)
    peft_model = wrap(model, method, RANK, alpha=alpha, svd="full", progress=False)
    for name, layer in lora_layers(peft_model).items():
        W = W0[name].double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        largest = method == "pissa"
        keep = slice(0, RANK) if largest else slice(S.numel() - RANK, S.numel())
        best = (U[:, keep] * S[keep]) @ Vh[keep]
        # fp32 LAPACK's backward error, amplified by σ_c / gap at the cut (bounds.truncated_svd_error)
        bound = truncated_svd_error(W0[name], RANK, largest, S=S) / float(best.norm())
        assert rel(lora_product(layer), best) <= bound, name
        base = layer.get_base_layer().weight.double()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        # residual + adapter = W up to the fp32 addmm forming the residual (γ_{r+2}·(|W| + s·|B|·|A|))
        fp32 = gemm_error(B, A, C=W0[name], alpha=layer.scaling["default"])
        assert rel(base + lora_product(layer), W) <= float(fp32.norm() / W.norm()), name
        expected_scaling = 1.0 if alpha is None else alpha / RANK
        assert layer.scaling["default"] == expected_scaling


# ------------------------------------------------------------------------------- 3. parity with PEFT
@pytest.mark.parametrize("alpha,use_rslora", [(RANK, False), (3 * RANK, False), (RANK / 2, False), (2 * RANK, True)])
def test_parity_with_peft_pissa(tiny_llama, alpha: float, use_rslora: bool) -> None:
    ours = wrap(tiny_llama(seed=3), "pissa", RANK, alpha=alpha, use_rslora=use_rslora, svd="full", progress=False)
    config = LoraConfig(r=RANK, lora_alpha=alpha, use_rslora=use_rslora, target_modules="all-linear",
                        init_lora_weights="pissa", task_type="CAUSAL_LM")
    theirs = get_peft_model(tiny_llama(seed=3), config)
    mine, peft_layers = lora_layers(ours), lora_layers(theirs)
    assert set(mine) == set(peft_layers)
    scaling = alpha / math.sqrt(RANK) if use_rslora else alpha / RANK
    W0 = linear_weights(tiny_llama(seed=3))
    for name in mine:
        a, b = mine[name], peft_layers[name]
        assert a.scaling["default"] == pytest.approx(scaling) and b.scaling["default"] == pytest.approx(scaling)
        # two fp32 SVDs (ours of Wᵀ when wide, PEFT's of W), each within truncated_svd_error of [W]_r
        W = W0[name].double()
        S = torch.linalg.svdvals(W)
        product_err = 2 * truncated_svd_error(W0[name], RANK, S=S)
        assert rel(lora_product(a), lora_product(b)) <= product_err / float(S[:RANK].norm()), name
        # the bases: the products' difference plus each side's fp32 subtraction (γ_{r+2}·(|W| + s·|B||A|))
        fp32 = 2 * float(gemm_error(a.lora_B["default"].weight, a.lora_A["default"].weight, C=W,
                                    alpha=scaling).norm())
        assert rel(a.get_base_layer().weight, b.get_base_layer().weight) <= (product_err + fp32) / float(
            S[RANK:].norm()), name
        # the same split of √(σ/s) between A and B: factors agree up to the sign of each component. Row norms
        # are √(σ_i/s)·‖v_i‖: per side |δσ_i|/(2σ_i) ≤ ‖E‖/(2σ_r) (Weyl) plus ‖v_i‖'s and the norm's rounding
        norm_err = 2 * (svd_backward_error(W0[name]) / (2 * float(S[RANK - 1])) + gamma(W.shape[0] + 2))
        assert rel(a.lora_A["default"].weight.norm(dim=1), b.lora_A["default"].weight.norm(dim=1)) <= norm_err
        assert rel(a.lora_B["default"].weight.norm(dim=0), b.lora_B["default"].weight.norm(dim=0)) <= norm_err


# ------------------------------------------------------------------------------- 4. deterministic
def test_deterministic_and_global_rng_untouched() -> None:
    sizes = (300, 420, 300)  # randomized path: the seed matters
    state = torch.get_rng_state()
    first = wrap(toy(sizes=sizes), "pissa", 8, seed=5, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    second = wrap(toy(sizes=sizes), "pissa", 8, seed=5, progress=False)
    other = wrap(toy(sizes=sizes), "pissa", 8, seed=6, progress=False)
    for name, layer in lora_layers(first).items():
        twin = lora_layers(second)[name]
        for get in (lambda m: m.lora_A["default"].weight, lambda m: m.lora_B["default"].weight,
                    lambda m: m.get_base_layer().weight):
            assert torch.equal(get(layer), get(twin)), name
        assert not torch.equal(layer.lora_A["default"].weight, lora_layers(other)[name].lora_A["default"].weight)
    record = first.svdadapt
    assert record["method"] == "pissa" and record["rank"] == 8 and record["alpha"] == 8
    assert record["options"]["seed"] == 5
    for name, (A0, B0) in record["init_factors"].items():
        assert torch.equal(A0, lora_layers(first)[name].lora_A["default"].weight)
        assert torch.equal(B0, lora_layers(first)[name].lora_B["default"].weight)


def test_deterministic_tiny_llama(tiny_llama) -> None:
    a = wrap(tiny_llama(seed=4), "milora", RANK, progress=False)
    b = wrap(tiny_llama(seed=4), "milora", RANK, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------- trainable like any LoRA
def test_only_lora_factors_train(tiny_llama) -> None:
    peft_model = wrap(tiny_llama(seed=5), "pissa", RANK, progress=False)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(lora_layers(peft_model))
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    loss = peft_model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert set(grads) == trainable
    assert all(float(g.abs().max()) > 0 for g in grads.values())  # PiSSA: A and B both get gradient at init


# ------------------------------------------------------------------------------- target_modules
@pytest.mark.parametrize("targets", [
    "all-linear",
    ["q_proj", "v_proj"],
    ["self_attn.o_proj", "down_proj"],
    r".*\.mlp\.(gate|up)_proj",
    "model.layers.1.self_attn.k_proj",
])
def test_target_modules_match_peft(tiny_llama, targets) -> None:
    ours = wrap(tiny_llama(seed=6), "pissa", RANK, target_modules=targets, progress=False)
    theirs = get_peft_model(tiny_llama(seed=6), LoraConfig(r=RANK, target_modules=targets, init_lora_weights=False,
                                                           task_type="CAUSAL_LM"))
    assert set(lora_layers(ours)) == set(lora_layers(theirs))
    assert ours.svdadapt["targets"] == sorted(ours.svdadapt["targets"], key=list(lora_layers(ours)).index)
    assert "lm_head" not in lora_layers(ours)


def test_all_linear_on_toy_takes_every_linear() -> None:
    """A plain nn.Sequential has no output embedding to exclude (PEFT refuses all-linear there)."""
    peft_model = wrap(toy(), "pissa", RANK, progress=False)
    assert set(lora_layers(peft_model)) == {"0", "2", "4"}


def test_methods_registry() -> None:
    assert list(METHODS)[:2] == ["pissa", "milora"]
    assert svdadapt.METHODS is METHODS
    assert not METHODS["pissa"].needs_calibration and not METHODS["pissa"].needs_reference
    assert METHODS["pissa"].rewrites_base and METHODS["milora"].rewrites_base
    assert METHODS["corda"].needs_calibration and METHODS["eora"].needs_reference
    assert not METHODS["eora"].rewrites_base


# ------------------------------------------------------------------------------- 5. errors
def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """A refused call leaves the model as it was: no LoRA layers, same weights."""
    assert not any("lora_" in n for n, _ in model.named_modules())
    after = linear_weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_error_unknown_method(tiny_llama) -> None:
    model = tiny_llama()
    before = linear_weights(model)
    with pytest.raises(ValueError, match=r"^unknown method 'lora'; valid methods are: pissa, milora, corda, eora, eva$"):
        wrap(model, "lora", RANK, progress=False)
    assert_untouched(model, before)


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_error_bad_rank(tiny_llama, rank) -> None:
    model = tiny_llama()
    before = linear_weights(model)
    with pytest.raises(ValueError, match=rf"^rank must be a positive integer, got {rank!r}$"):
        wrap(model, "pissa", rank, progress=False)
    assert_untouched(model, before)


def test_error_rank_above_min_dimension(tiny_llama) -> None:
    model = tiny_llama()  # k_proj and v_proj are (32, 64): 2 kv heads x head_dim 16
    before = linear_weights(model)
    with pytest.raises(ValueError, match=r"^rank=33 exceeds min\(out, in\) = 32 of module "
                                         r"'model\.layers\.0\.self_attn\.k_proj' with weight \(32, 64\)$"):
        wrap(model, "pissa", 33, progress=False)
    assert_untouched(model, before)
    # the limit itself is fine: at rank = min(out, in) the adapter holds all of W and the residual is float noise
    peft_model = wrap(model, "pissa", 32, target_modules=["k_proj"], progress=False)
    layers = lora_layers(peft_model)
    assert sorted(layers) == [f"model.layers.{i}.self_attn.k_proj" for i in (0, 1)]
    for name, layer in layers.items():
        # full rank: no cut, so only the SVD's backward error and the factors' rounding (truncated_svd_error)
        bound = truncated_svd_error(before[name], 32) / float(before[name].double().norm())
        assert rel(lora_product(layer), before[name]) <= bound, name
        # the residual W − s·B·A is the addmm's cancellation error: γ_{r+2}·(|W| + s·|B||A|) plus the above
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        residual_bound = gemm_error(B, A, C=before[name], alpha=layer.scaling["default"]).max()
        assert float(layer.get_base_layer().weight.abs().max()) <= float(residual_bound) + bound * float(
            before[name].double().norm()), name


def test_error_no_module_matched(tiny_llama) -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"^target_modules=\['qkv'\] matched no adaptable layer \(nn\.Linear, transformers Conv1D, "
                                         r"nn\.Embedding, nn\.Conv1d/nn\.Conv2d, bitsandbytes Linear4bit/Linear8bitLt, HQQ HQQLinear, "
                                         r"torchao quantized Linear, optimum-quanto QLinear, compressed-tensors compressed "
                                         r"Linear\) in LlamaForCausalLM; "
                                         r"adaptable layers are: model\.embed_tokens, model\.layers\.0\.self_attn\.q_proj, "):
        wrap(model, "pissa", RANK, target_modules=["qkv"], progress=False)
    with pytest.raises(ValueError, match=r"^target_modules='nothing.*' matched no adaptable layer \(.*\) in Sequential"):
        wrap(toy(), "pissa", RANK, target_modules="nothing.*", progress=False)


def test_error_non_floating_weight() -> None:
    model = toy()
    model[2].weight = nn.Parameter(torch.ones(32, 40, dtype=torch.int8), requires_grad=False)
    before = linear_weights(model)
    with pytest.raises(TypeError, match=r"^module '2' has a weight of dtype torch\.int8 \(Linear\); svdadapt "
                                        r"decomposes floating-point weights only"):
        wrap(model, "pissa", RANK, progress=False)
    assert_untouched(model, before)


class Params4bit(nn.Parameter):
    """Stands in for bitsandbytes' packed 4-bit parameter (matched by type name, as bitsandbytes is optional)."""


def test_error_packed_quantized_weight() -> None:
    model = toy()
    model[0].weight = Params4bit(torch.zeros(40 * 24 // 2, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match=r"^module '0' has a packed-quantized weight of dtype torch\.uint8 \(Linear\)"):
        wrap(model, "pissa", RANK, progress=False)

    model = toy()
    model[4].weight.quant_state = object()  # a float-looking weight that carries a quantization state
    with pytest.raises(TypeError, match=r"^module '4' has a packed-quantized weight of dtype torch\.float32"):
        wrap(model, "pissa", RANK, progress=False)


def test_error_already_peft(tiny_llama) -> None:
    peft_model = wrap(tiny_llama(), "pissa", RANK, progress=False)
    with pytest.raises(TypeError, match=r"^model is already a PEFT model \(PeftModelForCausalLM\)"):
        wrap(peft_model, "pissa", RANK, progress=False)
    with pytest.raises(TypeError, match=r"^model is already a PEFT model \(LlamaForCausalLM\)"):
        wrap(peft_model.get_base_model(), "pissa", RANK, progress=False)  # still holds LoRA layers


def test_error_randomized_for_bottom_triplets() -> None:
    with pytest.raises(ValueError, match=r"^svd='randomized' cannot find the smallest singular triplets needed by "
                                         r"'milora'; use svd='full' or 'auto'$"):
        wrap(toy(), "milora", RANK, svd="randomized", progress=False)
