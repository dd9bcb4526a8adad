"""Quantized checkpoints in ``init_checkpoint``: which formats are read, and the dense view EoRA streams through.

A checkpoint whose config.json has a ``quantization_config`` is read only in the compressed-tensors format (what
vLLM serves; ``quant_method`` "compressed-tensors", ``quantization_status`` "compressed", weight-only schemes):
:func:`open_reader` wraps its ``shards.CheckpointReader`` in a :class:`DecompressedReader`, which presents each
quantized module's compressed tensors (``<module>.weight_packed``, ``.weight_scale``, ``.weight_shape``,
``.weight_zero_point``, …) as one dense ``<module>.weight``: W_c (out, in), decompressed when it is read by the
format's own compressor (``backends.decompress_weight``; the schemes matched to the modules by the library's own
``apply_quantization_config``, as transformers matches them on loading). The meta-device skeleton stays a plain
float model, so the block-by-block calibration (``lazy.LazyBlocks``), the covariances and EoRA's plans run on it
as on a float checkpoint. The base is the checkpoint itself: ``init.py`` copies the stored tensors (the reader
under the view), bit for bit, with its config.json.

Any other ``quant_method`` (gptq, awq, bitsandbytes, hqq, torchao, …) is refused in one line naming it, and so is
a compressed-tensors checkpoint that quantizes activations, is stored in another status, or carries sparsity or
transforms; a method that rewrites the base (PiSSA, MiLoRA, CorDA) is refused on a compressed target
(:func:`check_keeps_base`); EoRA's reference must be unquantized (:func:`check_unquantized`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.methods import MethodSpec
from ..modules import backends
from ..storage.shards import CheckpointReader

__all__ = ["READ_FORMATS", "DecompressedReader", "open_reader", "check_keeps_base", "check_unquantized"]

READ_FORMATS = ("compressed-tensors",)  # the quant_method values init_checkpoint reads


@dataclass(frozen=True)
class Compressed:
    """One quantized module of a checkpoint: its compressed-tensors ``scheme`` and ``format``, the checkpoint keys
    of its compressed state by local name (``{"weight_packed": "<module>.weight_packed", …}``), and the (out, in)
    ``shape`` and ``dtype`` of its decompressed weight."""

    module: str
    scheme: Any
    format: str
    keys: dict[str, str]
    shape: tuple[int, ...]
    dtype: torch.dtype


def _quantization(reader: CheckpointReader) -> dict[str, Any] | None:
    config = reader.config or {}
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def _refuse_method(qc: dict[str, Any], path: Path) -> None:
    method = qc.get("quant_method")
    if method not in READ_FORMATS:
        raise ValueError(f"checkpoint {str(path)!r} is quantized with quant_method {method!r} (config.json "
                         f"quantization_config), which init_checkpoint cannot read: it reads floating-point "
                         f"checkpoints and the {', '.join(READ_FORMATS)} format; load the model with transformers "
                         "and use svdadapt.wrap")


def _refuse_unread(qc: dict[str, Any], path: Path) -> None:
    """What the dense view cannot stand for: the stored status, activations, sparsity, transforms."""
    where = f"compressed-tensors checkpoint {str(path)!r}"
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"{where} has quantization_status {status!r}: init_checkpoint reads 'compressed' "
                         "checkpoints only; load the model with transformers and use svdadapt.wrap")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise ValueError(f"{where} has a {key}, which init_checkpoint does not read (weight-only quantization "
                             "only); load the model with transformers and use svdadapt.wrap")
    activations = [g for g, s in (qc.get("config_groups") or {}).items()
                   if isinstance(s, dict) and (s.get("input_activations") or s.get("output_activations"))]
    if activations or qc.get("kv_cache_scheme"):
        what = f"config group {activations[0]!r}" if activations else "its kv_cache_scheme"
        raise ValueError(f"{where} quantizes activations ({what}): its layers are not linear in their input; "
                         "init_checkpoint reads weight-only quantized checkpoints only")


def _compressed_modules(stored: CheckpointReader, model: nn.Module, qc: dict[str, Any]) -> dict[str, Compressed]:
    """Every module the config quantizes and the checkpoint holds compressed tensors of."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise ImportError(f"checkpoint {str(stored.path)!r} is in the compressed-tensors format: reading it needs "
                          'compressed-tensors: pip install "svdadapt[compressed-tensors]"')
    by_module: dict[str, dict[str, str]] = {}
    for key in stored.names:
        module, _, local = key.rpartition(".")
        by_module.setdefault(module, {})[local] = key
    found = {}
    for name, scheme in backends.compressed_schemes(model, qc).items():
        module = model.get_submodule(name)
        own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
        keys = {local: key for local, key in by_module.get(name, {}).items() if local == "weight" or local not in own}
        if keys:
            found[name] = _described(name, module, scheme, keys, stored)
    return found


def _described(name: str, module: nn.Module, scheme: Any, keys: dict[str, str],
               stored: CheckpointReader) -> Compressed:
    """A module's compressed state described without reading it: W_c's dtype from a decompression of meta tensors
    of the stored shapes and dtypes, its shape the skeleton's."""
    meta = {local: torch.empty(tuple(stored.shape(k)), dtype=stored.dtype(k), device="meta") for local, k in keys.items()}
    try:
        dtype = backends.decompress_weight(meta, scheme, type(module)).dtype
    except (KeyError, ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        raise ValueError(f"module {name!r} of checkpoint {str(stored.path)!r} ({', '.join(sorted(keys))}) cannot "
                         f"be decompressed as its compressed-tensors scheme says: {e}") from e
    return Compressed(name, scheme, backends.compressed_format(type(module), scheme), keys,
                      tuple(module.weight.shape), dtype)


class DecompressedReader:
    """A ``CheckpointReader`` of a compressed-tensors checkpoint as the float checkpoint it stands for: each
    compressed module's tensors are one ``<module>.weight`` (at the place of its first), decompressed by
    :meth:`get`; every other tensor is the stored one. ``stored`` is the reader of the files as they are (the base
    is copied from it); ``modules`` the compressed modules by name."""

    def __init__(self, stored: CheckpointReader, modules: dict[str, Compressed]) -> None:
        self.stored, self.modules = stored, modules
        owner = {key: c for c in modules.values() for key in c.keys.values()}
        self._virtual = {f"{c.module}.weight": c for c in modules.values()}
        # a compressed module's weight where its first tensor is (dict.fromkeys keeps the first of each name)
        self._names = list(dict.fromkeys(key if key not in owner else f"{owner[key].module}.weight"
                                         for key in stored.names))
        self._set = set(self._names)

    # the reader's interface (shards.CheckpointReader), as the streaming code reads a checkpoint
    path = property(lambda self: self.stored.path)
    index_file = property(lambda self: self.stored.index_file)
    config = property(lambda self: self.stored.config)
    files = property(lambda self: self.stored.files)
    names = property(lambda self: list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def compressed(self, name: str) -> Compressed | None:
        """The compressed module whose weight is tensor ``name``, or None (a stored tensor)."""
        return self._virtual.get(name)

    def shape(self, name: str) -> torch.Size:
        c = self._virtual.get(name)
        return torch.Size(c.shape) if c is not None else self.stored.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        c = self._virtual.get(name)
        return c.dtype if c is not None else self.stored.dtype(name)

    def nbytes(self, name: str) -> int:
        c = self._virtual.get(name)
        return c.dtype.itemsize * self.shape(name).numel() if c is not None else self.stored.nbytes(name)

    def file_of(self, name: str) -> Path:
        c = self._virtual.get(name)
        return self.stored.file_of(next(iter(c.keys.values())) if c is not None else name)

    def files_of(self, name: str) -> tuple[Path, ...]:
        """The shard files of a tensor: for a decompressed weight, those of all its compressed tensors."""
        c = self._virtual.get(name)
        return tuple(sorted({self.stored.file_of(k) for k in c.keys.values()})) if c is not None else \
            self.stored.files_of(name)

    def get(self, name: str) -> torch.Tensor:
        """A stored tensor, or a compressed module's W_c (out, in) decompressed by its format's compressor."""
        c = self._virtual.get(name)
        if c is None:
            return self.stored.get(name)
        W = backends.decompress_weight({local: self.stored.get(k) for local, k in c.keys.items()}, c.scheme)
        if tuple(W.shape) != c.shape:
            raise ValueError(f"module {c.module!r} of checkpoint {str(self.path)!r} decompresses to shape "
                             f"{tuple(W.shape)}; the model's config expects {c.shape}")
        return W

    def close(self) -> None:
        self.stored.close()

    def __enter__(self) -> "DecompressedReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DecompressedReader({self.stored!r}, {len(self.modules)} compressed modules)"



def open_reader(stored: CheckpointReader, model: nn.Module) -> CheckpointReader | DecompressedReader:
    """The reader the streaming init reads ``stored`` through: ``stored`` itself for a float checkpoint, the dense
    view of a compressed-tensors one; ValueError for a quantization it cannot read (module docstring)."""
    qc = _quantization(stored)
    if qc is None:
        return stored
    _refuse_method(qc, stored.path)
    _refuse_unread(qc, stored.path)
    return DecompressedReader(stored, _compressed_modules(stored, model, qc))


def check_keeps_base(spec: MethodSpec, targets: dict[str, nn.Module],
                     reader: CheckpointReader | DecompressedReader) -> None:
    """A method that rewrites the base cannot on a compressed target (the base is the quantized checkpoint, which
    svdadapt does not re-quantize); ValueError naming the first such target and its format."""
    if not spec.rewrites_base or not isinstance(reader, DecompressedReader):
        return
    name = next((n for n in targets if n in reader.modules), None)
    if name is not None:
        c = reader.modules[name]
        raise ValueError(f"{spec.name} rewrites the base weights, but module {name!r} is stored quantized in "
                         f"checkpoint {str(reader.path)!r} (compressed-tensors {c.format!r}), which init_checkpoint "
                         f"keeps as the base: run {spec.name} on the full-precision checkpoint, or method='eora' "
                         "with reference= on this one")


def check_unquantized(reader: CheckpointReader, what: str = "reference checkpoint") -> None:
    """EoRA's reference holds the uncompressed weights: a quantized one is a ValueError naming its quant_method."""
    qc = _quantization(reader)
    if qc is not None:
        raise ValueError(f"the {what} {str(reader.path)!r} is quantized (quant_method {qc.get('quant_method')!r}): "
                         "EoRA compensates a compressed model with its uncompressed weights; pass the full-precision "
                         "checkpoint as reference=")
