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

from grcn_bench.benchmarks.config import SearchSettings
from grcn_bench.benchmarks.search import halving_rungs, promote

from .frame import results_frame
from .selection import Selection, load_results, select


def _selections(results_dir: Path) -> dict[tuple[str, str], Selection]:
    results = load_results(results_dir)
    return {(s.label, s.dataset): s for s in select(results.group("table2")) if s.protocol == "standard" and s.ok}


def _cost(frame: pd.DataFrame, label: str, dataset: str, seeds: set[int]) -> tuple[int, float]:
    """Epochs and CPU seconds every stored cell of ``(label, dataset)`` on ``seeds`` trained, rungs included (wall
    seconds for results stored before CPU time was recorded)."""
    rows = frame[(frame.label == label) & (frame.dataset == dataset) & (frame.protocol == "standard")
                 & frame.seed.isin(seeds) & frame.in_search].drop_duplicates("cell_id")
    seconds = rows.cpu_seconds.fillna(rows.seconds).fillna(0)
    return int(rows.epochs_run.fillna(0).sum()), float(seconds.sum())


def compare_searches(grid_dir: str | Path, halving_dir: str | Path) -> pd.DataFrame:
    """One row per configuration both directories selected, the grid's every point finished (see the module
    docstring)."""
    grid, halving = _selections(Path(grid_dir)), _selections(Path(halving_dir))
    grid_frame, halving_frame = results_frame(grid_dir), results_frame(halving_dir)
    rows = []
    for key in [k for k in grid if k in halving]:
        g, h = grid[key], halving[key]
        if not all(point.usable for point in g.points):  # the grid is still running: nothing to compare yet
            continue
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


def replay_halving(grid_dir: str | Path, search: SearchSettings, *, spreads: dict[tuple[str, str], float] | None = None,
                   ) -> pd.DataFrame:
    """What halving with ``search``'s schedule would have picked and trained, replayed from an exhaustive grid's
    histories (of its first seed) at no training cost.

    A rung of ``b`` epochs is the first ``b`` epochs of the finished run (``docs/protocol.md``, "Hyper-parameter
    search"), so its score is the best validation Recall@10 of the run's first ``b`` epochs and it trains
    ``min(b, epochs_run)`` epochs. The survivors' runs are the grid's own. One row per configuration whose grid
    finished, judged as in :func:`compare_searches` with ``spreads[(label, dataset)]`` as the seed spread.
    """
    rows = []
    for (label, dataset), g in _selections(Path(grid_dir)).items():
        if not all(point.usable for point in g.points):
            continue
        first_seed = min(int(r.settings["seed"]) for r in g.requested)
        runs = {(float(r.settings["lr"]), float(r.settings["reg_weight"])): r for r in g.requested
                if r.usable and int(r.settings["seed"]) == first_seed}
        points = [(p.lr, p.reg_weight) for p in g.points]
        curves = {point: [h["metrics"]["recall@10"] for h in runs[point].result["history"]] for point in points}
        alive, epochs = list(points), 0
        rungs, _ = halving_rungs(points, search, int(g.requested[0].settings["max_epochs"]))
        for _, budget in rungs:
            scores = [max(curves[p][:budget]) for p in alive]
            epochs += sum(min(budget, len(curves[p])) for p in alive)
            alive = promote(alive, scores, search)
        epochs += sum(len(curves[p]) for p in alive)
        finals = [max(curves[p]) for p in alive]
        pick = alive[max(range(len(alive)), key=lambda k: (finals[k], -k))]
        best = (g.chosen.lr, g.chosen.reg_weight)
        gap = g.chosen.score - max(curves[pick])
        spread = (spreads or {}).get((label, dataset))
        verdict = "same" if pick == best else ("within spread" if spread is not None and gap <= spread else "worse")
        rows.append({"label": label, "dataset": dataset, "pick_lr": pick[0], "pick_reg": pick[1], "gap": gap,
                     "verdict": verdict, "epochs": epochs,
                     "grid_epochs": sum(len(curves[p]) for p in points)})
    return pd.DataFrame(rows)
