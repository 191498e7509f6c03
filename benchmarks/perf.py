"""``perf``: how fast each model trains and is evaluated at the paper's scale, measured beside this machine's own
references (docs/performance.md).

For every model × dataset it measures, with the code the grid runs:

- seconds per training batch: the trainer's own batch step (the model's ``batch_forward``: the full-graph forward's
  results, over the batch's receptive field where the model computes one; BPR + ego-L2 loss, backward, Adam step;
  batch 1024 of real triplets, a shuffled epoch with sampled negatives), the median over ``--batches`` batches
  after ``--warmup`` untimed ones;
- seconds per full-ranking evaluation of all users: the real evaluator (standard protocol, test split, its own
  forward included), with the time of each phase (forward, score, mask, rank, metrics);
- the scoring step's rate in GFLOP/s (``2 · users · items · d`` over the score phase's seconds, which with the
  compiled scores includes their groups' maxima) and its fraction of the dense matmul rate measured just before, in
  the same process (numpy's BLAS on CPU, torch on CUDA);
- peak resident memory of the process (and peak GPU memory on CUDA).

``--kernels native torch`` measures every cell twice, with the compiled kernels (sparse and dense products, ranking
scores: :func:`grcn_bench.models.ops.kernel_status`) and with torch's (scores from numpy's BLAS), one after the other:
a side-by-side comparison within one run. A value may also switch one family of kernels off (``native,-dense``,
``native,-sparse``, ``native,-scores``; the values of ``GRCN_BENCH_KERNELS``,
:func:`grcn_bench.models.ops.parse_kernels`), so that each family is measured against torch's path in the same run:
``--kernels native native,-dense torch``.

A value ending in ``+compile`` (``torch+compile``) runs the same kernels with the model's full-graph forward
compiled by ``torch.compile`` with static shapes, and training reads that forward instead of ``batch_forward``. Only
the full forward has one shape per dataset: a receptive field's size changes from batch to batch, so a static
compile of ``batch_forward`` recompiles on every batch and a dynamic one does not compile every model. The first
warm-up batch holds the compilation (``first_batch_seconds``); an untimed evaluation forward compiles the eval graph
before the evaluation is timed.

Each cell runs in a fresh process (``spawn``), so peaks do not accumulate from one model to the next; the parent
builds each dataset once and hands it over. The machine's references (dense matmul GFLOP/s with torch and with numpy,
memory bandwidth of a large copy) are measured at the start and again at the end of the run: on a shared machine,
compare a cell's numbers with the references of the same run, not with another day's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .memory import can_keep_freed_memory, keep_freed_memory

DEFAULT_DATASETS = ("synthetic:tiktok?scale=full", "synthetic:movielens?scale=full")
#: The ``--kernels`` values: all compiled kernels, torch's only, or all but one family (any ``GRCN_BENCH_KERNELS``
#: value is accepted, :func:`check_kernels`).
KERNEL_CHOICES = ("native", "torch", "native,-sparse", "native,-dense", "native,-scores", "torch+compile")
COMPILE_SUFFIX = "+compile"
DEFAULT_OUT = Path("results") / "perf.json"
PHASES = ("forward", "score", "mask", "rank", "metrics")


@dataclass(frozen=True)
class PerfSettings:
    """What one ``perf`` run measures.

    Args:
        models: registered model names (default: all).
        datasets: dataset specs.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        batches: timed training batches per cell (the median is reported).
        warmup: untimed batches before them (3: the first batches still grow malloc's heap, :mod:`.memory`).
        batch_size: triplets per batch (1024).
        seed: seeds the model, the triplets and the negatives.
        ks: cut-offs of the evaluation.
        eval_memory: the evaluator's memory budget in bytes (the runner's default, 1 GiB).
        subprocess: run each cell in a fresh spawned process (per-cell peak memory); ``False`` runs them here.
        reference_size: side of the square matmuls that measure the machine's dense rate (2048).
        reference_megabytes: size of the buffer whose copy measures memory bandwidth (256).
        kernels: the kernels to measure each cell with, each a ``GRCN_BENCH_KERNELS`` value (``native``, ``torch``,
            or ``native`` with families switched off, :data:`KERNEL_CHOICES`), optionally ending in ``+compile``
            (module docstring): several measure them side by side, cell after cell.
    """

    models: tuple[str, ...] = ()
    datasets: tuple[str, ...] = DEFAULT_DATASETS
    device: str = "cpu"
    batches: int = 10
    warmup: int = 3
    batch_size: int = 1024
    seed: int = 0
    ks: tuple[int, ...] = (10, 20)
    eval_memory: int = 1 << 30
    subprocess: bool = True
    reference_size: int = 2048
    reference_megabytes: int = 256
    kernels: tuple[str, ...] = ("native",)

    def __post_init__(self) -> None:
        if self.batches < 1 or self.warmup < 0 or self.batch_size < 1:
            raise ValueError(f"need batches >= 1, warmup >= 0, batch_size >= 1; got {self.batches}, {self.warmup}, "
                             f"{self.batch_size}")
        if not self.datasets:
            raise ValueError("no dataset to measure")
        if not self.kernels:
            raise ValueError(f"kernels must name at least one choice, such as {KERNEL_CHOICES}")
        for choice in self.kernels:
            check_kernels(choice)


def check_kernels(choice: str) -> str:
    """``choice`` if it is a ``GRCN_BENCH_KERNELS`` value (:func:`grcn_bench.models.ops.parse_kernels`), optionally
    ending in ``+compile``, else ``ValueError``; the argument type of ``--kernels``."""
    from grcn_bench.models.ops import parse_kernels

    try:
        parse_kernels(split_compile(choice)[0])
    except ValueError as error:
        raise ValueError(f"kernels must be among {KERNEL_CHOICES} (or another GRCN_BENCH_KERNELS value), got "
                         f"{choice!r}: {error}") from None
    return choice


def split_compile(choice: str) -> tuple[str, bool]:
    """``(kernels, compiled)`` of a ``--kernels`` value: ``"torch+compile"`` is ``("torch", True)``."""
    compiled = choice.endswith(COMPILE_SUFFIX)
    return (choice[: -len(COMPILE_SUFFIX)] if compiled else choice), compiled


@dataclass
class CellTiming:
    """One model on one dataset: the numbers ``perf`` reports."""

    model: str
    dataset: str
    kernels: str = "native"
    kernel_status: str = ""
    status: str = "ok"
    error: str | None = None
    num_parameters: int = 0
    embedding_dim: int = 0
    train_batches: int = 0
    first_batch_seconds: float | None = None
    train_batch_seconds: list[float] = field(default_factory=list)
    train_batch_median: float | None = None
    eval_seconds: float | None = None
    eval_phases: dict[str, float] = field(default_factory=dict)
    eval_users: int = 0
    scoring_gflops: float | None = None
    reference_gflops: float | None = None
    scoring_fraction: float | None = None
    load_seconds: float | None = None
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None


# ------------------------------------------------------------------------------------------------ machine references


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` timed runs after one untimed run (the least disturbed by other processes)."""
    run()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def matmul_gflops(library: str = "torch", *, size: int = 2048, repeats: int = 3, device: str = "cpu") -> float:
    """Dense float32 ``[size, size] @ [size, size]`` rate in GFLOP/s, with ``torch`` or ``numpy`` (CPU only)."""
    flops = 2.0 * size**3
    if library == "numpy":
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        out = np.empty((size, size), dtype=np.float32)
        seconds = _best_seconds(lambda: np.matmul(a, b, out=out), repeats, torch.device("cpu"))
        return flops / seconds / 1e9
    if library != "torch":
        raise ValueError(f"unknown matmul library {library!r}; expected 'torch' or 'numpy'")
    where = torch.device(device)
    generator = torch.Generator(device=where).manual_seed(0)
    a = torch.randn(size, size, device=where, generator=generator)
    b = torch.randn(size, size, device=where, generator=generator)
    out = torch.empty(size, size, device=where)
    seconds = _best_seconds(lambda: torch.mm(a, b, out=out), repeats, where)
    return flops / seconds / 1e9


def copy_bandwidth(*, megabytes: int = 256, repeats: int = 3, device: str = "cpu") -> float:
    """Memory bandwidth in GB/s of copying a large float32 buffer (bytes read plus bytes written)."""
    where = torch.device(device)
    count = megabytes * (1 << 20) // 4
    src = torch.ones(count, device=where)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the destination's pages
    seconds = _best_seconds(lambda: dst.copy_(src), repeats, where)
    return 2.0 * count * 4 / seconds / 1e9


def machine_references(device: str = "cpu", *, size: int = 2048, megabytes: int = 256) -> dict[str, float]:
    """This machine's dense matmul rates and copy bandwidth, for the side-by-side ratios."""
    refs = {
        "matmul_gflops_torch": matmul_gflops("torch", size=size, device="cpu"),
        "matmul_gflops_numpy": matmul_gflops("numpy", size=size),
        "copy_gbytes_per_s": copy_bandwidth(megabytes=megabytes, device="cpu"),
    }
    if torch.device(device).type == "cuda":
        refs["cuda_matmul_gflops_torch"] = matmul_gflops("torch", size=4 * size, device=device)
        refs["cuda_copy_gbytes_per_s"] = copy_bandwidth(megabytes=4 * megabytes, device=device)
    return refs


def machine_description(device: str) -> dict[str, Any]:
    """CPU model, core count, threads and versions: what the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    described: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "keep_freed_memory": can_keep_freed_memory(),  # every cell's process sets it (memory.py)
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        described["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return described


# ------------------------------------------------------------------------------------------------- one cell, measured


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def measure_cell(model_name: str, dataset: Any, spec: str, settings: PerfSettings, kernels: str = "native"
                 ) -> CellTiming:
    """Train ``settings.warmup + settings.batches`` batches of ``model_name`` on ``dataset`` and evaluate it once,
    with the ``kernels`` kernels (``native`` falls back to torch's where they cannot run: ``kernel_status``)."""
    from grcn_bench.models.ops import use_kernels

    with use_kernels(split_compile(kernels)[0]):
        return _measure(model_name, dataset, spec, settings, kernels)


def compile_full_forward(model: torch.nn.Module) -> None:
    """Make ``model``'s forward a static-shape ``torch.compile`` of itself and its ``batch_forward`` that forward
    (the ``+compile`` kernels, module docstring)."""
    compiled = torch.compile(model.forward, dynamic=False)
    model.forward = compiled  # type: ignore[method-assign]
    model.batch_forward = lambda graph, users, pos, neg: compiled(graph)  # type: ignore[method-assign]


def _measure(model_name: str, dataset: Any, spec: str, settings: PerfSettings, kernels: str) -> CellTiming:
    from grcn_bench.models import get_model
    from grcn_bench.models.ops import kernel_status

    from .config import TrainSettings
    from .evaluator import compute_embeddings, evaluate
    from .trainer import epoch_triplets, seed_everything, train_epoch

    device = torch.device(settings.device)
    result = CellTiming(model=model_name, dataset=spec, kernels=kernels, kernel_status=kernel_status())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        train = TrainSettings(seed=settings.seed, batch_size=settings.batch_size, ks=_with_ten(settings.ks))
        graph = dataset.graph().to(device)
        generator = seed_everything(settings.seed)
        model = get_model(model_name)(dataset.info()).to(device)
        result.num_parameters = sum(p.numel() for p in model.parameters())
        compiled = split_compile(kernels)[1]
        if compiled:
            compile_full_forward(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
        indptr, items = dataset.user_items("train")
        users, pos, neg = epoch_triplets(dataset.train, indptr, items, dataset.num_items, generator)
        needed = settings.warmup + settings.batches
        for step in range(needed):
            start = (step * settings.batch_size) % max(1, users.numel())
            stop = start + settings.batch_size
            started = time.perf_counter()
            # The trainer's own loop over exactly one batch: forward, loss, backward, Adam step.
            loss = train_epoch(model, graph, users[start:stop], pos[start:stop], neg[start:stop], train, optimizer,
                                device)
            _sync(device)
            seconds = time.perf_counter() - started
            if step == 0:
                result.first_batch_seconds = seconds
            if step >= settings.warmup:
                result.train_batch_seconds.append(seconds)
            _progress(f"{model_name} on {spec} ({kernels}): batch {step + 1}/{needed} {seconds:.3f} s "
                      f"(loss {loss:.4f})")
        result.train_batches = len(result.train_batch_seconds)
        result.train_batch_median = statistics.median(result.train_batch_seconds)

        cpu_scoring = device.type == "cpu"
        result.reference_gflops = matmul_gflops("numpy" if cpu_scoring else "torch", size=settings.reference_size,
                                                device=settings.device)
        if compiled:
            compute_embeddings(model, graph)  # compiles the eval-mode, no-grad graph outside the timing
        phases: dict[str, float] = {}
        started = time.perf_counter()
        # The evaluator's own forward, timed apart so that the embedding width is known for the FLOP count.
        embeddings = compute_embeddings(model, graph)
        _sync(device)
        phases["forward"] = time.perf_counter() - started
        evaluation = evaluate(model, dataset, "test", ks=_with_ten(settings.ks), embeddings=embeddings,
                              memory_budget=settings.eval_memory, protocol="standard", timings=phases)
        result.eval_seconds = time.perf_counter() - started
        result.eval_phases = phases
        result.eval_users = evaluation.num_users
        result.embedding_dim = int(embeddings.user.size(1))
        flops = 2.0 * evaluation.num_users * dataset.num_items * result.embedding_dim
        if phases.get("score"):
            result.scoring_gflops = flops / phases["score"] / 1e9
            result.scoring_fraction = result.scoring_gflops / result.reference_gflops
        _progress(f"{model_name} on {spec}: evaluation {result.eval_seconds:.2f} s")
    except Exception as err:  # one failing model must not stop the others
        result.status, result.error = "failed", f"{type(err).__name__}: {err}"
        _progress(f"{model_name} on {spec}: FAILED {result.error}\n{traceback.format_exc()}")
    result.peak_rss_bytes = peak_rss_bytes()
    if device.type == "cuda":
        result.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(device))
    return result


def _with_ten(ks: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(set(ks) | {10}))


def _progress(message: str) -> None:
    print(f"[perf] {message}", file=sys.stderr, flush=True)


def _cell_in_child(model_name: str, dataset: Any, spec: str, settings: PerfSettings, threads: int, kernels: str
                   ) -> dict[str, Any]:
    """Entry point of a spawned worker: same threads as the parent, then one measured cell."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    keep_freed_memory()
    torch.set_num_threads(threads)
    return asdict(measure_cell(model_name, dataset, spec, settings, kernels))


# ------------------------------------------------------------------------------------------------------- the command


def run_perf(settings: PerfSettings, *, dataset_loader: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Measure every model × dataset of ``settings``; returns the report (machine, references, cells)."""
    from grcn_bench.datasets import load_dataset
    from grcn_bench.models import available_models, get_model

    models = settings.models or tuple(available_models())
    for name in models:
        get_model(name)  # an unknown name fails before anything is measured
    loader = dataset_loader or load_dataset
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "machine": machine_description(settings.device),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _progress("measuring the machine's references")
    references = dict(size=settings.reference_size, megabytes=settings.reference_megabytes)
    report["references_start"] = machine_references(settings.device, **references)
    cells: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    for spec in settings.datasets:
        _progress(f"loading {spec}")
        started = time.perf_counter()
        dataset = loader(spec)
        load_seconds = time.perf_counter() - started
        for name, kernels in ((name, kernels) for name in models for kernels in settings.kernels):
            _progress(f"{name} on {spec} ({kernels} kernels)")
            if settings.subprocess:
                # One fresh process per cell: its peak memory is its own. A crash is recorded, the run goes on.
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    future = pool.submit(_cell_in_child, name, dataset, spec, settings, torch.get_num_threads(),
                                         kernels)
                    try:
                        cell = future.result()
                    except Exception as err:
                        cell = asdict(CellTiming(model=name, dataset=spec, kernels=kernels, status="failed",
                                                 error=f"worker died: {type(err).__name__}: {err}"))
            else:
                cell = asdict(measure_cell(name, dataset, spec, settings, kernels))
            cell["load_seconds"] = load_seconds
            cells.append(cell)
        del dataset
    report["cells"] = cells
    _progress("measuring the machine's references again")
    report["references_end"] = machine_references(settings.device, **references)
    return report


def perf_table(report: dict[str, Any]) -> str:
    """The report's cells as a GitHub-flavoured Markdown table (tabulate)."""
    from tabulate import tabulate

    cuda = torch.device(report["settings"]["device"]).type == "cuda"
    compared = len(report["settings"].get("kernels", ())) > 1  # a side-by-side run: say which kernels each row used
    # With torch.compile the first batch holds the compilation: show it.
    compiling = any(split_compile(choice)[1] for choice in report["settings"].get("kernels", ()))
    headers = ["model", "dataset", *(["kernels"] if compared else []), "train s/batch",
               *(["first batch s"] if compiling else []), "eval s", "score GFLOP/s", "% of matmul", "peak RSS GB"]
    if cuda:
        headers.append("peak GPU GB")
    rows = []
    for cell in report["cells"]:
        first = [cell["model"], _short(cell["dataset"]), *([cell.get("kernels", "")] if compared else [])]
        if cell["status"] != "ok":
            rows.append([*first, "failed", cell.get("error", ""), "", "", ""] + [""] * (cuda + compiling))
            continue
        row = [
            *first,
            f"{cell['train_batch_median']:.3f}",
            *([_fmt(cell.get("first_batch_seconds"), ".1f")] if compiling else []),
            f"{cell['eval_seconds']:.2f}",
            _fmt(cell["scoring_gflops"], ".0f"),
            _fmt(None if cell["scoring_fraction"] is None else 100 * cell["scoring_fraction"], ".0f"),
            f"{cell['peak_rss_bytes'] / 1e9:.2f}",
        ]
        if cuda:
            row.append(_fmt(None if cell["peak_gpu_bytes"] is None else cell["peak_gpu_bytes"] / 1e9, ".2f"))
        rows.append(row)
    return tabulate(rows, headers=headers, tablefmt="github")


def references_table(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    start, end = report["references_start"], report.get("references_end", {})
    rows = [(name, f"{value:.1f}", _fmt(end.get(name), ".1f")) for name, value in start.items()]
    return tabulate(rows, headers=["reference", "at start", "at end"], tablefmt="github")


def _short(spec: str) -> str:
    return spec.removeprefix("synthetic:")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def add_perf_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``perf`` subcommand's arguments (the CLI wires it in with :func:`cmd_perf`)."""
    parser = subparsers.add_parser(
        "perf", help="time training batches and full-ranking evaluation of each model at the paper's scale",
        description="For each model x dataset: median seconds per training batch, seconds per full-ranking "
                    "evaluation, scoring GFLOP/s against this machine's matmul rate, peak memory. Writes JSON, "
                    "prints a table; progress on stderr.",
    )
    parser.add_argument("--models", nargs="+", help="model names (default: every registered model)")
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS),
                        help="dataset specs (default: synthetic:tiktok?scale=full synthetic:movielens?scale=full)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--batches", type=int, default=10, help="timed training batches per cell (default 10)")
    parser.add_argument("--warmup", type=int, default=PerfSettings.warmup,
                        help=f"untimed batches before them (default {PerfSettings.warmup})")
    parser.add_argument("--batch-size", type=int, default=1024, help="triplets per batch (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, triplets and negatives (default 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    parser.add_argument("--reference-size", type=int, default=2048,
                        help="side of the square matmuls that measure the machine's dense rate (default 2048)")
    parser.add_argument("--reference-mb", type=int, default=256,
                        help="megabytes copied to measure memory bandwidth (default 256)")
    parser.add_argument("--kernels", nargs="+", type=_kernels_argument, default=["native"],
                        help="kernels to measure with, side by side, cell after cell: native (compiled, falls back "
                             "to torch's where they cannot run), torch (scores from numpy's BLAS), or native with "
                             "one family switched off: native,-sparse, native,-dense, native,-scores; any of "
                             "them + '+compile' (torch+compile) compiles the full-graph forward with torch.compile "
                             "(default native)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every cell in this process (faster to start; peak memory then accumulates)")
    return parser


def _kernels_argument(value: str) -> str:
    try:
        return check_kernels(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_perf(args: argparse.Namespace) -> int:
    """Run ``perf`` from parsed arguments: write the JSON report and print the tables."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} but CUDA is not available", file=sys.stderr)
        return 2
    settings = PerfSettings(
        models=tuple(args.models or ()),
        datasets=tuple(args.datasets),
        device=args.device,
        batches=args.batches,
        warmup=args.warmup,
        batch_size=args.batch_size,
        seed=args.seed,
        subprocess=not args.in_process,
        reference_size=args.reference_size,
        reference_megabytes=args.reference_mb,
        kernels=tuple(dict.fromkeys(args.kernels)),
    )
    report = run_perf(settings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    machine = report["machine"]
    print(f"perf on {machine['cpu']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads"
          + (f", {machine['gpu']}" if "gpu" in machine else "") + f"), device {settings.device}")
    print()
    print(perf_table(report))
    print()
    print(references_table(report))
    print(f"\nreport: {args.out}", file=sys.stderr)
    return 0 if all(cell["status"] == "ok" for cell in report["cells"]) else 1
