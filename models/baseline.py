"""What the GCN baselines share (GraphSAGE, NGCF, DisenGCN, GAT; docs/protocol.md, "Baselines"), written once: their
layer-0 input and their output.

- **Input:** ID embeddings for users and items (Xavier-initialised), and for items, optionally, their projected
  content (:class:`~.layers.content.ItemContentInput`: each modality's features mapped to the embedding width and
  added to the item's ID embedding). ``use_features=False``, or a dataset without modalities, gives the ID-only model.
- **Output:** the last stack of node vectors split into users and items.

Each baseline subclasses :class:`GraphBaseline`, builds its own layers in ``self.convs``, and writes its paper's
propagation in ``forward``. No model is registered here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from .base import Embeddings, Recommender, xavier_embedding
from .layers.content import ItemContentInput, node_inputs


class GraphBaseline(Recommender):
    """A baseline over the interaction graph whose layer-0 input is ID embeddings plus optional item content.

    Args:
        data: dataset sizes and modality shapes.
        embedding_dim: ID-embedding width (64).
        num_layers: propagation layers (2).
        use_features: add the projected item content to the items' layer-0 vectors.

    Subclasses set ``self.convs`` (a :class:`torch.nn.ModuleList`) after calling ``super().__init__``; the
    parameters are created in the order ID embeddings, content, layers, so every model draws the same random numbers
    as when it built them itself.
    """

    convs: torch.nn.ModuleList

    def __init__(self, data: DatasetInfo, *, embedding_dim: int = 64, num_layers: int = 2, use_features: bool = True):
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers)
        self.user_embedding = xavier_embedding(data.num_users, embedding_dim)
        self.item_embedding = xavier_embedding(data.num_items, embedding_dim)
        self.content = ItemContentInput(data, embedding_dim) if use_features and data.modalities else None

    def reset_parameters(self) -> None:
        """Xavier-uniform ID embeddings, the content projection's own initialisation, then each layer's
        (:meth:`reset_layer`)."""
        torch.nn.init.xavier_uniform_(self.user_embedding)
        torch.nn.init.xavier_uniform_(self.item_embedding)
        if self.content is not None:
            self.content.reset_parameters()
        for conv in self.convs:
            self.reset_layer(conv)

    def reset_layer(self, conv: torch.nn.Module) -> None:
        """One layer's initialisation: its own ``reset_parameters`` (override to change it)."""
        conv.reset_parameters()

    def layer0(self, graph: InteractionGraph) -> Tensor:
        """``[U + I, d]`` layer-0 node vectors in graph order: users' ID embeddings, then items' ID embeddings plus
        their projected content."""
        return node_inputs(self.user_embedding, self.item_embedding, self.content, graph)

    def split(self, x: Tensor, edge_weight: Tensor | None = None) -> Embeddings:
        """The model's output from ``[U + I, d']`` node vectors (users first, as in the graph)."""
        return Embeddings(*x.split([self.num_users, self.num_items]), edge_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, features={self.content is not None}"
