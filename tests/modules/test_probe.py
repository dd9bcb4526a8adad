"""The probing fallback (modules/probe.py): W_c = f(I) − f(0) for a module whose forward is linear, refused on a
nonlinear one; ``svdadapt.register_linear`` lets EoRA run on a module type no layer kind reads; the one-line error
for such a type when it is not registered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import svdadapt
from bounds import gamma, unit_roundoff
from helpers import lora_layers, raises_exactly, token_ids
from svdadapt.modules.probe import check_linear, probe_weight


def test_exact_on_linear_without_bias():
    """f(e_j) = W·e_j is exact (products by 1 and 0, sums of zeros): the probe gives the weight bit for bit, in
    any chunking."""
    lin = nn.Linear(300, 40, bias=False)
    for chunk in (1, 7, 256, 300, 1000):
        assert torch.equal(probe_weight(lin, chunk=chunk), lin.weight.detach()), chunk
    lin64 = nn.Linear(50, 30, bias=False).double()
    assert torch.equal(probe_weight(lin64), lin64.weight.detach())


def test_linear_with_bias_within_one_rounding():
    """(w + b) − b: the sum rounds once (≤ u·|w + b|) and the difference is exact (Sterbenz does not apply in
    general, but it rounds once more): |probe − w| ≤ 2u·(|w| + |b|) elementwise."""
    lin = nn.Linear(100, 20)
    W, b = lin.weight.detach(), lin.bias.detach()
    got = probe_weight(lin)
    u = unit_roundoff(torch.float32)
    assert ((got - W).abs() <= 2 * u * (W.abs() + b.abs()[:, None]) * (1 + 2 * u)).all()


class Relu(nn.Module):
    in_features = 16

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


def test_refuses_a_nonlinear_module():
    # the bound: (in + 2)·eps(fp32) = 18·2⁻²³
    with pytest.raises(ValueError, match=r"^a Relu is not linear in its input: f\(a·x \+ b·y\) differs from "
                                         r"a·f\(x\) \+ b·f\(y\) \+ \(1−a−b\)·f\(0\) by [0-9.e-]+ \(relative\), above the "
                                         r"rounding bound 2\.15e-06; svdadapt cannot read a weight from it$"):
        probe_weight(Relu())
    check_linear(nn.Linear(16, 8))  # and passes a linear one
    with raises_exactly(TypeError, "cannot probe a Sequential: it has no in_features; give "
                                   "register_linear(..., in_features=N)"):
        probe_weight(nn.Sequential(nn.Linear(4, 4)))


class ScaledLinear(nn.Linear):
    """A layer whose forward is not its stored weight: W_c = 0.5·W, plus the bias (a stand-in for a backend no kind
    knows)."""

    def forward(self, x):
        return nn.functional.linear(x, 0.5 * self.weight, self.bias)


def _model_with(cls):
    model = nn.Sequential(nn.Linear(32, 32), cls(32, 24), nn.Linear(24, 8))
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    return model


def test_register_linear_runs_eora_on_an_unknown_type():
    dense = _model_with(nn.Linear)
    model = _model_with(ScaledLinear)
    X = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    kind = svdadapt.register_linear(ScaledLinear)
    try:
        layer = model[1]
        Wc = kind.read(layer)
        # f(e_j) − f(0) = (0.5·w_j + b) − b: one rounding of the sum, one of the difference (as above)
        u = unit_roundoff(torch.float32)
        assert ((Wc - 0.5 * layer.weight).abs() <= 2 * u * (0.5 * layer.weight.abs() + layer.bias.abs()[:, None])
                * (1 + 2 * u)).all()
        assert kind.shape(layer) == (24, 32)
        pm = svdadapt.wrap(model, "eora", 4, reference=dense, calibration=[X], target_modules=["1"], progress=False)
        lora = lora_layers(pm)["1"]
        assert type(lora.get_base_layer()) is ScaledLinear
        # the adapter compensates ΔW = W − 0.5·W on the inputs of layer 1: its error is below ‖ΔW·Xᵀ‖
        with torch.no_grad():
            H = dense[0](X)
            dW = dense[1].weight - Wc
            M = lora.lora_B["default"].weight @ lora.lora_A["default"].weight * lora.scaling["default"]
            assert ((dW - M) @ H.T).norm() < 0.9 * (dW @ H.T).norm()
    finally:
        svdadapt.unregister_linear(ScaledLinear)
    assert svdadapt.modules.layers.kind_of(ScaledLinear(2, 2)).name == "nn.Linear"  # unregistered: the table's again


def test_unreadable_module_type_is_one_line_naming_it_and_the_kinds():
    kinds = ("nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/nn.Conv2d, bitsandbytes Linear4bit/Linear8bitLt, "
             "HQQ HQQLinear, torchao quantized Linear, optimum-quanto QLinear, compressed-tensors compressed Linear")
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    with raises_exactly(ValueError, f"module '1' is a ReLU, which no layer kind of svdadapt reads (kinds: {kinds}); "
                                    "if its forward is linear in its input: svdadapt.register_linear(ReLU)"):
        svdadapt.wrap(model, "eora", 2, reference=model, calibration=[torch.randn(4, 16)], target_modules=["1"],
                      progress=False)


def test_a_regex_matching_only_weightless_modules_is_matched_no():
    """A regex (a string selector) that happens to match an activation is not asking for it: "matched no
    adaptable layer"; the one-line kind error is for modules named in a list or holding tensors of their own."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.GELU())
    selector = r"\d+"  # matches "0" (a container of an adaptable layer) and "1" (the GELU), not "0.0"
    with pytest.raises(ValueError) as e:
        svdadapt.wrap(model, "pissa", 2, target_modules=selector, progress=False)
    assert str(e.value).startswith(f"target_modules={selector!r} matched no adaptable layer (")


def test_a_registered_nonlinear_type_is_refused_when_read():
    model = nn.Sequential(nn.Linear(16, 16), Relu())
    svdadapt.register_linear(Relu)
    try:
        with pytest.raises(ValueError, match=r"^a Relu is not linear in its input: "):
            svdadapt.wrap(model, "eora", 2, reference=model, calibration=[torch.randn(4, 16)], target_modules=["1"],
                          progress=False)
    finally:
        svdadapt.unregister_linear(Relu)
    assert type(model[1]) is Relu  # untouched


def test_register_linear_needs_a_module_class():
    with raises_exactly(TypeError, "register_linear needs an nn.Module subclass, got 3"):
        svdadapt.register_linear(3)
