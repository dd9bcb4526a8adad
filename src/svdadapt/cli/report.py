"""The tables the command line prints: a per-layer report (``format_report``, ``report_legend``), the ranks by depth
and module kind (``format_ranks``, ``layer_ranks``, ``allocation_lines``), key/value summaries.

ASCII only (it goes to any terminal): numbers right-aligned, text left-aligned. The column a method reports is its
own (``MethodSpec.report``); a quantized residual base adds its error and QLoRA's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["format_report", "report_legend", "table", "kv", "depth_and_kind", "layer_ranks", "format_ranks",
           "allocation_lines"]


def _is_number(c: str) -> bool:
    try:
        float(c)
    except ValueError:
        return False
    return True


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns of numbers right-aligned (headers too), text left-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = [bool(rows) and all(_is_number(str(r[i])) for r in rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if num else str(c).ljust(w)  # noqa: E731
                               for c, w, num in zip(r, widths, numeric)).rstrip()
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def kv(title: str, rows: list[tuple[str, str]]) -> str:
    """A key/value summary block."""
    w = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k.ljust(w)}  {v}" for k, v in rows)])


# what each report column means, by the report key of MethodSpec.report (ASCII: it goes to any terminal)
_MEANING = {
    "energy": "captured energy ||s*B*A||^2 / ||W||^2 of the decomposed matrix (W; CorDA: W*C), the share of its "
              "spectrum the adapter starts with",
    "residual_error": "EoRA's remaining compensation error ||(dW - M)*S|| / ||dW*S|| in the calibration-whitened "
                      "space, dW = W_ref - W_c (0: fully compensated, 1: not at all)",
}
# a quantized residual base (plan_quantized_layer's report keys): this init against QLoRA's start
_QUANT_COLUMNS = {"quant_error": "quant err", "qlora_error": "qlora err"}
_QUANT_MEANING = ("quant err: ||W - (deq(Q(W_res)) + s*B*A)|| / ||W||, the quantized base plus the adapter against "
                  "the full-precision W; qlora err: ||W - deq(Q(W))|| / ||W||, QLoRA's start (same scheme, zero "
                  "adapter)")


def _quant_columns(layers: dict[str, dict[str, Any]]) -> dict[str, str]:
    return _QUANT_COLUMNS if any("quant_error" in r for r in layers.values()) else {}


def format_report(method: str, layers: dict[str, dict[str, Any]], per_layer: bool = False) -> str:
    """A table of the per-layer numbers of ``wrap``'s report, per layer or grouped by module kind (min / mean / max).

    The column is the method's own (``MethodSpec.report``): the captured energy ‖s·B·A‖²/‖W‖² (CorDA: of W·C) for the
    methods that decompose the weight, and for EoRA the remaining compensation error ‖(ΔW − M)·S‖ / ‖ΔW·S‖ in the
    calibration-whitened space. A quantized residual base adds its error and QLoRA's (:func:`report_legend`)."""
    from ..core.methods import get_method

    spec = get_method(method)
    key, label = spec.report.key, spec.report.label
    quant = _quant_columns(layers)
    nan = float("nan")
    if per_layer:
        allocated = any("gain" in r for r in layers.values())
        header = ["module", "shape", "sigma_max", label, *spec.extra_columns, *quant.values(),
                  *(["rank", "gain", "uniform gain"] if allocated else [])]
        rows = [[n, "x".join(map(str, r.get("shape", ()))), f"{r.get('sigma_max', nan):.4g}",
                 f"{r.get(key, nan):.4f}", *(f"{r.get(c, nan):.3g}" for c in spec.extra_columns),
                 *(f"{r.get(c, nan):.4f}" for c in quant), *(_allocated_cells(r) if allocated else [])]
                for n, r in layers.items()]
        return table(rows, header)
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for n, r in layers.items():
        groups.setdefault(n.rsplit(".", 1)[-1].partition("[")[0], []).append((n, r))  # experts "<param>[e]": one kind
    rows = []
    pick_worst = max if spec.report.high_is_bad else min
    mean = lambda rs, k: sum(float(r.get(k, nan)) for _, r in rs) / len(rs)  # noqa: E731
    for kind, rs in groups.items():
        xs = [float(r.get(key, nan)) for _, r in rs]
        worst = pick_worst(zip((n for n, _ in rs), xs), key=lambda t: t[1])[0]
        rows.append([kind, str(len(xs)), f"{min(xs):.4f}", f"{sum(xs) / len(xs):.4f}", f"{max(xs):.4f}",
                     *(f"{mean(rs, c):.4f}" for c in quant), worst])
    return table(rows, ["kind", "layers", f"min {label}", f"mean {label}", f"max {label}",
                         *(f"mean {c}" for c in quant.values()), "worst layer"])


def report_legend(method: str, layers: dict[str, dict[str, Any]]) -> list[str]:
    """The lines printed under a report table: what its columns mean for ``method``."""
    from ..core.methods import get_method

    spec = get_method(method)
    lines = [f"{spec.report.label}: {_MEANING[spec.report.key]}"] if spec.report.key in _MEANING else []
    return lines + ([_QUANT_MEANING] if _quant_columns(layers) else [])


def _allocated_cells(r: dict[str, Any]) -> list[str]:
    uniform = r.get("uniform_gain")
    return [str(r.get("rank", "")), f"{r.get('gain', float('nan')):.4g}",
            "nan" if uniform is None else f"{uniform:.4g}"]


# ------------------------------------------------------------------------------------- ranks by depth and kind


def depth_and_kind(name: str) -> tuple[int | None, str]:
    """(the block index: the last all-digit part of the dotted ``name``, None if it has none; the last part)."""
    parts = name.split(".")
    depth = next((int(p) for p in reversed(parts[:-1]) if p.isdigit()), None)
    return depth, parts[-1]


def layer_ranks(meta: dict[str, Any]) -> dict[str, int]:
    """Each target's rank from a record (``AdaptRecord.summary()`` or svdadapt.json): its ``rank_pattern``
    entry (PEFT's rule), else the rank; a ParamWrapper under its parameter's key ``<module>.<param>`` (what the
    pattern matches, and what names its kind)."""
    from ..core.record import pattern_name, saved_rank

    return {pattern_name(meta, n): saved_rank(meta, n)[1] for n in meta["targets"]}


def format_ranks(ranks: dict[str, int]) -> str:
    """The ranks as a table: one row per block index (depth; "-" for layers outside the blocks), one column per
    module kind, in the order they first appear."""
    kinds = list(dict.fromkeys(depth_and_kind(n)[1] for n in ranks))
    grid: dict[Any, dict[str, str]] = {}
    for n, r in ranks.items():
        depth, kind = depth_and_kind(n)
        cell = grid.setdefault("-" if depth is None else depth, {})
        cell[kind] = str(r) if kind not in cell else f"{cell[kind]},{r}"
    order = sorted((d for d in grid if d != "-")) + (["-"] if "-" in grid else [])
    rows = [[str(d), *(grid[d].get(k, "") for k in kinds)] for d in order]
    return table(rows, ["depth", *kinds])


def allocation_lines(allocation: dict[str, Any]) -> str:
    """The allocation's totals: objective, bounds, budget and cost, its gain against uniform rank's."""
    uniform = allocation.get("uniform_gain")
    rows = [("objective", str(allocation["objective"])),
            ("rank bounds", f"{allocation['min_rank']} .. {allocation['max_rank']} (and each layer's min(out, in))"),
            ("budget / cost", f"{allocation['budget']:,} / {allocation['cost']:,} parameters (uniform rank "
                              f"{allocation['uniform_rank']}: {allocation['uniform_cost']:,})"),
            ("gain", f"{allocation['gain']:.6g} (uniform rank {allocation['uniform_rank']}: "
                     + ("n/a, a layer's max_rank is below it" if uniform is None else f"{uniform:.6g}, "
                        f"{allocation['gain'] - uniform:+.6g}") + ")")]
    return kv("rank allocation", rows)
