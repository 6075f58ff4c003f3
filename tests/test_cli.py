"""The command-line contract: clear refusals before any work, exit codes that mean something."""

from __future__ import annotations

import json

import pytest

from encoderflow import cli
from encoderflow.config import ConfigError, from_params


def test_config_prints_resolved_values(capsys):
    assert cli.main(["config", "--preset", "smoke", "--set", "model.num_layers=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "smoke" and out["model"]["num_layers"] == 2 and len(out["config_hash"]) == 64


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.layers=2", "model.layers"),
        ("model.num_layers=two", "model.num_layers"),
        ("pretrain.learning_rate=-1", "pretrain.learning_rate"),
        ("nosection", "nosection"),
    ],
)
def test_bad_override_is_refused_naming_the_key(override, named, capsys):
    assert cli.main(["config", "--set", override]) == 2
    assert named in capsys.readouterr().err


def test_run_refuses_a_bad_override_before_starting_airflow(capsys):
    assert cli.main(["run", "--preset", "smoke", "--set", "data.mask_rate=1.5"]) == 2
    err = capsys.readouterr().err
    assert "data.mask_rate" in err


def test_validate_names_the_missing_offline_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["validate", "--preset", "smoke", "--data-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "SST-2/train.tsv" in err


def test_predict_without_champion_says_so(capsys):
    assert cli.main(["predict", "a fine film"]) == 2
    assert "no champion yet" in capsys.readouterr().err


def test_dag_params_become_config_values():
    cfg = from_params(
        {
            "preset": "smoke",
            "pretrain_epochs": 3,
            "gate_min_accuracy": 0.6,
            "finetune_learning_rate": None,
            "overrides": ["model.num_heads=4"],
        }
    )
    assert cfg.pretrain.epochs == 3 and cfg.gate.min_accuracy == 0.6 and cfg.model.num_heads == 4
    assert cfg.finetune.learning_rate == 1e-3  # None keeps the preset's value
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        from_params({"preset": "smoke", "pretrain_epochs": 0})


def test_validate_passes_offline_without_a_train_split_and_fails_on_bad_data(tmp_path, capsys):
    from tests.fixtures_pipeline import write_tree

    tree = write_tree(tmp_path / "data")
    (tree / "wikitext-103-raw" / "wiki.train.raw").unlink()
    assert cli.main(["validate", "--preset", "smoke", "--data-dir", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "wiki.train.raw not in" in out and "all datasets passed" in out

    dev = tree / "SST-2" / "dev.tsv"
    dev.write_text(dev.read_text().replace("\t1\n", "\t2\n", 1))
    assert cli.main(["validate", "--preset", "smoke", "--data-dir", str(tree)]) == 1
    out = capsys.readouterr().out
    assert f"sst2: {dev}: expect_column_values_to_be_in_set(column='label'" in out
    assert "validate: FAILED" in out
