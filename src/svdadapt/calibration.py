"""Input covariances of Linear layers, collected with forward hooks, for CorDA and EoRA.

For a Linear with input x (in,), its covariance over the calibration tokens t = 1..N is

    C = (1/N) · Σ_t x_t x_tᵀ = XᵀX / N          (in, in), X the (N, in) matrix of token inputs

(the *mean* over tokens, not centred: CorDA and EoRA both want the second moment). ``N`` is stored next to
it, so a sum can be recovered exactly as ``C · N``. Both methods are invariant to a scalar scale of C, so the
normalization only matters for reading the numbers.

Linears that read the very same tensor in a forward pass (q/k/v after one norm, gate/up of an MLP) have the
same covariance: it is computed and stored once, and every name of the group maps to the *same* tensor
object (``wrap()`` caches the per-covariance Cholesky / eigendecomposition by object identity). "The same" is
the same object *at the same version*: a tensor changed in place between two readers (``h.relu_()``) is a new input.

Padding is dropped with the mask of the stack an input belongs to: ``attention_mask`` in the encoder (or the only
stack), ``decoder_attention_mask`` in the decoder of an encoder–decoder model, from inputs laid out (batch, seq, in)
or (batch·seq, in) (the rule: :class:`_Masks`). Forwards run without a KV cache (``use_cache=False`` where the
model takes it).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import is_target_type
from .targets import resolve_targets

__all__ = ["Covariances", "collect_covariances", "as_covariances", "text_batches"]

_FORMAT = "svdadapt.covariances/1"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class Covariances(Mapping[str, torch.Tensor]):
    """Read-only mapping: module name (as in ``model.named_modules()``) -> its input covariance C (in, in).

    ``C = XᵀX / N``, the mean of x xᵀ over the N calibration tokens that reached the module (padding
    excluded). Names that read the same input map to one shared tensor object. Treat the tensors as
    read-only: they are shared between names and between users of this object.

    Attributes / methods:
        groups: tuple of name tuples, one per unique input (the names that share it), in target order.
        tokens: the largest token count of any input (for a transformer: the unmasked tokens run through it).
        token_count(name): N for ``name``'s input.
        nbytes: memory of the unique tensors.
        summary(): one line (layers, unique inputs, tokens, memory).
        save(path) / Covariances.load(path): safetensors, bit-exact.
    """

    def __init__(self, matrices: Mapping[str, torch.Tensor], counts: Mapping[str, int] | None = None) -> None:
        """Build from ``matrices`` (name -> (in, in) tensor; names mapped to the same tensor object form a
        group stored once) and ``counts`` (name -> token count; names of a group must agree; default 0)."""
        self._matrix: dict[str, torch.Tensor] = {}
        self._group_of: dict[str, int] = {}
        groups: list[list[str]] = []
        index: dict[int, int] = {}  # id(tensor) -> group; the tensors stay alive in `matrices`, ids are stable
        for name, C in matrices.items():
            if not isinstance(C, torch.Tensor) or C.dim() != 2 or C.shape[0] != C.shape[1]:
                shape = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
                raise ValueError(f"covariance for {name!r} must be a square (in, in) tensor, got {shape}")
            g = index.setdefault(id(C), len(groups))
            if g == len(groups):
                groups.append([])
            groups[g].append(name)
            self._matrix[name] = C
            self._group_of[name] = g
        self._groups: tuple[tuple[str, ...], ...] = tuple(tuple(g) for g in groups)
        self._count: list[int] = []
        for names in self._groups:
            cs = {int((counts or {}).get(n, 0)) for n in names}
            if len(cs) > 1:
                raise ValueError(f"modules {list(names)} share one covariance but have different token counts {sorted(cs)}")
            self._count.append(cs.pop())

    # Mapping protocol -----------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._matrix[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._matrix)

    def __len__(self) -> int:
        return len(self._matrix)

    # Introspection ---------------------------------------------------------------------------------------------
    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        return self._groups

    @property
    def tokens(self) -> int:
        return max(self._count, default=0)

    def token_count(self, name: str) -> int:
        """Number of tokens N averaged into ``name``'s covariance."""
        if name not in self._group_of:
            raise KeyError(f"no covariance for module {name!r}")
        return self._count[self._group_of[name]]

    def shared_with(self, name: str) -> tuple[str, ...]:
        """All names (``name`` included) that read the same input as ``name``."""
        return self._groups[self._group_of[name]]

    @property
    def nbytes(self) -> int:
        return sum(self._matrix[g[0]].numel() * self._matrix[g[0]].element_size() for g in self._groups)

    @property
    def dtype(self) -> torch.dtype | None:
        return next(iter(self._matrix.values())).dtype if self._matrix else None

    def summary(self) -> str:
        shared = sum(1 for g in self._groups if len(g) > 1)
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{len(self)} layers, {len(self._groups)} unique inputs ({shared} shared by several layers), "
                f"{self.tokens:,} tokens, {_fmt_bytes(self.nbytes)} {dtype}")

    def __repr__(self) -> str:
        return f"Covariances({self.summary()})"

    # Persistence -----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file: one tensor per unique input (keyed by the group's first name), the
        groups and token counts in the metadata. ``load`` gives back bit-identical tensors."""
        from safetensors.torch import save_file

        tensors = {g[0]: self._matrix[g[0]].detach().cpu().contiguous() for g in self._groups}
        meta = {"format": _FORMAT, "normalization": "mean: C = X^T X / N",
                "groups": json.dumps([list(g) for g in self._groups]), "counts": json.dumps(self._count),
                "order": json.dumps(list(self._matrix))}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Covariances":
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError, naming the file: not a file, not a readable safetensors file (truncated or corrupt), not a
                covariance file (``format``), or metadata that does not describe its tensors.
        """
        from safetensors import SafetensorError, safe_open

        p = os.fspath(path)
        if not os.path.exists(p):
            raise FileNotFoundError(f"no such covariance file: {p!r}")
        if not os.path.isfile(p):
            raise ValueError(f"{p!r} is not a file (expected a covariance file written by Covariances.save)")
        try:
            with safe_open(p, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise ValueError(f"{p!r} is not a svdadapt covariance file (format={meta.get('format')!r})")
                groups, counts, order = _read_layout(meta, set(f.keys()), p)
                tensors = {names[0]: f.get_tensor(names[0]) for names in groups}
        except (OSError, SafetensorError) as e:  # safetensors' own words, without its traceback
            raise ValueError(f"{p!r} is not a readable safetensors file (truncated or corrupt): {e}") from None
        matrices = {name: tensors[names[0]] for names in groups for name in names}
        count_of = {name: n for names, n in zip(groups, counts) for name in names}
        try:
            return cls({n: matrices[n] for n in order}, count_of)
        except ValueError as e:
            raise ValueError(f"{p!r} holds an invalid covariance: {e}") from None


def _read_layout(meta: Mapping[str, str], keys: set[str], path: str
                 ) -> tuple[list[list[str]], list[int], list[str]]:
    """The groups, token counts and name order stored in a covariance file's metadata, checked against each other
    and against the file's tensor ``keys``; ``ValueError`` naming ``path`` and the first inconsistency."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path!r} has inconsistent covariance metadata: {what}")

    values = {}
    for field in ("groups", "counts", "order"):
        if field not in meta:
            if field == "order":  # files written before 'order' existed: group order
                continue
            raise bad(f"no {field!r} entry")
        try:
            values[field] = json.loads(meta[field])
        except json.JSONDecodeError:
            raise bad(f"{field!r} is not valid JSON: {meta[field][:60]!r}") from None
    groups, counts = values["groups"], values["counts"]
    if not (isinstance(groups, list) and all(isinstance(g, list) and g and all(isinstance(n, str) for n in g)
                                             for g in groups)):
        raise bad("'groups' must be a list of non-empty lists of module names")
    if not (isinstance(counts, list) and all(type(n) is int and n >= 0 for n in counts)):
        raise bad("'counts' must be a list of non-negative integers")
    if len(counts) != len(groups):
        raise bad(f"{len(groups)} groups but {len(counts)} token counts")
    names = [n for g in groups for n in g]
    if len(set(names)) != len(names):
        raise bad("a module name appears in more than one group")
    missing = [g[0] for g in groups if g[0] not in keys]
    if missing:
        raise bad(f"no tensor for group {missing[0]!r}")
    order = values.get("order", names)
    if not (isinstance(order, list) and all(isinstance(n, str) for n in order) and sorted(order) == sorted(names)):
        raise bad("'order' must list every module name of 'groups' exactly once")
    return groups, counts, order


# ------------------------------------------------------------------------------------------------------ collection
_ENCODER, _DECODER = "encoder", "decoder"


def _version(x: torch.Tensor) -> object:
    """What tells two states of one tensor object apart: its version counter, bumped by every in-place op. An
    inference tensor has none: a fresh ``object()``, equal to nothing, so such an input is never taken as shared."""
    try:
        return x._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return object()


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The input of a layer's forward: the first positional argument, else the first tensor keyword
    (``input=`` for nn.Linear, ``x=`` for transformers Conv1D)."""
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _stacks(model: nn.Module) -> dict[str, nn.Module]:
    """The encoder and decoder of a transformers encoder–decoder model (``config.is_encoder_decoder``, through
    ``get_encoder()`` / ``get_decoder()``), else ``{}``: one stack, one mask."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return {}
    found = {}
    for stack, getter in ((_ENCODER, "get_encoder"), (_DECODER, "get_decoder")):
        try:
            m = getattr(model, getter)()
        except Exception:  # transformers' generic lookup raises for models it cannot place
            return {}
        found[stack] = m
    enc, dec = found[_ENCODER], found[_DECODER]
    ok = all(isinstance(m, nn.Module) and m is not model for m in (enc, dec)) and enc is not dec
    return found if ok else {}


class _Masks:
    """The masks of one batch and which stack is running: decides which tokens of each hooked input count.

    The rule (encoder–decoder models; any other model has one stack, the batch's ``attention_mask``):
      - a module runs inside the encoder or the decoder (tracked by hooks on the two stacks); outside both, it
        belongs to the stack that ran last (``lm_head`` after the decoder), or the encoder before either ran;
      - in the encoder, inputs laid out (batch, seq) like ``attention_mask`` drop its padding;
      - in the decoder, the encoder states it was handed (``encoder_hidden_states``, the same tensor object at the
        same version: cross-attention k/v) take ``attention_mask``; inputs laid out like the decoder sequence take
        ``decoder_attention_mask`` (none given: every decoder token counts); an input laid out like the encoder
        mask but not like the decoder sequence (encoder states transformed first) takes ``attention_mask``;
      - an input laid out (batch·seq, in), one row per token (MoE blocks flatten the hidden states for their shared
        expert), takes the mask of its (batch, seq) layout flattened;
      - anything else (another layout, e.g. tokens gathered for a routed MoE expert) counts all its rows
        (:meth:`unmasked_padding` tells the collector, which warns when the batch has padding).
    """

    def __init__(self, enc: torch.Tensor | None, dec: torch.Tensor | None) -> None:
        self.enc, self.dec = enc, dec  # (batch, seq_enc) / (batch, seq_dec) bool, or None
        self.running: list[str] = []  # stacks entered and not yet left, innermost last
        self.last = _ENCODER
        self.enc_states: list[tuple[weakref.ref, object]] = []  # encoder states handed to the decoder
        self.dec_shape: tuple[int, ...] | None = None if dec is None else tuple(dec.shape)

    def enter(self, stack: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.running.append(stack)
        if stack != _DECODER:
            return
        states = kwargs.get("encoder_hidden_states")
        if isinstance(states, torch.Tensor):
            self.enc_states.append((weakref.ref(states), _version(states)))
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        for t, dim in ((ids, 2), (embeds, 3)):
            if self.dec is None and isinstance(t, torch.Tensor) and t.dim() == dim:
                self.dec_shape = tuple(t.shape[:2])

    def leave(self, stack: str) -> None:
        if self.running and self.running[-1] == stack:
            self.running.pop()
        self.last = stack

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask of ``x``'s real tokens: (batch, seq) for ``x`` laid out (batch, seq, in), (batch·seq,) for ``x``
        laid out (batch·seq, in) (a (batch, seq) layout flattened, as MoE blocks hand their shared expert), or
        None: every row counts."""
        enc = self.enc if self.enc is not None and _fits(x, tuple(self.enc.shape)) else None
        if (self.running[-1] if self.running else self.last) == _ENCODER:
            return _flat(enc, x)
        if any(r() is x and v == _version(x) for r, v in self.enc_states):
            return _flat(enc, x)
        if self.dec_shape is not None and _fits(x, self.dec_shape):
            return _flat(self.dec, x)
        return _flat(enc, x) if self.dec_shape is not None else None

    def unmasked_padding(self, x: torch.Tensor) -> bool:
        """True when the batch has padding but ``x`` is laid out like no sequence of it (e.g. rows gathered for a
        routed MoE expert): its padding rows cannot be told apart and count."""
        layouts = [tuple(self.enc.shape)] if self.enc is not None else []
        layouts += [self.dec_shape] if self.dec_shape is not None else []
        padded = any(m is not None and not bool(m.all()) for m in (self.enc, self.dec))
        return padded and not any(_fits(x, layout) for layout in layouts)


def _fits(x: torch.Tensor, layout: tuple[int, ...]) -> bool:
    """``x`` (..., in) is laid out (batch, seq, in) or (batch·seq, in) for ``layout`` = (batch, seq)."""
    if x.dim() == 3:
        return tuple(x.shape[:2]) == layout
    return x.dim() == 2 and x.shape[0] == layout[0] * layout[1]


def _flat(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``mask`` (batch, seq) as ``x`` needs it: itself for (batch, seq, in), flattened for (batch·seq, in)."""
    if mask is None:
        return None
    return mask if x.dim() == 3 else mask.reshape(-1)


class _Collector:
    """State shared by the hooks during one collection: accumulators, groups, the current batch's masks."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.acc: dict[str, torch.Tensor] = {}  # group key (first name seen) -> Σ x xᵀ
        self.count: dict[str, int] = {}
        self.key_of: dict[str, str] = {}  # name -> group key, fixed at the name's first sighting
        self.members: dict[str, frozenset[str]] = {}  # group key -> names that read its input
        self.batch = -1
        self.masks = _Masks(None, None)
        # per forward: (id(input), its version) -> (weakref to it, group key, names that read it). The version
        # tells the same object apart before and after an in-place op (h.relu_()); the weakref guards against a
        # freed tensor's id being reused by a later, different input in the same forward
        self.seen: dict[tuple[int, object], tuple[weakref.ref, str, set[str]]] = {}
        self.unmasked: dict[str, tuple[int, ...]] = {}  # name -> input shape: padding in the batch, not removable

    def begin(self, batch: int, masks: _Masks) -> None:
        self.batch, self.masks, self.seen = batch, masks, {}

    def hook(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = _first_tensor(args, kwargs)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"module {name!r} was called without a tensor input in batch {self.batch}")
        ident = (id(x), _version(x))
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
        """Add Σ x xᵀ of ``rows`` (n, in) to ``key``'s accumulator (in, in)."""
        if rows.shape[0] == 0:
            return
        if not torch.isfinite(rows).all():
            raise ValueError(f"non-finite activations (NaN or inf) in the input of module {name!r} in batch {self.batch}")
        rows = rows.to(self.dtype)
        acc = self.acc.get(key)
        if acc is None:
            acc = self.acc[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype, device=rows.device)
        acc.addmm_(rows.mT, rows)
        self.count[key] = self.count.get(key, 0) + rows.shape[0]

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The (n, in) token inputs of ``x`` (..., in); padding dropped where ``x`` is laid out (batch, seq, in) or
        (batch·seq, in) like the mask that :class:`_Masks` assigns it (any other layout: noted in ``unmasked``)."""
        m = self.masks.mask_for(x) if x.dim() in (2, 3) else None
        if m is None and name not in self.unmasked and self.masks.unmasked_padding(x):
            self.unmasked[name] = tuple(x.shape)
        return x[m] if m is not None else x.reshape(-1, x.shape[-1])

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


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's data is: the device of its first parameter not on the meta device (weights loaded one
    block at a time, ``svdadapt.lazy``, leave the others there), CPU for none."""
    p = next((p for p in model.parameters() if not p.is_meta), None)
    return p.device if p is not None else torch.device("cpu")


def _batch_masks(batch: Mapping[str, Any], i: int) -> _Masks:
    """The masks a dict batch gives: ``attention_mask`` (the encoder's, or the only stack's) and
    ``decoder_attention_mask``, each (batch, seq) or absent."""
    masks = []
    for key in ("attention_mask", "decoder_attention_mask"):
        mask = batch.get(key)
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"batch {i}: {key} must be (batch, seq), got shape {shape}")
        masks.append(None if mask is None else mask.bool())
    return _Masks(*masks)


def _hook_all(model: nn.Module, targets: Mapping[str, nn.Module], state: _Collector) -> list[Any]:
    """Pre-hooks on the targets (accumulate) and on the encoder / decoder stacks (track which one runs)."""
    handles = [module.register_forward_pre_hook(
        lambda mod, args, kwargs, _n=name: state.hook(_n, args, kwargs), with_kwargs=True)
        for name, module in targets.items()]
    for stack, module in _stacks(model).items():
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, kwargs, _s=stack: state.masks.enter(_s, args, kwargs), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda mod, args, out, _s=stack: state.masks.leave(_s)))
    return handles


def _no_cache(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for a model whose forward takes ``use_cache`` (transformers models), else ``{}``:
    a calibration forward never needs a KV cache, and one built during it would be handed to every block
    (``svdadapt.blockwise`` runs the blocks again on their own)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature (a builtin)
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _run_batch(model: nn.Module, batch: Any, i: int, device: torch.device, state: _Collector) -> None:
    """Run ``model`` on batch ``i`` (moved to ``device``), without a KV cache where the model takes ``use_cache``."""
    if isinstance(batch, Mapping):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        state.begin(i, _batch_masks(batch, i))
        model(**{**batch, **_no_cache(model)})
    elif isinstance(batch, torch.Tensor):
        state.begin(i, _Masks(None, None))
        model(batch.to(device), **_no_cache(model))
    else:
        raise TypeError(f"batch {i} is a {type(batch).__name__}; a batch is a dict (run as model(**batch)) "
                        "or a tensor (run as model(batch))")
    state.end()


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside svdadapt and torch's decorators (the user's call), counted
    from the caller of this function."""
    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        level, frame = level + 1, frame.f_back
    return level


def _note_unmasked(unmasked: Mapping[str, tuple[int, ...]]) -> None:
    """One warning line for the targets whose padding rows counted (their inputs fit no (batch, seq) layout)."""
    if unmasked:
        name, shape = next(iter(unmasked.items()))
        more = f" and {len(unmasked) - 1} more" if len(unmasked) > 1 else ""
        warnings.warn(f"svdadapt calibration: the input of module {name!r}{more} (shape {shape}) is laid out neither "
                      "(batch, seq, in) nor (batch·seq, in) like the attention_mask, so its padding rows count; "
                      "pass unpadded batches for it (docs/calibration.md)", stacklevel=_caller_level())


@torch.no_grad()
def _collect(model: nn.Module, batches: Iterable[Any], targets: Mapping[str, nn.Module], dtype: torch.dtype,
             progress: bool) -> Covariances:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"covariances accumulate in torch.float32 or torch.float64, got dtype={dtype}")
    state = _Collector(dtype)
    device = _model_device(model)
    modes = [(m, m.training) for m in model.modules()]  # restored one by one: model.train() would flip all
    handles = []
    n_batches = 0
    try:
        model.eval()
        handles = _hook_all(model, targets, state)
        total = len(batches) if hasattr(batches, "__len__") else None
        for i, batch in enumerate(tqdm(batches, total=total, desc="svdadapt calibration", unit="batch",
                                       disable=not progress)):
            _run_batch(model, batch, i, device, state)
            n_batches += 1
    finally:  # hooks must never outlive the collection, also when the model raises
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training

    if n_batches == 0 or not state.count or max(state.count.values()) == 0:
        raise ValueError(f"calibration saw no tokens ({_plural(n_batches, 'batch')}): pass non-empty batches whose "
                         "attention_mask is not all zero")
    missing = [n for n in targets if n not in state.key_of or state.count.get(state.key_of[n], 0) == 0]
    if missing:
        raise ValueError(f"calibration saw no tokens for module {missing[0]!r} ({len(missing)} of {len(targets)} "
                         f"targets): it did not take part in the forward pass or all its tokens were padding")
    _note_unmasked(state.unmasked)
    mean = {key: state.acc[key].div_(state.count[key]) for key in state.acc}  # XᵀX / N, in place
    covs = Covariances({n: mean[state.key_of[n]] for n in targets},
                       {n: state.count[state.key_of[n]] for n in targets})
    if progress:
        print(f"svdadapt calibration: {covs.summary()} from {_plural(n_batches, 'batch')}")
    return covs


@torch.no_grad()
def collect_covariances(model: nn.Module, batches: Iterable[Any], target_modules: str | Iterable[str] = "all-linear",
                        dtype: torch.dtype = torch.float32, progress: bool = True) -> Covariances:
    """Run ``model`` on ``batches`` and return the input covariance of every targeted Linear.

    Args:
        model: any ``nn.Module``; run in eval mode under ``torch.no_grad`` (its training flag is restored).
        batches: iterable of dicts (``model(**batch)``, tensors moved to the model's device; an
            ``attention_mask`` (batch, seq) drops padding from every input laid out (batch, seq, in) or
            (batch·seq, in) (other layouts count every row, with a warning when there is padding); in an
            encoder–decoder model it is the encoder's, and ``decoder_attention_mask`` the decoder's, none: every
            decoder token counts) or of tensors (``model(batch)``, every position counts). Any batch size and
            sequence length.
        target_modules: as in :func:`svdadapt.wrap` (``"all-linear"``: every Linear or transformers Conv1D but the
            output head).
        dtype: accumulation and storage dtype, ``torch.float32`` or ``torch.float64``.
        progress: progress bar over batches, and a one-line summary printed at the end.
    Returns:
        :class:`Covariances`: name -> C = XᵀX / N (in, in), in the layer's input width (``weight.shape[1]`` of a
        Linear, ``weight.shape[0]`` of a Conv1D, which stores (in, out)); q/k/v-style readers of one input share a
        tensor.
    Raises:
        ValueError: no tokens seen (or none for some target), NaN/inf in a module's input (named), bad dtype.
    """
    return _collect(model, batches, resolve_targets(model, target_modules), dtype, progress)


def _looks_like_batch(m: Mapping) -> bool:
    return any(k in m for k in ("input_ids", "inputs_embeds", "attention_mask"))


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
    modules = dict(model.named_modules())
    targets = {}
    for n in names:
        if n not in modules or not is_target_type(modules[n]):
            raise ValueError(f"the model run for calibration ({type(model).__name__}) has no adaptable layer named {n!r}")
        targets[n] = modules[n]
    return _collect(model, calibration, targets, dtype, progress)


# ----------------------------------------------------------------------------------------------------- token batches
def text_batches(tokenizer: Any, texts: str | Iterable[str], seq_len: int = 512, batch_size: int = 4, *,
                 max_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Packed token batches for calibration: the texts are tokenized (no special tokens), joined with EOS after
    each, and cut into ``seq_len`` chunks, ``batch_size`` chunks per batch, in order (deterministic).

    The last chunk is padded (pad token, else EOS, else 0) with ``attention_mask`` 0 on the padding, and the
    last batch may hold fewer rows; ``max_batches`` stops early (tokenizing only what is needed).

    Returns:
        list of dicts with ``input_ids`` and ``attention_mask``, each (rows, seq_len) int64.
    """
    for arg, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive integer, got {v!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if isinstance(texts, str):
        texts = [texts]
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    need = None if max_batches is None else max_batches * batch_size * seq_len
    ids: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    if not ids:
        raise ValueError("text_batches: the texts gave no tokens")
    if need is not None:
        ids = ids[:need]
    n_chunks = -(-len(ids) // seq_len)
    flat = torch.full((n_chunks * seq_len,), pad, dtype=torch.long)
    flat[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(n_chunks * seq_len, dtype=torch.long)
    mask[: len(ids)] = 1
    flat, mask = flat.view(n_chunks, seq_len), mask.view(n_chunks, seq_len)
    return [{"input_ids": flat[i:i + batch_size].clone(), "attention_mask": mask[i:i + batch_size].clone()}
            for i in range(0, n_chunks, batch_size)]
