"""One safetensors file written in place: the header first, then each tensor's bytes at its offset as it comes.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header (names, dtypes, shapes and
byte offsets, padded with spaces to a multiple of 8), then the tensors' bytes back to back. The header depends on
the tensors' names, dtypes and shapes only, never on their values, so a file whose layout is known can be created
with its final header and filled tensor by tensor, each written at its offset and dropped::

    f = ShardFile(path, [("b", "F32", (2, 3)), ("a", "BF16", (4,))])   # header written, file at its full size
    f.write("a", torch.zeros(4, dtype=torch.bfloat16))                  # any order; each tensor exactly once
    f.write("b", torch.ones(2, 3))
    f.close()                                                            # fsync; every tensor must be written

Memory: the tensor being written (its own buffer, handed to ``os.pwrite``; no copy), whatever the file's size.

The bytes are those ``safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})`` writes for the same
tensors: ``header`` orders the tensors as safetensors does (by dtype, in safetensors' own dtype order, found once
per process from a one-element file per dtype, then by name) and serializes the JSON as safetensors does (compact,
``__metadata__`` first, non-ASCII characters as UTF-8, control characters escaped); tests/storage/test_shardfile.py
compares the two byte for byte. Tensor bytes are written in the machine's byte order, as safetensors writes them on
a little-endian machine (``IN_PLACE`` is False elsewhere: writers then build the file in memory with safetensors).

Leaf module: torch, safetensors and the standard library only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["DTYPES", "DTYPE_NAMES", "IN_PLACE", "ShardFile", "header", "dtype_name", "nbytes", "Spec"]

# safetensors header dtype -> torch dtype (the optional ones only where this torch has them)
DTYPES: dict[str, torch.dtype] = {
    key: getattr(torch, attr)
    for key, attr in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
    ]
    if hasattr(torch, attr)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

IN_PLACE = sys.byteorder == "little"  # safetensors stores little-endian; written here as the tensors hold them

Spec = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype, shape)
_METADATA = {"format": "pt"}  # what save_pretrained writes; older transformers refuse files without it


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F32", "BF16", ...)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent") from None


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    """The bytes of a tensor of safetensors dtype ``dtype`` ("F32", ...) and ``shape``."""
    return torch.empty((), dtype=DTYPES[dtype]).element_size() * math.prod(shape)


@functools.cache
def _dtype_rank() -> dict[str, int]:
    """safetensors' order of dtypes in a file (first: 0), read off a one-element tensor of each dtype."""
    from safetensors.torch import save

    blob = save({f"t{i:03d}": torch.zeros(1, dtype=dt) for i, dt in enumerate(DTYPES.values())})
    (n,) = struct.unpack("<Q", blob[:8])
    entries = json.loads(blob[8:8 + n])
    entries.pop("__metadata__", None)
    order = sorted(entries.values(), key=lambda e: e["data_offsets"][0])
    return {e["dtype"]: i for i, e in enumerate(order)}


def header(specs: Iterable[Spec]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The first bytes of the file (length + JSON header, padded) and each tensor's (start, end) byte offsets
    into the data that follows, for tensors ``(name, dtype, shape)`` given in any order."""
    specs = list(specs)
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"a safetensors file holds each name once, got {sorted(n for n in names if names.count(n) > 1)[:3]}")
    rank = _dtype_rank()
    unknown = sorted({d for _, d, _ in specs if d not in rank})
    if unknown:
        raise ValueError(f"dtypes {unknown} are not safetensors dtypes of this safetensors/torch")
    obj: dict[str, object] = {"__metadata__": dict(_METADATA)}
    offsets: dict[str, tuple[int, int]] = {}
    at = 0
    for name, dtype, shape in sorted(specs, key=lambda s: (rank[s[1]], s[0])):
        end = at + nbytes(dtype, shape)
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, end]}
        offsets[name] = (at, end)
        at = end
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class ShardFile:
    """A safetensors file at ``path`` with tensors ``specs`` (``(name, dtype, shape)``, dtype as safetensors
    names it), created with its header and its full size; ``write`` puts one tensor's bytes at its offset,
    ``close`` fsyncs it once every tensor is written. Nothing is kept between writes."""

    def __init__(self, path: str | os.PathLike, specs: Iterable[Spec]):
        self.path = Path(path)
        self.specs = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
        head, self._offsets = header((n, d, s) for n, (d, s) in self.specs.items())
        self._data_start = len(head)
        self.size = len(head) + max((end for _, end in self._offsets.values()), default=0)
        self._missing = set(self.specs)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(self._fd, memoryview(head), 0)
            os.ftruncate(self._fd, self.size)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """``tensor`` (of the dtype and shape its spec says) at its offset; ValueError if it is not one of the
        file's tensors, was written already or does not match its spec."""
        if name not in self.specs:
            raise ValueError(f"{self.path}: {name!r} is not one of the tensors of this file")
        if name not in self._missing:
            raise ValueError(f"{self.path}: {name!r} was written already")
        dtype, shape = self.specs[name]
        if DTYPE_NAMES.get(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: {name!r} is planned as {dtype} {list(shape)}, got "
                             f"{DTYPE_NAMES.get(tensor.dtype, tensor.dtype)} {list(tensor.shape)}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        start, end = self._offsets[name]
        if end > start:
            data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            _pwrite_all(self._fd, data, self._data_start + start)
        self._missing.discard(name)

    @property
    def missing(self) -> set[str]:
        """The names not written yet."""
        return set(self._missing)

    def close(self) -> None:
        """fsync and close; RuntimeError if a tensor was not written (the file would hold zeros there)."""
        if self._missing:
            raise RuntimeError(f"{self.path}: {len(self._missing)} tensors not written, e.g. "
                               f"{sorted(self._missing)[0]!r}")
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Close and delete the unfinished file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)
