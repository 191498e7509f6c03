"""Executors: run a grid of cells one after another, on a local process pool, or as Ray tasks (docs/cluster.md).

Every executor calls the same :func:`~.runner.run_cell` on the same cells, so all give the same results. A worker
writes its own cell's files into the results directory (atomically, see :mod:`.store`), so workers on other machines
need the results directory on a filesystem they all share. What differs between executors is who runs a cell and
what happens when the process running it dies:

* ``serial`` (the default) runs the cells in this process.
* ``process`` runs them on a pool of local worker processes, started with ``spawn`` (not ``fork``) so that each one
  begins with clean torch and OpenMP state. There is one worker per entry of ``devices`` (for example
  ``["cuda:0", "cuda:1"]``, or ``["cpu"] * 4``), each running one cell at a time with ``threads_per_worker`` torch
  threads. A worker that dies (a segfault, the OOM killer, ``kill -9``) breaks only its own single-process pool:
  its cell is stored ``failed`` with the reason, a fresh worker replaces it, and the grid goes on.
* ``ray`` submits each cell as a Ray task that asks for ``threads_per_worker`` CPUs and, on CUDA, ``gpus_per_cell``
  GPUs, to a local Ray session or to a cluster (``ray_address``). A task whose worker dies is stored ``failed``.

A cell whose model raises is stored ``failed`` with its traceback by ``run_cell`` itself, in the worker. Killing the
runner loses no finished cell: a rerun skips every cell with a result file, and ``retry_failed`` reruns only the
failed ones.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from .config import Cell
from .memory import keep_freed_memory
from .runner import environment, pending_cells, run_cell
from .store import ResultStore

EXECUTORS = ("serial", "process", "ray")
RAY_INSTALL_HINT = 'pip install "grcn-bench[ray]"'
# Ray reads this when it is imported: "0" makes it use 127.0.0.1 as the node address, so that a local session
# binds and advertises only the loopback interface instead of the machine's external address.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

ResultStamp = tuple[int, int, int] | None


class MissingExtraError(ImportError):
    """An optional dependency (an extra of the package) is needed and not installed."""


def run_grid(
    cells: Iterable[Cell],
    store: ResultStore,
    *,
    executor: str = "serial",
    workers: int | None = None,
    devices: Sequence[str] | None = None,
    threads_per_worker: int | None = None,
    gpus_per_cell: float | None = None,
    ray_address: str | None = None,
    plugins: Sequence[str] = (),
    force: bool = False,
    retry_failed: bool = False,
    embeddings_for: frozenset[str] = frozenset(),
    **run_options: Any,
) -> list[dict[str, Any]]:
    """Run every cell not yet stored (all with ``force``; stored-as-failed ones too with ``retry_failed``).

    Args:
        cells: the grid; duplicates run once.
        store: the results directory every worker writes to.
        executor: ``"serial"``, ``"process"`` or ``"ray"``.
        workers: process pool size (default: one per core on CPU, one on CUDA); for a local Ray session, its CPUs.
        devices: process executor only: one worker per entry; cells go to whichever device is free, round-robin
            at the start (default: ``workers`` times ``run_options["device"]``).
        threads_per_worker: torch threads per worker (process: default cores // workers, at least 1); for Ray, the
            CPUs each cell asks for (default 1).
        gpus_per_cell: Ray only: GPUs each cell asks for (default 1 when ``device`` is CUDA, else 0).
        ray_address: Ray only: the cluster to join (``"auto"``, ``"10.0.0.1:6379"``); default: a new local session,
            on the loopback interface only.
        plugins: modules (``mypkg.models``) or ``.py`` files imported here and in every worker before any cell
            runs, e.g. to register models that live outside the package.
        force: rerun cells that already have a result.
        retry_failed: rerun cells stored as ``failed``.
        embeddings_for: ids of cells that also store their final embeddings (the t-SNE figure needs them).
        **run_options: passed to :func:`~.runner.run_cell` (``device``, ``eval_memory``, ``progress``,
            ``keep_embeddings``, ``dataset_loader``). ``progress`` draws a bar over cells; per-epoch bars are drawn
            only by the serial executor.

    Returns:
        The results of the cells that ran, in grid order.

    A script that calls this with the process executor needs the usual ``if __name__ == "__main__":`` guard: worker
    processes are spawned, and each one imports the script's main module.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; expected one of {', '.join(EXECUTORS)}")
    if devices is not None and executor != "process":
        raise ValueError(f"devices are for the process executor (got executor {executor!r}); "
                         "use device for a single one")
    if executor == "serial" and workers not in (None, 1):
        raise ValueError(f"the serial executor runs one cell at a time (got workers={workers}); "
                         "use executor 'process' or 'ray' for more")
    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if gpus_per_cell is not None and gpus_per_cell < 0:
        raise ValueError(f"gpus_per_cell must be >= 0, got {gpus_per_cell}")
    plugins = load_plugins(plugins)
    # A result another runner on the same directory stores from now on is taken as is (docs/layout.md).
    run_options.setdefault("stored_since", time.time())
    todo = pending_cells(cells, store, force=force, retry_failed=retry_failed)
    keep_all = bool(run_options.pop("keep_embeddings", False))
    progress = bool(run_options.pop("progress", True))
    device = str(run_options.pop("device", "cpu"))
    keep = {cell.cell_id: keep_all or cell.cell_id in embeddings_for for cell in todo}
    if not todo:
        return []
    if executor == "serial":
        return _run_serial(todo, store, keep, device=device, progress=progress, run_options=run_options)
    if executor == "process":
        slots = _process_slots(device, devices, workers, len(todo))
        threads = threads_per_worker or max(1, available_cores() // len(slots))
        results = _run_process(todo, store, keep, slots=slots, threads=threads, plugins=plugins, progress=progress,
                               run_options=run_options)
    else:
        results = _run_ray(todo, store, keep, device=device, workers=workers, threads=threads_per_worker or 1,
                           gpus_per_cell=gpus_per_cell, ray_address=ray_address, plugins=plugins, progress=progress,
                           run_options=run_options)
    return [results[cell.cell_id] for cell in todo]


def available_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def load_plugins(plugins: Iterable[str]) -> tuple[str, ...]:
    """Import plugin modules (dotted names) and ``.py`` files, once per process; returns them as workers import them
    (file paths made absolute, since workers may start in another directory)."""
    loaded = []
    for plugin in plugins:
        if plugin.endswith(".py") or os.sep in plugin or "/" in plugin:
            path = Path(plugin).expanduser().resolve()
            _import_file(path)
            loaded.append(str(path))
        else:
            _import_module(plugin)
            loaded.append(plugin)
    return tuple(loaded)


def _import_module(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            raise ValueError(f"plugin {name!r}: no module named {err.name!r} (give a module importable here and in "
                             "every worker, or the path of a .py file)") from err
        raise


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"plugin file {path} does not exist")
    # A name derived from the full path: loading the same file twice must not register its models twice.
    name = f"grcn_bench_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"plugin file {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _cell_bar(total: int, executor: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"cells ({executor})", unit="cell", disable=not progress, dynamic_ncols=True)


def _run_serial(todo: list[Cell], store: ResultStore, keep: dict[str, bool], *, device: str, progress: bool,
                run_options: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    with _cell_bar(len(todo), "serial", progress) as bar:
        for cell in todo:
            results.append(run_cell(cell, store, device=device, progress=progress, keep_embeddings=keep[cell.cell_id],
                                    **run_options))
            bar.update(1)
    return results


# ---------------------------------------------------------------------------------------------------- process pool


def _process_slots(device: str, devices: Sequence[str] | None, workers: int | None, cells: int) -> list[str]:
    """The device of each worker: one per ``devices`` entry, else ``workers`` copies of ``device``."""
    if devices is not None:
        if not devices:
            raise ValueError("devices must name at least one device")
        if workers is not None and workers != len(devices):
            raise ValueError(f"the process executor runs one worker per device entry: workers={workers} does not "
                             f"match {len(devices)} devices; repeat a device to run several workers on it")
        slots = [str(d) for d in devices]
    else:
        slots = [device] * (workers or (available_cores() if device == "cpu" else 1))
    return slots[:cells]  # no idle workers


def die_with_parent(parent_pid: int) -> None:
    """Make this process die when ``parent_pid`` (the runner) does, even by SIGKILL: a worker left behind would
    finish its cell with nobody to collect it, then block forever holding its memory.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``. The parent may have died before the call, so the parent is checked
    afterwards too. Elsewhere this does nothing (the runner's normal exit still ends the pool).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_init(threads: int, plugins: tuple[str, ...], parent_pid: int | None = None) -> None:
    """Runs once in each new worker process."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    keep_freed_memory()
    torch.set_num_threads(threads)
    load_plugins(plugins)


def _worker_run(cell: Cell, root: str, device: str, keep_embeddings: bool,
                run_options: dict[str, Any]) -> dict[str, Any]:
    if device.startswith("cuda:"):  # code that asks for "the" CUDA device (memory statistics) gets this one
        torch.cuda.set_device(torch.device(device))
    return run_cell(cell, ResultStore(root), device=device, progress=False, keep_embeddings=keep_embeddings,
                    **run_options)


def _run_process(todo: list[Cell], store: ResultStore, keep: dict[str, bool], *, slots: list[str], threads: int,
                 plugins: tuple[str, ...], progress: bool, run_options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    root = str(store.root.resolve())

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_worker_init,
                                   initargs=(threads, plugins, os.getpid()))

    # One single-process pool per slot: a worker's death breaks only its own pool, and never the cells of others.
    pools: list[ProcessPoolExecutor | None] = [None] * len(slots)
    queue = deque(todo)
    running: dict[Future, tuple[int, Cell, ResultStamp, float]] = {}
    results: dict[str, dict[str, Any]] = {}
    with _cell_bar(len(todo), "process", progress) as bar:
        try:
            while queue or running:
                busy = {slot for slot, *_ in running.values()}
                for slot, device in enumerate(slots):
                    if queue and slot not in busy:
                        cell = queue.popleft()
                        pool = pools[slot] = pools[slot] or new_pool()
                        stamp = result_stamp(store, cell.cell_id)
                        future = pool.submit(_worker_run, cell, root, device, keep[cell.cell_id], run_options)
                        running[future] = (slot, cell, stamp, time.perf_counter())
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    slot, cell, stamp, started = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool as err:
                        exit_code = _retire_broken_pool(pools[slot])
                        pools[slot] = None
                        result = record_lost_cell(store, cell, stamp, reason=_death_reason(err, exit_code),
                                                  device=slots[slot], seconds=time.perf_counter() - started,
                                                  executor="process")
                    except Exception as err:  # e.g. a result that could not be sent back: the cell is still lost
                        result = record_lost_cell(store, cell, stamp, reason=f"{type(err).__name__}: {err}",
                                                  device=slots[slot], seconds=time.perf_counter() - started,
                                                  executor="process", trace=traceback.format_exc())
                    results[cell.cell_id] = result
                    bar.update(1)
        finally:
            # On an interrupt, workers in the terminal's process group got the same SIGINT and stop their cell.
            for pool in pools:
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
    return results


def _retire_broken_pool(pool: ProcessPoolExecutor | None) -> int | None:
    """Shut a broken pool down and return its dead worker's exit code, when the pool lets us see it."""
    if pool is None:
        return None
    processes = list((getattr(pool, "_processes", None) or {}).values())  # private: diagnostics only
    pool.shutdown(wait=True)
    codes = [p.exitcode for p in processes if getattr(p, "exitcode", None) not in (None, 0)]
    return codes[0] if codes else None


def _death_reason(err: BaseException, exit_code: int | None) -> str:
    if exit_code is not None and exit_code < 0:
        try:
            how = f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            how = f"killed by signal {-exit_code}"
    elif exit_code is not None:
        how = f"exited with code {exit_code}"
    else:
        how = "terminated abruptly"
    return (f"WorkerDied: the worker process running this cell was {how} (a crash in native code, the out-of-memory "
            f"killer or a kill signal): {err}")


# ---------------------------------------------------------------------------------------------------- lost cells


def result_stamp(store: ResultStore, cell_id: str) -> ResultStamp:
    """Identity of a cell's result file (inode, mtime, size), or None: tells whether a worker wrote a new one."""
    try:
        stat = store.result_path(cell_id).stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def record_lost_cell(store: ResultStore, cell: Cell, stamp: ResultStamp, *, reason: str, device: str, seconds: float,
                     executor: str, trace: str | None = None) -> dict[str, Any]:
    """Store a cell whose worker died as ``failed`` with ``reason``, unless its worker wrote a result before dying
    (then that result stands). ``stamp`` is :func:`result_stamp` taken before the cell was handed out."""
    if store.has(cell.cell_id) and result_stamp(store, cell.cell_id) != stamp:
        return store.read(cell.cell_id)
    result = {
        "cell": cell.to_dict(),
        "cell_id": cell.cell_id,
        "environment": environment(device),
        "status": "failed",
        "error": reason,
        "traceback": trace,
        "executor": executor,
        "seconds": seconds,
        "peak_rss_bytes": None,
    }
    store.write(cell.cell_id, result)
    store.checkpoint_path(cell.cell_id).unlink(missing_ok=True)
    return result


# ---------------------------------------------------------------------------------------------------- Ray


def import_ray():
    """Ray, the optional extra, imported on first use."""
    try:
        import ray
    except ImportError as err:
        raise MissingExtraError(f"the Ray executor needs Ray, an optional extra: {RAY_INSTALL_HINT}") from err
    return ray


def start_local_ray(num_cpus: int, **init_options: Any):
    """Start a Ray session on this machine that listens on, and talks to, 127.0.0.1 only.

    Ray otherwise binds every interface and advertises the machine's external address. The dashboard is off and so
    is Ray's usage reporting (unless the environment turns it on explicitly). Returns ``ray.init``'s context.
    """
    os.environ[RAY_LOOPBACK_ENV] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = import_ray()
    try:  # the variable is read once, when Ray is imported: correct it if Ray was imported before it was set
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):
        pass
    before = set(_descendants(os.getpid()))
    context = ray.init(num_cpus=num_cpus, include_dashboard=False, **init_options)
    address = ray.util.get_node_ip_address()
    if address != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"the local Ray session came up on {address}, not 127.0.0.1; refusing to run on it")
    reap_on_exit([pid for pid in _descendants(os.getpid()) if pid not in before])
    return context


# The reaper: blocks until its stdin reaches end of file, which happens when the process holding the other end exits
# in any way (SIGKILL included), then kills each listed process that is still the one listed (same start time, so a
# recycled pid is never hit). Plain Python, no imports from the suite: it must start fast and depend on nothing.
_REAPER = """
import os, signal, sys
sys.stdin.buffer.read()
for entry in sys.argv[1:]:
    pid, started = entry.split(":")
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[19] != started:
                continue
        os.kill(int(pid), signal.SIGKILL)
    except (OSError, IndexError):
        pass
"""
_reapers: list[Any] = []


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; none elsewhere), children before grandchildren."""
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            queue.extend(children)
    return found


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def reap_on_exit(pids: Sequence[int]) -> None:
    """Make ``pids`` (a local Ray session's processes) die when this process does, even by SIGKILL.

    Ray's own processes watch the driver or the raylet, but its dashboard and runtime-env agents only notice the
    raylet's death after a polling period, and on a killed runner they are left behind meanwhile. A small reaper
    process waits for this process to end (its stdin pipe closes) and kills what is left of them. Linux only; the
    normal path (``ray.shutdown``) is unchanged, and the reaper then finds nothing to kill.
    """
    entries = [f"{pid}:{started}" for pid in pids if (started := _start_time(pid)) is not None]
    if not entries:
        return
    import subprocess

    reaper = subprocess.Popen([sys.executable, "-c", _REAPER, *entries], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _reapers.append(reaper)  # keeps the pipe's write end open for as long as this process lives


def _ray_cell(cell: Cell, root: str, device: str, keep_embeddings: bool, threads: int, plugins: tuple[str, ...],
              run_options: dict[str, Any]) -> dict[str, Any]:
    """The Ray task: Ray reuses worker processes, so the thread count and plugins are (cheaply) set every time."""
    _worker_init(threads, plugins)
    return _worker_run(cell, root, device, keep_embeddings, run_options)


def _run_ray(todo: list[Cell], store: ResultStore, keep: dict[str, bool], *, device: str, workers: int | None,
             threads: int, gpus_per_cell: float | None, ray_address: str | None, plugins: tuple[str, ...],
             progress: bool, run_options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        if ray_address:
            ray.init(address=ray_address)
        else:
            num_cpus = workers or available_cores()
            if threads > num_cpus:
                raise ValueError(f"each cell asks for {threads} CPUs but the local Ray session has {num_cpus}")
            start_local_ray(num_cpus)
    on_gpu = device.startswith("cuda")
    gpus = (1.0 if on_gpu else 0.0) if gpus_per_cell is None else gpus_per_cell
    # Ray hides all but the task's GPUs (CUDA_VISIBLE_DEVICES): "cuda" is the one it assigned.
    task_device = "cuda" if on_gpu else device
    # No retries: a cell that killed its worker (out of memory, say) would most likely kill the next one too.
    task = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=0)(_ray_cell)
    root = str(store.root.resolve())
    pending: dict[Any, tuple[Cell, ResultStamp, float]] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for cell in todo:
            stamp = result_stamp(store, cell.cell_id)
            ref = task.options(name=f"cell:{cell.cell_id}").remote(cell, root, task_device, keep[cell.cell_id],
                                                                    threads, plugins, run_options)
            pending[ref] = (cell, stamp, time.perf_counter())
        with _cell_bar(len(todo), "ray", progress) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    cell, stamp, started = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as err:  # the worker died, or the node, or the task was cancelled
                        reason = f"{type(err).__name__}: {_first_line(err)}"
                        result = record_lost_cell(store, cell, stamp, reason=reason, device=device,
                                                  seconds=time.perf_counter() - started, executor="ray",
                                                  trace=str(err))
                    results[cell.cell_id] = result
                    bar.update(1)
    finally:
        for ref in pending:  # interrupted: do not leave the cluster busy with a grid nobody waits for
            _try(lambda ref=ref: ray.cancel(ref, force=True))
        if started_here:
            ray.shutdown()
    return results


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _try(action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception:  # best effort while unwinding
        pass
