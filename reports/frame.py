"""Every stored cell of a results directory as a pandas DataFrame, for notebooks.

One row per stored cell: its identity and settings, its status, epochs and seconds, and its validation and test
metrics as ``val_<metric>`` / ``test_<metric>`` columns. Rows come from the same join the report reads
(:func:`~.selection.load_results`), and the ``selected`` column marks the runs the report's tables average, so a
notebook can re-derive any table number::

    from grcn_bench.reports import results_frame

    frame = results_frame("results/paper")
    table2 = frame[frame.selected & (frame.group == "table2")]
    table2.groupby(["dataset", "label"])["test_recall@10"].agg(["mean", "std", "count"])

Successive halving's rungs (partial runs with no test metrics) are rows too, with ``stage == "rung"``; pass
``rungs=False`` to leave them out. ``in_search`` marks the cells the experiment's search trained (its runs and the
rungs it decided on), as opposed to leftovers of another search in the same directory. ``derived`` marks the
released-protocol runs that were derived from their standard twin's audit record instead of trained (docs/protocol.md,
"Protocol audit"); ``derived_from`` names that twin, and their ``seconds`` are the derivation's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from grcn_bench.benchmarks.store import ResultStore

from .selection import load_results, select

COLUMNS = ("cell_id", "label", "group", "model", "dataset", "stage", "protocol", "lr", "reg_weight", "seed",
           "max_epochs", "patience", "batch_size", "options", "status", "selected", "in_search", "derived",
           "derived_from", "best_epoch", "epochs_run", "seconds", "cpu_seconds", "test_seconds")


def results_frame(results_dir: str | Path, *, rungs: bool = True) -> pd.DataFrame:
    """The cells of ``results_dir`` as a DataFrame (see the module docstring for the columns).

    A cell that two groups requested (say Table 2 and Figure 4) has one row per group, as in the report; cells in
    the store that no group requested (rungs, or leftovers of an earlier grid) have ``group == ""``.
    """
    root = Path(results_dir)
    results = load_results(root)
    selected = {(run.cell_id, run.group, run.label) for selection in select(results.runs) for run in selection.runs}
    rows, seen = [], set()
    for run in results.runs:
        if run.result is None:
            continue
        seen.add(run.cell_id)
        rows.append(_row(run.cell, run.result, group=run.group, label=run.label,
                         selected=(run.cell_id, run.group, run.label) in selected))
    store = ResultStore(root)
    for cell_id in store.cell_ids():
        if cell_id in seen:
            continue
        result = store.read(cell_id)
        if result.get("cell", {}).get("rung") and not rungs:
            continue
        cell = result.get("cell", {})
        rows.append(_row(cell, result, group="", label=cell.get("label") or cell.get("model", ""), selected=False))
    # What the experiment's search trained: its finished runs and the rungs it decided on (other cells in the store
    # are leftovers, e.g. of a search with another schedule).
    searched = seen | set(results.search.get("rung_cells", []))
    for row in rows:
        row["in_search"] = row["cell_id"] in searched
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    metric_columns = sorted(c for c in frame.columns if c not in COLUMNS)
    return frame[[*COLUMNS, *metric_columns]]


def _row(cell: Mapping[str, Any], result: Mapping[str, Any], *, group: str, label: str,
         selected: bool) -> dict[str, Any]:
    settings = cell.get("settings", {})
    row: dict[str, Any] = {
        "cell_id": result.get("cell_id") or cell.get("cell_id"),
        "label": label,
        "group": group,
        "model": cell.get("model"),
        "dataset": cell.get("dataset"),
        "stage": "rung" if cell.get("rung") else "run",
        "protocol": settings.get("protocol", "standard"),
        "lr": settings.get("lr"),
        "reg_weight": settings.get("reg_weight"),
        "seed": settings.get("seed"),
        "max_epochs": settings.get("max_epochs"),
        "patience": settings.get("patience"),
        "batch_size": settings.get("batch_size"),
        "options": json.dumps(cell.get("options", {}), sort_keys=True),
        "status": result.get("status"),
        "selected": selected,
        "derived": bool(result.get("derived_from")),
        "derived_from": result.get("derived_from") or "",
        "best_epoch": result.get("best_epoch"),
        "epochs_run": result.get("epochs_run"),
        "seconds": result.get("seconds"),
        "cpu_seconds": result.get("cpu_seconds"),
        "test_seconds": result.get("test_seconds"),
    }
    for split in ("val", "test"):
        for name, value in (result.get(f"{split}_metrics") or {}).items():
            row[f"{split}_{name}"] = value
    return row
