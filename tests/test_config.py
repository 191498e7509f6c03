"""Experiments expand into cells with deterministic ids; settings are validated."""

from __future__ import annotations

import dataclasses

import pytest

from grcn_bench.benchmarks.config import (
    Cell,
    Experiment,
    ModelEntry,
    TrainSettings,
    available_experiments,
    experiment_from_dict,
    load_experiment,
)
from grcn_bench.models import get_model, register_model, unregister_model
from grcn_bench.models.mf import MF


def test_cell_id_is_deterministic_and_sensitive_to_every_field():
    base = Cell("grcn", "synthetic:tiny", TrainSettings(lr=1e-3, reg_weight=1e-4, seed=0), {"fusion": "max"})
    same = Cell("grcn", "synthetic:tiny", TrainSettings(lr=1e-3, reg_weight=1e-4, seed=0), {"fusion": "max"})
    assert base.cell_id == same.cell_id
    variants = [
        Cell("mf", "synthetic:tiny", base.settings, base.options),
        Cell("grcn", "synthetic:kwai", base.settings, base.options),
        Cell("grcn", "synthetic:tiny", TrainSettings(lr=1e-2, reg_weight=1e-4), base.options),
        Cell("grcn", "synthetic:tiny", TrainSettings(lr=1e-3, reg_weight=1e-4, seed=1), base.options),
        Cell("grcn", "synthetic:tiny", TrainSettings(lr=1e-3, reg_weight=1e-4, patience=5), base.options),
        Cell("grcn", "synthetic:tiny", base.settings, {"fusion": "mean"}),
    ]
    ids = {v.cell_id for v in variants}
    assert len(ids) == len(variants) and base.cell_id not in ids
    # The label is presentation only: it does not change the identity.
    assert Cell("grcn", "synthetic:tiny", base.settings, base.options, label="GRCN_max").cell_id == base.cell_id


def test_a_models_revision_is_part_of_its_cells_identity():
    """Results of a model whose revision was bumped (a default changed) are other cells; a model at revision 0 keeps
    the ids it had before revisions existed (pinned: computed by the code before them)."""
    settings = TrainSettings()
    assert Cell("mf", "synthetic:tiny", settings).cell_id == "mf-synthetic-tiny-s0-309eb8e1a949"
    assert "revision" not in Cell("mf", "synthetic:tiny", settings).canonical()
    # DisenGCN's revision 1 (the item bias became its default): before it, this cell was ...-30b88fb1dc1b.
    disen = Cell("disengcn", "synthetic:tiny", settings)
    assert disen.canonical()["revision"] == get_model("disengcn").revision == 1
    assert disen.cell_id != "disengcn-synthetic-tiny-s0-30b88fb1dc1b"
    assert Cell.from_dict(disen.to_dict()).cell_id == disen.cell_id

    class Bumped(MF):
        revision = 2

    register_model("bumped-mf")(Bumped)
    try:
        bumped = Cell("bumped-mf", "synthetic:tiny", settings)
        assert bumped.canonical()["revision"] == 2
        before = bumped.cell_id
        Bumped.revision = 3
        assert bumped.cell_id != before
    finally:
        unregister_model("bumped-mf")
    assert "revision" not in bumped.canonical()  # not registered (any more): no revision


def test_cell_round_trips_through_its_dict():
    cell = Cell("grcn", "synthetic:tiny", TrainSettings(ks=(20, 10)), {"modalities": ["v"]}, "Visual")
    again = Cell.from_dict(cell.to_dict())
    assert again == cell and again.cell_id == cell.cell_id


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr": 0}, "lr"), ({"reg_weight": -1}, "reg_weight"), ({"ks": (5, 20)}, "ks must include 10"),
     ({"protocol": "mine"}, "unknown protocol"), ({"patience": 0}, "patience")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**kwargs)


def test_experiment_expands_grid_sweeps_and_dataset_filters():
    experiment = Experiment(
        name="x",
        models=(
            ModelEntry("mf", "MF"),
            ModelEntry("grcn", "GRCN-T", sweep={"routing_iterations": [0, 1, 2]}),
            ModelEntry("grcn", "Acoustic", {"modalities": ["a"]}, datasets=("synthetic:tiktok",), group="table3"),
            ModelEntry("mf", "MF", datasets=("synthetic:tiny",), group="audit", train={"protocol": "official-grcn"}),
        ),
        datasets=("synthetic:tiktok", "synthetic:kwai"),
        seeds=(0, 1),
        lr=(1e-3, 1e-2),
        reg=(1e-4,),
        train={"max_epochs": 5},
    )
    cells = experiment.cells()
    assert len(cells) == 2 * 2 * 2 + 3 * 2 * 2 * 2 + 1 * 2 * 2 + 1 * 2 * 2
    assert {c.options.get("routing_iterations") for c in cells if c.label == "GRCN-T"} == {0, 1, 2}
    assert {c.dataset for c in cells if c.label == "Acoustic"} == {"synthetic:tiktok"}
    assert {c.group for c in cells if c.label == "Acoustic"} == {"table3"}
    audit = [c for c in cells if c.group == "audit"]
    assert {c.settings.protocol for c in audit} == {"official-grcn"}
    assert {c.dataset for c in audit} == {"synthetic:tiny"}
    assert {c.settings.protocol for c in cells if c.group != "audit"} == {"standard"}
    assert all(c.settings.max_epochs == 5 for c in cells)
    assert len({c.cell_id for c in cells}) == len(cells)


def test_overrides_replace_grid_and_filter_models():
    experiment = Experiment(name="x", models=(ModelEntry("mf", "MF"), ModelEntry("grcn", "GRCN")),
                            datasets=("synthetic:tiny",))
    changed = experiment.override(models=["GRCN", "gat"], seeds=[3, 4], lr=[0.1], train={"max_epochs": 2,
                                                                                        "patience": None})
    assert [m.label for m in changed.models] == ["GRCN", "gat"]
    cells = changed.cells()
    assert {c.settings.seed for c in cells} == {3, 4} and {c.settings.lr for c in cells} == {0.1}
    assert all(c.settings.max_epochs == 2 and c.settings.patience == 20 for c in cells)
    # The description, which reports print above the tables, says what the command line changed.
    assert changed.description == "[command line: models GRCN gat; seeds 3 4; lr 0.1; max_epochs 2]"
    described = dataclasses.replace(experiment, description="Table 2: 3 presets").override(datasets=["/data/tiktok"])
    assert described.description == "Table 2: 3 presets [command line: datasets /data/tiktok]"
    assert experiment.override().description == experiment.description == ""
    searched = experiment.override(search={"method": "halving", "selection_seeds": 1, "eta": None})
    assert searched.description == "[command line: search halving; selection_seeds 1]"


def test_every_shipped_preset_loads_and_expands():
    names = available_experiments()
    assert "quick" in names
    for name in names:
        assert load_experiment(name).cells(), name


@pytest.mark.parametrize(
    "data, message",
    [({"datasets": ["a"]}, "models is required"), ({"models": [{"name": "mf"}]}, "datasets is required"),
     ({"models": [{"name": "mf"}], "datasets": ["a"], "sedes": [1]}, "unknown key 'sedes'"),
     ({"models": [{"label": "x"}], "datasets": ["a"]}, r"models\[0\]\.name is required")],
)
def test_malformed_experiments_say_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(data, name="bad")


def test_unknown_preset_lists_the_known_ones(tmp_path):
    with pytest.raises(KeyError, match="quick"):
        load_experiment("no-such-preset")
    bad = tmp_path / "bad.toml"
    bad.write_text("models = [")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_experiment(str(bad))


def test_cli_without_a_command_runs_quick_and_takes_run_options(tmp_path, capsys):
    from grcn_bench.benchmarks.cli import main

    # `run_benchmarks.py --out DIR --dry-run` is `run --out DIR --dry-run`: the quick preset, 50 distinct cells.
    assert main(["--dry-run", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    cells = [line for line in captured.out.splitlines() if not line.startswith("#")]
    assert len(cells) == 50 and "50 cells in the next round" in captured.err
    assert all("  run  " in line for line in cells)  # exhaustive grid: no rungs
    assert main(["-v", "--dry-run", "--out", str(tmp_path)]) == 0  # a global flag first, then run's options
    assert "50 cells" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-v", "run"], ["run", "-v"], ["run"]])
def test_verbose_is_accepted_before_and_after_run(argv):
    from grcn_bench.benchmarks.cli import build_parser

    args = build_parser().parse_args([*argv, "--dry-run"])
    assert args.command == "run" and args.verbose == ("-v" in argv)
