r"""NGCF's embedding-propagation layer (docs/protocol.md, "Baselines").

Wang, He, Wang, Feng and Chua, "Neural Graph Collaborative Filtering", SIGIR 2019
(https://arxiv.org/abs/1905.08108), Section 2.2, Eqs. 3-4 (message construction and aggregation) and Eq. 7 (the
matrix form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import MessagePassing

from ..ops import CSRPattern, linear, spmm
from .content import reset_xavier, xavier_linear


def symmetric_norm(edge_index: Tensor, degree: Tensor) -> Tensor:
    r"""``[E]`` graph-Laplacian factor :math:`1/\sqrt{|\mathcal{N}_u||\mathcal{N}_i|}` of every directed edge (NGCF
    Eq. 3), from the node degrees. Every endpoint of an edge has degree ≥ 1, so no division by zero."""
    deg = degree.to(torch.get_default_dtype())
    return deg[edge_index[0]].rsqrt() * deg[edge_index[1]].rsqrt()


class BiInteractionConv(MessagePassing):
    r"""One NGCF propagation layer: the bi-interaction message and the self-connection (NGCF Eqs. 3-4).

    .. math::
        \mathbf{m}_{u \leftarrow i} = \frac{1}{\sqrt{|\mathcal{N}_u||\mathcal{N}_i|}}
            \left(\mathbf{W}_1 \mathbf{e}_i + \mathbf{W}_2 (\mathbf{e}_i \odot \mathbf{e}_u)\right), \qquad
        \mathbf{m}_{u \leftarrow u} = \mathbf{W}_1 \mathbf{e}_u

    .. math::
        \mathbf{e}_u' = \operatorname{LeakyReLU}\Big(\mathbf{m}_{u \leftarrow u}
            + \sum_{i \in \mathcal{N}_u} \mathbf{m}_{u \leftarrow i}\Big)

    Because :math:`\mathbf{W}_1`, :math:`\mathbf{W}_2` and :math:`\odot \mathbf{e}_u` are linear and
    :math:`\mathbf{e}_u` is the same for every message to :math:`u`, the sum of messages equals
    :math:`\mathbf{W}_1 \mathbf{s}_u + \mathbf{W}_2 (\mathbf{s}_u \odot \mathbf{e}_u)` with
    :math:`\mathbf{s}_u = \sum_i \frac{1}{\sqrt{|\mathcal{N}_u||\mathcal{N}_i|}} \mathbf{e}_i`, which is NGCF's
    matrix form (Eq. 7): one propagation of :math:`\mathbf{e}` per layer (a sparse product on the fast path) instead
    of two matrix products per edge. The paper's weights have no bias (Eq. 3), nor do these.

    Args:
        in_channels: input width.
        out_channels: output width.
        negative_slope: LeakyReLU slope (0.2, TensorFlow's default, as in the NGCF release; the paper gives none).

    Shapes:
        - **input:** node features ``[N, in]``, ``edge_index [2, E]`` (row 0 source, row 1 target), ``norm [E]``
          in edge order, and optionally ``pattern``, the graph's ``graph_pattern``: then the
          propagation runs as one CSR product (the op ``spmm``, forward and backward) instead of PyG's
          ``[E, d]`` gather and scatter, which stays as the reference path.
        - **output:** ``[N, out]``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, negative_slope: float = 0.2):
        super().__init__(aggr="sum")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.negative_slope = negative_slope
        self.lin1 = xavier_linear(in_channels, out_channels, bias=False)
        self.lin2 = xavier_linear(in_channels, out_channels, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        reset_xavier(self.lin1)
        reset_xavier(self.lin2)

    def forward(self, x: Tensor, edge_index: Tensor, norm: Tensor, *, pattern: CSRPattern | None = None) -> Tensor:
        # s_u = sum_i norm_ui e_i
        side = self.propagate(edge_index, x=x, norm=norm) if pattern is None else spmm(pattern, norm, x)
        # W1 (x + s) + W2 (s ⊙ x), the second product accumulated in place into the first (no separate sum to
        # write), the activation in place too: both act on fresh products whose backward does not read them.
        out = linear(x + side, self.lin1.weight)
        out = linear(side * x, self.lin2.weight, add=out)
        return F.leaky_relu(out, self.negative_slope, inplace=True)

    def message(self, x_j: Tensor, norm: Tensor) -> Tensor:
        return norm.unsqueeze(-1) * x_j

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels})"
