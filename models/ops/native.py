r"""Compiled CPU kernels for the sparse products and segment reductions of :mod:`.sparse`, the dense products of
:mod:`.dense` and the evaluator's ranking scores: the same sums as torch's kernels, computed with fewer waits on
memory (docs/kernels.md).

This module is the ops layer's only contact with the compiled library; models never call it (they call
:mod:`grcn_bench.models.ops`). Every ``run_*`` function computes its result into given tensors and returns ``True``,
or writes nothing and returns ``False`` when the kernels cannot take the operands (the caller then runs torch's).

On CPU both sparse products spend their time gathering one row of features per stored entry. MKL's CSR product and
torch's sampled product (the kernels :mod:`.sparse` calls otherwise) wait for each row in turn; ``kernels.c`` asks for
each row 16 entries ahead (docs/performance.md has the measurements).

They compute the same sums in the same order, so results keep every bit (tests compare against torch and against an
independent order-exact reference):

- ``spmm``: each output element accumulates the row's entries in storage order, multiplying then adding, as MKL's
  product does;
- ``sddmm``: each dot product sums eight lanes over the width, then the halves, pairs and neighbours of the lanes, as
  torch's AVX2 kernel does (so only widths that are multiples of 8 run here; others go to torch). Where torch runs
  its AVX-512 kernels instead, its sampled product sums sixteen lanes and can differ from these in the last bit; the
  compiled sums are the same on every machine;
- headed products (:func:`~.sparse.headed_spmm`, :func:`~.sparse.headed_sddmm`): each head's sums are those of one
  product for that head alone, while the row of all heads is gathered once;
- segment sum and max: ``torch.segment_reduce``'s sequential loop (and NaN rule), vectorised over the columns and
  threaded; and the softmaxes' subtraction (division) of each segment's max (sum) from its rows without the
  ``repeat_interleave`` copy (:func:`run_segment_apply`);
- dense products (:func:`run_gemm`, for the layers' linear maps): one fused multiply-add chain per output element,
  which is how MKL sums products up to 192 deep on this project's machines; and their weight gradients
  (:func:`run_gemm_tn`): one chain per block of 192 rows, the blocks added in order, as MKL sums them, in register
  tiles. Since MKL's order depends on the CPU, the first call compares the two
  on a few products shaped as the layers' and keeps torch's where any bit differs (:func:`dense_products_status`);
- full-ranking scores (:func:`run_dot_scores`, for the evaluator): ``user @ item.T`` with ``torch.mm``'s sums (one
  chain up to 192 deep, two halves up to 383, chains of 192 from there, the chains added in order), with the maximum
  of every group of 32 items on the side; checked against ``torch.mm`` on first use likewise
  (:func:`dot_scores_status`).

The kernels' threads are those of torch's own OpenMP runtime: the library is built with ``-fopenmp`` and, loaded after
torch, binds to torch's ``libgomp``. Threads of their own would compete for the cores with torch's workers, which spin
for a while after each operator and would slow the kernels' products down.

The source is built on first use with the system C compiler (``$CC``, else ``cc``) into a cache directory
(``$GRCN_BENCH_CACHE``, else ``$XDG_CACHE_HOME/grcn-bench`` or ``~/.cache/grcn-bench``), one file per source and
flags, written atomically so that parallel workers can race to build it; then loaded with :mod:`ctypes` (which
releases the GIL while a kernel runs). No build step and no new dependency. They run for float32 CPU tensors with
int32 indices on x86-64 CPUs with AVX2. Anywhere else, when no compiler works, or with ``GRCN_BENCH_KERNELS=torch``,
the ops run torch's kernels; :func:`kernel_status` says which, and why.

Families. ``GRCN_BENCH_KERNELS`` is ``native`` (the default), ``torch``, or ``native`` with families switched off,
``native,-dense,-scores`` say (:func:`parse_kernels`), so that each family can be measured against torch's path:

- ``sparse``: the sparse products (plain, headed, pushed) and the segment operations;
- ``dense``: the dense products of :func:`~.dense.linear`;
- ``scores``: the evaluator's ranking scores (numpy's BLAS otherwise).

A family whose results depend on the CPU registers a check (:func:`register_check`) that runs once, on first use,
and keeps torch's path where it fails; :func:`family_status` says what a family runs and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "FAMILIES", "SCORE_GROUP", "SCORE_PANEL", "dense_products_status", "dot_scores_apply", "dot_scores_status",
    "family_status", "forget_loaded", "gemm_tn_depth_fits", "kernel_status", "native_kernels", "pack_score_items",
    "parse_kernels", "register_check", "run_dot_scores", "run_gemm", "run_gemm_tn", "run_sddmm",
    "run_sddmm_backward_pushed", "run_segment_apply", "run_segment_reduce", "run_spmm", "run_spmm_pushed",
    "score_chain", "use_kernels",
]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
#: -ffp-contract=off: a fused multiply-add would round differently from the kernels these replace.
FLAGS = ("-O3", "-mavx2", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")
#: Below this many multiply-adds a product runs on the calling thread: starting a thread costs more than it saves.
THREADED_ABOVE = 1 << 16
ENV_SWITCH = "GRCN_BENCH_KERNELS"


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get("GRCN_BENCH_CACHE"):
        return Path(os.environ["GRCN_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "grcn-bench"


#: The families ``GRCN_BENCH_KERNELS`` switches one by one, and what runs instead when one is off (module docstring).
FAMILIES: dict[str, str] = {
    "sparse": "sparse products: torch's",
    "dense": "dense products: torch's",
    "scores": "ranking scores: numpy's",
}


def parse_kernels(value: str) -> frozenset[str]:
    """The families that may run compiled for a ``GRCN_BENCH_KERNELS`` value: every one for ``"native"``, none for
    ``"torch"``, all but the listed ones for ``"native,-family,..."`` (families: :data:`FAMILIES`). Case and spaces
    do not matter; anything else is a ``ValueError``."""
    parts = [part.strip().lower() for part in value.split(",")]
    off = [part[1:] for part in parts[1:] if part.startswith("-")]
    if parts == ["torch"]:
        return frozenset()
    if parts[0] != "native" or len(off) != len(parts) - 1 or not set(off) <= set(FAMILIES):
        raise ValueError(f"{ENV_SWITCH} must be 'native', 'torch' or 'native' with families switched off "
                         f"('native,-dense'; families: {', '.join(FAMILIES)}), got {value!r}")
    return frozenset(FAMILIES) - set(off)


@functools.lru_cache(maxsize=1)
def _switched_on() -> frozenset[str]:
    return parse_kernels(os.environ.get(ENV_SWITCH, "native"))


def _unavailable_reason() -> str | None:
    if not _switched_on():  # "torch", or every family switched off
        return f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH, '').strip()}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2 (torch's CPU capability: {torch.backends.cpu.get_cpu_capability()})"
    return None


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=target.stem, suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", scratch], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(scratch, target)  # atomic: a concurrent builder's file is as good as ours
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    reason = _unavailable_reason()
    if reason is not None:
        return None, reason
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler found (set CC)"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{platform.machine()}-{digest}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        log.warning("grcn-bench: compiled sparse kernels unavailable, using torch's (%s)", detail.strip()[:500])
        return None, f"build failed: {detail.strip()[:200]}"
    sizes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]  # rows, width, heads, threads
    library.grcn_bench_spmm_f32.argtypes = [ctypes.c_void_p] * 6 + sizes
    library.grcn_bench_sddmm_f32.argtypes = [ctypes.c_void_p] * 5 + sizes
    # rowptr, col, values, x, out, rows, cols, width, channels, threads
    library.grcn_bench_spmm_pushed_f32.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    # rowptr, col, grad, a, b, grad_a, grad_b, rows, cols, width, channels, threads
    library.grcn_bench_sddmm_backward_pushed_f32.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4 + [
        ctypes.c_int]
    library.grcn_bench_segment_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                                                         ctypes.c_int]
    # a, lda, b, bias, out, rows, depth, width, accumulate, threads
    library.grcn_bench_gemm_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [
        ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_int]
    # offsets, src, values, out, segments, width, divide, threads
    library.grcn_bench_segment_apply_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64,
                                                                             ctypes.c_int, ctypes.c_int]
    # g, x, offsets, blocks, partial, out, depth, rows, width, threads
    library.grcn_bench_gemm_tn_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [
        ctypes.c_int64] * 3 + [ctypes.c_int]
    library.grcn_bench_gemm_tn_f32.restype = ctypes.c_int  # 1: no memory for its scratch blocks
    # users, ldu, items, out, ldo, group_max, rows, depth, chain, panels, groups, threads
    library.grcn_bench_dot_scores_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2 + [
        ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_int]
    for kernel in (library.grcn_bench_spmm_f32, library.grcn_bench_sddmm_f32, library.grcn_bench_spmm_pushed_f32,
                   library.grcn_bench_sddmm_backward_pushed_f32, library.grcn_bench_segment_f32,
                   library.grcn_bench_segment_apply_f32, library.grcn_bench_gemm_f32,
                   library.grcn_bench_dot_scores_f32):
        kernel.restype = None
    return library, f"native ({target})"


def native_kernels() -> ctypes.CDLL | None:
    """The loaded kernels, built first if needed, or ``None`` when torch's kernels run (:func:`kernel_status`)."""
    return _load()[0]


#: Each family's check that the compiled kernels give torch's sums on this machine, cached until
#: :func:`forget_loaded` (:func:`register_check`).
_CHECKS: dict[str, Callable[[], tuple[bool, str]]] = {}


def register_check(family: str) -> Callable[[Callable[[], tuple[bool, str]]], Callable[[], tuple[bool, str]]]:
    """Decorator: ``check() -> (ok, reason)`` decides once (until :func:`forget_loaded`) whether ``family``'s
    compiled kernels run on this machine. It runs only with the library loaded and the family switched on."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}")

    def register(check: Callable[[], tuple[bool, str]]) -> Callable[[], tuple[bool, str]]:
        cached = functools.lru_cache(maxsize=1)(check)
        _CHECKS[family] = cached
        return cached

    return register


def family_status(family: str) -> str:
    """``"native"`` when ``family``'s compiled kernels run (:data:`FAMILIES`), else why not: no library, switched
    off, or its check failed on this machine."""
    library, status = _load()
    if library is None:
        return status
    if family not in _switched_on():
        return f"switched off by {ENV_SWITCH}={os.environ.get(ENV_SWITCH, '')}"
    check = _CHECKS.get(family)
    return "native" if check is None or check()[0] else check()[1]


def _ready(family: str) -> ctypes.CDLL | None:
    """The library, when ``family``'s kernels run (:func:`family_status`)."""
    return _load()[0] if family_status(family) == "native" else None


def kernel_status() -> str:
    """``"native (<path of the library>)"``, or why torch's kernels run instead; with the native kernels, each family
    that runs torch's path instead, and why (switched off, or its check failed here)."""
    library, status = _load()
    if library is None:
        return status
    for family, fallback in FAMILIES.items():
        reason = family_status(family)
        if reason != "native":
            status += f"; {fallback} ({reason})"
    return status


@contextlib.contextmanager
def use_kernels(choice: str) -> Iterator[None]:
    """Run the block with the kernels ``choice`` names (a ``GRCN_BENCH_KERNELS`` value, :func:`parse_kernels`),
    through the environment variable (which child processes inherit); the previous choice is restored after it."""
    parse_kernels(choice)
    previous = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = choice
    forget_loaded()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_SWITCH, None)
        else:
            os.environ[ENV_SWITCH] = previous
        forget_loaded()


def forget_loaded() -> None:
    """Forget which kernels were loaded and what their checks found: the next call asks again (after a change of
    ``GRCN_BENCH_KERNELS``, say)."""
    _load.cache_clear()
    _switched_on.cache_clear()
    for check in _CHECKS.values():
        check.cache_clear()


def _eligible(rowptr: Tensor, col: Tensor, rows: int, *floats: Tensor) -> bool:
    """int32 indices whose row pointer has ``rows + 1`` entries inside ``col``, and float32 CPU operands, all
    contiguous. The kernels trust the rest of the pattern (columns inside the operand, ``value_order`` a permutation):
    :class:`~.sparse.CSRPattern`'s builders check them once."""
    return (
        rowptr.dtype == torch.int32 and col.dtype == torch.int32 and rowptr.is_contiguous() and col.is_contiguous()
        and rowptr.dim() == 1 and rowptr.numel() == rows + 1
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in floats)
        and 0 <= int(rowptr[0]) and int(rowptr[-1]) <= col.numel()
    )


def _threads(work: int) -> int:
    return torch.get_num_threads() if work > THREADED_ABOVE else 1


def _pointer(tensor: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def run_spmm(rowptr: Tensor, col: Tensor, values: Tensor, x: Tensor, out: Tensor, *,
             value_order: Tensor | None = None) -> bool:
    """``out[r] = sum_k w_k x[col[k]]`` over row ``r``'s entries, with ``w_k = values[k]``, or
    ``values[value_order[k]]`` (int64) when given. ``x [C, d]`` and ``out [R, d]`` (every row written); or, with
    ``values [nnz, H]``, ``x [C, H, d]`` and ``out [R, H, d]``, head ``h`` weighted by ``values[:, h]`` (``d`` a
    multiple of 8). Runs when the kernels are loaded and the operands qualify (float32 CPU, int32 indices,
    contiguous, matching shapes) and returns ``True``; else writes nothing and returns ``False``."""
    library = _ready("sparse")
    heads = values.size(1) if values.dim() == 2 else 1
    plain = values.dim() == 1 and x.dim() == 2
    headed = values.dim() == 2 and x.dim() == 3 and x.size(1) == heads and x.size(2) % 8 == 0
    if (library is None or not (plain or headed) or out.dim() != x.dim() or out.shape[1:] != x.shape[1:]
            or values.size(0) != col.numel() or not _eligible(rowptr, col, out.size(0), values, x, out)):
        return False
    if value_order is not None and (value_order.dtype != torch.int64 or not value_order.is_contiguous()
                                    or value_order.numel() != col.numel()):
        return False
    rows, width = out.size(0), out.shape[1:].numel()
    order = ctypes.c_void_p(None) if value_order is None else _pointer(value_order)
    library.grcn_bench_spmm_f32(_pointer(rowptr), _pointer(col), _pointer(values), order, _pointer(x), _pointer(out),
                                rows, width, heads, _threads(col.numel() * width))
    return True


def run_spmm_pushed(rowptr: Tensor, col: Tensor, values: Tensor, x: Tensor, out: Tensor) -> bool:
    """``out[m] = A^T x[m]`` with channel ``m``'s weights ``values[m]``, for the pattern ``(rowptr, col)`` of ``A``
    (``[R, C]``), ``values [M, nnz]``, ``x [M, R, d]`` and ``out [M, C, d]``: the sums of :func:`run_spmm` over the
    transpose's pattern, bit for bit, where the transpose lists each column's entries in the order of their rows (as
    every :class:`~.sparse.CSRPattern` does), computed by walking ``A``'s rows; one thread per channel. ``False``
    (nothing written) unless the kernels are loaded and the operands qualify (float32 CPU, int32 indices, contiguous,
    matching shapes, every stored entry in a row)."""
    library = _ready("sparse")
    if (library is None or values.dim() != 2 or x.dim() != 3 or out.dim() != 3 or x.size(0) != values.size(0)
            or out.shape != (x.size(0), out.size(1), x.size(2)) or values.size(1) != col.numel()
            or not _eligible(rowptr, col, x.size(1), values, x, out)
            or int(rowptr[0]) != 0 or int(rowptr[-1]) != col.numel()):
        return False
    channels, rows, width = x.shape
    library.grcn_bench_spmm_pushed_f32(_pointer(rowptr), _pointer(col), _pointer(values), _pointer(x), _pointer(out),
                                       rows, out.size(1), width, channels,
                                       min(channels, _threads(col.numel() * width * channels)))
    return True


#: The channel widths of :func:`run_sddmm_backward_pushed` (the kernel keeps a row in at most two vectors).
BACKWARD_PUSHED_WIDTHS = (8, 16)


def run_sddmm_backward_pushed(rowptr: Tensor, col: Tensor, grad: Tensor, a: Tensor, b: Tensor, grad_a: Tensor,
                              grad_b: Tensor) -> bool:
    """Both gradients of the sampled product ``z[m, k] = a[m, r_k] . b[m, col_k]`` per channel, in one walk over the
    rows: ``grad_a`` the product of the rows with weights ``grad [M, nnz]`` (:func:`run_spmm`'s sums) and ``grad_b``
    the transposed one, pushed (:func:`run_spmm_pushed`'s sums; the same condition on the pattern). ``a [M, R, d]``,
    ``b [M, C, d]`` with ``d`` in :data:`BACKWARD_PUSHED_WIDTHS`, one thread per channel; ``False`` (nothing written)
    unless the kernels are loaded and the operands qualify (float32 CPU, int32 indices, contiguous, matching shapes,
    every stored entry in a row)."""
    library = _ready("sparse")
    if (library is None or grad.dim() != 2 or a.dim() != 3 or b.dim() != 3 or a.size(0) != b.size(0)
            or a.size(2) != b.size(2) or a.size(2) not in BACKWARD_PUSHED_WIDTHS
            or grad.shape != (a.size(0), col.numel()) or grad_a.shape != a.shape or grad_b.shape != b.shape
            or not _eligible(rowptr, col, a.size(1), grad, a, b, grad_a, grad_b)
            or int(rowptr[0]) != 0 or int(rowptr[-1]) != col.numel()):
        return False
    channels, rows, width = a.shape
    library.grcn_bench_sddmm_backward_pushed_f32(
        _pointer(rowptr), _pointer(col), _pointer(grad), _pointer(a), _pointer(b), _pointer(grad_a), _pointer(grad_b),
        rows, b.size(1), width, channels, min(channels, _threads(col.numel() * width * channels)))
    return True


def run_sddmm(rowptr: Tensor, col: Tensor, a: Tensor, b: Tensor, out: Tensor) -> bool:
    """``out[k] = a[r_k] . b[col[k]]`` for every entry (``a [R, d]``, ``b [C, d]``, ``out [nnz]``), or per head
    (``a [R, H, d]``, ``b [C, H, d]``, ``out [nnz, H]``), when the kernels are loaded, the operands qualify and ``d``
    is a positive multiple of 8; ``False`` (nothing written) otherwise."""
    library = _ready("sparse")
    heads = a.size(1) if a.dim() == 3 else 1
    width = a.size(-1)
    shapes = a.dim() in (2, 3) and b.shape[1:] == a.shape[1:] and out.shape == (col.numel(), *a.shape[1:-1])
    if (library is None or not shapes or width == 0 or width % 8
            or not _eligible(rowptr, col, a.size(0), a, b, out)):
        return False
    library.grcn_bench_sddmm_f32(_pointer(rowptr), _pointer(col), _pointer(a), _pointer(b), _pointer(out),
                                 a.size(0), width * heads, heads, _threads(col.numel() * width * heads))
    return True


def run_segment_reduce(src: Tensor, offsets: Tensor, reduce: str, out: Tensor) -> bool:
    """``out[s] = reduce(src[offsets[s]:offsets[s + 1]])`` over dimension 0 (``reduce`` ``"sum"`` or ``"max"``; an
    empty segment gives 0 or -inf) with the sums and NaN rule of ``torch.segment_reduce``, when the kernels are loaded
    and the operands qualify (float32 CPU contiguous, int64 offsets inside ``src``; their order is trusted, as that of
    a CSR row pointer); ``False`` (nothing written) otherwise."""
    library = _ready("sparse")
    if (library is None or reduce not in ("sum", "max") or offsets.dtype != torch.int64 or offsets.dim() != 1
            or not offsets.is_contiguous() or src.dim() < 1 or out.shape[1:] != src.shape[1:]
            or out.size(0) != offsets.numel() - 1 or not all(t.dtype == torch.float32 and t.device.type == "cpu"
                                                             and t.is_contiguous() for t in (src, out))
            or 0 > int(offsets[0]) or int(offsets[-1]) > src.size(0)):
        return False
    width = src.shape[1:].numel()
    library.grcn_bench_segment_f32(_pointer(offsets), _pointer(src), _pointer(out), out.size(0), width,
                                   int(reduce == "max"), _threads(src.numel()))
    return True


def run_segment_apply(src: Tensor, offsets: Tensor, values: Tensor, op: str, out: Tensor) -> bool:
    """``out[k] = src[k] - values[s]`` (``op`` ``"sub"``) or ``src[k] / values[s]`` (``"div"``) for the rows ``k``
    of segment ``s`` (``offsets[s] <= k < offsets[s + 1]``): torch's elementwise operation with ``values`` repeated
    over the segments, the same bits, without the repeated copy. ``out`` may be ``src``. Runs under the conditions of
    :func:`run_segment_reduce` (``src``, ``values`` and ``out`` float32 CPU contiguous with equal trailing shapes,
    ``values`` one row per segment, and the offsets covering ``src`` exactly); ``False`` (nothing written)
    otherwise."""
    library = _ready("sparse")
    if (library is None or op not in ("sub", "div") or offsets.dtype != torch.int64 or offsets.dim() != 1
            or not offsets.is_contiguous() or src.dim() < 1 or out.shape != src.shape
            or values.shape != (offsets.numel() - 1, *src.shape[1:])
            or not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                       for t in (src, values, out))
            or int(offsets[0]) != 0 or int(offsets[-1]) != src.size(0)):
        return False
    width = src.shape[1:].numel()
    library.grcn_bench_segment_apply_f32(_pointer(offsets), _pointer(src), _pointer(values), _pointer(out),
                                         values.size(0), width, int(op == "div"), _threads(src.numel()))
    return True


#: The dense products run here only where MKL's sums are one multiply-add chain per output element over the whole
#: depth (measured: up to 192; deeper products are summed in blocks) and the width is a multiple of 16 (narrower ones
#: and products of fewer than a dozen rows take other MKL paths).
GEMM_MAX_DEPTH = 192
GEMM_MIN_ROWS = 32
#: The weight gradients (:func:`run_gemm_tn`): MKL sums their depth in blocks of 192 from 384 rows on (between 192 and
#: 384 in two halves, which is not reproduced here); checked up to this depth.
GEMM_TN_BLOCK = 192
GEMM_TN_MAX_DEPTH = 1 << 18


def _gemm_fits(a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None, full_rows: int | None = None) -> bool:
    rows, depth, width = a.size(0), a.size(1), b.size(1)
    floats = (a, b, out) if bias is None else (a, b, out, bias)
    return (
        a.dim() == 2 and b.dim() == 2 and out.dim() == 2 and b.size(0) == depth and out.shape == (rows, width)
        and GEMM_MIN_ROWS <= (rows if full_rows is None else full_rows)
        and 0 < depth <= GEMM_MAX_DEPTH and width > 0 and width % 16 == 0
        and a.stride(1) == 1 and a.stride(0) >= depth and b.is_contiguous() and out.is_contiguous()
        and (bias is None or (bias.shape == (width,) and bias.is_contiguous()))
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in floats)
    )


def _gemm(library: ctypes.CDLL, a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None, accumulate: bool) -> None:
    rows, depth, width = a.size(0), a.size(1), b.size(1)
    library.grcn_bench_gemm_f32(_pointer(a), a.stride(0), _pointer(b),
                                ctypes.c_void_p(None) if bias is None else _pointer(bias), _pointer(out), rows, depth,
                                width, int(accumulate), _threads(rows * depth * width))


def gemm_tn_depth_fits(depth: int) -> bool:
    """Whether :func:`run_gemm_tn` reproduces MKL's sums over this many rows (one chain, or blocks of 192)."""
    return 0 < depth <= GEMM_TN_BLOCK or 2 * GEMM_TN_BLOCK <= depth <= GEMM_TN_MAX_DEPTH


def _gemm_tn_fits(g: Tensor, x: Tensor, out: Tensor) -> bool:
    depth = g.size(0)
    return (
        g.dim() == 2 and x.dim() == 2 and x.size(0) == depth and out.shape == (g.size(1), x.size(1))
        and gemm_tn_depth_fits(depth)
        and all(0 < size <= 512 and size % 16 == 0 for size in out.shape)
        and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in (g, x, out))
    )


def _offsets_fit(offsets: Tensor, depth: int) -> bool:
    """Whether ``offsets`` splits ``depth`` rows into blocks of at most 192, in order, on the CPU as int64."""
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 2 or offsets.device.type != "cpu":
        return False
    steps = offsets.diff()
    return (int(offsets[0]) == 0 and int(offsets[-1]) == depth and bool((steps >= 0).all())
            and bool((steps <= GEMM_TN_BLOCK).all()))


def _gemm_tn(library: ctypes.CDLL, g: Tensor, x: Tensor, out: Tensor, offsets: Tensor | None = None) -> None:
    depth, rows, width = g.size(0), g.size(1), x.size(1)
    blocks = -(-depth // GEMM_TN_BLOCK) if offsets is None else offsets.numel() - 1
    partial = g.new_empty(blocks, rows, width)
    if library.grcn_bench_gemm_tn_f32(_pointer(g), _pointer(x),
                                      ctypes.c_void_p(None) if offsets is None else _pointer(offsets), blocks,
                                      _pointer(partial), _pointer(out), depth, rows, width,
                                      _threads(depth * rows * width)):
        raise MemoryError("grcn_bench_gemm_tn_f32: no memory for its scratch blocks")


@register_check("dense")
def _dense_products() -> tuple[bool, str]:
    """Whether this machine's torch computes the dense products with the sums of the compiled ones: asked once, on
    operands shaped as the layers' (MKL's summation order depends on the CPU it runs on, and on its threads)."""
    library = native_kernels()
    generator = torch.Generator().manual_seed(0)
    for depth, rows, width in ((150, 64, 64), (1000, 16, 48), (131077, 64, 64)):
        g = torch.randn(depth, rows, generator=generator)
        x = torch.randn(depth, width, generator=generator)
        out = torch.empty(rows, width)
        _gemm_tn(library, g, x, out)
        if not (torch.equal(out, g.t().mm(x)) and torch.equal(out, x.t().mm(g).t())):
            return False, f"torch's weight gradients sum in another order on this machine ({depth} deep)"
    for rows, depth, width in ((37, 64, 64), (300, 192, 16), (100, 1, 48), (64, 100, 512), (40, 128, 64)):
        weight = torch.randn(2 * width, depth, generator=generator)[:width]  # a slice, as the layers pass them
        x = torch.randn(rows, 2 * depth, generator=generator)[:, :depth]
        bias, start = torch.randn(width, generator=generator), torch.randn(rows, width, generator=generator)
        grad = torch.randn(rows, width, generator=generator)
        cases = [  # (a, b, bias, accumulate into, torch's product)
            (x, weight.t(), None, None, x @ weight.t()),
            (x, weight.t(), bias, None, torch.nn.functional.linear(x, weight, bias)),
            (x, weight.t(), None, start, start.clone().addmm_(x, weight.t())),
            (grad, weight, None, None, grad @ weight),
        ]
        for a, b, add, into, reference in cases:
            out = torch.empty_like(reference) if into is None else into.clone()
            if _gemm_fits(a, b.contiguous(), out, add):
                _gemm(library, a, b.contiguous(), out, add, into is not None)
                if not torch.equal(out, reference):
                    shape = "x".join(map(str, (a.size(0), a.size(1), b.size(1))))
                    return False, f"torch's dense products sum in another order on this machine ({shape})"
    return True, "native"


def dense_products_status() -> str:
    """``"native"`` when :func:`run_gemm` runs, else why not (no native kernels, switched off, or torch sums
    differently here)."""
    return family_status("dense")


def run_gemm(a: Tensor, b: Tensor, out: Tensor, *, bias: Tensor | None = None, accumulate: bool = False,
             full_rows: int | None = None) -> bool:
    """``out = a @ b``, ``a @ b + bias`` or (``accumulate``, not with a bias) ``out + a @ b``, with the bits of
    torch's own product, when the native kernels run, torch sums such products as they do on this machine
    (:func:`dense_products_status`) and the operands qualify: float32 CPU, ``a [n, k]`` with unit column stride (a
    column slice will do), ``b [k, w]`` and ``out [n, w]`` contiguous, ``n >= 32``, ``k <= 192``, ``w`` a multiple
    of 16. With ``full_rows``, ``a``'s rows are some of those of a product with that many rows, whose bits they get
    (each output element is summed on its own), and the row limit applies to ``full_rows``. Returns ``True`` then,
    else ``False`` with nothing written."""
    if bias is not None and accumulate:
        raise ValueError("run_gemm: add a bias or accumulate into out, not both")
    library = _ready("dense")
    if library is None or not _gemm_fits(a, b, out, bias, full_rows):
        return False
    _gemm(library, a, b, out, bias, accumulate)
    return True


def run_gemm_tn(g: Tensor, x: Tensor, out: Tensor, *, block_offsets: Tensor | None = None) -> bool:
    """``out = g^T x`` (a linear map's weight gradient ``grad^T input``) with the bits of torch's product, under the
    conditions of :func:`run_gemm`, for contiguous float32 ``g [n, r]``, ``x [n, w]``, ``out [r, w]`` with ``r`` and
    ``w`` multiples of 16 up to 512, and ``n`` up to 192 or from 384 to 262,144.

    With ``block_offsets`` (int64, ``[B + 1]``, from 0 to ``n``, steps of at most 192) the rows are those of a
    larger product whose other rows of ``g`` are zero, and block ``b`` is rows ``block_offsets[b] ..
    block_offsets[b+1]``: the blocks of 192 rows of that product (:func:`~.dense.linear` with ``rows``). The result
    is that product's, bit for bit while its inputs are finite: each chain starts at ``+0``, which a zero term leaves
    unchanged (round-to-nearest never turns it into ``-0``). ``n`` may be any size then.

    Returns ``True`` when it ran, else ``False`` with nothing written."""
    library = _ready("dense")
    if library is None:
        return False
    if block_offsets is None:
        if not _gemm_tn_fits(g, x, out):
            return False
    elif not (_gemm_tn_fits(g[:1], x[:1], out) and x.size(0) == g.size(0) and _offsets_fit(block_offsets, g.size(0))):
        return False
    _gemm_tn(library, g, x, out, block_offsets)
    return True


#: Items per group of :func:`run_dot_scores`' maxima: two panels of 16.
SCORE_GROUP = 32
#: Items per packed panel (:func:`pack_score_items`).
SCORE_PANEL = 16


def score_chain(depth: int) -> int | None:
    """The length of the chains ``torch.mm`` sums a ``depth``-deep dot product in on this project's machines (MKL,
    found by experiment as for :func:`run_gemm_tn`): the whole depth up to 192, two halves up to 383 (odd depths
    there: not known, ``None``), 192 from 384 on."""
    if depth <= 0:
        return None
    if depth <= GEMM_MAX_DEPTH:
        return depth
    if depth < 2 * GEMM_TN_BLOCK:
        return depth // 2 if depth % 2 == 0 else None
    return GEMM_TN_BLOCK


def pack_score_items(item: Tensor) -> Tensor:
    """``item [I, d]`` as :func:`run_dot_scores` reads it: ``[P, d, 16]`` with item ``j`` in column ``j % 16`` of
    panel ``j // 16``, ``P`` even, the padding items zero."""
    num_items, depth = item.shape
    panels = -(-num_items // SCORE_PANEL)
    panels += panels % 2
    padded = item.new_zeros(panels * SCORE_PANEL, depth)
    padded[:num_items] = item
    return padded.view(panels, SCORE_PANEL, depth).transpose(1, 2).contiguous()


def _dot_scores_fit(users: Tensor, packed: Tensor, out: Tensor, group_max: Tensor) -> bool:
    rows, depth = users.shape if users.dim() == 2 else (0, 0)
    return (
        users.dim() == 2 and packed.dim() == 3 and out.dim() == 2 and group_max.dim() == 2
        and packed.size(0) % 2 == 0 and packed.size(1) == depth and packed.size(2) == SCORE_PANEL
        and score_chain(depth) is not None and rows > 0
        and out.size(0) == rows and out.size(1) == packed.size(0) * SCORE_PANEL and out.stride(1) == 1
        and group_max.size(0) == rows and group_max.size(1) * SCORE_GROUP <= out.size(1)
        and users.stride(1) == 1 and packed.is_contiguous() and group_max.is_contiguous()
        and packed.data_ptr() % 32 == 0
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (users, packed, out, group_max))
    )


def _run_dot_scores(library: ctypes.CDLL, users: Tensor, packed: Tensor, out: Tensor, group_max: Tensor) -> None:
    rows, depth = users.shape
    library.grcn_bench_dot_scores_f32(_pointer(users), users.stride(0), _pointer(packed), _pointer(out), out.stride(0),
                                      _pointer(group_max), rows, depth, score_chain(depth), packed.size(0),
                                      group_max.size(1), _threads(rows * depth * out.size(1)))


@register_check("scores")
def _dot_scores() -> tuple[bool, str]:
    """Whether the compiled scores are ``torch.mm``'s on this machine: asked once, on chains of each kind, for
    batches of 32 users or more. MKL sums products of fewer rows in other orders (seen with 1, 3 and 7 rows); the
    compiled scores do not depend on the batch."""
    library = native_kernels()
    generator = torch.Generator().manual_seed(0)
    for rows, depth, num_items in ((37, 64, 1000), (40, 256, 517), (33, 200, 64), (32, 512, 300), (45, 7, 33)):
        users = torch.randn(rows, depth, generator=generator)
        item = torch.randn(num_items, depth, generator=generator)
        packed = pack_score_items(item)
        out = users.new_empty(rows, packed.size(0) * SCORE_PANEL)
        group_max = users.new_empty(rows, num_items // SCORE_GROUP)
        _run_dot_scores(library, users, packed, out, group_max)
        if not torch.equal(out[:, :num_items], users @ item.t()):
            return False, f"torch.mm sums {depth}-deep dot products in another order on this machine"
    return True, "native"


def dot_scores_status() -> str:
    """``"native"`` when :func:`run_dot_scores` runs, else why not."""
    return family_status("scores")


def dot_scores_apply(depth: int) -> bool:
    """Whether :func:`run_dot_scores` runs on this machine for ``depth``-deep embeddings (float32 CPU operands laid
    out as it documents): the kernels run and :func:`score_chain` knows ``torch.mm``'s sums at this depth."""
    return score_chain(depth) is not None and dot_scores_status() == "native"


def run_dot_scores(users: Tensor, packed: Tensor, out: Tensor, group_max: Tensor) -> bool:
    """``out[:, :I] = users @ item.T`` with ``torch.mm``'s bits (:func:`dot_scores_status`), for ``packed =
    pack_score_items(item)``, and ``group_max[r, g] = out[r, 32g:32g+32].amax()`` (NaN where one is NaN) for the
    ``G`` columns of ``group_max`` (``32 G <= P * 16``). ``users [B, d]`` with unit column stride, ``out [B, P * 16]``
    with unit column stride (its columns past ``I`` get the padding items' scores, 0 for finite users),
    ``group_max [B, G]`` contiguous; float32 CPU, a depth :func:`score_chain` knows. Each score is summed on its own:
    a user's scores do not depend on the batch. Returns ``True`` when it ran, else ``False`` with nothing written."""
    library = _ready("scores")
    if library is None or not _dot_scores_fit(users, packed, out, group_max):
        return False
    _run_dot_scores(library, users, packed, out, group_max)
    return True
