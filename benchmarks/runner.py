"""Run one cell end to end (docs/layout.md, "Data flow of one cell") and store its result.

``load_dataset`` (cached per process) -> ``get_model(...)`` -> ``trainer.fit`` (validation every epoch) -> best state
restored -> test evaluated once -> ``store.write``. A cell that raises is stored as ``failed`` with its traceback;
one whose loss stops being finite as ``diverged``. Either way the grid goes on.
"""

from __future__ import annotations

import functools
import logging
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grcn_bench.datasets import load_dataset
from grcn_bench.datasets.base import RecDataset
from grcn_bench.models import get_model

from .config import Cell
from .evaluator import EvalResult, evaluate
from .store import CorruptEntryError, ResultStore
from .trainer import fit, seed_everything

log = logging.getLogger("grcn_bench.runner")

DEFAULT_EVAL_MEMORY = 1 << 30  # bytes of scores per evaluation batch


@functools.lru_cache(maxsize=4)
def cached_dataset(spec: str) -> RecDataset:
    """Load a dataset once per process: the cells of a grid share it (datasets are immutable after loading)."""
    return load_dataset(spec)


#: The status :func:`run_cell` returns, without storing anything, for a cell that another runner is training.
CLAIMED = "claimed"


def run_cell(
    cell: Cell,
    store: ResultStore,
    *,
    device: str = "cpu",
    eval_memory: int = DEFAULT_EVAL_MEMORY,
    progress: bool = True,
    keep_embeddings: bool = False,
    dataset_loader: Callable[[str], RecDataset] = cached_dataset,
    stored_since: float | None = None,
) -> dict[str, Any]:
    """Train and test one cell, write its result to ``store`` and return it (never raises for a model error).

    The cell is claimed first (:meth:`.ResultStore.claim`), so that runners sharing a results directory never train
    it twice: one that another process is training returns ``{"status": "claimed"}`` at once, and one whose result
    another runner stored at or after ``stored_since`` (the caller's start) returns that result.
    """
    with store.claim(cell.cell_id) as mine:
        if not mine:
            return {"cell": cell.to_dict(), "cell_id": cell.cell_id, "status": CLAIMED}
        if stored_since is not None and store.has(cell.cell_id) and \
                store.result_path(cell.cell_id).stat().st_mtime >= stored_since:
            return store.read(cell.cell_id)
        return _run_cell(cell, store, device=device, eval_memory=eval_memory, progress=progress,
                         keep_embeddings=keep_embeddings, dataset_loader=dataset_loader)


def _run_cell(
    cell: Cell,
    store: ResultStore,
    *,
    device: str,
    eval_memory: int,
    progress: bool,
    keep_embeddings: bool,
    dataset_loader: Callable[[str], RecDataset],
) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    if device.startswith("cuda") and torch.cuda.is_available():  # a reused worker: peak of this cell only
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    result: dict[str, Any] = {"cell": cell.to_dict(), "cell_id": cell.cell_id, "environment": environment(device)}
    arrays: dict[str, np.ndarray] = {}
    log_path = store.log_path(cell.cell_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log_path.open("w") as log_file:

            def epoch_log(line: str) -> None:
                log_file.write(line + "\n")
                log_file.flush()
                log.debug("%s %s", cell.cell_id, line)

            result.update(_train_and_test(cell, store, device, eval_memory, progress, keep_embeddings,
                                          dataset_loader, epoch_log, arrays))
    except Exception as err:  # the grid must go on: record the failure with its reason
        log.error("cell %s failed: %s", cell.cell_id, err)
        result.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        arrays.clear()
    result["seconds"] = time.perf_counter() - started
    # CPU time of this process (all its threads): what a cell costs, much less sensitive than wall time to
    # whatever else the machine runs.
    result["cpu_seconds"] = time.process_time() - cpu_started
    result["peak_rss_bytes"] = peak_rss_bytes()
    if device.startswith("cuda") and torch.cuda.is_available():
        result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(torch.device(device)))
    store.write(cell.cell_id, result, arrays)
    store.checkpoint_path(cell.cell_id).unlink(missing_ok=True)
    return result


def _train_and_test(
    cell: Cell,
    store: ResultStore,
    device: str,
    eval_memory: int,
    progress: bool,
    keep_embeddings: bool,
    dataset_loader: Callable[[str], RecDataset],
    epoch_log: Callable[[str], None],
    arrays: dict[str, np.ndarray],
) -> dict[str, Any]:
    settings = cell.settings
    dataset = dataset_loader(cell.dataset)
    graph = dataset.graph().to(device)
    seed_everything(settings.seed)
    model = get_model(cell.model)(dataset.info(), **cell.options).to(device)
    # Standard protocol selects on validation; the released code's protocol selects on test.
    selection_split = "val" if settings.protocol == "standard" else "test"

    def run_eval(split: str) -> EvalResult:
        return evaluate(model, dataset, split, ks=settings.ks, graph=graph, memory_budget=eval_memory,
                        protocol=settings.protocol, device=device)

    fitted = fit(
        model, dataset, settings, lambda m, epoch: run_eval(selection_split).mean(),
        graph=graph, device=device, checkpoint_path=store.checkpoint_path(cell.cell_id), progress=progress,
        description=f"{cell.label or cell.model} on {cell.dataset} (seed {settings.seed})", epoch_log=epoch_log,
    )
    out: dict[str, Any] = {
        "status": fitted.status,
        "stop_reason": fitted.stop_reason,
        "best_epoch": fitted.best_epoch,
        "epochs_run": fitted.epochs_run,
        "selection_split": selection_split,
        "best_selection_metrics": fitted.best_metrics,
        "history": [record.to_dict() for record in fitted.history],
        "dataset_card": dataset.card.to_dict(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "test_metrics": None,
        "val_metrics": None,
    }
    if fitted.best_state is None:  # diverged before any epoch finished: nothing to test
        return out
    if not cell.final:  # a rung of successive halving: selection reads validation only, test is never touched
        out["val_metrics"] = fitted.best_metrics if selection_split == "val" else None
        return out
    started = time.perf_counter()
    test = run_eval("test")
    out["test_seconds"] = time.perf_counter() - started
    out["test_metrics"] = test.mean()
    out["val_metrics"] = fitted.best_metrics if selection_split == "val" else run_eval("val").mean()
    arrays["test_users"] = test.users
    arrays.update({f"test_{name}": values for name, values in test.per_user.items()})
    model.eval()
    with torch.no_grad():
        emb = model(graph)
    if emb.edge_weight is not None and dataset.train_noise is not None:
        out["edge_weight_auc"] = edge_weight_auc(graph, emb.edge_weight, dataset.train_noise)
    if keep_embeddings:
        arrays["user_embedding"] = emb.user.detach().cpu().numpy()
        arrays["item_embedding"] = emb.item.detach().cpu().numpy()
    return out


def edge_weight_auc(graph, edge_weight: torch.Tensor, noise: torch.Tensor) -> dict[str, float] | None:
    """ROC-AUC of learned edge weights at telling labelled false-positive train pairs from the rest (docs/protocol.md,
    "Noise robustness").

    A lower weight should mean "more likely noise", so the score of a pair is its negated weight; reported for the
    weight the user puts on the item (``user_side``), the item on the user (``item_side``) and their sum (``mean``).

    Softmax-normalised weights (GRCN's Eq. 5, GAT's attention) also carry a ``1/degree`` scale that differs from one
    neighbourhood to the next, and a global AUC then mostly ranks neighbourhood sizes. The ``*_relative`` keys
    score each weight relative to a uniform weight over its receiver's neighbourhood (weight x in-degree of the
    receiver): the same order inside every neighbourhood, without the size; ``relative`` sums both sides.

    Returns ``None`` when the labels are all one class (no AUC exists).
    """
    from sklearn.metrics import roc_auc_score

    labels = noise.cpu().numpy().astype(bool)
    if labels.all() or not labels.any():
        return None
    receiver_degree = graph.degree().to(edge_weight.dtype).index_select(0, graph.edge_index[1])
    sides = {
        "": graph.pair_weights(edge_weight.detach()),
        "_relative": graph.pair_weights(edge_weight.detach() * receiver_degree),
    }
    out = {}
    for suffix, (user_side, item_side) in sides.items():
        user_side, item_side = user_side.double().cpu().numpy(), item_side.double().cpu().numpy()
        out[f"user_side{suffix}"] = float(roc_auc_score(labels, -user_side))
        out[f"item_side{suffix}"] = float(roc_auc_score(labels, -item_side))
        out["mean" if not suffix else "relative"] = float(roc_auc_score(labels, -(user_side + item_side)))
    return out


def pending_cells(cells: Iterable[Cell], store: ResultStore, *, force: bool = False,
                  retry_failed: bool = False) -> list[Cell]:
    """Cells that still need running, in order, without duplicates."""
    seen: set[str] = set()
    todo = []
    for cell in cells:
        if cell.cell_id in seen:
            continue
        seen.add(cell.cell_id)
        if force:  # reads nothing: --force recovers from any file the store may hold
            todo.append(cell)
            continue
        try:
            status = store.status(cell.cell_id)
        except CorruptEntryError:
            if not retry_failed:
                raise
            status = "failed"  # a damaged entry is rerun like a failed one
        if status is None or (retry_failed and status == "failed"):
            todo.append(cell)
    return todo


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@functools.cache
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions, device and git commit: enough to tell where a number came from."""
    import torch_geometric

    from grcn_bench import __version__

    env = {
        "grcn_bench": __version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "numpy": np.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
