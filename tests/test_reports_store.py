"""Reports from a constructed result store whose answers are known: selection, every table, every figure, the
bundle. Results are written with ResultStore.write directly; nothing is trained here."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from matplotlib.collections import LineCollection

from grcn_bench.benchmarks.config import Cell, TrainSettings
from grcn_bench.benchmarks.store import ResultStore
from grcn_bench.datasets.base import DatasetCard, pairs_to_csr
from grcn_bench.reports import bundle as bundle_module
from grcn_bench.reports.bundle import write_report
from grcn_bench.reports.curves import routing_figure, training_curves_figure
from grcn_bench.reports.plotting import save_figure
from grcn_bench.reports.robustness import base_dataset, edge_auc_table, noise_figure, noise_rate
from grcn_bench.reports.selection import load_results, select
from grcn_bench.reports.tsne import Neighbourhood, choose_users, id_columns, tsne_figure

NUM_USERS, NUM_ITEMS = 40, 30
DATASET = "synthetic:tiny"


def card(spec: str = DATASET, *, modalities=None, noise: float = 0.2, source_format: str = "synthetic",
         num_users: int = NUM_USERS, num_items: int = NUM_ITEMS) -> dict:
    return DatasetCard(
        name=spec, source_format=source_format, path=None, num_users=num_users, num_items=num_items,
        split_counts={"train": 300, "val": 40, "test": 40}, modalities=modalities or {"v": 16, "t": 8},
        noise_edges=30, parameters={"noise": noise},
    ).to_dict()


def per_user_arrays(recall: np.ndarray, users: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-user test arrays with precision = recall / 4 and ndcg = recall / 2 (any consistent values do)."""
    users = np.arange(recall.size) if users is None else users
    return {"test_users": users, "test_precision@10": recall / 4, "test_recall@10": recall,
            "test_ndcg@10": recall / 2}


def write_cell(store: ResultStore, cell: Cell, *, val_recall: float, test_recall: np.ndarray | float,
               status: str = "ok", history=None, card_dict=None, auc=None, embeddings=None, epochs: int = 5
               ) -> None:
    """Store one result: validation Recall@10 ``val_recall``; test metrics from the per-user arrays."""
    recall = np.full(NUM_USERS, float(test_recall)) if np.ndim(test_recall) == 0 else np.asarray(test_recall)
    arrays = per_user_arrays(recall)
    test = {name.removeprefix("test_"): float(values.mean()) for name, values in arrays.items()
            if name != "test_users"}
    if embeddings is not None:
        arrays["user_embedding"], arrays["item_embedding"] = embeddings
    result = {
        "cell": cell.to_dict(), "cell_id": cell.cell_id, "status": status, "stop_reason": "patience",
        "error": "RuntimeError: boom" if status == "failed" else None,
        "best_epoch": 3, "epochs_run": epochs, "selection_split": "val" if cell.settings.protocol == "standard"
        else "test",
        "val_metrics": None if status == "failed" else {"precision@10": val_recall / 4, "recall@10": val_recall,
                                                       "ndcg@10": val_recall / 2},
        "test_metrics": None if status == "failed" else test,
        "history": history if history is not None else [
            {"epoch": e, "loss": 1.0 / e, "metrics": {"recall@10": val_recall * e / epochs}, "train_seconds": 0.1,
             "eval_seconds": 0.05} for e in range(1, epochs + 1)],
        "dataset_card": card_dict or card(cell.dataset),
        "environment": {"torch": "2.13.0", "device": "cpu", "git_commit": "abc123"},
        "seconds": 2.0, "test_seconds": 0.1, "peak_rss_bytes": 200 * 2**20, "num_parameters": 1234,
    }
    if auc is not None:
        result["edge_weight_auc"] = {"user_side": auc, "item_side": auc - 0.1, "mean": auc - 0.05,
                                     "user_side_relative": auc + 0.05, "item_side_relative": auc, "relative": auc + 0.1}
    store.write(cell.cell_id, result, None if status == "failed" else arrays)


def write_experiment(store: ResultStore, cells: list[Cell], **report) -> None:
    store.write_json("experiment.json", {"name": "constructed", "description": "a constructed store",
                                         "cells": [c.to_dict() for c in cells], "report": report})


def settings(lr: float, seed: int = 0, reg: float = 1e-4, protocol: str = "standard") -> TrainSettings:
    return TrainSettings(lr=lr, reg_weight=reg, seed=seed, protocol=protocol)


# -------------------------------------------------------------------------------------------------------------
# Selection


def test_selection_uses_validation_never_test(tmp_path):
    store = ResultStore(tmp_path)
    cells = []
    # lr 1e-3: best on validation, worse on test; lr 1e-2: the reverse. Standard selection must pick 1e-3.
    for seed in (0, 1):
        a = Cell("grcn", DATASET, settings(1e-3, seed), label="GRCN")
        b = Cell("grcn", DATASET, settings(1e-2, seed), label="GRCN")
        write_cell(store, a, val_recall=0.30 + seed * 0.01, test_recall=0.10 + seed * 0.02)
        write_cell(store, b, val_recall=0.20, test_recall=0.50)
        cells += [a, b]
    write_experiment(store, cells)
    (selection,) = select(load_results(tmp_path).runs)
    assert (selection.chosen.lr, selection.chosen.reg_weight) == (1e-3, 1e-4)
    assert selection.chosen.score == pytest.approx(0.305)
    assert selection.seeds == (0, 1)
    assert selection.test_mean("recall@10") == pytest.approx(0.11)
    assert selection.test_std("recall@10") == pytest.approx(np.std([0.10, 0.12], ddof=1))
    assert selection.val_mean("recall@10") == pytest.approx(0.305)


def test_official_protocol_selects_on_test_like_the_released_code(tmp_path):
    store = ResultStore(tmp_path)
    a = Cell("grcn", DATASET, settings(1e-3, protocol="official-grcn"), label="GRCN")
    b = Cell("grcn", DATASET, settings(1e-2, protocol="official-grcn"), label="GRCN")
    write_cell(store, a, val_recall=0.30, test_recall=0.10)
    write_cell(store, b, val_recall=0.20, test_recall=0.50)
    (selection,) = select(load_results(tmp_path).runs)
    assert selection.selection_split == "test" and selection.chosen.lr == 1e-2


def test_points_with_missing_or_failed_seeds_rank_below_complete_ones(tmp_path):
    store = ResultStore(tmp_path)
    cells = []
    for seed in (0, 1):
        good = Cell("gat", DATASET, settings(1e-3, seed), label="GAT")
        flaky = Cell("gat", DATASET, settings(1e-2, seed), label="GAT")
        write_cell(store, good, val_recall=0.2, test_recall=0.2)
        write_cell(store, flaky, val_recall=0.9, test_recall=0.9, status="failed" if seed else "ok")
        cells += [good, flaky]
    never_ran = Cell("gat", DATASET, settings(1e-1, 0), label="GAT")
    write_experiment(store, [*cells, never_ran])
    (selection,) = select(load_results(tmp_path).runs)
    assert selection.chosen.lr == 1e-3
    points = {p.lr: (p.usable, p.score) for p in selection.points}
    assert points[1e-2] == (1, pytest.approx(0.9)) and points[1e-1] == (0, None)


def test_results_are_joined_with_the_experiment_by_cell_id(tmp_path):
    store = ResultStore(tmp_path)
    shared = Cell("grcn", DATASET, settings(1e-3), label="GRCN", group="table2")
    write_cell(store, shared, val_recall=0.3, test_recall=0.2)  # the stored result says group table2
    as_fig4 = Cell("grcn", DATASET, settings(1e-3), label="GRCN (fig4)", group="fig4")
    write_experiment(store, [shared, as_fig4])
    results = load_results(tmp_path)
    assert [r.label for r in results.group("fig4")] == ["GRCN (fig4)"]
    assert results.group("fig4")[0].usable and len(results.unique_runs()) == 1
    (tmp_path / "experiment.json").unlink()  # without it, the results' own cell dicts are used
    assert [(r.label, r.group) for r in load_results(tmp_path).runs] == [("GRCN", "table2")]


def test_per_user_values_are_averaged_across_seeds_on_common_users(tmp_path):
    store = ResultStore(tmp_path)
    cells = [Cell("mf", DATASET, settings(1e-3, seed), label="MF") for seed in (0, 1)]
    write_cell(store, cells[0], val_recall=0.1, test_recall=np.linspace(0, 1, NUM_USERS))
    write_cell(store, cells[1], val_recall=0.1, test_recall=np.linspace(1, 0, NUM_USERS))
    write_experiment(store, cells)
    (selection,) = select(load_results(tmp_path).runs)
    users, values = selection.per_user("recall@10")
    np.testing.assert_array_equal(users, np.arange(NUM_USERS))
    np.testing.assert_allclose(values, 0.5)


# -------------------------------------------------------------------------------------------------------------
# A full constructed experiment with known answers


def _build_experiment(root) -> dict:
    """Table 2 (GraphSAGE, GAT, GRCN), Table 3, Figure 3, Figure 4, noise and audit cells with planned numbers."""
    store = ResultStore(root)
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.3, NUM_USERS)
    cells: list[Cell] = []
    expected = {}

    def add(cell, **kwargs):
        write_cell(store, cell, **kwargs)
        cells.append(cell)

    # Table 2. Per-user recall: GAT = base (+ a seed offset), GraphSAGE = base - 0.05, GRCN = GAT + 0.05 + small
    # noise (a large, significant gain). The lr 1e-2 points have better test but worse validation: never chosen.
    for seed in (0, 1):
        shift = 0.01 * seed
        gat = base + shift
        grcn = gat + 0.05 + rng.normal(0, 0.01, NUM_USERS)
        for label, model, recall in (("GraphSAGE", "graphsage", base - 0.05), ("GAT", "gat", gat),
                                     ("GRCN", "grcn", grcn)):
            add(Cell(model, DATASET, settings(1e-3, seed), label=label), val_recall=0.4, test_recall=recall)
            add(Cell(model, DATASET, settings(1e-2, seed), label=label), val_recall=0.1, test_recall=recall + 0.3)
            expected.setdefault(label, []).append(recall.mean())
    # Table 3 on the same dataset: the GRCN cells are Table 2's (same ids, not written again) and a Visual row.
    for seed in (0, 1):
        cells.append(Cell("grcn", DATASET, settings(1e-3, seed), label="GRCN", group="table3"))
        add(Cell("grcn", DATASET, settings(1e-3, seed), {"modalities": ["v"]}, label="Visual", group="table3"),
            val_recall=0.4, test_recall=base + 0.04)
    # Figure 3: T = 0..2 with GRCN, GRCN-ID at one T.
    for t in range(3):
        add(Cell("grcn", DATASET, settings(1e-3), {"routing_iterations": t}, label="GRCN", group="fig3"),
            val_recall=0.3, test_recall=0.1 + 0.01 * t)
    add(Cell("grcn", DATASET, settings(1e-3), {"id_only_prediction": True}, label="GRCN-ID", group="fig3"),
        val_recall=0.3, test_recall=0.09)
    # Figure 4: stored embeddings (GRCN: 64 ID columns + 64 content columns).
    for label, model, width in (("GAT", "gat", 64), ("GRCN", "grcn", 128)):
        emb = (rng.normal(size=(NUM_USERS, width)), rng.normal(size=(NUM_ITEMS, width)))
        add(Cell(model, DATASET, settings(1e-3, 5), label=label, group="fig4"), val_recall=0.3, test_recall=0.1,
            embeddings=emb)
    # Noise: three rates, GRCN degrades less than GAT; edge AUC for both.
    for rate in (0.0, 0.2, 0.4):
        spec = f"synthetic:tiny?noise={rate}"
        for label, model, slope, auc in (("GAT", "gat", -0.2, 0.55), ("GRCN", "grcn", -0.05, 0.8)):
            add(Cell(model, spec, settings(1e-3), label=label, group="noise"), val_recall=0.3,
                test_recall=0.3 + slope * rate, card_dict=card(spec, noise=rate), auc=None if rate == 0 else auc)
    # Audit: GRCN under both protocols (λ 1e-3: cells of their own); the official protocol inflates recall 1.5x.
    add(Cell("grcn", DATASET, settings(1e-3, 0, 1e-3), label="GRCN", group="audit"), val_recall=0.4,
        test_recall=0.2)
    add(Cell("grcn", DATASET, settings(1e-3, 0, 1e-3, protocol="official-grcn"), label="GRCN", group="audit"),
        val_recall=0.4, test_recall=0.3)
    # One failed cell.
    add(Cell("ngcf", DATASET, settings(1e-3), label="NGCF"), val_recall=0.0, test_recall=0.0, status="failed")
    write_experiment(store, cells, popularity=False)
    return {label: float(np.mean(values)) for label, values in expected.items()}


class FakeDataset:
    """What the report needs from a dataset for Figure 4: the training items of each user (6 per user)."""

    def user_items(self, *splits: str):
        rng = np.random.default_rng(1)
        pairs = np.array([(u, i) for u in range(NUM_USERS) for i in rng.choice(NUM_ITEMS, 6, replace=False)])
        return pairs_to_csr(pairs, NUM_USERS)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The constructed experiment and its report (written once: figures take seconds)."""
    root = tmp_path_factory.mktemp("results")
    expected = _build_experiment(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bundle_module, "_load_dataset", lambda spec, cache: FakeDataset())
        path = write_report(root)
    return root, path, expected


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_table2_holds_the_selected_test_numbers_with_bold_improvement_and_stars(report):
    root, path, expected = report
    records = {(r["row"], r["metric"]): r for r in _read_csv(root / "report" / "table2.csv")}
    for label in ("GraphSAGE", "GAT", "GRCN"):
        # Test numbers of the validation-selected point (lr 1e-3), not of the test-best point (lr 1e-2).
        assert float(records[(label, "recall@10")]["mean"]) == pytest.approx(expected[label])
        assert float(records[(label, "precision@10")]["mean"]) == pytest.approx(expected[label] / 4)
        assert float(records[(label, "recall@10")]["lr"]) == 1e-3
    grcn = records[("GRCN", "recall@10")]
    assert grcn["best"] == "True" and records[("GAT", "recall@10")]["best"] == "False"
    assert grcn["vs"] == "GAT"
    assert float(grcn["improvement_pct"]) == pytest.approx(100 * (expected["GRCN"] / expected["GAT"] - 1))
    assert grcn["significant"] == "True" and float(grcn["p_ttest"]) < 1e-6
    # Two seeds: the star is the per-user t-test on each seed (intersection-union), and the report says so.
    assert grcn["significance_test"] == "paired t-test on every one of 2 seeds (intersection-union), max p"
    assert grcn["significance_seeds"] == "0 1" and len(grcn["p_ttest_per_seed"].split()) == 2
    assert float(grcn["p_ttest"]) == max(map(float, grcn["p_ttest_per_seed"].split()))
    # The Markdown report shows the same numbers: bold, starred, with the sample std over the two seeds.
    text = path.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| GRCN "))
    assert f"**{expected['GRCN']:.4f}**\\*" in row
    gat_row = next(line for line in text.splitlines() if line.startswith("| GAT "))
    assert f"{expected['GAT']:.4f} ± 0.0071" in gat_row and "**" not in gat_row  # seeds differ by exactly 0.01
    assert "run on each of the 2 seeds both rows share" in text
    improv = next(line for line in text.splitlines() if line.startswith("| %Improv."))
    assert f"+{100 * (expected['GRCN'] / expected['GAT'] - 1):.2f}%" in improv
    # A cell that failed leaves its row empty and is explained.
    ngcf = next(line for line in text.splitlines() if line.startswith("| NGCF "))
    assert ngcf.count("–") == 3 and "NGCF on synthetic:tiny: no usable result" in text


def test_report_opens_with_the_paper_items_in_order_then_the_rest(report):
    _, path, _ = report
    headings = [line for line in path.read_text().splitlines() if line.startswith("## ")]
    order = ["Table 2", "Table 3", "Figure 3", "Figure 4", "Noise robustness", "Protocol audit", "Training curves",
             "Selected hyper-parameters", "Cell status", "Dataset cards", "Environment", "Per-cell timings"]
    assert [next(k for k, o in enumerate(order) if h[3:].startswith(o)) for h in headings] == list(range(len(order)))


def test_every_figure_is_written_as_png_and_pdf_and_linked(report):
    root, path, _ = report
    text, page = path.read_text(), (root / "report.html").read_text()
    for name in ("fig3", "fig4", "noise", "training_curves"):
        png, pdf = root / "report" / f"{name}.png", root / "report" / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
        assert f"(report/{name}.png)" in text and f"(report/{name}.pdf)" in text
        assert f'src="report/{name}.png"' in page and f'href="report/{name}.pdf"' in page
    assert "<table>" in page and "**" not in page and "<b>" in page


def test_table3_audit_noise_and_status_sections_hold_the_planned_numbers(report):
    root, path, expected = report
    table3 = {(r["row"], r["metric"]): r for r in _read_csv(root / "report" / "table3.csv")}
    visual = float(table3[("Visual", "recall@10")]["mean"])
    assert table3[("GRCN", "recall@10")]["vs"] == "Visual"
    assert float(table3[("GRCN", "recall@10")]["improvement_pct"]) == pytest.approx(
        100 * (expected["GRCN"] / visual - 1))
    audit = {r["metric"]: r for r in _read_csv(root / "report" / "audit.csv")}
    assert float(audit["recall@10"]["ratio"]) == pytest.approx(1.5)
    assert float(audit["recall@10"]["difference"]) == pytest.approx(0.1)
    noise = {(r["row"], float(r["rate"])): float(r["mean"]) for r in _read_csv(root / "report" / "noise.csv")
             if r["metric"] == "recall@10"}
    assert noise == pytest.approx({("GAT", 0.0): 0.3, ("GAT", 0.2): 0.26, ("GAT", 0.4): 0.22,
                                   ("GRCN", 0.0): 0.3, ("GRCN", 0.2): 0.29, ("GRCN", 0.4): 0.28})
    auc = {(r["row"], float(r["rate"]), r["side"]): float(r["auc_mean"])
           for r in _read_csv(root / "report" / "edge_auc.csv")}
    assert auc[("GRCN", 0.2, "user_side")] == pytest.approx(0.8) and ("GRCN", 0.0, "mean") not in auc
    assert auc[("GRCN", 0.2, "relative")] == pytest.approx(0.9)
    relative = (root / "report" / "edge_auc_relative.md").read_text()
    assert "within neighbourhoods" in relative and "0.900" in relative
    text = path.read_text()
    assert "RuntimeError: boom" in text and "1 failed" in text
    assert "abc123" in text  # the environment's git commit
    fig3 = {(r["row"], int(r["T"])) for r in _read_csv(root / "report" / "fig3.csv")}
    assert fig3 == {("GRCN", 0), ("GRCN", 1), ("GRCN", 2), ("GRCN-ID", 3)}


def test_sections_appear_only_for_groups_with_results(tmp_path):
    store = ResultStore(tmp_path)
    cells = [Cell("mf", DATASET, settings(1e-3), label="BPR-MF"), Cell("gat", DATASET, settings(1e-3), label="GAT")]
    for k, cell in enumerate(cells):
        write_cell(store, cell, val_recall=0.2, test_recall=0.1 + 0.1 * k)
    write_experiment(store, cells, popularity=False)
    text = write_report(tmp_path).read_text()
    assert "## Table 2" in text and "## Training curves" in text
    for absent in ("Table 3", "Figure 3", "Figure 4", "Noise", "Protocol audit", "%Improv."):
        assert absent not in text, absent
    assert "| GAT " in text.split("| BPR-MF ")[0]  # the paper's rows first, extra rows after


def test_popularity_row_is_skipped_with_a_reason_when_the_dataset_cannot_be_loaded(tmp_path):
    store = ResultStore(tmp_path)
    cell = Cell("mf", str(tmp_path / "no-such-dataset"), settings(1e-3), label="BPR-MF")
    write_cell(store, cell, val_recall=0.2, test_recall=0.1)
    write_experiment(store, [cell])
    text = write_report(tmp_path).read_text()
    assert "Popularity row of" in text and "skipped" in text


# -------------------------------------------------------------------------------------------------------------
# Figure functions


def test_tsne_figure_draws_one_star_per_chosen_user_and_one_line_per_training_edge(tmp_path):
    dataset = FakeDataset()
    indptr, items = dataset.user_items("train")
    users = choose_users(indptr, count=4, seed=3)
    neighbourhood = Neighbourhood.build(users, indptr, items)
    rng = np.random.default_rng(0)
    panels = [(name, rng.normal(size=(NUM_USERS, 8)), rng.normal(size=(NUM_ITEMS, 8))) for name in ("GAT", "GRCN")]
    figure = tsne_figure(panels, neighbourhood, seed=0)
    for ax in figure.axes:
        stars = [c for c in ax.collections if c.get_gid() == "user-star"]
        assert len(stars) == 4 and all(len(c.get_offsets()) == 1 for c in stars)
        (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        assert len(lines.get_segments()) == 4 * 6
    assert [ax.get_title() for ax in figure.axes] == ["GAT", "GRCN"]
    paths = save_figure(figure, tmp_path / "tsne")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)


def test_choose_users_is_seeded_and_respects_the_item_bounds():
    indptr = np.cumsum([0] + [1, 3, 30, 5, 2, 4, 8, 3])  # degrees of users 0..7
    chosen = choose_users(indptr, count=3, seed=7, min_items=3, max_items=25)
    assert chosen.tolist() == choose_users(indptr, count=3, seed=7, min_items=3, max_items=25).tolist()
    assert set(chosen.tolist()) <= {1, 3, 5, 6, 7} and len(chosen) == 3
    assert len(choose_users(indptr, count=8, seed=0)) == 8  # too few in bounds: any user with items
    with pytest.raises(ValueError, match="no user"):
        choose_users(np.zeros(4, dtype=np.int64))


def test_grcn_embeddings_keep_only_the_graph_id_block():
    assert id_columns("grcn", {}, 256) == slice(0, 64)
    assert id_columns("grcn", {"embedding_dim": 32}, 128) == slice(0, 32)
    assert id_columns("gat", {}, 64) == slice(0, 64)


def test_noise_rate_comes_from_the_card_else_the_spec():
    assert noise_rate("synthetic:tiktok", {"parameters": {"noise": 0.2}}) == 0.2
    assert noise_rate("some/dir?noise=0.4", None) == 0.4
    assert noise_rate("some/dir", {"parameters": {}}) is None
    assert base_dataset("synthetic:tiktok?users=50&noise=0.1") == "synthetic:tiktok?users=50"
    assert base_dataset("synthetic:tiktok?noise=0.1") == "synthetic:tiktok"


def test_figure_functions_refuse_an_empty_selection():
    for make in (routing_figure, training_curves_figure, noise_figure):
        with pytest.raises(ValueError, match="no usable"):
            make([])
    assert edge_auc_table([]) is None


def test_an_empty_results_directory_gives_a_short_report_and_a_missing_one_an_error(tmp_path):
    text = write_report(tmp_path).read_text()
    assert "No cell was requested" in text and "## Table 2" not in text
    assert (tmp_path / "report.html").is_file()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")
