r"""DisenGCN's neighbourhood-routing layer, DisenConv (docs/protocol.md, "Baselines").

Ma, Cui, Kuang, Wang and Zhu, "Disentangled Graph Convolutional Networks", ICML 2019
(http://proceedings.mlr.press/v97/ma19a.html), Section 3 and Algorithm 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import MessagePassing

from .content import reset_xavier, xavier_linear
from .dense import RowSubset, linear
from .edge_ops import l2_normalize
from .field import FieldLayer, gather_columns, scatter_columns_
from .sparse import CSRPattern, sddmm, spmm

#: The channel projection's activation :math:`\sigma`: ReLU (the paper's experiments), LeakyReLU (slope 0.2), tanh,
#: or none (the identity).
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "none")


class _ChannelSoftmaxAtGraphPositions(torch.autograd.Function):
    """``torch.softmax(agreement, dim=0)`` for ``[K, n]`` agreements of some of a graph's ``E`` edges, computed at the
    edges' positions in ``whole``, a ``[K, E]`` scratch tensor (written there; its other columns are left as they
    are and do not matter): torch computes a few columns per thread on a scalar path whose ``exp`` can differ from
    the vectorised one in the last bit, so the values are those of the whole graph's softmax only there. The
    backward (multiplications and sums only, the same on either path) runs on the ``n`` columns."""

    @staticmethod
    def forward(ctx, agreement: Tensor, edges: Tensor, whole: Tensor) -> Tensor:
        p = gather_columns(torch.softmax(scatter_columns_(whole, edges, agreement), dim=0), edges)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (p,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad.contiguous(), p, 0, p.dtype), None, None


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
          ``pattern``, the graph's :func:`~.sparse.graph_pattern`: then each routing step runs as one sampled
          product (the agreements, all channels at once) and one sparse product (the routed sums) with
          channel-major operands ``[K, N, channel_dim]`` (:func:`~.sparse.sddmm`, :func:`~.sparse.spmm`; their
          transposed products in the backward pass run pushed along the rows, one channel per thread), instead of
          PyG's ``[E, K, channel_dim]`` gathers, which stay as the reference path. At Tiktok scale one training
          batch of the 2-layer model measured about 5.5 s on 2 cores with a node-major channel pattern rebuilt at
          every forward and a softmax over the last dimension of ``[E, K]``, about 3.5 s this way (before the
          receptive field and the compiled kernels); about half of it was the 36 sparse products (forward and
          backward) that the routing needs.
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
        L2-normalised (``rows``: ``x`` holds these rows of the graph's nodes, :func:`~.dense.linear`). Every
        activation is elementwise, so rows of ``x`` give those rows of the result."""
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
            out, p = self._route_field(self.channels(x, field.input_rows), field)
            return (out, p) if return_probabilities else out
        z = self.channels(x)
        if pattern is None:  # reference path: PyG gathers [E, K, channel_dim] per step
            c = z
            p = z.new_zeros(edge_index.size(1), self.num_channels)
            for _ in range(self.iterations):
                p = self.edge_updater(edge_index, z=z, c=c)
                routed = self.propagate(edge_index, z=z, p=p)
                c = F.normalize(z + routed, dim=-1)
            out = c.reshape(-1, self.num_channels * self.channel_dim)
        else:
            out, p = self._route_sparse(z, pattern)
        return (out, p) if return_probabilities else out

    def _route_sparse(self, z: Tensor, pattern: CSRPattern) -> tuple[Tensor, Tensor]:
        """The same sums as the reference path, channel-major: each step is one sampled product (the agreements,
        ``[K, E]``) and one sparse product (the routed sum), channel by channel over the graph's pattern, with no
        ``[E, K, channel_dim]`` tensor and no per-entry index arithmetic."""
        k, d = self.num_channels, self.channel_dim
        z_k = z.transpose(0, 1).contiguous()  # [K, N, d]: channel k's nodes
        z_products = z_k.view(k, -1, d)  # the products' operand, one view (see _route_field)
        c = z_k
        p = z.new_zeros(k, pattern.nnz) if self.iterations == 0 else None  # else the last iteration's
        for _ in range(self.iterations):
            agreement = sddmm(pattern, c.reshape(k, -1, d), z_products)  # [K, E]
            if self.tau != 1.0:  # dividing by 1 changes nothing: skip an [K, E] pass
                agreement = agreement / self.tau
            p = torch.softmax(agreement, dim=0)  # over channels, per edge
            routed = spmm(pattern, p, z_products)
            c = l2_normalize(z_k + routed)
        out = c.transpose(0, 1).reshape(-1, k * d)
        return out, p.t()

    def _route_field(self, z: Tensor, field: FieldLayer) -> tuple[Tensor, Tensor]:
        """:meth:`_route_sparse` over a receptive field's layer (:mod:`.field`): ``z`` holds the input rows, the
        output is the whole layer's at the output rows, gradients included, bit for bit.

        - The softmax runs at the entries' positions in the whole graph's ``[K, E]``: torch computes a few columns
          per thread on a scalar path whose ``exp`` can differ in the last bit
          (:class:`_ChannelSoftmaxAtGraphPositions`).
        - ``z_k`` (``[K, N, d]``) receives its gradients as in the whole layer, so that autograd adds them in the
          same order: the targets' own channels are gathered once, and their node sums its uses' gradients in the
          order in which the whole layer's ``z_k`` receives them; the products read ``z_k`` through one view whose
          node sums theirs, as in the whole layer, and arrives last.

        (The headed products, which gather a neighbour's row once for all channels, measured slower here: their
        ``[nnz, K]`` weights need transposed copies of the channel-major softmax, and reading channel-major weights
        in a transpose's order costs a cache miss per channel and entry.)
        """
        k, d = self.num_channels, self.channel_dim
        pattern = field.pattern
        z_k = z.transpose(0, 1).contiguous()  # [K, N_in, d]: channel k's nodes
        z_products = z_k.view(k, -1, d)
        own_rows = (torch.arange(k, device=z.device).unsqueeze(1) * z_k.size(1) + field.self_positions).view(-1)
        # The targets' own channels [K, R, d], through a view of z_k of their own, made after z_products: their uses'
        # gradients add up here in the order in which they reach z_k in the whole layer, ahead of the products'.
        # (Rows of the flat view: its backward scatters rows, several times as fast as one along the middle dimension.)
        own = z_k.view(-1, d).index_select(0, own_rows).view(k, -1, d)
        c = own
        p = z.new_zeros(k, pattern.nnz) if self.iterations == 0 else None  # else the last iteration's
        whole = z.new_zeros(k, field.num_edges)  # the softmax's scratch, shared by the iterations
        for _ in range(self.iterations):
            agreement = sddmm(pattern, c.reshape(k, -1, d), z_products)  # [K, nnz]
            if self.tau != 1.0:
                agreement = agreement / self.tau
            p = _ChannelSoftmaxAtGraphPositions.apply(agreement, field.edges, whole)
            routed = spmm(pattern, p, z_products)
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
