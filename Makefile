# The README's commands. Each one sets itself up: a .venv is created when missing and the project is (re)installed
# into it when setup.cfg, pyproject.toml or constraints.txt are newer than the last install, then the job runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.grcn-bench-installed
# Fresh large allocations are page-fault bound on these machines; PyTorch reads this to use transparent huge pages.
export THP_MEM_ALLOC_ENABLE ?= 1

.PHONY: bench test test-all lint install clean

# One one-thread worker per core runs quick's small cells side by side: the same tables as one process with all the
# threads, and faster (measured in docs/performance.md).
bench: install
	$(PY) run_benchmarks.py run quick --executor process --threads-per-worker 1

test: install
	$(VENV)/bin/pytest -q --durations=20

test-all: install
	$(VENV)/bin/pytest -q -m ""

lint: install
	$(VENV)/bin/ruff check .

install: $(STAMP)

$(STAMP): setup.cfg constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,ray]"
	@touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
