"""Run one cell end to end (docs/layout.md, "Data flow of one cell") and store its result.

``load_dataset`` (cached per process) -> ``get_model(...)`` -> ``trainer.fit`` (validation every epoch) -> best state
restored -> test evaluated once -> ``store.write``. A cell that raises is stored as ``failed`` with its traceback;
one whose loss stops being finite as ``diverged``. Either way the grid goes on.

The protocol audit (docs/protocol.md, "Protocol audit"): a standard run whose cell has ``audit`` set also stores, in
``audit/<cell_id>.json``, every epoch evaluated as its released-protocol twin would evaluate it
(:class:`~.trainer.AuditTrack`). A released-protocol cell whose standard twin has such a record is then derived from
it (:func:`derive_official`) instead of trained, when its replayed stop falls within the epochs the twin trained:
training is the same under both protocols, so the result is the one training would store.
:func:`official_from_twin` is the only reader of ``audit/``.
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
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grcn_bench.datasets import load_dataset
from grcn_bench.datasets.base import RecDataset
from grcn_bench.models import get_model
from grcn_bench.models.base import Recommender

from .config import SELECTION_METRIC, Cell
from .evaluator import EvalResult, compute_embeddings, evaluate
from .store import CorruptEntryError, ResultStore, atomic_write_bytes
from .trainer import AuditTrack, EpochRecord, Stopping, epoch_line, fit, replay_stopping, seed_everything

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

    A released-protocol cell that can be derived from its standard twin's audit record is derived, not trained
    (:func:`derive_official`; never when it must keep its embeddings, which the record does not hold).
    """
    with store.claim(cell.cell_id) as mine:
        if not mine:
            return {"cell": cell.to_dict(), "cell_id": cell.cell_id, "status": CLAIMED}
        if stored_since is not None and store.has(cell.cell_id) and \
                store.result_path(cell.cell_id).stat().st_mtime >= stored_since:
            return store.read(cell.cell_id)
        if cell.settings.protocol != "standard" and not keep_embeddings:
            derived = derive_official(cell, store, lambda spec: str(dataset_loader(spec).card.digest()))
            if derived is not None:
                return derived
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
    tracks: list[AuditTrack] = []
    log_path = store.log_path(cell.cell_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log_path.open("w") as log_file:

            def epoch_log(line: str) -> None:
                log_file.write(line + "\n")
                log_file.flush()
                log.debug("%s %s", cell.cell_id, line)

            result.update(_train_and_test(cell, store, device, eval_memory, progress, keep_embeddings,
                                          dataset_loader, epoch_log, arrays, tracks))
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
    # The audit record goes before the result, as the arrays do: a result always has the record its run made, and a
    # rerun without one leaves none behind.
    if tracks and result["status"] in ("ok", "diverged"):
        store.write_audit(cell.cell_id, {**tracks[0].record(), "cell_id": cell.cell_id}, tracks[0].arrays)
    else:
        store.remove_audit(cell.cell_id)
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
    tracks: list[AuditTrack],
) -> dict[str, Any]:
    settings = cell.settings
    dataset = dataset_loader(cell.dataset)
    graph = dataset.graph().to(device)
    seed_everything(settings.seed)
    model = get_model(cell.model)(dataset.info(), **cell.options).to(device)
    # Standard protocol selects on validation; the released code's protocol selects on test.
    selection_split = "val" if settings.protocol == "standard" else "test"

    def run_eval(split: str, protocol: str = settings.protocol) -> EvalResult:
        return evaluate(model, dataset, split, ks=settings.ks, graph=graph, memory_budget=eval_memory,
                        protocol=protocol, device=device)

    if cell.audit and settings.protocol == "standard":
        tracks.append(_audit_track(cell, dataset, graph, run_eval))
    fitted = fit(
        model, dataset, settings, lambda m, epoch: run_eval(selection_split).mean(),
        graph=graph, device=device, checkpoint_path=store.checkpoint_path(cell.cell_id), progress=progress,
        description=f"{cell.label or cell.model} on {cell.dataset} (seed {settings.seed})", epoch_log=epoch_log,
        audit=tracks[0] if tracks else None,
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
    if keep_embeddings:  # the ID part only: Figure 4 reads nothing else (GRCN adds one block per modality)
        columns = model.id_columns()
        arrays["user_embedding"] = emb.user[:, columns].detach().cpu().numpy()
        arrays["item_embedding"] = emb.item[:, columns].detach().cpu().numpy()
    return out


OFFICIAL = "official-grcn"


def _audit_track(cell: Cell, dataset: RecDataset, graph, run_eval: Callable[..., EvalResult]) -> AuditTrack:
    """What the released-protocol twin of ``cell`` computes: after every epoch its test evaluation (the validator of
    a run that selects on test), and, from its best state, what a finished run computes once after training (its
    validation metrics, the edge-weight AUC); a halving rung computes neither."""

    def official_test(model: Recommender, epoch: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        test = run_eval("test", OFFICIAL)
        return test.mean(), {"test_users": test.users, **{f"test_{k}": v for k, v in test.per_user.items()}}

    def best_state_extras(model: Recommender, epoch: int) -> dict[str, Any]:
        extras: dict[str, Any] = {"val_metrics": run_eval("val", OFFICIAL).mean()}
        if dataset.train_noise is not None:
            emb = compute_embeddings(model, graph)
            if emb.edge_weight is not None:
                extras["edge_weight_auc"] = edge_weight_auc(graph, emb.edge_weight, dataset.train_noise)
        return extras

    return AuditTrack(official_test, best_state_extras if cell.final else None, cell.settings.patience,
                      cell.settings.max_epochs)


def official_result(cell: Cell, twin: Mapping[str, Any], record: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The result (and per-user arrays) that training the released-protocol ``cell`` would store, from its standard
    twin's stored result and audit record; ``None`` when they cannot tell it.

    The run's stop is replayed on the recorded test Recall@10 with the trainer's own rule
    (:func:`~.trainer.replay_stopping`). It is derivable when that stop falls within the epochs the twin trained and
    the record covers them (the record matches the twin epoch for epoch: same losses), and, for a finished run, the
    record holds the replayed best epoch's validation metrics and per-user test values. Losses and training seconds
    come from the twin, metrics and evaluation seconds from the record.
    """
    history = twin.get("history") or []
    epochs = record.get("epochs") or []
    if twin.get("status") not in ("ok", "diverged") or record.get("protocol") != cell.settings.protocol:
        return None
    if len(epochs) > len(history) or any(e.get("epoch") != k or e.get("loss") != history[k - 1].get("loss")
                                         for k, e in enumerate(epochs, start=1)):
        return None
    settings = cell.settings
    replay = replay_stopping([e["metrics"][SELECTION_METRIC] for e in epochs], settings.patience, settings.max_epochs)
    if replay is None or replay.best_epoch == 0:
        return None
    best = epochs[replay.best_epoch - 1]
    out: dict[str, Any] = {
        "cell": cell.to_dict(),
        "cell_id": cell.cell_id,
        "environment": twin.get("environment"),
        "status": "ok",
        "stop_reason": replay.stop_reason,
        "best_epoch": replay.best_epoch,
        "epochs_run": replay.epochs_run,
        "selection_split": "test",
        "best_selection_metrics": dict(best["metrics"]),
        "history": [{"epoch": e["epoch"], "loss": e["loss"], "metrics": e["metrics"],
                     "train_seconds": history[e["epoch"] - 1].get("train_seconds"), "eval_seconds": e["eval_seconds"]}
                    for e in epochs[: replay.epochs_run]],
        "dataset_card": twin.get("dataset_card"),
        "num_parameters": twin.get("num_parameters"),
        "test_metrics": None,
        "val_metrics": None,
        "derived_from": twin.get("cell_id"),
    }
    if not cell.final:  # a rung: selection reads its per-epoch metrics only
        return out, {}
    captured = record.get("best") or {}
    if captured.get("epoch") != replay.best_epoch or "test_users" not in arrays:
        return None
    out["test_seconds"] = captured.get("test_seconds")
    out["test_metrics"] = dict(best["metrics"])  # the best state's test evaluation: the best epoch's own
    out["val_metrics"] = captured["val_metrics"]
    if "edge_weight_auc" in captured:
        out["edge_weight_auc"] = captured["edge_weight_auc"]
    return out, dict(arrays)


def official_from_twin(cell: Cell, store: ResultStore, data_digest: Callable[[str], str] | None = None
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """:func:`official_result` for ``cell`` from the store: its standard twin (the same cell under the standard
    protocol) must be stored, with an audit record, on the data its dataset spec gives now (``data_digest``). The
    only function that reads ``audit/``; a damaged record or result means "train it"."""
    if cell.settings.protocol == "standard":
        return None
    twin = cell.with_settings(protocol="standard")
    try:
        if not store.has(twin.cell_id) or (stored := store.read_audit(twin.cell_id)) is None:
            return None
        twin_result = store.read(twin.cell_id)
    except CorruptEntryError:
        return None
    digest = (twin_result.get("dataset_card") or {}).get("digest")
    if data_digest is not None and digest != data_digest(cell.dataset):
        return None
    try:
        return official_result(cell, twin_result, *stored)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # a record the trainer did not write
        return None


def derive_official(cell: Cell, store: ResultStore, data_digest: Callable[[str], str] | None = None
                    ) -> dict[str, Any] | None:
    """Store the released-protocol ``cell``'s result derived from its standard twin (:func:`official_from_twin`)
    and return it, marked ``derived_from`` with the derivation's own seconds; ``None`` when it must be trained.

    The arrays and the log are written before the result, each atomically, so a kill at any moment leaves no result
    or the whole one, and a rerun derives the same result again.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    derived = official_from_twin(cell, store, data_digest)
    if derived is None:
        return None
    result, arrays = derived
    lines, stopping = [], Stopping()
    for entry in result["history"]:
        stopping = stopping.step(entry["epoch"], entry["metrics"][SELECTION_METRIC])
        record = EpochRecord(entry["epoch"], entry["loss"], entry["metrics"], entry["train_seconds"] or 0.0,
                             entry["eval_seconds"])
        lines.append(epoch_line(record, stopping.best_epoch))
    lines.append(f"derived from {result['derived_from']} (docs/protocol.md, \"Protocol audit\"): not trained")
    atomic_write_bytes(store.log_path(cell.cell_id), "".join(line + "\n" for line in lines).encode())
    result["seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = time.process_time() - cpu_started
    result["peak_rss_bytes"] = peak_rss_bytes()
    store.write(cell.cell_id, result, arrays)
    return result


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
        if retry_failed and status == "ok" and not arrays_intact(store, cell.cell_id):
            status = "failed"  # so is a finished cell whose per-user arrays were damaged
        if status is None or (retry_failed and status == "failed"):
            todo.append(cell)
    return todo


def arrays_intact(store: ResultStore, cell_id: str) -> bool:
    """Whether a cell's per-user arrays (if it stored any) read back whole: every member's CRC is checked."""
    try:
        store.read_arrays(cell_id)
    except CorruptEntryError:
        return False
    return True


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
