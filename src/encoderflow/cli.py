"""The ``encoderflow`` command: the whole DAG in-process through Airflow, and one command per step.

encoderflow run      [--preset guide|recipe|smoke] [--data-dir DIR] [--mirror URL] [--set key=value ...] [--force]
                     [--data-file FILE] [--corpus DIR|URL] [--labeled DIR|URL] [--sources-file FILE]
encoderflow download [--data-dir DIR | --mirror URL]
encoderflow validate [--data-dir DIR]        exit 0 only when every dataset passes
encoderflow predict  "a sentence" ... | --file FILE      with models:/NAME@champion
encoderflow promote  --version N --reason "..."           a person's promotion, recorded
encoderflow rollback [--reason "..."]                     put the previous champion back
encoderflow config   [--preset P] [--set key=value ...] [--data-file FILE]   print the resolved config
encoderflow doctor   [--data-dir DIR | --mirror URL]      what a run here would use; exit 0 if it can start
encoderflow airflow                                       Airflow standalone with this DAG (make airflow)
encoderflow prune    [--keep N] [--older-than DAYS] [--dry-run] [--versions]   old run folders, unused caches
                     and (--versions) registered versions the gate rejected that were never champion
encoderflow runs     [RUN] [--limit N] [--json]           what each run decided and measured, or one run in full
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encoderflow import layout, runtime
from encoderflow.config import (
    DEFAULT_PRESET,
    PRESETS,
    ROLES,
    ConfigError,
    GateConfig,
    from_overrides,
    from_params,
    resolve,
)
from encoderflow.errors import INTERRUPTED_EXIT, Cause, EncoderflowError, check_utf8, read_failure, task_label

if TYPE_CHECKING:
    from encoderflow.airflow_adapter import TaskLogs


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def dags_folder() -> Path:
    return Path(os.environ.get("ENCODERFLOW_DAGS_FOLDER", repo_root() / "dags"))


def airflow_env() -> dict[str, str]:
    """The embedded Airflow: SQLite metadata DB under ENCODERFLOW_HOME/airflow, this repo's DAG."""
    layout.writable_home()
    home = layout.airflow_home()
    home.mkdir(parents=True, exist_ok=True)
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder()),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(repo_root() / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        # Manual triggers run at once; a schedule only exists if ENCODERFLOW_SCHEDULE asks for one. Here, not
        # only in `encoderflow airflow`: an `encoderflow run` first created the DAG paused, and the
        # standalone started later left every trigger queued.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": os.environ.get(
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "False"
        ),
        "ENCODERFLOW_HOME": str(layout.home()),
        "GX_ANALYTICS_ENABLED": "false",
        "KERAS_BACKEND": runtime.BACKEND,
        # TensorFlow's C++ INFO/WARNING lines would otherwise fill every task log.
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }


def init_airflow() -> None:
    """Point this process at the embedded Airflow and migrate its DB (idempotent)."""
    os.environ.update(airflow_env())
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=os.environ.copy(), capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"airflow db migrate failed (exit {proc.returncode}) for {os.environ['AIRFLOW_HOME']}")


def run_conf(args: argparse.Namespace) -> dict[str, Any]:
    conf: dict[str, Any] = {"preset": args.preset, "overrides": list(args.set or [])}
    for name in ("data_dir", "mirror", "sources_file", "corpus", "labeled", "data_file"):
        value = getattr(args, name, None)
        if value:
            conf[name] = value if name == "mirror" or "://" in value else str(Path(value).resolve())
    if getattr(args, "force", False):
        conf["force"] = True
    # A typo caught here costs a second; in the DAG, Airflow's start-up and a task's try first. (A run
    # checks its offline folder for the files it reads: steps.check_files.)
    from encoderflow.config import Sources

    if conf.get("data_dir") and args.command in ("download", "validate"):
        from encoderflow.data.inputs import offline_needs
        from encoderflow.data.sources import offline_root

        # A folder no role reads is not checked; one read lists the files the config names.
        if needed := offline_needs(from_params(conf), Sources.from_params(conf)):
            offline_root(conf["data_dir"], [m for members in needed.values() for m in members])
    from encoderflow.data.folders import is_http, local_path

    sources = Sources.from_params(conf)  # the flags, else the data file's declarations
    for name, kind in (("corpus", "folder"), ("labeled", "folder"), ("sources_file", "file")):
        location = getattr(sources, name)
        if not location or is_http(location):
            continue
        path = local_path(location)
        if not (path.is_dir() if kind == "folder" else path.is_file()):
            flag = f"--{name.replace('_', '-')}"
            given = flag if conf.get(name) else f"{name} (declared in {sources.data_file})"
            raise ConfigError(
                f"{given} {location}: {'does not exist' if not path.exists() else f'not a {kind}'}",
                fix=f"give {flag} an existing {kind}" + ("" if conf.get(name) else f", or correct {sources.data_file}"),
            )
    return conf


def print_summary(
    run_id: str,
    state: str,
    states: list[tuple[str, int, str]],
    seconds: float,
    logs: TaskLogs | None = None,
) -> None:
    """The run's task states, metrics, gate and artifacts; a failed run's ends with the first failure's
    cause, its fix and its task's log."""
    from encoderflow.runs import in_stage_order, skipped_text
    from encoderflow.steps import registered_text

    print("\n" + "=" * 72)
    print(f"encoderflow run {run_id}: {state.upper()} in {seconds:.0f}s")
    print("-" * 72)
    for task_id, map_index, ti_state in states:
        print(f"  {task_label(task_id, map_index):<32} {ti_state}")
    summary_file = layout.run_dir(run_id) / "summary.json"
    gate_file = layout.run_dir(run_id) / "gate.json"
    s = layout.read_json(summary_file) if summary_file.exists() else None
    if s is not None and "unchanged" in s:
        print("-" * 72)
        print(f"  training skipped: {skipped_text(s['unchanged'])}")
        print("  to train anyway: --force (make run: FORCE=1; trigger form: 'Train even if nothing changed')")
        print(f"  summary                          {summary_file}")
    elif s is not None:
        print("-" * 72)
        for k, v in s["metrics"].items():
            print(f"  {k:<32} {'-' if v is None else f'{v:.4f}'}")
        for stage, rt in in_stage_order(s.get("runtime", {})):
            if rt.get("skipped"):
                print(f"  {stage:<32} not run: {rt['skipped']}")
                continue
            there = f" in run {rt['reused_from']}, reused" if rt.get("reused_from") else ""
            if rt.get("resumed_from_step"):  # the time of the try that resumed, not of the steps before it
                there += f" (the try that resumed at step {rt['resumed_from_step']:,})"
            print(f"  {stage:<32} {rt['device']}, {rt['dtype_policy']}, {rt['seconds']}s{there}")
        print("-" * 72)
        print(f"  gate: {'BLESSED' if s['gate']['blessed'] else 'NOT BLESSED'}")
        for reason in s["gate"]["reasons"]:
            print(f"    - {reason}")
        r = s["registry"]
        print(f"  registry: {registered_text(r)}; champion is v{r['champion_version']}")
        print(f"  tracking: {r['tracking_uri']}")
        print("-" * 72)
        for k, v in s["artifacts"].items():
            if v is None:  # none written: the encoder of a run whose pretraining did not run
                continue
            if isinstance(v, dict):
                for name, path in v.items():
                    print(f"  {k}.{name:<22} {path}")
            else:
                print(f"  {k:<32} {v}")
        print(f"  summary                          {summary_file}")
    elif gate_file.exists():
        print(f"  gate decision: {gate_file}")
    print(f"  run folder: {layout.run_dir(run_id)}")
    if state != "success":
        print_failure(run_id, states, logs)
    print("=" * 72)


def print_failure(run_id: str, states: list[tuple[str, int, str]], logs: TaskLogs | None = None) -> None:
    """The first failed task: which try, the cause on one line, the fix, and where its log is.

    The cause is the one the failure callback kept in ``runs/<run id>/failure.json``; failing
    that, the one the task-log listener saw.
    """
    print("-" * 72)
    record = read_failure(run_id)
    if record is not None:
        key = (record["task_id"], record.get("map_index", -1), record["try_number"])
        cause = Cause(record["error"], record["message"], record["fix"], record.get("expected", False))
        tries = " (no retry)" if record.get("no_retry") else f" of {record.get('max_tries', '?')}"
    elif logs is not None and logs.failed:
        key, cause = logs.failed[0]
        tries = ""
    else:
        failed = [task_label(t, m) for t, m, st in states if st == "failed"]
        where = f"{', '.join(failed)} failed" if failed else "no task failed"
        print(f"  {where}, and no cause was recorded: see the lines above")
        return
    task_id, map_index, try_number = key
    print(f"  first failure: {task_label(task_id, map_index)}, try {try_number}{tries}")
    print(f"  cause: {cause.line()}")
    print(f"  fix:   {cause.fix}")
    log_file = (logs.paths.get(key) if logs is not None else None) or layout.task_log_path(run_id, *key)
    if log_file.exists():
        print(f"  log:   {log_file}")
    else:
        print("  log:   none written for this try; its lines are in the output above")


def cmd_run(args: argparse.Namespace) -> int:
    conf = run_conf(args)
    # Fail fast on a bad --set or data file, own data without its own model name, or a missing file.
    cfg, _, sources = resolve(conf)
    from encoderflow.steps import check_files

    check_files(cfg, sources)
    os.environ["ENCODERFLOW_REGISTERED_MODEL"] = cfg.gate.registered_model  # its champion asset: af.champion_inlets
    os.environ["ENCODERFLOW_CLI_RUN"] = "1"  # fixes name CLI flags, not form fields: af.in_form_words
    t0 = time.monotonic()
    # The terminal follows the run: encoderflow's lines, dag.test's task starts, Airflow's warnings and
    # errors. Airflow's INFO per task call (xcom pushes, state updates, ::group:: markers) was 60% of it.
    # The task runner's "Task failed with exception" record repeated, with Airflow's own stack, the
    # cause the summary ends with; the task's log file keeps the cause (and a bug's traceback).
    os.environ.setdefault("AIRFLOW__LOGGING__NAMESPACE_LEVELS", "airflow=WARNING task=CRITICAL")
    init_airflow()  # before Airflow is first imported: it reads its configuration then
    from encoderflow import airflow_adapter as af

    outcome = af.run_dag(conf, dags_folder())
    print_summary(outcome.run_id, outcome.state, outcome.states, time.monotonic() - t0, outcome.logs)
    return 0 if outcome.state == "success" else 1


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from encoderflow.steps import setup_logging

    setup_logging()


def cmd_download(args: argparse.Namespace) -> int:
    from encoderflow import steps

    _setup_logging()
    params = run_conf(args)
    for role in ROLES:
        info = steps.download(role, params)
        print(f"{role}: {info['dataset']} {info['source']} {info['root']} content_hash={info['content_hash']}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate every role's data. Offline, WikiText splits absent from the folder are skipped
    (said so), since a folder may lack the train split; a run still demands the splits it uses."""
    from encoderflow.data import validation

    _setup_logging()
    # Its per-file lines and PASSED line are what this command's summary prints: said once, there.
    quiet = logging.getLogger(validation.__name__)
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return _validate_roles(args)
    finally:
        quiet.setLevel(level)


def _validate_roles(args: argparse.Namespace) -> int:
    from encoderflow import steps
    from encoderflow.config import Sources
    from encoderflow.data import sources, validation
    from encoderflow.data.inputs import BUILTIN

    params = run_conf(args)
    cfg = from_params(params)  # a bad --set fails here, before any download
    custom = Sources.from_params(params).custom()
    docs_root = layout.writable_home() / "validation" / time.strftime("%Y%m%dT%H%M%S")
    specs = sources.load_specs(params.get("sources_file"))
    ok = True
    t0 = time.monotonic()
    for role in ROLES:
        if args.data_dir and role not in custom and not (role == "vocab" and cfg.inputs.vocab == "trained"):
            spec = specs[BUILTIN[role]]
            members = sources.present_members(spec, args.data_dir)
            for missing in sorted(set(spec.members) - set(members)):
                print(f"{role}: {missing} not in {args.data_dir}, skipped")
            info = {**sources.locate(spec, members, args.data_dir), "role": role}
        else:
            info = steps.download(role, params)
        # Strict row counts for the pinned official archives only (``info["pinned"]``), as in the DAG.
        report = validation.validate_dataset(info, docs_root / role, inputs_cfg=cfg.inputs)
        ok &= report["success"]
        files = report["files"]
        rows = ", ".join(f"{m}: {f['rows']:,} rows" for m, f in files.items()) or "no files yet"
        if len(files) > 5:  # a corpus folder of thousands of files: the count, not the list
            rows = f"{len(files):,} files, {sum(f['rows'] for f in files.values()):,} rows"
        print(f"{role}: {'PASSED' if report['success'] else 'FAILED'} ({rows})")
        for line in report["failures"]:
            print(f"  {line}")
        if not report["success"] and (fix := validation.own_fix(info, report)):
            print(f"  fix: {fix}")  # the fix a run would end with
        else:
            print(f"  Data Docs: {validation.failed_docs(report)}")  # the fix names them too
    print(f"validate: {'all datasets passed' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s")
    return 0 if ok else 1


def _read_texts(file: str) -> list[str]:
    """The lines of ``file`` (``-``: standard input), one text each, blank ones kept (one row per line)."""
    where = "standard input is " if file == "-" else ""
    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        return raw.decode("utf-8-sig").splitlines()
    except FileNotFoundError:
        raise EncoderflowError(
            f"predict --file {file}: no such file", fix="give an existing file, or - for stdin"
        ) from None
    except UnicodeDecodeError as exc:
        raise EncoderflowError(
            f"predict --file {file}: {where}not UTF-8 "
            f"(byte {exc.start + 1}: {exc.object[exc.start : exc.start + 1]!r})",  # counted from 1, as a person counts
            fix=f"convert it first, e.g. iconv -f latin1 -t utf-8 {'FILE' if file == '-' else file}",
        ) from None
    except OSError as exc:  # a folder, no permission
        raise EncoderflowError(
            f"predict --file {file}: cannot read it ({exc.strerror or exc})", fix="give a readable text file"
        ) from None


def _utf8_arguments(sentences: list[str]) -> list[str]:
    """Sentences given as arguments, refused before the model loads when not UTF-8."""
    for i, sentence in enumerate(sentences, 1):
        check_utf8(
            f"predict: sentence {i}", sentence, fix="give UTF-8 text (a UTF-8 terminal, or iconv -t utf-8 and --file -)"
        )
    return sentences


def cmd_predict(args: argparse.Namespace) -> int:
    """One row per text, in input order: label, that label's probability, the text. What scored them and
    what it could not see goes to stderr, so stdout holds only the rows."""
    from encoderflow import bundle, registry
    from encoderflow.results import SST2_LABELS

    texts = _utf8_arguments(list(args.sentences)) + (_read_texts(args.file) if args.file else [])
    if not texts and args.file:  # a batch whose input happens to be empty: zero rows, as for any filter
        print(f"predict: --file {args.file} holds no lines: nothing scored", file=sys.stderr)
        return 0
    if not texts:
        raise EncoderflowError(
            "predict: no text given", fix="give sentences as arguments, or --file FILE (- for stdin)"
        )
    name = args.model
    registry.require_model(name)
    current = registry.champion(name)
    if current is None:
        raise EncoderflowError(
            f"registered model {name!r} has no champion yet at {registry.tracking_uri()}",
            fix="run the pipeline until a candidate is blessed (make run), or encoderflow promote --version N",
        )
    # A copy that still verifies is served again instead of downloaded again.
    path = registry.fetch_verified(name, current["version"], registry.serving_folder(name, current["version"]))
    scorer = bundle.Scorer(path)
    scored = [i for i, t in enumerate(texts) if t.strip()]
    scored_texts = [texts[i] for i in scored]
    predicted, probs = scorer.predict(scored_texts)
    print(f"model: models:/{name}@champion (v{current['version']}), {path}", file=sys.stderr)
    if skipped := len(texts) - len(scored):
        print(f"predict: {skipped} empty text(s) not scored: their rows read -", file=sys.stderr)
    if cut := scorer.truncated(scored_texts):
        print(
            f"predict: {cut} of {len(scored)} text(s) longer than the model's {scorer.meta['seq_length']} tokens: "
            "only their first tokens were scored",
            file=sys.stderr,
        )
    # The SST-2 model's 0/1 read as sentiment; any other model's labels as they are in its data, 0/1 too.
    sst2 = name == GateConfig().registered_model and scorer.labels == list(SST2_LABELS)
    names = ["negative", "positive"] if sst2 else scorer.labels
    rows = {i: f"{names[int(c)]}\t{p:.4f}" for i, c, p in zip(scored, predicted, probs, strict=True)}
    unscored = "-\t-"
    for i, text in enumerate(texts):
        print(f"{rows.get(i, unscored)}\t{_one_field(text)}")
    return 0


def _one_field(text: str) -> str:
    """``text`` as the third tab-separated field of one line: a tab or line break in it (an argument, or
    a line of a --file) would make another field or line, so each is written as ``\\t``, ``\\n``, ``\\r``."""
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# A person waits at the terminal: a server that does not answer fails in seconds, not after MLflow's
# default seven retries of two minutes each (a task keeps those, to ride out an outage). Unless set.
INTERACTIVE_MLFLOW = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _stack_mlflow() -> dict[str, str]:
    """For a registry command with no ``MLFLOW_TRACKING_URI``, in a home that runs ``make stack``: its
    MLflow server, as the workers log in (``encoderflow runs`` asked it; ``predict`` looked for an
    embedded store that a stack home does not have)."""
    if os.environ.get("MLFLOW_TRACKING_URI") or not (layout.home() / "stack" / "secrets.json").exists():
        return {}
    from encoderflow import registry
    from encoderflow.stack import Stack

    stack = Stack(layout.home())
    if not stack.alive("mlflow"):
        # Not the embedded store of runs made before the stack, silently: a promote there moved a
        # champion no stack run reads.
        embedded = (
            ""
            if registry.no_store()
            else f" (MLFLOW_TRACKING_URI={registry.embedded_uri()} for this home's embedded store)"
        )
        raise EncoderflowError(
            f"the MLflow server of make stack in {stack.root} is not running",
            fix=f"start the stack (make stack), or set MLFLOW_TRACKING_URI to the MLflow to ask{embedded}",
        )
    print(f"MLflow: make stack's server at {stack.mlflow_url}", file=sys.stderr)
    return {k: v for k, v in stack.env("worker-default").items() if k.startswith("MLFLOW_TRACKING_")}


@contextlib.contextmanager
def _interactive_mlflow(stack: bool = False):
    """:data:`INTERACTIVE_MLFLOW` for the block, where the environment does not set them; with
    ``stack``, the stack's MLflow where it is the one to ask (:func:`_stack_mlflow`)."""
    wanted = {**INTERACTIVE_MLFLOW, **(_stack_mlflow() if stack else {})}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def cmd_promote(args: argparse.Namespace) -> int:
    from encoderflow import registry

    registry.require_model(args.model)
    event = registry.promote(args.model, str(args.version), args.reason, who=args.who)
    if event.get("already"):
        print(f"{args.model}: v{event['to']} is champion already; nothing moved")
        return 0
    print(f"{args.model}: champion v{event['from']} -> v{event['to']} by {event['who']}: {event['reason']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from encoderflow import registry

    registry.require_model(args.model)
    event = registry.rollback(args.model, args.reason, who=args.who)
    print(
        f"{args.model}: rolled back, champion v{event['from']} -> v{event['to']} by {event['who']}: {event['reason']}; "
        + (f"previous is v{event['previous']}" if event.get("previous") else "no previous version left")
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from encoderflow import prune, runs

    home = layout.home()
    if not (home / "runs").is_dir():
        raise EncoderflowError(
            f"no runs under ENCODERFLOW_HOME={home}", fix="set ENCODERFLOW_HOME to the folder your runs used"
        )
    with prune.only_prune(home) as alone:
        if not alone:
            raise EncoderflowError(
                f"another encoderflow prune is at work in {home}", fix="let it finish, then run again"
            )
        restored = prune.restore_hidden(home)
        asked = runs.asking_airflow(home)
        with _interactive_mlflow():
            registered = _versions_for_prune(home) if args.versions else None  # a server: refused first
            aliased, mlflow_said, _ = runs.aliased_versions(home)
        airflow = runs.airflow_states(asked())
        plan = prune.plan(home, args.keep, args.older_than, airflow, aliased)
        if args.versions:
            plan = prune.plan_versions(home, plan, args.keep, args.older_than, airflow, registered)
        if not args.dry_run:
            plan = prune.apply(home, plan, recheck=lambda: runs.ask_airflow(home))
    notes = [mlflow_said] + (
        [f"put back {len(restored)} folder(s) an interrupted prune had hidden"] if restored else []
    )
    for line in prune.report_lines(home, plan, args.dry_run, notes):
        print(line)
    return 0


def _versions_for_prune(home: Path) -> dict[str, Any] | None:
    """``registry.versions_for_prune``'s answer for ``prune --versions``; None when MLflow could not be
    asked (every version stays). A store that is a server is refused (EncoderflowError), before anything
    is removed."""
    from encoderflow import registry

    if (home / "stack" / "secrets.json").exists() and not os.environ.get("MLFLOW_TRACKING_URI"):
        from encoderflow.stack import Stack

        server = Stack(home).mlflow_url
        if registry.no_store():  # it found no version in a store that is not there, and exited 0
            raise EncoderflowError(
                f"prune --versions deletes versions from an MLflow store on this machine; this home's versions are "
                f"on make stack's MLflow server ({server}), whose files it cannot reach, and it has no embedded store",
                fix="leave out --versions here, and delete versions on the server (its UI or MlflowClient."
                "delete_model_version, then mlflow gc there)",
            )
        print(
            f"prune --versions: only this home's embedded store ({registry.embedded_uri()}) is pruned; the versions "
            f"on make stack's MLflow server ({server}) are the server's to delete",
            file=sys.stderr,
        )
    try:
        return registry.versions_for_prune()
    except EncoderflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to ask: keep every version, say why
        print(f"prune --versions: MLflow at {registry.tracking_uri()} could not be asked: {exc}", file=sys.stderr)
        return None


def cmd_runs(args: argparse.Namespace) -> int:
    from encoderflow import runs

    home = layout.home()
    asked = runs.asking_airflow(home)  # Airflow's CLI answers in seconds; MLflow is asked meanwhile
    with _interactive_mlflow():
        aliased, mlflow_said, stores = runs.aliased_versions(home)
    airflow = asked()
    entries = runs.newest_first(runs.collect_runs(home, airflow.runs))
    runs.mark_aliases(entries, aliased, stores)
    if args.model:
        models = sorted({str(e["model"]) for e in entries if e.get("model")})
        entries = [e for e in entries if e.get("model") == args.model]
        if not entries:
            raise EncoderflowError(
                f"no run in {home} trains model {args.model!r} (the runs here train {', '.join(models) or 'none'})",
                fix="give --model one of those names (gate.registered_model), or leave it out to list every run",
            )
    if args.run:
        entry = runs.find(entries, args.run)
        if args.json:
            print(json.dumps(runs.jsonable(entry), indent=2))
            return 0
        lines = runs.detail_lines(entry, home)
        if runs.state_of(entry).endswith("*"):  # the list's footnote, here under the state it explains
            lines.insert(
                2,
                f"{'':<10} * "
                + ("no Airflow asked knows this run" if airflow.asked else airflow.said)
                + ": the state is what its folder says",
            )
        # The one-run view said only "in flight" while its tasks waited on a stopped worker (the list said so).
        if entry.get("state") in runs.IN_FLIGHT and airflow.waiting:
            lines.insert(2, f"{'workers':<10} {airflow.waiting.strip()[1:-1]}")
        print("\n".join(lines))
        return 0
    shown = entries[: args.limit] if args.limit else entries
    if args.json:
        said = {"home": str(home), "airflow": airflow.said, "mlflow": mlflow_said, "runs": shown}
        print(json.dumps(runs.jsonable(said), indent=2))
        return 0
    print(f"ENCODERFLOW_HOME={home}\n{airflow.said}\n{mlflow_said}")
    if not entries:
        print("no runs yet: trigger encoder_pretraining (or set ENCODERFLOW_HOME to the folder your runs used)")
        return 0
    print("\n".join(["", *runs.table_lines(shown)]))
    if any(runs.state_of(e).endswith("*") for e in shown):
        print(
            "* no Airflow asked knows this run: the state is what its folder says"
            if airflow.asked
            else "* Airflow was not asked (above): the state is what the run's folder says"
        )
    if any(e.get("state") == runs.STOPPED for e in shown):
        print(
            "stopped: Airflow says running, but the encoderflow run process that ran it is gone (killed); "
            "the next encoderflow run marks it failed, and resumes its training"
        )
    if len(shown) < len(entries):
        print(f"{len(entries) - len(shown)} older run(s) not shown (--limit 0 shows all)")
    print("encoderflow runs RUN shows one run in full")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = from_params({"preset": args.preset, "overrides": list(args.set or []), "data_file": args.data_file})
    print(json.dumps({"config_hash": cfg.config_hash(), **cfg.to_dict()}, indent=2))
    return 0


def cmd_airflow(args: argparse.Namespace) -> int:
    """Airflow standalone (api-server, scheduler, dag-processor, triggerer) on localhost:8080 with this
    DAG and the Encoderflow runs plugin; prints the login before handing over to Airflow."""
    import secrets

    os.environ.update(airflow_env())
    # `make airflow PRESET=smoke`: the form's default, and the preset of scheduled runs (they have no form).
    if os.environ.get("PRESET") and not os.environ.get("ENCODERFLOW_PRESET"):
        os.environ["ENCODERFLOW_PRESET"] = os.environ["PRESET"]
    # standalone starts its components as `airflow ...` from PATH; make that this venv's airflow
    # even when the venv is not activated (make calls .venv/bin/encoderflow directly).
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join(
        [bin_dir, *[p for p in os.environ.get("PATH", "").split(os.pathsep) if p != bin_dir]]
    )
    port = os.environ.setdefault("AIRFLOW__API__PORT", "8080")
    # Loopback unless asked otherwise: the simple auth manager is for one developer's machine.
    os.environ.setdefault("AIRFLOW__API__HOST", "127.0.0.1")
    os.environ.setdefault("AIRFLOW__API__BASE_URL", f"http://localhost:{port}")
    os.environ.setdefault("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
    # Airflow's default of 32 ran five shard builds and the baseline at once on a 2-core machine,
    # each 7x slower than alone: one task per core.
    os.environ.setdefault("AIRFLOW__CORE__PARALLELISM", str(max(2, os.cpu_count() or 2)))
    os.environ.setdefault("AIRFLOW__WORKERS__EXECUTION_API_RETRIES", runtime.WORKER_API_RETRIES)
    init_airflow()
    from encoderflow import airflow_adapter as af  # after init_airflow: Airflow reads its configuration on import

    af.refuse_beside_scheduler(
        "a second standalone's scheduler would share its runs' tasks",
        fix="use the Airflow that runs (its UI), or stop it first, or start this one with another ENCODERFLOW_HOME",
    )
    af.create_gpu_pool()
    if paused := af.paused_dags():
        print(
            f"encoderflow airflow: {', '.join(paused)} paused in this Airflow (by a person, or created paused before "
            "2026-12-07): a trigger waits in 'queued' until it is unpaused (its toggle in the UI, or "
            f'PATCH /api/v2/dags/{paused[0]} with {{"is_paused": false}})',
            file=sys.stderr,
        )

    # Airflow prints a generated password only the first time; keep the file it reads and say
    # the login every time.
    home = Path(os.environ["AIRFLOW_HOME"])
    # The jwt_secret Airflow generates into airflow.cfg is 16 bytes: PyJWT's "HMAC key ... below the minimum
    # recommended length" printed 4-9 times a start. Every component reads this one from the environment.
    os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", kept_secret(home / "jwt_secret"))
    pw_file = Path(
        os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
        or home / "simple_auth_manager_passwords.json.generated"
    )
    passwords = json.loads(pw_file.read_text() or "{}") if pw_file.exists() else {}
    users = [
        u.split(":")[0].strip() for u in os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",") if u.strip()
    ]
    if any(u not in passwords for u in users):
        passwords.update({u: secrets.token_urlsafe(12) for u in users if u not in passwords})
        with layout.atomic_path(pw_file, private=True) as tmp:
            tmp.write_text(json.dumps(passwords) + "\n")
    mlflow_url, mlflow_proc = start_mlflow_ui()
    print("=" * 72)
    print(f"Airflow standalone: http://localhost:{port}  (AIRFLOW_HOME={home})")
    for u in users:
        print(f"  login: {u} / {passwords[u]}")
    print(f"  passwords kept in {pw_file}")
    print(f"  Encoderflow runs page: http://localhost:{port}/encoderflow/ (also in the navigation)")
    if mlflow_url:
        print(f"  MLflow UI: {mlflow_url}  (the runs page links its runs and model versions here)")
    print("=" * 72, flush=True)
    standalone = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=os.environ.copy())
    return supervise(standalone, *[p for p in (mlflow_proc,) if p is not None])


def supervise(main: subprocess.Popen, *others: subprocess.Popen, grace_s: float = 30.0) -> int:
    """Wait for ``main`` (``airflow standalone``) and return its exit code; SIGTERM or SIGHUP to this
    process stops it, every process under it and ``others``, and exits 128 + the signal.

    Standalone stops its components on Ctrl-C, which the terminal sends to them all; a SIGTERM to it alone
    (``timeout``, systemd, ``kill``) ended only it, and left its scheduler, api-server (its port taken),
    triggerer, log servers, workers and the MLflow UI running. Each gets SIGTERM, and SIGKILL after
    ``grace_s`` seconds.
    """
    import signal

    import psutil

    def stop(signum, frame) -> None:
        procs = []
        for proc in (main, *others):
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(proc.pid)
                procs += [parent, *parent.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    while True:
        try:
            return main.wait()
        except KeyboardInterrupt:  # Ctrl-C reached standalone too: it stops its components, then exits
            continue


def kept_secret(path: Path, length: int = 64) -> str:
    """A random key of at least ``length`` characters kept in ``path`` (0600, written whole), made once."""
    import secrets

    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = ""
    if len(kept) >= length:
        return kept
    kept = secrets.token_urlsafe(length)  # 4/3 characters a byte: longer than asked, never shorter
    with layout.atomic_path(path, private=True) as tmp:
        tmp.write_text(kept + "\n")
    return kept


def start_mlflow_ui() -> tuple[str | None, subprocess.Popen | None]:
    """An MLflow UI over the embedded tracking store, for the runs page's links: (its URL, its process).

    It runs in the background in this terminal's process group, so Ctrl-C ends it with Airflow.
    ``ENCODERFLOW_MLFLOW_PORT`` (default 5000) picks its loopback port; a set ``MLFLOW_TRACKING_URI``
    means a tracking server exists already, and ``ENCODERFLOW_MLFLOW_UI_URL`` is left as given.
    """
    import socket

    from encoderflow import registry

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ.get("ENCODERFLOW_MLFLOW_UI_URL"), None
    port = int(os.environ.get("ENCODERFLOW_MLFLOW_PORT", "5000"))
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            print(f"MLflow UI not started: port {port} is taken (set ENCODERFLOW_MLFLOW_PORT)", file=sys.stderr)
            return os.environ.get("ENCODERFLOW_MLFLOW_UI_URL"), None
    uri = registry.tracking_uri()
    log_path = layout.airflow_home() / "mlflow-ui.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            registry.server_command(port),
            env={**os.environ, "MLFLOW_BACKEND_STORE_URI": uri},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://localhost:{port}"
    os.environ["ENCODERFLOW_MLFLOW_UI_URL"] = url
    return url, proc


def cmd_doctor(args: argparse.Namespace) -> int:
    from encoderflow import doctor

    return doctor.main(
        data_dir=args.data_dir,
        mirror=args.mirror,
        sources_file=args.sources_file,
        preset=args.preset,
        overrides=args.set or [],
        timeout=args.timeout,
    )


def source_help(name: str) -> str:
    """A run source's help text: its declaration's description (``config.Sources``)."""
    from dataclasses import fields

    from encoderflow.config import Sources

    text = next(f.metadata["description"] for f in fields(Sources) if f.name == name)
    # The form needs absolute paths (it runs elsewhere); here a relative one is resolved first.
    text = text.replace("Absolute path of", "Path of").replace("an absolute path or", "a path or")
    text = text.replace("Absolute path,", "Path,")
    return text.replace("%", "%%")


def fields_help(name: str) -> str:
    """A run option's help text: its declaration's description (``config.RunOptions``)."""
    from dataclasses import fields

    from encoderflow.config import RunOptions

    return next(f.metadata["description"] for f in fields(RunOptions) if f.name == name)


def _at_least(low: float):
    """An argparse type: a number (int when ``low`` is) no smaller than ``low``."""
    kind = type(low)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def _version(text: str) -> str:
    """An argparse type: a registered version's number, given as ``3`` or as ``encoderflow runs`` prints
    it, ``v3``; returned as the registry numbers it (``"3"``)."""
    from encoderflow.registry import version_number

    number = version_number(text)
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a version: give its number, 3 or v3 (encoderflow runs)")
    return number


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="encoderflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    def overrides(sp):
        sp.add_argument(
            "--set",
            action="extend",
            nargs="+",
            metavar="KEY=VALUE",
            help="config overrides, SECTION.KEY=VALUE: --set pretrain.epochs=2 finetune.learning_rate=1e-4, or "
            "repeated; every key with its type, bounds and presets' values: docs/parameters.md (this run's "
            "values: encoderflow config)",
        )

    def locations(sp):
        sp.add_argument(
            "--data-dir",
            dest="data_dir",
            default=os.environ.get("DATA_DIR") or None,
            help=source_help("data_dir") + " Default: $DATA_DIR.",
        )
        sp.add_argument(
            "--mirror",
            default=os.environ.get("ENCODERFLOW_MIRROR") or None,
            help=source_help("mirror") + " Default: $ENCODERFLOW_MIRROR.",
        )
        sp.add_argument("--sources-file", dest="sources_file", default=None, help=source_help("sources_file"))

    def common(sp, sources: bool = True, data_file: bool = False):
        sp.add_argument("--preset", default=os.environ.get("PRESET") or DEFAULT_PRESET, choices=sorted(PRESETS))
        overrides(sp)
        if sources:
            locations(sp)
            sp.add_argument("--corpus", default=None, help=source_help("corpus"))
            sp.add_argument("--labeled", default=None, help=source_help("labeled"))
        if sources or data_file:
            sp.add_argument(
                "--data-file",
                dest="data_file",
                default=os.environ.get("ENCODERFLOW_DATA_FILE") or None,
                help=source_help("data_file"),
            )

    run = sub.add_parser("run", help="run the whole DAG once through Airflow")
    common(run)
    run.add_argument("--force", action="store_true", help=fields_help("force"))
    common(sub.add_parser("download", help="download (or locate offline) every dataset"))
    common(sub.add_parser("validate", help="validate every dataset; exit 0 only if all pass"))
    pp = sub.add_parser("predict", help="score sentences with the champion")
    pp.add_argument("sentences", nargs="*", help="texts to score, one row each")
    pp.add_argument("--file", help="score each line of this UTF-8 file instead (- reads standard input)")
    default_model = from_overrides().gate.registered_model
    pp.add_argument(
        "--model", default=default_model, help=f"registered model whose champion scores (default: {default_model})"
    )
    # Its data file's sections are config too: what a run with it resolves to.
    common(sub.add_parser("config", help="print the resolved config"), sources=False, data_file=True)
    pr = sub.add_parser("promote", help="make a registered version champion (recorded with who and why)")
    pr.add_argument(
        "--version", required=True, type=_version, help="the version's number, as encoderflow runs prints it: 3 or v3"
    )
    pr.add_argument("--reason", required=True)
    rb = sub.add_parser("rollback", help="put the previous champion back")
    rb.add_argument("--reason", default="rollback")
    for sp in (pr, rb):
        sp.add_argument("--model", default=default_model)
        sp.add_argument("--who", default=None, help="recorded as the actor (default: $ENCODERFLOW_USER or login)")
    sub.add_parser("airflow", help="Airflow standalone UI with this DAG on localhost:8080")
    pn = sub.add_parser(
        "prune",
        help="remove old finished run folders and the caches no kept run uses (MLflow only with --versions; "
        "never Airflow's DB)",
    )
    pn.add_argument(
        "--keep", type=_at_least(1), default=10, help="run folders kept whatever their age, newest first (default 10)"
    )
    pn.add_argument(
        "--older-than",
        dest="older_than",
        type=_at_least(0.0),
        default=7.0,
        metavar="DAYS",
        help="keep what changed within this many days (default 7)",
    )
    pn.add_argument("--dry-run", dest="dry_run", action="store_true", help="say what would go, remove nothing")
    pn.add_argument(
        "--versions",
        action="store_true",
        help="also delete registered versions the gate rejected that were never champion, with their files "
        "(embedded MLflow store; --keep and --older-than apply to each model's versions too)",
    )
    rn = sub.add_parser("runs", help="what each run decided and measured, or one run in full")
    rn.add_argument("run", nargs="?", help="one run: its run id, its folder name, or the start of either")
    rn.add_argument("--limit", type=_at_least(0), default=20, help="newest runs listed (default 20; 0 lists every run)")
    rn.add_argument("--json", action="store_true", help="print the record as JSON (as the runs page's runs.json)")
    rn.add_argument("--model", help="only the runs of this registered model (gate.registered_model)")
    dr = sub.add_parser("doctor", help="what a run here would use; exit 0 only if a run can start")
    locations(dr)
    dr.add_argument(
        "--preset", default=None, choices=sorted(PRESETS), help="check this preset's files only (default: every preset)"
    )
    overrides(dr)
    dr.add_argument("--timeout", type=float, default=5.0, help="seconds per URL probe")
    return p


COMMANDS = {
    "run": cmd_run,
    "download": cmd_download,
    "validate": cmd_validate,
    "predict": cmd_predict,
    "config": cmd_config,
    "airflow": cmd_airflow,
    "promote": cmd_promote,
    "rollback": cmd_rollback,
    "doctor": cmd_doctor,
    "prune": cmd_prune,
    "runs": cmd_runs,
}


# The commands a person runs against the registry (an MLflow error there is printed, not raised).
REGISTRY_COMMANDS = ("predict", "promote", "rollback")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in REGISTRY_COMMANDS:  # an MLflow error about its encoding would send a person to the server
            check_utf8("--model", args.model, fix="give the registered model's name as UTF-8 text")
        with _interactive_mlflow(stack=True) if args.command in REGISTRY_COMMANDS else contextlib.nullcontext():
            return COMMANDS[args.command](args)
    except (ConfigError, EncoderflowError) as exc:
        print(f"encoderflow {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `encoderflow runs | head`: the reader has what it wanted. Python would report the pipe again
        # while flushing stdout at exit; what is left goes nowhere instead, and the exit is a pipe's.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        # A person's Ctrl-C is an answer, not a bug: one line and the shell's code, not a traceback.
        # (`encoderflow run` handles its own SIGINT: it ends the run and says how it left it.)
        print(f"encoderflow {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as exc:
        # A person's registry command against a server that refuses or does not answer: one line, not a traceback.
        if args.command not in REGISTRY_COMMANDS:
            raise
        from mlflow.exceptions import MlflowException

        from encoderflow import registry

        if not isinstance(exc, MlflowException):
            raise
        first = str(exc).splitlines()[0]
        if len(first) > 320:  # keep the end too: urllib3 puts the cause ("Connection refused") last
            first = f"{first[:140]} ... {first[-170:]}"
        print(
            f"encoderflow {args.command}: MLflow at {registry.tracking_uri()} failed: {first}; "
            "fix: check MLFLOW_TRACKING_URI and that the server is up, and its credentials "
            "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
