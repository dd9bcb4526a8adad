"""svdadapt.storage.shardfile and the writers' in-place path (``ShardWriter(layout=...)``, ``write_part(layout=...)``):
the files are byte-identical to the ones safetensors builds in memory, a write killed inside a shard resumes to the
same bytes, and the memory of writing a shard is one tensor, not the shard."""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from svdadapt.storage import shards
from svdadapt.storage.manifest import HASH_CHUNK
from svdadapt.storage.shardfile import DTYPE_NAMES, DTYPES, ShardFile, header
from svdadapt.storage.shards import JOURNAL_FILE, WRITTEN_FILE, CheckpointReader, ShardWriter


@pytest.fixture
def tmp():
    with tempfile.TemporaryDirectory(prefix="svdadapt-shardfile-") as d:
        yield Path(d)


def _files(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def _random_tensor(rng: random.Random, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype`` (every bit pattern, NaNs included: bytes are compared, not values)."""
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.tensor([rng.randrange(256) for _ in range(size * int(np.prod(shape, dtype=np.int64)))],
                       dtype=torch.uint8)
    return (raw % 2).bool().reshape(shape) if dtype == torch.bool else raw.view(dtype).reshape(shape)


_NAMES = ["a", "b", "model.layers.0.w", "é", "x\ny", 'q"uote', "back\\slash", "\x01ctl", "\x7fdel", "🙂", "Z"]


def _random_state(rng: random.Random, n: int) -> dict[str, torch.Tensor]:
    """``n`` tensors of random dtypes (every one safetensors has here), shapes (0-d and empty included) and names
    (non-ASCII and characters JSON escapes included)."""
    state = {}
    while len(state) < n:
        shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
        state[f"{rng.choice(_NAMES)}{rng.randint(0, 30)}"] = _random_tensor(rng, rng.choice(list(DTYPES.values())),
                                                                           shape)
    return state


@pytest.mark.parametrize("seed", range(12))
def test_in_place_file_is_the_safetensors_file(tmp, seed):
    rng = random.Random(seed)
    state = _random_state(rng, rng.randint(1, 14))
    save_file(state, str(tmp / "ref.safetensors"), metadata={"format": "pt"})
    f = ShardFile(tmp / "mine.safetensors", [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in state.items()])
    for name in rng.sample(list(state), len(state)):  # any order
        f.write(name, state[name])
    f.close()
    assert (tmp / "mine.safetensors").read_bytes() == (tmp / "ref.safetensors").read_bytes()


def test_header_orders_by_safetensors_dtype_order_then_name():
    head, offsets = header([("b", "F32", (2,)), ("a", "F32", (1,)), ("c", "F64", (1,)), ("d", "BF16", (3,))])
    assert list(offsets) == ["c", "a", "b", "d"]  # F64 first, F32 by name, BF16 last
    assert offsets == {"c": (0, 8), "a": (8, 12), "b": (12, 20), "d": (20, 26)}
    n = int.from_bytes(head[:8], "little")
    assert len(head) == 8 + n and n % 8 == 0
    assert json.loads(head[8:])["__metadata__"] == {"format": "pt"}


def test_shard_file_errors(tmp):
    f = ShardFile(tmp / "x.safetensors", [("a", "F32", (2,)), ("b", "BF16", (1, 2))])
    with pytest.raises(ValueError, match=r"'b' is planned as BF16 \[1, 2\], got F32 \[1, 2\]"):
        f.write("b", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="'c' is not one of the tensors"):
        f.write("c", torch.zeros(2))
    f.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="'a' was written already"):
        f.write("a", torch.ones(2))
    with pytest.raises(RuntimeError, match="1 tensors not written, e.g. 'b'"):
        f.close()
    f.abort()
    assert not (tmp / "x.safetensors").exists()


# -------------------------------------------------------------------------------------------- the writers


def _mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixed dtypes and sizes in a non-sorted order (the file order differs from the order added)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, (rows, cols) in enumerate([(40, 30), (8, 8), (64, 50), (3, 7), (30, 30), (100, 20), (5, 5), (40, 40)]):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        sd[f"z.layer{i}.weight"] = torch.randn(rows, cols, generator=g).to(dtype)
        sd[f"a.layer{i}.norm"] = torch.randn(cols, generator=g)
    sd["ids.int64"] = torch.randint(0, 1 << 40, (33,), generator=g)
    sd["mask.bool"] = torch.rand(21, generator=g) > 0.5
    sd["scale.scalar"] = torch.tensor(3.25)
    sd["empty"] = torch.empty(0, 4)
    return sd


def _layout(sd: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]


def _write(out: Path, sd: dict[str, torch.Tensor], limit: int, layout: bool, stop: int | None = None) -> ShardWriter:
    """Add the tensors of ``sd`` in order (the first ``stop`` of them, then return unclosed: a kill), or all and
    close, keeping the shards' hashes."""
    w = ShardWriter(out, max_shard_bytes=limit, keep_hashes=True, layout=_layout(sd) if layout else None,
                    resume=True)
    for name in list(sd)[:stop]:
        if name not in w.done:
            w.add(name, sd[name])
    if stop is None:
        w.close()
    return w


@pytest.mark.parametrize("limit", [1, 3_000, 9_000, 1 << 30])
def test_in_place_writer_gives_the_buffered_writers_files(tmp, limit):
    sd = _mixed()
    _write(tmp / "buffered", sd, limit, layout=False)
    _write(tmp / "in_place", sd, limit, layout=True)
    written = _files(tmp / "in_place")
    assert written == _files(tmp / "buffered")  # shards, index, WRITTEN_FILE: the same names and bytes
    planned = len(shards.plan_shards([(n, t.nbytes) for n, t in sd.items()], limit))
    assert sum(f.endswith(".safetensors") for f in written) == planned


@pytest.mark.parametrize("stop", [1, 3, 9, 19])  # of 20 tensors in 8 shards
def test_kill_inside_an_in_place_shard_resumes_to_the_same_bytes(tmp, stop):
    sd, limit = _mixed(1), 3_000
    plan = shards.plan_shards([(n, t.nbytes) for n, t in sd.items()], limit)
    _write(tmp / "ref", sd, limit, layout=True)
    w = _write(tmp / "run", sd, limit, layout=True, stop=stop)
    complete = [g for g in plan if set(g) <= set(list(sd)[:stop])]
    assert w.done == {n for g in complete for n in g}
    partial = tmp / "run" / f".model-{len(complete) + 1:05d}.safetensors.tmp"
    assert partial.exists() == (len(w.done) < stop)  # the shard being filled: header and some tensors on disk
    journal = json.loads((tmp / "run" / JOURNAL_FILE).read_text())
    assert [s["names"] for s in journal["shards"]] == complete  # journaled once written, fsynced and hashed
    del w  # killed: the file handle is dropped with the process
    w2 = _write(tmp / "run", sd, limit, layout=True)
    assert not partial.exists()
    assert _files(tmp / "run") == _files(tmp / "ref")
    r = CheckpointReader(tmp / "run")
    assert all(torch.equal(r.get(n).reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
               for n, t in sd.items())
    assert w2.done == set(sd)


def test_resume_of_a_buffered_write_in_place_and_back(tmp):
    """The journal is the same with or without a layout: either writer resumes the other's interrupted write."""
    sd, limit = _mixed(2), 3_000
    _write(tmp / "ref", sd, limit, layout=False)
    del_w = _write(tmp / "a", sd, limit, layout=False, stop=11)
    del del_w
    _write(tmp / "a", sd, limit, layout=True)
    del_w = _write(tmp / "b", sd, limit, layout=True, stop=11)
    del del_w
    _write(tmp / "b", sd, limit, layout=False)
    assert _files(tmp / "a") == _files(tmp / "ref") == _files(tmp / "b")


def test_in_place_writer_follows_its_layout(tmp):
    sd = _mixed()
    w = ShardWriter(tmp, max_shard_bytes=3_000, layout=_layout(sd))
    names = list(sd)
    with pytest.raises(ValueError, match=f"{names[1]!r} added out of the writer's layout order: the layout's next "
                                         f"tensor is {names[0]!r}"):
        w.add(names[1], sd[names[1]])
    with pytest.raises(ValueError, match=r"is planned as F32 \[40, 30\], got F64 \[40, 30\]"):
        w.add(names[0], sd[names[0]].double())
    w.add(names[0], sd[names[0]])
    with pytest.raises(ValueError, match=f"before every tensor of its layout was added: {len(sd) - 1} missing, "
                                         f"the first {names[1]!r}"):
        w.close()
    w.add(names[1], sd[names[1]])  # shard 1 (names[0] alone) done, shard 2 being filled
    assert sorted(p.name for p in tmp.iterdir()) == [".model-00002.safetensors.tmp", JOURNAL_FILE,
                                                      "model-00001.safetensors"]
    with pytest.raises(RuntimeError, match="boom"):
        with w:
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp.iterdir()) == [JOURNAL_FILE, "model-00001.safetensors"]  # the partial one: gone


def test_write_part_in_place_gives_the_one_writer_files(tmp):
    sd, limit = _mixed(3), 3_000
    _write(tmp / "one", sd, limit, layout=False)
    plan = shards.plan_shards([(n, t.nbytes) for n, t in sd.items()], limit)
    for writer, parity in ((0, 1), (1, 0)):
        part = {k: names for k, names in enumerate(plan, 1) if k % 2 == parity}
        shards.write_part(tmp / "two", part, sd.__getitem__, writer, limit, layout=_layout(sd))
    shards.merge_parts(tmp / "two", plan, limit, keep_hashes=True)
    assert _files(tmp / "two") == _files(tmp / "one")
    assert json.loads((tmp / "two" / WRITTEN_FILE).read_text()).keys() == {
        f"model-{k:05d}-of-{len(plan):05d}.safetensors" for k in range(1, len(plan) + 1)}


# ---------------------------------------------------------------------------------------------------- memory

_N, _ELEMS = 16, 1 << 19  # 16 tensors of 2 MiB (fp32) in one shard: 32 MiB


def _numpy_tensor(i: int) -> torch.Tensor:
    """A 2 MiB tensor whose buffer numpy allocates (tracemalloc counts numpy's buffers, not torch's allocator);
    odd ones bf16 (the same 2 MiB, reinterpreted), so the file order (by dtype) is not the order added."""
    a = np.random.default_rng(i).standard_normal(_ELEMS, dtype=np.float32)
    t = torch.from_numpy(a)
    return t if i % 2 == 0 else t.view(torch.int16).view(torch.bfloat16).reshape(2, _ELEMS)


def _peak_of_writing(out: Path, layout: bool) -> int:
    specs = [(f"t{i:02d}", t.dtype, tuple(t.shape)) for i in range(_N) for t in [_numpy_tensor(i)]]
    tracemalloc.start()
    try:
        w = ShardWriter(out, max_shard_bytes=1 << 30, layout=specs if layout else None)
        for i in range(_N):
            w.add(f"t{i:02d}", _numpy_tensor(i))  # made, added, dropped
        w.close()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_writing_a_shard_in_place_holds_one_tensor_not_the_shard(tmp):
    largest = 4 * _ELEMS
    in_place = _peak_of_writing(tmp / "in_place", layout=True)
    buffered = _peak_of_writing(tmp / "buffered", layout=False)
    assert _files(tmp / "in_place") == _files(tmp / "buffered")
    # in place: the tensor being added (the last one stays alive while its shard is hashed), two of the hash's read
    # chunks (the next is read before the last is freed), the header and journal (a few KiB): whatever _N is
    assert in_place < largest + 2 * HASH_CHUNK + (64 << 10), (in_place, largest)
    # the buffered writer holds the whole shard (and safetensors a byte copy of each tensor while it saves)
    assert buffered >= _N * largest, (buffered, _N * largest)
