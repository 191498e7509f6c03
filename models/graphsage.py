r"""GraphSAGE on the user-item graph, a baseline of Table 2 (docs/protocol.md, "Baselines").

Hamilton, Ying and Leskovec, "Inductive Representation Learning on Large Graphs", NeurIPS 2017
(https://arxiv.org/abs/1706.02216).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings
from .baseline import GraphBaseline
from .layers.content import reset_xavier
from .layers.edge_ops import CSRSAGEConv


@register_model("graphsage")
class GraphSAGE(GraphBaseline):
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
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers, use_features=use_features)
        self.normalize = normalize
        self.negative_slope = negative_slope
        self.convs = torch.nn.ModuleList(
            CSRSAGEConv(embedding_dim, embedding_dim, aggr="mean", root_weight=True, normalize=normalize)
            for _ in range(num_layers)
        )
        self.reset_parameters()

    def reset_layer(self, conv: torch.nn.Module) -> None:
        conv.reset_parameters()  # the aggregation module; then the suite's initialisation for the weights
        reset_xavier(conv.lin_l)
        reset_xavier(conv.lin_r)

    def forward(self, graph: InteractionGraph) -> Embeddings:
        x = self.layer0(graph)
        for layer, conv in enumerate(self.convs):
            x = conv(x, graph)  # the mean over the graph's CSR structure (see above)
            if layer < self.num_layers - 1:
                x = F.leaky_relu(x, self.negative_slope)
        return self.split(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}"
