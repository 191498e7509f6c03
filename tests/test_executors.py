"""Executors: serial, process pool and Ray give identical results; a raising cell and a dead worker are isolated and
stored as failed; killing the runner mid-grid loses no finished cell; a local Ray session stays on 127.0.0.1."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from grcn_bench.benchmarks import cli
from grcn_bench.benchmarks.config import Cell, TrainSettings
from grcn_bench.benchmarks.executors import (
    RAY_INSTALL_HINT,
    MissingExtraError,
    _process_slots,
    import_ray,
    load_plugins,
    record_lost_cell,
    result_stamp,
    run_grid,
)
from grcn_bench.benchmarks.store import ResultStore
from grcn_bench.models import available_models, unregister_model

REPO = Path(__file__).resolve().parents[1]
HAS_RAY = importlib.util.find_spec("ray") is not None

# Throwaway models, imported by every worker through the executors' plugin mechanism (a worker process cannot see
# models registered inside the test process).
PLUGIN_SOURCE = '''
from __future__ import annotations

import os
import signal
import time

from grcn_bench.models import register_model
from grcn_bench.models.mf import MF


@register_model("exec_test_raises")
class RaisesInSecondEpoch(MF):
    def forward(self, graph):
        if self.training:
            self.training_calls = getattr(self, "training_calls", 0) + 1
            if self.training_calls >= 2:
                raise RuntimeError("planted failure in epoch 2")
        return super().forward(graph)


@register_model("exec_test_dies")
class KillsItsProcess(MF):
    def forward(self, graph):
        os.kill(os.getpid(), signal.SIGKILL)


@register_model("exec_test_slow")
class SlowMF(MF):
    def forward(self, graph):
        time.sleep(float(os.environ.get("EXEC_TEST_SLEEP", "0")))
        return super().forward(graph)
'''
PLUGIN_MODELS = ("exec_test_raises", "exec_test_dies", "exec_test_slow")


def make_cell(model: str, seed: int = 0) -> Cell:
    return Cell(model, "synthetic:tiny", TrainSettings(seed=seed, lr=0.01, max_epochs=2, patience=5), label=model)


GOOD = [make_cell("mf", 0), make_cell("mf", 1), make_cell("graphsage", 0)]
RAISES = make_cell("exec_test_raises")
DIES = make_cell("exec_test_dies")
# The dying cell goes first, so that its worker is replaced while most of the grid is still to run.
PARALLEL_GRID = [DIES, GOOD[0], RAISES, GOOD[1], GOOD[2]]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "exec_test_models.py"
    path.write_text(PLUGIN_SOURCE)
    yield str(path)
    # Other test modules iterate over the registry: never leave a model that kills its process in it.
    for name in PLUGIN_MODELS:
        unregister_model(name)
    for name in [n for n, m in sys.modules.items() if getattr(m, "__file__", None) == str(path)]:
        del sys.modules[name]


def outcome(result: dict) -> dict:
    """Everything in a result that must not depend on the executor (no timings, no environment)."""
    history = [{k: v for k, v in record.items() if not k.endswith("seconds")} for record in result["history"]]
    keys = ("status", "best_epoch", "epochs_run", "stop_reason", "test_metrics", "val_metrics", "num_parameters")
    return {**{k: result[k] for k in keys}, "history": history}


@contextlib.contextmanager
def one_torch_thread():
    """Run with one torch thread, as every parallel worker here does. On CPU, the backward pass of a gather with
    repeated indices (every model's ``emb[users]``) sums in a thread-dependent order: results are bitwise
    reproducible for a fixed thread count of 1, not across thread counts (unless torch's deterministic mode is on)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def serial_store(tmp_path_factory, plugin):
    store = ResultStore(tmp_path_factory.mktemp("serial"))
    with one_torch_thread():
        run_grid([*GOOD, RAISES], store, plugins=[plugin], progress=False)
    return store


@pytest.fixture(scope="module")
def process_store(tmp_path_factory, plugin):
    store = ResultStore(tmp_path_factory.mktemp("process"))
    results = run_grid(PARALLEL_GRID, store, executor="process", workers=2, plugins=[plugin], progress=False)
    assert [r["cell_id"] for r in results] == [c.cell_id for c in PARALLEL_GRID]  # grid order, not finish order
    return store


@pytest.fixture(scope="module")
def ray_session():
    if not HAS_RAY:
        pytest.skip(f"Ray is not installed (optional extra: {RAY_INSTALL_HINT})")
    from grcn_bench.benchmarks.executors import start_local_ray

    start_local_ray(num_cpus=2)
    ray = import_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory, plugin, ray_session):
    store = ResultStore(tmp_path_factory.mktemp("ray"))
    results = run_grid(PARALLEL_GRID, store, executor="ray", plugins=[plugin], progress=False)
    assert [r["cell_id"] for r in results] == [c.cell_id for c in PARALLEL_GRID]
    assert ray_session.is_initialized()  # a session the caller started is left running
    return store


PARALLEL = ["process_store", pytest.param("ray_store", marks=pytest.mark.ray)]


@pytest.mark.parametrize("executor_store", PARALLEL)
def test_parallel_executors_give_the_serial_results_bit_for_bit(request, serial_store, executor_store):
    store = request.getfixturevalue(executor_store)
    for cell in GOOD:
        expected, got = serial_store.read(cell.cell_id), store.read(cell.cell_id)
        assert expected["status"] == "ok" and expected["test_metrics"]["recall@10"] > 0
        assert outcome(got) == outcome(expected), cell.cell_id
        expected_arrays, got_arrays = serial_store.read_arrays(cell.cell_id), store.read_arrays(cell.cell_id)
        assert sorted(got_arrays) == sorted(expected_arrays) and "test_users" in got_arrays
        for name, values in expected_arrays.items():
            np.testing.assert_array_equal(got_arrays[name], values, err_msg=f"{cell.cell_id} {name}")
    assert all(not p.name.endswith(".tmp") for p in store.cells_dir.iterdir())
    assert not list(store.checkpoints_dir.glob("*.pt"))  # every finished or lost cell removed its checkpoint


@pytest.mark.parametrize("executor_store", ["serial_store", *PARALLEL])
def test_a_cell_that_raises_is_stored_failed_with_its_traceback(request, executor_store):
    store = request.getfixturevalue(executor_store)
    failed = store.read(RAISES.cell_id)
    assert failed["status"] == "failed"
    assert failed["error"] == "RuntimeError: planted failure in epoch 2"
    assert "raise RuntimeError" in failed["traceback"] and "in forward" in failed["traceback"]
    assert failed["cell"] == RAISES.to_dict()
    assert [store.status(c.cell_id) for c in GOOD] == ["ok"] * len(GOOD)


def test_a_worker_killed_mid_cell_is_stored_failed_and_the_pool_goes_on(process_store):
    lost = process_store.read(DIES.cell_id)
    assert lost["status"] == "failed" and lost["executor"] == "process"
    assert lost["error"].startswith("WorkerDied: the worker process running this cell was killed by SIGKILL")
    assert lost["cell"] == DIES.to_dict() and lost["traceback"] is None
    # The other cells all completed, including those handed to the replacement of the dead worker.
    assert sorted(process_store.cell_ids()) == sorted(c.cell_id for c in PARALLEL_GRID)
    assert [process_store.status(c.cell_id) for c in GOOD] == ["ok"] * len(GOOD)


@pytest.mark.ray
def test_a_ray_task_whose_worker_dies_is_stored_failed(ray_store):
    lost = ray_store.read(DIES.cell_id)
    assert lost["status"] == "failed" and lost["executor"] == "ray"
    assert lost["error"].startswith("WorkerCrashedError")
    assert [ray_store.status(c.cell_id) for c in GOOD] == ["ok"] * len(GOOD)


def test_retry_failed_reruns_exactly_the_failed_cells(process_store, plugin):
    cells = [*GOOD, RAISES]  # not the dying cell: one worker to start, not two
    before = {c.cell_id: result_stamp(process_store, c.cell_id) for c in cells}
    results = run_grid(cells, process_store, executor="process", workers=2, plugins=[plugin], retry_failed=True,
                       progress=False)
    assert [r["cell_id"] for r in results] == [RAISES.cell_id]
    assert process_store.status(RAISES.cell_id) == "failed"
    assert result_stamp(process_store, RAISES.cell_id) != before[RAISES.cell_id]  # rerun, and failed again
    for cell in GOOD:
        assert result_stamp(process_store, cell.cell_id) == before[cell.cell_id]
    assert run_grid(PARALLEL_GRID, process_store, executor="process", plugins=[plugin], progress=False) == []


@pytest.mark.ray
def test_a_local_ray_session_listens_on_and_talks_to_127_0_0_1_only(ray_store, ray_session):
    import psutil

    assert ray_session.util.get_node_ip_address() == "127.0.0.1"
    assert ray_session.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    assert any("raylet" in p.name() for p in processes)  # Ray's daemons are children of the driver: all are seen
    listening, connected = [], []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for conn in connections:
            (listening if conn.status == psutil.CONN_LISTEN else connected).append(conn)
            for addr in (conn.laddr, conn.raddr):
                if addr:
                    assert _ipv4(addr.ip) == "127.0.0.1", (process.name(), conn)
    assert listening and connected  # the check above saw Ray's sockets, so it could have failed


def _ipv4(ip: str) -> str:
    """The address as IPv4 text: Ray's IPv6 sockets show 127.0.0.1 as ::ffff:127.0.0.1. "::" and "::1" stay as they
    are, and so fail the comparison with 127.0.0.1."""
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def test_ipv4_normalisation_rejects_wildcards_and_ipv6_loopback():
    assert _ipv4("::ffff:127.0.0.1") == "127.0.0.1" and _ipv4("127.0.0.1") == "127.0.0.1"
    assert {_ipv4("0.0.0.0"), _ipv4("::"), _ipv4("::1"), _ipv4("10.0.0.5")}.isdisjoint({"127.0.0.1"})


KILL_SCRIPT_SEEDS = [str(s) for s in range(8)]


def test_killing_the_runner_mid_grid_loses_nothing_and_a_rerun_skips_finished_cells(tmp_path, plugin):
    out = tmp_path / "killed"
    command = [sys.executable, str(REPO / "run_benchmarks.py"), "run", "--models", "exec_test_slow",
               "--datasets", "synthetic:tiny", "--seeds", *KILL_SCRIPT_SEEDS, "--max-epochs", "2", "--lr", "0.01",
               "--out", str(out), "--plugin", plugin, "--no-report", "--no-progress"]
    # Slow enough to be killed mid-grid (the sleep is not part of the cell ids); one thread, as in this process.
    env = {**os.environ, "EXEC_TEST_SLEEP": "0.15", "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = ResultStore(out)
    deadline = time.monotonic() + 120
    while len(store.cell_ids()) < 2 and runner.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert runner.poll() is None, f"the runner ended before it could be killed: {runner.stderr.read().decode()}"
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    runner.stderr.close()

    cells = [Cell.from_dict(c) for c in json.loads((out / "experiment.json").read_text())["cells"]]
    assert len(cells) == len(KILL_SCRIPT_SEEDS)
    finished = store.cell_ids()
    assert 2 <= len(finished) < len(cells)
    for path in store.cells_dir.glob("*.json"):  # complete files only: every JSON parses and has its arrays
        result = json.loads(path.read_text())
        assert result["status"] == "ok" and store.read_arrays(result["cell_id"])["test_users"].size > 0
    stamps = {cell_id: result_stamp(store, cell_id) for cell_id in finished}

    with one_torch_thread():
        rerun = run_grid(cells, store, plugins=[plugin], progress=False)
    assert sorted(r["cell_id"] for r in rerun) == sorted(c.cell_id for c in cells if c.cell_id not in finished)
    assert {cell_id: result_stamp(store, cell_id) for cell_id in finished} == stamps  # not rerun
    assert store.cell_ids() == sorted(c.cell_id for c in cells)
    assert not [p for p in store.cells_dir.iterdir() if p.name.endswith(".tmp")]  # the rerun left none of its own

    uninterrupted = ResultStore(tmp_path / "uninterrupted")
    with one_torch_thread():
        run_grid(cells, uninterrupted, plugins=[plugin], progress=False)
    assert uninterrupted.cell_ids() == store.cell_ids()
    for cell_id in store.cell_ids():
        assert outcome(store.read(cell_id)) == outcome(uninterrupted.read(cell_id)), cell_id


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out.update(int(child) for child in (task / "children").read_text().split())
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent (now init) has not reaped it yet


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_process_workers_die_with_a_killed_runner(tmp_path, plugin):
    out = tmp_path / "orphans"
    command = [sys.executable, str(REPO / "run_benchmarks.py"), "run", "--models", "exec_test_slow",
               "--datasets", "synthetic:tiny", "--seeds", "0", "1", "--max-epochs", "2", "--lr", "0.01",
               "--executor", "process", "--workers", "2", "--threads-per-worker", "1",
               "--out", str(out), "--plugin", plugin, "--no-report", "--no-progress"]
    runner = subprocess.Popen(command, env={**os.environ, "EXEC_TEST_SLEEP": "60"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    logs = ResultStore(out).logs_dir
    deadline = time.monotonic() + 120
    while runner.poll() is None and time.monotonic() < deadline and len(list(logs.glob("*.log"))) < 2:
        time.sleep(0.1)  # both workers are inside a cell (each opened its log), sleeping in its first batch
    workers = _children(runner.pid)
    assert runner.poll() is None and len(list(logs.glob("*.log"))) == 2 and workers
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived their runner"


@pytest.mark.ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads Linux's /proc")
def test_a_local_ray_session_dies_with_a_killed_runner(tmp_path, plugin):
    if not HAS_RAY:
        pytest.skip(f"Ray is not installed (optional extra: {RAY_INSTALL_HINT})")
    out = tmp_path / "ray-orphans"
    command = [sys.executable, str(REPO / "run_benchmarks.py"), "run", "--models", "exec_test_slow",
               "--datasets", "synthetic:tiny", "--seeds", "0", "--max-epochs", "2", "--lr", "0.01",
               "--executor", "ray", "--workers", "1", "--threads-per-worker", "1",
               "--out", str(out), "--plugin", plugin, "--no-report", "--no-progress"]
    runner = subprocess.Popen(command, env={**os.environ, "EXEC_TEST_SLEEP": "60"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    logs = ResultStore(out).logs_dir
    deadline = time.monotonic() + 300  # Ray's start is slow on a busy machine
    while runner.poll() is None and time.monotonic() < deadline and not list(logs.glob("*.log")):
        time.sleep(0.1)  # the task is inside its cell: Ray's whole session is up
    ray_processes = _descendants(runner.pid)
    agents = [pid for pid in ray_processes if "Agent" in _command(pid)]
    assert runner.poll() is None and list(logs.glob("*.log")) and agents, "the Ray session did not come up"
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=30)
    # Ray's agents notice a dead raylet only after a polling period of about a minute; the reaper ends them now.
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [(pid, _command(pid)) for pid in ray_processes if _alive(pid)], "Ray processes outlived the runner"


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        for child in _children(queue.pop()):
            found.append(child)
            queue.append(child)
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------------- cheap paths, no workers


def test_store_listing_ignores_temporary_files_left_by_a_kill(tmp_path):
    store = ResultStore(tmp_path)
    store.write("done", {"status": "ok"})
    (store.cells_dir / ".half.json.x1y2.tmp").write_text('{"status": "o')
    (store.cells_dir / ".done.json.a1b2.tmp").write_text("{")
    assert store.cell_ids() == ["done"] and store.status("half") is None


def test_a_lost_cell_is_recorded_failed_unless_its_result_landed(tmp_path):
    store = ResultStore(tmp_path)
    cell = make_cell("mf")
    stamp = result_stamp(store, cell.cell_id)
    assert stamp is None
    lost = record_lost_cell(store, cell, stamp, reason="WorkerDied: test", device="cpu", seconds=1.5,
                            executor="process")
    assert store.read(cell.cell_id) == lost
    assert lost["status"] == "failed" and lost["error"] == "WorkerDied: test" and lost["cell_id"] == cell.cell_id

    # The worker wrote its result, then died (e.g. while removing its checkpoint): the result stands.
    stamp = result_stamp(store, cell.cell_id)
    time.sleep(0.01)
    store.write(cell.cell_id, {"status": "ok", "cell_id": cell.cell_id, "marker": 1})
    assert record_lost_cell(store, cell, stamp, reason="x", device="cpu", seconds=0, executor="ray")["marker"] == 1
    assert store.read(cell.cell_id)["marker"] == 1

    # An older result (from before this run, e.g. with --force) does not count as landed.
    stamp = result_stamp(store, cell.cell_id)
    store.checkpoint_path(cell.cell_id).parent.mkdir(parents=True, exist_ok=True)
    store.checkpoint_path(cell.cell_id).write_bytes(b"stale")
    assert record_lost_cell(store, cell, stamp, reason="y", device="cpu", seconds=0, executor="ray")["error"] == "y"
    assert store.status(cell.cell_id) == "failed" and not store.checkpoint_path(cell.cell_id).exists()


def test_process_slots_one_worker_per_device_entry():
    assert _process_slots("cpu", ["cuda:0", "cuda:1"], None, cells=10) == ["cuda:0", "cuda:1"]
    assert _process_slots("cpu", ["cuda:0", "cuda:0", "cuda:1"], 3, cells=10) == ["cuda:0", "cuda:0", "cuda:1"]
    assert _process_slots("cpu", None, 3, cells=10) == ["cpu"] * 3
    assert _process_slots("cuda:1", None, None, cells=10) == ["cuda:1"]
    assert _process_slots("cpu", None, 8, cells=2) == ["cpu", "cpu"]  # never more workers than cells
    with pytest.raises(ValueError, match="one worker per device entry"):
        _process_slots("cpu", ["cuda:0", "cuda:1"], 3, cells=10)
    with pytest.raises(ValueError, match="at least one device"):
        _process_slots("cpu", [], None, cells=10)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"executor": "threads"}, "unknown executor 'threads'"),
        ({"executor": "serial", "devices": ["cpu"]}, "devices are for the process executor"),
        ({"executor": "ray", "devices": ["cuda:0"]}, "devices are for the process executor"),
        ({"executor": "serial", "workers": 2}, "serial executor runs one cell at a time"),
        ({"executor": "process", "workers": 0}, "workers must be >= 1"),
        ({"executor": "process", "threads_per_worker": 0}, "threads_per_worker must be >= 1"),
        ({"executor": "ray", "gpus_per_cell": -1}, "gpus_per_cell must be >= 0"),
    ],
)
def test_run_grid_rejects_bad_options_before_running_anything(tmp_path, options, message):
    store = ResultStore(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_grid([make_cell("mf")], store, progress=False, **options)
    assert store.cell_ids() == []


def test_nothing_to_run_starts_no_workers(tmp_path):
    store = ResultStore(tmp_path)
    cell = make_cell("mf")
    store.write(cell.cell_id, {"status": "ok"})
    # Ray is never imported for an empty grid, so this holds whether or not it is installed.
    assert run_grid([cell], store, executor="ray", ray_address="127.0.0.1:1", progress=False) == []
    assert run_grid([cell], store, executor="process", workers=4, progress=False) == []


def test_plugins_load_from_files_and_modules_once(tmp_path, monkeypatch):
    plugin_file = tmp_path / "extra_models.py"
    plugin_file.write_text(PLUGIN_SOURCE.replace("exec_test_", "plugin_test_"))
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "more_models.py").write_text(PLUGIN_SOURCE.replace("exec_test_", "module_test_"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        loaded = load_plugins(["extra_models.py", "pkg.more_models"])
        assert loaded == (str(plugin_file), "pkg.more_models")  # files made absolute for the workers
        assert load_plugins([str(plugin_file)]) == (str(plugin_file),)  # a second load registers nothing twice
        assert {"plugin_test_slow", "module_test_slow"} <= set(available_models())
    finally:
        for name in PLUGIN_MODELS:
            unregister_model(name.replace("exec_test_", "plugin_test_"))
            unregister_model(name.replace("exec_test_", "module_test_"))
        sys.modules.pop("pkg.more_models", None)
        sys.modules.pop("pkg", None)


def test_missing_plugins_are_reported_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="plugin file .*absent.py does not exist"):
        load_plugins([str(tmp_path / "absent.py")])
    with pytest.raises(ValueError, match="plugin 'no_such_plugin_pkg.models': no module named 'no_such_plugin_pkg'"):
        load_plugins(["no_such_plugin_pkg.models"])


def test_a_plugin_that_fails_to_import_raises_its_own_error(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import no_such_dependency_of_the_plugin\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_of_the_plugin"):
        load_plugins([str(broken)])
    assert not [m for m in sys.modules.values() if getattr(m, "__file__", None) == str(broken)]


def test_without_ray_the_ray_executor_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as if it were not installed
    with pytest.raises(MissingExtraError, match=r'pip install "grcn-bench\[ray\]"'):
        import_ray()
    code = cli.main(["run", "--executor", "ray", "--models", "mf", "--datasets", "synthetic:tiny", "--max-epochs",
                     "1", "--out", str(tmp_path), "--no-report", "--no-progress"])
    assert code == 2
    assert RAY_INSTALL_HINT in capsys.readouterr().err
    assert ResultStore(tmp_path).cell_ids() == []


def test_cli_options_reach_the_executor(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("grcn_bench.benchmarks.executors.run_grid",
                        lambda cells, store, **options: seen.update(options, cells=cells) or [])
    code = cli.main(["run", "--models", "mf", "--datasets", "synthetic:tiny", "--out", str(tmp_path), "--no-report",
                     "--executor", "process", "--devices", "cuda:0", "cuda:1", "--threads-per-worker", "3",
                     "--retry-failed"])
    assert code == 0
    assert seen["executor"] == "process" and seen["devices"] == ["cuda:0", "cuda:1"]
    # The search decides what reruns (--retry-failed, --force) and hands the executor exactly those cells.
    assert seen["threads_per_worker"] == 3 and seen["force"] is True and seen["workers"] is None
    code = cli.main(["run", "--models", "mf", "--datasets", "synthetic:tiny", "--out", str(tmp_path), "--no-report",
                     "--executor", "ray", "--ray-address", "auto", "--workers", "4"])
    assert code == 0 and seen["ray_address"] == "auto" and seen["workers"] == 4 and seen["executor"] == "ray"
