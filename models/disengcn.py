r"""DisenGCN: disentangled graph convolution, a baseline of Table 2.

Ma, Cui, Kuang, Wang and Zhu, "Disentangled Graph Convolutional Networks", ICML 2019
(http://proceedings.mlr.press/v97/ma19a.html). What was measured and changed for recommendation:
``docs/disengcn.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings, bias_column
from .baseline import GraphBaseline
from .layers.disen import NeighRoutingConv
from .ops import graph_pattern, receptive_field, rows_apply

#: How the user and item representations are read out of the layer outputs :math:`\mathbf{y}^{(0)}, \dots,
#: \mathbf{y}^{(L)}`: the last layer (the paper's), or the sum, mean or concatenation of all of them.
READOUTS = ("last", "sum", "mean", "concat")


@register_model("disengcn")
class DisenGCN(GraphBaseline):
    r"""DisenGCN on the user-item graph with item content as input.

    Layer 0 is :math:`\mathbf{y}^{(0)}_u = \mathbf{E}_u` for users and :math:`\mathbf{y}^{(0)}_i = \mathbf{E}_i +
    \mathbf{W}_c \mathbf{x}_i^{content}` for items. Each of the ``num_layers`` layers is a DisenConv (the paper's
    Algorithm 1, :class:`~.layers.disen.NeighRoutingConv`) with its own projection, over every neighbour:

    .. math::
        \mathbf{z}_{j,k} = \frac{\sigma(\mathbf{W}_k^\top \mathbf{y}^{(l-1)}_j + \mathbf{b}_k)}
            {\lVert \sigma(\mathbf{W}_k^\top \mathbf{y}^{(l-1)}_j + \mathbf{b}_k) \rVert_2}, \quad
        p_{j,k} = \operatorname{softmax}_k(\mathbf{z}_{j,k}^\top \mathbf{c}_{u,k} / \tau), \quad
        \mathbf{c}_{u,k} = \operatorname{normalize}\Big(\mathbf{z}_{u,k} + \sum_{j \in \mathcal{N}(u)}
            p_{j,k} \mathbf{z}_{j,k}\Big)

    (Algorithm 1: the projection before the loop, then ``routing_iterations`` updates of :math:`p` and
    :math:`\mathbf{c}`), and :math:`\mathbf{y}^{(l)}_u = \mathbf{c}_{u,1} \| \cdots \| \mathbf{c}_{u,K}`.

    **Adaptation for recommendation: the channel activation** :math:`\sigma`. The paper writes the projection of
    Algorithm 1 with a nonlinearity :math:`\sigma` and runs it with ReLU (``activation="relu"``). With ReLU, every
    channel of every node is a unit vector in the non-negative orthant, so two nodes' channels can never point apart:
    every dot-product score is in :math:`[0, K]` and a user cannot be represented as *unlike* an item. As a BPR ranker
    that measured far below BPR-MF (test Recall@10 0.127 against 0.161 on ``synthetic:tiktok``), and neither a wider
    score range (a learned output scale, an unnormalised last layer) nor the layer readouts below recovered it; a
    sign-preserving :math:`\sigma` did (``docs/disengcn.md``). The default is :math:`\sigma = \tanh`: a
    nonlinearity where the paper has one, with signed channels. ``"none"`` (no nonlinearity, as DGCF, Wang et al.,
    SIGIR 2020, propagates its intent channels) and ``"leaky_relu"`` (slope 0.2) are options.

    Readout (``readout``): ``"last"`` (default, the paper's: the last layer feeds the output),
    :math:`\mathbf{h}_u = \mathbf{y}^{(L)}_u`; or, over layers :math:`0..L` as NGCF and LightGCN read out,
    ``"sum"`` :math:`\sum_l \mathbf{y}^{(l)}_u`, ``"mean"`` (that sum over :math:`L+1`) or ``"concat"``
    :math:`\mathbf{y}^{(0)}_u \| \cdots \| \mathbf{y}^{(L)}_u` (``(L + 1) d`` wide). Prediction
    :math:`\hat{y}_{ui} = \mathbf{h}_u^\top \mathbf{h}_i`. The paper's node-classification head (a fully-connected
    output layer and softmax) and its dropout between layers are not used (no dropout here, like the other
    baselines; a fully-connected layer on the readout measured worse as a ranker). ``activation="relu",
    readout="last", item_bias=False`` is the model as the paper ran it.

    **Adaptation for recommendation: an item bias** (``item_bias``, default on). Every channel is unit-norm, so with
    the last-layer readout every node's representation has the same norm :math:`\sqrt{K}`. The other baselines'
    item vectors are free in norm, and a popular item can score higher for every user through it; here it cannot,
    and on a sparse real dataset with a skewed item popularity DisenGCN stayed below the popularity ranking
    (``docs/disengcn.md``). A learned scalar per item gives that freedom back in the score, and only there:

    .. math::
        \hat{y}_{ui} = \mathbf{h}_u^\top \mathbf{h}_i + b_i,

    written as one dot product of the returned representations :math:`[\mathbf{h}_u \| 1]` and
    :math:`[\mathbf{h}_i \| b_i]`, so that every scorer and the evaluator need nothing else. The biases start at
    zero and are not in the L2 term, which covers the ego embeddings as for every model.

    Args:
        data: dataset sizes and modality shapes.
        embedding_dim: ID-embedding width and layer width ``K * channel_dim`` (64).
        num_layers: DisenConv layers (2).
        use_features: add the projected item content to the items' layer-0 vectors; a dataset without
            modalities gives the ID-only model either way.
        num_channels: :math:`K`, the number of channels (4); ``embedding_dim`` must be a multiple of it.
        routing_iterations: neighbourhood-routing iterations per layer (3).
        tau: routing softmax temperature (1).
        activation: the channel activation :math:`\sigma`: ``"tanh"`` (default), ``"relu"`` (the paper's),
            ``"leaky_relu"`` or ``"none"``.
        readout: ``"last"`` (default, the paper's), ``"sum"``, ``"mean"`` or ``"concat"`` of layers ``0..L``.
        item_bias: add a learned bias per item to the score (default ``True``; ``False`` is the paper's score).

    Shapes:
        - **input:** an :class:`InteractionGraph`.
        - **output:** :class:`Embeddings` with ``user [U, d']`` and ``item [I, d']`` (``d' = d``, or ``(L + 1) d``
          with ``readout="concat"``; one more column with ``item_bias``), no edge weights.
    """

    #: 1: the item bias became the default (results stored before it are not reused).
    revision = 1

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
        activation: str = "tanh",
        readout: str = "last",
        item_bias: bool = True,
    ):
        if num_channels < 1 or embedding_dim % num_channels:
            raise ValueError(f"embedding_dim ({embedding_dim}) must be a multiple of num_channels ({num_channels})")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers, use_features=use_features)
        self.num_channels = num_channels
        self.routing_iterations = routing_iterations
        self.activation = activation
        self.readout = readout
        self.item_bias = torch.nn.Parameter(torch.zeros(data.num_items)) if item_bias else None
        self.convs = torch.nn.ModuleList(
            NeighRoutingConv(
                embedding_dim,
                num_channels,
                embedding_dim // num_channels,
                iterations=routing_iterations,
                tau=tau,
                activation=activation,
            )
            for _ in range(num_layers)
        )

    def forward(self, graph: InteractionGraph) -> Embeddings:
        x = self.layer0(graph)
        pattern = graph_pattern(graph)
        layers = [x]
        for conv in self.convs:
            x = conv(x, graph.edge_index, pattern=pattern)
            layers.append(x)
        return self.split(self.with_bias(self.read_out(layers)))

    def read_out(self, layers: list[Tensor]) -> Tensor:
        """:math:`\\mathbf{h}` from the layer outputs ``[y^(0), ..., y^(L)]`` (rows of the same nodes), by
        ``readout``. Every operation is row-wise, so rows of the layers give those rows of the readout."""
        if self.readout == "last":
            return layers[-1]
        if self.readout == "concat":
            return torch.cat(layers, dim=1)
        total = layers[0]
        for y in layers[1:]:
            total = total + y
        return total if self.readout == "sum" else total / len(layers)

    def with_bias(self, h: Tensor, nodes: Tensor | None = None) -> Tensor:
        """``h`` (rows of the graph's nodes, or of ``nodes``) with the bias column: 1 for a user, :math:`b_i` for an
        item; ``h`` itself without ``item_bias``."""
        if self.item_bias is None:
            return h
        column = bias_column(self.num_users, self.item_bias)
        if nodes is not None:
            column = column.index_select(0, nodes)
        return torch.cat([h, column], dim=1)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.item_bias is not None:
            torch.nn.init.zeros_(self.item_bias)

    def id_columns(self) -> slice:
        """Every column but the bias column."""
        return slice(0, -1) if self.item_bias is not None else slice(None)

    def batch_forward(self, graph: InteractionGraph, users: Tensor, pos: Tensor, neg: Tensor) -> Embeddings:
        """:meth:`forward`'s representations at the batch's users and items and the same gradients (within float
        round-off), with the routing layers computed over the batch's receptive field only (the op
        ``receptive_field``; zero rows elsewhere). The layer-0 inputs are computed whole. The readout reads each
        layer at the batch's rows, with the same row-wise operations as :meth:`forward`. Where the op ``linear``
        cannot compute rows of the layers' products (``rows_apply``), the full :meth:`forward`."""
        if not all(rows_apply(conv.lin.weight, graph.num_nodes) for conv in self.convs):
            return self(graph)
        field = receptive_field(graph, torch.cat([users, pos + self.num_users, neg + self.num_users]), self.num_layers)
        x = self.layer0(graph).index_select(0, field.nodes[0])
        layers = [x]
        for layer, conv in enumerate(self.convs, start=1):
            x = conv(x, graph.edge_index, field=field.layer(layer))
            layers.append(x)
        batch = field.nodes[-1]
        if self.readout != "last":  # layer l's rows are field.nodes[l]: read each at the batch's rows
            positions = torch.arange(batch.numel(), device=batch.device)
            for layer in range(self.num_layers - 1, -1, -1):  # self_positions[l]: nodes[l + 1] among nodes[l]
                positions = field.self_positions[layer].index_select(0, positions)
                layers[layer] = layers[layer].index_select(0, positions)
        h = self.with_bias(self.read_out(layers), batch)
        full = h.new_zeros(graph.num_nodes, h.size(1)).index_copy_(0, batch, h)
        return self.split(full)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, channels={self.num_channels}, "
            f"routing_iterations={self.routing_iterations}, activation={self.activation}, readout={self.readout}, "
            f"item_bias={self.item_bias is not None}"
        )
