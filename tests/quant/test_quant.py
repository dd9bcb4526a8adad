"""Quantized bases on bitsandbytes: QPiSSA (``wrap(..., quantize=..., quant_iters=...)``) and EoRA on a really quantized
model. Every number is recomputed here from the wrapped model (the dequantized base layer, the LoRA factors, the
scaling) in fp64, not read from svdadapt's report (which is checked against it).

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first eval forward (see svdadapt/modules/bnb.py);
the tests that must survive that run eval forwards on purpose.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from helpers import lora_layers, lora_product, make_tiny_llama, raises_exactly, token_ids  # noqa: E402
from quant_helpers import eora_optimum, fro, layer_inputs, originals  # noqa: E402

import svdadapt  # noqa: E402
from svdadapt.modules import bnb as sbnb
from svdadapt.modules.qbase import quantize_dequantize  # noqa: E402

RANK = 8  # tiny Llama: hidden 64, intermediate 128


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """conftest's one_thread for every test here (SVDADAPT_TEST_THREADS sets another count)."""


def bnb_fp32_scales_qlora(W: torch.Tensor, scheme: str) -> torch.Tensor:
    """deq(Q(W)) with bitsandbytes' own 4-bit quantizer and fp32 scales (what QLoRA loads with transformers)."""
    F = pytest.importorskip("bitsandbytes").functional
    data, qs = F.quantize_4bit(W.float().contiguous(), blocksize=64, quant_type=scheme)
    return F.dequantize_4bit(data, qs).double()


def quant_errors(peft_model, W0: dict[str, torch.Tensor], scheme: str) -> dict[str, dict[str, float]]:
    """Per layer: ‖W − (deq(base) + s·B·A)‖ (QPiSSA), ‖W − deq(Q(W))‖ (QLoRA) and ‖W‖, all fp64."""
    out = {}
    for n, layer in lora_layers(peft_model).items():
        base = layer.get_base_layer()
        assert sbnb.is_bnb_layer(base) and sbnb.scheme_of(base) == scheme, (n, type(base).__name__)
        W = W0[n]
        effective = sbnb.dequantize(base).double() + lora_product(layer)
        out[n] = {"qpissa": fro(W - effective), "qlora": fro(W - quantize_dequantize(W.float(), scheme).double()),
                  "norm": fro(W)}
    return out


def check_qpissa_beats_qlora(model, rank: int, scheme: str, tol: float = 1e-4) -> dict[str, dict[str, float]]:
    """Wrap copies of ``model`` with quant_iters 1 and 5; per layer, QPiSSA's error is below QLoRA's, the report
    agrees with the recomputed numbers, and 5 iterations are no worse than 1. Returns the errors.

    ``tol``: the report computes its norms in fp32; on SmolLM2's 576x1536 matrices that is measured 1.2e-5 (relative)
    from the fp64 number (the base and the factors themselves are the same bits)."""
    W0 = originals(model)
    errors = {}
    for iters in (1, 5):
        pm = svdadapt.wrap(copy.deepcopy(model), "pissa", rank, quantize=scheme, quant_iters=iters, progress=False)
        e = quant_errors(pm, W0, scheme)
        assert e.keys() == W0.keys()
        report = pm.svdadapt.report
        for n, v in e.items():
            assert v["qpissa"] < v["qlora"], (scheme, iters, n, v)
            # the report's relative errors (fp32) are the numbers recomputed here
            assert report[n]["quant_error"] == pytest.approx(v["qpissa"] / v["norm"], rel=tol), (iters, n)
            assert report[n]["qlora_error"] == pytest.approx(v["qlora"] / v["norm"], rel=tol), (iters, n)
            assert 1 <= report[n]["quant_iter"] <= iters
        errors[iters] = e
        del pm
    for n in W0:
        # the alternation keeps its best step and step 1 is the iters=1 result: never worse (fp64 recomputation
        # of an fp32 choice: a relative slack of 1e-6)
        assert errors[5][n]["qpissa"] <= errors[1][n]["qpissa"] * (1 + 1e-6), n  # fp32 norms: γ_n ≪ 1e-6
    return errors


# ------------------------------------------------------------------------------------------------ 1. QPiSSA error


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_qpissa_closer_to_w_than_qlora_tiny_llama(scheme):
    model = make_tiny_llama()
    errors = check_qpissa_beats_qlora(model, RANK, scheme)
    # against bitsandbytes' own quantizer with fp32 scales too (the QLoRA a user gets from transformers)
    for n, W in originals(model).items():
        assert errors[1][n]["qpissa"] < fro(W - bnb_fp32_scales_qlora(W, scheme)), n
    # measured on this model: QLoRA ~0.091 (nf4) / ~0.12 (fp4) of ‖W‖, QPiSSA rank 8 ~0.065-0.078 / ~0.09
    mean = {k: sum(e["qpissa"] / e["norm"] for e in errors[k].values()) / len(errors[k]) for k in errors}
    qlora = sum(e["qlora"] / e["norm"] for e in errors[1].values()) / len(errors[1])
    assert mean[5] <= mean[1] < 0.9 * qlora, (mean, qlora)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_qpissa_closer_to_w_than_qlora_smollm2(smollm2, scheme):
    model, _ = smollm2
    errors = check_qpissa_beats_qlora(model, 16, scheme)
    assert len(errors[1]) == 210


# ------------------------------------------------------------------------------------------------ 2. train, save, load


def packed_state(peft_model) -> dict[str, tuple[torch.Tensor, ...]]:
    """The stored 4-bit codes and scales of every base layer (clones)."""
    out = {}
    for n, layer in lora_layers(peft_model).items():
        w = layer.get_base_layer().weight
        out[n] = (w.data.clone(), w.quant_state.absmax.clone())
    return out


def dequantized_bases(peft_model) -> dict[str, torch.Tensor]:
    return {n: sbnb.dequantize(layer.get_base_layer()) for n, layer in lora_layers(peft_model).items()}


def lora_factors(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_model.named_parameters() if "lora_" in k}


@torch.no_grad()
def logits(peft_model, x, train_mode: bool = False) -> torch.Tensor:
    """Logits on ``x``. ``train_mode``: bitsandbytes' fp32 dequantize-then-matmul path; eval mode on an AVX512-BF16 CPU
    repacks the 4-bit weights and computes in bf16 (~3e-3 relative), so compare like with like."""
    peft_model.train(train_mode)
    return peft_model(x).logits


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_reloads_bit_identically(original, directory, x, bases, factors, eval_logits) -> None:
    """``svdadapt.load(original, directory)`` has these dequantized bases, LoRA factors and eval-mode logits."""
    reloaded = svdadapt.load(copy.deepcopy(original), directory, progress=False)
    assert same_tensors(dequantized_bases(reloaded), bases)
    assert same_tensors(lora_factors(reloaded), factors)
    assert torch.equal(logits(reloaded, x), eval_logits)  # eval mode (repacked on such a CPU) on both


def test_qpissa_trains_saves_and_reloads_bit_identically(tmp_path):
    original = make_tiny_llama()
    pm = svdadapt.wrap(copy.deepcopy(original), "pissa", RANK, quantize="nf4", progress=False)
    x = token_ids(4, 16, seed=1)
    codes0, deq0, params0 = packed_state(pm), dequantized_bases(pm), {k: v.detach().clone()
                                                                     for k, v in pm.named_parameters()}
    trainable = {k for k, v in pm.named_parameters() if v.requires_grad}
    assert trainable and all("lora_A" in k or "lora_B" in k for k in trainable)

    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)  # a learning rate
    losses = []
    for _ in range(8):
        loss = pm(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses  # measured 4.86 -> 4.25
    changed = {k for k, v in pm.named_parameters() if not torch.equal(v.detach(), params0[k])}
    assert changed == trainable  # every LoRA factor moved, nothing else
    codes = packed_state(pm)
    assert all(torch.equal(a, b) for n in codes0 for a, b in zip(codes[n], codes0[n]))
    assert same_tensors(dequantized_bases(pm), deq0)

    # saved before any eval forward (canonical layout)
    assert not any(sbnb.is_cpu_packed(m.get_base_layer()) for m in lora_layers(pm).values())
    train_logits = logits(pm, x, train_mode=True)
    svdadapt.save(pm, tmp_path / "fresh")
    reloaded = svdadapt.load(copy.deepcopy(original), tmp_path / "fresh", progress=False)
    assert torch.equal(logits(reloaded, x, train_mode=True), train_logits)
    want_codes, got_codes = packed_state(pm), packed_state(reloaded)
    assert want_codes.keys() == got_codes.keys()
    assert all(torch.equal(a, b) for n in want_codes for a, b in zip(want_codes[n], got_codes[n]))
    factors = lora_factors(pm)
    eval_logits = logits(pm, x)
    assert_reloads_bit_identically(original, tmp_path / "fresh", x, deq0, factors, eval_logits)

    # pm has now run eval forwards: on an AVX512-BF16 CPU its 4-bit weights are repacked
    states = [sbnb.is_cpu_packed(m.get_base_layer()) for m in lora_layers(pm).values()]
    assert all(states) or not any(states)
    assert same_tensors(dequantized_bases(pm), deq0)  # read correctly through the repacking
    svdadapt.save(pm, tmp_path / "repacked")
    # (pm itself is not compared after this save: see test_save_after_eval_forward_leaves_the_model_unchanged)
    assert_reloads_bit_identically(original, tmp_path / "repacked", x, deq0, factors, eval_logits)
    # the two checkpoints hold the same state
    a = svdadapt.load(copy.deepcopy(original), tmp_path / "fresh", progress=False)
    b = svdadapt.load(copy.deepcopy(original), tmp_path / "repacked", progress=False)
    assert same_tensors(lora_factors(a), lora_factors(b)) and same_tensors(dequantized_bases(a), dequantized_bases(b))


def _repacked_qpissa():
    pm = svdadapt.wrap(make_tiny_llama(), "pissa", RANK, quantize="nf4", progress=False)
    x = token_ids(2, 16, seed=3)
    before = logits(pm, x)
    if not sbnb.is_cpu_packed(pm.base_model.model.model.layers[0].mlp.down_proj.get_base_layer()):
        pytest.skip("bitsandbytes does not repack 4-bit weights on this CPU (no AVX512-BF16)")
    return pm, x, before


def test_save_after_eval_forward_leaves_the_model_unchanged(tmp_path):
    pm, x, before = _repacked_qpissa()
    svdadapt.save(pm, tmp_path / "a")
    assert torch.equal(logits(pm, x), before)


def test_unwrap_merge_requantizes_the_fine_tuned_weight():
    pm = svdadapt.wrap(make_tiny_llama(), "pissa", RANK, quantize="nf4", progress=False)
    want = {n: sbnb.dequantize(m.get_base_layer()).double() + lora_product(m) for n, m in lora_layers(pm).items()}
    merged = svdadapt.unwrap(pm, merge=True)
    for n, W in want.items():
        layer = merged.get_submodule(n)
        assert sbnb.is_bnb_layer(layer)
        # PEFT's merge re-quantizes deq(base) + s·B·A: one more nf4 rounding (~0.09 of ‖W‖)
        assert fro(sbnb.dequantize(layer).double() - W) / fro(W) < 0.12, n


def test_unwrap_merge_after_eval_forward():
    pm, x, _ = _repacked_qpissa()
    want = {n: sbnb.dequantize(m.get_base_layer()).double() + lora_product(m) for n, m in lora_layers(pm).items()}
    merged = svdadapt.unwrap(pm, merge=True)
    for n, W in want.items():
        assert fro(sbnb.dequantize(merged.get_submodule(n)).double() - W) / fro(W) < 0.12, n


def lora_grads(pm, x) -> dict[str, torch.Tensor]:
    """The LoRA factors' gradients of the next-token loss on ``x`` (train mode)."""
    pm.train()
    pm.zero_grad()
    pm(x, labels=x).loss.backward()
    grads = {k: p.grad.clone() for k, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    return grads


def test_training_after_eval_forward_has_the_same_gradients():
    """bitsandbytes 0.50 runs a CPU-repacked Linear4bit's training forward through gemv_4bit, which has no autograd
    kernel; svdadapt's pre-hook (bnb.guard_training) restores the layout whenever gradients are enabled."""
    pm, x, _ = _repacked_qpissa()
    fresh = svdadapt.wrap(make_tiny_llama(), "pissa", RANK, quantize="nf4", progress=False)
    want = lora_grads(fresh, x)
    got = lora_grads(pm, x)
    # the same weights through another fp32 kernel layout: gradients differ by the forwards' and backwards'
    # summation order, ~√n·u per layer (n ≤ 128), through 2 blocks and back
    assert all(fro(got[k] - want[k]) <= 1e-5 * fro(want[k]) for k in want)


def test_restore_layouts_before_training_gives_the_fp32_gradients():
    """The documented workaround for the test above."""
    pm, x, _ = _repacked_qpissa()
    assert sbnb.restore_layouts(pm) == len(lora_layers(pm))
    fresh = svdadapt.wrap(make_tiny_llama(), "pissa", RANK, quantize="nf4", progress=False)
    want, got = lora_grads(fresh, x), lora_grads(pm, x)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------ 3. EoRA on nf4


def check_eora(pm, reference, X_cal, X_held, rank: int) -> None:
    """Per layer: within 1e-3 of the fp64 optimum on the calibration inputs, strictly better than plain SVD of ΔW on
    the held-out inputs."""
    layers = lora_layers(pm)
    assert layers.keys() == X_cal.keys()
    for n, layer in layers.items():
        base = layer.get_base_layer()
        assert sbnb.is_bnb_layer(base) and sbnb.scheme_of(base) == "nf4", n
        dW = reference.get_submodule(n).weight.detach().double() - sbnb.dequantize(base).double()
        M = lora_product(layer)
        got, best = fro((dW - M) @ X_cal[n].T), fro((dW - eora_optimum(dW, X_cal[n], rank)) @ X_cal[n].T)
        # best ≤ got: an fp64 optimum, 1e-9 ≫ fp64 noise; got ≤ best·(1 + 1e-3): fp32 factors, second order
        assert best <= got * (1 + 1e-9) and got <= best * (1 + 1e-3), (n, got, best)
        U, s, Vh = torch.linalg.svd(dW, full_matrices=False)
        plain = (U[:, :rank] * s[:rank]) @ Vh[:rank]
        held, held_svd = fro((dW - M) @ X_held[n].T), fro((dW - plain) @ X_held[n].T)
        assert held < held_svd, (n, held, held_svd)


@pytest.fixture
def eora_setup(tmp_path):
    """The fp32 tiny Llama saved to tmp_path, a loader of its bnb nf4 version, 1024 calibration tokens (more than
    any layer's input width: no over-fitting) and 1024 held-out ones, their per-layer inputs on the fp32 model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "fp32")
    qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load_nf4():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=qconfig, device_map="cpu")

    cal, held = token_ids(16, 64, seed=1), token_ids(16, 64, seed=2)
    names = list(svdadapt.resolve_targets(model))
    covs = svdadapt.collect_covariances(model, [cal], progress=False)
    X_cal, X_held = layer_inputs(model, names, cal), layer_inputs(model, names, held)
    for n in names:  # the library's covariances are the XᵀX/N of these inputs
        C = X_cal[n].T @ X_cal[n] / X_cal[n].shape[0]
        # fp32 accumulation over the calibration tokens vs fp64: ≤ γ_N·‖|X|ᵀ|X|‖, ~√N·u typical (N ≤ 64)
        assert fro(covs[n].double() - C) < 1e-6 * fro(C) and covs.token_count(n) == X_cal[n].shape[0], n
    return model, load_nf4, covs, X_cal, X_held


def test_eora_on_bnb_nf4_model(eora_setup, tmp_path):
    from peft import PeftModel

    model, load_nf4, covs, X_cal, X_held = eora_setup
    qmodel = load_nf4()
    packed0 = {n: m.weight.data.clone() for n, m in qmodel.named_modules() if sbnb.is_bnb_layer(m)}
    pm = svdadapt.wrap(qmodel, "eora", RANK, reference=model, calibration=covs, progress=False)
    check_eora(pm, model, X_cal, X_held, RANK)
    for n, layer in lora_layers(pm).items():  # the packed layer stays the base, untouched
        assert torch.equal(layer.get_base_layer().weight.data, packed0[n]), n

    # save writes an ordinary LoRA for the quantized base: plain PEFT on a freshly loaded nf4 model reproduces it
    x = token_ids(2, 16, seed=3)
    want_train, want_eval = logits(pm, x, train_mode=True), logits(pm, x)
    svdadapt.save(pm, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(load_nf4(), tmp_path / "adapter")
    assert torch.equal(logits(plain, x, train_mode=True), want_train)
    assert torch.equal(logits(plain, x), want_eval)


def test_eora_quantize_nf4_from_fp32_model(eora_setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _, covs, X_cal, X_held = eora_setup
    pm = svdadapt.wrap(copy.deepcopy(model), "eora", RANK, quantize="nf4", calibration=covs, progress=False)
    check_eora(pm, model, X_cal, X_held, RANK)
    bases = dequantized_bases(pm)
    for n, W in originals(model).items():  # the base is nf4(W) itself
        assert torch.equal(bases[n], quantize_dequantize(W.float(), "nf4")), n

    # the adapter is an ordinary LoRA for that nf4 model; unwrap gives the nf4 model, which saves as an ordinary
    # transformers bitsandbytes checkpoint (compared in train mode, which never repacks)
    x = token_ids(2, 16, seed=3)
    want = logits(pm, x, train_mode=True)
    svdadapt.save(pm, tmp_path / "adapter")
    base = svdadapt.unwrap(pm)
    base.save_pretrained(tmp_path / "nf4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert same_tensors({n: sbnb.dequantize(reloaded.get_submodule(n)) for n in bases}, bases)
    plain = PeftModel.from_pretrained(reloaded, tmp_path / "adapter")
    assert torch.equal(logits(plain, x, train_mode=True), want)


# ------------------------------------------------------------------------------------------------ 4. errors


def test_errors_exact_messages():
    from transformers import BitsAndBytesConfig  # noqa: F401  (the transformers extra is installed with the tests)

    model = make_tiny_llama()
    with raises_exactly(ValueError, "quantize must be one of nf4, fp4, int8, hqq4, torchao-int4, torchao-int8 or None, got 'nf3'"):
        svdadapt.wrap(model, "pissa", RANK, quantize="nf3", progress=False)
    with raises_exactly(ValueError, "quant_iters must be an integer >= 1, got 0"):
        svdadapt.wrap(model, "pissa", RANK, quantize="nf4", quant_iters=0, progress=False)
    with raises_exactly(ValueError, "quant_iters must be an integer >= 1, got 2.0"):
        svdadapt.wrap(model, "pissa", RANK, quantize="nf4", quant_iters=2.0, progress=False)
    with raises_exactly(ValueError, "quant_iters=5 needs quantize= (a quantization scheme)"):
        svdadapt.wrap(model, "pissa", RANK, quant_iters=5, progress=False)
    assert all(type(m) is torch.nn.Linear for m in svdadapt.resolve_targets(model).values())  # untouched

    # an already packed model: built here by quantizing the tiny Llama's residual
    packed = svdadapt.unwrap(svdadapt.wrap(make_tiny_llama(), "pissa", RANK, quantize="nf4", progress=False),
                             merge=True)
    first = "model.layers.0.self_attn.q_proj"
    before = dequantized_bases_of(packed)
    with raises_exactly(ValueError, f"quantize='nf4' on a model that is already quantized (module {first!r} is a "
                                    "Linear4bit); load the full-precision model instead"):
        svdadapt.wrap(packed, "pissa", RANK, quantize="nf4", progress=False)
    with raises_exactly(ValueError, f"quantize='fp4' on a model that is already quantized (module {first!r} is a "
                                    "Linear4bit); load the full-precision model instead"):
        svdadapt.wrap(packed, "eora", RANK, quantize="fp4", calibration={}, progress=False)
    for method in ("pissa", "milora"):
        with raises_exactly(ValueError, f"{method} rewrites the base weights, but module {first!r} is a quantized "
                                        f"Linear4bit: run {method} on the full-precision model with quantize=... "
                                        "(e.g. 'nf4') instead"):
            svdadapt.wrap(packed, method, RANK, progress=False)
    with raises_exactly(ValueError, f"corda rewrites the base weights, but module {first!r} is a quantized "
                                    "Linear4bit: run corda on the full-precision model with quantize=... (e.g. 'nf4') "
                                    "instead"):
        svdadapt.wrap(packed, "corda", RANK, calibration=[token_ids(2, 8, seed=0)], progress=False)
    assert same_tensors(dequantized_bases_of(packed), before)

    pm = svdadapt.wrap(make_tiny_llama(), "pissa", RANK, quantize="nf4", progress=False)
    with raises_exactly(ValueError, "svdadapt.unwrap: the base holds the nf4-quantized residual, not W, so the "
                                    "original weights cannot be rebuilt from it; load the original model instead, or "
                                    "unwrap(merge=True) for the fine-tuned quantized model"):
        svdadapt.unwrap(pm)


def dequantized_bases_of(model) -> dict[str, torch.Tensor]:
    return {n: sbnb.dequantize(m) for n, m in model.named_modules() if sbnb.is_bnb_layer(m)}
