"""grcn-bench: a benchmark suite for multimedia recommendation with implicit feedback.

The repository's top-level folders ``models/``, ``datasets/``, ``benchmarks/`` and ``reports/`` are installed as
``grcn_bench.models``, ``grcn_bench.datasets``, ... (see ``setup.cfg``), so nothing here shadows other libraries.
"""

__version__ = "0.1.0"
