"""DisenGCN's options for recommendation (``docs/disengcn.md``): the channel activation, the readout and the item
bias, against dense loop computations written out here, and the receptive-field path against the full forward for
each of them; and BPR-MF's item bias, the control for DisenGCN's.

The references are computed from the training pairs directly (a dense adjacency and plain loops over nodes,
iterations and neighbours), never from the graph's index structures.
"""

from __future__ import annotations

import copy

import pytest
import torch

from grcn_bench.benchmarks.trainer import seed_everything
from grcn_bench.datasets import load_dataset
from grcn_bench.datasets.base import DatasetInfo, InteractionGraph
from grcn_bench.models.disengcn import READOUTS, DisenGCN
from grcn_bench.models.layers.content import node_inputs
from grcn_bench.models.layers.disen import ACTIVATIONS, NeighRoutingConv
from grcn_bench.models.mf import MF
from grcn_bench.models.ops import native
from grcn_bench.models.ops.sparse import graph_pattern

U, I = 4, 5
# User 3 has no training item and item 4 no user: isolated nodes must be handled too.
PAIRS = [(0, 0), (0, 1), (0, 3), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread

SIGMA = {
    "relu": lambda t: t.clamp_min(0),
    "leaky_relu": lambda t: torch.where(t > 0, t, 0.2 * t),
    "tanh": lambda t: (torch.exp(t) - torch.exp(-t)) / (torch.exp(t) + torch.exp(-t)),
    "none": lambda t: t,
}


@pytest.fixture
def data() -> tuple[DatasetInfo, InteractionGraph]:
    features = {"v": torch.randn(I, 6, generator=torch.Generator().manual_seed(0))}
    graph = InteractionGraph.from_pairs(torch.tensor(PAIRS), U, I, features)
    return DatasetInfo(U, I, {"v": 6}, num_train_pairs=len(PAIRS)), graph


def dense_adjacency() -> torch.Tensor:
    adj = torch.zeros(U + I, U + I)
    for u, i in PAIRS:
        adj[u, U + i] = adj[U + i, u] = 1.0
    return adj


def dense_routing(conv: NeighRoutingConv, x: torch.Tensor, adj: torch.Tensor, activation: str) -> torch.Tensor:
    """Algorithm 1 by loops with the channel activation ``activation``: per node, per iteration, per neighbour."""
    k, d = conv.num_channels, conv.channel_dim
    z = SIGMA[activation](x @ conv.lin.weight.t() + conv.lin.bias).view(-1, k, d)
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = []
    for u in range(x.size(0)):
        c = z[u].clone()
        for _ in range(conv.iterations):
            total = z[u].clone()
            for j in (j for j in range(adj.size(0)) if adj[u, j] > 0):
                logits = torch.stack([z[j, ch] @ c[ch] for ch in range(k)]) / conv.tau
                total = total + (torch.exp(logits) / torch.exp(logits).sum()).unsqueeze(-1) * z[j]
            c = total / total.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out.append(c.reshape(-1))
    return torch.stack(out)


def dense_readout(layers: list[torch.Tensor], readout: str) -> torch.Tensor:
    """The readout written out per node and layer."""
    rows = []
    for v in range(layers[0].size(0)):
        if readout == "last":
            rows.append(layers[-1][v])
        elif readout == "concat":
            rows.append(torch.cat([y[v] for y in layers]))
        else:
            total = torch.zeros_like(layers[0][v])
            for y in layers:
                total = total + y[v]
            rows.append(total if readout == "sum" else total / len(layers))
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_routing_layer_applies_each_activation_before_normalising(data, activation):
    _, graph = data
    torch.manual_seed(3)
    conv = NeighRoutingConv(8, 4, 3, iterations=2, tau=0.8, activation=activation)
    x = torch.randn(U + I, 8)
    expected = dense_routing(conv, x, dense_adjacency(), activation)
    torch.testing.assert_close(conv(x, graph.edge_index), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv(x, graph.edge_index, pattern=graph_pattern(graph)), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="activation must be one of"):
        NeighRoutingConv(8, 4, 3, activation="gelu")


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_disengcn_reads_out_layers_zero_to_l_as_asked(data, readout, activation):
    info, graph = data
    torch.manual_seed(0)
    model = DisenGCN(info, embedding_dim=16, num_channels=4, routing_iterations=2, activation=activation,
                     readout=readout, item_bias=False).eval()
    x = node_inputs(model.user_embedding, model.item_embedding, model.content, graph)
    layers = [x]
    for conv in model.convs:
        layers.append(dense_routing(conv, layers[-1], dense_adjacency(), activation))
    expected = dense_readout(layers, readout)
    emb = model(graph)
    torch.testing.assert_close(torch.cat([emb.user, emb.item]), expected, atol=1e-5, rtol=1e-5)
    assert emb.user.size(1) == (48 if readout == "concat" else 16)


def test_disengcn_defaults_and_the_papers_model(data):
    """The default is tanh channels read out at the last layer, with an item bias; ``activation="relu",
    item_bias=False`` is the paper's model, whose embeddings are non-negative (scores in [0, K]); tanh's are signed."""
    info, graph = data
    model = DisenGCN(info)
    assert (model.activation, model.readout, model.item_bias is not None) == ("tanh", "last", True)
    assert all(conv.activation == "tanh" for conv in model.convs)
    torch.manual_seed(1)
    paper = DisenGCN(info, activation="relu", item_bias=False).eval()
    with torch.no_grad():
        emb = paper(graph)
    scores = emb.user @ emb.item.t()
    assert bool((emb.user >= 0).all() and (emb.item >= 0).all())
    assert float(scores.min()) >= 0 and float(scores.max()) <= paper.num_channels + 1e-5
    torch.manual_seed(1)
    with torch.no_grad():
        signed = DisenGCN(info).eval()(graph)
    assert bool((signed.user < 0).any() and (signed.item < 0).any())
    with pytest.raises(ValueError, match="readout must be one of"):
        DisenGCN(info, readout="max")
    with pytest.raises(ValueError, match="activation must be one of"):
        DisenGCN(info, activation="sigmoid")


def test_item_bias_adds_one_learned_scalar_per_item_to_every_score(data):
    """With ``item_bias``, every score is the bias-free model's dot product plus the item's :math:`b_i`, for the
    evaluator's scores and the training pairs' alike; the biases start at zero, are reset to zero, are not in the L2
    term, and ``id_columns`` gives the bias-free representations back."""
    info, graph = data
    torch.manual_seed(3)
    model = DisenGCN(info, embedding_dim=8, num_channels=2).eval()
    plain = DisenGCN(info, embedding_dim=8, num_channels=2, item_bias=False).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "item_bias"})
    assert model.item_bias is not None and plain.item_bias is None
    assert torch.equal(model.item_bias.detach(), torch.zeros(I))
    with torch.no_grad():
        model.item_bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0]))
        emb, reference = model(graph), plain(graph)
    users = torch.arange(U)
    expected = torch.stack([torch.stack([reference.user[u] @ reference.item[i] + model.item_bias[i] for i in range(I)])
                            for u in range(U)])
    torch.testing.assert_close(model.score(emb, users), expected)
    pos, neg = torch.tensor([0, 1, 4, 2]), torch.tensor([3, 3, 0, 4])
    pos_scores, neg_scores = model.pair_scores(emb, users, pos, neg)
    torch.testing.assert_close(pos_scores, expected[users, pos])
    torch.testing.assert_close(neg_scores, expected[users, neg])
    torch.testing.assert_close(emb.user[:, model.id_columns()], reference.user)
    torch.testing.assert_close(emb.item[:, model.id_columns()], reference.item)
    torch.testing.assert_close(model.l2_term(users, pos, neg), plain.l2_term(users, pos, neg))
    model.reset_parameters()
    assert torch.equal(model.item_bias.detach(), torch.zeros(I))


def test_mf_item_bias_the_control_adds_b_i_to_every_score(data):
    """BPR-MF's ``item_bias`` (the control for DisenGCN's): the same scores as the embeddings' dot products plus
    :math:`b_i`, computed here by hand; off by default, zero at the start and after a reset, and trained."""
    info, graph = data
    assert MF(info).item_bias is None
    torch.manual_seed(0)
    model = MF(info, embedding_dim=4, item_bias=True)
    assert torch.equal(model.item_bias.detach(), torch.zeros(I))
    with torch.no_grad():
        model.item_bias.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0, 4.0]))
        emb = model(graph)
        users = torch.arange(U)
        expected = model.user_embedding @ model.item_embedding.t() + model.item_bias
        torch.testing.assert_close(model.score(emb, users), expected)
        torch.testing.assert_close(emb.item[:, model.id_columns()], model.item_embedding)
    pos, neg = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, 1, 0])
    model.loss(model(graph), users, pos, neg, 1e-4).backward()
    assert model.item_bias.grad is not None and bool(model.item_bias.grad[[0, 1, 2, 3, 4]].ne(0).all())
    model.reset_parameters()
    assert torch.equal(model.item_bias.detach(), torch.zeros(I))


needs_chained_mkl = pytest.mark.skipif(
    native.native_kernels() is None or native.dense_products_status() != "native",
    reason=f"the compiled dense products do not run here: {native.dense_products_status()}",
)


@needs_chained_mkl
@pytest.mark.parametrize(("readout", "activation", "num_layers", "item_bias"), [
    ("last", "tanh", 2, True), ("last", "tanh", 2, False), ("sum", "tanh", 2, True), ("mean", "none", 2, False),
    ("concat", "relu", 2, True), ("sum", "leaky_relu", 3, False), ("concat", "tanh", 1, True),
    ("mean", "tanh", 0, True),
])
def test_batch_forward_is_the_full_forward_for_every_readout(readout, activation, num_layers, item_bias):
    """Two optimiser steps on the Tiktok-shaped preset, each from the same parameters: the losses and every gradient,
    within float32 round-off, ``1e-5`` of each tensor's largest entry (the channel softmax's last bit can depend on
    an entry's position, and autograd sums the gradients of the field's rows in another order; measured: at most
    ``2e-7`` of it; tests/test_ops_field.py checks that the field path is deterministic)."""
    dataset = load_dataset("synthetic:tiktok")
    graph = dataset.graph()
    seed_everything(0)
    full = DisenGCN(dataset.info(), readout=readout, activation=activation, num_layers=num_layers,
                    item_bias=item_bias)
    if item_bias:  # biases away from their zero start, so that their rows and gradients are checked too
        torch.nn.init.normal_(full.item_bias)
    restricted = copy.deepcopy(full)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (full, restricted)]
    for step in range(2):
        generator = torch.Generator().manual_seed(step)
        pairs = dataset.train[torch.randperm(dataset.train.size(0), generator=generator)[:64]]
        users, pos = pairs[:, 0], pairs[:, 1]
        neg = torch.randint(0, dataset.num_items, (64,), generator=generator)
        losses = []
        for model, optimizer, whole in ((full, optimizers[0], True), (restricted, optimizers[1], False)):
            emb = model(graph) if whole else model.batch_forward(graph, users, pos, neg)
            loss = model.loss(emb, users, pos, neg, 1e-3)
            optimizer.zero_grad()
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0.0)
        for (name, a), b in zip(full.named_parameters(), restricted.parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=0.0, atol=1e-5 * float(a.grad.abs().max()) + 1e-9,
                                           msg=name)
        for optimizer in optimizers:
            optimizer.step()
        restricted.load_state_dict(full.state_dict())  # Adam would turn round-off into learning-rate-sized steps

