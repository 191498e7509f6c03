"""Exhaustive grid against successive halving, per (model, dataset): the selected points, their validation
Recall@10, the seed-to-seed spread, and what each search trained (epochs and CPU seconds).

``grcn-bench compare-search GRID_DIR HALVING_DIR`` prints the table; ``docs/results.md`` holds today's numbers. Both
directories are results directories of the same grid (``GRID_DIR`` searched with ``--search grid``, ``HALVING_DIR``
with ``--search halving``); only the configurations both hold, under the standard protocol, are compared.

Halving's pick is *the same* as the grid's, or *within the spread* when the grid's pick beats it on the selection
seeds' validation Recall@10 by no more than the sample standard deviation over seeds of validation Recall@10 at
halving's point (which needs two or more seeds there), or *worse*.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .frame import results_frame
from .selection import Selection, load_results, select


def _selections(results_dir: Path) -> dict[tuple[str, str], Selection]:
    results = load_results(results_dir)
    return {(s.label, s.dataset): s for s in select(results.group("table2")) if s.protocol == "standard" and s.ok}


def _cost(frame: pd.DataFrame, label: str, dataset: str, seeds: set[int]) -> tuple[int, float]:
    """Epochs and CPU seconds every stored cell of ``(label, dataset)`` on ``seeds`` trained, rungs included (wall
    seconds for results stored before CPU time was recorded)."""
    rows = frame[(frame.label == label) & (frame.dataset == dataset) & (frame.protocol == "standard")
                 & frame.seed.isin(seeds)].drop_duplicates("cell_id")
    seconds = rows.cpu_seconds.fillna(rows.seconds).fillna(0)
    return int(rows.epochs_run.fillna(0).sum()), float(seconds.sum())


def compare_searches(grid_dir: str | Path, halving_dir: str | Path) -> pd.DataFrame:
    """One row per configuration both directories selected (see the module docstring)."""
    grid, halving = _selections(Path(grid_dir)), _selections(Path(halving_dir))
    grid_frame, halving_frame = results_frame(grid_dir), results_frame(halving_dir)
    rows = []
    for key in [k for k in grid if k in halving]:
        g, h = grid[key], halving[key]
        seeds = set(h.chosen.seeds) if h.chosen else set()
        selection_seeds = {int(run.settings["seed"]) for run in h.runs if run.selection_seeds is None
                           or int(run.settings["seed"]) in run.selection_seeds}
        spread_values = [run.metric("val", "recall@10") for run in h.runs]
        spread = float(np.std(spread_values, ddof=1)) if len(spread_values) > 1 else None
        # The grid's score of halving's point, on the same seeds: both picks judged by the exhaustive grid.
        halving_point = next((p for p in g.points if (p.lr, p.reg_weight) == (h.chosen.lr, h.chosen.reg_weight)),
                             None)
        gap = None if halving_point is None or halving_point.score is None else g.chosen.score - halving_point.score
        same = (g.chosen.lr, g.chosen.reg_weight) == (h.chosen.lr, h.chosen.reg_weight)
        verdict = "same" if same else ("within spread" if spread is not None and gap is not None and gap <= spread
                                       else "worse")
        grid_epochs, grid_cpu_seconds = _cost(grid_frame, *key, selection_seeds or seeds)
        halving_epochs, halving_cpu_seconds = _cost(halving_frame, *key, selection_seeds or seeds)
        rows.append({
            "label": key[0], "dataset": key[1],
            "grid_lr": g.chosen.lr, "grid_reg": g.chosen.reg_weight, "grid_val_recall@10": g.chosen.score,
            "halving_lr": h.chosen.lr, "halving_reg": h.chosen.reg_weight,
            "halving_val_recall@10": None if halving_point is None else halving_point.score,
            "seed_spread": spread, "verdict": verdict,
            "grid_epochs": grid_epochs, "halving_epochs": halving_epochs,
            "grid_cpu_seconds": grid_cpu_seconds, "halving_cpu_seconds": halving_cpu_seconds,
        })
    return pd.DataFrame(rows)


def totals(comparison: pd.DataFrame) -> dict[str, float]:
    """Epochs and seconds over every configuration, and their ratios (grid / halving)."""
    grid_epochs, halving_epochs = comparison.grid_epochs.sum(), comparison.halving_epochs.sum()
    grid_cpu_seconds, halving_cpu_seconds = comparison.grid_cpu_seconds.sum(), comparison.halving_cpu_seconds.sum()
    return {"grid_epochs": int(grid_epochs), "halving_epochs": int(halving_epochs),
            "epoch_ratio": float(grid_epochs / halving_epochs) if halving_epochs else float("nan"),
            "grid_cpu_seconds": float(grid_cpu_seconds), "halving_cpu_seconds": float(halving_cpu_seconds),
            "seconds_ratio": float(grid_cpu_seconds / halving_cpu_seconds) if halving_cpu_seconds else float("nan"),
            "same": int((comparison.verdict == "same").sum()),
            "within_spread": int((comparison.verdict == "within spread").sum()),
            "worse": int((comparison.verdict == "worse").sum())}
