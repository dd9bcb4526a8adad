"""``Covariances``: the input covariances of Linear layers, as collected for CorDA and EoRA (``collect.py``), and
their safetensors file.

For a Linear with input x (in,), its covariance over the calibration tokens t = 1..N is

    C = (1/N) · Σ_t x_t x_tᵀ = XᵀX / N          (in, in), X the (N, in) matrix of token inputs

(the *mean* over tokens, not centred: CorDA and EoRA both want the second moment). ``N`` is stored next to
it, so a sum can be recovered exactly as ``C · N``. An MoE expert's covariance (key ``<param>[e]``,
``calibration/experts.py``) counts the tokens routed to it; one replaced by a fallback (too few tokens) carries a
note (``fallback_of``) saying what it is and how many tokens the expert had. Both methods are invariant to a scalar scale of C, so the
normalization only matters for reading the numbers. Linears that read the very same tensor (q/k/v after one norm)
map to one tensor object, stored once.

Alongside, the token mean μ = (1/N)·Σ_t x_t (in,) of each input (collected since EVA, which wants the centred
covariance C − μμᵀ = (1/N)·Σ_t (x_t − μ)(x_t − μ)ᵀ, as PEFT's incremental PCA centres its inputs): ``has_means``,
``mean(name)``, ``centered(name)``. Files written before the means existed load without them (``has_means``
False); only a method that centres asks for them, and gets a ``ValueError`` saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import torch

__all__ = ["Covariances", "fmt_bytes"]

_FORMAT = "svdadapt.covariances/1"
_MEAN_KEY = "::mean::"
_NO_MEANS = ("these covariances hold no token means (collected or saved before svdadapt recorded them): collect "
             "them again with svdadapt.collect_covariances for a method that centres its covariance (eva)")


def fmt_bytes(n: int) -> str:
    """``n`` bytes for a person: '512 B', '1.5 KiB', ... '3.2 GiB'."""
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
        has_means, mean(name), centered(name): the token mean μ (in,) and C − μμᵀ (in, in).
        fallbacks / fallback_of(name): name -> how a covariance replaced for too few tokens was made (MoE
            experts, ``experts.fallback_covariances``), None for a collected one.
        save(path) / Covariances.load(path): safetensors, bit-exact.
    """

    def __init__(self, matrices: Mapping[str, torch.Tensor], counts: Mapping[str, int] | None = None,
                 means: Mapping[str, torch.Tensor] | None = None, fallbacks: Mapping[str, str] | None = None) -> None:
        """Build from ``matrices`` (name -> (in, in) tensor; names mapped to the same tensor object form a
        group stored once), ``counts`` (name -> token count; names of a group must agree; default 0),
        ``means`` (name -> (in,) token mean, for every name or None; a group's first name's is its own) and
        ``fallbacks`` (name -> a note, for covariances that are a fallback, not collected)."""
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
        self._means = None if means is None else _group_means(self._groups, self._matrix, means)
        self._fallback = {n: str(v) for n, v in (fallbacks or {}).items() if n in self._matrix}

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

    @property
    def has_means(self) -> bool:
        """True if the token means were collected (files written before they existed have none)."""
        return self._means is not None

    def mean(self, name: str) -> torch.Tensor:
        """The token mean μ = (1/N)·Σ_t x_t (in,) of ``name``'s input; ``ValueError`` where none was stored."""
        if name not in self._group_of:
            raise KeyError(f"no covariance for module {name!r}")
        if self._means is None:
            raise ValueError(_NO_MEANS)
        return self._means[self._group_of[name]]

    def centered(self, name: str) -> torch.Tensor:
        """The centred covariance C − μμᵀ = (1/N)·Σ_t (x_t − μ)(x_t − μ)ᵀ (in, in) of ``name``'s input, formed in
        fp64 and returned in C's dtype (a new tensor each call); ``ValueError`` where no mean was stored."""
        mu = self.mean(name).to(torch.float64)
        C = self._matrix[name]
        return (C.to(torch.float64) - torch.outer(mu, mu)).to(C.dtype)

    @property
    def fallbacks(self) -> dict[str, str]:
        return dict(self._fallback)

    def fallback_of(self, name: str) -> str | None:
        """How ``name``'s covariance was made when it is a fallback (too few tokens), None when collected."""
        return self._fallback.get(name)

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
                f"{self.tokens:,} tokens, {fmt_bytes(self.nbytes)} {dtype}")

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
        if self._fallback:  # absent from files without fallbacks (and from files written before it existed)
            meta["fallbacks"] = json.dumps(self._fallback)
        if self._means is not None:  # under keys no module name can take ('::' is not in a module path)
            tensors.update({_MEAN_KEY + g[0]: m.detach().cpu().contiguous() for g, m in zip(self._groups, self._means)})
            meta["means"] = "token means under '" + _MEAN_KEY + "<first name of the group>'"
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
                keys = set(f.keys())
                groups, counts, order = _read_layout(meta, keys, p)
                fallbacks = _read_fallbacks(meta, set(order), p)
                tensors = {names[0]: f.get_tensor(names[0]) for names in groups}
                means = _read_means(f, meta, keys, groups, p)
        except (OSError, SafetensorError) as e:  # safetensors' own words, without its traceback
            raise ValueError(f"{p!r} is not a readable safetensors file (truncated or corrupt): {e}") from None
        matrices = {name: tensors[names[0]] for names in groups for name in names}
        count_of = {name: n for names, n in zip(groups, counts) for name in names}
        try:
            return cls({n: matrices[n] for n in order}, count_of, means, fallbacks)
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


def _read_fallbacks(meta: Mapping[str, str], names: set[str], path: str) -> dict[str, str]:
    """The fallback notes of a covariance file (none in files without fallbacks or older ones), checked."""
    if "fallbacks" not in meta:
        return {}
    try:
        notes = json.loads(meta["fallbacks"])
    except json.JSONDecodeError:
        notes = None
    if not (isinstance(notes, dict) and all(isinstance(k, str) and k in names and isinstance(v, str)
                                            for k, v in notes.items())):
        raise ValueError(f"{path!r} has inconsistent covariance metadata: 'fallbacks' must map module names of "
                         "the file to notes")
    return notes


def _group_means(groups: tuple[tuple[str, ...], ...], matrices: Mapping[str, torch.Tensor],
                 means: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """One mean (in,) per group, its first name's, checked: present and shaped like the group's C."""
    out = []
    for names in groups:
        m, d = means.get(names[0]), matrices[names[0]].shape[0]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (d,):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"token mean for {names[0]!r} must be a ({d},) tensor, got {shape}")
        out.append(m)
    return out


def _read_means(f, meta: Mapping[str, str], keys: set[str], groups: list[list[str]], path: str
                ) -> dict[str, torch.Tensor] | None:
    """The token means of a file that has them (metadata ``means``), keyed by each group's first name."""
    if "means" not in meta:
        return None
    missing = [g[0] for g in groups if _MEAN_KEY + g[0] not in keys]
    if missing:
        raise ValueError(f"{path!r} has inconsistent covariance metadata: no token mean for group {missing[0]!r}")
    return {g[0]: f.get_tensor(_MEAN_KEY + g[0]) for g in groups}
