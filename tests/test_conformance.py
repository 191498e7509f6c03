"""The contract every registered model keeps (docs/extending.md, "A model").

Parametrised over :func:`available_models`, so a model added to the registry is checked without editing this file;
``test_a_newly_registered_model_is_checked_by_the_same_helpers`` shows that with a throwaway model, and the
negative controls show that the checks catch the faults they are about.
"""

from __future__ import annotations

import builtins
import inspect
import io
import os
import pathlib
from collections.abc import Callable

import pytest
import torch

from grcn_bench.datasets import load_dataset
from grcn_bench.datasets.base import InteractionGraph, RecDataset
from grcn_bench.models import Embeddings, Recommender, available_models, get_model, register_model, unregister_model
from grcn_bench.models.base import xavier_embedding

STEPS, LR, BATCH = 12, 0.01, 128


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


@pytest.fixture(scope="module")
def tiny() -> RecDataset:
    return load_dataset("synthetic:tiny")


@pytest.fixture(scope="module")
def tiny_words() -> RecDataset:
    """The same preset with word-id text, which models read through a learned word table."""
    dataset = load_dataset("synthetic:tiny?text=words")
    assert dataset.word_bags is not None
    return dataset


def build(name: str, dataset: RecDataset, seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    return get_model(name)(dataset.info())


def batch(dataset: RecDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed batch of training triplets; negatives are drawn from items the user has no training pair with."""
    generator = torch.Generator().manual_seed(1)
    pairs = dataset.train[torch.randperm(dataset.train.size(0), generator=generator)[:BATCH]]
    users, pos = pairs[:, 0], pairs[:, 1]
    train = set(map(tuple, dataset.train.tolist()))
    neg = torch.randint(0, dataset.num_items, (users.numel(),), generator=generator)
    for k in range(users.numel()):  # tiny data: a plain loop is clearer than vectorised rejection
        while (int(users[k]), int(neg[k])) in train:
            neg[k] = (neg[k] + 1) % dataset.num_items
    return users, pos, neg


def same_embeddings(a: Embeddings, b: Embeddings) -> bool:
    weights_equal = (a.edge_weight is None and b.edge_weight is None) or (
        a.edge_weight is not None and b.edge_weight is not None and torch.equal(a.edge_weight, b.edge_weight)
    )
    return torch.equal(a.user, b.user) and torch.equal(a.item, b.item) and weights_equal


# ------------------------------------------------------------------------------------------ the checks, by name


def check_constructor_options_are_typed_keywords(name: str, dataset: RecDataset, monkeypatch) -> None:
    parameters = list(inspect.signature(get_model(name).__init__).parameters.values())[2:]  # after self, data
    for p in parameters:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: option {p.name!r} must be keyword-only"
        assert p.default is not inspect.Parameter.empty, f"{name}: option {p.name!r} needs a default"
        assert p.annotation is not inspect.Parameter.empty, f"{name}: option {p.name!r} needs a type annotation"


def check_output_shapes(name: str, dataset: RecDataset, monkeypatch) -> None:
    model = build(name, dataset).eval()
    graph = dataset.graph()
    emb = model(graph)
    assert isinstance(emb, Embeddings)
    assert emb.user.dim() == 2 and emb.user.shape[0] == dataset.num_users
    assert emb.item.dim() == 2 and emb.item.shape[0] == dataset.num_items
    assert emb.user.shape[1] == emb.item.shape[1] > 0
    assert emb.user.device.type == emb.item.device.type == "cpu"
    assert torch.isfinite(emb.user).all() and torch.isfinite(emb.item).all()
    if emb.edge_weight is not None:
        assert emb.edge_weight.shape == (graph.num_edges,)
        assert torch.isfinite(emb.edge_weight).all()


def check_score_agrees_with_pair_score(name: str, dataset: RecDataset, monkeypatch) -> None:
    model = build(name, dataset).eval()
    emb = model(dataset.graph())
    users, pos, neg = batch(dataset)
    scores = model.score(emb, users)
    assert scores.shape == (users.numel(), dataset.num_items)
    for items in (pos, neg):
        expected = model.pair_score(emb, users, items)
        torch.testing.assert_close(scores.gather(1, items.unsqueeze(1)).squeeze(1), expected, rtol=1e-5, atol=1e-5)
    # The loss's batch scores (pair_scores) are pair_score's for the positives and the negatives.
    for got, items in zip(model.pair_scores(emb, users, pos, neg), (pos, neg), strict=True):
        torch.testing.assert_close(got, model.pair_score(emb, users, items), rtol=1e-5, atol=1e-5)


def check_loss_is_finite_and_decreases(name: str, dataset: RecDataset, monkeypatch) -> None:
    model = build(name, dataset)
    graph = dataset.graph()
    users, pos, neg = batch(dataset)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)

    def eval_loss() -> float:  # measured in eval mode, so that dropout does not blur the comparison
        model.eval()
        with torch.no_grad():
            return float(model.loss(model(graph), users, pos, neg, reg_weight=1e-4))

    before = eval_loss()
    model.train()
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = model.loss(model(graph), users, pos, neg, reg_weight=1e-4)
        assert loss.dim() == 0 and torch.isfinite(loss), f"{name}: non-finite loss {loss}"
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < before, f"{name}: loss did not decrease over {STEPS} Adam steps ({before:.4f} -> {after:.4f})"


def check_same_seed_same_output(name: str, dataset: RecDataset, monkeypatch) -> None:
    graph = dataset.graph()
    first, second = build(name, dataset, seed=3).eval(), build(name, dataset, seed=3).eval()
    assert same_embeddings(first(graph), second(graph))
    assert not same_embeddings(first(graph), build(name, dataset, seed=4).eval()(graph))


def check_state_dict_round_trip(name: str, dataset: RecDataset, monkeypatch) -> None:
    graph = dataset.graph()
    trained, fresh = build(name, dataset, seed=0).eval(), build(name, dataset, seed=1).eval()
    with torch.no_grad():  # move away from any initialisation, so the round trip carries real state
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert not same_embeddings(trained(graph), fresh(graph))
    fresh.load_state_dict(trained.state_dict())
    assert same_embeddings(trained(graph), fresh(graph))


def check_gradients_reach_every_trainable_parameter(name: str, dataset: RecDataset, monkeypatch) -> None:
    model = build(name, dataset).train()
    users, pos, neg = batch(dataset)
    model.loss(model(dataset.graph()), users, pos, neg, reg_weight=1e-4).backward()
    names = {n for n, _ in model.named_parameters()}
    frozen = set(model.frozen_parameters)
    assert frozen <= names, f"{name}: frozen_parameters names unknown parameters {sorted(frozen - names)}"
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and not p.requires_grad, f"{name}: frozen parameter {n!r} is trained"
        else:
            assert p.grad is not None, f"{name}: parameter {n!r} gets no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: parameter {n!r} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name}: parameter {n!r} has an all-zero gradient"


def check_reset_parameters_reinitialises_everything(name: str, dataset: RecDataset, monkeypatch) -> None:
    model = build(name, dataset)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.123)
    torch.manual_seed(0)
    model.reset_parameters()
    stale = [n for n, p in model.named_parameters() if torch.all(p == 0.123)]
    assert not stale, f"{name}: reset_parameters leaves {stale} untouched"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    graph = dataset.graph()
    first = model.eval()(graph)
    torch.manual_seed(0)
    model.reset_parameters()
    assert same_embeddings(first, model(graph)), f"{name}: reset_parameters is not reproducible from the seed"


def check_never_opens_a_file(name: str, dataset: RecDataset, monkeypatch) -> None:
    graph = dataset.graph()
    users, pos, neg = batch(dataset)
    info = dataset.info()

    def refuse(*args, **kwargs):
        raise AssertionError(f"{name}: a model opened a file: {args[:1]}")

    with monkeypatch.context() as patch:
        for target, attribute in ((builtins, "open"), (io, "open"), (os, "open"), (pathlib.Path, "open")):
            patch.setattr(target, attribute, refuse)
        model = get_model(name)(info)
        model.loss(model(graph), users, pos, neg, reg_weight=1e-4).backward()
        model.eval()(graph)


CHECKS: list[Callable[[str, RecDataset, pytest.MonkeyPatch], None]] = [  # cheap structural checks first
    check_constructor_options_are_typed_keywords,
    check_output_shapes,
    check_reset_parameters_reinitialises_everything,
    check_gradients_reach_every_trainable_parameter,
    check_never_opens_a_file,
    check_score_agrees_with_pair_score,
    check_same_seed_same_output,
    check_state_dict_round_trip,
    check_loss_is_finite_and_decreases,
]


# ------------------------------------------------------------------------------------------------------ the tests


def test_the_paper_models_are_registered():
    assert {"graphsage", "gat", "ngcf", "disengcn", "mmgcn", "mf"} <= set(available_models())


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", available_models())
def test_model_conforms(name, check, tiny, monkeypatch):
    check(name, tiny, monkeypatch)


WORD_TEXT_CHECKS = [check_output_shapes, check_gradients_reach_every_trainable_parameter, check_state_dict_round_trip]


@pytest.mark.parametrize("check", WORD_TEXT_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", available_models())
def test_model_conforms_with_word_id_text(name, check, tiny_words, monkeypatch):
    check(name, tiny_words, monkeypatch)


class _Throwaway(Recommender):
    """One weighted propagation step with a learned scalar temperature: small, but uses every part of the contract."""

    def __init__(self, data, *, embedding_dim: int = 16, temperature: float = 1.0):
        super().__init__(data, embedding_dim=embedding_dim, num_layers=1)
        self.user_embedding = xavier_embedding(data.num_users, embedding_dim)
        self.item_embedding = xavier_embedding(data.num_items, embedding_dim)
        self.log_temperature = torch.nn.Parameter(torch.tensor([float(temperature)]).log())

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.user_embedding)
        torch.nn.init.xavier_uniform_(self.item_embedding)
        torch.nn.init.zeros_(self.log_temperature)

    def forward(self, graph: InteractionGraph) -> Embeddings:
        x = torch.cat([self.user_embedding, self.item_embedding])
        source, target = graph.edge_index
        weight = torch.sigmoid((x[source] * x[target]).sum(-1) / self.log_temperature.exp())
        out = x + torch.zeros_like(x).index_add_(0, target, weight.unsqueeze(1) * x[source])
        return Embeddings(out[: self.num_users], out[self.num_users :], weight)


def run_all_checks_on(cls: type[Recommender], name: str, dataset: RecDataset, monkeypatch) -> None:
    register_model(name)(cls)
    try:
        assert name in available_models()
        for check in CHECKS:
            check(name, dataset, monkeypatch)
    finally:
        unregister_model(name)
    assert name not in available_models()


def test_a_newly_registered_model_is_checked_by_the_same_helpers(tiny, monkeypatch):
    class Throwaway(_Throwaway):
        pass

    run_all_checks_on(Throwaway, "test_conformance_throwaway", tiny, monkeypatch)


class _Unused(_Throwaway):
    def __init__(self, data, *, embedding_dim: int = 16):
        super().__init__(data, embedding_dim=embedding_dim)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        torch.nn.init.ones_(self.unused)


class _OpensFiles(_Throwaway):
    def forward(self, graph: InteractionGraph) -> Embeddings:
        with open(os.devnull, "rb"):
            pass
        return super().forward(graph)


class _Untyped(_Throwaway):
    def __init__(self, data, embedding_dim=16):
        super().__init__(data, embedding_dim=embedding_dim)


class _Incomplete(_Throwaway):
    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.user_embedding)


@pytest.mark.parametrize(
    "cls,message",
    [
        (_Unused, "parameter 'unused' gets no gradient"),
        (_OpensFiles, "a model opened a file"),
        (_Untyped, "must be keyword-only"),
        (_Incomplete, r"reset_parameters leaves \['item_embedding', 'log_temperature'\] untouched"),
    ],
    ids=["unused-parameter", "opens-a-file", "untyped-options", "incomplete-reset"],
)
def test_the_checks_catch_a_faulty_model(cls, message, tiny, monkeypatch):
    with pytest.raises(AssertionError, match=message):
        run_all_checks_on(cls, "test_conformance_faulty", tiny, monkeypatch)
    assert "test_conformance_faulty" not in available_models()


def test_base_reset_uses_each_layers_own_initialisation(tiny):
    class XavierLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)  # torch's own reset would give Kaiming-uniform weights

        def reset_parameters(self) -> None:
            torch.nn.init.constant_(self.inner.weight, 0.5)
            torch.nn.init.zeros_(self.inner.bias)

    class WithLayers(_Throwaway):
        def __init__(self, data, *, embedding_dim: int = 16):
            super().__init__(data, embedding_dim=embedding_dim)
            self.layers = torch.nn.ModuleList([XavierLayer(), XavierLayer()])  # a container without reset

    model = WithLayers(tiny.info())
    Recommender.reset_parameters(model)
    for layer in model.layers:
        assert torch.equal(layer.inner.weight, torch.full((4, 4), 0.5))  # not overwritten by Linear's own reset
        assert torch.equal(layer.inner.bias, torch.zeros(4))
