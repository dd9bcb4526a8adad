"""Input covariances of Linear layers, collected with forward hooks, for CorDA and EoRA: :func:`collect` (on given
target modules; the block-by-block path, ``svdadapt.blockwise``, runs it on one block at a time),
:func:`collect_covariances` (targets by name, as ``wrap`` matches them) and :func:`as_covariances` (what
``wrap(calibration=...)`` accepts).

Each targeted Linear's input covariance C = XᵀX / N (in, in) over the N calibration tokens that reached it
(``covariances.Covariances``); an ``nn.Conv1d`` / ``nn.Conv2d`` target's is that of its unfolded patches
(in·∏kernel, in·∏kernel), ``F.unfold`` with its kernel, stride and zero padding (``modules/conv.py``). Linears
that read the very same tensor in a forward pass (q/k/v after one norm, gate/up of an MLP; convs only if their patch
geometry agrees too) have the same covariance: it is computed and stored once, and every name of the group maps to the *same*
tensor object (``wrap()`` caches the per-covariance Cholesky / eigendecomposition by object identity). "The same" is
the same object *at the same version*: a tensor changed in place between two readers (``h.relu_()``) is a new input.

Each input's token mean Σ x / N (in,) is kept too (``Covariances.mean``; EVA centres). Padding is dropped with the
mask of the stack an input belongs to, and so are the positions whose ``labels`` are -100 (``masks.py``). Forwards run without a KV cache
(``use_cache=False`` where the model takes it) and, where no target reads the output head, with the logits of the
last position only (``logits_to_keep=1`` where the model takes it; not for a batch with ``labels``). Each input's
XᵀX is accumulated in place, its upper block triangle only (``gram.py``: about half the multiply-adds of
``X.mT @ X``), and mirrored once at the end.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modules.layers import is_target_type, kind_of
from ..modules.targets import resolve_targets
from .covariances import Covariances
from .experts import WEIGHTINGS, ExpertParam, RoutedCollector, check_fallback, expert_parameters, fallback_covariances
from .forward import caller_level, eval_mode, first_tensor, model_device, no_cache, no_logits, version
from .gram import add_gram_upper, mirror_upper
from .masks import Masks, batch_masks, encoder_decoder

__all__ = ["collect", "collect_covariances", "as_covariances", "hooked_targets", "run_batch", "BatchState"]


class BatchState(Protocol):
    """What :func:`run_batch` tells about each batch it runs: its index and masks before, the end after."""

    def begin(self, batch: int, masks: Masks) -> None: ...

    def end(self) -> None: ...


class _Collector:
    """State shared by the hooks during one collection: accumulators, groups, the current batch's masks."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.acc: dict[str, torch.Tensor] = {}  # group key (first name seen) -> Σ x xᵀ
        self.sums: dict[str, torch.Tensor] = {}  # group key -> Σ x (in,), fp64: the token means
        self.count: dict[str, int] = {}
        self.key_of: dict[str, str] = {}  # name -> group key, fixed at the name's first sighting
        self.members: dict[str, frozenset[str]] = {}  # group key -> names that read its input
        self.batch = -1
        self.masks = Masks(None, None)
        # per forward: (id(input), its version) -> (weakref to it, group key, names that read it). The version
        # tells the same object apart before and after an in-place op (h.relu_()); the weakref guards against a
        # freed tensor's id being reused by a later, different input in the same forward
        self.seen: dict[tuple[int, object], tuple[weakref.ref, str, set[str]]] = {}
        self.unmasked: dict[str, tuple[int, ...]] = {}  # name -> input shape: padding in the batch, not removable
        self.patches: dict[str, Any] = {}  # name -> a convolution's patch geometry (``conv.Patches``): its rows

    def begin(self, batch: int, masks: Masks) -> None:
        self.batch, self.masks, self.seen = batch, masks, {}

    def hook(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = first_tensor(args, kwargs)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"module {name!r} was called without a tensor input in batch {self.batch}")
        geometry = self.patches.get(name)  # convs of one geometry reading one tensor share; a linear does not
        ident = (id(x), version(x), geometry)
        entry = self.seen.get(ident)
        if entry is not None and entry[0]() is x:  # the same tensor, unchanged, as an earlier reader: shared
            key, readers = entry[1], entry[2]
            known = self.key_of.setdefault(name, key)
            if known != key:
                raise RuntimeError(
                    f"module {name!r} read the same input as {sorted(readers)} in batch {self.batch}, but not in "
                    "earlier batches: inputs must be shared always or never")
            readers.add(name)
            return
        key = self.key_of.setdefault(name, name)
        self.seen[ident] = (weakref.ref(x), key, {name})
        self._accumulate(name, key, self._rows(name, x))

    def _accumulate(self, name: str, key: str, rows: torch.Tensor) -> None:
        """Add the upper block triangle of Σ x xᵀ of ``rows`` (n, in) to ``key``'s accumulator (in, in), in place
        (``gram.add_gram_upper``; mirrored once at the end). A NaN or inf in ``rows`` makes a diagonal entry
        (Σ x_j² over the rows) non-finite, so only a non-finite diagonal has ``rows`` scanned, to tell a
        non-finite input (an error) from a finite one whose squares overflowed (none: as before)."""
        if rows.shape[0] == 0:
            return
        acc = self.acc.get(key)
        if acc is None:
            acc = self.acc[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype, device=rows.device)
        add_gram_upper(acc, rows.to(self.dtype))
        total = self.sums.get(key)
        if total is None:
            total = self.sums[key] = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
        total.add_(rows.sum(0, dtype=torch.float64))
        if not torch.isfinite(acc.diagonal()).all() and not torch.isfinite(rows).all():
            raise ValueError(f"non-finite activations (NaN or inf) in the input of module {name!r} in batch {self.batch}")
        self.count[key] = self.count.get(key, 0) + rows.shape[0]

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The (n, in) token inputs of ``x`` (..., in); padding dropped where ``x`` is laid out (batch, seq, in) or
        (batch·seq, in) like the mask that :class:`masks.Masks` assigns it (any other layout: noted in ``unmasked``).
        A convolution's rows are its unfolded patches (n = batch · output positions, in = channels·∏kernel)."""
        if name in self.patches:
            return self.patches[name].rows(x)
        m = self.masks.mask_for(x) if x.dim() in (2, 3) else None
        if m is None and name not in self.unmasked and self.masks.unmasked_padding(x):
            self.unmasked[name] = tuple(x.shape)
        if m is not None and not bool(m.all()):  # padding to drop: a copy of the real tokens' rows
            return x[m]
        return x.reshape(-1, x.shape[-1])  # no padding: the rows as they are (a view of a contiguous input)

    def end(self) -> None:
        """Check that every group was read by the same names as when it was first seen."""
        for _, key, readers in self.seen.values():
            members = self.members.get(key)
            if members is None:
                self.members[key] = frozenset(readers)
            elif readers != members:
                raise RuntimeError(
                    f"modules {sorted(readers)} read one input in batch {self.batch}, but {sorted(members)} did in "
                    "earlier batches: inputs must be shared always or never")
        self.seen = {}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es"


def _hook_all(model: nn.Module, targets: Mapping[str, nn.Module], state: _Collector) -> list[Any]:
    """Pre-hooks on the targets (accumulate) and on the encoder / decoder stacks (track which one runs)."""
    for name, module in targets.items():
        kind = kind_of(module)
        if kind is not None and kind.patches is not None:
            state.patches[name] = kind.patches(module)
    handles = [module.register_forward_pre_hook(
        lambda mod, args, kwargs, _n=name: state.hook(_n, args, kwargs), with_kwargs=True)
        for name, module in targets.items()]
    for stack, module in encoder_decoder(model).items():
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, kwargs, _s=stack: state.masks.enter(_s, args, kwargs), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda mod, args, out, _s=stack: state.masks.leave(_s)))
    return handles


def run_batch(model: nn.Module, batch: Any, i: int, device: torch.device, state: BatchState,
              head: Mapping[str, Any] | None = None) -> None:
    """Run ``model`` on batch ``i`` (moved to ``device``), without a KV cache where the model takes ``use_cache``;
    ``head`` (``forward.no_logits``: the logits of the last position only) is passed too unless the batch holds
    ``labels`` (a loss needs every position's logits) or sets it itself."""
    head = dict(head or {})
    if isinstance(batch, Mapping):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        state.begin(i, batch_masks(batch, i, decoder_labels=bool(encoder_decoder(model))))
        model(**{**({} if "labels" in batch else head), **batch, **no_cache(model)})
    elif isinstance(batch, torch.Tensor):
        state.begin(i, Masks(None, None))
        model(batch.to(device), **head, **no_cache(model))
    else:
        raise TypeError(f"batch {i} is a {type(batch).__name__}; a batch is a dict (run as model(**batch)) "
                        "or a tensor (run as model(batch))")
    state.end()


def _note_unmasked(unmasked: Mapping[str, tuple[int, ...]]) -> None:
    """One warning line for the targets whose padding rows counted (their inputs fit no (batch, seq) layout)."""
    if unmasked:
        name, shape = next(iter(unmasked.items()))
        more = f" and {len(unmasked) - 1} more" if len(unmasked) > 1 else ""
        warnings.warn(f"svdadapt calibration: the input of module {name!r}{more} (shape {shape}) is laid out neither "
                      "(batch, seq, in) nor (batch·seq, in) like the attention_mask, so its padding rows count; "
                      "pass unpadded batches for it (docs/calibration.md)", stacklevel=caller_level())


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[Any], targets: Mapping[str, nn.Module],
            dtype: torch.dtype = torch.float32, progress: bool = True,
            experts: Mapping[str, ExpertParam] | None = None, weighting: str = "routing") -> Covariances:
    """Run ``model`` on ``batches`` (as :func:`collect_covariances` does) with hooks on ``targets`` (name -> a
    module of ``model``) and return their input covariances (in, in), accumulated and stored in ``dtype``; with
    ``experts`` (``experts.expert_parameters``), also every expert's covariance of those parameters, from its
    routed tokens (``weighting``: ``experts.RoutedCollector``; no fallback applied: an expert no token reached
    has zeros and a count of 0)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"covariances accumulate in torch.float32 or torch.float64, got dtype={dtype}")
    state = _Collector(dtype)
    routed = RoutedCollector(experts, dtype, state, weighting) if experts else None
    device = model_device(model)
    head = no_logits(model, targets.values())
    n_batches = 0
    with eval_mode(model):
        handles = _hook_all(model, targets, state) + (routed.hooks() if routed else [])
        try:
            total = len(batches) if hasattr(batches, "__len__") else None
            for i, batch in enumerate(tqdm(batches, total=total, desc="svdadapt calibration", unit="batch",
                                           disable=not progress)):
                run_batch(model, batch, i, device, state, head)
                n_batches += 1
        finally:  # hooks must never outlive the collection, also when the model raises
            for h in handles:
                h.remove()
    return _finish(state, targets, n_batches, progress, routed)


def _finish(state: _Collector, targets: Mapping[str, nn.Module], n_batches: int, progress: bool,
            routed: RoutedCollector | None = None) -> Covariances:
    """The means XᵀX / N of a finished collection, after checking that every target saw tokens (every expert
    parameter, through some expert)."""
    seen = list(state.count.values()) + (list(routed.count.values()) if routed else [])
    if n_batches == 0 or not seen or max(seen) == 0:
        raise ValueError(f"calibration saw no tokens ({_plural(n_batches, 'batch')}): pass non-empty batches whose "
                         "attention_mask is not all zero")
    missing = [n for n in targets if n not in state.key_of or state.count.get(state.key_of[n], 0) == 0]
    if missing:
        raise ValueError(f"calibration saw no tokens for module {missing[0]!r} ({len(missing)} of {len(targets)} "
                         f"targets): it did not take part in the forward pass or all its tokens were padding")
    _note_unmasked(state.unmasked)
    mean = {key: mirror_upper(state.acc[key]).div_(state.count[key]) for key in state.acc}  # XᵀX / N, in place
    mu = {key: (state.sums[key] / state.count[key]).to(state.dtype) for key in state.acc}  # Σ x / N
    matrices = {n: mean[state.key_of[n]] for n in targets}
    counts = {n: state.count[state.key_of[n]] for n in targets}
    means = {n: mu[state.key_of[n]] for n in targets}
    if routed is not None:
        expert_matrices, expert_counts, expert_means = routed.finish()
        matrices.update(expert_matrices)
        counts.update(expert_counts)
        means.update(expert_means)
    covs = Covariances(matrices, counts, means)
    if progress:
        print(f"svdadapt calibration: {covs.summary()} from {_plural(n_batches, 'batch')}")
    return covs


@torch.no_grad()
def collect_covariances(model: nn.Module, batches: Iterable[Any],
                        target_modules: str | Iterable[str] | None = "all-linear",
                        dtype: torch.dtype = torch.float32, progress: bool = True, *,
                        target_parameters: str | Iterable[str] | None = None, weighting: str = "routing",
                        min_tokens: int | None = None, fallback: str | None = "pooled") -> Covariances:
    """Run ``model`` on ``batches`` and return the input covariance of every targeted Linear and, with
    ``target_parameters``, of every expert of the targeted MoE expert parameters.

    Args:
        model: any ``nn.Module``; run in eval mode under ``torch.no_grad`` (its training flag is restored).
        batches: iterable of dicts (``model(**batch)``, tensors moved to the model's device; an
            ``attention_mask`` (batch, seq) drops padding from every input laid out (batch, seq, in) or
            (batch·seq, in) (other layouts count every row, with a warning when there is padding); in an
            encoder–decoder model it is the encoder's, and ``decoder_attention_mask`` the decoder's, none: every
            decoder token counts) or of tensors (``model(batch)``, every position counts). Any batch size and
            sequence length.
        target_modules: as in :func:`svdadapt.wrap` (``"all-linear"``: every Linear or transformers Conv1D but the
            output head; ``None``: none, with ``target_parameters``).
        dtype: accumulation and storage dtype, ``torch.float32`` or ``torch.float64``.
        progress: progress bar over batches, and a one-line summary printed at the end.
        target_parameters: PEFT's ``target_parameters`` (``"experts.gate_up_proj"``, ``"down_proj"``: a suffix of
            ``<module>.<param>``), MoE expert parameters only (``calibration/experts.py``): expert e's covariance,
            key ``<module>.<param>[e]``, counts the tokens routed to e (``down_proj``: e's own intermediate
            activations).
        weighting: ``"routing"`` (each routed token weighted by its squared routing weight) or ``"tokens"``.
        min_tokens, fallback: what an expert that received fewer than ``min_tokens`` tokens (default its input
            width) gets, with a warning naming it (``experts.fallback_covariances``: ``"pooled"``, ``"damped"``,
            ``"identity"`` or ``None``).
    Returns:
        :class:`Covariances`: name -> C = XᵀX / N (in, in), in the layer's input width (``weight.shape[1]`` of a
        Linear, ``weight.shape[0]`` of a Conv1D, which stores (in, out)); q/k/v-style readers of one input share a
        tensor.
    Raises:
        ValueError: no tokens seen (or none for some target), NaN/inf in a module's input (named), bad dtype.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    targets = {} if target_modules is None else resolve_targets(model, target_modules)
    if target_parameters is None:
        if target_modules is None:
            raise ValueError("target_modules=None and no target_parameters: nothing to calibrate")
        return collect(model, batches, targets, dtype, progress)
    check_fallback(min_tokens, fallback)
    experts = expert_parameters(model, target_parameters)
    covs = collect(model, batches, targets, dtype, progress, experts, weighting)
    return fallback_covariances(covs, [k for p in experts.values() for k in p.keys()], min_tokens=min_tokens,
                                fallback=fallback)


def _looks_like_batch(m: Mapping) -> bool:
    return any(k in m for k in ("input_ids", "inputs_embeds", "attention_mask"))


def hooked_targets(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """The modules of ``model`` (the model run for calibration) that carry the targets' ``names``."""
    modules = dict(model.named_modules())
    targets = {}
    for n in names:
        if n not in modules or not is_target_type(modules[n]):
            raise ValueError(f"the model run for calibration ({type(model).__name__}) has no adaptable layer named {n!r}")
        targets[n] = modules[n]
    return targets


def as_covariances(calibration: Any, model: nn.Module, names: Sequence[str], progress: bool = True,
                   dtype: torch.dtype = torch.float32) -> Mapping[str, torch.Tensor]:
    """What ``wrap(calibration=...)`` accepts, turned into a mapping name -> (in, in) covariance for ``names``.

    A :class:`Covariances` or other mapping passes through (it must hold every name); a path loads a saved
    :class:`Covariances`; an iterable of batches is collected on ``model`` for exactly ``names``.
    """
    if isinstance(calibration, (str, os.PathLike)):
        calibration = Covariances.load(calibration)
    if isinstance(calibration, Mapping):
        if _looks_like_batch(calibration):
            raise TypeError("calibration looks like a single batch (a dict with input_ids / attention_mask); "
                            "pass a list of batches, or a Covariances")
        missing = [n for n in names if n not in calibration]
        if missing:
            raise ValueError(f"calibration has no covariance for targeted module {missing[0]!r} "
                             f"({len(missing)} of {len(names)} targets missing)")
        return calibration
    if isinstance(calibration, torch.Tensor):
        raise TypeError("calibration is a single tensor; pass an iterable of batches (e.g. [tensor]) or a Covariances")
    if not isinstance(calibration, Iterable):
        raise TypeError(f"calibration must be a Covariances, a mapping name -> tensor or an iterable of batches, "
                        f"got {type(calibration).__name__}")
    return collect(model, calibration, hooked_targets(model, names), dtype, progress)
