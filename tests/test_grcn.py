"""GRCN against independent dense computations of the paper's equations on hand-sized graphs.

Every expected value is computed here with plain loops or dense matrices over a dense adjacency, from the model's
parameters and inputs, never by calling the functions under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph, WordBags
from grcn_bench.models import get_model
from grcn_bench.models.grcn import GRCN
from grcn_bench.models.layers.refine import RefinedPropagation, affinities, fuse, prune, route_prototypes
from grcn_bench.models.ops import graph_pattern, user_item_pattern

U, I, D = 3, 4, 8
PAIRS = torch.tensor([[0, 0], [0, 1], [0, 3], [1, 1], [1, 2], [2, 0], [2, 2], [2, 3]])
DIMS = {"v": 5, "a": 3}


def make_graph(pairs=PAIRS, num_users=U, num_items=I, seed=0, word_bags=None, dims=DIMS):
    gen = torch.Generator().manual_seed(seed)
    features = {m: torch.randn(num_items, dim, generator=gen) for m, dim in dims.items()}
    return InteractionGraph.from_pairs(pairs, num_users, num_items, features=features, word_bags=word_bags)


def make_info(num_users=U, num_items=I, dims=DIMS, num_words=None):
    return DatasetInfo(num_users, num_items, dict(dims), num_words=num_words, num_train_pairs=len(PAIRS))


def make_model(seed=0, info=None, **options) -> GRCN:
    torch.manual_seed(seed)
    return GRCN(info or make_info(), embedding_dim=D, **options)


# ---------------------------------------------------------------------------------------------- dense references


def dense_adjacency(pairs, num_users, num_items):
    adjacency = torch.zeros(num_users, num_items)
    for u, i in pairs.tolist():
        adjacency[u, i] = 1.0
    return adjacency


def reference_content(model, graph):
    """Eq. 1 per modality, from the model's projection weights: normalize(leaky_relu(W x + b))."""
    blocks = []
    for m in model.modalities:
        linear = model.projections[m]
        x = graph.features[m]
        blocks.append(F.normalize(F.leaky_relu(x @ linear.weight.T + linear.bias, 0.01), dim=-1))
    return blocks


def reference_route(content, init, adjacency, iterations):
    """Eqs. 2-4 for one modality, user by user: content [I, d], init [U, d] (raw), adjacency [U, I]."""
    out = []
    for u in range(adjacency.size(0)):
        proto = init[u] / init[u].norm()
        items = adjacency[u].nonzero().flatten()
        for _ in range(iterations):
            if len(items) == 0:
                break
            logits = torch.stack([content[i] @ proto for i in items])
            p = torch.exp(logits) / torch.exp(logits).sum()
            proto = proto + sum(p[k] * content[i] for k, i in enumerate(items))
            proto = proto / proto.norm()
        out.append(proto)
    return torch.stack(out)


def reference_affinity(protos, content, adjacency):
    """Eq. 5 for one modality as dense [U, I] matrices: softmax over each user's row, over each item's column."""
    logits = protos @ content.T
    expd = torch.where(adjacency > 0, torch.exp(logits), torch.zeros_like(logits))
    into_user = expd / expd.sum(1, keepdim=True).clamp(min=1e-30)
    into_item = expd / expd.sum(0, keepdim=True).clamp(min=1e-30)
    return into_user, into_item


def per_edge(graph, into_user, into_item):
    """Dense [U, I] scores -> [2E] in the graph's edge order (the receiver's score of each directed edge)."""
    values = []
    for src, tgt in graph.edge_index.T.tolist():
        if tgt < graph.num_users:
            values.append(into_user[tgt, src - graph.num_users])
        else:
            values.append(into_item[src, tgt - graph.num_users])
    return torch.stack(values)


def dense_weights(graph, edge_weight):
    """[N, N] matrix W with W[target, source] = weight: the receiver applies the weight (Eq. 8)."""
    matrix = torch.zeros(graph.num_nodes, graph.num_nodes)
    for e, (src, tgt) in enumerate(graph.edge_index.T.tolist()):
        matrix[tgt, src] = edge_weight[e]
    return matrix


def blocks_of(emb_part, num_modalities):
    """Split a [n, D(1+M)] output into the ID block and the modality blocks."""
    return emb_part[:, :D], [emb_part[:, D * (k + 1) : D * (k + 2)] for k in range(num_modalities)]


# -------------------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("iterations", [1, 2])
def test_route_prototypes_equals_eqs_2_to_4(iterations):
    graph = make_graph()
    gen = torch.Generator().manual_seed(1)
    content = F.normalize(torch.randn(2, I, D, generator=gen), dim=-1)  # modality-major
    init = torch.randn(2, U, D, generator=gen)
    out = route_prototypes(content, init, graph, iterations)
    adjacency = dense_adjacency(PAIRS, U, I)
    for m in range(2):
        expected = reference_route(content[m], init[m], adjacency, iterations)
        torch.testing.assert_close(out[m], expected)
    # Routing moves the prototypes away from the normalised start.
    assert not torch.allclose(out, F.normalize(init, dim=-1))


def test_route_prototypes_zero_iterations_and_error():
    graph = make_graph()
    init = torch.randn(2, U, D)
    torch.testing.assert_close(route_prototypes(torch.randn(2, I, D), init, graph, 0), F.normalize(init, dim=-1))
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        route_prototypes(torch.randn(2, I, D), init, graph, -1)
    with pytest.raises(ValueError, match="must have the same modalities"):
        route_prototypes(torch.randn(3, I, D), init, graph, 1)
    with pytest.raises(ValueError, match="must have the same modalities"):
        route_prototypes(torch.randn(I, D), init, graph, 1)
    content = torch.randn(2, I, D)  # a caller's pattern is used as given (the one the function would build)
    given = route_prototypes(content, init, graph, 2, pattern=user_item_pattern(graph))
    torch.testing.assert_close(given, route_prototypes(content, init, graph, 2))


@pytest.mark.parametrize("iterations", [0, 1, 2])
def test_model_prototypes_follow_routing(iterations):
    graph = make_graph()
    model = make_model(routing_iterations=iterations)
    emb = model(graph)
    content = reference_content(model, graph)
    adjacency = dense_adjacency(PAIRS, U, I)
    _, user_blocks = blocks_of(emb.user, 2)
    _, item_blocks = blocks_of(emb.item, 2)
    for m in range(2):
        expected = reference_route(content[m], model.user_prototypes.detach()[:, m], adjacency, iterations)
        torch.testing.assert_close(user_blocks[m], expected)
        torch.testing.assert_close(item_blocks[m], content[m])


def test_official_routing_ignores_iterations():
    graph = make_graph()
    reference_state = make_model(routing="official").state_dict()
    outputs = []
    for iterations in (0, 1, 4):
        model = make_model(seed=iterations + 1, routing="official", routing_iterations=iterations)
        model.load_state_dict(reference_state)
        outputs.append(model(graph))
    for emb in outputs[1:]:
        torch.testing.assert_close(emb.user, outputs[0].user)
        torch.testing.assert_close(emb.item, outputs[0].item)
        torch.testing.assert_close(emb.edge_weight, outputs[0].edge_weight)
    _, user_blocks = blocks_of(outputs[0].user, 2)
    init = reference_state["user_prototypes"]
    for m in range(2):
        torch.testing.assert_close(user_blocks[m], init[:, m] / init[:, m].norm(dim=-1, keepdim=True))
    # The paper's routing with the same parameters does move them.
    paper = make_model(routing_iterations=4)
    paper.load_state_dict(reference_state)
    assert not torch.allclose(paper(graph).user, outputs[0].user)


# ----------------------------------------------------------------------------------------- affinities and fusion


def test_affinities_sum_to_one_per_receiver_and_match_eq_5():
    graph = make_graph()
    gen = torch.Generator().manual_seed(2)
    protos, content = torch.randn(2, U, D, generator=gen), torch.randn(2, I, D, generator=gen)
    scores = affinities(protos, content, graph)
    assert scores.shape == (2, 2 * len(PAIRS))
    for node in range(graph.num_nodes):
        incoming = scores[:, graph.edge_index[1] == node]
        torch.testing.assert_close(incoming.sum(1), torch.ones(2))
    adjacency = dense_adjacency(PAIRS, U, I)
    for m in range(2):
        into_user, into_item = reference_affinity(protos[m], content[m], adjacency)
        torch.testing.assert_close(scores[m], per_edge(graph, into_user, into_item))


def reference_scores(model, graph, emb):
    """[2E, M] per-modality affinities computed densely from the model's prototypes and content outputs."""
    _, user_blocks = blocks_of(emb.user.detach(), len(model.modalities))
    _, item_blocks = blocks_of(emb.item.detach(), len(model.modalities))
    adjacency = dense_adjacency(PAIRS, U, I)
    columns = []
    for protos, content in zip(user_blocks, item_blocks, strict=True):
        columns.append(per_edge(graph, *reference_affinity(protos, content, adjacency)))
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("confidence_from", ["target", "source"])
def test_fused_weight_uses_the_chosen_base_vector(confidence_from):
    graph = make_graph()
    model = make_model(confidence_from=confidence_from)
    emb = model(graph)
    scores = reference_scores(model, graph, emb)
    rho = model.base_vectors.detach()
    expected = []
    for e, (src, tgt) in enumerate(graph.edge_index.T.tolist()):
        node = tgt if confidence_from == "target" else src
        expected.append(max(rho[node, m] * scores[e, m] for m in range(2)))
    torch.testing.assert_close(emb.edge_weight.detach(), torch.stack(expected))
    # The two choices really differ on this graph.
    other = make_model(confidence_from="source" if confidence_from == "target" else "target")
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(other(graph).edge_weight, emb.edge_weight)


def test_hard_pruning_zeroes_exactly_the_negative_weights():
    graph = make_graph()
    soft = make_model(pruning="soft")
    soft.base_vectors.data = torch.tensor([[1.0, -2.0], [-0.5, -1.0], [0.3, 0.7], [-1.0, 2.0]] + [[-0.4, 0.2]] * 3)
    hard = make_model(pruning="hard")
    hard.load_state_dict(soft.state_dict())
    soft_w, hard_w = soft(graph).edge_weight.detach(), hard(graph).edge_weight.detach()
    negative = soft_w < 0
    assert negative.any() and (~negative).any()
    assert torch.equal(hard_w == 0, negative)
    torch.testing.assert_close(hard_w[~negative], soft_w[~negative])


@pytest.mark.parametrize("fusion", ["max", "mean"])
def test_max_and_mean_fusion_have_no_base_vectors(fusion):
    graph = make_graph()
    model = make_model(fusion=fusion)
    assert model.base_vectors is None
    assert not any("base" in name for name, _ in model.named_parameters())
    emb = model(graph)
    scores = reference_scores(model, graph, emb)
    expected = scores.max(1).values if fusion == "max" else scores.mean(1)
    torch.testing.assert_close(emb.edge_weight.detach(), expected)
    # Same parameters, default fusion: the base vectors change the weights; without them nothing reads rho.
    based = make_model(fusion="max_base")
    based.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(based(graph).edge_weight, emb.edge_weight)


def test_fuse_and_prune_by_hand():
    scores = torch.tensor([[0.2, 0.6], [0.8, 0.4]]).t()  # [M, 2E]: edge 0 scores (0.2, 0.6), edge 1 (0.8, 0.4)
    confidence = torch.tensor([[2.0, -1.0], [-1.0, -3.0]]).t()
    torch.testing.assert_close(fuse(scores, "max_base", confidence), torch.tensor([0.4, -0.8]))
    torch.testing.assert_close(fuse(scores, "max"), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(fuse(scores, "mean"), torch.tensor([0.4, 0.6]))
    torch.testing.assert_close(prune(torch.tensor([0.4, -0.8]), "hard"), torch.tensor([0.4, 0.0]))
    torch.testing.assert_close(prune(torch.tensor([0.4, -0.8]), "soft"), torch.tensor([0.4, -0.8]))
    with pytest.raises(ValueError, match="needs the base vectors"):
        fuse(scores, "max_base")
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(scores, "sum")
    with pytest.raises(ValueError, match="unknown pruning"):
        prune(scores, "medium")


# ---------------------------------------------------------------------------------------------------- propagation


def test_propagation_equals_dense_eqs_8_and_9():
    graph = make_graph()
    model = make_model(num_layers=2)
    emb = model(graph)
    weights = dense_weights(graph, emb.edge_weight.detach())
    e0 = F.normalize(model.id_embedding.detach(), dim=-1)
    expected = e0 + weights @ e0 + weights @ weights @ e0
    torch.testing.assert_close(emb.user[:, :D].detach(), expected[:U])
    torch.testing.assert_close(emb.item[:, :D].detach(), expected[U:])


def test_refined_propagation_per_modality_weights():
    graph = make_graph()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, graph.num_nodes, 5, generator=gen)  # modality-major
    w = torch.randn(2, graph.num_edges, generator=gen)
    out = RefinedPropagation()(x, graph.edge_index, w)
    for m in range(2):
        torch.testing.assert_close(out[m], dense_weights(graph, w[m]) @ x[m])
    flat = RefinedPropagation()(x[0], graph.edge_index, w[0])
    torch.testing.assert_close(flat, out[0])


def test_isolated_user_and_item_stay_finite():
    pairs = torch.tensor([[0, 0], [0, 1], [1, 1], [1, 2]])  # user 2 and item 3 have no training edges
    graph = make_graph(pairs=pairs)
    model = make_model()
    emb = model(graph)
    assert torch.isfinite(emb.user).all() and torch.isfinite(emb.item).all()
    e0 = F.normalize(model.id_embedding.detach(), dim=-1)
    torch.testing.assert_close(emb.user[2, :D].detach(), e0[2])  # no neighbours: layer 0 only
    torch.testing.assert_close(emb.item[3, :D].detach(), e0[U + 3])
    init = model.user_prototypes.detach()[2]
    torch.testing.assert_close(emb.user[2, D:].detach(), F.normalize(init, dim=-1).flatten())


# ------------------------------------------------------------------------------------------------ prediction layer


@pytest.mark.parametrize(
    ("modalities", "expected"), [(None, ("v", "a")), (["v"], ("v",)), (["a"], ("a",)), (["a", "v"], ("v", "a"))]
)
@pytest.mark.parametrize("id_only", [False, True])
def test_prediction_width_and_modality_subsets(modalities, expected, id_only):
    graph = make_graph()
    torch.manual_seed(0)
    model = GRCN(make_info(), modalities=modalities, id_only_prediction=id_only)  # default 64-d
    assert model.modalities == expected
    assert set(model.projections) == set(expected)
    emb = model(graph)
    width = 64 if id_only else 64 * (1 + len(expected))
    assert emb.user.shape == (U, width) and emb.item.shape == (I, width)
    assert emb.edge_weight.shape == (graph.num_edges,)
    scores = model.score(emb, torch.arange(U))
    torch.testing.assert_close(scores, emb.user @ emb.item.T)


def test_id_only_prediction_is_the_id_block_of_the_full_model():
    graph = make_graph()
    full = make_model()
    id_only = make_model(id_only_prediction=True)
    id_only.load_state_dict(full.state_dict())
    emb_full, emb_id = full(graph), id_only(graph)
    torch.testing.assert_close(emb_id.user, emb_full.user[:, :D])
    torch.testing.assert_close(emb_id.item, emb_full.item[:, :D])
    torch.testing.assert_close(emb_id.edge_weight, emb_full.edge_weight)  # the graph is refined as usual


@pytest.mark.parametrize("routing", ["official", "paper"])
def test_one_hop_readout_equals_direct_computation(routing):
    graph = make_graph()
    model = make_model(content_readout="one_hop", routing=routing, routing_iterations=2)
    emb = model(graph)
    content = reference_content(model, graph)
    adjacency = dense_adjacency(PAIRS, U, I)
    init = model.user_prototypes.detach()
    _, user_blocks = blocks_of(emb.user.detach(), 2)
    _, item_blocks = blocks_of(emb.item.detach(), 2)
    for m in range(2):
        protos = reference_route(content[m], init[:, m], adjacency, 2 if routing == "paper" else 0)
        into_user, into_item = reference_affinity(protos, content[m], adjacency)
        torch.testing.assert_close(user_blocks[m], protos + into_user @ content[m])
        torch.testing.assert_close(item_blocks[m], content[m] + into_item.T @ protos)


# ---------------------------------------------------------------------------------------------------- word-id text

WORD_BAGS = WordBags(item=torch.tensor([0, 0, 1, 2, 2, 2]), word=torch.tensor([0, 3, 1, 1, 4, 5]), num_words=6)


def word_setup(**options):
    info = make_info(dims={"v": 5}, num_words=6)
    graph = make_graph(dims={"v": 5}, word_bags=WORD_BAGS)
    return make_model(info=info, **options), graph


def bpr_step(model, graph):
    emb = model(graph)
    users, pos = PAIRS[:, 0], PAIRS[:, 1]
    neg = (pos + 1) % I
    model.loss(emb, users, pos, neg, reg_weight=0.1).backward()


def test_word_text_is_trained_through_its_projection():
    model, graph = word_setup()
    assert model.modalities == ("v", "t") and set(model.projections) == {"v", "t"}
    assert model.word_embedding.shape == (6, 64) and model.frozen_parameters == ()
    emb = model(graph)
    assert emb.user.shape == (U, D * 3)
    bpr_step(model, graph)
    assert model.word_embedding.grad is not None and model.word_embedding.grad.abs().sum() > 0


def test_frozen_word_text_skips_the_projection_and_gets_no_gradient():
    model, graph = word_setup(freeze_word_embeddings=True, word_dim=D)
    assert "word_embedding" in model.frozen_parameters and not model.word_embedding.requires_grad
    assert set(model.projections) == {"v"}
    emb = model(graph)
    table = model.word_embedding.detach()
    expected = torch.zeros(I, D)
    for item in range(I):
        words = [w for it, w in zip(WORD_BAGS.item.tolist(), WORD_BAGS.word.tolist(), strict=True) if it == item]
        if words:  # items without words keep a zero vector
            mean = table[words].mean(0)
            expected[item] = mean / mean.norm()
    _, item_blocks = blocks_of(emb.item.detach(), 2)
    torch.testing.assert_close(item_blocks[1], expected)
    bpr_step(model, graph)
    assert model.word_embedding.grad is None


def test_freeze_is_a_no_op_without_word_text():
    model = make_model(freeze_word_embeddings=True, word_dim=D)
    assert model.word_embedding is None and model.frozen_parameters == () and not model.freeze_word_embeddings


# ------------------------------------------------------------------------------------------------ loss, gradients

CONFIGS = [
    {},
    {"variant": "official"},
    {"variant": "official", "pruning": "hard"},
    {"fusion": "max"},
    {"fusion": "mean"},
    {"pruning": "hard"},
    {"routing_iterations": 0},
    {"id_only_prediction": True},
    {"content_readout": "one_hop"},
    {"confidence_from": "source"},
    {"word": True},
    {"word": True, "freeze_word_embeddings": True, "word_dim": D},
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper")
def test_every_trainable_parameter_gets_a_gradient(options):
    options = dict(options)
    if options.pop("word", False):
        model, graph = word_setup(**options)
    else:
        model, graph = make_model(**options), make_graph()
    bpr_step(model, graph)
    checked = 0
    for name, parameter in model.named_parameters():
        if name in model.frozen_parameters:
            assert parameter.grad is None
            continue
        assert parameter.requires_grad, name
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        checked += 1
    assert checked >= 4


def test_loss_is_bpr_plus_ego_l2_over_ids_and_prototypes():
    graph = make_graph()
    model = make_model()
    emb = model(graph)
    users, pos, neg = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 1])
    reg = 0.3
    loss = model.loss(emb, users, pos, neg, reg_weight=reg)
    bpr = 0.0
    for u, i, j in zip(users.tolist(), pos.tolist(), neg.tolist(), strict=True):
        diff = float((emb.user[u] @ emb.item[i] - emb.user[u] @ emb.item[j]).detach())
        bpr += -math.log(1.0 / (1.0 + math.exp(-diff)))
    ids, protos = model.id_embedding.detach(), model.user_prototypes.detach()
    l2 = (ids[users] ** 2).mean() + (ids[U + pos] ** 2).mean() + (ids[U + neg] ** 2).mean()
    l2 = l2 + sum((protos[users, m] ** 2).mean() for m in range(2))
    assert loss.item() == pytest.approx(bpr / 2 + reg * float(l2), rel=1e-5)


def _set_by_hand(model):
    """Two-dimensional E and prototypes with small integers, so that the L2 terms can be summed by hand."""
    with torch.no_grad():
        # users 0-2, then items 0-3 (rows U + i)
        model.id_embedding.copy_(torch.tensor([[1.0, 2.0], [5.0, 5.0], [3.0, 0.0],
                                               [1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, -1.0]]))
        model.user_prototypes.copy_(torch.tensor([[[1.0, 0.0], [1.0, 1.0]],
                                                  [[5.0, 5.0], [5.0, 5.0]],
                                                  [[0.0, 2.0], [1.0, 1.0]]]))


def test_release_l2_weighting_by_hand():
    """The release's ``mean(E[[u, u]]**2 + E[[i, j]]**2)`` plus each modality's ``mean(u0[[u, u]]**2)``, by hand.

    Batch (u, i, j) = (0, 1, 2), (2, 3, 0). e_u0 = (1, 2), e_u2 = (3, 0); items e_1 = (2, 0), e_3 = (1, -1) (positives),
    e_2 = (0, 3), e_0 = (1, 1) (negatives). The release's [4, 2] tensor of e_user**2 + e_item**2, rows
    (u0, i1), (u0, j2), (u2, i3), (u2, j0): (1+4, 4+0), (1+0, 4+9), (9+1, 0+1), (9+1, 0+1), summing to 45, so its mean
    is 45 / 8 = 5.625. The shared weighting: mean(e_u**2) = 14/4 = 3.5, mean(e_i**2) = 6/4 = 1.5,
    mean(e_j**2) = 11/4 = 2.75, in all 7.75. Prototypes of users 0 and 2: modality v (1, 0), (0, 2): 5/4 = 1.25;
    modality a (1, 1), (1, 1): 4/4 = 1.0; in all 2.25 under both weightings.
    """
    graph = make_graph()
    users, pos, neg = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 0])
    official = GRCN(make_info(), embedding_dim=2, variant="official")
    shared = GRCN(make_info(), embedding_dim=2, variant="official", l2_weighting="shared")
    assert (official.l2_weighting, shared.l2_weighting) == ("official", "shared")
    for model in (official, shared):
        torch.manual_seed(0)
        model.reset_parameters()
        _set_by_hand(model)
    assert official.l2_term(users, pos, neg).item() == 5.625 + 2.25
    assert shared.l2_term(users, pos, neg).item() == 7.75 + 2.25
    # The paper variant keeps the shared term; the loss adds λ times the term to the same BPR.
    paper = GRCN(make_info(), embedding_dim=2)
    _set_by_hand(paper)
    assert paper.l2_weighting == "shared" and paper.l2_term(users, pos, neg).item() == 10.0
    reg = 0.1
    difference = official.loss(official(graph), users, pos, neg, reg) - shared.loss(shared(graph), users, pos, neg, reg)
    assert difference.item() == pytest.approx(reg * (7.875 - 10.0), abs=1e-6)


def test_forward_has_no_hidden_state():
    graph = make_graph()
    model = make_model()
    first = model(graph)
    torch.testing.assert_close(model(graph).user, first.user)
    other = make_graph(seed=5)  # same structure, new features: the content and the weights must change
    assert not torch.allclose(model(other).edge_weight, first.edge_weight)


# -------------------------------------------------------------------------------------------------------- options


def _parts(model):
    return (model.routing, model.confidence_from, model.content_readout, model.pruning, model.l2_weighting)


def test_variant_sets_the_five_parts_and_explicit_arguments_win():
    assert _parts(make_model()) == ("paper", "target", "none", "soft", "shared")
    # The release as its README runs it (--is_pruning=False): soft pruning, and its own L2 weighting.
    assert _parts(make_model(variant="official")) == ("official", "source", "one_hop", "soft", "official")
    mixed = make_model(variant="official", pruning="hard", routing="paper", l2_weighting="shared")
    assert _parts(mixed) == ("paper", "source", "one_hop", "hard", "shared")
    assert make_model(variant="paper", content_readout="one_hop").content_readout == "one_hop"
    assert make_model(variant="paper", l2_weighting="official").l2_weighting == "official"


def test_registered_and_repr():
    assert get_model("grcn") is GRCN
    text = repr(make_model(variant="official"))
    assert "routing=official" in text and "pruning=soft" in text and "modalities=va" in text
    assert "l2_weighting=official" in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"modalities": ["x"]}, "unknown modalities"),
        ({"modalities": ["t"]}, "unknown modalities"),
        ({"modalities": []}, "at least one modality"),
        ({"modalities": ["v", "v"]}, "must not repeat"),
        ({"routing_iterations": -1}, "routing_iterations"),
        ({"routing_iterations": 1.5}, "routing_iterations"),
        ({"fusion": "sum"}, "unknown fusion"),
        ({"pruning": "medium"}, "unknown pruning"),
        ({"variant": "release"}, "unknown variant"),
        ({"routing": "fast"}, "unknown routing"),
        ({"confidence_from": "both"}, "unknown confidence_from"),
        ({"content_readout": "two_hop"}, "unknown content_readout"),
        ({"l2_weighting": "half"}, "unknown l2_weighting"),
        ({"word_dim": 0}, "word_dim"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(ValueError, match=message):
        make_model(**options)


def test_invalid_setups():
    with pytest.raises(ValueError, match="no modality"):
        GRCN(DatasetInfo(U, I))
    with pytest.raises(ValueError, match="word_dim"):
        word_setup(freeze_word_embeddings=True, word_dim=D + 1)
    model = make_model()
    with pytest.raises(ValueError, match="built for"):
        model(make_graph(num_users=U + 1))
    graph = make_graph(dims={"v": 5})
    with pytest.raises(ValueError, match="no features for modality 'a'"):
        model(graph)
    word_model, _ = word_setup()
    with pytest.raises(ValueError, match="no word_bags"):
        word_model(make_graph(dims={"v": 5}))


# ------------------------------------------------------------------------------------ gradients of the fast kernels


def reference_forward(model, graph):
    """The paper's GRCN (default options) from the dense references above, differentiable end to end."""
    content = reference_content(model, graph)
    adjacency = dense_adjacency(PAIRS, U, I)
    protos = [
        reference_route(content[m], model.user_prototypes[:, m], adjacency, model.routing_iterations)
        for m in range(len(model.modalities))
    ]
    scores = torch.stack([per_edge(graph, *reference_affinity(protos[m], content[m], adjacency)) for m in range(2)], 1)
    weight = (model.base_vectors[graph.edge_index[1]] * scores).amax(1)  # Eq. 7, the receiver's base vector
    matrix = dense_weights(graph, weight)
    e0 = F.normalize(model.id_embedding, dim=-1)
    total = e0 + matrix @ e0 + matrix @ (matrix @ e0)
    user = torch.cat([total[:U], *protos], dim=1)
    item = torch.cat([total[U:], *content], dim=1)
    return user, item, weight


def test_gradients_through_the_sparse_kernels_equal_the_dense_reference():
    graph = make_graph()
    model = make_model(routing_iterations=2)
    gen = torch.Generator().manual_seed(7)
    emb = model(graph)
    expected = reference_forward(model, graph)
    torch.testing.assert_close(emb.user, expected[0])
    torch.testing.assert_close(emb.item, expected[1])
    torch.testing.assert_close(emb.edge_weight, expected[2])
    upstream = [torch.randn(t.shape, generator=gen) for t in expected]
    parameters = [p for _, p in model.named_parameters()]
    fast = torch.autograd.grad([(t * g).sum() for t, g in zip(emb, upstream, strict=True)], parameters)
    slow = torch.autograd.grad([(t * g).sum() for t, g in zip(expected, upstream, strict=True)], parameters)
    for (name, _), got, want in zip(model.named_parameters(), fast, slow, strict=True):
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")


def test_refined_propagation_fast_path_equals_the_reference_path():
    pairs = torch.tensor([[0, 0], [0, 1], [0, 3], [1, 1], [1, 2], [2, 0], [2, 2], [2, 3], [3, 4]])
    graph = InteractionGraph.from_pairs(pairs, 5, 6)  # user 4 and item 5 without edges
    gen = torch.Generator().manual_seed(4)
    layer = RefinedPropagation()
    pattern = graph_pattern(graph)
    for shape in ((), (2,)):
        w = torch.randn(*shape, graph.num_edges, generator=gen, requires_grad=True)
        x = torch.randn(*shape, graph.num_nodes, 3, generator=gen, requires_grad=True)
        fast = layer(x, graph.edge_index, w, pattern=pattern)
        slow = layer(x, graph.edge_index, w)
        torch.testing.assert_close(fast, slow)
        upstream = torch.randn(fast.shape, generator=gen)
        for got, want in zip(torch.autograd.grad(fast, (w, x), upstream), torch.autograd.grad(slow, (w, x), upstream),
                             strict=True):
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="the pattern has"):
        layer(torch.randn(3, 2), graph.edge_index, torch.randn(graph.num_edges), pattern=graph_pattern(graph))
