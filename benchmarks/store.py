"""The result store: one JSON file per cell (plus an ``.npz`` of per-user metrics), written atomically.

Layout of a results directory::

    <out>/cells/<cell_id>.json    the result (docs/layout.md, "Result files"); its presence means the cell is done
    <out>/cells/<cell_id>.npz     per-user test metrics (and embeddings when asked), written before the JSON
    <out>/checkpoints/<cell_id>.pt  best state during training (removed when the cell finishes)
    <out>/logs/<cell_id>.log      one line per epoch
    <out>/claims/<cell_id>.lock   held (flock) by the process training the cell, so that no two runners train it
    <out>/audit/<cell_id>.json    a standard run's released-protocol evaluation, per epoch (the protocol audit only;
    <out>/audit/<cell_id>.npz     docs/protocol.md, "Protocol audit"), and its per-user test values; no selection or
                                  table reads them, only :func:`~.runner.official_from_twin`

Every file is written to a temporary name in the same folder, flushed to disk and renamed over its final name
(``os.replace`` is atomic on POSIX), so a crash or a kill at any moment leaves either the complete file or none.
Reports only read the store; a rerun skips cells whose JSON exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STATUSES = ("ok", "diverged", "failed")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see either the old file, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CorruptEntryError(ValueError):
    """A file in the store that is not what the store writes; the message names it and how to recover."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}; delete it, or rerun with --force to retrain its cell")
        self.path = path


class ResultStore:
    """A results directory: write, read and list cell results."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        self.checkpoints_dir = self.root / "checkpoints"
        self.logs_dir = self.root / "logs"
        self.audit_dir = self.root / "audit"

    def result_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def arrays_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.npz"

    def checkpoint_path(self, cell_id: str) -> Path:
        return self.checkpoints_dir / f"{cell_id}.pt"

    def log_path(self, cell_id: str) -> Path:
        return self.logs_dir / f"{cell_id}.log"

    def audit_path(self, cell_id: str) -> Path:
        return self.audit_dir / f"{cell_id}.json"

    def audit_arrays_path(self, cell_id: str) -> Path:
        return self.audit_dir / f"{cell_id}.npz"

    def has(self, cell_id: str) -> bool:
        return self.result_path(cell_id).is_file()

    def status(self, cell_id: str) -> str | None:
        """The stored status of a cell, or None if it has no result."""
        return self.read(cell_id)["status"] if self.has(cell_id) else None

    def write(self, cell_id: str, result: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Store a cell's result. The arrays go first, the JSON last: a JSON file always has its arrays."""
        if result.get("status") not in STATUSES:
            raise ValueError(f"result status must be one of {STATUSES}, got {result.get('status')!r}")
        self._write_npz(self.arrays_path(cell_id), arrays)
        payload = json.dumps(result, indent=1, sort_keys=True, default=_json_default, allow_nan=True)
        atomic_write_bytes(self.result_path(cell_id), payload.encode())

    def read(self, cell_id: str) -> dict[str, Any]:
        """A stored result; a file that is not one raises :class:`CorruptEntryError` naming it and the fix."""
        path = self.result_path(cell_id)
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:  # possible only if something else wrote the file
            raise CorruptEntryError(path, f"not JSON ({err})") from None
        if not isinstance(result, dict) or result.get("status") not in STATUSES:
            shown = type(result).__name__ if not isinstance(result, dict) else f"status {result.get('status')!r}"
            raise CorruptEntryError(path, f"not a cell result ({shown})")
        return result

    def write_audit(self, cell_id: str, record: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Store a standard run's audit record (docs/protocol.md, "Protocol audit"), as :meth:`write` stores a
        result: the arrays first, the JSON last, each atomically."""
        self._write_npz(self.audit_arrays_path(cell_id), arrays)
        payload = json.dumps(record, indent=1, sort_keys=True, default=_json_default, allow_nan=True)
        atomic_write_bytes(self.audit_path(cell_id), payload.encode())

    def remove_audit(self, cell_id: str) -> None:
        """Drop a cell's audit record (the JSON first: a record never lacks its arrays)."""
        self.audit_path(cell_id).unlink(missing_ok=True)
        self.audit_arrays_path(cell_id).unlink(missing_ok=True)

    def read_audit(self, cell_id: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """A standard run's audit record and its arrays, or ``None`` when it has none. Only the derivation of a
        released-protocol result reads it (:func:`~.runner.official_from_twin`); a damaged record raises
        :class:`CorruptEntryError`."""
        path = self.audit_path(cell_id)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptEntryError(path, f"not JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("epochs"), list):
            raise CorruptEntryError(path, "not an audit record")
        return record, self._read_npz(self.audit_arrays_path(cell_id))

    def _write_npz(self, path: Path, arrays: Mapping[str, np.ndarray] | None) -> None:
        """``arrays`` as a compressed ``.npz``, atomically (per-user metrics are mostly zeros: several-fold smaller
        in a committed store); no file when there are none."""
        if arrays:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
            atomic_write_bytes(path, buffer.getvalue())
        else:
            path.unlink(missing_ok=True)

    def read_arrays(self, cell_id: str) -> dict[str, np.ndarray]:
        """Per-user arrays of a cell (empty when it stored none). Plain arrays only: no pickles are loaded."""
        return self._read_npz(self.arrays_path(cell_id))

    def _read_npz(self, path: Path) -> dict[str, np.ndarray]:
        if not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise CorruptEntryError(path, f"not a readable .npz ({type(err).__name__}: {err})") from None

    @contextlib.contextmanager
    def claim(self, cell_id: str) -> Iterator[bool]:
        """Hold ``cell_id``'s claim while the block runs; yields whether this process got it.

        An exclusive ``flock`` on ``claims/<cell_id>.lock``: the kernel releases it when its holder exits, even by
        SIGKILL, so a dead runner never blocks a cell. Where the filesystem has no ``flock`` (some network
        filesystems) every claim succeeds, as before claims existed.
        """
        path = self.root / "claims" / f"{cell_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            except OSError:  # ENOLCK and the like: no locking here
                yield True
                return
            try:
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def drop_arrays(self, cell_id: str, names: Sequence[str]) -> bool:
        """Rewrite a cell's ``.npz`` without the arrays ``names`` (atomically); whether any was there."""
        arrays = self.read_arrays(cell_id)
        if not any(name in arrays for name in names):
            return False
        self._write_npz(self.arrays_path(cell_id), {k: v for k, v in arrays.items() if k not in names})
        return True

    def cell_ids(self) -> list[str]:
        if not self.cells_dir.is_dir():
            return []
        return sorted(p.stem for p in self.cells_dir.glob("*.json") if not p.name.startswith("."))

    def results(self) -> Iterator[dict[str, Any]]:
        for cell_id in self.cell_ids():
            yield self.read(cell_id)

    def remove(self, cell_id: str) -> None:
        for path in (self.result_path(cell_id), self.arrays_path(cell_id), self.checkpoint_path(cell_id)):
            path.unlink(missing_ok=True)

    def write_json(self, name: str, data: Any) -> Path:
        """A JSON side file at the store's root (experiment description, environment)."""
        path = self.root / name
        atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True, default=_json_default).encode())
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a result file")
