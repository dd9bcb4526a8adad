"""The job both entry points run: one declaration of the shared keywords, each method's options, needs, records."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import svdadapt
from helpers import make_tiny_llama, raises_exactly, same_init_factors, token_ids
from svdadapt.engine import checks
from svdadapt.cli import commands as cli
from svdadapt.engine.job import Request, build_job, recorded_options, unmet_needs
from svdadapt.core.methods import METHODS, CordaOptions, EoraOptions, get_method, mode_choices
from svdadapt.modules.targets import shared_weights

# the public signatures as they stood when both entry points declared every keyword themselves
WRAP = {"model": ("POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        "method": ("POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        "rank": ("POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        "alpha": ("KEYWORD_ONLY", None), "target_modules": ("KEYWORD_ONLY", "all-linear"),
        "exclude_modules": ("KEYWORD_ONLY", None), "use_rslora": ("KEYWORD_ONLY", False),
        "svd": ("KEYWORD_ONLY", "auto"), "niter": ("KEYWORD_ONLY", None), "oversample": ("KEYWORD_ONLY", 0),
        "seed": ("KEYWORD_ONLY", 0), "progress": ("KEYWORD_ONLY", True), "mode": ("KEYWORD_ONLY", None),
        "damping": ("KEYWORD_ONLY", 0.01), "calibration": ("KEYWORD_ONLY", None),
        "reference": ("KEYWORD_ONLY", None), "calibrate_on": ("KEYWORD_ONLY", "reference"),
        "task_type": ("KEYWORD_ONLY", None), "modules_to_save": ("KEYWORD_ONLY", None),
        "quantize": ("KEYWORD_ONLY", None), "quant_iters": ("KEYWORD_ONLY", 1), "blockwise": ("KEYWORD_ONLY", None)}
INIT_CHECKPOINT = {"checkpoint_dir": ("POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
                   "out_dir": ("POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
                   "method": ("KEYWORD_ONLY", inspect.Parameter.empty),
                   "rank": ("KEYWORD_ONLY", inspect.Parameter.empty),
                   **{k: WRAP[k] for k in ("alpha", "target_modules", "exclude_modules", "use_rslora", "svd", "niter",
                                           "oversample", "seed", "mode", "damping", "calibration", "reference",
                                           "calibrate_on", "blockwise", "progress")},
                   "max_shard_bytes": ("KEYWORD_ONLY", 1 << 30), "resume": ("KEYWORD_ONLY", True)}
NEW = {"options": ("KEYWORD_ONLY", None),  # the nested form of a method's options, beside the flat keywords
       "rank_pattern": ("KEYWORD_ONLY", None), "alpha_pattern": ("KEYWORD_ONLY", None),  # PEFT's per-layer ones
       "allocate": ("KEYWORD_ONLY", False),  # rank allocation (init_checkpoint refuses it with a reason)
       "target_parameters": ("KEYWORD_ONLY", None)}  # PEFT's (MoE experts; init_checkpoint refuses it)


def _params(fn) -> dict:
    return {n: (p.kind.name, p.default) for n, p in inspect.signature(fn).parameters.items()}


@pytest.mark.parametrize("fn, want", [(svdadapt.wrap, WRAP), (svdadapt.init_checkpoint, INIT_CHECKPOINT)])
def test_signatures_keep_every_keyword_and_default(fn, want) -> None:
    assert _params(fn) == {**want, **NEW}
    positional = [n for n, (kind, _) in want.items() if kind == "POSITIONAL_OR_KEYWORD"]
    assert [n for n, (kind, _) in _params(fn).items() if kind == "POSITIONAL_OR_KEYWORD"] == positional


@pytest.mark.parametrize("fn, args", [(svdadapt.wrap, (nn.Linear(4, 4), "pissa", 1)),
                                      (svdadapt.init_checkpoint, ("x", "y"))])
def test_unknown_keyword_is_pythons_error(fn, args) -> None:
    with raises_exactly(TypeError, f"{fn.__name__}() got an unexpected keyword argument 'dampng'"):
        fn(*args, dampng=0.1)
    with raises_exactly(TypeError, f"{fn.__name__}() got an unexpected keyword argument 'request'"):
        fn(*args, request=Request())


def _batches() -> list[dict]:
    return [{"input_ids": token_ids(2, 8, s)} for s in range(2)]


def test_nested_options_equal_flat_keywords() -> None:
    batches = _batches()
    flat = svdadapt.wrap(make_tiny_llama(0), "corda", 2, mode="kpa", damping=0.05, calibration=batches,
                         progress=False)
    nested = svdadapt.wrap(make_tiny_llama(0), "corda", 2, options=CordaOptions(mode="kpa", damping=0.05),
                           calibration=batches, progress=False)
    assert same_init_factors(flat, nested)
    assert flat.svdadapt.options == nested.svdadapt.options
    assert nested.svdadapt.options["mode"] == "kpa" and nested.svdadapt.options["damping"] == 0.05


def test_nested_options_refused_where_they_do_not_fit() -> None:
    spec = get_method("corda")
    with raises_exactly(TypeError, "options= for method 'corda': it takes a CordaOptions, got EoraOptions"):
        build_job(spec, 2, Request(options=EoraOptions()))
    with raises_exactly(TypeError, "options= for method 'pissa': it takes no options object, got CordaOptions"):
        svdadapt.wrap(nn.Linear(4, 4), "pissa", 1, options=CordaOptions(), progress=False)
    with raises_exactly(ValueError, "damping=0.5 and options= both set damping: pass one of them"):
        svdadapt.wrap(nn.Linear(4, 4), "corda", 1, damping=0.5, options=CordaOptions(), progress=False)


def test_recorded_options_keys_and_order() -> None:
    flat = {"mode": None, "damping": 0.2, "calibrate_on": "compressed"}
    job = build_job(get_method("eora"), 3, Request(niter=2, seed=5, flat=flat))
    # svdadapt.json's "options": damping as given whatever the method, calibrate_on never, mode resolved
    assert list(recorded_options(job).items()) == [("svd", "auto"), ("niter", 2), ("oversample", 0), ("seed", 5),
                                                   ("mode", None), ("damping", 0.2), ("use_rslora", False),
                                                   ("quant_iters", 1)]
    corda = build_job(get_method("corda"), 3, Request())
    assert recorded_options(corda)["mode"] == "ipa" and recorded_options(corda)["damping"] == 0.01


@pytest.mark.parametrize("method, calibration, reference, quantized, unmet", [
    ("pissa", False, False, False, []),
    ("pissa", True, True, False, ["no calibration", "no reference"]),
    ("corda", False, False, False, ["calibration"]),
    ("eora", True, False, False, ["reference"]),
    ("eora", True, False, True, []),  # the quantized base is its own reference
    ("eora", True, True, True, ["quantized reference"]),
])
def test_unmet_needs(method, calibration, reference, quantized, unmet) -> None:
    assert unmet_needs(get_method(method), calibration, reference, quantized) == unmet


def test_cli_mode_choices_come_from_the_registry() -> None:
    init = next(a for a in cli._parser()._subparsers._group_actions[0].choices["init"]._actions
                if "--mode" in a.option_strings)
    assert init.choices == mode_choices() == [m for s in METHODS.values() for m in s.modes if m is not None]
    assert init.help.startswith("corda only: ipa keeps the top-r triplets")


def test_registry_entries_by_keyword() -> None:
    assert [(s.name, s.needs_calibration, s.needs_reference, s.rewrites_base) for s in METHODS.values()] == [
        ("pissa", False, False, True), ("milora", False, False, True), ("corda", True, False, True),
        ("eora", True, True, False), ("eva", True, False, False)]


def test_tied_weights_found_on_the_meta_device() -> None:
    """A skeleton (no storage) ties by Parameter: the check init_checkpoint makes on it is wrap's."""
    with torch.device("meta"):
        model = make_tiny_llama(0, tie_word_embeddings=True)
    assert shared_weights(model, ["lm_head"]) == [("lm_head", "model.embed_tokens")]
    with raises_exactly(ValueError, "module 'lm_head' shares its weight with 'model.embed_tokens' (tied weights): "
                                    "rewriting it would change 'model.embed_tokens' too; untie the weights or "
                                    "leave 'lm_head' out of target_modules"):
        checks.check_untied(model, ["lm_head"])
