"""Shared figure plumbing: figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot, so no global
figure registry and no interactive backend: rendering uses Agg whatever the session's backend is), styled with
seaborn's theme, and saved as PNG and PDF side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

STYLE = "whitegrid"
DPI = 150


def new_figure(rows: int, columns: int, *, panel_size: tuple[float, float] = (4.2, 3.2),
               sharex: bool = False, sharey: bool = False) -> tuple[Figure, list[list]]:
    """A figure with a ``rows x columns`` grid of axes (always a nested list, even for one panel)."""
    import seaborn as sns  # imported when a figure is drawn: it costs seconds and tables do not need it

    with sns.axes_style(STYLE):
        figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(rows, columns, squeeze=False, sharex=sharex, sharey=sharey)
    return figure, [list(row) for row in axes]


def palette(count: int) -> list[tuple[float, float, float]]:
    """``count`` distinguishable colours (seaborn's colour-blind palette, extended with husl beyond 10)."""
    import seaborn as sns

    return sns.color_palette("colorblind", count) if count <= 10 else sns.color_palette("husl", count)


def save_figure(figure: Figure, stem: Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf``; returns both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        figure.savefig(path, dpi=DPI)
    return paths


def color_map(labels: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One stable colour per label, in the given order."""
    unique = list(dict.fromkeys(labels))
    return dict(zip(unique, palette(len(unique)), strict=True))
