r"""MMGCN's per-modality graph-convolution layer: aggregation, then combination (docs/protocol.md, "Baselines").

Wei, Wang, Nie, He, Hong and Chua, "MMGCN: Multi-modal Graph Convolution Network for Personalized Recommendation of
Micro-video", ACM MM 2019 (https://doi.org/10.1145/3343031.3351034), Section 3 (aggregation and combination layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import MessagePassing

from ..ops import CSRPattern, RowSubset, linear, spmm
from .content import reset_xavier, xavier_linear


def mean_weights(edge_index: Tensor, degree: Tensor) -> Tensor:
    """``[E]`` weight ``1 / |N(target)|`` of every directed edge: a weighted sum with them is the neighbour mean."""
    return degree.to(torch.get_default_dtype())[edge_index[1]].reciprocal()


class AggregateCombineConv(MessagePassing):
    r"""One MMGCN layer in one modality: mean aggregation of the neighbours, then concatenation combination.

    .. math::
        \mathbf{h}_v = \operatorname{LeakyReLU}\Big(\frac{1}{|\mathcal{N}(v)|} \sum_{j \in \mathcal{N}(v)}
            \mathbf{W}_1 \mathbf{x}_j\Big), \qquad
        \hat{\mathbf{x}}_v = \operatorname{LeakyReLU}(\mathbf{W}_2 \mathbf{x}_v + \mathbf{b}_2) + \mathbf{e}_v

    .. math::
        \mathbf{x}'_v = \operatorname{LeakyReLU}\big(\mathbf{W}_3 [\mathbf{h}_v \,\|\, \hat{\mathbf{x}}_v]
            + \mathbf{b}_3\big)

    :math:`\mathbf{x}_v` is the node's representation in this modality (a user's preference vector or an item's
    projected features at the first layer), :math:`\mathbf{e}_v` its ID embedding, shared by every modality. The
    aggregation weight has no bias, so the mean of the transformed neighbours equals the transform of their mean
    (computed that way); a node without neighbours aggregates the zero vector.

    Args:
        in_channels: input width of :math:`\mathbf{x}`.
        out_channels: output width, equal to the ID-embedding width.
        negative_slope: LeakyReLU slope (0.01, PyTorch's default, as in the MMGCN release).

    Shapes:
        - **input:** ``x [N, in]``, ``id_embedding [N, out]``, ``edge_index [2, E]`` (row 0 source, row 1 target),
          and optionally the graph's ``graph_pattern`` with ``mean_weight [E]`` (:func:`mean_weights`): then the mean
          runs as one CSR product (the op ``spmm``) instead of PyG's gather and scatter-mean, which stays as the
          reference path.
        - **receptive field** (the op ``receptive_field``): with ``pattern`` restricted to some rows (its columns:
          the rows of ``x``), ``x_self`` (those rows' own inputs), ``id_embedding`` at those rows and ``rows`` (their
          ids in the whole graph), the output is the whole layer's at those rows, with the same gradients.
        - **output:** ``[N, out]`` (or ``[len(rows), out]``).
    """

    def __init__(self, in_channels: int, out_channels: int, *, negative_slope: float = 0.01):
        super().__init__(aggr="mean")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.negative_slope = negative_slope
        self.aggregate_lin = xavier_linear(in_channels, out_channels, bias=False)  # W_1
        self.self_lin = xavier_linear(in_channels, out_channels)  # W_2
        self.combine_lin = xavier_linear(2 * out_channels, out_channels)  # W_3

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for lin in (self.aggregate_lin, self.self_lin, self.combine_lin):
            reset_xavier(lin)

    def forward(
        self,
        x: Tensor,
        id_embedding: Tensor,
        edge_index: Tensor,
        *,
        pattern: CSRPattern | None = None,
        mean_weight: Tensor | None = None,
        x_self: Tensor | None = None,
        rows: RowSubset | None = None,
    ) -> Tensor:
        if (pattern is None) != (mean_weight is None):
            raise ValueError("AggregateCombineConv: pass both pattern and mean_weight for the sparse path, or neither")
        if (x_self is None) != (rows is None) or rows is not None and pattern is None:
            raise ValueError("AggregateCombineConv: the rows of a receptive field need pattern, mean_weight, x_self "
                             "and rows together")
        mean = self.propagate(edge_index, x=x) if pattern is None else spmm(pattern, mean_weight, x)
        x_self = x if x_self is None else x_self
        slope = self.negative_slope
        # In-place activations act on fresh products whose backward does not read them: the same values, one
        # [N, out] allocation fewer each.
        # ops.linear: F.linear's values and gradients.
        h = F.leaky_relu(linear(mean, self.aggregate_lin.weight, rows=rows), slope, inplace=True)
        x_hat = F.leaky_relu(linear(x_self, self.self_lin.weight, self.self_lin.bias, rows=rows), slope, inplace=True)
        x_hat = x_hat + id_embedding
        # W_3 [h ‖ x_hat] + b_3 as W_3[:, :out] h + b_3, then W_3[:, out:] x_hat accumulated into it: no [N, 2 out]
        # concatenation to write and to slice the gradient of (equal up to round-off).
        weight = self.combine_lin.weight
        out = linear(h, weight[:, : self.out_channels], self.combine_lin.bias, rows=rows)
        out = linear(x_hat, weight[:, self.out_channels :], add=out, rows=rows)
        return F.leaky_relu(out, slope, inplace=True)

    def message(self, x_j: Tensor) -> Tensor:
        return x_j

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels})"
