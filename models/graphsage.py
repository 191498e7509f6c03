r"""GraphSAGE on the user-item graph, a baseline of Table 2 (docs/protocol.md, "Baselines").

Hamilton, Ying and Leskovec, "Inductive Representation Learning on Large Graphs", NeurIPS 2017
(https://arxiv.org/abs/1706.02216).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings, Recommender, xavier_embedding
from .layers.content import ItemContentInput, node_inputs, reset_xavier
from .layers.edge_ops import CSRSAGEConv


@register_model("graphsage")
class GraphSAGE(Recommender):
    r"""GraphSAGE with the mean aggregator, full neighbourhoods (no sampling).

    Layer 0 is :math:`\mathbf{h}^{(0)}_u = \mathbf{E}_u` for users and :math:`\mathbf{h}^{(0)}_i = \mathbf{E}_i +
    \mathbf{W}_c \mathbf{x}_i` for items (docs/protocol.md, "Shared settings"). Each layer is PyG's
    :class:`~torch_geometric.nn.SAGEConv` with the mean aggregator and a root weight, i.e. the paper's Algorithm 1 (line
    5, "concat" of self and neighbourhood, then one linear map) with the mean aggregator:

    .. math::
        \mathbf{h}^{(l)}_v = \mathbf{W}^{(l)}_{1} \frac{1}{|\mathcal{N}(v)|} \sum_{j \in \mathcal{N}(v)}
            \mathbf{h}^{(l-1)}_j + \mathbf{W}^{(l)}_{2} \mathbf{h}^{(l-1)}_v + \mathbf{b}^{(l)}

    with a leaky ReLU (slope 0.01) between layers and none after the last. Readout: the last layer,
    :math:`\hat{y}_{ui} = {\mathbf{h}^{(L)}_u}^\top \mathbf{h}^{(L)}_i`.

    Choices, documented: the paper L2-normalises every layer's output (Algorithm 1, line 7); that is the option
    ``normalize=True``, off by default because unit-norm outputs bound the dot-product scores to [-1, 1], which
    slows BPR training. Weights are re-initialised Xavier-uniform, as in every model, rather than PyG's default.

    Speed, documented: the layers are :class:`~.layers.edge_ops.CSRSAGEConv`, PyG's ``SAGEConv`` (same
    parameters and state dict) called with the graph: the neighbour mean is a CSR product whose backward reuses the
    graph's transpose structure, where ``SAGEConv`` on a CSR ``adj_t`` has torch's native backward, which rebuilds
    the transposed matrix at every call. The output is bit for bit the same; a test compares both paths.

    Args:
        data: dataset sizes and modality shapes.
        embedding_dim: ID-embedding and layer width (64).
        num_layers: SAGE layers (2).
        use_features: add the projected item content to the items' layer-0 vectors; a dataset without
            modalities gives the ID-only model either way.
        normalize: L2-normalise each layer's output (the paper's Algorithm 1, line 7).
        negative_slope: slope of the leaky ReLU between layers (0.01).

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
        normalize: bool = False,
        negative_slope: float = 0.01,
    ):
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers)
        self.normalize = normalize
        self.negative_slope = negative_slope
        self.user_embedding = xavier_embedding(data.num_users, embedding_dim)
        self.item_embedding = xavier_embedding(data.num_items, embedding_dim)
        self.content = ItemContentInput(data, embedding_dim) if use_features and data.modalities else None
        self.convs = torch.nn.ModuleList(
            CSRSAGEConv(embedding_dim, embedding_dim, aggr="mean", root_weight=True, normalize=normalize)
            for _ in range(num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.user_embedding)
        torch.nn.init.xavier_uniform_(self.item_embedding)
        if self.content is not None:
            self.content.reset_parameters()
        for conv in self.convs:
            conv.reset_parameters()  # the aggregation module; then the suite's initialisation for the weights
            reset_xavier(conv.lin_l)
            reset_xavier(conv.lin_r)

    def forward(self, graph: InteractionGraph) -> Embeddings:
        x = node_inputs(self.user_embedding, self.item_embedding, self.content, graph)
        for layer, conv in enumerate(self.convs):
            x = conv(x, graph)  # the mean over the graph's CSR structure (see above)
            if layer < self.num_layers - 1:
                x = F.leaky_relu(x, self.negative_slope)
        return Embeddings(*x.split([self.num_users, self.num_items]))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, features={self.content is not None}, normalize={self.normalize}"
