"""core/patterns.py: PEFT's rank_pattern / alpha_pattern matching, reproduced, compared with PEFT's own
``get_pattern_key`` and ``LoraModel`` on many names, and the pattern checks' exact messages."""

from __future__ import annotations

import itertools

import pytest
from peft.utils.other import get_pattern_key

from svdadapt.core.patterns import ambiguous_keys, check_pattern, layer_value, pattern_key, unmatched_keys

from helpers import raises_exactly

NAMES = [f"model.layers.{i}.{part}" for i in (0, 1, 2, 10, 11, 21)
         for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + [
    "lm_head", "q_proj", "transformer.h.0.attn.c_attn", "transformer.h.3.mlp.c_fc", "encoder.block.1.q",
    "xq_proj", "model.layers.1.self_attn.q_proj_extra", "0", "1.2"]
KEYS = ["q_proj", "proj", "self_attn.q_proj", r"layers\.1\.self_attn\.q_proj", r"layers\.1\..*", r"layers\.(0|2)\.mlp\.\w+",
        "model.layers.10.mlp.down_proj", r".*_proj", "attn.c_attn", "q", r"h\.\d+\.mlp\.c_fc", "lm_head", "2",
        r"^model\.layers\.0\.self_attn\.v_proj", r"layers\.1\d\.mlp\..*", "down_proj", r"(q|k)_proj", "nothing"]


def test_pattern_key_is_peft_get_pattern_key_on_every_name_and_key_order() -> None:
    """Every name against every ordered choice of up to 3 keys: the same key as PEFT's (which returns the name
    itself where no key matches: None here)."""
    compared = 0
    for n_keys in (1, 2, 3):
        for keys in itertools.permutations(KEYS, n_keys):
            for name in NAMES:
                theirs = get_pattern_key(keys, name)
                ours = pattern_key(keys, name)
                assert ours == (theirs if theirs in keys else None), (keys, name)
                compared += 1
    assert compared == len(NAMES) * (18 + 18 * 17 + 18 * 17 * 16)


def test_layer_value_is_lora_model_lookup() -> None:
    """``LoraModel._create_and_replace``'s ``pattern.get(get_pattern_key(pattern.keys(), name), default)``."""
    for keys in itertools.permutations(KEYS[:8], 3):
        pattern = {k: 10 + i for i, k in enumerate(keys)}
        for name in NAMES:
            assert layer_value(pattern, name, 4) == pattern.get(get_pattern_key(pattern.keys(), name), 4)
    assert layer_value({}, "model.layers.0.self_attn.q_proj", 7) == 7


def test_lora_model_gives_each_layer_the_rank_of_layer_value(tiny_llama) -> None:
    """PEFT building a model from a config with patterns: every LoRA layer's r, alpha and scaling as ours."""
    from peft import LoraConfig, get_peft_model

    rank_pattern = {r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 6, r"mlp\.(up|down)_proj": 3}
    alpha_pattern = {"v_proj": 1.5, r"layers\.0\..*": 12.0}
    pm = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))
    layers = {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(layers) == 14
    for name, layer in layers.items():
        r, alpha = layer_value(rank_pattern, name, 4), layer_value(alpha_pattern, name, 8)
        assert layer.r["default"] == r and layer.lora_alpha["default"] == alpha, name
        assert layer.scaling["default"] == alpha / r, name


def test_unmatched_and_ambiguous_keys() -> None:
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    assert unmatched_keys({"q_proj": 2, "k_proj": 3, r"layers\.9\..*": 1, "up_proj": 1}, names) == [
        "k_proj", r"layers\.9\..*"]
    assert unmatched_keys({"proj": 2}, names) == ["proj"]  # a key matches whole dotted parts, not a suffix
    assert ambiguous_keys({"q_proj": 2, r"layers\.1\..*": 3}, names) == (
        "model.layers.1.self_attn.q_proj", "q_proj", r"layers\.1\..*")
    assert ambiguous_keys({"q_proj": 2, r"layers\.1\..*": 2}, names) is None  # the same value: no ambiguity
    assert ambiguous_keys({r"layers\.1\..*": 3, "q_proj": 2}, names) is None  # sorted order: the same on reload
    assert ambiguous_keys({"q_proj": 2, "up_proj": 3}, names) is None


def test_check_pattern_accepts_and_keeps_order() -> None:
    assert list(check_pattern("rank", {"b": 1, "a": 2})) == ["b", "a"]
    assert check_pattern("rank", None) == {} and check_pattern("alpha", {"x": 0.5, "y": 3}) == {"x": 0.5, "y": 3}


@pytest.mark.parametrize("which, pattern, exc, message", [
    ("rank", {"q_proj": 0}, ValueError, "rank_pattern['q_proj'] must be an integer >= 1, got 0"),
    ("rank", {"q_proj": 2.0}, ValueError, "rank_pattern['q_proj'] must be an integer >= 1, got 2.0"),
    ("rank", {"q_proj": True}, ValueError, "rank_pattern['q_proj'] must be an integer >= 1, got True"),
    ("rank", {"q_proj": "8"}, ValueError, "rank_pattern['q_proj'] must be an integer >= 1, got '8'"),
    ("alpha", {"v_proj": "8"}, ValueError, "alpha_pattern['v_proj'] must be a finite positive number, got '8'"),
    ("alpha", {"v_proj": 0.0}, ValueError, "alpha_pattern['v_proj'] must be a finite positive number, got 0.0"),
    ("alpha", {"v_proj": float("inf")}, ValueError,
     "alpha_pattern['v_proj'] must be a finite positive number, got inf"),
    ("rank", [("q_proj", 2)], TypeError, "rank_pattern must be a mapping of module-name pattern to rank, got list"),
    ("rank", {3: 2}, TypeError, "rank_pattern keys must be non-empty strings (module names or regular "
                                "expressions), got 3"),
    ("alpha", {"": 2}, TypeError, "alpha_pattern keys must be non-empty strings (module names or regular "
                                  "expressions), got ''"),
    ("rank", {"q_proj(": 2}, ValueError,
     "rank_pattern key 'q_proj(' is not a regular expression: missing ), unterminated subpattern at position 6"),
])
def test_check_pattern_errors(which, pattern, exc, message) -> None:
    with raises_exactly(exc, message):
        check_pattern(which, pattern)
