"""Run folders as the DAG leaves them, for the tests of what reads them back (the runs page,
``encoderflow runs``): a blessed run, a rejected one and one that failed validation."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

BLESSED_RUN = "manual__2026-11-25T10:00:00+00:00"
REJECTED_RUN = "scheduled__2026-11-26T03:00:00+00:00"
FAILED_RUN = "manual__2026-11-27T09:00:00+00:00"


def write_runs(home: Path) -> None:
    """Three runs as the DAG leaves them: reported and blessed, reported and rejected, failed validation."""
    from encoderflow import layout

    def docs(run_id: str, *datasets: str) -> dict[str, str]:
        out = {}
        for name in datasets:
            index = layout.run_dir(run_id) / "data_docs" / name / "index.html"
            index.parent.mkdir(parents=True, exist_ok=True)
            index.write_text(f"<html><body>Data Docs of {name}</body></html>")
            out[name] = str(index)
        return out

    blessed_checks = [
        {"name": "floor", "passed": True, "detail": "0.8120 >= floor 0.8000", "value": 0.812, "threshold": 0.8}
    ]
    # The thresholds gate.json records: floor 0.70, gain over baseline >= -0.10, no regression vs the champion.
    rejected_checks = [
        {"name": "metric", "passed": True, "detail": "candidate accuracy present", "value": 0.701, "threshold": None},
        {"name": "floor", "passed": True, "detail": "0.7010 >= floor 0.7000", "value": 0.701, "threshold": 0.7},
        {"name": "baseline", "passed": True, "detail": "gain -0.0490", "value": -0.049, "threshold": -0.1},
        {"name": "champion", "passed": False, "detail": "-0.1110", "value": -0.111, "threshold": -0.0},
    ]
    # The blessed run's gate.json predates the bootstrap intervals, and its summary the metric's rename
    # (sst2_val_accuracy, read as val_accuracy); the rejected run's has both.
    for run_id, blessed, reasons, acc, version in (
        (BLESSED_RUN, True, [], 0.812, "1"),
        (
            REJECTED_RUN,
            False,
            ["champion: 0.7010 is 0.1110 below champion v1 (0.8120), allowed 0.0000", "<script>alert(1)</script>"],
            0.701,
            "2",
        ),
    ):
        run_dir = layout.run_dir(run_id)
        gate = {
            "blessed": blessed,
            "reasons": reasons,
            "candidate": acc,
            "baseline": 0.75,
            "champion": None if blessed else 0.812,
            "champion_version": None if blessed else "1",
            "checks": blessed_checks if blessed else rejected_checks,
            **({} if blessed else {"intervals": INTERVALS}),
        }
        layout.write_json(run_dir / "gate.json", gate)
        layout.write_json(
            run_dir / "summary.json",
            {
                "run_id": run_id,
                "preset": "guide",
                "metrics": {
                    "baseline_val_accuracy": 0.75,
                    "mlm_val_accuracy": 0.31,
                    ("sst2_val_accuracy" if blessed else "val_accuracy"): acc,
                    "champion_val_accuracy": gate["champion"],
                },
                "gate": {"blessed": blessed, "reasons": reasons, "gate_json": str(run_dir / "gate.json")},
                "registry": {
                    "registered_model": "encoderflow-sst2",
                    "version": version,
                    "champion_version": "1",
                    "run_id": f"mlflowrun{version}",
                    "tracking_uri": "http://mlflow:5000",
                },
                "artifacts": {"data_docs": docs(run_id, "sst2", "vocab", "wikitext")},
            },
        )
        for stage, history in HISTORIES.items():
            layout.write_json(run_dir / stage / "result.json", {"key": "k", "history": history})
    # A NaN epoch (as Keras writes it into result.json) in the rejected run's fine-tuning.
    layout.write_json(
        layout.run_dir(REJECTED_RUN) / "finetune" / "result.json",
        {"history": {**HISTORIES["finetune"], "val_loss": [0.61, float("nan")]}},
    )
    docs(FAILED_RUN, "sst2")


# gate.json's bootstrap intervals as the gate writes them (gate.Intervals), for the rejected run.
INTERVALS = {
    "examples": 872,
    "resamples": 2000,
    "seed": 42,
    "confidence": 0.95,
    "candidate": {"estimate": 0.701, "low": 0.67, "high": 0.731},
    "champion": {"estimate": 0.812, "low": 0.786, "high": 0.838},
    "baseline": None,
    "candidate_minus_champion": {"estimate": -0.111, "low": -0.14, "high": -0.082},
}


# Per-epoch histories as the training steps write them (Keras metric names; pretraining via CSVLogger).
HISTORIES = {
    "pretrain": {
        "loss": [3.94, 3.47, 3.1],
        "val_loss": [3.76, 3.64, 3.5],
        "sparse_categorical_accuracy": [0.05, 0.07, 0.09],
        "val_sparse_categorical_accuracy": [0.057, 0.035, 0.08],
        "learning_rate": [0.001, 0.001, 0.001],
    },
    "finetune": {"loss": [0.62, 0.4], "val_loss": [0.4, 0.38], "accuracy": [0.68, 0.8], "val_accuracy": [0.94, 0.95]},
    "baseline": {
        "loss": [0.69, 0.68],
        "val_loss": [0.68, 0.67],
        "accuracy": [0.52, 0.55],
        "val_accuracy": [0.55, 0.55],
    },
}


def beat_a_scheduler(db: Path, host: str = "teamhost", user: str = "alice") -> datetime:
    """A live scheduler in the embedded Airflow's job table (``airflow.db`` at ``db``), started an hour ago
    on ``host`` as ``user``; returns its heartbeat. The heartbeat is ahead of the clock, so it stays within
    Airflow's 30 s threshold however slowly the CLIs under test start on a loaded machine."""
    import sqlite3
    from datetime import UTC, timedelta

    beat = datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=10)
    with sqlite3.connect(db) as con:
        con.execute(
            "insert into job (state, job_type, start_date, latest_heartbeat, hostname, unixname) values "
            "('running', 'SchedulerJob', ?, ?, ?, ?)",
            (f"{beat - timedelta(hours=1)}", f"{beat}", host, user),
        )
    return beat
