"""Dataset format registry: ``@register_format(name, detect=...)``, ``get_format``, ``available_formats``,
``detect_format``.

A format is a loader and a way to recognise its data, registered together, so that ``load_dataset`` (and every error
message that names the known formats) finds it without a branch of its own (docs/extending.md, "A dataset format").
There are two kinds:

- a *directory* format recognises a directory by its files: ``detect(root) -> bool`` (official: ``train.npy`` or
  ``user_item_train_dict.npy``; MMRec: a ``*.inter`` file). Its loader is called as
  ``load(path, num_users=..., num_items=..., drop_leaking_pairs=..., split_seed=...)``; the directory options after
  ``?`` (noise injection) then apply to it unchanged;
- a *scheme* owns the specs that start with ``<scheme>:`` (``synthetic:<preset>?k=v``). ``parse(body, spec)`` turns
  what follows the colon into ``(target, options)``, typing and checking the options, and the loader is called as
  ``load(target, options, num_users=..., num_items=..., drop_leaking_pairs=..., split_seed=...)``.

Detection keeps one order: a spec that starts with a registered scheme belongs to it; anything else is a directory,
which must match exactly one directory format (none: the message lists what each format looks for; two or more: the
directory is ambiguous and ``format=`` chooses). Detectors run by ``order``, then registration order, the built-in
formats first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import DatasetError, RecDataset

__all__ = [
    "DatasetFormat",
    "available_formats",
    "detect_format",
    "directory_formats",
    "get_format",
    "register_format",
    "registered_formats",
    "scheme_formats",
    "unregister_format",
]

Loader = Callable[..., RecDataset]
Detector = Callable[[Path], bool]
#: ``parse(body, spec) -> (target, options)`` of a scheme: ``body`` is the spec after ``<scheme>:``.
SpecParser = Callable[[str, str], tuple[str, Mapping[str, Any]]]


def _no_options(body: str, spec: str) -> tuple[str, Mapping[str, Any]]:
    """The default parser of a scheme: the whole body is the target, with no options."""
    return body, {}


@dataclass(frozen=True)
class DatasetFormat:
    """A registered format: its loader, and its detector (directory formats) or its scheme (spec prefixes).

    ``title`` names the format in messages (``MMRec``) and ``looks_like`` says in words what its detector looks for
    (``a *.inter file``), so that a directory no format recognises gets one line listing every format's files.
    """

    name: str
    load: Loader
    detect: Detector | None = None
    scheme: str | None = None
    parse: SpecParser = _no_options
    title: str = ""
    looks_like: str = ""
    order: int = 100

    @property
    def prefix(self) -> str | None:
        """``"<scheme>:"`` for a scheme, else None."""
        return None if self.scheme is None else f"{self.scheme}:"

    def describe(self) -> str:
        """``train.npy or user_item_train_dict.npy (official format)``: what the format's data looks like."""
        return f"{self.looks_like or self.name} ({self.title or self.name} format)"


_REGISTRY: dict[str, DatasetFormat] = {}


def register_format(
    name: str,
    *,
    detect: Detector | None = None,
    scheme: str | None = None,
    parse: SpecParser | None = None,
    title: str = "",
    looks_like: str = "",
    order: int = 100,
) -> Callable[[Loader], Loader]:
    """Decorator that registers a loader as the format ``name``; give exactly one of ``detect`` and ``scheme``.

    Args:
        name: what ``load_dataset(..., format=name)`` and the card's ``source_format`` call it.
        detect: directory formats: ``detect(root: Path) -> bool``, whether the directory holds this format's files.
            It should only look (``is_file``, ``glob``), never read: every directory format's detector runs on every
            directory spec.
        scheme: spec formats: the prefix before ``:`` (``"synthetic"`` for ``synthetic:<preset>``).
        parse: schemes only: ``parse(body, spec) -> (target, options)``; default: the body is the target.
        title: the format's name in messages (default ``name``).
        looks_like: what ``detect`` looks for, in words, for the message of a directory no format recognises.
        order: where the format comes in detection and in messages (lowest first; equal orders keep registration
            order). The built-in formats take 10 (official), 20 (MMRec) and 30 (synthetic); the default is 100.

    Raises:
        TypeError: neither or both of ``detect`` and ``scheme``, or ``parse`` without a scheme.
        ValueError: ``name`` (or ``scheme``) is already registered to another loader.
    """
    if (detect is None) == (scheme is None):
        raise TypeError(f"@register_format({name!r}) needs exactly one of detect= (a directory format) or scheme= "
                        "(specs such as synthetic:<preset>)")
    if parse is not None and scheme is None:
        raise TypeError(f"@register_format({name!r}): parse= applies to schemes only")
    if scheme is not None and (not scheme or ":" in scheme or "/" in scheme):
        raise ValueError(f"@register_format({name!r}): scheme {scheme!r} must be a non-empty word without ':' or '/'")

    def decorate(load: Loader) -> Loader:
        if not callable(load):
            raise TypeError(f"@register_format({name!r}) decorates a loader function, got {load!r}")
        entry = DatasetFormat(name, load, detect, scheme, parse or _no_options, title, looks_like, order)
        if name in _REGISTRY and _REGISTRY[name] != entry:
            raise ValueError(f"a dataset format named {name!r} is already registered "
                             f"({getattr(_REGISTRY[name].load, '__qualname__', _REGISTRY[name].load)})")
        clash = next((f for f in _REGISTRY.values() if scheme is not None and f.scheme == scheme and f.name != name),
                     None)
        if clash is not None:
            raise ValueError(f"specs starting with {scheme}: already belong to the dataset format {clash.name!r}")
        _REGISTRY[name] = entry
        return load

    return decorate


def unregister_format(name: str) -> None:
    """Remove a format from the registry (for tests that register throwaway formats)."""
    _REGISTRY.pop(name, None)


def _ordered() -> list[DatasetFormat]:
    """Every format by ``order``, then registration order (``sorted`` is stable)."""
    return sorted(_REGISTRY.values(), key=lambda f: f.order)


def available_formats() -> list[str]:
    """Names of every registered format, in order (the built-in formats first)."""
    return [f.name for f in _ordered()]


def registered_formats() -> list[DatasetFormat]:
    """Every registered format, in order."""
    return _ordered()


def directory_formats() -> list[DatasetFormat]:
    """The formats recognised by their files, in detection order."""
    return [f for f in _ordered() if f.detect is not None]


def scheme_formats() -> list[DatasetFormat]:
    """The formats that own a spec prefix (``synthetic:``), in order."""
    return [f for f in _ordered() if f.scheme is not None]


def get_format(name: str, where: str | Path | None = None) -> DatasetFormat:
    """The directory format ``name`` (what ``format=`` accepts); an unknown name lists the known ones.

    Raises:
        DatasetError: about ``where`` (default: the name itself).
    """
    found = _REGISTRY.get(name)
    if found is None or found.detect is None:
        known = ", ".join(f.name for f in directory_formats()) or "none"
        raise DatasetError(name if where is None else where, f"unknown format {name!r}", f"one of {known}")
    return found


def detect_format(path: str | Path) -> str:
    """The name of the one directory format whose detector recognises ``path``.

    Raises:
        DatasetError: ``path`` is not a directory, no format recognises it (the message lists what each looks for),
            several do (``format=`` chooses), or a detector raised (the message names the format).
    """
    root = Path(path)
    if not root.is_dir():
        schemes = " or ".join(f.looks_like or f"{f.prefix}..." for f in scheme_formats())
        raise DatasetError(root, "no such dataset directory", f"a directory or {schemes}" if schemes else "a directory")
    matches = []
    for candidate in directory_formats():
        assert candidate.detect is not None
        try:
            found = candidate.detect(root)
        except DatasetError:
            raise
        except Exception as err:  # a plugin's broken detector: say whose it is instead of a bare traceback
            raise DatasetError(root, f"the {candidate.name!r} format's detector raised {type(err).__name__}: {err}",
                               "format= to skip detection, or a detector that returns True or False") from err
        if found:
            matches.append(candidate)
    if len(matches) > 1:
        both = " and ".join(f"{f.title or f.name} ({f.looks_like or f.name})" for f in matches)
        raise DatasetError(root, f"holds files of several formats: {both}", "format= to choose")
    if not matches:
        raise DatasetError(root, "no dataset files found", " or ".join(f.describe() for f in directory_formats())
                           or "a registered dataset format")
    return matches[0].name
