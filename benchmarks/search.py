"""Hyper-parameter search over each configuration's lr x λ grid: exhaustive or successive halving, with a seed policy
and entries that reuse another entry's selection (``docs/protocol.md``, "Hyper-parameter search").

A *study* is one configuration (label, model, options, dataset, training settings) whose lr x λ points compete on
validation Recall@10. Its plan is a pure function of the store: :func:`plan_study` replays the search from the
results already stored and says which cells the next stage needs. So a search resumes after any interruption with the
same decisions: a rerun finds the same stored cells, takes the same decisions, and asks only for what is missing.
Stages run as rounds: every study's next stage is collected, the round runs on any executor (serial, process, Ray),
and the plans are replayed.

Successive halving here is synchronous: a rung's decision waits for every point of the rung. Asynchronous ASHA
(Optuna's ``SuccessiveHalvingPruner``, Ray Tune's ``ASHAScheduler``) promotes a trial as soon as it beats the
rungs seen so far, so its decisions depend on which trials happened to finish first: with two or more workers
they change from run to run, and a resumed run would not retrace them. Those libraries also keep the decisions in
their own storage rather than in the result store. The synchronous schedule is a few lines on top of the store and
is deterministic with every executor, which is what the resume guarantee needs; see ``docs/protocol.md``.

A rung is the first ``budget`` epochs of a run: training does not depend on ``max_epochs`` (no schedule), so a rung
is exactly the prefix of the finished run, early stopping included. Rungs restart from scratch instead of from a
checkpoint, so that the committed store (results, no checkpoints) is all a resumed search needs; the repeated
epochs count in the search's cost (``grcn-bench compare-search``).

For the protocol audit, the standard runs whose released-protocol twins the experiment asks for record the twin's
evaluation (:func:`audit_twins`), and a twin waits one round for its standard run (:func:`audit_round`), so that the
runner derives it from the record instead of training it (docs/protocol.md, "Protocol audit"). No decision here reads
the record.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import SELECTION_METRIC, Cell, Experiment, ModelEntry, SearchSettings
from .runner import CLAIMED, arrays_intact, official_from_twin
from .store import CorruptEntryError, ResultStore

Point = tuple[float, float]  # (lr, λ)


def base_dataset(spec: str) -> str:
    """The dataset a ``?k=v`` variation derives from (``synthetic:tiktok?noise=0.4`` -> ``synthetic:tiktok``)."""
    return spec.split("?", 1)[0]


@dataclass(frozen=True)
class Study:
    """One configuration whose grid is searched: an entry (at one sweep point) on one dataset.

    ``template`` holds everything but lr, λ and seed; ``points`` are in grid order (lr-major), which breaks ties.
    """

    template: Cell
    points: tuple[Point, ...]
    seeds: tuple[int, ...]
    search: SearchSettings

    @property
    def key(self) -> tuple[str, str, str]:
        """(label, dataset, protocol): what a ``tuned_from`` entry names, on its dataset and under its protocol."""
        return (self.template.label or self.template.model, self.template.dataset, self.template.settings.protocol)

    @property
    def selection_seeds(self) -> tuple[int, ...]:
        return self.seeds[: self.search.selection_seeds] if self.search.selection_seeds else self.seeds

    @property
    def other_seeds(self) -> tuple[int, ...]:
        return self.seeds[len(self.selection_seeds):]

    def cell(self, point: Point, seed: int, *, budget: int | None = None) -> Cell:
        """The cell of ``point`` and ``seed``: a finished run, or a rung of ``budget`` epochs."""
        lr, reg = point
        cell = self.template.with_settings(lr=lr, reg_weight=reg, seed=seed)
        if budget is None:
            return cell
        return dataclasses.replace(cell.with_settings(max_epochs=budget), final=False)


@dataclass(frozen=True)
class Rung:
    """One rung of successive halving: its budget, the points that trained it, their scores, who was kept."""

    budget: int
    points: tuple[Point, ...]
    scores: tuple[float, ...]
    kept: tuple[Point, ...]


@dataclass
class StudyPlan:
    """Where a study stands: the cells its next stage needs (``pending``), or its selected point when done.

    ``stage`` is ``"rungs"``, ``"survivors"`` (the points left train to early stopping on the selection seeds),
    ``"other seeds"`` (the selected point on the remaining seeds) or ``"done"``.
    """

    study: Study
    rungs: list[Rung] = field(default_factory=list)
    stage: str = "rungs"
    pending: list[Cell] = field(default_factory=list)
    finals: list[Cell] = field(default_factory=list)  # finished runs the report selects among
    selected: Point | None = None

    @property
    def done(self) -> bool:
        return self.stage == "done"


#: ``finished(cell_id)``: whether a cell's stored result counts for this run (see :func:`run_search`'s ``force``).
Finished = Callable[[str], bool]


def score(result: Mapping[str, Any] | None) -> float:
    """A stored run's selection score: its best selection-split Recall@10 (``-inf`` when it has none)."""
    if not result:
        return -math.inf
    value = (result.get("best_selection_metrics") or {}).get(SELECTION_METRIC)
    return -math.inf if value is None or not math.isfinite(value) else float(value)


def usable(result: Mapping[str, Any] | None) -> bool:
    """A finished run with validation and test metrics (the report's rule)."""
    return bool(result and result.get("val_metrics") and result.get("test_metrics"))


def mean_score(values: Iterable[float]) -> float:
    """The mean over seeds; ``-inf`` if any seed has no score (a point is never compared on fewer seeds)."""
    values = list(values)
    return -math.inf if not values or -math.inf in values else sum(values) / len(values)


def rank_points(points: Sequence[Point], scores: Sequence[float]) -> list[Point]:
    """Points from best to worst score; ties keep grid order (a stable sort)."""
    order = sorted(range(len(points)), key=lambda k: -scores[k])
    return [points[k] for k in order]


def _groups(points: Sequence[Point], search: SearchSettings) -> list[list[Point]]:
    """The points that compete with each other in a rung: all of them, or each learning rate's (``per_lr``)."""
    if not search.per_lr:
        return [list(points)]
    by_lr: dict[float, list[Point]] = {}
    for point in points:
        by_lr.setdefault(point[0], []).append(point)
    return list(by_lr.values())


def needs_rung(points: Sequence[Point], search: SearchSettings) -> bool:
    """Whether halving still has points to drop: some group holds more than ``survivors``."""
    return any(len(group) > search.survivors for group in _groups(points, search))


def promote(points: Sequence[Point], scores: Sequence[float], search: SearchSettings) -> list[Point]:
    """The points a rung keeps, in grid order: in each group the best ``ceil(n / eta)``, and at least ``survivors``."""
    score_of = dict(zip(points, scores, strict=True))
    kept: set[Point] = set()
    for group in _groups(points, search):
        keep = max(search.survivors, math.ceil(len(group) / search.eta))
        kept.update(rank_points(group, [score_of[p] for p in group])[:keep])
    return [p for p in points if p in kept]


def plan_study(study: Study, store: ResultStore, finished: Finished | None = None) -> StudyPlan:
    """Replay ``study``'s search from the store (see the module docstring)."""
    finished = finished or store.has
    plan = StudyPlan(study)
    search, seeds = study.search, study.selection_seeds

    def stored(cell: Cell) -> Mapping[str, Any] | None:
        return store.read(cell.cell_id) if store.has(cell.cell_id) else None

    def need(cells: list[Cell]) -> bool:
        plan.pending = [c for c in cells if not finished(c.cell_id)]
        return bool(plan.pending)

    alive = list(study.points)
    if search.method == "halving":
        budget = search.min_epochs
        while needs_rung(alive, search) and budget < study.template.settings.max_epochs:
            if need([study.cell(p, s, budget=budget) for p in alive for s in seeds]):
                return plan
            scores = [mean_score(score(stored(study.cell(p, s, budget=budget))) for s in seeds) for p in alive]
            kept = promote(alive, scores, search)
            plan.rungs.append(Rung(budget, tuple(alive), tuple(scores), tuple(kept)))
            alive = kept
            budget *= search.eta
    plan.stage = "survivors"
    plan.finals = [study.cell(p, s) for p in alive for s in seeds]
    if need(plan.finals):
        return plan
    scores = [mean_score(score(stored(study.cell(p, s))) for s in seeds) for p in alive]
    counts = [sum(usable(stored(study.cell(p, s))) for s in seeds) for p in alive]
    # The report's rule (reports/selection.py): most seeds with a usable result first, then the score, then grid order.
    best = min(range(len(alive)), key=lambda k: (-counts[k], -scores[k], k))
    plan.selected = alive[best]
    plan.stage = "other seeds"
    others = [study.cell(plan.selected, s) for s in study.other_seeds]
    plan.finals += others
    if need(others):
        return plan
    plan.stage = "done"
    return plan


@dataclass
class Plan:
    """An experiment's state: its studies' plans, the entries that reuse a selection, and the next round."""

    studies: list[StudyPlan]
    reused: list[Cell]  # cells of ``tuned_from`` entries whose source study is done
    reused_pending: list[Cell]
    waiting: list[tuple[str, str, str, dict[str, Any]]]  # (label, dataset, source label, options) still waiting

    @property
    def requests(self) -> list[Cell]:
        """The next round as requested: every study's next stage and the reused cells not run yet. A cell that two
        groups need (Table 2's and Figure 4's GAT) appears once per group."""
        return [c for plan in self.studies for c in plan.pending] + self.reused_pending

    @property
    def pending(self) -> list[Cell]:
        """The next round's cells, each once (the first request of each)."""
        cells: dict[str, Cell] = {}
        for cell in self.requests:
            cells.setdefault(cell.cell_id, cell)
        return list(cells.values())

    @property
    def done(self) -> bool:
        return all(plan.done for plan in self.studies) and not self.waiting and not self.reused_pending

    def requested(self) -> list[Cell]:
        """Every finished run the report reads (rungs are not among them), for ``experiment.json``."""
        return [c for plan in self.studies for c in plan.finals] + self.reused

    def rung_cells(self) -> list[Cell]:
        """Every rung the search has decided on or is running: with :meth:`requested`, what it trained."""
        decided = [plan.study.cell(point, seed, budget=rung.budget) for plan in self.studies for rung in plan.rungs
                   for point in rung.points for seed in plan.study.selection_seeds]
        running = [c for plan in self.studies for c in plan.pending if not c.final]
        return list({c.cell_id: c for c in decided + running}.values())


def _templates(experiment: Experiment, entry: ModelEntry) -> list[Cell]:
    """One cell per (dataset, sweep point) of ``entry``, at the grid's first point and seed."""
    single = dataclasses.replace(experiment, models=(entry,), lr=experiment.lr[:1], reg=experiment.reg[:1],
                                 seeds=experiment.seeds[:1])
    return single.cells()


def studies(experiment: Experiment) -> list[Study]:
    """The experiment's searched configurations, in entry order (entries with ``tuned_from`` search nothing)."""
    points = tuple((float(lr), float(reg)) for lr in experiment.lr for reg in experiment.reg)
    seeds = tuple(int(s) for s in experiment.seeds)
    return [Study(template, points, seeds, experiment.search)
            for entry in experiment.models if entry.tuned_from is None
            for template in _templates(experiment, entry)]


def plan_experiment(experiment: Experiment, store: ResultStore, finished: Finished | None = None) -> Plan:
    """Replay every study from the store and resolve the ``tuned_from`` entries whose source is done."""
    finished = finished or store.has
    plans = [plan_study(study, store, finished) for study in studies(experiment)]
    by_key: dict[tuple[str, str, str], StudyPlan] = {}
    for plan in plans:
        by_key.setdefault(plan.study.key, plan)
    reused, waiting = [], []
    for entry in experiment.models:
        if entry.tuned_from is None:
            continue
        for template in _templates(experiment, entry):
            dataset = base_dataset(template.dataset)
            # Under the entry's own protocol: the audit's standard rows take Table 2's point, never the point the
            # released protocol selected on test.
            source = by_key.get((entry.tuned_from, dataset, template.settings.protocol))
            if source is None:
                raise ValueError(
                    f"experiment {experiment.name!r}: entry {entry.label!r} takes its lr and λ from "
                    f"{entry.tuned_from!r} on {dataset}, but no searched entry has that label and dataset under "
                    f"the {template.settings.protocol} protocol")
            if not source.done:
                waiting.append((entry.label, template.dataset, entry.tuned_from, dict(template.options)))
                continue
            lr, reg = source.selected
            reused += [template.with_settings(lr=lr, reg_weight=reg, seed=int(s)) for s in experiment.seeds]
    return Plan(plans, reused, [c for c in reused if not finished(c.cell_id)], waiting)


def _fig4_sources(experiment: Experiment) -> set[tuple[str, str, str]]:
    """(label, dataset, protocol) of the studies whose finished runs the t-SNE figure (group fig4) reuses."""
    return {(entry.tuned_from, base_dataset(cell.dataset), cell.settings.protocol)
            for entry in experiment.models if entry.group == "fig4" and entry.tuned_from is not None
            for cell in _templates(experiment, entry)}


def _fig4_source_groups(experiment: Experiment) -> set[tuple[str, str, str, str]]:
    """The :func:`_fig4_sources` keys with the group of the searched entry behind each: Table 3, Figure 3 and the
    noise study label their rows like Table 2's ("GRCN") but reuse its point, so label and dataset alone would keep
    their embeddings too, megabytes each that nothing reads."""
    sources = _fig4_sources(experiment)
    return {(*study.key, study.template.group) for study in studies(experiment) if study.key in sources}


EMBEDDINGS = ("user_embedding", "item_embedding")


def keeps_embeddings(experiment: Experiment, cell: Cell) -> bool:
    """Whether ``cell`` must also store its final embeddings: the t-SNE figure's cells, and the finished runs on the
    first seed (the figure draws the selected point's first seed) of the searched studies it takes its point from,
    not the other entries that reuse that point. The selected point is not known until they have all run, and
    :func:`drop_unselected_embeddings` then drops the others'."""
    if cell.group == "fig4":
        return True
    return (cell.final and cell.settings.seed == experiment.seeds[0]
            and (cell.label or cell.model, base_dataset(cell.dataset), cell.settings.protocol, cell.group)
            in _fig4_source_groups(experiment))


def drop_unselected_embeddings(experiment: Experiment, store: ResultStore, plan: Plan) -> None:
    """Once a study the t-SNE figure draws from has selected its point, drop the embeddings of its other runs:
    they are megabytes each and nothing reads them."""
    sources = _fig4_sources(experiment)
    for study_plan in plan.studies:
        if study_plan.selected is None or study_plan.study.key not in sources:
            continue
        for cell in study_plan.finals:
            if (cell.settings.lr, cell.settings.reg_weight) != study_plan.selected and store.has(cell.cell_id):
                store.drop_arrays(cell.cell_id, EMBEDDINGS)


def standard_twin_id(cell: Cell) -> str | None:
    """The id of the standard-protocol run a released-protocol ``cell`` can be derived from (``None`` for a standard
    cell): the same cell, rung or finished run, under the standard protocol."""
    return None if cell.settings.protocol == "standard" else cell.with_settings(protocol="standard").cell_id


def audit_twins(experiment: Experiment) -> frozenset[str]:
    """Ids of the standard runs that record their released-protocol evaluation (docs/protocol.md, "Protocol
    audit"): the twins of every released-protocol cell the experiment may ask for (each searched point and seed,
    its halving rungs on the selection seeds, and every point of a reused entry, whose selection is not known yet).
    Other standard runs record nothing: the record costs one more full-ranking test evaluation per epoch."""
    official: list[Cell] = []
    for study in studies(experiment):
        if study.template.settings.protocol == "standard":
            continue
        official += [study.cell(p, s) for p in study.points for s in study.seeds]
        if study.search.method == "halving":
            rungs, _ = halving_rungs(study.points, study.search, study.template.settings.max_epochs)
            official += [study.cell(p, s, budget=budget) for _, budget in rungs for p in study.points
                         for s in study.selection_seeds]
    points = [(float(lr), float(reg)) for lr in experiment.lr for reg in experiment.reg]
    for entry in experiment.models:
        if entry.tuned_from is None:
            continue
        official += [template.with_settings(lr=lr, reg_weight=reg, seed=int(seed))
                     for template in _templates(experiment, entry) if template.settings.protocol != "standard"
                     for lr, reg in points for seed in experiment.seeds]
    return frozenset(twin for cell in official if (twin := standard_twin_id(cell)) is not None)


def audit_round(cells: Sequence[Cell], twins: frozenset[str]) -> list[Cell]:
    """A round's cells as they run: the standard twins in ``twins`` record the audit (``Cell.audit``, not part of
    their id), and a released-protocol cell whose twin is in the same round waits for the next one, where it can be
    derived from the twin's record instead of trained."""
    cells = [dataclasses.replace(c, audit=True) if c.cell_id in twins else c for c in cells]
    ids = {c.cell_id for c in cells}
    return [c for c in cells if standard_twin_id(c) not in ids]


def derivable(plan: Plan, store: ResultStore, data_digest: Callable[[str], str] | None = None
              ) -> tuple[list[Cell], list[Cell]]:
    """The next round's released-protocol cells that will be derived from a standard twin's audit record, not
    trained: those derivable now, and those whose audited twin runs in the same round first (they are derived if
    its record covers their stop, else trained)."""
    twins = {c.cell_id for c in plan.pending}
    now = [c for c in plan.pending if official_from_twin(c, store, data_digest) is not None]
    later = [c for c in plan.pending if c not in now and standard_twin_id(c) in twins]
    return now, later


def _current_digest(spec: str) -> str:
    from .runner import cached_dataset

    return str(cached_dataset(spec).card.digest())


class StaleResultsError(ValueError):
    """Stored results were trained on other data than their dataset spec now gives."""

    def __init__(self, store: ResultStore, stale: Mapping[str, tuple[str, str, str]]):
        examples = sorted(stale)[:3]
        spec, stored, now = stale[examples[0]]
        super().__init__(
            f"{store.root}: {len(stale)} stored cell(s) were trained on other data than their dataset has now "
            f"({spec}: digest {stored} then, {now} now), e.g. {', '.join(examples)}; nothing was reused or run. "
            "Rerun with --force to retrain them, or point --out elsewhere.")
        self.cells = dict(stale)


def run_search(
    experiment: Experiment,
    store: ResultStore,
    run_round: Callable[[list[Cell], frozenset[str]], list[dict[str, Any]]],
    *,
    force: bool = False,
    retry_failed: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    data_digest: Callable[[str], str] | None = None,
    claim_poll_seconds: float = 5.0,
) -> tuple[Plan, list[dict[str, Any]]]:
    """Run ``experiment``'s search round by round until every study and reused entry is done.

    Args:
        run_round: runs a list of cells (every one of them, stored or not) with the ids that keep embeddings, and
            returns their results: :func:`.executors.run_grid` with ``force=True`` and the user's executor.
        force: rerun every cell the search needs, once in this call.
        retry_failed: rerun the cells stored as failed, once in this call.
        on_plan: called with the plan before every round and at the end (the CLI writes ``experiment.json``).
        data_digest: the current digest of a dataset spec (default: its dataset card's, loaded once per process).
            A stored result whose dataset digest differs is never reused: :class:`StaleResultsError` names it.
        claim_poll_seconds: when every cell of a round is being trained by another runner on the same directory
            (status ``claimed``), how long to wait before looking again; their results are then reused.

    Returns:
        The final plan and the results of every cell that ran.
    """
    data_digest = data_digest or _current_digest
    digests: dict[str, str] = {}
    ran: set[str] = set()
    stale: dict[str, tuple[str, str, str]] = {}  # cell id -> (dataset, stored digest, current digest)

    def finished(cell_id: str) -> bool:
        if cell_id in ran:
            return True
        if not store.has(cell_id) or force:
            return False
        try:
            result = store.read(cell_id)
        except CorruptEntryError:
            if retry_failed:  # a damaged entry is a failure too: rerun it
                return False
            raise
        if retry_failed and (result.get("status") == "failed" or not arrays_intact(store, cell_id)):
            return False  # a damaged .npz too
        stored = (result.get("dataset_card") or {}).get("digest")
        spec = (result.get("cell") or {}).get("dataset")
        if stored and spec:
            if spec not in digests:  # once per spec and call: loading a dataset can take seconds
                digests[spec] = data_digest(spec)
            if stored != digests[spec]:
                stale[cell_id] = (spec, stored, digests[spec])
        return True

    results: list[dict[str, Any]] = []
    twins = audit_twins(experiment)
    while True:
        plan = plan_experiment(experiment, store, finished)
        if stale:
            raise StaleResultsError(store, stale)
        drop_unselected_embeddings(experiment, store, plan)
        if on_plan is not None:
            on_plan(plan)
        todo = audit_round([c for c in plan.pending if c.cell_id not in ran], twins)
        if not todo:
            return plan, results
        keep = frozenset(c.cell_id for c in plan.requests if keeps_embeddings(experiment, c))
        outcomes = run_round(todo, keep)
        claimed = {r["cell_id"] for r in outcomes if r.get("status") == CLAIMED}
        results += [r for r in outcomes if r.get("status") != CLAIMED]
        ran.update(c.cell_id for c in todo if c.cell_id not in claimed)
        if claimed and len(claimed) == len(todo):  # all in another runner's hands: wait for its results
            time.sleep(claim_poll_seconds)


@dataclass(frozen=True)
class Estimate:
    """Epochs a search trains from an empty store: rungs exactly (at most; early stopping can end a rung sooner),
    finished runs at ``epochs_per_run`` each (an assumption, see :func:`estimate`) and at most ``max_epochs``."""

    rung_cells: int
    rung_epochs: int
    runs: int
    epochs_per_run: float
    max_epochs_per_run: int
    assumption: str

    @property
    def epochs(self) -> float:
        return self.rung_epochs + self.runs * self.epochs_per_run

    @property
    def max_epochs(self) -> int:
        return self.rung_epochs + self.runs * self.max_epochs_per_run


def halving_rungs(points: Sequence[Point], search: SearchSettings, max_epochs: int
                  ) -> tuple[list[tuple[int, int]], int]:
    """(points, budget) of every rung halving trains on ``points``, and how many points survive them to train to
    early stopping (the same arithmetic as :func:`plan_study`, whatever the scores)."""
    rungs, budget, alive = [], search.min_epochs, list(points)
    while needs_rung(alive, search) and budget < max_epochs:
        rungs.append((len(alive), budget))
        alive = promote(alive, [0.0] * len(alive), search)  # how many survive does not depend on the scores
        budget *= search.eta
    return rungs, len(alive)


def estimate(experiment: Experiment, store: ResultStore | None = None) -> Estimate:
    """What the whole search trains from scratch. A finished run's epochs are estimated by the mean ``epochs_run``
    of the finished runs already in ``store`` when there are any (the mean, not the median: the total is what is
    estimated, and runs at a small learning rate make a long tail), else by ``min(max_epochs, 4 x patience)``."""
    rung_cells = rung_epochs = runs = 0
    max_per_run = 0
    unique = {study.template.cell_id: study for study in studies(experiment)}  # a study two groups ask for runs once
    for study in unique.values():
        settings = study.template.settings
        max_per_run = max(max_per_run, settings.max_epochs)
        points, chosen = len(study.points), len(study.selection_seeds)
        if study.search.method == "halving":
            rungs, points = halving_rungs(study.points, study.search, settings.max_epochs)
            rung_cells += sum(count * chosen for count, _ in rungs)
            rung_epochs += sum(count * chosen * budget for count, budget in rungs)
        runs += points * chosen + len(study.other_seeds)
    # A reused entry whose options equal its source's (Table 3's GRCN row, the t-SNE figure's) is the source's
    # selected point: nothing more to train.
    runs += sum(len(experiment.seeds) for entry in experiment.models if entry.tuned_from is not None
                for cell in _templates(experiment, entry) if cell.cell_id not in unique)
    finished = [int(r.get("epochs_run") or 0) for r in (store.results() if store else ())
                if r.get("status") == "ok" and not r.get("cell", {}).get("rung")]
    if finished:
        per_run = sum(finished) / len(finished)
        assumption = f"mean epochs of the {len(finished)} finished runs in the store"
    else:
        patience = max((s.template.settings.patience for s in studies(experiment)), default=20)
        per_run = float(min(max_per_run or 1000, 4 * patience))
        assumption = "no finished run stored yet: 4 x patience epochs per run"
    return Estimate(rung_cells, rung_epochs, runs, per_run, max_per_run, assumption)
