"""Datasets: loaders for the official and MMRec formats, the synthetic generator, splitting, noise and sampling.

``load_dataset(spec)`` is the one entry point the runner uses. ``spec`` is either ``synthetic:<preset>`` with
optional ``?key=value&...`` overrides (see :mod:`~grcn_bench.datasets.synthetic`), or a directory whose format is
detected from its files (``train.npy`` / ``user_item_train_dict.npy``: official; a ``*.inter`` file: MMRec),
optionally followed by ``?inject_noise=<rate>[&noise_seed=<int>][&noise_sampler=popularity|uniform]`` to add
labelled false-positive training edges (docs/protocol.md, "Splitting and noise injection") for the noise-robustness
experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from .base import DatasetCard, DatasetError, DatasetInfo, InteractionGraph, RecDataset, WordBags
from .mmrec import load_mmrec, write_mmrec
from .noise import inject_noise
from .official import TRAIN_FILES, load_official, write_official
from .sampling import NegativeSampler, sample_negatives
from .split import split_per_user
from .synthetic import PRESETS, coerce_override, generate_synthetic

__all__ = [
    "PRESETS",
    "DatasetCard",
    "DatasetError",
    "DatasetInfo",
    "DatasetSpec",
    "InteractionGraph",
    "NegativeSampler",
    "RecDataset",
    "WordBags",
    "detect_format",
    "generate_synthetic",
    "inject_noise",
    "load_dataset",
    "load_mmrec",
    "load_official",
    "parse_spec",
    "sample_negatives",
    "split_per_user",
    "write_mmrec",
    "write_official",
]

FORMATS = ("official", "mmrec")
SYNTHETIC_PREFIX = "synthetic:"


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec: ``kind`` is ``"synthetic"`` (``target`` = preset) or ``"path"`` (``target`` = dir)."""

    kind: str
    target: str
    options: dict[str, object] = field(default_factory=dict)


def parse_spec(spec: str) -> DatasetSpec:
    """Parse ``synthetic:<preset>[?k=v&...]`` (overrides typed and checked) or a directory path.

    Raises:
        DatasetError: unknown preset, unknown override key (the message lists the valid ones), a value of the
            wrong type, or a key given twice.
    """
    spec = str(spec)
    if not spec.startswith(SYNTHETIC_PREFIX):
        path, _, query = spec.partition("?")
        if not query or Path(spec).exists():  # a directory whose name holds a '?' is still a directory
            return DatasetSpec("path", spec)
        return DatasetSpec("path", path, _path_options(spec, query))
    preset, _, query = spec[len(SYNTHETIC_PREFIX):].partition("?")
    if preset not in PRESETS:
        raise DatasetError(spec, f"unknown synthetic preset {preset!r}", f"one of {', '.join(PRESETS)}")
    options: dict[str, object] = {}
    try:
        items = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise DatasetError(spec, f"malformed parameters {query!r}", "key=value pairs joined by &") from None
    for key, value in items:
        if key in options:
            raise DatasetError(spec, f"parameter {key!r} given twice", "each parameter once")
        options[key] = coerce_override(key, value, spec)
    return DatasetSpec("synthetic", preset, options)


#: Options a directory spec may carry after ``?``: noise injection for the robustness experiment.
PATH_OPTIONS: dict[str, type] = {"inject_noise": float, "noise_seed": int, "noise_sampler": str}
NOISE_SAMPLERS = ("popularity", "uniform")


def _path_options(spec: str, query: str) -> dict[str, object]:
    """Typed options of a directory spec such as ``data/tiktok?inject_noise=0.2&noise_seed=1``."""
    try:
        items = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise DatasetError(spec, f"malformed parameters {query!r}", "key=value pairs joined by &") from None
    options: dict[str, object] = {}
    for key, value in items:
        if key not in PATH_OPTIONS:
            raise DatasetError(spec, f"unknown parameter {key!r} for a directory", f"one of {', '.join(PATH_OPTIONS)}")
        if key in options:
            raise DatasetError(spec, f"parameter {key!r} given twice", "each parameter once")
        try:
            options[key] = PATH_OPTIONS[key](value)
        except ValueError:
            raise DatasetError(spec, f"{key}={value!r} is not a {PATH_OPTIONS[key].__name__}") from None
    if options.get("noise_sampler", "popularity") not in NOISE_SAMPLERS:
        raise DatasetError(spec, f"noise_sampler={options['noise_sampler']!r}", f"one of {', '.join(NOISE_SAMPLERS)}")
    if not 0 <= float(options.get("inject_noise", 0.0)) <= 1:
        raise DatasetError(spec, f"inject_noise={options['inject_noise']}", "a rate between 0 and 1")
    if ("noise_seed" in options or "noise_sampler" in options) and "inject_noise" not in options:
        raise DatasetError(spec, "noise_seed / noise_sampler without inject_noise", "inject_noise=<rate> as well")
    return options


def detect_format(path: str | Path) -> str:
    """``"official"`` or ``"mmrec"`` from the files in ``path``."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(root, "no such dataset directory", "a directory or synthetic:<preset>")
    official = any((root / name).is_file() for name in TRAIN_FILES)
    mmrec = any(root.glob("*.inter"))
    if official and mmrec:
        raise DatasetError(root, "holds both official (train.npy) and MMRec (*.inter) files", "format= to choose")
    if official:
        return "official"
    if mmrec:
        return "mmrec"
    raise DatasetError(root, "no dataset files found",
                       f"{' or '.join(TRAIN_FILES)} (official format) or a *.inter file (MMRec format)")


def load_dataset(
    spec: str,
    *,
    format: str | None = None,
    num_users: int | None = None,
    num_items: int | None = None,
    drop_leaking_pairs: bool = False,
    split_seed: int = 0,
) -> RecDataset:
    """Load a dataset from a spec string (see the module docstring).

    Args:
        spec: ``synthetic:<preset>[?k=v&...]`` or a dataset directory.
        format: ``"official"`` or ``"mmrec"`` to skip detection (directories only).
        num_users, num_items: override the inferred sizes (directories only; synthetic sizes are overrides).
        drop_leaking_pairs: drop held-out pairs that duplicate training pairs, with a warning, instead of failing.
        split_seed: seed of the per-user 8:1:1 split wherever this suite splits (unsplit files, synthetic data);
            a ``split_seed`` in a synthetic spec string takes precedence.

    Raises:
        DatasetError: every problem with the spec or the files.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "synthetic":
        if format is not None or num_users is not None or num_items is not None:
            raise DatasetError(spec, "format / num_users / num_items apply to directories only",
                               "synthetic sizes as overrides, e.g. synthetic:tiktok?users=2000&items=5000")
        options = dict(parsed.options)
        if split_seed != 0:  # the default stays out of the dataset's name
            options.setdefault("split_seed", split_seed)
        return generate_synthetic(parsed.target, **options)
    if format is None:
        format = detect_format(parsed.target)
    if format == "official":
        dataset = load_official(parsed.target, num_users=num_users, num_items=num_items,
                                drop_leaking_pairs=drop_leaking_pairs, split_seed=split_seed)
    elif format == "mmrec":
        dataset = load_mmrec(parsed.target, num_users=num_users, num_items=num_items,
                             drop_leaking_pairs=drop_leaking_pairs, split_seed=split_seed)
    else:
        raise DatasetError(spec, f"unknown format {format!r}", f"one of {', '.join(FORMATS)}")
    if "inject_noise" in parsed.options:
        dataset = inject_noise(dataset, float(parsed.options["inject_noise"]), int(parsed.options.get("noise_seed", 0)),
                               sampler=str(parsed.options.get("noise_sampler", "popularity")))
    return dataset
