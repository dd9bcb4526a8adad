"""The lifecycle of expert adapters (``target_parameters``): save / load / export_lora / unwrap on tiny Mixtral and
Qwen3-MoE models, and PEFT's own ``PeftModel.from_pretrained`` loading the exported adapter on the original model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

import svdadapt
from helpers import out, rel, token_ids, train

from moe_models import EXPERTS, covariances, moe

RANK = 2
X = token_ids(2, 12, seed=100, vocab=64)


@pytest.fixture(scope="module", params=[("mixtral", "pissa"), ("qwen3_moe", "corda")])
def trained(request, tmp_path_factory):
    """(family, method, trained wrapped model, its logits, save dir)."""
    family, method = request.param
    kw = {"calibration": covariances(moe(family), seed=3)} if method == "corda" else {}
    pm = svdadapt.wrap(moe(family), method, rank=RANK, target_parameters=EXPERTS, progress=False, **kw)
    pm = train(pm, X, steps=5)
    d = tmp_path_factory.mktemp(f"save-{family}")
    svdadapt.save(pm, d)
    return family, method, pm, out(pm, X), d


def test_peft_loads_the_export_on_the_original_model(trained):
    family, _, pm, want, d = trained
    base = moe(family)
    # a "moved by more than" check: training moves logits by O(1e-1), rounding by ~1e-6
    assert rel(want, out(base, X)) > 1e-2
    vanilla = PeftModel.from_pretrained(base, d)
    # fp32 application of s·(B·A − B₀·A₀) to W instead of s·B·A to W_res: ~1e-6 measured, as test_export's bound
    assert rel(out(vanilla, X), want) < 1e-4
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["target_parameters"]) == (2 * RANK, sorted(EXPERTS))
    meta = json.loads((d / "svdadapt.json").read_text())
    assert meta["parameters"]["model.layers.0.mlp.experts"] == {
        "key": "model.layers.0.mlp.experts.down_proj", "experts": 4, "stacked": True, "transposed": False,
        "shape": list(moe(family).model.layers[0].mlp.experts.down_proj.shape[1:])}


def test_load_is_bit_identical(trained):
    family, _, pm, want, d = trained
    torch.manual_seed(999)  # another global RNG state: load draws nothing
    loaded = svdadapt.load(moe(family), d, progress=False)
    assert torch.equal(out(loaded, X), want)
    assert loaded.svdadapt.parameters == pm.svdadapt.parameters
    sa, sb = pm.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_lora_then_save_again(trained, tmp_path):
    family, _, pm, want, _ = trained
    svdadapt.export_lora(pm, tmp_path)
    assert not (tmp_path / "svdadapt.json").exists()
    assert rel(out(PeftModel.from_pretrained(moe(family), tmp_path), X), want) < 1e-4  # as above


def test_unwrap_gives_the_original_and_merge_the_trained(trained):
    family, _, pm, want, _ = trained
    original = moe(family)
    u = svdadapt.unwrap(copy.deepcopy(pm))
    assert not any(isinstance(m, BaseTunerLayer) for m in u.modules())
    so, su = original.state_dict(), u.state_dict()
    assert list(so) == list(su)
    eps = torch.finfo(torch.float32).eps
    for k in so:  # within fp32 rounding of the weight: a few ulps of its largest entry
        assert (su[k] - so[k]).abs().max() <= 4 * eps * so[k].abs().max(), k
    merged = svdadapt.unwrap(copy.deepcopy(pm), merge=True)
    # one fp32 rounding of each merged weight, through 2 blocks (√n·u per layer, ~10x margin)
    assert rel(out(merged, X), want) < 1e-5


def test_load_rejects_another_base_naming_the_parameter(trained):
    family, _, _, _, d = trained
    other = moe(family)
    with torch.no_grad():
        other.model.layers[1].mlp.experts.gate_up_proj[3, 0, 0] += 1.0
    shape = tuple(other.model.layers[1].mlp.experts.gate_up_proj.shape)
    with pytest.raises(ValueError, match=r"first mismatch at parameter 'model\.layers\.1\.mlp\.experts\.gate_up_proj' "
                                         rf"\(shape \({shape[0]}, {shape[1]}, {shape[2]}\) torch\.float32, crc32 "):
        svdadapt.load(other, d, progress=False)


def test_compact_export_refuses_expert_wrappers(trained, tmp_path):
    """export_lora(rank=) writes one (out, in) product per target: a ParamWrapper's packed experts are refused,
    naming the wrapper, before anything is written."""
    _, _, pm, _, _ = trained
    with pytest.raises(ValueError) as e:
        svdadapt.export_lora(pm, tmp_path / "c", rank=1)
    assert str(e.value) == ("a compact export (rank= / energy= / round_to= / covariances=) writes linear layers only; "
                            "target 'model.layers.0.mlp.experts.down_proj' is an MoE parameter (its factors have "
                            "their own layout): export it without those keywords")
    assert not (tmp_path / "c").exists()
