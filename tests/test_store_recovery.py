"""A store that recovers: every corrupt entry is reported with its path and the fix, --force recovers from anything
the store can hold, and an unusable --out is one line before anything trains."""

from __future__ import annotations

import os

import pytest

from grcn_bench.benchmarks import cli
from grcn_bench.benchmarks.store import CorruptEntryError, ResultStore

RUN = ["run", "--models", "mf", "--datasets", "synthetic:tiny", "--max-epochs", "2", "--no-report", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    assert cli.main([*RUN, "--out", str(out)]) == 0
    [cell_id] = ResultStore(out).cell_ids()
    return out, cell_id


@pytest.mark.parametrize("damage, problem", [
    (lambda json_path, npz: json_path.write_text("[]"), "not a cell result (list)"),
    (lambda json_path, npz: json_path.write_text("{}"), "not a cell result (status None)"),
    (lambda json_path, npz: json_path.write_text('{"status": "ok"'), "not JSON"),
    (lambda json_path, npz: npz.write_bytes(npz.read_bytes()[:100]), "not a readable .npz"),
])
def test_a_corrupt_entry_is_named_with_the_fix_and_force_recovers(tmp_path, finished, capsys, damage, problem):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished[0], out)
    store = ResultStore(out)
    cell_id = finished[1]
    damage(store.result_path(cell_id), store.arrays_path(cell_id))
    broken = store.arrays_path(cell_id) if "npz" in problem else store.result_path(cell_id)
    with pytest.raises(CorruptEntryError, match="delete it, or rerun with --force") as caught:
        store.read_arrays(cell_id) if "npz" in problem else store.read(cell_id)
    assert str(caught.value).startswith(f"{broken}: {problem}")
    if "npz" not in problem:  # the run reads the JSON to plan: one line, exit 2, nothing trained
        assert cli.main([*RUN, "--out", str(out)]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {broken}: {problem}")
    # A damaged entry, JSON or arrays, counts as a failure: --retry-failed reruns it (and only it); so does --force.
    for recover in ("--retry-failed", "--force"):
        damage(store.result_path(cell_id), store.arrays_path(cell_id))
        assert cli.main([*RUN, "--out", str(out), recover]) == 0
        assert store.read(cell_id)["status"] == "ok" and store.read_arrays(cell_id)["test_users"].size


def test_a_missing_dataset_fails_its_cells_with_one_line_and_exit_status_1(tmp_path, capsys):
    missing = tmp_path / "no-such-dataset"
    assert cli.main(["run", "--models", "mf", "--datasets", str(missing), "--out", str(tmp_path / "out"),
                     "--no-report", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"DatasetError: {missing}: no such dataset directory" in err and "1 cell(s) failed" in err


def test_out_must_be_a_writable_directory(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main([*RUN, "--out", str(a_file)]) == 2
    assert capsys.readouterr().err == f"error: --out {a_file}: exists and is not a directory\n"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli.main([*RUN, "--out", str(locked / "out")]) == 2
        assert "cannot write there" in capsys.readouterr().err


def test_a_report_never_mixes_versions_of_the_data(tmp_path, capsys):
    from grcn_bench.benchmarks.config import Cell, TrainSettings
    from grcn_bench.reports.selection import load_results

    store = ResultStore(tmp_path)
    cells = [Cell("mf", "synthetic:tiny", TrainSettings(lr=lr), label="BPR-MF") for lr in (1e-3, 1e-2)]
    for cell, digest in zip(cells, ("aaaa", "bbbb"), strict=True):
        store.write(cell.cell_id, {"cell": cell.to_dict(), "cell_id": cell.cell_id, "status": "ok",
                                   "dataset_card": {"digest": digest}})
    store.write_json("experiment.json", {"name": "t", "cells": [c.to_dict() for c in cells]})
    with pytest.raises(ValueError, match=r"results for synthetic:tiny come from 2 versions of its data, e\.g\. "
                                         r".*\(digest aaaa\), .*\(digest bbbb\); rerun .* --force"):
        load_results(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "2 versions of its data" in capsys.readouterr().err


def test_a_cell_another_runner_is_training_is_never_trained_twice(tmp_path):
    """Runner B meets a cell that runner A holds (its claim): B does not train it, waits, and takes A's result."""
    import threading

    from grcn_bench.benchmarks.config import Experiment, ModelEntry
    from grcn_bench.benchmarks.executors import run_grid
    from grcn_bench.benchmarks.runner import CLAIMED, _run_cell, cached_dataset, run_cell
    from grcn_bench.benchmarks.search import run_search

    store = ResultStore(tmp_path)
    experiment = Experiment("t", (ModelEntry("mf", "mf"),), ("synthetic:tiny",),
                            train={"max_epochs": 2, "batch_size": 256})
    [cell] = experiment.cells()
    trained_by_b = []

    def runner_b(cells, keep):
        results = run_grid(cells, store, force=True, progress=False)
        trained_by_b.extend(r for r in results if r["status"] != CLAIMED)
        return results

    finished = []
    with store.claim(cell.cell_id) as mine:  # runner A holds the cell
        assert mine
        assert run_cell(cell, store, progress=False)["status"] == CLAIMED and not store.has(cell.cell_id)
        b = threading.Thread(target=lambda: finished.append(run_search(experiment, store, runner_b,
                                                                       claim_poll_seconds=0.05)))
        b.start()
        b.join(timeout=1)
        assert b.is_alive() and not trained_by_b  # B waits for A, training nothing
        _run_cell(cell, store, device="cpu", eval_memory=1 << 30, progress=False, keep_embeddings=False,
                  dataset_loader=cached_dataset)  # A trains and stores the cell, then lets go of it
    b.join(timeout=60)
    assert not b.is_alive() and finished[0][0].done
    assert trained_by_b == [] and store.read(cell.cell_id)["status"] == "ok"  # trained once, by A
