"""svdadapt.storage.shards: the tensor-by-tensor checkpoint reader, the resumable sharded writer, and the synthetic Llama
checkpoints of benchmarks/_synthetic.py. Round trips are bit-exact; files of a resumed write are byte-identical
to those of an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from svdadapt.storage import shards
from svdadapt.storage.shards import INDEX_FILE, JOURNAL_FILE, SINGLE_FILE, CheckpointReader, ShardWriter, copy_files

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _synthetic  # noqa: E402
from helpers import bits  # noqa: E402

TINY = dict(hidden=64, intermediate=128, layers=2, vocab=128, heads=4, kv_heads=2)


def make_tiny_llama(seed: int) -> LlamaForCausalLM:
    """hidden 64, 2 layers, vocab 128, untied lm_head; seeded without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=False)).eval()


@pytest.fixture
def tmp():
    """A scratch directory under /tmp, deleted afterwards (pytest's tmp_path keeps old runs)."""
    with tempfile.TemporaryDirectory(prefix="svdadapt-shards-") as d:
        yield Path(d)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixed sizes and dtypes, 0-d and empty tensors included; 39,631 bytes in all."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (rows, cols) in enumerate([(40, 30), (8, 8), (64, 50), (3, 7), (30, 30), (100, 20), (5, 5), (40, 40)]):
        sd[f"layer{i}.weight"] = torch.randn(rows, cols, generator=g)
    sd["emb.bf16"] = torch.randn(50, 32, generator=g).to(torch.bfloat16)
    sd["emb.fp16"] = torch.randn(17, 3, generator=g).to(torch.float16)
    sd["ids.int64"] = torch.randint(0, 1 << 40, (33,), generator=g)
    sd["mask.bool"] = torch.rand(21, generator=g) > 0.5
    sd["scale.scalar"] = torch.tensor(3.25)
    sd["empty"] = torch.empty(0, 4)
    return sd


def _expected_groups(sd: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """The shard contract spelled out: flush before a tensor that would overflow, and once the limit is reached."""
    groups, cur, size = [], [], 0
    for name, t in sd.items():
        if cur and size + t.nbytes > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += t.nbytes
        if size >= limit:
            groups.append(cur)
            cur, size = [], 0
    return groups + ([cur] if cur else [])


def _write(out: Path, sd: dict[str, torch.Tensor], limit: int) -> Path:
    w = ShardWriter(out, max_shard_bytes=limit)
    for name, t in sd.items():
        w.add(name, t)
    return w.close()


def _files(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def _assert_samesafetensors_dict(reader: CheckpointReader, sd: dict[str, torch.Tensor]) -> None:
    assert sorted(reader.names) == sorted(sd)
    for name, t in sd.items():
        got = reader.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(bits(got), bits(t)), name


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_several_shards(tmp):
    sd = _state()
    limit = 8000
    groups = _expected_groups(sd, limit)
    assert len(groups) == 6
    assert _write(tmp, sd, limit) == tmp / INDEX_FILE
    n = len(groups)
    names = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(os.listdir(tmp)) == sorted(names + [INDEX_FILE])  # no journal, no temp files left
    index = json.loads((tmp / INDEX_FILE).read_text())
    assert sum(t.nbytes for t in sd.values()) == 39631
    assert index["metadata"] == {"total_size": 39631, "total_parameters": sum(t.numel() for t in sd.values())}
    assert index["weight_map"] == {name: names[k] for k, g in enumerate(groups) for name in g}
    for k, g in enumerate(groups):  # each shard holds its group, at most `limit` bytes unless one tensor alone
        with safe_open(str(tmp / names[k]), framework="pt") as f:
            assert sorted(f.keys()) == sorted(g) and f.metadata() == {"format": "pt"}
        assert sum(sd[x].nbytes for x in g) <= limit or len(g) == 1
    r = CheckpointReader(tmp)
    assert r.names == list(sd)  # index order = order added
    assert r.total_size == 39631 and r.files == [] and r.config is None
    for name, t in sd.items():
        assert (r.shape(name), r.dtype(name), r.nbytes(name)) == (t.shape, t.dtype, t.nbytes)
        assert r.file_of(name) == tmp / index["weight_map"][name]
    _assert_samesafetensors_dict(r, sd)


def test_single_shard_is_model_safetensors_without_index(tmp):
    sd = _state()
    assert _write(tmp, sd, 1 << 20) == tmp / SINGLE_FILE
    assert os.listdir(tmp) == [SINGLE_FILE]
    r = CheckpointReader(tmp)
    assert r.index_file is None
    _assert_samesafetensors_dict(r, sd)
    # a bare .safetensors path reads the same, with no config and nothing to copy
    r2 = CheckpointReader(tmp / SINGLE_FILE)
    assert r2.names == r.names and r2.config is None and r2.files == []


def test_a_tensor_over_the_limit_gets_its_own_shard_views_are_compacted_shared_storage_duplicated(tmp):
    big = torch.arange(10_000, dtype=torch.float32)  # 40 kB
    w = ShardWriter(tmp, max_shard_bytes=1000)
    w.add("a", torch.ones(10))
    w.add("view", big[:5])  # a view of 40 kB: held and written as 20 bytes
    assert w._pending["view"].untyped_storage().nbytes() == 20
    w.add("big", big)  # flushes [a, view], then itself at once (over the limit alone)
    assert w.shards == ["model-00001.safetensors", "model-00002.safetensors"] and not w._pending
    x = torch.arange(50, dtype=torch.float32)
    w.add("tied", x)
    w.add("tied_again", x)  # one storage under two names in one shard (safetensors refuses that): copied
    w.close()
    index = json.loads((tmp / INDEX_FILE).read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors", "view": "model-00001-of-00003.safetensors",
                                   "big": "model-00002-of-00003.safetensors", "tied": "model-00003-of-00003.safetensors",
                                   "tied_again": "model-00003-of-00003.safetensors"}
    assert index["metadata"]["total_size"] == 40 + 20 + 40_000 + 200 + 200
    r = CheckpointReader(tmp)
    assert torch.equal(r.get("big"), big) and torch.equal(r.get("view"), big[:5])
    assert torch.equal(r.get("tied"), x) and torch.equal(r.get("tied_again"), x)


def test_reads_a_transformers_sharded_checkpoint(tmp):
    model = make_tiny_llama(seed=3)  # hidden 64, 2 layers, vocab 128
    model.save_pretrained(tmp, max_shard_size="200KB")
    index = json.loads((tmp / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    r = CheckpointReader(tmp)
    sd = model.state_dict()
    assert r.names == list(index["weight_map"])  # index order (transformers sorts it by name)
    assert r.total_size == index["metadata"]["total_size"] == 361728
    assert [f.name for f in r.files] == ["config.json", "generation_config.json"]
    assert r.config["hidden_size"] == 64 and r.config["num_hidden_layers"] == 2
    _assert_samesafetensors_dict(r, sd)


def test_writer_output_loads_with_from_pretrained(tmp):
    model = make_tiny_llama(seed=4)
    src, out = tmp / "src", tmp / "out"
    model.save_pretrained(src, max_shard_size="200KB")
    r = CheckpointReader(src)
    w = ShardWriter(out, max_shard_bytes=100_000)
    for name in r.names:
        w.add(name, r.get(name))
    w.close()
    copy_files(r.files, out)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json"] + [
        f"model-{k:05d}-of-00004.safetensors" for k in range(1, 5)] + [INDEX_FILE]
    loaded, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values()), info
    ref = model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    x = torch.randint(0, 128, (2, 9))
    assert torch.equal(loaded(x).logits, model(x).logits)


# ---------------------------------------------------------------------------------------------------- resume

LIMIT = 8000  # 6 shards of _state(): [layer0, layer1], [layer2], [layer3, layer4], [layer5], [layer6, layer7], [rest]


def _crash_after(out: Path, sd: dict[str, torch.Tensor], n_added: int) -> ShardWriter:
    """Add the first n_added tensors and return the writer without closing it (the caller drops it: a kill)."""
    w = ShardWriter(out, max_shard_bytes=LIMIT)
    for name in list(sd)[:n_added]:
        w.add(name, sd[name])
    return w


def _finish(out: Path, sd: dict[str, torch.Tensor], resume: bool = True) -> ShardWriter:
    w = ShardWriter(out, max_shard_bytes=LIMIT, resume=resume)
    done = set(w.done)
    for name, t in sd.items():
        if name not in done:
            w.add(name, t)
    w.close()
    return w


def test_resume_after_crash_is_byte_identical(tmp):
    sd = _state()
    groups = _expected_groups(sd, LIMIT)
    _write(tmp / "ref", sd, LIMIT)

    out = tmp / "run"
    w = _crash_after(out, sd, 8)
    assert w.shards == [f"model-{k:05d}.safetensors" for k in (1, 2, 3, 4)]
    assert len(w._pending) == 2  # layer6 and layer7: in memory only, lost
    # killed while writing shard 5: a half-written temp file is left behind
    (out / ".model-00005.safetensors.tmp").write_bytes(b"\x00" * 1234)
    journal = json.loads((out / JOURNAL_FILE).read_text())
    assert [s["names"] for s in journal["shards"]] == groups[:4]
    del w

    w2 = ShardWriter(out, max_shard_bytes=LIMIT, resume=True)
    assert w2.done == {n for g in groups[:4] for n in g} and len(w2.done) == 6
    assert not (out / ".model-00005.safetensors.tmp").exists()
    with pytest.raises(ValueError, match="already written"):
        w2.add("layer0.weight", sd["layer0.weight"])
    for name, t in sd.items():
        if name not in w2.done:
            w2.add(name, t)
    w2.close()
    assert _files(out) == _files(tmp / "ref")  # same names, same bytes (index included)
    _assert_samesafetensors_dict(CheckpointReader(out), sd)


def test_resume_rewrites_a_corrupted_shard_and_all_after_it(tmp):
    sd = _state()
    groups = _expected_groups(sd, LIMIT)
    _write(tmp / "ref", sd, LIMIT)
    out = tmp / "run"
    del_w = _crash_after(out, sd, 10)
    assert len(del_w.shards) == 5
    del del_w
    shard2 = out / "model-00002.safetensors"
    data = bytearray(shard2.read_bytes())
    data[-100] ^= 0x01  # one bit of tensor data: the header still parses, the size is unchanged
    shard2.write_bytes(bytes(data))

    w = ShardWriter(out, max_shard_bytes=LIMIT, resume=True)
    assert w.done == set(groups[0])
    assert w.shards == ["model-00001.safetensors"]
    assert sorted(os.listdir(out)) == [JOURNAL_FILE, "model-00001.safetensors"]
    del w
    _finish(out, sd)
    assert _files(out) == _files(tmp / "ref")


def test_resume_after_a_kill_inside_close(tmp, monkeypatch):
    sd = _state()
    _write(tmp / "ref", sd, LIMIT)
    out = tmp / "run"
    w = _crash_after(out, sd, len(sd))
    real = shards._write_json_atomic

    def die_on_index(path, obj):
        if path.name == INDEX_FILE:
            raise KeyboardInterrupt("killed")
        real(path, obj)

    monkeypatch.setattr(shards, "_write_json_atomic", die_on_index)
    with pytest.raises(KeyboardInterrupt):
        w.close()  # shards already renamed to their final names, no index yet
    assert (out / "model-00006-of-00006.safetensors").exists() and (out / JOURNAL_FILE).exists()
    monkeypatch.setattr(shards, "_write_json_atomic", real)
    w2 = _finish(out, sd)
    assert w2.done == set(sd)
    assert _files(out) == _files(tmp / "ref")


def test_exception_in_context_manager_keeps_the_journal(tmp):
    sd = _state()
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp, max_shard_bytes=LIMIT) as w:
            for name, t in sd.items():
                w.add(name, t)
                if name == "layer5.weight":
                    raise RuntimeError("boom")
    assert (tmp / JOURNAL_FILE).exists() and not (tmp / INDEX_FILE).exists()
    w2 = ShardWriter(tmp, max_shard_bytes=LIMIT, resume=True)
    assert w2.done == {f"layer{i}.weight" for i in range(6)}  # layer5 filled shard 4 exactly: flushed


def test_writer_refuses_to_mix_with_existing_files(tmp):
    sd = _state()
    _write(tmp, sd, LIMIT)
    with pytest.raises(FileExistsError, match="resume=True"):
        ShardWriter(tmp, max_shard_bytes=LIMIT)
    with pytest.raises(FileExistsError, match="complete checkpoint"):
        ShardWriter(tmp, max_shard_bytes=LIMIT, resume=True)
    w = ShardWriter(tmp, max_shard_bytes=LIMIT, overwrite=True)  # deletes the old shards and index
    assert sorted(os.listdir(tmp)) == [JOURNAL_FILE]
    w.add("x", torch.ones(3))
    with pytest.raises(ValueError, match="added twice"):
        w.add("x", torch.ones(3))
    del w
    with pytest.raises(ValueError, match="max_shard_bytes=9000.*started with 8000"):
        ShardWriter(tmp, max_shard_bytes=9000, resume=True)
    with pytest.raises(ValueError, match="no tensors"):
        ShardWriter(tmp / "empty").close()


# ---------------------------------------------------------------------------------------------------- errors


def test_reader_errors_name_the_path(tmp):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp / "nope"))):
        CheckpointReader(tmp / "nope")
    (tmp / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"no {SINGLE_FILE} or {INDEX_FILE} in {tmp / 'empty'}")):
        CheckpointReader(tmp / "empty")
    (tmp / "empty" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        CheckpointReader(tmp / "empty")

    sd = _state()
    ck = tmp / "ck"
    _write(ck, sd, LIMIT)
    (ck / "model-00006-of-00006.safetensors").unlink()
    with pytest.raises(ValueError, match=r"to shard model-00006-of-00006\.safetensors, but .*model-00006-of-00006"
                                         r"\.safetensors does not exist"):
        CheckpointReader(ck)

    ck2 = tmp / "ck2"
    _write(ck2, sd, LIMIT)
    shard = ck2 / "model-00003-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ".*truncated or corrupt"):
        CheckpointReader(ck2)
    shard.write_bytes(b"\xff" * 64)  # garbage header
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        CheckpointReader(ck2)
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        CheckpointReader(shard)

    ck3 = tmp / "ck3"
    _write(ck3, sd, LIMIT)
    index = json.loads((ck3 / INDEX_FILE).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00006.safetensors"
    (ck3 / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'ghost' to shard model-00001-of-00006.safetensors"):
        CheckpointReader(ck3)
    (ck3 / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(ck3 / INDEX_FILE))):
        CheckpointReader(ck3)
    with pytest.raises(KeyError, match="no tensor 'missing'"):
        CheckpointReader(ck2 / "model-00001-of-00006.safetensors").get("missing")


# ---------------------------------------------------------------------------------------------------- memory

_MEM_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from safetensors import safe_open
    from svdadapt.storage import shards

    def status(key):  # KiB
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def start():  # reset the peak RSS to the current RSS (Linux >= 4.0): the imports' peak must not hide growth
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return status("VmRSS")

    def peak():  # = ru_maxrss, but resettable (ru_maxrss also keeps the peak of the imports)
        return status("VmHWM")

    RESET = os.access("/proc/self/clear_refs", os.W_OK)  # without it the growth is overestimated, never hidden
    path = sys.argv[1]
    out = {"reset": RESET}

    def read_all(get, names):
        digests, nbytes = {}, 0
        for name in names:
            t = get(name)
            digests[name] = hashlib.sha256(t.numpy()).hexdigest()  # touches every byte, copies none
            t.mul_(2)  # and writes every byte, as an engine that rewrites a weight in place would
            nbytes += t.nbytes
            del t
        return digests, nbytes

    for mode in ("pread", "fallback"):
        shards._PREAD = None if mode == "pread" else False  # fallback: safetensors without the pread backend
        r = shards.CheckpointReader(path)
        fds = len(os.listdir("/proc/self/fd"))
        before = start()
        digests, nbytes = read_all(r.get, r.names)
        out[mode] = dict(growth=peak() - before, nbytes=nbytes, digests=digests,
                         fds_grew=len(os.listdir("/proc/self/fd")) - fds, pread=shards._PREAD)
        del r

    # control: the same reads through one default (mmap) handle; the measure must see the file pile up
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        before = start()
        read_all(f.get_tensor, f.offset_keys())
        out["control"] = dict(growth=peak() - before)
    print(json.dumps(out))
""")


def test_reading_tensor_by_tensor_keeps_memory_flat(tmp):
    """200 MB in 50 tensors of 4 MB, one safetensors file. Reading, hashing and rewriting every tensor in place
    through get() grows the peak RSS of a fresh process by ~8 MB (one tensor and change), with safetensors' pread
    backend and with the fallback for safetensors without it; the same loop over one default mmap handle grows
    it by ~200 MB (the measure sees materialization)."""
    g = torch.Generator().manual_seed(0)
    digests = {}
    w = ShardWriter(tmp, max_shard_bytes=1 << 30)
    for i in range(50):
        t = torch.randn(1024, 1024, generator=g)
        digests[f"w{i}"] = hashlib.sha256(t.numpy()).hexdigest()
        w.add(f"w{i}", t)
    del t
    w.close()
    assert (tmp / SINGLE_FILE).stat().st_size > 200 * 2**20
    res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(tmp)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    mib = {k: out[k]["growth"] / 2**20 for k in ("pread", "fallback", "control")}
    print(f"peak RSS growth, 50 x 4 MB read via get(): {mib['pread']:.1f} MiB (pread), {mib['fallback']:.1f} MiB "
          f"(mmap fallback); one mmap handle: {mib['control']:.1f} MiB; peak reset: {out['reset']}")
    assert out["pread"]["pread"] is True and out["fallback"]["pread"] is False
    for mode in ("pread", "fallback"):
        assert out[mode]["nbytes"] == 50 * 4 * 2**20
        assert out[mode]["digests"] == digests  # every tensor read, bit-identical
        assert out[mode]["growth"] < 60 * 2**20, mode
        assert out[mode]["fds_grew"] == 0, mode  # no handle left open per get()
    assert out["control"]["growth"] > 150 * 2**20


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_llama_loads_in_transformers_and_is_deterministic(tmp):
    d = _synthetic.write_random_llama(tmp / "a", **TINY, max_shard_bytes=100_000, seed=7)
    r = CheckpointReader(d)
    assert len({r.file_of(n) for n in r.names}) == 4
    specs = _synthetic.llama_tensor_specs(**TINY)
    assert r.names == [n for n, _ in specs]
    model, info = LlamaForCausalLM.from_pretrained(d, output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert model.config.tie_word_embeddings is False and model.config.num_key_value_heads == 2
    sd = model.state_dict()
    assert sorted(sd) == sorted(r.names)
    for name, shape in specs:
        t = r.get(name)
        assert t.shape == shape and torch.equal(sd[name], t), name
        assert torch.equal(t, _synthetic.random_tensor(name, shape, seed=7))
    assert torch.equal(r.get("model.norm.weight"), torch.ones(64))
    lm = r.get("lm_head.weight")
    assert abs(lm.std().item() - 0.02) < 0.001 and abs(lm.mean().item()) < 0.001
    assert not torch.equal(r.get("model.layers.0.self_attn.q_proj.weight"), r.get("model.layers.0.self_attn.o_proj.weight"))

    _synthetic.write_random_llama(tmp / "b", **TINY, max_shard_bytes=100_000, seed=7)
    assert _files(tmp / "a") == _files(tmp / "b")
    _synthetic.write_random_llama(tmp / "c", **TINY, max_shard_bytes=100_000, seed=8)
    assert not torch.equal(CheckpointReader(tmp / "c").get("lm_head.weight"), lm)

    e = _synthetic.write_random_llama(tmp / "e", **TINY, dtype=torch.bfloat16, seed=7)
    rb = CheckpointReader(e)
    assert sorted(os.listdir(e)) == ["config.json", SINGLE_FILE]
    assert rb.dtype("lm_head.weight") == torch.bfloat16 and rb.config["dtype"] == "bfloat16"
    assert torch.equal(rb.get("lm_head.weight"), lm.to(torch.bfloat16))


def test_llama_sizes():
    assert _synthetic.llama_nbytes(_synthetic.LLAMA_7B) == 4 * 6_738_415_616  # Llama-2-7B's parameter count
    for gb in (0.5, 1, 2, 4, 10, 30):
        cfg = _synthetic.llama_for_size(gb)
        assert abs(_synthetic.llama_nbytes(cfg) / 1e9 - gb) / gb < 0.1, (gb, cfg)
    assert _synthetic.llama_for_size(4) == dict(hidden=2048, intermediate=5632, heads=32, kv_heads=32, layers=17,
                                                vocab=32000)


# ------------------------------------------------------------------------------------------ several writers


@pytest.mark.parametrize("limit", [1, 2_000, 9_000, 1 << 30])
def test_plan_shards_is_the_writers_grouping(limit):
    sd = _state(3)
    assert shards.plan_shards([(n, t.nbytes) for n, t in sd.items()], limit) == _expected_groups(sd, limit)


def test_parts_written_by_two_writers_merge_into_the_one_writer_files(tmp):
    sd, limit = _state(4), 6_000
    _write(tmp / "one", sd, limit)
    plan = shards.plan_shards([(n, t.nbytes) for n, t in sd.items()], limit)
    assert len(plan) >= 5
    made: list[str] = []

    def tensor(name):
        made.append(name)
        return sd[name]

    odd = {k: names for k, names in enumerate(plan, 1) if k % 2}
    shards.write_part(tmp / "two", odd, tensor, 0, limit)
    even = {k: names for k, names in enumerate(plan, 1) if not k % 2}
    shards.write_part(tmp / "two", even, tensor, 1, limit)
    # a rerun (an interrupted job resumed) keeps the verified shards and rewrites a damaged one
    victim = tmp / "two" / "model-00002.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    made.clear()
    shards.write_part(tmp / "two", even, tensor, 1, limit)
    assert made == plan[1]
    shards.write_part(tmp / "three", odd, tensor, 0, limit)  # the other writer never ran
    with pytest.raises(RuntimeError, match=r"shards \['model-00002.safetensors', 'model-00004.safetensors'"):
        shards.merge_parts(tmp / "three", plan, limit)
    shards.merge_parts(tmp / "two", plan, limit)
    assert _files(tmp / "two") == _files(tmp / "one")  # byte-identical, no journal left
