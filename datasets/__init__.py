"""Datasets: loaders for the official and MMRec formats, the synthetic generator, splitting, noise and sampling.

``load_dataset(spec)`` is the one entry point the runner uses. ``spec`` is either ``synthetic:<preset>`` with
optional ``?key=value&...`` overrides (see :mod:`~grcn_bench.datasets.synthetic`), or a directory whose format is
detected from its files (``train.npy`` / ``user_item_train_dict.npy``: official; a ``*.inter`` file: MMRec),
optionally followed by ``?inject_noise=<rate>[&noise_seed=<int>][&noise_sampler=popularity|uniform]`` to add
labelled false-positive training edges (docs/protocol.md, "Splitting and noise injection") for the noise-robustness
experiment.

Formats are found in a registry (:mod:`.formats`): each format module registers its loader with
``@register_format``, with a detector (directory formats) or a spec prefix (``synthetic:``), so a new format is one
module and nothing here changes (docs/extending.md, "A dataset format").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from .base import DatasetCard, DatasetError, DatasetInfo, InteractionGraph, RecDataset, WordBags
from .formats import (
    DatasetFormat,
    available_formats,
    detect_format,
    get_format,
    register_format,
    scheme_formats,
    unregister_format,
)
from .mmrec import load_mmrec, write_mmrec
from .noise import inject_noise
from .official import load_official, write_official
from .sampling import NegativeSampler, sample_negatives
from .split import split_per_user
from .synthetic import PRESETS, generate_synthetic

__all__ = [
    "PRESETS",
    "DatasetCard",
    "DatasetError",
    "DatasetFormat",
    "DatasetInfo",
    "DatasetSpec",
    "InteractionGraph",
    "NegativeSampler",
    "RecDataset",
    "WordBags",
    "available_formats",
    "detect_format",
    "generate_synthetic",
    "get_format",
    "inject_noise",
    "load_dataset",
    "load_mmrec",
    "load_official",
    "parse_spec",
    "register_format",
    "sample_negatives",
    "split_per_user",
    "unregister_format",
    "write_mmrec",
    "write_official",
]

SYNTHETIC_PREFIX = "synthetic:"


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec: ``kind`` is ``"path"`` (``target`` = directory) or the name of the format whose scheme
    the spec starts with (``"synthetic"``, ``target`` = preset)."""

    kind: str
    target: str
    options: dict[str, object] = field(default_factory=dict)


def parse_spec(spec: str) -> DatasetSpec:
    """Parse ``<scheme>:<body>`` with the scheme's own parser (``synthetic:<preset>[?k=v&...]``: overrides typed and
    checked) or a directory path with its options.

    Raises:
        DatasetError: what the scheme's parser refuses (for ``synthetic:``: an unknown preset, an unknown override
            key with the valid ones, a value of the wrong type, a key given twice), or a bad directory option.
    """
    spec = str(spec)
    for scheme in scheme_formats():
        prefix = scheme.prefix
        assert prefix is not None
        if spec.startswith(prefix):
            target, options = scheme.parse(spec[len(prefix):], spec)
            return DatasetSpec(scheme.name, target, dict(options))
    path, _, query = spec.partition("?")
    if not query or Path(spec).exists():  # a directory whose name holds a '?' is still a directory
        return DatasetSpec("path", spec)
    return DatasetSpec("path", path, _path_options(spec, query))


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
        spec: ``synthetic:<preset>[?k=v&...]`` (or another registered scheme) or a dataset directory.
        format: a directory format's name (``"official"``, ``"mmrec"``, or one registered by a plugin) to skip
            detection (directories only).
        num_users, num_items: override the inferred sizes (directories only; synthetic sizes are overrides).
        drop_leaking_pairs: drop held-out pairs that duplicate training pairs, with a warning, instead of failing.
        split_seed: seed of the per-user 8:1:1 split wherever this suite splits (unsplit files, synthetic data);
            a ``split_seed`` in a synthetic spec string takes precedence.

    Raises:
        DatasetError: every problem with the spec or the files.
    """
    parsed = parse_spec(spec)
    if parsed.kind != "path":  # a scheme's spec (synthetic:...): its format's loader, no detection
        if format is not None:
            raise DatasetError(spec, f"format={format!r} applies to directories only", f"no format= with {spec}")
        scheme = next(f for f in scheme_formats() if f.name == parsed.kind)
        return scheme.load(parsed.target, parsed.options, num_users=num_users, num_items=num_items,
                           drop_leaking_pairs=drop_leaking_pairs, split_seed=split_seed)
    loader = get_format(format if format is not None else detect_format(parsed.target), spec).load
    dataset = loader(parsed.target, num_users=num_users, num_items=num_items, drop_leaking_pairs=drop_leaking_pairs,
                     split_seed=split_seed)
    if "inject_noise" in parsed.options:
        dataset = inject_noise(dataset, float(parsed.options["inject_noise"]), int(parsed.options.get("noise_seed", 0)),
                               sampler=str(parsed.options.get("noise_sampler", "popularity")))
    return dataset


def _import_format_modules() -> None:
    """Import every module of this package, so that a format module added to it registers itself with nothing else
    to change (one file = one format; the modules above are imported already)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg:
            importlib.import_module(f"{__name__}.{module.name}")


_import_format_modules()
