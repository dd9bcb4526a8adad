"""Per-expert input covariances of MoE expert parameters: the tokens the router actually sends to each expert.

transformers 5 stores a mixture of experts as one module holding fused 3-D parameters (``MixtralExperts``,
``Qwen2MoeExperts``, ``Qwen3MoeExperts``, ``OlmoeExperts``, ... : every class decorated with transformers'
``use_experts_implementation``), called as ``experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))``:

    gate_up_proj (E, 2·I, H)   [or up_proj (E, I, H) without a gate; (E, H, ·) when ``is_transposed``]
    down_proj    (E, H, I)     [(E, I, H) when ``is_transposed``]

and expert e computes ``y_e(x) = down_e(act(gate_e x) · up_e x)``, added to the output as ``w_te · y_e(x_t)``. A
parameter is addressed as PEFT's ``target_parameters`` does (``<module path>.<param name>``, matched as a suffix),
and expert e of it as ``<module path>.<param name>[e]`` (:func:`expert_key`), the key of its (in, in) covariance.

What expert e's covariance of each parameter counts (a forward pre-hook on the experts module reads its three
arguments; nothing of the model's forward is replaced):

- ``gate_up_proj`` / ``up_proj``: the hidden states x_t of the tokens routed to e (``top_k_index[t] ∋ e``);
- ``down_proj``: e's own intermediate activations h_te = act(gate_e x_t) · up_e x_t for those tokens, recomputed
  from the module's own weights with its own gate (``_apply_gate`` / ``act_fn``, bias and transposed layout as
  the module declares them), which costs one more gate_up product per routed token while calibrating;
- ``weighting="routing"`` (the default) weights each token by its squared routing weight w_te², ``"tokens"``
  counts every routed token once. C_e = Σ_t ω_t z_t z_tᵀ / N_e (ω_t = w_te² or 1, N_e the routed tokens): the
  output error of an expert's perturbation ΔW on token t is w_te·ΔW·z_t (exactly for ``down_proj``; to first order
  through the gate for ``gate_up_proj``), so Σ_t w_te² ‖ΔW z_t‖² = tr(ΔW C_e ΔWᵀ)·N_e is the block's error.

Padding is dropped with the batch's mask (``masks.Masks``: the experts module receives the (batch·seq, H) hidden
states of an MoE block, one row per token). An expert that few or no tokens reached is :func:`fallback_covariances`'s.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .covariances import Covariances
from .forward import caller_level
from .gram import add_gram_upper, mirror_upper

__all__ = ["WEIGHTINGS", "FALLBACKS", "ExpertParam", "expert_key", "parse_expert_key", "expert_parameters",
           "RoutedCollector", "check_fallback", "fallback_covariances"]

WEIGHTINGS = ("routing", "tokens")
FALLBACKS = ("pooled", "damped", "identity", None)
_INPUT = {"gate_up_proj": "hidden", "up_proj": "hidden", "down_proj": "intermediate"}
_KEY = re.compile(r"^(.+)\[(\d+)\]$")


def expert_key(param_key: str, e: int) -> str:
    """The key of expert ``e`` of parameter ``param_key`` (``model.layers.0.mlp.experts.gate_up_proj``):
    ``model.layers.0.mlp.experts.gate_up_proj[3]``."""
    return f"{param_key}[{e}]"


def parse_expert_key(key: str) -> tuple[str, int] | None:
    """(parameter key, expert index) of an :func:`expert_key`, None for any other name."""
    m = _KEY.match(key)
    return (m.group(1), int(m.group(2))) if m else None


@dataclass(frozen=True)
class ExpertParam:
    """One targeted 3-D expert parameter: the experts ``module`` holding it, its name ``param`` there, what its
    input is (``"hidden"``: the routed hidden states, ``"intermediate"``: the expert's own activations), the number
    of experts and the input width (``in_features``) of each expert's (out, in) matrix."""

    key: str
    module: nn.Module
    param: str
    role: str
    num_experts: int
    in_features: int

    def keys(self) -> list[str]:
        return [expert_key(self.key, e) for e in range(self.num_experts)]

    def matrix(self, e: int) -> torch.Tensor:
        """Expert ``e``'s (out, in) matrix: a view of the parameter (transposed for an ``is_transposed`` module),
        so ``matrix(e).copy_(new)`` writes it."""
        W = getattr(self.module, self.param)[e]
        return W.mT if getattr(self.module, "is_transposed", False) else W


# the argument names of an experts module's forward(hidden_states, index, weights): transformers 5's, gpt-oss's
_ROUTING_NAMES = (("hidden_states", "top_k_index", "top_k_weights"),
                  ("hidden_states", "router_indices", "routing_weights"))


def _routing_names(module: nn.Module) -> tuple[str, str, str] | None:
    """The names of the three routing arguments of ``module.forward`` when it is an experts module's, else None."""
    try:
        params = tuple(inspect.signature(module.forward).parameters)[:3]
    except (TypeError, ValueError):
        return None
    return params if params in _ROUTING_NAMES else None


def _is_experts_module(module: nn.Module) -> bool:
    """A module called as ``forward(hidden_states, top_k_index, top_k_weights)`` (transformers 5 experts)."""
    return _routing_names(module) is not None


def _matches(targets: list[str], key: str) -> bool:
    """PEFT's ``target_parameters`` rule: the full key, or a suffix of it after a dot."""
    return any(key == t or key.endswith(f".{t}") for t in targets)


def expert_parameters(model: nn.Module, target_parameters: str | Iterable[str]) -> dict[str, ExpertParam]:
    """The expert parameters of ``model`` that ``target_parameters`` selects (PEFT's rule: ``<module>.<param>``
    equal to an entry or ending with ``.<entry>``), in ``named_modules()`` order.

    Raises:
        ValueError: an entry matches nothing; a matched parameter is not one of an experts module's
            ``gate_up_proj`` / ``up_proj`` / ``down_proj`` (3-D, experts first).
    """
    targets = [target_parameters] if isinstance(target_parameters, str) else list(target_parameters)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_parameters must be a non-empty list of parameter names, got {target_parameters!r}")
    found: dict[str, ExpertParam] = {}
    used: set[str] = set()
    for path, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            key = f"{path}.{pname}" if path else pname
            hit = [t for t in targets if _matches([t], key)]
            if not hit:
                continue
            used.update(hit)
            found[key] = _expert_param(key, module, pname, p)
    unused = [t for t in targets if t not in used]
    if unused:
        raise ValueError(f"target_parameters entry {unused[0]!r} matched no parameter of {type(model).__name__}")
    return found


def _expert_param(key: str, module: nn.Module, pname: str, p: torch.Tensor) -> ExpertParam:
    role = _INPUT.get(pname)
    if role is None or p.dim() != 3 or not _is_experts_module(module):
        raise ValueError(
            f"parameter {key!r} {tuple(p.shape)} of {type(module).__name__} is not an MoE expert parameter: "
            "per-expert targets are gate_up_proj, up_proj and down_proj (3-D, experts first) of a module "
            "called as experts(hidden_states, top_k_index, top_k_weights) (transformers 5 MoE experts)")
    in_features = p.shape[1] if getattr(module, "is_transposed", False) else p.shape[2]
    return ExpertParam(key, module, pname, role, p.shape[0], int(in_features))


def _routing_args(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) of one call of an experts module."""
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    return tuple(bound[n] for n in _routing_names(module))  # type: ignore[return-value]


def _linear(module: nn.Module, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s product with parameter ``name`` as the module computes it (bias, transposed layout)."""
    W = getattr(module, name)[e]
    out = x @ W if getattr(module, "is_transposed", False) else nn.functional.linear(x, W)
    if getattr(module, "has_bias", False):
        out = out + getattr(module, f"{name}_bias")[e]
    return out


def intermediate(module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s input to ``down_proj`` for hidden states ``x`` (n, H): act(gate·x)·(up·x) (n, I), through
    the module's own ``_apply_gate`` (``act_fn`` alone when the module has no gate, ``up_proj``)."""
    if hasattr(module, "gate_up_proj"):
        h = _linear(module, "gate_up_proj", e, x)
        if hasattr(module, "_apply_gate"):
            return module._apply_gate(h)
        gate, up = h.chunk(2, dim=-1)
        return module.act_fn(gate) * up
    return module.act_fn(_linear(module, "up_proj", e, x))


def _routed(index: torch.Tensor, keep: torch.Tensor | None, num_experts: int
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert e: (token (n_e,), slot (n_e,)) with ``index[token, slot] == e``, tokens ascending, the tokens
    ``keep`` (T,) drops left out; indices outside 0..E−1 (expert-parallel sentinels) reach no expert."""
    k = index.shape[1]
    flat = index.reshape(-1)
    pos = torch.arange(flat.numel(), device=flat.device)
    if keep is not None:
        real = keep.repeat_interleave(k)
        flat, pos = flat[real], pos[real]
    inside = (flat >= 0) & (flat < num_experts)
    flat, pos = flat[inside], pos[inside]
    order = torch.sort(flat, stable=True).indices  # by expert, then token (pos is token·k + slot)
    pos = pos[order]
    sizes = torch.bincount(flat, minlength=num_experts).tolist()
    return [(p // k, p % k) for p in pos.split(sizes)]


class RoutedCollector:
    """The per-expert accumulators of one collection, fed by a forward pre-hook on each targeted experts module.

    ``state`` is the collection's batch state (``collect._Collector``): its ``masks`` and ``batch`` are read at
    each call. Accumulators (in, in) are made on an expert's first routed token; :meth:`finish` gives every expert
    of every parameter a covariance (zeros and a count of 0 for an expert no token reached)."""

    def __init__(self, params: Mapping[str, ExpertParam], dtype: torch.dtype, state: Any,
                 weighting: str = "routing") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        self.params, self.dtype, self.state, self.weighting = dict(params), dtype, state, weighting
        self.acc: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}  # key -> Σ ω^½ z (in,), fp64: the token means (EVA centres)
        self.count: dict[str, int] = {k: 0 for p in self.params.values() for k in p.keys()}
        self.unmasked: dict[str, tuple[int, ...]] = {}

    def hooks(self) -> list[Any]:
        """Pre-hooks on the experts modules (one per module, for all its targeted parameters)."""
        by_module: dict[int, tuple[nn.Module, list[ExpertParam]]] = {}
        for p in self.params.values():
            by_module.setdefault(id(p.module), (p.module, []))[1].append(p)
        return [module.register_forward_pre_hook(
            lambda mod, args, kwargs, _ps=ps: self._hook(mod, _ps, args, kwargs), with_kwargs=True)
            for module, ps in by_module.values()]

    def _hook(self, module: nn.Module, params: list[ExpertParam], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> None:
        hidden, index, weights = _routing_args(module, args, kwargs)
        x = hidden.reshape(-1, hidden.shape[-1])
        index, weights = index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)
        keep = self._token_mask(params[0].key, x)
        for e, (token, slot) in enumerate(_routed(index, keep, params[0].num_experts)):
            if token.numel() == 0:
                continue
            rows = x[token]
            scale = weights[token, slot].to(self.dtype)[:, None] if self.weighting == "routing" else None
            for p in params:
                z = rows if p.role == "hidden" else intermediate(module, e, rows)
                self._accumulate(expert_key(p.key, e), z, scale)

    def _token_mask(self, key: str, x: torch.Tensor) -> torch.Tensor | None:
        """(T,) bool: the real tokens of the hidden states ``x`` (T, H), None when every row counts."""
        masks = self.state.masks
        m = masks.mask_for(x)
        if m is None and key not in self.unmasked and masks.unmasked_padding(x):
            self.unmasked[key] = tuple(x.shape)
        return None if m is None or bool(m.all()) else m.reshape(-1).to(x.device)

    def _accumulate(self, key: str, z: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Σ ω z zᵀ of ``z`` (n, in) into ``key``'s accumulator (the upper block triangle, ``gram.py``)."""
        zf = z.to(self.dtype)
        if scale is not None:
            zf = zf * scale
        acc = self.acc.get(key)
        if acc is None:
            acc = self.acc[key] = torch.zeros(zf.shape[1], zf.shape[1], dtype=self.dtype, device=zf.device)
        add_gram_upper(acc, zf)
        total = self.sums.get(key)
        if total is None:
            total = self.sums[key] = torch.zeros(zf.shape[1], dtype=torch.float64, device=zf.device)
        total.add_(zf.sum(0, dtype=torch.float64))
        if not torch.isfinite(acc.diagonal()).all() and not torch.isfinite(zf).all():
            raise ValueError(f"non-finite activations (NaN or inf) in the input of expert {key!r} in batch "
                             f"{self.state.batch}")
        self.count[key] += z.shape[0]

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, torch.Tensor]]:
        """key -> C_e = Σ ω z zᵀ / N_e (in, in) (zeros for N_e = 0), key -> N_e, key -> the mean Σ ω^½ z / N_e
        (in,) of the same rows (zeros for N_e = 0), every expert of every parameter."""
        if self.unmasked:
            key, shape = next(iter(self.unmasked.items()))
            warnings.warn(f"svdadapt calibration: the hidden states of experts {key!r} (shape {shape}) are laid out "
                          "neither (batch, seq, H) nor (batch·seq, H) like the attention_mask, so their padding "
                          "tokens count; pass unpadded batches (docs/calibration.md)", stacklevel=caller_level())
        matrices: dict[str, torch.Tensor] = {}
        means: dict[str, torch.Tensor] = {}
        for p in self.params.values():
            device = getattr(p.module, p.param).device
            device = torch.device("cpu") if device.type == "meta" else device
            for k in p.keys():
                acc = self.acc.get(k)
                matrices[k] = (mirror_upper(acc).div_(self.count[k]) if acc is not None else
                               torch.zeros(p.in_features, p.in_features, dtype=self.dtype, device=device))
                means[k] = ((self.sums[k] / self.count[k]).to(self.dtype) if acc is not None else
                            torch.zeros(p.in_features, dtype=self.dtype, device=device))
        return matrices, dict(self.count), means


def _by_parameter(covs: Covariances, names: Iterable[str] | None) -> dict[str, dict[int, str]]:
    """parameter key -> {expert index: covariance key} of the expert keys among ``names`` (default: all of
    ``covs``'s; any other key of ``covs`` is left alone, a given name that is not an expert key of it is refused)."""
    out: dict[str, dict[int, str]] = {}
    for k in (list(covs) if names is None else names):
        parsed = parse_expert_key(k)
        if parsed is None or k not in covs:
            if names is None:
                continue
            raise ValueError(f"{k!r} is not an expert covariance of this Covariances (keys '<param>[e]')")
        out.setdefault(parsed[0], {})[parsed[1]] = k
    return out


def _pooled(covs: Covariances, keys: Mapping[int, str], param: str
            ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The token-weighted mean of the experts' covariances, Σ N_e C_e / Σ N_e (fp64 sum), Σ N_e, and the pooled
    token mean Σ N_e μ_e / Σ N_e (None where ``covs`` holds no means)."""
    total, tokens, mu = None, 0, None
    for k in keys.values():
        n = covs.token_count(k)
        if n:
            part = covs[k].to(torch.float64) * n
            total = part if total is None else total.add_(part)
            if covs.has_means:
                m = covs.mean(k).to(torch.float64) * n
                mu = m if mu is None else mu.add_(m)
            tokens += n
    if total is None:
        raise ValueError(f"calibration saw no tokens for any expert of parameter {param!r}: the router sent it "
                         "none of the calibration tokens (or all were padding)")
    dtype = covs[next(iter(keys.values()))].dtype
    return (total / tokens).to(dtype), tokens, None if mu is None else (mu / tokens).to(dtype)


def _warn_low(low: list[tuple[str, int]], min_tokens: int | None, fallback: str | None) -> None:
    shown = ", ".join(f"{k!r} ({n} tokens)" for k, n in low[:4]) + (f" and {len(low) - 4} more" if len(low) > 4 else "")
    bound = f"{min_tokens}" if min_tokens is not None else "their input width"
    what = {"pooled": "the pooled covariance of all experts of their parameter",
            "damped": "their own covariance damped toward a scaled identity",
            "identity": "a scaled identity (EoRA: the plain SVD of ΔW)",
            None: "their own covariance unchanged (fallback=None)"}[fallback]
    warnings.warn(f"svdadapt calibration: {len(low)} expert{'s' if len(low) > 1 else ''} received fewer than "
                  f"{bound} routed tokens and get {what}: {shown} (docs/calibration.md)", stacklevel=caller_level())


def check_fallback(min_tokens: int | None, fallback: str | None, damping: float = 0.1) -> None:
    """``ValueError`` for a ``fallback`` / ``min_tokens`` / ``damping`` that :func:`fallback_covariances` refuses."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
    if min_tokens is not None and (isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0):
        raise ValueError(f"min_tokens must be a non-negative integer or None (the input width), got {min_tokens!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < float("inf"):
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")


def fallback_covariances(covs: Covariances, names: Iterable[str] | None = None, *, min_tokens: int | None = None,
                         fallback: str | None = "pooled", damping: float = 0.1) -> Covariances:
    """``covs`` with every expert that received fewer than ``min_tokens`` routed tokens (default: its input
    width d, below which C_e is rank-deficient) given a fallback covariance, with a warning naming the experts.

    For one parameter with experts e = 1..E, P = Σ N_e C_e / Σ N_e (all its experts' tokens pooled), s = tr(P)/d:

    - ``"pooled"`` (default): C_e ← P (count Σ N_e; the low experts of a parameter share that one tensor);
    - ``"damped"``: C_e ← C_e + damping·s·I (own statistics kept, made full rank; N_e = 0 gives damping·s·I);
    - ``"identity"``: C_e ← s·I (EoRA then is the plain truncated SVD of ΔW, CorDA that of W);
    - ``None``: unchanged (still warned); an expert with no token at all is then an error.

    ``names``: the expert keys (``<param>[e]``) to consider, default every expert key of ``covs``. Each
    replaced covariance carries a note (``Covariances.fallback_of``). Apply it after ``reduce_covariances``
    (``torch.distributed``): the counts decide.

    Raises:
        ValueError: a bad ``fallback`` / ``min_tokens`` / ``damping``; a parameter none of whose experts saw a
            token; ``fallback=None`` with an expert that saw none (named).
    """
    check_fallback(min_tokens, fallback, damping)
    matrices, counts, notes = dict(covs), {k: covs.token_count(k) for k in covs}, covs.fallbacks
    means = {k: covs.mean(k) for k in covs} if covs.has_means else None
    low_all: list[tuple[str, int]] = []
    for param, keys in _by_parameter(covs, names).items():
        d = covs[next(iter(keys.values()))].shape[0]
        bound = d if min_tokens is None else min_tokens
        low = [(k, covs.token_count(k)) for _, k in sorted(keys.items()) if covs.token_count(k) < bound]
        if not low:
            continue
        P, tokens, mu = _pooled(covs, keys, param)
        empty = [k for k, n in low if n == 0]
        if fallback is None and empty:
            raise ValueError(f"expert {empty[0]!r} received no calibration tokens ({len(empty)} experts of "
                             f"{param!r} received none) and fallback=None: pass fallback='pooled', 'damped' or "
                             "'identity', or more calibration batches")
        s = float(P.diagonal().sum()) / d
        for k, n in low:
            if fallback == "pooled":
                matrices[k], counts[k] = P, tokens
                if means is not None:
                    means[k] = mu
            elif fallback == "damped":
                matrices[k] = covs[k] + torch.eye(d, dtype=P.dtype, device=P.device) * (damping * s)
            elif fallback == "identity":
                matrices[k] = torch.eye(d, dtype=P.dtype, device=P.device) * s
                if means is not None:
                    means[k] = torch.zeros_like(means[k])
            if fallback is not None:
                notes[k] = f"{fallback}: {n} routed tokens < {bound}"
        low_all += low
    if not low_all:
        return covs
    _warn_low(low_all, min_tokens, fallback)
    return Covariances(matrices, counts, means, notes)
