"""Per-layer ranks and alphas: PEFT's ``rank_pattern`` / ``alpha_pattern``, matched as PEFT matches them.

A pattern maps a key to a rank (or an alpha). A module's value is that of the first key, in the mapping's order,
that matches the module's full name as a regular expression anchored at the end and starting at a dot boundary:
``re.match(rf"(.*\\.)?({key})$", name)`` (``peft.utils.other.get_pattern_key``, which ``LoraModel`` uses); a module
no key matches takes the config's ``r`` (``lora_alpha``). Leaf module: the standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["pattern_key", "layer_entry", "layer_value", "check_pattern", "unmatched_keys", "ambiguous_keys"]


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first of ``keys`` that matches module ``name`` (PEFT's rule), None if none does."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def layer_entry(pattern: Mapping[str, Any], name: str, default: Any) -> tuple[str | None, Any]:
    """(the key of ``pattern`` that applies to module ``name``, its value), or (None, ``default``) where no key
    matches (``LoraModel``'s lookup)."""
    key = pattern_key(pattern, name) if pattern else None
    return key, default if key is None else pattern[key]


def layer_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """``pattern``'s value for module ``name``, or ``default`` where no key matches (``layer_entry``)."""
    return layer_entry(pattern, name, default)[1]


def _is_rank(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_alpha(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_pattern(which: str, pattern: Any) -> dict[str, Any]:
    """``rank_pattern`` (``which="rank"``: key -> integer >= 1) or ``alpha_pattern`` (``"alpha"``: key -> finite
    positive number) checked, as a dict in the given order; None is ``{}``. ``TypeError`` / ``ValueError`` naming
    the keyword and the first bad entry."""
    name = f"{which}_pattern"
    if pattern is None:
        return {}
    if not isinstance(pattern, Mapping):
        raise TypeError(f"{name} must be a mapping of module-name pattern to {which}, got {type(pattern).__name__}")
    ok, want = (_is_rank, "an integer >= 1") if which == "rank" else (_is_alpha, "a finite positive number")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} keys must be non-empty strings (module names or regular expressions), got "
                            f"{key!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{name} key {key!r} is not a regular expression: {e}") from None
        if not ok(value):
            raise ValueError(f"{name}[{key!r}] must be {want}, got {value!r}")
    return dict(pattern)


def unmatched_keys(pattern: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """The keys of ``pattern`` that match none of ``names`` (sorted; PEFT warns about these and ignores them)."""
    names = list(names)
    return sorted(k for k in pattern if not any(pattern_key((k,), n) for n in names))


def ambiguous_keys(pattern: Mapping[str, Any], names: Iterable[str]) -> tuple[str, str, str] | None:
    """(module, key, other key) for the first module of ``names`` whose value would change if ``pattern``'s keys
    were sorted: ``key`` applies in the given order, ``other`` (with another value) in sorted order. PEFT writes
    adapter_config.json with its keys sorted, so such a module would get another rank (alpha) on reload. None if
    there is none (keys given in sorted order, or matching disjoint modules, or agreeing, are safe)."""
    ordered = sorted(pattern)
    for name in names:
        key, other = pattern_key(pattern, name), pattern_key(ordered, name)
        if key != other and pattern[key] != pattern[other]:
            return name, key, other
    return None
