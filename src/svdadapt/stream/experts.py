"""``target_parameters`` (MoE experts) in ``init_checkpoint``: each targeted parameter read whole from the checkpoint,
planned expert by expert as ``wrap`` plans it (``experts.plan_experts``, the same seeded plan per expert name), its
residual written back in the checkpoint's own layout, its packed factors kept for the adapter. PiSSA / MiLoRA plan it
data-free when the writer reaches it; CorDA / EoRA plan it during the block-by-block calibration (``plan_with``,
from the covariances of the tokens routed to each expert, ``calibrated.py``), and under ``torch.distributed`` every
parameter is planned up front by all ranks together (``plan_all``: each rank its share of the experts, the plans
all-gathered), so that a rank writing a shard needs no other rank.

A checkpoint stores a parameter either under its key (``<module>.<param>``, (E, out, in)) or, as transformers 5's
``save_pretrained`` writes Mixtral and Qwen3-MoE, in the legacy per-expert layout its conversion mapping describes
(``WeightConverter``: ``MergeModulelist(dim=0)`` then, for a fused ``gate_up_proj``, ``Concatenate(dim=1)``):
expert e's (out, in) is then the row-wise concatenation of its source tensors (``w1`` and ``w3``, or ``gate_proj``
and ``up_proj``), and its residual is split back into them. Other conversions are refused (``ValueError``).

Memory: the targeted parameters of one layer (E·out·in each, twice: as read and its residual: a parameter's
tensors interleave with the next one's in the checkpoint, Mixtral's w1, w2, w3), plus the packed factors.

``ModuleView`` presents such a checkpoint by the model's module names (the expert parameters stacked from their
per-expert tensors, renamed tensors under their new names), as the block-by-block calibration loads it
(``lazy.LazyBlocks``): what transformers' ``from_pretrained`` does with the same conversion mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.record import weight_checksum
from ..engine.experts import (ExpertPlan, check_param_ranks, expert_covariances, expert_references, param_job, plan_experts,
                              write_residuals)
from ..modules.params import ParamTarget, find_parameters
from ..storage.shards import CheckpointReader
from .inputs import _conversions as conversions

__all__ = ["ParamResult", "StreamedParams", "ModuleView"]


@dataclass
class ParamResult:
    """One finished parameter: packed A (E·r, in), B (out, r·E) as the adapter holds them, its experts' reports, the
    checksum of the parameter as read (crc32, as ``wrap`` records it) and of its residual (sha256), and svdadapt.json's
    ``parameters`` entry."""

    A: torch.Tensor
    B: torch.Tensor
    report: dict[str, dict[str, Any]]
    base_checksum: str
    residual_checksum: str
    info: dict[str, Any]


def wrapper_names(targets: Mapping[str, ParamTarget]) -> dict[str, str]:
    """key -> the module name of its PEFT ``ParamWrapper``: PEFT nests the wrappers of one module's parameters, the
    first matched innermost (``<module>.base_layer``), the last at ``<module>``."""
    by_module: dict[str, list[str]] = {}
    for key, t in targets.items():
        by_module.setdefault(t.module, []).append(key)
    return {k: t.module + ".base_layer" * (len(by_module[t.module]) - 1 - by_module[t.module].index(k))
            for k, t in targets.items()}


def _reverse_renamings(key: str, found: list[Any]) -> str:
    for c in found:
        if type(c).__name__ == "WeightRenaming":
            for src, tgt in zip(c.source_patterns, c.target_patterns):
                key = key.replace(tgt, src)
    return key


def _converter_sources(t: ParamTarget, reader: CheckpointReader, found: list[Any]) -> list[list[str]] | None:
    """Per expert, the checkpoint keys whose rows stack into its (out, in), from the converter naming ``t.key``."""
    for c in found:
        if type(c).__name__ != "WeightConverter":
            continue
        pattern = next((p for p in c.target_patterns if t.key.endswith(p)), None)
        if pattern is None:
            continue
        ops = [(type(o).__name__, getattr(o, "dim", None)) for o in c.operations]
        if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]) or t.transposed:
            raise ValueError(f"target parameter {t.key!r} is stored through a transformers conversion ({ops}) that "
                             "init_checkpoint cannot invert; load the model and use svdadapt.wrap")
        prefix = t.key[: -len(pattern)]
        out = []
        for e in range(t.experts):
            keys = [prefix + p.replace("*", str(e)) for p in c.source_patterns]
            keys = [k if k in reader else _reverse_renamings(k, found) for k in keys]
            if not all(k in reader for k in keys):
                return None
            out.append(keys)
        return out
    return None


def _stored_name(key: str, reader: Any, found: list[Any]) -> str | None:
    """The checkpoint key holding module key ``key`` whole: itself, or the name transformers renames it from."""
    stored = key if key in reader else _reverse_renamings(key, found)
    return stored if stored in reader else None


def _sources(t: ParamTarget, reader: CheckpointReader, found: list[Any]) -> str | list[list[str]]:
    """The checkpoint key holding the whole parameter (``_stored_name``: checked, its shape), else per expert its
    source keys."""
    want = (t.experts, *t.shape[::-1]) if t.transposed else ((t.experts, *t.shape) if t.stacked else t.shape)
    stored = _stored_name(t.key, reader, found)
    if stored is not None:
        if tuple(reader.shape(stored)) != tuple(want) or not reader.dtype(stored).is_floating_point:
            raise ValueError(f"{stored!r} in checkpoint {reader.path} is {reader.dtype(stored)} "
                             f"{tuple(reader.shape(stored))}; target parameter {t.key!r} of the model's config is a "
                             f"float {tuple(want)}")
        return stored
    sources = _converter_sources(t, reader, found) if t.stacked else None
    if sources is None:
        raise ValueError(f"target parameter {t.key!r} has no tensor in checkpoint {reader.path} (neither {t.key!r} "
                         "nor the per-expert tensors of transformers' conversion mapping)")
    for e, keys in enumerate(sources):
        shapes = [tuple(reader.shape(k)) for k in keys]
        if any(len(s) != 2 or s[1] != t.shape[1] for s in shapes) or sum(s[0] for s in shapes) != t.shape[0]:
            raise ValueError(f"the checkpoint tensors {keys} of expert {e} of {t.key!r} have shapes {shapes}; the "
                             f"model's config expects rows summing to {t.shape[0]}, each with {t.shape[1]} columns")
    return sources


class StreamedParams:
    """The job's ``target_parameters`` in a checkpoint: which tensors belong to them (``owns``), each one's new base
    (``base``, the parameter planned when its first tensor is reached), and the results (``finish``)."""

    def __init__(self, job: Any, skeleton: nn.Module, module_targets: Mapping[str, nn.Module],
                 reader: CheckpointReader) -> None:
        self.job, self.reader = job, reader
        self.targets = find_parameters(skeleton, job.target_parameters, module_targets)
        check_param_ranks(job, module_targets, self.targets)
        found = conversions(skeleton)
        self.sources = {k: _sources(t, reader, found) for k, t in self.targets.items()}
        self.owner = {ck: k for k, s in self.sources.items() for ck in ([s] if isinstance(s, str) else sum(s, []))}
        self.wrappers = wrapper_names(self.targets)
        self.pending: dict[str, torch.Tensor] = {}  # checkpoint key -> its new base, until the writer takes it
        self.results: dict[str, ParamResult] = {}
        self.planned: dict[str, ExpertPlan] = {}  # key -> its plan, made before the writer reaches it
        self.keep: set[str] | None = None  # the checkpoint keys this process writes (None: all)

    def owns(self, key: str) -> bool:
        return key in self.owner

    def parameters(self) -> list[str]:
        """The targeted keys, in model order."""
        return list(self.targets)

    def base(self, key: str) -> torch.Tensor:
        """The new base of checkpoint tensor ``key`` (its parameter planned on first use)."""
        if key not in self.pending:
            self._run(self.owner[key])
        return self.pending.pop(key)

    def read(self, key: str) -> torch.Tensor:
        """Parameter ``key`` as the model holds it ((E, out, in); transposed / 2-D as stored), checked finite."""
        stored = read_stacked(self.reader, self.sources[key])
        if not torch.isfinite(stored).all():
            raise ValueError(f"target parameter {key!r} contains NaN or inf")
        return stored

    def plan_with(self, key: str, covariances: Mapping[str, torch.Tensor] | None,
                  reference: "StreamedParams | None" = None) -> None:
        """Plan parameter ``key`` now, as ``wrap`` plans it, with its experts' covariances (``"<key>[e]"`` ->
        (in, in)) and EoRA's reference (the uncompressed checkpoint's parameter of the same key)."""
        t = self.targets[key]
        if covariances is not None:  # checked as wrap checks them: shape, finite, not zero
            covariances = expert_covariances(covariances, {key: t})
        refs = None if reference is None else expert_references({key: reference.read(key)}, {key: t})
        self.planned[key] = plan_experts(self.job, self.read(key), {key: t}, covariances, refs)[key]

    def plan_all(self) -> None:
        """Every parameter planned now, in order (under ``torch.distributed``: by all ranks together)."""
        for key in self.targets:
            if key not in self.planned:
                self.plan_with(key, None)

    def _run(self, key: str) -> None:
        t, stored = self.targets[key], self.read(key)
        if key not in self.planned and self.job.spec.needs_calibration:
            raise RuntimeError(f"target parameter {key!r} was not planned by the calibration")
        plan = self.planned.get(key) or plan_experts(self.job, stored, {key: t})[key]
        A, B = plan.A, plan.B  # in the adapter dtype (PEFT's autocast: fp32 for a bf16 / fp16 parameter)
        new = stored
        if self.job.spec.rewrites_base:  # EoRA keeps the base: its tensors are copied through
            new = stored.clone()
            write_residuals(new, t, A, B, float(param_job(self.job, key).scaling))
        self.results[key] = ParamResult(A, B, plan.report, weight_checksum(stored, "crc32"),
                                        weight_checksum(new, "sha256"),
                                        {"key": key, "experts": t.experts, "stacked": t.stacked,
                                         "transposed": t.transposed, "shape": list(t.shape)})
        src = self.sources[key]
        if isinstance(src, str):
            if self.keep is None or src in self.keep:
                self.pending[src] = new
            return
        for e, keys in enumerate(src):
            rows = [self.reader.shape(k)[0] for k in keys]
            self.pending.update({k: p.contiguous() for k, p in zip(keys, new[e].split(rows, dim=0))
                                 if self.keep is None or k in self.keep})

    def finish(self) -> dict[str, ParamResult]:
        """Wrapper module name -> result, in the targets' order (a parameter whose tensors a resumed run found in
        verified shards is planned again: data-free, the same factors)."""
        for key in self.targets:
            if key not in self.results:
                self._run(key)
        self.pending.clear()
        return {self.wrappers[k]: self.results[k] for k in self.targets}


def read_stacked(reader: Any, sources: str | list[list[str]]) -> torch.Tensor:
    """A parameter from ``reader``: stored whole under the key ``sources``, or stacked from its experts' source
    tensors, each expert's rows concatenated (transformers' ``MergeModulelist`` then ``Concatenate``)."""
    if isinstance(sources, str):
        return reader.get(sources)
    return torch.stack([torch.cat([reader.get(k) for k in keys], dim=0) for keys in sources])


class ModuleView:
    """A checkpoint as the model's module names read it, for ``lazy.LazyBlocks``: a tensor stored under its module
    key is itself; an MoE expert parameter stored per expert (``experts.{e}.w1`` ...) is stacked from its sources
    (``read_stacked``); a tensor transformers renames (Mixtral's ``block_sparse_moe`` -> ``mlp``) is read under its
    stored name. Everything else is the reader's (``path``, ``names``, ``close``...)."""

    def __init__(self, reader: Any, skeleton: nn.Module) -> None:
        self.reader = reader
        self.renamed: dict[str, str] = {}
        self.stacked: dict[str, list[list[str]]] = {}
        found = conversions(skeleton)
        if not found:
            return
        missing = {k: p for k, p in skeleton.named_parameters() if k not in reader}
        stored = {k: _stored_name(k, reader, found) for k in missing}
        self.renamed = {k: s for k, s in stored.items() if s is not None}
        experts = [k for k, p in missing.items() if stored[k] is None and p.dim() == 3]
        for key, t in (find_parameters(skeleton, experts) if experts else {}).items():
            sources = _converter_sources(t, reader, found)
            if sources is not None:
                self.stacked[key] = sources

    def __contains__(self, key: str) -> bool:
        return key in self.reader or key in self.renamed or key in self.stacked

    def get(self, key: str) -> torch.Tensor:
        if key in self.stacked:
            return read_stacked(self.reader, self.stacked[key])
        return self.reader.get(self.renamed.get(key, key))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)
