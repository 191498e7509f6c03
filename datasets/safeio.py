"""Reading untrusted dataset files without executing anything they contain (docs/protocol.md, "Untrusted files").

Pickled ``.npy`` object arrays (the authors' ``val_full.npy``, ``user_item_train_dict.npy``) are unpickled with
:class:`RestrictedUnpickler`, which resolves only the globals those files need: numpy's array reconstruction, dtypes
and scalars, the builtin containers and ``int``, and the codec function that protocol-2 pickles use for bytes. Any
other global (``os.system``, ``subprocess.Popen``, ``builtins.eval``, ...) is refused before it can be called.
``.pt`` files are read with ``torch.load(weights_only=True)``, PyTorch's own restricted unpickler.
"""

from __future__ import annotations

import builtins
import codecs
import hashlib
import io
import os
import pickle
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch import Tensor

from .base import DatasetError

try:  # numpy >= 2 keeps the implementation under numpy._core; numpy.core is a deprecated alias there.
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray

__all__ = ["RestrictedUnpickler", "load_npy", "load_pt", "present", "restricted_unpickle", "sha256_file"]


def present(path: str | Path) -> bool:
    """Whether a dataset file is there: ``False`` when nothing has that name, ``True`` for a regular file (symbolic
    links followed). Anything else that has the name is refused, naming the path, rather than skipped: a dangling
    or looping link, a directory, a FIFO (reading one would wait forever), a socket or a device."""
    path = Path(path)
    if not path.is_symlink() and not path.exists():
        return False
    try:
        target = path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        raise DatasetError(path, "a symbolic link that loops", "a regular file") from None
    except FileNotFoundError:
        raise DatasetError(path, f"a symbolic link to a missing file ({os.readlink(path)})", "a regular file") from None
    except OSError as err:  # ELOOP on newer Pythons, or permissions
        raise DatasetError(path, f"cannot be resolved ({err.strerror})", "a regular file") from None
    mode = target.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise DatasetError(path, f"{kind}, not a regular file", "a regular file")
    return True

_BUILTINS = ("set", "frozenset", "list", "dict", "int", "tuple")

#: (module, name) -> object. Python-2 pickles name ``__builtin__``; numpy 1.x pickles name ``numpy.core``.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    **{(module, name): getattr(builtins, name) for module in ("builtins", "__builtin__") for name in _BUILTINS},
    **{
        (module, name): getattr(_multiarray, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    },
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` and names the file when it refuses one."""

    def __init__(self, file: BinaryIO, path: str | Path):
        # latin1 decodes Python-2 ``str`` payloads byte for byte, which numpy needs for array buffers.
        super().__init__(file, encoding="latin1", fix_imports=False)
        self.path = str(path)

    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(
                self.path,
                f"refused to unpickle global {module}.{name}",
                "only numpy arrays, dtypes and builtin containers of ints",
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise DatasetError(self.path, "refused a persistent-id reference in the pickle", "a self-contained pickle")


def restricted_unpickle(fileobj: BinaryIO, path: str | Path) -> object:
    """Unpickle ``fileobj`` with :class:`RestrictedUnpickler`; every failure is a :class:`DatasetError`."""
    try:
        return RestrictedUnpickler(fileobj, path).load()
    except DatasetError:
        raise
    except Exception as error:  # a malformed pickle raises anything from EOFError to TypeError
        raise DatasetError(path, f"cannot unpickle ({type(error).__name__}: {error})", "a valid pickle") from None


def _read_header(fh: BinaryIO, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npy_format.read_magic(fh)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(fh)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(fh)
        return npy_format._read_array_header(fh, version)  # (3, 0): utf-8 header, no public reader
    except DatasetError:
        raise
    except Exception as error:
        raise DatasetError(path, f"not a readable .npy file ({error})", "numpy's .npy format") from None


def load_npy(path: str | Path) -> np.ndarray:
    """Load a ``.npy`` file: plain dtypes directly, object arrays through the restricted unpickler.

    Raises:
        DatasetError: missing file, malformed header or payload, or a pickle that names a refused global.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "missing file", "an existing .npy file")
    with path.open("rb") as fh:
        shape, fortran_order, dtype = _read_header(fh, path)
        if not dtype.hasobject:
            fh.seek(0)
            try:
                return np.load(fh, allow_pickle=False)
            except Exception as error:
                raise DatasetError(path, f"cannot read array payload ({error})", f"{shape} {dtype}") from None
        array = restricted_unpickle(io.BytesIO(fh.read()), path)
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise DatasetError(path, "pickled payload does not match the .npy header", f"an object array of shape {shape}")
    return array


def load_pt(path: str | Path) -> Tensor:
    """Load a tensor saved with ``torch.save`` using ``weights_only=True`` (no arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "missing file", "an existing .pt file")
    try:
        # A sparse tensor's indices are checked against its shape as it loads: unchecked, an out-of-range index in
        # an untrusted file would write out of bounds when it is made dense.
        with torch.sparse.check_sparse_tensor_invariants():
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DatasetError(path, f"refused or unreadable by torch.load(weights_only=True): {first_line}") from None
    if not isinstance(value, Tensor):
        raise DatasetError(path, f"holds a {type(value).__name__}", "a single tensor")
    if value.is_complex() or value.dtype == torch.bool or value.is_quantized:
        raise DatasetError(path, f"holds a tensor of dtype {value.dtype}", "real features or integer word ids")
    if value.layout != torch.strided:  # sparse (COO, CSR, ...): the loaders read dense rows
        dense_bytes = value.numel() * value.element_size()
        if dense_bytes > max(64 * path.stat().st_size, 1 << 28):
            raise DatasetError(path, f"a {value.layout} tensor of shape {tuple(value.shape)} would take "
                                     f"{dense_bytes:,} bytes dense", "a dense tensor, or a sparse one that fits")
        value = value.to_dense()
    return value


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
