"""steps.check_lineage: train unless data, config and code all equal the champion's; force overrides.
steps.check_source: a watched source of your own changed or not since the last check."""

from __future__ import annotations

import re

import pytest

from encoderflow import bundle, errors, layout, registry, steps
from encoderflow.config import ConfigError, from_params, resolve
from encoderflow.errors import EncoderflowError, cause_of
from tests.test_bundle import fake_bundle

PARAMS = {"preset": "smoke"}
INPUTS = {name: {"content_hash": f"{name}-hash", "source": "offline"} for name in ("corpus", "labeled", "vocab")}


def _champion(tmp_path, tags: dict[str, str], config: dict | None = None, tag: str = "1") -> str:
    decision = {"blessed": True, "reasons": [], "candidate": 0.9, "baseline": 0.8, "champion": None, "checks": []}
    name = from_params(PARAMS).gate.registered_model
    out = registry.log_candidate(name, fake_bundle(tmp_path / "b", tag), config or {}, {}, {}, tags, decision)
    now = registry.champion(name)
    registry.move_champion(name, out["version"], expected=now and now["version"], reason="test", who="test")
    return out["version"]


def test_no_champion_trains_and_an_equal_lineage_is_skipped_with_a_summary(tmp_path, caplog):
    assert steps.check_lineage(INPUTS, PARAMS, "run-a") is True
    assert "no champion" in caplog.text
    version = _champion(tmp_path, steps.lineage_tags(from_params(PARAMS), INPUTS))
    assert steps.check_lineage(INPUTS, PARAMS, "run-b") is False
    summary = layout.read_json(layout.run_dir("run-b") / "summary.json")
    assert summary["unchanged"]["message"] == f"nothing changed since champion v{version}"
    assert summary["metrics"]["champion_val_accuracy"] == 0.9
    assert steps.check_lineage(INPUTS, {**PARAMS, "force": True}, "run-c") is True
    assert not (layout.run_dir("run-c") / "summary.json").exists()


def test_any_changed_value_trains_and_names_it(tmp_path, caplog):
    _champion(tmp_path, steps.lineage_tags(from_params(PARAMS), INPUTS))
    touched = {**INPUTS, "corpus": {**INPUTS["corpus"], "content_hash": "new-text"}}
    assert steps.check_lineage(touched, PARAMS, "run-d") is True
    assert "data.corpus.content_hash" in caplog.text
    assert (layout.run_dir("run-d") / "champion" / "v1" / "bundle.json").exists()  # fetched for the gate, verified
    other_config = {**PARAMS, "overrides": ["pretrain.learning_rate=0.002"]}
    assert steps.check_lineage(INPUTS, other_config, "run-e") is True
    assert "config.training_hash" in caplog.text
    caplog.clear()  # the gate's settings decide promotion, not the model: nothing to train
    stricter = {**PARAMS, "overrides": ["gate.min_accuracy=0.9", "gate.bootstrap_resamples=500"]}
    assert steps.check_lineage(INPUTS, stricter, "run-e2") is False and "nothing changed" in caplog.text
    tags = steps.lineage_tags(from_params(PARAMS), INPUTS)
    assert set(tags) == {
        "data.corpus.content_hash",
        "data.labeled.content_hash",
        "data.vocab.content_hash",
        "config.training_hash",
        "code.hash",
    }
    assert tags["code.hash"] == layout.code_hash() and len(tags["code.hash"]) == 64


def _rejected(tmp_path, inputs, champion: str, params=PARAMS, tag: str = "2", run: str = "run-r") -> dict:
    cfg = from_params(params)
    decision = {
        "blessed": False,
        "reasons": ["regression: candidate 0.8500 is 0.0500 below the champion's 0.9000"],
        "candidate": 0.85,
        "baseline": 0.8,
        "champion": 0.9,
        "checks": [],
        "champion_version": champion,
        "settings_hash": cfg.promotion_hash(),
    }
    root = tmp_path / f"bundle-{tag}"
    if not root.exists():
        fake_bundle(root, tag)
    tags = {**steps.lineage_tags(cfg, inputs), "airflow.run_id": run}
    return registry.log_candidate(cfg.gate.registered_model, root, {}, {}, {}, tags, decision)


def test_a_candidate_rejected_against_this_champion_under_these_settings_is_not_gated_again(tmp_path, caplog):
    """A daily run on data that last produced a rejected candidate reused its pretraining and fine-tuning,
    retrained the baseline, re-scored the champion and listed one more identical NOT BLESSED row."""
    champion = _champion(tmp_path, steps.lineage_tags(from_params(PARAMS), INPUTS))
    landed = {**INPUTS, "labeled": {**INPUTS["labeled"], "content_hash": "more-reviews"}}
    rejected = _rejected(tmp_path, landed, champion)
    caplog.clear()
    assert steps.check_lineage(landed, PARAMS, "run-s") is False
    said = f"nothing changed since v{rejected['version']}, which the gate rejected against champion v{champion}"
    assert said in caplog.text and "regression: candidate 0.8500" in caplog.text
    summary = layout.read_json(layout.run_dir("run-s") / "summary.json")
    assert summary["unchanged"]["rejected_version"] == rejected["version"]
    assert not (layout.run_dir("run-s") / "champion").exists()  # nothing fetched: nothing will be scored
    # What would make the gate judge otherwise, or the user asking: each trains (and gates) again.
    assert steps.check_lineage(landed, {**PARAMS, "force": True}, "run-t") is True
    assert steps.check_lineage(landed, {**PARAMS, "overrides": ["gate.max_regression=0.1"]}, "run-u") is True
    assert steps.check_lineage(landed, {**PARAMS, "overrides": ["baseline.epochs=3"]}, "run-v") is True
    other = {**landed, "corpus": {**INPUTS["corpus"], "content_hash": "more-text"}}
    assert steps.check_lineage(other, PARAMS, "run-w") is True
    newer = _champion(tmp_path / "newer", steps.lineage_tags(from_params(PARAMS), other), tag="3")
    assert newer != champion and steps.check_lineage(landed, PARAMS, "run-x") is True


def test_a_warm_start_counts_the_champion_it_continues_in_its_lineage(tmp_path, caplog):
    """v3, fine-tuned on from v2, was "nothing changed" for a run that would continue v3 itself: a
    scheduled continuation stopped after one promotion. A candidate continued from this champion and
    rejected is still not gated again."""
    warm = {**PARAMS, "overrides": ["finetune.init_from=champion"]}
    cfg = from_params(warm)
    v1 = _champion(tmp_path, steps.lineage_tags(from_params(PARAMS), INPUTS))
    v2 = _champion(tmp_path / "v2", steps.lineage_tags(cfg, INPUTS, starts_from=v1), tag="2")
    assert registry.champion(cfg.gate.registered_model)["tags"][steps.STARTS_FROM_TAG] == v1
    caplog.clear()
    assert steps.check_lineage(INPUTS, warm, "run-c") is True
    assert (
        f"changed since champion v{v2}: lineage.starts_from (this run continues champion v{v2}, which began "
        f"from v{v1}); training"
    ) in caplog.text
    assert steps.lineage_tags(from_params(PARAMS), INPUTS, starts_from=v2) == steps.lineage_tags(
        from_params(PARAMS), INPUTS
    )  # no warm start: no such tag
    # Continued from v2, rejected against it: the same run again is skipped, as any rejected candidate's.
    decision = {"blessed": False, "reasons": ["regression"], "checks": [], "champion_version": v2}
    decision["settings_hash"] = cfg.promotion_hash()
    tags = {**steps.lineage_tags(cfg, INPUTS, starts_from=v2), "airflow.run_id": "run-c"}
    rejected = registry.log_candidate(
        cfg.gate.registered_model, fake_bundle(tmp_path / "b3", "3"), {}, {}, {}, tags, decision
    )
    assert steps.check_lineage(INPUTS, warm, "run-d") is False
    assert f"nothing changed since v{rejected['version']}, which the gate rejected" in caplog.text


def test_a_rejection_under_new_settings_becomes_the_rejected_versions_tags_but_never_a_champions(tmp_path):
    name = from_params(PARAMS).gate.registered_model
    champion = _champion(tmp_path, steps.lineage_tags(from_params(PARAMS), INPUTS))
    landed = {**INPUTS, "labeled": {**INPUTS["labeled"], "content_hash": "more-reviews"}}
    first = _rejected(tmp_path, landed, champion)
    looser = {**PARAMS, "overrides": ["gate.max_regression=0.06"]}
    assert steps.check_lineage(landed, looser, "run-s") is True
    again = _rejected(tmp_path, landed, champion, params=looser, run="run-s")  # the same weights: no new version
    assert again["version"] == first["version"]
    tags = registry.client().get_model_version(name, first["version"]).tags
    assert tags["gate.settings_hash"] == from_params(looser).promotion_hash() and tags["gate.decided_in"] == "run-s"
    assert steps.check_lineage(landed, looser, "run-t") is False  # the next slot under those settings: skipped
    registry.move_champion(name, first["version"], expected=champion, reason="by hand", who="test")
    _rejected(tmp_path, landed, first["version"], params=PARAMS, run="run-u")
    tags = registry.client().get_model_version(name, first["version"]).tags
    assert tags["gate.decided_in"] == "run-s"  # the champion's tags are not replaced by a rejection


def test_a_changed_setting_is_named_and_an_init_from_encoder_counts_by_its_bytes(tmp_path, caplog):
    """Another encoder copied over pretrain.init_from's path was "nothing changed" (the lineage hashed the
    path), the same encoder at another path a change on every run; and a change was named only as
    config.training_hash."""
    import logging

    enc = tmp_path / "latest" / "encoder.keras"
    enc.parent.mkdir()
    enc.write_bytes(b"encoder one")
    params = {**PARAMS, "overrides": [f"pretrain.init_from={enc}"]}
    cfg = from_params(params)
    _champion(tmp_path, steps.lineage_tags(cfg, INPUTS), config=cfg.to_dict())
    assert steps.check_lineage(INPUTS, params, "run-a") is False
    copy = tmp_path / "copy" / "encoder.keras"
    copy.parent.mkdir()
    copy.write_bytes(b"encoder one")
    assert steps.check_lineage(INPUTS, {**PARAMS, "overrides": [f"pretrain.init_from={copy}"]}, "run-b") is False
    enc.write_bytes(b"encoder two")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        assert steps.check_lineage(INPUTS, params, "run-c") is True
    assert f"config.training_hash (the encoder at pretrain.init_from={enc}, by its sha256: other bytes" in caplog.text
    enc.write_bytes(b"encoder one")
    caplog.clear()
    faster = {
        **PARAMS,
        "overrides": [f"pretrain.init_from={enc}", "pretrain.learning_rate=0.0123", "finetune.epochs=9"],
    }
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        assert steps.check_lineage(INPUTS, faster, "run-d") is True
    was = (cfg.pretrain.learning_rate, cfg.finetune.epochs)
    assert (
        f"config.training_hash (pretrain.learning_rate {was[0]} -> 0.0123; finetune.epochs {was[1]} -> 9)"
    ) in caplog.text
    # promote tags the encoder pretraining read (its sha256 in the result), not the file there now: a newer
    # one copied over it meanwhile would read as this version's parent, and a file gone failed promote.
    import hashlib

    read = hashlib.sha256(b"encoder one").hexdigest()
    enc.write_bytes(b"encoder three")
    assert steps.lineage_tags(cfg, INPUTS, read) == steps.lineage_tags(from_params(params), INPUTS, read)
    assert steps.lineage_tags(cfg, INPUTS, read) != steps.lineage_tags(cfg, INPUTS)
    enc.unlink()
    assert steps.lineage_tags(cfg, INPUTS, read)["config.training_hash"] == cfg.training_hash(read)
    # A result passed on before init_sha256 was: from its result.json, which has recorded it since warm starts.
    result = layout.write_json(tmp_path / "pretrain" / "result.json", {"config": {"init": read}})
    assert steps._init_sha256({"result": str(result), "parent": str(enc)}) == read


def test_a_damaged_champion_fails_the_run_before_training_naming_the_version(tmp_path, caplog):
    """It was found by the gate, after all the training, naming a temp folder already deleted."""
    version = _champion(tmp_path, steps.lineage_tags(from_params(PARAMS), INPUTS))
    name = from_params(PARAMS).gate.registered_model
    source = registry.client().get_model_version(name, version).source
    stored = layout.mlflow_dir() / source.split("/mlflow/", 1)[1]
    (stored / "classifier.keras").write_text("flipped")
    touched = {**INPUTS, "corpus": {**INPUTS["corpus"], "content_hash": "new-text"}}
    with pytest.raises(EncoderflowError) as err:
        steps.check_lineage(touched, PARAMS, "run-f")
    assert str(err.value).startswith(
        f"models:/{name}/{version}: classifier.keras: missing or altered (sha256 differs from bundle.json)"
    )
    assert err.value.fix.startswith(f"serve another version of {name} (encoderflow rollback, or encoderflow promote")
    assert not (layout.run_dir("run-f") / "champion").exists() or not any(
        (layout.run_dir("run-f") / "champion").iterdir()
    )


def test_labeled_data_of_another_label_set_is_refused_before_training(tmp_path):
    """The champion's labels are a tag; a ticket classifier's data under the SST-2 model fails here,
    not after pretraining and fine-tuning, at the gate."""
    train = {"path": "/d/SST-2/train.tsv", "bytes": 1, "sha256": "x"}
    labeled = {**INPUTS["labeled"], "role": "labeled", "dataset": "sst2", "files": {"SST-2/train.tsv": train}}
    sst2 = {**INPUTS, "labeled": {**labeled, "labels": ["0", "1"]}}
    tags = {**steps.lineage_tags(from_params(PARAMS), sst2), **steps._labels_tag(sst2["labeled"])}
    version = _champion(tmp_path, tags)
    assert registry.champion(from_params(PARAMS).gate.registered_model)["tags"][steps.LABELS_TAG] == '["0", "1"]'
    # Your own file is named as you gave it (its origin), not as the verified copy that was read.
    own_train = {**train, "origin": "/my/tickets/train.jsonl"}
    tickets = {
        **sst2,
        "labeled": {
            **sst2["labeled"],
            "labels": ["bug", "praise"],
            "content_hash": "t",
            "files": {"SST-2/train.tsv": own_train},
        },
    }
    for params in (PARAMS, {**PARAMS, "force": True}):
        with pytest.raises(EncoderflowError) as err:
            steps.check_lineage(tickets, params, "run-f")
        assert f"champion v{version} of encoderflow-sst2 classifies labels ['0', '1']" in str(err.value)
        assert "data /my/tickets/train.jsonl has ['bug', 'praise']: they are different tasks" in str(err.value)
        assert err.value.fix == (
            "if they are the same labels written another way, correct the file; if the task is another, "
            "give it a registered model of its own with gate.registered_model=<name>"
        )
    assert steps.check_lineage(sst2, PARAMS, "run-g") is False  # the same task, nothing changed


def test_labeled_data_of_your_own_needs_a_model_name_of_its_own():
    own = {**PARAMS, "labeled": "/data/tickets"}
    with pytest.raises(ConfigError) as err:
        steps.check_params(own, own)
    assert str(err.value).startswith(
        "gate.registered_model: labeled data of your own (/data/tickets) would be registered as 'encoderflow-sst2'"
    )
    assert err.value.fix.startswith("name this task's model: --set gate.registered_model=<name>")
    named = {**own, "overrides": ["gate.registered_model=tickets"]}
    assert steps.check_params(named, named)["preset"] == "smoke"
    # Named on purpose, the SST-2 model's name is a choice, not an oversight.
    resolve({**own, "overrides": ["gate.registered_model=encoderflow-sst2"]})


def test_check_params_refuses_what_a_trigger_could_get_wrong_and_logs_what_it_resolved(caplog, tmp_path):
    """A trigger key that is no param changed nothing and the run 'succeeded': now it fails, once."""
    from tests.fixtures_pipeline import write_tree

    with pytest.raises(ConfigError) as err:
        steps.check_params(PARAMS, {"preset": "smoke", "pretrain_epoch": 3, "zzz": 1})
    assert str(err.value).startswith("unknown trigger params 'pretrain_epoch': did you mean 'pretrain_epochs'?; 'zzz'")
    assert "overrides as section.key=value" in err.value.fix
    for bad, says in (
        (["model.num_layerz=2"], "unknown config key 'model.num_layerz': did you mean 'model.num_layers'?"),
        (["modle.num_layers=2"], "unknown config key 'modle.num_layers': sections are"),
        (["model.num_layers=100"], "model.num_layers"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)) as err:
            steps.check_params({**PARAMS, "overrides": bad}, {"overrides": bad})
        # A misspelt key is told to use a key that exists, not to correct its value.
        told = cause_of(err.value).fix
        assert told.startswith("use a key `encoderflow config` prints" if "unknown" in says else "correct the value")
    data = write_tree(tmp_path / "data")
    # A REST client's 32.0 (json.dumps of a float) for an integer field is the whole number it says.
    params = {**PARAMS, "pretrain_epochs": 3.0, "data_dir": str(data), "overrides": ["model.dropout=0.2"]}
    result = steps.check_params(params, params)
    assert result["config_hash"] == from_params({**params, "pretrain_epochs": 3}).config_hash()
    assert from_params(params).pretrain.epochs == 3 and type(from_params(params).pretrain.epochs) is int
    with pytest.raises(ConfigError, match=re.escape("expected int, got float 3.5")):
        from_params({**params, "pretrain_epochs": 3.5})
    assert any(
        m.startswith(f"check_params: preset smoke, config hash {result['config_hash'][:16]} (training hash ")
        # The hash the model version carries (config.training_hash): config_hash has gate.* in it.
        and f"(training hash {result['training_hash'][:16]}: what the model is trained from" in m
        and f"; set: model.dropout=0.2, pretrain.epochs=3; data: data_dir={data}" in m
        for m in caplog.messages
    ), caplog.messages
    # The run folder keeps what it resolved: `encoderflow runs` names the preset of a run killed before it reported.
    from encoderflow import runs

    steps.check_params(params, params, "manual__killed", "alice")
    kept = layout.read_json(layout.run_dir("manual__killed") / layout.RESOLVED_FILE)
    assert kept["preset"] == "smoke" and kept["set"] == {"model.dropout": 0.2, "pretrain.epochs": 3}
    assert kept["config"]["pretrain"]["epochs"] == 3 and kept["config_hash"] == result["config_hash"]
    assert kept["triggered_by"] == "alice" and kept["run_id"] == "manual__killed"
    listed = runs.collect_runs(layout.home(), [{"run_id": "manual__killed", "state": "failed", "conf": {}}])
    assert [(e["run_id"], e["preset"], e["triggered_by"]) for e in listed] == [("manual__killed", "smoke", "alice")]
    # Its retry is the same run; another run id with the same folder name is refused before it writes there.
    steps.check_params(params, params, "manual__killed", "alice")
    with pytest.raises(ConfigError) as taken:
        steps.check_params(params, params, "manual:_killed", "bob")
    assert str(taken.value) == (
        f"run id 'manual:_killed': its folder {layout.run_dir('manual__killed')} belongs to run 'manual__killed' (in "
        "folder names every character but letters, digits, '.', '_' and '-' becomes '_'); fix: trigger it again "
        "under another run id"
    )
    assert layout.read_json(layout.run_dir("manual__killed") / layout.RESOLVED_FILE)["triggered_by"] == "alice"
    # Listed newest first, the refused run took the folder's entry: the run it belongs to dropped off the list.
    both = [
        {"run_id": "manual:_killed", "state": "failed", "conf": {}},
        {"run_id": "manual__killed", "state": "success", "conf": {}},
    ]
    listed = runs.collect_runs(layout.home(), both)
    assert [(e["run_id"], e["state"], e["folder"], e["triggered_by"]) for e in listed] == [
        ("manual:_killed", "failed", None, None),
        ("manual__killed", "success", "manual__killed", "alice"),
    ]
    # `encoderflow runs <id>` finds the run by its exact id, not both runs of its folder's name.
    assert runs.find(listed, "manual:_killed")["state"] == "failed"
    assert runs.find(listed, "manual__killed")["state"] == "success"
    # Airflow takes "." and fails each task on storing its results: refused once, naming the fix.
    with pytest.raises(ConfigError, match=r"^run id '\.': Airflow cannot store this run's results; fix: trigger"):
        steps.check_params(params, params, ".", "bob")
    # Airflow accepts "." and ".." as run ids: never the runs folder or the home.
    assert [layout.safe_run_id(r) for r in (".", "..", ".hidden", "a.b")] == ["run", "run", "hidden", "a.b"]


def test_check_params_fails_once_on_a_file_the_run_names_that_is_not_there(tmp_path):
    """Before this check each download task failed on its own (three failures for one typo), and a
    missing init_from encoder only at pretrain, after the downloads, validation and shards."""
    from tests.fixtures_pipeline import write_tree

    nowhere = tmp_path / "nodata"
    with pytest.raises(EncoderflowError) as err:
        steps.check_params({**PARAMS, "data_dir": str(nowhere)}, {})
    message, fix = err.value.message, err.value.fix
    assert message.startswith(f"offline data folder {nowhere} does not exist; a run here reads:\n"), message
    # The smoke preset pretrains on the test split and validates on valid: never the train split.
    assert message.splitlines()[1:] == [
        "  wikitext-103-raw/wiki.test.raw",
        "  wikitext-103-raw/wiki.valid.raw",
        "  SST-2/train.tsv",
        "  SST-2/dev.tsv",
        "  SST-2/test.tsv",
        "  bert_vocab_uncased.txt",
    ]
    assert fix.startswith("point --data-dir at a folder laid out as the archives extract"), fix

    data = write_tree(tmp_path / "data")
    (data / "SST-2" / "dev.tsv").unlink()
    (data / "bert_vocab_uncased.txt").unlink()
    with pytest.raises(EncoderflowError) as err:
        steps.check_params({**PARAMS, "data_dir": str(data)}, {})
    assert err.value.message == f"offline data folder {data}: missing SST-2/dev.tsv, bert_vocab_uncased.txt"
    assert err.value.fix == (
        f"put the missing file(s) under {data} as the archives extract, or point --data-dir at a folder that has them"
    )
    # A vocabulary trained on the corpus reads nothing from the folder.
    trained = {**PARAMS, "data_dir": str(data), "overrides": ["inputs.vocab=trained"]}
    with pytest.raises(EncoderflowError) as err:
        steps.check_params(trained, {})
    assert err.value.message == f"offline data folder {data}: missing SST-2/dev.tsv"
    # A split the folder lacks is named with every other missing file, in one failure, with both ways out.
    (data / "wikitext-103-raw" / "wiki.test.raw").unlink()
    with pytest.raises(EncoderflowError) as err:
        steps.check_params({**PARAMS, "data_dir": str(data)}, {})
    assert err.value.message == (
        f"offline data folder {data}: missing wikitext-103-raw/wiki.test.raw, SST-2/dev.tsv, bert_vocab_uncased.txt"
    )
    assert err.value.fix.endswith(
        "; for wikitext-103-raw/wiki.test.raw: put wiki.test.raw there, or use a split it holds: "
        '--set data.pretrain_split=train (make run SET="data.pretrain_split=train")'
    ), err.value.fix
    # The split alone: the key to set, as the download would say it.
    (data / "SST-2" / "dev.tsv").write_text((data / "SST-2" / "train.tsv").read_text())
    (data / "bert_vocab_uncased.txt").write_text("[PAD]\n")
    with pytest.raises(EncoderflowError) as err:
        steps.check_params({**PARAMS, "data_dir": str(data)}, {})
    assert "the test split data.pretrain_split names" in err.value.message
    assert err.value.fix.startswith("put wiki.test.raw there, or use a split it holds: --set data.pretrain_split=train")
    # Every role with data of its own: the folder is not read, so not checked.
    own = {
        **PARAMS,
        "data_dir": str(tmp_path / "unused"),
        "corpus": str(data / "wikitext-103-raw"),
        "labeled": str(data / "SST-2"),
        "overrides": ["inputs.vocab=trained", "gate.registered_model=mine"],
    }
    assert steps.check_params(own, {})["preset"] == "smoke"

    encoder = tmp_path / "encoder.keras"
    for params in (
        {**PARAMS, "pretrain_init_from": str(encoder)},
        {**PARAMS, "overrides": [f"pretrain.init_from={encoder}"]},
    ):
        with pytest.raises(EncoderflowError) as err:
            steps.check_params(params, {})
        assert err.value.message == f"pretrain.init_from={encoder}: no such file"
        assert err.value.fix.startswith("give the path of an encoder.keras that exists")
    encoder.write_bytes(b"PK")
    assert steps.check_params({**PARAMS, "pretrain_init_from": str(encoder)}, {})["preset"] == "smoke"


def test_check_source_reports_a_change_once(tmp_path, caplog):
    from tests.data.fixtures_own import write_corpus

    caplog.set_level("INFO")
    assert steps.check_source("corpus", PARAMS) == {
        "role": "corpus",
        "location": None,
        "changed": False,
        "fingerprint_sha256": None,
    }
    assert "nothing to watch" in caplog.text
    # Scheduled on these events with nothing of your own declared: the training DAG would never run.
    caplog.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENCODERFLOW_SCHEDULE", "assets")
        steps.check_source("labeled", PARAMS)
    assert [r.levelname for r in caplog.records if "will not run" in r.getMessage()] == ["WARNING"]
    corpus = write_corpus(tmp_path / "corpus", n_files=3)
    params = {**PARAMS, "corpus": str(corpus)}
    first = steps.check_source("corpus", params)
    assert first["changed"] is True and first["location"] == str(corpus) and "seen for the first time" in caplog.text
    assert steps.check_source("corpus", params)["changed"] is False
    assert "unchanged since the last check: no event" in caplog.text
    (corpus / "doc-001.txt").write_text("new text landed in one file\n")
    changed = steps.check_source("corpus", params)
    assert changed["changed"] is True and changed["fingerprint_sha256"] != first["fingerprint_sha256"]
    assert (
        layout.read_json(layout.home() / "sources" / "corpus.json")["fingerprint_sha256"]
        == changed["fingerprint_sha256"]
    )
    assert steps.check_source("corpus", params)["changed"] is False

    # The fingerprint is saved before Airflow emits the event (on success): a retry in the run that
    # saved it reports the change again (a duplicate event at worst); a later run does not.
    (corpus / "doc-002.txt").write_text("more text\n")
    assert steps.check_source("corpus", params, "watch-1")["changed"] is True
    assert steps.check_source("corpus", params, "watch-1")["changed"] is True  # try 2 of watch-1
    assert steps.check_source("corpus", params, "watch-2")["changed"] is False


def test_a_corpus_of_many_files_crosses_xcom_as_a_verified_index(tmp_path, monkeypatch):
    """XCom carries paths and small results: past results.INLINE_FILES_MAX files the record names a
    content-addressed index instead of listing every file, and every step reads the files through it."""
    import json
    from pathlib import Path

    import pytest

    from encoderflow import results
    from encoderflow.data import inputs
    from encoderflow.data.sources import DataError
    from tests.data.fixtures_own import write_corpus
    from tests.fixtures_pipeline import write_tree

    n = results.INLINE_FILES_MAX + 16
    corpus = write_corpus(tmp_path / "corpus", n_files=n)
    params = {**PARAMS, "data_dir": str(write_tree(tmp_path / "data")), "corpus": str(corpus)}
    info = steps.download("corpus", params)
    assert "files" not in info and info["file_count"] == n and len(json.dumps(info)) < 1500, info
    assert layout.sha256_file(info["files_index"]) == info["files_index_sha256"]
    files = results.files_of(info)
    assert len(files) == n and all(Path(f["path"]).is_file() for f in files.values())
    assert steps.download("corpus", params) == info  # the same inputs give the same record and index

    validated = steps.validate(info, params, "run-1")
    assert validated["validation"]["rows"] == {} and validated["validation"]["total_rows"] >= 4 * n
    vocab = steps.validate(steps.download("vocab", params), params, "run-1")
    assert "files" in vocab  # one file: listed inline, as the UI shows it
    plan = steps.plan_shards(validated, vocab, params)
    texts = inputs.corpus_texts(validated, from_params(params))
    docs = sum(len(open(t["path"]).read().strip().split("\n\n")) for t in texts.values())
    assert plan and docs == n  # one document a file (inputs.documents=file), every file read via the index

    # A changed index is refused with what to do, in a process that has not read it yet.
    Path(info["files_index"]).write_text(json.dumps({"files": {}}))
    monkeypatch.setattr(results, "_INDEXES", {})
    with pytest.raises(DataError, match=r"file index .* does not match sha256.*re-run download_corpus"):
        results.files_of(info)


def test_a_cleared_gate_keeps_the_decision_its_registered_candidate_was_registered_under(tmp_path, caplog):
    """Once this run registered its candidate (and made it champion, say), gating it again would
    compare it with itself and rewrite gate.json under the version's tags: the decision stands."""
    from encoderflow import DAG_ID

    run, name = "manual__gated", "encoderflow-sst2"
    candidate = fake_bundle(tmp_path / "bundle", "1")  # no Keras inside: scoring it would fail
    sha = bundle.identity(candidate)
    decision = {"blessed": True, "reasons": [], "checks": [], "candidate": 0.9, "champion": None}
    gate_json = layout.write_json(layout.run_dir(run) / "gate.json", {**decision, "candidate_bundle_sha256": sha})
    assert steps._decided(gate_json, sha, name, run) is None  # not registered yet: gate it
    registry.log_candidate(name, candidate, {}, {}, {}, {"airflow.run_id": run, "airflow.dag_id": DAG_ID}, decision)
    caplog.clear()
    with caplog.at_level("INFO", logger="encoderflow.steps"):
        kept = steps.evaluate_and_gate({"bundle": str(candidate)}, {}, {}, {"preset": "smoke"}, run)
    assert kept == {**decision, "gate_json": str(gate_json)}
    assert f"this candidate is registered already, as {name} v1, under the decision in {gate_json}" in caplog.text
    # Another candidate (pretrain and finetune cleared and trained again) or another run is gated afresh.
    assert steps._decided(gate_json, "0" * 64, name, run) is None
    assert steps._decided(gate_json, sha, name, "manual__other") is None
    # The retrained candidate, gated (gate.json is its decision) but not yet registered: v1 holds the
    # first candidate, so its gate must not stand for this one.
    retrained_bundle = fake_bundle(tmp_path / "retrained", "2")
    retrained = bundle.identity(retrained_bundle)
    layout.write_json(gate_json, {**decision, "candidate_bundle_sha256": retrained})
    assert steps._decided(gate_json, retrained, name, run) is None
    # ... and promote, cleared alone after finetune trained again, refuses the first one's decision.
    with pytest.raises(EncoderflowError, match="the gate decided about another candidate") as refused:
        steps._decided_for({**decision, "gate_json": str(gate_json)}, str(candidate))
    assert "clear evaluate_and_gate with its downstream tasks" in refused.value.fix
    steps._decided_for({**decision, "gate_json": str(gate_json)}, str(retrained_bundle))  # its own: fine
    # promote failed StaleChampion (another run's v2 became champion after this gate): the fix, clearing
    # the gate, decides again instead of keeping the stale decision.
    layout.write_json(gate_json, {**decision, "candidate_bundle_sha256": sha})
    assert steps._decided(gate_json, sha, name, run) is not None
    other = registry.log_candidate(
        name, fake_bundle(tmp_path / "other", "3"), {}, {}, {}, {"airflow.run_id": "manual__other"}, decision
    )
    registry.move_champion(name, other["version"], expected=None, reason="other run", who="airflow")
    caplog.clear()
    with caplog.at_level("INFO", logger="encoderflow.steps"):
        assert steps._decided(gate_json, sha, name, run) is None
    said = f"the champion moved since this run's blessing (from none to v{other['version']}) and its model never"
    assert said in caplog.text
    # A rejection is this run's history: clearing its tasks after later champions keeps it.
    rejected = {**decision, "blessed": False, "reasons": ["champion: below"], "champion_version": "9"}
    layout.write_json(gate_json, {**rejected, "candidate_bundle_sha256": sha})
    assert steps._decided(gate_json, sha, name, run)["blessed"] is False


def test_a_cleared_old_run_whose_blessing_was_carried_out_keeps_it_and_moves_nothing(tmp_path):
    """Clearing an old promoted run's tasks after a later champion re-gated it against today's champion
    and rewrote its decision; kept, its promote then failed StaleChampion, and the fix it printed (clear
    the gate) looped. Its blessing was carried out: kept, and nothing moves."""
    from encoderflow import DAG_ID

    run, name = "manual__first", "encoderflow-sst2"
    candidate = fake_bundle(tmp_path / "bundle", "1")
    sha = bundle.identity(candidate)
    decision = {
        "blessed": True,
        "reasons": [],
        "checks": [],
        "candidate": 0.9,
        "champion": None,
        "champion_version": None,
    }
    gate_json = layout.write_json(layout.run_dir(run) / "gate.json", {**decision, "candidate_bundle_sha256": sha})
    tags = {"airflow.run_id": run, "airflow.dag_id": DAG_ID}
    first = registry.log_candidate(name, candidate, {}, {}, {}, tags, decision)["version"]
    registry.move_champion(name, first, expected=None, reason=f"gate blessed run {run}", who="airflow")
    later = registry.log_candidate(
        name, fake_bundle(tmp_path / "later", "2"), {}, {}, {}, {"airflow.run_id": "manual__later"}, decision
    )["version"]
    registry.move_champion(name, later, expected=first, reason="gate blessed run manual__later", who="airflow")
    current = registry.champion(name)
    assert steps._decided(gate_json, sha, name, run) is not None  # the gate, cleared: kept
    assert steps._carried_out(name, decision, first, current)  # promote, cleared: nothing moves
    # A new run blessing the old model against today's champion (new dev data, say) is a new decision: it moves.
    assert not steps._carried_out(name, {**decision, "champion_version": later}, first, current)
    assert not steps._carried_out(name, decision, later, current)  # the champion itself: move_champion says so


def test_a_blessing_the_champion_moved_past_leaves_a_version_that_says_so(tmp_path):
    """A person's promote between the gate and promote: promote failed StaleChampion after registering,
    leaving a version tagged gate.blessed=true that `runs` called "not registered", and its message said
    "another run promoted since" whoever it was."""
    import json

    from encoderflow.runs import collect_runs

    name, run = "encoderflow-sst2", "manual__raced"
    decision = {"blessed": True, "reasons": [], "checks": [], "candidate": 0.9, "champion": None}
    first = registry.log_candidate(name, fake_bundle(tmp_path / "a", "1"), {}, {}, {}, {}, decision)["version"]
    registry.move_champion(name, first, expected=None, reason="checked by hand", who="alice")
    tags = {"airflow.run_id": run, "airflow.dag_id": "encoder_pretraining"}
    registered = registry.log_candidate(name, fake_bundle(tmp_path / "b", "2"), {}, {}, {}, tags, decision)
    layout.write_json(layout.run_dir(run) / layout.REGISTERED_FILE, {"registered_model": name, **registered})
    version = registered["version"]
    with pytest.raises(registry.StaleChampion) as stale:
        steps._move_blessed(name, version, {**decision, "champion_version": None}, run, "bob (encoderflow run)")
    said = stale.value.message
    assert said.startswith(
        f"{name} v{version} registered, not champion: champion is v{first}, but the gate decided against no "
        f"champion: v{first} became champion by alice at "
    ) and said.endswith(" UTC (promote: checked by hand)")
    assert "clear evaluate_and_gate" in stale.value.fix
    assert registry.client().get_model_version(name, version).tags[registry.NOT_PROMOTED] == said
    assert registry.champion(name)["version"] == first
    # The run failed in promote, with no summary: the runs list names the version it registered.
    errors.record_failure(run, errors.cause_of(stale.value), task_id="promote", map_index=-1, try_number=1)
    [entry] = [e for e in collect_runs(layout.home()) if e["run_id"] == run]
    assert entry["registry"]["version"] == version and entry["failure"]["error"] == "StaleChampion"
    # Gated again against today's champion and promoted, the version is champion and the tag goes;
    # the move names who started the run.
    moved = steps._move_blessed(name, version, {**decision, "champion_version": first}, run, "bob (encoderflow run)")
    assert moved["who"] == "bob (encoderflow run)" and moved["reason"] == f"gate blessed run {run}"
    assert registry.NOT_PROMOTED not in registry.client().get_model_version(name, version).tags
    assert json.loads(registry.client().get_registered_model(name).tags["champion.move.000002"])["who"] == (
        "bob (encoderflow run)"
    )


def test_validation_refuses_a_file_changed_since_its_download_recorded_it(tmp_path):
    """A file fixed after a failed validation, with only validate cleared: it passed and the run trained
    for nothing before finetune refused it. Validation refuses it first, naming the task to clear."""
    from pathlib import Path

    from encoderflow.data.sources import DataError
    from encoderflow.results import SST2_DEV, split_path
    from tests.fixtures_pipeline import write_tree

    params = {**PARAMS, "data_dir": str(write_tree(tmp_path / "data"))}
    info = steps.download("labeled", params)
    assert steps.validate(info, params, "run-v")["validation"]["success"]
    dev = Path(split_path(info, "dev"))
    dev.write_text(dev.read_text().replace("\t0\n", "\t1\n", 1))
    with pytest.raises(DataError, match=rf"{re.escape(str(dev))}: changed since download_labeled recorded it") as e:
        steps.validate(info, params, "run-v")
    assert cause_of(e.value).fix.startswith("clear download_labeled with its downstream tasks")
    dev.unlink()
    with pytest.raises(DataError, match=rf"{re.escape(str(dev))} \({SST2_DEV}\): unreadable since download_labeled"):
        steps.validate(info, params, "run-v")
    # Downloaded again, the record is the file as it is now.
    dev.write_text("sentence\tlabel\nfine\t1\n")
    assert steps.download("labeled", params)["files"][SST2_DEV]["sha256"] != info["files"][SST2_DEV]["sha256"]


def test_a_warm_start_from_a_champion_its_model_settings_do_not_fit_is_refused_before_training(tmp_path):
    """finetune.init_from=champion under the recipe preset continued a post-norm champion's classifier and
    registered it as a pre-norm model; pretrain.init_from=champion with other shapes failed only at pretrain."""
    cfg = from_params(PARAMS)
    root = tmp_path / "champ"
    fake_bundle(root, "1")
    bundle.seal(root, {"config": cfg.to_dict()})  # the champion's bundle records the config it was built with
    decision = {"blessed": True, "reasons": [], "candidate": 0.9, "baseline": 0.8, "champion": None, "checks": []}
    name = cfg.gate.registered_model
    out = registry.log_candidate(name, root, {}, {}, {}, steps.lineage_tags(cfg, INPUTS), decision)
    registry.move_champion(name, out["version"], expected=None, reason="test", who="test")

    def lineage(*overrides: str, run: str = "run-w") -> bool:
        return steps.check_lineage(INPUTS, {**PARAMS, "overrides": list(overrides)}, run)

    with pytest.raises(EncoderflowError) as err:
        lineage("finetune.init_from=champion", "model.normalize_first=true", "model.dropout=0.2")
    assert err.value.message == (
        f"finetune.init_from=champion: champion v{out['version']} of {name} was built with model.dropout "
        f"{cfg.model.dropout!r} (this run 0.2), model.normalize_first False (this run True); this run continues "
        "its classifier as it is, so the model it registers would not be the one its config describes"
    )
    assert err.value.fix == (
        f"use the champion's settings (--set model.dropout={cfg.model.dropout} model.normalize_first=false), "
        "or finetune.init_from=none"
    )
    layers = cfg.model.num_layers
    with pytest.raises(EncoderflowError) as err:
        lineage("pretrain.init_from=champion", f"model.num_layers={layers + 1}")
    assert f"built with model.num_layers {layers} (this run {layers + 1}); this run copies its encoder's" in str(
        err.value
    )
    assert err.value.fix == f"use the champion's settings (--set model.num_layers={layers}), or pretrain.init_from=none"
    # What shapes no weight (pretrain) or what the champion's model already has: trains.
    seq = cfg.data.seq_length  # the position embedding's length: followed, the fix once left it out
    with pytest.raises(EncoderflowError, match=rf"data.seq_length {seq} \(this run {seq * 2}\)") as err:
        lineage("finetune.init_from=champion", f"data.seq_length={seq * 2}")
    assert f"--set data.seq_length={seq})" in err.value.fix
    assert lineage("pretrain.init_from=champion", "model.dropout=0.2") is True
    assert lineage("finetune.init_from=champion", "finetune.epochs=2") is True
    assert lineage("model.normalize_first=true") is True  # no warm start: any model

    # Another vocabulary of the same size: its token ids would mean other words. Refused here too, not
    # after the shards at pretrain or finetune; the champion's own file (fake_bundle's) trains.
    def with_vocab(text: str) -> dict:
        path = tmp_path / "vocab" / f"{len(text)}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return {
            **INPUTS,
            "vocab": {**INPUTS["vocab"], "files": {"v": {"path": str(path), "sha256": layout.sha256_file(path)}}},
        }

    warm = {**PARAMS, "overrides": ["finetune.init_from=champion", "pretrain.init_from=champion"]}
    with pytest.raises(EncoderflowError) as err:
        steps.check_lineage(with_vocab("[UNK]\n"), warm, "run-v")
    assert re.fullmatch(
        rf"finetune.init_from=champion and pretrain.init_from=champion: champion v{out['version']} of {name} tokenizes "
        r"with another vocabulary \(sha256 [0-9a-f]{64}\), this run's \S+/vocab/6.txt has sha256 [0-9a-f]{64}: its "
        "embeddings would be read under other words",
        err.value.message,
    ), err.value.message
    copy = layout.run_dir("run-v") / "champion" / f"v{out['version']}" / "vocab.txt"
    assert err.value.fix == (
        f"give this run the vocabulary the champion was trained with (a copy: {copy}), or finetune.init_from=none "
        "and pretrain.init_from=none"
    )
    assert steps.check_lineage(with_vocab("[PAD]\n"), warm, "run-v") is True


def test_the_gate_decides_on_its_own_score_of_the_candidate_as_of_the_champion(tmp_path, monkeypatch, caplog):
    """On the stack, fine-tuning runs on a GPU worker in bfloat16 and the gate on a CPU one: the gate
    compared fine-tuning's number with a champion it scored itself, and bootstrapped around its own."""
    import logging

    import numpy as np

    from encoderflow.data import inputs as inputs_mod

    correct = np.array([True, True, True, False] * 16)  # 48 of 64: 0.75

    class Scored:
        def __init__(self, path):
            self.path = path

        def correct(self, sentences, labels):
            return correct

    monkeypatch.setattr(bundle, "Scorer", Scored)
    monkeypatch.setattr(inputs_mod, "read_labeled", lambda labeled, split: (["a sentence"] * 64, np.array([0, 1] * 32)))
    monkeypatch.setattr(steps, "split_path", lambda labeled, split: tmp_path / "dev.tsv")
    ran = {"device": "cuda:0 (NVIDIA H100 80GB HBM3)", "dtype_policy": "mixed_bfloat16"}
    finetuned = {
        "bundle": str(fake_bundle(tmp_path / "candidate", "1")),
        "val_accuracy": 0.765625,  # 49 of 64, where fine-tuning ran
        "result": str(layout.write_json(tmp_path / "finetune" / "result.json", ran)),
    }
    baseline = {"baseline_val_accuracy": 0.5, "result": str(layout.write_json(tmp_path / "bl" / "result.json", {}))}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        decided = steps.evaluate_and_gate(finetuned, baseline, {}, PARAMS, "run-g")
    assert decided["candidate"] == 0.75 and decided["intervals"]["candidate"]["estimate"] == 0.75
    assert (
        "val_accuracy 0.7500 (48 of 64 sentences) here, where the champion is re-evaluated; fine-tuning measured "
        "0.7656 on cuda:0 (NVIDIA H100 80GB HBM3) (mixed_bfloat16): the gate and the registry take this one"
    ) in caplog.text
    # What promote registers, report summarises and the champion asset carries.
    assert steps.val_accuracy(finetuned, decided) == 0.75
    assert steps.val_accuracy(finetuned, {"candidate": None}) == 0.765625
