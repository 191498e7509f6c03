"""The report bundle (docs/protocol.md, "The report"): ``write_report(results_dir)`` writes ``report.md`` and
``report.html`` at the root of a results directory and every table (Markdown, LaTeX, CSV) and figure (PNG, PDF) under
``<dir>/report/``.

The report opens with Table 2, Table 3, Figure 3, Figure 4, the noise-robustness curves and the protocol audit (in
that order; each only when its group has results), then the training curves, the selected hyper-parameters, the
cells that did not finish ok (with reasons), the dataset cards, the environment and per-cell timings.

Each part is a *section* in a registry: ``@register_section(name, order=...)`` on a function
``(bundle, context) -> selections or None`` that adds its blocks to the :class:`Bundle` from the results in the
:class:`ReportContext`, or adds nothing when they hold nothing for it. ``write_report`` runs every registered section
by ``order``, so a new section (in this package or a plugin) is one function (docs/extending.md, "A report section").

Reports only read: the store, ``experiment.json`` and, for the Popularity reference rows and the t-SNE figure's
training items, the datasets themselves (``grcn_bench.datasets.load_dataset``). They never train. Both documents are
built from the same blocks, so the HTML needs no Markdown converter.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .curves import routing_figure, routing_series, training_curves_figure
from .plotting import save_figure
from .robustness import edge_auc_records, edge_auc_table, noise_figure, noise_points, noise_records
from .selection import FixedRow, Results, Run, Selection, load_results, select
from .tables import (
    DASH,
    TABLE2_ORDER,
    TABLE3_ORDER,
    Num,
    Table,
    audit_records,
    audit_rows,
    audit_table,
    build_comparison,
    comparison_records,
    comparison_table,
    dataset_title,
    grid_records,
    load_published,
    selection_table,
    significance_table,
    to_csv,
    to_html,
    to_latex,
    to_markdown,
)
from .tsne import Neighbourhood, choose_users, id_columns, tsne_figure

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("grcn_bench.reports")

REPORT_FOLDER = "report"


# ---------------------------------------------------------------------------------------------------------------
# Document blocks, each rendered to Markdown and to HTML


@dataclass(frozen=True)
class Link:
    text: str
    href: str


Inline = str | Link


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    parts: Sequence[Inline]


@dataclass(frozen=True)
class Bullets:
    items: Sequence[Sequence[Inline]]


@dataclass(frozen=True)
class TableBlock:
    table: Table
    files: Sequence[Link] = ()


@dataclass(frozen=True)
class FigureBlock:
    caption: str
    png: str
    pdf: str


Block = Heading | Paragraph | Bullets | TableBlock | FigureBlock


def _inline_md(parts: Sequence[Inline]) -> str:
    return "".join(f"[{p.text}]({p.href})" if isinstance(p, Link) else p for p in parts)


def _inline_html(parts: Sequence[Inline]) -> str:
    return "".join(f'<a href="{html.escape(p.href)}">{html.escape(p.text)}</a>' if isinstance(p, Link)
                   else html.escape(p) for p in parts)


def _files_parts(files: Sequence[Link]) -> list[Inline]:
    parts: list[Inline] = ["Files: "]
    for k, link in enumerate(files):
        parts += [" · "] * bool(k) + [link]
    return parts


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(_inline_md(block.parts))
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {_inline_md(item)}" for item in block.items))
        elif isinstance(block, TableBlock):
            out.append(to_markdown(block.table).rstrip("\n"))
            if block.files:
                out.append(_inline_md(_files_parts(block.files)))
        elif isinstance(block, FigureBlock):
            out.append(f"![{block.caption}]({block.png})\n\n{block.caption} "
                       f"([PNG]({block.png}), [PDF]({block.pdf}))")
    return "\n\n".join(out) + "\n"


HTML_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
caption {{ font-weight: bold; text-align: left; padding: 0.3em 0; }}
p.note {{ font-size: 0.85em; color: #555; margin: 0.2em 0; }}
img {{ max-width: 100%; }}
</style></head><body>
"""


def render_html(blocks: Sequence[Block], *, title: str) -> str:
    out = [HTML_HEAD.format(title=html.escape(title))]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline_html(block.parts)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, TableBlock):
            out.append(to_html(block.table))
            if block.files:
                out.append(f"<p>{_inline_html(_files_parts(block.files))}</p>")
        elif isinstance(block, FigureBlock):
            out.append(f'<figure><img src="{html.escape(block.png)}" alt="{html.escape(block.caption)}">'
                       f"<figcaption>{html.escape(block.caption)} (<a href=\"{html.escape(block.png)}\">PNG</a>, "
                       f"<a href=\"{html.escape(block.pdf)}\">PDF</a>)</figcaption></figure>")
    out.append("</body></html>\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Writing the pieces


@dataclass
class Bundle:
    """Where the pieces go, and the blocks of the document in order."""

    root: Path
    blocks: list[Block] = dataclasses.field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.root / REPORT_FOLDER

    def href(self, name: str) -> str:
        return f"{REPORT_FOLDER}/{name}"

    def table(self, name: str, table: Table, records: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Write ``<name>.md``, ``<name>.tex`` and (from ``records``, else the table's cells) ``<name>.csv``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{name}.md").write_text(to_markdown(table))
        (self.folder / f"{name}.tex").write_text(to_latex(table))
        (self.folder / f"{name}.csv").write_text(to_csv(records if records is not None else table_records(table)))
        self.blocks.append(TableBlock(table, [Link("Markdown", self.href(f"{name}.md")),
                                              Link("LaTeX", self.href(f"{name}.tex")),
                                              Link("CSV", self.href(f"{name}.csv"))]))

    def figure(self, name: str, make: Callable[[], Any], caption: str) -> bool:
        """Build and save a figure; on failure (nothing to plot) add a note instead. Returns whether it worked."""
        try:
            figure = make()
        except ValueError as err:
            self.note(f"{caption}: not drawn ({err}).")
            return False
        save_figure(figure, self.folder / name)
        self.blocks.append(FigureBlock(caption, self.href(f"{name}.png"), self.href(f"{name}.pdf")))
        return True

    def csv(self, name: str, records: Sequence[Mapping[str, Any]]) -> Link:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{name}.csv").write_text(to_csv(records))
        return Link(f"{name}.csv", self.href(f"{name}.csv"))

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(text, level))

    def note(self, *parts: Inline) -> None:
        self.blocks.append(Paragraph(parts))


def table_records(table: Table) -> list[dict[str, Any]]:
    """A table's cells as flat records (numbers as numbers; the std in its own column)."""
    records = []
    for label, cells in table.rows:
        record: dict[str, Any] = {table.row_header: label}
        for header, cell in zip(table.headers[1:], cells, strict=True):
            if isinstance(cell, Num):
                record[header] = cell.value
                if cell.std is not None:
                    record[f"{header} std"] = cell.std
            else:
                record[header] = cell
        records.append(record)
    keys = list(dict.fromkeys(k for r in records for k in r))
    return [{k: r.get(k) for k in keys} for r in records]


# ---------------------------------------------------------------------------------------------------------------
# The section registry


@dataclass
class ReportContext:
    """What every section reads: the results, the report's settings, and what the sections before it selected.

    Attributes:
        results: the results directory joined with ``experiment.json`` (:func:`~.selection.load_results`); take a
            group's runs with ``results.group(name)`` and select with :func:`~.selection.select`.
        reference: whether Table 2 gets the Popularity reference row.
        tsne_users, tsne_seed: Figure 4's user draw.
        cache: datasets loaded once per report (``_load_dataset(spec, context.cache)``).
        selections: the selections each section returned so far, by section name, in order.
    """

    results: Results
    reference: bool = True
    tsne_users: int = 5
    tsne_seed: int = 0
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    selections: dict[str, list[Selection]] = dataclasses.field(default_factory=dict)

    @cached_property
    def frame(self) -> pd.DataFrame:
        """Every stored cell as a DataFrame (:func:`~.frame.results_frame`), read on first use."""
        from .frame import results_frame

        return results_frame(self.results.root)

    @cached_property
    def unique_runs(self) -> list[Run]:
        """One run per cell id, in request order (a cell two groups asked for ran once)."""
        return self.results.unique_runs()

    def selected(self) -> list[Selection]:
        """Every selection the sections so far returned, in section order."""
        return [s for group in self.selections.values() for s in group]


#: ``section(bundle, context) -> selections or None``: adds the section's blocks, or nothing.
SectionFunction = Callable[[Bundle, ReportContext], "Sequence[Selection] | None"]


@dataclass(frozen=True)
class Section:
    """A registered report section and its place in the document (lowest ``order`` first)."""

    name: str
    render: SectionFunction
    order: float


_SECTIONS: dict[str, Section] = {}


def register_section(name: str, *, order: float) -> Callable[[SectionFunction], SectionFunction]:
    """Decorator that registers ``section(bundle, context)`` as the report section ``name`` at ``order``.

    The function adds its headings, tables, figures and notes to ``bundle`` (:class:`Bundle`), reading the results
    from ``context`` (:class:`ReportContext`), and adds nothing when they hold nothing for it, so that the report
    leaves it out. It may return the :class:`~.selection.Selection` objects it shows: those of every section before
    ``"selection"`` are listed in the "Selected hyper-parameters" table.

    The built-in sections, by order: ``title`` 0; ``table2`` 100, ``table3`` 200, ``fig3`` 300, ``fig4`` 400,
    ``noise`` 500, ``audit`` 600 (the paper's items); ``training_curves`` 700, ``selection`` 800, ``status`` 900,
    ``cards`` 1000, ``environment`` 1100, ``timings`` 1200. Equal orders keep registration order.

    Raises:
        ValueError: ``name`` is already registered to another function.
    """

    def decorate(render: SectionFunction) -> SectionFunction:
        if not callable(render):
            raise TypeError(f"@register_section({name!r}) decorates a function (bundle, context), got {render!r}")
        entry = Section(name, render, order)
        if name in _SECTIONS and _SECTIONS[name] != entry:
            raise ValueError(f"a report section named {name!r} is already registered "
                             f"({getattr(_SECTIONS[name].render, '__qualname__', _SECTIONS[name].render)})")
        _SECTIONS[name] = entry
        return render

    return decorate


def unregister_section(name: str) -> None:
    """Remove a section from the registry (for tests that register throwaway sections)."""
    _SECTIONS.pop(name, None)


def get_section(name: str) -> Section:
    """The registered section ``name``; an unknown name lists the known ones."""
    try:
        return _SECTIONS[name]
    except KeyError:
        raise KeyError(f"unknown report section {name!r}; available sections: {', '.join(available_sections())}"
                       ) from None


def available_sections() -> list[str]:
    """Names of the registered sections in document order."""
    return [section.name for section in sorted(_SECTIONS.values(), key=lambda section: section.order)]


# ---------------------------------------------------------------------------------------------------------------
# Sections


def _load_dataset(spec: str, cache: dict[str, Any]) -> Any:
    """Load a dataset once per report (reports may load data; they never train)."""
    if spec not in cache:
        from grcn_bench.datasets import load_dataset

        cache[spec] = load_dataset(spec)
    return cache[spec]


def popularity_rows(specs: Sequence[str], protocol: str, cache: dict[str, Any]) -> tuple[list[FixedRow], list[str]]:
    """The Popularity reference row of each dataset (loaded from its spec), and notes for those that failed."""
    from grcn_bench.benchmarks.reference import popularity_result

    rows, notes = [], []
    for spec in specs:
        try:
            result = popularity_result(_load_dataset(spec, cache), "test", ks=(10,), protocol=protocol)
        except Exception as err:  # a missing directory must not stop the report: say why the row is absent
            notes.append(f"Popularity row of {spec} skipped: {type(err).__name__}: {err}")
            continue
        rows.append(FixedRow("Popularity", spec, result.mean(), result.users, dict(result.per_user),
                             protocol=protocol))
    return rows, notes


def _protocols(selections: Sequence[Selection]) -> list[str]:
    found = {s.protocol for s in selections}
    return [p for p in ("standard", "official-grcn") if p in found] + sorted(found - {"standard", "official-grcn"})


def _unusable_note(selections: Sequence[Selection]) -> list[str]:
    return [f"{s.label} on {s.dataset}: no usable result (see 'Cells not ok')." for s in selections if not s.ok]


def _reuse_note(results: Results) -> str:
    reused = list(dict.fromkeys(results.search.get("reused", [])))
    if not reused:
        return ""
    return f" These rows take the lr and λ selected for another row on the same dataset: {'; '.join(reused)}."


@register_section("title", order=0)
def section_title(bundle: Bundle, context: ReportContext) -> None:
    """The title, the experiment's description and how its hyper-parameters were searched."""
    results = context.results
    bundle.heading(f"grcn-bench report: {results.name}", level=1)
    if results.description:
        bundle.note(results.description)
    # Which search and seed policy produced every table below (docs/protocol.md, "Hyper-parameter search").
    unfinished = " The search has not finished: rerun the same command to resume it; these tables are partial." \
        if results.search.get("complete") is False else ""
    bundle.note(f"Hyper-parameters: {results.search_policy}.{_reuse_note(results)}{unfinished}")


@register_section("table2", order=100)
def section_table2(bundle: Bundle, context: ReportContext) -> list[Selection]:
    """Table 2: the comparison of the models, per protocol, with its significance tests."""
    reference, cache = context.reference, context.cache
    selections = select(context.results.group("table2"))
    if not selections:
        return []
    published = load_published("table2")
    for protocol in _protocols(selections):
        chosen = [s for s in selections if s.protocol == protocol]
        suffix = "" if protocol == "standard" else f" ({protocol} protocol)"
        bundle.heading(f"Table 2: performance comparison{suffix}")
        rows: list[Any] = list(chosen)
        notes: list[str] = []
        if reference:
            extra, notes = popularity_rows(list(dict.fromkeys(s.dataset for s in chosen)), protocol, cache)
            rows += extra
        comparison = build_comparison(rows, title=f"Table 2: test metrics @10{suffix}", order=TABLE2_ORDER,
                                      published=published if protocol == "standard" else None)
        table = comparison_table(comparison)
        table.notes = [*table.notes, *notes, *_unusable_note(chosen)]
        name = "table2" if protocol == "standard" else f"table2_{protocol}"
        bundle.table(name, table, comparison_records(comparison))
        if comparison.tests:
            bundle.table(f"{name}_significance", significance_table(comparison))
    return selections


def _multimodal(selection: Selection) -> bool:
    card = selection.card
    return card is None or len(card.get("modalities") or {}) >= 2


@register_section("table3", order=200)
def section_table3(bundle: Bundle, context: ReportContext) -> list[Selection]:
    """Table 3: the ablation of GRCN's pruning operations (multimodal datasets only)."""
    selections = select(context.results.group("table3"))
    kept = [s for s in selections if _multimodal(s)]
    if not kept:
        return selections
    bundle.heading("Table 3: effect of pruning operations (ablation)")
    comparison = build_comparison(kept, title="Table 3: test metrics @10 of GRCN variants", order=TABLE3_ORDER,
                                  published=load_published("table3"))
    table = comparison_table(comparison)
    dropped = sorted({s.dataset for s in selections if not _multimodal(s)})
    table.notes = [*table.notes, *_unusable_note(kept)] + (
        [f"Datasets with one modality left out: {', '.join(dropped)}."] if dropped else [])
    bundle.table("table3", table, comparison_records(comparison))
    if comparison.tests:
        bundle.table("table3_significance", significance_table(comparison))
    return selections


def _default_option(model: str, name: str, fallback: Any) -> Any:
    try:
        from grcn_bench.models import get_model

        default = inspect.signature(get_model(model)).parameters[name].default
    except (KeyError, ImportError):
        return fallback
    return fallback if default is inspect.Parameter.empty else default


@register_section("fig3", order=300)
def section_fig3(bundle: Bundle, context: ReportContext) -> list[Selection]:
    """Figure 3: test metrics against the routing iterations."""
    selections = [s for s in select(context.results.group("fig3")) if s.protocol == "standard"]
    if not selections:
        return []
    bundle.heading("Figure 3: routing iterations of the prototypical network")
    # Only a cell that leaves T unset needs the model's default (and importing the models is slow).
    unset = any("routing_iterations" not in s.options for s in selections)
    default_t = int(_default_option("grcn", "routing_iterations", 3)) if unset else 3
    drawn = bundle.figure("fig3", lambda: routing_figure(selections, default_iterations=default_t),
                          "Figure 3: test Recall@10 and NDCG@10 versus routing iterations T (mean ± std over seeds); "
                          "a label run at one T only (GRCN-ID) is a dashed reference line.")
    if drawn:
        records = [{"dataset": dataset, "row": label, "T": t, "metric": metric, "mean": s.test_mean(metric),
                    "std": s.test_std(metric), "seeds": len(s.runs)}
                   for dataset, series in routing_series(selections, default_iterations=default_t).items()
                   for label, points in series.items() for t, s in points for metric in ("recall@10", "ndcg@10")]
        bundle.note(*_files_parts([bundle.csv("fig3", records)]))
    return selections


def _embedding_panel(selection: Selection) -> tuple[str, Any, Any] | None:
    """(title, user ID embedding, item ID embedding) of the selected point's first seed, if it stored them."""
    if not selection.runs:
        return None
    run = selection.runs[0]
    arrays = run.arrays()
    if "user_embedding" not in arrays or "item_embedding" not in arrays:
        return None
    columns = id_columns(selection.model, selection.options, arrays["user_embedding"].shape[1])
    return (f"{selection.label} (seed {run.settings['seed']})", arrays["user_embedding"][:, columns],
            arrays["item_embedding"][:, columns])


@register_section("fig4", order=400)
def section_fig4(bundle: Bundle, context: ReportContext) -> list[Selection]:
    """Figure 4: t-SNE of the stored ID embeddings, one figure per dataset."""
    users, seed, cache = context.tsne_users, context.tsne_seed, context.cache
    selections = [s for s in select(context.results.group("fig4")) if s.protocol == "standard"]
    if not selections:
        return []
    bundle.heading("Figure 4: t-SNE of learned ID embeddings")
    for spec in dict.fromkeys(s.dataset for s in selections):
        here = [s for s in selections if s.dataset == spec]
        here.sort(key=lambda s: (s.label != "GAT", s.label != "GRCN", s.label))  # GAT left, GRCN right (paper)
        panels, missing = [], []
        for s in here:
            panel = _embedding_panel(s)
            if panel:
                panels.append(panel)
            else:
                missing.append(s.label)
        if missing:
            bundle.note(f"{spec}: no stored embeddings for {', '.join(missing)} (fig4 cells store them when run "
                        "with this group; rerun those cells with --force --keep-embeddings).")
        if not panels:
            continue
        try:
            dataset = _load_dataset(spec, cache)
        except Exception as err:  # the figure needs the training items; say why it is absent
            bundle.note(f"{spec}: t-SNE skipped, the dataset could not be loaded ({type(err).__name__}: {err}).")
            continue
        indptr, items = dataset.user_items("train")
        try:
            neighbourhood = Neighbourhood.build(choose_users(indptr, count=users, seed=seed), indptr, items)
        except ValueError as err:
            bundle.note(f"{spec}: t-SNE skipped ({err}).")
            continue
        title = dataset_title(spec, here[0].card)
        stem = "fig4" if len(selections) == len(here) else f"fig4_{_slug(spec)}"
        bundle.figure(stem, lambda p=panels, n=neighbourhood: tsne_figure(p, n, seed=seed),
                      f"Figure 4 ({title}): t-SNE of the learned ID embeddings of {len(neighbourhood.users)} random "
                      f"users (stars, users {', '.join(map(str, neighbourhood.users))}) and their training items "
                      "(circles; grey when shared), one colour per user. GRCN: the graph part e_u / e_i only.")
    return selections


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


@register_section("noise", order=500)
def section_noise(bundle: Bundle, context: ReportContext) -> list[Selection]:
    """Noise robustness: test metrics against the rate of false positives, and the edge-weight AUC tables."""
    selections = [s for s in select(context.results.group("noise")) if s.protocol == "standard"]
    if not selections:
        return []
    bundle.heading("Noise robustness: false-positive interactions")
    unknown = sorted({s.dataset for s in selections if s.ok and not noise_points([s])})
    if unknown:
        bundle.note(f"No noise rate known for {', '.join(unknown)} (left out).")
    if bundle.figure("noise", lambda: noise_figure(selections),
                     "Test Recall@10 and NDCG@10 versus the rate of false-positive train interactions "
                     "(mean ± std over seeds)."):
        bundle.note(*_files_parts([bundle.csv("noise", noise_records(selections))]))
    relative = edge_auc_table(selections, side="relative")
    if relative is not None:
        bundle.table("edge_auc_relative", relative)
    raw = edge_auc_table(selections, side="mean")
    if raw is not None:
        bundle.table("edge_auc", raw, edge_auc_records(selections))
    return selections


@register_section("audit", order=600)
def section_audit(bundle: Bundle, context: ReportContext) -> list[Selection]:
    """The protocol audit: each row under the standard and the released code's protocol."""
    selections = select(context.results.group("audit"))
    rows = audit_rows(selections)
    if not rows:
        if selections:
            bundle.heading("Protocol audit")
            bundle.note("The audit group needs each row under both protocols (standard and official-grcn).")
        return selections
    bundle.heading("Protocol audit: the released code's evaluation")
    bundle.table("audit", audit_table(rows), audit_records(rows))
    return selections


@register_section("training_curves", order=700)
def section_training_curves(bundle: Bundle, context: ReportContext) -> None:
    """Validation Recall@10 per epoch of Table 2's selected hyper-parameters."""
    usable = [s for s in context.selections.get("table2", []) if s.ok and s.selection_split == "val"]
    if not usable:
        return
    bundle.heading("Training curves")
    bundle.figure("training_curves", lambda: training_curves_figure(usable),
                  "Validation Recall@10 per epoch of the selected hyper-parameters (every seed; dots: best epoch).")


@register_section("selection", order=800)
def section_selection(bundle: Bundle, context: ReportContext) -> None:
    """The selected hyper-parameters of every selection the sections before this one returned."""
    # A configuration that two groups asked for (Table 2 and the audit's standard rows) is listed once.
    unique = {tuple(sorted({run.cell_id for run in s.requested})) + (s.label,): s for s in context.selected()}
    selections = list(unique.values())
    if not selections:
        return
    bundle.heading("Selected hyper-parameters")
    bundle.table("selection", selection_table(selections))
    bundle.note("Every grid point with its score: ", bundle.csv("selection_grid", grid_records(selections)), ".")


@register_section("status", order=900)
def section_status(bundle: Bundle, context: ReportContext) -> None:
    """How many cells finished in each status, and why those that are not ok are not."""
    runs = context.unique_runs
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    bundle.heading("Cell status")
    if not runs:
        bundle.note("No cell was requested or stored in this directory.")
        return
    bundle.note(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + f" of {len(runs)} cells.")
    bad = [run for run in runs if run.status != "ok"]
    if not bad:
        return
    rows = []
    for run in bad:
        result = run.result or {}
        reason = result.get("error") or result.get("stop_reason") or ("not run yet" if run.result is None else DASH)
        rows.append((run.cell_id, [run.label, run.dataset, f"{run.settings.get('lr'):g}",
                                   f"{run.settings.get('reg_weight'):g}", str(run.settings.get("seed")), run.status,
                                   str(reason).splitlines()[0][:200]]))
    bundle.table("cells_not_ok", Table("Cells not ok", "cell", [("", ["row", "dataset", "lr", "λ", "seed",
                                                                        "status", "reason"])], rows))


@register_section("cards", order=1000)
def section_cards(bundle: Bundle, context: ReportContext) -> None:
    """The card of every dataset the runs trained on."""
    cards: dict[str, Mapping[str, Any]] = {}
    for run in context.unique_runs:
        if run.card and run.dataset not in cards:
            cards[run.dataset] = run.card
    if not cards:
        return
    bundle.heading("Dataset cards")
    for spec, card in cards.items():
        table = Table(f"{spec}", "field", [("", ["value"])], [(k, [v]) for k, v in card_rows(card)])
        bundle.table(f"card_{_slug(spec)}", table)


def card_rows(card: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A stored card's rows as the dataset code prints them (falls back to plain key/value pairs)."""
    from grcn_bench.datasets.base import DatasetCard

    names = {f.name for f in dataclasses.fields(DatasetCard)}
    try:
        return DatasetCard(**{k: v for k, v in card.items() if k in names}).rows()
    except TypeError:
        return [(str(k), str(v)) for k, v in card.items()]


@register_section("environment", order=1100)
def section_environment(bundle: Bundle, context: ReportContext) -> None:
    """The software and hardware of the runs, one column per distinct environment."""
    environments: dict[str, tuple[Mapping[str, Any], int]] = {}
    for run in context.unique_runs:
        env = (run.result or {}).get("environment")
        if env:
            key = repr(sorted(env.items()))
            environments[key] = (env, environments.get(key, (env, 0))[1] + 1)
    if not environments:
        return
    bundle.heading("Environment")
    keys = list(dict.fromkeys(k for env, _ in environments.values() for k in env))
    columns = [f"environment {k + 1} ({n} cells)" for k, (_, n) in enumerate(environments.values())]
    rows = [(key, [str(env.get(key, DASH)) for env, _ in environments.values()]) for key in keys]
    bundle.table("environment", Table("Environment of the runs", "field", [("", columns)], rows))


@register_section("timings", order=1200)
def section_timings(bundle: Bundle, context: ReportContext) -> None:
    """Seconds, epochs and peak memory of every cell."""
    records, rows = [], []
    for run in context.unique_runs:
        if run.result is None:
            continue
        r = run.result
        epochs = r.get("epochs_run") or 0
        seconds = r.get("seconds")
        per_epoch = seconds / epochs if seconds is not None and epochs else None
        rss = r.get("peak_rss_bytes")
        records.append({"cell_id": run.cell_id, "row": run.label, "dataset": run.dataset,
                        "lr": run.settings.get("lr"), "reg_weight": run.settings.get("reg_weight"),
                        "seed": run.settings.get("seed"), "status": run.status, "epochs": epochs,
                        "best_epoch": r.get("best_epoch"), "seconds": seconds, "seconds_per_epoch": per_epoch,
                        "test_seconds": r.get("test_seconds"), "peak_rss_mib": rss / 2**20 if rss else None,
                        "num_parameters": r.get("num_parameters")})
        rows.append((run.cell_id, [run.label, run.dataset, run.status, str(epochs),
                                   Num(seconds, digits=1), Num(per_epoch, digits=2),
                                   Num(rss / 2**20 if rss else None, digits=0)]))
    if not rows:
        return
    bundle.heading("Per-cell timings")
    total = sum(r["seconds"] or 0.0 for r in records)
    bundle.note(f"{len(records)} cells, {total / 60:.1f} minutes of training and testing in total.")
    table = Table("Per-cell timings", "cell", [("", ["row", "dataset", "status", "epochs", "seconds", "s/epoch",
                                                     "peak RSS (MiB)"])], rows)
    bundle.table("timings", table, records)


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def write_report(results_dir: Path, *, reference_rows: bool | None = None, tsne_users: int | None = None,
                 tsne_seed: int | None = None) -> Path:
    """Write ``<results_dir>/report.md`` and ``report.html`` (and the pieces under ``report/``); returns the
    Markdown path.

    Args:
        results_dir: a directory written by ``grcn-bench run``.
        reference_rows: add the Popularity reference row to Table 2 (loads each dataset); default: the experiment's
            ``[report] popularity`` setting, else True.
        tsne_users: users shown in Figure 4 (default: ``[report] tsne_users``, else 5).
        tsne_seed: seed of the user draw and of t-SNE (default: ``[report] tsne_seed``, else 0).
    """
    results = load_results(results_dir)
    settings = results.report
    context = ReportContext(
        results,
        reference=settings.get("popularity", True) if reference_rows is None else reference_rows,
        tsne_users=int(settings.get("tsne_users", 5) if tsne_users is None else tsne_users),
        tsne_seed=int(settings.get("tsne_seed", 0) if tsne_seed is None else tsne_seed),
    )
    root = Path(results_dir)
    bundle = Bundle(root)
    for name in available_sections():
        selections = _SECTIONS[name].render(bundle, context)
        if selections is not None:
            context.selections[name] = list(selections)
    markdown = root / "report.md"
    markdown.write_text(render_markdown(bundle.blocks))
    (root / "report.html").write_text(render_html(bundle.blocks, title=f"grcn-bench report: {results.name}"))
    return markdown
