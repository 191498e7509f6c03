"""BPR matrix factorisation: the reference model that exercises the benchmark core.

Rendle, Freudenthaler, Gantner and Schmidt-Thieme, "BPR: Bayesian Personalized Ranking from Implicit Feedback",
UAI 2009 (https://arxiv.org/abs/1205.2618). Not a row of the paper's tables; it stays as an extra row in reports.
"""

from __future__ import annotations

import torch

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings, Recommender, xavier_embedding


@register_model("mf")
class MF(Recommender):
    r"""Matrix factorisation trained with BPR.

    .. math::
        \hat{y}_{ui} = \mathbf{e}_u^\top \mathbf{e}_i

    The graph is not used: each user and item is its ID embedding, and the shared BPR + ego-L2 loss trains them.

    Args:
        data: dataset sizes (features are ignored).
        embedding_dim: width of the ID embeddings (default 64).

    Shapes:
        - **input:** an :class:`InteractionGraph` (only its sizes are read).
        - **output:** :class:`Embeddings` with ``user [U, d]`` and ``item [I, d]``.
    """

    def __init__(self, data: DatasetInfo, *, embedding_dim: int = 64, num_layers: int = 0):
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers)
        self.user_embedding = xavier_embedding(data.num_users, embedding_dim)
        self.item_embedding = xavier_embedding(data.num_items, embedding_dim)

    def reset_parameters(self) -> None:
        for weight in (self.user_embedding, self.item_embedding):
            torch.nn.init.xavier_uniform_(weight)

    def forward(self, graph: InteractionGraph) -> Embeddings:
        return Embeddings(self.user_embedding, self.item_embedding)
