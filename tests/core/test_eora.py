"""EoRA: optimal rank-r compensation of W − W_c in the calibration norm, better than plain SVD of ΔW on
held-out inputs, finite on rank-deficient covariances, base left compressed, calibrate_on, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import svdadapt

from helpers import lora_layers, lora_product, make_tiny_llama, out, raises_exactly, same_init_factors, toy

IN, OUT = 48, 32


def _inputs(n: int, seed: int) -> torch.Tensor:
    """(n, IN) correlated inputs: a fixed random rotation of a spectrum decaying from 1 to 0.01 (the same
    distribution for every seed, as real activations are far from isotropic)."""
    Q = torch.linalg.qr(torch.randn(IN, IN, generator=torch.Generator().manual_seed(99))).Q
    D = torch.logspace(0, -2, IN)
    return (torch.randn(n, IN, generator=torch.Generator().manual_seed(seed)) * D) @ Q.T


def _toy() -> nn.Sequential:
    return toy(sizes=(IN, OUT), bias=False)


def _adapter(peft_model) -> torch.Tensor:
    """s·B·A of the one layer "0", fp64 (OUT, IN)."""
    return lora_product(lora_layers(peft_model)["0"])


@pytest.fixture(scope="module")
def compressed():
    """(the toy, its 2-bit g16 quantization, ΔW fp64)."""
    model = _toy()
    qmodel = svdadapt.compress.quantize(model, bits=2, group_size=16)
    dW = (model[0].weight - qmodel[0].weight).double().detach()
    return model, qmodel, dW


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_optimal_on_calibration_inputs(compressed, rank):
    """‖(ΔW − s·B·A)·Xᵀ‖ equals the brute-force fp64 optimum: the tail of the spectrum of ΔW·Xᵀ."""
    model, qmodel, dW = compressed
    X = _inputs(512, 1)
    peft_model = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=rank, alpha=2 * rank, reference=model,
                               calibration=[X], progress=False)
    M = _adapter(peft_model)
    assert torch.linalg.matrix_rank(M) == rank
    err = ((dW - M) @ X.double().T).norm()
    optimum = torch.linalg.svdvals(dW @ X.double().T)[rank:].pow(2).sum().sqrt()
    # fp32 factors of an fp64 solution: the error of a near-optimum is second order in the factors' rounding
    # (u·κ(X)² ≪ 1e-3); 1e-3 says "optimal" while leaving the fp32 SVD's gap-dependent subspace error room
    assert abs(err / optimum - 1) <= 1e-3, float(err / optimum)


@pytest.mark.parametrize("rank", [4, 8])
def test_beats_plain_svd_on_held_out_inputs(compressed, rank):
    model, qmodel, dW = compressed
    peft_model = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=rank, reference=model,
                               calibration=[_inputs(512, 1)], progress=False)
    M = _adapter(peft_model)
    U, S, Vh = torch.linalg.svd(dW)
    M_svd = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    Xt = _inputs(512, 2).double().T  # held out, same distribution
    e0, e_eora, e_svd = (dW @ Xt).norm(), ((dW - M) @ Xt).norm(), ((dW - M_svd) @ Xt).norm()
    # measured: rank 4: 0.61 vs 0.83 of the uncompensated error; rank 8: 0.37 vs 0.67
    assert e_eora < 0.85 * e_svd < e0, (float(e_eora / e0), float(e_svd / e0))


def test_base_stays_compressed_and_reference_forms_agree(compressed):
    model, qmodel, _ = compressed
    X = _inputs(256, 3)
    covs = svdadapt.collect_covariances(model, [X], progress=False)
    a = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=4, reference=model, calibration=covs, progress=False)
    b = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=4, reference=model.state_dict(), calibration=covs,
                      progress=False)
    assert torch.equal(a.base_model.model[0].get_base_layer().weight, qmodel[0].weight)
    assert torch.equal(_adapter(a), _adapter(b))
    with torch.no_grad(), a.disable_adapter():
        assert torch.equal(a(X), qmodel(X))


def test_rank_deficient_covariance_gives_finite_factors(compressed):
    """Fewer tokens than the input width, and dead input channels: finite factors, zero rows past the
    usable rank, nothing on the dead channels, and the calibration error vanishes once rank ≥ #tokens."""
    model, qmodel, dW = compressed
    X = _inputs(10, 4)
    X[:, :8] = 0  # dead channels
    peft_model = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=16, reference=model, calibration=[X],
                               progress=False)
    A, B = peft_model.svdadapt["init_factors"]["0"]
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert peft_model.svdadapt["report"]["0"]["kept_rank"] == 10
    assert torch.count_nonzero(A[10:]) == 0 and torch.count_nonzero(B[:, 10:]) == 0
    assert A[:, :8].abs().max() <= 1e-6 * A.abs().max()  # dead channels: only fp32 solve noise, ≤ 16u of the largest
    M = _adapter(peft_model)
    # rank 16 ≥ kept rank 10: dW is represented exactly on X's span, up to fp32 SVD error (√(mn)·u·‖·‖ ≈ 1e-6)
    assert ((dW - M) @ X.double().T).norm() <= 1e-5 * (dW @ X.double().T).norm()


def test_zero_error_layer_gives_zero_adapter():
    model = _toy()
    peft_model = svdadapt.wrap(copy.deepcopy(model), "eora", rank=4, reference=model, calibration=[_inputs(64, 5)],
                               progress=False)
    A, B = peft_model.svdadapt["init_factors"]["0"]
    assert torch.count_nonzero(B @ A) == 0 and torch.isfinite(A).all()


def test_tiny_llama_end_to_end_and_calibrate_on():
    """On a transformer: held-out logits move toward the reference; calibrate_on picks the model the
    covariances are collected on."""
    model = make_tiny_llama()
    qmodel = svdadapt.compress.quantize(model, bits=2, group_size=32)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 128, (4, 32), generator=g)} for _ in range(2)]
    held_out = torch.randint(0, 128, (4, 32), generator=g)
    peft_model = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=8, reference=model, calibration=calib,
                               calibrate_on="compressed", progress=False)
    ref, q, comp = out(model, held_out), out(qmodel, held_out), out(peft_model, held_out)
    assert (comp - ref).norm() < 0.8 * (q - ref).norm()

    for on, source in (("compressed", qmodel), ("reference", model), (None, model)):  # None: the default
        covs = svdadapt.collect_covariances(source, calib, progress=False)
        kw = {} if on is None else {"calibrate_on": on}
        collected = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=8, reference=model, calibration=calib,
                                  blockwise=False, progress=False, **kw)  # (wrap's default: sequential blocks)
        given = svdadapt.wrap(copy.deepcopy(qmodel), "eora", rank=8, reference=model, calibration=covs,
                              progress=False)
        assert same_init_factors(given, collected), on


# ---------------------------------------------------------------------------------------------------------- errors
def _raises(exc, message, model=None, **kw):
    kw.setdefault("calibration", [_inputs(8, 0)])
    with raises_exactly(exc, message):
        svdadapt.wrap(model if model is not None else _toy(), "eora", rank=2, progress=False, **kw)


def test_errors():
    ref = _toy()
    _raises(ValueError, "method 'eora' needs reference=: the uncompressed model or its state dict")
    _raises(ValueError, "method 'eora' needs calibration=: a svdadapt.Covariances or an iterable of batches",
            reference=ref, calibration=None)
    _raises(ValueError, "reference weight for '0' has shape (32, 40), the model's has (32, 48)",
            reference={"0.weight": torch.zeros(OUT, 40)}, calibrate_on="compressed")
    _raises(ValueError, "reference has no weight for targeted module '0' (looked for '0.weight')",
            reference={"layer.weight": torch.zeros(OUT, IN)}, calibrate_on="compressed")
    _raises(ValueError, "reference has no weight for targeted module '0' (looked for '0.weight')",
            reference=nn.Sequential(nn.Identity()))
    _raises(TypeError, "reference must be an nn.Module or a state dict, got Tensor", reference=torch.zeros(OUT, IN))
    _raises(ValueError, "calibrate_on must be 'compressed' or 'reference', got 'both'", reference=ref,
            calibrate_on="both")
    _raises(ValueError, "calibrate_on='reference' (the default) collects on the reference model: pass reference= "
            "as an nn.Module (not a state dict), pass precomputed Covariances, or set calibrate_on='compressed'",
            reference=ref.state_dict())
    _raises(ValueError, "mode='ipa' only applies to method='corda', not 'eora'", reference=ref, mode="ipa")
    _raises(ValueError, "covariance for '0' has shape (40, 40), expected (48, 48)", reference=ref,
            calibration={"0": torch.eye(40)})
    _raises(ValueError, "calibration has no covariance for targeted module '0' (1 of 1 targets missing)",
            reference=ref, calibration=svdadapt.Covariances({"1": torch.eye(48)}))
    _raises(ValueError, "calibration saw no tokens (0 batches): pass non-empty batches whose attention_mask is not "
            "all zero", reference=ref, calibration=[])
    nan = torch.ones(4, IN)
    nan[1, 3] = float("nan")
    _raises(ValueError, "non-finite activations (NaN or inf) in the input of module '0' in batch 0",
            reference=ref, calibration=[nan])


@pytest.mark.slow
def test_eora_on_smollm2_first_block(smollm2):
    """Real model: 3-bit g128 on the first block, EoRA from pydoc text; held-out text logits get closer to
    the original's and the compressed base is kept."""
    from pydoc_data.topics import topics

    model, tok = smollm2
    targets = r"model\.layers\.0\..*_proj"
    qmodel = svdadapt.compress.quantize(model, bits=3, group_size=128, target_modules=targets)
    keys = sorted(topics)
    calib = svdadapt.text_batches(tok, [topics[k] for k in keys[:6]], seq_len=128, batch_size=4, max_batches=2)
    held = svdadapt.text_batches(tok, [topics[k] for k in keys[-3:]], seq_len=64, batch_size=2, max_batches=1)[0]
    ref, q = out(model, held), out(qmodel, held)
    wq = qmodel.get_submodule("model.layers.0.mlp.down_proj").weight.clone()
    peft_model = svdadapt.wrap(qmodel, "eora", rank=16, reference=model, calibration=calib, target_modules=targets,
                               progress=False)
    comp = out(peft_model, held)
    base = peft_model.base_model.model.get_submodule("model.layers.0.mlp.down_proj").get_base_layer().weight
    assert torch.equal(base, wq)
    assert (comp - ref).norm() < 0.9 * (q - ref).norm()
