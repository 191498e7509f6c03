"""Reports: tables, figures and the report bundle, all read from a results directory.

``results_frame(results_dir)`` returns every stored cell as a pandas DataFrame (see :mod:`.frame`).
"""

from .frame import results_frame

__all__ = ["results_frame"]
