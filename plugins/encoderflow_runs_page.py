"""The Encoderflow runs page: what every run of ``encoder_pretraining`` decided, measured and wrote.

Plain Python (standard library and ``encoderflow``'s light modules; MLflow only when the registry
is asked), so it renders the same in the api-server and in a test. What it shows is
:func:`encoderflow.runs.collect_runs`' record (the run folders under ``ENCODERFLOW_HOME`` merged
with the Airflow DAG runs, as ``encoderflow runs`` prints it too), and the MLflow registry
(champion and its history). This module only draws it.

Each run shows its training curves (``<stage>/result.json``'s per-epoch history) and its gate
decision as charts: inline SVG written here, so the page needs no script, no chart library and no
network, and a chart is as escaped as any other text on it.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from encoderflow import DAG_ID
from encoderflow.gate import METRICS as GATE_METRICS
from encoderflow.gate import metric_tag
from encoderflow.runs import (
    DEFAULT_MODEL,
    FORCE_HINT,
    STAGES,
    accuracy_text,
    failed_at,
    finite,
    intervals_text,
    settings_text,
    skipped_text,
)

METRICS = (
    ("val_accuracy", "dev accuracy"),
    ("baseline_val_accuracy", "BoW baseline"),
    ("champion_val_accuracy", "champion (re-evaluated)"),
    ("mlm_val_accuracy", "MLM accuracy"),
)
# Charts are drawn for the newest runs only: 200 runs of four SVGs each (~15 kB a run) would make a page of megabytes.
CHART_RUNS = 30


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
            # Versions encoderflow prune --versions deleted: their rows linked to an MLflow page that is gone.
            "deleted": sorted(registry.pruned_versions(model), key=int),
            "error": None,
            "store": registry.tracking_uri(),
        }
    except Exception as exc:  # noqa: BLE001 - shown on the page instead
        return {"champion": None, "history": [], "error": f"{type(exc).__name__}: {exc}", "store": None}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def airflow_run_href(run_id: str) -> str:
    # Relative to the page at <base>/encoderflow/, so it works behind a proxy prefix too.
    return f"../dags/{DAG_ID}/runs/{quote(run_id, safe='')}"


# --- charts: inline SVG --------------------------------------------------------------------------------------------

# The newest champion moves on the page; the registry keeps them all (a nightly schedule: one a day).
MOVES_SHOWN = 50
TRAIN_COLOUR, VAL_COLOUR = "#2b6cb0", "#dd6b20"
GATE_COLOURS = {"blessed": "#38a169", "rejected": "#e53e3e", "baseline": "#a0aec0", "champion": "#3182ce"}
FLOOR_COLOUR = "#742a2a"
_SVG_OPEN = "<svg xmlns='http://www.w3.org/2000/svg' role='img' font-family='system-ui,sans-serif' font-size='10'"


def _n(value: float) -> str:
    """A coordinate, short: the page carries many of them."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _tick_label(value: float) -> str:
    return f"{round(value, 6):g}"


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 times a power of ten); the axis spans them.

    Args:
        lo: the smallest value to show.
        hi: the largest value to show.
        count: about how many intervals.
    """
    if hi - lo < 1e-9:  # one value (one epoch, or a flat curve): open a small range around it
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw - 1e-12)
    start, end = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [start + i * step for i in range(round((end - start) / step) + 1)]


def _epoch_ticks(epochs: int) -> list[int]:
    if epochs <= 10:
        return list(range(1, epochs + 1))
    step = math.ceil(epochs / 8)
    ticks = list(range(1, epochs + 1, step))
    # The last epoch gets a label only where it does not crowd the one before it.
    return ticks + [epochs] if epochs - ticks[-1] >= step else ticks


def curve_series(history: Mapping[str, Sequence[float | None]]) -> list[tuple[str, list[tuple[str, str, list]]]]:
    """The loss and the accuracy panel of one stage: (axis label, [(metric key, train|val, values)]).

    Keras names accuracy after the metric (``accuracy``, ``sparse_categorical_accuracy``); its
    validation twin is the same key with ``val_``. Anything else in a history (a learning rate) is
    not drawn.
    """
    accuracies = sorted({k.removeprefix("val_") for k in history if k.endswith("accuracy")})
    accuracy = "accuracy" if "accuracy" in accuracies else (accuracies[0] if accuracies else None)
    panels = []
    for label, key in (("loss", "loss"), ("accuracy", accuracy)):
        if key is None:
            continue
        series = [
            (name, role, list(history[name]))
            for name, role in ((key, "train"), (f"val_{key}", "val"))
            if history.get(name) and any(v is not None for v in history[name])
        ]
        if series:
            panels.append((label, series))
    return panels


def curves_svg(stage: str, title: str, history: Mapping[str, Sequence[float | None]]) -> str:
    """One stage's training curves: a loss panel and an accuracy panel, train (solid) vs val (dashed), per epoch.

    Args:
        stage: the run-folder stage (``pretrain``), kept as ``data-stage`` for tests and styling.
        title: the chart's heading.
        history: metric -> one value per epoch (None where there is none).

    Returns:
        An ``<svg>`` element, or "" when the history has no loss or accuracy to draw.
    """
    panels = curve_series(history)
    if not panels:
        return ""
    epochs = max(len(values) for _, series in panels for _, _, values in series)
    panel_w, plot_w, plot_h, left, top = 215, 150, 112, 50, 40
    width, height = left + panel_w * len(panels) - 15, top + plot_h + 36
    out = [
        f"{_SVG_OPEN} class='ef-chart ef-curves' data-stage='{_e(stage)}' data-epochs='{epochs}' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        f"aria-label='{_e(title)}: loss and accuracy per epoch, train and validation'>",
        f"<title>{_e(title)}: loss and accuracy per epoch</title>",
        f"<text x='4' y='13' font-size='12' font-weight='600'>{_e(title)}</text>",
        # The legend: colour and dash both tell train from val (readable without colour too).
        f"<g transform='translate({width - 112},9)'><line x1='0' y1='0' x2='16' y2='0' stroke='{TRAIN_COLOUR}' "
        f"stroke-width='2'/><text x='20' y='3'>train</text><line x1='54' y1='0' x2='70' y2='0' "
        f"stroke='{VAL_COLOUR}' stroke-width='2' stroke-dasharray='4 2'/><text x='74' y='3'>val</text></g>",
    ]

    def x_of(x0: float, epoch: int) -> float:
        inner = plot_w - 12  # keep the first and last point off the frame
        return x0 + 6 + (inner / 2 if epochs == 1 else (epoch - 1) * inner / (epochs - 1))

    for index, (label, series) in enumerate(panels):
        x0 = left + index * panel_w
        values = [v for _, _, vs in series for v in vs if v is not None]
        ticks = nice_ticks(min(values), max(values))
        y_lo, y_hi = ticks[0], ticks[-1]

        def y_of(value: float, y_lo: float = y_lo, y_hi: float = y_hi) -> float:
            return top + plot_h - (value - y_lo) / (y_hi - y_lo) * plot_h

        last = ", ".join(f"{role} {next(v for v in reversed(vs) if v is not None):.4g}" for _, role, vs in series)
        out.append(f"<g class='ef-panel' data-metric='{_e(label)}'>")
        out.append(f"<text x='{x0}' y='{top - 8}' fill='#4a5568'>last: {_e(last)}</text>")
        out.append(f"<rect x='{x0}' y='{top}' width='{plot_w}' height='{plot_h}' fill='#fff' stroke='#cbd5e0'/>")
        for tick in ticks:
            y = _n(y_of(tick))
            out.append(
                f"<line x1='{x0}' y1='{y}' x2='{x0 + plot_w}' y2='{y}' stroke='#edf2f7'/>"
                f"<text x='{x0 - 4}' y='{y}' dy='3' text-anchor='end' fill='#4a5568'>{_tick_label(tick)}</text>"
            )
        for epoch in _epoch_ticks(epochs):
            x = _n(x_of(x0, epoch))
            out.append(
                f"<line x1='{x}' y1='{top + plot_h}' x2='{x}' y2='{top + plot_h + 3}' stroke='#718096'/>"
                f"<text x='{x}' y='{top + plot_h + 13}' text-anchor='middle' fill='#4a5568'>{epoch}</text>"
            )
        out.append(
            f"<text x='{x0 + plot_w / 2}' y='{top + plot_h + 28}' text-anchor='middle'>epoch</text>"
            f"<text transform='rotate(-90)' x='{-(top + plot_h / 2)}' y='{x0 - 34}' text-anchor='middle'>"
            f"{_e(label)}</text>"
        )
        for key, role, vals in series:
            colour, dash = (TRAIN_COLOUR, "") if role == "train" else (VAL_COLOUR, " stroke-dasharray='4 2'")
            # A missing value breaks the line instead of bridging it.
            segment: list[str] = []
            segments = [segment]
            for epoch, value in enumerate(vals, start=1):
                if value is None:
                    segment = []
                    segments.append(segment)
                else:
                    segment.append(f"{_n(x_of(x0, epoch))},{_n(y_of(value))}")
            out.append(f"<g class='ef-series' data-series='{_e(key)}' data-role='{role}'>")
            out.extend(
                f"<polyline points='{' '.join(seg)}' fill='none' stroke='{colour}' stroke-width='1.8'{dash}/>"
                for seg in segments
                if len(seg) > 1
            )
            for epoch, value in enumerate(vals, start=1):
                if value is not None:
                    out.append(
                        f"<circle cx='{_n(x_of(x0, epoch))}' cy='{_n(y_of(value))}' r='2.6' fill='{colour}' "
                        f"data-epoch='{epoch}'><title>{_e(key)}, epoch {epoch}: {value:.4f}</title></circle>"
                    )
            out.append("</g>")
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def gate_svg(figures: Mapping[str, Any]) -> str:
    """The gate's comparison: candidate, BoW baseline and champion accuracy as bars, with the floor it used.

    Bars run from 0 to 1 so a small margin looks small; the numbers beside them are exact, and for
    the baseline and the champion they say what the candidate needed to reach, when the gate recorded it.
    Where the gate recorded bootstrap intervals, each bar carries its accuracy's 95% interval as an
    error bar, and a line under the axis gives the paired interval of candidate - champion (the
    one that says whether a margin is more than the dev set's noise).

    Args:
        figures: :func:`gate_figures`' dict.

    Returns:
        An ``<svg>`` element, or "" when there is no accuracy to draw.
    """
    candidate, baseline, champion = (finite(figures.get(k)) for k in ("candidate", "baseline", "champion"))
    if candidate is None and baseline is None and champion is None:
        return ""
    blessed = figures.get("blessed")
    floor = finite(figures.get("floor"))
    gain, change = finite(figures.get("min_gain_over_baseline")), finite(figures.get("min_change_vs_champion"))
    version = figures.get("champion_version")
    intervals = figures.get("intervals") or {}
    diff = intervals.get("candidate_minus_champion")
    pct = f"{intervals.get('confidence') or 0.95:.0%}"

    def needs(value: float | None, margin: float | None) -> float | None:
        # Where the candidate had to reach on this comparison; a level at or below 0 asks nothing
        # (the smoke preset allows any gain over the baseline, -1), so it is not drawn.
        level = value + margin if value is not None and margin is not None else None
        return level if level is not None and level > 0 else None

    rows = [
        ("candidate", "candidate", candidate, GATE_COLOURS["blessed" if blessed else "rejected"], None),
        (
            "baseline",
            "BoW baseline",
            baseline,
            GATE_COLOURS["baseline"],
            needs(baseline, gain),
        ),
        (
            "champion",
            f"champion v{version}" if version else "champion",
            champion,
            GATE_COLOURS["champion"],
            needs(champion, change),
        ),
    ]
    left, plot_w, top, row_h, bar_h = 92, 170, 34, 26, 16
    width, height = left + plot_w + 200, top + row_h * len(rows) + 34 + (14 if diff else 0)
    verdict = "BLESSED" if blessed else ("NOT BLESSED" if blessed is not None else "no decision")

    def x_of(value: float) -> float:
        return left + max(0.0, min(1.0, value)) * plot_w

    out = [
        f"{_SVG_OPEN} class='ef-chart ef-gate' data-blessed='{str(bool(blessed)).lower()}' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        f"aria-label='gate: candidate, baseline and champion accuracy'>",
        "<title>gate: candidate vs baseline vs champion (dev accuracy)</title>",
        f"<text x='4' y='13' font-size='12' font-weight='600'>Gate: {_e(verdict)}</text>",
    ]
    bottom = top + row_h * len(rows)
    for tick in (0, 0.25, 0.5, 0.75, 1):
        x = _n(x_of(tick))
        out.append(
            f"<line x1='{x}' y1='{top - 4}' x2='{x}' y2='{bottom}' stroke='#edf2f7'/>"
            f"<text x='{x}' y='{bottom + 12}' text-anchor='middle' fill='#4a5568'>{_tick_label(tick)}</text>"
        )
    out.append(
        f"<line x1='{left}' y1='{bottom}' x2='{left + plot_w}' y2='{bottom}' stroke='#718096'/>"
        f"<text x='{left + plot_w / 2}' y='{bottom + 26}' text-anchor='middle'>dev accuracy</text>"
    )
    for index, (name, label, value, colour, level) in enumerate(rows):
        y = top + index * row_h + (row_h - bar_h) / 2
        out.append(f"<text x='{left - 6}' y='{_n(y + bar_h / 2)}' dy='3.5' text-anchor='end'>{_e(label)}</text>")
        if value is None:
            none = "no champion yet" if name == "champion" else "none"
            out.append(f"<text x='{left + plot_w + 6}' y='{_n(y + bar_h / 2)}' dy='3.5' fill='#718096'>{none}</text>")
            continue
        text = f"{value:.4f}" + (f" · candidate needs ≥ {level:.4f}" if level is not None else "")
        out.append(
            f"<rect class='ef-bar' data-name='{name}' data-value='{value:.4f}' x='{left}' y='{_n(y)}' "
            f"width='{_n(x_of(value) - left)}' height='{bar_h}' fill='{colour}'><title>{_e(label)}: {value:.4f}"
            f"{_e(f' (the candidate needed at least {level:.4f})' if level is not None else '')}</title></rect>"
            f"<text x='{left + plot_w + 6}' y='{_n(y + bar_h / 2)}' dy='3.5'>{_e(text)}</text>"
        )
        if (ci := intervals.get(name)) is not None:  # an error bar with short caps, across the bar's end
            lo, hi, mid = _n(x_of(ci["low"])), _n(x_of(ci["high"])), y + bar_h / 2
            caps = "".join(f"<line x1='{x}' y1='{_n(mid - 4)}' x2='{x}' y2='{_n(mid + 4)}'/>" for x in (lo, hi))
            out.append(
                f"<g class='ef-ci' data-name='{name}' data-low='{ci['low']:.4f}' data-high='{ci['high']:.4f}' "
                f"stroke='#1a202c' stroke-width='1.2'><title>{_e(label)}: {pct} interval "
                f"{ci['low']:.4f} to {ci['high']:.4f}</title>"
                f"<line x1='{lo}' y1='{_n(mid)}' x2='{hi}' y2='{_n(mid)}'/>{caps}</g>"
            )
        if level is not None:  # where the candidate's bar had to reach, on this comparison's row
            x = _n(x_of(level))
            out.append(
                f"<line class='ef-needs' x1='{x}' y1='{_n(y - 2)}' x2='{x}' y2='{_n(y + bar_h + 2)}' "
                "stroke='#1a202c' stroke-width='1.5'/>"
            )
    if diff:
        out.append(
            f"<text class='ef-diff' x='4' y='{bottom + 42}' data-low='{diff['low']:+.4f}' "
            f"data-high='{diff['high']:+.4f}'>candidate - champion: {diff['estimate']:+.4f}, {pct} interval "
            f"[{diff['low']:+.4f}, {diff['high']:+.4f}] (paired bootstrap)</text>"
        )
    if floor is not None:
        x = _n(x_of(floor))
        out.append(
            f"<g class='ef-floor' data-value='{floor:.4f}'><line x1='{x}' y1='{top - 6}' x2='{x}' y2='{bottom}' "
            f"stroke='{FLOOR_COLOUR}' stroke-width='1.5' stroke-dasharray='3 2'/>"
            f"<text x='{x}' y='{top - 9}' text-anchor='middle' fill='{FLOOR_COLOUR}'>floor {floor:.2f}</text></g>"
        )
    out.append("</svg>")
    return "".join(out)


def charts_html(run: Mapping[str, Any]) -> str:
    """A run's charts side by side: one per stage with a history, then the gate's; "" when it has none."""
    curves = run.get("curves") or {}
    charts = [curves_svg(stage, title, curves[stage]) for stage, title in STAGES if curves.get(stage)]
    if run.get("gate_chart"):
        charts.append(gate_svg(run["gate_chart"]))
    return "".join(f"<figure>{c}</figure>" for c in charts if c)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2rem;color:#1a202c;font-size:14px}
h1{font-size:1.4rem;margin:0 0 .3rem} h2{font-size:1.1rem;margin:1.4rem 0 .4rem}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #e2e8f0;padding:.4rem .5rem;
text-align:left;vertical-align:top} th{background:#f7fafc;font-weight:600}
.ok{color:#22543d;background:#c6f6d5;border-radius:4px;padding:0 .35rem;font-weight:600}
.no{color:#742a2a;background:#fed7d7;border-radius:4px;padding:0 .35rem;font-weight:600}
.muted{color:#718096} ul{margin:.2rem 0;padding-left:1.1rem} code{font-size:12px}
a{color:#2b6cb0}
tr.has-charts>td{border-bottom:none} tr.ef-charts>td{padding-top:0}
.charts{display:flex;flex-wrap:wrap;gap:.6rem 1.2rem} .charts figure{margin:0} .charts svg{display:block}
"""


def render(
    runs: list[dict[str, Any]],
    registry: dict[str, Any],
    model: str,
    mlflow_url: str | None,
    user: str | None = None,
    chart_runs: int = CHART_RUNS,
) -> str:
    """The whole page as HTML (no script: it renders in the Airflow UI's frame and on its own).

    Args:
        runs: :func:`encoderflow.runs.collect_runs`' entries, newest first.
        registry: :func:`registry_state`'s dict.
        model: the registered model's name.
        mlflow_url: where a browser reaches the MLflow UI (links), or None.
        user: who is signed in, shown in the header.
        chart_runs: how many of the newest runs with something to draw get their charts.
    """
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
        link = "".join(
            " · " + part.replace(">model version<", ">MLflow model version<")
            for part in _mlflow_links(
                mlflow_url, model, champ.get("version"), champ.get("run_id") if mlflow_url else None
            )
        )
        tags = champ.get("tags") or {}
        try:
            accuracy = accuracy_text(float(tags[metric_tag(GATE_METRICS["candidate"])]))
        except (KeyError, TypeError, ValueError):
            accuracy = "–"
        out.append(
            f"<p><b>v{_e(champ['version'])}</b> · dev accuracy {accuracy}"
            f" · from Airflow run <code>{_e(tags.get('airflow.run_id', '–'))}</code>{link}</p>"
        )
    else:
        out.append(f"<p class='muted'>no champion yet ({_e(registry.get('store'))})</p>")
    history = list(reversed(registry.get("history") or []))
    if champ and not history:
        out.append("<p class='muted'>no recorded champion moves</p>")
    if history:
        out.append("<table><tr><th>when (UTC)</th><th>action</th><th>move</th><th>by</th><th>reason</th></tr>")
        for ev in history[:MOVES_SHOWN]:
            out.append(
                f"<tr><td>{_e(str(ev.get('at', ''))[:19].replace('T', ' '))}</td><td>{_e(ev.get('action'))}</td>"
                f"<td>v{_e(ev.get('from') or '–')} → v{_e(ev.get('to'))}</td><td>{_e(ev.get('who'))}</td>"
                f"<td>{_e(ev.get('reason'))}</td></tr>"
            )
        out.append("</table>")
        if len(history) > MOVES_SHOWN:
            out.append(
                f"<p class='muted'>{len(history) - MOVES_SHOWN} older move(s) not shown: the registered model's "
                "<code>champion.move.*</code> tags in MLflow hold every one</p>"
            )

    out.append(f"<h2>Runs ({len(runs)})</h2>")
    if not runs:
        out.append("<p class='muted'>No runs yet: trigger <code>encoder_pretraining</code>.</p>")
    else:
        out.append(
            "<table><tr><th>run</th><th>gate decision</th><th>metrics</th><th>registry</th><th>Data Docs</th></tr>"
        )
        charted = uncharted = 0
        deleted = {(model, str(v)) for v in registry.get("deleted") or ()}
        for run in runs:
            figures = charts_html(run)
            if figures and charted >= chart_runs:
                figures, uncharted = "", uncharted + 1
            charted += bool(figures)
            out.append(_row(run, mlflow_url, figures, deleted))
        out.append("</table>")
        if uncharted:
            out.append(
                f"<p class='muted'>Charts are shown for the newest {chart_runs} runs that have them "
                f"({uncharted} older not drawn; <code>runs.json</code> has their histories).</p>"
            )
    if not mlflow_url:
        out.append("<p class='muted'>Set ENCODERFLOW_MLFLOW_UI_URL on the api-server to link MLflow runs.</p>")
    out.append("</body></html>")
    return "".join(out)


def _mlflow_links(mlflow_url: str | None, model: str, version: Any, run_id: Any) -> list[str]:
    """Links to an MLflow model version and run, or their ids as text when no MLflow UI address is set."""
    parts = []
    if version and mlflow_url:
        parts.append(
            f"<a target='_blank' rel='noopener' href='{_e(mlflow_url)}/#/models/{quote(model, safe='')}/versions/"
            f"{quote(str(version), safe='')}'>model version</a>"
        )
    if run_id and mlflow_url:
        # MLflow's UI resolves #/runs/<id> to the run in its experiment.
        parts.append(
            f"<a target='_blank' rel='noopener' href='{_e(mlflow_url)}/#/runs/{quote(str(run_id), safe='')}'>"
            "MLflow run</a>"
        )
    elif run_id:
        parts.append(f"MLflow run <code>{_e(run_id)}</code>")
    return parts


def _intervals_text(intervals: Mapping[str, Any] | None) -> str:
    """The gate cell's line of bootstrap intervals: the candidate's accuracy and its difference to the champion."""
    said = intervals_text(dict(intervals) if intervals else None)
    return f"<div class='muted ef-ci-text'>{_e(said)}</div>" if said else ""


def _row(
    run: dict[str, Any], mlflow_url: str | None, figures: str = "", deleted: set[tuple[str, str]] = frozenset()
) -> str:
    """The run's table row, and under it a row with its charts (``figures``, :func:`charts_html`) if any."""
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
            run.get("triggered_by") and f"by {_e(run['triggered_by'])}",
        )
        if m
    ]
    if meta:
        cells[0] += "<div class='muted'>" + " · ".join(meta) + "</div>"
    if run.get("settings"):
        cells[0] += f"<div class='muted'>set <code>{_e(settings_text(run['settings']))}</code></div>"

    gate = run.get("gate")
    failure = run.get("failure")
    failed = ""
    if failure:
        where = failed_at(failure)
        if where and str(failure.get("log_url") or "").startswith(("http://", "https://", "/")):
            where = f"<a target='_top' href='{_e(failure['log_url'])}'>{_e(where)}</a>"
        else:
            where = _e(where)
        failed = (
            f"<span class='no'>FAILED</span>{f' at {where}' if where else ''}<ul><li>{_e(failure.get('error'))}: "
            f"{_e(failure.get('message'))}</li><li>fix: {_e(failure.get('fix'))}</li></ul>"
        )
    if gate is None and failure:
        cells.append(failed)
    elif gate is None and run.get("unchanged"):
        cells.append(
            f"<span class='muted'>SKIPPED</span><ul><li>training skipped: {_e(skipped_text(run['unchanged']))}; "
            f"{FORCE_HINT}</li></ul>"
        )
    elif gate is None:
        cells.append("<span class='muted'>not gated</span>")
    else:
        verdict = "<span class='ok'>BLESSED</span>" if gate.get("blessed") else "<span class='no'>NOT BLESSED</span>"
        reasons = gate.get("reasons") or []
        # Reasons say why not; for a blessing, each check's detail says by how much.
        details = reasons or [f"{c.get('name')}: {c.get('detail')}" for c in run.get("checks") or [] if c.get("passed")]
        items = "".join(f"<li>{_e(r)}</li>" for r in details) or "<li>all checks passed</li>"
        # A task that failed after the run finished (cleared) comes first: the verdict is history.
        earlier = "<div class='muted'>before that, the run's gate said:</div>" if failure else ""
        cells.append(f"{failed}{earlier}{verdict}<ul>{items}</ul>{_intervals_text(run.get('intervals'))}")

    metrics = run.get("metrics") or {}
    # A skipped run re-evaluated nothing: the champion's accuracy it shows is the one recorded on its version.
    labels = (
        {**dict(METRICS), "champion_val_accuracy": "champion (recorded)"} if run.get("unchanged") else dict(METRICS)
    )
    cells.append(
        # The metric's name as MLflow, summary.json and `encoderflow runs` call it, on hover.
        "<br>".join(
            f"<span title='{key}'>{labels[key]}: <b>{accuracy_text(metrics.get(key))}</b></span>"
            for key, _ in METRICS
            if key in metrics
        )
        or "<span class='muted'>–</span>"
    )

    reg = run.get("registry") or {}
    if reg.get("version") or reg.get("run_id"):
        model = reg.get("registered_model") or DEFAULT_MODEL
        head = f"{_e(model)} v{_e(reg['version'])}" if reg.get("version") else "<span class='muted'>no version</span>"
        if reg.get("version") and reg.get("registered_by"):  # a candidate that version held already
            head += f" <span class='muted'>(this model, registered by {_e(reg['registered_by'])})</span>"
        if (model, str(reg.get("version"))) in deleted:  # MLflow holds neither the version nor its run now
            cells.append(f"{head} <span class='muted'>(deleted by prune)</span>")
        else:
            links = _mlflow_links(mlflow_url, model, reg.get("version"), reg.get("run_id"))
            cells.append("<br>".join([head, *links]))
    else:
        cells.append("<span class='muted'>not registered</span>")

    docs = run.get("data_docs") or {}
    if run.get("pruned_at"):
        cells.append(f"<span class='muted'>folder pruned {_e(str(run['pruned_at'])[:10])}</span>")
    elif docs and run.get("folder"):
        pages = run.get("data_docs_pages") or {}

        def link(rel: str, text: str, failed: int = 0) -> str:
            css = " class='no'" if failed else ""
            return f"<a target='_blank' rel='noopener'{css} href='runs/{quote(run['folder'])}/{_e(rel)}'>{_e(text)}</a>"

        # Each file's result page, a table that reads as it is. A site's index draws its list with
        # scripts, which are not run here (DATA_DOCS_HEADERS: a validated value could be one): it shows
        # an empty list, so it is linked only for a run that recorded no result pages.
        cells.append(
            "<br>".join(
                (
                    _e(name) + "".join(f" · {link(p['rel'], p['file'], p['failed'])}" for p in pages[name])
                    if pages.get(name)
                    else link(rel, name)
                )
                for name, rel in docs.items()
            )
        )
    else:
        cells.append("<span class='muted'>–</span>")
    row = (
        f"<tr class='ef-run{' has-charts' if figures else ''}' data-run='{_e(run_id)}'>"
        + "".join(f"<td>{c}</td>" for c in cells)
        + "</tr>"
    )
    if figures:
        row += (
            f"<tr class='ef-charts' data-run='{_e(run_id)}'><td colspan='{len(cells)}'>"
            f"<div class='charts'>{figures}</div></td></tr>"
        )
    return row
