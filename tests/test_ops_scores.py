"""Full-ranking scores (``native.run_dot_scores`` and the evaluator's scorers): ``torch.mm``'s bits and an exact
reference's, the groups' maxima, independence from the batch, every refusal, the fallbacks, and the maxima kept right
through masking."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from grcn_bench.benchmarks.evaluator import (
    TOPK_GROUP,
    BufferedDotScores,
    CompiledDotScores,
    compute_embeddings,
    dot_scorer,
    evaluate,
    grouped_top_k,
    mask_scores_,
    refresh_group_maxima_,
)
from grcn_bench.datasets import load_dataset
from grcn_bench.models import get_model
from grcn_bench.models.base import Embeddings
from grcn_bench.models.mf import MF
from grcn_bench.models.ops import native

needs_native = pytest.mark.skipif(native.native_kernels() is None,
                                  reason=f"compiled kernels unavailable here: {native.kernel_status()}")
needs_torch_mm_sums = pytest.mark.skipif(
    native.native_kernels() is None or native.dot_scores_status() != "native",
    reason=f"torch.mm does not sum the dot products as the compiled scores here: {native.dot_scores_status()}",
)


def operands(rows: int, depth: int, num_items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, depth, generator=generator), torch.randn(num_items, depth, generator=generator)


def compiled(users: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[B, I]`` and group maxima through the kernel itself (no check against torch.mm needed)."""
    packed = native.pack_score_items(item)
    out = torch.full((users.size(0), packed.size(0) * native.SCORE_PANEL), 7.0)
    maxima = torch.full((users.size(0), item.size(0) // native.SCORE_GROUP), 7.0)
    native._run_dot_scores(native.native_kernels(), users, packed, out, maxima)
    return out[:, : item.size(0)], maxima


def group_amax(scores: torch.Tensor) -> torch.Tensor:
    groups = scores.size(1) // native.SCORE_GROUP
    return scores[:, : groups * native.SCORE_GROUP].reshape(scores.size(0), groups, native.SCORE_GROUP).amax(dim=2)


def exact_chains(users: np.ndarray, item: np.ndarray, chain: int) -> np.ndarray:
    """Each score as fused multiply-add chains of ``chain`` terms from 0, the chains' sums added in order, in float32.

    The operands carry 20 significant bits and lie in [1, 2) in magnitude, so every product (40 bits) is exact in
    float64, and so is its sum with the accumulator unless that nearly cancels: rounding the float64 value to
    float32 is then the fused multiply-add's single rounding (and otherwise differs from it only at a float32 tie)."""
    total = None
    for start in range(0, users.shape[1], chain):
        acc = np.zeros((users.shape[0], item.shape[0]), dtype=np.float32)
        for k in range(start, min(start + chain, users.shape[1])):
            product = np.outer(users[:, k].astype(np.float64), item[:, k].astype(np.float64))
            acc = (acc.astype(np.float64) + product).astype(np.float32)
        total = acc if total is None else total + acc
    return total


def twenty_bit(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    mantissa = torch.randint(1 << 19, 1 << 20, shape, generator=generator).double() / (1 << 19)
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (mantissa * sign).float()


# ------------------------------------------------------------------------------------------------------- the kernel


def test_score_chains_follow_torch_mm():
    assert [native.score_chain(d) for d in (1, 64, 192, 194, 256, 382, 383, 384, 1000)] == [
        1, 64, 192, 97, 128, 191, None, 192, 192]
    assert native.score_chain(0) is None and native.score_chain(201) is None


@needs_native
@pytest.mark.parametrize("depth", [64, 256, 400])  # one chain, two halves, blocks of 192 (and a short last one)
def test_compiled_scores_are_exact_fused_chains(depth):
    generator = torch.Generator().manual_seed(depth)
    users, item = twenty_bit((9, depth), generator), twenty_bit((75, depth), generator)
    scores, maxima = compiled(users, item)
    expected = exact_chains(users.numpy(), item.numpy(), native.score_chain(depth))
    assert np.array_equal(scores.numpy(), expected)
    assert torch.equal(maxima, group_amax(torch.from_numpy(expected)))
    # The order matters on these operands: one chain over 256 terms gives other bits than two halves.
    if depth == 256:
        assert not np.array_equal(exact_chains(users.numpy(), item.numpy(), depth), expected)


@needs_torch_mm_sums
@pytest.mark.parametrize("depth", [1, 7, 64, 192, 200, 256, 384, 520])
@pytest.mark.parametrize("num_items", [33, 1000, 1037])  # a partial panel and group, whole groups, a partial group
def test_compiled_scores_are_torch_mm_bit_for_bit(depth, num_items):
    users, item = operands(45, depth, num_items, seed=depth + num_items)
    scores, maxima = compiled(users, item)
    assert torch.equal(scores, users @ item.t())
    assert torch.equal(maxima, group_amax(scores))


@needs_native
def test_a_users_scores_do_not_depend_on_its_batch_nor_the_threads():
    users, item = operands(40, 64, 3001)
    whole, _ = compiled(users, item)
    for batch in (users[:1], users[:5], users[3:10]):
        part, _ = compiled(batch, item)
        start = int((batch.data_ptr() - users.data_ptr()) // (4 * users.stride(0)))
        assert torch.equal(part, whole[start : start + batch.size(0)])
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            assert torch.equal(compiled(users, item)[0], whole)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_group_maxima_follow_amax_with_nan_and_infinities():
    users, item = operands(13, 64, 200, seed=3)
    users[2, 5] = float("nan")  # a whole row of NaN
    item[40, :] = float("inf")  # a column of +-inf (and NaN where a user's component is 0 or NaN)
    users[4, :] = 0.0  # 0 * inf = NaN in that row's column 40 only
    item[70] *= 1e30  # overflow to +-inf in group 2
    scores, maxima = compiled(users, item)
    expected = group_amax(scores)
    assert torch.equal(torch.isnan(maxima), torch.isnan(expected)) and bool(torch.isnan(maxima[2]).all())
    assert bool(torch.isnan(maxima[4, 1])) and not bool(torch.isnan(maxima[4, 0]))
    finite = ~torch.isnan(expected)
    assert torch.equal(maxima[finite], expected[finite])


@needs_native
def test_unaligned_outputs_and_user_rows_with_a_stride():
    users, item = operands(45, 64, 300)
    expected, expected_max = compiled(users, item)
    packed = native.pack_score_items(item)
    width = packed.size(0) * native.SCORE_PANEL
    out = torch.full((45 * width + 1,), 7.0)[1:].view(45, width)  # 4 bytes off: plain stores, not streaming ones
    wide = torch.cat([users, torch.randn(45, 3)], dim=1)[:, :64]  # rows 67 floats apart
    maxima = torch.empty(45, 9)
    native._run_dot_scores(native.native_kernels(), wide, packed, out, maxima)
    assert torch.equal(out[:, :300], expected) and torch.equal(maxima, expected_max)
    assert bool((out[:, 300:] == 0).all())  # the padding items' scores


@needs_torch_mm_sums
def test_what_run_dot_scores_refuses_writes_nothing():
    users, item = operands(40, 64, 300)
    packed = native.pack_score_items(item)
    width = packed.size(0) * native.SCORE_PANEL
    refused = {
        "float64": (users.double(), packed.double(), torch.empty(40, width, dtype=torch.float64),
                    torch.empty(40, 9, dtype=torch.float64)),
        "an odd depth between 192 and 384": (torch.randn(40, 201), native.pack_score_items(torch.randn(300, 201)),
                                             torch.empty(40, width), torch.empty(40, 9)),
        "an output narrower than the panels": (users, packed, torch.empty(40, 300), torch.empty(40, 9)),
        "more groups than the panels hold": (users, packed, torch.empty(40, width), torch.empty(40, 11)),
        "rows that disagree": (users, packed, torch.empty(39, width), torch.empty(40, 9)),
        "user columns with a stride": (torch.randn(64, 40).t(), packed, torch.empty(40, width), torch.empty(40, 9)),
        "an odd number of panels": (users, packed[:-1], torch.empty(40, width - 16), torch.empty(40, 9)),
        "unaligned packed items": (users, torch.empty(packed.numel() + 1)[1:].view(packed.shape),
                                   torch.empty(40, width), torch.empty(40, 9)),
    }
    for name, (u, p, out, maxima) in refused.items():
        out.fill_(7.0)
        maxima.fill_(7.0)
        assert not native.run_dot_scores(u, p, out, maxima), name
        assert bool((out == 7.0).all()) and bool((maxima == 7.0).all()), name
    out, maxima = torch.empty(40, width), torch.empty(40, 9)
    assert native.run_dot_scores(users, packed, out, maxima)
    assert torch.equal(out[:, :300], users @ item.t())


def test_packed_items_by_hand():
    item = torch.arange(2 * 17, dtype=torch.float32).view(17, 2)  # item j = (2j, 2j + 1)
    packed = native.pack_score_items(item)
    assert packed.shape == (2, 2, 16)  # 2 panels (17 items, even count), depth 2, 16 items each
    assert packed[0, 0].tolist() == [2.0 * j for j in range(16)]
    assert packed[0, 1].tolist() == [2.0 * j + 1 for j in range(16)]
    assert packed[1, :, 0].tolist() == [32.0, 33.0] and bool((packed[1, :, 1:] == 0).all())


# --------------------------------------------------------------------------------------------- the evaluator's side


def test_refresh_group_maxima_after_masking():
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(6, 4 * TOPK_GROUP + 9, generator=generator)
    maxima = group_amax(scores)
    indptr = torch.tensor([0, 3, 3, 5, 6, 8, 9])
    best = scores[:, : 4 * TOPK_GROUP].argmax(dim=1)
    items = torch.tensor([int(best[0]), 1, 4 * TOPK_GROUP + 3, int(best[2]), 0, int(best[3]), 5, 2 * TOPK_GROUP,
                          4 * TOPK_GROUP + 8])  # row maxima, tail columns, a group's first column
    for value in (float("-inf"), 1e-5):
        masked, fresh = scores.clone(), maxima.clone()
        rows, masked_items = mask_scores_(masked, indptr, items, value)
        assert rows.tolist() == [0, 0, 0, 2, 2, 3, 4, 4, 5] and torch.equal(masked_items, items)
        refresh_group_maxima_(fresh, masked, rows, masked_items)
        assert torch.equal(fresh, group_amax(masked))
    untouched = maxima.clone()
    refresh_group_maxima_(untouched, scores, torch.tensor([0]), torch.tensor([4 * TOPK_GROUP + 1]))
    assert torch.equal(untouched, maxima)  # only a tail column: no group changes


def test_grouped_top_k_with_given_maxima():
    scores = torch.randn(7, 50 * TOPK_GROUP + 11, generator=torch.Generator().manual_seed(1))
    maxima = group_amax(scores)
    for k in (1, 10):
        with_maxima = grouped_top_k(scores, k, maxima=maxima)
        without = grouped_top_k(scores, k)
        assert torch.equal(with_maxima[0], without[0]) and torch.equal(with_maxima[1], without[1])
    with pytest.raises(ValueError, match=r"maxima must be \[7, 50\]"):
        grouped_top_k(scores, 10, maxima=maxima[:, 1:])


def _mf_embeddings(seed: int = 0) -> tuple[MF, Embeddings, object]:
    dataset = load_dataset("synthetic:tiny")
    torch.manual_seed(seed)
    model = MF(dataset.info())
    return model, Embeddings(model.user_embedding.detach(), model.item_embedding.detach()), dataset


@needs_torch_mm_sums
def test_compiled_scorer_returns_the_models_scores_and_maxima():
    model, emb, dataset = _mf_embeddings()
    scorer = dot_scorer(model, emb, max_batch=40)
    assert isinstance(scorer, CompiledDotScores)
    users = torch.tensor([5, 0, 59, 5] * 10)
    scores, maxima = scorer(users)
    assert torch.equal(scores, model.score(emb, users))
    assert torch.equal(maxima, group_amax(scores))
    small, _ = scorer(torch.tensor([1, 2]))
    assert torch.equal(small, model.score(emb, torch.arange(40))[1:3])  # the batch does not change a user's bits
    with pytest.raises(ValueError, match="exceed the buffer"):
        scorer(torch.arange(41))
    assert not CompiledDotScores.applies(model, Embeddings(emb.user.double(), emb.item.double()))
    assert isinstance(dot_scorer(model, Embeddings(emb.user.double(), emb.item.double()), 4), BufferedDotScores)


def test_a_machine_whose_torch_mm_sums_otherwise_scores_with_numpy(fresh_kernels, monkeypatch):
    failed = functools.lru_cache(maxsize=1)(lambda: (False, "torch.mm sums 64-deep products otherwise here"))
    monkeypatch.setitem(native._CHECKS, "scores", failed)
    model, emb, _ = _mf_embeddings()
    assert isinstance(dot_scorer(model, emb, 8), BufferedDotScores)
    if native.native_kernels() is not None:
        assert "ranking scores: numpy's (torch.mm sums 64-deep products otherwise here)" in native.kernel_status()
    users, item = operands(40, 64, 300)
    packed = native.pack_score_items(item)
    assert not native.run_dot_scores(users, packed, torch.empty(40, packed.size(0) * 16), torch.empty(40, 9))


def test_without_native_kernels_ranking_scores_come_from_numpy(fresh_kernels):
    model, emb, _ = _mf_embeddings()
    with native.use_kernels("torch"):
        assert native.dot_scores_status() == "GRCN_BENCH_KERNELS=torch"
        assert isinstance(dot_scorer(model, emb, 8), BufferedDotScores)


@needs_native
def test_switching_the_scores_family_off_scores_with_numpy(fresh_kernels):
    """``native,-scores``: the other families stay compiled, the evaluator scores with numpy's BLAS."""
    model, emb, _ = _mf_embeddings()
    users, item = operands(40, 64, 300)
    packed = native.pack_score_items(item)
    with native.use_kernels("native,-scores"):
        assert native.dot_scores_status() == "switched off by GRCN_BENCH_KERNELS=native,-scores"
        assert "ranking scores: numpy's (switched off" in native.kernel_status()
        assert native.family_status("sparse") == "native"
        assert isinstance(dot_scorer(model, emb, 8), BufferedDotScores)
        assert not native.run_dot_scores(users, packed, torch.empty(40, packed.size(0) * 16), torch.empty(40, 9))
    assert native.run_dot_scores(users, packed, torch.empty(40, packed.size(0) * 16), torch.empty(40, 9)) == (
        native.dot_scores_status() == "native")


class _TorchScore(MF):
    """Scores through ``score_batch``: the default formula, but not the default method."""

    def score(self, emb, users):
        return emb.user[users] @ emb.item.t()


@needs_torch_mm_sums
@pytest.mark.parametrize("name", ["mf", "grcn"])
def test_evaluation_ranks_the_same_with_compiled_numpy_and_torch_scores(name, fresh_kernels):
    """The compiled scores against torch.mm's through ``score_batch`` (the same bits: the same top lists) and against
    numpy's (last bits may differ; this data has no near ties that they reorder)."""
    dataset = load_dataset("synthetic:tiny")
    torch.manual_seed(0)
    model = get_model(name)(dataset.info())
    emb = compute_embeddings(model, dataset.graph())
    plain = _TorchScore(dataset.info())
    runs = {}
    for label, scorer, kernels in (("compiled", model, "native"), ("numpy", model, "torch"),
                                   ("torch.mm", plain, "native")):
        with native.use_kernels(kernels):
            timings: dict[str, float] = {}
            runs[label] = evaluate(scorer, dataset, "test", ks=(10, 20), embeddings=emb, keep_top_items=True,
                                   timings=timings)
            assert set(timings) == {"score", "mask", "rank", "metrics"}
    for label in ("numpy", "torch.mm"):
        np.testing.assert_array_equal(runs[label].top_items, runs["compiled"].top_items)
        for metric, values in runs[label].per_user.items():
            np.testing.assert_array_equal(values, runs["compiled"].per_user[metric])
