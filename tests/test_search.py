"""Hyper-parameter search: successive halving's decisions against hand-worked cases, the seed policy, entries that
reuse another's selection, the report's selection under a seed policy, and end to end on synthetic:tiny (a rung is
the prefix of its finished run; a SIGKILL then a rerun gives the uninterrupted result; the process executor agrees).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from grcn_bench.benchmarks import cli
from grcn_bench.benchmarks.config import (
    Cell,
    Experiment,
    ModelEntry,
    SearchSettings,
    TrainSettings,
    experiment_from_dict,
    load_experiment,
)
from grcn_bench.benchmarks.executors import run_grid
from grcn_bench.benchmarks.search import (
    Study,
    base_dataset,
    estimate,
    halving_rungs,
    plan_experiment,
    plan_study,
    rank_points,
    run_search,
)
from grcn_bench.benchmarks.store import ResultStore
from grcn_bench.reports.selection import load_results, select

REPO = Path(__file__).resolve().parents[1]
LRS, REGS = (1e-3, 1e-2, 3e-2), (1e-4, 1e-2)
POINTS = tuple((lr, reg) for lr in LRS for reg in REGS)


def fake_result(cell: Cell, val: float, *, test: float = 0.5, status: str = "ok") -> dict:
    """A stored result as the runner writes it, with chosen validation and test Recall@10."""
    epochs = cell.settings.max_epochs if not cell.final else 7
    return {"cell": cell.to_dict(), "cell_id": cell.cell_id, "status": status, "epochs_run": epochs,
            "best_selection_metrics": {"recall@10": val},
            "val_metrics": {"recall@10": val} if status == "ok" else None,
            "test_metrics": {"recall@10": test} if cell.final and status == "ok" else None}


def study(seeds=(0,), **search) -> Study:
    template = Cell("mf", "synthetic:tiny", TrainSettings(max_epochs=100, patience=5), label="BPR-MF")
    return Study(template, POINTS, tuple(seeds), SearchSettings(method="halving", per_lr=False, **search))


# ------------------------------------------------------------------------------ the schedule, hand-worked


def test_halving_keeps_the_best_third_per_rung_then_trains_the_survivors():
    store = ResultStore(Path("/nonexistent-never-written"))
    s = study(min_epochs=2, eta=3, survivors=1)
    plan = plan_study(s, store)
    # Rung 1: every point, 2 epochs, no test.
    assert plan.stage == "rungs" and len(plan.pending) == 6
    assert all(not c.final and c.settings.max_epochs == 2 for c in plan.pending)
    assert [(c.settings.lr, c.settings.reg_weight) for c in plan.pending] == list(POINTS)


def test_halving_decisions_replayed_from_the_store(tmp_path):
    store = ResultStore(tmp_path)
    s = study(min_epochs=2, eta=3, survivors=1)
    # Rung 1 scores by point: keep ceil(6 / 3) = 2, the two best: (1e-2, 1e-4) and (3e-2, 1e-2).
    rung1 = dict(zip(POINTS, (0.10, 0.20, 0.40, 0.05, 0.30, 0.35), strict=True))
    for point, val in rung1.items():
        cell = s.cell(point, 0, budget=2)
        store.write(cell.cell_id, fake_result(cell, val))
    plan = plan_study(s, store)
    assert [r.kept for r in plan.rungs] == [((1e-2, 1e-4), (3e-2, 1e-2))]
    assert plan.stage == "rungs" and {c.settings.max_epochs for c in plan.pending} == {6}
    # Rung 2 (6 epochs): the later point wins; one survivor left, trained to early stopping.
    for point, val in (((1e-2, 1e-4), 0.41), ((3e-2, 1e-2), 0.45)):
        cell = s.cell(point, 0, budget=6)
        store.write(cell.cell_id, fake_result(cell, val))
    plan = plan_study(s, store)
    assert plan.rungs[1].kept == ((3e-2, 1e-2),)
    assert plan.stage == "survivors" and [c.final for c in plan.pending] == [True]
    assert plan.pending[0].settings.max_epochs == 100
    cell = plan.pending[0]
    store.write(cell.cell_id, fake_result(cell, 0.5))
    plan = plan_study(s, store)
    assert plan.done and plan.selected == (3e-2, 1e-2)


def test_ties_keep_grid_order_and_a_failed_point_ranks_last():
    assert rank_points(POINTS[:3], (0.2, 0.2, 0.3)) == [POINTS[2], POINTS[0], POINTS[1]]
    assert rank_points(POINTS[:2], (-math.inf, 0.0)) == [POINTS[1], POINTS[0]]


def test_selection_seeds_rank_on_their_mean_and_other_seeds_run_at_the_selected_point(tmp_path):
    store = ResultStore(tmp_path)
    s = study(seeds=(0, 1, 2), selection_seeds=2, min_epochs=2, survivors=2)
    plan = plan_study(s, store)
    assert {c.settings.seed for c in plan.pending} == {0, 1}  # seed 2 never runs a rung
    # Mean over seeds 0 and 1: (1e-3, 1e-4) has the best seed-0 score but the worse mean.
    vals = {POINTS[0]: (0.9, 0.1), POINTS[1]: (0.6, 0.6), POINTS[2]: (0.5, 0.55)}
    for point in POINTS:
        for seed in (0, 1):
            cell = s.cell(point, seed, budget=2)
            store.write(cell.cell_id, fake_result(cell, vals.get(point, (0.0, 0.0))[seed]))
    plan = plan_study(s, store)
    assert plan.rungs[0].kept == (POINTS[1], POINTS[2])  # means 0.6 and 0.525 beat 0.5
    for cell in plan.pending:
        store.write(cell.cell_id, fake_result(cell, 0.7 if cell.settings.lr == POINTS[2][0] else 0.6))
    plan = plan_study(s, store)
    assert plan.selected == POINTS[2] and plan.stage == "other seeds"
    assert [(c.settings.lr, c.settings.reg_weight, c.settings.seed) for c in plan.pending] == [(*POINTS[2], 2)]


def test_selection_never_reads_test_metrics(tmp_path):
    """The planner picks the same point whatever the stored test metrics say."""
    chosen = []
    for test_values in ((0.1, 0.9), (0.9, 0.1)):
        store = ResultStore(tmp_path / str(test_values))
        s = Study(study().template, POINTS[:2], (0,), SearchSettings())
        for point, val, test in zip(POINTS[:2], (0.3, 0.2), test_values, strict=True):
            cell = s.cell(point, 0)
            store.write(cell.cell_id, fake_result(cell, val, test=test))
        chosen.append(plan_study(s, store).selected)
    assert chosen == [POINTS[0], POINTS[0]]


def test_the_schedule_arithmetic_of_the_paper_grid():
    search = SearchSettings(method="halving", survivors=2, per_lr=False)  # min 10 epochs, eta 3
    grid = [(lr, reg) for lr in (1e-4, 1e-3, 1e-2) for reg in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)]
    assert halving_rungs(grid, search, 1000) == ([(15, 10), (5, 30)], 2)
    assert halving_rungs(grid[:2], search, 1000) == ([], 2)
    assert halving_rungs(grid, search, 20) == ([(15, 10)], 5)  # the budget reached max_epochs: 5 points finish
    # Within each lr: 5 λ -> 2 per lr after one rung (ceil(5 / 3)); with one survivor per lr, 5 -> 2 -> 1.
    assert halving_rungs(grid, SearchSettings(method="halving"), 1000) == ([(15, 10)], 6)  # the default
    assert halving_rungs(grid, SearchSettings(method="halving", survivors=1), 1000) == ([(15, 10), (6, 30)], 3)


def test_estimate_counts_rungs_runs_and_other_seeds():
    experiment = Experiment("t", (ModelEntry("mf", "BPR-MF"),), ("synthetic:tiny",), seeds=(0, 1, 2), lr=LRS,
                            reg=REGS, train={"patience": 5},
                            search=SearchSettings(method="halving", selection_seeds=1, min_epochs=2, survivors=1,
                                                  per_lr=False))
    guess = estimate(experiment)
    # Rungs: 6 points x 2 epochs, then 2 x 6; one survivor on seed 0, then seeds 1 and 2.
    assert (guess.rung_cells, guess.rung_epochs, guess.runs) == (8, 24, 3)
    assert guess.epochs == 24 + 3 * 20 and "4 x patience" in guess.assumption

    class Stored:  # finished runs of 10, 10 and 100 epochs, and a rung that must not count
        def results(self):
            runs = [{"status": "ok", "epochs_run": n, "cell": {}} for n in (10, 10, 100)]
            return runs + [{"status": "ok", "epochs_run": 500, "cell": {"rung": True}}]

    guess = estimate(experiment, Stored())
    # The mean (40), not the median (10): the estimate is of a total, and slow runs make a long tail.
    assert guess.epochs_per_run == 40 and guess.epochs == 24 + 3 * 40 and "mean epochs of the 3" in guess.assumption


# ------------------------------------------------------------------------------ tuned once, reused


def reuse_experiment(**search) -> Experiment:
    return Experiment(
        "t",
        (ModelEntry("mf", "BPR-MF"),
         ModelEntry("mf", "BPR-MF-wide", options={"embedding_dim": 32}, group="table3", tuned_from="BPR-MF"),
         ModelEntry("mf", "BPR-MF", group="noise", tuned_from="BPR-MF",
                    datasets=("synthetic:tiny?noise=0.4",))),
        ("synthetic:tiny",), seeds=(0, 1), lr=LRS[:2], reg=REGS[:1], train={"max_epochs": 4, "patience": 2},
        search=SearchSettings(**search))


def test_reused_entries_wait_for_their_source_then_take_its_point(tmp_path):
    experiment, store = reuse_experiment(), ResultStore(tmp_path)
    plan = plan_experiment(experiment, store)
    assert [w[0] for w in plan.waiting] == ["BPR-MF-wide", "BPR-MF"] and not plan.reused
    assert {c.label for c in plan.pending} == {"BPR-MF"}  # only the source's grid runs in the first round
    for cell in plan.pending:
        store.write(cell.cell_id, fake_result(cell, 0.2 if cell.settings.lr == LRS[1] else 0.1))
    plan = plan_experiment(experiment, store)
    assert not plan.waiting
    assert {(c.label, c.dataset, c.settings.lr, c.settings.seed) for c in plan.pending} == {
        ("BPR-MF-wide", "synthetic:tiny", LRS[1], 0), ("BPR-MF-wide", "synthetic:tiny", LRS[1], 1),
        ("BPR-MF", "synthetic:tiny?noise=0.4", LRS[1], 0), ("BPR-MF", "synthetic:tiny?noise=0.4", LRS[1], 1)}
    assert base_dataset("synthetic:tiny?noise=0.4") == "synthetic:tiny"


def test_a_reused_entry_without_a_source_is_refused_by_name(tmp_path):
    experiment = Experiment("t", (ModelEntry("mf", "X", tuned_from="GRCN"),), ("synthetic:tiny",))
    with pytest.raises(ValueError, match=r"entry 'X' takes its lr and λ from 'GRCN' on synthetic:tiny"):
        plan_experiment(experiment, ResultStore(tmp_path))


def test_search_settings_and_tuned_from_parse_from_toml_and_bad_values_are_refused():
    experiment = experiment_from_dict({
        "models": [{"name": "mf"}, {"name": "mf", "label": "Y", "tuned_from": "mf"}], "datasets": ["synthetic:tiny"],
        "search": {"method": "halving", "selection_seeds": 1, "eta": 2}}, name="x")
    assert experiment.search == SearchSettings(method="halving", selection_seeds=1, eta=2)
    assert experiment.models[1].tuned_from == "mf"
    with pytest.raises(ValueError, match=r"unknown key 'search.rungs'"):
        experiment_from_dict({"models": [{"name": "mf"}], "datasets": ["d"], "search": {"rungs": 3}}, name="x")
    for bad in ({"method": "random"}, {"eta": 1}, {"selection_seeds": 0}, {"survivors": 0}):
        with pytest.raises(ValueError):
            SearchSettings(**bad)


def test_the_paper_preset_lists_its_cells_and_an_estimate(capsys):
    code = cli.main(["run", "paper", "--dry-run", "--out", "/nonexistent-dry-run"])
    out, err = capsys.readouterr()
    assert code == 0 and "successive halving" in out
    assert "# waiting Visual {\"modalities\": [\"v\"]}  synthetic:tiktok: takes lr and λ from GRCN's selection" in out
    assert '# waiting GRCN {"routing_iterations": 0}  synthetic:kwai' in out
    assert "rung 10ep" in out and "runs to early stopping, about" in err
    experiment = load_experiment("paper")
    assert {e.group for e in experiment.models} == {"table2", "table3", "fig3", "fig4", "noise", "audit"}
    assert all(e.tuned_from for e in experiment.models if e.group in {"table3", "fig3", "fig4", "noise"})


# ------------------------------------------------------------------------------ the report under a seed policy


def test_the_report_selects_on_the_selection_seeds_only(tmp_path):
    """Seed 1 ran at the selected point only: its high score must not count, and its test metrics must."""
    store = ResultStore(tmp_path)
    template = Cell("mf", "synthetic:tiny", TrainSettings(), label="BPR-MF")
    rows = [(1e-3, 0, 0.30, 0.1), (1e-2, 0, 0.31, 0.2), (1e-2, 1, 0.05, 0.4)]
    cells = []
    for lr, seed, val, test in rows:
        cell = template.with_settings(lr=lr, seed=seed)
        store.write(cell.cell_id, fake_result(cell, val, test=test))
        cells.append(cell)
    search = {"method": "grid", "selection_seeds": 1, "selection_seed_list": [0], "policy": "seed 0 selects"}
    store.write_json("experiment.json", {"name": "t", "cells": [c.to_dict() for c in cells], "search": search})
    results = load_results(tmp_path)
    [selection] = select(results.runs)
    # All seeds would pick 1e-3 (0.30 against mean(0.31, 0.05) = 0.18); seed 0 alone picks 1e-2.
    assert (selection.chosen.lr, selection.chosen.score) == (1e-2, 0.31)
    assert selection.seeds == (0, 1) and selection.test_mean("recall@10") == pytest.approx(0.3)
    assert results.search_policy == "seed 0 selects"


# ------------------------------------------------------------------------------ end to end on synthetic:tiny

TINY = ["--models", "mf", "--datasets", "synthetic:tiny", "--lr", "1e-3", "1e-2", "3e-2", "--reg", "1e-4", "1e-2",
        "--seeds", "0", "1", "--search", "halving", "--selection-seeds", "1", "--min-epochs", "2", "--survivors", "1",
        "--no-per-lr", "--max-epochs", "12", "--patience", "3", "--no-progress"]


def main_one_thread(argv: list[str]) -> int:
    """``cli.main`` with one torch thread, as the subprocess and worker runs compared with it use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(argv)
    finally:
        torch.set_num_threads(threads)


def outcome(result: dict) -> dict:
    history = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in result["history"]]
    keys = ("status", "best_epoch", "epochs_run", "test_metrics", "val_metrics", "best_selection_metrics")
    return {**{k: result[k] for k in keys}, "history": history}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("halving")
    assert main_one_thread(["run", *TINY, "--out", str(out)]) == 0
    return ResultStore(out)


def test_halving_on_tiny_trains_stores_and_reports(uninterrupted):
    manifest = json.loads((uninterrupted.root / "experiment.json").read_text())
    assert manifest["search"]["complete"] and manifest["search"]["method"] == "halving"
    rungs = [r for r in uninterrupted.results() if r["cell"].get("rung")]
    finals = [r for r in uninterrupted.results() if not r["cell"].get("rung")]
    assert len(rungs) == 6 + 2 and all(r["test_metrics"] is None for r in rungs)
    assert len(finals) == 2 and {r["cell"]["settings"]["seed"] for r in finals} == {0, 1}
    assert len({(r["cell"]["settings"]["lr"], r["cell"]["settings"]["reg_weight"]) for r in finals}) == 1
    # A rung is the prefix of its finished run: same losses and validation metrics, epoch for epoch.
    final = next(r for r in finals if r["cell"]["settings"]["seed"] == 0)
    point = (final["cell"]["settings"]["lr"], final["cell"]["settings"]["reg_weight"])
    rung = next(r for r in rungs if r["cell"]["settings"]["max_epochs"] == 6
                and (r["cell"]["settings"]["lr"], r["cell"]["settings"]["reg_weight"]) == point)
    strip = [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in rung["history"]]
    assert strip == [{k: v for k, v in h.items() if not k.endswith("seconds")}
                     for h in final["history"][: len(strip)]]
    report = (uninterrupted.root / "report.md").read_text()
    assert "successive halving" in report


def test_halving_resumes_after_a_sigkill_with_the_uninterrupted_result(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen([sys.executable, str(REPO / "run_benchmarks.py"), "run", *TINY, "--out", str(out),
                               "--no-report"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = ResultStore(out)
    deadline = time.monotonic() + 120
    while len(store.cell_ids()) < 4 and runner.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.poll() is None, f"the runner ended before it could be killed: {runner.stderr.read().decode()}"
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    runner.stderr.close()
    assert 4 <= len(store.cell_ids()) < len(uninterrupted.cell_ids())
    assert main_one_thread(["run", *TINY, "--out", str(out), "--no-report"]) == 0
    assert store.cell_ids() == uninterrupted.cell_ids()
    for cell_id in store.cell_ids():
        assert outcome(store.read(cell_id)) == outcome(uninterrupted.read(cell_id)), cell_id
    manifest = json.loads((out / "experiment.json").read_text())
    assert manifest == json.loads((uninterrupted.root / "experiment.json").read_text())


def test_the_process_executor_makes_the_same_decisions(tmp_path, uninterrupted):
    experiment = Experiment("adhoc", (ModelEntry("mf", "mf"),), ("synthetic:tiny",), seeds=(0, 1), lr=LRS,
                            reg=REGS, train={"max_epochs": 12, "patience": 3},
                            search=SearchSettings(method="halving", selection_seeds=1, min_epochs=2, survivors=1,
                                                  per_lr=False))
    store = ResultStore(tmp_path)

    def run_round(cells, keep):
        return run_grid(cells, store, executor="process", workers=2, threads_per_worker=1, force=True,
                        progress=False, embeddings_for=keep)

    plan, results = run_search(experiment, store, run_round)
    assert plan.done and len(results) == 10
    assert store.cell_ids() == uninterrupted.cell_ids()
    for cell_id in store.cell_ids():
        assert outcome(store.read(cell_id)) == outcome(uninterrupted.read(cell_id)), cell_id


# ------------------------------------------------------------------------------ results as a DataFrame


def test_the_frame_has_one_row_per_cell_and_marks_what_the_report_averages(uninterrupted):
    from grcn_bench.reports import results_frame

    frame = results_frame(uninterrupted.root)
    assert len(frame) == 10 and set(frame.stage) == {"rung", "run"}
    assert frame[frame.stage == "rung"]["test_recall@10"].isna().all()
    chosen = frame[frame.selected]
    assert sorted(chosen.seed) == [0, 1] and (chosen.stage == "run").all()
    [selection] = select(load_results(uninterrupted.root).runs)
    assert chosen["test_recall@10"].mean() == pytest.approx(selection.test_mean("recall@10"), abs=0)
    assert len(results_frame(uninterrupted.root, rungs=False)) == 2
    assert {"lr", "reg_weight", "epochs_run", "seconds", "val_ndcg@10"} <= set(frame.columns)


def test_compare_search_judges_picks_against_the_seed_spread(tmp_path):
    from grcn_bench.reports.search_compare import compare_searches, totals

    template = Cell("mf", "synthetic:tiny", TrainSettings(), label="BPR-MF")

    def write(root, rows, search=None):
        store, cells = ResultStore(root), []
        for lr, seed, val in rows:
            cell = template.with_settings(lr=lr, seed=seed)
            store.write(cell.cell_id, fake_result(cell, val))
            cells.append(cell)
        store.write_json("experiment.json", {"name": "t", "cells": [c.to_dict() for c in cells],
                                             "search": search or {}})

    # The grid picks 1e-2 (0.40); halving kept 1e-3 (0.38 on seed 0, seeds 1-2 at 0.30 and 0.46: std 0.08).
    write(tmp_path / "grid", [(1e-3, 0, 0.38), (1e-2, 0, 0.40), (3e-2, 0, 0.1)])
    write(tmp_path / "halving", [(1e-3, 0, 0.38), (1e-3, 1, 0.30), (1e-3, 2, 0.46)],
          {"selection_seeds": 1, "selection_seed_list": [0]})
    [row] = compare_searches(tmp_path / "grid", tmp_path / "halving").to_dict("records")
    assert (row["grid_lr"], row["halving_lr"], row["verdict"]) == (1e-2, 1e-3, "within spread")
    assert row["seed_spread"] == pytest.approx(0.08) and row["halving_val_recall@10"] == 0.38
    assert (row["grid_epochs"], row["halving_epochs"]) == (21, 7)  # 7 epochs per fake run, seed 0 only
    assert totals(pd.DataFrame([row]))["epoch_ratio"] == 3.0
    write(tmp_path / "halving", [(1e-3, 0, 0.38), (1e-3, 1, 0.37), (1e-3, 2, 0.39)],
          {"selection_seeds": 1, "selection_seed_list": [0]})
    assert compare_searches(tmp_path / "grid", tmp_path / "halving").verdict.tolist() == ["worse"]


def test_replaying_halving_from_the_grid_gives_the_real_halving(tmp_path, uninterrupted):
    """A rung is a prefix of its finished run, so halving replayed from an exhaustive grid's histories makes the
    real search's decisions at the real search's cost."""
    from grcn_bench.reports.search_compare import compare_searches, replay_halving

    grid_args = ["--models", "mf", "--datasets", "synthetic:tiny", "--lr", "1e-3", "1e-2", "3e-2", "--reg", "1e-4",
                 "1e-2", "--seeds", "0", "--search", "grid", "--max-epochs", "12", "--patience", "3", "--no-progress"]
    assert main_one_thread(["run", *grid_args, "--out", str(tmp_path), "--no-report"]) == 0
    [real] = compare_searches(tmp_path, uninterrupted.root).to_dict("records")
    [replayed] = replay_halving(tmp_path, SearchSettings(method="halving", min_epochs=2, survivors=1,
                                                         per_lr=False)).to_dict("records")
    assert (replayed["pick_lr"], replayed["pick_reg"]) == (real["halving_lr"], real["halving_reg"])
    assert replayed["epochs"] == real["halving_epochs"] and replayed["grid_epochs"] == real["grid_epochs"]


def test_per_lr_halving_keeps_each_learning_rates_best_where_plain_halving_keeps_the_fastest():
    from grcn_bench.benchmarks.search import promote

    scores = (0.1, 0.2, 0.5, 0.4, 0.9, 0.8)  # by point: lr 1e-3, 1e-2, 3e-2 x λ 1e-4, 1e-2
    one = SearchSettings(method="halving", survivors=1)
    assert promote(POINTS, scores, one) == [(1e-3, 1e-2), (1e-2, 1e-4), (3e-2, 1e-4)]
    assert promote(POINTS, scores, dataclasses.replace(one, per_lr=False)) == [(3e-2, 1e-4), (3e-2, 1e-2)]


def test_the_tsne_figure_s_sources_keep_their_embeddings_before_the_selection_is_known():
    """Figure 4 reuses Table 2's selected GAT and GRCN runs; which point is selected is known only once every
    survivor has run, so every finished run of those studies keeps its embeddings (rungs never do)."""
    from grcn_bench.benchmarks.search import keeps_embeddings

    experiment = load_experiment("paper")
    grcn_tiktok = Cell("grcn", "synthetic:tiktok", TrainSettings(), label="GRCN", group="table2")
    assert keeps_embeddings(experiment, grcn_tiktok)
    assert not keeps_embeddings(experiment, grcn_tiktok.with_settings(seed=1))  # the figure draws the first seed
    assert keeps_embeddings(experiment, dataclasses.replace(grcn_tiktok, group="fig4").with_settings(seed=1))
    assert not keeps_embeddings(experiment, dataclasses.replace(grcn_tiktok, final=False))
    assert not keeps_embeddings(experiment, dataclasses.replace(grcn_tiktok, dataset="synthetic:kwai"))
    assert not keeps_embeddings(experiment, dataclasses.replace(grcn_tiktok, label="NGCF", model="ngcf"))
    assert keeps_embeddings(experiment, dataclasses.replace(grcn_tiktok, label="GAT", model="gat"))
    # Table 3, Figure 3 and the noise study label a row "GRCN" too and reuse Table 2's point: nothing draws theirs.
    for group, dataset in (("table3", "synthetic:tiktok"), ("fig3", "synthetic:tiktok"),
                           ("noise", "synthetic:tiktok"), ("noise", "synthetic:tiktok?noise=0.1")):
        reuse = dataclasses.replace(grcn_tiktok, group=group, dataset=dataset)
        assert not keeps_embeddings(experiment, reuse), (group, dataset)


def test_unselected_runs_of_the_tsne_sources_lose_their_embeddings(tmp_path):
    import numpy as np

    from grcn_bench.benchmarks.search import drop_unselected_embeddings

    experiment = dataclasses.replace(
        reuse_experiment(), models=(ModelEntry("mf", "BPR-MF"),
                                    ModelEntry("mf", "BPR-MF", group="fig4", tuned_from="BPR-MF")))
    store = ResultStore(tmp_path)
    for cell in plan_experiment(experiment, store).pending:
        store.write(cell.cell_id, fake_result(cell, 0.2 if cell.settings.lr == LRS[1] else 0.1),
                    {"test_users": np.arange(3), "user_embedding": np.ones((2, 2)), "item_embedding": np.ones((2, 2))})
    plan = plan_experiment(experiment, store)
    drop_unselected_embeddings(experiment, store, plan)
    kept = {c.settings.lr: sorted(store.read_arrays(c.cell_id)) for c in plan.studies[0].finals}
    assert kept == {LRS[0]: ["test_users"], LRS[1]: ["item_embedding", "test_users", "user_embedding"]}


def test_results_of_other_data_are_never_reused_silently(tmp_path):
    """A stored cell whose dataset digest differs from the data's digest now stops the run before anything runs,
    naming the cells and the way on; --force retrains them."""
    from grcn_bench.benchmarks.search import StaleResultsError

    experiment = Experiment("t", (ModelEntry("mf", "BPR-MF"),), ("synthetic:tiny",), lr=LRS[:2], reg=REGS[:1])
    store = ResultStore(tmp_path)
    cells = plan_experiment(experiment, store).pending
    for cell in cells:
        store.write(cell.cell_id, {**fake_result(cell, 0.1), "dataset_card": {"digest": "old"}})
    ran = []

    def run_round(todo, keep):
        ran.extend(todo)
        for cell in todo:
            store.write(cell.cell_id, {**fake_result(cell, 0.1), "dataset_card": {"digest": "new"}})
        return []

    with pytest.raises(StaleResultsError, match=r"2 stored cell\(s\) were trained on other data .*digest old then, "
                                                 r"new now.*--force"):
        run_search(experiment, store, run_round, data_digest=lambda spec: "new")
    assert not ran
    run_search(experiment, store, run_round, data_digest=lambda spec: "old")  # the same data: reused
    assert not ran
    plan, _ = run_search(experiment, store, run_round, force=True, data_digest=lambda spec: "new")
    assert plan.done and sorted(c.cell_id for c in ran) == sorted(c.cell_id for c in cells)
    run_search(experiment, store, run_round, data_digest=lambda spec: "new")  # retrained: no complaint


PLUGIN = '''
import os

from grcn_bench.models import register_model
from grcn_bench.models.mf import MF


@register_model("status_test_raises")
class RaisesWhenAsked(MF):
    def forward(self, graph):
        if os.environ.get("STATUS_TEST_RAISE"):
            raise RuntimeError("planted failure")
        return super().forward(graph)
'''


def test_run_exits_1_while_a_cell_is_stored_failed_and_says_so_when_reusing_it(tmp_path, monkeypatch, capsys):
    from grcn_bench.models import unregister_model

    plugin = tmp_path / "status_plugin.py"
    plugin.write_text(PLUGIN)
    argv = ["run", "--models", "status_test_raises", "--datasets", "synthetic:tiny", "--max-epochs", "2",
            "--out", str(tmp_path / "out"), "--plugin", str(plugin), "--no-report", "--no-progress"]
    try:
        monkeypatch.setenv("STATUS_TEST_RAISE", "1")
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "RuntimeError: planted failure" in err and "1 cell(s) failed" in err and "--retry-failed" in err
        assert cli.main(argv) == 1  # nothing reran: the stored failure is reused, and said so
        assert "1 cell(s) stored as failed by an earlier run were reused" in capsys.readouterr().err
        monkeypatch.delenv("STATUS_TEST_RAISE")
        assert cli.main([*argv, "--retry-failed"]) == 0
    finally:
        unregister_model("status_test_raises")


def test_a_reused_entry_takes_the_point_searched_under_its_own_protocol(tmp_path):
    """The audit's standard rows reuse Table 2's point, even when the released protocol's search of the same label
    comes first in the file and picked another point on test."""
    official = {"protocol": "official-grcn"}
    experiment = Experiment(
        "t", (ModelEntry("mf", "BPR-MF", group="audit", train=official), ModelEntry("mf", "BPR-MF"),
              ModelEntry("mf", "BPR-MF", group="audit", tuned_from="BPR-MF")),
        ("synthetic:tiny",), lr=LRS[:2], reg=REGS[:1])
    store = ResultStore(tmp_path)
    for cell in plan_experiment(experiment, store).pending:
        official_run = cell.settings.protocol == "official-grcn"
        store.write(cell.cell_id, fake_result(cell, 0.9 if (cell.settings.lr == LRS[0]) == official_run else 0.1))
    plan = plan_experiment(experiment, store)
    assert [s.selected for s in plan.studies] == [(LRS[0], REGS[0]), (LRS[1], REGS[0])]
    assert {(c.settings.lr, c.settings.protocol) for c in plan.reused} == {(LRS[1], "standard")}


def test_the_paper_preset_records_the_audit_for_the_twins_of_its_released_protocol_cells():
    from grcn_bench.benchmarks.search import audit_round, audit_twins, studies

    experiment = load_experiment("paper")
    twins = audit_twins(experiment)
    audited = [s for s in studies(experiment) if s.template.settings.protocol == "standard"
               and any(s.cell(p, 0).cell_id in twins for p in s.points)]
    # Table 2's studies on the Tiktok-shaped preset (the audit's standard rows take their points) and the standard
    # GRCN_official study: every point and seed, and the 10-epoch rungs that the released protocol's halving runs.
    assert {(s.template.label, s.template.dataset) for s in audited} == {
        (label, "synthetic:tiktok") for label in ("GraphSAGE", "MMGCN", "NGCF", "DisenGCN", "GAT", "GRCN",
                                                  "GRCN_official")}
    grcn = next(s for s in audited if s.template.label == "GRCN")
    assert all(grcn.cell(p, seed).cell_id in twins for p in grcn.points for seed in (0, 1, 2))
    assert all(grcn.cell(p, 0, budget=10).cell_id in twins for p in grcn.points)
    assert not any(s.cell(p, 0).cell_id in twins for s in studies(experiment) for p in s.points
                   if s.template.dataset != "synthetic:tiktok" or s.template.label == "BPR-MF")
    # In a round, the twins record and a released-protocol cell waits for its twin.
    standard = grcn.cell(grcn.points[0], 0, budget=10)
    released = standard.with_settings(protocol="official-grcn")
    other = standard.with_settings(seed=5)
    ran = audit_round([released, standard, other], twins)
    assert [c.cell_id for c in ran] == [standard.cell_id, other.cell_id] and ran[0].audit and not ran[1].audit
    assert audit_round([released], twins) == [released]
