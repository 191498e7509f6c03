"""Read a results directory and select hyper-parameters (docs/protocol.md, "Hyper-parameter selection"): what every
table and figure starts from.

A results directory holds ``experiment.json`` (every requested cell with its label and group, duplicates across
groups included) and one stored result per cell (``benchmarks/store.py``). :func:`load_results` joins the two **by
cell id**: a stored result's own label and group are those of whichever request ran it first, so they are not used
when ``experiment.json`` exists. Without it, the results' own cell dicts are used.

Selection, per configuration (label, model, options, dataset and every training setting except lr, λ and seed):

- the score of a grid point (lr, λ) is the mean over its seeds of Recall@10 on the **validation** split; under the
  released code's protocol (``official-grcn``, audit only) it is test Recall@10, because that is what the
  released code selects on;
- points are ranked first by how many of their seeds produced a usable result (a point where a seed failed is not
  compared on a smaller sample), then by score; ties keep the first point in grid order;
- the final numbers are the **test** metrics of the selected point: mean ± sample standard deviation over seeds.

Test metrics never enter the ranking under the standard protocol.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from grcn_bench.benchmarks.store import ResultStore

SELECTION_METRIC = "recall@10"
GRID_KEYS = ("lr", "reg_weight", "seed")


@dataclass(frozen=True)
class Run:
    """One requested cell joined with its stored result (``None`` while it has not run)."""

    cell: Mapping[str, Any]
    result: Mapping[str, Any] | None
    store: ResultStore = field(repr=False, compare=False)
    selection_seeds: tuple[int, ...] | None = None  # the seed policy of the search that produced it (None: all)

    @property
    def cell_id(self) -> str:
        return self.cell["cell_id"]

    @property
    def label(self) -> str:
        return self.cell.get("label") or self.cell["model"]

    @property
    def group(self) -> str:
        return self.cell.get("group") or "table2"

    @property
    def model(self) -> str:
        return self.cell["model"]

    @property
    def options(self) -> Mapping[str, Any]:
        return self.cell.get("options", {})

    @property
    def dataset(self) -> str:
        return self.cell["dataset"]

    @property
    def settings(self) -> Mapping[str, Any]:
        return self.cell["settings"]

    @property
    def protocol(self) -> str:
        return self.settings.get("protocol", "standard")

    @property
    def status(self) -> str:
        return "missing" if self.result is None else self.result["status"]

    @property
    def usable(self) -> bool:
        """A result with validation and test metrics (a diverged run whose best epoch was restored counts)."""
        return self.result is not None and bool(self.result.get("val_metrics")) and bool(
            self.result.get("test_metrics"))

    @property
    def card(self) -> Mapping[str, Any] | None:
        return None if self.result is None else self.result.get("dataset_card")

    def metric(self, split: str, name: str) -> float:
        return float(self.result[f"{split}_metrics"][name])

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-user arrays (and embeddings, when stored) of this cell's ``.npz``."""
        return self.store.read_arrays(self.cell_id)


@dataclass(frozen=True)
class Results:
    """A results directory: the experiment's description and every requested run."""

    root: Path
    name: str
    description: str
    report: Mapping[str, Any]
    runs: tuple[Run, ...]
    search: Mapping[str, Any] = field(default_factory=dict)

    @property
    def search_policy(self) -> str:
        """How the hyper-parameters were searched and which seeds selected them, in one sentence."""
        return self.search.get("policy") or "exhaustive grid; selected on the mean validation Recall@10 of every seed"

    def group(self, name: str) -> list[Run]:
        return [run for run in self.runs if run.group == name]

    def unique_runs(self) -> list[Run]:
        """One run per cell id (a cell requested by two groups ran once), in request order."""
        seen: dict[str, Run] = {}
        for run in self.runs:
            seen.setdefault(run.cell_id, run)
        return list(seen.values())


def load_results(results_dir: str | Path) -> Results:
    """Join ``experiment.json`` with the stored results by cell id (or use the results alone without it)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory {root} does not exist")
    store = ResultStore(root)
    manifest = root / "experiment.json"
    if manifest.is_file():
        experiment = json.loads(manifest.read_text())
        search = experiment.get("search") or {}
        chosen = search.get("selection_seed_list")
        chosen = tuple(int(seed) for seed in chosen) if search.get("selection_seeds") and chosen else None
        runs, seen = [], set()
        for cell in experiment.get("cells", []):
            key = (cell["cell_id"], cell.get("group"), cell.get("label"))
            if key in seen:
                continue
            seen.add(key)
            runs.append(Run(cell, store.read(cell["cell_id"]) if store.has(cell["cell_id"]) else None, store,
                            chosen))
        return Results(root, experiment.get("name", root.name), experiment.get("description", ""),
                       experiment.get("report", {}), tuple(_one_version_of_each_dataset(runs, root)), search)
    runs = []
    for result in store.results():
        cell = dict(result["cell"])
        cell.setdefault("cell_id", result.get("cell_id"))
        runs.append(Run(cell, result, store))
    return Results(root, root.name, "", {}, tuple(_one_version_of_each_dataset(runs, root)))


def _one_version_of_each_dataset(runs: list[Run], root: Path) -> list[Run]:
    """Refuse results of one dataset spec trained on different data (dataset digests): a report never mixes them."""
    digests: dict[str, dict[str, str]] = {}
    for run in runs:
        digest = (run.card or {}).get("digest")
        if digest:
            digests.setdefault(run.dataset, {}).setdefault(digest, run.cell_id)
    for spec, versions in digests.items():
        if len(versions) > 1:
            examples = ", ".join(f"{cell_id} (digest {digest})" for digest, cell_id in versions.items())
            raise ValueError(f"{root}: results for {spec} come from {len(versions)} versions of its data, e.g. "
                             f"{examples}; rerun the experiment with --force to retrain them on today's data")
    return runs


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_key(run: Run) -> tuple[str, str, str, str, str]:
    """What a selection is made within: everything about a cell except lr, λ and seed."""
    settings = {k: v for k, v in run.settings.items() if k not in GRID_KEYS}
    return (run.label, run.model, _canonical(run.options), run.dataset, _canonical(settings))


@dataclass(frozen=True)
class PointScore:
    """One grid point (lr, λ) of a configuration: its seeds, how many produced a usable result, their mean score."""

    lr: float
    reg_weight: float
    seeds: tuple[int, ...]
    usable: int
    score: float | None

    @property
    def rank_key(self) -> tuple[int, float]:
        return (self.usable, -np.inf if self.score is None else self.score)


@dataclass(frozen=True)
class Selection:
    """The selected grid point of one configuration and the test metrics of its seeds.

    ``runs`` are the usable runs of the selected point, by seed; empty when no point produced a usable result.
    """

    label: str
    model: str
    options: Mapping[str, Any]
    dataset: str
    protocol: str
    selection_split: str
    points: tuple[PointScore, ...]
    chosen: PointScore | None
    runs: tuple[Run, ...]
    requested: tuple[Run, ...] = field(repr=False)

    @property
    def ok(self) -> bool:
        return bool(self.runs)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(int(run.settings["seed"]) for run in self.runs)

    @property
    def card(self) -> Mapping[str, Any] | None:
        for run in (*self.runs, *self.requested):
            if run.card:
                return run.card
        return None

    def test_values(self, metric: str) -> np.ndarray:
        """The test value of ``metric`` of every selected seed."""
        return np.array([run.metric("test", metric) for run in self.runs], dtype=np.float64)

    def test_mean(self, metric: str) -> float | None:
        values = self.test_values(metric)
        return float(values.mean()) if values.size else None

    def test_std(self, metric: str) -> float | None:
        """Sample standard deviation over seeds (ddof = 1); 0 for a single seed."""
        values = self.test_values(metric)
        if not values.size:
            return None
        return float(values.std(ddof=1)) if values.size > 1 else 0.0

    def val_mean(self, metric: str) -> float | None:
        values = [run.metric("val", metric) for run in self.runs]
        return float(np.mean(values)) if values else None

    def per_user(self, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(users, values)``: the per-user test values of ``metric`` averaged over the selected seeds.

        Only users evaluated in every seed are kept (the same dataset gives the same users; this guards against
        mixing). ``None`` when a seed stored no per-user arrays.
        """
        return average_per_user([run.arrays() for run in self.runs], metric)

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)

    def edge_auc(self, side: str = "mean") -> tuple[float, float] | None:
        """Mean and sample std over seeds of the edge-weight ROC-AUC, if the runs measured it."""
        values = [run.result["edge_weight_auc"][side] for run in self.runs
                  if (run.result.get("edge_weight_auc") or {}).get(side) is not None]
        if not values:
            return None
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return float(np.mean(values)), std


def average_per_user(arrays: Sequence[Mapping[str, np.ndarray]], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Average ``test_<metric>`` over several runs, on the users that every run evaluated."""
    key = f"test_{metric}"
    if not arrays or any("test_users" not in a or key not in a for a in arrays):
        return None
    common = arrays[0]["test_users"]
    for a in arrays[1:]:
        common = np.intersect1d(common, a["test_users"])
    total = np.zeros(common.size, dtype=np.float64)
    for a in arrays:
        position = {int(u): k for k, u in enumerate(a["test_users"])}
        total += a[key][[position[int(u)] for u in common]]
    return common.astype(np.int64), total / len(arrays)


@dataclass(frozen=True)
class FixedRow:
    """A row that was not selected on a grid (a reference ranking such as popularity): one value per metric."""

    label: str
    dataset: str
    metrics: Mapping[str, float]
    users: np.ndarray | None = None
    per_user_values: Mapping[str, np.ndarray] = field(default_factory=dict)
    model: str = "reference"
    options: Mapping[str, Any] = field(default_factory=dict)
    protocol: str = "standard"
    ok: bool = True
    seeds: tuple[int, ...] = ()

    def test_mean(self, metric: str) -> float | None:
        return self.metrics.get(metric)

    def test_std(self, metric: str) -> float | None:
        return 0.0 if metric in self.metrics else None

    def per_user(self, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
        if self.users is None or metric not in self.per_user_values:
            return None
        return self.users, self.per_user_values[metric]


def _selection_split(protocol: str) -> str:
    # The released code picks its epoch and its hyper-parameters on test: reproduced for the audit only.
    return "val" if protocol == "standard" else "test"


def select(runs: Iterable[Run], *, metric: str = SELECTION_METRIC) -> list[Selection]:
    """One :class:`Selection` per configuration, in order of first appearance (see the module docstring)."""
    configs: dict[tuple, list[Run]] = {}
    for run in runs:
        configs.setdefault(config_key(run), []).append(run)
    return [select_config(group, metric=metric) for group in configs.values()]


def select_config(runs: Sequence[Run], *, metric: str = SELECTION_METRIC) -> Selection:
    """Select the grid point of one configuration's runs (all sharing :func:`config_key`)."""
    if len({config_key(run) for run in runs}) != 1:
        raise ValueError("select_config needs runs of one configuration (same label, model, options, dataset, "
                         "settings except lr, λ and seed)")
    first = runs[0]
    split = _selection_split(first.protocol)
    by_point: dict[tuple[float, float], list[Run]] = {}
    for run in runs:
        by_point.setdefault((float(run.settings["lr"]), float(run.settings["reg_weight"])), []).append(run)
    # Under a seed policy (docs/protocol.md) only the selection seeds rank the points; the others ran at the
    # selected point only and would favour it.
    chosen_seeds = first.selection_seeds
    points, usable_runs = [], {}
    for (lr, reg), point_runs in by_point.items():
        usable = sorted((r for r in point_runs if r.usable), key=lambda r: int(r.settings["seed"]))
        # Deduplicate seeds: the same cell requested twice in one group counts once.
        usable = list({r.cell_id: r for r in usable}.values())
        ranking = [r for r in usable if chosen_seeds is None or int(r.settings["seed"]) in chosen_seeds]
        score = float(np.mean([r.metric(split, metric) for r in ranking])) if ranking else None
        seeds = tuple(sorted({int(r.settings["seed"]) for r in point_runs}))
        points.append(PointScore(lr, reg, seeds, len(ranking), score))
        usable_runs[(lr, reg)] = tuple(usable)
    candidates = [p for p in points if p.usable]
    chosen = max(candidates, key=lambda p: p.rank_key) if candidates else None
    return Selection(
        label=first.label, model=first.model, options=dict(first.options), dataset=first.dataset,
        protocol=first.protocol, selection_split=split, points=tuple(points), chosen=chosen,
        runs=usable_runs[(chosen.lr, chosen.reg_weight)] if chosen else (), requested=tuple(runs),
    )
