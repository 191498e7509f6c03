r"""Fast paths of the PyG layers that the baselines use, over the CSR structure of an
:class:`~grcn_bench.datasets.base.InteractionGraph`: the same arithmetic as the PyG ``forward`` they replace, with
propagations that run as CSR products (:mod:`grcn_bench.models.ops`) whose backward passes reuse the graph's own
transpose, where PyG gathers and scatters one message per edge (at Tiktok scale, 1.1 M directed edges, that is most
of a batch).

- :class:`CSRSAGEConv`: :class:`~torch_geometric.nn.SAGEConv` (Hamilton et al., NeurIPS 2017, Algorithm 1) whose
  forward also takes the graph; the neighbour mean is :func:`mean_aggregate`.
- :class:`CSRGATConv`: :class:`~torch_geometric.nn.GATConv` (Veličković et al., ICLR 2018, Eqs. 1-5) whose forward
  also takes the graph, meaning its edges plus one self-loop per node; the softmax runs over CSR segments with the
  self-loop apart (:class:`SelfLoopSoftmax`, logits by :class:`EdgeScoreSum`) and the heads aggregate as one
  headed product (the op ``headed_spmm``).

Both layer classes are the PyG classes with one more accepted input: same constructor, parameters and state dict,
and PyG's own forward for an ``edge_index`` (the reference path the tests compare with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch_geometric.nn import GATConv, SAGEConv

from grcn_bench.datasets.base import InteractionGraph

from ..ops import CSRPattern, graph_pattern, headed_spmm, linear, segment_broadcast, segment_reduce, spmm


def mean_aggregate(pattern: CSRPattern, x: Tensor, degree: Tensor) -> Tensor:
    r"""``[R, d]`` mean of each row's neighbours, :math:`\frac{1}{|\mathcal{N}(v)|}\sum_{j \in \mathcal{N}(v)}
    \mathbf{x}_j` (the zero vector for a node without neighbours).

    The sum is one CSR product with unit values, then a division by the degree: the operations of PyG's
    ``spmm(adj_t, x, reduce="mean")`` on a CSR ``adj_t`` (bit for bit, a test checks it), with a backward that
    reuses ``pattern``'s transpose where torch's own rebuilds it at every call.

    Args:
        pattern: the ``[R, C]`` pattern, e.g. ``graph_pattern`` of the graph.
        x: ``[C, d]`` neighbour features.
        degree: ``[R]`` number of entries of each row (``graph.degree()``).
    """
    total = spmm(pattern, x.new_ones(pattern.nnz), x)
    return total / degree.clamp(min=1).to(x.dtype).unsqueeze(-1)


class CSRSAGEConv(SAGEConv):
    r""":class:`~torch_geometric.nn.SAGEConv` that also takes an :class:`InteractionGraph` as its ``edge_index``.

    .. math::
        \mathbf{h}_v = \mathbf{W}_1 \frac{1}{|\mathcal{N}(v)|} \sum_{j \in \mathcal{N}(v)} \mathbf{x}_j
            + \mathbf{W}_2 \mathbf{x}_v + \mathbf{b}

    (L2-normalised when ``normalize``). Given the graph, the mean is :func:`mean_aggregate` and the rest is PyG's
    forward step by step, so the output is bit for bit ``SAGEConv.forward(x, adj_t)`` on the graph's CSR ``adj_t``;
    only the backward differs (the transpose is reused, not rebuilt). With the graph, the layer must have
    ``aggr="mean"``, ``root_weight=True`` and ``project=False`` (``ValueError`` otherwise); any other input is
    PyG's own forward.

    Shapes:
        - **input:** ``x [N, in]``, ``edge_index``: an :class:`InteractionGraph` or anything ``SAGEConv`` takes.
        - **output:** ``[N, out]``.
    """

    def forward(self, x: Tensor, edge_index, size=None) -> Tensor:
        if not isinstance(edge_index, InteractionGraph):
            return super().forward(x, edge_index, size)
        if self.aggr != "mean" or not self.root_weight or self.project or size is not None:
            raise ValueError("CSRSAGEConv takes a graph only with aggr='mean', root_weight=True, project=False")
        mean = mean_aggregate(graph_pattern(edge_index), x, edge_index.degree())
        out = linear(mean, self.lin_l.weight, self.lin_l.bias) + linear(x, self.lin_r.weight, self.lin_r.bias)
        return F.normalize(out, p=2.0, dim=-1) if self.normalize else out


class SelfLoopSoftmax(torch.autograd.Function):
    r"""Softmax over each CSR row's entries and one extra "self" entry per row.

    For row ``r`` with entries ``z_k`` and self logit ``s_r``:
    :math:`m_r = \max(\max_k z_k, s_r)`, :math:`d_r = \sum_k e^{z_k - m_r} + e^{s_r - m_r} + 10^{-16}`,
    :math:`p_k = e^{z_k - m_r} / d_r`, :math:`q_r = e^{s_r - m_r} / d_r`: PyG's ``softmax`` over the edges of a graph
    whose self-loops come after its other edges (the sums in that order). Backward in one pass:
    :math:`\partial z_k = p_k (\partial p_k - t_r)`, :math:`\partial s_r = q_r (\partial q_r - t_r)` with
    :math:`t_r = \sum_k p_k \partial p_k + q_r \partial q_r`.

    Shapes: ``logits [nnz, H]`` in CSR order, ``self_logits [R, H]``, ``rowptr [R+1]`` → ``([nnz, H], [R, H])``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, self_logits: Tensor, rowptr: Tensor) -> tuple[Tensor, Tensor]:
        rowptr = rowptr.long()
        # An empty row's segment maximum is -inf; its self logit then decides.
        row_max = torch.maximum(segment_reduce(logits, "max", rowptr), self_logits)
        out = segment_broadcast(logits, rowptr, row_max, "sub").exp_()
        self_out = (self_logits - row_max).exp()
        total = segment_reduce(out, "sum", rowptr) + self_out + 1e-16
        segment_broadcast(out, rowptr, total, "div", out=out)
        self_out = self_out / total
        ctx.save_for_backward(out, self_out, rowptr)
        return out, self_out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, self_grad: Tensor) -> tuple[Tensor, Tensor, None]:
        out, self_out, rowptr = ctx.saved_tensors
        dot = segment_reduce(out * grad, "sum", rowptr) + self_out * self_grad
        grad_logits = out * segment_broadcast(grad, rowptr, dot, "sub")
        return grad_logits, self_out * (self_grad - dot), None


class EdgeScoreSum(torch.autograd.Function):
    r"""``[nnz, H]`` per-edge sum of a source score and a target score, :math:`z_e = a_{s_e} + b_{t_e}`, over a
    symmetric graph whose edges are sorted by target (an :class:`~grcn_bench.datasets.base.InteractionGraph`).

    The backward sums each node's edges as CSR segments, where autograd would scatter ``[nnz, H]`` with an
    expanded index: :math:`\partial b_v = \sum_{e: t_e = v} \partial z_e` is the segment of row ``v``, and
    :math:`\partial a_v = \sum_{e: s_e = v} \partial z_e = \sum_{e: t_e = v} \partial z_{\mathrm{rev}(e)}`
    because the edges leaving ``v`` are the reverses of the edges entering it.
    """

    @staticmethod
    def forward(ctx, source_score: Tensor, target_score: Tensor, graph: InteractionGraph) -> Tensor:
        ctx.graph = graph
        return source_score.index_select(0, graph.edge_index[0]) + target_score.index_select(0, graph.edge_index[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        graph: InteractionGraph = ctx.graph
        grad_source = grad_target = None
        if ctx.needs_input_grad[1]:
            grad_target = segment_reduce(grad, "sum", graph.rowptr)
        if ctx.needs_input_grad[0]:
            reversed_grad = grad.index_select(0, graph.reverse_edge)
            grad_source = segment_reduce(reversed_grad, "sum", graph.rowptr)
        return grad_source, grad_target, None


def attention_matrix(att_src: Tensor, att_dst: Tensor) -> Tensor:
    """``[H*C, 2H]``: column ``k`` holds head ``k``'s source attention vector in rows ``k*C .. k*C+C-1``, column
    ``H+k`` its target attention vector, zeros elsewhere (``att_*`` are GATConv's ``[1, H, C]`` parameters)."""
    _, heads, channels = att_src.shape
    eye = torch.eye(heads, dtype=att_src.dtype, device=att_src.device).view(heads, 1, heads)
    blocks = [(att.view(heads, channels, 1) * eye).reshape(heads * channels, heads) for att in (att_src, att_dst)]
    return torch.cat(blocks, dim=1)


class CSRGATConv(GATConv):
    r""":class:`~torch_geometric.nn.GATConv` that also takes an :class:`InteractionGraph` as its ``edge_index``,
    meaning the graph's edges followed by one self-loop per node (:func:`~grcn_bench.models.gat.with_self_loops`).

    .. math::
        \alpha^{h}_{vj} = \operatorname{softmax}_{j \in \mathcal{N}(v) \cup \{v\}}\Big(\operatorname{LeakyReLU}
            \big({\mathbf{a}^h_{src}}^\top \mathbf{W}^h \mathbf{x}_j + {\mathbf{a}^h_{dst}}^\top \mathbf{W}^h
            \mathbf{x}_v\big)\Big), \qquad
        \mathbf{h}^h_v = \sum_{j \in \mathcal{N}(v) \cup \{v\}} \alpha^{h}_{vj} \mathbf{W}^h \mathbf{x}_j

    then the heads concatenated (or averaged) plus the bias, as PyG does. Given the graph, the node scores of all
    heads are one product with :func:`attention_matrix`, the softmax runs over CSR segments with the self-loop apart
    (:class:`SelfLoopSoftmax`) and the weighted sum is a sparse product plus the self term (all heads in one pass,
    the op ``headed_spmm``), where PyG gathers and scatters ``[E + N, H, C]`` messages.
    Values can differ in float round-off only (the order of the terms of the attention logits and of the weighted
    sums). With the graph, the layer must have ``add_self_loops=False`` (the self-loops are the graph input's), one
    shared input projection, no edge features and no residual (``ValueError`` otherwise); any other input is PyG's
    own forward.

    Shapes:
        - **input:** ``x [N, in]``, ``edge_index``: an :class:`InteractionGraph` or anything ``GATConv`` takes.
        - **output:** ``[N, H*C]`` (``[N, C]`` without ``concat``); with ``return_attention_weights`` and a graph,
          ``(out, alpha)`` with ``alpha [E, H]`` the coefficients of the graph's edges in edge order (the
          self-loops' left out).
    """

    def forward(self, x: Tensor, edge_index, edge_attr=None, size=None, return_attention_weights=None):
        if not isinstance(edge_index, InteractionGraph):
            return super().forward(x, edge_index, edge_attr, size, return_attention_weights)
        if self.add_self_loops or self.lin is None or self.res is not None or self.lin_edge is not None:
            raise ValueError("CSRGATConv takes a graph only with add_self_loops=False, one shared input projection, "
                             "no edge features and no residual connection")
        if edge_attr is not None or size is not None:
            raise ValueError("CSRGATConv takes no edge_attr or size with a graph")
        out, alpha = self._attend(x, edge_index)
        return (out, alpha) if return_attention_weights else out

    def _attend(self, x: Tensor, graph: InteractionGraph) -> tuple[Tensor, Tensor]:
        heads, channels, num_nodes = self.heads, self.out_channels, graph.num_nodes
        h = linear(x, self.lin.weight, self.lin.bias).view(-1, heads, channels)
        # a_src . W^h x and a_dst . W^h x of every node and head as one [N, H*C] x [H*C, 2H] product with a
        # block-diagonal matrix of the attention vectors (PyG multiplies and sums [N, H, C] twice; same values up to
        # round-off, a fraction of the passes forward and backward).
        scores = h.view(num_nodes, heads * channels) @ attention_matrix(self.att_src, self.att_dst)
        score_src, score_dst = scores[:, :heads], scores[:, heads:]
        logits = EdgeScoreSum.apply(score_src, score_dst, graph)  # alpha_j + alpha_i per edge, PyG's order (Eq. 1)
        self_logits = score_src + score_dst
        logits = F.leaky_relu(logits, self.negative_slope)
        self_logits = F.leaky_relu(self_logits, self.negative_slope)
        alpha, self_alpha = SelfLoopSoftmax.apply(logits, self_logits, graph.rowptr)
        if self.training and self.dropout > 0:  # one dropout over [edges; self-loops], as PyG draws it
            dropped = F.dropout(torch.cat([alpha, self_alpha]), p=self.dropout, training=True)
            alpha, self_alpha = dropped[: graph.num_edges], dropped[graph.num_edges :]
        pattern = graph_pattern(graph)
        if heads == 1:
            out = spmm(pattern, alpha.view(-1), h.view(num_nodes, channels)).unsqueeze(1)
        else:  # all heads in one pass over the edges: the sums of one product per head
            out = headed_spmm(pattern, alpha, h)
        # The self-loop's message, last as in PyG's edge order; in place on the fresh product (its backward does
        # not read it), as is the bias below on the fresh reshaped (or averaged) output.
        out = out.addcmul_(self_alpha.unsqueeze(-1), h)
        out = out.reshape(num_nodes, heads * channels) if self.concat else out.mean(dim=1)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out, alpha
