"""Dataset files must be regular files, symbolic links followed: a dangling or looping link, a directory, or a FIFO
where a dataset file belongs is an error naming the path, never a silently missing modality or a hung loader."""

from __future__ import annotations

import os
import signal

import pytest

from grcn_bench.datasets import generate_synthetic, load_dataset, write_mmrec, write_official
from grcn_bench.datasets.base import DatasetError
from grcn_bench.datasets.safeio import present


@pytest.fixture
def hang_guard():
    """Fail instead of waiting forever if a loader opens a FIFO (the bug this file guards against)."""
    def timeout(signum, frame):
        raise TimeoutError("the loader blocked (did it open a FIFO?)")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_present_tells_absent_from_regular_and_refuses_the_rest(tmp_path):
    regular = tmp_path / "a.npy"
    regular.write_bytes(b"x")
    (tmp_path / "link").symlink_to(regular)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.npy")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    assert present(regular) and present(tmp_path / "link") and not present(tmp_path / "nothing")
    for name, problem in (("dangling", "a symbolic link to a missing file"), ("loop", "loop"),
                          ("dir", "a directory, not a regular file"), ("fifo", "a FIFO, not a regular file")):
        with pytest.raises(DatasetError, match=problem) as caught:
            present(tmp_path / name)
        assert str(caught.value).startswith(str(tmp_path / name))


@pytest.mark.usefixtures("hang_guard")
def test_a_fifo_named_inter_is_refused_not_read(tmp_path):
    write_mmrec(generate_synthetic("tiny"), tmp_path, "synth")
    (tmp_path / "synth.inter").unlink()
    os.mkfifo(tmp_path / "synth.inter")
    with pytest.raises(DatasetError, match=r"synth\.inter: a FIFO, not a regular file"):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize("writer", ["mmrec", "official"])
def test_a_broken_feature_file_is_an_error_not_a_missing_modality(tmp_path, writer):
    data = generate_synthetic("tiny")
    if writer == "mmrec":
        write_mmrec(data, tmp_path, "synth")
    else:
        write_official(data, tmp_path)
    features = sorted(p for p in tmp_path.iterdir() if "feat" in p.name.lower())
    assert features, "the writer stored no feature file"
    victim = features[0]
    victim.unlink()
    victim.symlink_to(tmp_path / "moved-away.npy")
    with pytest.raises(DatasetError, match=rf"{victim.name}: a symbolic link to a missing file"):
        load_dataset(str(tmp_path))
    victim.unlink()
    victim.symlink_to(victim)
    with pytest.raises(DatasetError, match=rf"{victim.name}: a symbolic link that loops|{victim.name}: cannot be"):
        load_dataset(str(tmp_path))


def test_a_pickle_of_shared_references_is_refused_before_it_expands(tmp_path):
    """An 80 kB val_full.npy whose rows all reference one long list would expand to hundreds of millions of ids."""
    import numpy as np

    from grcn_bench.datasets.official import check_expansion, rows_to_pairs

    data = generate_synthetic("tiny")
    write_official(data, tmp_path)
    shared = [0, *range(1, 20_000)]
    rows = np.empty(2_000, dtype=object)
    rows[:] = [shared] * 2_000  # 40 million ids, one list in memory
    np.save(tmp_path / "val_full.npy", rows, allow_pickle=True)
    size = (tmp_path / "val_full.npy").stat().st_size
    assert size < 200_000
    with pytest.raises(DatasetError, match=r"val_full\.npy: expands to 40,000,000 ids from [\d,]+ bytes"):
        load_dataset(str(tmp_path))
    check_expansion(size, "x", size)  # at the bound: accepted
    honest = np.empty(2, dtype=object)
    honest[:] = [[0, 1, 2], [1, 3]]
    assert rows_to_pairs(honest, "x", max_ids=5).tolist() == [[0, 1], [0, 2], [1, 3]]
    with pytest.raises(DatasetError, match="expands to 5 ids from 4 bytes"):
        rows_to_pairs(honest, "x", max_ids=4)


@pytest.mark.parametrize("big", [2**62, 2**31])
def test_ids_beyond_the_int32_range_are_refused_before_any_arithmetic(tmp_path, big):
    import numpy as np
    import pandas as pd

    rows = pd.DataFrame({"userID": [0, 1, big, 2], "itemID": [1, 0, 2, 2], "x_label": [0, 0, 0, 0]})
    rows.to_csv(tmp_path / "big.inter", sep="\t", index=False)
    with pytest.raises(DatasetError, match=rf"big\.inter: id too large in data row 3: \[{big}, 2\]"):
        load_dataset(str(tmp_path))
    from grcn_bench.datasets.validate import check_pairs

    with pytest.raises(DatasetError, match=r"x: id too large in pair 1"):
        check_pairs(np.array([[0, 1], [big, 0]], dtype=np.uint64), "x")
    assert check_pairs(np.array([[0, 2**31 - 1]]), "x").tolist() == [[0, 2**31 - 1]]


def test_odd_tensors_in_pt_files_are_converted_or_refused_clearly(tmp_path):
    import warnings

    import torch

    from grcn_bench.datasets.safeio import load_pt

    dense = torch.tensor([[0.0, 1.5], [2.0, 0.0]])
    torch.save(dense.to_sparse(), tmp_path / "coo.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
        torch.save(dense.to_sparse_csr(), tmp_path / "csr.pt")
    for name in ("coo.pt", "csr.pt"):
        assert torch.equal(load_pt(tmp_path / name), dense)
    torch.save(torch.zeros(2, 2, dtype=torch.complex64), tmp_path / "complex.pt")
    with pytest.raises(DatasetError, match=r"complex\.pt: holds a tensor of dtype torch\.complex64"):
        load_pt(tmp_path / "complex.pt")
    huge = torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), (1 << 20, 1 << 10),
                                   check_invariants=True)
    torch.save(huge, tmp_path / "huge.pt")
    with pytest.raises(DatasetError, match=r"huge\.pt: a torch\.sparse_coo tensor of shape \(1048576, 1024\) would "
                                           r"take 4,294,967,296 bytes dense"):
        load_pt(tmp_path / "huge.pt")


def test_a_sparse_tensor_with_indices_out_of_its_shape_is_refused(tmp_path):
    import warnings

    import torch

    from grcn_bench.datasets.safeio import load_pt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = torch.sparse_coo_tensor(torch.tensor([[0, 99_999_999]]), torch.tensor([1.0, 2.0]), (4,),
                                      check_invariants=False)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(DatasetError, match=r"bad\.pt: refused or unreadable .*size is inconsistent with indices"):
        load_pt(tmp_path / "bad.pt")


def test_test_pairs_that_are_also_validation_pairs_are_dropped_and_counted(tmp_path):
    """Validation items are masked at test time, so such a pair could never be a hit: it leaves test, with a warning,
    and the card counts it. Data without overlap keeps its digest (the field is new)."""
    import pandas as pd

    rows = [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 2, 0), (0, 3, 1), (0, 3, 2), (1, 4, 2), (1, 5, 1)]
    pd.DataFrame(rows, columns=["userID", "itemID", "x_label"]).to_csv(tmp_path / "o.inter", sep="\t", index=False)
    with pytest.warns(UserWarning, match=r"o\.inter: dropped 1 test pairs that are also validation pairs"):
        data = load_dataset(str(tmp_path))
    assert data.test.tolist() == [[1, 4]] and data.val.tolist() == [[0, 3], [1, 5]]
    assert data.card.val_test_overlap_dropped == 1
    assert ("test pairs also in validation, dropped", "1") in data.card.rows()
    assert load_dataset("synthetic:tiny").card.digest() == "16dd8ea368894aa8"  # pinned before the field existed
