"""Untrusted files (docs/protocol.md, "Untrusted files"): the restricted unpickler reads what the authors' files need
and nothing else."""

from __future__ import annotations

import io
import os
import pickle
import pickletools

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format

from grcn_bench.datasets import DatasetError
from grcn_bench.datasets.safeio import load_npy, load_pt, restricted_unpickle, sha256_file


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _save_object_array(path, array, protocol=3):
    """An ``.npy`` file written by hand, so the pickle protocol can be chosen (np.save always uses 3)."""
    with open(path, "wb") as fh:
        npy_format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": array.shape})
        pickle.dump(array, fh, protocol=protocol)


def _globals(path):
    with open(path, "rb") as fh:
        npy_format.read_magic(fh)
        npy_format.read_array_header_1_0(fh)
        payload = fh.read()
    return {arg for op, arg, _ in pickletools.genops(payload) if op.name == "GLOBAL"}


def test_plain_array_roundtrip(tmp_path):
    array = np.arange(12, dtype=np.int64).reshape(6, 2)
    np.save(tmp_path / "a.npy", array)
    loaded = load_npy(tmp_path / "a.npy")
    assert loaded.dtype == np.int64 and np.array_equal(loaded, array)


def test_object_array_of_lists(tmp_path):
    rows = np.empty(3, dtype=object)
    rows[0], rows[1], rows[2] = [0, 10, 11], [1], [2, 12]
    np.save(tmp_path / "rows.npy", rows, allow_pickle=True)
    loaded = load_npy(tmp_path / "rows.npy")
    assert loaded.shape == (3,) and [list(r) for r in loaded] == [[0, 10, 11], [1], [2, 12]]


def test_python2_style_dict_of_sets(tmp_path):
    """Protocol 2 with the names a Python-2 era file uses: ``__builtin__.set``, ``_codecs.encode``, numpy.core."""
    mapping = {0: {5, 7}, 3: {6}}
    path = tmp_path / "user_item_train_dict.npy"
    _save_object_array(path, np.array(mapping, dtype=object), protocol=2)
    raw = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(raw)
    names = _globals(path)
    assert {"__builtin__ set", "_codecs encode", "numpy.core.multiarray _reconstruct"} <= names
    loaded = load_npy(path)
    assert loaded.shape == () and loaded.item() == mapping


def test_os_system_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil(marker)
    path = tmp_path / "val_full.npy"
    np.save(path, evil, allow_pickle=True)
    with pytest.raises(DatasetError) as error:
        load_npy(path)
    message = str(error.value)
    assert "val_full.npy" in message and "refused" in message and "system" in message
    assert not marker.exists()


@pytest.mark.parametrize("target", [eval, __import__("subprocess").Popen, getattr])
def test_other_dangerous_globals_refused(tmp_path, target):
    class Reducer:
        def __reduce__(self):
            return target, ("1",)

    payload = io.BytesIO(pickle.dumps(Reducer(), protocol=2))
    with pytest.raises(DatasetError, match=f"refused to unpickle global .*{target.__name__}"):
        restricted_unpickle(payload, "x.npy")


def test_malformed_files(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DatasetError, match="junk.npy: not a readable .npy file"):
        load_npy(tmp_path / "junk.npy")
    rows = np.empty(2, dtype=object)
    rows[0], rows[1] = [1, 2], [3]
    np.save(tmp_path / "cut.npy", rows, allow_pickle=True)
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-10])
    with pytest.raises(DatasetError, match="cut.npy: cannot unpickle"):
        load_npy(tmp_path / "cut.npy")
    with pytest.raises(DatasetError, match="missing file"):
        load_npy(tmp_path / "absent.npy")


def test_header_and_payload_must_agree(tmp_path):
    rows = np.empty(2, dtype=object)
    rows[0], rows[1] = [1, 2], [3]
    path = tmp_path / "lie.npy"
    with open(path, "wb") as fh:
        npy_format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": (5,)})
        pickle.dump(rows, fh, protocol=3)
    with pytest.raises(DatasetError, match="does not match the .npy header"):
        load_npy(path)


def test_load_pt(tmp_path):
    tensor = torch.arange(6.0).reshape(2, 3)
    torch.save(tensor, tmp_path / "feat_v.pt")
    assert torch.equal(load_pt(tmp_path / "feat_v.pt"), tensor)
    torch.save({"w": tensor}, tmp_path / "dict.pt")
    with pytest.raises(DatasetError, match="dict.pt: holds a dict"):
        load_pt(tmp_path / "dict.pt")


def test_load_pt_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(_Evil(marker), tmp_path / "feat_a.pt")
    with pytest.raises(DatasetError, match="feat_a.pt: refused or unreadable"):
        load_pt(tmp_path / "feat_a.pt")
    assert not marker.exists()


def test_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
