"""Input checks that run before anything is computed or changed: option values, target weights, references,
covariances. Each error names the offending module or keyword and its value."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..core.patterns import layer_entry
from ..modules.layers import float_weight, kind_of, scan_layer
from ..modules.targets import shared_modules, shared_weights

__all__ = ["check_rank", "check_alpha", "check_flag", "check_seed", "check_target_weights", "check_rank_fits",
           "check_untied", "reference_weights", "check_covariances"]


def check_rank(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")


def check_alpha(alpha: Any) -> None:
    ok = alpha is None or (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
                           and alpha > 0)
    if not ok:
        raise ValueError(f"alpha must be a finite positive number or None, got {alpha!r}")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")


BASE_CHECKSUM = "crc32"  # of the weights wrap records (record.CHECKSUMS): a few % of the call, sha256 ~10%


def check_target_weights(model: nn.Module, targets: Mapping[str, nn.Module], rank: int, rewrites_base: bool,
                         rank_pattern: Mapping[str, int] | None = None,
                         algorithm: str = BASE_CHECKSUM) -> dict[str, str]:
    """Every target is float, finite, at least its rank (``rank``, or its ``rank_pattern`` entry) on its short side
    (the error names the tightest layer), held in one place only (not one module object used twice), and, for a
    method that rewrites the base, shares its weight with no other module. Returns name ->
    ``layers.layer_checksum(module, algorithm)`` of every target, computed in the same single pass over each weight
    as its finiteness (``layers.scan_layer``)."""
    limits, checksums = {}, {}
    for name, module in targets.items():
        limits[name], checksums[name], finite = scan_layer(name, module, algorithm)
        if not finite:
            W = float_weight(name, module)
            raise ValueError(f"module {name!r} has a weight with NaN or inf ({int((~torch.isfinite(W)).sum())} of "
                             f"{W.numel()} entries); svdadapt cannot decompose it")
    check_rank_fits(rank, limits, rank_pattern)
    for a, b in shared_modules(model, targets)[:1]:
        raise ValueError(f"module {a!r} is also used as {b!r} (one module object in two places): PEFT would adapt it "
                         f"in one place only; give each place its own module (copy.deepcopy) or leave {a!r} out of "
                         "target_modules")
    if rewrites_base:
        check_untied(model, targets)
    return checksums


def check_rank_fits(rank: int, shapes: Mapping[str, tuple[int, int]],
                    rank_pattern: Mapping[str, int] | None = None) -> None:
    """Each target's rank (its ``rank_pattern`` entry, else ``rank``) at most its min(out, in) (name -> (out,
    in)); the error names the tightest layer it exceeds, and the pattern key that gave its rank."""
    entries = {n: layer_entry(rank_pattern or {}, n, rank) for n in shapes}  # name -> (pattern key, rank)
    over = [n for n in shapes if entries[n][1] > min(shapes[n])]
    if over:
        n = min(over, key=lambda n: min(shapes[n]))
        key, r = entries[n]
        said = f"rank={rank}" if key is None else f"rank_pattern[{key!r}] = {r}"
        raise ValueError(f"{said} exceeds min(out, in) = {min(shapes[n])} of module {n!r} with weight {shapes[n]}")


def check_untied(model: nn.Module, targets: Iterable[str]) -> None:
    """No target shares its weight with another module (tied embeddings): rewriting it would change the other."""
    pairs = shared_weights(model, targets)
    if pairs:
        a, b = pairs[0]
        raise ValueError(f"module {a!r} shares its weight with {b!r} (tied weights): rewriting it would change "
                         f"{b!r} too; untie the weights or leave {a!r} out of target_modules")


def reference_weights(reference: Any, targets: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """name -> reference weight (out, in) for each target, from an ``nn.Module`` or a state dict (which stores a
    ``Conv1D`` weight (in, out), as the module does)."""
    if isinstance(reference, nn.Module):
        modules = dict(reference.named_modules())
        def get(n: str) -> torch.Tensor | None:
            kind = kind_of(modules[n]) if n in modules else None
            return None if kind is None else kind.read(modules[n])  # a view: converted one layer at a time
    elif isinstance(reference, Mapping):
        def get(n: str) -> torch.Tensor | None:
            w, kind = reference.get(n + ".weight"), kind_of(targets[n])
            if w is not None and kind.as_matrix is not None:  # an embedding's (n, dim), a conv's kernel
                return kind.as_matrix(w)
            return w.mT if w is not None and kind.fan_in_fan_out else w
    else:
        raise TypeError(f"reference must be an nn.Module or a state dict, got {type(reference).__name__}")
    out = {}
    for n, module in targets.items():
        w = get(n)
        if w is None:
            raise ValueError(f"reference has no weight for targeted module {n!r} (looked for {n + '.weight'!r})")
        shape = kind_of(module).shape(module)
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"reference weight for {n!r} has shape {tuple(w.shape)}, the model's has {tuple(shape)}")
        if not torch.isfinite(w).all():
            raise ValueError(f"reference weight for {n!r} contains NaN or inf")
        out[n] = w
    return out


def check_covariances(covs: Mapping[str, torch.Tensor], targets: Mapping[str, nn.Module],
                      centered: bool = False) -> dict[str, torch.Tensor]:
    """name -> C (in, in) for each target, fetched once (a mapping that builds tensors on access keeps stable ids
    this way) and checked: present, square of the layer's input size, finite, not zero. ``centered`` (a method's
    ``MethodSpec.centered``): C − μμᵀ instead (``Covariances.centered``, one tensor per shared input), which needs a
    ``Covariances`` holding the token means."""
    if centered:
        covs = _centered(covs, targets)
    out = {}
    for n, module in targets.items():
        if n not in covs:
            raise ValueError(f"calibration has no covariance for targeted module {n!r}")
        C, d = covs[n], kind_of(module).shape(module)[1]
        if tuple(C.shape) != (d, d):
            raise ValueError(f"covariance for {n!r} has shape {tuple(C.shape)}, expected ({d}, {d})")
        if not torch.isfinite(C).all():
            raise ValueError(f"covariance for {n!r} contains NaN or inf")
        if not C.diagonal().sum() > 0:
            raise ValueError(f"covariance for {n!r} is zero: calibration saw no signal for this layer")
        out[n] = C
    return out


def _centered(covs: Mapping[str, torch.Tensor], targets: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The targets' centred covariances, names that share an input sharing one tensor; ``ValueError`` for a
    mapping without token means (a plain dict, or a file saved before the means were recorded)."""
    has = getattr(covs, "has_means", False)
    if not has:
        what = "a Covariances without token means" if hasattr(covs, "has_means") else f"a {type(covs).__name__}"
        raise ValueError(f"this method centres the input covariance (C − μμᵀ) and needs the token means, but "
                         f"calibration is {what} (saved before svdadapt recorded them, or built by hand): pass "
                         f"batches, or covariances collected again with svdadapt.collect_covariances")
    out: dict[str, torch.Tensor] = {}
    for n in targets:
        if n not in covs:
            raise ValueError(f"calibration has no covariance for targeted module {n!r}")
        first = covs.shared_with(n)[0]
        out[n] = out[first] if first in out else covs.centered(n)
    return out
