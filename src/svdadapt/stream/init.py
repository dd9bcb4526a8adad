"""Streaming init from a checkpoint: ``init_checkpoint`` decomposes a safetensors model one tensor at a time.

``svdadapt init`` loads the whole model; ``init_checkpoint`` never does. It reads the checkpoint tensor by tensor
(``shards.CheckpointReader``), hands each targeted weight to the engine (``plan.plan_layer``, the call ``wrap``
makes, through ``sources.CheckpointSource``), rewrites it to W − s·B₀·A₀ (``methods.finish``) and writes the new
base through a ``shards.ShardWriter``; every other tensor is copied through unchanged. The result is the init
directory ``svdadapt init`` writes (base/, adapter/, svdadapt.json, svdadapt_state.safetensors, report.json: its
layout in ``initdir``, whose ``write_streamed`` writes all but base/), tensor for tensor (same seed and thread count).

Which modules are targets is decided exactly as ``wrap`` decides it, on a skeleton of the model built on the meta
device from config.json (no weight is materialized): ``targets.resolve_targets``.

CorDA and EoRA (``calibration=`` batches; EoRA: ``checkpoint_dir`` compressed, ``reference=`` uncompressed) first
run the calibration one decoder block at a time on that skeleton (``calibrated``: each block's weights read
from the checkpoint only while it runs, ``lazy.LazyBlocks`` under ``blockwise.plan_blockwise``, the path ``wrap``
takes on a loaded model); a block's targets are decomposed while it is loaded and journaled, and the base is then
written as for PiSSA, from the journal (EoRA: copied through). Memory: one block (per model), the hidden states (on
disk past ``BlockwiseOptions.memory_budget_mb``) and the layers outside the stack (embeddings, head).

``target_parameters`` (MoE experts): each targeted parameter is read whole, planned expert by expert as ``wrap``
plans it (PiSSA / MiLoRA when the writer reaches its first tensor; CorDA / EoRA from the covariances of the tokens
routed to each expert, in a block-by-block pass of their own; under ``torch.distributed`` all of them up front, by
all ranks together), and its residual written in the checkpoint's own layout (``experts.StreamedParams``); its
packed factors go to the adapter after the layers'. A checkpoint in transformers' per-expert layout is calibrated
through ``experts.ModuleView`` (the blocks loaded by module name, as ``from_pretrained`` converts them).

Several processes (``torch.distributed``): the base's shards (the files one process would write,
``shards.plan_shards``) are split over the ranks by cost; each rank decomposes the targets in its shards and writes
those shards, rank 0 joins them (``shards.merge_parts``) and writes the rest. The files are those of one process.

Memory follows the largest tensor, not the model nor the shard size: a few tensors of one layer (W as stored, W in
fp32, the SVD's work, the new base); the base's shards have the checkpoint's layout and are written in place, each
tensor at its offset as it is made (``shards.ShardWriter``'s ``layout``); at the end the adapter's factors
(r·(in + out) per layer), a few times over while they are written.

Resuming (``journal``). ``DIR/.svdadapt-stream/`` holds ``job.json`` (what the run computes: method, options,
targets, a fingerprint of the checkpoint's tensor list) and ``layers/<module>.safetensors`` per finished layer (A₀
(r, in), B₀ (out, r), its report and the checksums of W and of the new base), written atomically before that layer's
base enters a shard. ``DIR/base/`` carries the ShardWriter's own journal. Run again with ``resume=True`` (the
default) after an interruption: the completed shards are verified (size, sha256) and kept, the layers already
decomposed are taken from their files (no SVD; W is read again only for a layer whose base was in the shard being
filled, and must match its recorded sha256), and the rest is computed as before. The result is bit-identical to an
uninterrupted run. Each entry carries a sha256 of its contents (a damaged one is decomposed again); ``job.json``
also records the input files' stats, and a resumed run re-checks the tensors of a file whose stats changed
(``inputs``). ``out_dir`` is locked while a run writes into it (``journal.locked``).
``.svdadapt-stream`` is removed when the run completes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import checks
from ..blockwise import BlockwiseOptions
from ..blockwise import resolve as resolve_blockwise
from ..engine.distributed import barrier, fingerprint, layer_cost, same_job, split_by_cost, world
from ..lifecycle.initdir import BASE_DIR, write_streamed
from ..engine.experts import check_routable, warn_coverage
from ..engine.job import Job, Request, build_job, calibrates_on, check_needs, keywords, select_targets
from ..core.methods import get_method
from ..storage.shards import (DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, JOURNAL_FILE, SINGLE_FILE, CheckpointReader,
                     ProgressJournalError, ShardWriter, copy_files, merge_parts, plan_shards, write_part)
from ..engine.sources import CheckpointSource
from .calibrated import plan_calibrated
from .experts import ModuleView, StreamedParams
from .inputs import check_layout, check_reference, check_unchanged, input_stats
from .journal import STREAM_DIR, Journal, layer_base, locked, open_journal
from .quantized import DecompressedReader, check_keeps_base, check_unquantized, open_reader

__all__ = ["init_checkpoint", "STREAM_DIR"]

_FORMAT = "svdadapt.stream/1"


# ------------------------------------------------------------------------------------------------------ checks


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no such checkpoint directory: {str(p)!r}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {str(p)!r}: init_checkpoint needs a Hugging "
                                "Face model directory (config.json + safetensors weights)")
    return p


def _check_run_options(progress: Any, resume: Any, max_shard_bytes: Any, blockwise: Any) -> None:
    checks.check_flag("progress", progress)
    checks.check_flag("resume", resume)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if blockwise is not None and not isinstance(blockwise, BlockwiseOptions):
        raise TypeError(f"blockwise must be None or a svdadapt.BlockwiseOptions, got {blockwise!r}")


def _skeleton(src: Path) -> nn.Module:
    """The model of ``src``'s config.json on the meta device: module names and types, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(src))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"cannot build a causal LM from {src / 'config.json'}: {e}") from e


@dataclass
class _Checkpoint:
    """The input of a run: the checkpoint directory, its meta-device skeleton, the targets and their reader
    (``reader``: the checkpoint as the float model reads it, a ``quantized.DecompressedReader`` over a
    compressed-tensors one; ``stored``: its files as they are, which the base is written from)."""

    src: Path
    model: nn.Module
    targets: dict[str, nn.Module]
    reader: CheckpointReader | DecompressedReader
    source: CheckpointSource
    params: StreamedParams | None = None  # target_parameters (stream/experts.py)

    @property
    def stored(self) -> CheckpointReader:
        return self.reader.stored if isinstance(self.reader, DecompressedReader) else self.reader


def _open_checkpoint(src: Path, job: Job, target_modules: Any, exclude_modules: Any) -> _Checkpoint:
    """Targets resolved as ``wrap`` resolves them, and checked against the checkpoint before anything is read."""
    model = _skeleton(src)
    reader = open_reader(CheckpointReader(src), model)  # a compressed-tensors checkpoint: its dense view
    targets = select_targets(model, target_modules, exclude_modules, job)
    check_keeps_base(job.spec, targets, reader)
    if job.spec.rewrites_base:
        checks.check_untied(model, targets)
    calibrated = job.spec.needs_calibration
    check_layout(model, ModuleView(reader, model) if calibrated else reader, calibrated)
    source = CheckpointSource(reader, targets)
    checks.check_rank_fits(job.rank, source.shapes, job.rank_pattern)
    params = StreamedParams(job, model, targets, reader) if job.target_parameters else None
    if params is not None and calibrated:  # their covariances come from routed tokens (calibrated.py)
        check_routable(params.targets)
    warn_coverage(model, targets, () if params is None else params.targets)
    return _Checkpoint(src, model, targets, reader, source, params)


def _open_reference(ref: str | os.PathLike, ck: _Checkpoint, job: Job) -> _Checkpoint:
    """EoRA's uncompressed checkpoint: the same targets (names, shapes) as the compressed model's."""
    src = _checkpoint_dir(ref)
    model = _skeleton(src)
    if model.config.model_type != ck.model.config.model_type:
        raise ValueError(f"the reference checkpoint {str(src)!r} is a {model.config.model_type!r} model, the "
                         f"compressed one a {ck.model.config.model_type!r}: EoRA compensates a model with its own "
                         "uncompressed weights")
    modules = dict(model.named_modules())
    missing = [n for n in ck.targets if n not in modules]
    if missing:
        raise ValueError(f"the reference checkpoint {str(src)!r} has no module {missing[0]!r}")
    targets = {n: modules[n] for n in ck.targets}
    reader = CheckpointReader(src)
    check_unquantized(reader)
    check_layout(model, ModuleView(reader, model), True, "reference checkpoint")
    source = CheckpointSource(reader, targets)
    check_reference(ck.source, source, src)
    params = None if ck.params is None else StreamedParams(job, model, targets, reader)
    if params is not None:
        _check_reference_params(ck.params, params, src)
    return _Checkpoint(src, model, targets, reader, source, params)


def _check_reference_params(params: StreamedParams, ref: StreamedParams, src: Path) -> None:
    """EoRA's reference: every targeted parameter, of the shape the compressed model's has."""
    for key, t in params.targets.items():
        r = ref.targets.get(key)
        if r is None or (r.experts, r.shape) != (t.experts, t.shape):
            raise ValueError(f"the reference checkpoint {str(src)!r} has no target parameter {key!r} of "
                             f"{t.experts} experts of (out, in) = {t.shape}")


def _tensors_key(reader: CheckpointReader) -> str:
    h = hashlib.sha256()
    for n in reader.names:
        h.update(f"{n}:{tuple(reader.shape(n))}:{reader.nbytes(n)};".encode())
    return h.hexdigest()


def _job_key(job: Job, alpha: float | None, ck: _Checkpoint, max_shard_bytes: int, calibration: str | None,
             options: BlockwiseOptions | None, reference: _Checkpoint | None) -> dict[str, Any]:
    """What decides the output: a resumed run must have the same (``alpha`` as given: None for the rank)."""
    return {"format": _FORMAT, "tensors": _tensors_key(ck.stored), "method": job.spec.name, "rank": job.rank,
            "alpha": alpha, "use_rslora": job.use_rslora,
            "rank_pattern": dict(job.rank_pattern), "alpha_pattern": dict(job.alpha_pattern), "svd": job.svd.svd, "niter": job.svd.niter,
            "oversample": job.svd.oversample, "seed": job.seed, "targets": sorted(ck.source.keys),
            "max_shard_bytes": max_shard_bytes, "mode": job.mode, "damping": getattr(job.options, "damping", None),
            "calibration": calibration, "calibrate_on": calibrates_on(job),
            "sequential": None if options is None else options.sequential,
            "reference": None if reference is None else _tensors_key(reference.reader),
            **({"target_parameters": sorted(ck.params.targets)} if ck.params is not None else {}),
            "inputs": {"model": input_stats(ck.reader),
                       "reference": None if reference is None else input_stats(reference.reader)}}


# ------------------------------------------------------------------------------------------------------ the base


def _finished_base(base_dir: Path, reader: CheckpointReader, source: CheckpointSource, journal: Journal) -> bool:
    """A resumed run killed after the ShardWriter closed but before it was recorded: a complete checkpoint with
    every tensor (the targets' entries are checked after, by ``_complete_journal``). One that is not (a shard
    missing, truncated or holding other tensors) is written again (``_base_writer``)."""
    if not journal.resumed or (base_dir / JOURNAL_FILE).exists():
        return False
    if not ((base_dir / SINGLE_FILE).is_file() or (base_dir / INDEX_FILE).is_file()):
        return False
    try:
        with CheckpointReader(base_dir) as written:  # opens and checks every shard's header
            return set(written.names) == set(reader.names)
    except (ValueError, FileNotFoundError):
        return False


def _base_writer(base_dir: Path, reader: CheckpointReader, max_shard_bytes: int, journal: Journal) -> ShardWriter:
    """The base's ShardWriter, resuming the interrupted run's; an unreadable progress journal is an error naming it
    and the way out (the base is written again from the journal's factors). The base has the checkpoint's layout
    (names, dtypes, shapes): each tensor is written in place as it comes."""
    try:  # a resumed run without a progress journal: the base files there are not a finished base, rewrite them
        return ShardWriter(base_dir, max_shard_bytes, resume=journal.resumed, overwrite=journal.resumed,
                           keep_hashes=True, layout=reader.layout)
    except ProgressJournalError as e:
        raise ValueError(f"{e.path}: unreadable progress journal of the base (truncated or corrupt); delete "
                         f"{base_dir} to write the base again (the decomposed layers in {journal.layers} are kept), "
                         f"or delete {base_dir.parent} and start again") from e


def _complete_journal(job: Job, source: CheckpointSource, journal: Journal) -> None:
    """Every target's entry, once the base is written: one that was damaged (``Journal.get`` removed it) is made
    again from W, as the interrupted run made it (data-free methods: the same factors and base, bit for bit)."""
    for name in source.names:
        if journal.get(name) is None:
            if job.spec.needs_calibration:  # its covariance is gone with the calibration
                journal.require(name)
            layer_base(job, source, journal, name)


def _check_inputs(journal: Journal, ck: _Checkpoint, ref: _Checkpoint | None, out: Path, calibrated: bool) -> None:
    """A resumed run: the input files as the interrupted run used them (``inputs.check_unchanged``); their
    stats are then recorded anew."""
    saved = journal.saved_inputs or {}
    check_unchanged(journal, ck.reader, saved.get("model"), ck.source, out / BASE_DIR, calibrated, out)
    if ref is not None:
        check_unchanged(journal, ref.reader, saved.get("reference"), None, out / BASE_DIR, calibrated, out)
    if world()[0] == 0:
        journal.record_inputs({"model": input_stats(ck.reader),
                               "reference": None if ref is None else input_stats(ref.reader)})


def _write_base(job: Job, reader: CheckpointReader, source: CheckpointSource, base_dir: Path, journal: Journal,
                max_shard_bytes: int, progress: bool, params: StreamedParams | None = None) -> None:
    """Every tensor of the checkpoint, in its order, into ``base_dir``: targets rewritten, the rest copied."""
    if journal.base_complete or _finished_base(base_dir, reader, source, journal):
        journal.mark_base_complete()
        return
    # a compressed target is copied as stored (EoRA keeps the base): only the targets stored as weights count, and
    # with none (EoRA on a compressed-tensors checkpoint: every target was decomposed block by block, under the
    # "svdadapt blocks" bar) there is no layer bar, rather than one counting 0 layers
    rewritten = sum(source.module_of(key) is not None for key in reader.names)
    bar = tqdm(total=rewritten, desc=f"svdadapt {job.spec.name}", unit="layer", disable=not progress or not rewritten)
    with bar, _base_writer(base_dir, reader, max_shard_bytes, journal) as writer:
        for key in reader.names:
            name = source.module_of(key)
            if key in writer.done:  # in a verified shard of the interrupted run (its entry: _complete_journal)
                if name is not None:
                    bar.update()
                continue
            if name is None:
                writer.add(key, params.base(key) if params is not None and params.owns(key) else reader.get(key))
                continue
            writer.add(key, layer_base(job, source, journal, name)[0])
            bar.update()
    journal.mark_base_complete()


# ------------------------------------------------------------------------------------------------------ the rest


def _write_outputs(out: Path, ck: _Checkpoint, job: Job, journal: Journal,
                   reference: str | os.PathLike | None) -> None:
    """Everything but the base's tensors: its other files, then the adapter, report.json, the state, svdadapt.json
    (``initdir.write_streamed``)."""
    copy_files(ck.stored.files, out / BASE_DIR)
    results = {n: journal.require(n) for n in ck.targets}  # model order, as wrap records them
    params = None if ck.params is None else ck.params.finish()  # after the layers, as wrap records them
    write_streamed(out, job, ck.model, ck.targets, results, ck.src, reference, params)


_IO_FLOPS_PER_BYTE = 10.0  # a byte read and written weighs about as much as 10 flops of decomposition


def _write_base_together(job: Job, ck: _Checkpoint, journal: Journal, base_dir: Path, max_shard_bytes: int,
                         progress: bool) -> bool:
    """Under ``torch.distributed``: the base's shards (``shards.plan_shards``: the files one process writes) are
    split over the ranks by the cost of what they hold (decompositions, and bytes read and written); each rank
    decomposes the targets of its shards (factors into the journal, which every rank sees: ``out_dir`` on a shared
    filesystem) and writes those shards (``shards.write_part``); rank 0 then joins them into the checkpoint
    (``shards.merge_parts``) and writes the other outputs. Returns whether this process goes on to write them."""
    rank, size = world()
    reader, source = ck.stored, ck.source
    plan = plan_shards([(key, reader.nbytes(key)) for key in reader.names], max_shard_bytes)

    def cost(names: list[str]) -> float:
        flops = sum(layer_cost(source.shapes[n], job, job.rank_of(n)) for n in map(source.module_of, names) if n is not None)
        return flops + _IO_FLOPS_PER_BYTE * sum(reader.nbytes(key) for key in names)

    params = ck.params
    if params is not None:  # planned by all ranks together (each its share of the experts), before any shard
        params.plan_all()

    def tensor(key: str) -> torch.Tensor:
        name = source.module_of(key)
        if name is None:
            return params.base(key) if params is not None and params.owns(key) else reader.get(key)
        return layer_base(job, source, journal, name)[0]

    if not journal.base_complete:
        share = split_by_cost({k: cost(names) for k, names in enumerate(plan, 1)}, size)[rank]
        mine = {int(k): plan[int(k) - 1] for k in share}
        if params is not None:  # each rank writes its own shards' residuals
            params.keep = {key for names in mine.values() for key in names}
        with tqdm(total=sum(map(len, mine.values())), desc=f"svdadapt {job.spec.name} (rank {rank})",
                  unit="tensor", disable=not progress) as bar:
            write_part(base_dir, mine, tensor, rank, max_shard_bytes, lambda _: bar.update(), layout=reader.layout)
    barrier()
    if rank != 0:
        barrier()  # wait for rank 0's outputs
        return False
    if not journal.base_complete:
        merge_parts(base_dir, plan, max_shard_bytes, keep_hashes=True)  # the manifest takes their hashes
        journal.mark_base_complete()
    return True


@dataclass
class _Run:
    """One run of ``init_checkpoint``: its job, the checkpoint (and EoRA's reference), the journal, the output."""

    job: Job
    ck: _Checkpoint
    ref: _Checkpoint | None
    journal: Journal
    out: Path
    max_shard_bytes: int
    progress: bool


def _decompose(run: _Run, batches: list[Any] | None, blocks: BlockwiseOptions | None) -> bool:
    """Every target decomposed (calibrated methods: block by block first) and the base written, by this process or
    split over the ranks; every target's entry then in the journal. Returns whether this process goes on to write
    the other outputs (rank 0)."""
    job, ck, journal, base_dir = run.job, run.ck, run.journal, run.out / BASE_DIR
    if journal.resumed:
        _check_inputs(journal, ck, run.ref, run.out, batches is not None)
    if batches is not None:
        plan_calibrated(job, ck, journal, batches, blocks, run.progress, run.ref)
        if run.ref is not None:
            run.ref.reader.close()
    if world()[1] == 1:
        _write_base(job, ck.stored, ck.source, base_dir, journal, run.max_shard_bytes, run.progress, ck.params)
    elif not _write_base_together(job, ck, journal, base_dir, run.max_shard_bytes, run.progress):
        return False
    _complete_journal(job, ck.source, journal)
    if ck.params is not None:
        ck.params.finish()  # a parameter a resumed run found written is planned again before the reader closes
    ck.reader.close()
    return True


@same_job  # under torch.distributed: the ranks' arguments compared first, one rank's error raised on all
@keywords  # alpha ... blockwise, mode, damping, calibrate_on, progress: as wrap's (job.Request, the method options)
def init_checkpoint(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    method: str,
    rank: int,
    request: Request,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    resume: bool = True,
    allocate: Any = False,
) -> Path:
    """Initialize an adapter from a safetensors checkpoint without loading the model; returns ``out_dir``.

    Writes what ``svdadapt init`` writes (``out_dir``/base, /adapter, svdadapt.json, svdadapt_state.safetensors,
    report.json: see the module docstring), the same tensors bit for bit with the same seed and thread count.
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out_dir/"base"), out_dir/"adapter")`` is the
    wrapped model, and ``svdadapt.load(original_model, out_dir)`` rebuilds it from the original.

    Args:
        checkpoint_dir: a Hugging Face causal-LM directory: config.json and ``model.safetensors`` or
            ``model.safetensors.index.json`` with its shards (other files, e.g. the tokenizer's, are copied).
        out_dir: a new or empty directory (or the one of an interrupted run, with ``resume``).
        method: ``"pissa"``, ``"milora"``, ``"corda"`` (with ``calibration``) or ``"eora"`` (with
            ``calibration`` and ``reference``: ``checkpoint_dir`` is then the compressed model, a float checkpoint
            such as ``svdadapt.compress`` gives, copied through as the base).
        rank, alpha, rank_pattern, alpha_pattern, target_modules, exclude_modules, use_rslora, svd, niter,
            oversample, seed, mode, damping, options: as
            in :func:`svdadapt.wrap`; targets are resolved on a meta-device skeleton of the model, as ``wrap`` would
            on the loaded one (``"all-linear"`` leaves out the output head).
        target_parameters: PEFT's (MoE experts, docs/experts.md), for every method: each expert decomposed as
            ``wrap`` does (CorDA / EoRA from the tokens routed to it), the base written in the checkpoint's layout
            (``experts.StreamedParams``).
        calibration: CorDA/EoRA's batches (as for ``wrap``), run one decoder block at a time, each block loaded
            from the checkpoint only while it runs (``svdadapt.lazy``): ``wrap``'s adapters, bit for bit.
        reference, calibrate_on: EoRA's uncompressed checkpoint directory (also read one block at a time) and
            which model the batches run on, as in ``wrap``.
        blockwise: the hidden states' memory budget, offload directory and EoRA's sequential inputs
            (``BlockwiseOptions``; None: defaults, as ``wrap``'s: sequential for EoRA).
        max_shard_bytes: the largest output shard (tensor bytes; default 1 GiB; the writer holds none of it).
        progress: a progress bar over the targeted layers.
        resume: continue the interrupted run found in ``out_dir`` (verified shards and finished layers kept);
            with False an unfinished run there is an error.
        allocate: not supported here (``ValueError``): each base is written as its layer is decomposed, before
            the ranks an allocation picks from every layer are known; use ``svdadapt.wrap(..., allocate=...)``.

    Raises ``FileNotFoundError``, ``FileExistsError``, ``ValueError`` or ``TypeError`` naming the path, module or
    option at fault (the list: docs/errors.md#init-checkpoint).
    """
    if allocate is not False and allocate is not None:
        raise ValueError("init_checkpoint does not allocate ranks: it writes each layer's base W - s*B*A as the "
                         "layer is decomposed, before the ranks, which depend on every layer, are known; allocate "
                         "with svdadapt.wrap(model, ..., allocate=...) on the loaded model (svdadapt init "
                         "--allocate loads it), or pass the ranks it chose as rank_pattern=")
    src, spec = _checkpoint_dir(checkpoint_dir), get_method(method)
    check_needs(spec, request.calibration, request.reference, streaming=True)
    _check_run_options(request.progress, resume, max_shard_bytes, request.blockwise)
    job = build_job(spec, rank, request)
    ck = _open_checkpoint(src, job, request.target_modules, request.exclude_modules)
    ref = None if request.reference is None else _open_reference(request.reference, ck, job)
    batches = None if request.calibration is None else list(request.calibration)
    blocks = None if batches is None else resolve_blockwise(request.blockwise or True, spec, batches, quantized=False)
    out = Path(out_dir)
    key = _job_key(job, request.alpha, ck, max_shard_bytes, batches and fingerprint(batches), blocks, ref)
    with locked(out):
        journal = open_journal(out, key, resume)
        run = _Run(job, ck, ref, journal, out, max_shard_bytes, request.progress)
        if not _decompose(run, batches, blocks):
            return out  # rank 0 writes the other outputs
        _write_outputs(out, ck, job, journal, request.reference)
        journal.remove()
    barrier()
    return out
