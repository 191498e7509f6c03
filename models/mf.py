"""BPR matrix factorisation: the reference model that exercises the benchmark core.

Rendle, Freudenthaler, Gantner and Schmidt-Thieme, "BPR: Bayesian Personalized Ranking from Implicit Feedback",
UAI 2009 (https://arxiv.org/abs/1205.2618). Not a row of the paper's tables; it stays as an extra row in reports.
"""

from __future__ import annotations

import torch

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings, Recommender, bias_column, xavier_embedding


@register_model("mf")
class MF(Recommender):
    r"""Matrix factorisation trained with BPR.

    .. math::
        \hat{y}_{ui} = \mathbf{e}_u^\top \mathbf{e}_i \quad\text{or, with } \texttt{item\_bias}, \quad
        \hat{y}_{ui} = \mathbf{e}_u^\top \mathbf{e}_i + b_i

    The graph is not used: each user and item is its ID embedding, and the shared BPR + ego-L2 loss trains them.
    The item bias (off by default) is the control for DisenGCN's (``docs/disengcn.md``): a learned popularity term
    per item, folded into the representations as one more column (:func:`~.base.bias_column`), starting at zero and
    not in the L2 term.

    Args:
        data: dataset sizes (features are ignored).
        embedding_dim: width of the ID embeddings (default 64).
        item_bias: add a learned bias per item to the score (default ``False``).

    Shapes:
        - **input:** an :class:`InteractionGraph` (only its sizes are read).
        - **output:** :class:`Embeddings` with ``user [U, d]`` and ``item [I, d]`` (``d + 1`` with ``item_bias``).
    """

    def __init__(self, data: DatasetInfo, *, embedding_dim: int = 64, num_layers: int = 0, item_bias: bool = False):
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers)
        self.user_embedding = xavier_embedding(data.num_users, embedding_dim)
        self.item_embedding = xavier_embedding(data.num_items, embedding_dim)
        self.item_bias = torch.nn.Parameter(torch.zeros(data.num_items)) if item_bias else None

    def reset_parameters(self) -> None:
        for weight in (self.user_embedding, self.item_embedding):
            torch.nn.init.xavier_uniform_(weight)
        if self.item_bias is not None:
            torch.nn.init.zeros_(self.item_bias)

    def forward(self, graph: InteractionGraph) -> Embeddings:
        if self.item_bias is None:
            return Embeddings(self.user_embedding, self.item_embedding)
        column = bias_column(self.num_users, self.item_bias)
        return Embeddings(torch.cat([self.user_embedding, column[: self.num_users]], dim=1),
                          torch.cat([self.item_embedding, column[self.num_users :]], dim=1))

    def id_columns(self) -> slice:
        """Every column but the bias column."""
        return slice(0, -1) if self.item_bias is not None else slice(None)
