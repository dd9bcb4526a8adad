"""The layer-kind table's hooks: ``after_wrap`` runs on each wrapped base layer, ``before_save`` on every module of a
model before its state dict is read (save, unwrap with merge, the CLI's base/); the bitsandbytes entry holds the
training guard and the layout restore, so nothing outside ``modules/layers.py`` / ``modules/qbase.py`` names the backend."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

from helpers import lora_layers, toy

import svdadapt
from svdadapt.modules import layers, qbase

RANK = 2


@pytest.fixture
def recording_linear(monkeypatch) -> dict[str, list[nn.Module]]:
    """The nn.Linear entry with hooks that record the modules they see (before_save reports a change)."""
    seen: dict[str, list[nn.Module]] = {"after_wrap": [], "before_save": []}
    index = next(i for i, k in enumerate(layers.LAYER_KINDS) if k.name == "nn.Linear")
    kind = dataclasses.replace(layers.LAYER_KINDS[index], after_wrap=seen["after_wrap"].append,
                               before_save=lambda m: seen["before_save"].append(m) or True)
    kinds = (*layers.LAYER_KINDS[:index], kind, *layers.LAYER_KINDS[index + 1:])
    monkeypatch.setattr(layers, "LAYER_KINDS", kinds)
    return seen


def test_after_wrap_runs_once_on_each_wrapped_base_layer(recording_linear) -> None:
    pm = svdadapt.wrap(toy(), "pissa", RANK, progress=False)
    bases = [layer.get_base_layer() for layer in lora_layers(pm).values()]
    assert len(bases) == 3 and [id(m) for m in recording_linear["after_wrap"]] == [id(m) for m in bases]
    assert recording_linear["before_save"] == []


def test_before_save_runs_on_every_module_of_its_kind_on_save(recording_linear, tmp_path) -> None:
    pm = svdadapt.wrap(toy(), "pissa", RANK, progress=False)
    linears = [m for m in pm.modules() if isinstance(m, nn.Linear)]  # the bases and every lora_A / lora_B
    assert len(linears) == 9
    svdadapt.save(pm, tmp_path / "a")
    assert [id(m) for m in recording_linear["before_save"]] == [id(m) for m in linears]
    recording_linear["before_save"].clear()
    assert layers.before_save(pm) == 9  # the count of modules whose hook reported a change


def test_kinds_without_hooks_change_nothing() -> None:
    pm = svdadapt.wrap(toy(), "pissa", RANK, progress=False)
    assert layers.before_save(pm) == 0
    layers.after_wrap(pm.modules())  # no hook on nn.Linear: nothing registered on any module
    assert all(not m._forward_pre_hooks for m in pm.modules())


def test_bitsandbytes_hooks_guard_4bit_training_and_restore_layouts() -> None:
    pytest.importorskip("bitsandbytes")
    from svdadapt.modules import bnb

    kind = layers.kind_of(bnb.quantize_linear(torch.ones(4, 64), None, "nf4"))
    assert (kind.after_wrap, kind.before_save) == (bnb.guard_training, bnb.restore_layout)
    pm = svdadapt.wrap(toy(sizes=(64, 64, 64)), "pissa", RANK, quantize="nf4", progress=False)
    bases = [layer.get_base_layer() for layer in lora_layers(pm).values()]
    assert len(bases) == 2 and all(getattr(m, "_svdadapt_guarded", False) for m in bases)
    assert layers.before_save(pm) == bnb.restore_layouts(pm) == 0  # fresh layers: already canonical


def test_missing_package_names_what_quantize_needs(monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    installed = find_spec("bitsandbytes") is not None
    assert qbase.missing_package() == (None if installed else "bitsandbytes")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))
    assert qbase.missing_package() == "bitsandbytes"
    assert qbase.SCHEMES == ("nf4", "fp4", "int8", "hqq4", "torchao-int4", "torchao-int8")
    assert [qbase.scheme(n).package for n in qbase.SCHEMES] == ["bitsandbytes"] * 3 + ["hqq", "torchao", "torchao"]
