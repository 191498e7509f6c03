"""The compiled kernels (``models/ops/native.py``) and the ops that dispatch to them (``ops.sparse``): bit for bit
the sums of an order-exact reference written with torch's elementwise operations, and of torch's own kernels (so
results do not change); their threads; the ``GRCN_BENCH_KERNELS`` switch and its families; every way they fall back
to torch's kernels, and the build cache."""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
import torch

from grcn_bench.benchmarks.config import TrainSettings
from grcn_bench.benchmarks.trainer import fit, seed_everything
from grcn_bench.datasets import load_dataset
from grcn_bench.models import get_model
from grcn_bench.models.ops import native, sparse
from grcn_bench.models.ops.sparse import CSRPattern

needs_native = pytest.mark.skipif(native.native_kernels() is None,
                                  reason=f"compiled kernels unavailable here: {native.kernel_status()}")
# torch's sampled product sums as the compiled one does only where torch runs its AVX2 kernels; MKL's product is the
# CSR product there.
needs_torch_avx2 = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX2" or not torch.backends.mkl.is_available(),
    reason="the bit-for-bit comparison with torch's kernels is for machines where torch runs AVX2 kernels and MKL",
)


def random_pattern(rows: int, cols: int, density: float, seed: int = 0) -> CSRPattern:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=generator) < density
    mask[0] = False  # an empty first row, and rows of every length
    mask[-1] = True
    row, col = mask.nonzero(as_tuple=True)
    return CSRPattern.from_coo(row, col, rows, cols)


@contextlib.contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ordered_spmm(pattern: CSRPattern, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each row's entries summed in storage order, multiply then add, one elementwise torch operation at a time."""
    rowptr, col = pattern.rowptr.long(), pattern.col.long()
    degree = rowptr[1:] - rowptr[:-1]
    out = torch.zeros(pattern.num_rows, x.size(1))
    for position in range(int(degree.max())):
        rows = (degree > position).nonzero().squeeze(1)
        entry = rowptr[rows] + position
        out[rows] = out[rows] + values[entry, None] * x[col[entry]]
    return out


def lane_sddmm(pattern: CSRPattern, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eight lanes accumulated over the width, then halves, pairs and neighbours (torch's AVX2 reduction)."""
    degree = pattern.rowptr[1:].long() - pattern.rowptr[:-1].long()
    rows = torch.repeat_interleave(torch.arange(pattern.num_rows), degree)
    products = (a[rows] * b[pattern.col.long()]).view(pattern.nnz, -1, 8)
    lanes = products[:, 0]
    for chunk in range(1, products.size(1)):
        lanes = lanes + products[:, chunk]
    lanes = lanes[:, :4] + lanes[:, 4:]
    lanes = lanes[:, :2] + lanes[:, 2:]
    return lanes[:, 0] + lanes[:, 1] + 0.0


def _operands(pattern: CSRPattern, width: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(pattern.nnz, generator=generator)
    x = torch.randn(pattern.num_cols, width, generator=generator)
    a = torch.randn(pattern.num_rows, width, generator=generator)
    return values, x, a


@needs_native
@pytest.mark.parametrize("width", [1, 3, 8, 13, 64, 72, 136])
def test_spmm_is_the_ordered_sum_bit_for_bit(width):
    pattern = random_pattern(50, 70, 0.2)
    values, x, _ = _operands(pattern, width)
    out = torch.full((pattern.num_rows, width), float("nan"))
    assert native.run_spmm(pattern.rowptr, pattern.col, values, x, out)
    assert torch.equal(out, ordered_spmm(pattern, values, x))
    assert not out[0].any()  # the empty row is written too


@needs_native
def test_spmm_reads_permuted_values_in_place():
    pattern = random_pattern(50, 70, 0.2)
    values, x, _ = _operands(pattern, 24)
    order = torch.randperm(pattern.nnz, generator=torch.Generator().manual_seed(6))
    out = torch.empty(pattern.num_rows, 24)
    assert native.run_spmm(pattern.rowptr, pattern.col, values, x, out, value_order=order)
    assert torch.equal(out, ordered_spmm(pattern, values[order], x))
    assert not native.run_spmm(pattern.rowptr, pattern.col, values, x, out, value_order=order.int())
    assert not native.run_spmm(pattern.rowptr, pattern.col, values, x, out, value_order=order[:-1])


@needs_native
@pytest.mark.parametrize("width", [8, 16, 64, 72])
def test_sddmm_is_the_lane_sum_bit_for_bit(width):
    pattern = random_pattern(50, 70, 0.2)
    _, b, a = _operands(pattern, width)
    a[3, :] = 0.0
    b = -b  # rows of zeros against negative features: -0 dot products, which become +0 as in torch
    out = torch.empty(pattern.nnz)
    assert native.run_sddmm(pattern.rowptr, pattern.col, a, b, out)
    expected = lane_sddmm(pattern, a, b)
    assert torch.equal(out, expected) and not torch.signbit(out[expected == 0]).any()


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_threads_split_rows_without_changing_a_bit(threads, monkeypatch):
    monkeypatch.setattr(native, "THREADED_ABOVE", 0)
    with torch_threads(threads):
        # rows in many blocks of 64 (threads take them from a shared counter), and fewer rows than threads
        for pattern in (random_pattern(700, 30, 0.2, seed=2), random_pattern(3, 5, 0.5, seed=3)):
            values, x, a = _operands(pattern, 16)
            out = torch.empty(pattern.num_rows, 16)
            assert native.run_spmm(pattern.rowptr, pattern.col, values, x, out)
            assert torch.equal(out, ordered_spmm(pattern, values, x))
            dots = torch.empty(pattern.nnz)
            assert native.run_sddmm(pattern.rowptr, pattern.col, a, x, dots)
            assert torch.equal(dots, lane_sddmm(pattern, a, x))


def _pushed_operands(pattern: CSRPattern, channels: int, width: int, seed: int = 11):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(channels, pattern.nnz, generator=generator)
    x = torch.randn(channels, pattern.num_rows, width, generator=generator)
    values[:, ::7] = -0.0  # -0 weights on positive, negative and zero terms: every sign of zero
    x[:, 1::5] = 0.0
    values[-1, 3], x[0, -1, 0] = float("inf"), float("nan")
    return values, x


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32)  # NaN payloads and the sign of zero included


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN where the other has NaN (x86 keeps one operand's NaN, and which one is the compiler's choice), the same bits
    everywhere else, the sign of zero included."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(_bits(a)[~nan], _bits(b)[~nan])


def pulled_transpose(pattern: CSRPattern, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The transpose's product channel by channel: each column's entries in the transpose's order, as ordered_spmm."""
    transpose = pattern.transpose()
    return torch.stack([ordered_spmm(transpose, channel_values[pattern.t_perm], channel_x)
                        for channel_values, channel_x in zip(values, x, strict=True)])


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("channels", "width"), [(1, 16), (2, 1), (3, 13), (4, 16), (5, 24)])
def test_pushed_transpose_is_the_pulled_one_bit_for_bit(channels, width, threads, monkeypatch):
    monkeypatch.setattr(native, "THREADED_ABOVE", 0)
    with torch_threads(threads):
        pattern = random_pattern(60, 80, 0.15, seed=8)  # an empty row, a full row, columns of every length
        values, x = _pushed_operands(pattern, channels, width)
        out = torch.full((channels, pattern.num_cols, width), float("nan"))
        assert native.run_spmm_pushed(pattern.rowptr, pattern.col, values, x, out)
        expected = pulled_transpose(pattern, values, x)
        assert same_bits(out, expected)
        pulled = torch.empty(pattern.num_cols, width)
        for m in range(channels):  # and the compiled pull that it replaces
            assert native.run_spmm(pattern.t_rowptr, pattern.t_col, values[m], x[m], pulled, value_order=pattern.t_perm)
            assert same_bits(out[m], pulled)


@needs_native
def test_pushed_transpose_refusals_write_nothing():
    pattern = random_pattern(20, 30, 0.2, seed=9)
    values, x = _pushed_operands(pattern, 2, 8)
    out = torch.full((2, pattern.num_cols, 8), 7.0)
    # the same rows, stored from entry 1 on behind one unused entry
    offset_rowptr, padded_col = pattern.rowptr + 1, torch.cat([pattern.col[:1], pattern.col])
    refused = [
        (pattern.rowptr.long(), pattern.col, values, x, out),  # int64 indices
        (pattern.rowptr, pattern.col, values.double(), x.double(), out.double()),
        (pattern.rowptr, pattern.col, values[:1], x, out),  # channels differ
        (pattern.rowptr, pattern.col, values[:, :-1], x, out),  # a weight short
        (pattern.rowptr, pattern.col, values, x[:, :-1], out),  # rows differ
        (pattern.rowptr, pattern.col, values, x, out[:, :, :4]),  # widths differ
        (pattern.rowptr, pattern.col, values, x.transpose(1, 2).contiguous().transpose(1, 2), out),
        (offset_rowptr, padded_col, torch.randn(2, pattern.nnz + 1), x, out),
    ]
    for operands in refused:
        assert not native.run_spmm_pushed(*operands)
        assert bool((out == 7.0).all())


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("channels", "width"), [(1, 8), (2, 16), (4, 16), (3, 8)])
def test_sampled_backward_in_one_walk_is_its_two_products_bit_for_bit(channels, width, threads, monkeypatch):
    monkeypatch.setattr(native, "THREADED_ABOVE", 0)
    with torch_threads(threads):
        pattern = random_pattern(60, 80, 0.15, seed=13)
        grad, a = _pushed_operands(pattern, channels, width)
        b = torch.randn(channels, pattern.num_cols, width, generator=torch.Generator().manual_seed(14))
        b[:, ::3] = -0.0
        grad_a = torch.full_like(a, float("nan"))
        grad_b = torch.full_like(b, float("nan"))
        assert native.run_sddmm_backward_pushed(pattern.rowptr, pattern.col, grad, a, b, grad_a, grad_b)
        for m in range(channels):
            assert same_bits(grad_a[m], ordered_spmm(pattern, grad[m], b[m]))  # the row-local product
        assert same_bits(grad_b, pulled_transpose(pattern, grad, a))  # and the transposed one


@needs_native
def test_sampled_backward_in_one_walk_refusals_write_nothing():
    pattern = random_pattern(20, 30, 0.2, seed=9)
    grad, a = _pushed_operands(pattern, 2, 16)
    b = torch.randn(2, pattern.num_cols, 16)
    grad_a, grad_b = torch.full_like(a, 7.0), torch.full_like(b, 7.0)
    narrow = _pushed_operands(pattern, 2, 13)[1]
    refused = [
        (grad, narrow, torch.randn(2, pattern.num_cols, 13)),  # a width the kernel does not take
        (grad, a.double(), b.double()),
        (grad[:1], a, b),
        (grad[:, :-1], a, b),
        (grad, a, b[:1]),
        (grad, a, b[:, :, :8]),
        (grad, a[:, :-1], b),
        (grad, a.transpose(1, 2).contiguous().transpose(1, 2), b),
    ]
    for operands in refused:
        assert not native.run_sddmm_backward_pushed(pattern.rowptr, pattern.col, *operands, grad_a, grad_b)
    assert not native.run_sddmm_backward_pushed(pattern.rowptr.long(), pattern.col, grad, a, b, grad_a, grad_b)
    assert not native.run_sddmm_backward_pushed(pattern.rowptr, pattern.col, grad, a, b, grad_a[:, :-1], grad_b)
    assert bool((grad_a == 7.0).all()) and bool((grad_b == 7.0).all())


@needs_native
@pytest.mark.parametrize("width", [16, 24])
def test_narrow_channels_push_their_transposed_products(width, monkeypatch):
    pattern = random_pattern(70, 90, 0.1, seed=10)
    generator = torch.Generator().manual_seed(12)
    values = torch.randn(4, pattern.nnz, generator=generator)
    x = torch.randn(4, pattern.num_cols, width, generator=generator)
    a = torch.randn(4, pattern.num_rows, width, generator=generator)
    pushes = []
    for name in ("run_spmm_pushed", "run_sddmm_backward_pushed"):
        real = getattr(sparse, name)
        monkeypatch.setattr(sparse, name, lambda *args, real=real, name=name: pushes.append(name) or real(*args))
    results, pushed_width = [], sparse.PUSH_MAX_WIDTH
    for push_max_width in (pushed_width, 0):
        monkeypatch.setattr(sparse, "PUSH_MAX_WIDTH", push_max_width)
        leaves = [t.clone().requires_grad_() for t in (values, x, a)]
        (sparse.spmm(pattern, leaves[0], leaves[1]).square().sum()
         + sparse.sddmm(pattern, leaves[2], leaves[1]).sin().sum()).backward()
        results.append([leaf.grad for leaf in leaves])
    # pushed where the width allows and the channels share out among the threads: the product's dL/dx, and the
    # sampled product's two gradients in one walk
    expected = ["run_sddmm_backward_pushed", "run_spmm_pushed"]
    assert sorted(pushes) == (expected if width <= pushed_width and 4 % torch.get_num_threads() == 0 else [])
    for pushed, pulled in zip(*results, strict=True):
        assert torch.equal(pushed, pulled)


@needs_native
def test_no_entries_and_no_rows():
    empty = CSRPattern.from_coo(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 4, 6)
    out = torch.full((4, 8), 1.0)
    assert native.run_spmm(empty.rowptr, empty.col, torch.empty(0), torch.randn(6, 8), out)
    assert not out.any()
    assert native.run_sddmm(empty.rowptr, empty.col, torch.randn(4, 8), torch.randn(6, 8), torch.empty(0))
    no_rows = CSRPattern.from_coo(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 0, 6)
    assert native.run_spmm(no_rows.rowptr, no_rows.col, torch.empty(0), torch.randn(6, 8), torch.empty(0, 8))


@needs_native
def test_what_the_kernels_leave_to_torch_or_refuse():
    pattern = random_pattern(20, 30, 0.2)
    values, x, a = _operands(pattern, 12)
    rowptr, col = pattern.rowptr, pattern.col
    out = torch.full((20, 12), 7.0)
    assert not native.run_sddmm(rowptr, col, a, x, torch.empty(pattern.nnz))  # width not a multiple of 8
    assert not native.run_spmm(rowptr, col, values.double(), x.double(), out.double())
    assert not native.run_spmm(rowptr.long(), col.long(), values, x, out)
    assert not native.run_spmm(rowptr, col, values, x.t().contiguous().t(), out)  # not contiguous
    assert (out == 7.0).all()  # nothing written
    # Shapes the kernels would read or write past are refused too (torch then raises), never run.
    values16, x16, a16 = _operands(pattern, 16)
    out16 = torch.full((20, 16), 7.0)
    assert not native.run_spmm(rowptr, col, values16, x16[:, :8], out16)  # narrower features than the output
    assert not native.run_spmm(rowptr, col, values16[:-1], x16, out16)  # a weight short
    assert not native.run_spmm(rowptr, col, values16, x16, out16[:-1])  # rows not those of the row pointer
    assert not native.run_spmm(rowptr, col[:-1], values16[:-1], x16, out16)  # the row pointer runs past col
    assert (out16 == 7.0).all()
    dots = torch.full((pattern.nnz,), 7.0)
    assert not native.run_sddmm(rowptr, col, a16, x16[:, :8], dots)
    assert not native.run_sddmm(rowptr, col, a16, x16, dots[:-1])
    assert not native.run_sddmm(rowptr, col, a16[:-1], x16, dots)
    assert (dots == 7.0).all()
    ptr = torch.tensor([0, 2, 5])
    assert not native.run_segment_reduce(torch.randn(4, 8), ptr, "sum", torch.empty(2, 8))  # offsets past src
    assert not native.run_segment_reduce(torch.randn(5, 8), ptr, "sum", torch.empty(3, 8))
    # ... and the public products still compute what is left to torch.
    rows = torch.repeat_interleave(torch.arange(20), rowptr.diff().long())
    dense = torch.zeros(20, 30, dtype=torch.float64).index_put_((rows, col.long()), values.double())
    torch.testing.assert_close(sparse.spmm(pattern, values, x).double(), dense @ x.double(), rtol=1e-5, atol=1e-5)
    dense_dots = (a.double() @ x.double().t())[rows, col.long()]
    torch.testing.assert_close(sparse.sddmm(pattern, a, x).double(), dense_dots, rtol=1e-5, atol=1e-5)


def test_torch_csr_wraps_the_values_tensor_without_a_copy():
    """sparse._sddmm_raw's torch path writes its result through a CSR tensor built around the output."""
    values = torch.zeros(3)
    matrix = sparse._csr(torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([0, 0, 1], dtype=torch.int32),
                         values, (2, 2))
    assert matrix.values().data_ptr() == values.data_ptr()
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    torch.sparse.sampled_addmm(matrix, a, b.t(), beta=0.0, out=matrix)
    torch.testing.assert_close(values, torch.stack([a[0] @ b[0], a[1] @ b[0], a[1] @ b[1]]))


@needs_native
@needs_torch_avx2
@pytest.mark.parametrize("channels", [None, 3])
def test_products_and_gradients_equal_torchs_kernels_bit_for_bit(channels, monkeypatch):
    pattern = random_pattern(300, 400, 0.05, seed=4)
    shape = (() if channels is None else (channels,))
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(*shape, pattern.nnz, generator=generator)
    x = torch.randn(*shape, pattern.num_cols, 64, generator=generator)
    a = torch.randn(*shape, pattern.num_rows, 64, generator=generator)
    for stacked in (True, False):  # one product over the channels' stacked pattern, or one per channel
        monkeypatch.setattr(sparse, "STACK_BELOW_BYTES", 1 << 40 if stacked else 0)
        results = {}
        for choice in ("native", "torch"):
            with native.use_kernels(choice):
                leaves = [t.clone().requires_grad_() for t in (values, x, a)]
                product = sparse.spmm(pattern, leaves[0], leaves[1])
                dots = sparse.sddmm(pattern, leaves[2], leaves[1])
                (product.square().sum() + dots.sin().sum()).backward()
                results[choice] = [product, dots, *(leaf.grad for leaf in leaves)]
        for native_result, torch_result in zip(results["native"], results["torch"], strict=True):
            assert torch.equal(native_result, torch_result)


@needs_native
@needs_torch_avx2
@pytest.mark.parametrize("name", ["grcn", "disengcn", "gat", "mmgcn", "ngcf", "graphsage"])
def test_training_is_bit_for_bit_the_same_with_either_kernels(name, monkeypatch):
    if name == "disengcn":  # its field path agrees with its full forward within round-off only: compare the kernels
        from grcn_bench.models.base import Recommender

        monkeypatch.setattr(get_model(name), "batch_forward", Recommender.batch_forward)
    dataset = load_dataset("synthetic:tiny")
    settings = TrainSettings(lr=0.01, seed=0, batch_size=256, max_epochs=2)
    outcomes = {}
    for choice in ("native", "torch"):
        with native.use_kernels(choice):
            seed_everything(0)
            model = get_model(name)(dataset.info())
            result = fit(model, dataset, settings, lambda m, epoch: {"recall@10": float(epoch)}, progress=False)
            outcomes[choice] = ([r.loss for r in result.history], [p.detach().clone() for p in model.parameters()])
    assert outcomes["native"][0] == outcomes["torch"][0]
    for native_parameter, torch_parameter in zip(outcomes["native"][1], outcomes["torch"][1], strict=True):
        assert torch.equal(native_parameter, torch_parameter)


@needs_native
@pytest.mark.parametrize("shape", [(), (8,), (3,), (13,), (2, 8)])
@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_segment_reduce_is_torchs_bit_for_bit(shape, reduce, monkeypatch):
    """Against torch.segment_reduce itself (a scalar loop on every CPU): empty segments, NaN anywhere in a segment,
    signed zeros, and both thread splits."""
    generator = torch.Generator().manual_seed(10)
    lengths = torch.randint(0, 9, (300,), generator=generator)
    lengths[:3] = 0
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    src = torch.randn(int(ptr[-1]), *shape, generator=generator)
    flat = src.view(src.size(0), -1)
    flat[5, 0], flat[17, -1], flat[40] = float("nan"), float("nan"), -0.0
    flat[41] = 0.0
    for threaded_above in (0, 1 << 40):
        monkeypatch.setattr(native, "THREADED_ABOVE", threaded_above)
        out = torch.empty(300, *shape)
        assert native.run_segment_reduce(src, ptr, reduce, out)
        expected = torch.segment_reduce(src, reduce, offsets=ptr, axis=0)
        assert torch.equal(out.isnan(), expected.isnan())
        assert torch.equal(out.nan_to_num(), expected.nan_to_num())
        assert torch.equal(out.signbit(), expected.signbit())
    assert torch.equal(sparse.segment_reduce(src, reduce, ptr).nan_to_num(), expected.nan_to_num())
    assert not native.run_segment_reduce(src, ptr, "mean", out)
    assert not native.run_segment_reduce(src, ptr.int(), reduce, out)
    assert not native.run_segment_reduce(src.double(), ptr, reduce, out.double())


@needs_native
@pytest.mark.parametrize("shape", [(), (8,), (3,), (2, 8)])
@pytest.mark.parametrize("op", ["sub", "div"])
def test_segment_broadcast_is_torchs_repeated_operation_bit_for_bit(shape, op, monkeypatch):
    """Against torch's subtraction (division) by the values repeated over each segment: empty segments, NaN, inf,
    signed zeros, in place, and both thread splits; then every operand the kernel refuses."""
    generator = torch.Generator().manual_seed(11)
    lengths = torch.randint(0, 9, (300,), generator=generator)
    lengths[:3] = 0
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    src = torch.randn(int(ptr[-1]), *shape, generator=generator)
    values = torch.randn(300, *shape, generator=generator)
    src.view(src.size(0), -1)[5:9, 0] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0])
    values.view(300, -1)[7:10, 0] = torch.tensor([-0.0, 0.0, float("inf")])
    repeated = values.repeat_interleave(ptr[1:] - ptr[:-1], dim=0, output_size=src.size(0))
    expected = src - repeated if op == "sub" else src / repeated

    def same(mine: torch.Tensor) -> bool:
        return torch.equal(mine.view(torch.int32), expected.view(torch.int32))  # NaN and the sign of 0 included

    for threaded_above in (0, 1 << 40):
        monkeypatch.setattr(native, "THREADED_ABOVE", threaded_above)
        out = torch.empty_like(src)
        assert native.run_segment_apply(src, ptr, values, op, out) and same(out)
        in_place = src.clone()
        assert native.run_segment_apply(in_place, ptr, values, op, in_place) and same(in_place)
    assert same(sparse.segment_broadcast(src, ptr, values, op))
    with native.use_kernels("torch"):
        assert same(sparse.segment_broadcast(src, ptr, values, op))
    refused = {
        "an unknown operation": (src, ptr, values, "mul"),
        "int32 offsets": (src, ptr.int(), values, op),
        "float64": (src.double(), ptr, values.double(), op),
        "offsets short of the rows": (src, ptr[:-1], values[:-1], op),
        "one value row too many": (src, ptr, torch.randn(301, *shape), op),
        "values not contiguous": (src, ptr, torch.stack([values, values], dim=1)[:, 0], op),
    }
    with pytest.raises(ValueError, match="op must be 'sub' or 'div', got 'mul'"):
        sparse.segment_broadcast(src, ptr, values, "mul")
    for name, case in refused.items():
        out = torch.full_like(case[0], 7.0)
        assert not native.run_segment_apply(*case, out), name
        assert bool((out == 7.0).all()), name
        if name in ("float64", "values not contiguous"):  # torch computes what the kernel leaves to it
            torch.testing.assert_close(sparse.segment_broadcast(*case), expected.to(case[0].dtype), equal_nan=True)


def _headed_operands(pattern: CSRPattern, heads: int, width: int, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(pattern.nnz, heads, generator=generator)
    x = torch.randn(pattern.num_cols, heads, width, generator=generator)
    a = torch.randn(pattern.num_rows, heads, width, generator=generator)
    return values, x, a


def ordered_spmm_heads(pattern: CSRPattern, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([ordered_spmm(pattern, values[:, h], x[:, h]) for h in range(x.size(1))], dim=1)


def _headed_run(pattern: CSRPattern, values: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (values, x, a)]
    product = sparse.headed_spmm(pattern, leaves[0], leaves[1])
    dots = sparse.headed_sddmm(pattern, leaves[2], leaves[1])
    (product.square().sum() + dots.sin().sum()).backward()
    return [product, dots, *(leaf.grad for leaf in leaves)]


@needs_native
@pytest.mark.parametrize(("heads", "width"), [(8, 8), (4, 16), (2, 24), (3, 5)])
def test_headed_products_are_one_product_per_head_bit_for_bit(heads, width):
    """Compiled (head width a multiple of 8) or not, values and gradients equal those of one spmm / sddmm per head
    (each its own bits: the ordered sum and the lane sum)."""
    pattern = random_pattern(60, 60, 0.15, seed=8)
    values, x, a = _headed_operands(pattern, heads, width)
    product, dots, *grads = _headed_run(pattern, values, x, a)
    per_head = [_headed_run(pattern, values[:, [h]], x[:, [h]], a[:, [h]]) for h in range(heads)]
    reference_product = torch.stack([sparse.spmm(pattern, values[:, h], x[:, h]) for h in range(heads)], dim=1)
    assert torch.equal(product, reference_product)
    for h in range(heads):
        assert torch.equal(dots[:, h], sparse.sddmm(pattern, a[:, h], x[:, h]))
        for grad, head_result in zip(grads, per_head[h][2:], strict=True):
            assert torch.equal(grad[:, h], head_result[:, 0])
    if width % 8 == 0:
        assert torch.equal(product, ordered_spmm_heads(pattern, values, x))


@needs_native
@needs_torch_avx2
def test_headed_products_equal_the_block_product_with_torchs_kernels():
    pattern = random_pattern(80, 80, 0.1, seed=9)
    operands = _headed_operands(pattern, 4, 16)
    native_results = _headed_run(pattern, *operands)
    with native.use_kernels("torch"):
        torch_results = _headed_run(pattern, *operands)  # stack_pattern's block product, torch's kernels
    for native_result, torch_result in zip(native_results, torch_results, strict=True):
        assert torch.equal(native_result, torch_result)


def test_headed_shape_errors():
    pattern = random_pattern(6, 7, 0.5)
    values, x, a = _headed_operands(pattern, 2, 8)
    with pytest.raises(ValueError, match="values \\[nnz, H\\] need features \\[C, H, d\\]"):
        sparse.headed_spmm(pattern, values, x[:, :1])
    with pytest.raises(ValueError, match="pattern \\[6, 7\\]"):
        sparse.headed_spmm(pattern, values[1:], x)
    with pytest.raises(ValueError, match="must be \\[n, H, d\\] alike"):
        sparse.headed_sddmm(pattern, a, x[:, :, :4])
    with pytest.raises(ValueError, match="pattern \\[6, 7\\], got left"):
        sparse.headed_sddmm(pattern, a[1:], x)


# ---------------------------------------------------------------------------------------------- choice and fallback


def test_torch_kernels_on_request(fresh_kernels, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "torch")
    assert native.native_kernels() is None and native.kernel_status() == "GRCN_BENCH_KERNELS=torch"
    pattern = random_pattern(10, 12, 0.3)
    values, x, _ = _operands(pattern, 8)
    assert not native.run_spmm(pattern.rowptr, pattern.col, values, x, torch.empty(10, 8))


def test_use_kernels_restores_the_previous_choice(fresh_kernels, monkeypatch):
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    with native.use_kernels("torch"):
        assert native.kernel_status() == "GRCN_BENCH_KERNELS=torch"
    assert native.ENV_SWITCH not in os.environ
    monkeypatch.setenv(native.ENV_SWITCH, "torch")
    with native.use_kernels("native"):
        pass
    assert os.environ[native.ENV_SWITCH] == "torch"
    with pytest.raises(ValueError, match="must be 'native', 'torch' or 'native' with families switched off"):
        with native.use_kernels("gpu"):
            pass


def test_a_wrong_switch_value_is_an_error(fresh_kernels, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "fast")
    with pytest.raises(ValueError, match="GRCN_BENCH_KERNELS must be 'native', 'torch' .* got 'fast'"):
        native.kernel_status()


def test_the_switch_parses_families():
    every = frozenset(native.FAMILIES)
    assert set(native.FAMILIES) == {"sparse", "dense", "scores"}
    assert native.parse_kernels("native") == every
    assert native.parse_kernels(" Native ") == every
    assert native.parse_kernels("torch") == frozenset()
    assert native.parse_kernels("native,-dense") == every - {"dense"}
    assert native.parse_kernels("native, -scores ,-dense") == every - {"scores", "dense"}
    assert native.parse_kernels("native,-sparse,-dense,-scores") == frozenset()
    for wrong in ("", "fast", "torch,-dense", "native,dense", "native,-gpu", "-dense", "native,-"):
        with pytest.raises(ValueError, match="families switched off"):
            native.parse_kernels(wrong)


@needs_native
@pytest.mark.parametrize("family", ["sparse", "dense", "scores"])
def test_switching_one_family_off_leaves_the_others(family, fresh_kernels, monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, f"native,-{family}")
    status = native.kernel_status()
    assert status.startswith("native (") and native.native_kernels() is not None
    assert f"{native.FAMILIES[family]} (switched off by GRCN_BENCH_KERNELS=native,-{family})" in status
    assert native.family_status(family).startswith("switched off")
    others = [f"{native.FAMILIES[other]} (switched off" for other in native.FAMILIES if other != family]
    assert not any(text in status for text in others)


@needs_native
def test_switching_the_sparse_family_off_runs_torchs_sparse_kernels(fresh_kernels):
    pattern = random_pattern(20, 30, 0.2)
    values, x, a = _operands(pattern, 16)
    out = torch.empty(20, 16)
    with native.use_kernels("native,-sparse"):
        assert not native.run_spmm(pattern.rowptr, pattern.col, values, x, out)
        assert not native.run_sddmm(pattern.rowptr, pattern.col, a, x, torch.empty(pattern.nnz))
        assert not native.run_segment_reduce(values, pattern.rowptr.long(), "sum", torch.empty(20))
        torch.testing.assert_close(sparse.spmm(pattern, values, x), ordered_spmm(pattern, values, x))
    assert native.run_spmm(pattern.rowptr, pattern.col, values, x, out)


def test_other_machines_use_torchs_kernels(fresh_kernels, monkeypatch):
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native.native_kernels() is None and "not an x86-64 CPU (aarch64)" in native.kernel_status()
    native.forget_loaded()
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert native.native_kernels() is None and "lacks AVX2" in native.kernel_status()


def test_no_compiler(fresh_kernels, monkeypatch):
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert native.native_kernels() is None and native.kernel_status() == "no C compiler found (set CC)"


def test_a_failed_build_warns_and_falls_back_to_torch(fresh_kernels, monkeypatch, tmp_path, caplog):
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("GRCN_BENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.native_kernels() is None
    assert native.kernel_status().startswith("build failed")
    assert "compiled sparse kernels unavailable, using torch's" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    pattern = random_pattern(20, 30, 0.2)
    values, x, _ = _operands(pattern, 8)
    torch.testing.assert_close(sparse.spmm(pattern, values, x), ordered_spmm(pattern, values, x))


@needs_native
def test_the_build_is_kept_and_reused(fresh_kernels, monkeypatch, tmp_path):
    monkeypatch.setenv("GRCN_BENCH_CACHE", str(tmp_path / "kernels"))
    assert native.native_kernels() is not None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so"
    assert native.kernel_status() == f"native ({built[0]})"
    native.forget_loaded()

    def no_second_build(*args):
        raise AssertionError("rebuilt a kernel library that was already built")

    monkeypatch.setattr(native, "_build", no_second_build)
    assert native.native_kernels() is not None


def test_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("GRCN_BENCH_CACHE", str(tmp_path / "here"))
    assert native.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("GRCN_BENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "grcn-bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert native.cache_dir() == tmp_path / "home" / ".cache" / "grcn-bench"


def test_the_kernel_source_is_found_and_packaged():
    """``native.py`` builds ``kernels.c`` from its own folder, and setup.cfg ships it with the ops package."""
    from setuptools.config.setupcfg import read_configuration

    assert native.SOURCE.is_file() and native.SOURCE.parent.name == "ops"
    options = read_configuration(str(native.SOURCE.parents[2] / "setup.cfg"))["options"]
    assert options["package_dir"]["grcn_bench.models.ops"] == "models/ops"
    assert "grcn_bench.models.ops" in options["packages"]
    assert options["package_data"]["grcn_bench.models.ops"] == ["kernels.c"]
