r"""DisenGCN's neighbourhood-routing layer, DisenConv (docs/protocol.md, "Baselines").

Ma, Cui, Kuang, Wang and Zhu, "Disentangled Graph Convolutional Networks", ICML 2019
(http://proceedings.mlr.press/v97/ma19a.html), Section 3 and Algorithm 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import MessagePassing

from ..ops import CSRPattern, FieldLayer, RowSubset, l2_normalize, linear, sddmm, spmm
from .content import reset_xavier, xavier_linear

#: The channel projection's activation :math:`\sigma`: ReLU (the paper's experiments), LeakyReLU (slope 0.2), tanh,
#: or none (the identity).
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "none")


class NeighRoutingConv(MessagePassing):
    r"""DisenConv: each node's representation is split into :math:`K` channels, and neighbourhood routing decides
    which channel each neighbour's message belongs to (Algorithm 1), over the full neighbourhood (no sampling).

    .. math::
        \mathbf{z}_{j,k} = \frac{\sigma(\mathbf{W}_k^\top \mathbf{x}_j + \mathbf{b}_k)}
            {\lVert \sigma(\mathbf{W}_k^\top \mathbf{x}_j + \mathbf{b}_k) \rVert_2}, \qquad
        \mathbf{c}_{u,k} \leftarrow \mathbf{z}_{u,k}

    then ``iterations`` times, for every neighbour :math:`j \in \mathcal{N}(u)`:

    .. math::
        p_{j,k} = \frac{\exp(\mathbf{z}_{j,k}^\top \mathbf{c}_{u,k} / \tau)}
            {\sum_{k'} \exp(\mathbf{z}_{j,k'}^\top \mathbf{c}_{u,k'} / \tau)}, \qquad
        \mathbf{c}_{u,k} \leftarrow \frac{\mathbf{z}_{u,k} + \sum_{j} p_{j,k} \mathbf{z}_{j,k}}
            {\lVert \mathbf{z}_{u,k} + \sum_{j} p_{j,k} \mathbf{z}_{j,k} \rVert_2}

    and the output is :math:`\mathbf{y}_u = \mathbf{c}_{u,1} \| \cdots \| \mathbf{c}_{u,K}`. :math:`\sigma` is
    ``activation``: ReLU by default, as in the paper's experiments (then every channel lies in the non-negative
    orthant); ``"leaky_relu"`` (slope 0.2), ``"tanh"`` or ``"none"`` keep signs. ``p`` is a softmax over channels,
    separately for each directed edge (a neighbour splits its unit of influence between the target's channels); a
    node without neighbours keeps :math:`\mathbf{z}_u`. Zero iterations return :math:`\mathbf{z}_u`. A channel whose
    activation output is all zero stays the zero vector (normalisation uses a small epsilon).

    Args:
        in_channels: input width.
        num_channels: :math:`K` (4).
        channel_dim: width of each channel (16); the output width is ``num_channels * channel_dim``.
        iterations: routing iterations (3).
        tau: softmax temperature :math:`\tau` (1).
        activation: :math:`\sigma`, one of :data:`ACTIVATIONS` (``"relu"``).

    Shapes:
        - **input:** node features ``[N, in]``, ``edge_index [2, E]`` (row 0 source, row 1 target), and optionally
          ``pattern``, the graph's ``graph_pattern``: then each routing step runs as one sampled product (the
          agreements, all channels at once) and one sparse product (the routed sums) with channel-major operands
          ``[K, N, channel_dim]`` (the ops ``sddmm`` and ``spmm``), instead of PyG's ``[E, K, channel_dim]``
          gathers, which stay as the reference path. Or ``field``, a training batch's receptive-field layer
          (``receptive_field(...).layer(l)``): ``x`` holds its input rows, the output its output rows, the same
          routing over the field's pattern.
        - **output:** ``[N, K * channel_dim]`` (and, with ``return_probabilities``, ``p`` of the last iteration
          ``[E, K]`` in edge order, zeros when ``iterations`` is 0).
    """

    def __init__(self, in_channels: int, num_channels: int, channel_dim: int, *, iterations: int = 3, tau: float = 1.0,
                 activation: str = "relu"):
        super().__init__(aggr="sum", node_dim=0)  # node features are [N, K, channel_dim]
        if num_channels < 1 or channel_dim < 1 or iterations < 0 or tau <= 0:
            raise ValueError(
                f"need num_channels >= 1, channel_dim >= 1, iterations >= 0, tau > 0; "
                f"got {num_channels}, {channel_dim}, {iterations}, {tau}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_channels = in_channels
        self.num_channels, self.channel_dim = num_channels, channel_dim
        self.iterations, self.tau = iterations, tau
        self.activation = activation
        self.lin = xavier_linear(in_channels, num_channels * channel_dim)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        reset_xavier(self.lin)

    def channels(self, x: Tensor, rows: RowSubset | None = None) -> Tensor:
        r"""``[N, K, channel_dim]``: the per-channel projections, :math:`\sigma` (``activation``), each channel
        L2-normalised (``rows``: ``x`` holds these rows of the graph's nodes, the op ``linear``). Every activation
        is elementwise, so rows of ``x`` give those rows of the result."""
        z = linear(x, self.lin.weight, self.lin.bias, rows=rows)
        if self.activation == "relu":
            z = F.relu(z, inplace=True)  # in place on a fresh product
        elif self.activation == "leaky_relu":
            z = F.leaky_relu(z, 0.2, inplace=True)
        elif self.activation == "tanh":
            z = torch.tanh(z)
        z = z.view(-1, self.num_channels, self.channel_dim)
        return l2_normalize(z)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        *,
        pattern: CSRPattern | None = None,
        field: FieldLayer | None = None,
        return_probabilities: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if field is not None:
            out, p = self._route(self.channels(x, field.input_rows), field.pattern, field.self_positions)
        elif pattern is not None:
            out, p = self._route(self.channels(x), pattern)
        else:  # reference path: PyG gathers [E, K, channel_dim] per step
            z = self.channels(x)
            c = z
            p = z.new_zeros(edge_index.size(1), self.num_channels)
            for _ in range(self.iterations):
                p = self.edge_updater(edge_index, z=z, c=c)
                routed = self.propagate(edge_index, z=z, p=p)
                c = F.normalize(z + routed, dim=-1)
            out = c.reshape(-1, self.num_channels * self.channel_dim)
        return (out, p) if return_probabilities else out

    def _route(self, z: Tensor, pattern: CSRPattern, self_positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Algorithm 1's loop over ``pattern`` (rows: the targets; columns: the rows of ``z``, ``[N_in, K, d]``),
        channel-major: per step one sampled product (the agreements, ``[K, nnz]``) and one sparse product (the
        routed sums). ``self_positions``: the targets' rows in ``z`` (a receptive field's layer), else every row."""
        k, d = self.num_channels, self.channel_dim
        z_k = z.transpose(0, 1).contiguous()  # [K, N_in, d]: channel k's nodes
        own = z_k if self_positions is None else z_k.index_select(1, self_positions)  # z_u,k of the targets
        c = own
        p = z.new_zeros(k, pattern.nnz) if self.iterations == 0 else None  # else the last iteration's
        for _ in range(self.iterations):
            agreement = sddmm(pattern, c, z_k)  # [K, nnz]: z_j,k . c_u,k
            p = torch.softmax(agreement / self.tau, dim=0)  # over channels, per edge
            routed = spmm(pattern, p, z_k)  # sum_j p_j,k z_j,k
            c = l2_normalize(own + routed)
        out = c.transpose(0, 1).reshape(-1, k * d)
        return out, p.t()

    def edge_update(self, z_j: Tensor, c_i: Tensor) -> Tensor:
        # Agreement of neighbour j's channel k with the target's current centre of channel k; softmax over channels.
        return torch.softmax((z_j * c_i).sum(-1) / self.tau, dim=-1)

    def message(self, z_j: Tensor, p: Tensor) -> Tensor:
        return p.unsqueeze(-1) * z_j

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, channels={self.num_channels}x{self.channel_dim}, "
            f"iterations={self.iterations}, tau={self.tau}, activation={self.activation})"
        )
