"""Typed settings and experiments: a TOML experiment expands into independent cells (docs/protocol.md, "Experiments").

A cell is one training run: (model, options, dataset spec, seed, lr, λ) plus the training settings that change its
result. Its id is a hash of its canonical JSON, so the same cell always has the same id and a rerun finds it in the
store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from grcn_bench.models import model_revision

from .schema import check_experiment

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROTOCOLS = ("standard", "official-grcn")
DEFAULT_KS = (10, 20)
SELECTION_METRIC = "recall@10"


@dataclass(frozen=True)
class TrainSettings:
    """Everything about training and evaluation that changes a result (docs/protocol.md, "Training" and "Evaluation").

    Args:
        lr: Adam learning rate.
        reg_weight: λ, the weight of the shared ego-L2 term in the loss (Eq. 13).
        seed: seeds Python, NumPy, torch and the negative sampler.
        batch_size: triplets per batch (1024, the authors' setting).
        max_epochs: upper bound on epochs (1000).
        patience: epochs without a better validation Recall@10 before stopping (20).
        ks: cut-offs of every reported metric; 10 must be among them (selection uses Recall@10).
        protocol: "standard" or "official-grcn" (the released code's protocol, audit only).
    """

    lr: float = 1e-3
    reg_weight: float = 1e-4
    seed: int = 0
    batch_size: int = 1024
    max_epochs: int = 1000
    patience: int = 20
    ks: tuple[int, ...] = DEFAULT_KS
    protocol: str = "standard"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.reg_weight < 0:
            raise ValueError(f"lr must be > 0 and reg_weight >= 0, got lr={self.lr}, reg_weight={self.reg_weight}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ValueError("batch_size, max_epochs and patience must be >= 1")
        if 10 not in self.ks:
            raise ValueError(f"ks must include 10 (model selection uses {SELECTION_METRIC}), got {self.ks}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; expected one of {PROTOCOLS}")
        object.__setattr__(self, "ks", tuple(sorted(set(int(k) for k in self.ks))))


@dataclass(frozen=True)
class Cell:
    """One independent training run of the grid.

    ``options`` are the model's typed keyword arguments. ``label`` (the row name in reports, e.g. "GRCN_max") and
    ``group`` (the table or figure that asked for it, e.g. "table3") are presentation only: they are not part of the
    id, so a cell that two tables need is trained once.

    ``audit`` asks a standard-protocol run to also evaluate every epoch as its released-protocol twin would, for the
    protocol audit (docs/protocol.md, "Protocol audit"). It changes nothing the cell stores in ``cells/`` (only an
    extra file in ``audit/``), so it is neither part of the id nor of equality: existing stores stay valid.
    """

    model: str
    dataset: str
    settings: TrainSettings
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    group: str = ""
    final: bool = True
    audit: bool = field(default=False, compare=False)

    def canonical(self) -> dict[str, Any]:
        """The identity of the cell as plain JSON data (sorted keys at every level when serialised).

        A rung of successive halving (``final=False``) trains the first ``max_epochs`` epochs of a run and skips
        the test set: it is a different cell from a finished run, so it carries ``"rung": true``. Finished runs
        leave the key out, which keeps their ids what they were before rungs existed. Likewise a model whose
        results changed (``Recommender.revision`` above 0) carries ``"revision"``: its older results are other cells.
        """
        identity = {
            "model": self.model,
            "options": _plain(self.options),
            "dataset": self.dataset,
            "settings": _plain(dataclasses.asdict(self.settings)),
        }
        if not self.final:
            identity["rung"] = True
        revision = model_revision(self.model)
        if revision:
            identity["revision"] = revision
        return identity

    @property
    def cell_id(self) -> str:
        """A deterministic id: model, dataset, seed and a hash of the canonical JSON."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        dataset = "".join(c if c.isalnum() else "-" for c in self.dataset.split("/")[-1] or self.dataset)
        return f"{self.model}-{dataset}-s{self.settings.seed}-{digest}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.canonical(), "label": self.label or self.model, "group": self.group, "cell_id": self.cell_id}

    def with_settings(self, **changes: Any) -> Cell:
        """The same cell with some training settings changed (e.g. another seed, or a rung's epoch budget)."""
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, **changes))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        settings = dict(data["settings"])
        settings["ks"] = tuple(settings.get("ks", DEFAULT_KS))
        return cls(
            model=data["model"],
            dataset=data["dataset"],
            settings=TrainSettings(**settings),
            options=dict(data.get("options", {})),
            label=data.get("label", ""),
            group=data.get("group", ""),
            final=not data.get("rung", False),
        )


def _plain(value: Any) -> Any:
    """Tuples to lists, mappings to sorted dicts: the JSON form that identifies a value."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelEntry:
    """A model row of an experiment.

    Args:
        name: registry name of the model.
        label: row name in reports.
        options: the model's keyword arguments.
        sweep: option name -> values; one cell per value (e.g. routing_iterations for Figure 3).
        datasets: this entry's own dataset list (default: the experiment's).
        group: which table or figure the entry feeds ("table2", "table3", "fig3", "fig4", "noise", "audit").
        train: training-setting overrides for this entry (e.g. ``protocol = "official-grcn"`` for the audit).
        tuned_from: the label of a searched entry (e.g. ``"GRCN"``) whose selected lr and λ on the same dataset
            this entry reuses instead of searching its own grid (Table 3's variants, Figure 3's T sweep, the noise
            study). "The same dataset" ignores ``?k=v`` variations: ``synthetic:tiktok?noise=0.4`` takes the point
            selected on ``synthetic:tiktok``.
    """

    name: str
    label: str
    options: Mapping[str, Any] = field(default_factory=dict)
    sweep: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    datasets: tuple[str, ...] | None = None
    group: str = "table2"
    train: Mapping[str, Any] = field(default_factory=dict)
    tuned_from: str | None = None


SEARCH_METHODS = ("grid", "halving")


@dataclass(frozen=True)
class SearchSettings:
    """How each configuration's lr x λ grid is searched (``docs/protocol.md``, "Hyper-parameter search").

    Args:
        method: ``"grid"`` trains every point to early stopping; ``"halving"`` (successive halving) trains every
            point for ``min_epochs``, keeps the best ``1/eta`` on validation Recall@10 (within each lr by default),
            multiplies the budget by ``eta``, and so on until ``survivors`` points (per lr) are left; those train to
            early stopping.
        selection_seeds: how many of the experiment's seeds (the first ones) the search runs on and selects with
            (the mean of their validation Recall@10); the other seeds then run only at the selected point.
            ``None``: every seed selects, today's protocol.
        min_epochs: the epoch budget of halving's first rung.
        eta: halving's reduction factor (>= 2).
        survivors: how many points halving trains to early stopping (>= 1); with ``per_lr``, per learning rate.
        per_lr: halve within each learning rate (the default): the λ points of every lr compete only with each
            other in the rungs, and every lr's survivors train to early stopping, so that learning rates are
            compared at convergence. A slow lr is still far from its best after a rung's few epochs, and halving
            across learning rates drops it (measured: ``docs/results.md``).
    """

    method: str = "grid"
    selection_seeds: int | None = None
    min_epochs: int = 10
    eta: int = 3
    survivors: int = 2
    per_lr: bool = True

    def __post_init__(self) -> None:
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"search method must be one of {SEARCH_METHODS}, got {self.method!r}")
        if self.selection_seeds is not None and self.selection_seeds < 1:
            raise ValueError(f"selection_seeds must be >= 1, got {self.selection_seeds}")
        if self.min_epochs < 1 or self.eta < 2 or self.survivors < 1:
            raise ValueError(f"halving needs min_epochs >= 1, eta >= 2 and survivors >= 1; got min_epochs="
                             f"{self.min_epochs}, eta={self.eta}, survivors={self.survivors}")

    def describe(self, seeds: Sequence[int]) -> str:
        """One sentence for reports: the method and the seed policy."""
        if self.method == "grid":
            how = "exhaustive grid: every lr x λ point trained to early stopping"
        else:
            within = " within each lr" if self.per_lr else ""
            last = f"the last {self.survivors}{' per lr' if self.per_lr else ''}"
            how = (f"successive halving: every lr x λ point trained {self.min_epochs} epochs, the best 1/{self.eta} "
                   f"on validation Recall@10{within} kept at each rung (budget x{self.eta}), {last} trained to "
                   "early stopping")
        chosen = list(seeds)[: self.selection_seeds] if self.selection_seeds else list(seeds)
        rest = list(seeds)[len(chosen):]
        policy = f"selected on the mean validation Recall@10 of seed{'s' if len(chosen) > 1 else ''} " \
                 f"{', '.join(map(str, chosen))}"
        if rest:
            policy += f"; seed{'s' if len(rest) > 1 else ''} {', '.join(map(str, rest))} run at the selected point only"
        return f"{how}; {policy}"


@dataclass(frozen=True)
class Experiment:
    """An experiment preset (``benchmarks/experiments/<name>.toml``), expanded by :meth:`cells`.

    The lr x λ grid, seeds and datasets are crossed with every model entry (and every point of its ``sweep``);
    hyper-parameters are later selected per (label, dataset) on validation Recall@10 (docs/protocol.md, "Hyper-parameter
    selection").
    """

    name: str
    models: tuple[ModelEntry, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    lr: tuple[float, ...] = (1e-3,)
    reg: tuple[float, ...] = (1e-4,)
    train: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    report: Mapping[str, Any] = field(default_factory=dict)
    search: SearchSettings = field(default_factory=SearchSettings)

    def cells(self) -> list[Cell]:
        """Every cell of the exhaustive grid, entries with ``tuned_from`` included (they search their own grid here;
        :mod:`.search` resolves them to one point instead)."""
        out: list[Cell] = []
        for entry in self.models:
            datasets = self.datasets if entry.datasets is None else entry.datasets
            sweep_keys = sorted(entry.sweep)
            sweep_points = list(itertools.product(*(entry.sweep[k] for k in sweep_keys))) or [()]
            for dataset, point, seed, lr, reg in itertools.product(
                datasets, sweep_points, self.seeds, self.lr, self.reg
            ):
                options = {**entry.options, **dict(zip(sweep_keys, point, strict=True))}
                settings = TrainSettings(lr=float(lr), reg_weight=float(reg), seed=int(seed), **self._train(entry))
                out.append(Cell(entry.name, dataset, settings, options, entry.label, entry.group))
        return out

    def _train(self, entry: ModelEntry) -> dict[str, Any]:
        train = {**self.train, **entry.train}
        if "ks" in train:
            train["ks"] = tuple(train["ks"])
        return train

    def override(
        self,
        *,
        models: Sequence[str] | None = None,
        datasets: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        lr: Sequence[float] | None = None,
        reg: Sequence[float] | None = None,
        train: Mapping[str, Any] | None = None,
        search: Mapping[str, Any] | None = None,
    ) -> Experiment:
        """A copy with command-line overrides. ``models`` keeps the preset's entries whose name or label is listed,
        and adds a plain entry for any other registered name."""
        changes: dict[str, Any] = {}
        if models:
            kept = [m for m in self.models if m.name in models or m.label in models]
            covered = {m.name for m in kept} | {m.label for m in kept}
            kept += [ModelEntry(name=name, label=name) for name in models if name not in covered]
            changes["models"] = tuple(kept)
        if datasets:
            changes["datasets"] = tuple(datasets)
            # Entries with their own dataset lists follow the override too: the user asked for these datasets.
            changes["models"] = tuple(dataclasses.replace(m, datasets=None) for m in changes.get("models", self.models))
        if seeds:
            changes["seeds"] = tuple(int(s) for s in seeds)
        if lr:
            changes["lr"] = tuple(float(x) for x in lr)
        if reg:
            changes["reg"] = tuple(float(x) for x in reg)
        if train:
            changes["train"] = {**self.train, **{k: v for k, v in train.items() if v is not None}}
        if search and any(v is not None for v in search.values()):
            changes["search"] = dataclasses.replace(self.search, **{k: v for k, v in search.items() if v is not None})
        given = {"models": models, "datasets": datasets, "seeds": seeds, "lr": lr, "reg": reg}
        listed = [f"{key} {' '.join(str(v) for v in values)}" for key, values in given.items() if values]
        flags = {**(train or {}), **{("search" if key == "method" else key): v for key, v in (search or {}).items()}}
        listed += [f"{key} {value}" for key, value in flags.items() if value is not None]
        if listed:  # the preset's description no longer says what runs (its datasets, grid or seeds)
            changes["description"] = f"{self.description} [command line: {'; '.join(listed)}]".lstrip()
        return dataclasses.replace(self, **changes)


def experiment_from_dict(data: Mapping[str, Any], *, name: str, where: str | None = None) -> Experiment:
    """Build an :class:`Experiment` from parsed TOML, after checking it against the schema (:mod:`.schema`): an
    unknown key or a wrong type is one line naming ``where`` (the file), the key and what it expects."""
    check_experiment(data, where=where or f"experiment {name!r}")
    entries = []
    for raw in data["models"]:
        entries.append(
            ModelEntry(
                name=raw["name"],
                label=raw.get("label", raw["name"]),
                options=dict(raw.get("options", {})),
                sweep={k: list(v) for k, v in raw.get("sweep", {}).items()},
                datasets=tuple(raw["datasets"]) if "datasets" in raw else None,
                group=raw.get("group", "table2"),
                train=dict(raw.get("train", {})),
                tuned_from=raw.get("tuned_from"),
            )
        )
    search = data.get("search", {})
    return Experiment(
        name=data.get("name", name),
        description=data.get("description", ""),
        models=tuple(entries),
        datasets=tuple(data["datasets"]),
        seeds=tuple(data.get("seeds", (0,))),
        lr=tuple(data.get("lr", (1e-3,))),
        reg=tuple(data.get("reg", (1e-4,))),
        train=dict(data.get("train", {})),
        report=dict(data.get("report", {})),
        search=SearchSettings(**search),
    )


def available_experiments() -> list[str]:
    """Names of the presets shipped in ``benchmarks/experiments/``."""
    folder = resources.files("grcn_bench.benchmarks") / "experiments"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_experiment(name_or_path: str) -> Experiment:
    """A preset by name (``quick``, ``table2``, ...) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"experiment file {path} does not exist")
        text, name, where = path.read_text(), path.stem, f"experiment file {path}"
    else:
        resource = resources.files("grcn_bench.benchmarks") / "experiments" / f"{name_or_path}.toml"
        if not resource.is_file():
            raise KeyError(f"unknown experiment {name_or_path!r}; presets: {', '.join(available_experiments())}")
        text, name, where = resource.read_text(), name_or_path, f"experiment preset {name_or_path!r}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{where}: invalid TOML: {err}") from err
    return experiment_from_dict(data, name=name, where=where)
