"""The Encoderflow runs page: what every run of ``encoder_pretraining`` decided, measured and wrote.

Plain Python (standard library and ``encoderflow.layout``; MLflow only when the registry is
asked), so it renders the same in the api-server and in a test. The sources are the run folders
under ``ENCODERFLOW_HOME`` (``summary.json`` once a run reports, ``gate.json`` once it is gated,
``data_docs/`` once it is validated), the Airflow DAG runs (state, times), and the MLflow registry
(champion and its history).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from encoderflow.layout import safe_run_id

DAG_ID = "encoder_pretraining"
DEFAULT_MODEL = "encoderflow-sst2"
METRICS = (
    ("sst2_val_accuracy", "SST-2 dev accuracy"),
    ("baseline_val_accuracy", "BoW baseline"),
    ("champion_val_accuracy", "champion (re-evaluated)"),
    ("mlm_val_accuracy", "MLM accuracy"),
)


def encoderflow_home() -> Path:
    return Path(os.environ.get("ENCODERFLOW_HOME", ".encoderflow")).resolve()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def data_docs(run_dir: Path) -> dict[str, str]:
    """dataset -> index.html path relative to the run folder, for every Data Docs site it holds."""
    root = run_dir / "data_docs"
    if not root.is_dir():
        return {}
    return {d.name: f"data_docs/{d.name}/index.html" for d in sorted(root.iterdir()) if (d / "index.html").is_file()}


def collect_runs(home: Path, dag_runs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One entry per run: the Airflow run (if known) merged with its folder (if any), newest first.

    Args:
        home: ENCODERFLOW_HOME.
        dag_runs: Airflow runs of the DAG, newest first, as dicts with ``run_id``, ``state``,
            ``start_date``, ``end_date`` (strings), ``conf``.
    """
    runs: dict[str, dict[str, Any]] = {}
    for dr in dag_runs or []:
        runs[safe_run_id(dr["run_id"])] = {**dr, "folder": None}
    runs_root = home / "runs"
    folders = sorted(runs_root.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True) if runs_root.is_dir() else []
    for folder in folders:
        if not folder.is_dir():
            continue
        entry = runs.setdefault(
            folder.name,
            {
                "run_id": None,
                "state": None,
                "start_date": None,
                "end_date": None,
                "conf": {},
                "mtime": folder.stat().st_mtime,
            },
        )
        entry["folder"] = folder.name
        summary = _read_json(folder / "summary.json")
        gate = _read_json(folder / "gate.json")
        entry["summary"] = summary
        if summary and not entry.get("run_id"):
            entry["run_id"] = summary.get("run_id")
        entry["run_id"] = entry.get("run_id") or folder.name
        if summary:
            entry["gate"] = {"blessed": summary["gate"].get("blessed"), "reasons": summary["gate"].get("reasons", [])}
            entry["metrics"] = summary.get("metrics", {})
            entry["registry"] = summary.get("registry", {})
            entry["preset"] = summary.get("preset")
        elif gate:
            entry["gate"] = {"blessed": gate.get("blessed"), "reasons": gate.get("reasons", [])}
            entry["metrics"] = {
                "sst2_val_accuracy": gate.get("candidate"),
                "baseline_val_accuracy": gate.get("baseline"),
                "champion_val_accuracy": gate.get("champion"),
            }
        if gate:
            entry["checks"] = gate.get("checks", [])
        entry["data_docs"] = data_docs(folder)
    # Airflow's runs first, newest first as given; then folders no Airflow run claims, newest first.
    out = list(runs.values())
    for entry in out:
        entry.setdefault("preset", (entry.get("conf") or {}).get("preset"))
    return out


def data_docs_file(home: Path, folder: str, rel: str) -> Path | None:
    """A file inside ``runs/<folder>/data_docs``, or None (outside it, or missing)."""
    base = (home / "runs" / folder / "data_docs").resolve()
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError):
        return None
    if base not in target.parents or not target.is_file():
        return None
    return target


def mlflow_ui_url() -> str | None:
    """Where a browser reaches the MLflow UI: ENCODERFLOW_MLFLOW_UI_URL, else an http tracking URI."""
    url = os.environ.get("ENCODERFLOW_MLFLOW_UI_URL") or ""
    if not url and os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        url = os.environ["MLFLOW_TRACKING_URI"]
    return url.rstrip("/") or None


def registry_state(home: Path, model: str) -> dict[str, Any]:
    """Champion and its move history from the MLflow registry; never raises (the page still shows runs)."""
    if not os.environ.get("MLFLOW_TRACKING_URI") and not (home / "mlflow" / "mlflow.db").exists():
        return {"champion": None, "history": [], "error": None, "store": "no registry yet"}
    # A page view must not hang on an unreachable server (MLflow retries for minutes by default).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from encoderflow import registry

        return {
            "champion": registry.champion(model),
            "history": registry.history(model),
            "error": None,
            "store": registry.tracking_uri(),
        }
    except Exception as exc:  # noqa: BLE001 - shown on the page instead
        return {"champion": None, "history": [], "error": f"{type(exc).__name__}: {exc}", "store": None}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _acc(value: Any) -> str:
    return "–" if value is None else f"{float(value):.4f}"


def airflow_run_href(run_id: str) -> str:
    # Relative to the page at <base>/encoderflow/, so it works behind a proxy prefix too.
    return f"../dags/{DAG_ID}/runs/{quote(run_id, safe='')}"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2rem;color:#1a202c;font-size:14px}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.4rem 0 .4rem}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #e2e8f0;padding:.4rem .5rem;
text-align:left;vertical-align:top} th{background:#f7fafc;font-weight:600}
.ok{color:#22543d;background:#c6f6d5;border-radius:4px;padding:0 .35rem;font-weight:600}
.no{color:#742a2a;background:#fed7d7;border-radius:4px;padding:0 .35rem;font-weight:600}
.muted{color:#718096} ul{margin:.2rem 0;padding-left:1.1rem} code{font-size:12px}
a{color:#2b6cb0}
"""


def render(
    runs: list[dict[str, Any]], registry: dict[str, Any], model: str, mlflow_url: str | None, user: str | None = None
) -> str:
    """The whole page as HTML (no script: it renders in the Airflow UI's frame and on its own)."""
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Encoderflow runs</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Encoderflow runs</h1><div class='muted'>DAG <code>{_e(DAG_ID)}</code> · registered model "
        f"<code>{_e(model)}</code>{' · signed in as ' + _e(user) if user else ''}</div>",
    ]

    champ = registry.get("champion")
    out.append("<h2>Champion</h2>")
    if registry.get("error"):
        out.append(f"<p class='no'>registry unavailable: {_e(registry['error'])}</p>")
    elif champ:
        link = (
            (
                f" · <a target='_blank' rel='noopener' href='{_e(mlflow_url)}/#/models/{quote(model)}/versions/"
                f"{quote(str(champ['version']))}'>MLflow model version</a>"
            )
            if mlflow_url
            else ""
        )
        tags = champ.get("tags") or {}
        try:
            accuracy = _acc(float(tags["gate.candidate_accuracy"]))
        except (KeyError, TypeError, ValueError):
            accuracy = "–"
        out.append(
            f"<p><b>v{_e(champ['version'])}</b> · SST-2 dev accuracy {accuracy}"
            f" · from Airflow run <code>{_e(tags.get('airflow.run_id', '–'))}</code>{link}</p>"
        )
    else:
        out.append(f"<p class='muted'>no champion yet ({_e(registry.get('store'))})</p>")
    history = list(reversed(registry.get("history") or []))
    if champ and not history:
        out.append("<p class='muted'>no recorded champion moves</p>")
    if history:
        out.append("<table><tr><th>when (UTC)</th><th>action</th><th>move</th><th>by</th><th>reason</th></tr>")
        for ev in history:
            out.append(
                f"<tr><td>{_e(str(ev.get('at', ''))[:19].replace('T', ' '))}</td><td>{_e(ev.get('action'))}</td>"
                f"<td>v{_e(ev.get('from') or '–')} → v{_e(ev.get('to'))}</td><td>{_e(ev.get('who'))}</td>"
                f"<td>{_e(ev.get('reason'))}</td></tr>"
            )
        out.append("</table>")

    out.append(f"<h2>Runs ({len(runs)})</h2>")
    if not runs:
        out.append("<p class='muted'>No runs yet: trigger <code>encoder_pretraining</code>.</p>")
    else:
        out.append(
            "<table><tr><th>run</th><th>gate decision</th><th>metrics</th><th>registry</th><th>Data Docs</th></tr>"
        )
        for run in runs:
            out.append(_row(run, mlflow_url))
        out.append("</table>")
    if not mlflow_url:
        out.append("<p class='muted'>Set ENCODERFLOW_MLFLOW_UI_URL on the api-server to link MLflow runs.</p>")
    out.append("</body></html>")
    return "".join(out)


def _row(run: dict[str, Any], mlflow_url: str | None) -> str:
    run_id = run.get("run_id") or run.get("folder")
    state = run.get("state")
    cells = [
        f"<a target='_top' href='{_e(airflow_run_href(run_id))}'><code>{_e(run_id)}</code></a>"
        if state is not None
        else f"<code>{_e(run_id)}</code> <span class='muted'>(not in this Airflow)</span>"
    ]
    meta = [
        m
        for m in (
            state and f"state <b>{_e(state)}</b>",
            run.get("preset") and f"preset {_e(run['preset'])}",
            run.get("start_date") and f"started {_e(str(run['start_date'])[:19])}",
        )
        if m
    ]
    if meta:
        cells[0] += "<div class='muted'>" + " · ".join(meta) + "</div>"

    gate = run.get("gate")
    if gate is None:
        cells.append("<span class='muted'>not gated</span>")
    else:
        verdict = "<span class='ok'>BLESSED</span>" if gate.get("blessed") else "<span class='no'>NOT BLESSED</span>"
        reasons = gate.get("reasons") or []
        # Reasons say why not; for a blessing, each check's detail says by how much.
        details = reasons or [f"{c.get('name')}: {c.get('detail')}" for c in run.get("checks") or [] if c.get("passed")]
        items = "".join(f"<li>{_e(r)}</li>" for r in details) or "<li>all checks passed</li>"
        cells.append(f"{verdict}<ul>{items}</ul>")

    metrics = run.get("metrics") or {}
    cells.append(
        "<br>".join(f"{label}: <b>{_acc(metrics.get(key))}</b>" for key, label in METRICS if key in metrics)
        or "<span class='muted'>–</span>"
    )

    reg = run.get("registry") or {}
    if reg.get("version"):
        model = reg.get("registered_model") or DEFAULT_MODEL
        parts = [f"{_e(model)} v{_e(reg['version'])}"]
        if mlflow_url:
            parts.append(
                f"<a target='_blank' rel='noopener' href='{_e(mlflow_url)}/#/models/{quote(model)}/versions/"
                f"{quote(str(reg['version']))}'>model version</a>"
            )
            if reg.get("run_id"):
                parts.append(
                    f"<a target='_blank' rel='noopener' href='{_e(mlflow_url)}/#/runs/"
                    f"{quote(reg['run_id'])}'>MLflow run</a>"
                )
        elif reg.get("run_id"):
            parts.append(f"MLflow run <code>{_e(reg['run_id'])}</code>")
        cells.append("<br>".join(parts))
    else:
        cells.append("<span class='muted'>not registered</span>")

    docs = run.get("data_docs") or {}
    if docs and run.get("folder"):
        cells.append(
            "<br>".join(
                f"<a target='_blank' rel='noopener' href='runs/{quote(run['folder'])}/{_e(rel)}'>{_e(name)}</a>"
                for name, rel in docs.items()
            )
        )
    else:
        cells.append("<span class='muted'>–</span>")
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
