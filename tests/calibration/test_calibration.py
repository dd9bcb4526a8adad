"""Calibration: covariances equal XᵀX/N of the hooked inputs, padding excluded, shared inputs stored once,
bit-exact save/load, hooks always removed, clear errors; packed token batches."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import svdadapt
from svdadapt.calibration import as_covariances

from bounds import gemm_error
from helpers import make_tiny_llama, raises_exactly, same_init_factors, same_state, token_ids, toy

LAYER0 = "model.layers.0."
QKV = [LAYER0 + "self_attn." + p for p in ("q_proj", "k_proj", "v_proj")]


def _padded_batch() -> dict[str, torch.Tensor]:
    """Three sequences of lengths 12, 7 and 3, right-padded to 12."""
    ids = token_ids(3, 12, 0)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate((12, 7, 3)):
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _hooked_inputs(model: nn.Module, batches, names) -> dict[str, list[torch.Tensor]]:
    """An independent recording of every input of ``names`` (plain forward hooks, no masking)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, a, o, _n=n: seen[_n].append(a[0].detach().clone())) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in hs:
            h.remove()
    return seen


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_covariance_is_mean_xtx_of_unpadded_inputs(dtype):
    model = make_tiny_llama()
    batches = [_padded_batch(), {"input_ids": token_ids(2, 5, 1), "attention_mask": torch.ones(2, 5, dtype=torch.long)}]
    covs = svdadapt.collect_covariances(model, batches, dtype=dtype, progress=False)
    names = list(svdadapt.resolve_targets(model))
    assert list(covs) == names and len(covs) == 14
    seen = _hooked_inputs(model, batches, names)
    for n in names:
        rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen[n], batches)]).double()
        assert rows.shape[0] == 32 == covs.token_count(n)  # 12 + 7 + 3 unpadded tokens, then 2 x 5
        expected = rows.T @ rows / rows.shape[0]
        assert covs[n].dtype == dtype
        err = (covs[n].double() - expected).abs().max() / expected.abs().max()
        # a sum of 32 products in ``dtype`` (two batches added, then the division): γ_34·|X|ᵀ|X|/N (Higham 3.5)
        bound = gemm_error(rows.T, rows, dtype).div(rows.shape[0]).max() / expected.abs().max()
        assert err <= bound, (n, err)
    assert covs.tokens == 32


def test_padding_is_excluded_batched_equals_one_by_one():
    """A right-padded batch gives the covariance of its sequences run one at a time, unpadded."""
    model = make_tiny_llama()
    b = _padded_batch()
    batched = svdadapt.collect_covariances(model, [b], progress=False, dtype=torch.float64)
    singles = [b["input_ids"][i:i + 1, :n] for i, n in enumerate((12, 7, 3))]
    one_by_one = svdadapt.collect_covariances(model, singles, progress=False, dtype=torch.float64)
    assert batched.tokens == one_by_one.tokens == 22
    for n in batched:
        err = (batched[n] - one_by_one[n]).abs().max() / one_by_one[n].abs().max()
        assert err < 1e-6, (n, err)  # only the attention's float rounding differs: fp64 covariances, ~1e-7 measured
    # and padding really mattered: counting the padded positions changes the result
    unmasked = svdadapt.collect_covariances(model, [b["input_ids"]], progress=False, dtype=torch.float64)
    assert unmasked.tokens == 36
    # a "differs by more than" check: padding counted moves it by O(1), far above any rounding (1e-6)
    assert (unmasked[QKV[0]] - batched[QKV[0]]).abs().max() > 1e-3 * batched[QKV[0]].abs().max()


def test_shared_inputs_stored_once_and_summary():
    model = make_tiny_llama()
    covs = svdadapt.collect_covariances(model, [_padded_batch()], progress=False)
    assert covs[QKV[0]] is covs[QKV[1]] is covs[QKV[2]]
    assert covs[LAYER0 + "mlp.gate_proj"] is covs[LAYER0 + "mlp.up_proj"]
    assert covs[LAYER0 + "mlp.down_proj"] is not covs[LAYER0 + "mlp.up_proj"]
    assert covs.groups[0] == tuple(QKV)
    assert [len(g) for g in covs.groups] == [3, 1, 2, 1] * 2
    assert covs.shared_with(QKV[1]) == tuple(QKV)
    # per layer: 64² (qkv) + 64² (o) + 64² (gate/up) + 128² (down) floats, stored once
    assert covs.nbytes == 2 * 4 * (3 * 64 * 64 + 128 * 128)
    assert covs.summary() == "14 layers, 8 unique inputs (4 shared by several layers), 22 tokens, 224.0 KiB float32"


def test_progress_prints_one_line_summary(capsys):
    model = make_tiny_llama()
    svdadapt.collect_covariances(model, [_padded_batch()], progress=True)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["svdadapt calibration: 14 layers, 8 unique inputs (4 shared by several layers), 22 tokens, "
                   "224.0 KiB float32 from 1 batch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip_bit_exact(tmp_path, dtype):
    model = make_tiny_llama()
    covs = svdadapt.collect_covariances(model, [_padded_batch()], dtype=dtype, progress=False)
    path = tmp_path / "covs.safetensors"
    covs.save(path)
    back = svdadapt.Covariances.load(path)
    assert list(back) == list(covs) and back.groups == covs.groups
    for n in covs:
        assert back[n].dtype == dtype
        assert torch.equal(back[n].view(torch.uint8), covs[n].view(torch.uint8))  # the same bytes
        assert back.token_count(n) == covs.token_count(n)
    assert back[QKV[0]] is back[QKV[2]]  # sharing survives the round trip
    assert back.summary() == covs.summary()


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.eye(2)}, str(path))
    with pytest.raises(ValueError, match=r"is not a svdadapt covariance file \(format=None\)"):
        svdadapt.Covariances.load(path)


def test_tensor_batches_on_toy_sequential():
    model = toy(sizes=(6, 5, 3))
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    covs = svdadapt.collect_covariances(model, [x[:4], x[4:]], progress=False, dtype=torch.float64)
    assert list(covs) == ["0", "2"] and covs.groups == (("0",), ("2",)) and covs.tokens == 10
    # fp64 accumulation of fp32 inputs (γ_12 ≈ 1e-15); the reference x.T @ x is fp32 (γ_12 in fp32 ≈ 7e-7)
    torch.testing.assert_close(covs["0"], (x.T @ x).double() / 10, rtol=1e-6, atol=0)
    with torch.no_grad():
        h = model[:2](x).double()  # the input of "2": Linear "0", then the activation
    # h is the fp32 activation; 1e-5 > γ_12 (fp32) times |h|ᵀ|h|/|hᵀh| (≤ 3 here): a few fp32 layers of margin
    torch.testing.assert_close(covs["2"], h.T @ h / 10, rtol=1e-5, atol=0)


def test_eval_and_no_grad_and_training_flag_restored():
    model = make_tiny_llama(attention_dropout=0.5).train()  # dropout would make the inputs random in train mode
    model.model.layers[1].eval()  # a submodule the user froze in eval mode stays so
    a = svdadapt.collect_covariances(model, [_padded_batch()], progress=False)
    b = svdadapt.collect_covariances(model, [_padded_batch()], progress=False)
    assert model.training and model.model.layers[0].training and not model.model.layers[1].training
    assert _no_hooks(model)
    for n in a:
        assert torch.equal(a[n], b[n]) and not a[n].requires_grad


# ------------------------------------------------------------------------------------------------------------ errors
def test_no_tokens():
    model = make_tiny_llama()
    msg = "calibration saw no tokens (0 batches): pass non-empty batches whose attention_mask is not all zero"
    with raises_exactly(ValueError, msg):
        svdadapt.collect_covariances(model, [], progress=False)
    b = _padded_batch()
    b["attention_mask"] = torch.zeros_like(b["attention_mask"])
    with raises_exactly(ValueError, msg.replace("(0 batches)", "(1 batch)")):
        svdadapt.collect_covariances(model, [b], progress=False)
    assert _no_hooks(model)


def test_nan_activations_name_the_module_and_hooks_removed():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    x = torch.ones(3, 4)
    with raises_exactly(ValueError, "non-finite activations (NaN or inf) in the input of module '1' in batch 0"):
        svdadapt.collect_covariances(model, [x], progress=False)
    assert _no_hooks(model)


def _module(forward, **children: nn.Module) -> nn.Module:
    """A module whose ``forward(self, x)`` is ``forward``, with ``children`` as its submodules (in that order)."""
    model = type("Custom", (nn.Module,), {"forward": forward})()
    for name, child in children.items():
        model.add_module(name, child)
    return model


def test_hooks_removed_when_model_raises():
    def forward(self, x):
        self.a(x)
        raise RuntimeError("boom")

    model = _module(forward, a=nn.Linear(4, 4), b=nn.Linear(4, 4)).train()
    with pytest.raises(RuntimeError, match="^boom$"):
        svdadapt.collect_covariances(model, [torch.ones(2, 4)], progress=False)
    assert _no_hooks(model) and model.training


def test_module_never_run():
    half = _module(lambda self, x: self.used(x), used=nn.Linear(4, 4), unused=nn.Linear(4, 4))
    with raises_exactly(ValueError, "calibration saw no tokens for module 'unused' (1 of 2 targets): it did not take "
                                    "part in the forward pass or all its tokens were padding"):
        svdadapt.collect_covariances(half, [torch.ones(2, 4)], progress=False)


def test_sharing_must_be_consistent_across_batches():
    flaky = _module(lambda self, x: self.a(x) + self.b(x if x.shape[0] == 2 else x.clone()),
                    a=nn.Linear(4, 4), b=nn.Linear(4, 4))
    with raises_exactly(RuntimeError, "modules ['a'] read one input in batch 1, but ['a', 'b'] did in earlier "
                                      "batches: inputs must be shared always or never"):
        svdadapt.collect_covariances(flaky, [torch.ones(2, 4), torch.ones(3, 4)], progress=False)


def test_bad_batches_and_dtype():
    model = make_tiny_llama()
    with pytest.raises(TypeError, match=r"^batch 0 is a list; a batch is a dict \(run as model\(\*\*batch\)\) or a tensor"):
        svdadapt.collect_covariances(model, [[1, 2, 3]], progress=False)
    with pytest.raises(ValueError, match=r"^covariances accumulate in torch.float32 or torch.float64, got dtype=torch.float16$"):
        svdadapt.collect_covariances(model, [_padded_batch()], dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match=r"^batch 0: attention_mask must be \(batch, seq\), got shape \(3, 1, 12\)$"):
        b = _padded_batch()
        b["attention_mask"] = b["attention_mask"][:, None]
        svdadapt.collect_covariances(model, [b], progress=False)
    assert _no_hooks(model)


def test_covariances_constructor_validation():
    with pytest.raises(ValueError, match=r"^covariance for 'x' must be a square \(in, in\) tensor, got \(2, 3\)$"):
        svdadapt.Covariances({"x": torch.zeros(2, 3)})
    C = torch.eye(2)
    with pytest.raises(ValueError, match=r"^modules \['a', 'b'\] share one covariance but have different token counts \[1, 2\]$"):
        svdadapt.Covariances({"a": C, "b": C}, {"a": 1, "b": 2})
    covs = svdadapt.Covariances({"a": C, "b": C, "c": torch.eye(3)}, {"a": 5, "b": 5, "c": 7})
    assert covs.groups == (("a", "b"), ("c",)) and covs.tokens == 7 and covs.token_count("a") == 5
    with pytest.raises(KeyError):
        covs.token_count("zz")


# ----------------------------------------------------------------------------------------------------- as_covariances
def test_as_covariances_pass_through_collect_and_errors(tmp_path):
    model = make_tiny_llama()
    names = list(svdadapt.resolve_targets(model))
    covs = svdadapt.collect_covariances(model, [_padded_batch()], progress=False)
    assert as_covariances(covs, model, names, progress=False) is covs
    collected = as_covariances([_padded_batch()], model, names[:3], progress=False)
    assert list(collected) == names[:3] and torch.equal(collected[names[0]], covs[names[0]])
    covs.save(tmp_path / "c.safetensors")
    loaded = as_covariances(str(tmp_path / "c.safetensors"), model, names, progress=False)
    assert torch.equal(loaded[names[-1]], covs[names[-1]])

    partial = svdadapt.Covariances({n: covs[n] for n in names[:3]})
    with raises_exactly(ValueError, "calibration has no covariance for targeted module "
                                    "'model.layers.0.self_attn.o_proj' (11 of 14 targets missing)"):
        as_covariances(partial, model, names, progress=False)
    with pytest.raises(TypeError, match=r"^calibration looks like a single batch"):
        as_covariances(_padded_batch(), model, names, progress=False)
    with pytest.raises(TypeError, match=r"^calibration is a single tensor"):
        as_covariances(token_ids(1, 4, 0), model, names, progress=False)
    with raises_exactly(ValueError, "the model run for calibration (LlamaForCausalLM) has no adaptable layer named "
                                    "'model.layers.9.mlp.up_proj'"):
        as_covariances([_padded_batch()], model, ["model.layers.9.mlp.up_proj"], progress=False)


def test_wrap_collects_on_the_fly_like_precomputed():
    model = make_tiny_llama()
    batches = [_padded_batch()]
    covs = svdadapt.collect_covariances(model, batches, progress=False)
    a = svdadapt.wrap(copy.deepcopy(model), "corda", rank=4, calibration=covs, progress=False)
    b = svdadapt.wrap(copy.deepcopy(model), "corda", rank=4, calibration=batches, progress=False)
    assert same_init_factors(a, b)
    assert _no_hooks(b)


# ------------------------------------------------------------------------------------------------------ text batches
class CharTokenizer:
    """A stand-in tokenizer: one id per character (ord % 100 + 3), EOS = 2, no pad token."""

    eos_token_id = 2
    pad_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 100 + 3 for c in text]}


def test_text_batches_packing():
    tok = CharTokenizer()
    texts = ["abcdefg", "hij", "klmnopqrstu"]  # 7 + 1, 3 + 1, 11 + 1 = 24 tokens with EOS
    batches = svdadapt.text_batches(tok, texts, seq_len=5, batch_size=2)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 5), (2, 5), (1, 5)]
    flat = torch.cat([b["input_ids"] for b in batches]).flatten()
    mask = torch.cat([b["attention_mask"] for b in batches]).flatten()
    expected = []
    for t in texts:
        expected += tok(t)["input_ids"] + [2]
    assert flat[:24].tolist() == expected and mask.tolist() == [1] * 24 + [0]
    assert flat[24].item() == 2  # padded with EOS when there is no pad token
    assert all(b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long for b in batches)
    again = svdadapt.text_batches(tok, texts, seq_len=5, batch_size=2)
    assert len(again) == len(batches) and all(same_state(x, y) for x, y in zip(batches, again))
    capped = svdadapt.text_batches(tok, texts, seq_len=5, batch_size=2, max_batches=1)
    assert len(capped) == 1 and capped[0]["input_ids"].flatten().tolist() == expected[:10]
    assert svdadapt.text_batches(tok, "abc", seq_len=8)[0]["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]


def test_text_batches_errors():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"^seq_len must be a positive integer, got 0$"):
        svdadapt.text_batches(tok, ["a"], seq_len=0)
    with pytest.raises(ValueError, match=r"^batch_size must be a positive integer, got 2.0$"):
        svdadapt.text_batches(tok, ["a"], batch_size=2.0)
    with pytest.raises(ValueError, match=r"^text_batches: the texts gave no tokens$"):
        svdadapt.text_batches(type("NoEos", (CharTokenizer,), {"eos_token_id": None})(), [""])
    with pytest.raises(TypeError, match=r"^texts must be strings, got int$"):
        svdadapt.text_batches(tok, [1])
