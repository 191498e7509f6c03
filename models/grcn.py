"""GRCN: the graph-refined convolutional network, the subject of the suite (docs/protocol.md, "GRCN").

Wei, Wang, Nie, He and Chua, "Graph-Refined Convolutional Network for Multimedia Recommendation with Implicit
Feedback", ACM MM 2020 (https://doi.org/10.1145/3394171.3413556; arXiv https://arxiv.org/abs/2111.02036).
Released code: https://github.com/weiyinwei/GRCN (PyTorch 1.4 / PyG 1.2); its differences from the paper are options
here (docs/protocol.md, "The released code's variant"), the paper's behaviour is the default. Nothing is copied from the
release.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from grcn_bench.datasets.base import MODALITIES, DatasetInfo, InteractionGraph

from . import register_model
from .base import Embeddings, Recommender
from .layers.refine import Fusion, Pruning, RefinedPropagation, affinities, fuse, prune, route_prototypes
from .losses import RELEASE_ID_WEIGHTS, ego_l2
from .ops import CSRPattern, graph_pattern, l2_normalize, linear, receptive_field, spmm, user_item_pattern

Variant = Literal["paper", "official"]
Routing = Literal["paper", "official"]
ConfidenceFrom = Literal["target", "source"]
ContentReadout = Literal["none", "one_hop"]
L2Weighting = Literal["shared", "official"]

#: What each variant sets for the five options that tell the paper from the released code (``docs/protocol.md``).
#: The release as its README runs it: soft pruning (its runs pass ``--is_pruning=False``) and its own L2 weighting.
VARIANT_DEFAULTS: dict[str, dict[str, str]] = {
    "paper": {"routing": "paper", "confidence_from": "target", "content_readout": "none", "pruning": "soft",
              "l2_weighting": "shared"},
    "official": {"routing": "official", "confidence_from": "source", "content_readout": "one_hop", "pruning": "soft",
                 "l2_weighting": "official"},
}


def _check_literal(name: str, value: object, allowed: object) -> None:
    options = get_args(allowed)
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, options))}")


@register_model("grcn")
class GRCN(Recommender):
    r"""The graph-refined convolutional network from the `"Graph-Refined Convolutional Network for Multimedia
    Recommendation with Implicit Feedback" <https://arxiv.org/abs/2111.02036>`_ paper (ACM MM 2020,
    https://doi.org/10.1145/3394171.3413556).

    A graph refining layer scores every training edge by how well the item's content matches the user's content
    prototype and uses the score as the edge's weight, so that false-positive interactions pass weakened (or
    inverted) messages; ID embeddings are then propagated on the refined graph. For each modality :math:`m`
    (docs/protocol.md, "GRCN"):

    .. math::
        \bar{\mathbf{i}}_m = \operatorname{normalize}\big(\mathrm{leaky\_relu}(\mathbf{W}_m \mathbf{i}_m
            + \mathbf{b}_m)\big) \qquad \text{(Eq. 1)}

    .. math::
        p_{u,i} = \operatorname{softmax}_{i \in \mathcal{N}(u)}(\bar{\mathbf{i}}_m^\top \mathbf{u}_{(t-1)}), \quad
        \mathbf{u}_{(t)} = \operatorname{normalize}\Big(\mathbf{u}_{(t-1)}
            + \sum_{i \in \mathcal{N}(u)} p_{u,i} \bar{\mathbf{i}}_m\Big), \quad
        \bar{\mathbf{u}}_m = \mathbf{u}_{(T)} \qquad \text{(Eqs. 2-4)}

    .. math::
        \bar{s}^m_{u \leftarrow i} = \operatorname{softmax}_{i \in \mathcal{N}(u)}(\bar{\mathbf{u}}_m^\top
            \bar{\mathbf{i}}_m), \quad
        \bar{s}^m_{i \leftarrow u} = \operatorname{softmax}_{u \in \mathcal{N}(i)}(\bar{\mathbf{i}}_m^\top
            \bar{\mathbf{u}}_m) \qquad \text{(Eq. 5)}

    .. math::
        s_{u \leftarrow i} = \max_m \rho^m_u \bar{s}^m_{u \leftarrow i}, \quad
        s_{i \leftarrow u} = \max_m \rho^m_i \bar{s}^m_{i \leftarrow u} \qquad \text{(Eqs. 6-7)}

    .. math::
        \mathbf{e}_u^{(l)} = \sum_{i \in \mathcal{N}(u)} s_{u \leftarrow i} \mathbf{e}_i^{(l-1)}, \quad
        \mathbf{e}_i^{(l)} = \sum_{u \in \mathcal{N}(i)} s_{i \leftarrow u} \mathbf{e}_u^{(l-1)}, \quad
        \mathbf{e} = \sum_{l=0}^{L} \mathbf{e}^{(l)}, \quad
        \mathbf{e}^{(0)} = \operatorname{normalize}(\mathbf{E}) \qquad \text{(Eqs. 8-9)}

    .. math::
        y_{ui} = (\mathbf{e}_u \,\Vert\, \bar{\mathbf{u}}_v \,\Vert\, \bar{\mathbf{u}}_a \,\Vert\,
            \bar{\mathbf{u}}_t)^\top (\mathbf{e}_i \,\Vert\, \bar{\mathbf{i}}_v \,\Vert\, \bar{\mathbf{i}}_a
            \,\Vert\, \bar{\mathbf{i}}_t) \qquad \text{(Eqs. 10-11)}

    trained with BPR plus :math:`\lambda` times the mean square of the batch's rows of :math:`\mathbf{E}` and of
    the batch users' :math:`\mathbf{u}^m_{(0)}` (Eq. 13); the projections and base vectors are not regularised.
    :math:`\mathbf{E}`, :math:`\mathbf{u}^m_{(0)}` and :math:`\boldsymbol{\rho}` (unconstrained reals) are
    Xavier-initialised. Word-id text (docs/protocol.md, "Word-id text"): the item's text input :math:`\mathbf{i}_t` is
    the mean of a learned word-embedding table over its words.

    **Differences from the released code** (each an option here; ``variant="official"`` sets (a)-(d) and (f)):
    (a) its routing loop aggregates at items, so user prototypes never move: :math:`\bar{\mathbf{u}}_m =
    \operatorname{normalize}(\mathbf{u}^m_{(0)})` whatever :math:`T` is (``routing="official"``); (b) the fused weight
    of edge :math:`u \leftarrow i` uses the sender's base vector :math:`\boldsymbol{\rho}_i`
    (``confidence_from="source"``); (c) the prediction's modality blocks are one-hop aggregates
    :math:`\bar{\mathbf{u}}_m + \sum_i \bar{s}^m_{u \leftarrow i} \bar{\mathbf{i}}_m` and
    :math:`\bar{\mathbf{i}}_m + \sum_u \bar{s}^m_{i \leftarrow u} \bar{\mathbf{u}}_m`
    (``content_readout="one_hop"``); (d) its command-line default is hard pruning, while the runs in its README use
    soft pruning (``pruning``; the variant follows the README's runs: soft); (e) its word embeddings are detached, so
    they stay at their random initialisation, and the text projection is skipped (``freeze_word_embeddings=True``,
    not set by the variant); (f) its L2 term is one mean over the batch's ``[u, u]`` and ``[i, j]`` ID rows, which
    weighs the item rows by half: :math:`\operatorname{mean}(e_u^2) + \tfrac12 \operatorname{mean}(e_i^2) +
    \tfrac12 \operatorname{mean}(e_j^2) + \sum_m \operatorname{mean}(\mathbf{u}^{m\,2}_{(0)})` instead of the
    shared :math:`\operatorname{mean}(e_u^2) + \operatorname{mean}(e_i^2) + \operatorname{mean}(e_j^2) + \sum_m
    \operatorname{mean}(\mathbf{u}^{m\,2}_{(0)})` (``l2_weighting="official"``; every mean over the batch's rows).

    Args:
        data: dataset sizes and modality shapes.
        embedding_dim: width :math:`D = D'` of ID embeddings, prototypes and distilled content (64).
        num_layers: graph convolution layers :math:`L` on the refined graph (2).
        modalities: the modalities to use, any non-empty subset of the dataset's (default: all, in v, a, t order).
        routing_iterations: routing iterations :math:`T \ge 0` (default 3; Figure 3). ``0`` means
            :math:`\bar{\mathbf{u}}_m = \operatorname{normalize}(\mathbf{u}^m_{(0)})`.
        fusion: ``"max_base"`` (Eq. 7), ``"max"`` (GRCN_max) or ``"mean"`` (GRCN_mean); the last two have no base
            vectors.
        pruning: ``"soft"`` (the fused weight as is) or ``"hard"`` (ReLU on it: GRCN_hard); ``None``: from
            ``variant``.
        id_only_prediction: GRCN-ID of Figure 3: the graph is refined as usual but :math:`y_{ui} =
            \mathbf{e}_u^\top \mathbf{e}_i`.
        variant: ``"paper"`` (default) or ``"official"``: the defaults of ``routing``, ``confidence_from``,
            ``content_readout``, ``pruning`` and ``l2_weighting`` (:data:`VARIANT_DEFAULTS`; the official variant
            prunes softly, as the release's README runs do).
        routing: ``"paper"`` (Eqs. 2-4) or ``"official"`` (difference (a)); ``None``: from ``variant``.
        confidence_from: whose base vector weighs an edge: ``"target"`` (the receiver, Eq. 7) or ``"source"``
            (difference (b)); ``None``: from ``variant``. Only used by ``fusion="max_base"``.
        content_readout: ``"none"`` (Eq. 10) or ``"one_hop"`` (difference (c)); ``None``: from ``variant``.
        l2_weighting: ``"shared"`` (every model's L2 term: the sum of the mean squares of the batch's user, positive
            and negative ID rows and of each modality's user prototypes) or ``"official"`` (the release's, item rows
            weighted by half: difference (f), :data:`~grcn_bench.models.losses.RELEASE_ID_WEIGHTS`); ``None``: from
            ``variant``.
        freeze_word_embeddings: word-id text only (a no-op otherwise): keep the word table at its initialisation
            (listed in ``frozen_parameters``) and skip the text projection, :math:`\bar{\mathbf{i}}_t =
            \operatorname{normalize}(\text{mean word embedding})` (difference (e)). Needs ``word_dim ==
            embedding_dim``.
        word_dim: width of the word-embedding table for word-id text (64).

    Shapes:
        - **input:** an :class:`InteractionGraph` with ``U`` users, ``I`` items, ``2E`` directed edges and the
          features of the model's modalities (dense ``[I, D_m]``, or ``word_bags`` for word-id text).
        - **output:** :class:`Embeddings` with ``user [U, D(1+|M|)]``, ``item [I, D(1+|M|)]`` (``[., D]`` with
          ``id_only_prediction``) and ``edge_weight [2E]``: the fused weight that the receiver
          ``edge_index[1, e]`` applies to the message of edge ``e``.
    """

    def __init__(
        self,
        data: DatasetInfo,
        *,
        embedding_dim: int = 64,
        num_layers: int = 2,
        modalities: Sequence[str] | None = None,
        routing_iterations: int = 3,
        fusion: Fusion = "max_base",
        pruning: Pruning | None = None,
        id_only_prediction: bool = False,
        variant: Variant = "paper",
        routing: Routing | None = None,
        confidence_from: ConfidenceFrom | None = None,
        content_readout: ContentReadout | None = None,
        l2_weighting: L2Weighting | None = None,
        freeze_word_embeddings: bool = False,
        word_dim: int = 64,
    ):
        super().__init__(data, embedding_dim=embedding_dim, num_layers=num_layers)
        _check_literal("variant", variant, Variant)
        defaults = VARIANT_DEFAULTS[variant]
        routing = defaults["routing"] if routing is None else routing
        confidence_from = defaults["confidence_from"] if confidence_from is None else confidence_from
        content_readout = defaults["content_readout"] if content_readout is None else content_readout
        pruning = defaults["pruning"] if pruning is None else pruning
        l2_weighting = defaults["l2_weighting"] if l2_weighting is None else l2_weighting
        _check_literal("fusion", fusion, Fusion)
        _check_literal("pruning", pruning, Pruning)
        _check_literal("routing", routing, Routing)
        _check_literal("confidence_from", confidence_from, ConfidenceFrom)
        _check_literal("content_readout", content_readout, ContentReadout)
        _check_literal("l2_weighting", l2_weighting, L2Weighting)
        if isinstance(routing_iterations, bool) or not isinstance(routing_iterations, int) or routing_iterations < 0:
            raise ValueError(f"routing_iterations must be an int >= 0, got {routing_iterations!r}")
        if word_dim <= 0:
            raise ValueError(f"word_dim must be > 0, got {word_dim}")
        self.modalities = self._select_modalities(data, modalities)
        self.word_text = "t" in self.modalities and "t" not in data.feature_dims
        self.freeze_word_embeddings = bool(freeze_word_embeddings) and self.word_text
        if self.freeze_word_embeddings and word_dim != embedding_dim:
            raise ValueError(
                f"freeze_word_embeddings uses the mean word embedding as the text content, so word_dim ({word_dim}) "
                f"must equal embedding_dim ({embedding_dim})"
            )
        self.routing_iterations = routing_iterations
        self.fusion, self.pruning, self.routing = fusion, pruning, routing
        self.confidence_from, self.content_readout = confidence_from, content_readout
        self.l2_weighting = l2_weighting
        self.id_only_prediction = bool(id_only_prediction)
        self.variant = variant

        num_nodes, num_modalities = data.num_users + data.num_items, len(self.modalities)
        self.id_embedding = torch.nn.Parameter(torch.empty(num_nodes, embedding_dim))
        self.user_prototypes = torch.nn.Parameter(torch.empty(data.num_users, num_modalities, embedding_dim))
        # The base vectors only exist where they are used: GRCN_max and GRCN_mean fuse without them.
        base_vectors = torch.nn.Parameter(torch.empty(num_nodes, num_modalities)) if fusion == "max_base" else None
        self.register_parameter("base_vectors", base_vectors)
        word_embedding = None
        if self.word_text:
            word_embedding = torch.nn.Parameter(
                torch.empty(data.num_words, word_dim), requires_grad=not self.freeze_word_embeddings
            )
        self.register_parameter("word_embedding", word_embedding)
        if self.freeze_word_embeddings:
            self.frozen_parameters = ("word_embedding",)
        input_dims = {m: (word_dim if m == "t" and self.word_text else data.feature_dims[m]) for m in self.modalities}
        self.projections = torch.nn.ModuleDict(
            {
                m: torch.nn.Linear(dim, embedding_dim)
                for m, dim in input_dims.items()
                if not (m == "t" and self.freeze_word_embeddings)
            }
        )
        self.propagation = RefinedPropagation()
        self.reset_parameters()

    @staticmethod
    def _select_modalities(data: DatasetInfo, modalities: Sequence[str] | None) -> tuple[str, ...]:
        available = data.modalities
        if not available:
            raise ValueError("GRCN refines the graph from item content: the dataset has no modality")
        if modalities is None:
            return available
        if isinstance(modalities, str):
            modalities = tuple(modalities)  # "va" -> ("v", "a")
        requested = list(modalities)
        if not requested:
            raise ValueError("modalities must name at least one modality (GRCN needs content to refine the graph)")
        unknown = [m for m in requested if m not in available]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}: the dataset has {list(available)}")
        if len(set(requested)) != len(requested):
            raise ValueError(f"modalities must not repeat, got {requested}")
        return tuple(m for m in MODALITIES if m in requested)

    def reset_parameters(self) -> None:
        """Xavier-uniform initialisation of every weight and embedding, zero biases."""
        torch.nn.init.xavier_uniform_(self.id_embedding)
        for m in range(len(self.modalities)):
            # One [U, d] matrix per modality, initialised as one (Xavier's fans are those of a 2-d matrix).
            torch.nn.init.xavier_uniform_(self.user_prototypes.data[:, m])
        if self.base_vectors is not None:
            torch.nn.init.xavier_uniform_(self.base_vectors)
        if self.word_embedding is not None:
            torch.nn.init.xavier_uniform_(self.word_embedding)
        for projection in self.projections.values():
            torch.nn.init.xavier_uniform_(projection.weight)
            torch.nn.init.zeros_(projection.bias)

    def item_content(self, graph: InteractionGraph) -> Tensor:
        r"""``[M, I, d]`` distilled item content :math:`\bar{\mathbf{i}}_m` of every modality (Eq. 1)."""
        blocks = []
        for m in self.modalities:
            if m == "t" and self.word_text:
                if graph.word_bags is None:
                    raise ValueError("the graph has no word_bags, but the model was built for word-id text")
                raw = graph.word_bags.mean_embedding(self.word_embedding, self.num_items)
            else:
                if m not in graph.features:
                    raise ValueError(f"the graph has no features for modality {m!r} (it has {sorted(graph.features)})")
                raw = graph.features[m]
            if m in self.projections:
                raw = F.leaky_relu(linear(raw, self.projections[m].weight, self.projections[m].bias))
            blocks.append(l2_normalize(raw))
        return torch.stack(blocks)

    def user_preferences(
        self, item_content: Tensor, graph: InteractionGraph, *, pattern: CSRPattern | None = None
    ) -> Tensor:
        r"""``[M, U, d]`` prototypes :math:`\bar{\mathbf{u}}_m` (Eqs. 2-4; the release's routing never moves them)."""
        iterations = self.routing_iterations if self.routing == "paper" else 0
        # The parameter is [U, M, d] (a user's prototypes together); the products want each modality contiguous.
        initial = self.user_prototypes.transpose(0, 1).contiguous()
        return route_prototypes(item_content, initial, graph, iterations, pattern=pattern)

    def refined_graph(self, graph: InteractionGraph) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The graph refining layer: item content ``[M, I, d]`` (Eq. 1), user prototypes ``[M, U, d]`` (Eqs. 2-4),
        per-modality affinities ``[M, 2E]`` (Eq. 5) and the fused, pruned weight of every directed edge ``[2E]``
        (Eqs. 6-7)."""
        if graph.num_users != self.num_users or graph.num_items != self.num_items:
            raise ValueError(
                f"graph has {graph.num_users} users x {graph.num_items} items, the model was built for "
                f"{self.num_users} x {self.num_items}"
            )
        # Index structures of the sparse products: views of the graph's CSR tensors (no state kept between calls).
        user_items = user_item_pattern(graph)
        content = self.item_content(graph)  # [M, I, d], Eq. 1
        prototypes = self.user_preferences(content, graph, pattern=user_items)  # [M, U, d], Eqs. 2-4
        scores = affinities(prototypes, content, graph, pattern=user_items)  # [M, 2E], Eq. 5
        confidence = None
        if self.base_vectors is not None:
            node = graph.edge_index[1] if self.confidence_from == "target" else graph.edge_index[0]
            confidence = self.base_vectors.index_select(0, node).t()  # [M, 2E]
        weight = prune(fuse(scores, self.fusion, confidence), self.pruning)  # [2E], Eqs. 6-7
        return content, prototypes, scores, weight

    def content_readout_nodes(self, graph: InteractionGraph, prototypes: Tensor, content: Tensor,
                              scores: Tensor, pattern: CSRPattern) -> tuple[Tensor, Tensor]:
        """The modality blocks of Eq. 10: the prototypes and content, or (the release's one-hop readout) each plus
        its per-modality affinity-weighted neighbourhood sum."""
        if self.content_readout != "one_hop":
            return prototypes, content
        nodes = torch.cat([prototypes, content], dim=1)  # [M, N, d]
        nodes = nodes + self.propagation(nodes, graph.edge_index, scores, pattern=pattern)
        return nodes[:, : self.num_users], nodes[:, self.num_users :]

    def forward(self, graph: InteractionGraph) -> Embeddings:
        content, prototypes, scores, weight = self.refined_graph(graph)
        pattern = graph_pattern(graph)
        x = l2_normalize(self.id_embedding)  # e^(0)
        total = x
        for _ in range(self.num_layers):  # Eq. 8, summed over layers as in Eq. 9
            x = self.propagation(x, graph.edge_index, weight, pattern=pattern)
            total = total + x
        user, item = total[: self.num_users], total[self.num_users :]
        if self.id_only_prediction:
            return Embeddings(user, item, weight)
        prototypes, content = self.content_readout_nodes(graph, prototypes, content, scores, pattern)
        # Eq. 10: e || u_v || u_a || u_t, the modality blocks in v, a, t order.
        user = torch.cat([user, *prototypes.unbind(0)], dim=1)
        item = torch.cat([item, *content.unbind(0)], dim=1)
        return Embeddings(user, item, weight)

    def id_columns(self) -> slice:
        """The graph part e of Eq. 10's e || u_v || u_a || u_t: its first ``embedding_dim`` columns."""
        return slice(0, self.embedding_dim)

    def batch_forward(self, graph: InteractionGraph, users: Tensor, pos: Tensor, neg: Tensor) -> Embeddings:
        """:meth:`forward`'s representations at the batch's users and items (zero rows elsewhere), its edge weights
        and the same gradients, with the propagation (Eqs. 8-9) computed over the batch's receptive field only (the
        op ``receptive_field``): each field row sums the same terms as the whole graph's row. The refining layer
        runs whole: its prototypes are needed for nearly every user whose edges the field reads."""
        content, prototypes, scores, weight = self.refined_graph(graph)
        seeds = torch.cat([users, pos + self.num_users, neg + self.num_users])
        field = receptive_field(graph, seeds, self.num_layers)
        x = l2_normalize(self.id_embedding)  # e^(0), whole: a cheap row-wise pass
        batch = field.nodes[-1]
        total = x.index_select(0, batch)
        # Layer l's rows are field.nodes[l]; the batch's rows among them, for Eq. 9's sum
        positions = [torch.arange(batch.numel(), device=batch.device)]
        for layer in range(self.num_layers, 1, -1):
            positions.insert(0, field.self_positions[layer - 1].index_select(0, positions[0]))
        h = x.index_select(0, field.nodes[0])
        for layer in range(1, self.num_layers + 1):
            h = spmm(field.patterns[layer - 1], weight.index_select(0, field.edges[layer - 1]), h)
            total = total + (h if layer == self.num_layers else h.index_select(0, positions[layer - 1]))
        split = int(torch.searchsorted(batch, self.num_users))  # users come first
        user_rows, item_rows = batch[:split], batch[split:] - self.num_users
        user, item = total[:split], total[split:]
        if not self.id_only_prediction:
            pattern = graph_pattern(graph) if self.content_readout == "one_hop" else None
            prototypes, content = self.content_readout_nodes(graph, prototypes, content, scores, pattern)
            user = torch.cat([user, *prototypes.index_select(1, user_rows).unbind(0)], dim=1)
            item = torch.cat([item, *content.index_select(1, item_rows).unbind(0)], dim=1)
        return Embeddings(user.new_zeros(self.num_users, user.size(1)).index_copy_(0, user_rows, user),
                          item.new_zeros(self.num_items, item.size(1)).index_copy_(0, item_rows, item), weight)

    def ego_parameters(self, users: Tensor, pos: Tensor, neg: Tensor) -> list[Tensor]:
        """Eq. 13's regularised rows: ``E`` for the batch's users, positives and negatives, and each modality's
        initial prototype of the batch's users."""
        offset = self.num_users
        # One gather per parameter: its backward then fills one zero gradient of the table's size, not three.
        rows = self.id_embedding.index_select(0, torch.cat([users, pos + offset, neg + offset]))
        prototypes = self.user_prototypes.index_select(0, users)
        return [*rows.split([users.numel(), pos.numel(), neg.numel()]), *prototypes.unbind(1)]

    def l2_term(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """Eq. 13's L2 term over :meth:`ego_parameters`: the shared sum of mean squares, or with
        ``l2_weighting="official"`` the release's weighting ``mean(e_u^2) + mean(e_i^2) / 2 + mean(e_j^2) / 2 +
        sum_m mean(u0_m^2)`` (its one mean over ``[u, u]`` and ``[i, j]``; the prototypes' means are the release's
        too: a user row repeated twice does not change a mean)."""
        parameters = self.ego_parameters(users, pos, neg)
        if self.l2_weighting == "shared":
            return ego_l2(parameters)
        return ego_l2(parameters, [*RELEASE_ID_WEIGHTS, *([1.0] * (len(parameters) - len(RELEASE_ID_WEIGHTS)))])

    def extra_repr(self) -> str:
        options = (
            f"modalities={''.join(self.modalities)}, T={self.routing_iterations}, fusion={self.fusion}, "
            f"pruning={self.pruning}, routing={self.routing}, confidence_from={self.confidence_from}, "
            f"content_readout={self.content_readout}, l2_weighting={self.l2_weighting}"
        )
        if self.id_only_prediction:
            options += ", id_only_prediction=True"
        if self.freeze_word_embeddings:
            options += ", freeze_word_embeddings=True"
        return f"{super().extra_repr()}, {options}"
