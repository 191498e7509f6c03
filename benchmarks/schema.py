"""The typed schema of experiment files: every key, its type and its range, checked before anything is built.

An unknown key or a value of the wrong type is one line naming the file, the key and what it expects, e.g.
``experiment file my.toml: train.max_epochs must be an integer >= 1, got "40" (a string)``. Without it,
``datasets = "synthetic:tiny"`` ran one cell per character and ``seeds = [0.7]`` ran seed 0.

Why not a schema library: JSON Schema (``jsonschema``) or pydantic would be a new dependency for about thirty keys,
and neither says "got '40' (a string)" in the one line a user needs without a formatter of our own around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], str | None]  # returns what was expected when the value does not fit, else None


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)
    shown = repr(value) if not isinstance(value, dict | list) or len(repr(value)) < 40 else "..."
    return f"{shown} ({kind})"


def string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "a non-empty string"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def integer(minimum: int | None = None) -> Check:
    expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")

    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
        return None if ok else expected

    return check


def number(*, positive: bool = False) -> Check:
    expected = "a finite number" + (" > 0" if positive else " >= 0")

    def check(value: Any) -> str | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and (
            value > 0 if positive else value >= 0)
        return None if ok else expected

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"one of {', '.join(map(repr, choices))}"

    return check


def list_of(item: Check, *, non_empty: bool = True) -> Check:
    """A list whose every item passes ``item``; the first wrong item is what the message shows."""
    def check(value: Any) -> str | None:
        if not isinstance(value, list) or (non_empty and not value):
            return f"a{' non-empty' if non_empty else ''} list"
        for element in value:
            problem = item(element)
            if problem:
                return f"a list, each item {problem}"
        return None

    return check


def table(value: Any) -> str | None:
    return None if isinstance(value, Mapping) else "a table"


TRAIN = {"lr": number(positive=True), "reg_weight": number(), "seed": integer(0), "batch_size": integer(1),
         "max_epochs": integer(1), "patience": integer(1), "ks": list_of(integer(1)),
         "protocol": one_of("standard", "official-grcn")}
SEARCH = {"method": one_of("grid", "halving"), "selection_seeds": integer(1), "min_epochs": integer(1),
          "eta": integer(2), "survivors": integer(1), "per_lr": boolean}
ENTRY = {"name": string, "label": string, "options": table, "sweep": table, "datasets": list_of(string),
         "group": string, "train": table, "tuned_from": string}
EXPERIMENT = {"name": string, "description": lambda v: None if isinstance(v, str) else "a string",
              "models": list_of(table), "datasets": list_of(string), "seeds": list_of(integer(0)),
              "lr": list_of(number(positive=True)), "reg": list_of(number()), "train": table, "report": table,
              "search": table}
REQUIRED = {"models", "datasets"}


class SchemaError(ValueError):
    """An experiment file that does not fit the schema; the message is one line."""


def check_table(data: Mapping[str, Any], schema: Mapping[str, Check], *, where: str, prefix: str = "") -> None:
    """Raise :class:`SchemaError` for the first unknown key or wrong value of ``data`` (in file order)."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise SchemaError(f"{where}: unknown key {path!r}; expected one of {', '.join(sorted(schema))}")
        problem = schema[key](value)
        if problem:
            raise SchemaError(f"{where}: {path} must be {problem}, got {_describe(value)}")


def check_experiment(data: Mapping[str, Any], *, where: str) -> None:
    """Check a parsed experiment file against the schema (the model options are the models' own to check)."""
    check_table(data, EXPERIMENT, where=where)
    needs = {"models": "at least one [[models]] entry", "datasets": "a non-empty list of dataset specs"}
    for key in sorted(REQUIRED - set(data)):
        raise SchemaError(f"{where}: {key} is required ({needs[key]})")
    check_table(data.get("train", {}), TRAIN, where=where, prefix="train.")
    check_table(data.get("search", {}), SEARCH, where=where, prefix="search.")
    for index, entry in enumerate(data["models"]):
        at = f"models[{index}]."
        check_table(entry, ENTRY, where=where, prefix=at)
        if "name" not in entry:
            raise SchemaError(f"{where}: {at}name is required (a registered model name)")
        check_table(entry.get("train", {}), TRAIN, where=where, prefix=f"{at}train.")
        for option, values in entry.get("sweep", {}).items():
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: {at}sweep.{option} must be a non-empty list, got {_describe(values)}")
