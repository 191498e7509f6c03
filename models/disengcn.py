r"""DisenGCN: disentangled graph convolution, a baseline of Table 2 (SPEC §2.3).

Ma, Cui, Kuang, Wu and Zhu, "Disentangled Graph Convolutional Networks", ICML 2019
(http://proceedings.mlr.press/v97/ma19a.html).
"""

from __future__ import annotations

import torch
from torch import Tensor

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings, Recommender, xavier_embedding
from .layers.content import ItemContentInput, node_inputs
from .layers.dense import rows_apply
from .layers.disen import NeighRoutingConv
from .layers.field import receptive_field
from .layers.native import native_kernels
from .layers.sparse import graph_pattern


@register_model("disengcn")
class DisenGCN(Recommender):
    r"""DisenGCN on the user-item graph with item content as input (SPEC §2.1, §2.3).

    Layer 0 is :math:`\mathbf{x}_u = \mathbf{E}_u` for users and :math:`\mathbf{x}_i = \mathbf{E}_i +
    \mathbf{W}_c \mathbf{x}_i^{content}` for items (SPEC §2.1). Each of the ``num_layers`` layers is a DisenConv
    (Algorithm 1, :class:`~.layers.disen.NeighRoutingConv`) with its own projection, over every neighbour:

    .. math::
        \mathbf{z}_{j,k} = \operatorname{normalize}(\operatorname{ReLU}(\mathbf{W}_k^\top \mathbf{y}^{(l-1)}_j
            + \mathbf{b}_k)), \quad
        p_{j,k} = \operatorname{softmax}_k(\mathbf{z}_{j,k}^\top \mathbf{c}_{u,k} / \tau), \quad
        \mathbf{c}_{u,k} = \operatorname{normalize}\Big(\mathbf{z}_{u,k} + \sum_{j \in \mathcal{N}(u)}
            p_{j,k} \mathbf{z}_{j,k}\Big)

    with ``routing_iterations`` updates of :math:`p` and :math:`\mathbf{c}`, and
    :math:`\mathbf{y}^{(l)}_u = \mathbf{c}_{u,1} \| \cdots \| \mathbf{c}_{u,K}`.

    Readout: the last layer, :math:`\mathbf{h}_u = \mathbf{y}^{(L)}_u` (``K`` unit-norm channels, 64-d by default);
    prediction :math:`\hat{y}_{ui} = \mathbf{h}_u^\top \mathbf{h}_i`. The paper's node-classification head and its
    dropout between layers are not used (no dropout here, like the other baselines).

    Args:
        data: dataset sizes and modality shapes.
        embedding_dim: ID-embedding width and layer width ``K * channel_dim`` (64).
        num_layers: DisenConv layers (2).
        use_features: add the projected item content to the items' layer-0 vectors (SPEC §2.1); a dataset without
            modalities gives the ID-only model either way.
        num_channels: :math:`K`, the number of channels (4); ``embedding_dim`` must be a multiple of it.
        routing_iterations: neighbourhood-routing iterations per layer (3).
        tau: routing softmax temperature (1).

    Shapes:
        - **input:** an :class:`InteractionGraph`.
        - **output:** :class:`Embeddings` with ``user [U, d]`` and ``item [I, d]``, no edge weights.
    """

    def __init__(
        self,
        data: DatasetInfo,
        *,
        embedding_dim: int = 64,
        num_layers: int = 2,
        use_features: bool = True,
        num_channels: int = 4,
        routing_iterations: int = 3,
        tau: float = 1.0,
    ):
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers)
        if num_channels < 1 or embedding_dim % num_channels:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be a multiple of num_channels ({num_channels})")
        self.num_channels = num_channels
        self.routing_iterations = routing_iterations
        self.user_embedding = xavier_embedding(data.num_users, embedding_dim)
        self.item_embedding = xavier_embedding(data.num_items, embedding_dim)
        self.content = ItemContentInput(data, embedding_dim) if use_features and data.modalities else None
        self.convs = torch.nn.ModuleList(
            NeighRoutingConv(
                embedding_dim,
                num_channels,
                embedding_dim // num_channels,
                iterations=routing_iterations,
                tau=tau,
            )
            for _ in range(num_layers)
        )

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.user_embedding)
        torch.nn.init.xavier_uniform_(self.item_embedding)
        if self.content is not None:
            self.content.reset_parameters()
        for conv in self.convs:
            conv.reset_parameters()

    def forward(self, graph: InteractionGraph) -> Embeddings:
        x = node_inputs(self.user_embedding, self.item_embedding, self.content, graph)
        pattern = graph_pattern(graph)
        for conv in self.convs:
            x = conv(x, graph.edge_index, pattern=pattern)
        return Embeddings(*x.split([self.num_users, self.num_items]))

    def batch_forward(self, graph: InteractionGraph, users: Tensor, pos: Tensor, neg: Tensor) -> Embeddings:
        """:meth:`forward`'s representations at the batch's users and items and the same gradients, bit for bit,
        with the routing layers computed over the batch's receptive field only (:mod:`.layers.field`; zero rows
        elsewhere). The layer-0 inputs are computed whole. Where the compiled products do not run (or the layer
        widths do not suit them), the full :meth:`forward`."""
        if native_kernels() is None or not all(rows_apply(conv.lin.weight, graph.num_nodes) for conv in self.convs):
            return self(graph)
        field = receptive_field(graph, torch.cat([users, pos + self.num_users, neg + self.num_users]), self.num_layers)
        x = node_inputs(self.user_embedding, self.item_embedding, self.content, graph).index_select(0, field.nodes[0])
        for layer, conv in enumerate(self.convs, start=1):
            x = conv(x, graph.edge_index, field=field.layer(layer))
        full = x.new_zeros(graph.num_nodes, x.size(1)).index_copy_(0, field.nodes[-1], x)
        return Embeddings(*full.split([self.num_users, self.num_items]))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, features={self.content is not None}, channels={self.num_channels}, "
            f"routing_iterations={self.routing_iterations}"
        )
