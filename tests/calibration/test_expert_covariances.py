"""Per-expert covariances of MoE expert parameters (svdadapt/calibration/experts.py) against an independent
routed-token reference: the MoE block's input captured, routed by hand with the router's weights (softmax, top-k,
renormalized where the config says), expert e's Σ ω z zᵀ over the tokens sent to it summed in fp64; on tiny
Mixtral, Qwen2-MoE and Qwen3-MoE models built from configs, and gpt-oss (transposed, biased, its own gate). Counts,
padding, the weighting option, the fallback for experts with too few tokens, the file, torch.distributed, block by
block."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import svdadapt
from bounds import gamma, unit_roundoff
from dist_harness import as_rank, free_port, run_ranks
from helpers import raises_exactly, tiny_gpt_oss, tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe, token_ids
from svdadapt.calibration import Covariances, collect
from svdadapt.calibration.experts import expert_key, expert_parameters, fallback_covariances, parse_expert_key
from svdadapt.engine.distributed import my_batches, reduce_covariances

PARAMS = ["gate_up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


MODELS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "qwen3_moe": tiny_qwen3_moe}


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        b = {"input_ids": token_ids(3, 20, 10 + i), "attention_mask": torch.ones(3, 20, dtype=torch.long)}
        b["attention_mask"][1, 13:] = 0  # right padding
        b["attention_mask"][2, :4] = 0  # left padding
        out.append(b)
    return out


# ---------------------------------------------------------------------------------------- the reference
def _moe_inputs(model: nn.Module, batches: list[dict]) -> dict[int, list[torch.Tensor]]:
    """Layer index -> the real tokens' (n, H) inputs of its MoE block, one per batch (padding dropped)."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.model.layers))}
    masks: list[torch.Tensor] = []
    handles = [layer.mlp.register_forward_pre_hook(
        lambda m, args, _i=i: seen[_i].append(args[0].reshape(-1, args[0].shape[-1])[masks[-1]].detach()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for b in batches:
                masks.append(b["attention_mask"].bool().reshape(-1))
                model(**b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _route(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k index, top-k weight) of tokens ``x`` (n, H), with the router's weights: softmax in fp32, top-k,
    renormalized over the k unless the config keeps the raw probabilities (Qwen2-MoE's norm_topk_prob=False)."""
    gate = block.gate
    probs = torch.softmax(x.float() @ gate.weight.float().mT, dim=-1)
    w, idx = torch.topk(probs, gate.top_k, dim=-1)
    if getattr(gate, "norm_topk_prob", True):
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w


def _expert_inputs(experts: nn.Module, e: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What expert ``e``'s two matrices read for hidden states ``x`` (n, H): x, and silu(gate·x)·(up·x)."""
    gate_w, up_w = experts.gate_up_proj[e].chunk(2, dim=0)
    return {"gate_up_proj": x, "down_proj": torch.nn.functional.silu(x @ gate_w.mT) * (x @ up_w.mT)}


def reference(model: nn.Module, batches: list[dict], weighting: str = "routing"):
    """key -> (Σ ω z zᵀ / N in fp64, N, the elementwise bound of an fp32 accumulation of it, the token mean
    Σ ω^½ z / N (EVA centres), its bound)."""
    out = {}
    for i, xs in _moe_inputs(model, batches).items():
        block = model.model.layers[i].mlp
        E = block.experts.gate_up_proj.shape[0]
        rows = {(p, e): [] for p in PARAMS for e in range(E)}
        for x in xs:
            idx, w = _route(block, x)
            for e in range(E):
                tok, slot = torch.where(idx == e)
                omega = w[tok, slot].double() if weighting == "routing" else torch.ones(len(tok), dtype=torch.float64)
                for p, z in _expert_inputs(block.experts, e, x[tok]).items():
                    rows[(p, e)].append(z.double() * omega[:, None])
        for (p, e), parts in rows.items():
            Z = torch.cat(parts)
            n = Z.shape[0]
            S = Z.mT @ Z
            # fp32 sum of n products (γ_{n+2}: any order, FMA or not) of inputs scaled by ω in fp32 (ω·z: 1 rounding
            # each, 2 in a product); ω from the router's own fp32 ops, a few ulps off ours: +4 more
            bound = gamma(n + 8) * (Z.abs().mT @ Z.abs())
            key = expert_key(f"model.layers.{i}.mlp.experts.{p}", e)
            mean_bound = gamma(8) * Z.abs().sum(0)  # an fp64 sum of ω^½·z rounded in fp32: a few roundings each
            out[key] = (S / max(n, 1), n, bound / max(n, 1), Z.sum(0) / max(n, 1), mean_bound / max(n, 1))
    return out


def _collect(model, batches, **kw) -> Covariances:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few tokens per expert in these tiny runs: the fallback's warning
        return svdadapt.collect_covariances(model, batches, target_modules=None, target_parameters=PARAMS,
                                            progress=False, fallback=None, **kw)


# ---------------------------------------------------------------------------------------- against it
@pytest.mark.parametrize("weighting", ["routing", "tokens"])
@pytest.mark.parametrize("family", list(MODELS))
def test_per_expert_covariances_equal_the_routed_token_reference(family, weighting):
    model = MODELS[family]()
    covs = _collect(model, _batches(), weighting=weighting)
    ref = reference(model, _batches(), weighting)
    assert sorted(covs) == sorted(ref)
    assert all(ref[k][1] > 0 for k in ref)  # every expert got tokens: the reference is not trivially zero
    for k, (C, n, bound, mu, mu_bound) in ref.items():
        assert covs.token_count(k) == n, k
        assert ((covs[k].double() - C).abs() <= bound).all(), (k, (covs[k].double() - C).abs().max().item())
        assert ((covs.mean(k).double() - mu).abs() <= mu_bound).all(), k
        assert covs.fallback_of(k) is None


def test_weighting_changes_the_covariance_by_the_squared_routing_weights():
    """With unequal routing weights the two statistics differ; "routing" is Σ w² z zᵀ, so its trace is below
    the unweighted one's (w ≤ 1)."""
    model = tiny_qwen2_moe()
    a, b = _collect(model, _batches(), weighting="routing"), _collect(model, _batches(), weighting="tokens")
    for k in a:
        assert a.token_count(k) == b.token_count(k)
        assert float(a[k].trace()) < float(b[k].trace())
    with raises_exactly(ValueError, "weighting must be one of ['routing', 'tokens'], got 'square'"):
        _collect(model, _batches(), weighting="square")


def test_counts_are_the_routed_real_tokens():
    """Σ_e N_e = k · (real tokens) per layer: every unpadded token reaches exactly k experts, padding none."""
    model = tiny_mixtral()
    covs = _collect(model, _batches())
    real = sum(int(b["attention_mask"].sum()) for b in _batches())
    for i in range(2):
        for p in PARAMS:
            total = sum(covs.token_count(expert_key(f"model.layers.{i}.mlp.experts.{p}", e)) for e in range(4))
            assert total == 2 * real


def test_padding_is_dropped():
    """A batch with padding gives the covariances of the same batch with the padded rows cut off."""
    model = tiny_mixtral()
    ids = token_ids(2, 12, 3)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    padded = _collect(model, [{"input_ids": ids, "attention_mask": mask}])
    cut = _collect(model, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :7]}])
    for k in padded:
        assert padded.token_count(k) == cut.token_count(k)
        ref = reference(model, [{"input_ids": ids, "attention_mask": mask}])[k]
        assert ((cut[k].double() - ref[0]).abs() <= 2 * ref[2]).all()  # two fp32 sums of the same products
        assert ((padded[k].double() - ref[0]).abs() <= ref[2]).all()


def test_linear_targets_in_the_same_pass_are_unchanged():
    """Qwen2-MoE's shared expert (nn.Linear) collected with the experts: bit-identical to collecting it alone."""
    model = tiny_qwen2_moe()
    alone = svdadapt.collect_covariances(model, _batches(), target_modules=["shared_expert.up_proj"], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = svdadapt.collect_covariances(model, _batches(), target_modules=["shared_expert.up_proj"],
                                            target_parameters=["experts.down_proj"], progress=False)
    for n in alone:
        assert torch.equal(both[n], alone[n]) and both.token_count(n) == alone.token_count(n)
    assert sorted(k for k in both if k not in alone) == sorted(
        expert_key(f"model.layers.{i}.mlp.experts.down_proj", e) for i in range(2) for e in range(6))


def test_parameter_selection_follows_peft_and_refuses_what_is_not_an_expert():
    model = tiny_mixtral()
    got = expert_parameters(model, ["layers.1.mlp.experts.down_proj", "gate_up_proj"])
    assert list(got) == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj",
                         "model.layers.1.mlp.experts.down_proj"]
    assert [(p.role, p.num_experts, p.in_features) for p in got.values()] == [
        ("hidden", 4, 32), ("hidden", 4, 32), ("intermediate", 4, 24)]
    with raises_exactly(ValueError, "target_parameters entry 'experts.w1' matched no parameter of MixtralForCausalLM"):
        expert_parameters(model, ["experts.w1"])
    with raises_exactly(ValueError, "parameter 'model.layers.0.mlp.gate.weight' (4, 32) of MixtralTopKRouter is not "
                        "an MoE expert parameter: per-expert targets are gate_up_proj, up_proj and down_proj "
                        "(3-D, experts first) of a module called as experts(hidden_states, top_k_index, "
                        "top_k_weights) (transformers 5 MoE experts)"):
        expert_parameters(model, ["mlp.gate.weight"])
    assert parse_expert_key("a.b.down_proj[12]") == ("a.b.down_proj", 12) and parse_expert_key("a.b") is None


# ---------------------------------------------------------------------------------------- fallback
def _starve(model: nn.Module, expert: int, to: int) -> list:
    """Forward hooks on the routers sending every token routed to ``expert`` to ``to`` instead (after the
    router, as the model then runs): ``expert`` receives no token."""
    def hook(mod, args, out):
        logits, w, idx = out
        return logits, w, torch.where(idx == expert, torch.full_like(idx, to), idx)
    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


def _top1_mixtral() -> nn.Module:
    """Top-1 routing: re-routing expert 3's tokens to expert 0 never picks one expert twice for a token."""
    return tiny_mixtral(num_experts_per_tok=1)


def test_an_expert_without_tokens_gets_the_pooled_covariance_with_a_warning_naming_it():
    model = _top1_mixtral()
    handles = _starve(model, 3, 0)
    try:
        raw = collect(model, _batches(4), {}, progress=False, experts=expert_parameters(model, PARAMS))
        with pytest.warns(UserWarning) as record:
            covs = svdadapt.collect_covariances(model, _batches(4), target_modules=None,
                                                target_parameters=PARAMS, min_tokens=1, progress=False)
    finally:
        for h in handles:
            h.remove()
    starved = [expert_key(f"model.layers.{i}.mlp.experts.{p}", 3) for i in range(2) for p in PARAMS]
    assert all(raw.token_count(k) == 0 and not raw[k].any() for k in starved)
    assert [str(w.message) for w in record] == [
        "svdadapt calibration: 4 experts received fewer than 1 routed tokens and get the pooled covariance of all "
        f"experts of their parameter: {starved[0]!r} (0 tokens), {starved[1]!r} (0 tokens), {starved[2]!r} (0 tokens), "
        f"{starved[3]!r} (0 tokens) (docs/calibration.md)"]
    for k in starved:
        param = parse_expert_key(k)[0]
        keys = [expert_key(param, e) for e in range(4)]
        n = [raw.token_count(j) for j in keys]
        pooled = sum(raw[j].double() * c for j, c in zip(keys, n)) / sum(n)
        # fp64 sum of 3 fp32 matrices (exact products by integers up to 2^24), one fp32 rounding at the end
        assert torch.allclose(covs[k].double(), pooled, rtol=2 * unit_roundoff(torch.float32), atol=0)
        pooled_mean = sum(raw.mean(j).double() * c for j, c in zip(keys, n)) / sum(n)
        # as the matrix; entries near zero: one fp32 rounding of the largest mean's size
        assert torch.allclose(covs.mean(k).double(), pooled_mean, rtol=2 * unit_roundoff(torch.float32),
                              atol=4 * unit_roundoff(torch.float32) * float(pooled_mean.abs().max()))
        assert covs.token_count(k) == sum(n) and covs.fallback_of(k) == "pooled: 0 routed tokens < 1"
        assert torch.isfinite(covs[k]).all() and torch.linalg.eigvalsh(covs[k].double()).max() > 0
        for j in keys[:3]:
            assert covs[j] is raw[j] or torch.equal(covs[j], raw[j])
            assert covs.fallback_of(j) is None


def test_fallback_modes_on_given_covariances():
    g = torch.Generator().manual_seed(0)
    X = [torch.randn(n, 5, generator=g) for n in (9, 7, 2)]
    C = {expert_key("m.experts.down_proj", e): (x.mT @ x) / x.shape[0] for e, x in enumerate(X)}
    C["m.other"] = torch.eye(5)
    covs = Covariances(C, {k: (X[i].shape[0] if i < 3 else 4) for i, k in enumerate(C)})
    low = expert_key("m.experts.down_proj", 2)
    P = sum(C[k].double() * x.shape[0] for k, x in zip(list(C)[:3], X)) / 18
    s = float(P.trace()) / 5
    with pytest.warns(UserWarning, match="1 expert received fewer than their input width routed tokens and get a "
                                         r"scaled identity \(EoRA: the plain SVD of ΔW\): 'm.experts.down_proj\[2\]'"):
        ident = fallback_covariances(covs, fallback="identity")
    assert torch.allclose(ident[low].double(), s * torch.eye(5, dtype=torch.float64), rtol=4e-7, atol=0)
    with pytest.warns(UserWarning):
        damped = fallback_covariances(covs, fallback="damped", damping=0.5)
    assert torch.allclose(damped[low].double(), C[low].double() + 0.5 * s * torch.eye(5, dtype=torch.float64),
                          rtol=4e-7, atol=1e-7 * s)  # a few fp32 roundings of entries of size ≤ s
    assert damped.fallback_of(low) == "damped: 2 routed tokens < 5" and damped["m.other"] is C["m.other"]
    with pytest.warns(UserWarning):
        kept = fallback_covariances(covs, fallback=None)
    assert kept[low] is C[low] and kept.fallback_of(low) is None
    assert fallback_covariances(covs, min_tokens=2) is covs  # nobody below: nothing to do, no warning
    with raises_exactly(ValueError, "fallback must be one of ['pooled', 'damped', 'identity', None], got 'zero'"):
        fallback_covariances(covs, fallback="zero")
    with raises_exactly(ValueError, "min_tokens must be a non-negative integer or None (the input width), got -1"):
        fallback_covariances(covs, min_tokens=-1)
    with raises_exactly(ValueError, "'m.other' is not an expert covariance of this Covariances (keys '<param>[e]')"):
        fallback_covariances(covs, ["m.other"])


def test_no_tokens_at_all_and_fallback_none_are_errors():
    zero = {expert_key("m.experts.gate_up_proj", e): torch.zeros(3, 3) for e in range(2)}
    with raises_exactly(ValueError, "calibration saw no tokens for any expert of parameter 'm.experts.gate_up_proj': "
                        "the router sent it none of the calibration tokens (or all were padding)"):
        fallback_covariances(Covariances(zero, {k: 0 for k in zero}))
    some = dict(zero, **{expert_key("m.experts.gate_up_proj", 0): torch.eye(3)})
    with raises_exactly(ValueError, "expert 'm.experts.gate_up_proj[1]' received no calibration tokens (1 experts of "
                        "'m.experts.gate_up_proj' received none) and fallback=None: pass fallback='pooled', 'damped' "
                        "or 'identity', or more calibration batches"):
        fallback_covariances(Covariances(some, {expert_key("m.experts.gate_up_proj", 0): 8}), fallback=None)


def test_counts_and_fallback_notes_survive_the_file(tmp_path):
    model = _top1_mixtral()
    handles = _starve(model, 3, 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covs = svdadapt.collect_covariances(model, _batches(), target_modules=None, target_parameters=PARAMS,
                                                progress=False)
    finally:
        for h in handles:
            h.remove()
    covs.save(tmp_path / "c.safetensors")
    back = Covariances.load(tmp_path / "c.safetensors")
    assert list(back) == list(covs) and back.fallbacks == covs.fallbacks and back.groups == covs.groups
    assert all(torch.equal(back[k], covs[k]) and back.token_count(k) == covs.token_count(k) for k in covs)
    starved = {expert_key(f"model.layers.{i}.mlp.experts.{p}", 3) for i in range(2) for p in PARAMS}
    assert starved <= set(covs.fallbacks) and back.fallback_of(min(starved)).startswith("pooled: 0 routed tokens")


# ---------------------------------------------------------------------------------------- torch.distributed
def _dist_worker(rank: int, port: int, out: str) -> None:
    def body():
        model = tiny_mixtral()
        raw = collect(model, my_batches(_batches(4)), {}, progress=False,
                      experts=expert_parameters(model, PARAMS))
        covs = reduce_covariances(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pooled = fallback_covariances(covs, min_tokens=10**9)
        try:
            reduce_covariances(pooled)
        except ValueError as e:
            message = str(e)
        if rank == 0:
            covs.save(out)
            with open(out + ".txt", "w") as f:
                f.write(message)
    as_rank(rank, 2, port, body)


def test_per_expert_covariances_all_reduce_to_one_process(tmp_path):
    """Two gloo ranks, each on every other batch: the all-reduced covariances equal one process's on all batches
    (the same counts; the matrices up to the order of the float additions: within the fp32 bound twice)."""
    out = str(tmp_path / "rank0.safetensors")
    run_ranks(_dist_worker, (free_port(), out), nprocs=2)
    got = Covariances.load(out)
    with open(out + ".txt") as f:  # a fallback before the reduction: refused on every rank
        assert f.read() == ("ranks 0, 1: ValueError: reduce the covariances before their experts' fallback "
                            "(fallback_covariances): 'model.layers.0.mlp.experts.gate_up_proj[0]' is already a "
                            "fallback")
    model = tiny_mixtral()
    ref = reference(model, _batches(4))
    for k, (C, n, bound, _, _) in ref.items():
        assert got.token_count(k) == n
        # each rank's fp32 mean, rescaled by its count and summed in fp64: two fp32 accumulations, 2 roundings each
        assert ((got[k].double() - C).abs() <= 2 * bound + 4 * unit_roundoff(torch.float32) * C.abs()).all(), k


# ---------------------------------------------------------------------------------------- gpt-oss's layout
def _gpt_oss_inputs(experts: nn.Module, e: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    h = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
    gate, up = h[:, 0::2].clamp(max=experts.limit), h[:, 1::2].clamp(-experts.limit, experts.limit)
    return {"gate_up_proj": x, "down_proj": (up + 1) * gate * torch.sigmoid(gate * experts.alpha)}


def test_transposed_biased_experts_of_gpt_oss():
    model = tiny_gpt_oss()
    covs = _collect(model, _batches())
    for i, xs in _moe_inputs(model, _batches()).items():
        mlp = model.model.layers[i].mlp
        for e in range(4):
            parts = {p: [] for p in PARAMS}
            for x in xs:
                top, idx = torch.topk(x @ mlp.router.weight.mT + mlp.router.bias, 2, dim=-1)
                w = torch.softmax(top, dim=-1)
                tok, slot = torch.where(idx == e)
                for p, z in _gpt_oss_inputs(mlp.experts, e, x[tok]).items():
                    parts[p].append(z.double() * w[tok, slot].double()[:, None])
            for p, chunks in parts.items():
                Z = torch.cat(chunks)
                k = expert_key(f"model.layers.{i}.mlp.experts.{p}", e)
                assert covs.token_count(k) == Z.shape[0] > 0
                # as in reference(): γ_{n+2} for the sum, 2 roundings of ω·z, a few ulps between the two ω
                bound = gamma(Z.shape[0] + 8) * (Z.abs().mT @ Z.abs()) / Z.shape[0]
                assert ((covs[k].double() - Z.mT @ Z / Z.shape[0]).abs() <= bound).all(), k
    assert tuple(covs["model.layers.0.mlp.experts.down_proj[0]"].shape) == (16, 16)


# ---------------------------------------------------------------------------------------- block by block
def test_block_by_block_on_moe_decoder_blocks_equals_the_whole_model():
    """Mixtral's decoder blocks (attention, then the sparse MoE block) run one at a time: the attention
    projections' covariances are bit-identical to the whole-model collection's."""
    from svdadapt.blockwise import plan_blockwise
    from svdadapt.engine.plan import LayerPlan

    model = tiny_mixtral()
    targets = svdadapt.resolve_targets(model)
    assert all(".self_attn." in n for n in targets)  # the experts are parameters, not Linear layers
    got = {}

    def plan(block_targets, covs):
        got.update({n: covs[n].clone() for n in block_targets})
        return {n: LayerPlan(n, torch.zeros(1, 1), torch.zeros(1, 1), {}) for n in block_targets}

    plan_blockwise(model, targets, _batches(), plan, progress=False)
    whole = svdadapt.collect_covariances(model, _batches(), progress=False)
    assert sorted(got) == sorted(whole)
    assert all(torch.equal(got[n], whole[n]) for n in whole)


def test_non_finite_expert_activations_are_named():
    model = tiny_mixtral()
    model.model.layers[1].mlp.experts.gate_up_proj.data[2, 0, :] = float("inf")  # expert 2's gate row: inf·x
    with raises_exactly(ValueError, "non-finite activations (NaN or inf) in the input of expert "
                                    "'model.layers.1.mlp.experts.down_proj[2]' in batch 0"):
        collect(model, _batches(), {}, progress=False, experts=expert_parameters(model, ["experts.down_proj"]))


@pytest.mark.parametrize("with_layers", [False, True])
def test_block_by_block_expert_covariances_equal_the_whole_model(with_layers):
    """Each block's per-expert covariances, collected while the block runs on its stored inputs (padding dropped
    with the block's mask), fallback applied: bit-identical to ``collect_covariances(target_parameters=)``."""
    from svdadapt.blockwise import BlockwiseOptions, BlockwiseUnsupported, plan_blockwise
    from svdadapt.engine.plan import LayerPlan

    model = tiny_qwen2_moe()
    targets = svdadapt.resolve_targets(model, ["q_proj"]) if with_layers else {}
    got = {}

    def plan(block_targets, covs):
        got.update({n: c.clone() for n, c in covs.items()})
        return {n: LayerPlan(n, torch.zeros(1, 1), torch.zeros(1, 1), {}) for n in block_targets}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few tokens per expert: pooled, warned
        plan_blockwise(model, targets, _batches(), plan, progress=False, experts=expert_parameters(model, PARAMS),
                       expert_options={"weighting": "routing", "min_tokens": 20})
        whole = svdadapt.collect_covariances(model, _batches(), target_modules=["q_proj"] if with_layers else None,
                                             target_parameters=PARAMS, min_tokens=20, progress=False)
    assert sorted(got) == sorted(whole)
    assert all(torch.equal(got[k], whole[k]) for k in whole)
    with raises_exactly(BlockwiseUnsupported, "blockwise calibration: sequential=True with expert parameters: the "
                                              "blocks would carry on without the experts' compensation"):
        plan_blockwise(model, targets, _batches(), plan, BlockwiseOptions(sequential=True), progress=False,
                       experts=expert_parameters(model, PARAMS))
