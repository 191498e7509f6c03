"""Reference rankings that need no training: the floor every trained model must clear."""

from __future__ import annotations

import torch

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph, RecDataset
from grcn_bench.models.base import Embeddings, Recommender

from .evaluator import EvalResult, evaluate


class PopularityRanking(Recommender):
    r"""Rank items by their number of training interactions: :math:`\hat{y}_{ui} = |N(i)|` for every user.

    Ties are broken towards the lower item id (a fraction below 1 subtracted in float64), so the ranking does not
    depend on ``torch.topk``'s unspecified tie order. Not registered (it has nothing to train); used as the
    reference row "Popularity" and by tests.
    """

    def __init__(self, data: DatasetInfo):
        super().__init__(data, embedding_dim=1, num_layers=0)

    def forward(self, graph: InteractionGraph) -> Embeddings:
        item_degree = graph.degree()[graph.num_users :].to(torch.float64)
        item_ids = torch.arange(graph.num_items, dtype=torch.float64, device=item_degree.device)
        tie_break = item_ids / (graph.num_items + 1)
        return Embeddings(item_degree.new_ones(graph.num_users, 1), (item_degree - tie_break).unsqueeze(1))


def popularity_result(
    dataset: RecDataset, split: str = "test", *, ks=(10, 20), protocol: str = "standard"
) -> EvalResult:
    """Metrics of the popularity ranking on a split, under the same masking as every model."""
    model = PopularityRanking(dataset.info())
    return evaluate(model, dataset, split, ks=ks, protocol=protocol)
