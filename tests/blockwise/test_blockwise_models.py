"""Block-by-block and whole-model calibration on models whose blocks are called differently from Llama's: GPT-2 (a
KV cache handed to the blocks positionally, padded batches), Gemma2 (sliding-window and full attention layers: each
block gets its own mask), Qwen2-MoE (a shared expert reading the hidden states flattened to (batch·seq, hidden)),
and a model whose blocks share one Linear module object."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM)
from transformers.cache_utils import DynamicCache

import svdadapt
from helpers import make_tiny_llama, raises_exactly, same_init_factors, same_state, token_ids
from svdadapt.blockwise import BlockwiseOptions, BlockwiseUnsupported, plan_blockwise
from svdadapt.blockwise.capture import _without_cache
from svdadapt.engine.plan import LayerPlan

U = 2.0 ** -24  # unit roundoff of fp32


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _gpt2(use_cache: bool = True) -> GPT2LMHeadModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, use_cache=use_cache,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).eval()


def _qwen2_moe() -> Qwen2MoeForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                max_position_embeddings=64)
        return Qwen2MoeForCausalLM(config).eval()


def _padded(pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two batches of different sizes and lengths, right and left padding; the padding holds ``pad_id``."""
    b1 = {"input_ids": token_ids(3, 14, 1), "attention_mask": torch.ones(3, 14, dtype=torch.long)}
    b1["attention_mask"][0, 10:] = 0
    b1["attention_mask"][2, :3] = 0
    b2 = {"input_ids": token_ids(2, 9, 2), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    b2["attention_mask"][1, 5:] = 0
    for b in (b1, b2):
        b["input_ids"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, pad_id)
    return [b1, b2]


def _blockwise_covariances(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """name -> the covariance each block hands the engine (cloned), through a recording ``plan``."""
    got: dict[str, torch.Tensor] = {}

    def plan(targets, covs):
        got.update({n: covs[n].clone() for n in targets})
        return {n: LayerPlan(n, torch.zeros(1, 1), torch.zeros(1, 1), {}) for n in targets}

    plan_blockwise(model, svdadapt.resolve_targets(model), batches, plan, progress=False)
    return got


def _brute_force(model: nn.Module, batches) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Independent of svdadapt's collector: plain pre-hooks keep each target's real-token rows (a (batch, seq, in)
    input masked as it is, a (batch·seq, in) one with the flattened mask), summed in fp64. Returns name -> XᵀX/N
    and name -> |X|ᵀ|X|/N (what bounds the fp32 sum's rounding)."""
    rows: dict[str, list[torch.Tensor]] = {}
    mask: list[torch.Tensor] = []

    def keep(name, x):
        m = mask[0].bool() if x.dim() == 3 else mask[0].bool().reshape(-1)
        rows.setdefault(name, []).append(x[m].double())

    targets = svdadapt.resolve_targets(model)
    handles = [m.register_forward_pre_hook(lambda mod, a, _n=n: keep(_n, a[0])) for n, m in targets.items()]
    try:
        with torch.no_grad():
            for b in batches:
                mask[:] = [b["attention_mask"]]
                model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    X = {n: torch.cat(r) for n, r in rows.items()}
    return ({n: x.mT @ x / len(x) for n, x in X.items()}, {n: x.abs().mT @ x.abs() / len(x) for n, x in X.items()})


def _check_brute_force(covs, model: nn.Module, batches) -> None:
    """fp32 sums of N products: |fl(C) − C| ≤ γ_(N+3)·|X|ᵀ|X|/N entrywise (N products and additions per entry,
    the accumulator added to once per batch, one division)."""
    want, scale = _brute_force(model, batches)
    assert set(covs) == set(want)
    for n in want:
        N = covs.token_count(n) if isinstance(covs, svdadapt.Covariances) else None
        tokens = int(sum(b["attention_mask"].sum() for b in batches))
        assert N in (None, tokens), n
        bound = (tokens + 3) * U / (1 - (tokens + 3) * U) * scale[n]
        assert bool(((covs[n].double() - want[n]).abs() <= bound).all()), n


# ------------------------------------------------------------------------------------------------------ Gemma2
def _gemma2() -> Gemma2ForCausalLM:
    """Layers alternate sliding-window (window 4, shorter than the batches) and full attention."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                              max_position_embeddings=64)
        return Gemma2ForCausalLM(config).eval()


def test_gemma2_blocks_with_masks_of_their_own_equal_whole_model():
    """Each block runs again with the mask the model built for its own attention type (recorded for every batch
    without running the stack twice): the same kernels on the same inputs, so bit-identical to the whole-model
    path; the sliding-window mask really differs from the full one here (else the test would not see it)."""
    model, batches = _gemma2(), _padded()
    calls = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda m, a, k: calls.append(k["attention_mask"]),
                                                          with_kwargs=True)
    with torch.no_grad():
        model(**batches[0], use_cache=False)
    hook.remove()
    first = model.model.layers[0]
    with torch.no_grad():
        seen = []
        h = first.register_forward_pre_hook(lambda m, a, k: seen.append(k["attention_mask"]), with_kwargs=True)
        model(**batches[0], use_cache=False)
        h.remove()
    assert not torch.equal(calls[0], seen[0])  # layer 0 slides, layer 1 does not
    whole = svdadapt.collect_covariances(model, batches, progress=False)
    block = _blockwise_covariances(model, batches)
    assert list(block) == list(whole) and len(whole) == 3 * 7
    assert all(torch.equal(block[n], whole[n]) for n in whole)


def test_gemma2_wrap_runs_block_by_block():
    """CorDA's automatic path now runs block by block on Gemma2 (no fallback note) and gives the whole-model
    path's adapters bit for bit."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="svdadapt")
        auto = svdadapt.wrap(_gemma2(), "corda", rank=2, calibration=_padded(), progress=False)
    whole = svdadapt.wrap(_gemma2(), "corda", rank=2, calibration=_padded(), blockwise=False, progress=False)
    assert same_init_factors(auto, whole)


# ------------------------------------------------------------------------------------------------------ GPT-2
def test_gpt2_padded_covariances_block_by_block_equal_whole_model_and_brute_force():
    """The blocks run again with the mask the model built for them (no cache: GPT-2 hands its cache positionally):
    the same kernels on the same inputs, so bit-identical to the whole-model path."""
    model, batches = _gpt2(), _padded()
    whole = svdadapt.collect_covariances(model, batches, progress=False)
    block = _blockwise_covariances(model, batches)
    assert list(block) == list(whole) and len(whole) == 8
    assert all(torch.equal(block[n], whole[n]) for n in whole)
    _check_brute_force(whole, model, batches)


@pytest.mark.parametrize("method", ["corda", "eora"])
def test_gpt2_padded_wrap_block_by_block_equals_whole_model(method):
    """CorDA, and EoRA on its reference inputs: the block path's adapters are the whole-model path's; the automatic
    path runs block by block (no fallback note) and equals blockwise=True."""
    model = _gpt2()
    base, kw = model, {}
    if method == "eora":
        base, kw = svdadapt.compress.quantize(model, bits=3, group_size=16), {"reference": model}

    def wrap(blockwise):
        return svdadapt.wrap(copy.deepcopy(base), method, rank=2, calibration=_padded(), blockwise=blockwise,
                             progress=False, **kw)

    whole = wrap(False)
    block = wrap(BlockwiseOptions(sequential=False))
    assert same_init_factors(block, whole)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="svdadapt")
        auto = wrap(None)
    assert same_init_factors(auto, wrap(True))
    assert same_init_factors(auto, whole) == (method == "corda")  # EoRA's automatic path is sequential


def test_gpt2_eora_sequential_ignores_the_models_use_cache():
    """The capture forward builds no cache, so the model's default use_cache=True gives the factors of
    use_cache=False (a cache left in the blocks' arguments made block 0 attend to batch 0's keys twice)."""
    ref = _gpt2()
    q = svdadapt.compress.quantize(ref, bits=3, group_size=16)
    q_off = copy.deepcopy(q)
    q_off.config.use_cache = False
    batches = [{"input_ids": token_ids(3, 14, 1)}, {"input_ids": token_ids(2, 9, 2)}]
    on = svdadapt.wrap(q, "eora", rank=2, reference=ref, calibration=batches, progress=False)
    off = svdadapt.wrap(q_off, "eora", rank=2, reference=ref, calibration=batches, progress=False)
    assert same_init_factors(on, off)


def test_a_block_run_alone_gets_no_cache():
    """Caches are dropped from a block's recorded call wherever they are passed, positionally or by keyword."""
    cache, mask = DynamicCache(), torch.ones(1, 1, 3, 3)
    args, kwargs = _without_cache((cache, mask), {"past_key_values": cache, "use_cache": True, "position_ids": 1})
    assert args == (None, mask) and kwargs == {"past_key_values": None, "use_cache": False, "position_ids": 1}


# ------------------------------------------------------------------------------------------------------ MoE
@pytest.mark.parametrize("path", ["whole model", "block by block"])
def test_moe_shared_expert_counts_no_padding(path):
    """Qwen2-MoE's shared expert reads (batch·seq, hidden): the flattened mask drops its padding. Exact: other
    padding ids leave every covariance bit-identical (masked attention gives padding keys zero weight, routing is per
    token); the token counts are the real tokens; and the covariances are the brute-force ones to fp32 rounding."""
    model = _qwen2_moe()
    collect = {"whole model": lambda b: svdadapt.collect_covariances(model, b, progress=False),
               "block by block": lambda b: _blockwise_covariances(model, b)}[path]
    a, b = collect(_padded(pad_id=0)), collect(_padded(pad_id=77))
    shared = [n for n in a if ".shared_expert" in n]
    assert len(shared) == 8 and all(torch.equal(a[n], b[n]) for n in a)
    _check_brute_force(a, model, _padded())


class _RoutedExperts(nn.Module):
    """Each token's hidden state goes to one of two Linear experts (rows gathered per expert, as MoE code before
    transformers 5 did): a layout no mask can be laid on."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(128, 8)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).reshape(-1, 8)
        route = input_ids.reshape(-1) % 2
        return sum(self.experts[e](h[route == e]).sum() for e in range(2))


def test_gathered_expert_rows_with_padding_warn():
    model = _RoutedExperts()
    ids = torch.arange(12).reshape(2, 6)
    mask = torch.ones(2, 6, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svdadapt.collect_covariances(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    mask[1, 4:] = 0
    with pytest.warns(UserWarning) as caught:
        covs = svdadapt.collect_covariances(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert [str(w.message) for w in caught] == [
        "svdadapt calibration: the input of module 'experts.0' and 1 more (shape (6, 8)) is laid out neither "
        "(batch, seq, in) nor (batch·seq, in) like the attention_mask, so its padding rows count; pass unpadded "
        "batches for it (docs/calibration.md)"]
    assert caught[0].filename == __file__
    assert covs.token_count("experts.0") == 6  # the documented limit: all gathered rows, padding included


# ------------------------------------------------------------------------------------------------------ shared module
def _shared_llama() -> nn.Module:
    model = make_tiny_llama()
    model.model.layers[1].mlp.down_proj = model.model.layers[0].mlp.down_proj
    return model


@pytest.mark.parametrize("method", ["pissa", "corda", "eora"])
def test_one_module_in_two_blocks_is_refused(method):
    """named_modules() names it once, PEFT would adapt it in one place only: refused before anything changes."""
    model = _shared_llama()
    before = copy.deepcopy(model.state_dict())
    kw = {"pissa": {}, "corda": {"calibration": _padded()},
          "eora": {"calibration": _padded(), "reference": copy.deepcopy(model)}}[method]
    with raises_exactly(ValueError, "module 'model.layers.0.mlp.down_proj' is also used as "
                        "'model.layers.1.mlp.down_proj' (one module object in two places): PEFT would adapt it in "
                        "one place only; give each place its own module (copy.deepcopy) or leave "
                        "'model.layers.0.mlp.down_proj' out of target_modules"):
        svdadapt.wrap(model, method, rank=2, progress=False, **kw)
    assert same_state(model.state_dict(), before)
    pm = svdadapt.wrap(model, method, rank=2, progress=False, exclude_modules=["model.layers.0.mlp.down_proj"], **kw)
    assert "model.layers.0.mlp.down_proj" not in pm.svdadapt.targets and len(pm.svdadapt.targets) == 12  # 14 names, one shared, one left out


def test_one_module_in_two_blocks_calibration():
    """The whole-model path counts both uses (2 × the tokens); the block path, which would see one, refuses with a
    typed error (a ValueError) whose reason is what ``wrap``'s automatic mode warns before falling back."""
    model, batches = _shared_llama(), _padded()
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    covs = svdadapt.collect_covariances(model, batches, progress=False)
    assert covs.token_count("model.layers.0.mlp.down_proj") == 2 * tokens
    assert covs.token_count("model.layers.0.mlp.up_proj") == tokens
    targets = svdadapt.resolve_targets(model)
    why = "module 'model.layers.0.mlp.down_proj' is also used as 'model.layers.1.mlp.down_proj'"
    with pytest.raises(BlockwiseUnsupported, match=f"^blockwise calibration: {why}: its covariance comes from both "
                       "uses$") as caught:
        plan_blockwise(model, targets, batches, lambda t, c: {}, progress=False)
    assert isinstance(caught.value, ValueError) and caught.value.reason == f"{why}: its covariance comes from both uses"


def test_a_parent_reachable_under_two_names_is_one_place():
    """An alias of a whole block: replacing a child inside it changes both paths, so its layers are adaptable."""
    model = make_tiny_llama()
    model.first_block = model.model.layers[0]
    pm = svdadapt.wrap(model, "pissa", rank=2, progress=False)
    assert len(pm.svdadapt.targets) == 14
    assert model.first_block.self_attn.q_proj is model.model.layers[0].self_attn.q_proj
    assert "default" in model.first_block.self_attn.q_proj.lora_A  # the adapted layer, seen from both paths
