"""svdadapt.modules.bnb: reading and writing bitsandbytes 4-bit / 8-bit layers, including after CPU repacking."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

from svdadapt.modules.bnb import (  # noqa: E402
    SCHEMES,
    dequantize,
    is_bnb_layer,
    is_cpu_packed,
    quantize_linear,
    require_bnb,
    restore_layout,
    scheme_of,
    write_quantized,
)

OUT, IN = 96, 256  # out a multiple of 32 (CPU repacking tiles), in = 4 blocks of 64
# relative Frobenius error of each scheme on Gaussian weights, measured 0.0920 / 0.1220 / 0.0075 (256x512)
ERR_BOUND = {"nf4": 0.10, "fp4": 0.13, "int8": 0.01}
# forward vs x @ dequantize(layer).T + b, max abs error over max |reference|: the repacked 4-bit CPU kernel
# computes in bf16 (measured <= 4.5e-3), the int8 eval path quantizes activations to int8 (measured <= 8.2e-3),
# the training paths dequantize and multiply in fp32 (measured ~2e-7)
TOL_BF16 = 2e-2
TOL_INT8 = 2e-2
# two fp32 forwards through the same dequantized weights: ~√n·u per layer, n ≤ 128, 2 blocks (measured ~1e-6)
TOL_FP32 = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: many small BLAS calls


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def eval_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.eval()
    return layer(x)


def bnb_linear4bit(W: torch.Tensor, b: torch.Tensor | None, quant_type: str, nested: bool) -> nn.Module:
    """A Linear4bit quantized the way bitsandbytes documents it: load fp weights, then .to(device)."""
    layer = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=b is not None, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type=quant_type)
    fp = nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
    with torch.no_grad():
        fp.weight.copy_(W)
        if b is not None:
            fp.bias.copy_(b)
    layer.load_state_dict(fp.state_dict())
    return layer.to("cpu")


def bnb_linear8bit(W: torch.Tensor, b: torch.Tensor) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(W.shape[1], W.shape[0], bias=True, has_fp16_weights=False)
    fp = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        fp.weight.copy_(W)
        fp.bias.copy_(b)
    layer.load_state_dict(fp.state_dict())
    return layer.to("cpu")


def bf16_scale_reference(layer: nn.Module) -> torch.Tensor:
    """codes * bf16(absmax) of a canonical (not repacked) Linear4bit: what CPU repacking turns it into."""
    qs = copy.copy(layer.weight.quant_state)
    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    qs.absmax = absmax.to(torch.bfloat16).float()
    qs.nested, qs.state2, qs.offset, qs.dtype = False, None, None, torch.float32
    return F.dequantize_4bit(layer.weight.data, qs)


def expect_repacked(layer: nn.Module) -> None:
    # bitsandbytes repacks only where its AVX512-BF16 CPU kernel exists (this machine: yes)
    assert is_cpu_packed(layer) == bool(layer.support_avx512bf16_for_cpu)


# ------------------------------------------------------------------------------------------ basics


def test_require_bnb_and_is_bnb_layer(monkeypatch):
    assert require_bnb() is bnb
    assert is_bnb_layer(quantize_linear(gaussian(32, 64), None, "nf4"))
    assert is_bnb_layer(quantize_linear(gaussian(32, 64), None, "int8"))
    assert not is_bnb_layer(nn.Linear(4, 4))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError) as e:
        require_bnb()
    assert str(e.value) == "quantize= needs bitsandbytes: pip install bitsandbytes"


def test_is_bnb_layer_does_not_import_bitsandbytes():
    code = ("import sys, torch, svdadapt.modules.bnb as b; before = 'bitsandbytes' in sys.modules; "
            "print(before, b.is_bnb_layer(torch.nn.Linear(2, 2)), 'bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, result, after = out.split()
    assert result == "False" and after == before
    assert before == "False"  # importing svdadapt does not import bitsandbytes


def test_unknown_scheme_message():
    with pytest.raises(ValueError) as e:
        quantize_linear(gaussian(32, 64), None, "nf3")
    assert str(e.value) == "unknown quantization scheme 'nf3'; valid: nf4, fp4, int8"


def test_bad_shapes():
    layer = quantize_linear(gaussian(32, 64), None, "nf4")
    with pytest.raises(ValueError, match=r"weight shape \(64, 32\) does not match the layer's \(32, 64\)"):
        write_quantized(layer, gaussian(64, 32))
    with pytest.raises(TypeError, match="expected a bitsandbytes Linear4bit or Linear8bitLt, got Linear"):
        dequantize(nn.Linear(4, 4))


# ------------------------------------------------------------------------------------------ 4-bit reading


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_fresh_linear4bit(quant_type, nested):
    W = gaussian(256, 512)
    layer = bnb_linear4bit(W, None, quant_type, nested)
    assert not is_cpu_packed(layer) and layer.weight.quant_state.nested == nested
    D = dequantize(layer)
    assert D.dtype == torch.float32 and D.shape == W.shape
    assert torch.equal(D, F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    assert rel(D, W) < ERR_BOUND[quant_type]


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_quantization_error_on_gaussian_weights(scheme):
    W = gaussian(256, 512)
    err = rel(dequantize(quantize_linear(W, None, scheme)), W)
    assert 0.5 * ERR_BOUND[scheme] < err < ERR_BOUND[scheme]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_survives_cpu_repacking(quant_type):
    """THE TRAP: an eval forward on CPU repacks the weight in place; dequantize must not change."""
    W, b, x = gaussian(OUT, IN), gaussian(OUT, seed=1), gaussian(5, IN, seed=2)
    layer = quantize_linear(W, b, quant_type)
    D0 = dequantize(layer)
    assert torch.equal(D0, F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    packed_before = layer.weight.data.clone()

    y = eval_forward(layer, x)
    expect_repacked(layer)
    if is_cpu_packed(layer):
        assert tuple(layer.weight.data.shape) == (OUT, IN // 2)  # the data really changed layout
    D1 = dequantize(layer)
    assert torch.equal(D1, D0)  # bit for bit: quantize_linear's bf16 scales survive the repacking
    assert max_rel(y, x @ D1.T + b) < TOL_BF16

    # the layer is not modified by dequantize; restore_layout gives back the original packed codes
    assert is_cpu_packed(layer) == bool(layer.support_avx512bf16_for_cpu)
    restore_layout(layer)
    assert not is_cpu_packed(layer)
    assert torch.equal(layer.weight.data, packed_before)
    assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state), D0)
    layer.train()
    assert max_rel(layer(x), x @ D0.T + b) < TOL_FP32


@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_after_repacking_bnb_native_layer(nested):
    """A layer with fp32 scales (as transformers quantizes): repacking rounds its scales to bf16, and
    dequantize then reads exactly that, which is what the layer computes with."""
    W, x = gaussian(OUT, IN), gaussian(5, IN, seed=2)
    layer = bnb_linear4bit(W, None, "nf4", nested)
    D0 = dequantize(layer)
    ref = bf16_scale_reference(layer)
    y = eval_forward(layer, x)
    expect_repacked(layer)
    D1 = dequantize(layer)
    if is_cpu_packed(layer):
        assert torch.equal(D1, ref)
        assert (D1 - D0).abs().le(D0.abs() * 2**-8).all()  # bf16 scale rounding: <= 2**-9 relative
        assert rel(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state), D0) > 0.5  # the trap
    assert max_rel(y, x @ D1.T) < TOL_BF16


def test_restore_layout_repairs_bnb_inverse():
    """bitsandbytes' own inverse (run by state_dict()) leaves non-nested scales transposed: the layer computes
    garbage after it; dequantize still reads it right and restore_layout repairs it."""
    W, x = gaussian(OUT, IN), gaussian(5, IN, seed=2)
    layer = bnb_linear4bit(W, None, "nf4", nested=False)
    eval_forward(layer, x)
    if not is_cpu_packed(layer):
        pytest.skip("no CPU repacking on this machine")
    D1 = dequantize(layer)
    sd = layer.state_dict()  # bitsandbytes unpacks the layer in place here
    assert not is_cpu_packed(layer)
    assert tuple(sd["weight.absmax"].shape) == (IN // 64, OUT)  # transposed scales, also in the state dict
    assert torch.equal(dequantize(layer), D1)
    assert restore_layout(layer) and not restore_layout(layer)
    assert tuple(layer.weight.quant_state.absmax.shape) == (OUT * IN // 64,)
    assert torch.equal(dequantize(layer), D1)
    assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state), D1)
    layer.train()
    assert max_rel(layer(x), x @ D1.T) < TOL_FP32


# ------------------------------------------------------------------------------------------ 4-bit writing


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_write_quantized_into_repacked_layer(quant_type):
    W, W2 = gaussian(OUT, IN), gaussian(OUT, IN, seed=3)
    b, x = gaussian(OUT, seed=1), gaussian(5, IN, seed=2)
    layer = quantize_linear(W, b, quant_type)
    eval_forward(layer, x)
    expect_repacked(layer)

    write_quantized(layer, W2)
    assert not is_cpu_packed(layer) and scheme_of(layer) == quant_type
    D = dequantize(layer)
    assert torch.equal(D, dequantize(quantize_linear(W2, None, quant_type)))
    assert rel(D, W2) < ERR_BOUND[quant_type]
    assert torch.equal(layer.bias, b)
    y = eval_forward(layer, x)  # repacks the new weight
    expect_repacked(layer)
    assert torch.equal(dequantize(layer), D)
    assert max_rel(y, x @ D.T + b) < TOL_BF16
    layer.train()  # a repacked layer keeps its bf16 kernel in training mode too
    assert max_rel(layer(x), x @ D.T + b) < (TOL_BF16 if is_cpu_packed(layer) else TOL_FP32)


def test_write_quantized_keeps_nested_scales_and_blocksize():
    W, W2, x = gaussian(OUT, IN), gaussian(OUT, IN, seed=3), gaussian(5, IN, seed=2)
    layer = quantize_linear(W, None, "nf4", blocksize=128, compress_statistics=True)
    eval_forward(layer, x)
    write_quantized(layer, W2)
    qs = layer.weight.quant_state
    assert qs.nested and qs.blocksize == 128 and layer.weight.blocksize == 128
    D = dequantize(layer)
    assert torch.equal(D, dequantize(quantize_linear(W2, None, "nf4", blocksize=128, compress_statistics=True)))
    y = eval_forward(layer, x)
    assert max_rel(y, x @ dequantize(layer).T) < TOL_BF16


# ------------------------------------------------------------------------------------------ 8-bit


def test_linear8bitlt_dequantize_before_and_after_forward():
    W, b, x = gaussian(OUT, IN), gaussian(OUT, seed=1), gaussian(5, IN, seed=2)
    layer = bnb_linear8bit(W, b)
    assert layer.weight.dtype == torch.int8 and layer.weight.SCB is not None
    D0 = dequantize(layer)
    assert torch.equal(D0, F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB))
    assert torch.equal(D0, dequantize(quantize_linear(W, b, "int8")))
    assert rel(D0, W) < ERR_BOUND["int8"]

    y = eval_forward(layer, x)
    assert layer.weight.SCB is None and layer.state.SCB is not None  # the scales moved to the matmul state
    assert torch.equal(dequantize(layer), D0)
    assert max_rel(y, x @ D0.T + b) < TOL_INT8
    layer.train()
    assert max_rel(layer(x), x @ D0.T + b) < TOL_FP32


def test_linear8bitlt_write_quantized():
    W, W2 = gaussian(OUT, IN), gaussian(OUT, IN, seed=3)
    b, x = gaussian(OUT, seed=1), gaussian(5, IN, seed=2)
    layer = quantize_linear(W, b, "int8")
    eval_forward(layer, x)
    write_quantized(layer, W2)
    D = dequantize(layer)
    assert torch.equal(D, dequantize(quantize_linear(W2, None, "int8")))
    assert rel(D, W2) < ERR_BOUND["int8"]
    y = eval_forward(layer, x)
    assert torch.equal(layer.state.SCB, quantize_linear(W2, None, "int8").weight.SCB)
    assert torch.equal(dequantize(layer), D)
    assert max_rel(y, x @ D.T + b) < TOL_INT8
    layer.train()
    assert max_rel(layer(x), x @ D.T + b) < TOL_FP32


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantization_is_deterministic(scheme):
    W, b = gaussian(OUT, IN), gaussian(OUT, seed=1)
    a, c = quantize_linear(W, b, scheme), quantize_linear(W.clone(), b, scheme)
    assert torch.equal(a.weight.data, c.weight.data)
    if scheme == "int8":
        assert torch.equal(a.weight.SCB, c.weight.SCB)
    else:
        assert torch.equal(a.weight.quant_state.absmax, c.weight.quant_state.absmax)
    assert torch.equal(dequantize(a), dequantize(c))


# ------------------------------------------------------------------------------------------ PEFT on top


class _Net(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_peft_lora_on_quantize_linear(scheme):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import bnb as lora_bnb

    W, b, x = gaussian(OUT, IN), gaussian(OUT, seed=1), gaussian(5, IN, seed=2)
    base = quantize_linear(W, b, scheme)
    D = dequantize(base)
    net = _Net(base)
    # PEFT picks its bnb LoRA layers only on a model flagged as transformers' bnb quantizer flags it;
    # unflagged, it wraps the layer in a plain lora.Linear (forward works, merging would not)
    setattr(net, "is_loaded_in_4bit" if scheme == "nf4" else "is_loaded_in_8bit", True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                                init_lora_weights=False))
    lora = model.base_model.model.proj
    assert isinstance(lora, lora_bnb.Linear4bit if scheme == "nf4" else lora_bnb.Linear8bitLt)
    assert lora.get_base_layer() is base
    model.train()
    y = model(x)
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight  # (r, in), (out, r)
    ref = x @ D.T + b + 2.0 * (x @ A.T) @ B.T
    # TOL_FP32's argument: the same weights, another fp32 kernel
    assert max_rel(y, ref) < 1e-5
    y.square().mean().backward()
    assert A.grad is not None and A.grad.abs().sum() > 0
    assert B.grad is not None and B.grad.abs().sum() > 0
    assert not base.weight.requires_grad


# ------------------------------------------------------------------------------------------ transformers


def _tiny_llama_dir(path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return str(path)


def test_transformers_4bit_llama_forward_save_reload(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = _tiny_llama_dir(tmp_path / "fp")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qcfg, device_map="cpu")
    layers = {n: m for n, m in model.named_modules() if is_bnb_layer(m)}
    assert len(layers) == 2 * 7 and all(scheme_of(m) == "nf4" for m in layers.values())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert not q_proj.weight.quant_state.nested  # transformers' default: bnb_4bit_use_double_quant=False
    before = {n: dequantize(m) for n, m in layers.items()}
    ref = {n: bf16_scale_reference(m) for n, m in layers.items()}

    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    expect_repacked(q_proj)
    for n, m in layers.items():
        D = dequantize(m)
        # transformers stores fp32 scales: repacking rounds them to bf16, and dequantize reads exactly that
        assert torch.equal(D, ref[n] if is_cpu_packed(m) else before[n]), n
        assert (D - before[n]).abs().le(before[n].abs() * 2**-8).all(), n

    # a weight written by svdadapt (bf16 scales) reads back bit for bit across forwards
    W2 = gaussian(*q_proj.weight.quant_state.shape, seed=3) * 0.02
    write_quantized(q_proj, W2)
    D_q = dequantize(q_proj)
    with torch.no_grad():
        logits = model(ids).logits
    expect_repacked(q_proj)
    assert torch.equal(dequantize(q_proj), D_q)

    # save: restore_layout first, or bitsandbytes saves transposed scales (see test_restore_layout_...)
    after = {n: dequantize(m) for n, m in layers.items()}
    for n, m in layers.items():
        restore_layout(m)
        assert not is_cpu_packed(m) and torch.equal(dequantize(m), after[n]), n
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    qc = reloaded.config.quantization_config
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    re_layers = {n: m for n, m in reloaded.named_modules() if is_bnb_layer(m)}
    assert re_layers.keys() == layers.keys()
    for n, m in re_layers.items():
        assert torch.equal(dequantize(m), after[n]), n
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    # down_proj: in_features 128 > blocksize, the case bitsandbytes' own unpacking gets wrong
    # a "close to" check of a dequantized 4-bit weight: nf4 steps are ~1e-1 of a block's absmax; a reload moves none
    assert rel(dequantize(reloaded.model.layers[0].mlp.down_proj), before["model.layers.0.mlp.down_proj"]) < 1e-2


def test_transformers_checkpoint_saved_without_restore_layout(tmp_path):
    """bitsandbytes 0.50 saves a repacked non-nested layer with transposed scales; dequantize reads such a
    checkpoint correctly and restore_layout makes the reloaded layer compute correctly again."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = _tiny_llama_dir(tmp_path / "fp")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qcfg, device_map="cpu")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    down = model.model.layers[0].mlp.down_proj
    if not is_cpu_packed(down):
        pytest.skip("no CPU repacking on this machine")
    D = dequantize(down)
    model.save_pretrained(tmp_path / "q")  # no restore_layout
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    r = reloaded.model.layers[0].mlp.down_proj
    assert torch.equal(dequantize(r), D)
    x = gaussian(3, 128, seed=4)
    assert restore_layout(r)
    r.train()
    assert max_rel(r(x), x @ D.T) < TOL_FP32
