"""``target_parameters`` (MoE experts) in ``init_checkpoint``: each targeted parameter read whole from the checkpoint,
planned expert by expert as ``wrap`` plans it (``experts.plan_experts``, the same seeded plan per expert name), its
residual written back in the checkpoint's own layout, its packed factors kept for the adapter (PiSSA / MiLoRA).

A checkpoint stores a parameter either under its key (``<module>.<param>``, (E, out, in)) or, as transformers 5's
``save_pretrained`` writes Mixtral and Qwen3-MoE, in the legacy per-expert layout its conversion mapping describes
(``WeightConverter``: ``MergeModulelist(dim=0)`` then, for a fused ``gate_up_proj``, ``Concatenate(dim=1)``):
expert e's (out, in) is then the row-wise concatenation of its source tensors (``w1`` and ``w3``, or ``gate_proj``
and ``up_proj``), and its residual is split back into them. Other conversions are refused (``ValueError``).

Memory: the targeted parameters of one layer (E·out·in each, twice: as read and its residual: a parameter's
tensors interleave with the next one's in the checkpoint, Mixtral's w1, w2, w3), plus the packed factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.record import weight_checksum
from ..engine.experts import check_param_ranks, param_job, plan_experts, write_residuals
from ..modules.params import ParamTarget, find_parameters
from ..storage.shards import CheckpointReader
from .inputs import _conversions as conversions

__all__ = ["ParamResult", "StreamedParams"]


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


def _sources(t: ParamTarget, reader: CheckpointReader, found: list[Any]) -> list[list[str]] | None:
    """None if the checkpoint holds ``t.key`` itself (checked: its shape), else per expert its source keys."""
    want = (t.experts, *t.shape[::-1]) if t.transposed else ((t.experts, *t.shape) if t.stacked else t.shape)
    if t.key in reader:
        if tuple(reader.shape(t.key)) != tuple(want) or not reader.dtype(t.key).is_floating_point:
            raise ValueError(f"{t.key!r} in checkpoint {reader.path} is {reader.dtype(t.key)} {tuple(reader.shape(t.key))}; "
                             f"target parameter {t.key!r} of the model's config is a float {tuple(want)}")
        return None
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
        self.owner = {ck: k for k, s in self.sources.items() for ck in ([k] if s is None else sum(s, []))}
        self.wrappers = wrapper_names(self.targets)
        self.pending: dict[str, torch.Tensor] = {}  # checkpoint key -> its new base, until the writer takes it
        self.results: dict[str, ParamResult] = {}

    def owns(self, key: str) -> bool:
        return key in self.owner

    def base(self, key: str) -> torch.Tensor:
        """The new base of checkpoint tensor ``key`` (its parameter planned on first use)."""
        if key not in self.pending:
            self._run(self.owner[key])
        return self.pending.pop(key)

    def _read(self, key: str) -> torch.Tensor:
        """The parameter as the model holds it ((E, out, in); transposed / 2-D as stored)."""
        src = self.sources[key]
        if src is None:
            return self.reader.get(key)
        return torch.stack([torch.cat([self.reader.get(k) for k in keys], dim=0) for keys in src])

    def _run(self, key: str) -> None:
        t, stored = self.targets[key], self._read(key)
        if not torch.isfinite(stored).all():
            raise ValueError(f"target parameter {key!r} contains NaN or inf")
        plan = plan_experts(self.job, stored, {key: t})[key]
        A, B = plan.A, plan.B  # in the adapter dtype (PEFT's autocast: fp32 for a bf16 / fp16 parameter)
        new = stored.clone()
        write_residuals(new, t, A, B, float(param_job(self.job, key).scaling))
        self.results[key] = ParamResult(A, B, plan.report, weight_checksum(stored, "crc32"),
                                        weight_checksum(new, "sha256"),
                                        {"key": key, "experts": t.experts, "stacked": t.stacked,
                                         "transposed": t.transposed, "shape": list(t.shape)})
        src = self.sources[key]
        if src is None:
            self.pending[key] = new
            return
        for e, keys in enumerate(src):
            rows = [self.reader.shape(k)[0] for k in keys]
            self.pending.update({k: p.contiguous() for k, p in zip(keys, new[e].split(rows, dim=0))})

    def finish(self) -> dict[str, ParamResult]:
        """Wrapper module name -> result, in the targets' order (a parameter whose tensors a resumed run found in
        verified shards is planned again: data-free, the same factors)."""
        for key in self.targets:
            if key not in self.results:
                self._run(key)
        self.pending.clear()
        return {self.wrappers[k]: self.results[k] for k in self.targets}
