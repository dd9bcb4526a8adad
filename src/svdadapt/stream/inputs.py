"""The inputs of ``init_checkpoint``, checked before any work and again when an interrupted run resumes.

Up front (``check_layout``, ``check_reference``): every tensor of the checkpoint is one the model of its
config.json has (a checkpoint with more layers than the config says is an error naming them, not a silent copy);
a model whose transformers class stores its checkpoint in another key layout than its module names (transformers'
weight conversions, e.g. Mixtral's per-expert ``w1``/``w3`` for the fused ``experts.gate_up_proj``) is refused by
the block-by-block calibration, which loads blocks by module name; EoRA's reference is the same architecture
(``model_type``) with the same shape for every target.

On resume (``input_stats``, ``check_unchanged``): ``job.json`` records, per input file, its size, modification and
change times and inode (``os.stat``: no data read). A file whose record differs is read again, and each of its
tensors the interrupted run used is compared with what that run kept of it: a target's sha256 in its journal entry,
a copied tensor's bytes in the base shard already written. A tensor that differs is an error naming it; so is one
that cannot be checked (a calibration input, e.g. a norm, of layers already decomposed). An unchanged file costs one
``stat``; a changed one, one read of the tensors of it already used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.record import checksum_matches, weight_checksum
from ..storage.shards import CheckpointReader, ProgressJournalError, written_tensors
from ..engine.sources import CheckpointSource
from .journal import Journal

__all__ = ["check_layout", "check_reference", "input_stats", "check_unchanged"]

_SHOWN = 3  # tensor names listed in a message


def _model_names(model: nn.Module) -> tuple[list[list[str]], set[str]]:
    """The skeleton's parameters (each as all the names it is tied under) and every parameter and buffer name."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    names = {n for g in groups.values() for n in g} | {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return list(groups.values()), names


def _listed(names: list[str]) -> str:
    more = f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(map(repr, names[:_SHOWN])) + more


def _conversions(model: nn.Module) -> list[Any]:
    """transformers' weight conversions between this model's checkpoint keys and its module names (none: [])."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers < 5: checkpoints are stored by module name
        return []
    return list(get_model_conversion_mapping(model, add_legacy=False))


def check_layout(model: nn.Module, reader: CheckpointReader, calibrated: bool, what: str = "checkpoint") -> None:
    """The checkpoint holds the model of its config.json: no tensor it does not explain, and, when blocks are loaded
    by module name (``calibrated``), every parameter under one of its names. ValueError naming the tensors."""
    groups, names = _model_names(model)
    conversions = _conversions(model)
    if calibrated and conversions:
        missing = [g[0] for g in groups if not any(n in reader for n in g)]
        if missing:
            c = conversions[0]
            raise ValueError(
                f"{what} {reader.path} ({model.config.model_type}, {type(model).__name__}) stores its tensors in "
                f"transformers' checkpoint key layout, not by module name ({_listed(list(c.source_patterns))} for "
                f"{_listed(list(c.target_patterns))}; e.g. no tensor {missing[0]!r}): block-by-block calibration "
                "cannot load it; load the model and use svdadapt.wrap")
    if conversions:
        return  # its keys follow the conversion's source patterns, not the module names
    unexplained = [n for n in reader.names if n not in names]
    if unexplained:
        raise ValueError(f"{what} {reader.path} holds {len(unexplained)} tensors the model of its config.json does "
                         f"not have: {_listed(unexplained)}; config.json does not describe these weights (layer "
                         "count, architecture?): fix config.json, or use the checkpoint it belongs to")


def check_reference(source: CheckpointSource, ref_source: CheckpointSource, ref_path: Path) -> None:
    """EoRA's reference: every target of the shape (out, in) it has in the compressed model."""
    for name, shape in source.shapes.items():
        if ref_source.shapes[name] != shape:
            raise ValueError(f"the reference checkpoint {str(ref_path)!r} has module {name!r} of shape (out, in) = "
                             f"{ref_source.shapes[name]}, the compressed model {shape}")


def _files(reader: CheckpointReader) -> list[Path]:
    files = {f for n in reader.names for f in reader.files_of(n)}
    return sorted(files | ({reader.index_file} if reader.index_file is not None else set()))


def _stat(f: Path) -> list[int]:
    s = os.stat(f)
    return [s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino]


def input_stats(reader: CheckpointReader) -> dict[str, list[int]]:
    """Per input file (path as the reader names it): size, mtime, ctime and inode. A stat per file, no read."""
    return {str(f): _stat(f) for f in _files(reader)}


def _changed(reader: CheckpointReader, saved: dict[str, list[int]] | None) -> list[str]:
    """The tensors of ``reader`` whose file (or index) is not as recorded (all of them without a record)."""
    now = input_stats(reader)
    index = reader.index_file
    if saved is None or (index is not None and saved.get(str(index)) != now[str(index)]):
        return list(reader.names)
    moved = {f for f, s in now.items() if saved.get(f) != s}
    return [n for n in reader.names if any(str(f) in moved for f in reader.files_of(n))]


def _same_as_written(key: str, tensor: torch.Tensor, file: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as h:
            written = h.get_tensor(key)
    except (SafetensorError, OSError):
        return True  # a damaged shard fails its sha256 and is written again, from this input
    return weight_checksum(written) == weight_checksum(tensor)


def _checker(reader: CheckpointReader, source: CheckpointSource | None, journal: Journal, written: dict[str, Path],
             used: bool) -> Callable[[str], bool | None]:
    """key -> equal to what the interrupted run used (True/False), or None if that cannot be told; a tensor is read
    only where there is something to compare it with."""

    def check(key: str) -> bool | None:
        name = None if source is None else source.module_of(key)
        entry = None if name is None else journal.get(name)
        if entry is not None:
            return checksum_matches(reader.get(key), entry.base_checksum)
        if key in written:
            return None if name is not None else _same_as_written(key, reader.get(key), written[key])
        return None if used else True

    return check


def check_unchanged(journal: Journal, reader: CheckpointReader, saved: dict[str, list[int]] | None,
                    source: CheckpointSource | None, base_dir: Path, calibrated: bool, out: Path) -> None:
    """On resume: the tensors of ``reader`` (the checkpoint; with ``source=None`` EoRA's reference) are those the
    interrupted run used. ValueError naming the first one that differs or cannot be checked."""
    changed = _changed(reader, saved)
    if not changed:
        return
    try:
        written = written_tensors(base_dir) if source is not None else {}
    except ProgressJournalError:
        written = {}  # the base's writer refuses to go on, naming its journal: nothing of it is kept
    used = calibrated and any(journal.layers.glob("*.safetensors"))  # calibration inputs of journaled layers
    check = _checker(reader, source, journal, written, used)
    for key in changed:
        same = check(key)
        file = reader.file_of(key)
        if same is False:
            name = None if source is None else source.module_of(key)
            what = f"tensor {key!r} in {file}" if name is None else f"the weight of {name!r} ({key!r} in {file})"
            raise ValueError(f"{what} changed since the interrupted run in {str(out)!r}: restore it, or delete "
                             f"{str(out)!r} and start again")
        if same is None:
            raise ValueError(f"{file} changed since the interrupted run in {str(out)!r} (size or modification time), "
                             f"and its tensor {key!r}, which that run used, cannot be checked against what it kept: "
                             f"restore the file, or delete {str(out)!r} and start again")
