"""Experiment files and command-line numbers are checked at the boundary: every unknown key or wrong type is one line
naming the file, the key and what it expects (the cases the reliability issue found, and more)."""

from __future__ import annotations

import pytest

from grcn_bench.benchmarks import cli
from grcn_bench.benchmarks.config import load_experiment
from grcn_bench.benchmarks.schema import SchemaError

VALID = 'datasets = ["synthetic:tiny"]\n[[models]]\nname = "mf"\n'


@pytest.mark.parametrize("text, message", [
    ('datasets = "synthetic:tiny"\n[[models]]\nname = "mf"\n',
     "datasets must be a non-empty list, got 'synthetic:tiny' (a string)"),
    ("seeds = [0.7]\n" + VALID, "seeds must be a list, each item an integer >= 0, got [0.7] (a list)"),
    ('lr = ["0.01"]\n' + VALID, "lr must be a list, each item a finite number > 0, got ['0.01'] (a list)"),
    ('[train]\nmax_epoch = 3\n', None),  # completed below: an unknown [train] key
    ("reg = [nan]\n" + VALID, "reg must be a list, each item a finite number >= 0"),
    ("seeds = [true]\n" + VALID, "seeds must be a list, each item an integer >= 0"),
    ("sedes = [1]\n" + VALID, "unknown key 'sedes'; expected one of"),
    (VALID + 'train = { protocol = "offical" }\n',
     "models[0].train.protocol must be one of 'standard', 'official-grcn'"),
    (VALID + "sweep = { routing_iterations = 3 }\n", "models[0].sweep.routing_iterations must be a non-empty list"),
    (VALID + 'tuned_from = 1\n', "models[0].tuned_from must be a non-empty string, got 1 (an integer)"),
    ('[search]\nmethod = "random"\n', None),
])
def test_wrong_keys_and_types_are_one_line_naming_file_and_key(tmp_path, text, message):
    if message is None:  # tables after the entries: keep [[models]] before them in the file
        text, message = VALID + text, ("unknown key 'train.max_epoch'" if "train" in text
                                       else "search.method must be one of 'grid', 'halving', got 'random'")
    path = tmp_path / "my.toml"
    path.write_text(text)
    with pytest.raises(SchemaError) as caught:
        load_experiment(str(path))
    assert str(caught.value).startswith(f"experiment file {path}: ") and "\n" not in str(caught.value)
    assert message in str(caught.value)


def test_the_cli_prints_the_line_and_exits_2_before_training(tmp_path, capsys):
    path = tmp_path / "my.toml"
    path.write_text(VALID + '[train]\nmax_epochs = "40"\n')
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: experiment file {path}: train.max_epochs must be an integer >= 1, got '40' (a string)\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (["--reg=-1e-4"], "argument --reg: must be a finite number >= 0, got -1e-4"),
    (["--reg", "inf"], "argument --reg: must be a finite number >= 0"),
    (["--max-epochs", "0"], "argument --max-epochs: must be >= 1, got 0"),
    (["--seeds", "0.7"], "argument --seeds: not an integer: '0.7'"),
    (["--eta", "1"], "argument --eta: must be >= 2, got 1"),
])
def test_cli_numbers_must_be_finite_and_in_range(capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        cli.main(["run", "--models", "mf", "--datasets", "synthetic:tiny", *argv])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_every_shipped_preset_fits_the_schema():
    from grcn_bench.benchmarks.config import available_experiments

    for name in available_experiments():
        load_experiment(name)
