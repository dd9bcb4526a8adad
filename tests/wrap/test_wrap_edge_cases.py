"""No silent wrong result, no half-changed model: bad inputs, unusual numbers, more layer kinds and module trees,
PEFT features around the adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForSequenceClassification

import svdadapt
from svdadapt.engine import apply as apply_module
from helpers import make_tiny_llama, out, tiny_llama_config, toy, toy_input

RANK = 4


def snapshot(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor], list[bool]]:
    """Module tree (names and types), every tensor of the state dict, every trainable flag."""
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return tree, state, [p.requires_grad for p in model.parameters()]


def assert_same(model: nn.Module, before) -> None:
    tree, state, flags = snapshot(model)
    assert tree == before[0]
    assert state.keys() == before[1].keys()
    for k in state:
        assert state[k].numpy().tobytes() == before[1][k].numpy().tobytes(), k  # bitwise: NaN equals NaN
    assert flags == before[2]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)).eval()


IDS = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))


def method_kwargs(method: str, model: nn.Module, x) -> dict:
    if method == "corda":
        return {"calibration": [x]}
    if method == "eora":
        return {"calibration": [x], "reference": copy.deepcopy(model)}
    return {}


# ------------------------------------------------------------------------------------------ never half changed
@pytest.mark.parametrize("method", ["pissa", "milora", "corda", "eora"])
def test_nan_in_second_layer_leaves_model_untouched_and_retry_works(method: str) -> None:
    model = toy()
    x = toy_input()
    kw = method_kwargs(method, model, x)
    model[2].weight.data[3, 5] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^module '2' has a weight with NaN or inf \(1 of 1280 entries\)"):
        svdadapt.wrap(model, method, RANK, progress=False, **kw)
    assert_same(model, before)
    model[2].weight.data[3, 5] = 0.0
    svdadapt.wrap(model, method, RANK, progress=False, **kw)  # no "already a PEFT model"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # (snapshot reads tensors through numpy)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_entry_deep_in_a_large_weight_is_found(dtype, bad) -> None:
    """The finiteness test reads each weight in 1 MiB steps together with its checksum: an entry in a late step
    gets the same error, with the same count, before anything is computed."""
    model = toy(sizes=(700, 600, 8), dtype=dtype)  # module '0': 600 x 700, 0.8 to 1.6 MiB
    model[0].weight.data[-1, -2] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^module '0' has a weight with NaN or inf \(1 of 420000 entries\); "
                                         r"svdadapt cannot decompose it$"):
        svdadapt.wrap(model, "pissa", RANK, progress=False)
    assert_same(model, before)


def test_large_finite_weights_are_not_taken_for_non_finite() -> None:
    """Entries near the dtype's largest value make a step's sum overflow; the entries are checked one by one
    then, and the weight passes the check (the one wrap runs first), with its checksum."""
    model = toy(sizes=(700, 600, 8))
    model[0].weight.data[:] = torch.finfo(torch.float32).max / 4
    from svdadapt.engine.checks import check_target_weights
    from svdadapt.modules.layers import layer_checksum

    got = check_target_weights(model, {"0": model[0]}, RANK, rewrites_base=True)
    assert got == {"0": layer_checksum(model[0], "crc32")}


def test_failure_after_injection_restores_the_model(monkeypatch) -> None:
    model = make_tiny_llama()
    before = snapshot(model)
    x = torch.randint(0, 128, (2, 6))
    want = out(model, x)

    def boom(*a, **k):
        raise RuntimeError("refused")

    monkeypatch.setattr(apply_module, "_check_shapes", boom)
    with pytest.raises(RuntimeError, match="^refused$"):
        svdadapt.wrap(model, "pissa", RANK, progress=False)
    assert_same(model, before)
    assert not hasattr(model, "peft_config")
    assert torch.equal(out(model, x), want)
    monkeypatch.undo()
    svdadapt.wrap(model, "pissa", RANK, progress=False)


@pytest.mark.parametrize("kw,message", [
    ({"alpha": float("nan")}, "alpha must be a finite positive number or None, got nan"),
    ({"alpha": float("inf")}, "alpha must be a finite positive number or None, got inf"),
    ({"alpha": "8"}, "alpha must be a finite positive number or None, got '8'"),
    ({"alpha": True}, "alpha must be a finite positive number or None, got True"),
    ({"niter": 2.5}, "niter and oversample must be integers >= 0 (niter may be None), got niter=2.5, oversample=0"),
    ({"oversample": -1}, "niter and oversample must be integers >= 0 (niter may be None), got niter=None, oversample=-1"),
    ({"damping": float("nan")}, "damping must be a finite number >= 0, got nan"),
])
def test_options_checked_by_type_and_value(kw: dict, message: str) -> None:
    model = toy()
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        svdadapt.wrap(model, "pissa", RANK, progress=False, **kw)
    assert str(e.value) == message
    assert_same(model, before)


def test_rank_must_be_an_int() -> None:
    with pytest.raises(ValueError, match=r"^rank must be a positive integer, got '4'$"):
        svdadapt.wrap(toy(), "pissa", "4", progress=False)


def test_rank_error_names_the_tightest_limit() -> None:
    model = toy(sizes=(24, 40, 32, 16))  # short sides 24, 32, 16
    with pytest.raises(ValueError, match=r"^rank=30 exceeds min\(out, in\) = 16 of module '4' with weight \(16, 32\)$"):
        svdadapt.wrap(model, "pissa", 30, progress=False)


# ------------------------------------------------------------------------------------------ unusual numbers
@pytest.mark.parametrize("fn", [lambda m: svdadapt.compress.quantize(m, bits=4, group_size=8),
                                lambda m: svdadapt.compress.prune(m, "2:4")])
def test_compress_refuses_non_finite_weights(fn) -> None:
    model = toy()
    model[0].weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^module '0' has a weight with NaN or inf; cannot compress it$"):
        fn(model)


@pytest.mark.parametrize("method", ["pissa", "milora", "corda"])
def test_fp64_decomposed_and_rewritten_in_fp64(method: str) -> None:
    model = toy(dtype=torch.float64)
    x = toy_input(dtype=torch.float64)
    want = model(x)
    pm = svdadapt.wrap(model, method, RANK, progress=False, **method_kwargs(method, model, x))
    lora_A = pm.base_model.model[0].lora_A["default"].weight
    assert lora_A.dtype == torch.float64 and pm.svdadapt.init_factors["0"][0].dtype == torch.float64
    with torch.no_grad():
        got = pm(x)
    # fp64 end to end: u64 ≈ 1.1e-16 times a few layers' dot products (n ≤ 128): 1e-12 keeps 100x
    assert float((got - want.detach()).abs().max() / want.abs().max()) < 1e-12


def test_zero_weight_reports_a_defined_energy() -> None:
    model = toy()
    model[2].weight.data.zero_()
    pm = svdadapt.wrap(model, "pissa", RANK, progress=False)
    assert pm.svdadapt.report["2"]["energy"] == 1.0
    assert all(r["energy"] == r["energy"] for r in pm.svdadapt.report.values())  # no NaN


# ------------------------------------------------------------------------------------------ layer kinds
@pytest.mark.parametrize("method", ["pissa", "milora", "corda", "eora"])
def test_conv1d_every_method_exact_round_trips(method: str, tmp_path) -> None:
    original = tiny_gpt2()
    model = svdadapt.compress.quantize(original, bits=3, group_size=16) if method == "eora" else copy.deepcopy(original)
    want = out(model, IDS)
    kw = method_kwargs(method, original, IDS)
    pm = svdadapt.wrap(model, method, RANK, progress=False, **kw)
    assert len(pm.svdadapt.targets) == 8  # c_attn, attn c_proj, c_fc, mlp c_proj per block; not the tied head
    if method != "eora":
        # two fp32 forwards of the same effective weights (√n·u per layer, n ≤ 128; outputs O(1))
        assert float((out(pm, IDS) - want).abs().max()) < 1e-5
    else:
        ref = out(original, IDS)
        assert float((out(pm, IDS) - ref).norm()) < float((want - ref).norm())
    svdadapt.save(pm, tmp_path / "s")
    compressed = svdadapt.compress.quantize(original, bits=3, group_size=16)  # deterministic: the same W_c again
    fresh = compressed if method == "eora" else copy.deepcopy(original)
    plain = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "s")
    # as above
    assert float((out(plain, IDS) - out(pm, IDS)).abs().max()) < 1e-5
    reloaded = svdadapt.load(fresh, tmp_path / "s", progress=False)
    assert torch.equal(out(reloaded, IDS), out(pm, IDS))
    base = svdadapt.unwrap(reloaded)
    src = svdadapt.compress.quantize(original, bits=3, group_size=16) if method == "eora" else original
    for k, v in src.state_dict().items():
        # fp32 weights O(1e-1) restored through one fp32 add and subtract of s·B·A: ≤ γ_{r+2}·(|W| + s|B||A|) ≪ 1e-6
        assert torch.allclose(base.state_dict()[k], v, atol=1e-6), k


def test_all_linear_takes_conv1d_like_peft() -> None:
    from peft import LoraConfig, get_peft_model

    ours = svdadapt.resolve_targets(tiny_gpt2())
    theirs = get_peft_model(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    peft_names = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")]
    assert list(ours) == peft_names


def test_compress_and_calibration_on_conv1d() -> None:
    model = tiny_gpt2()
    q = svdadapt.compress.quantize(model, bits=4, group_size=16)
    w, wq = model.transformer.h[0].attn.c_attn.weight, q.transformer.h[0].attn.c_attn.weight
    assert wq.shape == w.shape and not torch.equal(w, wq)
    # groups run along the input dimension, which is dim 0 of a Conv1D weight (in, out)
    expect = svdadapt.quant.compress.quantize_weight(w.mT, 4, 16).mT
    assert torch.equal(wq, expect)
    covs = svdadapt.collect_covariances(model, [IDS], progress=False)
    assert covs["transformer.h.0.attn.c_attn"].shape == (64, 64)
    assert covs["transformer.h.0.mlp.c_proj"].shape == (256, 256)


# ------------------------------------------------------------------------------------------ module trees
def nested() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10)), nn.Linear(10, 6)).eval()


def test_nested_containers_and_full_names_honoured() -> None:
    model = nested()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    want = model(x)
    pm = svdadapt.wrap(model, "pissa", 2, target_modules=["0.0", "1"], progress=False)
    assert pm.svdadapt.targets == ["0.0", "1"]
    lora = [n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert lora == ["0.0", "1"]
    # as above: two fp32 forwards
    assert float((pm(x) - want).abs().max()) < 1e-5


def test_exclude_modules() -> None:
    names = list(svdadapt.resolve_targets(make_tiny_llama(), "all-linear", exclude_modules=["down_proj", "o_proj"]))
    assert len(names) == 10 and not any(n.endswith(("down_proj", "o_proj")) for n in names)


def test_shared_weights_refused_with_both_names() -> None:
    model = make_tiny_llama(tie_word_embeddings=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^module 'lm_head' shares its weight with 'model\.embed_tokens' "):
        svdadapt.wrap(model, "pissa", RANK, target_modules=["lm_head"], progress=False)
    assert_same(model, before)
    model = toy(sizes=(16, 16, 16))
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match=r"^module '0' shares its weight with '2' "):
        svdadapt.wrap(model, "pissa", RANK, progress=False)


# ------------------------------------------------------------------------------------------ PEFT features
def test_modules_to_save_kept_by_save_export_and_load(tmp_path) -> None:
    def classifier():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).eval()

    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    pm = svdadapt.wrap(classifier(), "pissa", RANK, task_type="SEQ_CLS", progress=False)
    head = pm.base_model.model.score.modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)))  # "trained" head
    want = pm(input_ids=ids).logits
    svdadapt.save(pm, tmp_path / "s")
    svdadapt.export_lora(pm, tmp_path / "e")
    for d in ("s", "e"):
        plain = PeftModel.from_pretrained(classifier(), tmp_path / d)
        # as above: two fp32 forwards
        assert float((plain(input_ids=ids).logits - want).abs().max()) < 1e-5, d
    re = svdadapt.load(classifier(), tmp_path / "s", progress=False)
    assert torch.equal(re(input_ids=ids).logits, want)


def test_merged_adapter(tmp_path) -> None:
    original = make_tiny_llama()
    pm = svdadapt.wrap(copy.deepcopy(original), "pissa", RANK, progress=False)
    pm.merge_adapter()
    with pytest.raises(ValueError, match=r"^svdadapt\.save: the adapter is merged into the base .*unmerge_adapter"):
        svdadapt.save(pm, tmp_path / "s")
    base = svdadapt.unwrap(pm)
    for k, v in original.state_dict().items():
        # as above: one fp32 add and subtract of s·B·A
        assert torch.allclose(base.state_dict()[k], v, atol=1e-6), k


@pytest.mark.parametrize("value", [True, 1.0, 0])
def test_quant_iters_checked_without_quantize(value) -> None:
    with pytest.raises(ValueError, match=rf"^quant_iters must be an integer >= 1, got {value!r}$"):
        svdadapt.wrap(toy(), "pissa", RANK, quant_iters=value, progress=False)

