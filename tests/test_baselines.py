"""Layer tests of the five baselines (docs/protocol.md, "Baselines") against dense reference computations written out in
the tests.

Every reference here is computed from the training pairs directly (a dense adjacency and plain loops), never from
the graph's index structures, so an error in edge order, normalisation or aggregation shows up as a mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.nn import GATConv, SAGEConv
from torch_geometric.utils import spmm as pyg_spmm

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph, WordBags
from grcn_bench.models import get_model
from grcn_bench.models.disengcn import DisenGCN
from grcn_bench.models.gat import GAT, with_self_loops
from grcn_bench.models.graphsage import GraphSAGE
from grcn_bench.models.layers.content import ItemContentInput, modality_features, node_inputs, sparse_adjacency
from grcn_bench.models.layers.disen import NeighRoutingConv
from grcn_bench.models.layers.edge_ops import (
    CSRGATConv,
    CSRSAGEConv,
    EdgeScoreSum,
    SelfLoopSoftmax,
    attention_matrix,
    mean_aggregate,
)
from grcn_bench.models.layers.mmgcn import AggregateCombineConv, mean_weights
from grcn_bench.models.layers.ngcf import BiInteractionConv, symmetric_norm
from grcn_bench.models.mmgcn import MMGCN, modality_mean
from grcn_bench.models.ngcf import NGCF
from grcn_bench.models.ops import CSRPattern, graph_pattern, spmm, stack_pattern

U, I = 4, 5
# User 3 has no training item and item 4 no user: isolated nodes must be handled too.
PAIRS = [(0, 0), (0, 1), (0, 3), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)]
# Item k contains the words listed; item 2 has none (zero text vector).
WORDS = {0: [0, 1], 1: [2], 3: [1, 1, 3], 4: [0]}
NUM_WORDS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


def dense_adjacency() -> torch.Tensor:
    """``[N, N]`` symmetric 0/1 adjacency in graph node order (users, then items), from the pairs."""
    adj = torch.zeros(U + I, U + I)
    for u, i in PAIRS:
        adj[u, U + i] = adj[U + i, u] = 1.0
    return adj


def neighbours(adj: torch.Tensor, v: int) -> list[int]:
    return [j for j in range(adj.size(0)) if adj[v, j] > 0]


@pytest.fixture
def data() -> tuple[DatasetInfo, InteractionGraph]:
    generator = torch.Generator().manual_seed(0)
    features = {"v": torch.randn(I, 6, generator=generator), "a": torch.randn(I, 3, generator=generator)}
    word_item = torch.tensor([k for k, words in WORDS.items() for _ in words])
    word_id = torch.tensor([w for words in WORDS.values() for w in words])
    bags = WordBags(word_item, word_id, NUM_WORDS)
    graph = InteractionGraph.from_pairs(torch.tensor(PAIRS), U, I, features, bags)
    info = DatasetInfo(U, I, {"v": 6, "a": 3}, num_words=NUM_WORDS, num_train_pairs=len(PAIRS))
    return info, graph


def word_means(table: torch.Tensor) -> torch.Tensor:
    """``[I, d]`` mean word embedding per item, by a loop over the word lists."""
    rows = [table[WORDS[k]].mean(0) if WORDS.get(k) else torch.zeros(table.size(1)) for k in range(I)]
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------ content input


def test_item_content_input_projects_the_concatenated_modalities(data):
    info, graph = data
    for normalize in (True, False):
        torch.manual_seed(0)
        content = ItemContentInput(info, 8, normalize=normalize)
        assert content.modalities == ("v", "a", "t") and content.widths == (6, 3, 64)
        parts = [graph.features["v"], graph.features["a"], word_means(content.word_embedding)]
        if normalize:
            parts = [x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) for x in parts]
        expected = torch.cat(parts, 1) @ content.projection.weight.t() + content.projection.bias
        torch.testing.assert_close(content(graph), expected)
        assert torch.equal(content.concatenated(graph)[2, 9:], torch.zeros(64))  # item 2 has no words
    blocks = ItemContentInput(info, 8).concatenated(graph)
    norms = torch.stack([blocks[:, :6].norm(dim=1), blocks[:, 6:9].norm(dim=1), blocks[:, 9:].norm(dim=1)], 1)
    expected_norms = torch.ones(I, 3)
    expected_norms[2, 2] = 0.0
    torch.testing.assert_close(norms, expected_norms)


def test_item_content_input_errors(data):
    info, graph = data
    with pytest.raises(ValueError, match="at least one modality"):
        ItemContentInput(DatasetInfo(U, I), 8)
    content = ItemContentInput(info, 8)
    wrong_width = InteractionGraph.from_pairs(
        torch.tensor(PAIRS), U, I, {"v": torch.randn(I, 7), "a": graph.features["a"]}, graph.word_bags
    )
    with pytest.raises(ValueError, match=r"modality 'v' input has shape \(5, 7\), expected \[5, 6\]"):
        content(wrong_width)
    no_words = InteractionGraph.from_pairs(torch.tensor(PAIRS), U, I, graph.features)
    with pytest.raises(ValueError, match="no features for modality 't'"):
        content(no_words)
    with pytest.raises(ValueError, match="word-embedding table is needed"):
        modality_features(graph, "t")
    wrong_rows = InteractionGraph.from_pairs(torch.tensor(PAIRS), U, I, {"v": torch.randn(I + 1, 6)})
    with pytest.raises(ValueError, match=r"shape \(6, 6\), expected \[5, D\]"):
        modality_features(wrong_rows, "v")


def test_node_inputs_add_content_to_items_only(data):
    info, graph = data
    content = ItemContentInput(info, 8)
    users, items = torch.randn(U, 8), torch.randn(I, 8)
    x = node_inputs(users, items, content, graph)
    assert torch.equal(x[:U], users)
    torch.testing.assert_close(x[U:], items + content(graph))
    assert torch.equal(node_inputs(users, items, None, graph), torch.cat([users, items]))


@pytest.mark.parametrize("name", ["graphsage", "gat", "ngcf", "disengcn"])
def test_use_features_switches_the_content_input(data, name):
    info, graph = data
    other_features = {m: x + 1.0 for m, x in graph.features.items()}
    changed = InteractionGraph.from_pairs(torch.tensor(PAIRS), U, I, other_features, graph.word_bags)
    for use_features in (True, False):
        torch.manual_seed(0)
        model = get_model(name)(info, use_features=use_features).eval()
        assert (model.content is not None) == use_features
        differs = not torch.allclose(model(graph).item, model(changed).item)
        assert differs == use_features
    # A dataset without modalities gives the ID-only model even with use_features=True.
    assert get_model(name)(DatasetInfo(U, I), use_features=True).content is None


# ------------------------------------------------------------------------------------- sparse fixed propagation


def test_sparse_adjacency_is_the_dense_adjacency(data):
    _, graph = data
    assert torch.equal(sparse_adjacency(graph).to_dense(), dense_adjacency())


def test_mean_weights_are_one_over_the_target_degree(data):
    _, graph = data
    weight = mean_weights(graph.edge_index, graph.degree())
    degree = dense_adjacency().sum(1)
    for e, (_, t) in enumerate(graph.edge_index.t().tolist()):
        assert weight[e].item() == pytest.approx(1.0 / degree[t].item())


def fast_and_reference_paths_agree(conv, args, fast_kwargs, x):
    """The sparse path and the gather/scatter path give the same output and the same input gradient."""
    x_fast, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    upstream = torch.randn(x.size(0), conv.out_channels)
    out_fast = conv(x_fast, *args, **fast_kwargs)
    out_ref = conv(x_ref, *args)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    (out_fast * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- NGCF


def test_symmetric_norm_is_one_over_root_degree_product(data):
    _, graph = data
    adj = dense_adjacency()
    degree = adj.sum(1)
    norm = symmetric_norm(graph.edge_index, graph.degree())
    for e, (s, t) in enumerate(graph.edge_index.t().tolist()):
        assert norm[e].item() == pytest.approx(1.0 / math.sqrt(degree[s] * degree[t]))
    assert norm[0].item() == pytest.approx(1 / math.sqrt(2 * 3))  # first edge: item 0 (2 users) -> user 0 (3 items)


def test_bi_interaction_layer_equals_the_message_sum_per_edge(data):
    _, graph = data
    torch.manual_seed(1)
    conv = BiInteractionConv(8, 5, negative_slope=0.2)
    x = torch.randn(U + I, 8)
    out = conv(x, graph.edge_index, symmetric_norm(graph.edge_index, graph.degree()))
    adj = dense_adjacency()
    w1, w2 = conv.lin1.weight, conv.lin2.weight
    for u in range(U + I):
        total = w1 @ x[u]  # m_{u<-u}
        for i in neighbours(adj, u):
            scale = 1.0 / math.sqrt(len(neighbours(adj, u)) * len(neighbours(adj, i)))
            total = total + scale * (w1 @ x[i] + w2 @ (x[i] * x[u]))  # m_{u<-i}, Eq. 3
        torch.testing.assert_close(out[u], F.leaky_relu(total, 0.2), atol=1e-5, rtol=1e-5)
    assert conv.lin1.bias is None and conv.lin2.bias is None
    norm = symmetric_norm(graph.edge_index, graph.degree())
    fast_and_reference_paths_agree(conv, (graph.edge_index, norm), {"pattern": graph_pattern(graph)}, x)


def test_ngcf_concatenates_layers_and_drops_messages_only_in_training(data):
    info, graph = data
    torch.manual_seed(0)
    model = NGCF(info, message_dropout=0.5).eval()
    emb = model(graph)
    assert emb.user.shape == (U, 192) and emb.item.shape == (I, 192)
    x0 = node_inputs(model.user_embedding, model.item_embedding, model.content, graph)
    norm = symmetric_norm(graph.edge_index, graph.degree())
    x1 = model.convs[0](x0, graph.edge_index, norm)
    x2 = model.convs[1](x1, graph.edge_index, norm)
    torch.testing.assert_close(torch.cat([emb.user, emb.item]), torch.cat([x0, x1, x2], 1))
    assert torch.equal(model(graph).user, emb.user)  # eval: deterministic
    model.train()
    dropped = model(graph)
    assert torch.equal(dropped.user[:, :64], emb.user[:, :64])  # layer 0 is never dropped
    assert (dropped.user[:, 64:] == 0).float().mean() > 0.3  # about half of the propagated entries
    normalized = NGCF(info, normalize_layers=True).eval()(graph)
    blocks = torch.cat([normalized.user, normalized.item])[:, 64:].reshape(U + I, 2, 64)
    torch.testing.assert_close(blocks.norm(dim=-1), torch.ones(U + I, 2))
    with pytest.raises(ValueError, match="message_dropout"):
        NGCF(info, message_dropout=1.0)


# --------------------------------------------------------------------------------------------------- DisenGCN


def dense_routing(conv: NeighRoutingConv, x: torch.Tensor, adj: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """DisenConv (Algorithm 1) by loops: per node, per iteration, per neighbour. Returns outputs and last ``p``."""
    k, d = conv.num_channels, conv.channel_dim
    z = F.relu(x @ conv.lin.weight.t() + conv.lin.bias).view(-1, k, d)
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out, probabilities = [], {}
    for u in range(x.size(0)):
        c = z[u].clone()
        for _ in range(conv.iterations):
            total = z[u].clone()
            for j in neighbours(adj, u):
                logits = torch.stack([z[j, ch] @ c[ch] for ch in range(k)]) / conv.tau
                p = torch.exp(logits) / torch.exp(logits).sum()
                probabilities[(j, u)] = p
                total = total + p.unsqueeze(-1) * z[j]
            c = total / total.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out.append(c.reshape(-1))
    return torch.stack(out), probabilities


@pytest.mark.parametrize("iterations,tau", [(3, 1.0), (1, 0.5), (0, 1.0)])
def test_neighbourhood_routing_equals_the_loop_computation(data, iterations, tau):
    _, graph = data
    torch.manual_seed(2)
    conv = NeighRoutingConv(8, 4, 3, iterations=iterations, tau=tau)
    x = torch.randn(U + I, 8)
    out, p = conv(x, graph.edge_index, return_probabilities=True)
    expected, expected_p = dense_routing(conv, x, dense_adjacency())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.shape == (U + I, 12) and p.shape == (graph.num_edges, 4)
    if iterations:
        torch.testing.assert_close(p.sum(-1), torch.ones(graph.num_edges))  # over channels, per neighbour
        for e, (j, u) in enumerate(graph.edge_index.t().tolist()):
            torch.testing.assert_close(p[e], expected_p[(j, u)], atol=1e-5, rtol=1e-5)
    fast, fast_p = conv(x, graph.edge_index, pattern=graph_pattern(graph), return_probabilities=True)
    torch.testing.assert_close(fast, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_p, p, atol=1e-5, rtol=1e-5)
    channel_norms = out.view(U + I, 4, 3).norm(dim=-1)
    nonzero = channel_norms > 0  # a channel whose ReLU output is all zero stays zero
    torch.testing.assert_close(channel_norms[nonzero], torch.ones(int(nonzero.sum())))
    assert nonzero.float().mean() > 0.5


def test_neighbourhood_routing_sparse_path_has_the_reference_gradients(data):
    _, graph = data
    torch.manual_seed(4)
    conv = NeighRoutingConv(8, 4, 3, iterations=2, tau=0.7)
    x = torch.randn(U + I, 8)
    upstream = torch.randn(U + I, 12)
    pattern = graph_pattern(graph)
    grads = []
    for kwargs in ({}, {"pattern": pattern}):
        conv.zero_grad()
        x_in = x.clone().requires_grad_(True)
        (conv(x_in, graph.edge_index, **kwargs) * upstream).sum().backward()
        grads.append((x_in.grad, conv.lin.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-5)


def test_neighbourhood_routing_keeps_isolated_nodes_and_checks_arguments(data):
    _, graph = data
    conv = NeighRoutingConv(8, 4, 3)
    x = torch.randn(U + I, 8)
    isolated = [3, U + 4]  # user 3, item 4
    torch.testing.assert_close(conv(x, graph.edge_index)[isolated], conv.channels(x)[isolated].reshape(2, -1))
    for bad in (dict(num_channels=0), dict(channel_dim=0), dict(iterations=-1), dict(tau=0.0)):
        args = dict(in_channels=8, num_channels=4, channel_dim=3) | bad
        with pytest.raises(ValueError, match="need num_channels"):
            NeighRoutingConv(args.pop("in_channels"), args.pop("num_channels"), args.pop("channel_dim"), **args)


def test_disengcn_stacks_routing_layers_and_reads_out_the_last(data):
    info, graph = data
    torch.manual_seed(0)
    # The paper's model (ReLU channels, last-layer readout, no item bias); the other options: test_disengcn.py.
    model = DisenGCN(info, num_channels=4, routing_iterations=2, activation="relu", readout="last",
                     item_bias=False).eval()
    emb = model(graph)
    x = node_inputs(model.user_embedding, model.item_embedding, model.content, graph)
    adj = dense_adjacency()
    for conv in model.convs:
        x, _ = dense_routing(conv, x, adj)
    torch.testing.assert_close(torch.cat([emb.user, emb.item]), x, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of num_channels"):
        DisenGCN(info, num_channels=5)


# ------------------------------------------------------------------------------------------------------ MMGCN


def dense_mmgcn_layer(conv: AggregateCombineConv, x: torch.Tensor, ids: torch.Tensor, adj: torch.Tensor):
    slope = conv.negative_slope
    degree = adj.sum(1, keepdim=True)
    mean = torch.where(degree > 0, adj @ x / degree.clamp_min(1), torch.zeros_like(x))
    h = F.leaky_relu(mean @ conv.aggregate_lin.weight.t(), slope)
    x_hat = F.leaky_relu(x @ conv.self_lin.weight.t() + conv.self_lin.bias, slope) + ids
    return F.leaky_relu(torch.cat([h, x_hat], 1) @ conv.combine_lin.weight.t() + conv.combine_lin.bias, slope)


def test_mmgcn_layer_aggregates_the_mean_and_combines_with_the_id(data):
    _, graph = data
    torch.manual_seed(3)
    conv = AggregateCombineConv(6, 4)
    x, ids = torch.randn(U + I, 6), torch.randn(U + I, 4)
    out = conv(x, ids, graph.edge_index)
    torch.testing.assert_close(out, dense_mmgcn_layer(conv, x, ids, dense_adjacency()), atol=1e-5, rtol=1e-5)
    # User 0's mean over items 0, 1, 3 by hand.
    h0 = F.leaky_relu(conv.aggregate_lin(x[[U + 0, U + 1, U + 3]].mean(0)), 0.01)
    x_hat0 = F.leaky_relu(conv.self_lin(x[0]), 0.01) + ids[0]
    torch.testing.assert_close(out[0], F.leaky_relu(conv.combine_lin(torch.cat([h0, x_hat0])), 0.01))
    fast = {"pattern": graph_pattern(graph), "mean_weight": mean_weights(graph.edge_index, graph.degree())}
    fast_and_reference_paths_agree(conv, (ids, graph.edge_index), fast, x)
    with pytest.raises(ValueError, match="both pattern and mean_weight"):
        conv(x, ids, graph.edge_index, pattern=fast["pattern"])


def test_mmgcn_is_the_mean_of_one_gcn_per_modality(data):
    info, graph = data
    torch.manual_seed(0)
    model = MMGCN(info).eval()
    emb = model(graph)
    adj = dense_adjacency()
    ids = torch.cat([model.user_embedding, model.item_embedding])
    per_modality = []
    for m, raw in (("v", graph.features["v"]), ("a", graph.features["a"]), ("t", word_means(model.word_embedding))):
        projection = model.projection[m]
        x = torch.cat([model.preference[m], F.leaky_relu(raw @ projection.weight.t() + projection.bias, 0.01)])
        for conv in model.convs[m]:
            x = dense_mmgcn_layer(conv, x, ids, adj)
        per_modality.append(x)
    expected = sum(per_modality) / 3
    torch.testing.assert_close(torch.cat([emb.user, emb.item]), expected, atol=1e-5, rtol=1e-5)
    users, pos, neg = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([4, 4])
    ego = model.ego_parameters(users, pos, neg)
    assert len(ego) == 3 + 3 and torch.equal(ego[3], model.preference["v"][users])
    normalized = MMGCN(info, normalize_inputs=True)
    torch.testing.assert_close(normalized.modality_input(graph, "a").norm(dim=-1), torch.ones(U + I))


@pytest.mark.parametrize("modalities", [1, 2, 3])
def test_mmgcn_modality_mean_is_the_stacked_mean_bit_for_bit(modalities):
    generator = torch.Generator().manual_seed(modalities)
    xs = [torch.randn(200, 16, generator=generator) for _ in range(modalities)]
    for x in xs:
        x[0, :4] = -0.0  # -0 in every modality: the stacked mean's sum from zero gives +0 there
    xs[0][1, 0] = -0.0
    xs = [x.requires_grad_() for x in xs]
    stacked, ours = torch.stack(xs).mean(dim=0), modality_mean(xs)
    grad = torch.randn(200, 16, generator=generator)

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().view(torch.int32)

    assert torch.equal(bits(ours), bits(stacked)) and bits(ours)[0, 0] == 0
    reference_grads = torch.autograd.grad(stacked, xs, grad)
    for mine, reference in zip(torch.autograd.grad(ours, xs, grad), reference_grads, strict=True):
        assert torch.equal(bits(mine), bits(reference))


def test_mmgcn_frozen_id_never_trains_ids_and_preferences(data):
    info, graph = data
    model = MMGCN(info, frozen_id=True)
    assert set(model.frozen_parameters) == {
        "user_embedding",
        "item_embedding",
        "preference.v",
        "preference.a",
        "preference.t",
    }
    assert MMGCN.frozen_parameters == () and MMGCN(info).frozen_parameters == ()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([4, 4, 4])
    model.loss(model(graph), users, pos, neg, reg_weight=0.1).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        frozen = name in model.frozen_parameters
        assert (p.grad is None) == frozen and p.requires_grad != frozen
        assert torch.equal(p, before[name]) == frozen, name


def test_mmgcn_needs_a_modality():
    with pytest.raises(ValueError, match="at least one item modality"):
        MMGCN(DatasetInfo(U, I))


# ------------------------------------------------------------------------------------------------ GAT and SAGE


def dense_attention(conv, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` single-head attention ``alpha[v, j]`` over ``N(v) + {v}`` (GAT Eqs. 1-3), by loops."""
    wx = x @ conv.lin.weight.t()
    src, dst = (wx * conv.att_src.view(1, -1)).sum(-1), (wx * conv.att_dst.view(1, -1)).sum(-1)
    alpha = torch.zeros(x.size(0), x.size(0))
    for v in range(x.size(0)):
        group = [*neighbours(adj, v), v]
        logits = torch.stack([F.leaky_relu(src[j] + dst[v], 0.2) for j in group])
        alpha[v, group] = torch.softmax(logits, 0)
    return alpha


def test_gat_edge_weights_are_last_layer_attention_in_graph_edge_order(data):
    info, graph = data
    torch.manual_seed(0)
    model = GAT(info).eval()
    captured = {}

    def capture_input(module, args):
        captured["x"] = args[0]

    model.convs[-1].register_forward_pre_hook(capture_input)
    emb = model(graph)
    assert emb.edge_weight.shape == (graph.num_edges,)
    alpha = dense_attention(model.convs[-1], captured["x"], dense_adjacency())
    for e, (j, v) in enumerate(graph.edge_index.t().tolist()):
        assert emb.edge_weight[e].item() == pytest.approx(alpha[v, j].item(), abs=1e-6)
    # Per node, incoming training-edge weights plus the dropped self-loop coefficient sum to one.
    incoming = torch.zeros(U + I).index_add_(0, graph.edge_index[1], emb.edge_weight.detach())
    torch.testing.assert_close(incoming + alpha.diagonal(), torch.ones(U + I))
    assert incoming[3] == 0 and (incoming[:3] < 1).all()
    assert model.convs[0].heads == 8 and model.convs[0].out_channels == 8 and model.convs[-1].heads == 1
    with pytest.raises(ValueError, match="multiple of heads"):
        GAT(info, heads=5)


def test_graphsage_is_mean_aggregation_with_root_weight(data):
    info, graph = data
    torch.manual_seed(0)
    model = GraphSAGE(info).eval()
    emb = model(graph)
    adj = dense_adjacency()
    degree = adj.sum(1, keepdim=True)
    x = node_inputs(model.user_embedding, model.item_embedding, model.content, graph)
    for layer, conv in enumerate(model.convs):
        mean = adj @ x / degree.clamp_min(1)
        x = mean @ conv.lin_l.weight.t() + conv.lin_l.bias + x @ conv.lin_r.weight.t()
        if layer == 0:
            x = F.leaky_relu(x, 0.01)
    torch.testing.assert_close(torch.cat([emb.user, emb.item]), x, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.convs[0].lin_l.bias, torch.zeros(64))  # Xavier weights, zero bias
    unit = GraphSAGE(info, normalize=True).eval()(graph)
    torch.testing.assert_close(unit.user.norm(dim=-1), torch.ones(U))


# ------------------------------------------------------------------------- fast paths against PyG's own forwards


def test_mean_aggregate_is_pygs_csr_mean_bit_for_bit(data):
    _, graph = data
    x = torch.randn(U + I, 5, dtype=torch.float64)
    fast = mean_aggregate(graph_pattern(graph), x, graph.degree())
    assert torch.equal(fast, pyg_spmm(sparse_adjacency(graph).to(torch.float64), x, reduce="mean"))
    adj = dense_adjacency().double()
    torch.testing.assert_close(fast, adj @ x / adj.sum(1, keepdim=True).clamp_min(1))  # isolated rows are zero
    x.requires_grad_(True)
    torch.autograd.gradcheck(lambda v: mean_aggregate(graph_pattern(graph), v, graph.degree()), (x,))


@pytest.mark.parametrize("normalize", [False, True])
def test_csr_sage_conv_with_the_graph_is_sage_conv_on_adj_t(data, normalize):
    _, graph = data
    torch.manual_seed(5)
    conv = CSRSAGEConv(6, 4, aggr="mean", normalize=normalize)
    torch.nn.init.normal_(conv.lin_l.bias)
    assert isinstance(conv, SAGEConv) and set(conv.state_dict()) == set(SAGEConv(6, 4).state_dict())
    x = torch.randn(U + I, 6)
    x_fast, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fast, reference = conv(x_fast, graph), conv(x_ref, sparse_adjacency(graph))
    assert torch.equal(fast, reference)
    upstream = torch.randn_like(fast)
    (fast * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad)


def test_csr_sage_conv_refuses_settings_it_cannot_compute_from_the_graph(data):
    _, graph = data
    x = torch.randn(U + I, 6)
    for options in (dict(aggr="max"), dict(project=True), dict(root_weight=False)):
        with pytest.raises(ValueError, match="takes a graph only with aggr='mean'"):
            CSRSAGEConv(6, 4, **options)(x, graph)


def gat_pair(heads: int, concat: bool, dropout: float = 0.0) -> CSRGATConv:
    torch.manual_seed(6)
    conv = CSRGATConv(6, 3, heads=heads, concat=concat, add_self_loops=False, dropout=dropout)
    torch.nn.init.normal_(conv.bias)
    return conv


@pytest.mark.parametrize("heads,concat", [(3, True), (1, False), (2, False)])
def test_csr_gat_conv_with_the_graph_is_gat_conv_on_edges_plus_self_loops(data, heads, concat):
    _, graph = data
    conv = gat_pair(heads, concat)
    assert isinstance(conv, GATConv) and set(conv.state_dict()) == set(GATConv(6, 3, heads=heads).state_dict())
    x = torch.randn(U + I, 6)
    x_fast, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fast, alpha = conv(x_fast, graph, return_attention_weights=True)
    reference, (edges, ref_alpha) = conv(x_ref, with_self_loops(graph.edge_index, U + I), return_attention_weights=True)
    assert alpha.shape == (graph.num_edges, heads) and torch.equal(edges[:, : graph.num_edges], graph.edge_index)
    torch.testing.assert_close(alpha, ref_alpha[: graph.num_edges], rtol=0, atol=1e-7)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(conv(x, graph), fast.detach())  # without return_attention_weights: the output alone
    upstream = torch.randn_like(fast)
    grads = []
    for out, x_in in ((fast, x_fast), (reference, x_ref)):
        conv.zero_grad()
        (out * upstream).sum().backward()
        grads.append([x_in.grad, *(p.grad.clone() for p in conv.parameters())])
    for fast_grad, ref_grad in zip(*grads, strict=True):
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_csr_gat_conv_drops_attention_as_gat_conv_does(data):
    _, graph = data
    conv = gat_pair(2, True, dropout=0.5).train()
    x = torch.randn(U + I, 6)
    torch.manual_seed(11)
    fast, alpha = conv(x, graph, return_attention_weights=True)
    torch.manual_seed(11)
    reference, (_, ref_alpha) = conv(x, with_self_loops(graph.edge_index, U + I), return_attention_weights=True)
    torch.testing.assert_close(alpha, ref_alpha[: graph.num_edges], rtol=0, atol=1e-7)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    assert (alpha == 0).any() and (alpha > 0).any()  # the same mask, and it did drop some coefficients


def test_csr_gat_conv_refuses_settings_it_cannot_compute_from_the_graph(data):
    _, graph = data
    x = torch.randn(U + I, 6)
    for options in (dict(add_self_loops=True), dict(residual=True), dict(edge_dim=2)):
        conv = CSRGATConv(6, 3, heads=2, **({"add_self_loops": False} | options))
        with pytest.raises(ValueError, match="takes a graph only with add_self_loops=False"):
            conv(x, graph)
    with pytest.raises(ValueError, match="no edge_attr or size"):
        CSRGATConv(6, 3, add_self_loops=False)(x, graph, edge_attr=torch.ones(graph.num_edges, 1))


def test_self_loop_softmax_is_a_softmax_over_each_row_and_its_self_entry():
    # Rows: 0 has entries 0-2, 1 has none (only its self entry), 2 has entries 3-4.
    rowptr = torch.tensor([0, 3, 3, 5])
    logits = torch.randn(5, 2, dtype=torch.float64)
    self_logits = torch.randn(3, 2, dtype=torch.float64)
    p, q = SelfLoopSoftmax.apply(logits, self_logits, rowptr)
    for row, (start, stop) in enumerate([(0, 3), (3, 3), (3, 5)]):
        expected = torch.softmax(torch.cat([logits[start:stop], self_logits[row : row + 1]]), dim=0)
        torch.testing.assert_close(torch.cat([p[start:stop], q[row : row + 1]]), expected)
    assert torch.equal(q[1], torch.ones(2, dtype=torch.float64))
    inputs = (logits.requires_grad_(True), self_logits.requires_grad_(True), rowptr)
    torch.autograd.gradcheck(lambda a, b, r: SelfLoopSoftmax.apply(a, b, r), inputs)


def test_edge_score_sum_adds_source_and_target_scores_per_edge(data):
    _, graph = data
    source = torch.randn(U + I, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(U + I, 3, dtype=torch.float64, requires_grad=True)
    out = EdgeScoreSum.apply(source, target, graph)
    for e, (j, v) in enumerate(graph.edge_index.t().tolist()):
        torch.testing.assert_close(out[e], source[j] + target[v])
    torch.autograd.gradcheck(lambda a, b: EdgeScoreSum.apply(a, b, graph), (source, target))


@pytest.mark.parametrize("symmetric", [True, False])
def test_stack_pattern_runs_each_copy_on_its_own_block(data, symmetric):
    _, graph = data
    if symmetric:
        pattern = graph_pattern(graph)
    else:  # the [U, I] user <- item pattern, with a transpose of its own
        pairs = torch.tensor(PAIRS)
        pattern = CSRPattern.from_coo(pairs[:, 0], pairs[:, 1], U, I)
    copies, width = 3, 2
    block = stack_pattern(pattern, copies)
    assert (block.num_rows, block.num_cols, block.nnz) == (3 * pattern.num_rows, 3 * pattern.num_cols, 3 * pattern.nnz)
    assert block.rowptr.dtype == block.col.dtype == torch.int32
    values = torch.randn(copies, pattern.nnz, dtype=torch.float64, requires_grad=True)
    x = torch.randn(copies, pattern.num_cols, width, dtype=torch.float64, requires_grad=True)
    stacked = spmm(block, values.reshape(-1), x.reshape(-1, width)).view(copies, pattern.num_rows, width)
    separate = torch.stack([spmm(pattern, values[m], x[m]) for m in range(copies)])
    channel_major = spmm(pattern, values, x)  # one product per copy over the base pattern
    assert torch.equal(stacked, separate) and torch.equal(channel_major, separate)
    upstream = torch.randn_like(stacked)
    grads = [torch.autograd.grad((out * upstream).sum(), (values, x)) for out in (stacked, separate, channel_major)]
    for a, b, c in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="copies must be an int >= 1"):
            stack_pattern(pattern, bad)


def test_neighbourhood_routing_takes_the_plain_graph_pattern(data):
    _, graph = data
    torch.manual_seed(7)
    conv = NeighRoutingConv(8, 4, 3, iterations=2, tau=0.5)
    x = torch.randn(U + I, 8)
    reference, reference_p = conv(x, graph.edge_index, return_probabilities=True)
    out, p = conv(x, graph.edge_index, pattern=graph_pattern(graph), return_probabilities=True)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(p, reference_p, atol=1e-6, rtol=1e-6)


def test_gat_and_graphsage_models_equal_pyg_forwards_on_edge_lists(data):
    info, graph = data
    torch.manual_seed(0)
    gat = GAT(info).eval()
    emb = gat(graph)
    x = node_inputs(gat.user_embedding, gat.item_embedding, gat.content, graph)
    edge_index = with_self_loops(graph.edge_index, U + I)
    x = F.elu(GATConv.forward(gat.convs[0], x, edge_index))
    x, (_, alpha) = GATConv.forward(gat.convs[1], x, edge_index, return_attention_weights=True)
    torch.testing.assert_close(torch.cat([emb.user, emb.item]), x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(emb.edge_weight, alpha[: graph.num_edges, 0], rtol=0, atol=1e-7)
    sage = GraphSAGE(info).eval()
    emb = sage(graph)
    x = node_inputs(sage.user_embedding, sage.item_embedding, sage.content, graph)
    x = F.leaky_relu(SAGEConv.forward(sage.convs[0], x, sparse_adjacency(graph)), 0.01)
    x = SAGEConv.forward(sage.convs[1], x, sparse_adjacency(graph))
    assert torch.equal(torch.cat([emb.user, emb.item]), x)


def test_attention_matrix_gives_every_heads_source_and_target_scores():
    heads, channels = 3, 4
    att_src, att_dst = torch.randn(1, heads, channels), torch.randn(1, heads, channels)
    matrix = attention_matrix(att_src, att_dst)
    assert matrix.shape == (heads * channels, 2 * heads)
    h = torch.randn(7, heads, channels)
    scores = h.view(7, -1) @ matrix
    torch.testing.assert_close(scores[:, :heads], (h * att_src).sum(-1))
    torch.testing.assert_close(scores[:, heads:], (h * att_dst).sum(-1))
    assert (matrix[:channels, 1:heads] == 0).all() and (matrix[channels:, 0] == 0).all()  # block-diagonal
