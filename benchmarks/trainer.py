"""Training (docs/protocol.md, "Training"): the same loop, batches, negatives and early stopping for every model.

Per epoch: every training pair once, shuffled, each with one negative drawn uniformly from the items the user has
not trained on (redrawn every epoch, seeded generator); batches of 1024; every batch runs the model's full-graph
forward (``Recommender.batch_forward``: bit for bit its results, computed over the batch's receptive field by the
models that can), the shared loss (BPR + λ·ego-L2) and an Adam step. After every epoch the validation metrics decide
early stopping on Recall@10 with patience 20; the best state is kept (in memory, and as a checkpoint when a path is
given) and restored at the end. A non-finite loss stops the run with status ``diverged``. For the protocol audit a
standard run can also evaluate every epoch as its released-protocol twin would (:class:`AuditTrack`); its own
selection and stopping never read that.
"""

from __future__ import annotations

import io
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from grcn_bench.datasets.base import InteractionGraph, RecDataset
from grcn_bench.datasets.sampling import sample_negatives
from grcn_bench.models.base import Recommender

from .config import SELECTION_METRIC, TrainSettings
from .store import atomic_write_bytes

log = logging.getLogger("grcn_bench.trainer")

#: ``validate(model, epoch) -> {metric: value}``; must include Recall@10.
Validator = Callable[[Recommender, int], dict[str, float]]


@dataclass(frozen=True)
class Stopping:
    """Early stopping's state (docs/protocol.md, "Training"): the best selection Recall@10 so far and its epoch.

    One pure step per epoch, shared by :func:`fit` and by :func:`replay_stopping`, so that the protocol audit's
    replay of a released-protocol run on recorded metrics stops where training that run would have stopped. Only a
    strictly better value moves the best epoch (a tie or a NaN does not).
    """

    best_epoch: int = 0
    best_value: float = -math.inf

    def step(self, epoch: int, value: float) -> Stopping:
        """The state after ``epoch`` scored ``value``; its ``best_epoch`` is ``epoch`` when the epoch improved."""
        return Stopping(epoch, value) if value > self.best_value else self

    def stops(self, epoch: int, patience: int) -> bool:
        """Whether training stops after ``epoch``: ``patience`` epochs without a better value."""
        return epoch - self.best_epoch >= patience


def early_stop_reason(patience: int) -> str:
    return f"early stop: no better validation {SELECTION_METRIC} for {patience} epochs"


def max_epochs_reason(max_epochs: int) -> str:
    return f"reached max_epochs={max_epochs}"


@dataclass(frozen=True)
class Replay:
    """Where a run stops, replayed from its per-epoch selection values."""

    best_epoch: int
    epochs_run: int
    stop_reason: str


def replay_stopping(values: Sequence[float], patience: int, max_epochs: int) -> Replay | None:
    """Where :func:`fit` stops a run whose epochs score ``values`` (epoch 1 first), with :class:`Stopping`.

    ``None`` when the run would train past the last value: the values cannot tell where it stops.
    """
    state = Stopping()
    for epoch, value in enumerate(values[:max_epochs], start=1):
        state = state.step(epoch, value)
        if state.stops(epoch, patience):
            return Replay(state.best_epoch, epoch, early_stop_reason(patience))
    if len(values) >= max_epochs:
        return Replay(state.best_epoch, max_epochs, max_epochs_reason(max_epochs))
    return None


#: ``evaluate(model, epoch) -> ({metric: value}, {name: per-user array})``: one evaluation and its per-user values.
ArrayValidator = Callable[[Recommender, int], tuple[dict[str, float], dict[str, np.ndarray]]]


@dataclass
class AuditTrack:
    """The released protocol's twin of a standard run, evaluated beside it (docs/protocol.md, "Protocol audit").

    Training is the same under both protocols (batches, negatives, seeds, updates); only evaluation and early
    stopping differ, and evaluation draws no random numbers and leaves the model as it found it. So after every
    epoch the model is the one the released-protocol run at the same settings would have, and ``evaluate`` gives
    what that run's validator computes (its test metrics, with the per-user values). The track replays that run's
    early stopping with :class:`Stopping` and evaluates until it would have stopped. At every epoch that run would
    keep as its best, ``capture`` adds what it computes once, from its best state, after training (its validation
    metrics, edge-weight AUC) and the per-user test values are kept; ``capture`` is ``None`` for a halving rung,
    which computes neither. The standard run's own selection, stopping and checkpoint never read the track.

    An evaluation that raises ends the track with its ``error``; the epochs before it stay valid.
    """

    evaluate: ArrayValidator
    capture: Callable[[Recommender, int], dict[str, Any]] | None
    patience: int
    max_epochs: int
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    stopping: Stopping = field(default_factory=Stopping)
    stopped: bool = False
    error: str | None = None

    def observe(self, model: Recommender, epoch: int, loss: float) -> None:
        """Evaluate the model after ``epoch`` as the released-protocol run would (nothing once it has stopped)."""
        if self.stopped or self.error is not None:
            return
        try:
            started = time.perf_counter()
            metrics, arrays = self.evaluate(model, epoch)
            seconds = time.perf_counter() - started
            state = self.stopping.step(epoch, metrics[SELECTION_METRIC])
            if state.best_epoch == epoch and self.capture is not None:
                self.best = {"epoch": epoch, "test_seconds": seconds, **self.capture(model, epoch)}
                self.arrays = dict(arrays)
        except Exception as err:  # the standard run must go on: the released-protocol run would have failed here
            self.error = f"epoch {epoch}: {type(err).__name__}: {err}"
            log.warning("audit evaluation stopped: %s", self.error)
            return
        self.epochs.append({"epoch": epoch, "loss": loss, "metrics": metrics, "eval_seconds": seconds})
        self.stopping = state
        self.stopped = state.stops(epoch, self.patience) or epoch >= self.max_epochs

    def record(self) -> dict[str, Any]:
        """The audit record (``audit/<cell_id>.json``); the per-user values are :attr:`arrays`."""
        return {"protocol": "official-grcn", "epochs": self.epochs, "best": self.best, "stopped": self.stopped,
                "error": self.error}


@dataclass
class EpochRecord:
    """One epoch of the history: mean training loss, selection-split metrics, and seconds spent."""

    epoch: int
    loss: float
    metrics: dict[str, float]
    train_seconds: float
    eval_seconds: float

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "loss": self.loss,
            "metrics": self.metrics,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
        }


@dataclass
class FitResult:
    """What training produced. ``best_state`` has already been loaded into the model when ``fit`` returns."""

    status: str  # "ok" or "diverged"
    best_epoch: int  # 0 when no epoch finished
    best_metrics: dict[str, float]
    history: list[EpochRecord] = field(default_factory=list)
    stop_reason: str = ""
    best_state: dict[str, Tensor] | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch from one seed; return the sampler's own generator.

    Also asks torch for deterministic kernels: on CPU the backward of a gather with repeated indices (every model's
    ``emb[users]``) otherwise accumulates in a thread-dependent order, and "same seed, same metrics" would hold only
    with one thread.
    """
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, a full memory pass per allocation: off, since no
    # kernel here reads memory it has not written.
    torch.utils.deterministic.fill_uninitialized_memory = False
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def epoch_triplets(
    train: Tensor, indptr: np.ndarray, items: np.ndarray, num_items: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Every training pair once in a fresh random order, each with a freshly drawn negative (Eq. 12)."""
    order = torch.randperm(train.size(0), generator=generator)
    users, pos = train[order, 0], train[order, 1]
    neg = sample_negatives(indptr, items, users, num_items, generator)
    return users, pos, neg


def snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state, on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(state: dict[str, Tensor], path: Path) -> None:
    """Write a state dict atomically (read back with ``torch.load(weights_only=True)``)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def fit(
    model: Recommender,
    dataset: RecDataset,
    settings: TrainSettings,
    validate: Validator,
    *,
    graph: InteractionGraph | None = None,
    device: torch.device | str = "cpu",
    checkpoint_path: Path | None = None,
    progress: bool = True,
    description: str = "",
    epoch_log: Callable[[str], None] | None = None,
    audit: AuditTrack | None = None,
) -> FitResult:
    """Train ``model`` on ``dataset`` and leave it in its best state.

    Args:
        model: a freshly initialised model (seed before building it for reproducibility).
        dataset: the data; only its training pairs are used for the loss.
        settings: lr, λ, seed, batch size, max epochs, patience.
        validate: called after every epoch; returns the selection split's metrics (Recall@10 decides).
        graph: the training graph on ``device`` (default: ``dataset.graph()`` moved there).
        checkpoint_path: where the best state is also written (atomically) whenever it improves.
        progress: show a tqdm bar over epochs with the current validation Recall@10.
        epoch_log: receives one line per epoch (loss, metrics, seconds).
        audit: also evaluates every epoch as the released protocol's run at the same settings would (the protocol
            audit; :class:`AuditTrack`), after this run's own bookkeeping, which never reads it.
    """
    generator = seed_everything(settings.seed)
    device = torch.device(device)
    graph = graph if graph is not None else dataset.graph().to(device)
    indptr, items = dataset.user_items("train")
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    result = FitResult(status="ok", best_epoch=0, best_metrics={})
    stopping = Stopping()
    bar = _progress_bar(settings.max_epochs, description, progress)
    try:
        for epoch in range(1, settings.max_epochs + 1):
            started = time.perf_counter()
            users, pos, neg = epoch_triplets(dataset.train, indptr, items, dataset.num_items, generator)
            # At the paper's scale an epoch takes minutes on a CPU: a batch bar shows up once one runs over 2 s.
            with _batch_bar(users.numel(), settings.batch_size, epoch, progress) as batch_bar:
                loss = train_epoch(model, graph, users, pos, neg, settings, optimizer, device,
                                    on_batch=batch_bar.update)
            train_seconds = time.perf_counter() - started
            if not math.isfinite(loss):
                result.status = "diverged"
                result.stop_reason = f"non-finite training loss ({loss}) in epoch {epoch}"
                log.warning("%s: %s", description or "run", result.stop_reason)
                break
            started = time.perf_counter()
            metrics = validate(model, epoch)
            eval_seconds = time.perf_counter() - started
            record = EpochRecord(epoch, loss, metrics, train_seconds, eval_seconds)
            result.history.append(record)
            value = metrics[SELECTION_METRIC]
            stopping = stopping.step(epoch, value)
            if stopping.best_epoch == epoch:
                result.best_epoch, result.best_metrics = epoch, dict(metrics)
                result.best_state = snapshot(model)
                if checkpoint_path is not None:
                    save_checkpoint(result.best_state, checkpoint_path)
            if epoch_log is not None:
                epoch_log(epoch_line(record, result.best_epoch))
            bar.set_postfix_str(f"loss {loss:.4f} val R@10 {value:.4f} best {stopping.best_value:.4f}@"
                                f"{result.best_epoch}")
            bar.update(1)
            if audit is not None:
                audit.observe(model, epoch, loss)
            if stopping.stops(epoch, settings.patience):
                result.stop_reason = early_stop_reason(settings.patience)
                break
        else:
            result.stop_reason = max_epochs_reason(settings.max_epochs)
    finally:
        bar.close()
    if result.best_state is not None:
        model.load_state_dict(result.best_state)
    return result


def train_epoch(
    model: Recommender,
    graph: InteractionGraph,
    users: Tensor,
    pos: Tensor,
    neg: Tensor,
    settings: TrainSettings,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    on_batch: Callable[[], object] | None = None,
) -> float:
    """One pass over the shuffled triplets; returns the mean batch loss (non-finite as soon as one batch is).
    ``on_batch`` is called after every optimiser step (progress)."""
    model.train()
    total, batches = 0.0, 0
    for start in range(0, users.numel(), settings.batch_size):
        stop = start + settings.batch_size
        batch_users = users[start:stop].to(device)
        batch_pos = pos[start:stop].to(device)
        batch_neg = neg[start:stop].to(device)
        emb = model.batch_forward(graph, batch_users, batch_pos, batch_neg)
        loss = model.loss(emb, batch_users, batch_pos, batch_neg, settings.reg_weight)
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value
        batches += 1
        if on_batch is not None:
            on_batch()
    return total / max(1, batches)


def epoch_line(record: EpochRecord, best_epoch: int) -> str:
    """One line of a cell's log (``logs/<cell_id>.log``)."""
    metrics = " ".join(f"{k} {v:.4f}" for k, v in record.metrics.items())
    return (
        f"epoch {record.epoch:4d} loss {record.loss:.5f} {metrics} "
        f"train {record.train_seconds:.2f}s eval {record.eval_seconds:.2f}s best@{best_epoch}"
    )


def _batch_bar(num_triplets: int, batch_size: int, epoch: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=-(-num_triplets // batch_size), desc=f"epoch {epoch}", unit="batch", leave=False,
                disable=not enabled, delay=2.0, dynamic_ncols=True)


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description or "epochs", unit="ep", leave=False, disable=not enabled,
                dynamic_ncols=True)
