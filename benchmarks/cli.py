"""Command line: ``python run_benchmarks.py [run|report|list|describe|perf] ...`` (also ``grcn-bench``).

With no arguments it runs the ``quick`` experiment and writes its report: that is ``make bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import Cell, Experiment, SearchSettings
from .memory import keep_freed_memory
from .search import Plan, derivable, estimate, plan_experiment, run_search
from .store import ResultStore

DEFAULT_RESULTS = Path("results")


def _parse_memory(text: str) -> int:
    """``1G``, ``512M``, ``2GiB`` or a plain number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if value and value[-1] in units:
            return int(float(value[:-1]) * units[value[-1]])
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (examples: 1G, 512M, 1073741824)") from None


def _number(*, positive: bool) -> Callable[[str], float]:
    """An argparse type for a finite float, > 0 (``positive``) or >= 0: ``--lr nan`` is refused up front."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}")
        return value

    return parse


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grcn-bench",
        description="GRCN benchmark suite: run experiments, write reports, inspect datasets and models.",
        epilog="With no command, runs the 'quick' experiment and writes its report. Exit status: 0 done (a diverged "
           "cell is a result), 1 some cell is stored as failed, 2 bad input or an unusable file or directory.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per epoch to the console")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run an experiment (a preset or a TOML file), or an ad-hoc grid")
    # Also accepted after the command; SUPPRESS keeps `grcn-bench -v run` working (a subparser default would reset it).
    run.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="log one line per epoch to the console")
    run.add_argument("experiment", nargs="?", default=None,
                     help="preset name (see `list`) or path to a TOML file; default: 'quick', or an ad-hoc grid "
                          "when --models and --datasets are given")
    run.add_argument("--models", nargs="+", help="model names or preset labels (default: the experiment's)")
    run.add_argument("--datasets", nargs="+", help="dataset specs: synthetic:<preset>[?k=v&...] or a directory")
    run.add_argument("--seeds", nargs="+", type=_at_least(0), help="seeds (default: the experiment's)")
    run.add_argument("--lr", nargs="+", type=_number(positive=True), help="learning rates of the grid")
    run.add_argument("--reg", nargs="+", type=_number(positive=False),
                     help="λ values of the grid (weight of the ego-L2 term)")
    run.add_argument("--max-epochs", type=_at_least(1), help="upper bound on epochs (default 1000)")
    run.add_argument("--patience", type=_at_least(1), help="early-stopping patience in epochs (default 20)")
    run.add_argument("--batch-size", type=_at_least(1), help="triplets per batch (default 1024)")
    run.add_argument("--protocol", choices=["standard", "official-grcn"],
                     help="evaluation protocol: standard, or the released code's (audit only; docs/protocol.md)")
    run.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    run.add_argument("--eval-memory", type=_parse_memory, default="1G",
                     help="memory budget for one batch of evaluation scores (default 1G)")
    run.add_argument("--out", type=Path, help="results directory (default results/<experiment>)")
    run.add_argument("--force", action="store_true", help="rerun cells that already have a stored result")
    run.add_argument("--retry-failed", action="store_true", help="rerun only cells stored as failed")
    run.add_argument("--keep-embeddings", action="store_true", help="store final embeddings (for t-SNE figures)")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--dry-run", action="store_true",
                     help="list the cells the next round would run, each study's stage and an estimate of the "
                          "epochs the whole search trains; run nothing")
    run.add_argument("--search", choices=["grid", "halving"],
                     help="grid: every lr x λ point trained to early stopping; halving: successive halving on "
                          "validation Recall@10 (default: the experiment's, else grid)")
    run.add_argument("--selection-seeds", type=_at_least(1), metavar="N",
                     help="select on the mean of the first N seeds, then run the other seeds at the selected point "
                          "only (default: the experiment's, else every seed selects)")
    run.add_argument("--min-epochs", type=_at_least(1), help="halving: epochs of the first rung (default 10)")
    run.add_argument("--eta", type=_at_least(2), help="halving: keep the best 1/eta points at each rung (default 3)")
    run.add_argument("--survivors", type=_at_least(1),
                     help="halving: points (per lr) trained to early stopping (default 2)")
    run.add_argument("--per-lr", action=argparse.BooleanOptionalAction, default=None,
                     help="halving: halve within each learning rate, so that learning rates are compared at "
                          "convergence (default); --no-per-lr halves across all points")
    run.add_argument("--executor", choices=["serial", "process", "ray"], default="serial",
                     help="who runs the cells: this process (default), a local process pool, or Ray tasks")
    run.add_argument("--workers", type=int,
                     help="process pool size (default: one per core; one on CUDA); CPUs of a local Ray session")
    run.add_argument("--devices", nargs="+", metavar="DEVICE",
                     help="process executor: one worker per entry, e.g. cuda:0 cuda:1 (repeat one for more)")
    run.add_argument("--threads-per-worker", type=int,
                     help="torch threads per worker (default cores // workers); the CPUs each Ray task asks for")
    run.add_argument("--ray-address", help="Ray cluster to join (e.g. auto, 10.0.0.1:6379); default: a local "
                                           "session on 127.0.0.1. Workers need --out on a shared filesystem")
    run.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                     help="import a module or .py file here and in every worker first (to register your own models, "
                          "dataset formats, metrics or report sections); repeatable")

    listing = sub.add_parser("list", help="list registered models, dataset formats, metrics and report sections, "
                                          "experiment presets and synthetic dataset presets")
    _add_plugin_option(listing)

    describe = sub.add_parser("describe", help="print a dataset's card (counts, density, modalities, checksums)")
    describe.add_argument("dataset", nargs="+", help="synthetic:<preset>[?k=v&...] or a directory")
    _add_plugin_option(describe)

    from .perf import add_perf_parser

    add_perf_parser(sub)

    report = sub.add_parser("report", help="write report.md and report.html for a results directory")
    report.add_argument("results", type=Path, help="results directory written by `run`")
    _add_plugin_option(report)

    compare = sub.add_parser("compare-search",
                             help="exhaustive grid against successive halving: selected points, spread and cost")
    compare.add_argument("grid", type=Path, help="results directory of a --search grid run")
    compare.add_argument("halving", type=Path, help="results directory of a --search halving run of the same grid")
    compare.add_argument("--csv", type=Path, help="also write the comparison as CSV")
    compare.add_argument("--replay", nargs="+", default=[], metavar="MIN,ETA,SURVIVORS",
                         help="also replay other halving schedules from the grid's histories (no training), e.g. "
                              "10,3,2 or 10,3,1,lr (halving within each learning rate)")
    return parser


def _add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """``--plugin`` for the commands that read results or data: the plugins that registered a dataset format, a
    metric or a report section for ``run`` are needed to describe, list or report too."""
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a module or .py file first (one that registers models, dataset formats, metrics "
                             "or report sections); repeatable")


_GLOBAL_FLAGS = ("-h", "--help", "-v", "--verbose")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, arg in enumerate(argv) if arg not in _GLOBAL_FLAGS), len(argv))
    if first < len(argv) and argv[first].startswith("-"):
        argv.insert(first, "run")  # `run_benchmarks.py --out DIR` means `run --out DIR` (no arguments means `run`)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("grcn_bench").setLevel(logging.DEBUG)
    command = args.command or "run"
    if args.command is None:
        args = build_parser().parse_args([*argv, "run"])
    try:
        if command in ("list", "describe", "report"):
            from .executors import load_plugins

            load_plugins(args.plugin)
        if command == "run":
            return cmd_run(args)
        if command == "list":
            return cmd_list()
        if command == "describe":
            return cmd_describe(args.dataset)
        if command == "report":
            return cmd_report(args.results)
        if command == "compare-search":
            return cmd_compare_search(args.grid, args.halving, args.csv, args.replay)
        if command == "perf":
            from .perf import cmd_perf

            return cmd_perf(args)
    except (KeyError, ValueError, OSError) as err:  # bad input, or the filesystem: one line, exit status 2
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {command}")


def cmd_describe(specs: Sequence[str]) -> int:
    from tabulate import tabulate

    from grcn_bench.datasets import load_dataset

    for spec in specs:
        dataset = load_dataset(spec)
        print(f"\nDataset card: {spec}\n")
        print(tabulate(dataset.card.rows(), headers=["field", "value"], tablefmt="github"))
    return 0


def cmd_list() -> int:
    from tabulate import tabulate

    from grcn_bench.datasets import PRESETS
    from grcn_bench.datasets.formats import registered_formats
    from grcn_bench.models import available_models, get_model

    from .config import available_experiments, load_experiment
    from .metrics import available_metrics, get_metric

    rows = [(name, _first_line(get_model(name).__doc__)) for name in available_models()]
    print(tabulate(rows, headers=["model", "description"], tablefmt="github"))
    print()
    rows = []
    for name in available_experiments():
        experiment = load_experiment(name)
        rows.append((name, len(experiment.cells()), experiment.description))
    print(tabulate(rows, headers=["experiment", "cells", "description"], tablefmt="github"))
    print()
    rows = [(f"synthetic:{name}", _first_line(getattr(preset, "description", ""))) for name, preset in PRESETS.items()]
    print(tabulate(rows, headers=["dataset preset", "description"], tablefmt="github"))
    print()
    rows = [(f.name, f.looks_like or f.name, _first_line(f.load.__doc__)) for f in registered_formats()]
    print(tabulate(rows, headers=["dataset format", "recognised by", "loader"], tablefmt="github"))
    print()
    rows = [(name, get_metric(name).title, _first_line(get_metric(name).compute.__doc__))
            for name in available_metrics()]
    print(tabulate(rows, headers=["metric", "title", "definition"], tablefmt="github"))
    print()
    from grcn_bench.reports.bundle import available_sections, get_section

    rows = [(name, f"{get_section(name).order:g}", _first_line(get_section(name).render.__doc__))
            for name in available_sections()]
    print(tabulate(rows, headers=["report section", "order", "content"], tablefmt="github"))
    return 0


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else ""


def cmd_run(args: argparse.Namespace) -> int:
    from grcn_bench.models import get_model

    from .config import ModelEntry, load_experiment
    from .executors import MissingExtraError, load_plugins, run_grid

    load_plugins(args.plugin)  # before the model names are checked: plugins may register models

    if args.experiment is None and args.models and args.datasets:
        experiment = Experiment(name="adhoc", models=tuple(ModelEntry(m, m) for m in args.models),
                                datasets=tuple(args.datasets))
    else:
        experiment = load_experiment(args.experiment or "quick")
    train = {"max_epochs": args.max_epochs, "patience": args.patience, "batch_size": args.batch_size,
             "protocol": args.protocol}
    search = {"method": args.search, "selection_seeds": args.selection_seeds, "min_epochs": args.min_epochs,
              "eta": args.eta, "survivors": args.survivors, "per_lr": args.per_lr}
    experiment = experiment.override(models=args.models, datasets=args.datasets, seeds=args.seeds, lr=args.lr,
                                     reg=args.reg, train=train, search=search)
    for entry in experiment.models:
        get_model(entry.name)  # fail before any training on an unknown model name
    out = args.out or DEFAULT_RESULTS / experiment.name
    store = ResultStore(out)
    if args.dry_run:
        return print_plan(experiment, store)
    writable_directory(out)

    def write_manifest(plan: Plan) -> None:
        store.write_json("experiment.json", manifest(experiment, plan))

    def run_round(cells: list[Cell], keep: frozenset[str]) -> list[dict]:
        return run_grid(cells, store, executor=args.executor, workers=args.workers, devices=args.devices,
                        threads_per_worker=args.threads_per_worker, ray_address=args.ray_address,
                        plugins=args.plugin, force=True, device=args.device, eval_memory=args.eval_memory,
                        progress=not args.no_progress, keep_embeddings=args.keep_embeddings, embeddings_for=keep)

    print(f"{experiment.name}: {experiment.search.describe(experiment.seeds)} -> {out}", file=sys.stderr)
    try:
        plan, results = run_search(experiment, store, run_round, force=args.force, retry_failed=args.retry_failed,
                                   on_plan=write_manifest)
    except MissingExtraError as err:  # e.g. Ray is not installed: the message says how to install it
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [r for r in results if r["status"] != "ok"]
    for r in failed:
        print(f"{r['status']}: {r['cell_id']}: {r.get('error') or r.get('stop_reason')}", file=sys.stderr)
    print(f"ran {len(results)} cells ({len(failed)} not ok); {len(store.cell_ids())} stored in {out}",
          file=sys.stderr)
    # A failed cell (an exception, not a diverged loss) is stored so that the grid goes on; it is never passed over
    # in silence, whether it failed now or in an earlier run whose result this one reused.
    ran_now = {r["cell_id"] for r in results}
    stored_failed = sorted({c.cell_id for c in [*plan.requested(), *plan.rung_cells()]
                            if store.status(c.cell_id) == "failed"})
    earlier = [cell_id for cell_id in stored_failed if cell_id not in ran_now]
    if earlier:
        print(f"{len(earlier)} cell(s) stored as failed by an earlier run were reused: {', '.join(earlier[:3])}"
              f"{' ...' if len(earlier) > 3 else ''}", file=sys.stderr)
    code = 0
    if stored_failed:
        print(f"error: {len(stored_failed)} cell(s) failed; their tracebacks are in {store.cells_dir}/<cell>.json. "
              "Fix the cause, then rerun with --retry-failed", file=sys.stderr)
        code = 1
    if not args.no_report:
        return cmd_report(out) or code
    return code


def writable_directory(out: Path) -> None:
    """Make sure results can be written to ``out`` before anything trains (a file, or a read-only place, is one line
    of error instead of a traceback after the first cell)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write there ({err.strerror or err})") from None


def manifest(experiment: Experiment, plan: Plan) -> dict:
    """``experiment.json``: what the report reads (every finished run requested, with its label and group) and how
    the hyper-parameters were searched."""
    return {"name": experiment.name, "description": experiment.description,
            "cells": [c.to_dict() for c in plan.requested()], "report": dict(experiment.report),
            "search": {**dataclasses.asdict(experiment.search),
                       "seeds": list(experiment.seeds),
                       "selection_seed_list": list(experiment.seeds[: experiment.search.selection_seeds or None]),
                       "policy": experiment.search.describe(experiment.seeds),
                       "reused": list(dict.fromkeys(f"{e.label} ({e.group}) from {e.tuned_from}"
                                                    for e in experiment.models if e.tuned_from)),
                       "complete": plan.done,
                       "rung_cells": [c.cell_id for c in plan.rung_cells()]}}


def print_plan(experiment: Experiment, store: ResultStore) -> int:
    """``run --dry-run``: the next round's cells, every study's stage, the entries waiting for a selection, and the
    epochs the whole search is estimated to train."""
    plan = plan_experiment(experiment, store)
    print(f"# {experiment.name}: {experiment.search.describe(experiment.seeds)}")
    for study_plan in plan.studies:
        study = study_plan.study
        rungs = " ".join(f"{len(r.points)}x{r.budget}ep->{len(r.kept)}" for r in study_plan.rungs)
        chosen = "" if study_plan.selected is None else f" selected lr={study_plan.selected[0]} " \
                                                         f"reg={study_plan.selected[1]}"
        print(f"# study {study.template.label}  {study.template.dataset}  [{study.template.group}]  "
              f"{study_plan.stage}{' ' + rungs if rungs else ''}{chosen}")
    for label, dataset, source, options in plan.waiting:
        shown = f" {json.dumps(options, sort_keys=True)}" if options else ""
        print(f"# waiting {label}{shown}  {dataset}: takes lr and λ from {source}'s selection, once that is done")
    derived_now, derived_later = derivable(plan, store)
    derived = {cell.cell_id for cell in derived_now}
    for cell in plan.pending:
        kind = f"rung {cell.settings.max_epochs}ep" if not cell.final else "run"
        kind += " derived" if cell.cell_id in derived else ""
        print(f"{cell.cell_id}  {kind:19s}  {cell.label}  {cell.dataset}  lr={cell.settings.lr} "
              f"reg={cell.settings.reg_weight} seed={cell.settings.seed}  [{cell.group}]")
    guess = estimate(experiment, store)
    print(f"{len(plan.pending)} cells in the next round ({len(derived_now)} derived from standard runs' audit "
          f"records, no training; {len(derived_later)} more once their standard twin in this round has run); the "
          f"whole search from scratch: {guess.rung_cells} rung "
          f"cells ({guess.rung_epochs} epochs at most) and {guess.runs} runs to early stopping, about "
          f"{guess.epochs:,.0f} epochs ({guess.assumption}), at most {guess.max_epochs:,} epochs", file=sys.stderr)
    return 0


def cmd_compare_search(grid: Path, halving: Path, csv: Path | None, replay: Sequence[str] = ()) -> int:
    from tabulate import tabulate

    from grcn_bench.reports.search_compare import compare_searches, replay_halving, totals

    schedules = []
    for text in replay:
        parts = text.split(",")
        try:
            per_lr = parts[3:] == ["lr"]
            if len(parts) != 3 + per_lr:
                raise ValueError("three numbers, then optionally 'lr'")
            min_epochs, eta, survivors = (int(part) for part in parts[:3])
            schedules.append(SearchSettings(method="halving", min_epochs=min_epochs, eta=eta, survivors=survivors,
                                            per_lr=per_lr))
        except ValueError as err:
            raise ValueError(f"--replay {text!r}: expected MIN,ETA,SURVIVORS[,lr] such as 10,3,2 or 10,3,1,lr "
                             f"({err})") from None

    comparison = compare_searches(grid, halving)
    if comparison.empty:
        print(f"error: {grid} and {halving} select no common (model, dataset) under the standard protocol",
              file=sys.stderr)
        return 2
    print(tabulate(comparison, headers="keys", tablefmt="github", showindex=False, floatfmt=".4g"))
    summary = totals(comparison)
    print(f"\nepochs: grid {summary['grid_epochs']:,} / halving {summary['halving_epochs']:,} = "
          f"{summary['epoch_ratio']:.2f}x; seconds: grid {summary['grid_cpu_seconds']:,.0f} / halving "
          f"{summary['halving_cpu_seconds']:,.0f} = {summary['seconds_ratio']:.2f}x; picks: {summary['same']} same, "
          f"{summary['within_spread']} within the seed spread, {summary['worse']} worse")
    if csv is not None:
        comparison.to_csv(csv, index=False)
    spreads = {(row.label, row.dataset): row.seed_spread for row in comparison.itertuples()}
    for search in schedules:
        replayed = replay_halving(grid, search, spreads=spreads)
        counts = replayed.verdict.value_counts()
        print(f"replayed halving min_epochs={search.min_epochs} eta={search.eta} survivors={search.survivors}"
              f"{' per lr' if search.per_lr else ''}: "
              f"epochs {replayed.epochs.sum():,} (grid {replayed.grid_epochs.sum():,}, "
              f"{replayed.grid_epochs.sum() / replayed.epochs.sum():.2f}x); picks: {counts.get('same', 0)} same, "
              f"{counts.get('within spread', 0)} within the seed spread, {counts.get('worse', 0)} worse "
              f"({', '.join(replayed[replayed.verdict == 'worse'].label) or 'none'})")
    return 0


def cmd_report(results: Path) -> int:
    try:
        from grcn_bench.reports.bundle import write_report
    except ImportError:
        print("report: not yet implemented (reports/bundle.py); results are in", results, file=sys.stderr)
        return 0
    path = write_report(results)
    print(f"report: {path}")
    return 0
