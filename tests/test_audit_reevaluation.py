"""The protocol audit re-evaluates instead of retraining (docs/protocol.md, "Protocol audit").

A standard run whose released-protocol twin is asked for records that twin's evaluation per epoch in ``audit/``; the
twin is then derived from the record. Checked here on ``synthetic:tiny``: a derived result equals the trained one
(metrics, best epoch, epochs run, per-user values; finished runs and halving rungs), a twin that would train past the
standard run's last epoch is trained, a derivation killed with SIGKILL reruns to the same store, the standard runs
are unchanged by the record, and no selection, halving decision, table or frame reads ``audit/``.
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grcn_bench.benchmarks import cli, runner
from grcn_bench.benchmarks.config import Cell, TrainSettings, load_experiment
from grcn_bench.benchmarks.executors import run_grid
from grcn_bench.benchmarks.runner import official_from_twin, run_cell
from grcn_bench.benchmarks.search import audit_twins, derivable, plan_experiment
from grcn_bench.benchmarks.store import ResultStore
from grcn_bench.reports import results_frame
from grcn_bench.reports.selection import load_results, select

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = "official-grcn"
NOT_COMPARED = {"seconds", "cpu_seconds", "peak_rss_bytes", "test_seconds", "derived_from"}


def comparable(result: dict) -> dict:
    """A stored result without what differs between two runs of the same cell (seconds) or marks a derivation."""
    out = {k: v for k, v in result.items() if k not in NOT_COMPARED}
    out["history"] = [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in result["history"]]
    return out


def assert_same_arrays(left: dict, right: dict) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert np.array_equal(left[name], right[name]), name


def official(cell: Cell) -> Cell:
    return cell.with_settings(protocol=OFFICIAL)


def rung(cell: Cell) -> Cell:
    return dataclasses.replace(cell, final=False)


# ------------------------------------------------------------------------------ single cells, both branches

# lr 1e-2: the released protocol stops within the standard run's epochs (derived); lr 3e-2 (MF) and 1e-3 (GRCN): it
# would still be training when the standard run stopped (trained). GRCN on noisy data also stores edge-weight AUCs.
DERIVED = [("mf", "synthetic:tiny", 1e-2), ("grcn", "synthetic:tiny?noise=0.2", 1e-2)]
TRAINED = [("mf", "synthetic:tiny", 3e-2), ("grcn", "synthetic:tiny?noise=0.2", 1e-3)]


def standard(model: str, dataset: str, lr: float, **settings) -> Cell:
    train = {"max_epochs": 30, "patience": 3, **settings}
    return Cell(model, dataset, TrainSettings(lr=lr, reg_weight=1e-4, **train), audit=True)


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> ResultStore:
    """The standard runs, each with its audit record."""
    store = ResultStore(tmp_path_factory.mktemp("twins"))
    for case in DERIVED + TRAINED:
        assert run_cell(standard(*case), store, progress=False)["status"] == "ok"
    assert run_cell(rung(standard("mf", "synthetic:tiny", 1e-2, max_epochs=3)), store, progress=False)["status"] == "ok"
    return store


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> ResultStore:
    """The released-protocol runs trained for real, in a store without their twins."""
    store = ResultStore(tmp_path_factory.mktemp("trained"))
    for case in DERIVED + TRAINED:
        assert run_cell(official(standard(*case)), store, progress=False)["status"] == "ok"
    run_cell(rung(official(standard("mf", "synthetic:tiny", 1e-2, max_epochs=3))), store, progress=False)
    return store


def test_the_audit_flag_is_not_part_of_the_cell():
    cell = standard("mf", "synthetic:tiny", 1e-2)
    plain = Cell(cell.model, cell.dataset, cell.settings)
    assert cell.audit and not plain.audit
    assert cell.cell_id == plain.cell_id and cell == plain and cell.to_dict() == plain.to_dict()


def test_the_record_changes_nothing_the_standard_run_stores(twins, tmp_path):
    plain = ResultStore(tmp_path)
    for case in DERIVED:
        cell = standard(*case)
        alone = run_cell(Cell(cell.model, cell.dataset, cell.settings), plain, progress=False)
        assert comparable(twins.read(cell.cell_id)) == comparable(alone)
        assert_same_arrays(twins.read_arrays(cell.cell_id), plain.read_arrays(cell.cell_id))
        assert twins.audit_path(cell.cell_id).is_file() and not plain.audit_path(cell.cell_id).exists()
        assert not twins.checkpoint_path(cell.cell_id).exists()


@pytest.mark.parametrize("case", DERIVED, ids=lambda c: f"{c[0]}-lr{c[2]}")
def test_a_derived_run_is_the_trained_run(case, twins, trained, tmp_path):
    store = ResultStore(tmp_path)
    shutil.copytree(twins.root, store.root, dirs_exist_ok=True)
    cell = official(standard(*case))
    derived = run_cell(cell, store, progress=False)
    real = trained.read(cell.cell_id)
    assert derived["derived_from"] == standard(*case).cell_id and "derived_from" not in real
    assert comparable(store.read(cell.cell_id)) == comparable(real)
    assert_same_arrays(store.read_arrays(cell.cell_id), trained.read_arrays(cell.cell_id))
    if case[0] == "grcn":
        assert derived["edge_weight_auc"] == real["edge_weight_auc"] is not None


@pytest.mark.parametrize("case", TRAINED, ids=lambda c: f"{c[0]}-lr{c[2]}")
def test_a_run_that_would_train_past_its_twin_is_trained(case, twins, trained, tmp_path):
    store = ResultStore(tmp_path)
    shutil.copytree(twins.root, store.root, dirs_exist_ok=True)
    cell = official(standard(*case))
    assert official_from_twin(cell, store) is None
    # The reason: the released-protocol run trains more epochs than the standard run did.
    assert trained.read(cell.cell_id)["epochs_run"] > twins.read(standard(*case).cell_id)["epochs_run"]
    result = run_cell(cell, store, progress=False)
    assert "derived_from" not in result
    assert comparable(result) == comparable(trained.read(cell.cell_id))


def test_a_rung_is_derived_from_its_standard_rung(twins, trained, tmp_path):
    store = ResultStore(tmp_path)
    shutil.copytree(twins.root, store.root, dirs_exist_ok=True)
    cell = rung(official(standard("mf", "synthetic:tiny", 1e-2, max_epochs=3)))
    derived = run_cell(cell, store, progress=False)
    assert derived["derived_from"] and derived["test_metrics"] is None and derived["epochs_run"] == 3
    assert comparable(derived) == comparable(trained.read(cell.cell_id))
    assert store.read_arrays(cell.cell_id) == {} == trained.read_arrays(cell.cell_id)


def test_a_record_that_does_not_match_its_run_is_not_used(twins, tmp_path):
    store = ResultStore(tmp_path)
    shutil.copytree(twins.root, store.root, dirs_exist_ok=True)
    twin = standard(*DERIVED[0])
    record = json.loads(store.audit_path(twin.cell_id).read_text())
    record["epochs"][0]["loss"] += 1e-9  # another training's record
    store.audit_path(twin.cell_id).write_text(json.dumps(record))
    assert official_from_twin(official(twin), store) is None
    store.audit_path(twin.cell_id).write_text('{"protocol": "official-grcn", "epochs": [{"epoch": 1}]}')
    assert official_from_twin(official(twin), store) is None
    store.audit_path(twin.cell_id).write_text("not json")
    assert official_from_twin(official(twin), store) is None
    assert official_from_twin(official(twin), store, lambda spec: "another digest") is None


KILL = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from grcn_bench.benchmarks import store as store_module
from grcn_bench.benchmarks.config import Cell
from grcn_bench.benchmarks.executors import run_grid
from grcn_bench.benchmarks.store import ResultStore

cell = Cell.from_dict(json.loads({cell!r}))
target = {target!r}
replace = os.replace

def dying_replace(src, dst):
    if os.path.basename(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)

store_module.os.replace = dying_replace
run_grid([cell], ResultStore(sys.argv[1]), executor="serial", progress=False)
"""


@pytest.mark.parametrize("moment", ["arrays", "result"])
def test_a_derivation_killed_by_sigkill_reruns_to_the_same_store(moment, twins, tmp_path):
    cell = official(standard(*DERIVED[0]))
    reference = ResultStore(tmp_path / "reference")
    shutil.copytree(twins.root, reference.root)
    run_grid([cell], reference, executor="serial", progress=False)
    store = ResultStore(tmp_path / "killed")
    shutil.copytree(twins.root, store.root)
    target = (store.arrays_path if moment == "arrays" else store.result_path)(cell.cell_id).name
    script = KILL.format(cell=json.dumps(cell.to_dict()), target=target)
    done = subprocess.run([sys.executable, "-c", script, str(store.root)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not store.has(cell.cell_id)
    assert (moment == "result") == store.arrays_path(cell.cell_id).is_file()
    run_grid([cell], store, executor="serial", progress=False)
    assert store.cell_ids() == reference.cell_ids()
    for cell_id in store.cell_ids():
        assert comparable(store.read(cell_id)) == comparable(reference.read(cell_id)), cell_id
        assert_same_arrays(store.read_arrays(cell_id), reference.read_arrays(cell_id))


# ------------------------------------------------------------------------------ a whole search, end to end

EXPERIMENT = """
name = "audit-tiny"
datasets = ["synthetic:tiny"]
seeds = [0, 1]
lr = [1e-3, 1e-2, 3e-2]
reg = [1e-4, 1e-2]
train = { max_epochs = 12, patience = 8 }

[search]
method = "halving"
selection_seeds = 1
min_epochs = 2
survivors = 1
per_lr = false

[[models]]
name = "mf"
label = "BPR-MF"

[[models]]
name = "mf"
label = "BPR-MF"
group = "audit"
tuned_from = "BPR-MF"

[[models]]
name = "mf"
label = "BPR-MF"
group = "audit"
train = { protocol = "official-grcn" }
"""


def run(toml: Path, out: Path) -> int:
    return cli.main(["run", str(toml), "--out", str(out), "--no-progress"])


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, ResultStore, ResultStore]:
    """The experiment run twice: as ``run`` runs it (released-protocol cells derived where they can be), and with
    derivation off (every cell trained)."""
    root = tmp_path_factory.mktemp("search")
    toml = root / "audit-tiny.toml"
    toml.write_text(EXPERIMENT)
    assert run(toml, root / "derived") == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "official_from_twin", lambda *args, **kwargs: None)
        assert cli.main(["run", str(toml), "--out", str(root / "trained"), "--no-progress", "--no-report"]) == 0
    return toml, ResultStore(root / "derived"), ResultStore(root / "trained")


def test_run_derives_the_released_protocol_cells_and_they_equal_training(searched):
    _, derived, trained = searched
    assert derived.cell_ids() == trained.cell_ids()
    marked = {cell_id for cell_id in derived.cell_ids() if derived.read(cell_id).get("derived_from")}
    rungs = {cell_id for cell_id in marked if derived.read(cell_id)["cell"].get("rung")}
    assert rungs and marked - rungs, "both rungs and finished runs are derived"
    released = {c for c in derived.cell_ids() if derived.read(c)["cell"]["settings"]["protocol"] == OFFICIAL}
    assert marked < released, "and a run whose twin stopped first (patience 8 on validation) is trained"
    assert not any(trained.read(c).get("derived_from") for c in trained.cell_ids())
    for cell_id in derived.cell_ids():
        assert comparable(derived.read(cell_id)) == comparable(trained.read(cell_id)), cell_id
        assert_same_arrays(derived.read_arrays(cell_id), trained.read_arrays(cell_id))
    assert json.loads((derived.root / "experiment.json").read_text()) == \
        json.loads((trained.root / "experiment.json").read_text())
    frame = results_frame(derived.root)
    assert set(frame.loc[frame.derived, "cell_id"]) == marked


def test_only_the_twins_of_requested_released_protocol_cells_record(searched):
    toml, derived, _ = searched
    experiment = load_experiment(str(toml))
    twins = audit_twins(experiment)
    recorded = {p.stem for p in derived.audit_dir.glob("*.json")}
    assert recorded and recorded <= twins
    standard_cells = {c for c in derived.cell_ids() if derived.read(c)["cell"]["settings"]["protocol"] == "standard"}
    assert recorded <= standard_cells


def test_the_dry_run_counts_the_cells_it_will_derive(searched, tmp_path):
    toml, derived, _ = searched
    store = ResultStore(tmp_path)
    shutil.copytree(derived.root, store.root, dirs_exist_ok=True)
    removed = [c for c in store.cell_ids() if store.read(c).get("derived_from") and store.read(c)["cell"].get("rung")]
    for cell_id in removed:
        store.result_path(cell_id).unlink()
    plan = plan_experiment(load_experiment(str(toml)), store)
    now, later = derivable(plan, store)
    assert now and {c.cell_id for c in now} == {c.cell_id for c in plan.pending} <= set(removed) and not later


def audit_garbage(store: ResultStore) -> int:
    """Overwrite every audit record with extreme values; how many there were."""
    paths = sorted(store.audit_dir.glob("*.json"))
    for path in paths:
        record = json.loads(path.read_text())
        for k, epoch in enumerate(record["epochs"]):
            epoch["metrics"] = {name: (1e9 if k % 2 else -1e9) for name in epoch["metrics"]}
        record["best"] = {"epoch": 1, "val_metrics": {"recall@10": float("nan")}}
        path.write_text(json.dumps(record))
        np.savez(store.audit_arrays_path(path.stem), test_users=np.array([-1]), junk=np.full(3, np.inf))
    return len(paths)


def what_selection_sees(toml: Path, store: ResultStore) -> dict:
    """The halving plan, the report's selection and Table 2, as text."""
    plan = plan_experiment(load_experiment(str(toml)), store)
    studies = [(p.study.key, p.stage, p.selected, [(r.budget, r.scores, r.kept) for r in p.rungs])
               for p in plan.studies]
    selections = [(s.label, s.dataset, s.protocol, s.chosen, s.seeds) for s in select(load_results(store.root).runs)]
    cli.cmd_report(store.root)
    tables = {p.name: p.read_text() for p in sorted((store.root / "report").glob("table2*"))}
    assert tables, "the report wrote Table 2"
    return {"plan": repr(studies), "selections": repr(selections), "tables": tables}


def test_garbage_in_every_audit_record_changes_no_selection_decision_or_table(searched, tmp_path):
    toml, derived, _ = searched
    store = ResultStore(tmp_path)
    shutil.copytree(derived.root, store.root, dirs_exist_ok=True)
    before = what_selection_sees(toml, store)
    assert audit_garbage(store) > 0
    assert what_selection_sees(toml, store) == before


def test_only_the_derivation_reads_the_audit_records(searched, tmp_path, monkeypatch):
    toml, derived, _ = searched
    store = ResultStore(tmp_path)
    shutil.copytree(derived.root, store.root, dirs_exist_ok=True)
    audit_dir = str(store.audit_dir)

    def forbidden(*args, **kwargs):
        raise AssertionError("audit/ was read outside the derivation")

    def guarded(original):
        def call(path, *args, **kwargs):
            if str(path).startswith(audit_dir):
                forbidden()
            return original(path, *args, **kwargs)
        return call

    monkeypatch.setattr(runner, "official_from_twin", forbidden)
    monkeypatch.setattr(ResultStore, "read_audit", forbidden)
    monkeypatch.setattr(builtins, "open", guarded(builtins.open))
    monkeypatch.setattr(io, "open", guarded(io.open))
    monkeypatch.setattr(os, "scandir", guarded(os.scandir))
    monkeypatch.setattr(os, "listdir", guarded(os.listdir))
    monkeypatch.setattr(np, "load", guarded(np.load))
    with pytest.raises(AssertionError, match="outside the derivation"):
        open(store.audit_path(next(iter(audit_twins(load_experiment(str(toml)))))))  # the guard works
    what_selection_sees(toml, store)
    results_frame(store.root)
    # Rerunning the finished search reads results only: every cell is stored, nothing derives.
    assert run(toml, store.root) == 0
