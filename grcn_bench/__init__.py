"""grcn-bench: a benchmark suite for multimedia recommendation with implicit feedback.

The repository's top-level folders ``models/``, ``datasets/``, ``benchmarks/`` and ``reports/`` are installed as
``grcn_bench.models``, ``grcn_bench.datasets``, ... (see ``setup.cfg``), so nothing here shadows other libraries.
"""

import atexit
import contextlib
import os
import sys
import tempfile

__version__ = "0.1.0"


def remove_generated_propagate_modules() -> list[str]:
    """Delete the ``<module>_propagate_<random>.py`` files that PyG's ``MessagePassing`` writes to the temporary
    directory (one per layer class and process, never removed) for the modules this process loaded from them.
    Registered to run at exit; returns the paths removed."""
    folder = os.path.realpath(tempfile.gettempdir())
    removed = []
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if "_propagate_" in os.path.basename(path) and os.path.dirname(os.path.realpath(path)) == folder:
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed


atexit.register(remove_generated_propagate_modules)
