r"""MMGCN: one graph convolution network per modality, a baseline of Table 2 (docs/protocol.md, "Baselines").

Wei, Wang, Nie, He, Hong and Chua, "MMGCN: Multi-modal Graph Convolution Network for Personalized Recommendation of
Micro-video", ACM MM 2019 (https://doi.org/10.1145/3343031.3351034).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from grcn_bench.datasets.base import DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings, Recommender, xavier_embedding
from .layers.content import modality_features, reset_xavier, xavier_linear
from .layers.mmgcn import AggregateCombineConv, mean_weights
from .ops import ReceptiveField, RowSubset, graph_pattern, linear, receptive_field, rows_apply


def modality_mean(per_modality: list[Tensor]) -> Tensor:
    """``torch.stack(per_modality).mean(dim=0)``, to the bit, without the stacked copy and its expanded gradient.

    The reduction sums from zero, ``((0 + x_1) + x_2) + ...``; summing from ``x_1`` differs only where every term is
    ``-0`` (the sum is ``-0`` instead of ``+0``), which the final ``+ 0.0`` corrects. The gradient, ``grad / |M|``, is
    the mean's own.
    """
    total = per_modality[0]
    for x in per_modality[1:]:
        total = total + x
    if len(per_modality) == 1:  # 0 + x_1: a fresh tensor (and +0 for -0), as the reduction returns
        return (total + 0.0) / 1
    return total.add_(0.0).div_(len(per_modality))


@register_model("mmgcn")
class MMGCN(Recommender):
    r"""MMGCN over the user-item graph, one GCN per modality :math:`m` of the dataset.

    Layer-0 node vectors in modality :math:`m`: a trainable user preference :math:`\mathbf{P}_{m,u}` and the
    projected item features :math:`\operatorname{LeakyReLU}(\mathbf{W}_m \mathbf{x}^m_i + \mathbf{b}_m)` (word-id
    text: :math:`\mathbf{x}^t_i` is the mean of a learned 64-d word-embedding table). Each of the
    ``num_layers`` layers (:class:`~.layers.mmgcn.AggregateCombineConv`, own weights per modality and layer) is the
    paper's mean aggregation followed by its concatenation combination with the node's ID embedding
    :math:`\mathbf{e}_v` (shared by all modalities):

    .. math::
        \mathbf{h}^{(l)}_{m,v} = \operatorname{LeakyReLU}\Big(\mathbf{W}^{(l)}_{1,m} \frac{1}{|\mathcal{N}(v)|}
            \sum_{j \in \mathcal{N}(v)} \mathbf{x}^{(l-1)}_{m,j}\Big), \qquad
        \mathbf{x}^{(l)}_{m,v} = \operatorname{LeakyReLU}\Big(\mathbf{W}^{(l)}_{3,m} \big[\mathbf{h}^{(l)}_{m,v} \,\|\,
            \operatorname{LeakyReLU}(\mathbf{W}^{(l)}_{2,m} \mathbf{x}^{(l-1)}_{m,v}) + \mathbf{e}_v\big]\Big)

    Readout: :math:`\mathbf{h}_v = \frac{1}{|M|}\sum_m \mathbf{x}^{(L)}_{m,v}` (the mean over modalities, as in the
    release; the paper sums, which differs by a constant factor), :math:`\hat{y}_{ui} = \mathbf{h}_u^\top
    \mathbf{h}_i`.

    Choices, documented:

    - Content is inherent to MMGCN (its graphs are built on the modalities), so there is no ``use_features``
      option, and a dataset without modalities is refused with a ``ValueError``.
    - The L2 term covers the batch rows of the ID embeddings and of every modality's user preferences (the
      user-side layer-0 parameters, as for GRCN's prototypes, GRCN's Eq. 13).
    - ``frozen_id=True`` reproduces the release, where ID embeddings and user preferences are plain tensors that
      are never trained (``requires_grad`` off; listed in the instance's ``frozen_parameters``).
    - ``normalize_inputs=True`` reproduces the release's L2 normalisation of each node's layer-0 vector; the paper
      states none, so it is off by default.

    Args:
        data: dataset sizes and modality shapes; at least one modality.
        embedding_dim: width of ID embeddings, preferences, projected features and layers (64).
        num_layers: layers per modality (2).
        frozen_id: never train ID embeddings and user preferences (the release's behaviour).
        normalize_inputs: L2-normalise the layer-0 node vectors of each modality (the release's behaviour).
        negative_slope: LeakyReLU slope (0.01).

    Shapes:
        - **input:** an :class:`InteractionGraph` whose features match ``data``.
        - **output:** :class:`Embeddings` with ``user [U, d]`` and ``item [I, d]``, no edge weights.
    """

    def __init__(
        self,
        data: DatasetInfo,
        *,
        embedding_dim: int = 64,
        num_layers: int = 2,
        frozen_id: bool = False,
        normalize_inputs: bool = False,
        negative_slope: float = 0.01,
    ):
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers)
        if not data.modalities:
            raise ValueError("MMGCN needs at least one item modality (its graphs are built per modality); got none")
        self.modalities = data.modalities
        self.frozen_id = frozen_id
        self.normalize_inputs = normalize_inputs
        self.negative_slope = negative_slope
        self.user_embedding = xavier_embedding(data.num_users, embedding_dim)
        self.item_embedding = xavier_embedding(data.num_items, embedding_dim)
        self.preference = torch.nn.ParameterDict(
            {m: xavier_embedding(data.num_users, embedding_dim) for m in self.modalities}
        )
        self.word_embedding = (
            xavier_embedding(int(data.num_words), embedding_dim)
            if "t" in self.modalities and "t" not in data.feature_dims
            else None
        )
        in_dims = {m: int(data.feature_dims.get(m, embedding_dim)) for m in self.modalities}
        self.projection = torch.nn.ModuleDict({m: xavier_linear(in_dims[m], embedding_dim) for m in self.modalities})
        self.convs = torch.nn.ModuleDict(
            {
                m: torch.nn.ModuleList(
                    AggregateCombineConv(embedding_dim, embedding_dim, negative_slope=negative_slope)
                    for _ in range(num_layers)
                )
                for m in self.modalities
            }
        )
        if frozen_id:
            # An instance attribute, because which parameters are frozen depends on this option.
            self.frozen_parameters = ("user_embedding", "item_embedding") + tuple(
                f"preference.{m}" for m in self.modalities
            )
            for name, parameter in self.named_parameters():
                if name in self.frozen_parameters:
                    parameter.requires_grad_(False)

    def reset_parameters(self) -> None:
        for weight in (self.user_embedding, self.item_embedding, *self.preference.values()):
            torch.nn.init.xavier_uniform_(weight)
        if self.word_embedding is not None:
            torch.nn.init.xavier_uniform_(self.word_embedding)
        for m in self.modalities:
            reset_xavier(self.projection[m])
            for conv in self.convs[m]:
                conv.reset_parameters()

    def modality_input(self, graph: InteractionGraph, modality: str, nodes: Tensor | None = None) -> Tensor:
        """``[U + I, d]`` layer-0 node vectors of one modality: user preferences, then projected item features (with
        ``nodes``, sorted node ids, only their rows)."""
        projection = self.projection[modality]
        features = modality_features(graph, modality, self.word_embedding)
        if nodes is None:
            items = F.leaky_relu(linear(features, projection.weight, projection.bias), self.negative_slope)
            x = torch.cat([self.preference[modality], items], dim=0)
        else:
            split = int(torch.searchsorted(nodes, self.num_users))  # users come first
            item_rows = nodes[split:] - self.num_users
            if rows_apply(projection.weight, self.num_items):
                rows = RowSubset(item_rows, self.num_items)
                items = linear(features.index_select(0, item_rows), projection.weight, projection.bias, rows=rows)
            else:  # e.g. 2,048-d features: project all items (torch's product), keep the rows
                items = linear(features, projection.weight, projection.bias).index_select(0, item_rows)
            items = F.leaky_relu(items, self.negative_slope)
            x = torch.cat([self.preference[modality].index_select(0, nodes[:split]), items], dim=0)
        return F.normalize(x, dim=-1) if self.normalize_inputs else x

    def forward(self, graph: InteractionGraph) -> Embeddings:
        id_embedding = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        pattern = graph_pattern(graph)
        weight = mean_weights(graph.edge_index, graph.degree())
        per_modality = []
        for m in self.modalities:
            x = self.modality_input(graph, m)
            for conv in self.convs[m]:
                x = conv(x, id_embedding, graph.edge_index, pattern=pattern, mean_weight=weight)
            per_modality.append(x)
        return Embeddings(*modality_mean(per_modality).split([self.num_users, self.num_items]))

    def batch_forward(self, graph: InteractionGraph, users: Tensor, pos: Tensor, neg: Tensor) -> Embeddings:
        """:meth:`forward`'s representations at the batch's users and items and the same gradients, bit for bit,
        computed over the batch's receptive field only (the op ``receptive_field``; zero rows elsewhere): at Tiktok's
        full scale about a third of the products. Every operation on the way computes each row on its own: the
        sparse and dense products, and elementwise LeakyReLU, sums and the modality mean. Where the op ``linear``
        cannot compute rows of the layers' products (``rows_apply``), the full :meth:`forward`."""
        if not self._field_applies(graph):
            return self(graph)
        seeds = torch.cat([users, pos + self.num_users, neg + self.num_users])
        field = receptive_field(graph, seeds, self.num_layers)
        # One concatenation, gathered per layer, as forward adds it: the ID gradients are summed in the same order.
        id_embedding = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        output = modality_mean([self._modality_field(graph, m, field, id_embedding) for m in self.modalities])
        full = output.new_zeros(graph.num_nodes, output.size(1)).index_copy_(0, field.nodes[-1], output)
        return Embeddings(*full.split([self.num_users, self.num_items]))

    def _field_applies(self, graph: InteractionGraph) -> bool:
        return all(
            rows_apply(lin.weight, graph.num_nodes)
            for m in self.modalities for conv in self.convs[m]
            for lin in (conv.aggregate_lin, conv.self_lin, conv.combine_lin)
        )

    def _modality_field(self, graph: InteractionGraph, modality: str, field: ReceptiveField,
                        id_embedding: Tensor) -> Tensor:
        """One modality's last layer at ``field.nodes[-1]``, layer ``l`` computed at ``field.nodes[l]`` only."""
        x = self.modality_input(graph, modality, field.nodes[0])
        for layer, conv in enumerate(self.convs[modality], start=1):
            edges = field.edges[layer - 1]
            x = conv(x, id_embedding.index_select(0, field.nodes[layer]), graph.edge_index[:, edges],
                     pattern=field.patterns[layer - 1],
                     mean_weight=mean_weights(graph.edge_index[:, edges], graph.degree()),
                     x_self=x.index_select(0, field.self_positions[layer - 1]), rows=field.rows(layer))
        return x

    def ego_parameters(self, users: Tensor, pos: Tensor, neg: Tensor) -> list[Tensor]:
        ego = super().ego_parameters(users, pos, neg)
        return ego + [self.preference[m][users] for m in self.modalities]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, modalities={''.join(self.modalities)}, frozen_id={self.frozen_id}, "
            f"normalize_inputs={self.normalize_inputs}"
        )
