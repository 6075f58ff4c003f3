"""``airflow_adapter``'s pieces that run inside a task, against Airflow's own task-side objects."""

from __future__ import annotations

from airflow.sdk.execution_time.context import OutletEventAccessors

from encoderflow import airflow_adapter as af
from encoderflow import steps


def _events(accessors: OutletEventAccessors) -> list[tuple[str, str, dict]]:
    """The asset events the task runner would emit: (alias, asset, extra) per event added through an alias,
    and any extra set on an accessor directly (an event on that asset or alias)."""
    out = []
    for accessor in accessors._dict.values():
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
