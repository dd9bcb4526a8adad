"""The typed record of what svdadapt did to a model: ``peft_model.svdadapt`` and the directory metadata.

Leaf module (torch and the standard library only), so the engine, the lifecycle and the CLI all read the same
record without importing each other.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from .patterns import check_pattern, layer_entry

__all__ = ["ADAPTER", "AdaptRecord", "Factors", "CHECKSUMS", "weight_checksum", "checksum_algorithm", "checksum_matches",
           "scan_weight", "factors_checksum", "check_record", "saved_pattern",
           "pattern_name", "saved_rank"]

ADAPTER = "default"  # the PEFT adapter name svdadapt fills

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, in), B (out, r))


CHECKSUMS = ("sha256", "crc32")  # weight checksum algorithms; sha256 is written bare, the others as "<name>:<hex>"
_CHUNK = 1 << 20  # bytes per step of a scan: the finiteness test and the hash read each step while it is in cache


class _Crc32:
    """zlib.crc32 behind hashlib's update / hexdigest."""

    def __init__(self, data: bytes = b"") -> None:
        self.value = zlib.crc32(data)

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"crc32:{self.value:08x}"


def _hasher(algorithm: str, header: bytes) -> Any:
    if algorithm == "sha256":
        return hashlib.sha256(header)
    if algorithm == "crc32":
        return _Crc32(header)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(CHECKSUMS)}")


def checksum_algorithm(checksum: str) -> str:
    """The algorithm a stored weight checksum was computed with: the name before ``:``, else sha256 (the bare
    64 hex digits of every record written before other algorithms existed)."""
    name, sep, _ = checksum.partition(":")
    return name if sep else "sha256"


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to("cpu").contiguous().reshape(-1)


def weight_checksum(w: torch.Tensor, algorithm: str = "sha256") -> str:
    """Checksum of a tensor's dtype, shape and raw bytes (any device; bit-exact, so a re-quantized or re-cast base
    does not match): sha256 as 64 hex digits, crc32 as ``"crc32:<8 hex digits>"`` (``CHECKSUMS``)."""
    return scan_weight(w, algorithm, finite=False)[0]


def scan_weight(w: torch.Tensor, algorithm: str = "sha256", *, finite: bool = True) -> tuple[str, bool]:
    """(``weight_checksum(w, algorithm)``, whether every entry of the float tensor ``w`` is finite) in one pass
    over its bytes (``finite=False``: the checksum alone, True for the second). Each 1 MiB step is tested by its
    sum, which is finite only if every entry is (a NaN or ±inf stays non-finite through any sum), and entry by
    entry only when the sum is not (an overflow of finite entries), then hashed while it is in cache."""
    t = _flat(w)
    h = _hasher(algorithm, f"{t.dtype}:{tuple(w.shape)}:".encode())
    step = max(1, _CHUNK // t.element_size())
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    ok = True
    for i in range(0, t.numel(), step):
        part = t[i:i + step]
        if finite and ok and not torch.isfinite(part.sum(dtype=acc)):
            ok = bool(torch.isfinite(part).all())
        h.update(part.view(torch.uint8).numpy())
    return h.hexdigest(), ok


def checksum_matches(w: torch.Tensor, checksum: str) -> bool:
    """Whether ``w`` has the stored ``checksum``, recomputed with the algorithm it names (``checksum_algorithm``)."""
    return weight_checksum(w, checksum_algorithm(checksum)) == checksum


def factors_checksum(factors: dict[str, Factors]) -> str:
    """One sha256 over every layer's initial (A, B), in target order: identifies an initialization."""
    h = hashlib.sha256()
    for name, (A, B) in factors.items():
        h.update(name.encode())
        h.update(weight_checksum(A).encode())
        h.update(weight_checksum(B).encode())
    return h.hexdigest()


@dataclass
class AdaptRecord:
    """What ``wrap`` (or ``load``) did, kept on the model as ``peft_model.svdadapt``.

    Attributes:
        method, rank, alpha: as passed to ``wrap`` (alpha resolved: None means rank).
        options: the options that determine the factors (svd, niter, oversample, seed, mode, damping, use_rslora).
        targets: full module names of the adapted layers, in model order.
        init_factors: name -> (A₀ (r, in), B₀ (out, r)) on CPU, in the adapter dtype.
        report: name -> per-layer numbers (shape, sigma_max, energy, ...).
        base_checksums: name -> checksum (``weight_checksum``: crc32 from ``wrap``, sha256 in older records) of the
            weight the portable adapter applies to (the original W, or W_c for a method that keeps the base); None
            when unknown.
        quantize: the bitsandbytes scheme of a quantized residual base, or None.
        rank_pattern, alpha_pattern: PEFT's per-layer ranks / alphas (pattern -> value; see core/patterns.py),
            as in the LoRA config; empty when every layer has ``rank`` / ``alpha``.
        allocation: with ``wrap(..., allocate=...)``, the allocation's options as resolved, its budget, cost and
            gain, and those of the uniform rank (each layer's own in ``report``: rank, gain, uniform_gain); None
            otherwise.
        parameters: with ``target_parameters``, each PEFT ``ParamWrapper``'s module name (also in ``targets``; its
            packed factors in ``init_factors``) -> ``key`` (``module.param``), ``experts``, ``stacked``,
            ``transposed``, ``shape`` (out, in) of one expert; None otherwise (docs/experts.md).
    Dict-style reads (``record["method"]``) are supported for code written against the old dict record.
    """

    method: str
    rank: int
    alpha: float
    options: dict[str, Any]
    targets: list[str]
    init_factors: dict[str, Factors]
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_checksums: dict[str, str] | None = None
    quantize: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    allocation: dict[str, Any] | None = None
    parameters: dict[str, dict[str, Any]] | None = None  # target_parameters: wrapper module -> key, experts, layout

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def summary(self) -> dict[str, Any]:
        """The JSON-able part (everything but the factor tensors)."""
        return {k: getattr(self, k) for k in self.keys() if k != "init_factors"}


# ------------------------------------------------------------------------------------ the directory record, checked


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _field_error(where: str, name: str, want: str, value: Any) -> ValueError:
    shown = repr(value) if len(repr(value)) <= 80 else f"a {type(value).__name__}"
    return ValueError(f"{where}: field {name!r} must be {want}, got {shown}")


def _check_scalars(meta: Mapping[str, Any], where: str) -> None:
    if not isinstance(meta["method"], str):
        raise _field_error(where, "method", "a method name (a string)", meta["method"])
    if not _is_int(meta["rank"]) or meta["rank"] < 1:
        raise _field_error(where, "rank", "a positive integer", meta["rank"])
    if not _is_number(meta["alpha"]) or meta["alpha"] <= 0:
        raise _field_error(where, "alpha", "a finite positive number", meta["alpha"])
    if not isinstance(meta["rewrites_base"], bool):
        raise _field_error(where, "rewrites_base", "true or false", meta["rewrites_base"])
    if not isinstance(meta.get("options", {}), Mapping):
        raise _field_error(where, "options", "a mapping", meta["options"])
    if meta.get("quantize") is not None and not isinstance(meta["quantize"], str):
        raise _field_error(where, "quantize", "null or a scheme name", meta["quantize"])
    if meta.get("allocation") is not None and not isinstance(meta["allocation"], Mapping):
        raise _field_error(where, "allocation", "null or a mapping", meta["allocation"])


def _check_targets(meta: Mapping[str, Any], where: str) -> list[str]:
    targets = meta["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise _field_error(where, "targets", "a non-empty list of module names (strings)", targets)
    if len(set(targets)) != len(targets):
        raise ValueError(f"{where}: field 'targets' names a module twice")
    return targets


def _check_per_target(meta: Mapping[str, Any], where: str, targets: list[str]) -> None:
    """Every checksum entry present for every target; the report a mapping of mappings, rank within each shape."""
    for key, needed in (("base_checksums", True), ("residual_checksums", bool(meta["rewrites_base"]))):
        sums = meta.get(key)
        if sums is None and not (needed and key == "base_checksums"):
            continue
        if not isinstance(sums, Mapping):
            raise _field_error(where, key, "a mapping of module name to checksum", sums)
        missing = next((t for t in targets if not isinstance(sums.get(t), str)), None)
        if missing is not None:
            raise ValueError(f"{where}: field {key!r} has no checksum for target {missing!r}")
    if not isinstance(meta.get("init_checksum"), str):
        raise _field_error(where, "init_checksum", "the sha256 of the initial factors (a string)",
                           meta.get("init_checksum"))
    report = meta.get("report") or {}
    if not isinstance(report, Mapping) or not all(isinstance(r, Mapping) for r in report.values()):
        raise _field_error(where, "report", "a mapping of module name to a mapping of numbers", report)
    for t in targets:
        shape = (report.get(t) or {}).get("shape")
        key, rank = saved_rank(meta, t)
        if isinstance(shape, list) and len(shape) == 2 and all(map(_is_int, shape)) and rank > min(shape):
            said = "field 'rank'" if key is None else f"field 'lora_config.rank_pattern'[{key!r}]"
            raise ValueError(f"{where}: {said} = {rank} exceeds min(out, in) = {min(shape)} of "
                             f"target {t!r} (shape {tuple(shape)})")


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _check_lora_config(meta: Mapping[str, Any], where: str, targets: list[str]) -> None:
    """lora_config agrees with the record: r, lora_alpha, use_rslora, and its target list covers every target."""
    cfg = meta["lora_config"]
    if not isinstance(cfg, Mapping):
        raise _field_error(where, "lora_config", "a mapping (a PEFT LoraConfig as a dict)", cfg)
    use_rslora = (meta.get("options") or {}).get("use_rslora", cfg.get("use_rslora"))
    for key, want in (("r", meta["rank"]), ("lora_alpha", meta["alpha"]), ("use_rslora", use_rslora)):
        if cfg.get(key) != want or isinstance(cfg.get(key), bool) != isinstance(want, bool):
            raise ValueError(f"{where}: field 'lora_config' has {key}={cfg.get(key)!r}, the record has {want!r}")
    for which in ("rank", "alpha"):
        try:
            check_pattern(which, cfg.get(f"{which}_pattern"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: field 'lora_config': {e}") from None
    patterns = cfg.get("target_modules")
    if isinstance(patterns, list):
        if not all(isinstance(p, str) for p in patterns):
            raise _field_error(where, "lora_config.target_modules", "a list of module names", patterns)
        params = meta.get("parameters") or {}  # ParamWrappers: selected by target_parameters, not target_modules
        stray = next((t for t in targets if t not in params and not any(_matches(t, p) for p in patterns)), None)
        if stray is not None:
            raise ValueError(f"{where}: field 'lora_config' has target_modules={patterns!r}, which does not cover "
                             f"target {stray!r} of the record")


_LAYOUT_KEYS = {"A", "B", "A_shape", "B_shape"}


def _check_layouts(meta: Mapping[str, Any], where: str, targets: list[str]) -> None:
    """``layouts`` (optional, ``modules/layouts.py``): target -> {"A", "B": key suffixes, "A_shape", "B_shape":
    lists of positive integers}."""
    layouts = meta.get("layouts")
    if layouts is None:
        return
    want = "a mapping of target to its factor layout ({'A', 'B', 'A_shape', 'B_shape'})"
    if not isinstance(layouts, Mapping):
        raise _field_error(where, "layouts", want, layouts)
    for name, lay in layouts.items():
        ok = (name in targets and isinstance(lay, Mapping) and set(lay) == _LAYOUT_KEYS
              and all(isinstance(lay[k], str) and lay[k] for k in "AB")
              and all(isinstance(lay[k], list) and all(_is_int(d) and d > 0 for d in lay[k])
                      for k in ("A_shape", "B_shape")))
        if not ok:
            raise _field_error(where, f"layouts[{name!r}]", want + " of one of the targets", lay)


def saved_pattern(meta: Mapping[str, Any], which: str = "rank") -> dict[str, Any]:
    """The ``rank_pattern`` (``which="rank"``) or ``alpha_pattern`` of a saved record: svdadapt.json's
    ``lora_config`` entry (what PEFT reads), or, for an ``AdaptRecord.summary()`` (no LoRA config), its own field;
    {} when there is none."""
    key = f"{which}_pattern"
    pattern = meta["lora_config"].get(key) if "lora_config" in meta else meta.get(key)
    return dict(pattern or {})


def pattern_name(meta: Mapping[str, Any], target: str) -> str:
    """The name ``rank_pattern`` / ``alpha_pattern`` are matched against for record ``target``: a ParamWrapper's
    parameter key ``<module>.<param>`` (its ``parameters`` entry; PEFT matches a parameter target by its key), a
    layer's own module name."""
    info = (meta.get("parameters") or {}).get(target)
    return info["key"] if isinstance(info, Mapping) and isinstance(info.get("key"), str) else target


def saved_rank(meta: Mapping[str, Any], target: str) -> tuple[str | None, int]:
    """(the ``rank_pattern`` key that gives record ``target`` its rank or None, that rank), PEFT's rule applied
    to its ``pattern_name``."""
    return layer_entry(saved_pattern(meta), pattern_name(meta, target), meta["rank"])


def check_record(meta: Mapping[str, Any], where: str) -> None:
    """Types, ranges and agreement of the fields of an svdadapt.json record (``where`` names it in the message):
    ``ValueError`` naming the first bad field, in one line."""
    _check_scalars(meta, where)
    targets = _check_targets(meta, where)
    _check_lora_config(meta, where, targets)
    _check_per_target(meta, where, targets)
    _check_layouts(meta, where, targets)
