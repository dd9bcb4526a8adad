"""The on-disk format of a saved svdadapt model: what a directory holds, written and read tensor-exactly.

A directory written by ``svdadapt.save`` (or ``svdadapt export``) holds::

    adapter_config.json, adapter_model.safetensors   vanilla PEFT adapter for the ORIGINAL base (EoRA: W_c)
    svdadapt.json                                    method, options, rank-r LoRA config, checksums, report
    svdadapt_state.safetensors                       "<module>.A0/.B0" initial factors, "<module>.A/.B" current

svdadapt.json is written last and lists the size and sha256 of every other file svdadapt wrote into the directory
(``files``, the manifest; an init directory's, laid out in ``initdir``, also lists base/, adapter/ and report.json,
and names the folder training is meant to overwrite, ``trained_dir`` = "adapter"). ``read_metadata`` reads
svdadapt.json alone (the CLI's ``report``), its fields checked (``record.check_record``); ``read_checkpoint`` reads
everything and checks it against the manifest: a missing, truncated, changed or foreign file is an error naming the
file. ``verify`` checks a whole directory, base/ included.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from dataclasses import dataclass, field
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping
import warnings

import torch

from ..engine.experts import portable_factors
from ..storage.manifest import check_manifest, differences, entries
from ..core.record import Factors, check_record, factors_checksum, saved_rank
from ..modules.layouts import from_saved, suffixes, to_saved

__all__ = ["META_FILE", "STATE_FILE", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FORMAT", "adapter_key", "config_dict",
           "config_from_dict", "write_checkpoint", "read_checkpoint", "read_metadata", "Saved", "adapter_keys",
           "save_config", "sorted_sets", "base_layer_keys", "read_trained_adapter", "verify", "Verified", "TRAINED_DIR", "BASE_DIR"]

META_FILE = "svdadapt.json"
STATE_FILE = "svdadapt_state.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "svdadapt.lifecycle/1"
_PREFIX = "base_model.model."  # PEFT's state-dict prefix in front of the module name
EXTRA = "extra:"  # resume-state prefix of the adapter's other tensors (modules_to_save)
TRAINED_DIR = "adapter"  # an init directory's adapter folder, meant to be overwritten by the trained adapter
BASE_DIR = "base"  # an init directory's base model folder (its layout: initdir.py)
RECORD_DIGEST = "svdadapt:record_sha256"  # state tensor (32 uint8): sha256 of svdadapt.json's own fields
_OWN_FIELDS = ("format", "init_checksum", "files", "trained_dir")  # what write_checkpoint itself records


def adapter_key(name: str, which: str, layout: Mapping[str, Any] | None = None) -> str:
    """PEFT's saved-adapter key of ``lora_A``/``lora_B`` of module ``name`` (adapter name stripped), in the factor
    ``layout`` of its kind (``modules/layouts.py``; None: a linear's ``lora_A.weight``, an embedding's
    ``lora_embedding_A``)."""
    return f"{_PREFIX}{name}.{suffixes(layout)['AB'.index(which)]}"


def adapter_keys(names: Any, layouts: Mapping[str, Any] | None = None) -> set[str]:
    """The saved keys of the LoRA A and B of each of ``names`` (``layouts``: svdadapt.json's, name -> layout)."""
    layouts = layouts or {}
    return {adapter_key(n, which, layouts.get(n)) for n in names for which in "AB"}


def base_layer_keys(keys: Any, names: Any) -> set[str]:
    """The keys among ``keys`` of a target's base layer (``<module>.base_layer.*``): PEFT's save_pretrained puts a
    targeted embedding's base weight into the adapter (``save_embedding_layers="auto"``). On an svdadapt model that
    is the rewritten residual, which must not reach an adapter for the original base."""
    prefixes = tuple(f"{_PREFIX}{n}.base_layer." for n in names)
    return {k for k in keys if k.startswith(prefixes)}


def config_dict(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict()
    for k, v in d.items():
        if isinstance(v, set):  # as PeftConfig.save_pretrained does
            d[k] = sorted(v)
    d["peft_type"] = str(getattr(d["peft_type"], "value", d["peft_type"]))
    if d.get("task_type") is not None:
        d["task_type"] = str(getattr(d["task_type"], "value", d["task_type"]))
    return d


@contextlib.contextmanager
def sorted_sets(cfg: Any) -> Iterator[Any]:
    """``cfg`` with each set-valued field (``target_modules`` ...) as a sorted list while the block runs: PEFT writes
    ``list(set)``, whose order follows the string hash seed, so adapter_config.json would differ from run to run."""
    sets = {k: v for k, v in vars(cfg).items() if isinstance(v, set)}
    for k, v in sets.items():
        setattr(cfg, k, sorted(v))
    try:
        yield cfg
    finally:
        for k, v in sets.items():
            setattr(cfg, k, v)


def save_config(cfg: Any, directory: str | os.PathLike, **kwargs: Any) -> None:
    """``cfg.save_pretrained(directory)``, byte-identical across runs (sets written sorted)."""
    with sorted_sets(cfg):
        cfg.save_pretrained(str(directory), **kwargs)


def config_from_dict(d: Mapping[str, Any]):
    from peft import LoraConfig

    return LoraConfig.from_peft_type(**dict(d))


def _portable_config(cfg: Any, rewrites: bool):
    """The config of the exported adapter: every rank doubled (r and each ``rank_pattern`` entry) and every alpha
    scaled (``lora_alpha`` and each ``alpha_pattern`` entry) so each layer's alpha/r (or alpha/√r) is unchanged: a
    layer's rank and alpha come from the same keys as before, each doubled (×√2 under rsLoRA for alpha)."""
    cfg = copy.deepcopy(cfg)
    cfg.init_lora_weights = True  # a loader must not rerun any data-dependent init
    cfg.inference_mode = True
    if rewrites:
        grow = math.sqrt(2.0) if cfg.use_rslora else 2
        cfg.r *= 2
        cfg.lora_alpha = cfg.lora_alpha * grow
        cfg.rank_pattern = {k: 2 * v for k, v in (cfg.rank_pattern or {}).items()}
        cfg.alpha_pattern = {k: v * grow for k, v in (cfg.alpha_pattern or {}).items()}
    return cfg


@torch.no_grad()
def write_checkpoint(directory: str | os.PathLike, meta: Mapping[str, Any],
                     init: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     current: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, resume: bool = True,
                     portable: bool = True, extras: Mapping[str, torch.Tensor] | None = None,
                     files: Mapping[str, Mapping[str, Any]] | None = None, trained_dir: str | None = None) -> Path:
    """Write the portable adapter (if ``portable``) and the svdadapt resume files (if ``resume``) into ``directory``.

    ``meta`` is the svdadapt.json record (``method``, ``rank``, ``alpha``, ``options``, ``targets``,
    ``rewrites_base``, ``lora_config`` (rank-r PEFT config dict), ``base_checksums`` ...); ``init`` and ``current``
    map each target to (A (r, in), B (out, r)). ``extras`` are the other tensors of PEFT's adapter state (the
    trained ``modules_to_save``, e.g. a classification head), under PEFT's saved keys: written as they are into the
    portable adapter and kept in the resume state. svdadapt.json is written last (atomically), with the manifest of
    the files written here plus ``files`` (relative name -> size, sha256 of the other files the caller wrote, e.g. an
    init directory's base/) and ``trained_dir`` (the folder training may overwrite). Used by :func:`save`, by
    ``svdadapt export`` and by the init directory writers.
    """
    extras = dict(extras or {})
    d = Path(directory)
    if d.is_file():
        raise ValueError(f"{str(d)!r} is a file; svdadapt writes a directory")
    d.mkdir(parents=True, exist_ok=True)
    if portable:
        _write_portable(d, meta, init, current, extras)
    if resume:
        _write_resume(d, meta, init, current, extras, portable, files, trained_dir)
    return d


def _write_portable(d: Path, meta: Mapping[str, Any], init: Mapping[str, Factors], current: Mapping[str, Factors],
                    extras: Mapping[str, torch.Tensor]) -> None:
    """adapter_model.safetensors + adapter_config.json: the plain LoRA for the original base."""
    from safetensors.torch import save_file

    rewrites = bool(meta["rewrites_base"])
    layouts = meta.get("layouts") or {}
    params = meta.get("parameters") or {}
    weights: dict[str, torch.Tensor] = {}
    for n in meta["targets"]:
        A, B = current[n]
        if rewrites and n in params:  # a ParamWrapper: [B_e, −B₀,e]·[A_e; A₀,e] per expert, repacked
            A, B = portable_factors(A, B, *init[n], params[n]["experts"])
        elif rewrites:  # ΔW = B·A − B₀·A₀ = [B, −B₀]·[A; A₀]
            A0, B0 = init[n]
            A, B = torch.cat([A, A0.to(A.dtype)], dim=0), torch.cat([B, -B0.to(B.dtype)], dim=1)
        A, B = to_saved(A, B, layouts.get(n))  # a conv's kernels
        weights[adapter_key(n, "A", layouts.get(n))] = A.contiguous().clone()
        weights[adapter_key(n, "B", layouts.get(n))] = B.contiguous().clone()
    weights.update({k: v.detach().cpu().contiguous().clone() for k, v in extras.items()})
    save_file(weights, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    save_config(_portable_config(config_from_dict(meta["lora_config"]), rewrites), d)


def _write_resume(d: Path, meta: Mapping[str, Any], init: Mapping[str, Factors], current: Mapping[str, Factors],
                  extras: Mapping[str, torch.Tensor], portable: bool, files: Mapping[str, Mapping[str, Any]] | None,
                  trained_dir: str | None) -> None:
    """svdadapt_state.safetensors, then svdadapt.json with the manifest of every file written."""
    from safetensors.torch import save_file

    state = {}
    for n in meta["targets"]:
        for tag, t in zip(("A0", "B0", "A", "B"), (*init[n], *current[n])):
            state[f"{n}.{tag}"] = t.detach().cpu().contiguous().clone()
    state.update({EXTRA + k: v.detach().cpu().contiguous().clone() for k, v in extras.items()})
    fields = {"format": FORMAT, **{k: v for k, v in meta.items() if k not in _OWN_FIELDS},
              "init_checksum": factors_checksum({n: init[n] for n in meta["targets"]})}
    # a tensor, not a second metadata key: safetensors writes several keys in a per-process random order
    state[RECORD_DIGEST] = torch.frombuffer(bytearray.fromhex(_record_digest(fields)), dtype=torch.uint8)
    save_file(state, str(d / STATE_FILE), metadata={"format": FORMAT})
    written = [STATE_FILE] + ([ADAPTER_CONFIG, ADAPTER_WEIGHTS] if portable else [])
    record = {**fields, "files": dict(sorted({**dict(files or {}), **entries(d, written)}.items()))}
    if trained_dir is not None:
        record["trained_dir"] = trained_dir
    _write_record(d / META_FILE, record)


def _record_digest(record: Mapping[str, Any]) -> str:
    """sha256 of the record's own fields (the manifest left out), as JSON reads them back: kept in the state file,
    so a field of svdadapt.json changed after the save is found (the manifest holds the state's sha256)."""
    fields = {k: v for k, v in record.items() if k not in ("files", "trained_dir")}
    canonical = json.loads(json.dumps(fields, default=_json_default))
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _check_record_digest(d: Path, meta: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    digest = state.get(RECORD_DIGEST)
    want = None if digest is None else bytes(digest.tolist()).hex()
    if want is not None and want != _record_digest(meta):  # older directories carry none
        raise ValueError(f"{str(d / META_FILE)!r} was changed after it was written: its fields do not match the "
                         f"record digest in {STATE_FILE}; write the directory again")


def _write_record(path: Path, record: Mapping[str, Any]) -> None:
    """svdadapt.json, atomically (a temporary name, then a rename): the directory is complete once it exists."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, set):
        return sorted(o)  # list(set) would follow the hash seed
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to {META_FILE}")


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The svdadapt.json record of a directory written by ``svdadapt.save`` / ``svdadapt init`` / ``export``: method,
    rank, alpha, options, targets, rewrites_base, lora_config, checksums, report.

    Raises ``FileNotFoundError`` naming what is missing, ``ValueError`` naming the file if it is not such a record.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no such directory: {str(d)!r}")
    path = d / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(d)!r} has no {META_FILE}: it was not written by svdadapt.save "
                                "(a plain PEFT adapter loads with peft.PeftModel.from_pretrained)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a valid svdadapt record (truncated or not JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{str(path)!r} has format {got!r}, this svdadapt reads {FORMAT!r}")
    missing = [k for k in ("method", "rank", "alpha", "targets", "rewrites_base", "lora_config") if k not in meta]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}: not a complete svdadapt record")
    check_record(meta, repr(str(path)))
    if "files" in meta:
        meta["files"] = check_manifest(meta["files"], repr(str(path)))
    if meta.get("trained_dir") not in (None, TRAINED_DIR):
        raise ValueError(f"{str(path)!r}: field 'trained_dir' must be null or {TRAINED_DIR!r}, got "
                         f"{meta['trained_dir']!r}")
    return meta


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{str(path.parent)!r} has no {path.name}: it was not written by svdadapt.save "
                                "(a plain PEFT adapter loads with peft.PeftModel.from_pretrained)")
    return _load_safetensors(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {str(path.parent)!r}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt: {e})") from None


@dataclass
class Verified:
    """What a check of a directory against its manifest found: ``checked`` the files that match it, ``trained``
    the files of ``trained_dir`` (an init directory's adapter/) changed since init and found to be a trained adapter
    of this init, ``skipped`` the manifest's files not read (base/, unless asked), ``manifest`` False for a directory
    written without one (older svdadapt: only the initial factors were checked)."""

    directory: Path
    checked: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    manifest: bool = True


@dataclass
class Saved:
    """What a save directory holds: the svdadapt.json record, per target the initial and the current
    (A (r, in), B (out, r)), the adapter's other tensors (``modules_to_save``) under PEFT's saved keys, and what
    the check against the manifest found."""

    meta: dict[str, Any]
    init: dict[str, Factors]
    current: dict[str, Factors]
    extras: dict[str, torch.Tensor]
    verified: Verified | None = None


def _state_factors(d: Path, meta: Mapping[str, Any], state: Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, Factors], dict[str, Factors]]:
    """(initial, current) factors per target from the state file, their shapes checked against each target's rank
    (its ``rank_pattern`` entry in the LoRA config, else the rank)."""
    init, current = {}, {}
    params = meta.get("parameters") or {}
    for n in meta["targets"]:
        r = saved_rank(meta, n)[1] * (int(params[n]["experts"]) if n in params else 1)  # E·r rows
        try:
            init[n] = (state[f"{n}.A0"], state[f"{n}.B0"])
            current[n] = (state[f"{n}.A"], state[f"{n}.B"])
        except KeyError:
            raise ValueError(f"{str(d / STATE_FILE)!r} has no factors for module {n!r}") from None
        (A0, B0), (A, B) = init[n], current[n]
        if not (A0.dim() == B0.dim() == 2 and A0.shape[0] == B0.shape[1] == r and A.shape == A0.shape
                and B.shape == B0.shape):
            raise ValueError(f"{str(d / STATE_FILE)!r}: module {n!r} has factors {tuple(A0.shape)}, "
                             f"{tuple(B0.shape)}, {tuple(A.shape)}, {tuple(B.shape)}, not rank {r} of {META_FILE}")
    return init, current


def read_checkpoint(directory: str | os.PathLike, *, check_base: bool = False) -> Saved:
    """Everything in a directory written by ``svdadapt.save`` (or ``svdadapt export``, ``svdadapt init``), checked.

    Every file of the manifest is compared with its size and sha256 (an init directory's base/ only with
    ``check_base``: nothing here reads it); an init directory's adapter/ may differ when it is a trained adapter of
    this init (said in ``Saved.verified.trained``). A directory without a manifest (older svdadapt) is read with a
    warning. Raises ``FileNotFoundError`` / ``ValueError`` naming the file that is missing, truncated, changed or
    inconsistent; the initial factors must match the checksum the record holds.
    """
    d = Path(directory)
    meta = read_metadata(d)
    changed = _changed_files(d, meta, check_base) if "files" in meta else []  # before any file is parsed
    state = _load_state(d / STATE_FILE)
    _check_record_digest(d, meta, state)
    init, current = _state_factors(d, meta, state)
    want = meta.get("init_checksum")
    if want is not None and factors_checksum(init) != want:
        raise ValueError(f"{str(d / STATE_FILE)!r}: the initial factors do not match the checksum in {META_FILE} "
                         "(the file was changed or mixed with another run's)")
    verified = _verified(d, meta, init, changed, check_base)
    extras = {k[len(EXTRA):]: v for k, v in state.items() if k.startswith(EXTRA)}
    return Saved(meta, init, current, extras, verified)


def _changed_files(d: Path, meta: Mapping[str, Any], check_base: bool) -> list[str]:
    """The files of ``trained_dir`` that differ from the manifest; ``ValueError`` naming the first other file that
    does (base/ of an init directory is read only with ``check_base``)."""
    trained = meta["trained_dir"] + "/" if meta.get("trained_dir") else None
    skip = (BASE_DIR + "/",) if trained and not check_base else ()
    diffs = differences(d, meta["files"], skip=skip)
    bad = next((x for x in diffs if trained is None or not x.file.startswith(trained)), None)
    if bad is not None:
        raise ValueError(f"{str(d / bad.file)!r} does not match the manifest in {META_FILE} ({bad.what}: {bad.detail}):"
                         " it was changed or replaced after svdadapt wrote it; restore it or write the directory again")
    return [x.file for x in diffs]


def _verified(d: Path, meta: Mapping[str, Any], init: Mapping[str, Factors], changed: list[str],
              check_base: bool) -> Verified:
    """The check's outcome; files changed inside ``trained_dir`` must be a trained adapter of this init."""
    if "files" not in meta:
        warnings.warn(f"{str(d)!r} has no file manifest in {META_FILE} (written by an older svdadapt): only its "
                      "initial factors are verified; save it again to record one", stacklevel=3)
        return Verified(d, manifest=False)
    if changed:  # an intended change, if it is a trained adapter of this init
        adapter = d / meta["trained_dir"]
        try:
            read_trained_adapter(adapter, meta, init)
        except (OSError, ValueError) as e:
            raise ValueError(f"{str(adapter)!r} changed since init ({changed[0]}) and is not a trained adapter of "
                             f"this init: {e}") from None
    skipped = [n for n in meta["files"] if n.startswith(BASE_DIR + "/") and meta.get("trained_dir") and not check_base]
    checked = [n for n in meta["files"] if n not in changed and n not in skipped]
    return Verified(d, checked, changed, skipped)


def verify(directory: str | os.PathLike) -> Verified:
    """Check every file of a directory svdadapt wrote (``svdadapt.save``, ``svdadapt export``, ``svdadapt init``,
    ``init_checkpoint``) against the manifest in its svdadapt.json: size and sha256 of each, base/ included, the
    record's fields and the initial factors' checksum. An init directory's adapter/ may have been overwritten by
    training: it is then checked to be a trained adapter of this init and listed in ``trained``.

    Raises ``ValueError`` (``FileNotFoundError``) naming the first file that differs, and for a directory written
    without a manifest (older svdadapt), which cannot be verified. Returns a :class:`Verified`.
    """
    d = Path(directory)
    meta = read_metadata(d)
    if "files" not in meta:
        raise ValueError(f"{str(d)!r} has no file manifest in {META_FILE} (written by an older svdadapt): its files "
                         "cannot be verified; save it again (svdadapt.save, or svdadapt export) to record one")
    return read_checkpoint(d, check_base=True).verified


# ---------------------------------------------------------------------------------------------- trained adapter


def _json_file(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {path.name} in {str(path.parent)!r}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON (truncated or corrupt: {e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(path)!r} is not a PEFT adapter config (a JSON {type(cfg).__name__})")
    return cfg


def _same_targets(a: Any, b: Any) -> bool:
    norm = lambda t: sorted(t) if isinstance(t, (list, set, tuple)) else t  # noqa: E731
    return norm(a) == norm(b)


def read_trained_adapter(adapter: str | os.PathLike, meta: Mapping[str, Any], init: Mapping[str, Factors]
                         ) -> tuple[dict[str, Factors], dict[str, torch.Tensor]]:
    """(name -> trained (A (r, in), B (out, r)), the adapter's other tensors by key) of a rank-r PEFT adapter
    directory trained from the init of ``meta`` / ``init``: its config's r, lora_alpha, use_rslora and
    rank_pattern, alpha_pattern, target_modules and every factor's shape must be the init's. ``ValueError`` naming
    the file otherwise."""
    adapter = Path(adapter)
    cfg, want = _json_file(adapter / ADAPTER_CONFIG), meta["lora_config"]
    for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        got, expected = cfg.get(k), want.get(k)
        if k.endswith("_pattern"):  # a config written without the patterns has none
            got, expected = got or {}, expected or {}
        if got != expected:
            raise ValueError(f"trained adapter {str(adapter)!r} has {k}={cfg.get(k)!r}, the init directory has "
                             f"{want.get(k)!r}: it was not trained from this init")
    if not _same_targets(cfg.get("target_modules"), want.get("target_modules")):
        raise ValueError(f"trained adapter {str(adapter)!r} has target_modules={cfg.get('target_modules')!r}, the "
                         f"init directory has {want.get('target_modules')!r}: it was not trained from this init")
    sd = _load_safetensors(adapter / ADAPTER_WEIGHTS)
    layouts, current = meta.get("layouts") or {}, {}
    for n in meta["targets"]:
        ka, kb = adapter_key(n, "A", layouts.get(n)), adapter_key(n, "B", layouts.get(n))
        if ka not in sd or kb not in sd:
            raise ValueError(f"trained adapter {str(adapter)!r} has no LoRA factors for module {n!r} (key {ka!r})")
        A, B = from_saved(sd[ka], sd[kb])
        if A.shape != init[n][0].shape or B.shape != init[n][1].shape:
            raise ValueError(f"trained adapter {str(adapter)!r}: module {n!r} has shapes {tuple(sd[ka].shape)}, "
                             f"{tuple(sd[kb].shape)}; expected {tuple(init[n][0].shape)}, {tuple(init[n][1].shape)}")
        current[n] = (A, B)
    drop = adapter_keys(meta["targets"], layouts) | base_layer_keys(sd, meta["targets"])
    return current, {k: v for k, v in sd.items() if k not in drop}
