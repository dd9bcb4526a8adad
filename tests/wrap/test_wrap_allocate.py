"""wrap(..., allocate=...): every layer decomposed once at its maximum rank, the ranks allocated from those spectra
(core/allocate.py, tested against brute force in tests/core/test_allocate.py), the factors cut to them.

Checked here: the cut factors are the top r of the max-rank decomposition (bit for bit: the same ops); the ranks
are allocate_ranks' on brute-force fp64 spectra; EoRA's allocated whitened error on the calibration data is at
most the uniform one and equals the formula; exact at init; never over budget; deterministic; equal ranks for
identical spectra; the record, save / load, and the errors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import svdadapt
from svdadapt import AllocateOptions
from svdadapt.core.allocate import objective_gains
from svdadapt.core.patterns import layer_value
from svdadapt.engine.allocation import MAX_RANK_FACTOR

from bounds import gemm_error, unit_roundoff
from helpers import lora_layers, lora_product, make_tiny_llama, matrix_with_spectrum, max_rel, out, \
    raises_exactly, rel, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

RANK = 4
IDS = token_ids(2, 12, seed=0)
CALIB = [{"input_ids": token_ids(4, 32, s), "attention_mask": torch.ones(4, 32, dtype=torch.long)} for s in (1, 2)]


def _targets(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in svdadapt.resolve_targets(model).items()}


def _cost(pm) -> int:
    return sum(layer.r["default"] * (layer.in_features + layer.out_features) for layer in lora_layers(pm).values())


def test_the_cut_factors_are_the_top_r_of_the_max_rank_decomposition() -> None:
    pm = svdadapt.wrap(make_tiny_llama(2), "pissa", RANK, allocate=True, progress=False)
    ranks = pm.svdadapt.rank_pattern
    caps = {n: min(MAX_RANK_FACTOR * RANK, *W.shape) for n, W in _targets(make_tiny_llama(2)).items()}
    # the max-rank plan, as a plain wrap with every layer at its cap (the same job: same rank, alpha, seed)
    full = svdadapt.wrap(make_tiny_llama(2), "pissa", RANK, rank_pattern=caps, progress=False)
    assert sorted(ranks) == sorted(caps) and any(r != RANK for r in ranks.values())
    for n, r in ranks.items():
        A0, B0 = full.svdadapt.init_factors[n]
        c = math.sqrt((RANK / caps[n]) / (RANK / r))  # √(s_max / s_r), alpha = RANK
        A, B = pm.svdadapt.init_factors[n]
        assert A.shape == (r, A0.shape[1]) and B.shape == (B0.shape[0], r), n
        assert torch.equal(A, (A0[:r].double() * c).float()) and torch.equal(B, (B0[:, :r].double() * c).float()), n
        # s_r·B·A = the top-r part of s_max·B₀·A₀ up to the rescaling's one fp32 rounding of each factor entry
        s_r, s_max = RANK / r, RANK / caps[n]
        top = s_max * (B0[:, :r].double() @ A0[:r].double())
        assert rel(s_r * (B.double() @ A.double()), top) <= 4 * unit_roundoff(torch.float32), n


def test_the_ranks_are_allocate_ranks_on_brute_force_spectra() -> None:
    model = make_tiny_llama(2)
    W0 = _targets(model)
    pm = svdadapt.wrap(model, "pissa", RANK, allocate=True, progress=False)
    cap = MAX_RANK_FACTOR * RANK
    spectra = {n: torch.linalg.svdvals(W.double())[:min(cap, *W.shape)] for n, W in W0.items()}
    totals = {n: float(W.double().pow(2).sum()) for n, W in W0.items()}
    shapes = {n: tuple(W.shape) for n, W in W0.items()}
    want = svdadapt.allocate_ranks(spectra, shapes, RANK, max_rank=cap, totals=totals)
    # gap condition. The pipeline's σ come from the fp64 Gram route (short sides <= 256) rounded to fp32 (2·u32
    # relative on σ², the fp64 work's error far below), and ‖W‖² is an fp32 cascade sum (≤ (log2(m·n) + 2)·u32
    # relative): each normalized gain g is within δ(g) = ρ·g, ρ = (log2(m·n) + 6)·u32, of brute force. A rank
    # vector's objective, a sum of at most one fraction per layer (Σ_k g_k <= 1), moves by at most ρ·L, so the
    # chosen ranks are optimal within 2ρL on the brute-force gains; they equal brute force's unless two gains
    # straddling a class's cut (the last taken, the first left) are within 2ρ·g: that gap is asserted
    gains = objective_gains("energy", spectra, totals)
    rho = (math.log2(max(m * n for m, n in shapes.values())) + 6) * unit_roundoff(torch.float32)
    L = len(gains)
    got = {n: layer_value(pm.svdadapt.rank_pattern, n, RANK) for n in W0}
    value = sum(float(gains[n][:r].sum()) for n, r in got.items())
    assert value >= want.gain - 2 * rho * L
    for cost in {sum(sh) for sh in shapes.values()}:
        names = [n for n in shapes if sum(shapes[n]) == cost]
        taken = min((float(gains[n][want.ranks[n] - 1]) for n in names if want.ranks[n] > 1), default=None)
        left = max((float(gains[n][want.ranks[n]]) for n in names if want.ranks[n] < gains[n].numel()), default=0.0)
        if taken is not None:  # a class left at the minimum ranks: the DP's choice, covered by the value bound
            assert taken - left > 2 * rho * taken, cost
    assert got == want.ranks
    assert pm.svdadapt.allocation["gain"] == pytest.approx(want.gain, abs=2 * rho * L)
    assert pm.svdadapt.allocation["cost"] == want.cost == _cost(pm) <= want.budget


def test_corda_ipa_ranks_are_allocate_ranks_on_the_spectra_of_w_c() -> None:
    from svdadapt.core.methods import prepare_corda

    model = make_tiny_llama(3)
    W0 = _targets(model)
    covs = svdadapt.collect_covariances(model, CALIB, list(W0), progress=False)
    pm = svdadapt.wrap(model, "corda", RANK, calibration=covs, allocate=True, progress=False)
    cap = MAX_RANK_FACTOR * RANK
    WC = {n: W.double() @ prepare_corda(covs[n])["Cd"] for n, W in W0.items()}
    spectra = {n: torch.linalg.svdvals(M)[:min(cap, *M.shape)] for n, M in WC.items()}
    totals = {n: float(M.pow(2).sum()) for n, M in WC.items()}
    want = svdadapt.allocate_ranks(spectra, {n: tuple(W.shape) for n, W in W0.items()}, RANK, max_rank=cap,
                                   totals=totals)
    # the pipeline rounds W·C_d to fp32 before its (fp64 Gram) SVD and sums ‖W·C_d‖² in fp32: ρ as in the PiSSA
    # test, plus W·C_d's own rounding (u32 relative on each σ, Weyl); the value bound holds whatever the ties
    gains = objective_gains("energy", spectra, totals)
    rho = (math.log2(64 * 128) + 8) * unit_roundoff(torch.float32)
    got = {n: layer_value(pm.svdadapt.rank_pattern, n, RANK) for n in W0}
    assert sum(float(gains[n][:r].sum()) for n, r in got.items()) >= want.gain - 2 * rho * len(gains)
    assert got == want.ranks
    assert pm.svdadapt.allocation["objective"] == "energy" and pm.svdadapt.allocation["cost"] <= want.budget


def test_exact_at_init_with_each_layers_scaling() -> None:
    model = make_tiny_llama(4)
    W0 = _targets(model)
    before = out(model, IDS)
    pm = svdadapt.wrap(model, "pissa", RANK, alpha=8.0, allocate=True, progress=False)
    # as tests/wrap/test_wrap.py: two fp32 forwards, per layer γ_{n+r}·|W||x| (n ≤ 128), through 2 blocks
    assert max_rel(out(pm, IDS), before) <= 1e-5
    for n, layer in lora_layers(pm).items():
        r = pm.svdadapt.report[n]["rank"]
        assert layer.r["default"] == r == layer_value(pm.svdadapt.rank_pattern, n, RANK), n
        assert layer.scaling["default"] == 8.0 / r, n
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        # residual + adapter = W up to the fp32 addmm forming the residual (γ_{r+2}·(|W| + s·|B|·|A|))
        fp32 = gemm_error(B, A, C=W0[n], alpha=layer.scaling["default"])
        W = W0[n].double()
        assert rel(layer.get_base_layer().weight.double() + lora_product(layer), W) <= float(fp32.norm() / W.norm())


def test_never_over_budget_and_deterministic() -> None:
    for budget in (3000, 8192, 20000):
        opts = AllocateOptions(budget=budget, min_rank=1, max_rank=24)
        a = svdadapt.wrap(make_tiny_llama(3), "pissa", RANK, allocate=opts, progress=False)
        b = svdadapt.wrap(make_tiny_llama(3), "pissa", RANK, allocate=opts, progress=False)
        assert _cost(a) == a.svdadapt.allocation["cost"] <= budget
        assert a.svdadapt.rank_pattern == b.svdadapt.rank_pattern
        for n, (A, B) in a.svdadapt.init_factors.items():
            assert torch.equal(A, b.svdadapt.init_factors[n][0]) and torch.equal(B, b.svdadapt.init_factors[n][1]), n
        assert all(1 <= r <= 24 for r in a.svdadapt.rank_pattern.values())


def test_identical_spectra_get_equal_ranks() -> None:
    s = torch.linspace(2.0, 0.1, 48).double()
    W, _, _ = matrix_with_spectrum(48, 48, s, seed=0)
    model = nn.Sequential(*(nn.Linear(48, 48, bias=False) for _ in range(4)))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(W)
    pm = svdadapt.wrap(model, "pissa", RANK, target_modules=["0", "1", "2", "3"], allocate=True, progress=False)
    assert set(pm.svdadapt.rank_pattern.values()) == {RANK}


def test_equal_costs_take_the_largest_gains() -> None:
    """Four 48x48 layers with spectra of different decay: equal costs, so the allocation takes the largest
    normalized gains; the brute-force gains' boundary gap (asserted) exceeds the fp64 Gram route's error."""
    model = nn.Sequential(*(nn.Linear(48, 48, bias=False) for _ in range(4)))
    Ws = []
    with torch.no_grad():
        for i, layer in enumerate(model):
            s = torch.pow(torch.tensor(0.5 + 0.12 * i), torch.arange(48, dtype=torch.float64))
            W, _, _ = matrix_with_spectrum(48, 48, s, seed=i)
            layer.weight.copy_(W)
            Ws.append(W)
    pm = svdadapt.wrap(model, "pissa", RANK, target_modules=["0", "1", "2", "3"], allocate=True, progress=False)
    gains = sorted(((float(g), str(i)) for i, W in enumerate(Ws)
                    for g in torch.linalg.svdvals(W.double())[:16].pow(2) / W.double().pow(2).sum()), reverse=True)
    taken = gains[:4 * RANK]
    # δ as in the test above: (m + n)·u64 relative to σ_1²/‖W‖² <= 1
    assert gains[4 * RANK - 1][0] - gains[4 * RANK][0] > 2 * 4 * 96 * unit_roundoff(torch.float64)
    want = {str(i): sum(1 for _, n in taken if n == str(i)) for i in range(4)}
    assert pm.svdadapt.rank_pattern == want


def _eora(allocate, covs):
    model = make_tiny_llama(5)
    compressed = svdadapt.compress.quantize(copy.deepcopy(model), bits=3, group_size=16)
    weights = _targets(compressed)  # before wrap makes its layers PEFT's
    return svdadapt.wrap(compressed, "eora", RANK, reference=model, calibration=covs, allocate=allocate,
                         progress=False), _targets(model), weights


def _whitened_error(pm, ref, comp, covs) -> tuple[float, float]:
    """(Σ‖(ΔW − M)·X‖², Σ‖ΔW·X‖²) over the targets, as N·tr(E·C·Eᵀ) with C the collected covariance."""
    err = total = 0.0
    for n, layer in lora_layers(pm).items():
        C = covs[n].double() * covs.token_count(n)
        dW = ref[n].double() - comp[n].double()
        E = dW - lora_product(layer)
        err += float(torch.trace(E @ C @ E.mT))
        total += float(torch.trace(dW @ C @ dW.mT))
    return err, total


def test_eora_allocation_lowers_the_whitened_error_as_the_formula_says() -> None:
    model = make_tiny_llama(5)
    covs = svdadapt.collect_covariances(model, CALIB, list(svdadapt.resolve_targets(model)), progress=False)
    alloc, ref, comp = _eora(True, covs)
    uniform, _, _ = _eora(False, covs)
    e_alloc, total = _whitened_error(alloc, ref, comp, covs)
    e_uniform, _ = _whitened_error(uniform, ref, comp, covs)
    a = alloc.svdadapt.allocation
    assert a["objective"] == "eora"
    # the formula: Σ‖ΔW·S‖² − gain, with gains σ² of the whitened ΔW per covariance token; the measured errors
    # carry the fp32 factors' rounding: relative to Σ‖ΔW·X‖², γ over the short side (≤ 64) and the rank, 2 factors
    n_tok = covs.token_count(next(iter(covs)))
    tol = 2 * 64 * unit_roundoff(torch.float32) * total * 10
    assert e_alloc == pytest.approx(total - a["gain"] * n_tok, abs=tol)
    assert e_uniform == pytest.approx(total - a["uniform_gain"] * n_tok, abs=tol)
    assert a["gain"] >= a["uniform_gain"] and e_alloc <= e_uniform + tol
    assert a["cost"] <= a["budget"] == a["uniform_cost"]


def test_the_report_carries_the_allocation() -> None:
    pm = svdadapt.wrap(make_tiny_llama(2), "pissa", RANK, allocate=True, progress=False)
    rec = pm.svdadapt
    a = rec.allocation
    assert a["objective"] == "energy" and a["min_rank"] == 1 and a["max_rank"] == MAX_RANK_FACTOR * RANK
    assert sum(r["gain"] for r in rec.report.values()) == pytest.approx(a["gain"], rel=32 * unit_roundoff(torch.float64) * 14)
    assert sum(r["uniform_gain"] for r in rec.report.values()) == pytest.approx(a["uniform_gain"], rel=32 * unit_roundoff(torch.float64) * 14)
    for n, r in rec.report.items():
        assert r["rank"] == rec.rank_pattern[n]
        # the normalized objective is the captured fraction at the rank: Σσ²/total against Σ(σ²/total), fp64
        # sums of at most 16 terms (γ_16·u64 relative, with room)
        assert r["energy"] == pytest.approx(r["gain"], rel=32 * unit_roundoff(torch.float64))
    assert pm.peft_config["default"].rank_pattern == rec.rank_pattern


def test_save_and_load_carry_the_ranks(tmp_path) -> None:
    pm = svdadapt.wrap(make_tiny_llama(2), "pissa", RANK, allocate=True, progress=False)
    svdadapt.save(pm, tmp_path / "s")
    back = svdadapt.load(make_tiny_llama(2), tmp_path / "s", progress=False)
    assert back.svdadapt.rank_pattern == pm.svdadapt.rank_pattern
    assert back.svdadapt.allocation == pm.svdadapt.allocation
    assert max_rel(out(back, IDS), out(pm, IDS)) == 0.0


def test_plain_peft_reproduces_the_trained_allocated_model(tmp_path) -> None:
    from peft import PeftModel

    from helpers import train

    pm = train(svdadapt.wrap(make_tiny_llama(2), "pissa", RANK, alpha=8.0, allocate=True, progress=False), IDS,
               steps=5)
    want = out(pm, IDS)
    assert rel(want, out(make_tiny_llama(2), IDS)) > 1e-2  # training moved the logits (O(1e-1)), rounding ~1e-6
    svdadapt.save(pm, tmp_path / "s")
    vanilla = PeftModel.from_pretrained(make_tiny_llama(2), tmp_path / "s")
    # as tests/lifecycle/test_lifecycle_patterns.py: the fp32 merge of s·B·A into W seen in the logits, ~1e-6
    assert rel(out(vanilla, IDS), want) < 1e-4
    for n, layer in lora_layers(vanilla).items():  # the portable adapter: each layer at twice its allocated rank
        assert layer.r["default"] == 2 * pm.svdadapt.rank_pattern[n], n
    u = svdadapt.unwrap(copy.deepcopy(pm))
    assert rel(out(u, IDS), out(make_tiny_llama(2), IDS)) < 1e-5  # the original weights back: W − s·B₀·A₀ + s·B₀·A₀


def test_plot_ranks_writes_a_png(tmp_path) -> None:
    pm = svdadapt.wrap(make_tiny_llama(2), "pissa", RANK, allocate=True, progress=False)
    path = svdadapt.plot_ranks(pm, tmp_path / "ranks.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 1_000_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (960, 540)  # 8 x 4.5 inches at 120 dpi


def test_errors() -> None:
    tiny = make_tiny_llama(2)
    wrap = lambda method="pissa", **kw: svdadapt.wrap(copy.deepcopy(tiny), method, RANK, progress=False, **kw)  # noqa
    with raises_exactly(ValueError, "budget=100 parameters is below the 2048 that the minimum ranks cost "
                                    "(Σ min_rank·(in + out) over 14 layers)"):
        wrap(allocate=AllocateOptions(budget=100))
    with raises_exactly(ValueError, "AllocateOptions: unknown allocation objective 'variance'; valid objectives "
                                    "are: energy, energy_raw, eora, eva"):
        AllocateOptions(objective="variance")
    with raises_exactly(ValueError, "allocation objective 'eora' does not apply to method 'pissa': its "
                                    "objectives are energy, energy_raw"):
        wrap(allocate=AllocateOptions(objective="eora"))
    with raises_exactly(ValueError, "allocate= writes every layer's rank as the rank_pattern; drop rank_pattern= "
                                    "(or allocate=), or bound a layer's rank with AllocateOptions(min_rank=, "
                                    "max_rank=)"):
        wrap(allocate=True, rank_pattern={"q_proj": 2})
    with pytest.raises(ValueError, match=r"^rank allocation does not apply to method='milora'"):
        wrap("milora", allocate=True)
    with raises_exactly(TypeError, "allocate must be True, False or a svdadapt.AllocateOptions, got 'yes'"):
        wrap(allocate="yes")
    for kw, msg in ((dict(budget=-1), "budget must be None or an integer number of parameters >= 0, got -1"),
                    (dict(min_rank=-1), "min_rank must be None or an integer >= 0, got -1"),
                    (dict(max_rank=2.5), "max_rank must be None or a positive integer, got 2.5"),
                    (dict(min_rank=5, max_rank=4), "min_rank=5 exceeds max_rank=4")):
        with raises_exactly(ValueError, f"AllocateOptions: {msg}"):
            AllocateOptions(**kw)
    with raises_exactly(ValueError, "AllocateOptions: min_rank=17 exceeds max_rank=16 (the default, 4·rank)"):
        wrap(allocate=AllocateOptions(min_rank=17))
    with raises_exactly(ValueError, "allocate= with quantize= and method 'pissa': the quantized residual base "
                                    "(QPiSSA) alternates with the rank's own decomposition, so a cut max-rank plan "
                                    "is not it"):
        wrap(allocate=True, quantize="nf4")
    with pytest.raises(ValueError, match=r"^init_checkpoint does not allocate ranks"):
        svdadapt.init_checkpoint("nowhere", "out", method="pissa", rank=RANK, allocate=True)


def test_sequential_eora_is_refused_and_off_by_default() -> None:
    model = make_tiny_llama(5)
    compressed = svdadapt.compress.quantize(copy.deepcopy(model), bits=3, group_size=16)
    with pytest.raises(ValueError, match=r"^allocate= with BlockwiseOptions\(sequential=True\)"):
        svdadapt.wrap(copy.deepcopy(compressed), "eora", RANK, reference=model, calibration=CALIB, allocate=True,
                      blockwise=svdadapt.BlockwiseOptions(sequential=True), progress=False)
    # the default block-by-block path, not sequential: the covariances of the reference, block by block, are the
    # whole-model ones up to summation order, so the ranks are those of blockwise=False
    a = svdadapt.wrap(copy.deepcopy(compressed), "eora", RANK, reference=model, calibration=CALIB, allocate=True,
                      progress=False)
    b = svdadapt.wrap(copy.deepcopy(compressed), "eora", RANK, reference=model, calibration=CALIB, allocate=True,
                      blockwise=False, progress=False)
    assert a.svdadapt.rank_pattern == b.svdadapt.rank_pattern
