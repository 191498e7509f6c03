"""The edge-weight ROC-AUC of the robustness experiment (docs/protocol.md, "Noise robustness"), on a graph whose AUCs
are counted by hand."""

import pytest
import torch

from grcn_bench.benchmarks.runner import edge_weight_auc
from grcn_bench.datasets.base import InteractionGraph

# User 0 has items 0, 1; user 1 has items 0, 1, 2, 3. Pairs 1 and 5 are the planted false positives.
PAIRS = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
NOISE = torch.tensor([False, True, False, False, False, True])
# Softmax-like weights: each user's weights on its items sum to 1, each item's on its users too.
USER_SIDE = [0.6, 0.4, 0.3, 0.3, 0.3, 0.1]
ITEM_SIDE = [0.5, 0.5, 0.5, 0.5, 1.0, 1.0]


def directed_weights(graph: InteractionGraph) -> torch.Tensor:
    weight = torch.empty(graph.num_edges, dtype=torch.float64)
    for e in range(graph.num_edges):
        pair, into_user = int(graph.edge_pair[e]), int(graph.edge_index[1, e]) < graph.num_users
        weight[e] = USER_SIDE[pair] if into_user else ITEM_SIDE[pair]
    return weight


def test_edge_weight_auc_matches_hand_counts():
    graph = InteractionGraph.from_pairs(torch.tensor(PAIRS), 2, 4)
    auc = edge_weight_auc(graph, directed_weights(graph), NOISE)
    # AUC = P(a noise pair scores lower than a true pair), ties 1/2; 2 noise x 4 true = 8 comparisons.
    # Raw user side: 0.4 is below 0.6 only (1), 0.1 below all four (4): 5/8. The 1/degree scale hides user 1's
    # clean separation (0.3 vs 0.1) behind user 0's larger weights.
    assert auc["user_side"] == pytest.approx(5 / 8)
    # Raw item side: 0.5 ties three 0.5s and is below 1.0 (2.5); 1.0 ties one 1.0 (0.5): 3/8.
    assert auc["item_side"] == pytest.approx(3 / 8)
    # Sum: true pairs 1.1, 0.8, 0.8, 1.3, noise 0.9 (below 1.1 and 1.3: 2) and 1.1 (tie 0.5, below 1.3: 1): 3.5/8.
    assert auc["mean"] == pytest.approx(3.5 / 8)
    # Relative to uniform (x degree): user 0 gives 1.2 / 0.8, user 1 gives 1.2 x3 / 0.4: separated, 1.0.
    assert auc["user_side_relative"] == pytest.approx(1.0)
    # Every item weight is exactly uniform over its users: no information, 0.5.
    assert auc["item_side_relative"] == pytest.approx(0.5)
    assert auc["relative"] == pytest.approx(1.0)


def test_edge_weight_auc_needs_both_classes():
    graph = InteractionGraph.from_pairs(torch.tensor(PAIRS), 2, 4)
    weight = directed_weights(graph)
    assert edge_weight_auc(graph, weight, torch.zeros(6, dtype=torch.bool)) is None
    assert edge_weight_auc(graph, weight, torch.ones(6, dtype=torch.bool)) is None
