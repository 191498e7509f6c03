"""``ops.dense``: the compiled dense product (``native.run_gemm``) and ``linear``, bit for bit an order-exact
reference (one fused multiply-add chain per output element), torch's own products where MKL sums that way, and
``F.linear``'s values and gradients; every case it leaves to torch, the check that turns it off on machines whose MKL
sums differently, and the family switch; ``l2_normalize`` against ``F.normalize``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grcn_bench.models.ops import native
from grcn_bench.models.ops.dense import bpr_pair_scores, l2_normalize, linear

needs_native = pytest.mark.skipif(native.native_kernels() is None,
                                  reason=f"compiled kernels unavailable here: {native.kernel_status()}")
# MKL sums these products as one multiply-add chain on the machines this was measured on; elsewhere the comparison
# with torch does not apply (the library then runs torch's products, tested below).
needs_chained_mkl = pytest.mark.skipif(
    native.native_kernels() is None or native.dense_products_status() != "native",
    reason=f"torch's dense products are not the chained sum here: {native.dense_products_status()}",
)


def chained_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each output element as fma(a[i, k], b[k, j], acc) for k = 0, 1, ... from 0: the exact product plus the
    accumulator in float64 (exact for the product; the sum rounds once there and once to float32)."""
    acc = torch.zeros(a.size(0), b.size(1))
    for k in range(a.size(1)):
        acc = (torch.outer(a[:, k].double(), b[k].double()) + acc.double()).float()
    return acc


def blocked_product(g: torch.Tensor, x: torch.Tensor, block: int = 192) -> torch.Tensor:
    """``g^T x`` as MKL sums a weight gradient: a chained sum per block of ``block`` rows, the blocks added in order."""
    out = None
    for start in range(0, g.size(0), block):
        part = chained_product(g[start : start + block].t(), x[start : start + block])
        out = part if out is None else out + part
    return out


def _operands(rows: int, depth: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, depth, generator=generator)
    b = torch.randn(depth, width, generator=generator)
    bias = torch.randn(width, generator=generator)
    start = torch.randn(rows, width, generator=generator)
    return a, b, bias, start


@needs_native
@pytest.mark.parametrize(("rows", "depth", "width"), [(32, 1, 16), (37, 7, 48), (100, 64, 64), (61, 192, 16),
                                                      (50, 100, 512)])
def test_gemm_is_the_chained_sum_bit_for_bit(rows, depth, width):
    a, b, bias, start = _operands(rows, depth, width)
    reference = chained_product(a, b)
    out = torch.empty(rows, width)
    assert native.run_gemm(a, b, out) and torch.equal(out, reference)
    assert native.run_gemm(a, b, out, bias=bias) and torch.equal(out, reference + bias)
    out = start.clone()
    assert native.run_gemm(a, b, out, accumulate=True) and torch.equal(out, start + reference)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_gemm_threads_split_rows_without_changing_a_bit(threads, monkeypatch):
    a, b, _, _ = _operands(1003, 64, 64, seed=1)  # 1003 rows: shares of unequal length, a last tile of one row
    monkeypatch.setattr(native, "_threads", lambda work: threads)
    out = torch.empty(1003, 64)
    assert native.run_gemm(a, b, out) and torch.equal(out, chained_product(a, b))


@needs_native
def test_gemm_reads_a_column_slice_in_place():
    wide, b, _, _ = _operands(40, 128, 16, seed=2)
    a = wide[:, 32:96]
    out = torch.empty(40, 16)
    assert native.run_gemm(a, b[:64].contiguous(), out) and torch.equal(out, chained_product(a, b[:64]))


@needs_native
def test_what_gemm_leaves_to_torch():
    a, b, bias, _ = _operands(64, 64, 64)
    refused = {
        "too deep for one chain": (torch.randn(64, 193), torch.randn(193, 64), torch.empty(64, 64), None),
        "width not a multiple of 16": (a, b[:, :8].contiguous(), torch.empty(64, 8), None),
        "too few rows": (a[:31], b, torch.empty(31, 64), None),
        "float64": (a.double(), b.double(), torch.empty(64, 64, dtype=torch.float64), None),
        "b not contiguous": (a, b.t(), torch.empty(64, 64), None),
        "a transposed": (a.t(), b, torch.empty(64, 64), None),
        "out of the wrong shape": (a, b, torch.empty(64, 48), None),
        "bias of the wrong shape": (a, b, torch.empty(64, 64), bias[:32]),
        "depths that differ": (a, b[:32].contiguous(), torch.empty(64, 64), None),
    }
    for name, (left, right, out, add) in refused.items():
        out.fill_(7.0)
        assert not native.run_gemm(left, right, out, bias=add), name
        assert bool((out == 7.0).all()), name  # nothing written
    with pytest.raises(ValueError, match="add a bias or accumulate into out, not both"):
        native.run_gemm(a, b, torch.empty(64, 64), bias=bias, accumulate=True)


@needs_native
@pytest.mark.parametrize(("depth", "rows", "width"), [(1, 16, 16), (150, 16, 48), (192, 64, 16), (384, 16, 64),
                                                      (1001, 48, 32)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_tn_is_the_blocked_sum_bit_for_bit(depth, rows, width, threads, monkeypatch):
    generator = torch.Generator().manual_seed(depth)
    g, x = torch.randn(depth, rows, generator=generator), torch.randn(depth, width, generator=generator)
    monkeypatch.setattr(native, "_threads", lambda work: threads)
    out = torch.empty(rows, width)
    assert native.run_gemm_tn(g, x, out) and torch.equal(out, blocked_product(g, x))


@needs_native
def test_what_gemm_tn_leaves_to_torch():
    g, x = torch.randn(500, 64), torch.randn(500, 64)
    refused = {
        "between one block and two, which MKL halves": (torch.randn(300, 64), torch.randn(300, 64)),
        "deeper than checked": (torch.empty(native.GEMM_TN_MAX_DEPTH + 1, 16), torch.empty(native.GEMM_TN_MAX_DEPTH + 1,
                                                                                           16)),
        "width not a multiple of 16": (g, x[:, :8].contiguous()),
        "wider than 512": (torch.randn(500, 528), x),
        "not contiguous": (g, x.t().contiguous().t()),
        "float64": (g.double(), x.double()),
        "depths that differ": (g, x[:400]),
    }
    for name, (left, right) in refused.items():
        out = torch.full((left.size(1), right.size(1)), 7.0, dtype=left.dtype)
        assert not native.run_gemm_tn(left, right, out), name
        assert bool((out == 7.0).all()), name


@needs_chained_mkl
@pytest.mark.parametrize("depth", [384, 577, 5000, 112741])
def test_gemm_tn_equals_torchs_weight_gradient_bit_for_bit(depth):
    generator = torch.Generator().manual_seed(6)
    g, x = torch.randn(depth, 64, generator=generator), torch.randn(depth, 64, generator=generator)
    out = torch.empty(64, 64)
    assert native.run_gemm_tn(g, x, out)
    assert torch.equal(out, g.t().mm(x)) and torch.equal(out, x.t().mm(g).t())


@needs_chained_mkl
@pytest.mark.parametrize(("rows", "depth", "width"), [(1000, 64, 64), (300, 128, 64), (257, 192, 16)])
def test_gemm_equals_torchs_product_bit_for_bit(rows, depth, width):
    a, b, bias, start = _operands(rows, depth, width, seed=3)
    weight = b.t()  # [width, depth], as a layer stores it
    out = torch.empty(rows, width)
    assert native.run_gemm(a, b, out) and torch.equal(out, a @ weight.t())
    assert native.run_gemm(a, b, out, bias=bias) and torch.equal(out, F.linear(a, weight, bias))
    out = start.clone()
    assert native.run_gemm(a, b, out, accumulate=True) and torch.equal(out, start.clone().addmm_(a, weight.t()))


def _linear_cases():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(500, 64, generator=generator)  # 500 rows: every product and gradient runs compiled
    weight = torch.randn(64, 128, generator=generator)  # sliced into two [64, 64] halves, as MMGCN's combination
    bias = torch.randn(64, generator=generator)
    start = torch.randn(500, 64, generator=generator)
    return x, weight, bias, start


@pytest.mark.parametrize("kernels", ["native", "torch"])
@pytest.mark.parametrize("x_layout", ["rows", "column slice", "column-major"])
def test_linear_has_the_values_and_gradients_of_f_linear(kernels, x_layout, monkeypatch):
    x, weight, bias, start = _linear_cases()
    if x_layout == "column slice":
        x = torch.cat([x, x], dim=1)
    elif x_layout == "column-major":
        x = x.t().contiguous().t()

    def run(use_dense: bool) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, start)]
        x_leaf, weight_leaf, bias_leaf, start_leaf = leaves
        if x_layout == "column slice":
            x_leaf = x_leaf[:, 32:96]
        first, second = weight_leaf[:, :64], weight_leaf[:, 64:]
        if use_dense:
            out = linear(x_leaf, first, bias_leaf)
            out = linear(x_leaf.sin(), second, add=out)
            other = linear(x_leaf, second.t().contiguous().t())  # a column-major weight
            plain = linear(start_leaf, first)
        else:
            out = F.linear(x_leaf, first, bias_leaf)
            out = out.addmm_(x_leaf.sin(), second.t())
            other = F.linear(x_leaf, second.t().contiguous().t())
            plain = F.linear(start_leaf, first)
        F.leaky_relu(out, inplace=True)  # in place on the output, as the layers do
        (out.square().sum() + other.cos().sum() + plain.sum()).backward()
        return [out, other, plain, *(leaf.grad for leaf in leaves)]

    calls = []

    def counted(name: str):
        real = getattr(native, name)

        def call(*args):
            calls.append(name)
            return real(*args)

        return call

    for name in ("_gemm", "_gemm_tn"):
        monkeypatch.setattr(native, name, counted(name))
    with native.use_kernels(kernels):
        compiled = native.dense_products_status() == "native"  # the check against torch runs first
        calls.clear()
        ours, theirs = run(True), run(False)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine, reference)
    if compiled:  # plain's gradient arrives expanded (from .sum()) and stays torch's, as does what reads a
        # column-major x, and the weight gradients need a contiguous x (x.sin() is one)
        expected = {"rows": (4 + 3, 3), "column slice": (4 + 3, 1), "column-major": (1, 0)}[x_layout]
        assert (calls.count("_gemm"), calls.count("_gemm_tn")) == expected
    else:
        assert calls == []


def test_linear_without_gradients_and_other_shapes():
    x, weight, bias, _ = _linear_cases()
    with torch.no_grad():
        assert torch.equal(linear(x, weight[:, :64], bias), F.linear(x, weight[:, :64], bias))
    batched = x.view(5, 100, 64)
    assert torch.equal(linear(batched, weight[:, :64], bias), F.linear(batched, weight[:, :64], bias))
    frozen = x.clone().requires_grad_()
    out = linear(frozen, weight[:, :64].detach())  # a gradient for the input only
    out.sum().backward()
    assert torch.equal(frozen.grad, torch.ones(500, 64) @ weight[:, :64])


def test_linear_errors():
    x, weight, bias, start = _linear_cases()
    with pytest.raises(ValueError, match="a bias or a tensor to add into, not both"):
        linear(x, weight[:, :64], bias, add=start)
    with pytest.raises(ValueError, match=r"add needs a 2-D input, got x of shape \(5, 100, 64\)"):
        linear(x.view(5, 100, 64), weight[:, :64], add=start.view(5, 100, 64))


@needs_native
def test_a_machine_whose_torch_sums_differently_keeps_torchs_products(fresh_kernels, monkeypatch):
    real = native._gemm

    def off_by_a_bit(library, a, b, out, bias, accumulate):
        real(library, a, b, out, bias, accumulate)
        out.view(-1)[0] = torch.nextafter(out.view(-1)[0], torch.tensor(float("inf")))

    monkeypatch.setattr(native, "_gemm", off_by_a_bit)
    assert native.dense_products_status().startswith("torch's dense products sum in another order on this machine")
    assert "dense products: torch's" in native.kernel_status()
    native.forget_loaded()
    monkeypatch.setattr(native, "_gemm", real)
    real_tn = native._gemm_tn

    def tn_off_by_a_bit(library, g, x, out):
        real_tn(library, g, x, out)
        out.view(-1)[-1] = torch.nextafter(out.view(-1)[-1], torch.tensor(float("-inf")))

    monkeypatch.setattr(native, "_gemm_tn", tn_off_by_a_bit)
    assert native.dense_products_status().startswith("torch's weight gradients sum in another order on this machine")
    assert "dense products: torch's" in native.kernel_status()
    x, weight, bias, _ = _linear_cases()
    out = torch.empty(500, 64)
    assert not native.run_gemm(x, weight[:, :64].t().contiguous(), out)
    assert not native.run_gemm_tn(x, x, torch.empty(64, 64))
    assert torch.equal(linear(x, weight[:, :64], bias), F.linear(x, weight[:, :64], bias))


def test_without_native_kernels_the_dense_products_are_torchs(fresh_kernels, monkeypatch):
    with native.use_kernels("torch"):
        assert native.dense_products_status() == "GRCN_BENCH_KERNELS=torch"
        x, weight, _, _ = _linear_cases()
        assert not native.run_gemm(x, weight[:, :64].t().contiguous(), torch.empty(500, 64))


@needs_native
def test_switching_the_dense_family_off_runs_torchs_products(fresh_kernels):
    """``native,-dense``: the dense products are torch's (``run_gemm`` refuses), the sparse ones stay compiled."""
    x, weight, bias, _ = _linear_cases()
    with native.use_kernels("native,-dense"):
        assert native.dense_products_status() == "switched off by GRCN_BENCH_KERNELS=native,-dense"
        assert "dense products: torch's (switched off" in native.kernel_status()
        assert native.family_status("sparse") == "native"
        assert not native.run_gemm(x, weight[:, :64].t().contiguous(), torch.empty(500, 64))
        assert not native.run_gemm_tn(x, x, torch.empty(64, 64))
        assert torch.equal(linear(x, weight[:, :64], bias), F.linear(x, weight[:, :64], bias))


def test_l2_normalize_is_f_normalize_with_a_fused_backward():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 4, generator=gen)
    x[1, 0] = 0.0  # a zero row: the norm is clamped, the gradient is g / eps
    assert torch.equal(l2_normalize(x), F.normalize(x, dim=-1))  # the same values, bit for bit
    leaf_fast, leaf_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=gen)
    (l2_normalize(leaf_fast) * upstream).sum().backward()
    (F.normalize(leaf_ref, dim=-1) * upstream).sum().backward()
    torch.testing.assert_close(leaf_fast.grad, leaf_ref.grad)
    double = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize, (double,))


def test_l2_normalize_is_f_normalize_with_the_same_gradient():
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    x[1, 2] = 0.0  # a zero vector stays zero; its gradient is g / eps, as autograd's through F.normalize
    x[4, 0] = 1e-13  # a norm below eps: clamped
    x_ref, x_fast = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    reference, fast = F.normalize(x_ref, dim=-1), l2_normalize(x_fast)
    torch.testing.assert_close(fast, reference)
    assert torch.equal(fast[1, 2], torch.zeros(5, dtype=torch.float64))
    upstream = torch.randn_like(x)
    (reference * upstream).sum().backward()
    (fast * upstream).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad)
    smooth = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(l2_normalize, (smooth,))


def test_bpr_pair_scores_equal_two_gathers_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    # Repeated users, a row that is a positive twice and a negative twice, rows that are only negatives.
    users = torch.tensor([0, 3, 3, 1, 0, 3, 2, 2])
    pos = torch.tensor([4, 4, 1, 0, 5, 2, 4, 0])
    neg = torch.tensor([1, 6, 1, 6, 3, 0, 3, 6])
    base_user, base_item = torch.randn(5, 7, generator=gen), torch.randn(7, 7, generator=gen)
    g_pos, g_neg = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    leaves = [(base_user.clone().requires_grad_(), base_item.clone().requires_grad_()) for _ in range(2)]
    # Computed (non-leaf) tables, as the models' outputs that take this path.
    (user_a, item_a), (user_b, item_b) = [(u * 1.5, i * 1.5) for u, i in leaves]
    fused = bpr_pair_scores(user_a, item_a, users, pos, neg)
    separate = ((user_b[users] * item_b[pos]).sum(-1), (user_b[users] * item_b[neg]).sum(-1))
    for got, want in zip(fused, separate, strict=True):
        assert torch.equal(got, want)
    grads_fused = torch.autograd.grad(fused, [user_a, item_a], [g_pos, g_neg])
    grads_separate = torch.autograd.grad(separate, [user_b, item_b], [g_pos, g_neg])
    for got, want in zip(grads_fused, grads_separate, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(grads_fused[1][6], torch.zeros(7))  # a negative-only row does get its gradient
