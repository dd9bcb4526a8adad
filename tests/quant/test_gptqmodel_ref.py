"""benchmarks/gptqmodel_ref.py, the reimplementation of GPTQModel's GPTQ and EoRA the GPTQ benchmark compares with:
GPTQ is round-to-nearest where the Hessian is diagonal (bit for bit) and beats it where inputs are correlated; its
EoRA is svdadapt's EoRA (the same truncation rule, within the fp32 SVD bound); its statistics weight batches
geometrically (the closed form)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bounds import gamma, gemm_error, truncated_svd_error
from svdadapt.core.methods import SVDOptions, eora, prepare_eora

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gptqmodel_ref import (eora_statistics, gar_permutation, gptq_quantize, gptqmodel_eora,  # noqa: E402
                           hessian_from_inputs, rtn_quantize)

OUT, IN = 48, 256


def _inputs(n: int, d: int, seed: int, decay: float = 3.0) -> torch.Tensor:
    """(n, d) correlated inputs: a fixed random rotation of a spectrum decaying from 1 to 10^-decay."""
    g = torch.Generator().manual_seed(1000 + d)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * torch.logspace(0, -decay, d)) @ Q.T


def _weight(seed: int, out: int = OUT, d: int = IN) -> torch.Tensor:
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed)) * 0.05


def _layer_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Q)·H·(W − Q)ᵀ) in fp64: the layer's output error on the calibration inputs (up to H's scale)."""
    E = (W - Q).double()
    return float(torch.einsum("oi,ij,oj->", E, H.double(), E))


def test_gar_permutation_keeps_groups_whole():
    """Group-aware reordering moves whole groups (by their largest diag H) and sorts inside each: every run of
    group_size new positions holds one original group, in descending diag H; the tail stays in place."""
    diag = torch.rand(3 * 8 + 5, generator=torch.Generator().manual_seed(0))
    p = gar_permutation(diag, 8)
    assert sorted(p.tolist()) == list(range(29))
    assert p[24:].tolist() == list(range(24, 29))
    runs = p[:24].view(3, 8)
    assert {int(r[0]) // 8 for r in runs} == {0, 1, 2} and all(len({int(i) // 8 for i in r}) == 1 for r in runs)
    assert all(bool((diag[r][:-1] >= diag[r][1:]).all()) for r in runs)
    assert (diag[runs[:, 0]][:-1] >= diag[runs[:, 0]][1:]).all()


def test_gptq_on_a_diagonal_hessian_is_round_to_nearest():
    """With a diagonal H the upper Cholesky factor of H⁻¹ is diagonal (exact zeros off it, LAPACK's potrf/potri
    form them as 0/l), so no error is spread and each group's grid is found on the untouched W: GPTQ (with its
    group-aware reordering) returns round-to-nearest's W_c bit for bit."""
    W = _weight(0)
    H = torch.diag(torch.rand(IN, generator=torch.Generator().manual_seed(1)) + 0.1)
    assert torch.equal(gptq_quantize(W, H), rtn_quantize(W))


def _pivots(H: torch.Tensor, damp: float = 0.05) -> torch.Tensor:
    """The LDLᵀ pivots D_i of H + damp·mean(diag H)·I in fp64 (D_i = L_ii² of its Cholesky factor)."""
    Hd = H.double() + damp * H.double().diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(Hd).diagonal().square()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_layer_error_below_round_to_nearest(seed):
    """tr((W−W_c)·H·(W−W_c)ᵀ) of GPTQ ≤ round-to-nearest's, 4-bit g128, on correlated inputs.

    Why (GPTQ is Babai's nearest-plane algorithm in H's Cholesky basis): with H_d = H + damp·mean(diag)·I = L·D·Lᵀ
    (L unit lower, columns in GPTQ's order), GPTQ's error in the H_d norm is Σ_i D_i·ε_i², ε_i each column's rounding
    error after the updates, while round-to-nearest's is εᵀ·H_d·ε. With rounding errors of about the same size
    (uniform over a step Δ: E ε² = Δ²/12), the expected errors are (Δ²/12)·Σ D_i against (Δ²/12)·tr(H_d), and
    Σ D_i ≤ tr(H_d) (each D_i is a Schur complement, ≤ the diagonal entry), with equality only when H_d is
    diagonal. The norm of H itself is H_d's minus damp·mean·‖E‖², which favours neither by more than the damping.
    The premise is checked (Σ D_i / tr(H_d) well below 1 for these inputs), then the inequality itself: no
    tolerance, GPTQ must not lose."""
    X = _inputs(2048, IN, seed)
    W = _weight(10 + seed)
    H = hessian_from_inputs([X])
    D = _pivots(H)
    assert float(D.sum() / (H.double().trace() + 0.05 * H.double().diagonal().mean() * IN)) < 0.5
    err_gptq = _layer_error(W, gptq_quantize(W, H), H)
    err_rtn = _layer_error(W, rtn_quantize(W), H)
    assert err_gptq <= err_rtn, (err_gptq, err_rtn)


def test_gptq_is_invariant_to_the_hessian_scale():
    """GPTQ reads H only through H⁻¹'s Cholesky factor R and the ratios (w − q)/R_ii·R_ij, which a positive scale c
    of H leaves unchanged up to rounding, so H and 2/n·Σ XᵀX with another n give the same W_c; a power of two
    scales exactly (every floating-point step scales by an exact power of two), so bit for bit."""
    X = _inputs(512, IN, 5)
    W = _weight(5)
    H = hessian_from_inputs([X])
    assert torch.equal(gptq_quantize(W, H), gptq_quantize(W, H * 4.0))


def _eora_bound(dW: torch.Tensor, C: torch.Tensor, rank: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(bound on ‖(B·A)·S − [ΔW·S]_r‖_F for one fp32 EoRA, the fp64 optimum [ΔW·S]_r, S) with S·Sᵀ = C on the kept
    eigenvectors (the same rule in both implementations). The bound adds: ΔW·S formed in fp32 (``gemm_error``,
    one more rounding for S's cast: γ_{k+2}), the truncated fp32 SVD of it (``truncated_svd_error``: LAPACK's
    backward error through the gap at the cut, and forming the factors), and A = √Σ·(V_r·S⁺) formed in fp32 then
    multiplied by S: |δA| ≤ γ_{k+2}·√Σ·|V_r|·|S⁺| elementwise (S⁺'s cast, the length-k product, the row scaling),
    and ‖B·δA·S‖_F ≤ ‖B‖₂·‖δA‖_F·‖S‖₂ with ‖B‖₂ = √σ_1 (S⁺·S = I on the kept space, so A·S = √Σ·V_r exactly)."""
    S, S_pinv = prepare_eora(C)["S"], prepare_eora(C)["S_pinv"]
    M = dW.double() @ S
    U, sig, Vh = torch.linalg.svd(M, full_matrices=False)
    optimum = (U[:, :rank] * sig[:rank]) @ Vh[:rank]
    k = S.shape[1]
    drift = float(gemm_error(dW, S).norm())
    svd = truncated_svd_error(M.float(), rank, S=sig, drift=drift)
    root = sig[:rank].sqrt()
    dA = gamma(k + 2) * float(((root[:, None] * Vh[:rank].abs()) @ S_pinv.abs()).norm())
    back = float(root[0]) * dA * float(torch.linalg.matrix_norm(S, 2))
    return svd + float(back), optimum, S


def _gapped_delta(S_pinv: torch.Tensor, out: int, rank: int, seed: int) -> torch.Tensor:
    """ΔW (out, d) whose ΔW·S has the singular values 2 … 1 above the cut and 0.5 … 0.01 below it (S·Sᵀ = C on the
    kept space, S⁺·S = I there): a gap of 0.5 at the cut, so the truncation is determined (on a random ΔW the gap
    is ~1 % of σ_r and two fp32 truncations may rightly differ by ~100·u·‖ΔW·S‖)."""
    k = S_pinv.shape[0]
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, min(out, k), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(k, min(out, k), generator=g, dtype=torch.float64)).Q
    n = min(out, k)
    sigma = torch.cat([torch.linspace(2, 1, rank), torch.linspace(0.5, 0.01, n - rank)]).double()
    return ((U * sigma) @ V.T @ S_pinv).float()


@pytest.mark.parametrize("tokens, rank", [(1024, 8), (1024, 32), (40, 8)])
def test_gptqmodel_eora_equals_svdadapt_eora(tokens, rank):
    """On the same W, W_c and XᵀX both return the EoRA optimum: in the calibration norm (times S, S·Sᵀ = XᵀX on the
    kept space) each product B·A is within its fp32 bound of the fp64 [ΔW·S]_r, so the two are within the sum of
    the bounds of each other. 40 tokens < 96 inputs: the statistics are rank-deficient and both keep the same
    eigenvalues (λ > max λ·in·eps(fp32)): GPTQModel zeroes the scalings of the others, svdadapt drops them."""
    d, out = 96, 64
    X = _inputs(tokens, d, 21, decay=1.0)
    C = X.double().T @ X.double()
    C = ((C + C.T) / 2).float()  # exactly symmetric: both eigensolvers see the same fp64 matrix
    W = _weight(20, out, d)
    W_c = W - _gapped_delta(prepare_eora(C)["S_pinv"], out, rank, 22)
    A_g, B_g = gptqmodel_eora(W, W_c, C, rank)
    init = eora(W_c, rank=rank, scaling=1.0, prepared=prepare_eora(C), reference=W, svd=SVDOptions(svd="full"))
    bound, optimum, S = _eora_bound(W - W_c, C, rank)
    if tokens < d:
        assert S.shape[1] == tokens  # the kept space: the token count, no more
    gap_g = float(((B_g.double() @ A_g.double()) @ S - optimum).norm())
    gap_s = float(((init.B.double() @ init.A.double()) @ S - optimum).norm())
    assert gap_g <= bound and gap_s <= bound, (gap_g, gap_s, bound)
    diff = float((((B_g.double() @ A_g.double()) - init.B.double() @ init.A.double()) @ S).norm())
    assert diff <= 2 * bound, (diff, bound)
    assert bound <= 1e-3 * float(optimum.norm())  # the bound says something: a thousandth of the optimum


def test_eora_statistics_weight_batches_geometrically():
    """GPTQModel's running total: batch k of K (size b) ends up weighted by (n/(n+b))^(K−1−k)/n, n = K batches;
    the fp32 sums within γ_{b·seq + 2K}·Σ_k w_k·|X_k|ᵀ|X_k| of the fp64 closed form (each entry a dot product of
    b·seq terms, then K scalings and additions)."""
    K, b, seq, d = 4, 2, 16, 24
    xs = [torch.randn(b, seq, d, generator=torch.Generator().manual_seed(30 + k)) for k in range(K)]
    s = K / (K + b)
    weights = [s ** (K - 1 - k) / K for k in range(K)]
    expect = sum(w * torch.einsum("bsi,bsj->ij", x.double(), x.double()) for w, x in zip(weights, xs))
    bound = gamma(b * seq + 2 * K) * sum(w * torch.einsum("bsi,bsj->ij", x.double().abs(), x.double().abs())
                                         for w, x in zip(weights, xs))
    got = eora_statistics(xs)
    assert ((got.double() - expect).abs() <= bound).all()
    assert weights[0] / weights[-1] == pytest.approx(s ** 3)  # the first batch counts (2/3)^3 ≈ 0.30 of the last


def test_sequential_pass_quantizes_each_layer_on_the_inputs_of_the_quantized_model():
    """Block by block, subset by subset: every Linear's input in the finished GPTQ model depends only on the layers
    quantized before it (earlier blocks, earlier subsets of its block), so each W_c equals GPTQ of the original W on
    the Hessian of its inputs in the finished model, and its EoRA statistics those inputs' — bit for bit (the same
    forward computations; 8 bits and group 32 so that the tiny model's 64-wide layers have two groups)."""
    from gptq_sequential import gptq_model
    from helpers import make_tiny_llama

    model = make_tiny_llama()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=g),
                "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(3)]
    q, stats = gptq_model(model, batches, bits=8, group_size=32)
    names = [n for n, m in q.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(stats) == sorted(names) and len(names) == 14
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [q.get_submodule(n).register_forward_hook(lambda m, a, o, _n=n: seen[_n].append(a[0])) for n in names]
    with torch.no_grad():
        for b in batches:
            q(**b)
    for h in hooks:
        h.remove()
    for n in names:
        W = model.get_submodule(n).weight
        assert torch.equal(q.get_submodule(n).weight, gptq_quantize(W, hessian_from_inputs(seen[n]), 8, 32)), n
        assert torch.equal(stats[n], eora_statistics(seen[n])), n
        assert not torch.equal(q.get_submodule(n).weight, W), n


def test_errors_of_the_reimplementation():
    """The two errors docs/errors.md lists for it: a Hessian no damping makes positive definite (−I: every
    H + damp·mean(diag)·I = −(1 + damp)·I), statistics with a NaN (the eigensolver hands NaN back)."""
    from helpers import raises_exactly

    with raises_exactly(ValueError, "gptq_quantize: the Hessian is not positive definite for any damp_percent "
                                    "below 1 (mean diagonal -1)"):
        gptq_quantize(_weight(0, 8, 16), -torch.eye(16), group_size=-1)
    C = torch.eye(16)
    C[0, 0] = float("nan")
    with raises_exactly(FloatingPointError, "gptqmodel_eora: the statistics' eigensolve produced non-finite "
                                            "eigenvalues"):
        gptqmodel_eora(_weight(0, 8, 16), torch.zeros(8, 16), C, 2)
