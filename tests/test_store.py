"""The result store: atomic writes, reruns skip stored cells, a crash never leaves a partial file."""

from __future__ import annotations

import os

import numpy as np
import pytest

from grcn_bench.benchmarks import store as store_module
from grcn_bench.benchmarks.config import Cell, TrainSettings
from grcn_bench.benchmarks.runner import pending_cells
from grcn_bench.benchmarks.store import ResultStore


def test_write_read_round_trip(tmp_path):
    store = ResultStore(tmp_path)
    store.write("c1", {"status": "ok", "test_metrics": {"recall@10": 0.25}}, {"test_users": np.arange(3)})
    assert store.has("c1") and store.cell_ids() == ["c1"]
    assert store.read("c1")["test_metrics"] == {"recall@10": 0.25}
    np.testing.assert_array_equal(store.read_arrays("c1")["test_users"], np.arange(3))
    assert [r["status"] for r in store.results()] == ["ok"]


def test_arrays_are_stored_compressed_and_any_damage_to_them_is_a_corrupt_entry(tmp_path):
    """Per-user metrics are mostly zeros: the ``.npz`` is deflated, round-trips exactly, and a byte flipped anywhere
    in it reads as a corrupt entry (a bad CRC, or a deflate stream zlib cannot decode), never another exception."""
    import zipfile

    store = ResultStore(tmp_path)
    rng = np.random.default_rng(0)
    recall = np.where(rng.random(5000) < 0.9, 0.0, rng.random(5000))
    store.write("c1", {"status": "ok"}, {"test_recall@10": recall, "test_users": np.arange(5000)})
    path = store.arrays_path("c1")
    with zipfile.ZipFile(path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    assert path.stat().st_size < (recall.nbytes + 5000 * 8) / 3
    np.testing.assert_array_equal(store.read_arrays("c1")["test_recall@10"], recall)

    intact = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        first = archive.infolist()[0]
    # The member's deflate stream starts after its local header: 30 bytes, then the name and extra field whose
    # lengths the header's last four bytes give (the local extra field may differ from the central directory's).
    name_length, extra_length = np.frombuffer(intact[first.header_offset + 26 : first.header_offset + 30], "<u2")
    start = first.header_offset + 30 + int(name_length) + int(extra_length)
    end = start + first.compress_size
    for position in range(start, end, max(1, (end - start) // 40)):
        damaged = bytearray(intact)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(store_module.CorruptEntryError, match="not a readable .npz"):
            store.read_arrays("c1")


def test_status_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="status"):
        ResultStore(tmp_path).write("c1", {"status": "maybe"})


@pytest.mark.parametrize("crash_in", ["fsync", "replace"])
def test_a_crash_while_writing_leaves_the_old_file_or_none(tmp_path, monkeypatch, crash_in):
    store = ResultStore(tmp_path)
    store.write("old", {"status": "ok", "value": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store_module.os, crash_in, crash)
    with pytest.raises(KeyboardInterrupt):
        store.write("new", {"status": "ok", "value": 2})
    with pytest.raises(KeyboardInterrupt):
        store.write("old", {"status": "ok", "value": 3})
    monkeypatch.undo()
    assert not store.has("new")
    assert store.read("old")["value"] == 1
    assert sorted(os.listdir(store.cells_dir)) == ["old.json"]  # no temporary file left behind


def test_arrays_are_written_before_the_json(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    order = []
    real = store_module.atomic_write_bytes
    monkeypatch.setattr(store_module, "atomic_write_bytes", lambda p, b: (order.append(p.suffix), real(p, b)))
    store.write("c", {"status": "ok"}, {"x": np.zeros(2)})
    assert order == [".npz", ".json"]


def test_rerun_skips_stored_cells_unless_forced(tmp_path):
    store = ResultStore(tmp_path)
    cells = [Cell("mf", "synthetic:tiny", TrainSettings(seed=s)) for s in range(3)]
    store.write(cells[0].cell_id, {"status": "ok"})
    store.write(cells[1].cell_id, {"status": "failed", "error": "boom"})
    assert pending_cells(cells, store) == [cells[2]]
    assert pending_cells(cells, store, retry_failed=True) == [cells[1], cells[2]]
    assert pending_cells(cells + cells, store, force=True) == cells


def test_an_audit_record_round_trips_beside_the_results_and_is_never_one(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    order = []
    real = store_module.atomic_write_bytes
    monkeypatch.setattr(store_module, "atomic_write_bytes", lambda p, b: (order.append(p.suffix), real(p, b)))
    assert store.read_audit("c") is None
    store.write_audit("c", {"epochs": [{"epoch": 1}], "best": None}, {"test_users": np.arange(2)})
    assert order == [".npz", ".json"]  # as a result: the arrays first
    record, arrays = store.read_audit("c")
    assert record["epochs"] == [{"epoch": 1}] and arrays["test_users"].tolist() == [0, 1]
    assert store.cell_ids() == [] and list(store.results()) == []  # not a cell result
    store.audit_path("c").write_text('{"status": "ok"}')
    with pytest.raises(store_module.CorruptEntryError, match="not an audit record"):
        store.read_audit("c")
    store.remove_audit("c")
    assert not store.audit_path("c").exists() and not store.audit_arrays_path("c").exists()
