"""The Encoderflow runs plugin: what the page shows, and that only a signed-in user sees it.

Fast tests render the page from run folders written here; the slow one starts a real Airflow
api-server on loopback with the plugin and asks it as nobody, with a forged token, and signed in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

import encoderflow_runs_page as page  # noqa: E402

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
            "checks": blessed_checks if blessed else [],
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
                    "sst2_val_accuracy": acc,
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
    docs(FAILED_RUN, "sst2")


REGISTRY = {
    "champion": {"version": "1", "tags": {"gate.candidate_accuracy": "0.812", "airflow.run_id": BLESSED_RUN}},
    "history": [
        {
            "at": "2026-11-25T10:20:00+00:00",
            "action": "promote",
            "who": "airflow",
            "from": None,
            "to": "1",
            "reason": f"gate blessed run {BLESSED_RUN}",
        },
        {
            "at": "2026-11-28T08:00:00+00:00",
            "action": "rollback",
            "who": "alice",
            "from": "3",
            "to": "1",
            "reason": "v3 misbehaves",
        },
    ],
    "error": None,
    "store": "http://mlflow:5000",
}


def test_runs_page_shows_decisions_metrics_history_and_links(encoderflow_home):
    write_runs(encoderflow_home)
    dag_runs = [
        {
            "run_id": FAILED_RUN,
            "state": "failed",
            "start_date": "2026-11-27T09:00:01",
            "end_date": None,
            "conf": {"preset": "smoke"},
        },
        {
            "run_id": BLESSED_RUN,
            "state": "success",
            "start_date": "2026-11-25T10:00:01",
            "end_date": None,
            "conf": {"preset": "guide"},
        },
    ]
    runs = page.collect_runs(encoderflow_home, dag_runs)
    # Airflow's runs first (as Airflow orders them), then folders this Airflow does not know.
    assert [r["run_id"] for r in runs] == [FAILED_RUN, BLESSED_RUN, REJECTED_RUN]
    failed, blessed, rejected = runs
    assert "gate" not in failed and failed["state"] == "failed"
    assert failed["data_docs"] == {"sst2": "data_docs/sst2/index.html"}
    assert blessed["gate"]["blessed"] is True and blessed["registry"]["version"] == "1"
    assert rejected["state"] is None and rejected["gate"]["reasons"][0].startswith("champion:")

    html = page.render(runs, REGISTRY, "encoderflow-sst2", "http://mlflow.example:5000", user="alice")
    assert "BLESSED" in html and "NOT BLESSED" in html
    assert "champion: 0.7010 is 0.1110 below champion v1" in html
    assert "floor: 0.8120 &gt;= floor 0.8000" in html  # a blessing says by how much it passed
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "SST-2 dev accuracy: <b>0.8120</b>" in html and "champion (re-evaluated): <b>0.8120</b>" in html
    assert "not gated" in html  # the run that failed validation
    # Champion and its history, newest move first.
    assert html.index("v3 misbehaves") < html.index(f"gate blessed run {BLESSED_RUN}")
    assert "v3 → v1" in html and "alice" in html
    # Links: the Airflow run (top frame), MLflow run and model version, Data Docs served by the plugin.
    assert f"../dags/encoder_pretraining/runs/{urllib.parse.quote(BLESSED_RUN, safe='')}" in html
    assert "target='_top'" in html
    assert "http://mlflow.example:5000/#/runs/mlflowrun2" in html
    assert "http://mlflow.example:5000/#/models/encoderflow-sst2/versions/2" in html
    folder = page.safe_run_id(BLESSED_RUN)
    assert f"runs/{folder}/data_docs/wikitext/index.html" in html
    assert f"{REJECTED_RUN}</code> <span class='muted'>(not in this Airflow)" in html


def test_page_without_registry_or_mlflow_ui(encoderflow_home, monkeypatch):
    monkeypatch.delenv("ENCODERFLOW_MLFLOW_UI_URL", raising=False)
    write_runs(encoderflow_home)
    registry = page.registry_state(encoderflow_home, "encoderflow-sst2")
    assert registry == {"champion": None, "history": [], "error": None, "store": "no registry yet"}
    assert page.mlflow_ui_url() is None
    html = page.render(page.collect_runs(encoderflow_home), registry, "encoderflow-sst2", None)
    assert "no champion yet" in html and "MLflow run <code>mlflowrun1</code>" in html
    assert "#/runs/" not in html
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000/")
    assert page.mlflow_ui_url() == "http://mlflow:5000"
    monkeypatch.setenv("ENCODERFLOW_MLFLOW_UI_URL", "http://localhost:5000")
    assert page.mlflow_ui_url() == "http://localhost:5000"


def test_data_docs_stay_inside_the_run_folder(encoderflow_home):
    write_runs(encoderflow_home)
    folder = page.safe_run_id(BLESSED_RUN)
    assert page.data_docs_file(encoderflow_home, folder, "sst2/index.html").name == "index.html"
    (encoderflow_home / "secret.txt").write_text("no")
    for rel in ("../gate.json", "../../../secret.txt", "/etc/passwd", "sst2/../../summary.json", "sst2/missing.html"):
        assert page.data_docs_file(encoderflow_home, folder, rel) is None, rel
    assert page.data_docs_file(encoderflow_home, "..", "runs/x") is None


def test_plugin_module_is_import_light(tmp_path):
    """Every Airflow component imports plugins: no MLflow, TensorFlow or API internals at import."""
    probe = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import encoderflow_plugin as p; "
        "heavy = ('mlflow', 'tensorflow', 'jax', 'keras', 'airflow.api_fastapi.core_api.security'); "
        "print(json.dumps({'heavy': [m for m in heavy if m in sys.modules], "
        "'apps': [(a['url_prefix'], a['name']) for a in p.EncoderflowPlugin.fastapi_apps], "
        "'views': p.EncoderflowPlugin.external_views}))"
    )
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
    }
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(REPO / "plugins")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["apps"] == [["/encoderflow", "Encoderflow runs"]]
    (view,) = out["views"]
    assert view["destination"] == "nav" and view["href"] == "encoderflow/" and view["url_route"]


@pytest.mark.slow
def test_page_refuses_anonymous_and_shows_runs_to_a_signed_in_user(tmp_path, encoderflow_home):
    from tests.test_airflow_api import airflow_stack

    home = encoderflow_home
    write_runs(home)
    with airflow_stack(tmp_path, home, components=("api-server",)) as stack:
        folder = page.safe_run_id(BLESSED_RUN)
        docs = f"/encoderflow/runs/{folder}/data_docs/sst2/index.html"
        # Nobody: refused, and nothing about the runs leaks.
        for path in ("/encoderflow/", "/encoderflow/runs.json", docs):
            for accept in ("application/json", "text/html"):
                status, body = stack.request("GET", path, token=None, headers={"Accept": accept})
                assert status == 401, (path, accept, status)
                assert BLESSED_RUN not in str(body) and "Data Docs of" not in str(body)
        status, body = stack.request("GET", "/encoderflow/", token=None, headers={"Accept": "text/html"})
        assert "/auth/login" in body  # a person is sent to sign in
        # A forged token, as header or cookie: refused too.
        forged = stack.token("admin", stack.password)[:-4] + "AAAA"
        assert stack.request("GET", "/encoderflow/runs.json", token=forged)[0] in (401, 403)
        assert stack.request("GET", "/encoderflow/runs.json", token=None, cookie=forged)[0] in (401, 403)

        # Signed in (bearer token as the API uses, or the UI's session cookie): the runs.
        status, body = stack.request("GET", "/encoderflow/", headers={"Accept": "text/html"})
        assert status == 200, body
        assert BLESSED_RUN in body and REJECTED_RUN in body and "NOT BLESSED" in body
        viewer = stack.token("viewer", stack.viewer_password)
        status, body = stack.request("GET", "/encoderflow/", token=None, cookie=viewer, headers={"Accept": "text/html"})
        assert status == 200 and "signed in as viewer" in body
        status, snap = stack.request("GET", "/encoderflow/runs.json")
        # The run that failed before reporting is known by its folder only (this Airflow has no record of it).
        assert status == 200
        assert {r["run_id"] for r in snap["runs"]} == {BLESSED_RUN, REJECTED_RUN, page.safe_run_id(FAILED_RUN)}
        status, body = stack.request("GET", docs, headers={"Accept": "text/html"})
        assert status == 200 and "Data Docs of sst2" in body
        assert stack.request("GET", f"/encoderflow/runs/{folder}/data_docs/..%2Fgate.json")[0] == 404

        # The page is linked from Airflow's navigation.
        _, plugins = stack.request("GET", "/api/v2/plugins")
        views = [v for p in plugins["plugins"] if p["name"] == "encoderflow" for v in p["external_views"]]
        assert views and views[0]["destination"] == "nav" and views[0]["href"] == "encoderflow/"
