"""Quantized backends as layer kinds (modules/backends.py): HQQ, torchao, optimum-quanto, compressed-tensors.

Per backend, on a tiny Llama quantized by that backend here: the W_c read equals what the backend's own forward
computes with; EoRA on it (reference= the dense model) is within 1e-3 of an fp64 brute-force optimum computed from
W and W_c and beats a plain SVD of ΔW on held-out inputs; save → load is bit-identical; PEFT loads the adapter on a
freshly quantized model (its own LoRA layer for the backend: HqqLoraLinear, TorchaoLoraLinear; lora.Linear on
quanto's QLinear and on a decompressed compressed-tensors Linear) and reproduces the wrapped model's logits;
export_lora and unwrap.
"""

from __future__ import annotations

import copy

import pytest
import torch

import svdadapt
from bounds import gamma
from helpers import lora_layers, lora_product, make_tiny_llama, raises_exactly, set_dynamic_scales, token_ids
from quant_helpers import eora_optimum, fro, layer_inputs
from svdadapt.modules.layers import kind_of

RANK = 8
GROUP = 32  # the tiny Llama's widths (64, 128) are multiples: every backend takes every target


def _set_child(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _hqq(model, names):
    hq = pytest.importorskip("hqq.core.quantize")
    for n in names:
        _set_child(model, n, hq.HQQLinear(model.get_submodule(n), hq.BaseQuantizeConfig(nbits=4, group_size=GROUP),
                                          compute_dtype=torch.float32, device="cpu"))
    return model


def _torchao(model, names):
    pytest.importorskip("torchao")
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP)),
              filter_fn=lambda m, fqn: fqn in names)
    return model


def _torchao_int8(model, names):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
    return model


def _quanto(model, names):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import freeze, qint4, quantize

    quantize(model, weights=qint4, include=list(names))
    freeze(model)
    return model


def _compressed(model, names):
    """W4A16 pack-quantized (groups of 32, symmetric), scales from the library's own ``compute_dynamic_scales_and_zp``
    on each weight, compressed by its ``ModelCompressor``."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=GROUP, symmetric=True)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"g": QuantizationScheme(targets=list(names), weights=args)}))
    set_dynamic_scales(model, names)
    ModelCompressor.from_pretrained_model(model, "pack-quantized").compress_model(model)
    return model


def _decompressed(model):
    """What compressed-tensors does on the model's first forward (PEFT needs a float weight to wrap a layer)."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor

    ModelCompressor.from_pretrained_model(model).decompress_model(model)
    return model


BACKENDS = {"hqq": _hqq, "torchao-int4": _torchao, "torchao-int8": _torchao_int8, "quanto": _quanto,
            "compressed-tensors": _compressed}
KIND = {"hqq": "HQQ HQQLinear", "torchao-int4": "torchao quantized Linear", "torchao-int8": "torchao quantized Linear",
        "quanto": "optimum-quanto QLinear", "compressed-tensors": "compressed-tensors compressed Linear"}
PEFT_LAYER = {"hqq": "HqqLoraLinear", "torchao-int4": "TorchaoLoraLinear", "torchao-int8": "TorchaoLoraLinear",
              "quanto": "Linear", "compressed-tensors": "Linear"}


def quantized(backend: str):
    """A fresh tiny Llama (seed 0) with every target quantized by ``backend`` (deterministic: the same each call)."""
    model = make_tiny_llama()
    return BACKENDS[backend](model, list(svdadapt.resolve_targets(model)))


def for_peft(backend: str, model):
    return _decompressed(model) if backend == "compressed-tensors" else model


def own_forward(backend: str, layer, x):
    """The backend's own forward of one layer (compressed-tensors: a copy decompressed by the library)."""
    if backend == "compressed-tensors":
        from compressed_tensors.compressors.base import decompress_module

        layer = copy.deepcopy(layer)
        decompress_module(layer)
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_read_equals_the_backends_forward(backend):
    model = quantized(backend)
    dense = make_tiny_llama()
    g = torch.Generator().manual_seed(0)
    for n in svdadapt.resolve_targets(dense):
        layer = model.get_submodule(n)
        kind = kind_of(layer)
        assert kind is not None and kind.name == KIND[backend] and kind.packed, (n, type(layer))
        Wc = kind.read(layer)
        assert Wc.shape == kind.shape(layer) == dense.get_submodule(n).weight.shape and Wc.dtype == torch.float32
        x = torch.randn(16, Wc.shape[1], generator=g)
        got = own_forward(backend, layer, x).double()
        want = x.double() @ Wc.double().T
        # the backend's fp32 forward is a dot product of length in (+ nothing: no bias in Llama): ≤ γ_in·|x|·|W_c|ᵀ
        # elementwise (Higham 3.5), whatever its summation order; the read is exact, so that is the whole gap
        assert ((got - want).abs() <= gamma(Wc.shape[1]) * (x.double().abs() @ Wc.double().abs().T)).all(), n
        assert (got - want).norm() <= 1e-6 * want.norm(), n  # the figure, implied by the bound (in ≤ 128)
        # and W_c is a quantization of W: not W itself, and within 4-bit (int8: 8-bit) rounding of it
        dW = (dense.get_submodule(n).weight.double() - Wc.double()).norm() / dense.get_submodule(n).weight.norm()
        assert 0 < dW < (0.2 if backend != "torchao-int8" else 0.02), (n, float(dW))


# ------------------------------------------------------------------------------------------------ EoRA

@pytest.fixture(scope="module")
def calibration():
    """The dense tiny Llama, its covariances on 1024 calibration tokens (more than any input width) and the
    per-layer inputs on those and on 1024 held-out tokens."""
    dense = make_tiny_llama()
    cal, held = token_ids(16, 64, seed=1), token_ids(16, 64, seed=2)
    names = list(svdadapt.resolve_targets(dense))
    covs = svdadapt.collect_covariances(dense, [cal], progress=False)
    return dense, covs, layer_inputs(dense, names, cal), layer_inputs(dense, names, held)


def _wrapped(backend, calibration):
    dense, covs, _, _ = calibration
    return svdadapt.wrap(quantized(backend), "eora", RANK, reference=dense, calibration=covs, progress=False)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_eora_is_the_optimum_and_beats_plain_svd(backend, calibration):
    dense, _, X_cal, X_held = calibration
    qmodel = quantized(backend)
    Wc = {n: kind_of(qmodel.get_submodule(n)).read(qmodel.get_submodule(n)).double() for n in X_cal}
    pm = _wrapped(backend, calibration)
    layers = lora_layers(pm)
    assert layers.keys() == X_cal.keys()
    for n, layer in layers.items():
        assert type(layer).__name__ == PEFT_LAYER[backend], (n, type(layer))
        dW = dense.get_submodule(n).weight.detach().double() - Wc[n]
        M = lora_product(layer)
        got, best = fro((dW - M) @ X_cal[n].T), fro((dW - eora_optimum(dW, X_cal[n], RANK)) @ X_cal[n].T)
        # best ≤ got: an fp64 optimum, 1e-9 ≫ fp64 noise; got ≤ best·(1 + 1e-3): fp32 factors, second order
        assert best <= got * (1 + 1e-9) and got <= best * (1 + 1e-3), (n, got, best)
        U, s, Vh = torch.linalg.svd(dW, full_matrices=False)
        plain = (U[:, :RANK] * s[:RANK]) @ Vh[:RANK]
        assert fro((dW - M) @ X_held[n].T) < fro((dW - plain) @ X_held[n].T), n


# ------------------------------------------------------------------------------------------------ lifecycle

def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits


def _state(pm):
    return {k: v.clone() for k, v in pm.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_save_load_peft_export_unwrap(backend, calibration, tmp_path):
    from peft import PeftModel

    pm = _wrapped(backend, calibration)
    x = token_ids(2, 16, seed=3)
    want, factors = _logits(pm, x), _state(pm)
    svdadapt.save(pm, tmp_path / "saved")

    # load onto a freshly quantized model: the factors and the logits bit for bit
    loaded = svdadapt.load(quantized(backend), tmp_path / "saved", progress=False)
    got = _state(loaded)
    assert got.keys() == factors.keys() and all(torch.equal(got[k], factors[k]) for k in got)
    assert torch.equal(_logits(loaded, x), want)

    # plain PEFT on a freshly quantized model, as the backend's own LoRA layer
    plain = PeftModel.from_pretrained(for_peft(backend, quantized(backend)), tmp_path / "saved")
    assert {type(m).__name__ for m in lora_layers(plain).values()} == {PEFT_LAYER[backend]}
    assert torch.equal(_logits(plain, x), want)

    # export_lora: the same rank-r LoRA (EoRA keeps the base)
    svdadapt.export_lora(pm, tmp_path / "lora")
    exported = PeftModel.from_pretrained(for_peft(backend, quantized(backend)), tmp_path / "lora")
    assert torch.equal(_logits(exported, x), want)

    # unwrap: the quantized model, adapters removed, computing as a fresh one
    base = svdadapt.unwrap(pm)
    assert not any(hasattr(m, "lora_A") for m in base.modules())
    assert torch.equal(_logits(base, x), _logits(for_peft(backend, quantized(backend)), x))


# ------------------------------------------------------------------------------------------------ errors

def test_rewriting_methods_are_refused_on_every_backend():
    """PiSSA would rewrite the base; a packed layer of these backends is read, never written."""
    for backend in BACKENDS:
        model = quantized(backend)
        first = "model.layers.0.self_attn.q_proj"
        layer = type(model.get_submodule(first)).__name__
        with raises_exactly(ValueError, f"pissa rewrites the base weights, but module {first!r} is a quantized "
                                        f"{layer}: run pissa on the full-precision model with quantize=... (e.g. "
                                        "'nf4') instead"):
            svdadapt.wrap(model, "pissa", RANK, progress=False)


def test_a_layer_quantizing_its_input_is_refused():
    """quanto with activations quantized: the layer's forward is not linear in its input, so it has no W_c."""
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import qint4, qint8, quantize

    dense = make_tiny_llama()
    model = make_tiny_llama()
    quantize(model, weights=qint4, activations=qint8, include=["model.layers.0.self_attn.q_proj"])
    with raises_exactly(TypeError, "a QLinear that quantizes its input activations is not linear in its input; "
                                   "svdadapt reads weight-only quantized layers only"):
        svdadapt.wrap(model, "eora", RANK, reference=dense, calibration=[token_ids(2, 8, seed=0)],
                      target_modules=["model.layers.0.self_attn.q_proj"], progress=False)
