r"""GAT on the user-item graph, a baseline of Table 2 (docs/protocol.md, "Baselines").

Veličković, Cucurull, Casanova, Romero, Liò and Bengio, "Graph Attention Networks", ICLR 2018
(https://arxiv.org/abs/1710.10903).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings
from .baseline import GraphBaseline
from .layers.edge_ops import CSRGATConv


def with_self_loops(edge_index: Tensor, num_nodes: int) -> Tensor:
    """``[2, E + N]``: the graph's edges in their order, then one self-loop per node (node ``n`` at ``E + n``)."""
    loops = torch.arange(num_nodes, device=edge_index.device).expand(2, num_nodes)
    return torch.cat([edge_index, loops], dim=1)


@register_model("gat")
class GAT(GraphBaseline):
    r"""GAT with item content as input; its attention coefficients are its learned edge weights (docs/protocol.md,
    "Noise robustness").

    Layer 0 is :math:`\mathbf{h}^{(0)}_u = \mathbf{E}_u` for users and :math:`\mathbf{h}^{(0)}_i = \mathbf{E}_i +
    \mathbf{W}_c \mathbf{x}_i` for items (docs/protocol.md, "Shared settings"). Each layer is PyG's
    :class:`~torch_geometric.nn.GATConv` (the paper's Eqs. 1-5):

    .. math::
        \alpha^{k}_{vj} = \operatorname{softmax}_{j \in \mathcal{N}(v) \cup \{v\}}\Big(\operatorname{LeakyReLU}_{0.2}
            \big({\mathbf{a}^k}^\top [\mathbf{W}^k \mathbf{h}_v \,\|\, \mathbf{W}^k \mathbf{h}_j]\big)\Big), \qquad
        \mathbf{h}'_v = \big\Vert_{k=1}^{H} \sum_{j \in \mathcal{N}(v) \cup \{v\}} \alpha^{k}_{vj}
            \mathbf{W}^k \mathbf{h}_j + \mathbf{b}

    Hidden layers have ``heads`` heads of ``embedding_dim / heads`` channels, concatenated (8 x 8 = 64), followed by
    an ELU (the paper's Section 3.3); the last layer has one head of ``embedding_dim`` channels (64). Readout: the last
    layer, :math:`\hat{y}_{ui} = {\mathbf{h}^{(L)}_u}^\top \mathbf{h}^{(L)}_i`.

    Choices, documented:

    - Self-loops: the paper's neighbourhood includes the node itself. They are appended after the graph's edges
      here (PyG's own insertion is turned off), so the first ``2E`` coefficients are in the graph's edge order.
    - ``Embeddings.edge_weight`` ``[2E]`` is the last layer's :math:`\alpha_{vj}` of every training edge
      :math:`j \to v`, averaged over heads (one head by default), self-loop coefficients dropped. So over each node's
      incoming training edges the weights sum to one minus that node's self-loop coefficient. Not detached.
    - ``attention_dropout`` (the paper uses 0.6 for citation graphs) is 0 by default, like the other baselines.
    - Speed: the layers are :class:`~.layers.edge_ops.CSRGATConv`, PyG's ``GATConv`` (same parameters and state
      dict) called with the graph, which stands for ``with_self_loops(graph.edge_index, N)``: the same operations
      on the same values, with the softmax over CSR segments and the weighted sums as sparse products instead of
      ``[E + N, H, C]`` gathers and scatters (at Tiktok scale 2-3x faster per batch and half the peak memory).
      Values can differ from PyG's forward in float round-off only; a test compares both.

    Args:
        data: dataset sizes and modality shapes.
        embedding_dim: ID-embedding and layer width (64).
        num_layers: attention layers (2).
        use_features: add the projected item content to the items' layer-0 vectors; a dataset without
            modalities gives the ID-only model either way.
        heads: attention heads of the hidden layers (8); ``embedding_dim`` must be a multiple of it.
        attention_dropout: dropout on the attention coefficients during training (0).
        negative_slope: LeakyReLU slope of the attention logits (0.2).

    Shapes:
        - **input:** an :class:`InteractionGraph`.
        - **output:** :class:`Embeddings` with ``user [U, d]``, ``item [I, d]``, ``edge_weight [2E]``.
    """

    def __init__(
        self,
        data: DatasetInfo,
        *,
        embedding_dim: int = 64,
        num_layers: int = 2,
        use_features: bool = True,
        heads: int = 8,
        attention_dropout: float = 0.0,
        negative_slope: float = 0.2,
    ):
        if heads < 1 or embedding_dim % heads:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be a multiple of heads ({heads})")
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers, use_features=use_features)
        self.heads = heads
        options = dict(negative_slope=negative_slope, dropout=attention_dropout, add_self_loops=False)
        self.convs = torch.nn.ModuleList(
            CSRGATConv(embedding_dim, embedding_dim // heads, heads=heads, concat=True, **options)
            if layer < num_layers - 1
            else CSRGATConv(embedding_dim, embedding_dim, heads=1, concat=False, **options)
            for layer in range(num_layers)
        )

    def forward(self, graph: InteractionGraph) -> Embeddings:
        x = self.layer0(graph)
        edge_weight = None
        for layer, conv in enumerate(self.convs):
            # The graph stands for its edges plus one self-loop per node (with_self_loops), over CSR (see above).
            if layer < self.num_layers - 1:
                x = F.elu(conv(x, graph))
            else:
                x, alpha = conv(x, graph, return_attention_weights=True)
                edge_weight = alpha.mean(dim=-1)
        return self.split(x, edge_weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}"
