"""Tables 2 and 3, the protocol audit and the selection summary, in Markdown, HTML,
LaTeX and CSV.

A :class:`Table` holds structured cells (:class:`Num`: a value, its std over seeds, bold, significance star) so that
each format renders them its own way; Markdown and HTML go through ``tabulate``. LaTeX is written directly because
the column groups (one per dataset) need ``\\multicolumn``, which ``tabulate`` cannot express; it uses ``booktabs``.

Comparison tables follow the paper: rows in the paper's order (then any other rows, then reference rows such as
Popularity), one column group per dataset with Precision, Recall and NDCG @10 (then any other metric of the
registry, :func:`table_metrics`), the best value per column in bold, a ``%Improv.`` row (GRCN over the strongest
other row per metric) and ``*`` where GRCN's improvement is significant (:mod:`grcn_bench.reports.stats`: with two
or more seeds, on every seed; with one, over users only). Each table's
notes, its significance table and its CSV records say which test produced each star. When a dataset is one of the
paper's (official format, the paper's sizes), a "paper" row block shows the published numbers
(``reports/data/paper_table{2,3}.csv``).
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from tabulate import tabulate

from grcn_bench.benchmarks.metrics import available_metrics, metric_title, reported_metrics

from .stats import Sample, SeedTest, improvement, seed_test

#: The metric columns of the paper's Tables 2 and 3 (``reports/data/paper_table*.csv``).
PUBLISHED_METRICS = ("precision@10", "recall@10", "ndcg@10")


class _Titles(Mapping[str, str]):
    """How tables name a metric key (``"recall@10"``), read from the metric registry when asked, so that a metric a
    plugin registers is titled like the built-in ones: ``METRIC_TITLES`` gives column titles (``Recall``),
    ``SHORT_TITLES`` compact labels (``R@10``)."""

    def __init__(self, short: bool):
        self.short = short

    def __getitem__(self, key: str) -> str:
        if key.partition("@")[0] not in available_metrics():
            raise KeyError(key)
        return metric_title(key, short=self.short)

    def __iter__(self) -> Iterator[str]:
        return iter(reported_metrics())

    def __len__(self) -> int:
        return len(reported_metrics())


METRIC_TITLES: Mapping[str, str] = _Titles(short=False)
SHORT_TITLES: Mapping[str, str] = _Titles(short=True)


def table_metrics() -> tuple[str, ...]:
    """The metric columns of the comparison and audit tables: every registered metric shown in reports, at 10
    (Precision, Recall, NDCG, then any registered later)."""
    return reported_metrics(10)

TABLE2_ORDER = ("GraphSAGE", "MMGCN", "NGCF", "DisenGCN", "GAT", "GRCN")
TABLE3_ORDER = ("Visual", "Acoustic", "Textual", "GRCN_max", "GRCN_mean", "GRCN_hard", "GRCN")
PROPOSED = "GRCN"
REFERENCE_LABELS = ("Popularity",)
#: (users, items) of the paper's datasets in the official format -> the paper's name.
PAPER_DATASETS = {(55_485, 5_986): "Movielens", (36_656, 76_085): "Tiktok", (7_010, 86_483): "Kwai"}
DASH = "–"
BOLD_DIGITS = 4  # the printed precision of metric values


class RowLike(Protocol):
    """What a comparison row needs: a selection (:class:`~.selection.Selection`) or a fixed reference row."""

    label: str
    dataset: str

    def test_mean(self, metric: str) -> float | None: ...

    def test_std(self, metric: str) -> float | None: ...

    def per_user(self, metric: str) -> Any: ...


# ---------------------------------------------------------------------------------------------------------------
# Structured tables and their renderers


@dataclass(frozen=True)
class Num:
    """A numeric table cell. ``percent`` cells are relative improvements; others are metric values."""

    value: float | None
    std: float | None = None
    bold: bool = False
    star: bool = False
    percent: bool = False
    digits: int = 4

    def number(self) -> str:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return DASH
        return f"{self.value:+.2f}%" if self.percent else f"{self.value:.{self.digits}f}"

    def deviation(self) -> str:
        return "" if self.std is None or self.value is None else f"{self.std:.{self.digits}f}"


Cell = Num | str


@dataclass
class Table:
    """Rows of cells under column groups (``[(group title, [column titles])]``; a group title may be empty)."""

    title: str
    row_header: str
    groups: Sequence[tuple[str, Sequence[str]]]
    rows: Sequence[tuple[str, Sequence[Cell]]]
    notes: Sequence[str] = ()
    rules: frozenset[int] = frozenset()  # indices of rows preceded by a horizontal rule (a new row block)

    @property
    def headers(self) -> list[str]:
        """Flat column titles: "<group> <column>" (Markdown and HTML tables have a single header row)."""
        return [self.row_header] + [f"{g} {c}".strip() for g, columns in self.groups for c in columns]

    def cell(self, row_label: str, column: str) -> Cell:
        """The cell of a row (by its label) under a flat column title (see :attr:`headers`)."""
        index = self.headers.index(column) - 1
        for label, cells in self.rows:
            if label == row_label:
                return cells[index]
        raise KeyError(f"no row {row_label!r} in table {self.title!r}")


def _markdown_cell(cell: Cell) -> str:
    if isinstance(cell, str):
        return cell.replace("|", "\\|")
    text = cell.number()
    if cell.bold and text != DASH:
        text = f"**{text}**"
    if cell.star:
        text += "\\*"
    if cell.deviation():
        text += f" ± {cell.deviation()}"
    return text


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, str):
        return html.escape(cell)
    text = html.escape(cell.number())
    if cell.bold and cell.value is not None:
        text = f"<b>{text}</b>"
    if cell.star:
        text += "<sup>*</sup>"
    if cell.deviation():
        text += f" <small>± {cell.deviation()}</small>"
    return text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  # Kept out of text mode: they need no Unicode support from the document (and '<' is '¡' in OT1).
                  "<": r"$<$", ">": r"$>$", "±": r"$\pm$", "×": r"$\times$", "λ": r"$\lambda$", "–": "--"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_cell(cell: Cell) -> str:
    if isinstance(cell, str):
        return latex_escape(cell)
    text = latex_escape(cell.number())
    if cell.bold and cell.value is not None:
        text = rf"\textbf{{{text}}}"
    if cell.star:
        text += r"$^{*}$"
    if cell.deviation():
        text += rf" {{\scriptsize $\pm${cell.deviation()}}}"
    return text


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table, its title in bold above it and its notes below."""
    rows = [[_markdown_cell(label)] + [_markdown_cell(c) for c in cells] for label, cells in table.rows]
    body = tabulate(rows, headers=[_markdown_cell(h) for h in table.headers], tablefmt="github",
                    disable_numparse=True)
    parts = [f"**{table.title}**", "", body] if table.title else [body]
    if table.notes:
        parts += [""] + [f"{note}  " for note in table.notes]
    return "\n".join(parts) + "\n"


def to_html(table: Table) -> str:
    """An HTML table (``tabulate``'s html format, cells escaped here) with a caption and notes."""
    rows = [[_html_cell(label)] + [_html_cell(c) for c in cells] for label, cells in table.rows]
    body = tabulate(rows, headers=[html.escape(h) for h in table.headers], tablefmt="unsafehtml",
                    disable_numparse=True)
    if table.title:
        body = body.replace("<table>", f"<table>\n<caption>{html.escape(table.title)}</caption>", 1)
    notes = "".join(f"<p class=\"note\">{html.escape(note)}</p>\n" for note in table.notes)
    return body + "\n" + notes


def to_latex(table: Table) -> str:
    """A ``booktabs`` table environment with one ``\\multicolumn`` header per column group."""
    columns = sum(len(c) for _, c in table.groups)
    lines = ["% needs \\usepackage{booktabs}", r"\begin{table}[t]", r"\centering"]
    if table.title:
        lines.append(rf"\caption{{{latex_escape(table.title)}}}")
    spec = "l" + "".join(" " + "c" * len(c) for _, c in table.groups)
    lines += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    if any(g for g, _ in table.groups):
        heads, rules, start = [""], [], 2
        for group, cols in table.groups:
            heads.append(rf"\multicolumn{{{len(cols)}}}{{c}}{{{latex_escape(group)}}}" if group else
                         " & ".join([""] * len(cols)))
            if group:
                rules.append(rf"\cmidrule(lr){{{start}-{start + len(cols) - 1}}}")
            start += len(cols)
        lines += [" & ".join(heads) + r" \\", " ".join(rules)]
    lines.append(" & ".join(latex_escape(h) for h in [table.row_header] +
                            [c for _, cols in table.groups for c in cols]) + r" \\")
    lines.append(r"\midrule")
    for index, (label, cells) in enumerate(table.rows):
        if index in table.rules:
            lines.append(r"\midrule")
        if len(cells) != columns:
            raise ValueError(f"row {label!r} of {table.title!r} has {len(cells)} cells, expected {columns}")
        lines.append(" & ".join([_latex_cell(label)] + [_latex_cell(c) for c in cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {latex_escape(note)}" for note in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_csv(records: Sequence[Mapping[str, Any]]) -> str:
    """Records (dicts with the same keys) as CSV text; None becomes an empty field."""
    if not records:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Published numbers


@dataclass(frozen=True)
class Published:
    """A table of the paper as transcribed in ``reports/data/paper_<name>.csv``."""

    name: str
    datasets: tuple[str, ...]
    rows: tuple[str, ...]  # model rows in the paper's order (without %Improv.)
    values: Mapping[tuple[str, str], Mapping[str, float]]  # (dataset, row) -> metric -> value
    significant: Mapping[tuple[str, str], bool]
    improvements: Mapping[str, Mapping[str, float]]  # dataset -> metric -> published percent

    def value(self, dataset: str, row: str, metric: str) -> float | None:
        return self.values.get((dataset, row), {}).get(metric)


def load_published(name: str) -> Published:
    """``"table2"`` or ``"table3"``: the paper's numbers, shipped with the package."""
    resource = resources.files("grcn_bench.reports") / "data" / f"paper_{name}.csv"
    if not resource.is_file():
        raise KeyError(f"no published table {name!r}; expected 'table2' or 'table3'")
    lines = [line for line in resource.read_text().splitlines() if line and not line.startswith("#")]
    datasets, rows = {}, {}
    values, significant, improvements = {}, {}, {}
    for record in csv.DictReader(lines):
        dataset, row = record["dataset"], record["row"]
        metrics = {m: float(record[m]) for m in PUBLISHED_METRICS}
        datasets.setdefault(dataset, None)
        if row == "%Improv.":
            improvements[dataset] = metrics
            continue
        rows.setdefault(row, None)
        values[(dataset, row)] = metrics
        significant[(dataset, row)] = record["significant"] == "1"
    return Published(name, tuple(datasets), tuple(rows), values, significant, improvements)


def paper_dataset(card: Mapping[str, Any] | None) -> str | None:
    """The paper's name of a dataset given its card: the official format at one of the paper's sizes."""
    if not card or card.get("source_format") != "official":
        return None
    return PAPER_DATASETS.get((card.get("num_users"), card.get("num_items")))


def dataset_title(spec: str, card: Mapping[str, Any] | None = None) -> str:
    """How a dataset is named in table headers: the paper's name, else the spec (a directory's last component)."""
    paper = paper_dataset(card)
    if paper:
        return paper
    if spec.startswith("synthetic:"):
        return spec
    return Path(spec.rstrip("/")).name or spec


# ---------------------------------------------------------------------------------------------------------------
# Comparison tables (Table 2, Table 3)


@dataclass(frozen=True)
class DatasetColumn:
    spec: str
    title: str
    paper: str | None


@dataclass
class Comparison:
    """Everything a comparison table shows, computed once: rows, best values, improvements, significance."""

    title: str
    datasets: list[DatasetColumn]
    labels: list[str]
    rows: dict[tuple[str, str], RowLike]
    proposed: str | None
    metrics: tuple[str, ...]
    best: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    strongest_other: dict[tuple[str, str], str] = field(default_factory=dict)
    improvements: dict[tuple[str, str], float | None] = field(default_factory=dict)
    tests: dict[tuple[str, str], SeedTest | None] = field(default_factory=dict)
    published: Published | None = None

    def mean(self, label: str, spec: str, metric: str) -> float | None:
        row = self.rows.get((label, spec))
        return None if row is None else row.test_mean(metric)

    def significant(self, spec: str, metric: str) -> bool:
        test = self.tests.get((spec, metric))
        return test is not None and test.significant()

    def star_note(self) -> str | None:
        """What the ``*`` of this table means: the test that produced the stars, per dataset and metric where they
        differ (for instance one dataset ran one seed and another three)."""
        where: dict[str, list[str]] = {}
        for column in self.datasets:
            for metric in self.metrics:
                test = self.tests.get((column.spec, metric))
                if test is not None:
                    where.setdefault(test.explanation, []).append(f"{column.title} {SHORT_TITLES.get(metric, metric)}")
        if not where:
            return None
        if len(where) == 1:
            return f"*: {next(iter(where))}."
        return "*: " + "; ".join(f"{', '.join(cells)}: {text}" for text, cells in where.items()) + "."


def ordered_labels(labels: Iterable[str], order: Sequence[str]) -> list[str]:
    """Labels in ``order`` first (the paper's rows), then the others as they come, then reference rows."""
    seen = list(dict.fromkeys(labels))
    references = [label for label in seen if label in REFERENCE_LABELS]
    others = [label for label in seen if label not in order and label not in REFERENCE_LABELS]
    return [label for label in order if label in seen] + others + references


def build_comparison(
    rows: Sequence[RowLike],
    *,
    title: str,
    order: Sequence[str] = TABLE2_ORDER,
    proposed: str | None = PROPOSED,
    metrics: Sequence[str] | None = None,
    published: Published | None = None,
    cards: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> Comparison:
    """Compute a comparison: per dataset and metric, the best row(s), the strongest row other than ``proposed``,
    the improvement of ``proposed`` over it and the paired tests between their per-user values.

    ``cards`` maps a dataset spec to its card (for the paper's names); by default the rows' own cards are used.
    ``metrics``: the columns (default :func:`table_metrics`, from the metric registry).
    """
    metrics = table_metrics() if metrics is None else tuple(metrics)
    table: dict[tuple[str, str], RowLike] = {}
    arrays: dict[int, Any] = {}
    for row in rows:
        table.setdefault((row.label, row.dataset), row)
    specs = list(dict.fromkeys(row.dataset for row in rows))
    card_of = dict(cards or {})
    for row in rows:
        if card_of.get(row.dataset) is None and getattr(row, "card", None):
            card_of[row.dataset] = row.card
    datasets = [DatasetColumn(s, dataset_title(s, card_of.get(s)), paper_dataset(card_of.get(s))) for s in specs]
    labels = ordered_labels((row.label for row in rows), order)
    if proposed not in labels:
        proposed = None
    comparison = Comparison(title, datasets, labels, table, proposed, tuple(metrics), published=published)
    for column in datasets:
        for metric in metrics:
            values = {label: comparison.mean(label, column.spec, metric) for label in labels}
            values = {label: v for label, v in values.items() if v is not None}
            if not values:
                continue
            # Best = the top value as printed: rows that print the same number are all bold.
            top = round(max(values.values()), BOLD_DIGITS)
            comparison.best[(column.spec, metric)] = {label for label, v in values.items()
                                                      if round(v, BOLD_DIGITS) == top}
            others = {label: v for label, v in values.items() if label != proposed}
            if proposed is None or proposed not in values or not others:
                continue
            strongest = max(others, key=lambda label: (others[label], -labels.index(label)))
            comparison.strongest_other[(column.spec, metric)] = strongest
            comparison.improvements[(column.spec, metric)] = improvement(values[proposed], others[strongest])
            ours = per_seed_per_user(table[(proposed, column.spec)], metric, arrays)
            theirs = per_seed_per_user(table[(strongest, column.spec)], metric, arrays)
            comparison.tests[(column.spec, metric)] = (
                seed_test(ours, theirs) if ours is not None and theirs is not None else None)
    return comparison


def per_seed_per_user(row: RowLike, metric: str, cache: dict[int, Any] | None = None
                      ) -> dict[int, Sample] | Sample | None:
    """The per-user test values of ``metric`` that the significance test pairs: ``{seed: (users, values)}`` for a
    row with seeds (a selection: each selected seed's run), or the row's one ``(users, values)`` for a row without
    (a fixed reference row, which does not depend on the seed). ``None`` when a run stored no per-user arrays.

    ``cache`` keeps each row's loaded arrays between metrics (keyed by the row's identity)."""
    runs = getattr(row, "runs", None)
    if not runs:
        return row.per_user(metric)
    cache = {} if cache is None else cache
    if id(row) not in cache:
        cache[id(row)] = [(int(run.settings["seed"]), run.arrays()) for run in runs]
    key = f"test_{metric}"
    out: dict[int, Sample] = {}
    for seed, arrays in cache[id(row)]:
        if "test_users" not in arrays or key not in arrays:
            return None
        out[seed] = (arrays["test_users"], arrays[key])
    return out


def _seeds(row: RowLike) -> int:
    return len(getattr(row, "seeds", ()))


def comparison_table(comparison: Comparison, *, show_std: bool = True) -> Table:
    """The comparison as a :class:`Table`: our rows, ``%Improv.``, and the paper's block when a dataset is the
    paper's."""
    groups = [(column.title, [METRIC_TITLES.get(m, m) for m in comparison.metrics]) for column in comparison.datasets]
    rows: list[tuple[str, list[Cell]]] = []
    for label in comparison.labels:
        cells: list[Cell] = []
        for column in comparison.datasets:
            row = comparison.rows.get((label, column.spec))
            for metric in comparison.metrics:
                value = None if row is None else row.test_mean(metric)
                std = row.test_std(metric) if row is not None and show_std and _seeds(row) > 1 else None
                cells.append(Num(
                    value, std,
                    bold=label in comparison.best.get((column.spec, metric), set()),
                    star=label == comparison.proposed and comparison.significant(column.spec, metric),
                ))
        rows.append((label, cells))
    notes = []
    if comparison.proposed is not None:
        rows.append(("%Improv.", [Num(comparison.improvements.get((c.spec, m)), percent=True)
                                  for c in comparison.datasets for m in comparison.metrics]))
        notes.append(f"%Improv.: {comparison.proposed} over the strongest other row per metric.")
        star = comparison.star_note()
        if star:
            notes.append(star)
    if show_std:
        notes.append("Test metrics @10 of the hyper-parameters selected on validation Recall@10: mean ± sample std "
                     "over seeds (± only with two or more seeds). Best value per column in bold.")
    rules = {len(comparison.labels)} if comparison.proposed is not None else set()
    published = comparison.published
    if published is not None and any(c.paper in published.datasets for c in comparison.datasets):
        rules.add(len(rows))
        for label in published.rows:
            cells = []
            for column in comparison.datasets:
                for metric in comparison.metrics:
                    value = published.value(column.paper, label, metric) if column.paper else None
                    star = bool(column.paper) and published.significant.get((column.paper, label), False)
                    cells.append(Num(value, star=star))
            rows.append((f"paper: {label}", cells))
        if published.improvements:
            rows.append(("paper: %Improv.", [
                Num(published.improvements.get(c.paper, {}).get(m) if c.paper else None, percent=True)
                for c in comparison.datasets for m in comparison.metrics]))
        notes.append(f"paper: the published {published.name.replace('table', 'Table ')} of Wei et al. (ACM MM "
                     "2020), shown for the paper's datasets only.")
    return Table(comparison.title, "Model", groups, rows, notes, frozenset(rules))


def significance_table(comparison: Comparison) -> Table:
    """The tests behind the stars: per dataset and metric, the proposed row against the strongest other row, with
    the test that decided the star, its seeds and each seed's p."""
    rows = []
    for column in comparison.datasets:
        for metric in comparison.metrics:
            key = (column.spec, metric)
            if key not in comparison.strongest_other:
                continue
            test = comparison.tests.get(key)
            rows.append((f"{column.title} {SHORT_TITLES.get(metric, metric)}", [
                f"{comparison.proposed} vs {comparison.strongest_other[key]}",
                Num(comparison.improvements.get(key), percent=True),
                _seed_list(test),
                str(test.n) if test else DASH,
                Num(test.mean_difference if test else None, digits=5),
                Num(test.p_ttest if test else None, digits=4),
                " ".join(f"{p:.4f}" for p in test.p_per_seed) if test and test.intersection_union else DASH,
                Num(test.p_wilcoxon if test else None, digits=4),
                "yes" if test and test.significant() else "no",
                test.description if test else "not tested (no per-user values or no seed in common)",
            ]))
    columns = ["comparison", "%Improv.", "seeds", "users", "mean diff.", "p (t-test)", "p per seed",
               "p (Wilcoxon)", "*", "test"]
    return Table(f"{comparison.title}: significance", "dataset, metric", [("", columns)], rows,
                 ["Paired two-sided tests over per-user test metrics (scipy.stats.ttest_rel; the Wilcoxon "
                  "signed-rank test alongside, not deciding). With two or more seeds the t-test runs on every seed "
                  "both rows share (a row without seeds pairs with each) and the * needs p < 0.05 and a gain on every "
                  "one (intersection-union); p is the largest over seeds and the mean difference their average. With "
                  "one seed the * reflects the sampling of users only."])


def _seed_list(test: SeedTest | None) -> str:
    if test is None:
        return DASH
    return " ".join(map(str, test.seeds)) if test.seeds else "none"


def comparison_records(comparison: Comparison) -> list[dict[str, Any]]:
    """Long-format CSV records: one per (dataset, row, metric), ours and the paper's."""
    records = []
    for column in comparison.datasets:
        for label in comparison.labels:
            row = comparison.rows.get((label, column.spec))
            if row is None:
                continue
            for metric in comparison.metrics:
                key = (column.spec, metric)
                test = comparison.tests.get(key) if label == comparison.proposed else None
                chosen = getattr(row, "chosen", None)
                records.append({
                    "source": "ours", "dataset": column.spec, "dataset_title": column.title, "row": label,
                    "model": getattr(row, "model", ""), "protocol": getattr(row, "protocol", "standard"),
                    "metric": metric, "mean": row.test_mean(metric), "std": row.test_std(metric),
                    "seeds": len(getattr(row, "seeds", ())) or None,
                    "lr": chosen.lr if chosen else None, "reg_weight": chosen.reg_weight if chosen else None,
                    "best": label in comparison.best.get(key, set()),
                    "vs": comparison.strongest_other.get(key) if label == comparison.proposed else None,
                    "improvement_pct": comparison.improvements.get(key) if label == comparison.proposed else None,
                    "p_ttest": test.p_ttest if test else None, "p_wilcoxon": test.p_wilcoxon if test else None,
                    "significant": comparison.significant(column.spec, metric) if label == comparison.proposed
                    else None,
                    "significance_test": test.description if test else None,
                    "significance_seeds": _seed_list(test) if test else None,
                    "p_ttest_per_seed": " ".join(repr(p) for p in test.p_per_seed) if test else None,
                })
        published = comparison.published
        if published is not None and column.paper in published.datasets:
            for label in published.rows:
                for metric in comparison.metrics:
                    records.append({
                        "source": "paper", "dataset": column.spec, "dataset_title": column.title, "row": label,
                        "model": "", "protocol": "", "metric": metric,
                        "mean": published.value(column.paper, label, metric), "std": None, "seeds": None,
                        "lr": None, "reg_weight": None, "best": None, "vs": None,
                        "improvement_pct": published.improvements.get(column.paper, {}).get(metric)
                        if label == PROPOSED else None,
                        "p_ttest": None, "p_wilcoxon": None,
                        "significant": published.significant.get((column.paper, label)),
                        "significance_test": None, "significance_seeds": None, "p_ttest_per_seed": None,
                    })
    return records


# ---------------------------------------------------------------------------------------------------------------
# Protocol audit (§5.7)


@dataclass(frozen=True)
class AuditRow:
    """One model on one dataset under the standard protocol and under the released code's protocol."""

    label: str
    dataset: str
    title: str
    standard: RowLike
    official: RowLike

    def ratio(self, metric: str) -> float | None:
        s, o = self.standard.test_mean(metric), self.official.test_mean(metric)
        return None if s is None or o is None or s == 0 else o / s

    def difference(self, metric: str) -> float | None:
        s, o = self.standard.test_mean(metric), self.official.test_mean(metric)
        return None if s is None or o is None else o - s


def audit_rows(selections: Sequence[Any]) -> list[AuditRow]:
    """Pair each configuration's standard-protocol selection with its official-grcn one (same label, model,
    options, dataset)."""
    def key(s: Any) -> tuple:
        return (s.label, s.model, repr(sorted(s.options.items())), s.dataset)

    official = {key(s): s for s in selections if s.protocol == "official-grcn"}
    rows = []
    for s in selections:
        if s.protocol == "standard" and key(s) in official:
            rows.append(AuditRow(s.label, s.dataset, dataset_title(s.dataset, getattr(s, "card", None)), s,
                                 official[key(s)]))
    order = ordered_labels((r.label for r in rows), TABLE2_ORDER)
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    return sorted(rows, key=lambda r: (datasets.index(r.dataset), order.index(r.label)))


def audit_table(rows: Sequence[AuditRow], *, metrics: Sequence[str] | None = None) -> Table:
    metrics = table_metrics() if metrics is None else metrics
    groups = [(SHORT_TITLES.get(m, m), ["standard", "official-grcn", "ratio"]) for m in metrics]
    out = []
    for row in rows:
        cells: list[Cell] = []
        for metric in metrics:
            ratio = row.ratio(metric)
            cells += [Num(row.standard.test_mean(metric)), Num(row.official.test_mean(metric)),
                      DASH if ratio is None else f"×{ratio:.2f}"]
        out.append((f"{row.title}: {row.label}", cells))
    notes = ["official-grcn: the released code's protocol: epoch and hyper-parameters selected on "
             "test, training items scored 1e-5 instead of masked, validation items not masked, IDCG over "
             "min(hits, K). ratio = official / standard: the inflation of the published protocol. The quirks are "
             "measured together (one protocol setting), not one by one."]
    released = sorted({row.label for row in rows if getattr(row.standard, "options", {}).get("variant") == "official"})
    if released:
        notes.append(f"{', '.join(released)}: GRCN as the released code runs it (variant=\"official\": its routing, "
                     "confidence and one-hop readout, soft pruning as in its README's runs, and its L2 weighting), "
                     "so its official-grcn column is the released code as released; docs/protocol.md.")
    return Table("Protocol audit: test metrics @10 under both protocols", "dataset: model", groups, out, notes)


def audit_records(rows: Sequence[AuditRow], *, metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    metrics = table_metrics() if metrics is None else metrics
    return [{"dataset": r.dataset, "row": r.label, "metric": m, "standard": r.standard.test_mean(m),
             "standard_std": r.standard.test_std(m), "official_grcn": r.official.test_mean(m),
             "official_grcn_std": r.official.test_std(m), "ratio": r.ratio(m), "difference": r.difference(m)}
            for r in rows for m in metrics]


# ---------------------------------------------------------------------------------------------------------------
# Selection summary


def selection_table(selections: Sequence[Any], *, metric: str = "recall@10") -> Table:
    """The selected (lr, λ) of every configuration, its selection score and its test value of ``metric``."""
    rows = []
    for s in selections:
        chosen = s.chosen
        options = ", ".join(f"{k}={v}" for k, v in sorted(s.options.items()))
        rows.append((s.label, [
            dataset_title(s.dataset, s.card), options or DASH, s.protocol,
            DASH if chosen is None else f"{chosen.lr:g}", DASH if chosen is None else f"{chosen.reg_weight:g}",
            f"{len(s.runs)}/{len(chosen.seeds) if chosen else 0}",
            Num(chosen.score if chosen else None),
            Num(s.test_mean(metric), s.test_std(metric) if len(s.runs) > 1 else None),
        ]))
    columns = ["dataset", "options", "protocol", "lr", "λ", "seeds ok", f"selection {SHORT_TITLES.get(metric)}",
               f"test {SHORT_TITLES.get(metric)}"]
    return Table("Selected hyper-parameters", "row", [("", columns)], rows,
                 ["Selection score: mean over seeds of validation Recall@10 (test Recall@10 under official-grcn, "
                  "as the released code does). Points where fewer seeds produced a result rank lower."])


def grid_records(selections: Sequence[Any]) -> list[dict[str, Any]]:
    """Every grid point of every configuration with its score and whether it was selected."""
    return [{"row": s.label, "dataset": s.dataset, "options": repr(dict(sorted(s.options.items()))),
             "protocol": s.protocol, "selection_split": s.selection_split, "lr": p.lr, "reg_weight": p.reg_weight,
             "seeds": " ".join(map(str, p.seeds)), "usable": p.usable, "score": p.score,
             "selected": s.chosen is not None and (p.lr, p.reg_weight) == (s.chosen.lr, s.chosen.reg_weight)}
            for s in selections for p in s.points]
