"""``quantize=`` with ``target_parameters``: bitsandbytes / HQQ / torchao have no 3-D expert layer PEFT's
ParamWrapper can wrap, so ``quantize=`` quantizes the layers of ``target_modules`` (QPiSSA / QCorDA there) and the
experts keep their float residual. Checked bit for bit against the two runs it combines: the quantized layers of
``wrap(..., quantize=)`` without experts, the experts of ``wrap(..., target_modules=[])`` without quantization
(each layer and expert seeded by its own name). EoRA with both is refused (its experts would have nothing to
compensate), and so is ``quantize=`` with ``target_modules=[]`` (nothing to quantize)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import svdadapt
from helpers import out, raises_exactly, token_ids
from moe_models import EXPERTS, wrappers

IDS = token_ids(2, 9, 5, vocab=64)


def _mixtral() -> torch.nn.Module:
    """A tiny Mixtral whose projections bitsandbytes' 4-bit CPU kernel takes (in a multiple of 64, out of 32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                            num_experts_per_tok=2, max_position_embeddings=32)
        return MixtralForCausalLM(cfg).eval()


def _lora(pm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in pm.state_dict().items() if "lora_" in k}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_layers_quantized_experts_float(scheme):
    model = _mixtral()
    both = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=4, quantize=scheme, target_parameters=EXPERTS,
                         progress=False)
    with warnings.catch_warnings():  # the experts left out, as this run means to
        warnings.filterwarnings("ignore", message="svdadapt: the targets cover")
        layers = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=4, quantize=scheme, progress=False)
    experts = svdadapt.wrap(copy.deepcopy(model), "pissa", rank=4, target_modules=[], target_parameters=EXPERTS,
                            progress=False)
    lora = _lora(both)
    assert _same({k: v for k, v in lora.items() if "self_attn" in k}, _lora(layers))
    assert _same({k: v for k, v in lora.items() if ".experts." in k}, _lora(experts))
    kind = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[scheme]
    assert {type(m).__name__ for n, m in both.named_modules() if n.endswith(("q_proj", "o_proj"))} == {kind}
    for key, w in wrappers(both).items():  # the experts' residual bases, float and bit for bit
        base = wrappers(experts)[key].get_param()
        assert w.get_param().dtype == torch.float32 and torch.equal(w.get_param(), base), key
    base_state = {k: v for k, v in both.get_base_model().state_dict().items() if "self_attn" in k and "lora_" not in k}
    want = {k: v for k, v in layers.get_base_model().state_dict().items() if k in base_state}
    assert base_state.keys() == want.keys() and all(torch.equal(base_state[k], want[k]) for k in want)
    assert both.svdadapt.quantize == scheme


def test_save_load_round_trip(tmp_path):
    pm = svdadapt.wrap(_mixtral(), "pissa", rank=4, quantize="nf4", target_parameters=EXPERTS, progress=False)
    svdadapt.save(pm, tmp_path)
    loaded = svdadapt.load(_mixtral(), tmp_path, progress=False)
    assert torch.equal(out(loaded, IDS), out(pm, IDS))
    assert _same(_lora(loaded), _lora(pm))


def test_errors():
    model = _mixtral()
    with raises_exactly(ValueError, "target_parameters=['experts.down_proj'] with quantize='nf4' and a method that "
                        "compensates compression (EoRA): quantize= quantizes the layers of target_modules only "
                        "(bitsandbytes, HQQ and torchao have no 3-D expert layer PEFT can wrap), so the experts "
                        "would have no quantization error to compensate; compress them with "
                        "svdadapt.compress.quantize(..., target_parameters=...) and pass reference=, or drop "
                        "target_parameters (docs/experts.md)"):
        svdadapt.wrap(model, "eora", rank=4, quantize="nf4", target_parameters=["experts.down_proj"],
                      calibration=[IDS], progress=False)
    with raises_exactly(ValueError, "quantize='nf4' quantizes the layers of target_modules, and target_modules=[] "
                        "selects none: the parameters of target_parameters stay float; drop quantize= or target "
                        "some layers (docs/experts.md)"):
        svdadapt.wrap(model, "pissa", rank=4, quantize="nf4", target_modules=[], target_parameters=EXPERTS,
                      progress=False)
    assert not svdadapt.modules.targets.is_peft(model)
