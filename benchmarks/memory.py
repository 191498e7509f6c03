"""How the processes that train and evaluate get their memory from the C library (docs/kernels.md, "Heap settings").

glibc's ``malloc`` hands every block over 32 MB (most of a full-scale model's tensors: Tiktok's ``[76085, 256]``
item matrix is 78 MB) to a fresh ``mmap`` and returns it to the kernel on ``free``. A training step allocates and frees
the same few dozen large tensors every time, so each one is page-faulted and zero-filled by the kernel again at every
step: writing into a fresh tensor of that size costs several times as much as writing into a reused one.
:func:`keep_freed_memory` makes ``malloc`` serve those blocks from its heap and keep freed memory there for the next
step. Results are unchanged (the same arithmetic on the same values); only where the bytes live changes.

PyTorch's transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, which the command line sets) still pay on top of it,
because the sparse products gather rows from tens of megabytes, at the price of a more fragmented heap and a higher
peak RSS.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: ``mallopt`` parameters (glibc's ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Free memory that ``malloc`` may keep at the top of its heap before returning it to the kernel (mallopt's int limit).
TRIM_THRESHOLD_BYTES = 2**31 - 1
#: Set to ``system`` to leave the C library's defaults alone.
ENV_VARIABLE = "GRCN_BENCH_MALLOC"


def keep_freed_memory() -> bool:
    """Serve every allocation of this process from ``malloc``'s heap and keep up to 2 GiB of freed memory there.

    Called by the command line, by each executor worker and by each ``perf`` cell before they train; a library user can
    call it too. Peak resident memory can grow where the heap fragments (``perf`` reports it; MMGCN's is the largest).
    Returns whether the setting took effect: ``False`` off glibc (other C libraries have no ``mallopt``) or when
    ``GRCN_BENCH_MALLOC`` is ``system``.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def can_keep_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` applies in this process (glibc, and not opted out); changes nothing."""
    return _mallopt() is not None


def _mallopt():
    """glibc's ``mallopt`` as a ctypes function, or ``None`` off Linux, off glibc or when opted out."""
    if os.environ.get(ENV_VARIABLE, "").lower() == "system" or not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt
