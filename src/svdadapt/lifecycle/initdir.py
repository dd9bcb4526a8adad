"""The init directory: what ``svdadapt init`` and :func:`svdadapt.init_checkpoint` write, and its export after training.

An init directory holds what any trainer can use without svdadapt installed::

    DIR/base/                        the rewritten base (EoRA: the compressed model) as an ordinary HF model dir
                                     (config.json, safetensors weights, tokenizer ...); with ``quantize=``, a
                                     bitsandbytes-quantized one (plain from_pretrained loads it)
    DIR/adapter/                     the initial rank-r adapter in PEFT format, for DIR/base (training overwrites it)
    DIR/svdadapt.json                method, options, rank-r LoRA config, sha256 of the ORIGINAL weights, report,
                                     the source paths, and the manifest (size, sha256) of every other file; last
    DIR/svdadapt_state.safetensors   the initial factors A₀, B₀ (and A, B = A₀, B₀)
    DIR/report.json                  per-layer captured energy (EoRA: compensation error; a quantized base:
                                     quantization error against QLoRA's)

``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR/adapter, is_trainable=True)`` is the
wrapped model. Two writers fill it: :func:`write_init_dir` from a wrapped model in memory, :func:`write_streamed`
after ``init_checkpoint`` wrote the base shard by shard; both write report.json and svdadapt.json from one record
(``_write_report``, ``_write_record``). svdadapt.json is the resume record of ``checkpoint.write_checkpoint`` (no
portable adapter: untrained, ΔW = 0), with ``trained_dir`` = "adapter": ``checkpoint.verify`` checks every file
against the manifest and tells a trained adapter of this init in DIR/adapter from any other change.
:func:`export_init_dir` turns the trained adapter into the save directory ``svdadapt.save`` writes (a plain LoRA for
the ORIGINAL model), refusing an adapter of another init.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_DIR, META_FILE, STATE_FILE, TRAINED_DIR, Saved,
                         Verified, adapter_key, config_dict, read_checkpoint, read_metadata, read_trained_adapter,
                         save_config, sorted_sets, write_checkpoint)
from .compact import CompactOptions, write_compact
from .export import checkpoint_meta
from ..engine.job import Job, lora_config, recorded_options
from ..modules.layers import before_save
from ..storage.manifest import entries, files_under
from ..storage.shards import WRITTEN_FILE

__all__ = ["BASE_DIR", "TRAINED_DIR", "META_FILE", "STATE_FILE", "REPORT_FILE", "LayerResult", "write_init_dir",
           "write_streamed", "export_init_dir", "Exported", "NotAnAdapter", "trained_note"]

REPORT_FILE = "report.json"


@dataclass
class LayerResult:
    """One finished layer: A₀ (r, in), B₀ (out, r) in the adapter dtype, its report, and the sha256
    (``record.weight_checksum``) of the original weight and of the new base, both as stored ("" while the base is
    not yet built: a layer planned during block-by-block calibration)."""

    A: torch.Tensor
    B: torch.Tensor
    report: dict[str, Any]
    base_checksum: str
    residual_checksum: str


Log = Callable[[str], None]


class NotAnAdapter(FileNotFoundError):
    """The trained adapter directory lacks PEFT's adapter files (the CLI: a usage error)."""


# ------------------------------------------------------------------------------------------------- the records


def _source(model_path: str | os.PathLike, reference_path: str | os.PathLike | None) -> dict[str, str | None]:
    """svdadapt.json's ``source``: the absolute paths of the model (EoRA: the compressed one) and of the reference."""
    return {"model": os.path.abspath(model_path),
            "reference": os.path.abspath(reference_path) if reference_path else None}


def _write_report(out: Path, meta: Mapping[str, Any]) -> None:
    """report.json: the record's summary (with the LoRA config's per-layer patterns) and its per-layer report."""
    cfg = meta["lora_config"]
    summary = {"method": meta["method"], "rank": meta["rank"], "alpha": meta["alpha"],
               "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
               "options": meta["options"], "quantize": meta["quantize"], "model": meta["source"]["model"],
               "layers": meta["report"]}
    if meta.get("allocation") is not None:
        summary["allocation"] = meta["allocation"]
    (out / REPORT_FILE).write_text(json.dumps(summary, indent=2, default=list))


def _write_record(out: Path, meta: Mapping[str, Any], init: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  known: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """svdadapt_state.safetensors, then svdadapt.json with the manifest of base/, adapter/ and report.json (``known``:
    hashes a writer computed as it wrote, taken instead of reading the file again). Called once every other file is
    written: each is hashed after it is written."""
    files = entries(out, files_under(out, BASE_DIR) + files_under(out, TRAINED_DIR) + [REPORT_FILE], known)
    # resume record in DIR itself (no portable adapter: untrained, ΔW = 0); `export_init_dir` completes it
    write_checkpoint(out, meta, init, init, resume=True, portable=False, files=files, trained_dir=TRAINED_DIR)


# ------------------------------------------------------------------------------------------- in-memory writer


def write_init_dir(out: str | os.PathLike, peft_model: nn.Module, *, model_path: str | os.PathLike,
                   reference_path: str | os.PathLike | None = None, tokenizer: Any = None,
                   log: Log | None = None) -> Path:
    """Write the init directory of a model returned by ``svdadapt.wrap`` into ``out`` (see the module docstring);
    returns ``out``. Consumes ``peft_model``'s adapters (``unload``: the base is saved as an ordinary model).

    ``model_path`` / ``reference_path``: where the model (EoRA: the compressed one) and the reference were loaded
    from, recorded in svdadapt.json. ``tokenizer`` is saved into base/ (None: none). ``log`` gets the progress
    messages. Order: base/config.json, adapter/, report.json, base/, then the resume record with the manifest of
    them all (svdadapt.json last)."""
    out = Path(out)
    init = peft_model.svdadapt.init_factors
    meta = checkpoint_meta(peft_model)
    meta["source"] = _source(model_path, reference_path)
    out.mkdir(parents=True, exist_ok=True)
    # config first: PEFT's save looks for base_model_name_or_path/config.json (else it may ask the Hub)
    peft_model.get_base_model().config.save_pretrained(str(out / BASE_DIR))
    _save_raw_adapter(peft_model, out)
    _write_report(out, meta)
    _save_base(peft_model, out / BASE_DIR, tokenizer, log)
    _write_record(out, meta, init)
    return out


def _save_raw_adapter(peft_model: nn.Module, out: Path) -> None:
    """The raw rank-r adapter, correct on DIR/base (PEFT's own save, bypassing the guard that converts for W)."""
    from peft import PeftModel

    cfg = peft_model.peft_config["default"]
    cfg.base_model_name_or_path, original_name = str((out / BASE_DIR).resolve()), cfg.base_model_name_or_path
    with sorted_sets(cfg):  # byte-identical adapter_config.json whatever the hash seed
        # save_embedding_layers=False: a targeted embedding's weight is base/'s, not the adapter's to carry
        PeftModel.save_pretrained(peft_model, str(out / TRAINED_DIR), save_embedding_layers=False)
    cfg.base_model_name_or_path = original_name


def _save_base(peft_model: nn.Module, base_dir: Path, tokenizer: Any, log: Log | None) -> None:
    """The rewritten base as an ordinary transformers model directory (consumes ``peft_model``'s adapters)."""
    if log is not None:
        log(f"saving base to {base_dir}")
    base = peft_model.unload()  # adapters out, rewritten weights in: an ordinary transformers model
    before_save(base)  # the layer kinds' hook, e.g. bitsandbytes 0.50 saves a CPU-repacked 4-bit layer corrupted
    base.save_pretrained(str(base_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(base_dir))


# -------------------------------------------------------------------------------------------- streamed writer


def write_streamed(out: Path, job: Job, skeleton: nn.Module, targets: Mapping[str, nn.Module],
                   results: Mapping[str, LayerResult], model_path: str | os.PathLike,
                   reference_path: str | os.PathLike | None, params: Mapping[str, Any] | None = None) -> None:
    """adapter/, report.json, svdadapt_state.safetensors and svdadapt.json of a streamed init whose base/ is written
    (``init_checkpoint``). ``skeleton``: the model on the meta device, ``targets`` its target modules, ``results``
    each target's journaled factors A₀ (r, in), B₀ (out, r), report and checksums, in model order. ``params``
    (``target_parameters``): ParamWrapper module name -> ``stream.experts.ParamResult`` (packed A₀ (E·r, in),
    B₀ (out, r·E), the experts' reports, checksums, svdadapt.json's ``parameters`` entry), recorded after the
    layers as ``wrap`` records them."""
    config = lora_config(skeleton, targets, job)
    config.base_model_name_or_path = str(model_path)  # what get_peft_model records for a model loaded from there
    if config.target_parameters:  # a set once get_peft_model has injected the adapter (PEFT's lora model)
        config.target_parameters = set(config.target_parameters)
    params = dict(params or {})
    _write_adapter(out / TRAINED_DIR, skeleton, config, {**results, **params}, out / BASE_DIR)
    meta = _streamed_meta(job, config, results)
    if params:
        _add_params(meta, params)
    meta["source"] = _source(model_path, reference_path)
    _write_report(out, meta)
    init = {n: (r.A, r.B) for n, r in {**results, **params}.items()}
    _write_record(out, meta, init, _written_hashes(out))
    (out / BASE_DIR / WRITTEN_FILE).unlink(missing_ok=True)


def _write_adapter(adapter_dir: Path, model: nn.Module, config: Any, results: Mapping[str, LayerResult],
                   base_dir: Path) -> None:
    """The rank-r adapter for ``base_dir`` as ``PeftModel.save_pretrained`` writes it (config + safetensors)."""
    from safetensors.torch import save_file

    cfg = copy.deepcopy(config)
    cfg.base_model_name_or_path = str(base_dir.resolve())
    cfg.inference_mode = True
    auto = None if cfg.task_type is not None else {"base_model_class": type(model).__name__,
                                                   "parent_library": type(model).__module__}
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, adapter_dir, auto_mapping_dict=auto)  # sets sorted: the same bytes on every run
    weights = {adapter_key(n, w): t.contiguous() for n, r in results.items() for w, t in (("A", r.A), ("B", r.B))}
    save_file(weights, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _streamed_meta(job: Job, config: Any, results: Mapping[str, LayerResult]) -> dict[str, Any]:
    """The svdadapt.json fields ``export.checkpoint_meta`` gives an in-memory model, from the journaled results."""
    spec = job.spec
    meta: dict[str, Any] = {"method": spec.name, "rank": job.rank, "alpha": job.alpha,
                            "options": recorded_options(job), "targets": list(results),
                            "rewrites_base": spec.rewrites_base, "lora_config": config_dict(config),
                            "base_checksums": {n: r.base_checksum for n, r in results.items()},
                            "report": {n: r.report for n, r in results.items()}, "quantize": None}
    if spec.rewrites_base:
        meta["residual_checksums"] = {n: r.residual_checksum for n, r in results.items()}
    return meta


def _add_params(meta: dict[str, Any], params: Mapping[str, Any]) -> None:
    """The targeted parameters' part of svdadapt.json, as ``experts.record_parameters`` records it."""
    meta["targets"] += list(params)
    for n, p in params.items():
        meta["base_checksums"][n] = p.base_checksum
        meta["report"].update(p.report)
        if meta["rewrites_base"]:
            meta["residual_checksums"][n] = p.residual_checksum
    meta["parameters"] = {n: dict(p.info) for n, p in params.items()}


def _written_hashes(out: Path) -> dict[str, dict[str, Any]]:
    """The base shards' size and sha256 from the ShardWriter, which hashed them as it wrote them
    (``shards.WRITTEN_FILE``), by manifest name."""
    written = out / BASE_DIR / WRITTEN_FILE
    return {f"{BASE_DIR}/{k}": v for k, v in json.loads(written.read_text()).items()} if written.is_file() else {}


# -------------------------------------------------------------------------------------------------- the export


@dataclass
class Exported:
    """What :func:`export_init_dir` wrote: the save directory ``out``, from the trained ``adapter``, its svdadapt.json
    record ``meta``, and how many of the ``layers`` training ``changed`` (factors other than A₀, B₀)."""

    out: Path
    adapter: Path
    meta: dict[str, Any]
    changed: int
    layers: int


def export_init_dir(init_dir: str | os.PathLike, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
                    *, log: Log | None = None, compact: CompactOptions | None = None) -> Exported:
    """The trained adapter of an init directory as the directory ``svdadapt.save`` writes (a plain LoRA for the
    ORIGINAL model, rank 2r; EoRA: rank r for the compressed model; ``svdadapt.load`` resumes from it).

    ``adapter``: a PEFT ``save_pretrained`` of the model built from DIR/base + DIR/adapter, or an svdadapt.save
    directory of the same init (default DIR/adapter). Every file of ``init_dir`` is checked against its manifest,
    base/ included (``log`` gets a line when DIR/adapter is a trained adapter of this init). Refused
    (``ValueError``) if the adapter comes from another init; :class:`NotAnAdapter` if it lacks PEFT's files.
    ``out`` should be a new or empty directory (nothing here checks that it is not an input). With ``compact``
    (``compact.compact_options``) ``out`` is the compact export instead (``compact.write_compact``: a plain PEFT LoRA
    at reduced per-layer ranks and svdadapt_export.json, not resumable)."""
    d = Path(init_dir)
    adapter = Path(adapter) if adapter is not None else d / TRAINED_DIR
    saved = read_checkpoint(d, check_base=True)
    note = trained_note(saved.verified)
    if note is not None and log is not None:
        log(note)
    init = saved.init
    current, extras = _trained_state(adapter, d, saved)
    meta = {k: v for k, v in saved.meta.items() if k not in ("format", "init_checksum", "files", "trained_dir")}
    if compact is None:
        write_checkpoint(out, meta, init, current, resume=True, extras=extras)
    else:
        write_compact(out, meta, init, current, compact, extras)
    moved = sum(int(not (a.equal(init[n][0]) and b.equal(init[n][1]))) for n, (a, b) in current.items())
    return Exported(Path(out), adapter, meta, moved, len(current))


def trained_note(v: Verified | None) -> str | None:
    """The line for an init directory whose adapter/ training overwrote (checked to be a trained adapter)."""
    if v is not None and v.trained:
        return (f"{v.directory / TRAINED_DIR}: changed since init: a trained adapter of this init (r, alpha, targets, "
                "factor shapes checked)")
    return None


def _trained_state(adapter: Path, d: Path, saved: Saved) -> tuple[dict, dict]:
    """(name -> trained (A, B), other adapter tensors) from a PEFT adapter trained on DIR/base, or from an
    svdadapt.save directory (its resume state: its adapter files are the converted rank-2r LoRA); refused if it
    comes from another init."""
    if (adapter / STATE_FILE).is_file():
        theirs = read_checkpoint(adapter)
        _check_same_init(adapter, d, saved, theirs)
        return theirs.current, theirs.extras
    _adapter_config(adapter)  # NotAnAdapter if it is not an adapter directory at all
    current, extras = read_trained_adapter(adapter, saved.meta, saved.init)
    _check_trained_on(adapter, d, saved.meta)
    return current, extras


def _adapter_config(adapter: Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter directory; :class:`NotAnAdapter` if the directory is not one."""
    if not (adapter / ADAPTER_CONFIG).is_file() or not (adapter / ADAPTER_WEIGHTS).is_file():
        raise NotAnAdapter(f"{str(adapter)!r} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and "
                           f"{ADAPTER_WEIGHTS})")
    path = adapter / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON (truncated or corrupt: {e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(path)!r} is not a PEFT adapter config (a JSON {type(cfg).__name__})")
    return cfg


def _check_same_init(adapter: Path, d: Path, mine: Saved, theirs: Saved) -> None:
    """An svdadapt.save directory (``theirs``) belongs to init directory ``d`` (``mine``) only if it holds the
    same method, rank, alpha and bit-identical initial factors A₀, B₀."""
    for k in ("method", "rank", "alpha"):
        if theirs.meta.get(k) != mine.meta.get(k):
            raise ValueError(f"trained adapter {str(adapter)!r} comes from a different init: it has {k}="
                             f"{theirs.meta.get(k)!r}, {str(d)!r} has {mine.meta.get(k)!r}")
    a, b = mine.init, theirs.init
    same = lambda n: n in a and n in b and all(torch.equal(x, y) for x, y in zip(a[n], b[n]))  # noqa: E731
    first = next((n for n in [*a, *b] if not same(n)), None)
    if first is not None:
        raise ValueError(f"trained adapter {str(adapter)!r} comes from a different init: its initial factors "
                         f"({STATE_FILE}) differ from those of {str(d)!r}, first at module {first!r}")


def _check_trained_on(adapter: Path, d: Path, meta: Mapping[str, Any]) -> None:
    """A plain PEFT adapter has no initial factors, but one trained on an init's base/ names it in
    ``base_model_name_or_path``: if that directory's parent is another init directory with other initial
    factors (``init_checksum``), the adapter was not trained from ``d``."""
    base = _adapter_config(adapter).get("base_model_name_or_path")
    if not isinstance(base, str) or not base or not Path(base).is_dir():
        return  # trained on something we cannot see: shapes and config were checked, that is all we can do
    origin = Path(base).parent
    if not (origin / META_FILE).is_file() or origin.resolve() == d.resolve():
        return
    try:
        theirs = read_metadata(origin).get("init_checksum")
    except (OSError, ValueError):
        return
    if theirs is not None and theirs != meta.get("init_checksum"):
        raise ValueError(f"trained adapter {str(adapter)!r} comes from a different init: it was trained on {base!r}, "
                         f"and {str(origin)!r} holds other initial factors than {str(d)!r} (export it with "
                         f"`svdadapt export {origin} --adapter {adapter}`)")
