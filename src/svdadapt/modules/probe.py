"""The universal fallback: the effective weight of any module whose forward is linear (affine) in its input, read by
probing it with blocks of the identity.

For f(x) = W_c·x + b, W_cᵀ = f(I) − f(0): :func:`probe_weight` runs f on the identity in chunks of ``chunk`` rows,
so reading an (out, in) weight costs ⌈in/chunk⌉ forwards of a (chunk, in) input (≈ in²·out multiply-adds for a
dense forward, against none for a layer whose weight is stored) and holds one (chunk, out) output at a time, plus
the four forwards of the linearity probe. It is opt-in: :func:`register_linear` adds a layer kind for a module
class, looked at before the layer-kind table (``layers.register_kind``); nothing is probed otherwise.

The linearity probe (:func:`check_linear`): with random x, y (a fixed seed) and a = 0.7, b = −1.3, an affine f has
f(a·x + b·y) = a·f(x) + b·f(y) + (1 − a − b)·f(0). The difference is compared to (in + 2)·eps(dtype) times the
sum of the terms' norms: each forward rounds a dot product of length ``in`` (γ_in ≈ in·eps, the worst-case bound)
and forming a·x + b·y rounds twice more. A nonlinear module (an activation, an input quantizer) misses it by
orders of magnitude more; it is refused with ``ValueError`` naming the module type and the defect.

Imports ``layers`` (to register) and torch.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerKind, register_kind, unregister_kind

__all__ = ["probe_weight", "check_linear", "register_linear", "unregister_linear", "CHUNK"]

CHUNK = 256  # identity rows per forward
_A, _B = 0.7, -1.3  # the probe's coefficients (1 − a − b = 1.6: the affine part is checked too)
_REGISTERED: dict[type, LayerKind] = {}


def _dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the module's first floating parameter or buffer (fp32 on CPU if none)."""
    for t in (*module.parameters(), *module.buffers()):
        if torch.is_floating_point(t):
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


def _in_features(module: nn.Module, in_features: int | None) -> int:
    n = in_features if in_features is not None else getattr(module, "in_features", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TypeError(f"cannot probe a {type(module).__name__}: it has no in_features; give "
                        "register_linear(..., in_features=N)")
    return n


@torch.no_grad()
def _f(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = module(x)
    if not isinstance(y, torch.Tensor) or y.shape[:-1] != x.shape[:-1]:
        raise TypeError(f"cannot probe a {type(module).__name__}: its forward of a ({', '.join(map(str, x.shape))}) "
                        "input does not give one tensor of the same rows")
    return y


@torch.no_grad()
def check_linear(module: nn.Module, in_features: int | None = None, seed: int = 0) -> None:
    """Raise ``ValueError`` unless ``module``'s forward is affine in its input within the rounding bound above
    (inputs (2, in), fixed seed); the module is run in its current mode, its state unchanged."""
    d = _in_features(module, in_features)
    dtype, device = _dtype_device(module)
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(2, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) for _ in range(2))
    f0, fx, fy = _f(module, torch.zeros_like(x)), _f(module, x), _f(module, y)
    fxy = _f(module, _A * x + _B * y)
    c = 1 - _A - _B
    defect = (fxy - (_A * fx + _B * fy + c * f0)).double().norm()
    scale = sum(float(t.double().norm()) * abs(w) for t, w in ((fxy, 1), (fx, _A), (fy, _B), (f0, c)))
    eps = torch.finfo(dtype).eps
    if not defect <= (d + 2) * eps * scale:
        raise ValueError(f"a {type(module).__name__} is not linear in its input: f(a·x + b·y) differs from "
                         f"a·f(x) + b·f(y) + (1−a−b)·f(0) by {float(defect / max(scale, 1e-300)):.3g} (relative), above "
                         f"the rounding bound {(d + 2) * eps:.3g}; svdadapt cannot read a weight from it")


@torch.no_grad()
def probe_weight(module: nn.Module, in_features: int | None = None, chunk: int = CHUNK,
                 check: bool = True) -> torch.Tensor:
    """W_c (out, in) with f(x) = W_c·x + f(0): (f(I[j:j+chunk]) − f(0))ᵀ stacked, in the module's dtype, on its
    device; ⌈in/chunk⌉ forwards (and :func:`check_linear`'s four first if ``check``)."""
    d = _in_features(module, in_features)
    if check:
        check_linear(module, d)
    dtype, device = _dtype_device(module)
    f0 = _f(module, torch.zeros(1, d, dtype=dtype, device=device))
    cols = []
    for j in range(0, d, chunk):
        eye = torch.zeros(min(chunk, d - j), d, dtype=dtype, device=device)
        eye[:, j:j + eye.shape[0]].fill_diagonal_(1)
        cols.append((_f(module, eye) - f0).mT)
    return torch.cat(cols, dim=1)


def _shape(module: nn.Module, in_features: int | None) -> tuple[int, int]:
    d = _in_features(module, in_features)
    dtype, device = _dtype_device(module)
    return int(_f(module, torch.zeros(1, d, dtype=dtype, device=device)).shape[-1]), d


def _not_writable(module: nn.Module, base: torch.Tensor) -> None:
    raise TypeError(f"svdadapt reads a {type(module).__name__} by probing its forward and cannot write a new base "
                    "into it")


def register_linear(cls: type, *, in_features: int | None = None, chunk: int = CHUNK) -> LayerKind:
    """Let svdadapt read modules of class ``cls`` (and subclasses) by probing (:func:`probe_weight`, linearity
    checked on each read); ``in_features`` where the modules have no ``in_features`` attribute. Only methods that
    keep the base (EoRA) run on them. Returns the kind; :func:`unregister_linear` removes it."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_linear needs an nn.Module subclass, got {cls!r}")
    unregister_linear(cls)
    kind = LayerKind(f"{cls.__name__} (probed)", lambda m: isinstance(m, cls), lambda m: _shape(m, in_features),
                     lambda m: probe_weight(m, in_features, chunk), _not_writable, lambda m: torch.float32,
                     packed=True)
    _REGISTERED[cls] = kind
    register_kind(kind)
    return kind


def unregister_linear(cls: type) -> None:
    """Undo :func:`register_linear` for ``cls`` (nothing if it was not registered)."""
    kind = _REGISTERED.pop(cls, None)
    if kind is not None:
        unregister_kind(kind)
