"""MLflow registry: candidates, champion/previous aliases, people's promote/rollback, crash safety.

Bundles here are small files with a real ``bundle.json`` (sha256 per file); no Keras is needed
to test what the registry promises about them. What a bundle itself promises is in test_bundle.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from encoderflow import bundle, cli, registry
from encoderflow.errors import EncoderflowError
from tests.test_bundle import fake_bundle as _bundle

NAME = "encoderflow-sst2"
REPO = Path(__file__).resolve().parents[1]


def _register(tmp_path: Path, tag: str, blessed: bool = True) -> str:
    decision = {
        "blessed": blessed,
        "reasons": [] if blessed else ["floor: 0.4 < 0.5"],
        "candidate": 0.9,
        "baseline": 0.8,
        "champion": None,
        "champion_version": None,
        "checks": [{"name": "floor", "passed": blessed, "detail": "x"}],
    }
    out = registry.log_candidate(
        NAME,
        _bundle(tmp_path / f"b{tag}", tag),
        {"model": {"num_layers": 1}},
        {"val_accuracy": 0.9},
        {"finetune": {"loss": [0.5, 0.4]}},
        {"airflow.run_id": f"run-{tag}"},
        decision,
    )
    return out["version"]


def _who() -> str:
    import getpass

    return os.environ.get("ENCODERFLOW_USER") or getpass.getuser()


def _aliases() -> dict[str, str | None]:
    from mlflow.exceptions import MlflowException

    out = {}
    for alias in ("champion", "previous"):
        try:
            out[alias] = str(registry.client().get_model_version_by_alias(NAME, alias).version)
        except MlflowException:
            out[alias] = None
    return out


def test_params_spell_booleans_as_set_takes_them(tmp_path):
    out = registry.log_candidate(
        NAME,
        _bundle(tmp_path / "b", "1"),
        {"model": {"padding_mask": True}, "data": {"lowercase": False}, "pretrain": {"epochs": 2}},
        {"val_accuracy": 0.9},
        {},
        {"airflow.run_id": "run-1"},
        {"blessed": False, "reasons": ["x"], "candidate": 0.9, "champion_version": None, "checks": []},
    )
    params = registry.client().get_run(registry.client().get_model_version(NAME, out["version"]).run_id).data.params
    assert (params["model.padding_mask"], params["data.lowercase"], params["pretrain.epochs"]) == ("true", "false", "2")


def test_a_candidates_curves_are_logged_per_epoch_in_one_request(tmp_path):
    v1 = _register(tmp_path, "1")
    run_id = registry.client().get_model_version(NAME, v1).run_id
    points = registry.client().get_metric_history(run_id, "finetune.loss")
    assert [(p.step, p.value) for p in sorted(points, key=lambda p: p.step)] == [(0, 0.5), (1, 0.4)]


def test_candidates_aliases_history_and_rollback(tmp_path, capsys):
    v1, v2, v3 = (_register(tmp_path, t) for t in "123")
    assert (v1, v2, v3) == ("1", "2", "3")
    assert registry.champion(NAME) is None

    registry.move_champion(NAME, v1, expected=None, reason="first", who="gate")
    registry.move_champion(NAME, v2, expected=v1, reason="better", who="gate")
    assert _aliases() == {"champion": "2", "previous": "1"}
    # An Airflow retry of the same promotion finds it done instead of failing as stale.
    assert registry.move_champion(NAME, v2, expected=v1, reason="better", who="gate")["already"] is True
    assert _aliases() == {"champion": "2", "previous": "1"} and len(registry.history(NAME)) == 2

    # The gate compared against v1, but v2 is champion now: refused, nothing moves.
    with pytest.raises(registry.StaleChampion, match="champion is v2, but the gate decided against v1"):
        registry.move_champion(NAME, v3, expected=v1, reason="stale", who="gate")
    # A decision made when there was no champion yet says so, not "vNone", and names the way out.
    with pytest.raises(registry.StaleChampion, match="decided against no champion") as stale:
        registry.move_champion(NAME, v3, expected=None, reason="stale", who="gate")
    assert "clear evaluate_and_gate" in stale.value.fix
    assert _aliases() == {"champion": "2", "previous": "1"}

    assert cli.main(["rollback", "--reason", "v2 misbehaves in serving", "--who", "alice"]) == 0
    out = capsys.readouterr().out
    assert "champion v2 -> v1 by alice: v2 misbehaves in serving; no previous version left" in out
    # The rejected v2 is not 'previous': a second rollback would serve it again. v1 replaced none.
    assert _aliases() == {"champion": "1", "previous": None}
    assert cli.main(["rollback", "--reason", "again"]) == 2
    assert "no 'previous' version to roll back to; fix: make a version champion by number" in capsys.readouterr().err

    assert cli.main(["promote", "--version", "3", "--reason", "hand-checked", "--who", "bob"]) == 0
    assert _aliases() == {"champion": "3", "previous": "1"}
    assert cli.main(["promote", "--version", "3", "--reason", "same again"]) == 0
    assert capsys.readouterr().out.endswith(f"{NAME}: v3 is champion already; nothing moved\n")

    events = registry.history(NAME)
    assert [(e["action"], e["from"], e["to"], e["who"]) for e in events] == [
        ("promote", None, "1", "gate"),
        ("promote", "1", "2", "gate"),
        ("rollback", "2", "1", "alice"),
        ("promote", "1", "3", "bob"),
    ]
    tag = json.loads(registry.client().get_model_version(NAME, "3").tags["champion.promote"])
    assert tag["reason"] == "hand-checked" and tag["who"] == "bob"

    # The registry serves what was registered, verified against bundle.json.
    served = registry.download_version(NAME, "@champion", tmp_path / "serve")
    assert (served / "classifier.keras").read_text() == "clf-3"
    # Which version an alias is, resolved once, for a caller that must say what it scored.
    assert registry.resolve_version(NAME, "@champion") == "3" and registry.resolve_version(NAME, "v2") == "2"
    # Fetched again while it holds that version, verified: left alone (a scorer's loop re-fetched it each
    # time, and the swap broke another process reading it); another version replaces it.
    before = (served / "classifier.keras").stat().st_ino
    assert registry.download_version(NAME, "3", served) == served
    assert (served / "classifier.keras").stat().st_ino == before
    assert (registry.download_version(NAME, "1", served) / "classifier.keras").read_text() == "clf-1"
    # From a notebook: a version as `encoderflow runs` prints it, or as a number, is that version; a
    # mistake is named with what there is, not MLflow's "Invalid Model Version stage" or an AttributeError.
    for version in (2, "2", "v2"):
        got = registry.download_version(NAME, version, tmp_path / f"v2-{version}")
        assert (got / "classifier.keras").read_text() == "clf-2"
    for version, said in (
        ("champion", "version 'champion' of encoderflow-sst2 is neither a number nor an @alias"),
        ("@nosuch", "encoderflow-sst2 has no alias @nosuch at "),
        (9, "encoderflow-sst2 has no version 9 at "),
    ):
        with pytest.raises(EncoderflowError, match=re.escape(said)) as refused:
            registry.download_version(NAME, version, tmp_path / "x")
        assert "versions: 1, 2, 3; aliases: @champion, @previous" in str(refused.value) or "neither" in said
    with pytest.raises(EncoderflowError, match=r"no registered model 'nosuch-model' at .*registered: \['encoderflow"):
        registry.download_version("nosuch-model", "@champion", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_person_moving_the_champion_off_a_model_demotes_it_until_a_person_brings_it_back(tmp_path):
    """The gate (gate.model_check) must not make a rolled-back model champion again on the next
    scheduled run: the version keeps who moved the champion off it, and why."""
    from encoderflow import gate

    v1, v2 = _register(tmp_path, "1"), _register(tmp_path, "2")
    registry.move_champion(NAME, v1, expected=None, reason="first", who="airflow")
    registry.move_champion(NAME, v2, expected=v1, reason="gate blessed run-2", who="airflow")
    models = {v: bundle.identity(tmp_path / f"b{v}") for v in (v1, v2)}
    assert registry.versions_of_model(NAME, models[v2]) == [{"version": v2, "demoted": None}]
    assert gate.model_check(registry.versions_of_model(NAME, models[v2]), v2).passed is False  # the champion's own

    registry.rollback(NAME, "v2 misbehaves", who="alice")
    [held] = registry.versions_of_model(NAME, models[v2])
    assert (held["demoted"]["who"], held["demoted"]["action"], held["demoted"]["to"]) == ("alice", "rollback", v1)
    check = gate.model_check([held], v1)
    assert not check.passed
    assert check.detail.startswith(f"the model of v{v2}, which alice moved the champion off (rollback to v{v1}, ")
    assert check.detail.endswith(f"'v2 misbehaves'); only a person brings it back: encoderflow promote --version {v2}")
    assert registry.versions_of_model(NAME, models[v1]) == [{"version": v1, "demoted": None}]

    # A person brings v2 back: it is no longer demoted, and the v1 they moved off is.
    registry.promote(NAME, v2, "fixed in serving", who="bob")
    assert registry.versions_of_model(NAME, models[v2]) == [{"version": v2, "demoted": None}]
    [old] = registry.versions_of_model(NAME, models[v1])
    assert (old["demoted"]["who"], old["demoted"]["action"], old["demoted"]["from"]) == ("bob", "promote", v1)
    # The gate's own blessings demote nothing: a model it replaced may win again on new data.
    v3 = _register(tmp_path, "3")
    registry.move_champion(NAME, v3, expected=v2, reason="gate blessed run-3", who="airflow")
    assert gate.model_check(registry.versions_of_model(NAME, models[v2]), v3).passed


def test_a_rollback_that_dies_before_the_alias_moves_has_demoted_already_and_its_retry_finishes(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    v1, v2 = _register(tmp_path, "1"), _register(tmp_path, "2")
    registry.move_champion(NAME, v1, expected=None, reason="first", who="airflow")
    registry.move_champion(NAME, v2, expected=v1, reason="gate blessed", who="airflow")
    real = MlflowClient.set_registered_model_alias

    def down(self, name, alias, version):
        raise ConnectionError("registry unreachable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", down)
    with pytest.raises(ConnectionError):
        registry.rollback(NAME, "v2 misbehaves", who="alice")
    assert _aliases()["champion"] == v2  # nothing moved, but the person's verdict on v2 is kept
    assert registry.versions_of_model(NAME, bundle.identity(tmp_path / f"b{v2}"))[0]["demoted"]["who"] == "alice"
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    registry.rollback(NAME, "v2 misbehaves", who="alice")
    assert _aliases()["champion"] == v1
    assert registry.versions_of_model(NAME, bundle.identity(tmp_path / f"b{v2}"))[0]["demoted"]["to"] == v1


def test_rollbacks_walk_back_through_the_versions_each_champion_replaced(tmp_path, capsys):
    """Rollback used to swap champion and previous: rolling back twice served the rejected version again."""
    versions = [_register(tmp_path, t) for t in "1234"]
    expected = None
    for v in versions:
        registry.move_champion(NAME, v, expected=expected, reason="better", who="gate")
        expected = v
    assert _aliases() == {"champion": "4", "previous": "3"}
    for champion, previous in (("3", "2"), ("2", "1"), ("1", None)):
        assert cli.main(["rollback", "--reason", f"back to v{champion}"]) == 0
        assert _aliases() == {"champion": champion, "previous": previous}
        left = f"previous is v{previous}" if previous else "no previous version left"
        assert capsys.readouterr().out.rstrip().endswith(f"-> v{champion} by {_who()}: back to v{champion}; {left}")
    assert cli.main(["rollback", "--reason", "once more"]) == 2
    # A promotion after rollbacks: what it replaced is previous again.
    registry.promote(NAME, "4", reason="fixed", who="bob")
    assert _aliases() == {"champion": "4", "previous": "1"}
    registry.rollback(NAME, reason="not fixed", who="bob")
    assert _aliases() == {"champion": "1", "previous": None}
    # Back to a version whose own promotion replaced the champion it leaves: previous is removed, and
    # the command said "previous is v3" when there was none.
    for v in ("3", "2", "3"):
        registry.promote(NAME, v, reason="swap", who="bob")
    capsys.readouterr()
    assert cli.main(["rollback", "--reason", "back"]) == 0
    assert _aliases() == {"champion": "2", "previous": None}
    assert capsys.readouterr().out.rstrip().endswith("-> v2 by " + _who() + ": back; no previous version left")


def test_the_move_history_only_grows_each_move_a_tag_that_fits_the_stores_column(tmp_path, capsys):
    """The history was one tag of the newest moves that fit 5,000 characters: one long --reason
    dropped every older move, and the next move dropped the long one."""
    v1, v2 = (_register(tmp_path, t) for t in "12")
    c = registry.client()
    # Moves recorded before each had its own tag (champion.history) come first, kept as they were.
    legacy = [registry._event("promote", "gate", f"night {n}", None if n == 0 else "1", "1") for n in range(3)]
    c.set_registered_model_tag(NAME, registry.LEGACY_HISTORY_TAG, json.dumps(legacy))
    registry.move_champion(NAME, v1, expected=None, reason="first", who="gate")
    long = "x" * (registry.REASON_MAX + 1)
    assert cli.main(["promote", "--version", v2, "--reason", long, "--who", "longy"]) == 2
    err = capsys.readouterr().err
    assert f"--reason is {len(long):,} characters; the registry keeps at most 1,000" in err
    assert "fix: give a shorter --reason" in err and _aliases()["champion"] == v1  # nothing moved
    assert cli.main(["rollback", "--reason", long]) == 2
    # A Latin-1 terminal's byte (Python's lone surrogate) moved the champion, then failed to record it.
    assert cli.main(["promote", "--version", v2, "--reason", "caf\udce9", "--who", "longy"]) == 2
    assert "--reason is not UTF-8 (character 4: b'\\xe9'); nothing moved" in capsys.readouterr().err
    assert cli.main(["promote", "--version", v2, "--reason", "ok", "--who", "caf\udce9"]) == 2
    assert _aliases()["champion"] == v1
    assert registry.move_tag(registry._event("promote", "script", "caf\udce9", "1", "2")).encode("utf-8")
    for n in range(30):
        registry.move_champion(NAME, "21"[n % 2], expected="12"[n % 2], reason=f"move {n} " + "é" * 150, who="gate")
    # A move made without the CLI's check, its reason too long for the column even escaped: cut, kept.
    registry.move_champion(NAME, v2, expected=v1, reason="é€" * 4000, who="script")
    events = registry.history(NAME)
    assert events[:3] == legacy and events[3]["reason"] == "first"
    assert [e["reason"] for e in events[4:-1]] == [f"move {n} " + "é" * 150 for n in range(30)]
    assert events[-1]["who"] == "script" and events[-1]["reason"].endswith(" [cut]")
    # Within the limit, any script: kept whole (as \\uXXXX escapes, 1,000 characters of Chinese were cut to nothing).
    cjk = registry._event("promote", "lin", "回" * registry.REASON_MAX, "1", "2")
    assert json.loads(tag := registry.move_tag(cjk))["reason"] == "回" * 1000 and len(tag) <= registry.TAG_VALUE_MAX
    moves = {k: v for k, v in c.get_registered_model(NAME).tags.items() if k.startswith(registry.MOVE_TAG)}
    assert len(moves) == 32 and max(len(v) for v in moves.values()) <= registry.TAG_VALUE_MAX
    assert len(c.get_model_version(NAME, v2).tags["champion.promote"]) <= registry.TAG_VALUE_MAX


def test_a_move_is_recorded_at_the_time_the_alias_moved(tmp_path, monkeypatch):
    """Stamped before the calls that move it (14 s against the stack's server), the record said "champion
    since" a time the old champion still served."""
    import time
    from datetime import UTC, datetime

    from mlflow import MlflowClient

    v1 = _register(tmp_path, "1")
    real, moved = MlflowClient.set_registered_model_alias, []

    def slow(self, name, alias, version):
        time.sleep(0.3)  # a server's round trip
        real(self, name, alias, version)
        moved.append(datetime.now(UTC))

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", slow)
    event = registry.move_champion(NAME, v1, expected=None, reason="first", who="gate")
    assert datetime.fromisoformat(event["at"]) >= moved[-1]
    assert registry.history(NAME)[-1]["at"] == event["at"]


def test_a_retry_records_the_move_its_first_try_made_but_did_not_record(tmp_path):
    v1, v2 = (_register(tmp_path, t) for t in "12")
    registry.move_champion(NAME, v1, expected=None, reason="first", who="gate")
    # The first try moved the aliases, then died before writing the history (as registry does, in order).
    registry.client().set_registered_model_alias(NAME, "previous", v1)
    registry.client().set_registered_model_alias(NAME, "champion", v2)

    again = registry.move_champion(NAME, v2, expected=v1, reason="better", who="gate")

    assert again["already"] is True
    assert [(e["from"], e["to"], e["reason"]) for e in registry.history(NAME)] == [
        (None, "1", "first"),
        ("1", "2", "better"),
    ]
    assert json.loads(registry.client().get_model_version(NAME, v2).tags["champion.promote"])["reason"] == "better"
    registry.move_champion(NAME, v2, expected=v1, reason="better", who="gate")  # and only once
    assert len(registry.history(NAME)) == 2


def test_an_unreachable_registry_is_an_error_not_an_empty_one(monkeypatch):
    # Read as "no champion", an outage would warm-start from random weights, gate against nothing
    # and rewrite champion.history with one move: it must fail (and the task retry) instead.
    import socket

    from mlflow.exceptions import MlflowException

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for call in (registry.champion, registry.history):
        with pytest.raises(MlflowException, match=str(port)):
            call(NAME)


def test_a_download_that_fails_verification_leaves_the_folder_as_it_was(tmp_path):
    from urllib.parse import urlparse

    from encoderflow.errors import EncoderflowError

    v1, v2 = _register(tmp_path, "1"), _register(tmp_path, "2")
    dst = tmp_path / "serving" / "current"
    assert (registry.download_version(NAME, v1, dst) / "classifier.keras").read_text() == "clf-1"
    stored = Path(urlparse(registry.client().get_model_version(NAME, v2).source).path)
    (stored / "classifier.keras").write_text("clf-2, altered in the store")

    with pytest.raises(EncoderflowError, match="classifier.keras"):
        registry.download_version(NAME, v2, dst)

    assert (dst / "classifier.keras").read_text() == "clf-1"  # the old bundle, whole
    assert sorted(p.name for p in dst.parent.iterdir()) == ["current"]  # and no partial download beside it


class _BasicAuthStore:
    """What ``make stack``'s MLflow (basic auth) answered, as the pipeline's worker: 403 to any lookup
    under a registered model that does not exist, RESOURCE_DOES_NOT_EXIST for the model itself."""

    def __init__(self, models: set[str]):
        self.models = models

    @staticmethod
    def _error(message: str, code: str):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ErrorCode

        return MlflowException(message, error_code=ErrorCode.Value(code))

    def get_model_version_by_alias(self, name, alias):
        raise self._error("Permission denied", "PERMISSION_DENIED")

    def get_registered_model(self, name):
        if name not in self.models:
            raise self._error(f"Registered Model with name={name} not found", "RESOURCE_DOES_NOT_EXIST")
        return self


def test_a_403_under_a_model_that_does_not_exist_is_absence_and_otherwise_an_error(monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(registry, "client", lambda: _BasicAuthStore(models=set()))
    assert registry.champion(NAME) is None  # a first run: nothing registered yet
    monkeypatch.setattr(registry, "client", lambda: _BasicAuthStore(models={NAME}))
    with pytest.raises(MlflowException, match="Permission denied"):  # the model is there: a real refusal
        registry.champion(NAME)


def test_unknown_version_and_empty_history_are_clear_errors(tmp_path, capsys):
    _register(tmp_path, "1")
    assert cli.main(["promote", "--version", "9", "--reason", "typo"]) == 2
    err = capsys.readouterr().err
    assert "no version 9 in " in err and "; its versions: [1]; fix: give --version one of them" in err
    assert cli.main(["rollback"]) == 2
    assert "no 'previous' version" in capsys.readouterr().err


def test_a_person_cannot_make_a_damaged_version_champion(tmp_path, capsys):
    """promote moved the alias onto a version whose files were altered in the store; a warm serving
    copy hid it until another host served it."""
    from urllib.parse import urlparse

    v1, v2 = _register(tmp_path, "1"), _register(tmp_path, "2")
    registry.move_champion(NAME, v1, expected=None, reason="first", who="gate")
    assert cli.main(["promote", "--version", v2, "--reason", "checked", "--who", "erin"]) == 0
    assert (registry.serving_folder(NAME, v2) / "classifier.keras").read_text() == "clf-2"  # fetched, verified
    assert cli.main(["rollback", "--reason", "back"]) == 0
    capsys.readouterr()
    stored = Path(urlparse(registry.client().get_model_version(NAME, v2).source).path)
    (stored / "classifier.keras").write_text("clf-2, altered in the store")
    assert cli.main(["promote", "--version", v2, "--reason", "again", "--who", "erin"]) == 2
    err = capsys.readouterr().err
    assert f"models:/{NAME}/{v2}: classifier.keras" in err and "fix: serve another version" in err
    assert _aliases() == {"champion": v1, "previous": None}
    assert (registry.serving_folder(NAME, v2) / "classifier.keras").read_text() == "clf-2"  # left as it was


def test_a_person_whose_move_loses_a_race_is_told_so_not_to_clear_a_gate(tmp_path, monkeypatch):
    v1, v2, v3 = (_register(tmp_path, t) for t in "123")
    registry.move_champion(NAME, v1, expected=None, reason="first", who="gate")
    looked, calls = registry.champion, []

    def before_someone_moved_it(name):  # this promote's first look saw v3; then v1 is champion again
        calls.append(name)
        return {**looked(name), "version": v3} if len(calls) == 1 else looked(name)

    monkeypatch.setattr(registry, "champion", before_someone_moved_it)
    with pytest.raises(registry.StaleChampion) as stale:
        registry.promote(NAME, v2, reason="mine", who="bob")
    said = f"{NAME}: the champion moved to v1 (from v3) while this promote ran; nothing moved"
    assert str(stale.value).startswith(said)
    assert "run the command again" in stale.value.fix and "evaluate_and_gate" not in stale.value.fix


def test_a_version_blessed_by_a_later_run_carries_that_decision(tmp_path):
    """A rejected candidate's model, blessed by a later run that reused it, served as champion while
    its version said gate.blessed=false."""
    first = _register(tmp_path, "1", blessed=False)
    c = registry.client()
    assert c.get_model_version(NAME, first).tags["gate.check.floor"] == "FAIL: x"
    blessed = {
        "blessed": True,
        "reasons": [],
        "candidate": 0.9,
        "checks": [{"name": "champion", "passed": True, "detail": "y"}],
    }
    tags = {"airflow.run_id": "run-later", "airflow.dag_id": "encoder_pretraining"}
    got = registry.log_candidate(NAME, _bundle(tmp_path / "later", "1"), {}, {}, {}, tags, blessed)
    assert got["version"] == first
    now = c.get_model_version(NAME, first).tags
    assert now["gate.blessed"] == "true" and now["gate.decided_in"] == "run-later"
    assert now["gate.check.champion"] == "pass: y" and "gate.check.floor" not in now  # the old decision's
    assert now["airflow.run_id"] == "run-1"  # who registered it stays
    # A later rejection of the same model ("nothing new to promote") leaves the blessing it serves under.
    rejected = {"blessed": False, "reasons": ["model: own"], "checks": []}
    again = {"airflow.run_id": "run-again", "airflow.dag_id": "encoder_pretraining"}
    registry.log_candidate(NAME, _bundle(tmp_path / "again", "1"), {}, {}, {}, again, rejected)
    assert c.get_model_version(NAME, first).tags["gate.decided_in"] == "run-later"
    # Nor does a cleared gate of the run that registered it, rejecting it again.
    registry.log_candidate(NAME, _bundle(tmp_path / "retry", "1"), {}, {}, {}, {"airflow.run_id": "run-1"}, rejected)
    now = c.get_model_version(NAME, first).tags
    assert now["gate.blessed"] == "true" and now["gate.decided_in"] == "run-later"


def test_version_tags_carry_the_gate_decision(tmp_path):
    version = _register(tmp_path, "1", blessed=False)
    tags = registry.client().get_model_version(NAME, version).tags
    assert tags["gate.blessed"] == "false"
    assert tags["gate.reasons"] == "floor: 0.4 < 0.5"
    assert tags["gate.check.floor"] == "FAIL: x"
    assert tags["airflow.run_id"] == "run-1"
    # The figures under the metrics' one name each, as in summary.json and the run's MLflow metrics.
    assert (tags["gate.val_accuracy"], tags["gate.baseline_val_accuracy"]) == ("0.9", "0.8")
    # No champion yet: no champion tags (they read "None" before).
    assert not {"gate.champion_val_accuracy", "gate.champion_version"} & set(tags)
    run = registry.client().get_run(registry.client().get_model_version(NAME, version).run_id)
    assert run.data.metrics["val_accuracy"] == 0.9


def test_a_champion_tagged_before_the_metrics_rename_reads_under_todays_names(tmp_path):
    version = _register(tmp_path, "1")
    c = registry.client()
    for old, new in (
        ("gate.candidate_accuracy", "gate.val_accuracy"),
        ("gate.champion_accuracy", "gate.champion_val_accuracy"),
    ):
        c.set_model_version_tag(NAME, version, old, c.get_model_version(NAME, version).tags.get(new, "0.85"))
        c.delete_model_version_tag(NAME, version, new)
    registry.move_champion(NAME, version, expected=None, reason="test", who="test")
    tags = registry.champion(NAME)["tags"]
    assert tags["gate.val_accuracy"] == "0.9" and "gate.candidate_accuracy" not in tags
    assert tags["gate.champion_val_accuracy"] == "0.85" and "gate.champion_accuracy" not in tags


def _child(script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` in a process of its own (one that may die), on this test's registry."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=os.environ.copy(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


KILL_BETWEEN_STEPS = r"""
import os, signal, sys
from mlflow import MlflowClient
from encoderflow import registry
real = MlflowClient.set_registered_model_alias
def crash_before_champion(self, name, alias, version):
    if alias == "champion":
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies between the two alias moves
    return real(self, name, alias, version)
MlflowClient.set_registered_model_alias = crash_before_champion
registry.move_champion(sys.argv[1], sys.argv[2], expected=sys.argv[3], reason="killed", who="test")
"""


def test_promote_killed_between_steps_leaves_champion_on_a_complete_version(tmp_path):
    v1, v2 = _register(tmp_path, "1"), _register(tmp_path, "2")
    registry.move_champion(NAME, v1, expected=None, reason="first", who="gate")
    proc = _child(KILL_BETWEEN_STEPS, NAME, v2, v1)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _aliases()["champion"] == "1"
    served = registry.download_version(NAME, "@champion", tmp_path / "serve")
    assert (served / "classifier.keras").read_text() == "clf-1"
    # A later attempt, from the state the crash left, completes normally.
    registry.move_champion(NAME, v2, expected=v1, reason="retry", who="gate")
    assert _aliases() == {"champion": "2", "previous": "1"}


def test_rollback_after_a_promotion_killed_between_its_steps_goes_back_not_nowhere(tmp_path, capsys):
    """The kill leaves previous == champion: rollback printed "v2 -> v2" and recorded it."""
    v1, v2, v3 = (_register(tmp_path, t) for t in "123")
    registry.move_champion(NAME, v1, expected=None, reason="first", who="gate")
    registry.move_champion(NAME, v2, expected=v1, reason="better", who="gate")
    proc = _child(KILL_BETWEEN_STEPS, NAME, v3, v2)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _aliases() == {"champion": "2", "previous": "2"}
    assert cli.main(["rollback", "--reason", "v2 misbehaves"]) == 0
    assert "champion v2 -> v1" in capsys.readouterr().out
    assert _aliases() == {"champion": "1", "previous": None}
    assert [(e["action"], e["from"], e["to"]) for e in registry.history(NAME)][-1] == ("rollback", "2", "1")


RACE = r"""
import sys
from encoderflow import registry
try:
    registry.move_champion("encoderflow-sst2", sys.argv[1], expected=sys.argv[2], reason="race", who=sys.argv[1])
except registry.StaleChampion:
    sys.exit(3)
"""


def _waits_on_a_flock(pid: int) -> bool:
    """Whether ``pid`` is blocked on an flock: the kernel lists its request in /proc/locks with ``->``."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and str(pid) in fields:
            return True
    return False


def test_two_runs_finishing_together_cannot_both_win(tmp_path):
    """One run holds the promotion lock and moves the champion; the other, which decided against the
    old champion, waits for the lock (seen in /proc/locks, not guessed from timing), then refuses."""
    import time

    v1, v2, v3 = (_register(tmp_path, t) for t in "123")
    registry.move_champion(NAME, v1, expected=None, reason="first", who="gate")
    with registry.promotion_lock():
        proc = subprocess.Popen(
            [sys.executable, "-c", RACE, v2, v1], env=os.environ.copy(), cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 120
            while not _waits_on_a_flock(proc.pid):
                assert proc.poll() is None, f"the second run did not wait for the lock: {proc.stderr.read()[-1500:]}"
                assert time.monotonic() < deadline, "the second run never reached the lock"
                time.sleep(0.05)
            # The first run's move, made while it holds the lock.
            registry.client().set_registered_model_alias(NAME, "champion", v3)
        except BaseException:
            proc.kill()
            raise
    assert proc.wait(timeout=120) == 3, proc.stderr.read()[-1500:]
    assert _aliases()["champion"] == v3


def test_a_retry_of_the_same_airflow_run_registers_no_second_version(tmp_path):
    first = _register(tmp_path, "1")
    decision = {"blessed": True, "reasons": [], "checks": []}
    again = registry.log_candidate(
        NAME, _bundle(tmp_path / "retry", "1"), {}, {}, {}, {"airflow.run_id": "run-1"}, decision
    )
    assert again["version"] == first
    assert len(registry.client().search_model_versions(f"name='{NAME}'")) == 1


def test_a_candidate_retrained_within_the_same_airflow_run_gets_a_version_of_its_own(tmp_path, caplog):
    """A cleared ``finetune`` trains another model in the same Airflow run: reusing the run's first
    version would let the gate's decision on the new model promote the old one."""
    first = _register(tmp_path, "1")
    decision = {"blessed": True, "reasons": [], "checks": []}
    caplog.clear()
    with caplog.at_level("INFO", logger="encoderflow.registry"):
        retrained = registry.log_candidate(
            NAME, _bundle(tmp_path / "retrained", "1b"), {}, {}, {}, {"airflow.run_id": "run-1"}, decision
        )
    assert retrained["version"] != first
    c = registry.client()
    tags = {str(v.version): v.tags["bundle.sha256"] for v in c.search_model_versions(f"name='{NAME}'")}
    assert tags == {
        first: bundle.identity(tmp_path / "b1"),
        retrained["version"]: bundle.identity(tmp_path / "retrained"),
    }
    assert tags[first] != tags[retrained["version"]]
    assert f"v{first}, registered earlier in run-1, holds another candidate" in caplog.text
    served = registry.download_version(NAME, retrained["version"], tmp_path / "serve")
    assert (served / "classifier.keras").read_text() == "clf-1b"
    # and a retry of that second promote reuses the second version, not the first
    again = registry.log_candidate(
        NAME, _bundle(tmp_path / "retry", "1b"), {}, {}, {}, {"airflow.run_id": "run-1"}, decision
    )
    assert again["version"] == retrained["version"]
    assert registry.registered_for_run(NAME, "run-1", dag_id=None, bundle_sha256=tags[first])["version"] == first


def test_a_candidate_that_is_a_registered_model_already_gets_no_second_version(tmp_path, caplog):
    """A scheduled run that reuses an earlier run's rejected candidate would register a byte-identical
    version (and upload its bundle) on every run: the version holding the model is its version."""
    first = _register(tmp_path, "1")
    decision = {"blessed": False, "reasons": ["floor: 0.4 < 0.5"], "checks": []}
    tags = {"airflow.run_id": "run-again", "airflow.dag_id": "encoder_pretraining"}
    caplog.clear()
    with caplog.at_level("INFO", logger="encoderflow.registry"):
        again = registry.log_candidate(
            NAME, _bundle(tmp_path / "again", "1"), {}, {"val_accuracy": 0.4}, {}, tags, decision
        )
    assert again["version"] == first
    c = registry.client()
    assert [str(v.version) for v in c.search_model_versions(f"name='{NAME}'")] == [first]
    assert f"this candidate is {NAME} v{first}'s model" in caplog.text and "run-1" in caplog.text
    # Its MLflow run holds this run's record, not a second copy of the bundle.
    run = c.get_run(again["run_id"])
    assert run.data.tags["registry.version"] == first and run.data.metrics["val_accuracy"] == 0.4
    assert sorted(a.path for a in c.list_artifacts(again["run_id"])) == ["gate.json"]
    # A retry of that promote, and a cleared gate's lookup, find it, and still add nothing.
    assert registry.log_candidate(NAME, _bundle(tmp_path / "retry", "1"), {}, {}, {}, tags, decision) == again
    identity = bundle.identity(tmp_path / "again")
    assert registry.registered_for_run(NAME, "run-again", bundle_sha256=identity)["version"] == first
    experiments = [e.experiment_id for e in c.search_experiments()]
    assert len(c.search_runs(experiments, filter_string="tags.`airflow.run_id` = 'run-again'")) == 1
    assert len(c.search_model_versions(f"name='{NAME}'")) == 1
    # Held by two versions (registered before the tag was read, say): the champion's is the one.
    held = c.get_model_version(NAME, first)
    second = c.create_model_version(NAME, source=held.source, run_id=held.run_id, tags={"bundle.sha256": identity})
    registry.move_champion(NAME, first, expected=None, reason="first", who="airflow")
    later = {"airflow.run_id": "run-later", "airflow.dag_id": "encoder_pretraining"}
    assert (
        registry.log_candidate(NAME, _bundle(tmp_path / "later", "1"), {}, {}, {}, later, decision)["version"] == first
    )
    registry.move_champion(NAME, str(second.version), expected=first, reason="x", who="airflow")
    latest = {"airflow.run_id": "run-latest", "airflow.dag_id": "encoder_pretraining"}
    got = registry.log_candidate(NAME, _bundle(tmp_path / "latest", "1"), {}, {}, {}, latest, decision)
    assert got["version"] == str(second.version)


def test_two_runs_registering_the_same_model_at_once_make_one_version(tmp_path, monkeypatch):
    """Both gates saw no version holding the model; the other run's promote registers it while this
    one uploads: this one finds it under the promotion lock and registers none."""
    import mlflow

    c = registry.client()
    candidate = _bundle(tmp_path / "b", "1")
    real = mlflow.log_artifacts
    other = {}

    def upload_while_another_registers(*args, **kwargs):
        real(*args, **kwargs)
        active = mlflow.active_run().info
        c.create_registered_model(NAME)
        tags = {"bundle.sha256": bundle.identity(candidate), "airflow.run_id": "run-other"}
        other["version"] = str(
            c.create_model_version(NAME, f"{active.artifact_uri}/bundle", active.run_id, tags=tags).version
        )

    monkeypatch.setattr(mlflow, "log_artifacts", upload_while_another_registers)
    decision = {"blessed": True, "reasons": [], "checks": []}
    got = registry.log_candidate(NAME, candidate, {}, {}, {}, {"airflow.run_id": "run-this"}, decision)
    assert got["version"] == other["version"] and got["registered_by"] == "run-other"
    assert [str(v.version) for v in c.search_model_versions(f"name='{NAME}'")] == [other["version"]]
    assert c.get_run(got["run_id"]).data.tags["registry.version"] == other["version"]


def test_runs_fetching_the_champion_store_its_files_once(tmp_path):
    version = _register(tmp_path, "1")
    a = registry.fetch_verified(NAME, version, tmp_path / "run-a" / "champion")
    b = registry.fetch_verified(NAME, version, tmp_path / "run-b" / "champion")
    for name in ("classifier.keras", "encoder.keras", "vocab.txt", "bundle.json"):
        assert os.path.samefile(a / name, b / name)
    assert (b / "classifier.keras").read_text() == "clf-1" and bundle.damage(b) is None


def test_a_copy_whose_bundle_json_was_edited_is_fetched_again_not_served(tmp_path, caplog):
    """QA: the labels swapped in a served copy's bundle.json printed inverted answers, exit 0 (its files'
    sha256s still matched it); a config edited there passed to the warm-start check. And the copy is
    one inode with every run's champion folder (share_identical): the edit reached them all."""
    version = _register(tmp_path, "1")
    served = registry.fetch_verified(NAME, version, tmp_path / "serving")
    run = registry.fetch_verified(NAME, version, tmp_path / "run-a" / "champion")
    registered = (served / "bundle.json").read_bytes()
    for edit in ({"labels": ["1", "0"]}, {"config": {"model": {"num_layers": 3}}}):
        meta = json.loads(registered)
        with open(served / "bundle.json", "r+") as f:  # in place, as an editor may write
            f.seek(0)
            f.write(json.dumps({**meta, **edit}))
            f.truncate()
        assert (run / "bundle.json").read_bytes() != registered  # the same file
        assert bundle.damage(served) is None  # its files' sha256s alone do not tell
        caplog.clear()
        again = registry.fetch_verified(NAME, version, tmp_path / "serving")
        assert (again / "bundle.json").read_bytes() == registered, edit
        assert "is not the registered bundle (bundle.json: altered (sha256 differs from the version's" in caplog.text
        assert (
            registry.fetch_verified(NAME, version, tmp_path / "run-a" / "champion").joinpath("bundle.json").read_bytes()
            == registered
        )
    # The store's own copy altered: refused by name, never served.
    stored = registry.local_artifacts(registry.client().get_model_version(NAME, version).source.rsplit("/bundle", 1)[0])
    meta_file = next(p for p in stored.rglob("bundle.json"))
    os.unlink(meta_file)
    meta_file.write_text(json.dumps({**json.loads(registered), "labels": ["1", "0"]}))
    with pytest.raises(EncoderflowError, match=r"models:/encoderflow-sst2/\d+: bundle.json: altered \(sha256 differs"):
        registry.download_version(NAME, version, tmp_path / "elsewhere")


def test_a_copied_homes_store_that_writes_into_the_original_home_is_refused_before_training(tmp_path, monkeypatch):
    """QA: in a `cp -a` of a home, new runs wrote their model files into the original home's store (the
    experiment's artifact folder is recorded once) and served from there."""
    import shutil

    from encoderflow import layout

    _register(tmp_path, "1")
    registry.check_store_in_place()  # where it was made: fine
    copy = tmp_path / "copy"
    shutil.copytree(layout.home(), copy)
    monkeypatch.setenv("ENCODERFLOW_HOME", str(copy))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # client() exported the original's
    with pytest.raises(EncoderflowError) as err:
        registry.check_store_in_place()
    original = (tmp_path / "efhome" / "mlflow" / "artifacts").resolve().as_uri()
    assert f"keeps its artifacts in {original}, not in {copy / 'mlflow' / 'artifacts'}: it was made in another" in str(
        err.value
    )
    assert f"move {copy / 'mlflow'} aside" in err.value.fix


def test_a_retry_after_registering_failed_reuses_the_finished_mlflow_run(tmp_path, monkeypatch):
    """The try logged its run in full, then the registry call failed (MLflow down a moment): the retry
    registers that run, and the experiment holds one run for the Airflow run, not one per try."""
    from mlflow import MlflowClient

    real = MlflowClient.create_model_version
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("registry unreachable")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_model_version", flaky)
    decision = {"blessed": True, "reasons": [], "checks": []}
    tags = {"airflow.run_id": "run-7", "airflow.dag_id": "encoder_pretraining"}
    with pytest.raises(ConnectionError):
        registry.log_candidate(NAME, _bundle(tmp_path / "b", "7"), {}, {"val_accuracy": 0.9}, {}, tags, decision)
    retry = registry.log_candidate(NAME, _bundle(tmp_path / "b2", "7"), {}, {"val_accuracy": 0.9}, {}, tags, decision)

    c = registry.client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(experiments, filter_string="tags.`airflow.run_id` = 'run-7'")
    assert [r.info.run_id for r in runs] == [retry["run_id"]] and runs[0].info.status == "FINISHED"
    assert [str(v.version) for v in c.search_model_versions(f"name='{NAME}'")] == [retry["version"]]
    served = registry.download_version(NAME, retry["version"], tmp_path / "serve")
    assert (served / "classifier.keras").read_text() == "clf-7"


KILL_MID_UPLOAD = r"""
import os, signal, sys
import mlflow
from encoderflow import registry
from tests.test_bundle import fake_bundle
from pathlib import Path
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # the worker dies while the bundle uploads
mlflow.log_artifacts = die
decision = {"blessed": True, "reasons": [], "checks": []}
tags = {"airflow.run_id": "run-9"}
registry.log_candidate(sys.argv[1], fake_bundle(Path(sys.argv[2]), "1"), {}, {}, {}, tags, decision)
"""


def test_a_try_killed_mid_upload_leaves_a_killed_run_and_the_retry_one_version(tmp_path):
    proc = _child(KILL_MID_UPLOAD, NAME, str(tmp_path / "killed"))
    assert proc.returncode == -9, proc.stderr[-2000:]
    c = registry.client()
    [ghost] = c.search_runs([registry._experiment_id(c)])
    assert ghost.info.status == "RUNNING"  # what the kill left

    decision = {"blessed": True, "reasons": [], "checks": []}
    again = registry.log_candidate(
        NAME, _bundle(tmp_path / "retry", "1"), {}, {}, {}, {"airflow.run_id": "run-9"}, decision
    )

    runs = {r.info.run_id: r.info.status for r in c.search_runs([registry._experiment_id(c)])}
    assert runs == {ghost.info.run_id: "KILLED", again["run_id"]: "FINISHED"}
    assert [str(v.version) for v in c.search_model_versions(f"name='{NAME}'")] == [again["version"]]


def test_decision_tags_carry_the_gate_intervals():
    import numpy as np

    from encoderflow import gate
    from encoderflow.config import GateConfig

    n = 872
    champion = np.arange(n) % 5 != 0  # right on 4 of 5 sentences
    candidate = champion.copy()
    candidate[np.flatnonzero(~champion)[:30]] = True  # and on 30 more
    intervals = gate.bootstrap(candidate, champion, resamples=2000, seed=42)
    decision = gate.decide(
        float(candidate.mean()),
        0.75,
        float(champion.mean()),
        GateConfig(require_significant_gain=True),
        "4",
        intervals,
    )
    tags = registry.decision_tags(json.loads(json.dumps(decision.to_dict())))
    diff, cand = intervals.candidate_minus_champion, intervals.candidate
    assert tags["gate.candidate_minus_champion_ci"] == f"[{diff.low:+.4f}, {diff.high:+.4f}]"
    assert tags["gate.val_accuracy_ci"] == f"[{cand.low:.4f}, {cand.high:.4f}]"
    assert tags["gate.champion_val_accuracy_ci"].startswith("[0.7")
    assert "gate.baseline_val_accuracy_ci" not in tags  # no per-sentence baseline predictions given
    assert tags["gate.intervals"] == "95% paired bootstrap over 872 dev sentences, 2000 resamples, seed 42"
    assert tags["gate.check.significance"].startswith("pass: vs champion v4: candidate - champion +0.0344")
    # A decision recorded before the gate had intervals gets no interval tags.
    assert not any("_ci" in k for k in registry.decision_tags({"blessed": True, "reasons": [], "checks": []}))


def test_a_wrong_model_name_or_home_is_named_not_read_as_no_champion(tmp_path, capsys):
    """A typo or another ENCODERFLOW_HOME said "no champion yet" and left an empty store behind."""
    from encoderflow import layout

    for argv in (["predict", "a fine film"], ["rollback"], ["promote", "--version", "1", "--reason", "r"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"no MLflow store at {layout.mlflow_dir() / 'mlflow.db'} (ENCODERFLOW_HOME={layout.home()})" in err
        assert "fix: set ENCODERFLOW_HOME to the folder your runs used" in err
    assert not layout.mlflow_dir().exists()  # nothing created by asking

    _register(tmp_path, "1", blessed=False)
    for argv in (["predict", "x"], ["rollback"], ["promote", "--version", "1", "--reason", "r"]):
        assert cli.main([*argv, "--model", "encoderflow-sts2"]) == 2
        err = capsys.readouterr().err
        assert f"no registered model 'encoderflow-sts2' at {registry.tracking_uri()}; registered: ['{NAME}']" in err
        assert "fix: --model <one of them>" in err
    assert cli.main(["predict", "a fine film"]) == 2  # the right name, no champion yet
    assert f"registered model '{NAME}' has no champion yet" in capsys.readouterr().err


def test_a_store_moved_away_from_its_artifacts_says_so_when_serving(tmp_path, monkeypatch):
    import shutil

    from encoderflow import layout
    from encoderflow.errors import EncoderflowError

    registry.move_champion(NAME, _register(tmp_path, "1"), expected=None, reason="first", who="gate")
    moved = tmp_path / "moved"
    shutil.move(layout.home(), moved)
    monkeypatch.setenv("ENCODERFLOW_HOME", str(moved))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the old home's, exported by MLflow in this process
    with pytest.raises(EncoderflowError) as err:
        registry.download_version(NAME, "@champion", tmp_path / "serve")
    assert str(err.value).startswith(f"models:/{NAME}@champion (v1): nothing was downloaded from its source file://")
    assert "the store records its artifacts' absolute paths" in err.value.fix
    assert not (tmp_path / "serve").exists()


def test_a_registry_command_against_a_server_that_does_not_answer_fails_in_seconds_in_one_line(monkeypatch, capsys):
    import socket
    import time

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    import mlflow.tracking  # noqa: F401 - imported before the clock starts: a loaded machine takes seconds

    t0 = time.monotonic()
    assert cli.main(["predict", "a fine film"]) == 2
    # One retry, about 2 s of backoff; MLflow's defaults (7 retries, backoff factor 2) retry for over 4 minutes.
    assert time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert err.startswith(f"encoderflow predict: MLflow at http://127.0.0.1:{port} failed: API request to ")
    assert "fix: check MLFLOW_TRACKING_URI and that the server is up" in err and "Traceback" not in err
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the CLI's setting ends with the command


def test_a_stopped_airflow_runs_mlflow_run_left_running_is_marked_killed(tmp_path):
    from encoderflow import DAG_ID, layout

    assert registry.close_stopped(DAG_ID, "manual__1") == [] and not layout.mlflow_dir().exists()  # no store made
    _register(tmp_path, "1")
    c = registry.client()
    exp = c.get_experiment_by_name(registry.EXPERIMENT).experiment_id
    stopped = c.create_run(exp, tags={"airflow.run_id": "manual__1", "airflow.dag_id": DAG_ID}).info.run_id
    other = c.create_run(exp, tags={"airflow.run_id": "manual__2", "airflow.dag_id": DAG_ID}).info.run_id
    assert registry.close_stopped(DAG_ID, "manual__1") == [stopped]
    assert c.get_run(stopped).info.status == "KILLED" and c.get_run(other).info.status == "RUNNING"
    assert registry.close_stopped(DAG_ID, "manual__1") == []  # once


def _saved_at(root: Path, weights: str, when: str, address: int = 140704134309648) -> Path:
    """A bundle whose .keras files are zip archives as Keras writes them, saved at ``when`` by a process
    whose shared embedding sits at ``address`` (Keras writes the ``id()`` as ``shared_object_id``)."""
    import zipfile

    root.mkdir(parents=True)
    shared = {"class_name": "ReversibleEmbedding", "shared_object_id": address}
    for name in ("classifier.keras", "encoder.keras"):
        with zipfile.ZipFile(root / name, "w") as z:
            z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1", "date_saved": when}))
            z.writestr("config.json", json.dumps({"name": name, "layers": [shared, {"inbound": [shared]}]}))
            z.writestr("model.weights.h5", f"{name}-{weights}")
    (root / "vocab.txt").write_text("[PAD]\n")
    bundle.seal(root)
    return root


def test_a_model_trained_again_to_the_same_weights_is_the_registered_one(tmp_path, caplog):
    """Other bytes (Keras's save time), the same weights: no second version, and the gate sees the
    champion's own model instead of a new one to bless on a tie."""
    decision = {"blessed": True, "reasons": [], "checks": []}
    first_dir = _saved_at(tmp_path / "first", "w1", "2026-12-01@10:00:00")
    first = registry.log_candidate(NAME, first_dir, {}, {}, {}, {"airflow.run_id": "run-1"}, decision)["version"]
    registry.move_champion(NAME, first, expected=None, reason="first", who="airflow")
    again_dir = _saved_at(tmp_path / "again", "w1", "2026-12-07@10:00:00", address=140488161218384)
    assert bundle.identity(again_dir) != bundle.identity(first_dir)
    content = bundle.content_identity(again_dir)
    held = registry.versions_of_model(NAME, bundle.identity(again_dir), content)
    assert held == [{"version": first, "demoted": None}]
    from encoderflow import gate

    check = gate.model_check(held, first)
    assert not check.passed and "own model: nothing new to promote" in check.detail
    caplog.clear()
    with caplog.at_level("INFO", logger="encoderflow.registry"):
        again = registry.log_candidate(NAME, again_dir, {}, {}, {}, {"airflow.run_id": "run-2"}, decision)
    assert again["version"] == first and again["registered_by"] == "run-1"
    assert len(registry.client().search_model_versions(f"name='{NAME}'")) == 1
    # Retrained to other weights within run-2 (a cleared finetune): a version of its own.
    other = _saved_at(tmp_path / "other", "w2", "2026-12-07@11:00:00")
    assert registry.versions_of_model(NAME, bundle.identity(other), bundle.content_identity(other)) == []
    assert registry.log_candidate(NAME, other, {}, {}, {}, {"airflow.run_id": "run-2"}, decision)["version"] != first


def test_runs_says_who_made_the_champion_when_and_why_and_each_alias_once(tmp_path):
    """`encoderflow runs` showed which version was champion but not who moved it there, or why; and a
    second tracking URI for the same store listed every alias twice."""
    from encoderflow import layout, runs

    v1, v2 = (_register(tmp_path, t) for t in "12")
    registry.move_champion(NAME, v1, expected=None, reason="gate blessed run-1", who="airflow")
    registry.promote(NAME, v2, reason="hand-checked on the new slice", who="alice")
    same_store = registry.embedded_uri().replace("/mlflow/", "//mlflow/")  # another spelling of one database
    layout.write_json(layout.run_dir("run-2") / "summary.json", {"registry": {"tracking_uri": same_store}})
    aliased, said, stores = runs.aliased_versions(layout.home())
    assert len(stores) == 2 and len(aliased) == 4
    first, moved = said.split("\n")
    assert first.endswith(f": {NAME} v2 (champion), {NAME} v1 (previous)") and first.count("(champion)") == 1
    day = registry.history(NAME)[-1]["at"][:10]
    assert moved.startswith(f"  {NAME} v2 is champion since {day} ")
    assert moved.endswith("UTC (promote from v1, by alice: 'hand-checked on the new slice')")


def _run_bundle(run: str, classifier: bytes, encoder: bytes) -> Path:
    """A bundle in a run folder of this home, as finetune writes it (big files: their blocks count)."""
    from encoderflow import layout

    root = layout.run_dir(run) / "finetune" / "bundle"
    root.mkdir(parents=True)
    (root / "classifier.keras").write_bytes(classifier)
    (root / "encoder.keras").write_bytes(encoder)
    (root / "vocab.txt").write_text("[PAD]\nfilm\n")
    bundle.seal(root)
    return root


def _log(root: Path, run: str, blessed: bool = False, **tags: str) -> dict:
    decision = {"blessed": blessed, "reasons": [] if blessed else ["floor: 0.4 < 0.5"], "checks": []}
    return registry.log_candidate(NAME, root, {}, {}, {}, {"airflow.run_id": run, **tags}, decision)


def _du(*paths: Path) -> int:
    """Bytes on disk as du counts them: allocated blocks, each hard-linked file once."""
    out = subprocess.run(["du", "-s", "-c", "-B1", *map(str, paths)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-2])


def _as_copies(*paths: Path) -> int:
    """What the same files took before they were stored once: each path its own copy."""
    return sum(p.stat().st_blocks * 512 for root in paths for p in root.rglob("*") if p.is_file())


def test_a_versions_files_are_stored_once_with_other_versions_identical_ones_never_with_a_run_folder(tmp_path):
    """Each version kept its whole bundle in the store, the same encoder.keras once per version fine-tuned
    from one pretraining (QA: 83 MB of a 110 MB home). Linked with the run folder's bundle too, a run
    folder's file rewritten in place (Keras's Model.save to the same path) damaged the champion."""
    from urllib.parse import urlparse

    from encoderflow import layout

    encoder = os.urandom(4 << 20)  # one pretraining, fine-tuned three times
    roots = [_run_bundle(f"run-{i}", os.urandom(1 << 20), encoder) for i in (1, 2, 3)]
    home, artifacts = layout.home(), layout.mlflow_dir() / "artifacts"
    as_copies = _as_copies(home / "runs")  # the store's copy of each run folder's files
    versions = [_log(root, f"run-{i}")["version"] for i, root in enumerate(roots, 1)]
    assert versions == ["1", "2", "3"]
    c = registry.client()
    stored = [Path(urlparse(c.get_model_version(NAME, v).source).path) for v in versions]
    for root, copy in zip(roots, stored, strict=True):
        assert os.path.samefile(copy / "encoder.keras", stored[0] / "encoder.keras")
        for name in ("encoder.keras", "classifier.keras", "bundle.json"):
            assert not os.path.samefile(copy / name, root / name) and (root / name).stat().st_nlink == 1
    assert (stored[0] / "encoder.keras").stat().st_nlink == 3  # three versions
    assert (stored[0] / "vocab.txt").stat().st_nlink == 3
    # One 4 MiB encoder and three 1 MiB classifiers in the store, where the copies took 15 MiB.
    assert as_copies >= 15 << 20 and _du(artifacts) < (7 << 20) + (256 << 10)
    assert not (home / "cache" / "files").exists()  # nothing shared with the copies predict serves
    for v in versions:  # served as registered, verified against bundle.json
        assert bundle.damage(registry.download_version(NAME, v, tmp_path / f"serve-{v}")) is None
    # A run folder's file rewritten in place leaves every version as registered.
    with open(roots[0] / "classifier.keras", "r+b") as f:
        f.write(b"re-saved")
    with open(roots[1] / "encoder.keras", "r+b") as f:
        f.write(b"re-saved")
    for v in versions:
        assert bundle.damage(registry.download_version(NAME, v, tmp_path / f"after-{v}")) is None

    # The caveat of one copy: a write in place alters every version holding it, and each is refused,
    # never served; the copies fetched to serve are not the store's and stay as they were.
    with open(stored[0] / "encoder.keras", "r+b") as f:
        f.write(b"bitrot")
    for v in versions:
        with pytest.raises(EncoderflowError, match=f"models:/{NAME}/{v}: encoder.keras"):
            registry.download_version(NAME, v, tmp_path / f"again-{v}")
        assert bundle.damage(tmp_path / f"serve-{v}") is None

    # A bundle outside the home (a folder of the user's, edited in place maybe) is not linked to.
    outside = _bundle(tmp_path / "outside", "4")
    version = _log(outside, "run-4")["version"]
    copy = Path(urlparse(c.get_model_version(NAME, version).source).path)
    assert (outside / "classifier.keras").stat().st_nlink == 1 == (copy / "classifier.keras").stat().st_nlink


@pytest.mark.slow
def test_a_version_logged_to_the_stacks_mlflow_server_is_stored_once_too(tmp_path, monkeypatch):
    """make stack's MLflow keeps artifacts on this machine (--artifacts-destination under the home):
    the registry knows where, from the stack's ports.json, and links them as the embedded store's."""
    import socket
    import time
    import urllib.request

    from encoderflow import layout

    home = layout.home()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    artifacts = home / "stack" / "mlflow" / "artifacts"
    artifacts.mkdir(parents=True)
    (home / "stack" / "ports.json").write_text(json.dumps({"mlflow": port}))
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{home / 'stack' / 'mlflow' / 'store.db'}"}
    command = registry.server_command(port, "--serve-artifacts", "--artifacts-destination", str(artifacts))
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        root = _run_bundle("run-1", os.urandom(1 << 20), os.urandom(1 << 20))
        got = _log(root, "run-1", blessed=True)
        assert got["source"].startswith("mlflow-artifacts:/")
        copy = registry.local_artifacts(got["source"])
        assert copy is not None and copy.is_relative_to(artifacts)
        # A second version of the same encoder: the server's copies are one, the run folders' their own.
        other = _run_bundle("run-2", os.urandom(1 << 20), (root / "encoder.keras").read_bytes())
        second = registry.local_artifacts(_log(other, "run-2")["source"])
        assert os.path.samefile(second / "encoder.keras", copy / "encoder.keras")
        for name in ("classifier.keras", "encoder.keras", "vocab.txt", "bundle.json"):
            assert not os.path.samefile(copy / name, root / name) and (root / name).stat().st_nlink == 1
        # Another server's, or a cloud store's, files are not this machine's to link.
        assert registry.local_artifacts("mlflow-artifacts://elsewhere:5000/1/abc/artifacts") is None
        assert registry.local_artifacts("s3://bucket/1/abc/artifacts") is None
    finally:
        # Its group: mlflow server runs uvicorn in a child. A loaded machine took over 30 s to end it.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
