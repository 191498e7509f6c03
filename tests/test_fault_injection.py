"""Fault injection over a small grid: at a random point a trial kills the runner, kills one of its workers, or damages
one stored file. After the fault every other finished cell is intact (not rewritten), and rerunning with
``--retry-failed`` until the grid is done gives exactly the uninterrupted run's store.

The number of trials is ``GRCN_FAULT_TRIALS`` (default 3, so the default suite stays fast); each trial draws its
fault, its moment and its victim from its own seed, so a failing trial is rerun alone by its id.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grcn_bench.benchmarks.config import Cell
from grcn_bench.benchmarks.executors import result_stamp, run_grid
from grcn_bench.benchmarks.store import ResultStore
from grcn_bench.models import unregister_model

REPO = Path(__file__).resolve().parents[1]
TRIALS = int(os.environ.get("GRCN_FAULT_TRIALS", "3"))
SEEDS = ["0", "1", "2", "3"]
FAULTS = ("kill_runner", "kill_worker", "damage_file")

# A model slow enough to be caught mid-cell (the sleep is not part of the cell ids), imported by every worker.
PLUGIN_SOURCE = '''
import os
import time

from grcn_bench.models import register_model
from grcn_bench.models.mf import MF


@register_model("fault_test_slow")
class SlowMF(MF):
    def forward(self, graph):
        time.sleep(float(os.environ.get("FAULT_TEST_SLEEP", "0")))
        return super().forward(graph)
'''


def _damages():
    """Ways a stored file can be damaged, each named: (file kind, how)."""
    return {
        "json-empty-list": ("json", lambda path: path.write_text("[]")),
        "json-empty-object": ("json", lambda path: path.write_text("{}")),
        "json-truncated": ("json", lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])),
        "json-garbage": ("json", lambda path: path.write_bytes(os.urandom(64))),
        "npz-truncated": ("npz", lambda path: path.write_bytes(path.read_bytes()[:100])),
        "npz-flipped": ("npz", lambda path: path.write_bytes(_flip_middle(path.read_bytes()))),
        "npz-empty": ("npz", lambda path: path.write_bytes(b"")),
    }


def _flip_middle(payload: bytes) -> bytes:
    middle = len(payload) // 2
    return payload[:middle] + bytes([payload[middle] ^ 0xFF]) + payload[middle + 1 :]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault-plugin") / "fault_test_models.py"
    path.write_text(PLUGIN_SOURCE)
    yield str(path)
    unregister_model("fault_test_slow")
    for name in [n for n, m in sys.modules.items() if getattr(m, "__file__", None) == str(path)]:
        del sys.modules[name]


def _command(out: Path, plugin: str) -> list[str]:
    return [sys.executable, str(REPO / "run_benchmarks.py"), "run", "--models", "fault_test_slow", "mf",
            "--datasets", "synthetic:tiny", "--seeds", *SEEDS, "--max-epochs", "2", "--lr", "0.01",
            "--executor", "process", "--workers", "2", "--threads-per-worker", "1",
            "--out", str(out), "--plugin", plugin, "--no-report", "--no-progress"]


def _cells(out: Path) -> list[Cell]:
    return [Cell.from_dict(c) for c in json.loads((out / "experiment.json").read_text())["cells"]]


def _outcome(result: dict) -> dict:
    """What must not depend on faults, executors or timing."""
    history = [{k: v for k, v in record.items() if not k.endswith("seconds")} for record in result["history"]]
    keys = ("status", "best_epoch", "epochs_run", "stop_reason", "test_metrics", "val_metrics", "num_parameters")
    return {**{k: result[k] for k in keys}, "history": history}


def _one_thread(run):
    """Results are bitwise reproducible for one torch thread, as each parallel worker has (tests/test_executors.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, plugin):
    """The grid run once, start to end, without faults."""
    out = tmp_path_factory.mktemp("uninterrupted")
    finished = subprocess.run(_command(out, plugin), env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    store = ResultStore(out)
    assert len(store.cell_ids()) == len(_cells(out)) == 2 * len(SEEDS)
    return {cell_id: _outcome(store.read(cell_id)) for cell_id in store.cell_ids()}, store


def _workers(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return [child for child in children if b"spawn_main" in _cmdline(child)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in Linux's /proc")
@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_fault_at_a_random_point_loses_nothing_and_resuming_gives_the_uninterrupted_store(
        trial, tmp_path, plugin, uninterrupted):
    reference, reference_store = uninterrupted
    rng = random.Random(1000 + trial)
    fault = FAULTS[trial % len(FAULTS)] if trial < len(FAULTS) else rng.choice(FAULTS)
    out = tmp_path / "store"
    store = ResultStore(out)
    env = {**os.environ, "FAULT_TEST_SLEEP": f"{rng.uniform(0.05, 0.2):.3f}", "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen(_command(out, plugin), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if fault == "kill_runner":  # at a random moment after some cells, possibly mid-write
            _wait_for(lambda: len(store.cell_ids()) >= rng.randint(0, 3) and (out / "experiment.json").is_file()
                      or runner.poll() is not None)
            time.sleep(rng.uniform(0.0, 0.5))
            runner.send_signal(signal.SIGKILL)
        elif fault == "kill_worker":  # one worker, mid-cell: its cell is stored failed and the grid goes on
            _wait_for(lambda: len(list(store.logs_dir.glob("*.log"))) >= rng.randint(1, 4) or runner.poll() is not None)
            workers = _workers(runner.pid)
            if workers:
                os.kill(rng.choice(workers), signal.SIGKILL)
        runner.wait(timeout=600)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        runner.stderr.close()

    damaged = None
    finished = store.cell_ids()
    if fault == "damage_file" and finished:
        name, (kind, damage) = rng.choice(sorted(_damages().items()))
        damaged = rng.choice(finished)
        path = store.result_path(damaged) if kind == "json" else store.arrays_path(damaged)
        damage(path)
    intact = [cell_id for cell_id in finished if cell_id != damaged and _readable_ok(store, cell_id)]
    # Every finished cell that the fault did not touch is whole and is the uninterrupted run's result.
    for cell_id in intact:
        assert _outcome(store.read(cell_id)) == reference[cell_id], (fault, cell_id)
        assert store.read_arrays(cell_id).keys() == reference_store.read_arrays(cell_id).keys()
    stamps = {cell_id: result_stamp(store, cell_id) for cell_id in intact}

    cells = _cells(out)
    for _ in range(3):  # resume until done; a killed worker's cell is stored failed, hence --retry-failed
        _one_thread(lambda: run_grid(cells, store, plugins=[plugin], progress=False, retry_failed=True))
        if all(_readable_ok(store, cell.cell_id) for cell in cells):
            break
    assert {cell_id: result_stamp(store, cell_id) for cell_id in intact} == stamps, "a finished cell was rerun"
    assert store.cell_ids() == sorted(reference)
    for cell_id in store.cell_ids():
        assert _outcome(store.read(cell_id)) == reference[cell_id], (fault, cell_id)
        arrays, expected = store.read_arrays(cell_id), reference_store.read_arrays(cell_id)
        assert arrays.keys() == expected.keys() and all((arrays[k] == expected[k]).all() for k in arrays)


def _readable_ok(store: ResultStore, cell_id: str) -> bool:
    from grcn_bench.benchmarks.store import CorruptEntryError

    try:
        return store.read(cell_id)["status"] == "ok" and bool(store.read_arrays(cell_id))
    except CorruptEntryError:
        return False
