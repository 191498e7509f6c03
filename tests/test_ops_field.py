"""Training over a batch's receptive field (``ops.field``, ``linear(rows=...)``, ``Recommender.batch_forward``):
the nodes and sub-patterns against an independent neighbourhood expansion, every restricted product against the
whole graph's to the bit (values and gradients), and the batch losses and gradients of MMGCN, DisenGCN and GRCN
(three variants) against their full forward's: to the bit for MMGCN and GRCN, whose field operations sum each row's
terms in the whole graph's order, within float round-off for DisenGCN (its channel softmax and gradient sums)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch_geometric.utils import k_hop_subgraph

from grcn_bench.benchmarks.config import TrainSettings
from grcn_bench.benchmarks.trainer import fit, seed_everything
from grcn_bench.datasets import load_dataset
from grcn_bench.datasets.base import InteractionGraph
from grcn_bench.models import get_model
from grcn_bench.models.base import Embeddings, Recommender
from grcn_bench.models.ops import dense, native
from grcn_bench.models.ops.dense import RowSubset, linear, rows_apply
from grcn_bench.models.ops.field import receptive_field
from grcn_bench.models.ops.sparse import graph_pattern, spmm

needs_chained_mkl = pytest.mark.skipif(
    native.native_kernels() is None or native.dense_products_status() != "native",
    reason=f"the compiled dense products do not run here: {native.dense_products_status()}",
)
needs_native = pytest.mark.skipif(native.native_kernels() is None,
                                  reason=f"compiled kernels unavailable here: {native.kernel_status()}")


def _graph(num_users: int, num_items: int, pairs: list[tuple[int, int]]) -> InteractionGraph:
    return InteractionGraph.from_pairs(torch.tensor(pairs), num_users, num_items)


def _expand(graph: InteractionGraph, nodes: torch.Tensor) -> torch.Tensor:
    """``nodes`` and the sources of their incoming edges, sorted: PyG's ``k_hop_subgraph`` (one hop), independent
    of field.py's CSR walk."""
    subset, *_ = k_hop_subgraph(nodes, 1, graph.edge_index, num_nodes=graph.num_nodes, flow="source_to_target")
    return subset


# ---------------------------------------------------------------------------------------------- receptive_field


def test_receptive_field_of_a_hand_drawn_graph():
    # users 0, 1, 2; items 3, 4, 5, 6 (item i is node 3 + i); user 0 - item 0, user 1 - items 0 and 1, user 2 - item 3
    graph = _graph(3, 4, [(0, 0), (1, 0), (1, 1), (2, 3)])
    f = receptive_field(graph, torch.tensor([0, 0]), 2)
    assert [n.tolist() for n in f.nodes] == [[0, 1, 3], [0, 3], [0]]
    # layer 2: row user 0, whose one neighbour is item 0 (node 3, position 1 of nodes[1])
    assert f.patterns[1].rowptr.tolist() == [0, 1] and f.patterns[1].col.tolist() == [1]
    # layer 1: rows user 0 (neighbour item 0) and item 0 (neighbours users 0 and 1), columns over nodes[0]
    assert f.patterns[0].rowptr.tolist() == [0, 1, 3] and f.patterns[0].col.tolist() == [2, 0, 1]
    assert f.patterns[0].t_rowptr.tolist() == [0, 1, 2, 3] and f.patterns[0].t_col.tolist() == [1, 1, 0]
    assert f.patterns[0].t_perm.tolist() == [1, 2, 0]
    source, target = graph.edge_index
    assert source[f.edges[0]].tolist() == [3, 0, 1] and target[f.edges[0]].tolist() == [0, 3, 3]
    assert [p.tolist() for p in f.self_positions] == [[0, 2], [0]]
    assert (f.num_nodes, f.num_edges, f.num_layers) == (7, 8, 2)
    layer = f.layer(1)
    assert layer.input_rows.index.tolist() == [0, 1, 3] and layer.rows.index.tolist() == [0, 3]
    assert layer.rows.total == 7 and layer.num_edges == 8


def test_receptive_field_nodes_are_the_neighbourhood_expansion():
    graph = load_dataset("synthetic:tiktok").graph()
    seeds = torch.randint(0, graph.num_nodes, (300,), generator=torch.Generator().manual_seed(0))
    f = receptive_field(graph, seeds, 3)
    assert torch.equal(f.nodes[3], torch.unique(seeds))
    for layer in (3, 2, 1):
        assert torch.equal(f.nodes[layer - 1], _expand(graph, f.nodes[layer]))
        assert torch.equal(f.nodes[layer - 1][f.self_positions[layer - 1]], f.nodes[layer])


@needs_native
def test_restricted_products_are_the_whole_graphs_to_the_bit():
    """Two propagations over the sub-patterns against the same over the whole graph: the rows that the seeds read,
    and the gradients of the inputs (forward and transposed products)."""
    graph = load_dataset("synthetic:tiktok").graph()
    generator = torch.Generator().manual_seed(1)
    seeds = torch.randint(0, graph.num_nodes, (200,), generator=generator)
    f = receptive_field(graph, seeds, 2)
    weight = torch.rand(graph.num_edges, generator=generator)
    x = torch.randn(graph.num_nodes, 16, generator=generator, requires_grad=True)
    probe = torch.randn(f.nodes[2].numel(), 16, generator=generator)
    whole = graph_pattern(graph)
    (spmm(whole, weight, spmm(whole, weight, x))[f.nodes[2]] * probe).sum().backward()
    x_field = x.detach()[f.nodes[0]].requires_grad_()
    hidden = spmm(f.patterns[0], weight[f.edges[0]], x_field)
    out = spmm(f.patterns[1], weight[f.edges[1]], hidden)
    (out * probe).sum().backward()
    assert torch.equal(out, spmm(whole, weight, spmm(whole, weight, x.detach()))[f.nodes[2]])
    assert torch.equal(x_field.grad, x.grad[f.nodes[0]])
    outside = torch.ones(graph.num_nodes, dtype=torch.bool)
    outside[f.nodes[0]] = False
    assert not x.grad[outside].any()  # nothing outside the field gets a gradient: it is the whole field


def test_receptive_field_refuses_bad_input():
    graph = _graph(2, 2, [(0, 0), (1, 1)])
    with pytest.raises(ValueError, match="num_layers"):
        receptive_field(graph, torch.tensor([0]), -1)
    with pytest.raises(ValueError, match="seed nodes"):
        receptive_field(graph, torch.tensor([4]), 1)
    with pytest.raises(ValueError, match="seed nodes"):
        receptive_field(graph, torch.tensor([-1]), 1)
    f = receptive_field(graph, torch.tensor([1]), 0)
    assert f.nodes[0].tolist() == [1] and f.num_layers == 0
    with pytest.raises(ValueError, match="layer must be in 1..0"):
        f.layer(1)


# ---------------------------------------------------------------------------------------------- linear(rows=...)


def test_block_offsets_by_hand():
    index = torch.tensor([0, 5, 191, 192, 200, 383, 384, 499])
    assert RowSubset(index, 500).block_offsets().tolist() == [0, 3, 6, 8]
    assert RowSubset(torch.tensor([2, 7]), 150).block_offsets().tolist() == [0, 2]  # up to 192 rows: one chain
    assert RowSubset(torch.tensor([400, 401]), 1000).block_offsets().tolist() == [0, 0, 0, 2, 2, 2, 2]


@needs_chained_mkl
@pytest.mark.parametrize("total", [40, 150, 1000, 5000])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 64), (128, 16), (16, 48)])
def test_linear_rows_are_the_full_products_to_the_bit(total, in_features, out_features):
    generator = torch.Generator().manual_seed(total + in_features)
    x = torch.randn(total, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) / 8
    bias = torch.randn(out_features, generator=generator)
    index = torch.randperm(total, generator=generator)[: total // 3].sort().values
    probe = torch.randn(index.numel(), out_features, generator=generator)
    start = torch.randn(total, out_features, generator=generator)

    def run(rows: RowSubset | None):
        inputs = x[index] if rows else x
        leaves = [t.clone().requires_grad_() for t in (inputs, weight, bias)]
        with_bias = linear(*leaves, rows=rows)
        added = linear(leaves[0], leaves[1], add=(start[index] if rows else start).clone(), rows=rows)
        picked = (with_bias, added) if rows else (with_bias[index], added[index])
        (picked[0] * probe + picked[1] * probe.flip(0)).sum().backward()
        grads = [leaf.grad for leaf in leaves]
        return [p.detach() for p in picked], grads if rows else [grads[0][index], *grads[1:]]

    assert rows_apply(weight, total)
    values, grads = run(None)
    field_values, field_grads = run(RowSubset(index, total))
    for full, restricted in zip(values + grads, field_values + field_grads, strict=True):
        assert torch.equal(full, restricted)


@needs_chained_mkl
def test_weight_gradient_blocks_against_the_blocked_reference():
    """run_gemm_tn with block offsets against torch's own product over the full operands, zero in the other rows of
    the gradient (MKL's blocked sums, which the probe found here)."""
    generator = torch.Generator().manual_seed(3)
    total, index = 1000, torch.tensor(sorted(set(torch.randint(0, 1000, (300,), generator=generator).tolist())))
    g, x = torch.randn(index.numel(), 16, generator=generator), torch.randn(index.numel(), 32, generator=generator)
    g_full, x_full = torch.zeros(total, 16), torch.randn(total, 32, generator=generator)
    g_full[index], x_full[index] = g, x
    out = torch.empty(16, 32)
    assert native.run_gemm_tn(g, x, out, block_offsets=RowSubset(index, total).block_offsets())
    assert torch.equal(out, g_full.t().mm(x_full))


@needs_chained_mkl
@pytest.mark.parametrize("offsets", [[1, 4], [0, 3], [0, 2, 4, 3, 4], [0, 193, 194]])
def test_weight_gradient_refuses_bad_block_offsets(offsets):
    depth = 4 if offsets[-1] <= 4 else 194
    g, x, out = torch.randn(depth, 16), torch.randn(depth, 16), torch.full((16, 16), 7.0)
    assert not native.run_gemm_tn(g, x, out, block_offsets=torch.tensor(offsets))
    assert not native.run_gemm_tn(g, x, out, block_offsets=torch.tensor([0, depth], dtype=torch.int32))
    assert (out == 7.0).all()  # nothing written


def test_rows_apply_and_refusals(monkeypatch):
    weight = torch.randn(64, 64)
    monkeypatch.setattr(dense, "dense_products_status", lambda: "native")
    assert rows_apply(weight, 112_741) and rows_apply(weight, 150) and rows_apply(weight, 384)
    assert not rows_apply(weight, 300)  # 193..383 rows: MKL sums the weight gradient in halves, not reproduced
    assert not rows_apply(weight, 20)  # too few rows for the compiled product's sums to be MKL's
    assert not rows_apply(torch.randn(24, 64), 1000) and not rows_apply(torch.randn(64, 2048), 1000)
    assert not rows_apply(weight.double(), 1000)
    monkeypatch.setattr(dense, "dense_products_status", lambda: "torch's products differ here")
    assert not rows_apply(weight, 1000)
    with pytest.raises(ValueError, match="rows lists 3 rows, x has 2"):
        linear(torch.randn(2, 64), weight, rows=RowSubset(torch.tensor([0, 1, 2]), 100))


def test_linear_rows_refuses_products_it_cannot_reproduce(monkeypatch):
    monkeypatch.setattr(dense, "run_gemm", lambda *args, **kwargs: False)
    with pytest.raises(RuntimeError, match="rows= needs the compiled products"):
        linear(torch.randn(2, 16), torch.randn(16, 16), rows=RowSubset(torch.tensor([3, 9]), 100))


# ------------------------------------------------------------------------------------------- models and trainer


def _batch(dataset, size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    pairs = dataset.train[torch.randperm(dataset.train.size(0), generator=generator)[:size]]
    negatives = torch.randint(0, dataset.num_items, (size,), generator=generator)
    return pairs[:, 0], pairs[:, 1], negatives


MODELS_WITH_A_FIELD = [
    ("mmgcn", {}), ("disengcn", {}), ("grcn", {}), ("grcn", {"variant": "official"}),
    ("grcn", {"id_only_prediction": True, "fusion": "mean"}),
]


def _agree(a: torch.Tensor, b: torch.Tensor, exact: bool, name: str = "") -> None:
    """To the bit where ``exact``, else within float32 round-off: ``1e-5`` of the tensor's largest entry (a sum of
    thousands of rows, such as a bias gradient, moves by a few ulps of its largest terms; measured on DisenGCN: at
    most ``2e-7`` of it)."""
    if exact:
        assert torch.equal(a, b), name
    else:
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-5 * float(b.detach().abs().max()) + 1e-9, msg=name)


#: Models whose field path gives the full forward's bits (the others: within float round-off).
EXACT_FIELDS = ("mmgcn", "grcn")


@needs_chained_mkl
@pytest.mark.parametrize(("name", "options"), MODELS_WITH_A_FIELD)
@pytest.mark.parametrize("spec", ["synthetic:tiktok", "synthetic:tiny?text=words", "synthetic:movielens"])
def test_batch_forward_is_the_full_forward(name, options, spec, monkeypatch):
    """Three optimiser steps each way: the losses, every gradient and every parameter after each step, and the
    learned edge weights. The field path must have run (counted). Tiktok-shaped: 3,500 nodes (blocked weight
    gradients); tiny with word-id text: 150 nodes (one chain); Movielens-shaped: 2,048-d features, which MMGCN
    projects whole. Where the two agree within round-off only, each step starts the field's model from the full
    model's parameters (Adam turns round-off in a near-zero gradient into a step of the learning rate's size)."""
    exact = name in EXACT_FIELDS
    dataset = load_dataset(spec)
    graph = dataset.graph()
    seed_everything(0)
    full = get_model(name)(dataset.info(), **options)
    restricted = copy.deepcopy(full)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (full, restricted)]
    built = []
    monkeypatch.setattr(f"grcn_bench.models.{name}.receptive_field", lambda *a: built.append(1) or receptive_field(*a))
    for step in range(3):
        users, pos, neg = _batch(dataset, 64, step)
        losses, edge_weights = [], []
        for model, optimizer, whole in ((full, optimizers[0], True), (restricted, optimizers[1], False)):
            emb = model(graph) if whole else model.batch_forward(graph, users, pos, neg)
            loss = model.loss(emb, users, pos, neg, 1e-3)
            optimizer.zero_grad()
            loss.backward()
            losses.append(loss.detach())
            edge_weights.append(emb.edge_weight)
        _agree(losses[0], losses[1], exact)
        assert edge_weights[0] is None and edge_weights[1] is None or _agree(*edge_weights, exact) is None
        for (parameter_name, a), b in zip(full.named_parameters(), restricted.parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None), parameter_name
            assert a.grad is None or _agree(a.grad, b.grad, exact, parameter_name) is None
        for optimizer in optimizers:
            optimizer.step()
        if not exact:
            restricted.load_state_dict(full.state_dict())
    assert len(built) == 3


@needs_chained_mkl
@pytest.mark.parametrize("name", ["mmgcn", "disengcn", "grcn"])
@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_batch_forward_for_other_depths(name, num_layers):
    """No layer (the field is the batch itself), one, and three (a field of three hops): one step's loss and
    gradients."""
    dataset = load_dataset("synthetic:tiktok")
    graph = dataset.graph()
    seed_everything(0)
    full = get_model(name)(dataset.info(), num_layers=num_layers)
    restricted = copy.deepcopy(full)
    users, pos, neg = _batch(dataset, 64, 7)
    full_loss = full.loss(full(graph), users, pos, neg, 1e-3)
    field_loss = restricted.loss(restricted.batch_forward(graph, users, pos, neg), users, pos, neg, 1e-3)
    full_loss.backward()
    field_loss.backward()
    exact = name in EXACT_FIELDS
    _agree(full_loss, field_loss, exact)
    for (parameter_name, a), b in zip(full.named_parameters(), restricted.parameters(), strict=True):
        assert a.grad is None and b.grad is None or _agree(a.grad, b.grad, exact, parameter_name) is None


@needs_chained_mkl
def test_disengcn_batch_forward_is_deterministic():
    """Where its field path is not the full forward's to the bit, it is the same at every run."""
    dataset = load_dataset("synthetic:tiktok")
    graph = dataset.graph()
    users, pos, neg = _batch(dataset, 64, 3)
    runs = []
    for _ in range(2):
        seed_everything(0)
        model = get_model("disengcn")(dataset.info())
        model.loss(model.batch_forward(graph, users, pos, neg), users, pos, neg, 1e-3).backward()
        runs.append([p.grad for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("name", ["mmgcn", "disengcn"])
def test_batch_forward_is_the_full_forward_where_the_products_do_not_run(name):
    """MMGCN's and DisenGCN's fields need ``linear(rows=...)``, which needs the compiled dense products: without
    them (``native,-dense`` or ``torch``) ``batch_forward`` is the full forward, every row."""
    dataset = load_dataset("synthetic:tiny")
    graph = dataset.graph()
    model = get_model(name)(dataset.info())
    users, pos, neg = _batch(dataset, 16, 0)
    for kernels in ("torch", "native,-dense"):
        with native.use_kernels(kernels):
            emb = model.batch_forward(graph, users, pos, neg)
            reference = model(graph)
        assert torch.equal(emb.user, reference.user) and torch.equal(emb.item, reference.item), kernels


@pytest.mark.parametrize("kernels", ["torch", "native,-sparse"])
def test_grcn_trains_over_its_field_on_torchs_kernels_too(kernels, monkeypatch):
    """GRCN's field path is sparse products over the field's patterns, correct on every path: it runs with torch's
    kernels too, and gives the full forward's rows and gradients."""
    dataset = load_dataset("synthetic:tiny")
    graph = dataset.graph()
    seed_everything(0)
    full = get_model("grcn")(dataset.info())
    restricted = copy.deepcopy(full)
    users, pos, neg = _batch(dataset, 16, 0)
    built = []
    monkeypatch.setattr("grcn_bench.models.grcn.receptive_field", lambda *a: built.append(1) or receptive_field(*a))
    with native.use_kernels(kernels):
        emb = restricted.batch_forward(graph, users, pos, neg)
        reference = full(graph)
        losses = [m.loss(e, users, pos, neg, 1e-3) for m, e in ((full, reference), (restricted, emb))]
        for loss in losses:
            loss.backward()
    assert built == [1]
    torch.testing.assert_close(emb.user[users], reference.user[users])
    torch.testing.assert_close(emb.item[pos], reference.item[pos])
    torch.testing.assert_close(losses[0], losses[1])
    for (parameter_name, a), b in zip(full.named_parameters(), restricted.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=parameter_name)


def test_the_trainer_trains_through_batch_forward():
    calls = []

    class Spy(get_model("mf")):
        def batch_forward(self, graph, users, pos, neg) -> Embeddings:
            calls.append(users.numel())
            return super().batch_forward(graph, users, pos, neg)

    dataset = load_dataset("synthetic:tiny")
    seed_everything(0)
    fit(Spy(dataset.info()), dataset, TrainSettings(seed=0, batch_size=256, max_epochs=1),
        lambda m, epoch: {"recall@10": 0.0}, progress=False)
    assert calls and sum(calls) == dataset.train.size(0)
    assert Recommender.batch_forward is get_model("mf").batch_forward  # the default: the full forward
