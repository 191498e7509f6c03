"""Processes leave none of PyG's generated ``*_propagate_*.py`` modules in the temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import sys
from grcn_bench.datasets import load_dataset
from grcn_bench.models import get_model

data = load_dataset("synthetic:tiny")
for name in ("ngcf", "disengcn", "graphsage"):
    get_model(name)(data.info())
generated = [m.__file__ for m in list(sys.modules.values()) if "_propagate_" in (getattr(m, "__file__", "") or "")]
print("\\n".join(generated))
"""


def test_generated_propagate_modules_are_removed_at_exit(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    generated = done.stdout.split()
    assert generated and all(path.startswith(str(tmp_path)) for path in generated)  # PyG did write them here
    assert not [p for p in tmp_path.iterdir() if "_propagate_" in p.name]
