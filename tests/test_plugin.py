"""The Encoderflow runs plugin: what the page shows, and that only a signed-in user sees it.

Fast tests render the page from run folders written here; the slow one starts a real Airflow
api-server on loopback with the plugin and asks it as nobody, with a forged token, and signed in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.parse
import xml.etree.ElementTree as ET
from html import escape as html_escape
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

import encoderflow_runs_page as page  # noqa: E402

from encoderflow.layout import safe_run_id  # noqa: E402
from encoderflow.runs import collect_runs, gate_intervals  # noqa: E402
from tests.fixtures_runs import BLESSED_RUN, FAILED_RUN, HISTORIES, INTERVALS, REJECTED_RUN, write_runs  # noqa: E402

REGISTRY = {
    "champion": {"version": "1", "tags": {"gate.val_accuracy": "0.812", "airflow.run_id": BLESSED_RUN}},
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
    runs = collect_runs(encoderflow_home, dag_runs)
    # Airflow's runs first (as Airflow orders them), then folders this Airflow does not know.
    assert [r["run_id"] for r in runs] == [FAILED_RUN, BLESSED_RUN, REJECTED_RUN]
    failed, blessed, rejected = runs
    assert "gate" not in failed and failed["state"] == "failed"
    assert failed["data_docs"] == {"sst2": "data_docs/sst2/index.html"}
    assert blessed["gate"]["blessed"] is True and blessed["registry"]["version"] == "1"
    assert rejected["state"] is None and rejected["gate"]["reasons"][0].startswith("champion:")
    assert rejected["intervals"]["candidate_minus_champion"] == INTERVALS["candidate_minus_champion"]
    assert blessed["intervals"] is None  # its gate.json predates the intervals

    html = page.render(runs, REGISTRY, "encoderflow-sst2", "http://mlflow.example:5000", user="alice")
    # Each gated run's row says its own verdict: the blessed one BLESSED, the rejected one NOT BLESSED.
    ok, no = "<span class='ok'>BLESSED</span>", "<span class='no'>NOT BLESSED</span>"
    assert ok in page._row(blessed, None) and no not in page._row(blessed, None)
    assert no in page._row(rejected, None) and ok not in page._row(rejected, None)
    assert html.count(ok) == 1 and html.count(no) == 1
    assert "models/encoderflow-sst2/versions/1'>model version</a>" in html
    # A version prune --versions deleted is said so, not linked to an MLflow page that is gone.
    gone = page.render(runs, {**REGISTRY, "deleted": ["1"]}, "encoderflow-sst2", "http://mlflow.example:5000")
    assert "encoderflow-sst2 v1 <span class='muted'>(deleted by prune)</span>" in gone
    assert "versions/1'>model version</a>" not in gone
    assert "· by " not in page._row(blessed, None)  # a run recorded before check_params kept who triggered it
    row = page._row({**blessed, "triggered_by": "bob <ops>", "settings": {"gate.min_accuracy": 0.6}}, None)
    assert "started 2026-11-25T10:00:01 · by bob &lt;ops&gt;</div>" in row
    assert "<div class='muted'>set <code>gate.min_accuracy=0.6</code></div>" in row  # what the run was triggered with
    assert "champion: 0.7010 is 0.1110 below champion v1" in html
    assert "floor: 0.8120 &gt;= floor 0.8000" in html  # a blessing says by how much it passed
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert (
        "dev accuracy: <b>0.8120</b>" in html
        and "dev accuracy: <b>0.7010</b>" in html
        and "champion (re-evaluated): <b>0.8120</b>" in html
    )
    assert "not gated" in html  # the run that failed validation
    # The gate cell gives the intervals the gate recorded: the candidate's, and its paired margin to the champion.
    assert html.count("class='muted ef-ci-text'") == 1
    assert (
        "95% intervals: candidate 0.7010 [0.6700, 0.7310] · candidate - champion -0.1110 [-0.1400, -0.0820]"
    ) in html
    # Champion and its history, newest move first.
    assert html.index("v3 misbehaves") < html.index(f"gate blessed run {BLESSED_RUN}")
    assert "v3 → v1" in html and "alice" in html
    # Links: the Airflow run (top frame), MLflow run and model version, Data Docs served by the plugin.
    assert f"../dags/encoder_pretraining/runs/{urllib.parse.quote(BLESSED_RUN, safe='')}" in html
    assert "target='_top'" in html
    assert "http://mlflow.example:5000/#/runs/mlflowrun2" in html
    assert "http://mlflow.example:5000/#/models/encoderflow-sst2/versions/2" in html
    folder = safe_run_id(BLESSED_RUN)
    assert f"runs/{folder}/data_docs/wikitext/index.html" in html
    assert f"{REJECTED_RUN}</code> <span class='muted'>(not in this Airflow)" in html


def test_a_pruned_run_keeps_its_decision_and_metrics_on_the_page(encoderflow_home):
    from encoderflow import prune

    write_runs(encoderflow_home)
    dag_runs = [{"run_id": BLESSED_RUN, "state": "success", "start_date": "2026-11-25T10:00:01", "end_date": None}]
    before = {r["run_id"]: r for r in collect_runs(encoderflow_home, dag_runs)}
    folders = {run: encoderflow_home / "runs" / safe_run_id(run) for run in (BLESSED_RUN, REJECTED_RUN)}
    gone = [prune.Item("run", folder, "test") for folder in folders.values()]
    assert len(prune.apply(encoderflow_home, prune.Plan(remove=gone)).remove) == 2
    assert not any(folder.exists() for folder in folders.values())

    runs = {r["run_id"]: r for r in collect_runs(encoderflow_home, dag_runs)}
    assert list(runs) == list(before)  # the Airflow run, then the one no Airflow knows, as before
    for run_id in (BLESSED_RUN, REJECTED_RUN):
        was, now = before[run_id], runs[run_id]
        assert now["pruned_at"] and now["folder"] is None and not now.get("data_docs")
        for key in ("gate", "metrics", "registry", "intervals", "checks", "gate_chart"):
            assert now[key] == was[key], key
    html = page.render(list(runs.values()), REGISTRY, "encoderflow-sst2", None)
    assert html.count("<span class='ok'>BLESSED</span>") == 1 and html.count("<span class='no'>NOT BLESSED</span>") == 1
    assert "dev accuracy: <b>0.8120</b>" in html and "dev accuracy: <b>0.7010</b>" in html
    assert "<span title='mlm_val_accuracy'>MLM accuracy: <b>" in html  # one name per metric, on hover
    assert html.count(f"folder pruned {runs[BLESSED_RUN]['pruned_at'][:10]}") == 2
    for folder in folders.values():  # their Data Docs went with the folders: no dead links
        assert f"runs/{folder.name}/data_docs" not in html
    # A run of the same name that writes a folder again shows the folder, not the record.
    (folders[REJECTED_RUN] / "summary.json").parent.mkdir(parents=True)
    assert (
        "pruned_at" not in {r["run_id"]: r for r in collect_runs(encoderflow_home, dag_runs)}[safe_run_id(REJECTED_RUN)]
    )


def test_page_without_registry_or_mlflow_ui(encoderflow_home, monkeypatch):
    monkeypatch.delenv("ENCODERFLOW_MLFLOW_UI_URL", raising=False)
    write_runs(encoderflow_home)
    registry = page.registry_state(encoderflow_home, "encoderflow-sst2")
    assert registry == {"champion": None, "history": [], "error": None, "store": "no registry yet"}
    assert page.mlflow_ui_url() is None
    html = page.render(collect_runs(encoderflow_home), registry, "encoderflow-sst2", None)
    assert "no champion yet" in html and "MLflow run <code>mlflowrun1</code>" in html
    assert "#/runs/" not in html
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000/")
    assert page.mlflow_ui_url() == "http://mlflow:5000"
    monkeypatch.setenv("ENCODERFLOW_MLFLOW_UI_URL", "http://localhost:5000")
    assert page.mlflow_ui_url() == "http://localhost:5000"


def test_data_docs_stay_inside_the_run_folder(encoderflow_home):
    write_runs(encoderflow_home)
    folder = safe_run_id(BLESSED_RUN)
    assert page.data_docs_file(encoderflow_home, folder, "sst2/index.html").name == "index.html"
    (encoderflow_home / "secret.txt").write_text("no")
    for rel in ("../gate.json", "../../../secret.txt", "/etc/passwd", "sst2/../../summary.json", "sst2/missing.html"):
        assert page.data_docs_file(encoderflow_home, folder, rel) is None, rel
    assert page.data_docs_file(encoderflow_home, "..", "runs/x") is None


# --- the charts ----------------------------------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def parse_svg(markup: str) -> ET.Element:
    """The chart as XML: it must be well-formed on its own, not only inside an HTML page."""
    root = ET.fromstring(markup)
    assert root.tag == f"{SVG}svg"
    return root


def points(root: ET.Element, series: str) -> list[tuple[int, float, float]]:
    """(epoch, x, y) of each point drawn for one metric key."""
    (group,) = [g for g in root.iter(f"{SVG}g") if g.get("data-series") == series]
    return [(int(c.get("data-epoch")), float(c.get("cx")), float(c.get("cy"))) for c in group.iter(f"{SVG}circle")]


def test_curves_chart_has_a_point_per_epoch_for_train_and_val_loss_and_accuracy():
    markup = page.curves_svg("pretrain", "Pretraining (MLM)", HISTORIES["pretrain"])
    root = parse_svg(markup)
    assert "ef-curves" in root.get("class") and root.get("data-stage") == "pretrain"
    assert root.get("data-epochs") == "3"
    panels = [g.get("data-metric") for g in root.iter(f"{SVG}g") if g.get("class") == "ef-panel"]
    assert panels == ["loss", "accuracy"]
    drawn = {g.get("data-series"): g.get("data-role") for g in root.iter(f"{SVG}g") if g.get("data-series")}
    # Train and val of both metrics; the learning rate in the same history is not a curve.
    assert drawn == {
        "loss": "train",
        "val_loss": "val",
        "sparse_categorical_accuracy": "train",
        "val_sparse_categorical_accuracy": "val",
    }
    for series in drawn:
        assert [e for e, _, _ in points(root, series)] == [1, 2, 3], series
    # Epochs run left to right; a falling loss is drawn falling (SVG y grows downwards).
    loss = points(root, "loss")
    assert loss[0][1] < loss[1][1] < loss[2][1]
    assert loss[0][2] < loss[1][2] < loss[2][2]
    # Validation accuracy dipped at epoch 2, and the chart shows the dip.
    val_acc = points(root, "val_sparse_categorical_accuracy")
    assert val_acc[1][2] > val_acc[0][2] and val_acc[1][2] > val_acc[2][2]
    # Every point lies inside the drawing.
    width, height = float(root.get("width")), float(root.get("height"))
    assert all(0 < x < width and 0 < y < height for s in drawn for _, x, y in points(root, s))
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert texts.count("epoch") == 2 and "loss" in texts and "accuracy" in texts  # axes labelled
    assert "Pretraining (MLM)" in texts and "train" in texts and "val" in texts  # title and legend
    # Each point says what it is when hovered, and the panel says where the curves ended.
    titles = [t.text for t in root.iter(f"{SVG}title")]
    assert "val_loss, epoch 3: 3.5000" in titles
    assert "last: train 3.1, val 3.5" in texts
    # Val is dashed, train solid: told apart without colour.
    lines = {g.get("data-series"): g.find(f"{SVG}polyline") for g in root.iter(f"{SVG}g") if g.get("data-series")}
    assert lines["val_loss"].get("stroke-dasharray") and lines["loss"].get("stroke-dasharray") is None


def test_curves_chart_breaks_at_a_missing_epoch_and_handles_one_or_none():
    history = {"loss": [0.9, None, 0.5, 0.4], "val_loss": [1.0, 0.8, 0.7, 0.6]}
    root = parse_svg(page.curves_svg("finetune", "Fine-tuning", history))
    assert [e for e, _, _ in points(root, "loss")] == [1, 3, 4]  # no point for the missing epoch
    (loss,) = [g for g in root.iter(f"{SVG}g") if g.get("data-series") == "loss"]
    # A line through epochs 3-4 only: epoch 1 stands alone, nothing bridges the gap.
    assert [len(p.get("points").split()) for p in loss.iter(f"{SVG}polyline")] == [2]
    assert [g.get("data-metric") for g in root.iter(f"{SVG}g") if g.get("class") == "ef-panel"] == ["loss"]

    # One epoch (the smoke preset's fine-tuning): a point per series, in the middle, no line.
    one = parse_svg(page.curves_svg("finetune", "Fine-tuning", {"loss": [0.62], "val_accuracy": [0.94]}))
    assert one.find(f".//{SVG}polyline") is None
    assert [len(points(one, s)) for s in ("loss", "val_accuracy")] == [1, 1]
    (_, x, _), (_, x2, _) = points(one, "loss")[0], points(one, "val_accuracy")[0]
    assert x - 50 == pytest.approx(75) and x2 - 265 == pytest.approx(75)  # the centre of each 150-wide panel

    # Nothing to draw: no chart at all, rather than empty axes.
    for empty in ({}, {"loss": []}, {"learning_rate": [0.001]}, {"loss": [None, None]}):
        assert page.curves_svg("pretrain", "Pretraining", empty) == "", empty


def test_chart_text_is_escaped():
    hostile = "<script>alert(1)</script>"
    markup = page.curves_svg(f"x'{hostile}", hostile, {"loss": [1.0, 0.5], f"{hostile}accuracy": [0.1, 0.2]})
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    root = parse_svg(markup)  # still well-formed: nothing broke out of an attribute or element
    assert root.get("data-stage") == f"x'{hostile}"
    assert any(g.get("data-series") == f"{hostile}accuracy" for g in root.iter(f"{SVG}g"))
    gate = page.gate_svg({"blessed": False, "candidate": 0.5, "champion": 0.6, "champion_version": hostile})
    assert "<script>" not in gate and parse_svg(gate) is not None


def test_gate_chart_compares_candidate_baseline_and_champion_with_the_thresholds_used():
    figures = {
        "blessed": False,
        "candidate": 0.701,
        "baseline": 0.75,
        "champion": 0.812,
        "champion_version": "1",
        "floor": 0.7,
        "min_gain_over_baseline": 0.02,
        "min_change_vs_champion": -0.01,
    }
    root = parse_svg(page.gate_svg(figures))
    assert "ef-gate" in root.get("class") and root.get("data-blessed") == "false"
    bars = {r.get("data-name"): r for r in root.iter(f"{SVG}rect") if r.get("class") == "ef-bar"}
    assert {name: r.get("data-value") for name, r in bars.items()} == {
        "candidate": "0.7010",
        "baseline": "0.7500",
        "champion": "0.8120",
    }
    # Bar lengths are proportional to the accuracy (axis 0..1), so the order is visible.
    length = {name: float(r.get("width")) for name, r in bars.items()}
    assert length["candidate"] < length["baseline"] < length["champion"]
    assert length["champion"] / length["candidate"] == pytest.approx(0.812 / 0.701, rel=0.01)
    assert bars["candidate"].get("fill") == page.GATE_COLOURS["rejected"]
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "Gate: NOT BLESSED" in texts and "champion v1" in texts and "floor 0.70" in texts
    # What the candidate had to reach: baseline + gain, champion - allowed regression.
    assert "0.7500 · candidate needs ≥ 0.7700" in texts and "0.8120 · candidate needs ≥ 0.8020" in texts
    (floor,) = [g for g in root.iter(f"{SVG}g") if g.get("class") == "ef-floor"]
    assert floor.get("data-value") == "0.7000"
    floor_x = float(floor.find(f"{SVG}line").get("x1"))
    assert float(bars["candidate"].get("x")) + length["candidate"] == pytest.approx(floor_x + 0.001 * 170, abs=0.2)

    # First run: no champion, a gain the smoke preset does not ask for (-1), no floor recorded.
    first = parse_svg(
        page.gate_svg({"blessed": True, "candidate": 0.94, "baseline": 0.55, "min_gain_over_baseline": -1})
    )
    assert first.get("data-blessed") == "true"
    texts = [t.text for t in first.iter(f"{SVG}text")]
    assert "no champion yet" in texts and "0.5500" in texts and not any("needs" in t for t in texts)
    assert [r.get("data-name") for r in first.iter(f"{SVG}rect")] == ["candidate", "baseline"]
    assert not [g for g in first.iter(f"{SVG}g") if g.get("class") == "ef-floor"]
    assert page.gate_svg({"blessed": None, "candidate": None, "baseline": float("nan")}) == ""


def test_gate_chart_draws_each_interval_as_an_error_bar_and_the_paired_difference_below():
    figures = {
        "blessed": False,
        "candidate": 0.701,
        "baseline": 0.75,
        "champion": 0.812,
        "champion_version": "1",
        "floor": 0.7,
        "min_gain_over_baseline": 0.02,
        "min_change_vs_champion": -0.01,
        "intervals": gate_intervals(
            {"intervals": {**INTERVALS, "baseline": {"estimate": 0.75, "low": 0.72, "high": 0.78}}}
        ),
    }
    markup = page.gate_svg(figures)
    root = parse_svg(markup)
    bars = {r.get("data-name"): r for r in root.iter(f"{SVG}rect") if r.get("class") == "ef-bar"}
    errors = {g.get("data-name"): g for g in root.iter(f"{SVG}g") if g.get("class") == "ef-ci"}
    assert sorted(errors) == ["baseline", "candidate", "champion"]
    left, plot_w = 92, 170  # the chart's axis: x = left + accuracy * plot_w
    for name, group in errors.items():
        expected = INTERVALS[name] if name != "baseline" else {"low": 0.72, "high": 0.78}
        assert (group.get("data-low"), group.get("data-high")) == (f"{expected['low']:.4f}", f"{expected['high']:.4f}")
        whisker, *caps = group.findall(f"{SVG}line")
        assert float(whisker.get("x1")) == pytest.approx(left + expected["low"] * plot_w, abs=0.06)
        assert float(whisker.get("x2")) == pytest.approx(left + expected["high"] * plot_w, abs=0.06)
        # Centred on its own bar, with a cap at each end.
        bar = bars[name]
        assert float(whisker.get("y1")) == pytest.approx(float(bar.get("y")) + float(bar.get("height")) / 2, abs=0.06)
        assert [c.get("x1") for c in caps] == [whisker.get("x1"), whisker.get("x2")]
        assert "95% interval" in group.find(f"{SVG}title").text
    # The candidate's bar ends inside its own interval.
    candidate_end = float(bars["candidate"].get("x")) + float(bars["candidate"].get("width"))
    assert float(errors["candidate"][1].get("x1")) < candidate_end < float(errors["candidate"][1].get("x2"))
    (diff,) = [t for t in root.iter(f"{SVG}text") if t.get("class") == "ef-diff"]
    assert diff.text == "candidate - champion: -0.1110, 95% interval [-0.1400, -0.0820] (paired bootstrap)"
    assert (diff.get("data-low"), diff.get("data-high")) == ("-0.1400", "-0.0820")
    assert float(diff.get("y")) < float(root.get("height"))  # the chart grew to hold the line

    # A gate.json without intervals (or with unusable ones) draws exactly the chart it drew before.
    plain = {**figures, "intervals": None}
    assert "ef-ci" not in page.gate_svg(plain) and "ef-diff" not in page.gate_svg(plain)
    assert float(parse_svg(page.gate_svg(plain)).get("height")) == float(root.get("height")) - 14
    broken = {"intervals": {"candidate": {"estimate": 0.7, "low": float("nan"), "high": 0.8}, "champion": "x"}}
    assert gate_intervals(broken) is None and gate_intervals({}) is None
    # No champion: error bars on what there is, no difference line.
    first = gate_intervals({"intervals": {**INTERVALS, "champion": None, "candidate_minus_champion": None}})
    first_svg = page.gate_svg({"blessed": True, "candidate": 0.701, "baseline": 0.75, "intervals": first})
    assert first_svg.count("class='ef-ci'") == 1 and "ef-diff" not in first_svg


def test_each_run_shows_its_charts_from_its_folder(encoderflow_home):
    write_runs(encoderflow_home)
    runs = collect_runs(encoderflow_home)
    by_id = {r["run_id"]: r for r in runs}
    blessed, rejected, failed = by_id[BLESSED_RUN], by_id[REJECTED_RUN], by_id[safe_run_id(FAILED_RUN)]
    assert blessed["curves"] == HISTORIES
    assert rejected["curves"]["finetune"]["val_loss"] == [0.61, None]  # NaN read as a gap
    assert failed["curves"] == {} and failed["gate_chart"] is None
    assert rejected["gate_chart"] == {
        "blessed": False,
        "candidate": 0.701,
        "baseline": 0.75,
        "champion": 0.812,
        "champion_version": "1",
        "floor": 0.7,
        "min_gain_over_baseline": -0.1,
        "min_change_vs_champion": -0.0,
        "intervals": {
            "confidence": 0.95,
            **{k: INTERVALS[k] for k in ("candidate", "champion", "candidate_minus_champion")},
        },
    }
    assert blessed["gate_chart"]["intervals"] is None
    json.dumps(runs, allow_nan=False)  # runs.json: Starlette refuses NaN, so none may be left

    html = page.render(runs, REGISTRY, "encoderflow-sst2", "http://mlflow.example:5000")
    rows = {}
    for run_id in (BLESSED_RUN, REJECTED_RUN):
        start = html.index(f"<tr class='ef-charts' data-run='{html_escape(run_id)}'>")
        rows[run_id] = html[start : html.index("</tr>", start)]
    for run_id, row in rows.items():
        stages = [s for s, _ in page.STAGES if f"data-stage='{s}'" in row]
        assert stages == ["pretrain", "finetune", "baseline"], run_id
        assert row.count("class='ef-chart ef-gate'") == 1
    assert "data-blessed='true'" in rows[BLESSED_RUN] and "data-blessed='false'" in rows[REJECTED_RUN]

    def finetune_chart(row: str) -> str:
        start = row.index("data-stage='finetune'")
        return row[start : row.index("</svg>", start)]

    assert "val_loss, epoch 2: 0.3800" in finetune_chart(rows[BLESSED_RUN])
    assert "val_loss, epoch 1: 0.6100" in finetune_chart(rows[REJECTED_RUN])
    assert "val_loss, epoch 2" not in finetune_chart(rows[REJECTED_RUN])
    # The run that failed validation has a folder but nothing to draw: no chart row.
    assert f"<tr class='ef-charts' data-run='{safe_run_id(FAILED_RUN)}'>" not in html
    assert "<script" not in html

    # Charts only for the newest runs: the page stays small with 200 runs.
    # (the newest folder, the failed run's, has none and does not use up the allowance).
    few = page.render(runs, REGISTRY, "encoderflow-sst2", None, chart_runs=1)
    assert few.count("<tr class='ef-charts'") == 1 and "newest 1 runs that have them (1 older not drawn" in few
    newest_drawn = next(r["run_id"] for r in runs if r["curves"])
    assert f"<tr class='ef-charts' data-run='{html_escape(newest_drawn)}'>" in few


def test_each_run_links_its_mlflow_run_and_model_version(encoderflow_home):
    write_runs(encoderflow_home)
    runs = collect_runs(encoderflow_home)
    url = "http://mlflow.example:5000"
    registry = {**REGISTRY, "champion": {**REGISTRY["champion"], "run_id": "champrun"}}
    html = page.render(runs, registry, "encoderflow-sst2", url)
    for version in ("1", "2"):
        start = html.index(
            f"<tr class='ef-run has-charts' data-run='{html_escape(BLESSED_RUN if version == '1' else REJECTED_RUN)}'>"
        )
        row = html[start : html.index("</tr>", start)]
        assert f"href='{url}/#/models/encoderflow-sst2/versions/{version}'>model version</a>" in row
        assert f"href='{url}/#/runs/mlflowrun{version}'>MLflow run</a>" in row
    # The champion links its version and the MLflow run that produced it.
    champion = html[html.index("<h2>Champion</h2>") : html.index("<h2>Runs")]
    assert f"{url}/#/models/encoderflow-sst2/versions/1'>MLflow model version</a>" in champion
    assert f"{url}/#/runs/champrun'>MLflow run</a>" in champion
    # A run MLflow logged but did not register (no version yet) still links its MLflow run.
    partial = {"run_id": "r", "state": "running", "registry": {"run_id": "abc/def"}, "folder": None}
    row = page.render([partial], registry, "encoderflow-sst2", url)
    assert f"{url}/#/runs/abc%2Fdef'>MLflow run</a>" in row and "#/models/encoderflow-sst2/versions/None" not in row
    assert "no version" in row
    # A run whose candidate a version held already names it, and the run that registered it.
    again = {"run_id": "r2", "state": "success", "folder": None, "registry": {"version": "3", "run_id": "xyz"}}
    again["registry"]["registered_by"] = "manual__<first>"
    row = page.render([again], registry, "encoderflow-sst2", url)
    assert "encoderflow-sst2 v3 <span class='muted'>(this model, registered by manual__&lt;first&gt;)</span>" in row
    assert f"{url}/#/runs/xyz'>MLflow run</a>" in row


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
        folder = safe_run_id(BLESSED_RUN)
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
        # Typed without its slash: sent to the page, not to the UI's "404 Page Not Found".
        status, body = stack.request("GET", "/encoderflow?model=encoderflow-sst2", headers={"Accept": "text/html"})
        assert status == 200 and BLESSED_RUN in body, (status, str(body)[:300])
        viewer = stack.token("viewer", stack.viewer_password)
        status, body = stack.request("GET", "/encoderflow/", token=None, cookie=viewer, headers={"Accept": "text/html"})
        assert status == 200 and "signed in as viewer" in body
        status, snap = stack.request("GET", "/encoderflow/runs.json")
        # The run that failed before reporting is known by its folder only (this Airflow has no record of it).
        assert status == 200
        assert {r["run_id"] for r in snap["runs"]} == {BLESSED_RUN, REJECTED_RUN, safe_run_id(FAILED_RUN)}
        status, body = stack.request("GET", docs, headers={"Accept": "text/html"})
        assert status == 200 and "Data Docs of sst2" in body
        assert stack.request("GET", f"/encoderflow/runs/{folder}/data_docs/..%2Fgate.json")[0] == 404

        # The page is linked from Airflow's navigation.
        _, plugins = stack.request("GET", "/api/v2/plugins")
        views = [v for p in plugins["plugins"] if p["name"] == "encoderflow" for v in p["external_views"]]
        assert views and views[0]["destination"] == "nav" and views[0]["href"] == "encoderflow/"


def test_a_failed_run_shows_its_first_failure_and_the_fix_until_it_succeeds(tmp_path):
    from encoderflow import errors

    home = tmp_path / "home"
    folder = home / "runs" / "manual__fail"
    folder.mkdir(parents=True)
    cause = errors.Cause("NonFiniteLoss", "pretrain: loss became nan at step 10", "lower the <learning rate>", True)
    (folder / "failure.json").write_text(
        json.dumps({"task_id": "pretrain", "try_number": 1, **dataclasses.asdict(cause)})
    )
    failed = collect_runs(home, [{"run_id": "manual__fail", "state": "failed", "conf": {}}])
    html = page.render(failed, {}, "encoderflow-sst2", None)
    assert "FAILED</span> at pretrain, try 1" in html
    assert "NonFiniteLoss: pretrain: loss became nan at step 10" in html
    assert "fix: lower the &lt;learning rate&gt;" in html  # escaped like every other value
    # Cleared and finished since: the old record stays on disk but is not shown.
    cleared = collect_runs(home, [{"run_id": "manual__fail", "state": "success", "conf": {}}])
    assert cleared[0]["failure"] is None
    assert "FAILED</span>" not in page.render(cleared, {}, "encoderflow-sst2", None)


def test_a_task_failing_after_its_run_finished_shows_that_failure_not_the_earlier_summary_alone(tmp_path):
    # Finished and blessed, then a task cleared and failed: the page must not read "BLESSED" alone,
    # and the failure kept is the new one, not one from before the run finished.
    from encoderflow import errors, layout

    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENCODERFLOW_HOME", str(home))
        folder = layout.run_dir("manual__again")
        folder.mkdir(parents=True)
        old = errors.Cause("DownloadError", "download_corpus: timed out", "retry", False)
        assert errors.record_failure("manual__again", old, task_id="download_corpus", try_number=1)
        summary = {"run_id": "manual__again", "metrics": {"val_accuracy": 0.8}, "gate": {"blessed": True}}
        layout.write_json(folder / "summary.json", summary)
        os.utime(folder / "failure.json", (time.time() - 60, time.time() - 60))
        new = errors.Cause("EncoderflowError", "finetune: encoder.keras altered", "clear pretrain", False)
        assert errors.record_failure("manual__again", new, task_id="finetune", try_number=4)
        assert not errors.record_failure("manual__again", old, task_id="promote", try_number=1)  # first still wins
    failed = collect_runs(home, [{"run_id": "manual__again", "state": "failed", "conf": {}}])
    assert failed[0]["failure"]["task_id"] == "finetune" and failed[0]["gate"]["blessed"] is True
    assert "FAILED</span> at finetune, try 4" in page.render(failed, {}, "encoderflow-sst2", None)
    succeeded = collect_runs(home, [{"run_id": "manual__again", "state": "success", "conf": {}}])
    assert succeeded[0]["failure"] is None


def test_the_page_shows_the_newest_champion_moves_and_says_where_the_rest_are(encoderflow_home):
    """The registry keeps every move now (one a night on a schedule): the page shows the newest."""
    moves = [
        {"at": f"2026-{m:02d}-{d:02d}T03:00:00+00:00", "action": "promote", "who": "airflow", "from": "1",
         "to": "2", "reason": f"night {m}-{d}"}
        for m in (10, 11) for d in range(1, 31)
    ]  # fmt: skip
    html = page.render([], {**REGISTRY, "history": moves}, "encoderflow-sst2", None)
    assert "night 11-30" in html and "night 10-11" in html and "night 10-10" not in html
    assert "10 older move(s) not shown: the registered model's <code>champion.move.*</code> tags" in html


def test_a_run_links_each_validated_files_result_page_failed_first_and_its_failing_tasks_log(tmp_path):
    """The Data Docs index lists its pages with scripts from CDNs (an empty list offline): each file's
    own result page is linked beside it, a failed file first and marked; the failure links the try's log."""
    from encoderflow import errors, layout
    from encoderflow.data import validation
    from tests.data.test_validation import DEV, VALID_FILES, _tsv_field, info_for

    home = tmp_path / "home"
    data = tmp_path / "data"
    for member, text in VALID_FILES.items():
        (data / member).parent.mkdir(parents=True, exist_ok=True)
        (data / member).write_text(text)
    (data / DEV).write_text(_tsv_field(2, 1, "2")(VALID_FILES[DEV]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENCODERFLOW_HOME", str(home))
        folder = layout.run_dir("manual__docs")
        with pytest.raises(validation.ValidationFailed):
            validation.check(info_for("sst2", data), folder / "data_docs" / "labeled")
        url = "http://localhost:8181/dags/encoder_pretraining/runs/manual__docs/tasks/validate_labeled?try_number=1"
        cause = errors.Cause("ValidationFailed", "label 2", "fix the data", True)
        errors.record_failure("manual__docs", cause, task_id="validate_labeled", try_number=1, log_url=url)
    runs = collect_runs(home, [{"run_id": "manual__docs", "state": "failed", "conf": {}}])
    pages = runs[0]["data_docs_pages"]["labeled"]
    assert [(p["file"], p["failed"] > 0) for p in pages] == [
        ("dev.tsv", True),
        ("test.tsv", False),
        ("train.tsv", False),
    ]
    assert all((folder / p["rel"]).is_file() for p in pages)
    html = page.render(runs, {}, "encoderflow-sst2", None)
    assert f"rel='noopener' class='no' href='runs/{folder.name}/{pages[0]['rel']}'>dev.tsv</a>" in html
    assert f"rel='noopener' href='runs/{folder.name}/{pages[1]['rel']}'>test.tsv</a>" in html
    assert f"href='{html_escape(url, quote=True)}'>validate_labeled, try 1</a>" in html
    # Not the site's index: its list is drawn by scripts, which the plugin serves it without (an empty page).
    assert "labeled · <a" in html and "data_docs/labeled/index.html" not in html


def test_a_skipped_run_shows_the_champions_recorded_accuracy_and_why_it_skipped(encoderflow_home):
    """A SKIPPED row said "champion (re-evaluated)" of an accuracy nothing in that run evaluated."""
    from encoderflow import layout

    run_id = "scheduled__2026-12-08T03:00:00+00:00"
    unchanged = {
        "champion_version": "1",
        "message": "nothing changed since v2, which the gate rejected against champion v1",
        "basis": "data, code and config hashes equal v2's, as do the champion and the gate.* and baseline.* settings "
        "it was judged under; it failed floor: 0.6720 < floor 0.9900",
        "rejected_version": "2",
    }
    summary = {"run_id": run_id, "preset": "smoke", "unchanged": unchanged, "metrics": {"champion_val_accuracy": 0.81}}
    layout.write_json(layout.run_dir(run_id) / "summary.json", summary)
    html = page.render(collect_runs(encoderflow_home), REGISTRY, "encoderflow-sst2", None)
    assert "champion (recorded): <b>0.8100</b>" in html and "re-evaluated" not in html
    assert html_escape(f"training skipped: {unchanged['message']} ({unchanged['basis']})") in html


def test_the_page_answers_503_saying_why_when_airflows_database_does_not_answer(encoderflow_home, monkeypatch):
    """With PostgreSQL down the page was a bare 500: checking who may read runs asks the metadata DB.
    The outage is stood in for by an auth manager whose check raises what SQLAlchemy raises then."""
    import sqlite3

    import airflow.api_fastapi.app as airflow_app
    import airflow.api_fastapi.core_api.security as security
    import encoderflow_plugin as plugin
    from fastapi.testclient import TestClient
    from sqlalchemy.exc import OperationalError

    class DatabaseDown:
        def is_authorized_dag(self, **_):
            raise OperationalError("SELECT 1", {}, sqlite3.OperationalError("connection refused"))

    async def signed_in(token):
        return object()

    monkeypatch.setattr(airflow_app, "get_auth_manager", lambda: DatabaseDown())
    monkeypatch.setattr(security, "resolve_user_from_token", signed_in)
    client = TestClient(plugin.app)
    for accept in ("application/json", "text/html"):
        answer = client.get("/runs.json", headers={"Accept": accept, "Authorization": "Bearer t"})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "30", answer.text
        said = "Airflow's metadata database does not answer (OperationalError): who may read runs cannot be"
        assert (said if accept == "application/json" else html_escape(said)) in answer.text
        assert BLESSED_RUN not in answer.text  # nothing of the runs leaks without the check


def test_data_docs_are_served_with_no_script_of_theirs_allowed_to_run(encoderflow_home, monkeypatch):
    """Data Docs show validated values unescaped: a labeled row `<script>...</script>` ran, on Airflow's own
    origin, with the session of whoever opened the failure's link from the runs page."""
    import airflow.api_fastapi.app as airflow_app
    import airflow.api_fastapi.core_api.security as security
    import encoderflow_plugin as plugin
    from fastapi.testclient import TestClient

    class Everyone:
        def is_authorized_dag(self, **_):
            return True

    async def signed_in(token):
        return object()

    monkeypatch.setattr(airflow_app, "get_auth_manager", lambda: Everyone())
    monkeypatch.setattr(security, "resolve_user_from_token", signed_in)
    folder = encoderflow_home / "runs" / "run-x" / "data_docs" / "labeled"
    folder.mkdir(parents=True)
    (folder / "index.html").write_text("<td><script>fetch('/api/v2/connections')</script></td>")
    answer = TestClient(plugin.app).get(
        "/runs/run-x/data_docs/labeled/index.html", headers={"Authorization": "Bearer t"}
    )
    assert answer.status_code == 200 and "<script>" in answer.text
    policy = answer.headers["content-security-policy"]
    assert "script-src 'none'" in policy and "object-src 'none'" in policy and "base-uri 'none'" in policy
    assert answer.headers["x-content-type-options"] == "nosniff"
