r"""The ops layer: every tensor operation the models need beyond plain torch, behind one small API.

Models and layers import only these names (``from grcn_bench.models.ops import spmm``), so that a model file reads
as its paper's equations. Threads, caches, the compiled CPU kernels, the choice between them and torch's, and the
order in which gradients are summed all live here. Every op computes the same values on every path (compiled
kernels, torch's CPU kernels, CUDA), within float round-off, and is deterministic on each.

Sparsity patterns (:mod:`.sparse`):

- :class:`CSRPattern`: the pattern of a sparse ``[R, C]`` matrix with its transpose's, built once per graph.
- :func:`graph_pattern`: ``A[target, source]`` of an ``InteractionGraph``, entries in edge order.
- :func:`user_item_pattern`: the ``[U, I]`` pattern of the ``item -> user`` edges.
- :func:`stack_pattern`: the block-diagonal pattern of several copies of one pattern.
- :func:`stacked_rowptr`: the row pointer of several copies of a pattern's rows (segments of ``[M, nnz]`` values).

Sparse products and segment operations (:mod:`.sparse`):

- :func:`spmm`: :math:`\mathbf{y}_r = \sum_{k \in \mathrm{row}(r)} w_k \mathbf{x}_{c_k}`, per channel too.
- :func:`sddmm`: :math:`z_k = \mathbf{a}_{r_k}^\top \mathbf{b}_{c_k}`, one dot product per stored entry.
- :func:`headed_spmm`, :func:`headed_sddmm`: the same for node-major heads ``[n, H, d]`` sharing a pattern.
- :func:`segment_softmax`: softmax over each CSR row's entries (PyG's ``softmax(src, ptr=...)``).
- :func:`segment_reduce`: sum or max over contiguous segments (``torch.segment_reduce``), not differentiable.
- :func:`segment_broadcast`: subtract or divide each segment's rows by one value per segment, not differentiable.

Dense ops (:mod:`.dense`):

- :func:`linear`: ``F.linear``'s values and gradients, optionally for some rows of a larger input (:class:`RowSubset`).
- :func:`rows_apply`: whether ``linear(..., rows=...)`` can compute rows of a product as the whole product does.
- :func:`l2_normalize`: ``F.normalize(x, dim=-1)`` with a one-pass backward.
- :func:`bpr_pair_scores`: a BPR batch's dot-product scores ``(u . i, u . j)``, one gradient buffer per table.

Receptive fields (:mod:`.field`):

- :func:`receptive_field`: the nodes and sub-patterns an ``L``-layer propagation needs for a training batch.

Ranking scores (the evaluator's, :mod:`.native`):

- :func:`dot_scores_apply`: whether :func:`dot_scores` runs here for embeddings of a given width.
- :func:`pack_score_items`: the item embeddings laid out as :func:`dot_scores` reads them.
- :func:`dot_scores`: ``user @ item.T`` with ``torch.mm``'s sums and the maximum of every :data:`SCORE_GROUP` items.

Kernels (:mod:`.native`):

- :func:`kernel_status`: which kernels run, and for every family that runs torch's path, why.
- :func:`family_status`: ``"native"`` or why not, for one family of :data:`FAMILIES`.
- :func:`use_kernels`: run a block with a ``GRCN_BENCH_KERNELS`` choice (:func:`parse_kernels`).
"""

from __future__ import annotations

from .dense import RowSubset, bpr_pair_scores, l2_normalize, linear, rows_apply
from .field import FieldLayer, ReceptiveField, receptive_field
from .native import (
    FAMILIES,
    SCORE_GROUP,
    SCORE_PANEL,
    dot_scores_apply,
    family_status,
    kernel_status,
    pack_score_items,
    parse_kernels,
    use_kernels,
)
from .native import run_dot_scores as dot_scores
from .sparse import (
    CSRPattern,
    graph_pattern,
    headed_sddmm,
    headed_spmm,
    sddmm,
    segment_broadcast,
    segment_reduce,
    segment_softmax,
    spmm,
    stack_pattern,
    stacked_rowptr,
    user_item_pattern,
)

__all__ = [
    "FAMILIES", "SCORE_GROUP", "SCORE_PANEL", "CSRPattern", "FieldLayer", "ReceptiveField", "RowSubset",
    "bpr_pair_scores", "dot_scores", "dot_scores_apply", "family_status", "graph_pattern", "headed_sddmm",
    "headed_spmm", "kernel_status", "l2_normalize", "linear", "pack_score_items", "parse_kernels", "receptive_field",
    "rows_apply", "sddmm", "segment_broadcast", "segment_reduce", "segment_softmax", "spmm", "stack_pattern",
    "stacked_rowptr", "use_kernels", "user_item_pattern",
]
