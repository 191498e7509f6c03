"""The package layout: folders mapped under grcn_bench, nothing shadowing other libraries."""

from __future__ import annotations

import importlib.util
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


def test_import_datasets_never_resolves_into_this_repository():
    # Run from the repository root, the most likely place for the clash: `import datasets` must not find our folder.
    code = (
        "import importlib.util, sys;"
        "spec = importlib.util.find_spec('datasets');"
        "print(spec.origin if spec else 'none')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin == "none" or not Path(origin).resolve().is_relative_to(REPO), origin
    spec = importlib.util.find_spec("models")
    assert spec is None or not Path(spec.origin).resolve().is_relative_to(REPO)


def test_run_benchmarks_entry_point_takes_repo_root_off_sys_path():
    code = "import runpy, sys; sys.argv = ['run_benchmarks.py', '--help']; runpy.run_path('run_benchmarks.py')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "grcn-bench" in out.stdout


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make bench" in readme
