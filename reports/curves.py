"""Figure 3 (metrics versus routing iterations T) and training curves (validation Recall@10 per
epoch), from selections (:mod:`grcn_bench.reports.selection`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .plotting import color_map, new_figure
from .tables import SHORT_TITLES, dataset_title

FIG3_METRICS = ("recall@10", "ndcg@10")


def _datasets(selections: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(s.dataset for s in selections))


def _card_of(selections: Sequence[Any], spec: str) -> Mapping[str, Any] | None:
    return next((s.card for s in selections if s.dataset == spec and s.card), None)


def routing_series(selections: Sequence[Any], *, default_iterations: int = 3
                   ) -> dict[str, dict[str, list[tuple[int, Any]]]]:
    """``{dataset: {label: [(T, selection), ...] sorted by T}}`` for the usable selections.

    T is the ``routing_iterations`` option, or ``default_iterations`` (the model's default) when a cell leaves it
    unset: a preset can thus share the default-T cell with Table 2.
    """
    out: dict[str, dict[str, list[tuple[int, Any]]]] = {}
    for s in selections:
        if not s.ok:
            continue
        t = int(s.option("routing_iterations", default_iterations))
        out.setdefault(s.dataset, {}).setdefault(s.label, []).append((t, s))
    for series in out.values():
        for points in series.values():
            points.sort(key=lambda point: point[0])
    return out


def routing_figure(selections: Sequence[Any], *, metrics: Sequence[str] = FIG3_METRICS,
                   default_iterations: int = 3) -> Figure:
    """Figure 3: one column per dataset, one row per metric; each label a line over T (mean ± std over seeds).

    A label with a single T (GRCN-ID run at the default T) is drawn as a horizontal dashed reference line.
    """
    series = routing_series(selections, default_iterations=default_iterations)
    if not series:
        raise ValueError("routing_figure: no usable selection to plot")
    datasets = [d for d in _datasets(selections) if d in series]
    colors = color_map([label for d in datasets for label in series[d]])
    figure, axes = new_figure(len(metrics), len(datasets))
    for column, dataset in enumerate(datasets):
        for row, metric in enumerate(metrics):
            ax = axes[row][column]
            for label, points in series[dataset].items():
                means = np.array([s.test_mean(metric) for _, s in points])
                stds = np.array([s.test_std(metric) for _, s in points])
                if len(points) == 1:
                    t = points[0][0]
                    ax.axhline(means[0], color=colors[label], linestyle="--", label=f"{label} (T={t})")
                    ax.axhspan(means[0] - stds[0], means[0] + stds[0], color=colors[label], alpha=0.12, lw=0)
                    continue
                ts = [t for t, _ in points]
                ax.errorbar(ts, means, yerr=stds, color=colors[label], marker="o", capsize=3, label=label)
                ax.set_xticks(ts)
            ax.set_xlabel("routing iterations T")
            ax.set_ylabel(f"test {SHORT_TITLES.get(metric, metric)}")
            if row == 0:
                ax.set_title(dataset_title(dataset, _card_of(selections, dataset)))
            ax.legend(fontsize="small")
    return figure


def training_curves_figure(selections: Sequence[Any], *, metric: str = "recall@10") -> Figure:
    """Validation ``metric`` per epoch, one panel per dataset, one colour per row label.

    Every seed of the selected point is drawn (the first solid and labelled, the others lighter); a dot marks each
    seed's best epoch (the restored state). Only standard-protocol selections are meaningful here: their history
    holds validation metrics.
    """
    usable = [s for s in selections if s.ok and s.selection_split == "val"]
    if not usable:
        raise ValueError("training_curves_figure: no usable standard-protocol selection to plot")
    datasets = _datasets(usable)
    colors = color_map([s.label for s in usable])
    columns = min(3, len(datasets))
    rows = -(-len(datasets) // columns)
    figure, axes = new_figure(rows, columns, panel_size=(4.6, 3.4))
    for index, dataset in enumerate(datasets):
        ax = axes[index // columns][index % columns]
        for s in (s for s in usable if s.dataset == dataset):
            for k, run in enumerate(s.runs):
                history = run.result.get("history") or []
                epochs = [h["epoch"] for h in history if metric in (h.get("metrics") or {})]
                values = [h["metrics"][metric] for h in history if metric in (h.get("metrics") or {})]
                if not epochs:
                    continue
                ax.plot(epochs, values, color=colors[s.label], alpha=1.0 if k == 0 else 0.35, lw=1.3,
                        label=s.label if k == 0 else None)
                best = run.result.get("best_epoch")
                if best in epochs:
                    ax.plot([best], [values[epochs.index(best)]], "o", color=colors[s.label], ms=4)
        ax.set_title(dataset_title(dataset, _card_of(usable, dataset)))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"validation {SHORT_TITLES.get(metric, metric)}")
        ax.legend(fontsize="x-small")
    for index in range(len(datasets), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    return figure
