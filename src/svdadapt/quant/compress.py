"""Simulated compression for EoRA studies: round-to-nearest group quantization and magnitude pruning.

Both functions return a compressed *deep copy* of the model (the original is untouched) whose targeted
Linear weights are replaced by their compressed values, still stored as ordinary floating-point tensors
("fake quantization"): this is the W_c that EoRA compensates, without any packed kernel. With
``target_parameters`` (PEFT's, MoE expert parameters: ``calibration/experts.py``) each expert's (out, in) matrix of
a 3-D expert parameter is compressed on its own, as a Linear's weight would be (groups along its input; Wanda's
scores from that expert's covariance, key ``<param>[e]``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..calibration.experts import ExpertParam, expert_key, expert_parameters
from ..modules.layers import kind_of
from ..modules.targets import resolve_targets

__all__ = ["quantize", "quantize_weight", "prune", "prune_weight"]


@torch.no_grad()
def quantize_weight(W: torch.Tensor, bits: int, group_size: int | None = 128, symmetric: bool = False) -> torch.Tensor:
    """Round-to-nearest quantization of ``W`` (out, in) in groups of ``group_size`` consecutive input columns
    (the last group of a row is shorter when ``group_size`` does not divide ``in``; ``None`` = whole rows).

    With ``q_max = 2^bits − 1`` and, per group, ``lo = min(min W, 0)``, ``hi = max(max W, 0)`` (so that 0 is
    on the grid, as in GPTQ):

    - asymmetric (default): ``scale = (hi − lo) / q_max``, integer zero point ``z = round(−lo / scale)``,
      ``Ŵ = (clamp(round(W / scale) + z, 0, q_max) − z) · scale``;
    - symmetric: ``a = max(|lo|, hi)``, ``scale = 2a / q_max``, ``z = 2^(bits−1)`` (GPTQ's convention: the
      codes −2^(bits−1) … 2^(bits−1)−1 times ``scale``).

    Every group uses at most 2^bits distinct values; asymmetric error is at most ``scale / 2`` per entry.
    Computed in fp32, returned in ``W``'s dtype. Returns a new tensor of ``W``'s shape.
    """
    out_f, in_f = W.shape
    g = in_f if group_size is None else group_size
    Wf = W.to(torch.float32)
    q_max = 2**bits - 1
    pieces = []
    full = (in_f // g) * g
    spans = [(0, full, g)] if full else []
    if full < in_f:
        spans.append((full, in_f, in_f - full))
    for start, stop, width in spans:
        x = Wf[:, start:stop].reshape(out_f, -1, width)  # (out, groups, width)
        lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
        if symmetric:
            a = torch.maximum(-lo, hi)
            scale = 2 * a / q_max
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            scale = (hi - lo) / q_max
        # an all-zero group: any scale reproduces it exactly; 1 avoids 0/0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if not symmetric:
            zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, q_max)
        pieces.append(((q - zero) * scale).reshape(out_f, stop - start))
    return torch.cat(pieces, dim=1).to(W.dtype)


def _check_bits(bits: int, group_size: int | None) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one group per row), got {group_size!r}")


def _float_weights(targets: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """name -> the (out, in) weight of each target (a view), checked: unpacked, floating point, finite."""
    out = {}
    for name, m in targets.items():
        kind = kind_of(m)
        W = kind.read(m)
        if kind.packed or not torch.is_floating_point(W):
            raise TypeError(f"module {name!r} has a {'packed-quantized' if kind.packed else 'non-float'} weight of dtype "
                            f"{W.dtype}; cannot compress it")
        if not torch.isfinite(W).all():
            raise ValueError(f"module {name!r} has a weight with NaN or inf; cannot compress it")
        out[name] = W
    return out


def _layers(model: nn.Module, target_modules: str | Iterable[str] | None) -> dict[str, nn.Module]:
    return {} if target_modules is None else resolve_targets(model, target_modules)


def _experts(model: nn.Module, target_parameters: str | Iterable[str] | None) -> dict[str, ExpertParam]:
    return {} if target_parameters is None else expert_parameters(model, target_parameters)


def _expert_weights(params: Mapping[str, ExpertParam]) -> dict[str, torch.Tensor]:
    """``<param>[e]`` -> expert e's (out, in) matrix (a view), every expert of every parameter, checked like
    :func:`_float_weights`."""
    out = {}
    for p in params.values():
        if not torch.is_floating_point(getattr(p.module, p.param)):
            raise TypeError(f"parameter {p.key!r} has dtype {getattr(p.module, p.param).dtype}; cannot compress it")
        for e in range(p.num_experts):
            W = p.matrix(e)
            if not torch.isfinite(W).all():
                raise ValueError(f"expert {expert_key(p.key, e)!r} has a weight with NaN or inf; cannot compress it")
            out[expert_key(p.key, e)] = W
    return out


def _targets(model: nn.Module, target_modules: str | Iterable[str] | None,
             target_parameters: str | Iterable[str] | None) -> dict[str, torch.Tensor]:
    """name -> (out, in) weight view of every target: the Linear layers, then every expert's matrix."""
    if target_modules is None and target_parameters is None:
        raise ValueError("target_modules=None and no target_parameters: nothing to compress")
    return {**_float_weights(_layers(model, target_modules)), **_expert_weights(_experts(model, target_parameters))}


def _compress_copy(model: nn.Module, target_modules: str | Iterable[str] | None,
                   compress_one: Callable[[str, torch.Tensor], torch.Tensor],
                   target_parameters: str | Iterable[str] | None = None) -> nn.Module:
    """A deep copy of ``model`` whose targets' weights are ``compress_one(name, W (out, in))`` (each expert's
    matrix of a targeted expert parameter on its own, name ``<param>[e]``); every target is checked on the
    original first."""
    _targets(model, target_modules, target_parameters)
    clone = copy.deepcopy(model)
    for name, m in _layers(clone, target_modules).items():
        kind = kind_of(m)
        kind.write(m, compress_one(name, kind.read(m)).to(kind.storage_dtype(m)))
    for name, W in _expert_weights(_experts(clone, target_parameters)).items():
        W.copy_(compress_one(name, W))
    return clone


@torch.no_grad()
def quantize(model: nn.Module, bits: int, group_size: int | None = 128, symmetric: bool = False,
             target_modules: str | Iterable[str] | None = "all-linear",
             target_parameters: str | Iterable[str] | None = None) -> nn.Module:
    """A deep copy of ``model`` whose targeted Linear weights are k-bit round-to-nearest quantized
    (``quantize_weight``: groups of ``group_size`` input columns, asymmetric min/max by default).

    Args:
        bits: 2 … 8. group_size: columns per group (``None``: one group per row).
        symmetric: GPTQ-style symmetric grid instead of the asymmetric one.
        target_modules: as in :func:`svdadapt.wrap` (``"all-linear"``: every Linear but the output head; ``None``:
            none, with ``target_parameters``).
        target_parameters: MoE expert parameters (PEFT's ``target_parameters``, e.g. ``["experts.gate_up_proj",
            "experts.down_proj"]``): each expert's (out, in) matrix quantized on its own, groups along its input.
    """
    _check_bits(bits, group_size)
    return _compress_copy(model, target_modules, lambda _, W: quantize_weight(W, bits, group_size, symmetric),
                          target_parameters)


_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@torch.no_grad()
def prune_weight(W: torch.Tensor, *, pattern: str | None = None, sparsity: float | None = None,
                 input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the lowest-scoring entries of ``W`` (out, in); score ``|W|`` or, with ``input_norm`` (in,) =
    √diag(C), the activation-aware ``|W|·‖x_j‖`` (Wanda).

    ``pattern="N:M"`` keeps the N highest of every M consecutive input columns of each row (M − N zeros);
    ``sparsity=p`` zeros ``round(p·in)`` entries of every row. Ties go to the lower column index (a stable
    sort), so the result is deterministic. Returns a new tensor.
    """
    out_f, in_f = W.shape
    score = W.abs().to(torch.float32)
    if input_norm is not None:
        score = score * input_norm.to(device=W.device, dtype=torch.float32)[None, :]
    keep = torch.zeros_like(score, dtype=torch.bool)
    if pattern is not None:
        n, m = (int(v) for v in _PATTERN.match(pattern).groups())
        s = score.reshape(out_f, in_f // m, m)
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :n]
        keep = keep.reshape(out_f, in_f // m, m).scatter_(-1, order, True).reshape(out_f, in_f)
    else:
        k = in_f - int(round(sparsity * in_f))  # entries kept per row
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
        keep.scatter_(-1, order, True)
    return W * keep.to(W.dtype)


@torch.no_grad()
def prune(model: nn.Module, pattern: str | None = None, *, sparsity: float | None = None,
          calibration: Mapping[str, torch.Tensor] | None = None,
          target_modules: str | Iterable[str] | None = "all-linear",
          target_parameters: str | Iterable[str] | None = None) -> nn.Module:
    """A deep copy of ``model`` with its targeted Linear weights pruned (see :func:`prune_weight`).

    Args:
        pattern: ``"N:M"`` semi-structured sparsity along the input dimension (``"2:4"``, the default when
            ``sparsity`` is not given: exactly 2 zeros in every 4 consecutive weights of a row).
        sparsity: fraction of each row's weights set to zero, in [0, 1); excludes ``pattern``.
        calibration: a :class:`~svdadapt.Covariances` (or mapping name -> C): score by |W|·√diag(C)
            (Wanda) instead of |W|.
        target_modules: as in :func:`svdadapt.wrap` (``None``: none, with ``target_parameters``).
        target_parameters: MoE expert parameters, each expert's (out, in) matrix pruned on its own (its
            covariance in ``calibration`` under ``<param>[e]``, ``collect_covariances(target_parameters=...)``).
    """
    if sparsity is not None:
        if pattern is not None:
            raise ValueError(f"pass either pattern= or sparsity=, not both (got pattern={pattern!r}, sparsity={sparsity!r})")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    else:
        pattern = "2:4" if pattern is None else pattern
        match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
        if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
            raise ValueError(f"pattern must look like 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
    for name, W in _targets(model, target_modules, target_parameters).items():
        in_f = W.shape[1]
        if pattern is not None and in_f % int(pattern.split(":")[1]) != 0:
            raise ValueError(f"module {name!r} has in_features={in_f}, not a multiple of M in pattern {pattern!r}")
        if calibration is not None:
            if name not in calibration:
                raise ValueError(f"calibration has no covariance for targeted module {name!r}")
            if tuple(calibration[name].shape) != (in_f, in_f):
                raise ValueError(f"covariance for {name!r} has shape {tuple(calibration[name].shape)}, "
                                 f"expected ({in_f}, {in_f})")

    def prune_one(name: str, W: torch.Tensor) -> torch.Tensor:
        norm = None if calibration is None else calibration[name].diagonal().clamp_min(0).sqrt()
        return prune_weight(W, pattern=pattern, sparsity=sparsity, input_norm=norm)

    return _compress_copy(model, target_modules, prune_one, target_parameters)
