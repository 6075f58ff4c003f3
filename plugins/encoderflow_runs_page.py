"""The Encoderflow runs page: what every run of ``encoder_pretraining`` decided, measured and wrote.

Plain Python (standard library and ``encoderflow.layout``; MLflow only when the registry is
asked), so it renders the same in the api-server and in a test. The sources are the run folders
under ``ENCODERFLOW_HOME`` (``summary.json`` once a run reports, ``gate.json`` once it is gated,
``data_docs/`` once it is validated), the Airflow DAG runs (state, times), and the MLflow registry
(champion and its history).

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
from encoderflow.config import GateConfig
from encoderflow.errors import failure_outlived
from encoderflow.gate import METRICS as GATE_METRICS
from encoderflow.gate import metric_tag
from encoderflow.layout import read_json_or_none, safe_run_id
from encoderflow.results import current_names

# Declared once, with the gate's other settings: gate.registered_model's default.
DEFAULT_MODEL = GateConfig().registered_model
METRICS = (
    ("val_accuracy", "dev accuracy"),
    ("baseline_val_accuracy", "BoW baseline"),
    ("champion_val_accuracy", "champion (re-evaluated)"),
    ("mlm_val_accuracy", "MLM accuracy"),
)
# The run-folder stages that keep a per-epoch ``history`` in ``<stage>/result.json``, in page order.
STAGES = (
    ("pretrain", "Pretraining (MLM)"),
    ("finetune", "Fine-tuning"),
    ("baseline", "BoW baseline"),
)
# Charts are drawn for the newest runs only: 200 runs of four SVGs each (~15 kB a run) would make a page of megabytes.
CHART_RUNS = 30


def data_docs(run_dir: Path) -> dict[str, str]:
    """dataset -> index.html path relative to the run folder, for every Data Docs site it holds."""
    root = run_dir / "data_docs"
    if not root.is_dir():
        return {}
    return {d.name: f"data_docs/{d.name}/index.html" for d in sorted(root.iterdir()) if (d / "index.html").is_file()}


def collect_runs(home: Path, dag_runs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One entry per run: the Airflow run (if known) merged with its folder (if any), newest first.

    A run whose folder ``encoderflow prune`` removed shows what it decided and measured from the
    record prune kept (``pruned/<folder>.json``), with ``pruned_at``; its charts and Data Docs are gone.

    Args:
        home: ENCODERFLOW_HOME.
        dag_runs: Airflow runs of the DAG, newest first, as dicts with ``run_id``, ``state``,
            ``start_date``, ``end_date`` (strings), ``conf``.
    """
    runs: dict[str, dict[str, Any]] = {}
    for dr in dag_runs or []:
        runs[safe_run_id(dr["run_id"])] = {**dr, "folder": None}
    runs_root = home / "runs"
    # Dot names are not runs (encoderflow prune's .prune/); a folder may go while this reads.
    found = [(_mtime(p), p) for p in runs_root.iterdir() if not p.name.startswith(".")] if runs_root.is_dir() else []
    for mtime, folder in sorted((t, p) for t, p in found if t is not None and p.is_dir())[::-1]:
        entry = runs.setdefault(folder.name, _unknown(mtime))
        entry["folder"] = folder.name
        # A run cleared and finished since its failure shows none; one that failed after it finished
        # (a cleared task) shows that failure beside the summary it had.
        failure = read_json_or_none(folder / "failure.json")
        summary = read_json_or_none(folder / "summary.json")
        if failure and summary and failure_outlived(folder):
            failure = None
        _fill(entry, summary, read_json_or_none(folder / "gate.json"), failure, folder.name)
        entry["curves"] = read_curves(folder)
        entry["data_docs"] = data_docs(folder)
    pruned_root = home / "pruned"
    records = sorted(pruned_root.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in records if pruned_root.is_dir() else []:
        record = read_json_or_none(path)
        if not record or runs.get(path.stem, {}).get("folder"):
            continue  # unreadable, or a run of that name wrote a folder again since
        entry = runs.setdefault(path.stem, _unknown(path.stat().st_mtime))
        _fill(entry, record.get("summary"), record.get("gate"), record.get("failure"), path.stem)
        entry["pruned_at"] = record.get("pruned_at")
    # Airflow's runs first, newest first as given; then folders no Airflow run claims, newest first.
    out = list(runs.values())
    for entry in out:
        entry.setdefault("preset", (entry.get("conf") or {}).get("preset"))
    return out


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _unknown(mtime: float) -> dict[str, Any]:
    """The entry of a run folder (or pruned record) no Airflow run claims."""
    return {
        "run_id": None,
        "state": None,
        "start_date": None,
        "end_date": None,
        "conf": {},
        "mtime": mtime,
        "folder": None,
    }


def _fill(
    entry: dict[str, Any],
    summary: dict[str, Any] | None,
    gate: dict[str, Any] | None,
    failure: dict[str, Any] | None,
    folder_name: str,
) -> None:
    """``entry``'s decision, metrics and registry from a run's ``summary.json``, ``gate.json`` and
    ``failure.json`` (each None when absent), whether read from its folder or a pruned record."""
    if summary and "metrics" in summary:  # a summary written before a metric's rename reads as today's
        summary["metrics"] = current_names(summary["metrics"])
    entry["summary"] = summary
    if summary and not entry.get("run_id"):
        entry["run_id"] = summary.get("run_id")
    entry["run_id"] = entry.get("run_id") or folder_name
    if summary and "unchanged" in summary:  # check_lineage short-circuited: nothing trained or gated
        entry["unchanged"] = summary["unchanged"]
        entry["metrics"] = summary.get("metrics", {})
        entry["registry"] = {}
        entry["preset"] = summary.get("preset")
    elif summary:
        entry["gate"] = {"blessed": summary["gate"].get("blessed"), "reasons": summary["gate"].get("reasons", [])}
        entry["metrics"] = summary.get("metrics", {})
        entry["registry"] = summary.get("registry", {})
        entry["preset"] = summary.get("preset")
    elif gate:
        entry["gate"] = {"blessed": gate.get("blessed"), "reasons": gate.get("reasons", [])}
        entry["metrics"] = {metric: gate.get(name) for name, metric in GATE_METRICS.items()}
    if gate:
        entry["checks"] = gate.get("checks", [])
        entry["intervals"] = gate_intervals(gate)
    entry["failure"] = failure if failure and entry.get("state") in ("failed", None) else None
    entry["gate_chart"] = gate_figures(gate, summary)


def _finite(value: Any) -> float | None:
    """A finite float, or None (missing, NaN, inf, not a number): JSON and the charts accept only these."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_curves(run_dir: Path) -> dict[str, dict[str, list[float | None]]]:
    """Per-epoch history of each stage that finished: stage -> metric -> one value per epoch.

    The histories are the ``history`` of ``<stage>/result.json`` (Keras's ``History``, or for
    pretraining its ``history.csv``, which survives a resumed attempt). A value that is not a
    finite number becomes None: a gap in the chart, and still valid JSON for ``runs.json``.
    """
    out: dict[str, dict[str, list[float | None]]] = {}
    for stage, _ in STAGES:
        history = (read_json_or_none(run_dir / stage / "result.json") or {}).get("history")
        if not isinstance(history, dict):
            continue
        clean = {
            str(key): [_finite(v) for v in values]
            for key, values in history.items()
            if isinstance(values, list) and values
        }
        if clean:
            out[stage] = clean
    return out


INTERVAL_NAMES = ("candidate", "baseline", "champion", "candidate_minus_champion")


def gate_intervals(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    """``gate.json``'s bootstrap intervals, checked: name -> {estimate, low, high} (finite floats), and the
    confidence; None for a gate.json written before the gate had them, or one without a usable interval."""
    raw = (gate or {}).get("intervals")
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {}
    for name in INTERVAL_NAMES:
        item = raw.get(name)
        if not isinstance(item, dict):
            continue
        values = {k: _finite(item.get(k)) for k in ("estimate", "low", "high")}
        if None not in values.values():
            out[name] = values
    if not out:
        return None
    return {"confidence": _finite(raw.get("confidence")) or 0.95, **out}


def gate_figures(gate: dict[str, Any] | None, summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the gate compared, for its chart: accuracies, the champion's version and the thresholds used.

    ``gate.json`` holds the numbers the decision was made on, each check's threshold and the
    bootstrap intervals (:func:`gate_intervals`); a run whose gate.json is gone still has its
    summary's metrics (without thresholds or intervals).
    """
    if gate:
        thresholds = {c.get("name"): _finite(c.get("threshold")) for c in gate.get("checks") or []}
        figures = {
            "blessed": gate.get("blessed"),
            "candidate": _finite(gate.get("candidate")),
            "baseline": _finite(gate.get("baseline")),
            "champion": _finite(gate.get("champion")),
            "champion_version": gate.get("champion_version"),
            "floor": thresholds.get("floor"),
            "min_gain_over_baseline": thresholds.get("baseline"),
            # The champion check's threshold is the allowed change, -max_regression.
            "min_change_vs_champion": thresholds.get("champion"),
            "intervals": gate_intervals(gate),
        }
    elif summary and "unchanged" not in summary:
        metrics = summary.get("metrics") or {}
        figures = {
            "blessed": (summary.get("gate") or {}).get("blessed"),
            **{name: _finite(metrics.get(metric)) for name, metric in GATE_METRICS.items()},
            "champion_version": None,
            "floor": None,
            "min_gain_over_baseline": None,
            "min_change_vs_champion": None,
            "intervals": None,
        }
    else:
        return None
    if all(figures[k] is None for k in ("candidate", "baseline", "champion")):
        return None
    return figures


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


# --- charts: inline SVG --------------------------------------------------------------------------------------------

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
    candidate, baseline, champion = (_finite(figures.get(k)) for k in ("candidate", "baseline", "champion"))
    if candidate is None and baseline is None and champion is None:
        return ""
    blessed = figures.get("blessed")
    floor = _finite(figures.get("floor"))
    gain, change = _finite(figures.get("min_gain_over_baseline")), _finite(figures.get("min_change_vs_champion"))
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
        runs: :func:`collect_runs`' entries, newest first.
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
            accuracy = _acc(float(tags[metric_tag(GATE_METRICS["candidate"])]))
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
        charted = uncharted = 0
        for run in runs:
            figures = charts_html(run)
            if figures and charted >= chart_runs:
                figures, uncharted = "", uncharted + 1
            charted += bool(figures)
            out.append(_row(run, mlflow_url, figures))
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
    if not intervals:
        return ""
    parts = []
    if ci := intervals.get("candidate"):
        parts.append(f"candidate {ci['estimate']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]")
    if ci := intervals.get("candidate_minus_champion"):
        parts.append(f"candidate - champion {ci['estimate']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]")
    if not parts:
        return ""
    pct = f"{intervals.get('confidence') or 0.95:.0%}"
    return f"<div class='muted ef-ci-text'>{pct} intervals: {_e(' · '.join(parts))}</div>"


def _row(run: dict[str, Any], mlflow_url: str | None, figures: str = "") -> str:
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
        )
        if m
    ]
    if meta:
        cells[0] += "<div class='muted'>" + " · ".join(meta) + "</div>"

    gate = run.get("gate")
    failure = run.get("failure")
    failed = ""
    if failure:
        where = f"{failure.get('task_id') or 'a task'}, try {failure.get('try_number', '?')}"
        failed = (
            f"<span class='no'>FAILED</span> at {_e(where)}<ul><li>{_e(failure.get('error'))}: "
            f"{_e(failure.get('message'))}</li><li>fix: {_e(failure.get('fix'))}</li></ul>"
        )
    if gate is None and failure:
        cells.append(failed)
    elif gate is None and run.get("unchanged"):
        cells.append(
            f"<span class='muted'>SKIPPED</span><ul><li>{_e(run['unchanged'].get('message'))}: data, config and "
            "code hashes equal the champion's; training skipped (set force to train anyway)</li></ul>"
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
    cells.append(
        "<br>".join(f"{label}: <b>{_acc(metrics.get(key))}</b>" for key, label in METRICS if key in metrics)
        or "<span class='muted'>–</span>"
    )

    reg = run.get("registry") or {}
    if reg.get("version") or reg.get("run_id"):
        model = reg.get("registered_model") or DEFAULT_MODEL
        head = f"{_e(model)} v{_e(reg['version'])}" if reg.get("version") else "<span class='muted'>no version</span>"
        if reg.get("version") and reg.get("registered_by"):  # a candidate that version held already
            head += f" <span class='muted'>(this model, registered by {_e(reg['registered_by'])})</span>"
        cells.append("<br>".join([head, *_mlflow_links(mlflow_url, model, reg.get("version"), reg.get("run_id"))]))
    else:
        cells.append("<span class='muted'>not registered</span>")

    docs = run.get("data_docs") or {}
    if run.get("pruned_at"):
        cells.append(f"<span class='muted'>folder pruned {_e(str(run['pruned_at'])[:10])}</span>")
    elif docs and run.get("folder"):
        cells.append(
            "<br>".join(
                f"<a target='_blank' rel='noopener' href='runs/{quote(run['folder'])}/{_e(rel)}'>{_e(name)}</a>"
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
