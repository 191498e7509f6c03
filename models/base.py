"""The shared model interface (docs/extending.md, "A model"): graph in, embeddings out, no hidden state.

Every model in the suite derives from :class:`Recommender`. The trainer owns the loop, the optimiser, early stopping
and checkpoints; the evaluator owns masking and ranking. A model only maps an :class:`InteractionGraph` to user and
item representations, scores them, and says which of its parameters the shared L2 regulariser covers.
"""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from .losses import bpr_loss, ego_l2
from .ops import bpr_pair_scores


class Embeddings(NamedTuple):
    """What ``forward`` returns.

    ``user`` ``[U, d]`` and ``item`` ``[I, d]`` are the final representations that ``score`` compares;
    ``edge_weight`` ``[2E]`` is a learned weight per directed training edge, in the graph's edge order, for models
    that learn one (GRCN's fused affinities, GAT's attention); ``None`` otherwise.
    """

    user: Tensor
    item: Tensor
    edge_weight: Tensor | None = None


class Recommender(torch.nn.Module, abc.ABC):
    """Base class of every recommender in the suite.

    Subclasses take the dataset's :class:`DatasetInfo` and typed keyword options, build their parameters, and
    implement :meth:`forward` (and :meth:`ego_parameters` when their layer-0 parameters are not ``self.user_embedding``
    and ``self.item_embedding``; optionally :meth:`batch_forward`, a training batch's part of the forward). Scoring
    is a dot product and the loss is BPR plus the shared ego-L2 term (docs/protocol.md, "Shared settings") unless a
    model says otherwise.

    Args:
        data: sizes and modality shapes of the dataset.
        embedding_dim: width of the ID embeddings (64 in every experiment).
        num_layers: number of graph layers (2 in every experiment).
    """

    #: Names of parameters that are deliberately never trained (e.g. MMGCN's ``frozen_id`` release behaviour).
    #: The conformance suite checks that every other parameter gets a gradient.
    frozen_parameters: ClassVar[tuple[str, ...]] = ()

    #: Bumped when a change makes the model compute something else with the same options (a new default): the
    #: revision is part of every stored result's identity (when above 0), so results of the old model are never
    #: reused for the new one. Changes that keep the results (speed-ups, refactors) leave it alone.
    revision: ClassVar[int] = 0

    def __init__(self, data: DatasetInfo, *, embedding_dim: int = 64, num_layers: int = 2):
        super().__init__()
        if embedding_dim <= 0 or num_layers < 0:
            raise ValueError(f"embedding_dim must be > 0 and num_layers >= 0, got {embedding_dim}, {num_layers}")
        self.num_users = data.num_users
        self.num_items = data.num_items
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers

    def reset_parameters(self) -> None:
        """Re-initialise every submodule by its own ``reset_parameters``: the outermost one that has it, so a layer's
        chosen initialisation (Xavier) is not overwritten by torch's defaults of the layers inside it.
        Models with parameters of their own (ID embeddings) override this and reset those too."""

        def reset_below(module: torch.nn.Module) -> None:
            for child in module.children():
                if hasattr(child, "reset_parameters"):
                    child.reset_parameters()
                else:  # containers (ModuleList, ModuleDict, Sequential): look inside
                    reset_below(child)

        reset_below(self)

    @abc.abstractmethod
    def forward(self, graph: InteractionGraph) -> Embeddings:
        """Full-graph forward: user and item representations (and learned edge weights, if any)."""

    def batch_forward(self, graph: InteractionGraph, users: Tensor, pos: Tensor, neg: Tensor) -> Embeddings:
        """What one training batch's loss reads: :meth:`forward`'s representations, bit for bit, at the rows of
        ``users`` and of the items ``pos`` and ``neg`` (and edge weights, if any), with the same gradients. The
        default is the full forward; a model may compute only the batch's receptive field (the op
        ``receptive_field``) and leave its other rows zero. The trainer calls this, the evaluator :meth:`forward`."""
        return self(graph)

    def id_columns(self) -> slice:
        """The columns of :meth:`forward`'s representations that hold the learned ID (graph) part, what Figure 4
        draws and all a stored embedding keeps: every column, unless a model concatenates more (GRCN, Eq. 10)."""
        return slice(None)

    def score(self, emb: Embeddings, users: Tensor) -> Tensor:
        """``[B, I]`` preference scores of ``users`` for every item (Eq. 11: a dot product)."""
        return emb.user[users] @ emb.item.t()

    def pair_score(self, emb: Embeddings, users: Tensor, items: Tensor) -> Tensor:
        """``[B]`` scores of the given (user, item) pairs; must agree with :meth:`score`."""
        return (emb.user[users] * emb.item[items]).sum(-1)

    def pair_scores(self, emb: Embeddings, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        """``[B]`` scores of a BPR batch's positive and negative pairs, ``(pair_score(emb, users, pos),
        pair_score(emb, users, neg))`` (Eq. 11; the op ``bpr_pair_scores``). A model that overrides
        :meth:`pair_score` overrides this too."""
        return bpr_pair_scores(emb.user, emb.item, users, pos, neg)

    def ego_parameters(self, users: Tensor, pos: Tensor, neg: Tensor) -> list[Tensor]:
        """The batch's layer-0 parameters that the L2 term covers (default: the rows of the ID embeddings)."""
        return [self.user_embedding[users], self.item_embedding[pos], self.item_embedding[neg]]

    def loss(self, emb: Embeddings, users: Tensor, pos: Tensor, neg: Tensor, reg_weight: float) -> Tensor:
        """Mean BPR over the batch plus ``reg_weight`` times the mean square of the ego parameters (Eq. 13)."""
        pos_scores, neg_scores = self.pair_scores(emb, users, pos, neg)
        return bpr_loss(pos_scores, neg_scores) + reg_weight * self.l2_term(users, pos, neg)

    def l2_term(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """The regulariser that ``reg_weight`` multiplies in :meth:`loss`: by default the shared ego-L2 term, the sum
        of the mean squares of :meth:`ego_parameters`, the same for every model. A model whose released code weights
        the rows differently may offer that as an option by overriding this."""
        return ego_l2(self.ego_parameters(users, pos, neg))

    def extra_repr(self) -> str:
        return f"users={self.num_users}, items={self.num_items}, dim={self.embedding_dim}, layers={self.num_layers}"


def xavier_embedding(num: int, dim: int) -> torch.nn.Parameter:
    """A ``[num, dim]`` parameter with Xavier-uniform initialisation."""
    weight = torch.empty(num, dim)
    torch.nn.init.xavier_uniform_(weight)
    return torch.nn.Parameter(weight)


def bias_column(num_users: int, item_bias: Tensor) -> Tensor:
    r"""``[U + I, 1]``: 1 for each user, then each item's bias :math:`b_i`. Appended to the users' and items'
    representations (users first), it adds :math:`b_i` to every dot-product score:
    :math:`[\mathbf{h}_u \| 1]^\top [\mathbf{h}_i \| b_i] = \mathbf{h}_u^\top \mathbf{h}_i + b_i`."""
    return torch.cat([item_bias.new_ones(num_users), item_bias]).unsqueeze(1)
