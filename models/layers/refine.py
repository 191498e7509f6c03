r"""GRCN's graph refining layer and its propagation on the refined graph (paper Section 2.2).

Wei, Wang, Nie, He and Chua, "Graph-Refined Convolutional Network for Multimedia Recommendation with Implicit
Feedback", ACM MM 2020 (https://doi.org/10.1145/3394171.3413556, https://arxiv.org/abs/2111.02036).

Small pure functions, one per step, so that each equation can be tested on its own:

- :func:`route_prototypes`: the prototypical network's neighbour routing (Eqs. 2-4);
- :func:`affinities`: per-modality affinity scores in both directions (Eq. 5);
- :func:`fuse` and :func:`prune`: fusing modalities into one weight per directed edge (Eqs. 6-7), hard pruning;
- :class:`RefinedPropagation`: weighted message passing on the refined graph (Eq. 8).

Conventions. Modalities are stacked on dimension 0 (modality-major): item content is ``[M, I, d]``, user prototypes
``[M, U, d]``, per-modality edge scores ``[M, 2E]``, so every modality is handled by the same tensor operation and
each modality's block is contiguous (the sparse products run one modality at a time). Edges follow
:class:`~grcn_bench.datasets.base.InteractionGraph`: sorted by target, users before items, so the first ``E``
directed edges are exactly the ``item -> user`` edges (CSR rows ``0..U-1``) and the last ``E`` the
``user -> item`` edges. Neighbourhood softmaxes are segment softmaxes over the CSR row pointer (``ptr``).

Ops. Per-edge dot products (the logits of Eqs. 2 and 5) and weighted neighbourhood sums (Eqs. 3 and 8) are the ops
``sddmm`` and ``spmm`` over the graph's CSR pattern (:mod:`grcn_bench.models.ops`), and the neighbourhood softmaxes
the op ``segment_softmax``: one routing iteration (Eqs. 2-3) is ``sddmm``, ``segment_softmax`` and ``spmm``. Nothing
of size ``[E, M, d]`` is ever materialised. :class:`RefinedPropagation` keeps PyG's gather and scatter as the
reference path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import MessagePassing

from grcn_bench.datasets.base import InteractionGraph

from ..ops import (
    CSRPattern,
    l2_normalize,
    sddmm,
    segment_softmax,
    spmm,
    stacked_rowptr,
    user_item_pattern,
)

Fusion = Literal["max_base", "max", "mean"]
Pruning = Literal["soft", "hard"]


def route_prototypes(
    item_content: Tensor,
    prototype_init: Tensor,
    graph: InteractionGraph,
    iterations: int,
    *,
    pattern: CSRPattern | None = None,
) -> Tensor:
    r"""User preference prototypes by neighbour routing over each user's items (Eqs. 2-4), all modalities at once.

    .. math::
        \mathbf{u}_{(0)} = \frac{\mathbf{u}^m_{(0)}}{\lVert \mathbf{u}^m_{(0)} \rVert}, \qquad
        p_{u,i} = \operatorname{softmax}_{i \in \mathcal{N}(u)}\big(\bar{\mathbf{i}}_m^\top \mathbf{u}_{(t-1)}\big),
        \qquad
        \mathbf{u}_{(t)} = \operatorname{normalize}\Big(\mathbf{u}_{(t-1)}
            + \sum_{i \in \mathcal{N}(u)} p_{u,i}\, \bar{\mathbf{i}}_m\Big)

    for :math:`t = 1..T`; the output is :math:`\bar{\mathbf{u}}_m = \mathbf{u}_{(T)}`. The paper normalises after
    every iteration "to avoid its scale increasing" (below Eq. 3). A user without training items keeps the
    normalised initial vector.

    Args:
        item_content: ``[M, I, d]`` distilled item features :math:`\bar{\mathbf{i}}_m` (Eq. 1).
        prototype_init: ``[M, U, d]`` trainable initial prototypes :math:`\mathbf{u}^m_{(0)}` (not yet normalised).
        graph: the training graph; :math:`\mathcal{N}(u)` is the user's training items.
        iterations: :math:`T \ge 0`; ``0`` returns the normalised initial prototypes.
        pattern: ``user_item_pattern(graph)``, when the caller already has it.

    Returns:
        ``[M, U, d]`` prototypes :math:`\bar{\mathbf{u}}_m`.
    """
    if iterations < 0:
        raise ValueError(f"routing iterations must be >= 0, got {iterations}")
    if item_content.dim() != 3 or prototype_init.dim() != 3 or item_content.size(0) != prototype_init.size(0):
        raise ValueError(
            f"content [M, I, d] and prototypes [M, U, d] must have the same modalities, got "
            f"{tuple(item_content.shape)} and {tuple(prototype_init.shape)}"
        )
    prototypes = l2_normalize(prototype_init)
    if iterations == 0:
        return prototypes
    if pattern is None:  # A[u, i]: the E item -> user edges, grouped by user
        pattern = user_item_pattern(graph)
    # Flattened, each (modality, user) segment of the [M, E] logits is contiguous: one softmax over M * U segments.
    segments = stacked_rowptr(pattern.rowptr.long(), item_content.size(0))  # int64: M * E may pass 2**31
    for _ in range(iterations):
        logits = sddmm(pattern, prototypes, item_content)  # Eq. 2: i_m . u_(t-1) for every i in N(u), [M, E]
        p = segment_softmax(logits.view(-1), segments).view_as(logits)  # Eq. 2: p_ui, the softmax over N(u)
        pulled = spmm(pattern, p, item_content)  # Eq. 3: sum over i in N(u) of p_ui i_m, [M, U, d]
        prototypes = l2_normalize(prototypes + pulled)  # Eq. 3, normalised after every iteration (below Eq. 3)
    return prototypes


def affinities(
    user_prototypes: Tensor, item_content: Tensor, graph: InteractionGraph, *, pattern: CSRPattern | None = None
) -> Tensor:
    r"""Per-modality affinity of every directed edge, softmax-normalised over the receiver's neighbourhood (Eq. 5).

    .. math::
        \bar{s}^m_{u \leftarrow i} = \operatorname{softmax}_{i \in \mathcal{N}(u)}
            \big(\bar{\mathbf{u}}_m^\top \bar{\mathbf{i}}_m\big), \qquad
        \bar{s}^m_{i \leftarrow u} = \operatorname{softmax}_{u \in \mathcal{N}(i)}
            \big(\bar{\mathbf{i}}_m^\top \bar{\mathbf{u}}_m\big)

    Both directions share the logit :math:`\bar{\mathbf{u}}_m^\top \bar{\mathbf{i}}_m`; it is computed once per
    training pair and copied to the reverse edge.

    Args:
        user_prototypes: ``[M, U, d]`` :math:`\bar{\mathbf{u}}_m` (Eqs. 2-4).
        item_content: ``[M, I, d]`` :math:`\bar{\mathbf{i}}_m` (Eq. 1).
        graph: the training graph.
        pattern: ``user_item_pattern(graph)``, when the caller already has it.

    Returns:
        ``[M, 2E]`` scores in the graph's edge order; the score of edge ``e`` is the one its receiver
        ``edge_index[1, e]`` assigns, so each node's incoming scores sum to 1 per modality.
    """
    if pattern is None:
        pattern = user_item_pattern(graph)
    pair_logits = sddmm(pattern, user_prototypes, item_content)  # [M, E] in the order of the first E edges
    # The last E edges (into items) are the reverses of the first E: reverse_edge points back into the first half.
    logits = torch.cat([pair_logits, pair_logits.index_select(1, graph.reverse_edge[pattern.nnz :])], dim=1)
    segments = stacked_rowptr(graph.rowptr, logits.size(0))
    return segment_softmax(logits.view(-1), segments).view_as(logits)


def fuse(scores: Tensor, fusion: Fusion = "max_base", confidence: Tensor | None = None) -> Tensor:
    r"""One weight per directed edge from its per-modality scores (Eqs. 6-7).

    .. math::
        s_{u \leftarrow i} = \max_m \big(\rho^m \, \bar{s}^m_{u \leftarrow i}\big)

    for ``fusion="max_base"``, where :math:`\boldsymbol{\rho}` (Eq. 6) is the base vector of the node chosen by the
    caller (the receiver in the paper, Eq. 7); ``"max"`` is :math:`\max_m \bar{s}^m` and ``"mean"`` the mean over
    modalities, both without base vectors (GRCN_max and GRCN_mean of Table 3, Section 2.2.1).

    Args:
        scores: ``[M, 2E]`` per-modality affinities (Eq. 5).
        fusion: ``"max_base"``, ``"max"`` or ``"mean"``.
        confidence: ``[M, 2E]``: the base-vector entries used for each edge; required for ``"max_base"`` only.

    Returns:
        ``[2E]`` fused weights; under ``"max_base"`` they may be negative (soft pruning can invert a message).
    """
    if fusion == "max_base":
        if confidence is None:
            raise ValueError('fusion="max_base" needs the base vectors (confidence) of each edge')
        return (confidence * scores).amax(dim=0)
    if fusion == "max":
        return scores.amax(dim=0)
    if fusion == "mean":
        return scores.mean(dim=0)
    raise ValueError(f"unknown fusion {fusion!r}; expected 'max_base', 'max' or 'mean'")


def prune(weight: Tensor, pruning: Pruning = "soft") -> Tensor:
    """Soft pruning keeps the fused weight as is (Section 2.2.1); hard pruning (GRCN_hard, Table 3) clips it at 0."""
    if pruning == "soft":
        return weight
    if pruning == "hard":
        return F.relu(weight)
    raise ValueError(f"unknown pruning {pruning!r}; expected 'soft' or 'hard'")


class RefinedPropagation(MessagePassing):
    r"""One hop of weighted message passing on the refined graph, without weights or activation (Eq. 8).

    .. math::
        \mathbf{x}'_v = \sum_{w \in \mathcal{N}(v)} s_{v \leftarrow w}\, \mathbf{x}_w

    The weight of edge ``e`` is applied by its receiver ``edge_index[1, e]``. Weights may be per edge (``[2E]``,
    the fused weights of Eq. 7) or per modality and edge (``[M, 2E]`` with node features ``[M, N, d]``, for the
    release's one-hop content readout).

    Given the graph's CSR pattern (``pattern=graph_pattern(graph)``, whose entries are the graph's edges in order),
    the hop runs as a sparse-dense product (the op ``spmm``, the fast path); without it, as PyG's gather and
    scatter over ``edge_index`` (the reference path, any edge order; one pass per modality).

    Shapes:
        - **input:** node features ``[N, d]`` or ``[M, N, d]``, edge index ``[2, 2E]``, edge weights ``[2E]`` or
          ``[M, 2E]``.
        - **output:** ``[N, d]`` or ``[M, N, d]``.
    """

    def __init__(self) -> None:
        super().__init__(aggr="add", node_dim=0)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor,
        *,
        pattern: CSRPattern | None = None,
    ) -> Tensor:
        num_nodes = x.size(-2)
        if pattern is not None:
            if pattern.nnz != edge_index.size(1) or pattern.num_rows != num_nodes:
                raise ValueError(
                    f"the pattern has {pattern.nnz} entries over {pattern.num_rows} nodes; got {edge_index.size(1)} "
                    f"edges and {num_nodes} nodes"
                )
            return spmm(pattern, edge_weight, x)
        if x.dim() == 3:
            return torch.stack([self(x_m, edge_index, w_m) for x_m, w_m in zip(x, edge_weight, strict=True)])
        return self.propagate(edge_index, x=x, edge_weight=edge_weight, size=(num_nodes, num_nodes))

    def message(self, x_j: Tensor, edge_weight: Tensor) -> Tensor:
        return edge_weight.unsqueeze(-1) * x_j
