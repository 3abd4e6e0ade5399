"""The study's PNG plots (matplotlib, no display needed).

Each function takes the data :mod:`srcid.study.report` builds and writes
one PNG; an average is a :func:`srcid.eval.metrics.summarize`-style dict
(``mean``, ``std``) or ``None`` for a cell without results, which is left
out (a plot with nothing to show says so in its axes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

AVG_LABEL = "cross-modal average (%)"


def _figure(width: float = 6.4, height: float = 3.8):
    # matplotlib here, not at the top: `srcid --help` imports the study, only a finished study draws
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def _save(figure, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def _nothing(axes, what: str) -> None:
    axes.text(0.5, 0.5, f"no finished cells for {what} yet", ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def _std(avg: dict) -> float:
    return avg["std"] if avg.get("std") is not None else 0.0


def _bars(axes, labels: list, averages: list, colors: Optional[list] = None) -> None:
    means = [a["mean"] for a in averages]
    errors = [_std(a) for a in averages]
    positions = range(len(labels))
    bars = axes.bar(positions, means, yerr=errors, capsize=4, color=colors or [f"C{i % 10}" for i in positions])
    axes.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=2, fontsize=8)
    axes.set_xticks(list(positions), labels, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel(AVG_LABEL)
    axes.set_ylim(0, max(m + e for m, e in zip(means, errors)) * 1.15 + 1e-9)
    axes.grid(axis="y", alpha=0.3)


def method_averages(rows: list, path: Path) -> Path:
    """Bars: Table II's average per method (``rows``: ``{"method", "avg"}``), error bars = std over seeds."""
    figure, axes = _figure()
    present = [r for r in rows if r["avg"] is not None]
    if present:
        colors = ["C1" if r["method"].startswith("SRCID") else "C0" for r in present]
        _bars(axes, [r["method"] for r in present], [r["avg"] for r in present], colors)
    else:
        _nothing(axes, "the methods")
    axes.set_title("Cross-modal average per method (Tables I and II)", fontsize=10)
    return _save(figure, path)


def codebook_curve(points: list, path: Path, default_size: Optional[int] = None) -> Path:
    """Line: SRCID's cross-modal average against the codebook size (``points``: ``{"size", "avg"}``).

    ``default_size`` (the size of Tables I-III) is marked by a dashed line.
    """
    figure, axes = _figure()
    present = [p for p in points if p["avg"] is not None]
    if present:
        sizes = [p["size"] for p in present]
        axes.errorbar(sizes, [p["avg"]["mean"] for p in present], yerr=[_std(p["avg"]) for p in present],
                      marker="o", capsize=4, color="C1", label="SRCID")
        if default_size is not None:
            axes.axvline(default_size, color="grey", linestyle="--", linewidth=0.8,
                         label=f"size of Tables I-III ({default_size})")
            axes.legend(fontsize=7)
        axes.set_xticks(sizes, [str(s) for s in sizes])
        axes.set_xlabel("codebook size")
        axes.set_ylabel(AVG_LABEL)
        axes.grid(alpha=0.3)
    else:
        _nothing(axes, "the codebook sizes")
    axes.set_title("Fig. 3: SRCID by codebook size", fontsize=10)
    return _save(figure, path)


def club_bars(bars: list, path: Path) -> Path:
    """Bars: SRCID's cross-modal average with CLUB in both layers and without it in one (``{"setting", "avg"}``)."""
    figure, axes = _figure(5.2, 3.8)
    present = [b for b in bars if b["avg"] is not None]
    if present:
        _bars(axes, [b["setting"] for b in present], [b["avg"] for b in present])
    else:
        _nothing(axes, "the CLUB ablation")
    missing = [b["setting"] for b in bars if b["avg"] is None]
    note = f"\n(no results: {', '.join(missing)})" if missing and present else ""
    axes.set_title(f"Fig. 3: CLUB ablation{note}", fontsize=10)
    return _save(figure, path)


def mi_curves(curves: Optional[dict], path: Path) -> Path:
    """Lines: the CLUB MI estimate per layer against the step, the warm-start switch and threshold marked."""
    figure, axes = _figure()
    layers = (curves or {}).get("layers") or {}
    if layers:
        for index, (name, series) in enumerate(sorted(layers.items())):
            values = np.array([np.nan if v is None else v for v in series["mi"]], dtype=float)
            axes.plot(series["steps"], values, color=f"C{index}", linewidth=1.2,
                      marker="o" if len(values) < 30 else None, markersize=3,
                      label=f"layer {name[1:]} ({', '.join(series['modalities'])})")
        if curves.get("threshold") is not None:
            axes.axhline(curves["threshold"], color="grey", linestyle="--", linewidth=0.8, label="switch threshold")
        if curves.get("switch") is not None:
            axes.axvline(curves["switch"]["step"], color="C3", linestyle=":", linewidth=1.5,
                         label=f"layer 2 on (step {curves['switch']['step']})")
        axes.set_xlabel("step")
        axes.set_ylabel("CLUB MI estimate (nats, mean over modalities)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    else:
        _nothing(axes, "the MI curves")
    axes.set_title("CLUB MI per layer during SRCID training", fontsize=10)
    return _save(figure, path)
