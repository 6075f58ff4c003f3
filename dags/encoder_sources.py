"""encoderflow_sources: watch your own corpus and labeled data, and record an asset event when they change.

A short task per watched role fingerprints its source (sizes and mtimes of a local folder's files,
the manifest of an HTTP one) and compares it with the last fingerprint it recorded. Only a change
adds an event to `encoderflow_source_<role>`, so `encoder_pretraining` scheduled with
`ENCODERFLOW_SCHEDULE=assets` runs when data lands, and its `check_lineage` then compares content
hashes (a touched but unchanged file costs seconds, not a training run).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from encoderflow import airflow_adapter as af
from encoderflow import steps


@dag(
    dag_id=af.SOURCES_DAG_ID,
    schedule=af.source_check_schedule(),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=af.source_params(),
    doc_md=__doc__,
    tags=["encoderflow", "data"],
    default_args=af.DEFAULT_ARGS,
)
def encoderflow_sources():
    @task(**af.NETWORK, outlets=[af.SOURCE_CHANGES], execution_timeout=timedelta(minutes=10))
    @af.expected_failures
    def check_source(role: str, params=None, run_id=None, outlet_events=None) -> dict:
        """Fingerprint the role's declared source; on a change, record it and update its asset."""
        checked = steps.check_source(role, params, run_id)
        af.record_source(outlet_events, checked)
        return checked

    for role in af.WATCHED:
        # Its asset as an inlet: declared, so the first event through the alias finds it in its group (an
        # undeclared one is created then, in group "asset", with two Airflow warnings).
        check_source.override(task_id=f"check_{role}", inlets=[af.SOURCE_ASSETS[role]])(role)


dag = encoderflow_sources()
