"""``wrap(..., target_parameters=...)``: MoE experts (transformers 5's 3-D ``gate_up_proj`` / ``down_proj``) and
2-D ``nn.Parameter`` weights as PEFT ``ParamWrapper`` targets, every method per expert, on tiny Mixtral and
Qwen3-MoE models built from configs. Each expert's adapter is read through PEFT's own ``get_delta_weight`` (not
through svdadapt's unpacking), and the packing is checked against PEFT's forward."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import svdadapt
from svdadapt.engine.experts import pack
from bounds import gamma, gemm_error, half_ulp, truncated_svd_error, unit_roundoff
from helpers import max_rel, out, raises_exactly, rel, token_ids
from moe_models import EXPERTS, abs_product, base_of, covariances as _covariances, delta, moe, stored, wrappers

RANK, ALPHA = 2, 4  # scaling s = 2: a forgotten s would show
IDS = token_ids(2, 9, 5, vocab=64)


FAMILIES = ["mixtral", "qwen3_moe"]


# ------------------------------------------------------------------------------------------- packing vs PEFT
@pytest.mark.parametrize("family", FAMILIES)
def test_packing_is_peft_layout(family):
    """Per-expert factors packed by ``experts.pack`` give, through PEFT's ParamWrapper forward, the model whose
    expert e weight is W_e + s·B_e·A_e: lora_A (E·r, in) blocks, lora_B column j·E + e for expert e rank j."""
    model = moe(family)
    g = torch.Generator().manual_seed(3)
    pm = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, alpha=ALPHA, target_modules=[],
                       target_parameters=EXPERTS, progress=False)
    expected = copy.deepcopy(model)
    for key, w in wrappers(pm).items():
        E, (out_f, in_f) = w.num_experts, (w.out_features, w.in_features)
        As = [torch.randn(RANK, in_f, generator=g) * 0.3 for _ in range(E)]
        Bs = [torch.randn(out_f, RANK, generator=g) * 0.3 for _ in range(E)]
        A, B = pack(As, Bs)
        w.lora_A["default"].weight.data.copy_(A)
        w.lora_B["default"].weight.data.copy_(B)
        with torch.no_grad():  # the wrapped base holds the residual: the expected model adds the delta to it
            base = w.get_param()
            target = getattr(expected.get_submodule(key.rpartition(".")[0]), key.rpartition(".")[2])
            target.copy_(base + torch.stack([ALPHA / RANK * (b @ a) for a, b in zip(As, Bs)]))
    # two fp32 forwards of the same function, summed in different orders: ~√n·u per layer, n ≤ 24 (1e-5 as in
    # test_wrap's exact-at-init, with room)
    assert max_rel(out(pm, IDS), out(expected, IDS)) <= 1e-5


# ------------------------------------------------------------------------------------------- exact at init
def _method_kw(method: str, model) -> dict:
    if method.startswith("corda"):
        return {"mode": method.split("-")[1], "calibration": _covariances(model)}
    return {}


@pytest.mark.parametrize("family", [*FAMILIES, "olmoe"])
@pytest.mark.parametrize("method", ["pissa", "milora", "corda-ipa", "corda-kpa"])
def test_exact_at_init_fp32(family, method):
    model = moe(family)
    pm = svdadapt.wrap(copy.deepcopy(model), method.split("-")[0], rank=RANK, alpha=ALPHA,
                       target_parameters=EXPERTS, progress=False, **_method_kw(method, model))
    # two fp32 forwards (W·x vs base·x + B·(A·x)) through 2 blocks and the head: ~√n·u per layer (as test_wrap)
    assert max_rel(out(pm, IDS), out(model, IDS)) <= 1e-5
    assert len(wrappers(pm)) == 4 and len(pm.svdadapt.parameters) == 4
    assert all(p.requires_grad == ("lora_" in n) for n, p in pm.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_each_expert_is_its_own_truncated_svd(family, method):
    """Expert e's adapter (PEFT's delta) is the brute-force fp64 truncation [W_e]_r (top r for PiSSA, bottom r
    for MiLoRA) within the fp32 SVD's bound at the cut; base + adapter = W_e up to the fp32 addmm."""
    model = moe(family, seed=2)
    pm = svdadapt.wrap(copy.deepcopy(model), method, rank=RANK, alpha=ALPHA, target_modules=[],
                       target_parameters=EXPERTS, progress=False)
    largest = method == "pissa"
    for key, w in wrappers(pm).items():
        W, D, base, absBA = stored(model, key), delta(w), base_of(w), abs_product(w)
        for e in range(W.shape[0]):
            U, S, Vh = torch.linalg.svd(W[e], full_matrices=False)
            keep = slice(0, RANK) if largest else slice(S.numel() - RANK, S.numel())
            best = (U[:, keep] * S[keep]) @ Vh[keep]
            bound = truncated_svd_error(W[e].float(), RANK, largest, S=S) / float(best.norm())
            assert rel(D[e], best) <= bound, (key, e)
            # residual + adapter = W_e up to the fp32 addmm forming the residual, ≤ γ_{r+2}·(|W| + s·|B|·|A|)
            # entrywise (Higham 3.13), plus PEFT's fp32 product forming D: γ_r·s·|B|·|A|
            err = (base[e] + D[e] - W[e]).abs()
            bound = gamma(RANK + 2) * (W[e].abs() + absBA[e]) + gamma(RANK) * absBA[e]
            assert bool((err <= bound).all()), (key, e)
    assert set(pm.svdadapt.report) == {f"{k}[{e}]" for k in wrappers(pm) for e in range(4)}


def test_corda_each_expert_is_the_brute_force():
    """CorDA IPA per expert: s·B_e·A_e·C_d = [W_e·C_d]_r with C_d = C_e + λ·mean(diag C_e)·I (λ the expert's
    reported damping), the covariance of exactly that expert under its own name."""
    model = moe("mixtral", seed=4)
    covs = _covariances(model, seed=5)
    pm = svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, alpha=ALPHA, target_modules=[],
                       target_parameters=EXPERTS, calibration=covs, progress=False)
    for key, w in wrappers(pm).items():
        W, D, absBA = stored(model, key), delta(w), abs_product(w)
        for e in range(W.shape[0]):
            name = f"{key}[{e}]"
            C = (covs[name] if name in covs else covs[key][e]).double()
            lam = pm.svdadapt.report[name]["damping"]
            Cd = C + lam * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
            WC = W[e] @ Cd
            U, S, Vh = torch.linalg.svd(WC, full_matrices=False)
            truncation = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
            # as tests/core/test_corda.py's _ours_error: WC rounded to fp32, the fp32 SVD's error at the cut, and
            # the factors' rounding carried through C_d: γ_3·s·‖(|B|·|A|)·|C_d|‖, plus PEFT's fp32 product forming D
            drift = unit_roundoff(torch.float32) * float(WC.norm())
            bound = truncated_svd_error(WC.float(), RANK, True, S=S, drift=drift)
            bound += (gamma(3) + gamma(RANK)) * float((absBA[e] @ Cd.abs()).norm())
            assert rel(D[e] @ Cd, truncation) <= bound / float(truncation.norm()), name


def test_eora_each_expert_from_its_reference_slice():
    """EoRA per expert: s·B_e·A_e = [ΔW_e·L]_r·L⁻¹ (C_e = L·Lᵀ, full rank) with ΔW_e = W_ref,e − W_c,e, the
    reference's own slice; the compressed base is untouched."""
    ref = moe("qwen3_moe", seed=6)
    compressed = copy.deepcopy(ref)
    with torch.no_grad():
        for p in compressed.parameters():
            if p.dim() == 3:
                p.copy_(torch.round(p * 8) / 8)  # a coarse grid: ΔW of full rank
    covs = _covariances(ref, seed=7)
    before = {k: stored(compressed, k).clone() for k in (n for n, p in compressed.named_parameters() if p.dim() == 3)}
    pm = svdadapt.wrap(compressed, "eora", rank=RANK, alpha=ALPHA, target_modules=[], target_parameters=EXPERTS,
                       calibration=covs, reference=ref, progress=False)
    for key, w in wrappers(pm).items():
        assert torch.equal(base_of(w), before[key])
        dW, D, absBA = stored(ref, key) - before[key], delta(w), abs_product(w)
        for e in range(dW.shape[0]):
            name = f"{key}[{e}]"
            C = (covs[name] if name in covs else covs[key][e]).double()
            L = torch.linalg.cholesky(C)
            U, S, Vh = torch.linalg.svd(dW[e] @ L, full_matrices=False)
            best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]  # [ΔW·L]_r: the optimum, in the whitened space
            # compared in the whitened space, where the problem is an SVD: ΔW·S rounded to fp32 (drift), the fp32
            # SVD's bound at the cut, and the factors' rounding (A = √S·Vh·S⁺ formed in fp64, rounded to fp32) carried
            # through L, plus PEFT's fp32 product forming D: (γ_3 + γ_r)·s·‖(|B|·|A|)·|L|‖ (as the CorDA test)
            drift = unit_roundoff(torch.float32) * float((dW[e] @ L).norm())
            bound = truncated_svd_error((dW[e] @ L).float(), RANK, True, S=S, drift=drift)
            bound += (gamma(3) + gamma(RANK)) * float((absBA[e] @ L.abs()).norm())
            assert rel(D[e] @ L, best) <= bound / float(best.norm()), name


def test_bf16_no_worse_than_casting():
    """bf16 experts: the residual is fl32(W_e − s·B_e·A_e) rounded once, from the factors as PEFT stores them; per
    element within one rounding plus the fp32 accumulation, and in RMS no further from W than casting was."""
    W32 = moe("mixtral", seed=8)
    pm = svdadapt.wrap(moe("mixtral", seed=8, dtype=torch.bfloat16), "pissa", rank=RANK, alpha=ALPHA,
                       target_modules=[], target_parameters=EXPERTS, progress=False)
    wrap_sq = cast_sq = 0.0
    for key, w in wrappers(pm).items():
        Wd = stored(W32, key).to(torch.bfloat16).double()
        base = base_of(w)
        A, B = w.lora_A["default"].weight, w.lora_B["default"].weight
        assert A.dtype == torch.float32  # PEFT keeps the factors in fp32 (autocast_adapter_dtype)
        absBA = abs_product(w)
        # PEFT's get_delta_weight rounds its result to bf16, so its formula is applied here in fp64:
        # einsum("o r e, e r i -> e o i") of lora_B (out, r, E) and lora_A (E, r, in)
        d = w.scaling["default"] * torch.einsum("ore,eri->eoi", B.double().reshape(B.shape[0], -1, w.num_experts),
                                                A.double().reshape(w.num_experts, -1, A.shape[-1]))
        residual = Wd - d
        # the fp32 addmm per entry: ≤ γ_{r+2}·(|W| + s·|B_e|·|A_e|) (Higham 3.13)
        fp32 = gamma(RANK + 2) * (Wd.abs() + absBA)
        assert bool(((base - residual).abs() <= half_ulp(residual.abs() + fp32, torch.bfloat16) + fp32).all()), key
        wrap_sq += float((base - residual).pow(2).sum())
        cast_sq += float((Wd - stored(W32, key)).pow(2).sum())
    assert math.sqrt(wrap_sq / cast_sq) <= 1.0  # PiSSA's residual is smaller than W: its ulps are smaller


def test_two_dimensional_parameter_target():
    """A 2-D nn.Parameter (Mixtral's router weight, (E, hidden), used as F.linear(x, weight)): PiSSA's [W]_r, exact
    at init, addressed by its key without an index."""
    model = moe("mixtral", seed=9)
    pm = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, alpha=ALPHA, target_modules=[],
                       target_parameters=["mlp.gate.weight"], progress=False)
    assert max_rel(out(pm, IDS), out(model, IDS)) <= 1e-5  # as test_exact_at_init_fp32
    for key, w in wrappers(pm).items():
        W = stored(model, key)[0]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
        assert rel(delta(w)[0], best) <= truncated_svd_error(W.float(), RANK, S=S) / float(best.norm())
    assert set(pm.svdadapt.report) == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}


class _TransposedExperts(torch.nn.Module):
    """Experts stored (E, in, out) and applied as x @ w[e], flagged ``is_transposed`` as gpt-oss's are."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.w = torch.nn.Parameter(torch.randn(3, 10, 7, generator=g))  # 3 experts, in 10, out 7

    def forward(self, x):
        return sum(x @ self.w[e] for e in range(self.w.shape[0]))


def test_transposed_experts_are_read_as_peft_reads_them():
    """An ``is_transposed`` module's expert e is the (out, in) matrix w[e]ᵀ: PiSSA's adapter is [w[e]ᵀ]_r, PEFT's
    ParamWrapper agrees on the orientation (its delta is added to w in (E, in, out)), and the model is exact at init."""
    model = torch.nn.Sequential(_TransposedExperts())
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(12))
    before, W = model(x).detach(), model[0].w.detach().double().clone()
    pm = svdadapt.wrap(model, "pissa", rank=RANK, alpha=ALPHA, target_modules=[], target_parameters=["0.w"],
                       progress=False)
    with torch.no_grad():
        assert max_rel(pm(x), before) <= 1e-5  # two fp32 products of length ≤ 10 (as test_exact_at_init_fp32)
    (w,) = wrappers(pm).values()
    D = w.get_delta_weight("default").detach().double()  # PEFT's delta in the stored layout (E, in, out)
    assert D.shape == W.shape
    for e in range(3):
        U, S, Vh = torch.linalg.svd(W[e].mT, full_matrices=False)
        best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
        assert rel(D[e].mT, best) <= truncated_svd_error(W[e].mT.float(), RANK, S=S) / float(best.norm())
    assert pm.svdadapt.parameters["0"]["transposed"] and pm.svdadapt.parameters["0"]["shape"] == [7, 10]


def test_deterministic_and_independent_of_other_targets():
    """Each expert's sketch is seeded from (seed, expert name): the same adapter whatever else is targeted."""
    model = moe("qwen3_moe", seed=10)
    a = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, svd="randomized", target_parameters=EXPERTS,
                      progress=False)
    b = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, svd="randomized", target_modules=[],
                      target_parameters=["experts.down_proj"], progress=False)
    n = "model.layers.1.mlp.experts"  # down_proj's wrapper (the outer one when both are targeted)
    assert torch.equal(a.svdadapt.init_factors[n][0], b.svdadapt.init_factors[n][0])
    assert torch.equal(a.svdadapt.init_factors[n][1], b.svdadapt.init_factors[n][1])


# ------------------------------------------------------------------------------------------- coverage warning
def test_coverage_warning_names_what_is_left_out():
    model = moe("mixtral")
    with pytest.warns(UserWarning) as caught:
        svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, progress=False)
    messages = [str(w.message) for w in caught if "svdadapt: the targets cover" in str(w.message)]
    assert messages == [
        "svdadapt: the targets cover 1,536 of the 6,272 weights of the decoder blocks (model.layers); 4,736 are "
        "left out: mlp.experts.gate_up_proj (3,072), mlp.experts.down_proj (1,536), mlp.gate.weight (128). MoE "
        "experts are parameters, not layers: add target_parameters=['mlp.experts.down_proj', "
        "'mlp.experts.gate_up_proj'] to adapt them"]
    assert caught[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="svdadapt: the targets cover")
        svdadapt.wrap(copy.deepcopy(model), "pissa", rank=RANK, target_parameters=EXPERTS, progress=False)


# ------------------------------------------------------------------------------------------- errors
def test_errors():
    model = moe("mixtral")
    with raises_exactly(TypeError, "target_parameters must be a list of strings (as in PEFT), got the string "
                        "'experts.down_proj'; write ['experts.down_proj']"):
        svdadapt.wrap(model, "pissa", rank=RANK, target_parameters="experts.down_proj", progress=False)
    with raises_exactly(ValueError, "target_parameters=['experts.w9'] matched no parameter of MixtralForCausalLM (an "
                        "entry matches '<module>.<param>' exactly or as a dotted suffix); 3-D parameters here: "
                        "['mlp.experts.down_proj', 'mlp.experts.gate_up_proj']"):
        svdadapt.wrap(model, "pissa", rank=RANK, target_parameters=["experts.w9"], progress=False)
    with raises_exactly(ValueError, "rank 13 exceeds min(out, in) = 12 of target parameter "
                        "'model.layers.0.mlp.experts.down_proj' (each expert 16x12)"):
        svdadapt.wrap(model, "pissa", rank=13, target_modules=[], target_parameters=["experts.down_proj"],
                      progress=False)
    covs = _covariances(model)
    del covs["model.layers.1.mlp.experts.gate_up_proj[2]"]
    with raises_exactly(ValueError, "calibration has no covariance for expert 'model.layers.1.mlp.experts."
                        "gate_up_proj[2]' of target parameter 'model.layers.1.mlp.experts.gate_up_proj' (give "
                        "'model.layers.1.mlp.experts.gate_up_proj[2]' (in, in), or "
                        "'model.layers.1.mlp.experts.gate_up_proj' stacked (4, in, in))"):
        svdadapt.wrap(model, "corda", rank=RANK, target_modules=[], target_parameters=EXPERTS, calibration=covs,
                      progress=False)
    with raises_exactly(ValueError, "target parameter 'model.layers.0.mlp.gate.weight' is 2-D (not an MoE "
                        "expert): its input covariance cannot be collected from routed tokens; pass calibration= a "
                        "Covariances holding it"):
        svdadapt.wrap(model, "corda", rank=RANK, target_modules=[], target_parameters=["mlp.gate.weight"],
                      calibration=[IDS], progress=False)
    with raises_exactly(ValueError, "target_parameters=['experts.down_proj'] with allocate= is not supported: PEFT "
                        "builds one ParamWrapper per parameter, whose rank all its experts share, while the "
                        "allocation chooses a rank per layer; drop allocate= and give the parameters' ranks with "
                        "rank_pattern= (docs/experts.md)"):
        svdadapt.wrap(model, "pissa", rank=RANK, target_parameters=["experts.down_proj"], allocate=True,
                      progress=False)
    assert not svdadapt.modules.targets.is_peft(model)  # nothing was touched


@pytest.mark.parametrize("method", ["corda", "eora"])
def test_calibration_batches_give_the_routed_token_covariances(method):
    """calibration= batches: each expert's covariance is collected from the tokens routed to it
    (``collect_covariances(target_parameters=)``, on the reference model for EoRA), so the adapters equal, bit for
    bit, those from the covariances collected by hand and passed in: one collection routine, one plan."""
    model = moe("mixtral", seed=8)
    batches = [token_ids(2, 9, seed=s, vocab=64) for s in range(6)]
    kw = {}
    if method == "eora":  # the reference: the model before a perturbation of its experts
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 3:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
        kw["reference"] = ref
    hooked = kw.get("reference", model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage warning, and the fallback's for experts with few tokens
        covs = svdadapt.collect_covariances(hooked, batches, target_modules=None, target_parameters=EXPERTS,
                                            progress=False)
        given = svdadapt.wrap(copy.deepcopy(model), method, rank=RANK, target_modules=[], target_parameters=EXPERTS,
                              calibration=covs, progress=False, **kw)
        collected = svdadapt.wrap(copy.deepcopy(model), method, rank=RANK, target_modules=[],
                                  target_parameters=EXPERTS, calibration=iter(batches), progress=False, **kw)
    a, b = given.state_dict(), collected.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(torch.count_nonzero(v) for k, v in b.items() if "lora_A" in k)
