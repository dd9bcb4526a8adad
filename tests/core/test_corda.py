"""CorDA (IPA / KPA): exact at init, s·B·A·C_d is the rank-r truncation of W·C_d, C = I reduces to
PiSSA / MiLoRA, parity with PEFT's own CorDA on the same covariance, clear errors."""

from __future__ import annotations

import copy
import dataclasses
import os
import weakref

import pytest
import torch

import svdadapt
from svdadapt.core.linalg import damped_cholesky

from bounds import gamma, gemm_error, truncated_svd_error, unit_roundoff
from helpers import lora_layers, lora_product, make_tiny_llama, max_rel, out, raises_exactly, rel, same_state

RANK, ALPHA = 4, 8  # scaling s = 2, so a forgotten s would show


def _ours_error(W: torch.Tensor, Cd: torch.Tensor, layer, largest: bool) -> tuple[float, torch.Tensor]:
    """(bound on ‖s·B·A·C_d − [W·C_d]_r‖_F for our CorDA, the fp64 singular values of W·C_d): W·C_d formed in
    fp64 and rounded to fp32 (drift u·‖W·C_d‖_F), an fp32 SVD (truncated_svd_error at the cut), V̂ = Vᵀ·C_d⁻¹
    solved in fp64 and rounded to fp32, then multiplied back by C_d: γ_3·s·‖(|B|·|A|)·|C_d|‖_F."""
    WC = W.double() @ Cd
    S = torch.linalg.svdvals(WC)
    drift = unit_roundoff(torch.float32) * float(WC.norm())
    B, A = layer.lora_B["default"].weight.detach().double(), layer.lora_A["default"].weight.detach().double()
    factors = gamma(3) * layer.scaling["default"] * float(((B.abs() @ A.abs()) @ Cd.abs()).norm())
    return truncated_svd_error(WC.float(), RANK, largest, S=S, drift=drift) + factors, S


def _batches(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(2)]
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 10:] = 0
    return [{"input_ids": i, "attention_mask": mask} for i in ids]


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_llama()
    covs = svdadapt.collect_covariances(model, _batches(), progress=False)
    return model, covs


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_exact_at_init(setup, mode):
    model, covs = setup
    ids = _batches(7)[0]["input_ids"]
    peft_model = svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, alpha=ALPHA, mode=mode, calibration=covs,
                               progress=False)
    # two fp32 forwards (W·x vs base·x + B·(A·x)), as test_wrap's exact-at-init: ~√n·u per layer, 2 blocks
    assert max_rel(out(peft_model, ids), out(model, ids)) <= 1e-5
    assert peft_model.svdadapt["options"]["mode"] == mode


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_adapter_times_cd_is_truncation_of_w_cd(setup, mode):
    """s·B·A·C_d = [W·C_d]_r (top r for IPA, bottom r for KPA), and the base is W − s·B·A."""
    model, covs = setup
    peft_model = svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, alpha=ALPHA, mode=mode,
                               calibration=covs, progress=False)
    mods = lora_layers(peft_model)
    assert mods.keys() == set(covs)
    for name, C in covs.items():
        lam = peft_model.svdadapt["report"][name]["damping"]
        assert lam == 0.01  # every covariance here is well conditioned after the first damping
        C = C.double()
        Cd = C + lam * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
        W = model.get_submodule(name).weight.detach().double()
        U, S, Vh = torch.linalg.svd(W @ Cd, full_matrices=False)
        keep = slice(0, RANK) if mode == "ipa" else slice(S.shape[0] - RANK, S.shape[0])
        truncation = (U[:, keep] * S[keep]) @ Vh[keep]
        P = lora_product(mods[name])
        bound, _ = _ours_error(W, Cd, mods[name], mode == "ipa")
        assert rel(P @ Cd, truncation) <= bound / float(truncation.norm()), name
        base = mods[name].get_base_layer().weight
        fp32 = gemm_error(mods[name].lora_B["default"].weight, mods[name].lora_A["default"].weight, C=W,
                          alpha=mods[name].scaling["default"])  # the residual's fp32 addmm
        assert max_rel(base.double() + P, W) <= float(fp32.max() / W.abs().max())



def test_ipa_top_kpa_bottom_energy(setup):
    """IPA's adapter holds the most of W·C_d's energy, KPA's the least (what each mode is for)."""
    model, covs = setup
    ipa = svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, mode="ipa", calibration=covs, progress=False)
    kpa = svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, mode="kpa", calibration=covs, progress=False)
    for name in covs:
        e_ipa, e_kpa = ipa.svdadapt["report"][name]["energy"], kpa.svdadapt["report"][name]["energy"]
        out_f, in_f = model.get_submodule(name).weight.shape
        k = min(out_f, in_f)
        assert e_ipa >= RANK / k >= e_kpa  # top-r holds at least its share of the energy, bottom-r at most


@pytest.mark.parametrize("mode,plain", [("ipa", "pissa"), ("kpa", "milora")])
def test_identity_covariance_reduces_to_pissa_milora(mode, plain):
    model = make_tiny_llama()
    names = list(svdadapt.resolve_targets(model))
    eye = {n: torch.eye(model.get_submodule(n).in_features) for n in names}
    ref = svdadapt.wrap(copy.deepcopy(model), plain, rank=RANK, alpha=ALPHA, svd="full", progress=False)
    # undamped, C_d = I exactly: the very same factors
    und = svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, alpha=ALPHA, mode=mode, calibration=eye,
                        damping=0.0, svd="full", progress=False)
    # damped (C_d = 1.01·I): the same adapter product and residual; the factors differ by √1.01
    dmp = svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, alpha=ALPHA, mode=mode, calibration=eye,
                        svd="full", progress=False)
    r, d = lora_layers(ref), lora_layers(dmp)
    assert r.keys() == d.keys() == set(names)
    for n in names:
        A0, B0 = ref.svdadapt["init_factors"][n]
        A1, B1 = und.svdadapt["init_factors"][n]
        # C_d = I: W·C_d = W and the solve with L = I are exact; the fp64 round trips of V̂ cost ≤ 2u each
        torch.testing.assert_close(A1, A0, rtol=0, atol=1e-6 * A0.abs().max().item())
        torch.testing.assert_close(B1, B0, rtol=0, atol=1e-6 * B0.abs().max().item())
        P0 = lora_product(r[n])
        # fp32 SVD of 1.01·W vs of W: two SVDs of W, each within truncated_svd_error (Frobenius ≥ max entry)
        W = model.get_submodule(n).weight.detach()
        product_err = 2 * truncated_svd_error(W, RANK, mode == "ipa")
        torch.testing.assert_close(lora_product(d[n]), P0, rtol=0, atol=product_err)
        W0 = r[n].get_base_layer().weight
        # the residual differs from PiSSA's by the products' difference plus each side's fp32 addmm
        fp32 = 2 * float(gemm_error(r[n].lora_B["default"].weight, r[n].lora_A["default"].weight, C=W,
                                    alpha=r[n].scaling["default"]).max())
        torch.testing.assert_close(d[n].get_base_layer().weight.double(), W0.double(), rtol=0,
                                   atol=product_err + fp32)


@pytest.mark.parametrize("mode,peft_method", [("ipa", "ipm"), ("kpa", "kpm")])
def test_parity_with_peft_corda(setup, tmp_path, mode, peft_method):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model, covs = setup
    ours = svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, alpha=ALPHA, mode=mode, calibration=covs,
                         progress=False)
    cov_file = os.path.join(tmp_path, "cov.pt")
    torch.save({n: covs[n].clone() for n in covs}, cov_file)  # PEFT reads the same covariance from its file
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="corda",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        corda_config=CordaConfig(covariance_file=cov_file, corda_method=peft_method))
    theirs_model = copy.deepcopy(model)
    preprocess_corda(theirs_model, config)
    theirs = get_peft_model(theirs_model, config)
    a, b = lora_layers(ours), lora_layers(theirs)
    assert a.keys() == b.keys() == set(covs)
    for n in covs:
        # both sides against the fp64 [W·C_d]_r·C_d⁻¹, in the weight's space (‖·C_d⁻¹‖₂ = 1/λ_min(C_d)):
        # ours from _ours_error; PEFT's forms W·C_d in fp32 (a GEMM), runs the same fp32 SVD, and multiplies by
        # an fp32 inverse, ‖δ(C_d⁻¹)‖₂ ≤ d·u·κ(C_d)·‖C_d⁻¹‖₂ (LU-based inverse, Higham §14.3)
        C = covs[n].double()
        lam = ours.svdadapt["report"][n]["damping"]  # PEFT's loop starts at the same 0.01 and doubles alike
        Cd = C + lam * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
        W = model.get_submodule(n).weight.detach().double()
        ev = torch.linalg.eigvalsh(Cd)
        inv_norm, kappa = 1 / float(ev[0]), float(ev[-1] / ev[0])
        ours_err, S = _ours_error(W, Cd, a[n], mode == "ipa")
        kept = S[:RANK] if mode == "ipa" else S[S.numel() - RANK:]
        gemm = float(gemm_error(W, Cd).norm())
        theirs_err = (truncated_svd_error((W @ Cd).float(), RANK, mode == "ipa", S=S, drift=gemm) * inv_norm
                      + float(kept.norm()) * C.shape[0] * unit_roundoff(torch.float32) * kappa * inv_norm)
        diff = ours_err * inv_norm + theirs_err
        Pb = lora_product(b[n])
        assert rel(lora_product(a[n]), Pb) <= diff / float(Pb.norm()), n
        # the bases: the same difference, plus each side's fp32 subtraction W − s·B·A
        fp32 = 2 * float(gemm_error(a[n].lora_B["default"].weight, a[n].lora_A["default"].weight, C=W,
                                    alpha=a[n].scaling["default"]).max())
        Wb = b[n].get_base_layer().weight
        assert max_rel(a[n].get_base_layer().weight, Wb) <= (diff + fp32) / float(Wb.abs().max()), n


def test_prepare_runs_once_per_shared_input_and_is_freed(setup, monkeypatch):
    model, covs = setup
    calls: list[tuple[int, int]] = []
    alive: set[int] = set()
    spec = svdadapt.METHODS["corda"]

    class Tracked(dict):
        pass

    def counting(C, **kw):
        calls.append((C.shape[0], len(alive)))  # (width, preparations still alive when this one starts)
        out = Tracked(spec.prepare(C, **kw))
        alive.add(id(out))
        weakref.finalize(out, alive.discard, id(out))
        return out

    monkeypatch.setitem(svdadapt.METHODS, "corda", dataclasses.replace(spec, prepare=counting))
    svdadapt.wrap(copy.deepcopy(model), "corda", rank=RANK, calibration=covs, progress=False)
    assert [w for w, _ in calls] == [64, 64, 64, 128] * 2  # q/k/v once, o, gate/up once, down: per layer
    # a preparation (fp64 C_d and its Cholesky factor) is dropped once its last layer is done
    assert max(n for _, n in calls) <= 1 and not alive


# ---------------------------------------------------------------------------------------------------------- errors
def _raises(exc, message, **kw):
    with raises_exactly(exc, message):
        svdadapt.wrap(make_tiny_llama(), "corda", rank=RANK, progress=False, **kw)


def test_errors(setup):
    _, covs = setup
    _raises(ValueError, "method 'corda' needs calibration=: a svdadapt.Covariances or an iterable of batches")
    _raises(ValueError, "corda mode must be 'ipa' or 'kpa', got 'top'", mode="top", calibration=covs)
    _raises(ValueError, "damping must be a finite number >= 0, got -0.1", damping=-0.1, calibration=covs)
    bad = dict(covs)
    bad["model.layers.1.mlp.down_proj"] = torch.eye(64)
    _raises(ValueError, "covariance for 'model.layers.1.mlp.down_proj' has shape (64, 64), expected (128, 128)",
            calibration=bad)
    missing = svdadapt.Covariances({n: covs[n] for n in list(covs)[:-1]})
    _raises(ValueError, "calibration has no covariance for targeted module 'model.layers.1.mlp.down_proj' "
            "(1 of 14 targets missing)", calibration=missing)
    nan = dict(covs)
    nan["model.layers.0.self_attn.o_proj"] = torch.full((64, 64), float("nan"))
    _raises(ValueError, "covariance for 'model.layers.0.self_attn.o_proj' contains NaN or inf", calibration=nan)
    zero = dict(covs)
    zero["model.layers.0.self_attn.o_proj"] = torch.zeros(64, 64)
    _raises(ValueError, "covariance for 'model.layers.0.self_attn.o_proj' is zero: calibration saw no signal for "
            "this layer", calibration=zero)
    with pytest.raises(ValueError, match=r"^svd='randomized' cannot find the smallest singular triplets"):
        svdadapt.wrap(make_tiny_llama(), "corda", rank=RANK, mode="kpa", svd="randomized", calibration=covs)


def test_error_leaves_model_untouched(setup):
    """A bad covariance is caught before any weight is rewritten or any PEFT layer injected."""
    model, covs = setup
    target = copy.deepcopy(model)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    zero = dict(covs)
    zero["model.layers.1.mlp.down_proj"] = torch.zeros(128, 128)
    with pytest.raises(ValueError, match=r"^covariance for 'model\.layers\.1\.mlp\.down_proj' is zero"):
        svdadapt.wrap(target, "corda", rank=RANK, calibration=zero, progress=False)
    assert same_state(target.state_dict(), before)


@pytest.mark.slow
def test_corda_on_smollm2_real_text(smollm2):
    """Real model, real text: calibration through the tokenizer, CorDA-KPA on the first block, exact at init, each
    layer damped by what damped_cholesky picks for its covariance."""
    from pydoc_data.topics import topics

    model, tok = smollm2
    texts = [topics[k] for k in sorted(topics)[:4]]
    batches = svdadapt.text_batches(tok, texts, seq_len=64, batch_size=2, max_batches=2)
    ids = svdadapt.text_batches(tok, [topics[k] for k in sorted(topics)[-2:]], seq_len=32, batch_size=1,
                                max_batches=1)[0]
    targets = r"model\.layers\.0\..*_proj"
    covs = svdadapt.collect_covariances(model, batches, target_modules=targets, progress=False)
    ref = out(model, ids)
    peft_model = svdadapt.wrap(model, "corda", rank=8, mode="kpa", calibration=covs, progress=False,
                               target_modules=targets)
    report = peft_model.svdadapt["report"]
    assert len(peft_model.svdadapt["targets"]) == 7 and report.keys() == set(covs)
    assert max_rel(out(peft_model, ids), ref) <= 1e-5  # two fp32 forwards, as in test_exact_at_init
    for group in covs.groups:  # one damping per shared input
        C = covs[group[0]].double()
        _, lam = damped_cholesky(C, 0.01)  # the default damping, grown until C_d is well conditioned
        assert [report[n]["damping"] for n in group] == [lam] * len(group), group
        ev = torch.linalg.eigvalsh(C + lam * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64))
        assert ev[0] > 0 and ev[-1] / ev[0] <= 1e6, group  # damped_cholesky's max_cond


def test_damped_cholesky_bound_and_growth():
    """λ = damping when the trace bound already limits cond(C_d); otherwise λ doubles until it does."""
    v = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    C = v @ v.T  # rank one: as ill-conditioned as a covariance gets
    scale = C.diagonal().mean()
    eye = torch.eye(64, dtype=torch.float64)
    L, lam = damped_cholesky(C, 0.01)
    assert lam == 0.01
    # fp64 Cholesky: |LLᵀ − C_d| ≤ γ_{d+1}·|L||Lᵀ| (Higham Thm 10.3), ~1e-14 for d ≤ 128
    torch.testing.assert_close(L @ L.T, C + 0.01 * scale * eye, rtol=0, atol=1e-12 * float(C.abs().max()))
    # cond(C_d) = (64 + λ) / λ ≤ 100 needs λ ≥ 0.6465: 0.01 doubled 7 times
    L, lam = damped_cholesky(C, 0.01, max_cond=100)
    assert lam == 0.01 * 2**7
    ev = torch.linalg.eigvalsh(L @ L.T)
    assert ev[-1] / ev[0] <= 100
