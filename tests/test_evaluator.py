"""Full-ranking evaluation (docs/protocol.md, "Evaluation") and the released code's protocol.

Datasets are built by hand from ``RecDataset``; models are MF (in float64, so that scores are far from ties) or a
test-local model whose scores are a fixed table. Reference values come from a plain per-user loop over a dense
score matrix.
"""

from __future__ import annotations

from math import log2

import numpy as np
import pytest
import torch

from grcn_bench.benchmarks.evaluator import (
    SCORE_BLOCKS,
    SCORE_BYTES,
    EvalResult,
    csr_select,
    eval_batch_size,
    evaluate,
    mask_scores_,
)
from grcn_bench.benchmarks.metrics import metric_names
from grcn_bench.datasets.base import DatasetCard, DatasetInfo, InteractionGraph, RecDataset
from grcn_bench.models.base import Embeddings, Recommender
from grcn_bench.models.mf import MF


def make_dataset(num_users: int, num_items: int, train, val, test, name: str = "handmade") -> RecDataset:
    splits = {
        s: torch.as_tensor(p, dtype=torch.long).reshape(-1, 2)
        for s, p in zip(("train", "val", "test"), (train, val, test), strict=True)
    }
    card = DatasetCard(
        name=name,
        source_format="test",
        path=None,
        num_users=num_users,
        num_items=num_items,
        split_counts={s: int(p.size(0)) for s, p in splits.items()},
        modalities={},
    )
    return RecDataset(name, num_users, num_items, splits["train"], splits["val"], splits["test"], {}, card)


def random_dataset(seed: int = 0, num_users: int = 40, num_items: int = 60) -> RecDataset:
    """Random distinct pairs split 8:1:1 at random (some users end up without val or test pairs)."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(num_users * num_items, generator=gen)[: num_users * num_items // 5]
    pairs = torch.stack([flat // num_items, flat % num_items], 1)
    n = pairs.size(0)
    a, b = int(0.8 * n), int(0.9 * n)
    return make_dataset(num_users, num_items, pairs[:a], pairs[a:b], pairs[b:], name=f"random{seed}")


class TableModel(Recommender):
    """Scores are a fixed ``[U, I]`` table: ``score`` is ``table[users] @ eye(I)``, which is exact in floating point.

    Counts its forwards and records the mode and graph each one saw.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__(DatasetInfo(num_users=table.size(0), num_items=table.size(1)), embedding_dim=table.size(1))
        self.table = torch.nn.Parameter(table.clone())
        self.dropout = torch.nn.Dropout(0.5)  # a submodule, to check that per-module modes are restored
        self.forward_calls = 0
        self.seen: list[tuple[bool, InteractionGraph]] = []

    def forward(self, graph: InteractionGraph) -> Embeddings:
        self.forward_calls += 1
        self.seen.append((self.training, graph))
        return Embeddings(self.table, torch.eye(self.num_items, dtype=self.table.dtype))


def reference_metrics(scores: np.ndarray, dataset: RecDataset, split: str, k: int) -> dict[int, tuple[float, ...]]:
    """Standard protocol, one user at a time with plain Python: {user: (precision, recall, ndcg)}."""
    masked_splits = ("train",) if split == "val" else ("train", "val")
    masked = {(int(u), int(i)) for s in masked_splits for u, i in dataset.split(s).tolist()}
    held: dict[int, set[int]] = {}
    for u, i in dataset.split(split).tolist():
        held.setdefault(u, set()).add(i)
    out = {}
    for user in sorted(held):
        candidates = [i for i in range(dataset.num_items) if (user, i) not in masked]
        ranked = sorted(candidates, key=lambda i: -scores[user, i])[:k]
        hits = [i in held[user] for i in ranked]
        dcg = sum(1 / log2(r + 2) for r, hit in enumerate(hits) if hit)
        idcg = sum(1 / log2(r + 2) for r in range(min(len(held[user]), k)))
        out[user] = (sum(hits) / k, sum(hits) / len(held[user]), dcg / idcg)
    return out


def budget_for(batch: int, num_items: int) -> int:
    return batch * num_items * SCORE_BYTES * SCORE_BLOCKS


@pytest.mark.parametrize("split", ["val", "test"])
def test_matches_per_user_reference_and_ignores_batch_size(split):
    dataset = random_dataset()
    torch.manual_seed(0)
    model = MF(dataset.info(), embedding_dim=8).double()
    results = []
    for batch in (1, 7, 10_000):
        assert eval_batch_size(budget_for(batch, dataset.num_items), dataset.num_items) == batch
        results.append(
            evaluate(
                model,
                dataset,
                split,
                ks=(5, 10),
                memory_budget=budget_for(batch, dataset.num_items),
                keep_top_items=True,
            )
        )
    first = results[0]
    for other in results[1:]:
        assert np.array_equal(first.users, other.users)
        assert np.array_equal(first.top_items, other.top_items)
        for name in first.per_user:
            assert np.array_equal(first.per_user[name], other.per_user[name]), name

    with torch.no_grad():
        scores = (model.user_embedding @ model.item_embedding.t()).numpy()
    for k in (5, 10):
        reference = reference_metrics(scores, dataset, split, k)
        assert first.users.tolist() == sorted(reference)
        for column, metric in enumerate(("precision", "recall", "ndcg")):
            expected = np.array([reference[u][column] for u in first.users])
            np.testing.assert_allclose(first.per_user[f"{metric}@{k}"], expected, rtol=0, atol=1e-12)
    assert first.split == split and first.protocol == "standard" and first.ks == (5, 10)
    assert list(first.per_user) == metric_names((5, 10))
    assert all(v.dtype == np.float64 and v.shape == (first.num_users,) for v in first.per_user.values())
    means = first.mean()
    assert means["recall@10"] == pytest.approx(float(np.mean(first.per_user["recall@10"])))


def test_test_lists_never_contain_train_or_validation_items():
    dataset = random_dataset(seed=1, num_users=20, num_items=30)
    # Every training and validation item outscores every other item, so unmasked they would fill the lists.
    gen = torch.Generator().manual_seed(3)
    table = torch.rand(20, 30, generator=gen)
    seen = torch.cat([dataset.train, dataset.val])
    table[seen[:, 0], seen[:, 1]] += 100.0
    model = TableModel(table)
    result = evaluate(model, dataset, "test", ks=(10,), memory_budget=budget_for(3, 30), keep_top_items=True)
    consumed = {(u, i) for u, i in seen.tolist()}
    for user, items in zip(result.users.tolist(), result.top_items.tolist(), strict=True):
        assert not any((user, i) in consumed for i in items if i >= 0)
        # -1 (no candidate) appears only when fewer than K items are unmasked.
        free = 30 - sum((user, i) in consumed for i in range(30))
        assert items.count(-1) == max(0, 10 - free)
    # On validation, only training items are masked: validation items (the positives) take the top of the lists.
    val_result = evaluate(model, dataset, "val", ks=(10,), keep_top_items=True)
    train = {(u, i) for u, i in dataset.train.tolist()}
    for user, items in zip(val_result.users.tolist(), val_result.top_items.tolist(), strict=True):
        assert not any((user, i) in train for i in items if i >= 0)
    assert np.all(val_result.per_user["recall@10"] == 1.0)  # every user here has fewer than 10 val items


def test_users_without_held_out_items_are_skipped():
    # 3 users, 4 items. User 1 has no test item; user 2 has no item at all.
    train = [[0, 0], [1, 1], [1, 2]]
    test = [[0, 3], [0, 1]]
    val = [[1, 3]]
    dataset = make_dataset(3, 4, train, val, test)
    table = torch.tensor([[0.0, 0.2, 0.1, 0.3], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    result = evaluate(TableModel(table), dataset, "test", ks=(1, 2))
    assert result.users.tolist() == [0]
    # User 0: item 0 masked; ranking 3 (0.3), 1 (0.2), 2 (0.1); positives {1, 3}.
    # @1: hit at rank 0 -> precision 1, recall 1/2, ndcg 1 / (1 + 1/log2 3)
    # @2: hits at ranks 0 and 1 -> precision 1, recall 1, ndcg 1
    assert result.mean() == pytest.approx(
        {"precision@1": 1.0, "recall@1": 0.5, "ndcg@1": 1.0, "precision@2": 1.0, "recall@2": 1.0, "ndcg@2": 1.0}
    )
    val_result = evaluate(TableModel(table), dataset, "val", ks=(1,))
    assert val_result.users.tolist() == [1]
    # User 1: items 1, 2 masked; ranking 3 (0.4), 0 (0.1); val positive {3} at rank 0.
    assert val_result.mean() == {"precision@1": 1.0, "recall@1": 1.0, "ndcg@1": 1.0}


def official_case() -> tuple[RecDataset, torch.Tensor]:
    # One user, 6 items: item 0 train, item 1 validation, items 2 and 3 test. Scores are mostly negative.
    dataset = make_dataset(1, 6, train=[[0, 0]], val=[[0, 1]], test=[[0, 2], [0, 3]])
    table = torch.tensor([[-1.0, 0.5, -0.5, 2.0, -0.2, -0.8]])
    return dataset, table


def test_official_protocol_inflates_masked_train_items_and_keeps_validation_items():
    dataset, table = official_case()
    standard = evaluate(TableModel(table), dataset, "test", ks=(3,), keep_top_items=True)
    official = evaluate(TableModel(table), dataset, "test", ks=(3,), protocol="official-grcn", keep_top_items=True)
    # Standard: items 0 (train) and 1 (val) at -inf; ranking 3 (2.0), 4 (-0.2), 2 (-0.5): hits at ranks 0 and 2.
    assert standard.top_items.tolist() == [[3, 4, 2]]
    d0, d1, d2 = 1.0, 1 / log2(3), 1 / log2(4)
    assert standard.mean() == pytest.approx({"precision@3": 2 / 3, "recall@3": 1.0, "ndcg@3": (d0 + d2) / (d0 + d1)})
    # Official: the train item's score -1.0 becomes 1e-5, which outranks the negatives -0.2 and -0.5 (a test
    # positive); the validation item (0.5) is not masked. Ranking 3, 1, 0: a single hit at rank 0.
    assert official.top_items.tolist() == [[3, 1, 0]]
    # Recall halves, yet NDCG reads a perfect 1.0: its IDCG counts min(hits, K) = 1 position, not min(|P|, K) = 2.
    assert official.mean() == pytest.approx({"precision@3": 1 / 3, "recall@3": 0.5, "ndcg@3": 1.0})
    assert official.protocol == "official-grcn"


def test_official_protocol_on_validation_masks_train_with_small_score():
    dataset, table = official_case()
    result = evaluate(TableModel(table), dataset, "val", ks=(4,), protocol="official-grcn", keep_top_items=True)
    # Ranking 3 (2.0), 1 (0.5, the val positive), 0 (1e-5, train), 4 (-0.2).
    assert result.top_items.tolist() == [[3, 1, 0, 4]]
    assert result.mean() == pytest.approx({"precision@4": 1 / 4, "recall@4": 1.0, "ndcg@4": 1 / log2(3)})


def test_one_forward_per_evaluation_and_none_with_embeddings():
    dataset = random_dataset(seed=2, num_users=25, num_items=20)
    model = TableModel(torch.rand(25, 20, generator=torch.Generator().manual_seed(0)))
    small = evaluate(model, dataset, "val", memory_budget=budget_for(2, 20))  # many batches
    assert model.forward_calls == 1
    emb = model(dataset.graph())
    assert model.forward_calls == 2
    again = evaluate(model, dataset, "val", embeddings=emb)
    assert model.forward_calls == 2
    for name in small.per_user:
        assert np.array_equal(small.per_user[name], again.per_user[name])


def test_graph_argument_and_default_graph():
    dataset = random_dataset(seed=2, num_users=25, num_items=20)
    model = TableModel(torch.rand(25, 20, generator=torch.Generator().manual_seed(0)))
    evaluate(model, dataset, "test", device="cpu")
    default_graph = model.seen[-1][1]
    assert default_graph.num_edges == 2 * dataset.train.size(0)
    own = InteractionGraph.from_pairs(dataset.train[:5], 25, 20)
    evaluate(model, dataset, "test", graph=own)
    assert model.seen[-1][1] is own


@pytest.mark.parametrize("start_training", [True, False])
def test_eval_mode_during_forward_and_mode_restored(start_training):
    dataset = random_dataset(seed=2, num_users=25, num_items=20)
    model = TableModel(torch.rand(25, 20, generator=torch.Generator().manual_seed(0)))
    model.train(start_training)
    model.dropout.train(not start_training)  # mixed modes must come back exactly
    evaluate(model, dataset, "val")
    assert model.seen[-1][0] is False
    assert model.training is start_training
    assert model.dropout.training is (not start_training)


def test_masking_never_writes_into_the_model():
    class ViewModel(TableModel):
        def score(self, emb, users):
            return emb.user[: users.numel()]  # a view of the parameter, valid when users are 0..B-1

    dataset = make_dataset(2, 3, train=[[0, 0], [1, 1]], val=[], test=[[0, 2], [1, 2]])
    table = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    model = ViewModel(table)
    evaluate(model, dataset, "test", ks=(1,))
    assert torch.equal(model.table.detach(), table)


def test_mask_scores_and_csr_select():
    indptr, items = torch.tensor([0, 2, 2, 5]), torch.tensor([1, 3, 0, 1, 2])
    local_ptr, local_items = csr_select(indptr, items, torch.tensor([2, 0, 1]))
    assert local_ptr.tolist() == [0, 3, 5, 5]
    assert local_items.tolist() == [0, 1, 2, 1, 3]
    scores = torch.zeros(3, 4)
    mask_scores_(scores, local_ptr, local_items, -1.0)
    assert scores.tolist() == [[-1, -1, -1, 0], [0, -1, 0, -1], [0, 0, 0, 0]]


def test_error_paths():
    dataset = random_dataset(seed=2, num_users=25, num_items=20)
    model = TableModel(torch.rand(25, 20, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="cannot evaluate split 'train'"):
        evaluate(model, dataset, "train")
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        evaluate(model, dataset, protocol="grcn")
    for budget in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="memory_budget"):
            evaluate(model, dataset, memory_budget=budget)
    with pytest.raises(ValueError, match="positive int"):
        evaluate(model, dataset, ks=(0,))
    wrong = Embeddings(torch.zeros(24, 3), torch.zeros(20, 3))
    with pytest.raises(ValueError, match="embeddings cover 24 users and 20 items"):
        evaluate(model, dataset, embeddings=wrong)

    class BadShape(TableModel):
        def score(self, emb, users):
            return emb.user[users][:, :5]

    with pytest.raises(ValueError, match=r"BadShape.score returned .* expected a floating"):
        evaluate(BadShape(torch.rand(25, 20)), dataset)

    nan_table = torch.rand(25, 20)
    nan_table[:, 7] = float("nan")
    with pytest.raises(ValueError, match="produced NaN scores"):
        evaluate(TableModel(nan_table), dataset)

    no_test = make_dataset(2, 3, train=[[0, 0]], val=[[1, 1]], test=[])
    with pytest.raises(ValueError, match="has no held-out pairs"):
        evaluate(TableModel(torch.rand(2, 3)), no_test, "test")


def test_small_catalogue_pads_lists():
    dataset = make_dataset(1, 4, train=[[0, 0]], val=[], test=[[0, 2]])
    table = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    result = evaluate(TableModel(table), dataset, "test", ks=(2, 6), keep_top_items=True)
    # Item 0 masked; ranking 2, 3, 1, then no candidates.
    assert result.top_items.tolist() == [[2, 3, 1, -1, -1, -1]]
    assert result.mean()["precision@6"] == pytest.approx(1 / 6)
    assert result.ks == (2, 6)


def test_eval_result_mean_is_plain_floats():
    result = EvalResult("val", (1,), "standard", np.array([3, 5]), {"recall@1": np.array([0.0, 1.0])})
    assert result.mean() == {"recall@1": 0.5} and isinstance(result.mean()["recall@1"], float)
    assert result.num_users == 2 and result.top_items is None
