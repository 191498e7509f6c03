"""The ``perf`` command: every cell reported (failures included), kernels side by side (families too), the command
line, and the settings' checks."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from grcn_bench.benchmarks import perf
from grcn_bench.datasets.base import DatasetInfo
from grcn_bench.models import register_model, unregister_model
from grcn_bench.models.base import Recommender
from grcn_bench.models.ops import kernel_status as native_status

SMALL_REFERENCES = {"reference_size": 128, "reference_megabytes": 4}


class _Broken(Recommender):
    def __init__(self, data: DatasetInfo, **options):
        super().__init__(data)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, graph):
        raise RuntimeError("deliberately broken")


@pytest.fixture
def broken_model():
    register_model("perf_test_broken")(_Broken)
    yield "perf_test_broken"
    unregister_model("perf_test_broken")


def test_perf_in_process_reports_every_cell_and_records_failures(broken_model, tmp_path):
    settings = perf.PerfSettings(models=("mf", "grcn", broken_model), datasets=("synthetic:tiny",), batches=2,
                                 warmup=1, subprocess=False, **SMALL_REFERENCES)
    report = perf.run_perf(settings)
    assert set(report) >= {"settings", "machine", "references_start", "references_end", "cells"}
    assert all(value > 0 for value in report["references_start"].values())
    cells = {cell["model"]: cell for cell in report["cells"]}
    for name, width in (("mf", 64), ("grcn", 64 * 3)):
        cell = cells[name]
        assert cell["status"] == "ok" and cell["dataset"] == "synthetic:tiny"
        assert len(cell["train_batch_seconds"]) == cell["train_batches"] == 2
        assert cell["train_batch_median"] == pytest.approx(float(np.median(cell["train_batch_seconds"])))
        assert set(cell["eval_phases"]) == set(perf.PHASES) and cell["eval_users"] > 0
        assert cell["embedding_dim"] == width
        assert cell["scoring_fraction"] == pytest.approx(cell["scoring_gflops"] / cell["reference_gflops"])
        assert cell["peak_rss_bytes"] > 0 and cell["peak_gpu_bytes"] is None
    assert cells[broken_model]["status"] == "failed" and "deliberately broken" in cells[broken_model]["error"]
    table = perf.perf_table(report)
    assert "| mf" in table and "| grcn" in table and "failed" in table
    assert "matmul_gflops_numpy" in perf.references_table(report)


def test_perf_measures_both_kernels_side_by_side(monkeypatch):
    monkeypatch.delenv("GRCN_BENCH_KERNELS", raising=False)
    settings = perf.PerfSettings(models=("grcn",), datasets=("synthetic:tiny",), batches=1, warmup=0,
                                 subprocess=False, kernels=("native", "torch"), **SMALL_REFERENCES)
    report = perf.run_perf(settings)
    assert [(cell["model"], cell["kernels"], cell["status"]) for cell in report["cells"]] == [
        ("grcn", "native", "ok"), ("grcn", "torch", "ok")]
    assert report["cells"][1]["kernel_status"] == "GRCN_BENCH_KERNELS=torch"
    assert report["cells"][0]["kernel_status"] == native_status()
    assert "GRCN_BENCH_KERNELS" not in os.environ  # the choice was the cell's only
    assert "| kernels" in perf.perf_table(report)
    with pytest.raises(ValueError, match="kernels must be among"):
        perf.PerfSettings(kernels=("fast",))
    with pytest.raises(ValueError, match="at least one"):
        perf.PerfSettings(kernels=())


def test_perf_measures_a_family_switched_off_beside_the_rest(monkeypatch):
    """``--kernels native native,-dense``: the same cell with torch's dense products, the rest compiled."""
    monkeypatch.delenv("GRCN_BENCH_KERNELS", raising=False)
    settings = perf.PerfSettings(models=("grcn",), datasets=("synthetic:tiny",), batches=1, warmup=0,
                                 subprocess=False, kernels=("native", "native,-dense"), **SMALL_REFERENCES)
    report = perf.run_perf(settings)
    assert [(cell["kernels"], cell["status"]) for cell in report["cells"]] == [
        ("native", "ok"), ("native,-dense", "ok")]
    switched = report["cells"][1]["kernel_status"]
    if native_status().startswith("native ("):  # where the compiled kernels run at all
        assert "dense products: torch's (switched off by GRCN_BENCH_KERNELS=native,-dense)" in switched
        assert "sparse products: torch's (switched off" not in switched
    assert "GRCN_BENCH_KERNELS" not in os.environ


def test_perf_compile_choice_trains_and_evaluates_through_the_compiled_full_forward(monkeypatch):
    """``torch+compile``: torch's kernels, and every forward, training's and the evaluation's, goes through what
    ``torch.compile`` returned for the full-graph forward (static shapes). torch.compile is replaced by a recorder
    here; the real compilation is the slow test below."""
    compiled_calls, requests = [], []

    def fake_compile(function, *, dynamic=None):
        requests.append(dynamic)

        def run(*args):
            compiled_calls.append(len(args))
            return function(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.delenv("GRCN_BENCH_KERNELS", raising=False)
    settings = perf.PerfSettings(models=("mf",), datasets=("synthetic:tiny",), batches=2, warmup=1,
                                 subprocess=False, kernels=("torch", "torch+compile"), **SMALL_REFERENCES)
    report = perf.run_perf(settings)
    plain, compiled = report["cells"]
    assert (plain["kernels"], compiled["kernels"]) == ("torch", "torch+compile")
    assert plain["status"] == compiled["status"] == "ok", compiled.get("error")
    assert compiled["kernel_status"] == "GRCN_BENCH_KERNELS=torch"  # the suffix is not a kernel switch
    assert requests == [False]  # one static-shape compilation per cell
    assert len(compiled_calls) == 3 + 2  # three training batches, the untimed and the timed evaluation forwards
    assert compiled["first_batch_seconds"] > 0 and plain["first_batch_seconds"] > 0
    assert "first batch s" in perf.perf_table(report).splitlines()[0]
    assert "first batch s" not in perf.perf_table({**report, "settings": {**report["settings"], "kernels": ["torch"]}})
    assert perf.split_compile("native,-dense+compile") == ("native,-dense", True)
    with pytest.raises(ValueError, match="kernels must be among"):
        perf.PerfSettings(kernels=("fast+compile",))


@pytest.mark.slow
def test_perf_compiles_a_model_with_torch_compile():
    settings = perf.PerfSettings(models=("mf",), datasets=("synthetic:tiny",), batches=1, warmup=1,
                                 subprocess=False, kernels=("torch+compile",), **SMALL_REFERENCES)
    (cell,) = perf.run_perf(settings)["cells"]
    assert cell["status"] == "ok", cell.get("error")
    assert cell["first_batch_seconds"] > cell["train_batch_median"]  # the compilation


def test_perf_kernels_option_takes_every_family_switch():
    parser = argparse.ArgumentParser()
    perf.add_perf_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["perf", "--kernels", *perf.KERNEL_CHOICES, "native,-dense,-scores"])
    assert args.kernels == [*perf.KERNEL_CHOICES, "native,-dense,-scores"]
    assert perf.PerfSettings(kernels=tuple(args.kernels)).kernels == tuple(args.kernels)
    for wrong in ("fast", "native,-gpu", "native,dense"):
        with pytest.raises(SystemExit):
            parser.parse_args(["perf", "--kernels", wrong])


def test_perf_command_line_writes_json(tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    perf.add_perf_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "perf.json"
    args = parser.parse_args(["perf", "--models", "mf", "--datasets", "synthetic:tiny", "--batches", "1",
                              "--warmup", "0", "--in-process", "--reference-size", "128", "--reference-mb", "4",
                              "--out", str(out)])
    assert perf.cmd_perf(args) == 0
    report = json.loads(out.read_text())
    assert [cell["model"] for cell in report["cells"]] == ["mf"]
    assert report["settings"]["batches"] == 1 and report["settings"]["subprocess"] is False
    assert "| mf" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = parser.parse_args(["perf", "--device", "cuda", "--out", str(out)])
    assert perf.cmd_perf(cuda) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_perf_settings_and_references_validate():
    with pytest.raises(ValueError, match="batches >= 1"):
        perf.PerfSettings(batches=0)
    with pytest.raises(ValueError, match="no dataset"):
        perf.PerfSettings(datasets=())
    with pytest.raises(KeyError, match="unknown model"):
        perf.run_perf(perf.PerfSettings(models=("no_such_model",), datasets=("synthetic:tiny",)))
    with pytest.raises(ValueError, match="unknown matmul library"):
        perf.matmul_gflops("cupy")
    assert perf.matmul_gflops("numpy", size=64, repeats=1) > 0
    assert perf.copy_bandwidth(megabytes=1, repeats=1) > 0


@pytest.mark.slow
def test_perf_runs_each_cell_in_a_fresh_process():
    report = perf.run_perf(perf.PerfSettings(models=("mf",), datasets=("synthetic:tiny",), batches=1, warmup=0,
                                             **SMALL_REFERENCES))
    (cell,) = report["cells"]
    assert cell["status"] == "ok" and cell["peak_rss_bytes"] > 0
