"""The package layout: folders mapped under grcn_bench, nothing shadowing other libraries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_import_from_the_repository_folders():
    import grcn_bench.benchmarks
    import grcn_bench.datasets
    import grcn_bench.models
    import grcn_bench.reports

    for module, folder in [
        (grcn_bench.datasets, "datasets"),
        (grcn_bench.models, "models"),
        (grcn_bench.benchmarks, "benchmarks"),
        (grcn_bench.reports, "reports"),
    ]:
        assert Path(module.__file__).resolve().parent == REPO / folder


def test_import_datasets_never_resolves_into_this_repository(tmp_path):
    # The installed package must not put the repository root on sys.path (an editable install could). Python puts
    # the current directory first for `python -c` and `python -m`, so this runs from elsewhere, as a user's
    # script would.
    code = (
        "import importlib.util;"
        "print(*[getattr(importlib.util.find_spec(n), 'origin', None) for n in ('datasets', 'models')], sep='\\n')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origins = out.stdout.split()
    assert len(origins) == 2
    for origin in origins:
        assert origin in (None, "None") or not Path(origin).resolve().is_relative_to(REPO), origin


def test_run_benchmarks_entry_point_takes_repo_root_off_sys_path():
    code = (
        "import runpy, sys; sys.argv = ['run_benchmarks.py', '--help'];"
        "runpy.run_path('run_benchmarks.py', run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "grcn-bench" in out.stdout


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make bench" in readme
