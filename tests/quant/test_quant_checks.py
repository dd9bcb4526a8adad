"""Shapes a quantized base can take: bitsandbytes 0.50 repacks a 4-bit layer for its CPU kernel on the first eval
forward (on a CPU with AVX512-BF16), which fails unless in_features is a multiple of the 64-block and out_features of
32; ``wrap(..., quantize="nf4"/"fp4")`` refuses such a target up front, naming it, and leaves the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import svdadapt

from helpers import lora_product, raises_exactly

bnb = pytest.importorskip("bitsandbytes")
from svdadapt.modules import bnb as sbnb

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: many small BLAS calls


def _mlp(*sizes: int, seed: int = 0) -> nn.Sequential:
    """Linear(sizes[0], sizes[1]), ReLU, Linear(sizes[1], sizes[2]), ... with fixed weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, o in zip(sizes, sizes[1:]):
            layers += [nn.Linear(i, o), nn.ReLU()]
        return nn.Sequential(*layers[:-1])


def _refusal(scheme: str, name: str, shape: tuple[int, int], problem: str) -> str:
    return (f"quantize={scheme!r} cannot quantize module {name!r} of weight {shape}: {problem} (bitsandbytes' CPU "
            "kernel fails on it); leave it out of the targets (exclude_modules=) or use quantize='int8'")


@pytest.mark.parametrize("out_f, in_f, problem", [
    (64, 64, None), (32, 128, None), (96, 192, None),
    (64, 100, "in_features=100 is not a multiple of the 4-bit block size 64"),
    (64, 32, "in_features=32 is not a multiple of the 4-bit block size 64"),
    (64, 96, "in_features=96 is not a multiple of the 4-bit block size 64"),
    (8, 64, "out_features=8 is not a multiple of 32, the row tile of the CPU layout"),
    (48, 128, "out_features=48 is not a multiple of 32, the row tile of the CPU layout"),
])
def test_cpu_layout_problem(out_f, in_f, problem):
    assert sbnb.cpu_layout_problem(out_f, in_f) == problem


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_quantize_refuses_a_layer_off_the_block(method, scheme):
    model = _mlp(100, 64, 64)
    before = copy.deepcopy(model.state_dict())
    with raises_exactly(ValueError, _refusal(scheme, "0", (64, 100), "in_features=100 is not a multiple of the "
                                                                     "4-bit block size 64")):
        svdadapt.wrap(model, method, rank=4, quantize=scheme, progress=False)
    assert all(type(m) is nn.Linear for m in model if not isinstance(m, nn.ReLU))  # untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_quantize_names_the_first_offending_module():
    # the first target is fine; the second's out_features is off the CPU row tile
    with raises_exactly(ValueError, _refusal("nf4", "2", (8, 64), "out_features=8 is not a multiple of 32, the row "
                                                                  "tile of the CPU layout")):
        svdadapt.wrap(_mlp(128, 64, 8), "pissa", rank=4, quantize="nf4", progress=False)


def test_the_way_out_excluding_the_module():
    pm = svdadapt.wrap(_mlp(128, 64, 8), "pissa", rank=4, quantize="nf4", exclude_modules=["2"], progress=False)
    assert pm.svdadapt.targets == ["0"]
    assert sbnb.is_bnb_layer(pm.base_model.model[0].base_layer) and type(pm.base_model.model[2]) is nn.Linear


def test_eora_quantize_refuses_too():
    covs = {"0": torch.eye(100), "2": torch.eye(64)}
    with raises_exactly(ValueError, _refusal("nf4", "0", (64, 100), "in_features=100 is not a multiple of the "
                                                                    "4-bit block size 64")):
        svdadapt.wrap(_mlp(100, 64, 64), "eora", rank=4, quantize="nf4", calibration=covs, progress=False)


def test_int8_takes_any_shape():
    model = _mlp(100, 64, 8)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model[0](x).double()
    pm = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=4, quantize="int8", progress=False).eval()
    assert [type(pm.base_model.model[i].base_layer).__name__ for i in (0, 2)] == ["Linear8bitLt"] * 2
    layer = pm.base_model.model[0]
    with torch.no_grad():  # the eval forward that fails for a 4-bit layer of these shapes
        got = layer(x).double()
    # int8 row-wise absmax: each weight of the residual R = W - s·B·A is off by at most half a step (rowmax|R| / 254)
    # and each input by half a step of its row's absmax (max|x| / 254), after both are rounded to fp16 (2^-11
    # relative each); the first-order terms, the product of the two steps, and fp32's accumulation of the adapter
    R, ax = model[0].weight.double() - lora_product(layer), x.double().abs()
    dW = R.abs().amax(dim=1, keepdim=True) / 254 + R.abs() * 2**-11  # (out, in)
    dx = ax.amax(dim=1, keepdim=True) / 254 + ax * 2**-11  # (rows, in)
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    adapter = layer.scaling["default"] * (B.abs() @ A.abs()).detach()  # (out, in)
    bound = ax @ dW.T + dx @ R.abs().T + dx @ dW.T + 104 * torch.finfo(torch.float32).eps * (ax @ adapter.T)
    assert ((got - want).abs() <= bound).all(), float(((got - want).abs() / bound).max())


def test_eora_on_a_quantized_model_of_such_shapes():
    """A bitsandbytes model built elsewhere is read, not re-quantized: EoRA accepts it (its base stays as it is),
    and the wrapped layer computes deq(W_c)·x + b + s·B·A·x (a train-mode forward, which never repacks)."""
    ref = _mlp(100, 64, 64)
    q = copy.deepcopy(ref)
    for i in (0, 2):
        q[i] = sbnb.quantize_linear(ref[i].weight.detach(), ref[i].bias.detach(), "nf4")
    codes = {i: q[i].weight.data.clone() for i in (0, 2)}
    pm = svdadapt.wrap(q, "eora", rank=4, reference=ref, calibration={"0": torch.eye(100), "2": torch.eye(64)},
                       progress=False)
    layer = pm.base_model.model[0]
    assert all(torch.equal(pm.base_model.model[i].base_layer.weight.data, codes[i]) for i in (0, 2))
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    pm.train()
    got = layer(x).double()
    want = x.double() @ (sbnb.dequantize(layer.base_layer).double() + lora_product(layer)).T + ref[0].bias.double()
    # an fp32 forward accumulates 100 products in the base and 100 + 4 in the LoRA path: at most (100 + 104 + 2)
    # roundings of fp32 eps, relative to |x|·(|W_c| + s·|B|·|A|) + |b|, entry by entry
    A, B = (layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double())
    products = sbnb.dequantize(layer.base_layer).double().abs() + layer.scaling["default"] * (B.abs() @ A.abs())
    scale = x.double().abs() @ products.detach().T
    bound = 206 * torch.finfo(torch.float32).eps * (scale + ref[0].bias.double().abs())
    assert ((got - want).abs() <= bound).all(), float(((got - want).abs() / bound).max())
