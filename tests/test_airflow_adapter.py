"""``airflow_adapter``'s pieces that run inside a task, against Airflow's own task-side objects."""

from __future__ import annotations

import re

from airflow.sdk.execution_time.context import OutletEventAccessors

from encoderflow import airflow_adapter as af
from encoderflow import steps


def _events(accessors: OutletEventAccessors) -> list[tuple[str, str, dict]]:
    """The asset events the task runner would emit: (alias, asset, extra) per event added through an alias,
    and any extra set on an accessor directly (an event on that asset or alias)."""
    out = []
    for accessor in accessors.values():
        out += [(e.source_alias_name, e.dest_asset_key.name, e.extra) for e in accessor.asset_alias_events]
        if accessor.extra:
            out.append(("", str(accessor.key), accessor.extra))
    return out


def test_a_source_is_recorded_as_an_asset_event_only_when_it_changed(tmp_path, encoderflow_home):
    """encoderflow_sources runs hourly: an event for an unchanged corpus would start a training run an hour."""
    from tests.data.fixtures_own import write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_files=2)
    params = {"corpus": str(corpus)}

    first = steps.check_source("corpus", params, run_id="scheduled__1")
    assert first["changed"] is True  # never seen before
    events = OutletEventAccessors()
    af.record_source(events, first)
    assert _events(events) == [
        (
            "encoderflow_source_changes",
            "encoderflow_source_corpus",
            {"location": first["location"], "fingerprint_sha256": first["fingerprint_sha256"]},
        )
    ]

    # The next hour's check: the same files, another run. No event, through the alias or otherwise.
    again = steps.check_source("corpus", params, run_id="scheduled__2")
    assert again["changed"] is False and again["fingerprint_sha256"] == first["fingerprint_sha256"]
    events = OutletEventAccessors()
    af.record_source(events, again)
    assert _events(events) == []
    # Nor for a role with no source of its own (the guide's pinned dataset).
    unwatched = steps.check_source("labeled", params, run_id="scheduled__2")
    assert unwatched == {"role": "labeled", "location": None, "changed": False, "fingerprint_sha256": None}
    af.record_source(events, unwatched)
    assert _events(events) == []

    # A file added: one event again, with the new fingerprint.
    (corpus / "more.txt").write_text("a line the corpus did not have\n")
    changed = steps.check_source("corpus", params, run_id="scheduled__3")
    assert changed["changed"] is True and changed["fingerprint_sha256"] != first["fingerprint_sha256"]
    af.record_source(events, changed)
    assert [e[2]["fingerprint_sha256"] for e in _events(events)] == [changed["fingerprint_sha256"]]


def test_a_retry_says_first_what_became_of_the_try_before_it(encoderflow_home, monkeypatch, caplog):
    """A try killed with its worker has a log that just stops, and the cause was only in the scheduler's
    log: the next try said nothing of it. Each try is recorded; the next says what the record holds."""
    import types

    import airflow.sdk
    import pytest

    from encoderflow import layout
    from encoderflow.errors import EncoderflowError

    ti = types.SimpleNamespace(task_id="finetune", map_index=-1, run_id="manual__r1", try_number=1, max_tries=1)
    monkeypatch.setattr(airflow.sdk, "get_current_context", lambda: {"ti": ti})
    calls = []

    @af.expected_failures
    def body(fail=None):
        calls.append(ti.try_number)
        if fail == "kill":  # as a SIGKILL leaves it: the try's record is never ended
            raise SystemExit
        if fail:
            raise EncoderflowError("bad labels in dev.tsv", fix="fix the file")
        return "done"

    record = layout.run_dir("manual__r1") / "tries" / "finetune.json"
    caplog.clear()
    with caplog.at_level("INFO", logger="encoderflow.dag"):
        with pytest.raises(SystemExit):
            body("kill")
        layout.write_json(record, {k: v for k, v in layout.read_json(record).items() if k != "ended"})
        ti.try_number = 2
        with pytest.raises(Exception, match="bad labels in dev.tsv"):
            body("bad")
        ti.try_number, ti.max_tries = 3, 2
        assert body() == "done"
        ti.try_number = 4  # cleared after its success
        assert body() == "done"
    said = [m for m in caplog.messages if m.startswith("try ")]
    host = layout.read_json(record)["host"]
    assert len(said) == 3, said
    assert said[0].startswith("try 2 of 2: try 1 (began ") and f" on {host}, pid " in said[0]
    assert said[0].endswith(
        ") never ended: its process was killed (its worker stopped, or it lost its heartbeat: the scheduler's "
        "log says which) or a person marked it failed; its log, try 1, stops where it did"
    )
    # An expected failure has no retry: a person cleared it (it said "retried after its delay").
    assert said[1].startswith("try 3 of 3: try 2 (began ") and said[1].endswith(
        ": EncoderflowError: bad labels in dev.tsv (it fails without retry: a person cleared it)"
    )
    # Its work returned; Airflow may still have failed it after (storing its XCom): not called a success.
    assert re.fullmatch(
        r"try 4 of 4: try 3 \(began [^)]+\) ran its work to the end at [\d-]+ [\d:]+ UTC; this try runs it again "
        r"\(a person cleared it, or Airflow failed try 3 after its work: its log says\)",
        said[2],
    ), said[2]
    assert calls == [1, 2, 3, 4] and layout.read_json(record)["ended"]["as"] == "returned"
    # `encoderflow runs <run>` says how each try ended (Airflow shows the killed one only as failed).
    from encoderflow import runs

    assert runs.tries_lines(layout.run_dir("manual__r1")) == [
        "finetune: try 1 never ended (its process was killed, or a person marked it failed); try 2 failed: "
        "EncoderflowError: bad labels in dev.tsv; try 3 ran to the end; try 4 ran to the end"
    ]
    # A run id whose folder another run has writes nothing there.
    layout.write_json(layout.run_dir("manual_r2") / layout.RESOLVED_FILE, {"run_id": "manual_r2"})
    ti.run_id = "manual:r2"
    assert af.TryRecord.begin().path is None
    # ... nor its failure (check_params refuses it: failure.json replaced the other run's cause).
    af._record_failure(ti, -1, 1, af.errors.cause_of(EncoderflowError("refused")), no_retry=True, preset=None)
    assert not (layout.run_dir("manual_r2") / "failure.json").exists()
    # The source checker's runs have no run folder: `encoderflow runs` listed each as an unknown run.
    ti.run_id, ti.dag_id = "manual__src", af.SOURCES_DAG_ID
    assert af.TryRecord.begin().path is None and not layout.run_dir("manual__src").exists()
