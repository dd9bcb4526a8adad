"""svdadapt.init_checkpoint: streaming init from a safetensors checkpoint, tensor by tensor.

The key property: what it writes is what the in-memory ``svdadapt init`` writes, bit for bit (the rewritten base,
the adapter, the resume state, svdadapt.json, report.json), and plain transformers + PEFT load it into a model whose
outputs equal the original's. An interrupted run resumes to the same bytes without recomputing finished layers, and
peak memory follows the largest tensor, not the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import svdadapt
import svdadapt.lifecycle.initdir as initdir
import svdadapt.stream.init as stream
import svdadapt.stream.calibrated as stream_calibrated
import svdadapt.stream.journal as stream_journal
import svdadapt.storage.shardfile as shardfile
from svdadapt.cli import main as cli_main
from svdadapt.storage.shards import INDEX_FILE, JOURNAL_FILE, CheckpointReader

from helpers import bits, make_tiny_llama, out, safetensors_dict, token_ids

ROOT = Path(__file__).resolve().parents[2]
FILES = ["adapter/adapter_model.safetensors", "svdadapt_state.safetensors", "svdadapt.json", "report.json"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-identity with the in-memory path holds at equal thread counts; one thread is also the fastest here."""


def _checkpoint(d: Path, model: torch.nn.Module, shard: str = "100KB") -> Path:
    model.save_pretrained(d, max_shard_size=shard)
    (d / "tokenizer_config.json").write_text('{"model_max_length": 64}')  # any non-weight file is copied
    return d


def _assert_same_base(a: Path, b: Path) -> None:
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.names) == sorted(rb.names)
    for n in ra.names:
        x, y = ra.get(n), rb.get(n)
        assert x.dtype == y.dtype and x.shape == y.shape, n
        assert torch.equal(bits(x), bits(y)), f"{n} differs"


def _assert_same_output(a: Path, b: Path) -> None:
    """Everything ``svdadapt init`` writes, compared: tensors bit for bit, JSON records byte for byte."""
    _assert_same_base(a / "base", b / "base")
    for f in FILES:
        if f.endswith(".safetensors"):
            ta, tb = safetensors_dict(a / f), safetensors_dict(b / f)
            assert ta.keys() == tb.keys()
            assert all(torch.equal(bits(ta[k]), bits(tb[k])) for k in ta), f
        elif f == "svdadapt.json":  # the manifest lists each run's own base shards and adapter paths
            ma, mb = (json.loads((d / f).read_text()) for d in (a, b))
            fa, fb = ma.pop("files"), mb.pop("files")
            assert ma == mb and all(fa[k] == fb[k] for k in ("svdadapt_state.safetensors", "report.json"))
        else:
            assert (a / f).read_text() == (b / f).read_text(), f
    ca, cb = (json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (a, b))
    assert ca.pop("base_model_name_or_path") == str((a / "base").resolve())
    assert cb.pop("base_model_name_or_path") == str((b / "base").resolve())
    assert set(ca.pop("target_modules")) == set(cb.pop("target_modules"))  # PEFT writes a set: any order
    assert ca == cb


def _cli_init(ck: Path, out_dir: Path, method: str, rank: int, *extra: str) -> None:
    assert cli_main(["init", str(ck), "--method", method, "--rank", str(rank), "--out", str(out_dir), "--no-progress",
                     *extra]) == 0


def _file_hashes(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


# ------------------------------------------------------------------------------------------- equal to in-memory


@pytest.mark.parametrize("method, dtype, targets, svd", [
    ("pissa", torch.float32, None, "auto"),
    ("milora", torch.float32, None, "auto"),
    ("pissa", torch.bfloat16, None, "auto"),
    ("pissa", torch.float32, ["q_proj", "v_proj", "down_proj"], "randomized"),
])
def test_same_as_in_memory_init(tmp, method, dtype, targets, svd):
    ck = _checkpoint(tmp / "ck", make_tiny_llama(0, dtype))
    assert (ck / INDEX_FILE).is_file() and len(list(ck.glob("model-*.safetensors"))) >= 2
    res = svdadapt.init_checkpoint(ck, tmp / "s", method=method, rank=4, target_modules=targets or "all-linear",
                                   svd=svd, max_shard_bytes=40_000, progress=False)
    assert res == tmp / "s"
    _cli_init(ck, tmp / "m", method, 4, "--svd", svd, *(["--target-modules", *targets] if targets else []))
    _assert_same_output(tmp / "s", tmp / "m")
    base = tmp / "s" / "base"
    assert (base / INDEX_FILE).is_file() and len(list(base.glob("model-*-of-*.safetensors"))) > 2  # sharded
    assert (base / "tokenizer_config.json").read_text() == (ck / "tokenizer_config.json").read_text()
    assert not (tmp / "s" / stream.STREAM_DIR).exists() and not (base / JOURNAL_FILE).exists()
    meta = json.loads((tmp / "s" / "svdadapt.json").read_text())
    assert len(meta["targets"]) == (14 if targets is None else 6)
    untouched = "model.embed_tokens.weight"  # copied through
    assert torch.equal(CheckpointReader(base).get(untouched), CheckpointReader(ck).get(untouched))


def test_conv1d_checkpoint_same_as_in_memory(tmp):
    """GPT-2 stores its Conv1D weights (in, out): read transposed, written back in that layout."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)).eval()
    ck = _checkpoint(tmp / "ck", model, shard="20KB")
    svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=3, max_shard_bytes=20_000, progress=False)
    _cli_init(ck, tmp / "m", "pissa", 3)
    _assert_same_output(tmp / "s", tmp / "m")
    assert json.loads((tmp / "s" / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


@pytest.mark.filterwarnings("ignore:The PEFT config's `base_model_name_or_path` was renamed")  # a fresh model: no path
def test_loads_with_transformers_peft_and_svdadapt(tmp):
    from peft import PeftModel

    original = make_tiny_llama(0)
    ck = _checkpoint(tmp / "ck", original)
    svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=4, alpha=8, max_shard_bytes=30_000, progress=True)
    x = token_ids(2, 16, seed=3)
    want = out(original, x)
    base = AutoModelForCausalLM.from_pretrained(tmp / "s" / "base")
    wrapped = PeftModel.from_pretrained(base, tmp / "s" / "adapter").eval()
    # two fp32 forwards of the same effective weights (√n·u per layer, n ≤ 128)
    torch.testing.assert_close(out(wrapped, x), want, rtol=1e-5, atol=1e-5)  # exact at init, up to fp32 rounding
    with wrapped.disable_adapter():  # the base alone is the residual W − s·B₀·A₀, far from W
        # a "differs by more than" check: O(1) vs rounding
        assert (out(wrapped, x) - want).abs().max() > 1e-3

    loaded = svdadapt.load(make_tiny_llama(0), tmp / "s")  # verifies W's checksums, rebuilds the residual
    # as at init: two fp32 forwards
    torch.testing.assert_close(out(loaded, x), want, rtol=1e-5, atol=1e-5)
    rebuilt = dict(loaded.get_base_model().named_parameters())
    reader = CheckpointReader(tmp / "s" / "base")
    for name in json.loads((tmp / "s" / "svdadapt.json").read_text())["targets"]:
        key = name + ".base_layer.weight"
        assert torch.equal(rebuilt[key], reader.get(name + ".weight")), name  # the same residual, bit for bit


# ------------------------------------------------------------------------------------------- resume


class _Crash(RuntimeError):
    pass


def _counting_plan_layer(monkeypatch, crash_after: int | None = None) -> list[str]:
    """Patch the engine call the streaming paths make: record each layer planned, raise after ``crash_after``."""
    calls: list[str] = []
    real = stream_journal.plan_layer

    def plan(job, layer, *a, **kw):
        if crash_after is not None and len(calls) == crash_after:
            raise _Crash(f"simulated interruption before {layer.name}")
        calls.append(layer.name)
        return real(job, layer, *a, **kw)

    monkeypatch.setattr(stream_journal, "plan_layer", plan)
    monkeypatch.setattr(stream_calibrated, "plan_layer", plan)
    return calls


def _run(ck: Path, out_dir: Path, **kw) -> Path:
    return svdadapt.init_checkpoint(ck, out_dir, method="pissa", rank=4, max_shard_bytes=40_000, progress=False, **kw)


def test_resume_after_interruption_keeps_shards_and_factors(tmp, monkeypatch):
    ck = _checkpoint(tmp / "ck", make_tiny_llama(1))
    _run(ck, tmp / "whole")
    calls = _counting_plan_layer(monkeypatch, crash_after=9)
    with pytest.raises(_Crash):
        _run(ck, tmp / "s")
    journal = tmp / "s" / stream.STREAM_DIR
    progress = json.loads((tmp / "s" / "base" / JOURNAL_FILE).read_text())
    assert progress["shards"], "some shards were completed before the interruption"
    kept = {s["file"]: s["sha256"] for s in progress["shards"]}
    assert sorted(f.stem for f in (journal / "layers").glob("*.safetensors")) == sorted(calls)

    monkeypatch.undo()
    calls = _counting_plan_layer(monkeypatch)
    _run(ck, tmp / "s")
    assert len(calls) == 14 - 9 and not set(calls) & set(f.stem for f in (journal / "layers").glob("*"))
    assert not journal.exists()
    _assert_same_output(tmp / "s", tmp / "whole")
    hashes, whole = _file_hashes(tmp / "s"), _file_hashes(tmp / "whole")
    # byte-identical files, but for the adapter's base_model_name_or_path (each run's own out/base) and its hash
    unlike = ("adapter_config.json", "svdadapt.json")
    assert {k: v for k, v in hashes.items() if not k.endswith(unlike)} == \
           {k: v for k, v in whole.items() if not k.endswith(unlike)}
    assert len(kept) >= 2 and set(kept.values()) <= set(hashes.values())  # the kept shards are those files


def test_a_kill_inside_a_shard_written_in_place_resumes_to_the_same_bytes(tmp, monkeypatch):
    """The base's shards are filled in place: a kill leaves the shard being filled on disk, header and some
    tensors written (here the clean-up a kill skips is skipped). The resumed run deletes it and writes that shard
    again from its first tensor: the same files."""
    ck = _checkpoint(tmp / "ck", make_tiny_llama(1))
    _run(ck, tmp / "whole")
    _counting_plan_layer(monkeypatch, crash_after=4)  # at layer 0's o_proj, whose shard holds k_proj already
    monkeypatch.setattr(shardfile.ShardFile, "abort", lambda self: os.close(self._fd))  # a kill: nothing cleaned
    with pytest.raises(_Crash):
        _run(ck, tmp / "s")
    progress = json.loads((tmp / "s" / "base" / JOURNAL_FILE).read_text())
    partial = tmp / "s" / "base" / f".model-{len(progress['shards']) + 1:05d}.safetensors.tmp"
    assert partial.is_file() and partial.stat().st_size > 0  # its final size, holes where tensors are missing
    monkeypatch.undo()
    _run(ck, tmp / "s")
    assert not partial.exists()
    hashes, whole = _file_hashes(tmp / "s"), _file_hashes(tmp / "whole")
    unlike = ("adapter_config.json", "svdadapt.json")  # each run's own out/base in base_model_name_or_path
    assert {k: v for k, v in hashes.items() if not k.endswith(unlike)} == \
           {k: v for k, v in whole.items() if not k.endswith(unlike)}


@pytest.mark.parametrize("where", ["after_base", "in_records"])
def test_resume_after_the_base_is_written(tmp, monkeypatch, where):
    """Killed after the last shard (before or after the run recorded it): nothing is decomposed again."""
    ck = _checkpoint(tmp / "ck", make_tiny_llama(2))
    _run(ck, tmp / "whole")
    target = (stream.Journal, "mark_base_complete") if where == "after_base" else (initdir, "write_checkpoint")

    def boom(*a, **kw):
        raise _Crash(where)

    monkeypatch.setattr(*target, boom)
    with pytest.raises(_Crash):
        _run(ck, tmp / "s")
    monkeypatch.undo()
    calls = _counting_plan_layer(monkeypatch)
    _run(ck, tmp / "s")
    assert calls == []
    _assert_same_output(tmp / "s", tmp / "whole")


def test_resume_refusals(tmp, monkeypatch):
    ck = _checkpoint(tmp / "ck", make_tiny_llama(3))
    _counting_plan_layer(monkeypatch, crash_after=3)
    with pytest.raises(_Crash):
        _run(ck, tmp / "s")
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="unfinished init_checkpoint run.*resume=True"):
        _run(ck, tmp / "s", resume=False)
    with pytest.raises(ValueError, match=r"another job \(rank differ\)"):
        svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=5, max_shard_bytes=40_000, progress=False)
    _run(ck, tmp / "s")
    with pytest.raises(FileExistsError, match="not an empty directory"):  # complete: nothing to resume
        _run(ck, tmp / "s")
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other"):
        _run(ck, tmp / "other")
    assert (tmp / "other" / "notes.txt").read_text() == "mine"


def test_resume_detects_a_changed_weight(tmp, monkeypatch):
    """A layer's factors are reused only for the weight they were computed from (its sha256 is journaled)."""
    ck = _checkpoint(tmp / "ck", make_tiny_llama(4), shard="10MB")  # one file: rewrite it with one weight changed
    calls = _counting_plan_layer(monkeypatch, crash_after=2)
    with pytest.raises(_Crash):
        svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=4, max_shard_bytes=1 << 30, progress=False)
    monkeypatch.undo()
    from safetensors.torch import save_file

    sd = safetensors_dict(ck / "model.safetensors")
    sd[calls[0] + ".weight"] = sd[calls[0] + ".weight"] * 2
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"weight of '{calls[0]}'.*changed"):
        svdadapt.init_checkpoint(ck, tmp / "s", method="pissa", rank=4, max_shard_bytes=1 << 30, progress=False)


# ------------------------------------------------------------------------------------------- errors


def test_errors_name_the_path_or_module(tmp):
    ck = _checkpoint(tmp / "ck", make_tiny_llama(5))
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory.*nowhere"):
        svdadapt.init_checkpoint(tmp / "nowhere", tmp / "o", method="pissa", rank=4)
    (tmp / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in checkpoint directory.*bare"):
        svdadapt.init_checkpoint(tmp / "bare", tmp / "o", method="pissa", rank=4)
    with pytest.raises(ValueError, match="method 'corda' needs calibration=: an iterable of batches"):
        svdadapt.init_checkpoint(ck, tmp / "o", method="corda", rank=4)
    with pytest.raises(TypeError, match="calibrates block by block from batches.*got dict.*svdadapt.wrap"):
        svdadapt.init_checkpoint(ck, tmp / "o", method="corda", rank=4, calibration={"q": torch.eye(2)})
    with pytest.raises(ValueError, match="method 'pissa' takes no calibration data; drop calibration="):
        svdadapt.init_checkpoint(ck, tmp / "o", method="pissa", rank=4, calibration=[token_ids(1, 4, 0)])
    with pytest.raises(ValueError, match="method 'eora' from a checkpoint needs reference=: the directory of the "
                                         "uncompressed checkpoint .checkpoint_dir is the compressed one., got NoneType"):
        svdadapt.init_checkpoint(ck, tmp / "o", method="eora", rank=4, calibration=[token_ids(1, 4, 0)])
    with pytest.raises(ValueError, match="reference= applies to EoRA only, not to method 'pissa'"):
        svdadapt.init_checkpoint(ck, tmp / "o", method="pissa", rank=4, reference=ck)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory.*nowhere"):
        svdadapt.init_checkpoint(ck, tmp / "o", method="eora", rank=4, reference=tmp / "nowhere",
                                 calibration=[token_ids(1, 4, 0)])
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        svdadapt.init_checkpoint(ck, tmp / "o", method="lora", rank=4)
    with pytest.raises(ValueError, match=r"rank=33 exceeds min\(out, in\) = 32 of module '.*k_proj' with weight \(32, 64\)"):
        svdadapt.init_checkpoint(ck, tmp / "o", method="pissa", rank=33)
    with pytest.raises(ValueError, match="svd='randomized' cannot find the smallest"):
        svdadapt.init_checkpoint(ck, tmp / "o", method="milora", rank=4, svd="randomized")
    assert not (tmp / "o").exists()  # every check runs before anything is written


def test_missing_target_and_tied_weights(tmp):
    from safetensors.torch import save_file

    ck = _checkpoint(tmp / "ck", make_tiny_llama(6), shard="10MB")
    sd = safetensors_dict(ck / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj' has no weight .* in checkpoint .*ck"):
        svdadapt.init_checkpoint(ck, tmp / "o", method="pissa", rank=4)
    # only the other targets: fine
    svdadapt.init_checkpoint(ck, tmp / "o", method="pissa", rank=4, exclude_modules=["up_proj"], progress=False)

    tied = _checkpoint(tmp / "tied", make_tiny_llama(7, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'model.embed_tokens'"):
        svdadapt.init_checkpoint(tied, tmp / "t", method="pissa", rank=4, target_modules=["lm_head", "q_proj"])


# ------------------------------------------------------------------------------------------- memory


_MEASURE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import peft, svdadapt, svdadapt.stream.init as stream

    def status(key):  # kB; VmHWM is this process image's peak (ru_maxrss would carry the parent's across exec)
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

    stream._skeleton(Path(sys.argv[1]))  # transformers' model code imported: part of the interpreter's baseline
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current RSS
    except OSError:
        pass
    base = status("VmRSS")
    t = time.perf_counter()
    svdadapt.init_checkpoint(sys.argv[1], sys.argv[2], method="pissa", rank=16, max_shard_bytes=int(sys.argv[3]),
                             progress=False)
    print(json.dumps({"growth": (status("VmHWM") - base) * 1024, "seconds": time.perf_counter() - t}))
""")


def test_peak_memory_follows_the_largest_tensor(tmp):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _synthetic

    cfg = dict(hidden=1024, intermediate=2048, layers=7, vocab=2048, heads=16, kv_heads=16)  # 310 MB in fp32
    total = _synthetic.llama_nbytes(cfg)
    largest = max(4 * math.prod(shape) for _, shape in _synthetic.llama_tensor_specs(**cfg))  # fp32 bytes
    assert total > 300e6 and largest <= 8 << 20
    t = time.perf_counter()
    _synthetic.write_random_llama(tmp / "ck", **cfg, max_shard_bytes=100 << 20)
    print(f"\nwrote the synthetic checkpoint in {time.perf_counter() - t:.1f} s")
    shard = 32 << 20
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp / "ck"), str(tmp / "s"), str(shard)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS growth {got['growth'] / 2**20:.0f} MiB for a {total / 1e6:.0f} MB checkpoint, largest tensor "
          f"{largest / 2**20:.0f} MiB, shards of {shard >> 20} MiB; {got['seconds']:.1f} s")
    assert got["growth"] < 10 * largest + shard
    assert got["growth"] < total / 3  # the in-memory path needs the whole model
    assert len(list((tmp / "s" / "base").glob("model-*-of-*.safetensors"))) >= 9


# ------------------------------------------------------------------------------------------- CorDA, block by block


def _calibration(seeds=(0, 1, 2)) -> list[dict]:
    return [{"input_ids": token_ids(2, 16, s), "attention_mask": torch.ones(2, 16, dtype=torch.long)} for s in seeds]


def _adapter_factors(d: Path) -> dict[str, torch.Tensor]:
    return safetensors_dict(d / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("mode, dtype", [("ipa", torch.float32), ("kpa", torch.float32), ("ipa", torch.bfloat16)])
def test_streamed_corda_equals_wrap_on_the_loaded_model(tmp, mode, dtype):
    """The checkpoint's blocks loaded one at a time give wrap's adapters and residual base, bit for bit (a bf16
    checkpoint runs in bf16, as from_pretrained loads it)."""
    ck = _checkpoint(tmp / "ck", make_tiny_llama(6, dtype))
    svdadapt.init_checkpoint(ck, tmp / "s", method="corda", rank=4, mode=mode, calibration=_calibration(),
                             max_shard_bytes=40_000, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(ck)  # as a user loads it (bf16 stays bf16)
    assert loaded.dtype == dtype
    pm = svdadapt.wrap(loaded, "corda", 4, mode=mode, calibration=_calibration(), progress=False)
    factors = _adapter_factors(tmp / "s")
    assert len(factors) == 2 * 14
    for n, (A, B) in pm.svdadapt.init_factors.items():
        key = next(k for k in factors if f".{n}.lora_A." in k)
        assert torch.equal(factors[key], A) and torch.equal(factors[key.replace("lora_A", "lora_B")], B), n
    base, state = CheckpointReader(tmp / "s" / "base"), pm.get_base_model().state_dict()
    for key in base.names:
        mine = key.replace(".weight", ".base_layer.weight") if key.replace(".weight", ".base_layer.weight") in state \
            else key
        assert torch.equal(base.get(key), state[mine]), key
    meta = json.loads((tmp / "s" / "svdadapt.json").read_text())
    assert meta["method"] == "corda" and meta["options"]["mode"] == mode and meta["options"]["damping"] == 0.01


def test_streamed_corda_on_a_mixed_dtype_checkpoint_runs_as_the_loaded_model(tmp):
    """Norms stored in fp32 beside bf16 projections: from_pretrained casts every parameter to the config's dtype,
    and the streamed blocks do the same (they used to feed an fp32 norm output into a bf16 projection: "expected m1
    and m2 to have the same dtype"); the adapters equal wrap's on the loaded model bit for bit."""
    model = make_tiny_llama(6, torch.bfloat16)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = p.data.float()
    ck = _checkpoint(tmp / "ck", model)
    assert {CheckpointReader(ck).dtype(k) for k in CheckpointReader(ck).names} == {torch.float32, torch.bfloat16}
    svdadapt.init_checkpoint(ck, tmp / "s", method="corda", rank=4, calibration=_calibration(), progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(ck)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    pm = svdadapt.wrap(loaded, "corda", 4, calibration=_calibration(), progress=False)
    factors = _adapter_factors(tmp / "s")
    for n, (A, B) in pm.svdadapt.init_factors.items():
        key = next(k for k in factors if f".{n}.lora_A." in k)
        assert torch.equal(factors[key], A) and torch.equal(factors[key.replace("lora_A", "lora_B")], B), n


def test_streamed_corda_holds_one_block_at_a_time(tmp, monkeypatch):
    from svdadapt.stream.lazy import LazyBlocks

    ck = _checkpoint(tmp / "ck", make_tiny_llama(7))
    seen: list[int] = []
    real = LazyBlocks.use

    def use(self, j):
        real(self, j)
        seen.append(sum(any(not p.is_meta for p in b.parameters()) for b in self.blocks))

    monkeypatch.setattr(LazyBlocks, "use", use)
    svdadapt.init_checkpoint(ck, tmp / "s", method="corda", rank=4, calibration=_calibration(), progress=False)
    assert max(seen) == 1  # never two blocks in memory
    n_blocks = make_tiny_llama(7).config.num_hidden_layers
    assert seen.count(1) == len(seen) and len(seen) >= n_blocks


def test_streamed_corda_resumes_with_the_same_calibration_only(tmp, monkeypatch):
    ck = _checkpoint(tmp / "ck", make_tiny_llama(8))
    run = dict(method="corda", rank=4, max_shard_bytes=40_000, progress=False)
    svdadapt.init_checkpoint(ck, tmp / "whole", calibration=_calibration(), **run)
    calls = _counting_plan_layer(monkeypatch, crash_after=9)
    with pytest.raises(_Crash):
        svdadapt.init_checkpoint(ck, tmp / "s", calibration=_calibration(), **run)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"another job \(calibration differ\)"):
        svdadapt.init_checkpoint(ck, tmp / "s", calibration=_calibration((0, 1, 3)), **run)
    calls = _counting_plan_layer(monkeypatch)
    svdadapt.init_checkpoint(ck, tmp / "s", calibration=_calibration(), **run)
    assert len(calls) == 14 - 9  # the journaled layers are not decomposed again
    _assert_same_output(tmp / "s", tmp / "whole")


def test_cli_streams_corda_as_the_in_memory_init_writes_it(tmp, capsys):
    from helpers import tiny_tokenizer

    ck = _checkpoint(tmp / "ck", make_tiny_llama(9, vocab_size=300))
    tiny_tokenizer(300).save_pretrained(ck)
    (tmp / "calib.txt").write_text(" ".join(["def f(x): return x + 1  # a function"] * 40))
    calib = ["--calib", str(tmp / "calib.txt"), "--seq-len", "32", "--batch-size", "2"]
    _cli_init(ck, tmp / "s", "corda", 4, *calib, "--mode", "kpa")
    assert "one decoder block at a time" in capsys.readouterr().err
    _cli_init(ck, tmp / "m", "corda", 4, *calib, "--mode", "kpa", "--in-memory")
    assert "loading" in capsys.readouterr().err
    _assert_same_output(tmp / "s", tmp / "m")


# ------------------------------------------------------------------------------------------- EoRA, block by block


@pytest.mark.parametrize("calibrate_on, sequential", [("reference", None), ("compressed", None),
                                                      ("reference", False)])
def test_streamed_eora_equals_wrap_on_the_loaded_models(tmp, calibrate_on, sequential):
    """Compressed and reference checkpoints, each read one block at a time: wrap's adapters bit for bit (sequential
    inputs by default, as wrap's), and the compressed checkpoint copied through as the base."""
    import copy

    from svdadapt.blockwise import BlockwiseOptions

    model = make_tiny_llama(10)
    qmodel = svdadapt.compress.quantize(model, bits=3, group_size=16)
    ref, ck = _checkpoint(tmp / "ref", model), _checkpoint(tmp / "q", qmodel)
    blockwise = None if sequential is None else BlockwiseOptions(sequential=sequential)
    svdadapt.init_checkpoint(ck, tmp / "s", method="eora", rank=4, reference=ref, calibrate_on=calibrate_on,
                             calibration=_calibration(), blockwise=blockwise, max_shard_bytes=40_000, progress=False)
    pm = svdadapt.wrap(copy.deepcopy(qmodel), "eora", 4, reference=model, calibrate_on=calibrate_on,
                       calibration=_calibration(), blockwise=blockwise, progress=False)
    factors = _adapter_factors(tmp / "s")
    for n, (A, B) in pm.svdadapt.init_factors.items():
        key = next(k for k in factors if f".{n}.lora_A." in k)
        assert torch.equal(factors[key], A) and torch.equal(factors[key.replace("lora_A", "lora_B")], B), n
    _assert_same_base(tmp / "s" / "base", ck)
    meta = json.loads((tmp / "s" / "svdadapt.json").read_text())
    assert meta["source"] == {"model": str(ck.resolve()), "reference": str(ref.resolve())}


def test_cli_streams_eora_as_the_in_memory_init_writes_it(tmp, capsys):
    from helpers import tiny_tokenizer

    model = make_tiny_llama(11, vocab_size=300)
    ref, ck = _checkpoint(tmp / "ref", model), _checkpoint(tmp / "q", svdadapt.compress.quantize(model, bits=3))
    tiny_tokenizer(300).save_pretrained(ck)
    (tmp / "calib.txt").write_text(" ".join(["class A: pass  # a class statement"] * 40))
    args = ["--reference", str(ref), "--calib", str(tmp / "calib.txt"), "--seq-len", "32", "--batch-size", "2"]
    _cli_init(ck, tmp / "s", "eora", 4, *args)
    assert "one decoder block at a time" in capsys.readouterr().err
    _cli_init(ck, tmp / "m", "eora", 4, *args, "--in-memory")
    _assert_same_output(tmp / "s", tmp / "m")


@pytest.mark.parametrize("method", ["corda", "eora"])
def test_streamed_with_a_target_outside_the_stack_equals_wrap(tmp, method):
    """An explicitly targeted lm_head: collected by a whole-model pass, its weight loaded outside the blocks."""
    import copy

    targets = ["q_proj", "down_proj", "lm_head"]
    model = make_tiny_llama(12)
    adapted = svdadapt.compress.quantize(model, bits=3, group_size=16) if method == "eora" else model
    ck = _checkpoint(tmp / "ck", adapted)
    kw = {}
    if method == "eora":
        kw = dict(reference=_checkpoint(tmp / "ref", model))
    svdadapt.init_checkpoint(ck, tmp / "s", method=method, rank=4, target_modules=targets, calibration=_calibration(),
                             progress=False, **kw)
    if method == "eora":
        kw = dict(reference=model)
    pm = svdadapt.wrap(copy.deepcopy(adapted), method, 4, target_modules=targets, calibration=_calibration(),
                       progress=False, **kw)
    factors = _adapter_factors(tmp / "s")
    assert any(".lm_head.lora_A." in k for k in factors)
    for n, (A, B) in pm.svdadapt.init_factors.items():
        key = next(k for k in factors if f".{n}.lora_A." in k)
        assert torch.equal(factors[key], A) and torch.equal(factors[key.replace("lora_A", "lora_B")], B), n
