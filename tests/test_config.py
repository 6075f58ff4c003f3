"""Config presets, overrides, validation, immutability and hashing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from encoderflow.config import Config, ConfigError, from_dict, from_overrides, keys, knobs, parse_set


def test_guide_preset_is_the_guides_hyperparameters():
    cfg = from_overrides("guide")
    d, m, pt, ft = cfg.data, cfg.model, cfg.pretrain, cfg.finetune
    assert (d.seq_length, d.mask_rate, d.predictions_per_seq) == (128, 0.25, 32)
    assert d.min_line_chars == 100  # the guide keeps lines with tf.strings.length(x) > 100
    assert (m.num_layers, m.model_dim, m.intermediate_dim, m.num_heads) == (3, 256, 512, 4)
    assert (m.dropout, m.norm_epsilon) == (0.1, 1e-5)
    assert (pt.learning_rate, pt.batch_size, pt.epochs) == (5e-4, 128, 8)
    assert (ft.learning_rate, ft.batch_size, ft.epochs) == (5e-5, 32, 3)
    # The guide trains on the full splits, uncapped.
    assert pt.steps_per_epoch == pt.validation_steps == ft.steps_per_epoch == 0
    assert (d.pretrain_split, d.validation_split) == ("train", "valid")
    assert cfg.preset == "guide" and cfg == Config()


def test_smoke_preset_is_tiny_and_offline():
    s, g = from_overrides("smoke"), from_overrides("guide")
    assert s.preset == "smoke"
    assert s.data.seq_length <= 32 and s.data.predictions_per_seq < g.data.predictions_per_seq
    assert s.model.num_layers == 1 and s.model.model_dim <= 64 and s.model.intermediate_dim <= 128
    assert s.data.num_shards < g.data.num_shards
    # Bounded work: every loop is capped, and WikiText's train split is not needed offline.
    assert 0 < s.pretrain.steps_per_epoch <= 1000 and 0 < s.pretrain.validation_steps <= 100
    assert 0 < s.finetune.steps_per_epoch <= 1000
    assert s.pretrain.epochs <= 2 and s.finetune.epochs <= 2
    assert s.data.pretrain_split == "test"
    # Values the smoke preset does not mention stay the guide's.
    assert s.data.mask_rate == g.data.mask_rate and s.model.dropout == g.model.dropout


def test_overrides_from_strings_are_coerced():
    cfg = from_overrides(
        "guide",
        {
            "data.seq_length": " 64 ",
            "pretrain.learning_rate": "1e-3",
            "model.padding_mask": "false",
            "data.lowercase": "Yes",
            "gate.registered_model": " my-model ",
            "data.pretrain_split": "test",
        },
    )
    assert cfg.data.seq_length == 64 and type(cfg.data.seq_length) is int
    assert cfg.pretrain.learning_rate == 1e-3 and type(cfg.pretrain.learning_rate) is float
    assert cfg.model.padding_mask is False and cfg.data.lowercase is True
    assert cfg.gate.registered_model == "my-model"
    assert cfg.data.pretrain_split == "test"
    # Only the named values moved.
    assert dataclasses.replace(cfg.data, seq_length=128, lowercase=True, pretrain_split="train") == Config().data


def test_overrides_from_typed_values():
    cfg = from_overrides(
        "smoke",
        {"data.seq_length": 64, "pretrain.learning_rate": 1, "model.padding_mask": False, "gate.max_regression": 0.02},
    )
    assert cfg.data.seq_length == 64
    # An int where a float is wanted is widened (a DAG Param of 1 means 1.0).
    assert cfg.pretrain.learning_rate == 1.0 and type(cfg.pretrain.learning_rate) is float
    assert cfg.model.padding_mask is False and cfg.gate.max_regression == 0.02
    assert cfg.preset == "smoke" and cfg.model.num_layers == 1


@pytest.mark.parametrize("key", keys())
def test_every_key_accepts_its_own_value_as_a_string(key):
    section, name = key.split(".")
    value = getattr(getattr(Config(), section), name)
    assert from_overrides("guide", {key: str(value)}) == Config()


def test_none_overrides_are_skipped():
    assert from_overrides("smoke", {"data.seq_length": None, "pretrain.learning_rate": None}) == from_overrides("smoke")


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"nosuch.seq_length": 1}, "nosuch.seq_length"),
        ({"seq_length": 1}, "seq_length"),
        ({"data.nosuch": 1}, "data.nosuch"),
        ({"data.seq_length": "abc"}, "data.seq_length"),
        ({"data.seq_length": "1.5"}, "data.seq_length"),
        ({"data.seq_length": 1.5}, "data.seq_length"),
        ({"data.seq_length": True}, "data.seq_length"),
        ({"model.padding_mask": "maybe"}, "model.padding_mask"),
        ({"model.padding_mask": 1}, "model.padding_mask"),
        ({"gate.registered_model": 5}, "gate.registered_model"),
        ({"pretrain.learning_rate": "fast"}, "pretrain.learning_rate"),
        ({"pretrain.learning_rate": -1e-4}, "pretrain.learning_rate"),
        ({"pretrain.learning_rate": 0}, "pretrain.learning_rate"),
        ({"finetune.learning_rate": "nan"}, "finetune.learning_rate"),
        ({"pretrain.learning_rate": "inf"}, "pretrain.learning_rate"),
        ({"data.mask_rate": 1.5}, "data.mask_rate"),
        ({"data.mask_rate": 0.0}, "data.mask_rate"),
        ({"model.num_heads": 3}, "model.num_heads"),
        ({"data.predictions_per_seq": 129}, "data.predictions_per_seq"),
        ({"data.seq_length": 16}, "data.predictions_per_seq"),  # 32 predictions no longer fit
        ({"data.seed": -1}, "data.seed"),
        ({"data.pretrain_split": "training"}, "data.pretrain_split"),
        # MLM accuracy measured on the pretraining text itself (the smoke preset pretrains on test)
        ({"data.pretrain_split": "test", "data.validation_split": "test"}, "data.validation_split"),
        ({"data.pretrain_split": "valid"}, "data.validation_split"),
        ({"gate.min_accuracy": 1.01}, "gate.min_accuracy"),
        ({"gate.registered_model": "a/b"}, "gate.registered_model"),
        ({"pretrain.batch_size": 0}, "pretrain.batch_size"),
    ],
)
def test_invalid_overrides_raise_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        from_overrides("guide", overrides)


def test_an_accuracy_given_in_percent_is_told_it_is_a_fraction():
    with pytest.raises(
        ConfigError, match=r"'gate.min_accuracy': must be <= 1.0, got 80.0 \(a fraction: 0.8 for 80%\)$"
    ):
        from_overrides("guide", {"gate.min_accuracy": "80"})
    with pytest.raises(ConfigError, match=r"must be >= -1.0, got -5.0 \(a fraction: -0.05 for -5%\)$"):
        from_overrides("guide", {"gate.min_gain_over_baseline": "-5"})
    with pytest.raises(ConfigError, match=r"must be <= 1.0, got 150.0$"):  # no percentage either
        from_overrides("guide", {"gate.min_accuracy": "150"})


def test_valid_edges_are_accepted():
    cfg = from_overrides(
        "guide",
        {"data.mask_rate": 1.0, "data.predictions_per_seq": 128, "model.num_heads": 8, "gate.max_regression": 0.0},
    )
    assert (cfg.data.mask_rate, cfg.data.predictions_per_seq, cfg.model.num_heads) == (1.0, 128, 8)


def test_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match="'preset'.*guide.*smoke"):
        from_overrides("huge")
    with pytest.raises(ConfigError, match="'preset'"):
        Config(preset="huge")


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="'model.num_heads'"):
        Config(model=dataclasses.replace(Config().model, num_heads=5))


def test_a_whole_number_written_as_a_float_sets_an_int_and_a_fraction_is_refused():
    # The form and REST clients send 2.0 for 2; --set takes the same spelling.
    cfg = from_overrides("smoke", {"pretrain.epochs": "2.0", "data.seq_length": "1e2"})
    assert cfg.pretrain.epochs == 2 and type(cfg.pretrain.epochs) is int and cfg.data.seq_length == 100
    with pytest.raises(ConfigError, match=r"'pretrain.epochs': expected int, got '2.5'"):
        from_overrides("smoke", {"pretrain.epochs": "2.5"})


def test_parse_set():
    assert parse_set(["data.seq_length=64", " gate.registered_model =a=b", "data.seed="]) == {
        "data.seq_length": "64",
        "gate.registered_model": "a=b",
        "data.seed": "",
    }
    assert from_overrides("guide", parse_set(["data.seq_length=64"])).data.seq_length == 64
    for bad in ("data.seq_length", "=64", " =64"):
        with pytest.raises(ConfigError, match="expected section.key=value"):
            parse_set([bad])
    # A key given twice: the last wins, as a wrapper adding its defaults before a person's values needs
    # (check_params logs the value the run resolved to).
    assert parse_set(["model.num_layers=1", "model.num_layers=2"]) == {"model.num_layers": "2"}


def test_config_is_frozen():
    cfg = from_overrides("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.seq_length = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data = Config().data


def test_config_hash_is_stable_and_sensitive():
    a = from_overrides("guide", {"data.seed": 7, "model.dropout": 0.2})
    b = from_overrides("guide", {"model.dropout": "0.2", "data.seed": "7"})
    h = a.config_hash()
    assert len(h) == 64 and int(h, 16) >= 0
    assert h == a.config_hash() == b.config_hash()
    assert from_overrides("guide", {"data.seed": 8, "model.dropout": 0.2}).config_hash() != h
    assert from_overrides("guide", {"data.seed": 7, "model.dropout": 0.2, "gate.min_accuracy": 0.81}).config_hash() != h
    # Section hashes isolate what a consumer depends on: the model does not move the data hash.
    assert a.section_hash("data") == from_overrides("guide", {"data.seed": 7}).section_hash("data")
    assert a.section_hash("model") != Config().section_hash("model")
    # What a model is trained from leaves the gate out; every other section moves it.
    gated = from_overrides("guide", {"data.seed": 7, "model.dropout": 0.2, "gate.min_accuracy": 0.81})
    assert gated.training_hash() == a.training_hash() != Config().training_hash()
    assert from_overrides("guide", {"data.seed": 7, "model.dropout": 0.2, "finetune.epochs": 9}).training_hash() != (
        a.training_hash()
    )
    # So do the baseline (what a candidate must beat) and the settings declared trains=False: when
    # the host looks. Another run on them alone would copy the champion.
    housekeeping = {
        "pretrain.log_every_seconds": 30,
        "pretrain.backup_every_steps": 100,
        "pretrain.steps_per_execution": 4,
        "baseline.epochs": 9,
    }
    assert from_overrides("guide", {"data.seed": 7, "model.dropout": 0.2, **housekeeping}).training_hash() == (
        a.training_hash()
    )
    assert {k.key for k in knobs() if not k.trains} == set(housekeeping) - {"baseline.epochs"}
    # A tightened validation threshold is not housekeeping: the run validates the data again.
    for changed in ({"inputs.vocab_size": 999}, {"inputs.max_dev_in_train_share": 0.05}):
        assert from_overrides("guide", {"data.seed": 7, "model.dropout": 0.2, **changed}).training_hash() != (
            a.training_hash()
        )
    assert a.section_hash() == h


def test_from_dict_round_trips_through_json():
    cfg = from_overrides("smoke", {"data.seed": 3, "model.padding_mask": False, "gate.max_regression": 0.01})
    again = from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.preset == "smoke" and again.config_hash() == cfg.config_hash()
    assert from_dict(Config().to_dict()) == Config()


def test_from_dict_refuses_incomplete_unknown_or_invalid_records():
    payload = from_overrides("smoke").to_dict()
    with pytest.raises(ConfigError, match="incomplete or has unknown keys"):
        from_dict({k: v for k, v in payload.items() if k != "model"})
    with pytest.raises(ConfigError, match="incomplete or has unknown keys"):
        from_dict({**payload, "data": {**payload["data"], "vocab": "x"}})
    with pytest.raises(ConfigError, match="'data.mask_rate'"):
        from_dict({**payload, "data": {**payload["data"], "mask_rate": 2.0}})


def test_keys_lists_every_field():
    ks = keys()
    assert len(ks) == len(set(ks))
    assert {"data.seq_length", "model.padding_mask", "pretrain.steps_per_epoch", "gate.registered_model"} <= set(ks)
    assert all(k.split(".")[0] in Config().to_dict() for k in ks)


@pytest.mark.parametrize(
    "key, value",
    [("pretrain.precision", "float8"), ("pretrain.lr_schedule", "linear"), ("pretrain.warmup_ratio", "0.95")],
)
def test_training_options_are_validated(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_overrides("guide", {key: value})


def test_training_options_defaults_keep_the_guide():
    cfg = from_overrides("guide")
    assert (cfg.pretrain.precision, cfg.pretrain.lr_schedule) == ("auto", "constant")


def test_gate_noise_knobs_round_trip_through_the_form_the_cli_and_records():
    from encoderflow import airflow_adapter, config

    # Off by default in both presets: the raw comparison stays the rule unless asked.
    assert from_overrides("guide").gate.require_significant_gain is False
    assert from_overrides("smoke").gate.require_significant_gain is False
    assert from_overrides("guide").gate.bootstrap_resamples == 2000
    # The trigger form: a boolean field in the gate's section, mapped back to its key.
    param = airflow_adapter.params()["gate_require_significant_gain"]
    assert param.schema["type"] == ["null", "boolean"] and param.schema["section"] == config.GATE
    assert config.param_keys()["gate_require_significant_gain"] == "gate.require_significant_gain"
    cfg = config.from_params({"preset": "smoke", "gate_require_significant_gain": True})
    assert cfg.gate.require_significant_gain is True
    assert (
        config.from_params({"preset": "smoke", "gate_require_significant_gain": None}).gate
        == from_overrides("smoke").gate
    )
    # The resamples are set through "Other overrides" / --set, within their bounds.
    cfg = config.from_params({"preset": "guide", "overrides": ["gate.bootstrap_resamples=500"]})
    assert cfg.gate.bootstrap_resamples == 500
    assert from_overrides("guide", parse_set(["gate.require_significant_gain=true"])).gate.require_significant_gain
    for bad in ("100", "200000"):
        with pytest.raises(ConfigError, match="'gate.bootstrap_resamples': must be"):
            from_overrides("guide", {"gate.bootstrap_resamples": bad})
    with pytest.raises(ConfigError, match="'gate.require_significant_gain': expected bool"):
        from_overrides("guide", {"gate.require_significant_gain": 1})
    # A recorded config (MLflow params, bundle.json) rebuilds with both.
    cfg = from_overrides("smoke", {"gate.require_significant_gain": True, "gate.bootstrap_resamples": 300})
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_data_file_declares_sources_and_inputs_and_the_form_wins(tmp_path):
    from encoderflow.config import ConfigError, Sources, from_params, read_data_file

    folder = tmp_path / "repo"
    folder.mkdir()
    path = folder / "data.yaml"
    path.write_text(
        "corpus: corpus/\nlabeled: https://data.example/tickets\n"
        "inputs:\n  text_column: body\n  label_column: category\n  vocab: trained\ndata: {seq_length: 64}\n"
    )
    sources, overrides = read_data_file(str(path))
    assert sources == {"corpus": str(folder / "corpus"), "labeled": "https://data.example/tickets"}
    assert overrides == {
        "inputs.text_column": "body",
        "inputs.label_column": "category",
        "inputs.vocab": "trained",
        "data.seq_length": 64,
    }
    params = {"preset": "smoke", "data_file": str(path), "inputs_label_column": "topic"}
    cfg = from_params(params)
    assert (cfg.inputs.text_column, cfg.inputs.label_column, cfg.inputs.vocab) == ("body", "topic", "trained")
    assert cfg.data.seq_length == 64
    src = Sources.from_params({**params, "labeled": "/elsewhere"})
    assert src.custom() == {"corpus": str(folder / "corpus"), "labeled": "/elsewhere"}
    path.write_text("corpra: corpus/\n")
    with pytest.raises(ConfigError, match=r"data file .*data\.yaml: unknown top-level key 'corpra'"):
        read_data_file(str(path))
    path.write_text("inputs: {text_colum: body}\n")
    with pytest.raises(ConfigError, match=r"data file .*data\.yaml: section 'inputs' has no keys \['text_colum'\]"):
        from_params({"data_file": str(path)})
    path.write_text("corpus:\nlabeled: tickets/\n")  # the folder left out
    with pytest.raises(ConfigError, match=r"data file .*data\.yaml: 'corpus' needs a folder, file or URL, got None"):
        read_data_file(str(path))
    with pytest.raises(ConfigError, match=r"data file .*missing\.yaml: no such file; fix: give --data-file"):
        read_data_file(str(tmp_path / "missing.yaml"))
    # Another file named by mistake (or on purpose): where it is not YAML, never its text, which reaches
    # failure.json and the runs page every viewer reads.
    path.write_text("[core]\nsql_alchemy_conn = postgresql://airflow:hunter2@db/airflow\nx = {\n")
    with pytest.raises(ConfigError) as err:
        read_data_file(str(path))
    assert "hunter2" not in str(err.value) and "sql_alchemy_conn" not in str(err.value)
    assert str(err.value).startswith(f"data file {path}: cannot read it as YAML or JSON (") and "at line 2" in str(
        err.value
    )
    # Empty or comments only, it used to run the guide's datasets as if no data file were given.
    for nothing in ("", "# corpus: corpus/\n", "{}\n"):
        path.write_text(nothing)
        with pytest.raises(ConfigError, match=r"data file .*data\.yaml: declares nothing; fix: declare your corpus"):
            read_data_file(str(path))
    # Every path it names is taken from its folder, the sources file's too.
    path.write_text("sources_file: sources.json\ndata_dir: offline/\nmirror: https://mirror.example/\n")
    assert read_data_file(str(path))[0] == {
        "sources_file": str(folder / "sources.json"),
        "data_dir": str(folder / "offline"),
        "mirror": "https://mirror.example/",
    }


def test_inputs_rules_name_the_key():
    from encoderflow.config import ConfigError, from_overrides

    with pytest.raises(ConfigError, match="inputs.label_column"):
        from_overrides("smoke", {"inputs.text_column": "x", "inputs.label_column": "x"})
    with pytest.raises(ConfigError, match="inputs.max_class_share"):
        from_overrides("smoke", {"inputs.min_class_share": 0.5, "inputs.max_class_share": 0.4})
