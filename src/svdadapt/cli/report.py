"""The tables the command line prints: a per-layer report (``format_report``, ``report_legend``), key/value summaries.

ASCII only (it goes to any terminal): numbers right-aligned, text left-aligned. The column a method reports is its
own (``MethodSpec.report``); a quantized residual base adds its error and QLoRA's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["format_report", "report_legend", "table", "kv"]


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
        header = ["module", "shape", "sigma_max", label, *spec.extra_columns, *quant.values()]
        rows = [[n, "x".join(map(str, r.get("shape", ()))), f"{r.get('sigma_max', nan):.4g}",
                 f"{r.get(key, nan):.4f}", *(f"{r.get(c, nan):.3g}" for c in spec.extra_columns),
                 *(f"{r.get(c, nan):.4f}" for c in quant)]
                for n, r in layers.items()]
        return table(rows, header)
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for n, r in layers.items():
        groups.setdefault(n.rsplit(".", 1)[-1], []).append((n, r))
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
