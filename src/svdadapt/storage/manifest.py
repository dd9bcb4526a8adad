"""The manifest of a directory svdadapt wrote: the size and sha256 of every file, recorded in its svdadapt.json.

Leaf module (the standard library only). ``entries`` hashes files once, when they are written (or takes the hash a
writer already computed, e.g. a ``shards.ShardWriter``'s journal); ``differences`` compares a directory with its
manifest and names each file that is missing, of another size or of another sha256. Paths are relative to the
directory, with ``/`` separators, so a moved or copied directory keeps its manifest.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["HASH_CHUNK", "sha256_file", "file_entry", "entries", "files_under", "Difference", "differences",
           "check_manifest"]

HASH_CHUNK = 1 << 20  # 1 MiB: the cost is one sequential read of the file


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file."""
    return {"size": os.stat(path).st_size, "sha256": sha256_file(path)}


def files_under(root: str | os.PathLike, sub: str) -> list[str]:
    """The regular files under ``root/sub``, as sorted relative paths (hidden names, a writer's journals and
    temporary files, left out)."""
    base = Path(root)
    found = [p for p in (base / sub).rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(base).parts)]
    return sorted(p.relative_to(base).as_posix() for p in found)


def entries(root: str | os.PathLike, names: Iterable[str],
            known: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """name -> entry for each of ``names`` (relative to ``root``). An entry in ``known`` (a hash the writer computed
    as it wrote the file) is taken when the file still has its size, so a large file is read once, not twice."""
    known = known or {}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        path = Path(root, name)
        k = known.get(name)
        if k is not None and os.stat(path).st_size == k["size"]:
            out[name] = {"size": int(k["size"]), "sha256": str(k["sha256"])}
        else:
            out[name] = file_entry(path)
    return out


@dataclass(frozen=True)
class Difference:
    """One file that does not match its manifest entry: ``what`` is "missing", "size" or "sha256"."""

    file: str
    what: str
    detail: str


def _link_note(path: Path) -> str:
    return f" (a symbolic link to {os.readlink(path)!r})" if path.is_symlink() else ""


def _difference(root: Path, name: str, want: Mapping[str, Any]) -> Difference | None:
    path = root / name
    if not path.is_file():
        return Difference(name, "missing", "missing" + _link_note(path))
    size = path.stat().st_size
    if size != want["size"]:
        return Difference(name, "size", f"{size} bytes, recorded {want['size']}{_link_note(path)}")
    got = sha256_file(path)
    if got != want["sha256"]:
        return Difference(name, "sha256", f"sha256 {got[:12]}…, recorded {want['sha256'][:12]}…{_link_note(path)}")
    return None


def differences(root: str | os.PathLike, files: Mapping[str, Mapping[str, Any]],
                skip: tuple[str, ...] = ()) -> list[Difference]:
    """Each file of the manifest ``files`` that differs under ``root``, in manifest order; names starting with a
    prefix in ``skip`` are not read."""
    root = Path(root)
    found = (_difference(root, n, e) for n, e in files.items() if not n.startswith(skip))
    return [d for d in found if d is not None]


def check_manifest(files: Any, where: str) -> dict[str, dict[str, Any]]:
    """The manifest ``files`` of the record at ``where``, its types checked: a mapping of relative paths (no
    ``..``, not absolute) to ``{"size": int >= 0, "sha256": 64 hex digits}``. ``ValueError`` naming the entry."""
    if not isinstance(files, Mapping):
        raise ValueError(f"{where}: 'files' must be a mapping of file names to size and sha256, got "
                         f"{type(files).__name__}")
    for name, e in files.items():
        parts = Path(str(name)).parts
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"{where}: 'files' entry {name!r} is not a path inside the directory")
        ok = (isinstance(e, Mapping) and isinstance(e.get("size"), int) and not isinstance(e.get("size"), bool)
              and e["size"] >= 0 and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64
              and all(c in "0123456789abcdef" for c in e["sha256"]))
        if not ok:
            raise ValueError(f"{where}: 'files' entry {name!r} must be {{\"size\": bytes, \"sha256\": hex}}, got {e!r}")
    return {n: dict(e) for n, e in files.items()}
