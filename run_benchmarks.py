#!/usr/bin/env python
"""Entry point: ``python run_benchmarks.py [run|report|list|describe|perf] ...``.

The repository root is taken off ``sys.path`` first, so that the top-level ``datasets/`` folder never shadows
HuggingFace's ``datasets``; the code is imported only as the installed ``grcn_bench`` package.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from grcn_bench.benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
