"""The resume journal of ``init_checkpoint``: ``out_dir/.svdadapt-stream`` and one layer's plan-or-journal step.

``job.json`` holds what the run computes (a resumed run must compute the same); ``layers/<module>.safetensors`` holds
each finished layer's A₀ (r, in), B₀ (out, r), report and the checksums of its weight (``checks.BASE_CHECKSUM``, as
``wrap`` records it; sha256 in journals of earlier versions) and of its new base (sha256), written
atomically before that base enters a shard, with a sha256 of all of it (``entry_checksum``: a damaged entry is
removed and decomposed again). ``job.json`` also records the input files' stats (``inputs``). ``locked``
holds ``out_dir`` for one run at a time. ``journal_plan`` plans one target (or takes the journaled factors, checked
against W's checksum); ``layer_base`` reads W from the checkpoint, plans it so and builds the new base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import torch

from ..engine.distributed import barrier, world
from ..lifecycle.initdir import LayerResult
from ..engine.plan import Job, LayerInput, LayerPlan, plan_layer
from ..core.methods import finish
from ..core.record import checksum_matches, scan_weight, weight_checksum
from ..engine.checks import BASE_CHECKSUM
from ..storage.shards import fsync_file
from ..engine.sources import CheckpointSource

__all__ = ["STREAM_DIR", "Journal", "open_journal", "locked", "journal_plan", "layer_base"]

STREAM_DIR = ".svdadapt-stream"  # the resume journal inside out_dir


class Journal:
    """``out_dir/.svdadapt-stream``: the job's description and one safetensors file per finished layer."""

    def __init__(self, out: Path, key: dict[str, Any], resume: bool) -> None:
        self.dir = out / STREAM_DIR
        self.layers = self.dir / "layers"
        self.resumed = self._open(out, json.loads(json.dumps(key)), resume)

    def _open(self, out: Path, key: dict[str, Any], resume: bool) -> bool:
        job = self.dir / "job.json"
        if job.is_file():
            if not resume:
                raise FileExistsError(f"{out} holds an unfinished init_checkpoint run ({job}); pass resume=True to "
                                      "continue it, or delete the directory")
            saved = _read_job(job)
            self.saved_inputs = saved.get("inputs")
            differ = sorted(k for k in set(saved) | set(key) if k != "inputs" and saved.get(k) != key.get(k))
            if differ:
                raise ValueError(f"{out} holds an unfinished init_checkpoint run of another job ({', '.join(differ)} "
                                 "differ); pass the same checkpoint and options, or use another out_dir")
            return True
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"output {str(out)!r} exists and is not an empty directory (nor an unfinished "
                                  "init_checkpoint run to resume)")
        self.layers.mkdir(parents=True)
        self.saved_inputs = key.get("inputs")
        self._write_job(key)
        return False

    def _write_job(self, key: dict[str, Any]) -> None:
        tmp = self.dir / ".job.json.tmp"
        tmp.write_text(json.dumps(key, indent=2))
        os.replace(tmp, self.dir / "job.json")

    def record_inputs(self, inputs: dict[str, Any]) -> None:
        """The input files' stats (``inputs.input_stats``) as now, once a resumed run found them unchanged
        in content: the next resume compares with these."""
        key = _read_job(self.dir / "job.json")
        key["inputs"] = self.saved_inputs = inputs
        self._write_job(key)

    def _file(self, name: str) -> Path:
        return self.layers / f"{name}.safetensors"

    def put(self, name: str, r: LayerResult) -> None:
        from safetensors.torch import save_file

        meta = {"report": json.dumps(r.report), "base_checksum": r.base_checksum,
                "residual_checksum": r.residual_checksum}
        meta["entry_checksum"] = _entry_checksum(r.A, r.B, meta)
        tmp = self.layers / f".{name}.tmp"
        save_file({"A": r.A.contiguous(), "B": r.B.contiguous()}, str(tmp), metadata=meta)
        fsync_file(tmp)
        os.replace(tmp, self._file(name))

    def get(self, name: str) -> LayerResult | None:
        """The journaled entry of ``name``; None if there is none, or if its file is damaged (unreadable, or not
        what was written: its ``entry_checksum`` covers A, B and the metadata), which is then removed with a warning
        so that the layer is decomposed again."""
        f = self._file(name)
        if not f.is_file():
            return None
        try:
            A, B, meta = _read_entry(f)
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"svdadapt: damaged resume journal entry {f} ({e}): module {name!r} is decomposed again",
                          stacklevel=2)
            f.unlink()
            return None
        report = json.loads(meta["report"])
        if "shape" in report:
            report["shape"] = tuple(report["shape"])  # as plan_layer gives it
        return LayerResult(A, B, report, meta["base_checksum"], meta["residual_checksum"])

    def require(self, name: str) -> LayerResult:
        r = self.get(name)
        if r is None:
            raise RuntimeError(f"the resume journal {self.layers} has no factors for module {name!r}, whose base is "
                               "already written: delete the output directory and start again")
        return r

    @property
    def base_complete(self) -> bool:
        return (self.dir / "base.complete").is_file()

    def mark_base_complete(self) -> None:
        (self.dir / "base.complete").write_text("")

    def remove(self) -> None:
        shutil.rmtree(self.dir)


def _read_job(job: Path) -> dict[str, Any]:
    """The saved job of an unfinished run; ValueError naming the file if it is not the JSON object written."""
    try:
        saved = json.loads(job.read_text())
        if not isinstance(saved, dict):
            raise TypeError(f"a JSON {type(saved).__name__}, not an object")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{job}: unreadable resume journal (truncated or corrupt: {e}); the interrupted run cannot "
                         f"be continued: delete {job.parent.parent} and start again") from e
    return saved


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the directory ``out`` (created if missing) while a run writes into it: a second
    run into the same directory is an error, not a race. ``fcntl.flock`` on the directory itself: no file is
    added, and the operating system releases the lock when the process dies. Under ``torch.distributed`` rank 0
    holds it for all ranks; where there is no ``fcntl`` (Windows) there is no lock."""
    if world()[0] != 0 or fcntl is None or (out.exists() and not out.is_dir()):
        yield  # a path that is not a directory is refused by the journal
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"output directory {str(out)!r} is in use by another init_checkpoint run (it holds "
                               "the directory's lock): wait for that run to end, or pass another out_dir") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _entry_checksum(A: torch.Tensor, B: torch.Tensor, meta: dict[str, str]) -> str:
    """sha256 over a journal entry's factors and metadata fields (everything ``Journal.get`` returns)."""
    h = hashlib.sha256(weight_checksum(A).encode() + weight_checksum(B).encode())
    for k in ("report", "base_checksum", "residual_checksum"):
        h.update(f"{k}={meta[k]};".encode())
    return h.hexdigest()


def _read_entry(f: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(A, B, metadata) of a journal entry, checked against its ``entry_checksum``; ValueError if it does not
    match or the file cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            A, B = h.get_tensor("A").clone(), h.get_tensor("B").clone()
    except SafetensorError as e:
        raise ValueError(f"not a readable safetensors file: {e}") from e
    if meta.get("entry_checksum") != _entry_checksum(A, B, meta):
        raise ValueError("its checksum does not match its contents")
    return A, B, meta


def open_journal(out: Path, key: dict[str, Any], resume: bool) -> Journal:
    """The journal; under ``torch.distributed`` rank 0 creates it and the other ranks join it."""
    rank, size = world()
    if size == 1:
        return Journal(out, key, resume)
    journal = Journal(out, key, resume) if rank == 0 else None
    barrier()
    return journal if journal is not None else Journal(out, key, resume=True)


def journal_plan(job: Job, journal: Journal, layer: LayerInput, stored: torch.Tensor, where: str,
                 plan_one: Callable[[LayerInput], LayerPlan] | None = None) -> tuple[LayerResult, bool]:
    """One target's factors: those an interrupted run journaled for this very weight (its checksum must match, in
    the algorithm it was journaled in: an earlier version's sha256 is kept, and recorded, as it is), or
    planned now by ``plan_one`` (default ``plan.plan_layer``). ``stored`` is the weight as the checkpoint stores it,
    ``where`` the file it comes from (for messages). Returns the entry (a new one has no residual checksum yet: "")
    and whether it was planned now; nothing is journaled here."""
    name = layer.name
    checksum, finite = scan_weight(stored, BASE_CHECKSUM)  # one pass: the stored entries are W's, in its layout
    if not finite:
        raise ValueError(f"module {name!r} has a weight with NaN or inf ({int((~torch.isfinite(layer.W)).sum())} of "
                         f"{layer.W.numel()} entries) in {where}; svdadapt cannot decompose it")
    saved = journal.get(name)
    if saved is not None:
        if saved.base_checksum != checksum and not checksum_matches(stored, saved.base_checksum):
            raise ValueError(f"the weight of {name!r} in {where} changed since the interrupted run: delete "
                             f"{journal.dir.parent} and start again")
        return saved, False
    plan = plan_layer(job, layer) if plan_one is None else plan_one(layer)
    return LayerResult(plan.A, plan.B, plan.report, checksum, ""), True


def layer_base(job: Job, source: CheckpointSource, journal: Journal, name: str) -> tuple[torch.Tensor, LayerResult]:
    """The new base of one target as stored (its factors from :func:`journal_plan`), and its journal entry, written
    with the new base's checksum."""
    layer, stored = source.read(name)  # W (out, in) in its compute dtype; the stored tensor
    entry, _ = journal_plan(job, journal, layer, stored, str(source.reader.file_of(source.keys[name])))
    if job.spec.rewrites_base:  # (out, in) from the rounded factors, cast once to the stored dtype
        base = source.as_stored(name, finish(layer.W, entry.A, entry.B, job.scaling_of(name), stored.dtype))
    else:
        base = stored
    del layer, stored
    residual = weight_checksum(base)
    if entry.residual_checksum != residual:
        entry = replace(entry, residual_checksum=residual)
        journal.put(name, entry)
    return base, entry
