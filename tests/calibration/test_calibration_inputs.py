"""Calibration's inputs: masks per stack in encoder–decoder models, inputs changed in place are new inputs,
``Covariances.load`` names the bad file, GPT-2's Conv1D layers. Each covariance is checked against a brute-force
reference: the inputs recorded by plain hooks of the test's own, masked by hand."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import svdadapt
from svdadapt.modules.targets import resolve_targets

from helpers import raises_exactly, rel, token_ids

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: many small BLAS calls


# ------------------------------------------------------------------------------------------------------ helpers
def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return _seeded(lambda: T5ForConditionalGeneration(cfg))


def tiny_bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return _seeded(lambda: BartForConditionalGeneration(cfg))


def tiny_whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                        max_source_positions=8, max_target_positions=16, decoder_start_token_id=1, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    return _seeded(lambda: WhisperForConditionalGeneration(cfg))


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return _seeded(lambda: GPT2LMHeadModel(cfg))


def _mask(lengths: tuple[int, ...], seq: int) -> torch.Tensor:
    """(len(lengths), seq) right-padding mask."""
    m = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        m[row, :n] = 1
    return m


def _recorded(model: nn.Module, batches, names) -> dict[str, list[torch.Tensor]]:
    """Every input of ``names``, one clone per call, recorded by plain pre-hooks (clone at call time: an in-place op
    later in the forward must not change the record)."""
    mods = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def rec(name):
        return lambda m, args, kwargs: seen[name].append(
            (args[0] if args else next(iter(kwargs.values()))).detach().clone())

    hs = [mods[n].register_forward_pre_hook(rec(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, Mapping) else model(b)
    finally:
        for h in hs:
            h.remove()
    return seen


def _reference(inputs: list[torch.Tensor], masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, int]:
    """fp64 XᵀX / N over the rows that ``masks`` (one per call, None = all rows) keep."""
    rows = [(x[m.bool()] if m is not None else x.reshape(-1, x.shape[-1])).double() for x, m in zip(inputs, masks)]
    X = torch.cat(rows)
    return X.T @ X / X.shape[0], X.shape[0]


def _encdec_batches(dec_len: int, dec_mask: bool = True, enc_len: int = 8) -> list[dict[str, torch.Tensor]]:
    """Two batches whose encoder and decoder masks differ (padding at different places and amounts)."""
    out = []
    for seed, (enc_lens, dec_lens) in enumerate((((8, 5, 2), (3, 8, 6)), ((4, 8, 7), (8, 2, 5)))):
        b = {"input_ids": token_ids(3, enc_len, 10 + seed, VOCAB), "attention_mask": _mask(enc_lens, enc_len),
             "decoder_input_ids": token_ids(3, dec_len, 20 + seed, VOCAB)}
        if dec_mask:
            b["decoder_attention_mask"] = _mask(tuple(min(n, dec_len) for n in dec_lens), dec_len)
        out.append(b)
    return out


def _reads_encoder_states(name: str) -> bool:
    """Cross-attention key/value projections: the Linears of a decoder that read the encoder's output."""
    return re.search(r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj)$", name) is not None


def _encdec_reference(model, batches, names, rule: str) -> dict[str, tuple[torch.Tensor, int]]:
    """Brute force. rule "stack": encoder Linears and cross-attention k/v take attention_mask, the other decoder
    Linears (and the head) decoder_attention_mask, or every token without one. rule "old": attention_mask on every
    input whose (batch, seq) matches it (what svdadapt did before)."""
    rec = _recorded(model, batches, names)
    ref = {}
    for n in names:
        masks = []
        for x, b in zip(rec[n], batches):
            enc, dec = b.get("attention_mask"), b.get("decoder_attention_mask")
            if rule == "old":
                masks.append(enc if enc is not None and tuple(x.shape[:2]) == tuple(enc.shape) else None)
            elif n.startswith(("encoder.", "model.encoder.")) or _reads_encoder_states(n):
                masks.append(enc)
            else:
                masks.append(dec)
        ref[n] = _reference(rec[n], masks)
    return ref


def _assert_matches(covs, ref, rtol: float = 1e-12) -> None:  # fp64 sums of ≤ 100 products: γ_100 ≈ 1e-14
    for n, (C, N) in ref.items():
        assert covs.token_count(n) == N, n
        assert rel(covs[n], C) < rtol, (n, rel(covs[n], C))


# ------------------------------------------------------------------------------------------------------ 1. masks per stack
@pytest.mark.parametrize("build", [tiny_t5, tiny_bart], ids=["t5", "bart"])
@pytest.mark.parametrize("dec_len", [8, 5], ids=["equal-lengths", "different-lengths"])
def test_encoder_decoder_masks_belong_to_their_stack(build, dec_len):
    model = build()
    batches = _encdec_batches(dec_len)
    names = list(resolve_targets(model, "all-linear")) + ["lm_head"]
    covs = svdadapt.collect_covariances(model, batches, target_modules=names, dtype=torch.float64, progress=False)
    ref = _encdec_reference(model, batches, names, "stack")
    _assert_matches(covs, ref)
    cross = [n for n in names if _reads_encoder_states(n)]
    decoder_own = [n for n in names if "decoder." in n and n not in cross] + ["lm_head"]
    assert len(cross) == 4 and len(decoder_own) >= 12
    # cross-attention k/v: encoder tokens; the decoder's own Linears: decoder tokens (3+8+6 + 8+2+5 at dec_len 8)
    dec_tokens = int(sum(b["decoder_attention_mask"].sum() for b in batches))
    enc_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    assert {covs.token_count(n) for n in cross} == {enc_tokens} and enc_tokens == 34
    assert {covs.token_count(n) for n in decoder_own} == {dec_tokens}
    if dec_len == 8:  # the old rule put the encoder's mask on every decoder input: visibly different
        old = _encdec_reference(model, batches, names, "old")
        for n in decoder_own:
            assert old[n][1] == enc_tokens != dec_tokens
            assert rel(covs[n], old[n][0]) > 1e-2, n  # "moved by more than": O(1) vs rounding ~1e-15


@pytest.mark.parametrize("build", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_decoder_without_its_mask_counts_every_decoder_token(build):
    model = build()
    batches = _encdec_batches(8, dec_mask=False)
    names = list(resolve_targets(model, "all-linear"))
    covs = svdadapt.collect_covariances(model, batches, target_modules=names, dtype=torch.float64, progress=False)
    _assert_matches(covs, _encdec_reference(model, batches, names, "stack"))
    q = next(n for n in names if re.search(r"decoder\.(block|layers)\.0\..*(SelfAttention\.q|self_attn\.q_proj)$", n))
    assert covs.token_count(q) == 2 * 3 * 8  # every decoder token, though attention_mask has padding
    k = next(n for n in names if _reads_encoder_states(n))
    assert covs.token_count(k) == 34  # cross-attention k/v still drop the encoder's padding


def test_whisper_decoder_mask_and_every_audio_frame():
    """Whisper: no encoder mask (the encoder sees every frame, so do the cross-attention k/v), the decoder's own
    Linears and ``proj_out`` drop the decoder's padding. Decoder length 8 = encoder length 8 (16 frames, stride 2)."""
    model = tiny_whisper()
    g = torch.Generator().manual_seed(4)
    batches = [{"input_features": torch.randn(3, 8, 16, generator=g), "decoder_input_ids": token_ids(3, 8, 7, VOCAB),
                "decoder_attention_mask": _mask((8, 3, 5), 8)}]
    names = list(resolve_targets(model, "all-linear")) + ["proj_out"]
    covs = svdadapt.collect_covariances(model, batches, target_modules=names, dtype=torch.float64, progress=False)
    _assert_matches(covs, _encdec_reference(model, batches, names, "stack"))
    assert covs.token_count("model.decoder.layers.1.encoder_attn.k_proj") == 24
    assert covs.token_count("model.decoder.layers.1.fc1") == covs.token_count("proj_out") == 16


def test_transformed_encoder_states_in_the_decoder_take_the_encoder_mask():
    """Cross-attention that reads a *copy* of the encoder states (not the tensor the decoder was given): laid out
    like the encoder mask and not like the decoder sequence, it still takes the encoder mask."""
    model = tiny_bart()
    hs = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "key_value_states": kw["key_value_states"] * 1.0}),
                                      with_kwargs=True)
          for n, m in model.named_modules() if n.endswith("encoder_attn")]
    try:
        batches = _encdec_batches(5)
        names = list(resolve_targets(model, "all-linear"))
        covs = svdadapt.collect_covariances(model, batches, target_modules=names, dtype=torch.float64, progress=False)
        _assert_matches(covs, _encdec_reference(model, batches, names, "stack"))
    finally:
        for h in hs:
            h.remove()


def test_fp32_collection_matches_brute_force_to_rounding():
    model = tiny_t5()
    batches = _encdec_batches(8)
    names = list(resolve_targets(model, "all-linear"))
    covs = svdadapt.collect_covariances(model, batches, target_modules=names, progress=False)
    # the reference runs its own fp32 forward (another batch order): fp32 activations differ by ~√n·u per layer
    _assert_matches(covs, _encdec_reference(model, batches, names, "stack"), rtol=1e-5)


def test_decoder_attention_mask_must_be_two_dimensional():
    batch = _encdec_batches(8)[0]
    batch["decoder_attention_mask"] = batch["decoder_attention_mask"][:, :, None]
    with raises_exactly(ValueError, "batch 0: decoder_attention_mask must be (batch, seq), got shape (3, 8, 1)"):
        svdadapt.collect_covariances(tiny_t5(), [batch], progress=False)


# ------------------------------------------------------------------------------------------------------ 2. in-place changes
class InPlace(nn.Module):
    """q/k/v read one norm output (a genuine shared input); ``before`` and ``after`` read the same tensor object
    before and after ``relu_``; ``scaled`` reads ``x`` after ``x.mul_(2)`` that ``first`` read before."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.before, self.after = nn.Linear(d, d), nn.Linear(d, d)
        self.first, self.scaled = nn.Linear(d, 4), nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        y = self.q(h) + self.k(h) + self.v(h)
        a = self.before(y)
        y.relu_()
        z = (a + self.after(y)).clone()
        out = self.first(z)
        z.mul_(2)
        return out + self.scaled(z)


def _inplace_model() -> InPlace:
    return _seeded(InPlace)


def _inplace_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 5, 8, generator=g), torch.randn(3, 8, generator=g)]


def test_inputs_changed_in_place_are_new_inputs():
    model, batches = _inplace_model(), _inplace_batches()
    names = ["q", "k", "v", "before", "after", "first", "scaled"]
    covs = svdadapt.collect_covariances(model, batches, target_modules=names, dtype=torch.float64, progress=False)
    rec = _recorded(model, batches, names)
    for n in names:
        C, N = _reference(rec[n], [None] * len(rec[n]))
        assert covs.token_count(n) == N == 13
        assert rel(covs[n], C) < 1e-12, n  # fp64 on both sides: γ_N ≈ 1e-14 for the N ≤ 100 tokens
    # the old grouping (object identity) would have given `after` the covariance of `before`, `scaled` that of `first`
    assert rel(covs["after"], covs["before"]) > 0.1 and covs["after"] is not covs["before"]
    # ×2 inputs: exact in binary, then fp64 sums (γ_N ≈ 1e-14)
    assert torch.allclose(covs["scaled"], 4 * covs["first"], rtol=1e-12, atol=0)
    assert covs["q"] is covs["k"] is covs["v"]
    assert covs.groups == (("q", "k", "v"), ("before",), ("after",), ("first",), ("scaled",))


def test_inference_mode_tensors_are_never_shared():
    """Inference tensors have no version counter: an in-place change cannot be seen, so no input is shared."""
    model, batches = _inplace_model(), _inplace_batches()
    with torch.inference_mode():
        covs = svdadapt.collect_covariances(model, batches, target_modules=["q", "k", "after", "before"],
                                            dtype=torch.float64, progress=False)
    assert covs.groups == (("q",), ("k",), ("before",), ("after",))
    assert torch.equal(covs["q"], covs["k"]) and rel(covs["after"], covs["before"]) > 0.1


# ------------------------------------------------------------------------------------------------------ 3. Covariances.load
@pytest.fixture
def saved(tmp_path) -> str:
    covs = svdadapt.collect_covariances(_inplace_model(), _inplace_batches(), target_modules=["q", "k", "after"],
                                        progress=False)
    path = os.fspath(tmp_path / "covs.safetensors")
    covs.save(path)
    return path


def _with_meta(tmp_path, **meta: str | None) -> str:
    """A covariance-format file whose tensors are a (8, 8) 'q' and a (8, 4) 'bad', with ``meta`` over valid
    metadata for the group ['q', 'k'] (None: leave the entry out)."""
    full = {"format": "svdadapt.covariances/1", "groups": '[["q", "k"]]', "counts": "[13]", "order": '["k", "q"]'}
    full = {k: v for k, v in {**full, **meta}.items() if v is not None}
    path = os.fspath(tmp_path / "meta.safetensors")
    save_file({"q": torch.eye(8), "bad": torch.ones(8, 4)}, path, metadata=full)
    return path


def test_load_missing_file(tmp_path):
    path = os.fspath(tmp_path / "nope.safetensors")
    with raises_exactly(FileNotFoundError, f"no such covariance file: {path!r}"):
        svdadapt.Covariances.load(path)


def test_load_directory(tmp_path):
    with raises_exactly(ValueError, f"{os.fspath(tmp_path)!r} is not a file (expected a covariance file written by "
                                    "Covariances.save)"):
        svdadapt.Covariances.load(tmp_path)


def test_load_truncated_file_names_it_without_a_safetensors_traceback(saved):
    data = open(saved, "rb").read()
    open(saved, "wb").write(data[: len(data) // 2])
    with raises_exactly(ValueError, f"{saved!r} is not a readable safetensors file (truncated or corrupt): Error while "
                                    "deserializing header: incomplete metadata, file not fully covered") as info:
        svdadapt.Covariances.load(saved)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_load_text_file(tmp_path):
    path = os.fspath(tmp_path / "notes.txt")
    open(path, "w").write("hello")
    with raises_exactly(ValueError, f"{path!r} is not a readable safetensors file (truncated or corrupt): Error while "
                                    "deserializing header: header too small"):
        svdadapt.Covariances.load(path)


def test_load_foreign_safetensors(tmp_path):
    path = _with_meta(tmp_path, format="something/1")
    with raises_exactly(ValueError, f"{path!r} is not a svdadapt covariance file (format='something/1')"):
        svdadapt.Covariances.load(path)


@pytest.mark.parametrize("meta,problem", [
    ({"groups": '[["q", "k"'}, """'groups' is not valid JSON: '[["q", "k"'"""),
    ({"counts": "13,"}, "'counts' is not valid JSON: '13,'"),
    ({"order": "q k"}, "'order' is not valid JSON: 'q k'"),
    ({"groups": '{"q": 1}'}, "'groups' must be a list of non-empty lists of module names"),
    ({"groups": '[[]]'}, "'groups' must be a list of non-empty lists of module names"),
    ({"counts": '[-1]'}, "'counts' must be a list of non-negative integers"),
    ({"counts": '[1.5]'}, "'counts' must be a list of non-negative integers"),
    ({"counts": '[13, 2]'}, "1 groups but 2 token counts"),
    ({"groups": '[["q", "k"], ["k"]]', "counts": "[1, 2]"}, "a module name appears in more than one group"),
    ({"groups": '[["x", "k"]]', "order": '["x", "k"]'}, "no tensor for group 'x'"),
    ({"order": '["q"]'}, "'order' must list every module name of 'groups' exactly once"),
    ({"order": '["q", "q"]'}, "'order' must list every module name of 'groups' exactly once"),
])
def test_load_inconsistent_metadata(tmp_path, meta, problem):
    path = _with_meta(tmp_path, **meta)
    with raises_exactly(ValueError, f"{path!r} has inconsistent covariance metadata: {problem}"):
        svdadapt.Covariances.load(path)


def test_load_missing_metadata_entry_and_bad_tensor(tmp_path):
    path = _with_meta(tmp_path, groups=None)
    with raises_exactly(ValueError, f"{path!r} has inconsistent covariance metadata: no 'groups' entry"):
        svdadapt.Covariances.load(path)
    path = _with_meta(tmp_path, groups='[["bad"]]', order='["bad"]')
    with raises_exactly(ValueError, f"{path!r} holds an invalid covariance: covariance for 'bad' must be a square "
                                    "(in, in) tensor, got (8, 4)"):
        svdadapt.Covariances.load(path)


def test_load_good_files_still_load(saved, tmp_path):
    back = svdadapt.Covariances.load(saved)
    assert back.groups == (("q", "k"), ("after",)) and back["q"] is back["k"]
    ordered = svdadapt.Covariances.load(_with_meta(tmp_path))
    assert list(ordered) == ["k", "q"] and ordered.groups == (("k", "q"),) and ordered.token_count("q") == 13
    # a file without 'order' (written before it existed) keeps the group order
    assert list(svdadapt.Covariances.load(_with_meta(tmp_path, order=None))) == ["q", "k"]


# ------------------------------------------------------------------------------------------------------ 4. Conv1D (GPT-2)
def test_gpt2_conv1d_layers_match_brute_force():
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    batches = [{"input_ids": token_ids(3, 10, 5, VOCAB), "attention_mask": _mask((10, 6, 3), 10)},
               {"input_ids": token_ids(2, 7, 6, VOCAB), "attention_mask": _mask((7, 4), 7)}]
    covs = svdadapt.collect_covariances(model, batches, "all-linear", dtype=torch.float64, progress=False)
    mods = dict(model.named_modules())
    assert list(covs) == [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj",
                                                                                 "mlp.c_fc", "mlp.c_proj")]
    rec = _recorded(model, batches, list(covs))
    for n in covs:
        assert isinstance(mods[n], Conv1D)
        d_in = mods[n].weight.shape[0]  # Conv1D stores (in, out)
        assert covs[n].shape == (d_in, d_in)
        C, N = _reference(rec[n], [b["attention_mask"] for b in batches])
        assert covs.token_count(n) == N == 30 and rel(covs[n], C) < 1e-12, n  # fp64, 30 tokens: γ_30 ≈ 3e-15
    assert covs["transformer.h.0.mlp.c_proj"].shape == (128, 128)
