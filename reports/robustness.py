"""Noise robustness (beyond the paper; docs/protocol.md, "Noise robustness"): test metrics versus the false-positive
rate, and how well learned edge weights tell false-positive train edges from the rest (ROC-AUC, measured by the runner).

The noise rate is a dataset parameter: a synthetic preset's ``noise`` (recorded in the card's parameters), or a
``noise=<rate>`` override in the dataset spec. Cells that differ only in the rate form one panel ("base" dataset).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from matplotlib.figure import Figure

from .plotting import color_map, new_figure
from .tables import DASH, SHORT_TITLES, TABLE2_ORDER, Num, Table, dataset_title, ordered_labels

NOISE_KEYS = ("noise", "noise_rate", "inject_noise")
NOISE_METRICS = ("recall@10", "ndcg@10")


def _split_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    head, _, query = spec.partition("?")
    return head, parse_qsl(query, keep_blank_values=True)


def noise_rate(spec: str, card: Mapping[str, Any] | None = None) -> float | None:
    """The false-positive rate of a dataset: from its card's parameters, else from the spec's query."""
    parameters = (card or {}).get("parameters") or {}
    for key in NOISE_KEYS:
        value = parameters.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    for key, value in _split_spec(spec)[1]:
        if key in NOISE_KEYS:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def base_dataset(spec: str) -> str:
    """The spec without its noise override: what the cells of one robustness panel share."""
    head, query = _split_spec(spec)
    rest = "&".join(f"{k}={v}" for k, v in query if k not in NOISE_KEYS)
    return head + (f"?{rest}" if rest else "")


def noise_points(selections: Sequence[Any]) -> dict[str, dict[str, list[tuple[float, Any]]]]:
    """``{base dataset: {label: [(rate, selection), ...] sorted by rate}}`` of the usable selections with a known
    rate."""
    out: dict[str, dict[str, list[tuple[float, Any]]]] = {}
    for s in selections:
        rate = noise_rate(s.dataset, s.card)
        if not s.ok or rate is None:
            continue
        out.setdefault(base_dataset(s.dataset), {}).setdefault(s.label, []).append((rate, s))
    for series in out.values():
        for points in series.values():
            points.sort(key=lambda point: point[0])
    return out


def _ordered(series: Mapping[str, Any]) -> list[str]:
    return ordered_labels(series, TABLE2_ORDER)


def noise_figure(selections: Sequence[Any], *, metrics: Sequence[str] = NOISE_METRICS) -> Figure:
    """Test ``metrics`` versus noise rate, one column per base dataset, one line per row label (± std over
    seeds)."""
    points = noise_points(selections)
    if not points:
        raise ValueError("noise_figure: no usable selection with a known noise rate")
    colors = color_map([label for series in points.values() for label in _ordered(series)])
    figure, axes = new_figure(len(metrics), len(points))
    for column, (base, series) in enumerate(points.items()):
        for row, metric in enumerate(metrics):
            ax = axes[row][column]
            for label in _ordered(series):
                rates = [rate for rate, _ in series[label]]
                means = [s.test_mean(metric) for _, s in series[label]]
                stds = [s.test_std(metric) for _, s in series[label]]
                ax.errorbar(rates, means, yerr=stds, marker="o", capsize=3, color=colors[label], label=label)
            ax.set_xlabel("false-positive rate of train interactions")
            ax.set_ylabel(f"test {SHORT_TITLES.get(metric, metric)}")
            if row == 0:
                ax.set_title(dataset_title(base))
            ax.legend(fontsize="small")
    return figure


EDGE_AUC_SIDES = {
    "relative": (
        "Edge-weight ROC-AUC for false-positive edges, within neighbourhoods",
        "ROC-AUC of the negated learned edge weights at telling labelled false-positive train pairs from the rest, "
        "each weight taken relative to a uniform weight over its receiver's neighbourhood (weight x receiver "
        "degree), user side plus item side: the order inside every neighbourhood, without the 1/degree scale that "
        "softmax normalisation gives each one.",
    ),
    "mean": (
        "Edge-weight ROC-AUC for false-positive edges, raw weights",
        "ROC-AUC of the negated raw learned edge weights (user side plus item side) over all train pairs at once; "
        "softmax-normalised weights scale with 1/degree, so this mixes neighbourhood sizes into the ranking.",
    ),
}


def edge_auc_table(selections: Sequence[Any], *, side: str = "mean") -> Table | None:
    """ROC-AUC of learned edge weights at flagging false-positive train edges, per row label and noise rate
    (mean ± std over the selected seeds); ``None`` when no cell measured it."""
    points = noise_points(selections)
    groups, columns = [], []
    for base, series in points.items():
        rates = sorted({rate for pts in series.values() for rate, s in pts if s.edge_auc(side)})
        if rates:
            groups.append((dataset_title(base), [f"rate {r:g}" for r in rates]))
            columns.append((base, rates))
    if not groups:
        return None
    labels = ordered_labels((label for series in points.values() for label in series), TABLE2_ORDER)
    rows = []
    for label in labels:
        cells: list[Num | str] = []
        measured = False
        for base, rates in columns:
            by_rate = dict(points[base].get(label, []))
            for rate in rates:
                auc = by_rate[rate].edge_auc(side) if rate in by_rate else None
                measured |= auc is not None
                cells.append(Num(auc[0], auc[1], digits=3) if auc else DASH)
        if measured:
            rows.append((label, cells))
    title, note = EDGE_AUC_SIDES.get(side, (f"Edge-weight ROC-AUC for false-positive edges ({side})", ""))
    note += " 0.5 = chance. Rate 0 has no labelled false positives, hence no AUC."
    return Table(title, "Model", groups, rows, [note.strip()])


def edge_auc_records(selections: Sequence[Any]) -> list[dict[str, Any]]:
    records = []
    for base, series in noise_points(selections).items():
        for label, pts in series.items():
            for rate, s in pts:
                for side in ("user_side", "item_side", "mean", "user_side_relative", "item_side_relative",
                             "relative"):
                    auc = s.edge_auc(side)
                    if auc:
                        records.append({"dataset": base, "row": label, "rate": rate, "side": side,
                                        "auc_mean": auc[0], "auc_std": auc[1]})
    return records


def noise_records(selections: Sequence[Any], *, metrics: Sequence[str] = NOISE_METRICS) -> list[dict[str, Any]]:
    records = []
    for base, series in noise_points(selections).items():
        for label, pts in series.items():
            for rate, s in pts:
                for metric in metrics:
                    records.append({"dataset": base, "row": label, "rate": rate, "metric": metric,
                                    "mean": s.test_mean(metric), "std": s.test_std(metric), "seeds": len(s.runs)})
    return records

