r"""A training batch's receptive field: the nodes, edges and rows that an :math:`L`-layer propagation needs to compute
the batch's representations, and nothing else.

A BPR batch reads the final representations of its users and items only (a batch of 1,024 triplets touches about
3,000 of Tiktok's 112,741 nodes). In a layer that combines each node with its neighbours, node :math:`v`'s output at
layer :math:`l` reads layer :math:`l-1` at :math:`v` and its neighbours, so the batch needs

.. math::
    V_L = \text{batch nodes}, \qquad V_{l-1} = V_l \cup \mathcal{N}(V_l) \quad (l = L, \dots, 1)

(at Tiktok's full scale with two layers: 2.7 %, 35 % and 86 % of the nodes). PyG's ``k_hop_subgraph`` finds these
node sets too (the tests use it as the oracle), but from a mask over every edge per hop and without the per-layer CSR
sub-patterns, their transposes and edge ids that the layers run on. A model that computes layer :math:`l`
only at :math:`V_l` does about a third of the full forward's products, and the gradients it gets are the full
forward's: the other rows' gradients are exactly zero.

Bit for bit, not only in exact arithmetic, as long as every operation computes each row (or entry) on its own and
sums in an order that does not depend on the other rows: the sparse products over :attr:`ReceptiveField.patterns`
keep every row's entries in the graph's order (a zero gradient term adds an exact zero to a chain), and the dense
products keep their sums through :func:`~.dense.linear` with ``rows`` (the weight gradient summed in the full
product's blocks). Where an operation's last bit depends on where an element sits (torch's softmax over a
non-last dimension computes the last columns of each thread's share on a scalar path), or autograd adds a tensor's
gradient contributions in another order, the results agree with the full forward's within float round-off; the
models' tests compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dense import RowSubset
from .sparse import CSRPattern

__all__ = ["FieldLayer", "ReceptiveField", "receptive_field"]


@dataclass(frozen=True)
class FieldLayer:
    """What layer ``l`` of a :class:`ReceptiveField` reads and writes (see there).

    Args:
        pattern: the graph's pattern restricted to the output rows, columns numbered by input position.
        edges: the graph's edge id of every entry of ``pattern``.
        self_positions: the positions of the output nodes among the input nodes.
        input_rows: the input nodes (``nodes[l - 1]``) as rows of the whole graph's node tensors.
        rows: the output nodes (``nodes[l]``) likewise.
        num_edges: the graph's edge count (per-edge tensors of the whole graph are this long).
    """

    pattern: CSRPattern
    edges: Tensor
    self_positions: Tensor
    input_rows: RowSubset
    rows: RowSubset
    num_edges: int


@dataclass(frozen=True)
class ReceptiveField:
    """The nodes and sub-patterns an ``L``-layer propagation needs for the outputs at ``nodes[L]``.

    Args:
        nodes: ``L + 1`` sorted int64 node ids: ``nodes[l]`` are the nodes whose layer-``l`` output is needed
            (``nodes[0]``: the layer-0 inputs; ``nodes[L]``: the batch's nodes).
        patterns: ``L`` patterns; ``patterns[l - 1]`` is the graph's ``A[target, source]`` restricted to the rows
            ``nodes[l]``, its columns numbered by position in ``nodes[l - 1]``; every row keeps all its entries, in
            the graph's order, and the transpose keeps the graph's order too.
        edges: ``L`` int64 tensors; ``edges[l - 1][k]`` is the graph's edge id of entry ``k`` of ``patterns[l - 1]``
            (to gather per-edge values such as normalisation weights).
        self_positions: ``L`` int64 tensors; ``self_positions[l - 1]`` are the positions of ``nodes[l]`` in
            ``nodes[l - 1]`` (a node's own previous-layer row).
        num_nodes: the graph's node count ``N``.
        num_edges: the graph's (directed) edge count.
    """

    nodes: tuple[Tensor, ...]
    patterns: tuple[CSRPattern, ...]
    edges: tuple[Tensor, ...]
    self_positions: tuple[Tensor, ...]
    num_nodes: int
    num_edges: int

    @property
    def num_layers(self) -> int:
        return len(self.patterns)

    def rows(self, layer: int) -> RowSubset:
        """The rows ``nodes[layer]`` of an ``[N, d]`` node tensor, for :func:`~.dense.linear`."""
        return RowSubset(self.nodes[layer], self.num_nodes)

    def layer(self, layer: int) -> FieldLayer:
        """Layer ``layer`` (1 to ``L``): from ``nodes[layer - 1]`` to ``nodes[layer]``."""
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {layer}")
        return FieldLayer(self.patterns[layer - 1], self.edges[layer - 1], self.self_positions[layer - 1],
                          self.rows(layer - 1), self.rows(layer), self.num_edges)


# The walk below gathers from tables with one entry per edge or node: as int32 (every id fits) those random reads
# touch half the memory of int64 tables and run several times faster.
_INDEX = torch.int32


def _lookup(size: int, index: Tensor) -> Tensor:
    """``[size]``: position of each value of ``index`` in it, ``-1`` where absent."""
    table = torch.full((size,), -1, dtype=_INDEX, device=index.device)
    table[index] = torch.arange(index.numel(), dtype=_INDEX, device=index.device)
    return table


def _edges_into(rowptr: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The graph's edge ids into each of ``targets``, concatenated in edge order, and the count per target."""
    starts = rowptr.index_select(0, targets)
    counts = rowptr.index_select(0, targets + 1) - starts
    first = torch.cumsum(counts, 0, dtype=counts.dtype) - counts  # where each target's edges start
    total = int(counts.sum())
    edges = torch.repeat_interleave(starts - first, counts, output_size=total)
    return edges + torch.arange(total, dtype=edges.dtype, device=rowptr.device), counts


def _ptr(counts: Tensor) -> Tensor:
    ptr = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def _layer(graph, tables: tuple[Tensor, Tensor], targets: Tensor) -> tuple[Tensor, CSRPattern, Tensor, Tensor]:
    """The inputs ``targets ∪ N(targets)`` of one layer (int64, sorted), the pattern from them to ``targets``, its
    edge ids and the targets' positions among the inputs."""
    n = graph.num_nodes
    rowptr, source = tables
    edges, counts = _edges_into(rowptr, targets)
    sources = source.index_select(0, edges)
    needed = torch.zeros(n, dtype=torch.bool, device=targets.device)
    needed[targets] = True
    needed[sources] = True
    inputs = needed.nonzero().flatten()  # sorted
    col = _lookup(n, inputs).index_select(0, sources)
    # The transpose's order: by column, and within a column by row as stored (a stable sort), as the graph's own.
    t_perm = torch.argsort(col, stable=True)
    rows = torch.repeat_interleave(torch.arange(targets.numel(), dtype=_INDEX, device=targets.device), counts,
                                   output_size=edges.numel())
    pattern = CSRPattern(
        rowptr=_ptr(counts),
        col=col,
        t_rowptr=_ptr(torch.bincount(col, minlength=inputs.numel()).to(_INDEX)),
        t_col=rows.index_select(0, t_perm),
        t_perm=t_perm,
        num_rows=targets.numel(),
        num_cols=inputs.numel(),
    )
    return inputs, pattern, edges.long(), _lookup(n, inputs).index_select(0, targets).long()


def receptive_field(graph, seeds: Tensor, num_layers: int) -> ReceptiveField:
    """The :class:`ReceptiveField` of ``seeds`` (node ids, any order, repeats allowed) in an
    :class:`~grcn_bench.datasets.base.InteractionGraph`, for ``num_layers`` layers."""
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    seeds = seeds.long()
    if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= graph.num_nodes):
        raise ValueError(f"seed nodes must lie in 0..{graph.num_nodes - 1}")
    if graph.num_edges >= 2**31 or graph.num_nodes >= 2**31:
        raise ValueError("receptive_field: graphs of 2**31 edges or nodes and more are not supported")
    tables = (graph.rowptr.to(_INDEX), graph.edge_index[0].to(_INDEX))
    nodes = [torch.unique(seeds)]  # sorted
    patterns, edges, positions = [], [], []
    for _ in range(num_layers):
        inputs, pattern, layer_edges, self_position = _layer(graph, tables, nodes[0])
        nodes.insert(0, inputs)
        patterns.insert(0, pattern)
        edges.insert(0, layer_edges)
        positions.insert(0, self_position)
    return ReceptiveField(tuple(nodes), tuple(patterns), tuple(edges), tuple(positions), graph.num_nodes,
                          graph.num_edges)
