"""save / load / export_lora / unwrap and the save_pretrained guard, on the tiny Llama."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import svdadapt
from svdadapt.quant.compress import quantize

from helpers import make_tiny_llama, out, rel, same_state, token_ids, train

RANK = 4
SEED = 3  # weights of the tiny Llama
# the files svdadapt.save writes next to PEFT's (their names are part of the on-disk format)
META_FILE, STATE_FILE = "svdadapt.json", "svdadapt_state.safetensors"

X = token_ids(2, 16, seed=100)
CALIB = [token_ids(4, 16, seed=200 + i) for i in range(3)]  # model(batch) on token tensors


def _wrap(method: str, model=None, **kw):
    model = make_tiny_llama(SEED) if model is None else model
    if method in ("corda",):
        kw.setdefault("calibration", CALIB)
    return svdadapt.wrap(model, method, rank=RANK, progress=False, **kw)


def _train(pm, steps: int = 5):
    return train(pm, X, steps=steps)


def _logits(model) -> torch.Tensor:
    return out(model, X)


@pytest.fixture(scope="module", params=["pissa", "milora", "corda"])
def trained(request, tmp_path_factory):
    """(method, trained wrapped model, its logits, save dir)."""
    method = request.param
    pm = _train(_wrap(method))
    d = tmp_path_factory.mktemp(f"save-{method}")
    svdadapt.save(pm, d)
    return method, pm, _logits(pm), d


# --------------------------------------------------------------------------------------------- save -> vanilla PEFT


def test_vanilla_peft_loads_export_on_original_base(trained):
    method, pm, want, d = trained
    torch.manual_seed(12345)  # a different global RNG state, as in a fresh process
    base = make_tiny_llama(SEED)
    orig_logits = _logits(base)
    # a "moved by more than" check: training moves logits by O(1e-1), rounding by ~1e-6
    assert rel(want, orig_logits) > 1e-2  # training changed the model (else the check below is empty)
    vanilla = PeftModel.from_pretrained(base, d)
    # fp32 merge of s·B·A into W (γ_{r+2}·(|W| + s|B||A|) per weight) seen in the trained logits: ~1e-6 measured
    assert rel(_logits(vanilla), want) < 1e-4
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (2 * RANK, 2 * RANK, True)
    sd = load_file(d / "adapter_model.safetensors")
    name = pm.svdadapt["targets"][0]
    A0, B0 = pm.svdadapt["init_factors"][name]
    A = sd[f"base_model.model.{name}.lora_A.weight"]
    B = sd[f"base_model.model.{name}.lora_B.weight"]
    assert A.shape == (2 * RANK, A0.shape[1]) and B.shape == (B0.shape[0], 2 * RANK)
    assert torch.equal(A[RANK:], A0) and torch.equal(B[:, RANK:], -B0)


def test_raw_rank_r_adapter_would_be_wrong_on_original_base(trained, tmp_path):
    """What the guard prevents: PEFT's own save_pretrained (rank r) applied to the original W."""
    _, pm, want, _ = trained
    PeftModel.save_pretrained(pm, tmp_path)  # the unguarded PEFT method
    raw = PeftModel.from_pretrained(make_tiny_llama(SEED), tmp_path)
    # a "moved by more than" check, as above
    assert rel(_logits(raw), want) > 1e-2


def test_load_is_bit_identical_whatever_the_global_rng(trained):
    method, pm, want, d = trained
    torch.manual_seed(999)
    re = svdadapt.load(make_tiny_llama(SEED), d, progress=False)
    a, b = pm.state_dict(), re.state_dict()
    assert list(a) == list(b)
    assert same_state(a, b), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert torch.equal(_logits(re), want)
    assert {n for n, p in re.named_parameters() if p.requires_grad} == {n for n, p in pm.named_parameters() if p.requires_grad}
    assert re.svdadapt["method"] == method and re.svdadapt["base_checksums"] == pm.svdadapt["base_checksums"]
    for n, (A0, B0) in pm.svdadapt["init_factors"].items():
        assert torch.equal(re.svdadapt["init_factors"][n][0], A0) and torch.equal(re.svdadapt["init_factors"][n][1], B0)


def test_load_then_save_round_trips(trained, tmp_path):
    _, pm, _, d = trained
    re = svdadapt.load(make_tiny_llama(SEED), d, progress=False)
    svdadapt.save(re, tmp_path)
    for f in ("adapter_model.safetensors", STATE_FILE):
        x, y = load_file(d / f), load_file(tmp_path / f)
        assert same_state(x, y), f
    mx, my = json.loads((d / META_FILE).read_text()), json.loads((tmp_path / META_FILE).read_text())
    assert mx == my


def test_export_lora_writes_only_the_plain_adapter(trained, tmp_path):
    _, pm, want, d = trained
    svdadapt.export_lora(pm, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    x, y = load_file(d / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    assert same_state(x, y)


# ----------------------------------------------------------------------------------------------------------- unwrap


def test_unwrap_gives_the_original_weights(trained):
    _, pm, _, _ = trained
    original = make_tiny_llama(SEED)
    u = svdadapt.unwrap(copy.deepcopy(pm))
    assert not any(isinstance(m, BaseTunerLayer) for m in u.modules())
    so, su = original.state_dict(), u.state_dict()
    assert list(so) == list(su)
    eps = torch.finfo(torch.float32).eps
    for k in so:
        # within fp32 rounding of the weight: a few ulps of its largest entry
        assert (su[k] - so[k]).abs().max() <= 4 * eps * so[k].abs().max(), k
    # PEFT's disable_adapter() would give W_res instead: far from W
    with pm.disable_adapter():
        # a "moved by more than" check, as above
        assert rel(_logits(pm), _logits(original)) > 1e-2
    # the same fp32 weights, another forward order only (√n·u ≈ 7e-7 per layer)
    assert rel(_logits(u), _logits(original)) < 1e-6


def test_unwrap_merge_gives_the_trained_model(trained):
    _, pm, want, _ = trained
    m = svdadapt.unwrap(copy.deepcopy(pm), merge=True)
    assert not any(isinstance(x, BaseTunerLayer) for x in m.modules())
    # one fp32 rounding of the merged weight per layer, through 2 blocks (√n·u per layer, ~10x margin)
    assert rel(_logits(m), want) < 1e-5


# --------------------------------------------------------------------------------------------------------- checksum


def test_load_rejects_another_base_naming_the_first_module(trained):
    _, pm, _, d = trained
    with pytest.raises(ValueError, match=r"base weights do not match .*: first mismatch at module "
                                         r"'model\.layers\.0\.self_attn\.q_proj' \(weight \(64, 64\) torch\.float32"):
        svdadapt.load(make_tiny_llama(SEED + 1), d, progress=False)


def test_load_names_a_single_changed_module(trained):
    _, _, _, d = trained
    base = make_tiny_llama(SEED)
    with torch.no_grad():
        # an input, not a tolerance: 1e-6 of a weight is below the outputs' fp32 noise
        base.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6  # one entry, far below anything visible in outputs
    with pytest.raises(ValueError, match=r"first mismatch at module 'model\.layers\.1\.mlp\.down_proj'"):
        svdadapt.load(base, d, progress=False)
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())  # checked before anything was touched


def test_load_recognizes_the_rewritten_base(trained):
    _, pm, _, d = trained
    residual = copy.deepcopy(pm).unload()  # W_res, what `svdadapt init` writes to DIR/base
    with pytest.raises(ValueError, match=r"this is the REWRITTEN base .*svdadapt\.load needs the original model"):
        svdadapt.load(residual, d, progress=False)


def test_load_rejects_plain_peft_dir_and_peft_model(trained, tmp_path):
    _, pm, _, d = trained
    PeftModel.save_pretrained(pm, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has no svdadapt\.json: it was not "
                                                r"written by svdadapt\.save"):
        svdadapt.load(make_tiny_llama(SEED), tmp_path)
    with pytest.raises(TypeError, match=r"base_model is already a PEFT model"):
        svdadapt.load(pm, d)


def test_save_needs_a_wrapped_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    plain = get_peft_model(make_tiny_llama(SEED), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"svdadapt\.save needs a model returned by svdadapt\.wrap or svdadapt\.load"):
        svdadapt.save(plain, tmp_path)
    with pytest.raises(TypeError, match=r"svdadapt\.unwrap needs a model returned by svdadapt\.wrap"):
        svdadapt.unwrap(plain)


def test_weight_checksum_is_bit_exact():
    from svdadapt.lifecycle.export import weight_checksum  # module-internal: imported here so that moving it fails this test only

    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert weight_checksum(w) == weight_checksum(w.clone())
    v = w.clone()
    v[0, 0] = torch.nextafter(v[0, 0], torch.tensor(math.inf))
    assert weight_checksum(v) != weight_checksum(w)
    assert weight_checksum(w.to(torch.float64)) != weight_checksum(w)  # dtype is part of it
    assert weight_checksum(w.reshape(4, 8)) != weight_checksum(w)  # and the shape


# ------------------------------------------------------------------------------------------------------------ guard


def test_save_pretrained_is_svdadapt_save(trained, tmp_path):
    _, pm, want, d = trained
    pm.save_pretrained(tmp_path)
    for f in ("adapter_model.safetensors", STATE_FILE):
        x, y = load_file(d / f), load_file(tmp_path / f)
        assert same_state(x, y), f
    # fp32 merge, as in the round trip above
    assert rel(_logits(PeftModel.from_pretrained(make_tiny_llama(SEED), tmp_path)), want) < 1e-4
    with pytest.raises(ValueError, match=r"path_initial_model_for_weight_conversion is not needed on an svdadapt model"):
        pm.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    pm.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()


def test_save_pretrained_takes_the_trainers_state_dict(trained, tmp_path):
    """The Trainer passes state_dict= (gathered under FSDP / DeepSpeed): the factors come from it."""
    _, pm, _, _ = trained
    sd = {k: v.clone() for k, v in pm.state_dict().items()}
    name = pm.svdadapt["targets"][0]
    key = f"base_model.model.{name}.lora_A.default.weight"
    sd[key] = torch.zeros_like(sd[key])
    pm.save_pretrained(tmp_path, state_dict=sd)
    st = load_file(tmp_path / STATE_FILE)
    assert torch.equal(st[f"{name}.A"], sd[key])
    assert not torch.equal(st[f"{name}.A"], pm.state_dict()[key])


def test_load_adapter_restores_a_checkpoint_for_resuming(tmp_path):
    """Trainer(resume_from_checkpoint=...) calls model.load_adapter(ckpt, 'default', is_trainable=True)."""
    pm = _train(_wrap("pissa", target_modules=["q_proj", "down_proj"]), steps=3)
    pm.save_pretrained(tmp_path)
    saved = {k: v.clone() for k, v in pm.state_dict().items()}
    _train(pm, steps=2)
    assert not all(torch.equal(saved[k], v) for k, v in pm.state_dict().items())
    pm.load_adapter(str(tmp_path), "default", is_trainable=True)
    assert same_state(pm.state_dict(), saved)
    other = _wrap("pissa", model=make_tiny_llama(SEED + 1), target_modules=["q_proj", "down_proj"])  # other A0, B0
    with pytest.raises(ValueError, match=r"was trained from different initial factors \(first at module "):
        other.load_adapter(str(tmp_path), "default", is_trainable=True)


def test_guard_survives_deepcopy(tmp_path):
    pm = _wrap("pissa", target_modules=["q_proj"])
    pm2 = copy.deepcopy(pm)
    assert pm2.save_pretrained.__self__ is pm2
    pm2.save_pretrained(tmp_path)
    assert (tmp_path / META_FILE).is_file()


def test_rslora_export_keeps_the_scaling(tmp_path):
    pm = _train(_wrap("pissa", alpha=6.0, use_rslora=True))
    want = _logits(pm)
    svdadapt.save(pm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * RANK and cfg["use_rslora"] is True
    # 6·√2 computed in fp64 on both sides: a few u64 (1e-15 ≈ 4·u64)
    assert cfg["lora_alpha"] == pytest.approx(6.0 * math.sqrt(2), rel=1e-15)
    # fp32 merge, as above
    assert rel(_logits(PeftModel.from_pretrained(make_tiny_llama(SEED), tmp_path)), want) < 1e-4


# ------------------------------------------------------------------------------------------------------------- EoRA


def test_eora_save_is_an_ordinary_lora_for_the_compressed_base(tmp_path):
    original = make_tiny_llama(SEED)
    compressed = quantize(original, bits=3, group_size=16)
    pm = _train(svdadapt.wrap(copy.deepcopy(compressed), "eora", rank=RANK, calibration=CALIB, reference=original,
                              progress=False))
    want = _logits(pm)
    svdadapt.save(pm, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (RANK, RANK)  # no conversion, alpha = rank
    sd = load_file(tmp_path / "adapter_model.safetensors")
    peft_sd = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    assert same_state(sd, peft_sd)
    # the same fp32 weights, another forward order only
    assert rel(_logits(PeftModel.from_pretrained(copy.deepcopy(compressed), tmp_path)), want) < 1e-6
    re = svdadapt.load(copy.deepcopy(compressed), tmp_path, progress=False)
    assert same_state(re.state_dict(), pm.state_dict())
    with pytest.raises(ValueError, match=r"first mismatch at module 'model\.layers\.0\.self_attn\.q_proj'"):
        svdadapt.load(make_tiny_llama(SEED), tmp_path, progress=False)  # the uncompressed model is not its base
    u = svdadapt.unwrap(re)  # EoRA's base is W_c, untouched
    assert same_state(u.state_dict(), compressed.state_dict())


def test_load_warns_when_residual_is_not_bit_identical(trained, tmp_path):
    """A different BLAS / device may round the rebuilt residual differently: the weights matched, so it warns."""
    from svdadapt.lifecycle.checkpoint import read_checkpoint, write_checkpoint

    _, _, _, d = trained
    saved = read_checkpoint(d)
    name = saved.meta["targets"][0]
    saved.meta["residual_checksums"][name] = "0" * 64  # as saved on a device that rounded this residual otherwise
    write_checkpoint(tmp_path, saved.meta, saved.init, saved.current, extras=saved.extras)
    with pytest.warns(UserWarning, match=rf"rebuilt residual of 1 module\(s\) \(first '{name}'\) is not bit-identical"):
        svdadapt.load(make_tiny_llama(SEED), tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        svdadapt.load(make_tiny_llama(SEED), d, progress=False)


def _as_sha256_record(d, to):
    """Directory ``d`` rewritten into ``to`` as records written before crc32 held it: every base checksum the
    sha256 of the original weight (what ``weight_checksum`` gave then, and still gives by default)."""
    from svdadapt.core.record import weight_checksum
    from svdadapt.lifecycle.checkpoint import read_checkpoint, write_checkpoint

    saved = read_checkpoint(d)
    modules = dict(make_tiny_llama(SEED).named_modules())
    assert all(v.startswith("crc32:") for v in saved.meta["base_checksums"].values())  # what wrap records now
    saved.meta["base_checksums"] = {n: weight_checksum(modules[n].weight) for n in saved.meta["targets"]}
    write_checkpoint(to, saved.meta, saved.init, saved.current, extras=saved.extras)
    return to


def test_records_with_sha256_base_checksums_still_load_and_verify(trained, tmp_path):
    method, _, want, d = trained
    old = _as_sha256_record(d, tmp_path)
    re = svdadapt.load(make_tiny_llama(SEED), old, progress=False)
    torch.testing.assert_close(_logits(re), want, rtol=0, atol=0)  # the same model, bit for bit
    base = make_tiny_llama(SEED)
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6  # an input, as in the test above
    with pytest.raises(ValueError, match=r"first mismatch at module 'model\.layers\.1\.mlp\.down_proj' \(weight "
                                         r"\(64, 128\) torch\.float32, sha256 [0-9a-f]{12}…, expected sha256 "
                                         r"[0-9a-f]{12}…\)$"):
        svdadapt.load(base, old, progress=False)


def test_a_crc32_mismatch_names_its_algorithm(trained):
    _, _, _, d = trained
    base = make_tiny_llama(SEED)
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    with pytest.raises(ValueError, match=r"\(weight \(64, 128\) torch\.float32, crc32 [0-9a-f]{8}…, expected crc32 "
                                         r"[0-9a-f]{8}…\)$"):
        svdadapt.load(base, d, progress=False)


def test_the_lora_config_says_what_peft_would_build(trained):
    """PEFT builds the layers without its random init (the factors are written next); the config it keeps, and
    so adapter_config.json and svdadapt.json's lora_config, still says init_lora_weights=True."""
    _, pm, _, d = trained
    assert pm.peft_config["default"].init_lora_weights is True
    assert json.load(open(d / META_FILE))["lora_config"]["init_lora_weights"] is True


def test_lora_layers_no_factor_names_get_peft_init(monkeypatch):
    """A LoRA layer PEFT builds that the factors do not name (a config matching more modules) keeps PEFT's init of
    the config (B = 0: the layer's output unchanged), as when PEFT initialized every layer itself."""
    from peft import LoraConfig

    from svdadapt.engine.apply import apply

    model = make_tiny_llama(SEED)
    x = _logits(model)
    config = LoraConfig(r=RANK, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    name = "model.layers.0.self_attn.q_proj"
    A = torch.zeros(RANK, 64)
    B = torch.zeros(64, RANK)
    pm = apply(model, config, {name: (A, B)}, rewrite_base=False)
    v = pm.base_model.model.model.layers[0].self_attn.v_proj
    assert bool((v.lora_B["default"].weight == 0).all()) and bool(v.lora_A["default"].weight.abs().sum() > 0)
    torch.testing.assert_close(_logits(pm), x, rtol=0, atol=0)
    assert config.init_lora_weights is True


def test_trainer_checkpoints_resume_bit_exactly(tmp_path):
    """HF Trainer saves checkpoints through save_pretrained (the guard: portable + resumable) and resumes through
    load_adapter (the guard restores the rank-r factors): a resumed run ends where the uninterrupted one did."""
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": t, "labels": t} for t in token_ids(4, 16, seed=0)]

    def run(out, resume=None):
        pm = _wrap("pissa", target_modules=["q_proj", "v_proj", "down_proj"])
        args = TrainingArguments(output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, logging_strategy="no", seed=0,
                                 disable_tqdm=True)
        Trainer(model=pm, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return pm

    full = run(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoint-1"
    assert (ckpt / META_FILE).is_file() and json.loads((ckpt / "adapter_config.json").read_text())["r"] == 2 * RANK
    resumed = run(tmp_path / "resumed", resume=str(ckpt))
    a, b = full.state_dict(), resumed.state_dict()
    assert same_state(a, b)
    assert not torch.equal(a[next(k for k in a if "lora_A" in k)], full.svdadapt["init_factors"][full.svdadapt["targets"][0]][0])


def test_bf16_export_is_as_close_as_the_dtype_allows_and_load_stays_exact(tmp_path):
    """In bf16 the trained model runs on bf16(W_res), the export on bf16(W): they differ by one rounding of the
    base, the same order as casting the model to bf16 at all. load() stays bit-identical."""
    bf = torch.bfloat16
    pm = _train(_wrap("pissa", model=make_tiny_llama(SEED, dtype=bf)), steps=3)
    want = _logits(pm).float()
    svdadapt.save(pm, tmp_path)
    got = _logits(PeftModel.from_pretrained(make_tiny_llama(SEED, dtype=bf), tmp_path)).float()
    cast_error = rel(_logits(make_tiny_llama(SEED, dtype=bf)).float(), _logits(make_tiny_llama(SEED)))
    assert rel(got, want) < 2 * cast_error
    re = svdadapt.load(make_tiny_llama(SEED, dtype=bf), tmp_path, progress=False)
    assert same_state(re.state_dict(), pm.state_dict())
    u, o = svdadapt.unwrap(re).state_dict(), make_tiny_llama(SEED, dtype=bf).state_dict()
    ulp = 2.0 ** -8  # bf16 spacing relative to the largest entry's binade, at most
    assert all((u[k].float() - o[k].float()).abs().max() <= ulp * o[k].float().abs().max() for k in o)
