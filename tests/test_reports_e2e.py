"""End to end: a tiny experiment covering every report group, run through the command line, then its report."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from grcn_bench.benchmarks.cli import main
from grcn_bench.benchmarks.reference import popularity_result
from grcn_bench.benchmarks.store import ResultStore
from grcn_bench.datasets import load_dataset

EXPERIMENT = """
name = "e2e"
datasets = ["synthetic:tiny"]
seeds = [0]
lr = [1e-2]
reg = [1e-4]

[train]
max_epochs = 2
patience = 2

[[models]]
name = "gat"
label = "GAT"

[[models]]
name = "grcn"
label = "GRCN"

[[models]]
name = "grcn"
label = "Visual"
group = "table3"
options = { modalities = ["v"] }

[[models]]
name = "grcn"
label = "GRCN"
group = "table3"

[[models]]
name = "grcn"
label = "GRCN"
group = "fig3"
sweep = { routing_iterations = [0, 1] }

[[models]]
name = "gat"
label = "GAT"
group = "fig4"

[[models]]
name = "grcn"
label = "GRCN"
group = "fig4"

[[models]]
name = "grcn"
label = "GRCN"
group = "noise"
datasets = ["synthetic:tiny?noise=0.0", "synthetic:tiny"]

[[models]]
name = "grcn"
label = "GRCN"
group = "audit"

[[models]]
name = "grcn"
label = "GRCN"
group = "audit"
train = { protocol = "official-grcn" }
"""


def _csv(path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as handle:
        return {(r["row"], r["metric"]): r for r in csv.DictReader(handle) if r.get("source", "ours") == "ours"}


def test_cli_run_writes_a_report_whose_tables_match_the_stored_results(tmp_path, capsys):
    toml = tmp_path / "e2e.toml"
    toml.write_text(EXPERIMENT)
    out = tmp_path / "results"
    # `run` then `report DIR` (what `run` does at its end; written once here to keep the test short).
    assert main(["run", str(toml), "--out", str(out), "--no-progress", "--no-report"]) == 0
    assert not (out / "report.md").exists()
    assert main(["report", str(out)]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    store = ResultStore(out)
    assert len(store.cell_ids()) == 7  # shared cells ran once: GAT, GRCN, Visual, T=0, T=1, noise 0, official
    requested = json.loads((out / "experiment.json").read_text())["cells"]

    def stored(label: str, group: str, **match) -> dict:
        (cell,) = [c for c in requested if c["label"] == label and c["group"] == group
                   and all(c["options"].get(k) == v for k, v in match.items())]
        return store.read(cell["cell_id"])

    table2 = _csv(out / "report" / "table2.csv")
    for label in ("GAT", "GRCN"):
        result = stored(label, "table2")
        assert result["status"] == "ok"
        for metric in ("precision@10", "recall@10", "ndcg@10"):
            assert float(table2[(label, metric)]["mean"]) == pytest.approx(result["test_metrics"][metric])
    # The Popularity reference row is the popularity ranking of the same test split.
    popularity = popularity_result(load_dataset("synthetic:tiny"), "test", ks=(10,)).mean()
    assert float(table2[("Popularity", "recall@10")]["mean"]) == pytest.approx(popularity["recall@10"])
    table3 = _csv(out / "report" / "table3.csv")
    assert float(table3[("Visual", "ndcg@10")]["mean"]) == pytest.approx(
        stored("Visual", "table3")["test_metrics"]["ndcg@10"])
    with open(out / "report" / "audit.csv", newline="") as handle:
        audit = {r["metric"]: r for r in csv.DictReader(handle)}
    official = [store.read(c["cell_id"]) for c in requested if c["settings"]["protocol"] == "official-grcn"][0]
    assert float(audit["recall@10"]["official_grcn"]) == pytest.approx(official["test_metrics"]["recall@10"])

    text = (out / "report.md").read_text()
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    for k, start in enumerate(("Table 2", "Table 3", "Figure 3", "Figure 4", "Noise robustness", "Protocol audit")):
        assert headings[k].startswith(start), headings
    grcn = stored("GRCN", "table2")["test_metrics"]["recall@10"]
    assert f"{grcn:.4f}" in next(line for line in text.splitlines() if line.startswith("| GRCN "))
    for name in ("fig3", "fig4", "noise", "training_curves"):
        assert (out / "report" / f"{name}.png").stat().st_size > 5000, name
        assert (out / "report" / f"{name}.pdf").is_file()
    arrays = store.read_arrays(stored("GRCN", "fig4")["cell_id"])
    assert arrays["user_embedding"].shape[0] == 60 and np.isfinite(arrays["item_embedding"]).all()
    # Only the ID part of GRCN's e || u_v || u_a || u_t (Eq. 10) is stored: the rest is 3x more and nothing reads it.
    width = stored("GRCN", "fig4")["cell"]["options"].get("embedding_dim", 64)
    assert arrays["user_embedding"].shape[1] == arrays["item_embedding"].shape[1] == width
    assert (out / "report.html").read_text().count("<img ") == 4
