"""EVA from svdadapt's covariances: parity with PEFT's ``initialize_lora_eva_weights`` on a tiny Llama and the same
batch (the same subspaces up to float noise, the same redistributed ranks and alphas), B = 0 and the output
unchanged at init, label masks, token means (saved, and old files without them), the errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

import svdadapt
from svdadapt.calibration.masks import IGNORE_INDEX
from svdadapt.core.allocate import allocate_ranks

from bounds import gemm_error, subspace_angle, svd_backward_error, unit_roundoff
from helpers import lora_layers, make_tiny_llama, raises_exactly

RANK, RHO = 8, 2.0
# hidden 16, MLP 32, two kv heads of 8: every input width is at most 2·RANK·RHO = 32 = PEFT's svd_lowrank q, so its
# randomized range finder spans the whole input space and its incremental PCA is exact up to rounding; every
# output width is at least RANK·RHO = 16, so svdadapt's cap min(max_rank, out, in) is PEFT's round(r·rho)
SIZES = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)
# v_proj left out: q/k and gate/up share an input in pairs, where a tie at the budget's cut goes to the first
# layer in both libraries (PEFT: its stable-or-not sort, then the swap giving the hook layer the larger rank); a
# triple q/k/v could split a tie between k and v in the order of torch's unstable argsort (docs/wrap.md)
TARGETS = ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model():
    return make_tiny_llama(seed=3, **SIZES)


def _batch() -> dict[str, torch.Tensor]:
    """One batch of 6 sequences of 16 tokens with right padding and prompt positions labelled -100."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (6, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[4, 9:] = 0
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    labels[2, 5:8] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _rows(model, batch) -> dict[str, torch.Tensor]:
    """The fp64 input rows (N, in) of every Linear at the tokens that count (attention mask and labels), gathered by
    hooks of the test: an independent reference."""
    keep = batch["attention_mask"].bool() & (batch["labels"] != IGNORE_INDEX)
    rows, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, _n=name: rows.__setitem__(_n, args[0][keep].double())))
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return rows


@pytest.fixture(scope="module")
def runs():
    """(svdadapt's EVA model with allocation, PEFT's EVA model, the reference rows, the original model's logits)."""
    torch.manual_seed(0)
    batch = _batch()
    original = _model()
    with torch.no_grad():
        logits = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = svdadapt.wrap(_model(), "eva", rank=RANK, calibration=[batch], target_modules=TARGETS, allocate=True,
                         progress=False)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=RHO))
    theirs = get_peft_model(_model(), config)
    initialize_lora_eva_weights(theirs, dataloader=[batch], show_progress_bar=False)
    return ours, theirs, _rows(original, batch), logits, batch


def _centred(X: torch.Tensor) -> torch.Tensor:
    return X - X.mean(0)


def _ours_error(X: torch.Tensor) -> float:
    """‖E‖₂ of svdadapt's centred covariance (fp32 XᵀX / N, fp32 mean, the outer product and difference in fp64):
    the Gram's γ_{N+2}·|X|ᵀ|X| / N (bounds.gemm_error), and the mean's Σx / N, each entry within γ_N of
    Σ|x| / N, so its outer product within 2γ_N·(|X|ᵀ|X|) / N by Cauchy–Schwarz: 3× the Gram's bound in all
    (Frobenius ≥ spectral); plus the rounding of the result to fp32 (u·‖C‖_F)."""
    n = X.shape[0]
    E = 3 * float(gemm_error(X.mT, X).norm()) / n
    return E + unit_roundoff(torch.float32) * float((X.mT @ X).norm()) / n


def _peft_error(X: torch.Tensor) -> float:
    """‖E‖₂ of PEFT's right singular vectors of the centred rows, in σ units: two incremental steps (the batch, then
    the same batch again stacked under the first step's S·Vᵀ: √2 times the norm), each an svd_lowrank of 4 power
    iterations whose 1 + 2·4 orthogonalizations each carry a Householder backward error (bounds.svd_backward_error)."""
    Xc = _centred(X)
    return 9 * (svd_backward_error(Xc) + svd_backward_error(math.sqrt(2) * Xc))


def _peft_ranks(theirs) -> dict[str, int]:
    return {n: layer.lora_A["default"].weight.shape[0] for n, layer in lora_layers(theirs).items()}


def test_eva_ranks_are_pefts(runs):
    """The same redistribution: svdadapt's allocation (objective "eva": explained variance ratio, one per rank,
    0 .. 2r, ties in target order) gives every layer PEFT's rank, on spectra whose cut is far above the noise."""
    ours, theirs, rows, _, _ = runs
    got = {n: layer.lora_A["default"].weight.shape[0] for n, layer in lora_layers(ours).items()}
    want = _peft_ranks(theirs)
    assert got == want
    assert len(set(want.values())) > 1  # the budget did move between layers
    # well-posed: the last ratio taken and the first left out differ by more than both libraries' error on them
    ratios = []
    for n, X in rows.items():
        lam = torch.linalg.eigvalsh(_centred(X).mT @ _centred(X) / X.shape[0]).flip(0)
        noise = (_ours_error(X) + _peft_error(X) ** 2 / X.shape[0] + 2 * _peft_error(X) * float(lam[0].sqrt())
                 * X.shape[0] ** -0.5) / float(lam.sum())
        ratios += [(float(v), noise) for v in (lam / lam.sum())[:int(RANK * RHO)]]
    ratios.sort(key=lambda t: -t[0])
    budget = RANK * len(rows)
    (last, e1), (first_out, e2) = ratios[budget - 1], ratios[budget]
    assert last - first_out > 2 * (e1 + e2)
    assert ours.peft_config["default"].alpha_pattern == {
        n.replace("base_model.model.", ""): RANK * want[n] / RANK for n in want if want[n] != RANK}
    assert theirs.peft_config["default"].alpha_pattern == ours.peft_config["default"].alpha_pattern


def test_eva_subspaces_are_pefts(runs):
    """Every layer's A spans PEFT's subspace: ‖P_ours − P_peft‖₂ within the two libraries' Wedin bounds against the
    exact centred covariance of the reference rows (sinΘ ≤ ‖E‖ / gap, in λ units for svdadapt's covariance, in σ
    units for PEFT's SVD of the rows)."""
    ours, theirs, rows, _, _ = runs
    A_ours = {n: layer.lora_A["default"].weight.detach().double() for n, layer in lora_layers(ours).items()}
    A_theirs = {n: layer.lora_A["default"].weight.detach().double() for n, layer in lora_layers(theirs).items()}
    worst = 0.0
    for n, A in A_ours.items():
        X = rows[n.replace("base_model.model.", "")]
        r, N = A.shape[0], X.shape[0]
        Xc = _centred(X)
        S = torch.linalg.svdvals(Xc)
        lam = S.square() / N
        bound = (subspace_angle(_ours_error(X), float(lam[r - 1] - lam[r]))
                 + subspace_angle(_peft_error(X), float(S[r - 1] - S[r])))
        assert bound < 0.05, (n, bound)  # the subspace is determined: an unrelated one is at distance ~1
        dist = float(torch.linalg.matrix_norm(A.mT @ A - A_theirs[n].mT @ A_theirs[n], ord=2))
        assert dist <= bound, (n, dist, bound)
        worst = max(worst, dist)
        assert torch.allclose(A @ A.mT, torch.eye(r, dtype=A.dtype), atol=8 * r * unit_roundoff(torch.float32))
    print(f"worst projector distance to PEFT: {worst:.2e}")


def test_eva_init_adds_nothing(runs):
    """B = 0 on every layer, the base kept: the wrapped model's logits are the original's bit for bit."""
    ours, _, _, logits, batch = runs
    for layer in lora_layers(ours).values():
        assert not layer.lora_B["default"].weight.any()
    with torch.no_grad():
        got = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, logits)
    assert ours.svdadapt.method == "eva" and ours.svdadapt.allocation["objective"] == "eva"


def test_uniform_eva_is_top_eigenvectors():
    """Without allocation every layer takes rank r: A's rows are the top-r eigenvectors of the centred covariance
    that svdadapt collected (fp64 eigh of the same tensor: projector equal to rounding)."""
    batch = _batch()
    covs = svdadapt.collect_covariances(_model(), [batch], TARGETS, progress=False)
    pm = svdadapt.wrap(_model(), "eva", rank=4, calibration=covs, target_modules=TARGETS, progress=False)
    for n, layer in lora_layers(pm).items():
        name = n.replace("base_model.model.", "")
        A = layer.lora_A["default"].weight.double()
        V = torch.linalg.eigh(covs.centered(name).double()).eigenvectors[:, -4:]
        d = A.shape[1]
        assert torch.linalg.matrix_norm(A.mT @ A - V @ V.mT, ord=2) <= 8 * d * unit_roundoff(torch.float32)


def test_label_mask_and_means():
    """Calibration drops the positions labelled -100 like padding, for every calibrated method: the token count is
    the mask's, C and μ equal the reference rows' (fp32 Gram bound), and the centred covariance is C − μμᵀ."""
    batch = _batch()
    keep = batch["attention_mask"].bool() & (batch["labels"] != IGNORE_INDEX)
    covs = svdadapt.collect_covariances(_model(), [batch], TARGETS, progress=False)
    rows = _rows(_model(), batch)
    assert covs.has_means and covs.tokens == int(keep.sum()) < int(batch["attention_mask"].sum())
    for n, X in rows.items():
        N = X.shape[0]
        assert covs.token_count(n) == N
        assert ((covs[n].double() - X.mT @ X / N).abs() <= gemm_error(X.mT, X) / N + 1e-30).all()
        mu = X.mean(0)
        assert ((covs.mean(n).double() - mu).abs() <= 2 * (N + 1) * unit_roundoff(torch.float32)
                * X.abs().mean(0)).all()
        assert torch.allclose(covs.centered(n).double(), (covs[n].double() - torch.outer(covs.mean(n).double(),
                              covs.mean(n).double())).float().double(), atol=0, rtol=0)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert svdadapt.collect_covariances(_model(), [no_labels], TARGETS, progress=False).tokens == int(
        batch["attention_mask"].sum())


def test_means_saved_and_old_files(tmp_path):
    """Means round-trip bit for bit; a file saved without means (as before they existed) still loads and serves
    CorDA, and EVA on it is a clear error; so is EVA on a plain mapping, and EVA without calibration."""
    batch = _batch()
    covs = svdadapt.collect_covariances(_model(), [batch], TARGETS, progress=False)
    covs.save(tmp_path / "new.safetensors")
    back = svdadapt.Covariances.load(tmp_path / "new.safetensors")
    assert back.has_means and all(torch.equal(back.mean(n), covs.mean(n)) and torch.equal(back[n], covs[n])
                                  for n in covs)
    old = svdadapt.Covariances({n: covs[n] for n in covs}, {n: covs.token_count(n) for n in covs})
    old.save(tmp_path / "old.safetensors")
    loaded = svdadapt.Covariances.load(tmp_path / "old.safetensors")
    assert not loaded.has_means and loaded.groups == covs.groups
    svdadapt.wrap(_model(), "corda", rank=2, calibration=loaded, target_modules=TARGETS, progress=False)
    msg = ("this method centres the input covariance (C − μμᵀ) and needs the token means, but calibration is {} "
           "(saved before svdadapt recorded them, or built by hand): pass batches, or covariances collected again "
           "with svdadapt.collect_covariances")
    with raises_exactly(ValueError, msg.format("a Covariances without token means")):
        svdadapt.wrap(_model(), "eva", rank=2, calibration=tmp_path / "old.safetensors", target_modules=TARGETS,
                      progress=False)
    with raises_exactly(ValueError, msg.format("a dict")):
        svdadapt.wrap(_model(), "eva", rank=2, calibration={n: covs[n] for n in covs}, target_modules=TARGETS,
                      progress=False)
    with raises_exactly(ValueError, "method 'eva' needs calibration=: a svdadapt.Covariances or an iterable of "
                                    "batches"):
        svdadapt.wrap(_model(), "eva", rank=2, target_modules=TARGETS, progress=False)


def test_eva_objective_costs_ranks():
    """The "eva" objective: a budget of ranks (one each, whatever the layer's shape), min rank 0, the top ratios
    over all layers (a brute-force top-k), ties to the earlier layer of ``order``."""
    spectra = {"a": torch.tensor([3.0, 1.0, 0.5]).sqrt(), "b": torch.tensor([2.0, 2.0, 0.1]).sqrt(),
               "c": torch.tensor([0.2, 0.1, 0.1]).sqrt()}
    shapes = {"a": (10, 3), "b": (3, 100), "c": (50, 50)}
    totals = {n: float(s.square().sum()) for n, s in spectra.items()}
    a = allocate_ranks(spectra, shapes, 1, min_rank=0, max_rank=3, objective="eva", totals=totals, cost="ranks",
                       order=["c", "b", "a"])
    flat = sorted(((float(v) / totals[n], n) for n, s in spectra.items() for v in s.square()), reverse=True)
    want = {n: sum(1 for _, m in flat[:3] if m == n) for n in spectra}
    assert a.ranks == want and a.cost == 3 and a.budget == 3
    tie = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([1.0, 1.0])}
    tshapes = {"x": (2, 2), "y": (2, 2)}
    ones = {"x": 2.0, "y": 2.0}
    assert allocate_ranks(tie, tshapes, 1, budget=3, min_rank=0, objective="eva", totals=ones, cost="ranks",
                          order=["y", "x"]).ranks == {"x": 1, "y": 2}
    assert allocate_ranks(tie, tshapes, 1, budget=3, min_rank=0, objective="eva", totals=ones,
                          cost="ranks").ranks == {"x": 2, "y": 1}


def test_eva_rank_zero_layer_has_no_adapter():
    """A layer allocated rank 0 (min_rank 0) gets no adapter, as PEFT's EVA removes it; the others keep theirs."""
    batch = _batch()
    opts = svdadapt.AllocateOptions(budget=3, max_rank=2)
    pm = svdadapt.wrap(_model(), "eva", rank=1, calibration=[batch], target_modules=TARGETS, allocate=opts,
                       progress=False)
    ranks = {n: l.lora_A["default"].weight.shape[0] for n, l in lora_layers(pm).items()}
    assert sum(ranks.values()) == 3 and len(ranks) < 12
    assert sorted(pm.svdadapt.targets) == sorted(n.replace("base_model.model.", "") for n in ranks)


def test_eva_errors():
    """The errors of the means, the labels and an all-zero allocation, as docs/errors.md gives them."""
    C = torch.eye(4)
    with raises_exactly(ValueError, "token mean for 'q' must be a (4,) tensor, got (3,)"):
        svdadapt.Covariances({"q": C}, {"q": 2}, {"q": torch.zeros(3)})
    with raises_exactly(ValueError, "these covariances hold no token means (collected or saved before svdadapt "
                                    "recorded them): collect them again with svdadapt.collect_covariances for a "
                                    "method that centres its covariance (eva)"):
        svdadapt.Covariances({"q": C}, {"q": 2}).centered("q")
    bad = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 7, dtype=torch.long)}
    with raises_exactly(ValueError, "batch 0: labels has shape (2, 7), but attention_mask (or the ids) (2, 8): "
                                    "labels must be laid out like the sequence they label"):
        svdadapt.collect_covariances(_model(), [bad], TARGETS, progress=False)
    with raises_exactly(ValueError, "the allocation gave every layer rank 0 (budget=0): raise the budget or "
                                    "min_rank"):
        svdadapt.wrap(_model(), "eva", rank=1, calibration=[_batch()], target_modules=TARGETS,
                      allocate=svdadapt.AllocateOptions(budget=0), progress=False)
    with raises_exactly(ValueError, "AllocateOptions: cost must be None or one of 'params', 'ranks', got 'bytes'"):
        svdadapt.AllocateOptions(cost="bytes")
