"""Input covariances of Linear layers, collected with forward hooks, for CorDA and EoRA.

For a Linear with input x (in,), its covariance over the calibration tokens t = 1..N is

    C = (1/N) · Σ_t x_t x_tᵀ = XᵀX / N          (in, in), X the (N, in) matrix of token inputs

(the *mean* over tokens, not centred: CorDA and EoRA both want the second moment). ``N`` is stored next to
it, so a sum can be recovered exactly as ``C · N``. Both methods are invariant to a scalar scale of C, so the
normalization only matters for reading the numbers.

Linears that read the very same tensor in a forward pass (q/k/v after one norm, gate/up of an MLP) have the
same covariance: it is computed and stored once, and every name of the group maps to the *same* tensor
object (``wrap()`` caches the per-covariance Cholesky / eigendecomposition by object identity).
"""

from __future__ import annotations

import json
import os
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
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{os.fspath(path)!r} is not a svdadapt covariance file (format={meta.get('format')!r})")
            groups, counts = json.loads(meta["groups"]), json.loads(meta["counts"])
            matrices: dict[str, torch.Tensor] = {}
            count_of: dict[str, int] = {}
            for names, n in zip(groups, counts):
                C = f.get_tensor(names[0])
                for name in names:
                    matrices[name] = C
                    count_of[name] = n
        # restore the original name order (groups are listed by first appearance, members in order)
        order = json.loads(meta["order"]) if "order" in meta else list(matrices)
        return cls({n: matrices[n] for n in order}, count_of)


# ------------------------------------------------------------------------------------------------------ collection
class _Collector:
    """State shared by the hooks during one collection: accumulators, groups, the current batch's mask."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.acc: dict[str, torch.Tensor] = {}  # group key (first name seen) -> Σ x xᵀ
        self.count: dict[str, int] = {}
        self.key_of: dict[str, str] = {}  # name -> group key, fixed at the name's first sighting
        self.members: dict[str, frozenset[str]] = {}  # group key -> names that read its input
        self.batch = -1
        self.mask: torch.Tensor | None = None
        # per forward: id(input) -> (weakref to it, group key, names that read it); the weakref guards
        # against a freed tensor's id being reused by a later, different input in the same forward
        self.seen: dict[int, tuple[weakref.ref, str, set[str]]] = {}

    def begin(self, batch: int, mask: torch.Tensor | None) -> None:
        self.batch, self.mask, self.seen = batch, mask, {}

    def hook(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["input"]
        entry = self.seen.get(id(x))
        if entry is not None and entry[0]() is x:  # the same tensor as an earlier reader: shared input
            key, readers = entry[1], entry[2]
            known = self.key_of.setdefault(name, key)
            if known != key:
                raise RuntimeError(
                    f"module {name!r} read the same input as {sorted(readers)} in batch {self.batch}, but not in "
                    "earlier batches: inputs must be shared always or never")
            readers.add(name)
            return
        key = self.key_of.setdefault(name, name)
        self.seen[id(x)] = (weakref.ref(x), key, {name})
        rows = self._rows(x)
        if rows.shape[0] == 0:
            return
        if not torch.isfinite(rows).all():
            raise ValueError(f"non-finite activations (NaN or inf) in the input of module {name!r} in batch {self.batch}")
        rows = rows.to(self.dtype)
        acc = self.acc.get(key)
        if acc is None:
            acc = self.acc[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype, device=rows.device)
        acc.addmm_(rows.mT, rows)  # Σ x xᵀ over this batch's tokens
        self.count[key] = self.count.get(key, 0) + rows.shape[0]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The (n, in) token inputs of ``x`` (..., in), padding dropped where ``x`` is laid out (batch, seq, in)
        like the attention mask."""
        m = self.mask
        if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m]
        return x.reshape(-1, x.shape[-1])

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
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


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
        for name, module in targets.items():
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs, _n=name: state.hook(_n, args, kwargs), with_kwargs=True))
        total = len(batches) if hasattr(batches, "__len__") else None
        for i, batch in enumerate(tqdm(batches, total=total, desc="svdadapt calibration", unit="batch",
                                       disable=not progress)):
            if isinstance(batch, Mapping):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                mask = batch.get("attention_mask")
                if mask is not None and mask.dim() != 2:
                    raise ValueError(f"batch {i}: attention_mask must be (batch, seq), got shape {tuple(mask.shape)}")
                state.begin(i, None if mask is None else mask.bool())
                model(**batch)
            elif isinstance(batch, torch.Tensor):
                state.begin(i, None)
                model(batch.to(device))
            else:
                raise TypeError(f"batch {i} is a {type(batch).__name__}; a batch is a dict (run as model(**batch)) "
                                "or a tensor (run as model(batch))")
            state.end()
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
            ``attention_mask`` (batch, seq) drops padding from every input laid out (batch, seq, in)) or of
            tensors (``model(batch)``, every position counts). Any batch size and sequence length.
        target_modules: as in :func:`svdadapt.wrap` (``"all-linear"``: every Linear but the output head).
        dtype: accumulation and storage dtype, ``torch.float32`` or ``torch.float64``.
        progress: progress bar over batches, and a one-line summary printed at the end.
    Returns:
        :class:`Covariances`: name -> C = XᵀX / N (in, in); q/k/v-style readers of one input share a tensor.
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
