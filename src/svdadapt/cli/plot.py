"""``plot_ranks``: a PNG of each layer's rank by depth (block index, x) and module kind (one line per q/k/v/o/gate/
up/down), from a wrapped model or a directory's svdadapt.json. matplotlib is imported on first use (it is in the
``test`` / ``bench`` extras, not a dependency)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .report import depth_and_kind, layer_ranks

__all__ = ["plot_ranks"]

_MARKERS = "os^vD<>px*h"


def _meta(source: Any) -> dict[str, Any]:
    """The record of ``source``: a wrapped model (``peft_model.svdadapt``) or a directory with svdadapt.json."""
    record = getattr(source, "svdadapt", None)
    if record is not None:
        return record.summary()
    if isinstance(source, (str, os.PathLike)):
        from ..lifecycle.checkpoint import read_metadata

        return read_metadata(Path(source))
    raise TypeError(f"plot_ranks takes a model returned by svdadapt.wrap / load or a directory written by svdadapt "
                    f"(init, save, export), got {type(source).__name__}")


def _figure() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError("plot_ranks needs matplotlib, which is not installed: pip install matplotlib "
                                  "(or svdadapt[bench])") from None
    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_ranks(source: Any, path: str | os.PathLike) -> Path:
    """Write a PNG to ``path`` of every target's rank (y) by block index (x), one line and marker per module kind;
    layers outside the blocks are left out (the title says how many). ``source``: a wrapped model or a directory
    with svdadapt.json. Returns ``path``."""
    meta = _meta(source)
    series: dict[str, list[tuple[int, int]]] = {}
    outside = 0
    for name, rank in layer_ranks(meta).items():
        depth, kind = depth_and_kind(name)
        if depth is None:
            outside += 1
            continue
        series.setdefault(kind, []).append((depth, rank))
    fig, ax = _figure()
    for i, (kind, points) in enumerate(series.items()):
        xs, ys = zip(*sorted(points))
        # each kind nudged sideways (within ±0.2 of its block) so that kinds at the same rank stay visible
        dx = 0.4 * (i / max(1, len(series) - 1) - 0.5) if len(series) > 1 else 0.0
        ax.plot([x + dx for x in xs], ys, marker=_MARKERS[i % len(_MARKERS)], markersize=4, linewidth=1.2,
                label=kind)
    alloc = meta.get("allocation")
    title = f"{meta['method']}: rank per layer (uniform rank {meta['rank']}"
    title += f", objective {alloc['objective']}, budget {alloc['budget']:,})" if alloc else ")"
    ax.set_title(title + (f"; {outside} layers outside the blocks not shown" if outside else ""), fontsize=10)
    ax.set_xlabel("block index (depth); kinds side by side within a block")
    ax.set_ylabel("rank")
    ax.axhline(meta["rank"], color="grey", linewidth=0.8, linestyle="--")
    ax.grid(True, alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if series:
        ax.legend(fontsize=8, ncol=min(len(series), 7), loc="upper center", bbox_to_anchor=(0.5, -0.14),
                  frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
