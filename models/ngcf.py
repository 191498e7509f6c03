r"""NGCF: neural graph collaborative filtering, a baseline of Table 2 (docs/protocol.md, "Baselines").

Wang, He, Wang, Feng and Chua, "Neural Graph Collaborative Filtering", SIGIR 2019
(https://arxiv.org/abs/1905.08108, https://doi.org/10.1145/3331184.3331267).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings
from .baseline import GraphBaseline
from .layers.ngcf import BiInteractionConv, symmetric_norm
from .ops import graph_pattern


@register_model("ngcf")
class NGCF(GraphBaseline):
    r"""NGCF with item content as input.

    Layer 0 is :math:`\mathbf{e}^{(0)}_u = \mathbf{E}_u` for users and
    :math:`\mathbf{e}^{(0)}_i = \mathbf{E}_i + \mathbf{W}_c \mathbf{x}_i` for items (the shared content input,
    docs/protocol.md, "Shared settings"). Each layer is NGCF's bi-interaction propagation (Eqs. 3-4,
    :class:`~.layers.ngcf.BiInteractionConv`):

    .. math::
        \mathbf{e}^{(l)}_u = \operatorname{LeakyReLU}\Big(\mathbf{W}^{(l)}_1 \mathbf{e}^{(l-1)}_u
            + \sum_{i \in \mathcal{N}_u} \frac{1}{\sqrt{|\mathcal{N}_u||\mathcal{N}_i|}}
            \big(\mathbf{W}^{(l)}_1 \mathbf{e}^{(l-1)}_i
            + \mathbf{W}^{(l)}_2 (\mathbf{e}^{(l-1)}_i \odot \mathbf{e}^{(l-1)}_u)\big)\Big)

    Readout (Eq. 9) and prediction (Eq. 10): :math:`\mathbf{e}^*_u = \mathbf{e}^{(0)}_u \| \cdots \|
    \mathbf{e}^{(L)}_u` (192-d for 2 layers of 64), :math:`\hat{y}_{ui} = {\mathbf{e}^*_u}^\top \mathbf{e}^*_i`.

    Choices, documented: message dropout (Section 2.4.2) drops entries of each layer's output, i.e. of the messages
    that layer sends on, with probability ``message_dropout`` during training only, as the authors' release does.
    The paper states no per-layer normalisation; the release L2-normalises each layer's output before the
    concatenation (it propagates the unnormalised one): ``normalize_layers=True`` reproduces that. Node dropout, an
    option of the paper that its reported runs use sparingly, is not implemented. Normalisation factors come from
    ``graph.degree()`` at every forward.

    Args:
        data: dataset sizes and modality shapes.
        embedding_dim: ID-embedding and layer width (64).
        num_layers: propagation layers (2).
        use_features: add the projected item content to the items' layer-0 vectors; a dataset without
            modalities gives the ID-only model either way.
        message_dropout: dropout probability on each layer's output during training (0.1).
        normalize_layers: L2-normalise each layer's output in the readout (the release's behaviour; default off).
        negative_slope: LeakyReLU slope (0.2).

    Shapes:
        - **input:** an :class:`InteractionGraph`.
        - **output:** :class:`Embeddings` with ``user [U, (L+1)d]`` and ``item [I, (L+1)d]``, no edge weights.
    """

    def __init__(
        self,
        data: DatasetInfo,
        *,
        embedding_dim: int = 64,
        num_layers: int = 2,
        use_features: bool = True,
        message_dropout: float = 0.1,
        normalize_layers: bool = False,
        negative_slope: float = 0.2,
    ):
        if not 0.0 <= message_dropout < 1.0:
            raise ValueError(f"message_dropout must be in [0, 1), got {message_dropout}")
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers, use_features=use_features)
        self.message_dropout = message_dropout
        self.normalize_layers = normalize_layers
        self.convs = torch.nn.ModuleList(
            BiInteractionConv(embedding_dim, embedding_dim, negative_slope=negative_slope) for _ in range(num_layers)
        )

    def forward(self, graph: InteractionGraph) -> Embeddings:
        x = self.layer0(graph)
        norm = symmetric_norm(graph.edge_index, graph.degree())
        pattern = graph_pattern(graph)
        layers = [x]
        for conv in self.convs:
            x = conv(x, graph.edge_index, norm, pattern=pattern)
            x = F.dropout(x, p=self.message_dropout, training=self.training)
            layers.append(F.normalize(x, dim=-1) if self.normalize_layers else x)
        return self.split(torch.cat(layers, dim=-1))

    def extra_repr(self) -> str:
        options = f"message_dropout={self.message_dropout}, normalize_layers={self.normalize_layers}"
        return f"{super().extra_repr()}, {options}"
