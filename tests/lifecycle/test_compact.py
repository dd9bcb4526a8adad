"""The compact export (``export_lora(..., rank= | energy=, round_to=, covariances=, weighted=)``) on a trained tiny
Llama: exact when the rank covers ΔW, the Eckart–Young optimum otherwise (against a dense SVD of ΔW), the minimal
rank for an energy, serving slots, the whitened optimum (against a dense SVD of ΔW·L), the errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import svdadapt
from svdadapt.calibration.covariances import Covariances

from bounds import gamma, svd_backward_error, unit_roundoff
from helpers import lora_layers, lora_product, make_tiny_llama, out, raises_exactly, rel, token_ids, train

RANK = 4
SEED = 3
X = token_ids(2, 16, seed=100)
CALIB = [token_ids(4, 16, seed=200 + i) for i in range(3)]
U64 = unit_roundoff(torch.float64)
REPORT = "svdadapt_export.json"


def _base(method: str):
    base = make_tiny_llama(SEED)
    return svdadapt.compress.quantize(base, bits=3, group_size=16) if method == "eora" else base


@pytest.fixture(scope="module", params=["pissa", "pissa-patterns", "eora"])
def trained(request):
    """(method, trained wrapped model, its logits, {layer: dense ΔW fp64 (out, in)}, {layer: stacked width w})."""
    method = request.param
    kw = dict(rank=RANK, progress=False)
    if method == "pissa-patterns":  # per-layer ranks and alphas under rsLoRA: each layer's scaling is its own
        kw.update(rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 16}, use_rslora=True)
    if method == "eora":
        kw.update(calibration=CALIB, reference=make_tiny_llama(SEED))
    pm = train(svdadapt.wrap(_base(method), method.split("-")[0], **kw), X, steps=5)
    rewrites = method != "eora"
    delta, width = {}, {}
    for n, layer in lora_layers(pm).items():
        A0, B0 = (t.double() for t in pm.svdadapt["init_factors"][n])
        s = layer.scaling["default"]
        delta[n] = lora_product(layer) - (s * (B0 @ A0) if rewrites else 0)
        width[n] = A0.shape[0] * (2 if rewrites else 1)
    return method, pm, out(pm, X), delta, width


def _export(pm, tmp_path, name="c", **kw):
    d = tmp_path / name
    svdadapt.export_lora(pm, d, **kw)
    return d, json.loads((d / REPORT).read_text())


def _loaded(method, d):
    """The exported adapter loaded by plain PEFT on the original (EoRA: compressed) base: {layer: its s·B·A}."""
    v = PeftModel.from_pretrained(_base(method), d)
    layers = lora_layers(v)
    assert all(m.scaling["default"] == 1.0 for m in layers.values())  # alpha = rank in both patterns
    return v, {n: lora_product(m) for n, m in layers.items()}, {
        n: (m.lora_B["default"].weight.detach().double(), m.lora_A["default"].weight.detach().double())
        for n, m in layers.items()}


def _fp64_bound(dW: torch.Tensor, w: int) -> float:
    """The fp64 work's error in ‖·‖_F (QRs, the core's SVD, the products back, and a dense fp64 SVD of the
    reference): backward errors of Householder methods, γ_{c·n}-sized (Higham §19.3); c = 8 on out + in + w."""
    out_, in_ = dW.shape
    return 8 * (out_ + in_ + w) * U64 * float(dW.norm()) + 2 * svd_backward_error(dW, torch.float64)


def _rounding(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖fl(B)·fl(A) − B·A‖_F for factors rounded once to fp32 (B, A as stored): each entry of the product moves by
    at most γ_3·(|B|·|A|) (two roundings and the exact fp64 product of the stored values)."""
    return gamma(3) * float((B.abs() @ A.abs()).norm())


# ------------------------------------------------------------------------------------------------- exactness


def test_a_rank_covering_the_update_is_exact(trained, tmp_path):
    method, pm, want, delta, width = trained
    w = max(width.values())
    d, rep = _export(pm, tmp_path, rank=w)
    v, got, factors = _loaded(method, d)
    for n, dW in delta.items():
        row = rep["layers"][n]
        assert row["rank"] == width[n] and row["error"] == 0.0 and row["energy"] == pytest.approx(1.0, abs=4 * U64)
        assert (got[n] - dW).norm() <= _rounding(*factors[n]) + _fp64_bound(dW, width[n])
    # every weight within its fp32 rounding: the trained model's logits, as test_export's plain export (~1e-6 seen)
    assert rel(out(v, X), want) < 1e-4
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {n: width[n] for n in delta}
    assert cfg["use_rslora"] is False
    assert rep["parameters"] == rep["parameters_full_export"]


def test_energy_one_keeps_the_numerical_rank(trained, tmp_path):
    method, pm, _, delta, width = trained
    _, rep = _export(pm, tmp_path, energy=1.0)
    for n, dW in delta.items():
        S = torch.linalg.svdvals(dW)
        live = int((S > _fp64_bound(dW, width[n]) + 1e-300).sum())  # dense numerical rank at the fp64 level
        assert rep["layers"][n]["rank"] == rep["layers"][n]["available"] == live


# ------------------------------------------------------------------------------------------------- optimality


def test_rank_k_is_the_eckart_young_optimum(trained, tmp_path):
    method, pm, _, delta, width = trained
    k = 3
    d, rep = _export(pm, tmp_path, rank=k)
    _, got, factors = _loaded(method, d)
    for n, dW in delta.items():
        S = torch.linalg.svdvals(dW)
        tail = float(S[k:].pow(2).sum().sqrt())  # Eckart–Young: the least ‖ΔW − M‖_F over rank-k M
        fp64 = _fp64_bound(dW, width[n])
        # Mirsky: the tail norm moves by at most the perturbation
        assert abs(float((dW - got[n]).norm()) - tail) <= _rounding(*factors[n]) + fp64
        row = rep["layers"][n]
        assert row["rank"] == k and factors[n][0].shape[1] == k
        assert abs(row["error"] * float(dW.norm()) - tail) <= 2 * fp64
        assert abs(row["energy"] + row["error"] ** 2 - 1) <= 8 * U64  # kept + tail = total
    sides = {n: sum(dW.shape) for n, dW in delta.items()}
    assert rep["parameters"] == k * sum(sides.values())
    assert rep["parameters_full_export"] == sum(width[n] * sides[n] for n in delta)


def _energy_rank(dW: torch.Tensor, f: float, fp64: float) -> int:
    """The smallest k keeping f of ‖ΔW‖² (dense), checked to be decided by more than the fp64 error."""
    cum = torch.cumsum(torch.linalg.svdvals(dW).pow(2), 0)
    k = int((cum < f * cum[-1]).sum()) + 1
    margin = 2 * fp64 * float(dW.norm())  # |Δσ²| summed ≤ 2‖ΔW‖·‖E‖
    assert float(cum[k - 1]) - f * float(cum[-1]) > margin and (k == 1 or f * float(cum[-1]) - float(cum[k - 2]) > margin)
    return k


def test_energy_picks_the_smallest_rank(trained, tmp_path):
    method, pm, _, delta, width = trained
    f = 0.9
    _, rep = _export(pm, tmp_path, energy=f)
    for n, dW in delta.items():
        row = rep["layers"][n]
        assert row["rank"] == _energy_rank(dW, f, _fp64_bound(dW, width[n])) and row["energy"] >= f
    assert len({r["rank"] for r in rep["layers"].values()}) > 1  # the layers differ: the check is not empty


def test_round_to_rounds_up_to_the_next_slot(trained, tmp_path):
    method, pm, _, delta, width = trained
    _, rep = _export(pm, tmp_path, "a", energy=0.9, round_to=[1, 2, 3, 5, 7])
    for n, dW in delta.items():
        k = _energy_rank(dW, 0.9, _fp64_bound(dW, width[n]))
        want = min(next((s for s in (1, 2, 3, 5, 7) if s >= k), width[n]), width[n])
        assert rep["layers"][n]["rank"] == want
    _, rep = _export(pm, tmp_path, "b", rank=1, round_to="vllm")  # slot 8, at most the layer's rank
    assert {n: r["rank"] for n, r in rep["layers"].items()} == {n: min(8, width[n]) for n in delta}
    assert rep["options"]["round_to"] == [8, 16, 32, 64, 128, 256]


def test_a_rank_above_the_largest_slot_is_refused(trained, tmp_path):
    _, pm, _, delta, _ = trained
    first = next(iter(delta))
    with raises_exactly(ValueError, f"export_lora: module {first!r}: rank 3 is above the largest slot 2"):
        svdadapt.export_lora(pm, tmp_path / "x", rank=3, round_to=[1, 2])
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------- weighted


def _covariances(delta) -> Covariances:
    """A well-conditioned (in, in) covariance per layer (cond ≤ ~11: whitening drops no direction)."""
    g = torch.Generator().manual_seed(0)
    covs = {}
    for n, dW in delta.items():
        d = dW.shape[1]
        G = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
        covs[n] = G @ G.mT / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)
    return Covariances(covs)


def test_weighted_is_the_whitened_optimum(trained, tmp_path):
    method, pm, _, delta, width = trained
    covs, k = _covariances(delta), 2
    d, rep = _export(pm, tmp_path, "w", rank=k, covariances=covs, weighted=True)
    _, got, factors = _loaded(method, d)
    _, plain = _export(pm, tmp_path, "p", rank=k, covariances=covs)
    for n, dW in delta.items():
        L = torch.linalg.cholesky(covs[n])  # ‖(ΔW − M)·X‖ = ‖(ΔW − M)·L‖ for any C = L·Lᵀ
        WL = dW @ L
        best = float(torch.linalg.svdvals(WL)[k:].pow(2).sum().sqrt())  # Eckart–Young on ΔW·L
        fp64 = _fp64_bound(WL, width[n]) * 2  # and the whitening's eigh, of the same size
        err = float(((dW - got[n]) @ L).norm())
        assert abs(err - best) <= _rounding(*factors[n]) * float(torch.linalg.matrix_norm(L, 2)) + fp64
        w, p = rep["layers"][n], plain["layers"][n]
        assert abs(w["whitened_error"] * float(WL.norm()) - best) <= 2 * fp64
        # each is the optimum of its own norm: fp64 margins, many orders below the differences
        assert w["whitened_error"] <= p["whitened_error"] + 1e-12 and p["error"] <= w["error"] + 1e-12
    assert any(w["whitened_error"] < p["whitened_error"] - 1e-3 for w, p in
               zip(rep["layers"].values(), plain["layers"].values()))  # weighting changed something


def test_covariances_from_a_file_give_the_same_export(trained, tmp_path):
    _, pm, _, delta, _ = trained
    covs = _covariances(delta)
    covs.save(tmp_path / "c.safetensors")
    a, ra = _export(pm, tmp_path, "a", energy=0.8, covariances=covs, weighted=True)
    b, rb = _export(pm, tmp_path, "b", energy=0.8, covariances=str(tmp_path / "c.safetensors"), weighted=True)
    assert ra == rb
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------- the files


def test_the_export_is_deterministic_and_complete(trained, tmp_path):
    _, pm, _, delta, _ = trained
    a, ra = _export(pm, tmp_path, "a", energy=0.95, round_to="vllm")
    b, rb = _export(pm, tmp_path, "b", energy=0.95, round_to="vllm")
    assert sorted(p.name for p in a.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", REPORT]
    for f in ("adapter_config.json", "adapter_model.safetensors", REPORT):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert set(ra["layers"]) == set(delta) and ra["method"] == pm.svdadapt.method
    assert ra["options"] == {"rank": None, "energy": 0.95, "round_to": [8, 16, 32, 64, 128, 256],
                             "covariances": False, "weighted": False}
    sd = load_file(a / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_no_keyword_is_the_plain_export(trained, tmp_path):
    _, pm, _, _, _ = trained
    svdadapt.export_lora(pm, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ------------------------------------------------------------------------------------------------- errors

BAD = [
    (dict(rank=0), ValueError, "export_lora: rank must be a positive integer, got 0"),
    (dict(rank=2.0), ValueError, "export_lora: rank must be a positive integer, got 2.0"),
    (dict(rank=True), ValueError, "export_lora: rank must be a positive integer, got True"),
    (dict(rank=2, energy=0.5), ValueError, "export_lora: give rank or energy, not both (got rank=2, energy=0.5)"),
    (dict(energy=0), ValueError, "export_lora: energy must be a number in (0, 1], got 0"),
    (dict(energy=1.5), ValueError, "export_lora: energy must be a number in (0, 1], got 1.5"),
    (dict(round_to="tgi"), ValueError,
     "export_lora: round_to must be 'vllm' or a list of positive integers, got 'tgi'"),
    (dict(round_to=[0, 8]), ValueError,
     "export_lora: round_to must be 'vllm' or a list of positive integers, got [0, 8]"),
    (dict(weighted=True), ValueError, "export_lora: weighted=True needs covariances (the layers' input covariances)"),
    (dict(weighted=1), TypeError, "export_lora: weighted must be True or False, got 1"),
    (dict(covariances=3), TypeError, "export_lora: covariances must be a Covariances, a mapping of module name to "
                                     "(in, in) tensor or a covariances file path, got int"),
]


@pytest.mark.parametrize("kw, exc, message", BAD, ids=[m.split(": ")[1][:30] for _, _, m in BAD])
def test_bad_keywords_are_refused(kw, exc, message, tmp_path):
    pm = svdadapt.wrap(make_tiny_llama(SEED), "pissa", rank=2, progress=False)
    with raises_exactly(exc, message):
        svdadapt.export_lora(pm, tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()


def test_covariances_must_cover_each_layer_at_its_size(tmp_path):
    pm = svdadapt.wrap(make_tiny_llama(SEED), "pissa", rank=2, progress=False)
    names = pm.svdadapt.targets
    with raises_exactly(ValueError, f"export_lora: covariances have no entry for module {names[0]!r}"):
        svdadapt.export_lora(pm, tmp_path / "x", rank=1, covariances={})
    with raises_exactly(ValueError, f"export_lora: the covariance of module {names[0]!r} is (3, 3), its input has "
                                    "64 features"):
        svdadapt.export_lora(pm, tmp_path / "x", rank=1, covariances={n: torch.eye(3) for n in names})
    assert not (tmp_path / "x").exists()
