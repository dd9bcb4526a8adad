"""QPiSSA on HQQ and torchao bases (``wrap(..., quantize="hqq4" / "torchao-int4" / "torchao-int8")``): the residual
W − s·B·A becomes that backend's own quantized layer and PEFT's LoRA layer for the backend carries the adapter.

Every error is recomputed here in fp64 from the wrapped model (the backend's own dequantization of the base layer,
the LoRA factors and scaling); QLoRA's start deq(Q(W)) is built here with the backend's own API, not svdadapt's.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from bounds import gamma, gemm_error
from helpers import lora_layers, lora_product, make_tiny_llama, raises_exactly, token_ids, train
from quant_helpers import fro, originals

import svdadapt
from svdadapt.modules.qbase import SCHEMES, missing_package

RANK = 8  # tiny Llama: hidden 64, intermediate 128 (every in_features a multiple of the group size 64)
PACKAGE = {"hqq4": "hqq", "torchao-int4": "torchao", "torchao-int8": "torchao"}
BACKEND_SCHEMES = list(PACKAGE)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """conftest's one_thread for every test here (SVDADAPT_TEST_THREADS sets another count)."""


def backend_quantized(W: torch.Tensor, scheme: str) -> nn.Module:
    """A layer of ``W`` quantized with the backend's own API as a user of it would (HQQ 4-bit / groups of 64;
    torchao int4 in groups of 64 or per-row int8, weight-only)."""
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W.float())
    if scheme == "hqq4":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        return HQQLinear(lin, quant_config=BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.float32,
                         device="cpu")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    config = (Int8WeightOnlyConfig() if scheme == "torchao-int8"
              else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
    quantize_(lin, config)
    return lin


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The backend's own dequantization of a base layer, fp64 (out, in)."""
    if hasattr(layer, "W_q"):  # HQQLinear
        return layer.dequantize().reshape(layer.out_features, layer.in_features).double()
    return layer.weight.dequantize().double()


def assert_backend_layers(pm, scheme: str) -> None:
    """Every LoRA layer is PEFT's layer for the backend over a real layer of it."""
    for n, layer in lora_layers(pm).items():
        base = layer.get_base_layer()
        if scheme == "hqq4":
            from hqq.core.quantize import HQQLinear

            assert type(layer).__name__ == "HqqLoraLinear" and isinstance(base, HQQLinear), n
            assert (base.meta["nbits"], base.meta["group_size"]) == (4, 64), n
        else:
            from torchao.utils import TorchAOBaseTensor

            want = "Int8Tensor" if scheme == "torchao-int8" else "IntxUnpackedToInt8Tensor"
            assert type(layer).__name__ == "TorchaoLoraLinear" and isinstance(base.weight, TorchAOBaseTensor), n
            assert type(base.weight).__name__ == want, n


def quant_errors(pm, W0: dict[str, torch.Tensor], scheme: str) -> dict[str, dict[str, float]]:
    """Per layer: ‖W − (deq(base) + s·B·A)‖ (QPiSSA), ‖W − deq(Q(W))‖ (QLoRA) and ‖W‖, all fp64."""
    out = {}
    for n, layer in lora_layers(pm).items():
        W = W0[n]
        effective = dequantized(layer.get_base_layer()) + lora_product(layer)
        out[n] = {"qpissa": fro(W - effective), "qlora": fro(W - dequantized(backend_quantized(W, scheme))),
                  "norm": fro(W)}
    return out


def wrapped(model, scheme: str, iters: int = 1):
    return svdadapt.wrap(copy.deepcopy(model), "pissa", RANK, quantize=scheme, quant_iters=iters, progress=False)


@pytest.mark.parametrize("scheme", BACKEND_SCHEMES)
def test_qpissa_closer_to_w_than_qlora(scheme):
    """QPiSSA's ‖W − (deq(Q(W_res)) + s·B·A)‖ is below QLoRA's ‖W − deq(Q(W))‖ on every layer, the report says the
    same numbers, and 3 alternating steps are no worse than 1."""
    pytest.importorskip(PACKAGE[scheme])
    model = make_tiny_llama()
    W0 = originals(model)
    errors = {}
    for iters in (1, 3):
        pm = wrapped(model, scheme, iters)
        assert_backend_layers(pm, scheme)
        e = quant_errors(pm, W0, scheme)
        assert e.keys() == W0.keys()
        report = pm.svdadapt.report
        for n, v in e.items():
            assert v["qpissa"] < v["qlora"], (scheme, iters, n, v)
            # the report's relative errors are fp32 norms of the same matrices: γ_n of an n = out·in ≤ 8192 sum
            tol = gamma(W0[n].numel()) * 4
            assert report[n]["quant_error"] == pytest.approx(v["qpissa"] / v["norm"], rel=tol), (iters, n)
            assert report[n]["qlora_error"] == pytest.approx(v["qlora"] / v["norm"], rel=tol), (iters, n)
            assert 1 <= report[n]["quant_iter"] <= iters
        errors[iters] = e
    for n in W0:
        # the alternation keeps its best step and step 1 is the iters=1 result (fp64 recomputation of an fp32
        # choice: the same γ_n slack)
        assert errors[3][n]["qpissa"] <= errors[1][n]["qpissa"] * (1 + 4 * gamma(W0[n].numel())), n
    mean = {k: sum(v["qpissa"] / v["norm"] for v in errors[k].values()) / len(W0) for k in errors}
    qlora = sum(v["qlora"] / v["norm"] for v in errors[1].values()) / len(W0)
    print(f"{scheme}: QLoRA {qlora:.5f}, QPiSSA iters=1 {mean[1]:.5f}, iters=3 {mean[3]:.5f} (mean relative)")


@pytest.mark.parametrize("scheme", BACKEND_SCHEMES)
def test_base_forward_is_its_dequantized_weight(scheme):
    """The base layer's own forward is deq(Q(W_res))·x + bias: within the rounding of one fp32 GEMM of length in
    (γ_{in+2}·(|b| + |x|·|deq|ᵀ), Higham eq. 3.13), doubled for the scale the backend may apply after the GEMM."""
    pytest.importorskip(PACKAGE[scheme])
    pm = wrapped(make_tiny_llama(), scheme)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    for n, layer in lora_layers(pm).items():
        base = layer.get_base_layer()
        D = dequantized(base)
        xi = x[:, :D.shape[1]]
        with torch.no_grad():
            got = base(xi).double()
        want = xi.double() @ D.T
        assert (got - want).abs().le(2 * gemm_error(xi, D.T)).all(), n


@pytest.mark.parametrize("scheme", BACKEND_SCHEMES)
def test_deterministic(scheme):
    pytest.importorskip(PACKAGE[scheme])
    model = make_tiny_llama()
    a, b = wrapped(model, scheme, 2), wrapped(model, scheme, 2)
    la, lb = lora_layers(a), lora_layers(b)
    for n in la:
        assert torch.equal(dequantized(la[n].get_base_layer()), dequantized(lb[n].get_base_layer())), n
        assert torch.equal(lora_product(la[n]), lora_product(lb[n])), n
    assert a.svdadapt.report == b.svdadapt.report


@pytest.mark.parametrize("scheme", BACKEND_SCHEMES)
def test_trains_saves_and_reloads_bit_identically(scheme, tmp_path):
    pytest.importorskip(PACKAGE[scheme])
    original = make_tiny_llama()
    pm = wrapped(original, scheme)
    x = token_ids(4, 16, seed=1)
    bases0 = {n: dequantized(m.get_base_layer()) for n, m in lora_layers(pm).items()}
    train(pm, x, steps=3)
    bases = {n: dequantized(m.get_base_layer()) for n, m in lora_layers(pm).items()}
    assert all(torch.equal(bases[n], bases0[n]) for n in bases)  # training moves the adapter only
    factors = {k: v.detach().clone() for k, v in pm.named_parameters() if "lora_" in k}
    with torch.no_grad():
        want = pm(x).logits
    svdadapt.save(pm, tmp_path / "a")
    reloaded = svdadapt.load(copy.deepcopy(original), tmp_path / "a", progress=False)
    assert reloaded.svdadapt.quantize == scheme
    assert_backend_layers(reloaded, scheme)
    got = {n: dequantized(m.get_base_layer()) for n, m in lora_layers(reloaded).items()}
    assert got.keys() == bases.keys() and all(torch.equal(got[n], bases[n]) for n in bases)
    got_factors = {k: v.detach() for k, v in reloaded.named_parameters() if "lora_" in k}
    assert got_factors.keys() == factors.keys() and all(torch.equal(got_factors[k], factors[k]) for k in factors)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x).logits, want)


def test_errors_exact_messages(monkeypatch):
    valid = ", ".join(SCHEMES)
    assert valid == "nf4, fp4, int8, hqq4, torchao-int4, torchao-int8"
    model = make_tiny_llama()
    with raises_exactly(ValueError, f"quantize must be one of {valid} or None, got 'hqq3'"):
        svdadapt.wrap(model, "pissa", RANK, quantize="hqq3", progress=False)
    # a shape the group size does not divide (hidden 48: in_features 48 of q_proj)
    odd = make_tiny_llama(hidden_size=48, intermediate_size=128)
    for scheme in ("hqq4", "torchao-int4"):
        if missing_package(scheme) is None:
            with raises_exactly(ValueError, f"quantize={scheme!r} cannot quantize module "
                                            "'model.layers.0.self_attn.q_proj' of weight (48, 48): in_features=48 is "
                                            "not a multiple of the group size 64; leave it out of the targets "
                                            "(exclude_modules=) or use quantize='torchao-int8'"):
                svdadapt.wrap(odd, "pissa", RANK, quantize=scheme, progress=False)
    # the backend not installed: its svdadapt extra
    for module in ("hqq", "hqq.core.quantize", "torchao", "torchao.quantization"):
        monkeypatch.setitem(sys.modules, module, None)
    assert missing_package("hqq4") == "hqq" and missing_package("torchao-int8") == "torchao"
    with raises_exactly(ImportError, 'quantize= with this scheme needs hqq: pip install "svdadapt[hqq]"'):
        svdadapt.wrap(model, "pissa", RANK, quantize="hqq4", progress=False)
    with raises_exactly(ImportError, 'quantize= with this scheme needs torchao: pip install "svdadapt[torchao]"'):
        svdadapt.wrap(model, "pissa", RANK, quantize="torchao-int4", progress=False)
    assert all(type(m) is nn.Linear for m in svdadapt.resolve_targets(model).values())  # untouched


@pytest.mark.parametrize("scheme", BACKEND_SCHEMES)
def test_eora_quantize_builds_the_backends_own_layer_of_w(scheme):
    """EoRA with ``quantize=``: each base is the backend's own quantization of W, bit for bit as the backend's API
    gives it (both quantize the same fp32 W deterministically)."""
    pytest.importorskip(PACKAGE[scheme])
    model = make_tiny_llama()
    W0 = originals(model)
    covs = svdadapt.collect_covariances(model, [token_ids(2, 16, seed=0)], progress=False)
    pm = svdadapt.wrap(copy.deepcopy(model), "eora", RANK, quantize=scheme, calibration=covs, progress=False)
    assert_backend_layers(pm, scheme)
    for n, layer in lora_layers(pm).items():
        assert torch.equal(dequantized(layer.get_base_layer()), dequantized(backend_quantized(W0[n], scheme))), n


@pytest.mark.parametrize("scheme", BACKEND_SCHEMES)
def test_unwrap_merge_requantizes_the_fine_tuned_weight(scheme):
    """``unwrap(merge=True)`` (PEFT's merge) gives the backend's layer of deq(base) + s·B·A with the fine-tuned
    factors, bit for bit as the backend's API quantizes that fp32 matrix (torchao: the model is marked with the
    quantizer PEFT re-quantizes with)."""
    pytest.importorskip(PACKAGE[scheme])
    pm = wrapped(make_tiny_llama(), scheme)
    train(pm, token_ids(2, 8, seed=0), steps=2)
    want = {n: (dequantized(layer.get_base_layer()).float() + layer.get_delta_weight("default"))
            for n, layer in lora_layers(pm).items()}
    merged = svdadapt.unwrap(pm, merge=True)
    for n, W in want.items():
        layer = merged.get_submodule(n)
        assert torch.equal(dequantized(layer), dequantized(backend_quantized(W, scheme))), n
