"""Tensor-by-tensor I/O of Hugging Face safetensors checkpoints: a reader and a resumable sharded writer.

The streaming init reads a checkpoint that need not fit in memory one tensor at a time, rewrites the targeted
weights and writes a new checkpoint in the layout ``transformers`` writes and loads::

    reader = CheckpointReader("llama-7b/")               # model.safetensors, or the index + its shards
    with ShardWriter("llama-7b-res/", resume=True, layout=reader.layout) as w:  # journal kept on a crash
        for name in reader.names:
            if name not in w.done:                        # written by an interrupted earlier run
                w.add(name, rewrite(name, reader.get(name)))
    copy_files(reader.files, "llama-7b-res/")            # config.json, tokenizer files, ...

Memory: the reader holds one safetensors handle per shard (headers only; ``get`` reads one tensor). The writer,
given the ``layout`` of what will be added (``reader.layout`` for a copy), writes each tensor in place at its
offset as it is added (``shardfile.ShardFile``) and holds none; without one, the tensors of the shard it is
filling (at most ``max_shard_bytes``, or one larger tensor alone), written at once.

Why the reader asks safetensors for its ``pread`` backend: with the default ``mmap`` backend every tensor returned
is a view of a private mapping of the whole shard that lives as long as the handle. Pages read through it stay in
the process's resident set after the tensor is freed (file-backed: page cache, but counted in RSS and in a
cgroup's memory), and pages written in place become anonymous copy-on-write memory that is never given back while
the handle is open. Reading all of a 200 MB file tensor by tensor through one mmap handle thus grows RSS by
200 MB; with ``pread`` each tensor is its own buffer, freed with it, and RSS stays flat. safetensors before 0.8
has no ``pread``: then ``get`` opens the shard, copies the tensor out of the mapping and closes it again.

Output layout and file names. Completed shards are written as ``model-00001.safetensors``,
``model-00002.safetensors``, ... (each first to the hidden ``.model-0000k.safetensors.tmp``, filled, fsynced, then
renamed, so a kill mid-write never leaves a half shard under a shard's name), and recorded with their size and
sha256 in the progress journal ``.svdadapt-progress.json``. The shard count N is known only at ``close()``, which
renames them to transformers' ``model-0000k-of-0000N.safetensors`` and writes ``model.safetensors.index.json``
(``{"metadata": {"total_size", "total_parameters"}, "weight_map"}``), or, for one shard, renames it to
``model.safetensors`` with no index, as ``save_pretrained`` does; then it removes the journal (with
``keep_hashes=True`` keeping the shards' sizes and hashes in ``.svdadapt-written.json``, for the manifest of the
directory that holds them: each shard is read once). A directory with a journal is unfinished; one without is a
complete checkpoint.

Resuming. ``ShardWriter(out_dir, resume=True)`` re-verifies every journaled shard (exists, size, sha256); the
first bad or missing one and everything after it are discarded, stray temporary files removed, and ``done`` is
the set of names in the shards kept. The caller then adds the remaining tensors in the same order as before, and
the result is byte-identical to an uninterrupted run with the same ``max_shard_bytes``.

Leaf module: torch, safetensors and the standard library only.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .manifest import sha256_file
from .shardfile import DTYPES, IN_PLACE, ShardFile, Spec, dtype_name, nbytes

__all__ = [
    "CheckpointReader",
    "ShardWriter",
    "copy_files",
    "fsync_file",
    "SINGLE_FILE",
    "INDEX_FILE",
    "JOURNAL_FILE",
    "WRITTEN_FILE",
    "DEFAULT_MAX_SHARD_BYTES",
    "plan_shards",
    "write_part",
    "merge_parts",
    "written_tensors",
    "ProgressJournalError",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
JOURNAL_FILE = ".svdadapt-progress.json"
WRITTEN_FILE = ".svdadapt-written.json"  # final shard name -> size, sha256 (kept after close)
DEFAULT_MAX_SHARD_BYTES = 1 << 30
_JOURNAL_VERSION = 1
_SHARD_METADATA = {"format": "pt"}  # what save_pretrained writes; older transformers refuse files without it

# Files of a model directory that are weights in some format: never copied through (the rewritten base must not
# ship the original weights next to it). Hidden files (.gitattributes, our journal) are skipped as well.
_WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_WORK_RE = re.compile(r"model-(\d{5})\.safetensors")
_FINAL_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TMP_RE = re.compile(r"\.(model-\d{5}\.safetensors|svdadapt-progress\.json|svdadapt-part-\d{5}\.json|"
                     r"model\.safetensors\.index\.json)\.tmp")
_PART_RE = re.compile(r"\.svdadapt-part-\d{5}\.json")



# ---------------------------------------------------------------------------------------------------- reading


class ProgressJournalError(ValueError):
    """A writer's progress journal (``path``) cannot be read: truncated or corrupt."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


class _Entry:
    __slots__ = ("file", "dtype", "shape", "nbytes", "offset")

    def __init__(self, file: Path, dtype: str, shape: tuple[int, ...], nbytes: int, offset: int):
        self.file, self.dtype, self.shape, self.nbytes, self.offset = file, dtype, shape, nbytes, offset


_PREAD: bool | None = None  # does this safetensors have safe_open(..., backend="pread")? Found on first open.


def _open(path: Path):
    """A safetensors handle (``pread`` backend where there is one); a truncated or corrupt file is a ValueError
    naming it (safetensors checks at open that the header parses and that its offsets cover the file exactly)."""
    global _PREAD
    try:
        if _PREAD is not False:
            try:
                handle = safe_open(str(path), framework="pt", backend="pread")
                _PREAD = True
                return handle
            except TypeError:  # safetensors < 0.8: no backend keyword
                _PREAD = False
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _header(path: Path) -> dict[str, _Entry]:
    """name -> entry from the file's JSON header, in file (data offset) order. Called after ``_open`` succeeded,
    so the header is known to be well formed."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {
        name: _Entry(path, h["dtype"], tuple(h["shape"]), h["data_offsets"][1] - h["data_offsets"][0],
                     h["data_offsets"][0])
        for name, h in items
    }


def _check_shard_name(index: Path, shard: Any, example: str) -> None:
    """An index names its shards by file name inside its own directory (a symlink there may point anywhere, as in
    the Hugging Face cache): an absolute path or a ``..`` component would read a file outside the checkpoint."""
    parts = PurePosixPath(shard).parts if isinstance(shard, str) else ()
    if not parts or PurePosixPath(shard).is_absolute() or Path(shard).is_absolute() or ".." in parts \
            or "\\" in shard:
        raise ValueError(f"{index} maps tensor {example!r} to shard {shard!r}, outside the checkpoint directory "
                         f"{index.parent}: an index names its shards by their file names in that directory")


class CheckpointReader:
    """Read a safetensors checkpoint one tensor at a time.

    ``path``: a model directory holding ``model.safetensors`` or ``model.safetensors.index.json`` and its shards
    (``model.safetensors`` wins when both are there, as in transformers), a single ``.safetensors`` file, or an
    index file. Every shard's header is opened and checked here, so a missing shard or a truncated or corrupt
    file fails at construction (ValueError naming the file); no tensor data is read until ``get``.

    ``names`` lists the tensors in the index's ``weight_map`` order (transformers writes it sorted by name), or,
    for a single file, in file order. Tensors a shard holds but the index does not name are ignored, as
    transformers ignores them.
    """

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint path {p} does not exist")
        self.path = p
        self._root: Path | None = None
        index: Path | None = None
        single: Path | None = None
        if p.is_dir():
            self._root = p
            if (p / SINGLE_FILE).is_file():
                single = p / SINGLE_FILE
            elif (p / INDEX_FILE).is_file():
                index = p / INDEX_FILE
            else:
                found = sorted(f.name for f in p.glob("*.safetensors"))
                hint = f"; it has {found}: pass one of them as the path" if found else ""
                raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {p}{hint}")
        elif p.name.endswith(".index.json"):
            index, self._root = p, p.parent
        elif p.suffix == ".safetensors":
            single = p
        else:
            raise FileNotFoundError(f"{p} is neither a model directory, a .safetensors file nor a safetensors index")

        self._handles: dict[Path, Any] = {}
        self._entries: dict[str, _Entry] = {}
        if single is not None:
            self._keep(single, _open(single))
            self._entries = _header(single)
            self.index_file: Path | None = None
        else:
            self.index_file = index
            self._entries = self._read_index(index)

    def _read_index(self, index: Path) -> dict[str, _Entry]:
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map): {e!r}") from e
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        headers: dict[str, dict[str, _Entry]] = {}
        for shard, names in by_shard.items():
            _check_shard_name(index, shard, names[0])
            file = index.parent / shard
            if not file.is_file():
                raise ValueError(f"{index} maps {len(names)} tensors (e.g. {names[0]!r}) to shard {shard}, "
                                 f"but {file} does not exist")
            self._keep(file, _open(file))
            headers[shard] = _header(file)
        entries = {}
        for name, shard in weight_map.items():
            entry = headers[shard].get(name)
            if entry is None:
                raise ValueError(f"{index} maps {name!r} to shard {shard}, but {index.parent / shard} has no "
                                 f"tensor of that name")
            entries[name] = entry
        return entries

    def _keep(self, file: Path, handle: Any) -> None:
        # an mmap handle (no pread) would pin every page read through it: opened per get() instead
        if _PREAD:
            self._handles[file] = handle

    # ----------------------------------------------------------------------------------------------- metadata
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in checkpoint {self.path}") from None

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._entry(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        e = self._entry(name)
        if e.dtype not in DTYPES:
            raise ValueError(f"{e.file}: tensor {name!r} has dtype {e.dtype}, which this torch cannot represent")
        return DTYPES[e.dtype]

    def nbytes(self, name: str) -> int:
        return self._entry(name).nbytes

    @property
    def layout(self) -> list[Spec]:
        """``(name, safetensors dtype, shape)`` of every tensor, in ``names`` order: what a ``ShardWriter`` copying
        the checkpoint tensor for tensor writes (its ``layout``)."""
        return [(n, e.dtype, e.shape) for n, e in self._entries.items()]

    def file_of(self, name: str) -> Path:
        """The shard file that holds ``name``."""
        return self._entry(name).file

    def files_of(self, name: str) -> tuple[Path, ...]:
        """The shard files ``name`` is read from: its own (a view such as ``stream.quantized.DecompressedReader``
        reads one tensor from several)."""
        return (self.file_of(name),)

    @property
    def total_size(self) -> int:
        """Bytes of tensor data over all names (an index's ``metadata.total_size``)."""
        return sum(e.nbytes for e in self._entries.values())

    @property
    def config(self) -> dict | None:
        """config.json of the model directory as a dict, or None (none there, or a bare .safetensors path)."""
        if self._root is None or not (self._root / "config.json").is_file():
            return None
        with open(self._root / "config.json") as f:
            return json.load(f)

    @property
    def files(self) -> list[Path]:
        """The directory's other files to copy through (config.json, generation_config.json, tokenizer files, ...):
        regular top-level files, sorted, without weights in any format (.safetensors, .bin, .pt, indexes, ...) and
        without hidden files. Empty for a bare .safetensors path."""
        if self._root is None:
            return []
        return sorted(f for f in self._root.iterdir()
                      if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_WEIGHT_SUFFIXES))

    # ------------------------------------------------------------------------------------------------ reading
    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (on CPU, the stored dtype and shape, in a buffer of its own), and nothing else of its
        shard."""
        e = self._entry(name)
        try:
            if _PREAD:
                handle = self._handles.get(e.file)
                if handle is None:  # after close()
                    handle = self._handles[e.file] = _open(e.file)
                return handle.get_tensor(name)
            with _open(e.file) as handle:  # mmap only: copy out, then unmap (see the module docstring)
                return handle.get_tensor(name).clone()
        except SafetensorError as err:
            raise ValueError(f"{e.file}: cannot read tensor {name!r}: {err}") from err

    def close(self) -> None:
        """Drop the shard handles (``get`` reopens on demand)."""
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CheckpointReader({str(self.path)!r}, {len(self)} tensors, {len(set(e.file for e in self._entries.values()))} "
                f"files, {self.total_size} bytes)")


def copy_files(files: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Copy files (e.g. ``CheckpointReader.files``) into ``out_dir``; returns the copies."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, out / Path(f).name)) for f in files]


# ---------------------------------------------------------------------------------------------------- writing


def fsync_file(path: Path) -> None:
    """Flush a written file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_sha256 = sha256_file  # one hashing helper for the shards and the directory manifests


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name.lstrip('.')}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _final_name(k: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"


def _work_name(k: int) -> str:
    return f"model-{k:05d}.safetensors"


def _flush_before(pending: int, pending_bytes: int, nbytes: int, max_shard_bytes: int) -> bool:
    """Whether a tensor of ``nbytes`` starts a new shard (the one being filled would go over the limit)."""
    return pending > 0 and pending_bytes + nbytes > max_shard_bytes


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """The names in each shard that a ``ShardWriter`` writes for tensors of these byte sizes added in this order
    (several processes each writing some of them, ``write_part``, give the one-process files)."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if _flush_before(len(current), used, nbytes, max_shard_bytes):
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
        if used >= max_shard_bytes:
            shards.append(current)
            current, used = [], 0
    return shards + ([current] if current else [])


def _compact(name: str, tensor: torch.Tensor, taken: set[int]) -> torch.Tensor:
    """``tensor`` on the CPU, dense and contiguous, owning its storage (a view of a larger storage would keep it
    alive; a second name on a storage in the same shard is refused by safetensors): ready to save."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"{name}: only dense tensors can be saved, got layout {tensor.layout}")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() and (t.untyped_storage().nbytes() != t.nbytes or t.data_ptr() in taken):
        t = t.clone()
    return t


def _tmp_path(out_dir: Path, work: str) -> Path:
    return out_dir / f".{work}.tmp"


def _commit(out_dir: Path, work: str, names: list[str], specs: Iterable[Spec]) -> dict[str, Any]:
    """The fsynced temporary file of shard ``work`` hashed and renamed to its work name; returns its journal
    entry (``names`` in the order added)."""
    tmp = _tmp_path(out_dir, work)
    size, sha = tmp.stat().st_size, _sha256(tmp)
    os.replace(tmp, out_dir / work)
    _fsync_dir(out_dir)
    sizes = [(nbytes(d, shape), math.prod(shape)) for _, d, shape in specs]
    return {"file": work, "names": names, "nbytes": sum(b for b, _ in sizes), "numel": sum(n for _, n in sizes),
            "size": size, "sha256": sha}


def _write_shard(out_dir: Path, work: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One shard file built in memory, atomically (temporary name, fsync, rename); returns its journal entry."""
    tmp = _tmp_path(out_dir, work)
    save_file(tensors, str(tmp), metadata=dict(_SHARD_METADATA))
    fsync_file(tmp)
    return _commit(out_dir, work, list(tensors), [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()])


def _open_in_place(out_dir: Path, work: str, specs: list[Spec]) -> ShardFile:
    """Shard ``work``'s temporary file with its final header, to be filled tensor by tensor."""
    return ShardFile(_tmp_path(out_dir, work), specs)


def _specs(layout: Iterable[tuple[str, Any, Iterable[int]]]) -> dict[str, Spec]:
    """name -> ``(name, safetensors dtype, shape)`` of a layout given with torch or safetensors dtypes, in order."""
    specs: dict[str, Spec] = {}
    for name, dtype, shape in layout:
        d = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
        if d not in DTYPES:
            raise ValueError(f"layout: tensor {name!r} has dtype {dtype!r}, not a safetensors dtype of this torch")
        if name in specs:
            raise ValueError(f"layout: tensor {name!r} is listed twice")
        specs[name] = (name, d, tuple(int(x) for x in shape))
    return specs


def _verified(out_dir: Path, entry: dict[str, Any]) -> bool:
    f = out_dir / entry["file"]
    return f.is_file() and f.stat().st_size == entry["size"] and _sha256(f) == entry["sha256"]


def _write_progress(out_dir: Path, shards: list[dict[str, Any]], max_shard_bytes: int,
                    finalizing: dict[str, str] | None = None) -> None:
    """The progress journal (``JOURNAL_FILE``): the completed shards, and the renames under way."""
    obj: dict[str, Any] = {"version": _JOURNAL_VERSION, "max_shard_bytes": max_shard_bytes, "shards": shards}
    if finalizing:
        obj["finalizing"] = finalizing
    _write_json_atomic(out_dir / JOURNAL_FILE, obj)


def _finish(out_dir: Path, shards: list[dict[str, Any]], max_shard_bytes: int, keep_hashes: bool = False) -> Path:
    """The journaled work shards renamed to their final names, the index written (for several shards), the
    journals removed (with ``keep_hashes``, the shards' sizes and sha256 kept in ``WRITTEN_FILE``). The renames are
    journaled first, so a kill in between stays resumable. Returns the index file, or ``model.safetensors`` for a
    single shard."""
    n = len(shards)
    finals = {s["file"]: _final_name(k, n) for k, s in enumerate(shards, 1)}
    _write_progress(out_dir, shards, max_shard_bytes, finalizing=finals)
    for work, final in finals.items():
        os.replace(out_dir / work, out_dir / final)
    _fsync_dir(out_dir)
    if n == 1:
        result = out_dir / SINGLE_FILE
    else:
        weight_map = {name: finals[s["file"]] for s in shards for name in s["names"]}
        index = {"metadata": {"total_size": sum(s["nbytes"] for s in shards),
                              "total_parameters": sum(s["numel"] for s in shards)},
                 "weight_map": weight_map}
        result = out_dir / INDEX_FILE
        _write_json_atomic(result, index)
    if keep_hashes:  # the shards' hashes, computed as they were written, for a manifest (each shard read once)
        _write_json_atomic(out_dir / WRITTEN_FILE, {finals[e["file"]]: {"size": e["size"], "sha256": e["sha256"]}
                                                    for e in shards})
    (out_dir / JOURNAL_FILE).unlink()
    for part in out_dir.glob(".svdadapt-part-*.json"):  # several writers' journals (merge_parts)
        part.unlink()
    _fsync_dir(out_dir)
    return result


class ShardWriter:
    """Write tensors, in the order added, as a sharded safetensors checkpoint that resumes after interruption.

    ``add(name, tensor)`` keeps the tensor (moved to CPU; a view of a larger storage is copied so that the rest
    is not kept alive) in the shard being filled. A shard is flushed to disk when the next tensor would take it
    over ``max_shard_bytes`` of tensor data, or as soon as it reaches it, so the writer holds at most
    ``max_shard_bytes`` (or one larger tensor, which gets a shard of its own). Sizes count tensor bytes, as
    transformers' ``max_shard_size`` does; a file is larger by its JSON header. The writer keeps a reference to
    the tensors it holds: do not modify a tensor in place after adding it.

    ``layout``: the ``(name, dtype, shape)`` of every tensor that will be added, in the order they will be added
    (``CheckpointReader.layout`` for a checkpoint copied tensor for tensor; dtype a torch or safetensors dtype).
    The shards are then known in advance (``plan_shards``) and each is written in place: its file is created with
    its final header when its first tensor comes, each tensor is written at its offset as it is added and not kept,
    and the shard is fsynced, hashed, renamed and journaled once its last tensor is in. The writer then holds no
    tensor (the memory of a write is the tensor being added), the files are byte-identical to the ones written
    without a layout, and ``add`` must follow the layout (ValueError naming the tensor otherwise); ``close`` needs
    every tensor of it. A kill while a shard is being filled leaves its temporary file, which ``resume`` deletes:
    that shard is written again from its first tensor, as without a layout.

    ``resume``: continue the interrupted write that ``out_dir``'s progress journal describes (``done`` lists what
    is already on disk: skip those names and add the rest in the original order; adding a name in ``done`` is an
    error). Without a journal, resume starts from scratch. ``max_shard_bytes`` must equal the journal's.
    ``overwrite``: a fresh write into a directory that already holds checkpoint files (ours or a
    transformers checkpoint) deletes them first; without it that is a FileExistsError. ``keep_hashes``: ``close()``
    keeps the shards' sizes and sha256 in ``WRITTEN_FILE`` (for the manifest of the directory holding them).

    See the module docstring for the file names and the journal. Use as a context manager to ``close()`` on a
    clean exit and leave the journal in place (resumable) when an exception escapes.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *,
                 resume: bool = False, overwrite: bool = False, keep_hashes: bool = False,
                 layout: Iterable[tuple[str, Any, Iterable[int]]] | None = None):
        if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.keep_hashes = keep_hashes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._journal = self.out_dir / JOURNAL_FILE
        self._shards: list[dict[str, Any]] = []  # completed shards, as journaled
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_ptrs: set[int] = set()
        self._added: set[str] = set()  # names added in this session
        self._closed = False
        self._layout: dict[str, Spec] | None = None if layout is None or not IN_PLACE else _specs(layout)
        self._plan: list[list[str]] | None = None if self._layout is None else plan_shards(
            [(n, nbytes(d, shape)) for n, (_, d, shape) in self._layout.items()], max_shard_bytes)
        self._file: ShardFile | None = None  # the shard being filled in place (with a layout)
        self.done: set[str] = set()
        """Names in completed shards on disk (those of a resumed run's kept shards, then the ones flushed since)."""

        if resume and self._journal.is_file():
            self._resume()
        else:
            self._start_fresh(resume, overwrite)

    # ------------------------------------------------------------------------------------------- start / resume
    def _ours(self) -> list[Path]:
        """Files in out_dir that a checkpoint write (ours or transformers') owns."""
        return sorted(f for f in self.out_dir.iterdir()
                      if f.name in (SINGLE_FILE, INDEX_FILE, JOURNAL_FILE, WRITTEN_FILE) or _WORK_RE.fullmatch(f.name)
                      or _FINAL_RE.fullmatch(f.name) or _TMP_RE.fullmatch(f.name))

    def _start_fresh(self, resume: bool, overwrite: bool) -> None:
        existing = self._ours()
        if resume:
            # no journal: only leftovers of a run killed before its first journal write can be discarded
            for f in existing:
                if _TMP_RE.fullmatch(f.name) or _WORK_RE.fullmatch(f.name):
                    f.unlink()
            existing = self._ours()
            if existing and not overwrite:
                raise FileExistsError(
                    f"{self.out_dir} holds a complete checkpoint ({[f.name for f in existing]}) and no progress "
                    f"journal {JOURNAL_FILE}: nothing to resume; pass overwrite=True to write it again")
        if existing:
            if not overwrite:
                raise FileExistsError(
                    f"{self.out_dir} already holds checkpoint files {[f.name for f in existing]}; pass resume=True "
                    f"to continue an interrupted write or overwrite=True to replace them")
            for f in existing:
                f.unlink()
        self._write_journal()

    def _resume(self) -> None:
        try:
            with open(self._journal) as f:
                journal = json.load(f)
            shards = journal["shards"]
            saved_max = journal["max_shard_bytes"]
        except (ValueError, KeyError, TypeError) as e:
            raise ProgressJournalError(self._journal, f"{self._journal}: unreadable progress journal ({e!r}); delete "
                                       "the directory's checkpoint files or pass overwrite=True without resume") from e
        if journal.get("version") != _JOURNAL_VERSION:
            raise ValueError(f"{self._journal}: journal version {journal.get('version')!r}, expected "
                             f"{_JOURNAL_VERSION}")
        if saved_max != self.max_shard_bytes:
            raise ValueError(f"resuming {self.out_dir} with max_shard_bytes={self.max_shard_bytes}, but it was "
                             f"started with {saved_max}: pass the same value (shard boundaries depend on it)")
        # a kill inside close() may have renamed shards to their final names already: take them back
        for work, final in journal.get("finalizing", {}).items():
            if not (self.out_dir / work).exists() and (self.out_dir / final).is_file():
                os.replace(self.out_dir / final, self.out_dir / work)
        kept: list[dict[str, Any]] = []
        for k, s in enumerate(shards):
            planned = self._plan is None or (k < len(self._plan) and s.get("names") == self._plan[k])
            if not (planned and _verified(self.out_dir, s)):
                break  # this one and all after it are rewritten
            kept.append(s)
        self._shards = kept
        keep = {s["file"] for s in kept}
        for f in self._ours():
            if f.name != JOURNAL_FILE and f.name not in keep:
                f.unlink()
        _fsync_dir(self.out_dir)
        self._write_journal()
        self.done = {n for s in kept for n in s["names"]}

    def _write_journal(self) -> None:
        _write_progress(self.out_dir, self._shards, self.max_shard_bytes)

    # ------------------------------------------------------------------------------------------------- writing
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; flushes the current shard first when this one would take it over the limit."""
        if self._closed:
            raise RuntimeError(f"ShardWriter({self.out_dir}) is closed")
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names are non-empty strings, got {name!r}")
        if name in self.done:
            raise ValueError(f"{name!r} is already written in a completed shard of {self.out_dir} (see .done); "
                             f"skip the names in done when resuming")
        if name in self._added:
            raise ValueError(f"{name!r} was added twice")
        if self._plan is not None:
            self._add_in_place(name, tensor)
            return
        t = _compact(name, tensor, self._pending_ptrs)
        nbytes = t.numel() * t.element_size()
        if _flush_before(len(self._pending), self._pending_bytes, nbytes, self.max_shard_bytes):
            self._flush()
        self._pending[name] = t
        self._added.add(name)
        if t.numel():
            self._pending_ptrs.add(t.data_ptr())
        self._pending_bytes += nbytes
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _add_in_place(self, name: str, tensor: torch.Tensor) -> None:
        """With a layout: ``tensor`` written at its offset in the shard being filled (created when its first tensor
        comes); the shard committed and journaled once its last tensor is in."""
        k = len(self._shards)
        names = self._plan[k] if k < len(self._plan) else []
        written = 0 if self._file is None else len(names) - len(self._file.missing)
        if written >= len(names) or names[written] != name:
            expected = f"the layout's next tensor is {names[written]!r}" if written < len(names) else \
                "every tensor of the layout is written"
            raise ValueError(f"{name!r} added out of the writer's layout order: {expected}")
        if self._file is None:
            self._file = _open_in_place(self.out_dir, _work_name(k + 1), [self._layout[n] for n in names])
        self._file.write(name, tensor)
        self._added.add(name)
        if not self._file.missing:
            self._file.close()
            self._file = None
            self._shards.append(_commit(self.out_dir, _work_name(k + 1), names, [self._layout[n] for n in names]))
            self._write_journal()
            self.done.update(names)

    def _flush(self) -> None:
        """Write the pending tensors as the next shard: temp name, fsync, hash, rename, then journal it."""
        if not self._pending:
            return
        self._shards.append(_write_shard(self.out_dir, _work_name(len(self._shards) + 1), self._pending))
        self._write_journal()
        self.done.update(self._pending)
        self._pending = {}
        self._pending_bytes = 0
        self._pending_ptrs = set()

    @property
    def shards(self) -> list[str]:
        """File names of the completed shards (their working names until close())."""
        return [s["file"] for s in self._shards]

    def close(self) -> Path:
        """Flush the last shard, give the shards their final names, write the index (for several shards) and
        remove the journal. Returns the index file, or ``model.safetensors`` for a single shard."""
        if self._closed:
            raise RuntimeError(f"ShardWriter({self.out_dir}) is already closed")
        if self._plan is not None and len(self._shards) < len(self._plan):
            left = [n for names in self._plan[len(self._shards):] for n in names if n not in self._added]
            raise ValueError(f"close() of ShardWriter({self.out_dir}) before every tensor of its layout was added: "
                             f"{len(left)} missing, the first {left[0]!r}")
        self._flush()
        if not self._shards:
            raise ValueError(f"no tensors were written to {self.out_dir}")
        result = _finish(self.out_dir, self._shards, self.max_shard_bytes, self.keep_hashes)
        self._closed = True
        return result

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()
        elif exc_type is not None and self._file is not None:
            self._file.abort()  # the shard being filled in place: written again on resume
            self._file = None
        # on an exception the pending shard is dropped and the journal stays: resume=True continues

    def __repr__(self) -> str:
        return (f"ShardWriter({str(self.out_dir)!r}, max_shard_bytes={self.max_shard_bytes}, "
                f"{len(self._shards)} shards done, {len(self._pending)} tensors pending)")


# ---------------------------------------------------------------------------------------- several writers


def _part_entries(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Work file name -> journal entry, from every writer's part journal in ``out_dir``."""
    entries: dict[str, dict[str, Any]] = {}
    for f in sorted(out_dir.glob(".svdadapt-part-*.json")):
        if _PART_RE.fullmatch(f.name):
            try:
                entries.update({e["file"]: e for e in json.loads(f.read_text())["shards"]})
            except (ValueError, KeyError, TypeError) as e:
                raise ProgressJournalError(f, f"{f}: unreadable part journal ({e!r})") from e
    return entries


def written_tensors(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> file, for the tensors an interrupted (or finished) write into ``out_dir`` holds in its
    journaled shards (``ShardWriter``'s progress journal, the part journals of ``write_part``) or, without a
    journal, in the complete checkpoint there. Nothing is verified here; empty if nothing was written."""
    out = Path(out_dir)
    if not out.is_dir():
        return {}
    journal = out / JOURNAL_FILE
    if journal.is_file():
        try:
            shards = json.loads(journal.read_text())["shards"]
            found = {n: out / s["file"] for s in shards for n in s["names"]}
        except (ValueError, KeyError, TypeError) as e:
            raise ProgressJournalError(journal, f"{journal}: unreadable progress journal ({e!r})") from e
    else:
        found = {n: out / e["file"] for e in _part_entries(out).values() for n in e["names"]}
    if not found and ((out / SINGLE_FILE).is_file() or (out / INDEX_FILE).is_file()):
        with CheckpointReader(out) as done:
            found = {n: done.file_of(n) for n in done.names}
    return found


def write_part(out_dir: str | os.PathLike, shards: dict[int, list[str]], tensor: Callable[[str], torch.Tensor],
               writer: int, max_shard_bytes: int, progress: Callable[[str], None] | None = None,
               layout: Iterable[tuple[str, Any, Iterable[int]]] | None = None) -> None:
    """Write some shards of a checkpoint that several processes write together: shard k (1-based, of
    ``plan_shards``) holds ``shards[k]``, each tensor made by ``tensor(name)``. Each is journaled in this writer's
    part journal (``.svdadapt-part-<writer>.json``); a shard an interrupted run already wrote (any writer's journal,
    same names, size and sha256 verified) is kept. ``merge_parts`` then joins them. ``progress(name)`` is called
    after each tensor. ``layout``: ``(name, dtype, shape)`` of (at least) these tensors, as for ``ShardWriter``:
    each shard is then written in place, one tensor in memory at a time; without it, one shard at a time."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    known, mine = _part_entries(out), []
    journal = out / f".svdadapt-part-{writer:05d}.json"
    specs = None if layout is None or not IN_PLACE else _specs(layout)
    for k in sorted(shards):
        entry = known.get(_work_name(k))
        if not (entry and entry["names"] == shards[k] and _verified(out, entry)):
            write = _write_part_buffered if specs is None else _write_part_in_place
            entry = write(out, _work_name(k), shards[k], specs, tensor, progress)
        mine.append(entry)
        _write_json_atomic(journal, {"version": _JOURNAL_VERSION, "max_shard_bytes": max_shard_bytes, "shards": mine})


def _write_part_buffered(out: Path, work: str, names: list[str], specs: None,
                         tensor: Callable[[str], torch.Tensor], progress: Callable[[str], None] | None
                         ) -> dict[str, Any]:
    """One shard of ``write_part`` built in memory, then written; returns its journal entry."""
    tensors: dict[str, torch.Tensor] = {}
    taken: set[int] = set()
    for name in names:
        tensors[name] = t = _compact(name, tensor(name), taken)
        if t.numel():
            taken.add(t.data_ptr())
        if progress is not None:
            progress(name)
    return _write_shard(out, work, tensors)


def _write_part_in_place(out: Path, work: str, names: list[str], specs: dict[str, Spec],
                         tensor: Callable[[str], torch.Tensor], progress: Callable[[str], None] | None
                         ) -> dict[str, Any]:
    """One shard of ``write_part`` written in place, one tensor in memory at a time; returns its journal entry."""
    f = _open_in_place(out, work, [specs[n] for n in names])
    try:
        for name in names:
            f.write(name, tensor(name))
            if progress is not None:
                progress(name)
        f.close()
    except BaseException:
        f.abort()
        raise
    return _commit(out, work, list(names), [specs[n] for n in names])


def merge_parts(out_dir: str | os.PathLike, plan: list[list[str]], max_shard_bytes: int,
                keep_hashes: bool = False) -> Path:
    """After every ``write_part``: the shards of ``plan`` as one checkpoint, exactly as one ``ShardWriter`` writes it
    (renamed to their final names, indexed), the part journals removed. Returns the index file (or
    ``model.safetensors`` for one shard)."""
    out = Path(out_dir)
    entries = _part_entries(out)
    missing = [_work_name(k) for k in range(1, len(plan) + 1) if _work_name(k) not in entries]
    if missing:
        raise RuntimeError(f"{out}: shards {missing} were not written by any process")
    shards = [entries[_work_name(k)] for k in range(1, len(plan) + 1)]
    if [e["names"] for e in shards] != plan:
        raise RuntimeError(f"{out}: the shards written hold other tensors than planned")
    # each writer hashed its shards as it wrote them (write_part verifies them again on a rerun): check the sizes
    wrong = [e["file"] for e in shards if (out / e["file"]).stat().st_size != e["size"]]
    if wrong:
        raise RuntimeError(f"{out}: shards {wrong} do not have the size their writer journaled")
    return _finish(out, shards, max_shard_bytes, keep_hashes)
