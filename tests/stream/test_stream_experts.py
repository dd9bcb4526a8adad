"""init_checkpoint with target_parameters: MoE experts streamed from a checkpoint (PiSSA, MiLoRA).

The key property, as for linear layers (tests/stream/test_stream.py): the init directory the streamed run writes is
the one ``svdadapt.wrap(model, ..., target_parameters=...)`` + the in-memory init-dir writer give, bit for bit (the
rewritten base in the checkpoint's per-expert layout, the packed adapter, the resume state, svdadapt.json,
report.json), and PEFT's ``PeftModel.from_pretrained`` on the written base reproduces the original model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import svdadapt
from svdadapt.cli import main as cli_main
from svdadapt.cli.report import layer_ranks
from svdadapt.lifecycle.initdir import write_init_dir
from svdadapt.storage.shards import CheckpointReader

from bounds import gamma
from helpers import bits, safetensors_dict
from moe_models import EXPERTS, moe

FILES = ["adapter/adapter_model.safetensors", "svdadapt_state.safetensors", "svdadapt.json", "report.json"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-identity with the in-memory path holds at equal thread counts."""


def _assert_same(a: Path, b: Path) -> None:
    """Base tensors, adapter tensors and the records of two init directories, bit for bit / field for field."""
    ra, rb = CheckpointReader(a / "base"), CheckpointReader(b / "base")
    assert sorted(ra.names) == sorted(rb.names)
    for n in ra.names:
        x, y = ra.get(n), rb.get(n)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y)), n
    for f in FILES:
        if f.endswith(".safetensors"):
            ta, tb = safetensors_dict(a / f), safetensors_dict(b / f)
            assert ta.keys() == tb.keys(), f
            assert all(ta[k].dtype == tb[k].dtype and torch.equal(bits(ta[k]), bits(tb[k])) for k in ta), f
        elif f == "svdadapt.json":  # the manifest names each run's own base shards
            ma, mb = (json.loads((d / f).read_text()) for d in (a, b))
            fa, fb = ma.pop("files"), mb.pop("files")
            assert ma == mb and all(fa[k] == fb[k] for k in ("svdadapt_state.safetensors", "report.json"))
        else:
            assert (a / f).read_text() == (b / f).read_text(), f
    ca, cb = (json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (a, b))
    ca.pop("base_model_name_or_path"), cb.pop("base_model_name_or_path")
    assert set(ca.pop("target_modules")) == set(cb.pop("target_modules"))
    assert ca == cb


def _in_memory(ck: Path, out: Path, method: str, **kw) -> Path:
    """What ``svdadapt init --in-memory`` does: the model loaded from ``ck``, wrapped, its init directory written."""
    model = AutoModelForCausalLM.from_pretrained(ck).eval()
    pm = svdadapt.wrap(model, method, rank=2, target_parameters=EXPERTS, progress=False, **kw)
    return write_init_dir(out, pm, model_path=ck)


@pytest.mark.parametrize("family, method, dtype", [
    ("mixtral", "pissa", torch.float32), ("mixtral", "milora", torch.float32), ("qwen3_moe", "pissa", torch.float32),
    ("qwen3_moe", "milora", torch.float32), ("olmoe", "pissa", torch.float32), ("mixtral", "pissa", torch.bfloat16)])
def test_streamed_experts_equal_in_memory_init(tmp, family, method, dtype):
    ck = tmp / "ck"
    moe(family, dtype=dtype).save_pretrained(ck, max_shard_size="20KB")  # transformers' per-expert layout, several shards
    assert any(".experts.0." in n for n in CheckpointReader(ck).names)
    svdadapt.init_checkpoint(ck, tmp / "s", method=method, rank=2, target_parameters=EXPERTS, progress=False,
                             max_shard_bytes=30_000)
    _in_memory(ck, tmp / "m", method)
    _assert_same(tmp / "s", tmp / "m")
    meta = json.loads((tmp / "s" / "svdadapt.json").read_text())
    assert [p["key"].rsplit(".", 1)[1] for p in meta["parameters"].values()] == ["gate_up_proj", "down_proj"] * 2
    assert len(meta["report"]) == 4 * 2 * 2 + (4 if family == "mixtral" else 4) * 2


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_streamed_experts_only_and_fused_checkpoint(tmp, family):
    """target_modules=[] (the experts only); and a checkpoint storing the 3-D parameters under their own keys."""
    ck = tmp / "ck"
    moe(family).save_pretrained(ck)
    svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=2, target_modules=[], target_parameters=EXPERTS,
                             progress=False)
    pm = svdadapt.wrap(AutoModelForCausalLM.from_pretrained(ck).eval(), "pissa", rank=2, target_modules=[],
                       target_parameters=EXPERTS, progress=False)
    write_init_dir(tmp / "m", pm, model_path=ck)
    _assert_same(tmp / "s", tmp / "m")
    # fused: the model's own state dict (module names, 3-D experts) as one safetensors file
    from safetensors.torch import save_file
    fused = tmp / "fused"
    model = moe(family)
    model.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
               or not model.config.tie_word_embeddings}, str(fused / "model.safetensors"), metadata={"format": "pt"})
    svdadapt.init_checkpoint(fused, tmp / "f", method="pissa", rank=2, target_modules=[], target_parameters=EXPERTS,
                             progress=False)
    a, b = safetensors_dict(tmp / "f" / "adapter" / "adapter_model.safetensors"), safetensors_dict(
        tmp / "m" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)
    base = safetensors_dict(tmp / "f" / "base" / "model.safetensors")
    state = pm.get_base_model().state_dict()
    for key in [k for k in base if k.endswith(("gate_up_proj", "down_proj"))]:
        assert torch.equal(bits(base[key]), bits(state[key])), key


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_peft_loads_the_streamed_init_exact(tmp, family):
    """PEFT's own PeftModel.from_pretrained on base/ + adapter/: each expert's base + PEFT's delta is the original
    W_e up to the fp32 addmm that formed the residual (≤ γ_{r+2}·(|W| + s·|B|·|A|) entrywise, Higham 3.13) and
    PEFT's fp32 product forming the delta (γ_r·s·|B|·|A|); and its logits are those of the in-memory wrap, bit for
    bit (the same weights in the same modules)."""
    ck = tmp / "ck"
    original = moe(family)
    original.save_pretrained(ck)
    svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=2, target_parameters=EXPERTS, progress=False)
    base = AutoModelForCausalLM.from_pretrained(tmp / "s" / "base").eval()
    peft = PeftModel.from_pretrained(base, tmp / "s" / "adapter").eval()
    found = 0
    for n, w in peft.base_model.model.named_modules():
        if type(w).__name__ != "ParamWrapper":
            continue
        found += 1
        W = getattr(original.get_submodule(n.replace(".base_layer", "")), w.parameter_name).detach().double()
        D = w.get_delta_weight("default").detach().double()
        A, B = (t.detach().double().abs() for t in (w.lora_A["default"].weight, w.lora_B["default"].weight))
        E = w.num_experts
        absBA = w.scaling["default"] * torch.einsum("ore,eri->eoi", B.reshape(B.shape[0], -1, E),
                                                    A.reshape(E, -1, A.shape[-1]))
        err = (w.get_param().detach().double() + D - W).abs()
        assert bool((err <= gamma(4) * (W.abs() + absBA) + gamma(2) * absBA).all()), n
    assert found == 4
    pm = svdadapt.wrap(moe(family), "pissa", rank=2, target_parameters=EXPERTS, progress=False)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(peft(ids).logits, pm(ids).logits)


def test_cli_init_streams_target_parameters(tmp, capsys):
    """``svdadapt init --target-parameters`` streams (PiSSA: tensor by tensor) and writes the in-memory init."""
    ck = tmp / "ck"
    moe("mixtral").save_pretrained(ck)
    assert cli_main(["init", str(ck), "--method", "pissa", "--rank", "2", "--out", str(tmp / "c"), "--no-progress",
                     "--target-parameters", *EXPERTS]) == 0
    assert f"streaming {ck} tensor by tensor" in capsys.readouterr().err
    _in_memory(ck, tmp / "m", "pissa")
    _assert_same(tmp / "c", tmp / "m")


def interrupted_then_resumed(monkeypatch, run_init) -> None:
    """``run_init()`` killed as the third targeted parameter's base is made (after the first parameters' tensors
    went into a shard), then run again to its end."""
    import svdadapt.stream.experts as stream_experts

    run, calls = stream_experts.StreamedParams._run, []

    def crash(self, key):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        run(self, key)

    monkeypatch.setattr(stream_experts.StreamedParams, "_run", crash)
    with pytest.raises(KeyboardInterrupt):
        run_init()
    monkeypatch.setattr(stream_experts.StreamedParams, "_run", run)
    run_init()


def test_a_resumed_run_equals_in_memory_init(tmp, monkeypatch):
    """Killed after the first parameter's tensors went into a shard: the resumed run keeps the verified shards and
    plans the parameters whose tensors it finds there again (data-free: the same factors), bit for bit."""
    ck = tmp / "ck"
    moe("mixtral").save_pretrained(ck, max_shard_size="20KB")
    interrupted_then_resumed(monkeypatch, lambda: svdadapt.init_checkpoint(
        ck, tmp / "s", method="pissa", rank=2, target_parameters=EXPERTS, progress=False, max_shard_bytes=6_000))
    _in_memory(ck, tmp / "m", "pissa")
    _assert_same(tmp / "s", tmp / "m")


def test_errors_name_the_parameter(tmp):
    ck = tmp / "ck"
    moe("mixtral").save_pretrained(ck)
    with pytest.raises(ValueError) as e:
        svdadapt.init_checkpoint(ck, tmp / "a", method="pissa", rank=13, target_modules=[],
                                 target_parameters=EXPERTS, progress=False)
    assert str(e.value) == ("rank 13 exceeds min(out, in) = 12 of target parameter "
                            "'model.layers.0.mlp.experts.down_proj' (each expert 16x12)")
    from safetensors.torch import save_file
    tensors = safetensors_dict(ck / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        svdadapt.init_checkpoint(ck, tmp / "b", method="pissa", rank=2, target_parameters=EXPERTS, progress=False)
    assert str(e.value) == (f"target parameter 'model.layers.1.mlp.experts.gate_up_proj' has no tensor in checkpoint "
                            f"{ck} (neither 'model.layers.1.mlp.experts.gate_up_proj' nor the per-expert tensors of "
                            "transformers' conversion mapping)")
    assert not (tmp / "a").exists() and not (tmp / "b").exists()


def test_streaming_warns_when_most_of_the_blocks_are_left_out(tmp):
    """init_checkpoint reads the coverage off the meta-device skeleton and says what wrap says: on a Mixtral with
    "all-linear" and no target_parameters, the experts left out and the value that would include them."""
    ck = tmp / "ck"
    moe("mixtral").save_pretrained(ck)
    with pytest.warns(UserWarning) as caught:
        svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=2, progress=False)
    with pytest.warns(UserWarning) as in_memory:
        svdadapt.wrap(AutoModelForCausalLM.from_pretrained(ck).eval(), "pissa", rank=2, progress=False)
    ours = [str(w.message) for w in caught if "are left out" in str(w.message)]
    assert ours == [str(w.message) for w in in_memory if "are left out" in str(w.message)] and len(ours) == 1
    assert ours[0].endswith("add target_parameters=['mlp.experts.down_proj', 'mlp.experts.gate_up_proj'] to adapt them")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the experts targeted, no warning
        svdadapt.init_checkpoint(ck, tmp / "e", method="pissa", rank=2, target_parameters=EXPERTS, progress=False)


PATTERN = {"rank_pattern": {"down_proj": 3, "layers.0.mlp.experts.gate_up_proj": 5},
           "alpha_pattern": {"down_proj": 7.0}}


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_streamed_patterns_equal_in_memory_init(tmp, method, capsys):
    """rank_pattern / alpha_pattern over parameter keys (a parameter's own rank, shared by its experts): the
    streamed init directory, and the CLI's with --rank-pattern / --alpha-pattern, are wrap's bit for bit."""
    ck = tmp / "ck"
    moe("mixtral").save_pretrained(ck, max_shard_size="20KB")
    svdadapt.init_checkpoint(ck, tmp / "s", method=method, rank=2, target_parameters=EXPERTS, progress=False, **PATTERN)
    _in_memory(ck, tmp / "m", method, **PATTERN)
    _assert_same(tmp / "s", tmp / "m")
    cfg = json.loads((tmp / "s" / "adapter" / "adapter_config.json").read_text())
    assert (cfg["rank_pattern"], cfg["alpha_pattern"]) == (PATTERN["rank_pattern"], PATTERN["alpha_pattern"])
    ranks = layer_ranks(json.loads((tmp / "s" / "svdadapt.json").read_text()))  # svdadapt report's / plot's
    assert {k: v for k, v in ranks.items() if ".experts." in k} == {
        "model.layers.0.mlp.experts.gate_up_proj": 5, "model.layers.1.mlp.experts.gate_up_proj": 2,
        "model.layers.0.mlp.experts.down_proj": 3, "model.layers.1.mlp.experts.down_proj": 3}
    assert cli_main(["init", str(ck), "--method", method, "--rank", "2", "--out", str(tmp / "c"), "--no-progress",
                     "--target-parameters", *EXPERTS, "--rank-pattern", "down_proj=3",
                     "layers.0.mlp.experts.gate_up_proj=5", "--alpha-pattern", "down_proj=7"]) == 0
    assert f"streaming {ck} tensor by tensor" in capsys.readouterr().err
    _assert_same(tmp / "c", tmp / "m")
    with pytest.raises(ValueError) as e:
        svdadapt.init_checkpoint(ck, tmp / "a", method=method, rank=2, target_modules=[], target_parameters=EXPERTS,
                                 rank_pattern={"gate_up_proj": 17}, progress=False)
    assert str(e.value) == ("rank_pattern['gate_up_proj'] = 17 exceeds min(out, in) = 16 of target parameter "
                            "'model.layers.0.mlp.experts.gate_up_proj' (each expert 24x16)")
    assert not (tmp / "a").exists()
