"""MLflow tracking and model registry: candidates, the ``champion`` alias and its history.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a server), else the embedded sqlite store
under ``ENCODERFLOW_HOME/mlflow``. Every candidate becomes a model version whose source is the
model bundle logged with its MLflow run; only a blessing moves ``champion``, and the version it
leaves keeps ``previous`` for rollback.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from encoderflow import DAG_ID, bundle, layout
from encoderflow.config import param_text
from encoderflow.errors import EncoderflowError, check_utf8
from encoderflow.gate import METRICS, metric_tag
from encoderflow.results import current_names

log = logging.getLogger(__name__)

EXPERIMENT = "encoderflow"
CHAMPION, PREVIOUS = "champion", "previous"
# On a candidate's MLflow run and model version: the bundle they hold (bundle.identity), so a retry
# reuses a version only for the model it was registered for.
BUNDLE_TAG = "bundle.sha256"
# The model by what its files hold (bundle.content_identity): a retrain to the same weights is that model.
CONTENT_TAG = "bundle.content_sha256"
# The whole bundle.json as registered: BUNDLE_TAG leaves its config out (the same model from another
# gate setting is the same model), yet a warm start's check reads that config, and a copy with the
# labels swapped in it served inverted answers, verified by its files' sha256s alone.
META_TAG = "bundle.json.sha256"
# On a version a person moved the champion off (rollback, promote by hand): that move, so the gate
# never makes the same model champion again by itself (gate.model_check). Cleared when a person
# makes the version champion again.
DEMOTED = "champion.demoted"
# On a version the gate blessed that did not become champion: why (the champion moved since the gate).
NOT_PROMOTED = "champion.not_promoted"
# On the MLflow run of a candidate that was a registered model already: the version holding it.
REGISTERED_AS = "registry.version"
# On the registered model, one per version ``encoderflow prune --versions`` deleted (its number, six
# digits): what the version was judged on and when it went. check_lineage still finds a deleted
# rejection (rejected_under), so a rerun of that training is skipped, not trained again for hours.
PRUNED_TAG = "pruned.version."
# On the MLflow run of a deleted version, set before the run is deleted: a prune killed before it removed
# the run's files leaves them findable (versions_for_prune's leftovers).
PRUNED_RUN_TAG = "encoderflow.pruned"


class StaleChampion(EncoderflowError):
    """The champion moved between evaluation and promotion; the comparison is stale."""


# What MLflow answers for a model, version or alias that is not there (an alias: INVALID_PARAMETER_VALUE,
# in the SQL store and over REST alike). Anything else (INTERNAL_ERROR for an unreachable server,
# PERMISSION_DENIED, ...) is raised: an outage must not read as "no champion yet".
ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _absent(exc, c, name: str) -> bool:
    """True when ``exc`` says a version or alias of model ``name`` is not there; otherwise raise it."""
    from mlflow.exceptions import MlflowException

    if exc.error_code in ABSENT:
        return True
    if exc.error_code == "PERMISSION_DENIED":
        # MLflow's basic-auth app answers 403 to a lookup under a registered model that does not
        # exist (it finds no permission to check); the model itself then says it is not there.
        try:
            c.get_registered_model(name)
        except MlflowException as missing:
            if missing.error_code == "RESOURCE_DOES_NOT_EXIST":
                return True
    raise exc


def _deleted(c, name: str, version: str) -> str:
    """`` (deleted by encoderflow prune --versions on <date>: <why>)`` for a version pruned from ``name``,
    else nothing: a version ``encoderflow runs`` still names is not simply missing."""
    try:
        record = pruned_in(c.get_registered_model(name).tags).get(str(version).removeprefix("v"))
    except Exception:  # noqa: BLE001 - a detail of an error message already on its way
        return ""
    if not record:
        return ""
    return f" (deleted by encoderflow prune --versions on {str(record.get('deleted_at'))[:10]}: {record.get('why')})"


def embedded_uri() -> str:
    return f"sqlite:///{layout.mlflow_dir() / 'mlflow.db'}"


def tracking_uri() -> str:
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    layout.mlflow_dir().mkdir(parents=True, exist_ok=True)
    return embedded_uri()


def server_command(port: int, *extra: str) -> list[str]:
    """``mlflow server`` on loopback with one worker (``make airflow``, ``make stack``); its store is
    the ``MLFLOW_BACKEND_STORE_URI`` of its environment: a database password on the command line is
    there for every local user to read (``ps``)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *extra,
    ]


def client():
    # Its tqdm bar writes carriage returns into task logs and terminals; against a server, each run's
    # end printed "View run ... at ..." lines to stdout, outside the logging a task log shows.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def no_store() -> bool:
    """Whether the embedded store is the one in use and has not been created: nothing registered, and
    asking (``client()``) would create it empty."""
    # client() exports the embedded store's URI as MLFLOW_TRACKING_URI: that one is not a server of the user's.
    in_use = os.environ.get("MLFLOW_TRACKING_URI", embedded_uri()) == embedded_uri()
    return in_use and not (layout.mlflow_dir() / "mlflow.db").exists()


def require_model(name: str):
    """The client, once the store exists and holds registered model ``name``: what a person's command
    (predict, promote, rollback) checks first, so a typo or another ENCODERFLOW_HOME is named as
    such, not read as "no champion yet", and creates no empty store.

    Raises:
        EncoderflowError: no embedded store under ``ENCODERFLOW_HOME``, or no model of that name
            (the message lists the registered ones).
    """
    if no_store():
        raise EncoderflowError(
            f"no MLflow store at {layout.mlflow_dir() / 'mlflow.db'} (ENCODERFLOW_HOME={layout.home()})",
            fix="set ENCODERFLOW_HOME to the folder your runs used (or MLFLOW_TRACKING_URI to their server), "
            "or run the pipeline first (make run)",
        )
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        c.get_registered_model(name)
    except MlflowException as exc:
        _absent(exc, c, name)
        names = sorted(m.name for m in c.search_registered_models())
        raise EncoderflowError(
            f"no registered model {name!r} at {tracking_uri()}; registered: {names or 'none yet'}",
            fix="--model <one of them>" if names else "run the pipeline until a candidate is registered (make run)",
        ) from None
    return c


def _experiment_id(c) -> str:
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    # The embedded store keeps artifacts beside it, not in ./mlruns of whatever the cwd is.
    # (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, so compare URIs, not the env.)
    location = None
    if tracking_uri() == embedded_uri():
        location = (layout.mlflow_dir() / "artifacts").resolve().as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(EXPERIMENT, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(EXPERIMENT).experiment_id  # created concurrently by another task


def check_store_in_place() -> None:
    """Refuse to train into an embedded store that keeps its artifacts in another home's folder.

    The store records its experiment's artifact folder when it is created: in a copy of a home (``cp -a``
    of a production home as a sandbox) every new run wrote its model files into the original home's
    store, and served from there. Checked by ``check_lineage``, before anything trains.

    Raises:
        EncoderflowError: the store's artifact folder is not this home's.
    """
    if tracking_uri() != embedded_uri() or no_store():
        return
    exp = client().get_experiment_by_name(EXPERIMENT)
    here = (layout.mlflow_dir() / "artifacts").resolve()
    if exp is None or exp.artifact_location == here.as_uri():
        return
    raise EncoderflowError(
        f"the MLflow store of ENCODERFLOW_HOME={layout.home()} ({embedded_uri()}) keeps its artifacts in "
        f"{exp.artifact_location}, not in {here}: it was made in another home and copied or moved here, and "
        "a run would write its model files into that home's store",
        fix="run where the store was made; or give this home a store of its own (move "
        f"{layout.mlflow_dir()} aside: versions are then registered anew from v1), or set MLFLOW_TRACKING_URI",
    )


def champion(name: str) -> dict[str, Any] | None:
    """The current champion version (number, source, run id, tags), or None."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        mv = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        _absent(exc, c, name)
        return None
    return {"version": str(mv.version), "source": mv.source, "run_id": mv.run_id, "tags": current_names(mv.tags)}


def version_ref(c, name: str, version: str | int) -> str:
    """``version`` as the registry names it: a number (``3``, ``"3"`` or ``"v3"``, as ``encoderflow
    runs`` prints it) or ``"@alias"``, checked to exist.

    Raises:
        EncoderflowError: neither a number nor an ``@alias``, or no such version or alias of ``name``.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not re.fullmatch(r"v?\d+|@[\w.-]+", version):
        raise EncoderflowError(
            f"version {version!r} of {name} is neither a number nor an @alias",
            fix="give a version number ('3') or an alias ('@champion', '@previous')",
        )
    version = version.removeprefix("v")
    try:
        if version.startswith("@"):
            c.get_model_version_by_alias(name, version[1:])
        else:
            c.get_model_version(name, version)
    except MlflowException as exc:
        _absent(exc, c, name)
        versions = c.search_model_versions(f"name='{name}'")
        numbers = sorted(int(mv.version) for mv in versions)
        aliases = sorted(f"@{a}" for a in (c.get_registered_model(name).aliases or {}))  # searches carry none
        raise EncoderflowError(
            f"{name} has no {'alias ' + version if version.startswith('@') else 'version ' + version} at "
            f"{tracking_uri()}{_deleted(c, name, version)}; versions: {', '.join(map(str, numbers)) or 'none'}; "
            f"aliases: {', '.join(aliases) or 'none'}",
            fix="give one of those",
        ) from None
    return version


def resolve_version(name: str, version: str | int) -> str:
    """The number of a version of ``name`` given as a number (``3``, ``"3"``, ``"v3"``) or ``"@alias"``
    (:func:`version_ref`), as the registry has it now: an alias may move at any time, so a caller that
    must say which version it scores resolves first and downloads that number.

    Raises:
        EncoderflowError: as :func:`download_version`.
    """
    c = require_model(name)
    ref = version_ref(c, name, version)
    return str(c.get_model_version_by_alias(name, ref[1:]).version) if ref.startswith("@") else ref


def download_version(name: str, version: str | int, dst: str | os.PathLike) -> Path:
    """Fetch a version (a number or ``@alias``) into ``dst``; verify it; return its folder.

    The files land in a temporary folder beside ``dst`` and replace it only once verified: a
    reader of ``dst`` sees the old bundle or the whole new one, never a partial download, and of
    several processes fetching into one ``dst`` the last one's stays. When ``dst`` already holds that
    version's bundle, verified, nothing is fetched. An alias is resolved once (:func:`resolve_version`)
    and the log names the number.

    Raises:
        EncoderflowError: no store or no model ``name`` here (:func:`require_model`), no such version
            (:func:`version_ref`), or a file of the downloaded bundle is missing or altered
            (``bundle.verify``).
    """
    import mlflow

    dst = Path(dst)
    c = require_model(name)
    ref = version_ref(c, name, version)
    mv = c.get_model_version_by_alias(name, ref[1:]) if ref.startswith("@") else c.get_model_version(name, ref)
    # By number: the alias may move while the files come.
    version, uri = str(mv.version), f"models:/{name}/{mv.version}"
    named = f"{name}{ref} (v{version})" if ref.startswith("@") else f"{name} v{version}"
    shown = f"models:/{name}{ref} (v{version})" if ref.startswith("@") else uri  # in errors: as the caller named it
    held = mv.tags.get(BUNDLE_TAG)
    # Checked once (it hashes every file of the copy): to reuse it, or to say why it is fetched again.
    present = (dst / bundle.META).exists()
    why = _as_registered(dst, mv.tags) if present else None
    if held and present and why is None:
        log.info("registry: %s is at %s already, verified: not fetched again", named, dst)
        return Path(dst)
    if why:
        log.warning(
            "registry: the copy of %s at %s is not the registered bundle (%s): fetching it again", named, dst, why
        )
    log.info("registry: fetching %s into %s", named, dst)
    with layout.atomic_dir(dst) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        if not any(got.iterdir()):
            # A local artifact path that is gone downloads as an empty folder, not as an error.
            source = mv.source
            raise EncoderflowError(
                f"{shown}: nothing was downloaded from its source {source}",
                fix="the store records its artifacts' absolute paths: use it where it was written (the "
                "ENCODERFLOW_HOME of its runs), or restore the artifacts folder there",
            )
        if why := _as_registered(got, mv.tags):  # named by the version, not by the temp folder it was fetched into
            raise EncoderflowError(
                f"{shown}: {why}",
                fix=f"serve another version of {name} (encoderflow rollback, or encoderflow promote --version N); "
                "the damaged files are under the version's source in the MLflow store",
            )
        inside = got.resolve().relative_to(tmp.resolve())  # "." for a bundle source: its files
    return Path(dst) / inside


def serving_folder(name: str, version: str) -> Path:
    """Where this home keeps a verified copy of version ``version`` of ``name`` to serve: by model and
    number, as the alias may move while a caller serves it, and another model's v1 is another bundle."""
    return layout.home() / "serving" / layout.safe_run_id(name) / f"v{version}"


def _verified_in_store(name: str, version: str) -> None:
    """A person's move serves ``version`` next: its files are fetched from the store and verified now,
    not found damaged by the next host that serves it (a verified copy in this home's serving folder
    hid a damaged store). Into that folder when it has no verified copy; else into a temporary one,
    so a ``predict`` reading the copy there is not disturbed."""
    folder = serving_folder(name, version)
    if bundle.damage(folder) is not None:
        fetch_verified(name, version, folder)
        return
    with layout.temp_dir(folder.parent, f".check-{folder.name}-") as tmp:  # a killed promote's: swept
        download_version(name, version, tmp / "bundle")


def fetch_verified(name: str, version: str, dst: str | os.PathLike) -> Path:
    """Version ``version`` of ``name`` at ``dst``: the copy already there when it is still the registered
    bundle (:func:`_as_registered`, against the version's tags), else downloaded (:func:`download_version`),
    its files then stored once for every run that fetches them (:func:`encoderflow.layout.share_identical`)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client().get_model_version(name, str(version)).tags
    except MlflowException:  # no such version, or none here: download_version says which, by name
        tags = {}
    if tags.get(BUNDLE_TAG) and _as_registered(dst, tags) is None:
        return Path(dst)
    fetched = download_version(name, version, dst)
    layout.share_identical(fetched)
    return fetched


def _as_registered(folder: str | os.PathLike, tags: dict[str, str]) -> str | None:
    """What makes the bundle at ``folder`` other than the version with ``tags`` registered, naming the
    file (``bundle.json: ...``), or None: every file matches ``bundle.json`` (:func:`bundle.damage`), and
    ``bundle.json`` is the registered one, whole (:data:`META_TAG`) or, for a version registered before
    that tag, in what the model's identity covers (:data:`BUNDLE_TAG`)."""
    folder = Path(folder)
    if why := bundle.damage(folder):
        return why
    if (whole := tags.get(META_TAG)) and layout.sha256_file(folder / bundle.META) != whole:
        return f"{bundle.META}: altered (sha256 differs from the version's {META_TAG} tag)"
    if not whole and (held := tags.get(BUNDLE_TAG)) and bundle.identity(folder) != held:
        return f"{bundle.META}: altered (its files or labels differ from the version's {BUNDLE_TAG} tag)"
    return None


def _flatten(prefix: str, payload: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(payload, dict):
        for k, v in payload.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = payload
    return out


def log_candidate(
    name: str,
    bundle_dir: str | os.PathLike,
    config: dict[str, Any],
    metrics: dict[str, float],
    histories: dict[str, dict[str, list[float]]],
    tags: dict[str, str],
    decision: dict[str, Any],
    extra_artifacts: list[str | os.PathLike] = (),
) -> dict[str, Any]:
    """One MLflow run with params, metrics, curves and the bundle; a model version with tags.

    A candidate that is a registered model already (:func:`encoderflow.bundle.identity` equal: in
    practice a result reused from an earlier run) gets no second version: its
    MLflow run records this run's metrics and decision, tagged with the version that holds the model
    (``registry.version``), without uploading the bundle again, and that version is returned.
    """
    import mlflow

    c = client()
    tags = {
        **tags,
        BUNDLE_TAG: bundle.identity(bundle_dir),
        CONTENT_TAG: bundle.content_identity(bundle_dir),
        META_TAG: layout.sha256_file(Path(bundle_dir) / bundle.META),
    }
    if (done := _registered_for(c, name, tags)) is not None:
        log.info(
            "registry: %s version %s already registered for %s (a retry); reused",
            name,
            done["version"],
            tags.get("airflow.run_id"),
        )
        if "registered_by" not in done:  # this run's version: its tags follow the decision (a cleared gate's)
            now = c.get_model_version(name, done["version"]).tags
            blessed_later = now.get("gate.blessed") == "true" and "gate.decided_in" in now
            if decision.get("blessed") or not blessed_later:  # a later run's blessing is what it serves under
                _set_decision(c, name, done["version"], decision)
        else:
            _judged_again(c, name, done["version"], decision, tags.get("airflow.run_id") or "manual")
        return done
    for earlier in _versions_of_run(c, name, tags):
        if earlier.tags.get(CONTENT_TAG) == tags[CONTENT_TAG]:
            continue  # trained again to the same weights: that version holds it (_holding, below)
        log.info(
            "registry: %s v%s, registered earlier in %s, holds another candidate (bundle sha256 %s, this one %s: "
            "retrained since); this candidate gets a version of its own",
            name,
            earlier.version,
            tags["airflow.run_id"],
            earlier.tags.get(BUNDLE_TAG, "?")[:12],
            tags[BUNDLE_TAG][:12],
        )
    holder = _holding(c, name, tags[BUNDLE_TAG], tags[CONTENT_TAG])
    if holder is not None:
        tags = {**tags, REGISTERED_AS: str(holder.version)}
    exp_id = _experiment_id(c)
    _close_orphans(c, exp_id, tags)
    if (finished := _finished_unregistered(c, exp_id, tags)) is not None:
        # An earlier try logged everything (FINISHED: the block below completed) and died registering.
        source, run_id = f"{finished.info.artifact_uri}/bundle", finished.info.run_id
        log.info(
            "registry: MLflow run %s, finished by an earlier try of %s before registering, reused",
            run_id,
            tags.get("airflow.run_id"),
        )
    else:
        run_name = tags.get("airflow.run_id", "manual")
        # Said before the uploads: against a remote server they take a while.
        log.info(
            "registry: logging the candidate to MLflow at %s (experiment %s%s)",
            tracking_uri(),
            EXPERIMENT,
            "; the bundle is held by v" + str(holder.version) + ", not uploaded again"
            if holder
            else ", with its bundle",
        )
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags) as run:
            # Booleans as `--set` and `runs` spell them (true, not Python's True).
            mlflow.log_params({k: param_text(v) for k, v in _flatten("", config, {}).items()})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            # One request for every epoch's point: one each took 24-39 s on a smoke run against a tracking
            # server with basic auth (~0.5 s a request), growing with the epochs.
            from mlflow.entities import Metric

            at = int(time.time() * 1000)
            curve = [
                Metric(f"{stage}.{metric}", float(value), at, step)
                for stage, hist in histories.items()
                for metric, values in hist.items()
                for step, value in enumerate(values)
            ]
            if curve:
                c.log_batch(run.info.run_id, metrics=curve)
            if holder is None:
                mlflow.log_artifacts(str(bundle_dir), artifact_path="bundle")
            mlflow.log_dict(decision, "gate.json")
            for extra in extra_artifacts:
                mlflow.log_artifact(str(extra))
            source = f"{run.info.artifact_uri}/bundle"
            run_id = run.info.run_id
    if holder is None:  # this MLflow run holds the bundle's files (uploaded now, or by an earlier try)
        _store_once(source)
    with promotion_lock():  # another run's promote may have registered this very model meanwhile
        holder = holder or _holding(c, name, tags[BUNDLE_TAG], tags[CONTENT_TAG])
        if holder is None:
            return _register(c, name, source, run_id, {**tags, **decision_tags(decision)})
        c.set_tag(run_id, REGISTERED_AS, str(holder.version))  # how a retry finds it (_registered_for)
        _judged_again(c, name, str(holder.version), decision, tags.get("airflow.run_id") or "manual")
    log.info(
        "registry: this candidate is %s v%s's model (same weights, tokenizer and labels, bundle sha256 %s), registered "
        "by %s: no second version; MLflow run %s records this run's metrics and decision",
        name,
        holder.version,
        tags[BUNDLE_TAG][:12],
        holder.tags.get("airflow.run_id") or "an earlier run",
        run_id,
    )
    return _described(holder, run_id, earlier=True)


def local_artifacts(artifact_uri: str) -> Path | None:
    """The folder on this machine holding the files of an MLflow artifact URI, where this code knows it:
    a ``file:`` URI or an absolute path (the embedded store, any SQLite store), or ``mlflow-artifacts:``
    served by this home's native stack (``make stack``: its MLflow keeps them under
    ``stack/mlflow/artifacts``); None for any other server or a cloud store. The folder may not exist."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(artifact_uri)
    if parsed.scheme in ("", "file") and not parsed.netloc:
        path = Path(url2pathname(parsed.path))
        return path if path.is_absolute() else None
    stack = _stack_artifacts()
    if parsed.scheme == "mlflow-artifacts" and stack is not None and parsed.netloc in ("", *stack[1]):
        # The server's artifacts destination plus the URI's path: how it resolves one it serves.
        return stack[0] / parsed.path.lstrip("/")
    return None


def _stack_artifacts() -> tuple[Path, tuple[str, ...]] | None:
    """Where the native stack's MLflow server of this home keeps artifacts, and the host:port names it
    answers to, when the tracking URI in use is that server; else None."""
    root = layout.home() / "stack"
    ports = layout.read_json_or_none(root / "ports.json") or {}
    if "mlflow" not in ports:
        return None
    hosts = tuple(f"{host}:{ports['mlflow']}" for host in ("127.0.0.1", "localhost"))
    if tracking_uri().rstrip("/") not in {f"http://{host}" for host in hosts}:
        return None
    return root / "mlflow" / "artifacts", hosts


def _store_once(source: str) -> int:
    """:func:`store_once` for the bundle just logged at ``source``, where its files are on this machine; a
    registration never fails for want of it (the copies stay). Returns the bytes freed."""
    logged = local_artifacts(source)
    if logged is None:
        return 0
    try:
        freed = store_once(logged)
    except OSError as exc:
        log.warning("registry: the files of %s stay copies (%s)", logged, exc)
        return 0
    if freed:
        log.info(
            "registry: the bundle's files are stored once with other versions' identical ones: %s",
            layout.human_size(freed),
        )
    return freed


def store_once(logged: Path) -> int:
    """Make each file of a version's bundle in the MLflow store (``logged``) one inode with the identical
    files of other versions' bundles there: each version kept a copy of its own, and versions fine-tuned
    from one pretraining hold the same encoder.keras (a smoke home of 20 runs: 83 MB of MLflow store in
    110 MB). Returns the space freed, as ``du`` counts it.

    Every file is checked against the sha256 it is linked for: a copy damaged meanwhile is neither
    linked to nor replaced. Only within the store, where nothing rewrites a file in place (MLflow writes
    a run's artifacts once). Never with a run folder's bundle (it was, until a QA run rewrote a run
    folder's classifier.keras in place, as Keras's ``Model.save`` to the same path does, and the champion
    it was registered as was refused from then on) nor with ``cache/files``, which the copies ``predict``
    serves link to. The deterministic choice of the copy kept (the first by path) makes every identical
    file one.
    """
    root = next((r for r in _artifact_roots() if logged.resolve().is_relative_to(r.resolve())), None)
    if root is None or not (logged / bundle.META).is_file():
        return 0
    held: dict[str, list[Path]] = {}  # sha256 -> the same file in other versions' bundles
    for meta in sorted(root.rglob(bundle.META)):
        if meta.parent.name == "bundle" and meta.parent != logged:
            for name, digest in ((layout.read_json_or_none(meta) or {}).get("files") or {}).items():
                held.setdefault(digest, []).append(meta.parent / name)
    gone: dict[tuple[int, int], list[int]] = {}  # an inode replaced: [allocated, links, links replaced]
    for path in sorted(p for p in logged.iterdir() if p.is_file() and not p.is_symlink()):
        digest = layout.sha256_file(path)
        anchor = next((c for c in sorted(held.get(digest, [])) if _holds(c, digest, path)), None)
        if anchor is None or os.path.samefile(path, anchor):
            continue
        st = path.lstat()
        with layout.atomic_path(path) as tmp:  # a reader sees one copy or the other, never none
            tmp.unlink()
            os.link(anchor, tmp)
        gone.setdefault((st.st_dev, st.st_ino), [st.st_blocks * 512, st.st_nlink, 0])[2] += 1
    return sum(size for size, links, replaced in gone.values() if replaced >= links)


def _artifact_roots() -> list[Path]:
    """Where this home's MLflow stores keep artifacts: the embedded store's, and make stack's server's."""
    return [layout.mlflow_dir() / "artifacts", layout.home() / "stack" / "mlflow" / "artifacts"]


def _holds(path: Path, digest: str, like: Path) -> bool:
    """Whether ``path`` is there and holds the content ``digest`` names (``like``'s: the size first)."""
    try:
        return os.path.samefile(path, like) or (
            path.stat().st_size == like.stat().st_size and layout.sha256_file(path) == digest
        )
    except OSError:
        return False


def _set_decision(c, name: str, version: str, decision: dict[str, Any], decided_in: str | None = None) -> None:
    """``version``'s ``gate.*`` tags become ``decision``'s, none of an earlier decision left.

    ``decided_in``: the run whose gate judged the version's model without registering it (rejected
    when it was registered, say, and blessed once the champion it lost to was rolled back, so the
    MLflow UI does not show the model it serves as rejected); ``gate.decided_in`` names that run.
    """
    new = {**decision_tags(decision), **({"gate.decided_in": decided_in} if decided_in else {})}
    for key in c.get_model_version(name, version).tags:
        if key.startswith("gate.") and key not in new:
            c.delete_model_version_tag(name, version, key)
    for key, value in new.items():
        c.set_model_version_tag(name, version, key, value)


def _judged_again(c, name: str, version: str, decision: dict[str, Any], run_id: str) -> None:
    """``version``'s model, registered by an earlier run, gated again by ``run_id``: a blessing becomes
    its tags; so does a rejection of a version only ever rejected, whose tags then say the newest
    judgment (the one :func:`rejected_under` matches, so the next run does not gate it again)."""
    mv = c.get_model_version(name, version)
    if decision.get("blessed") or (mv.tags.get("gate.blessed") == "false" and CHAMPION not in (mv.aliases or [])):
        _set_decision(c, name, version, decision, decided_in=run_id)


def _register(c, name: str, source: str, run_id: str, tags: dict[str, str]) -> dict[str, Any]:
    """A new version of ``name`` from the MLflow run ``run_id``'s bundle at ``source``."""
    from mlflow.exceptions import MlflowException

    try:
        # Your own data's model is not SST-2's: the description says which data each version was trained on.
        c.create_registered_model(
            name,
            description="encoderflow text classifier and its pretrained encoder; each version's data.*.source "
            "and data.labeled.labels tags say what it was trained on",
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = c.create_model_version(name, source=source, run_id=run_id, tags=tags)
    log.info("registry: %s version %s registered from run %s (%s)", name, mv.version, run_id, tracking_uri())
    return _described(mv, run_id)


def _earlier_tries(c, exp_id: str, tags: dict[str, str], status: str) -> list:
    """The MLflow runs earlier tries of this Airflow run (same dag and run id) left in ``status``, newest first."""
    run = tags.get("airflow.run_id")
    if not run:
        return []
    query = f"tags.`airflow.run_id` = '{run}' and attributes.status = '{status}'"
    found = c.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"])
    return [r for r in found if r.data.tags.get("airflow.dag_id") == tags.get("airflow.dag_id")]


def _close_orphans(c, exp_id: str, tags: dict[str, str]) -> None:
    """An earlier try of this Airflow run killed inside its MLflow run left it RUNNING with no
    version: mark it KILLED, so the experiment shows one live candidate per run, not a ghost."""
    for orphan in _earlier_tries(c, exp_id, tags, "RUNNING"):
        c.set_terminated(orphan.info.run_id, status="KILLED")
        log.info(
            "registry: MLflow run %s, an earlier try of %s killed before registering, marked KILLED",
            orphan.info.run_id,
            tags["airflow.run_id"],
        )


def close_stopped(dag_id: str, run_id: str) -> list[str]:
    """An Airflow run stopped for good (Ctrl-C, a kill) may have left its MLflow run RUNNING: mark it
    KILLED, as a retry of that run would. Returns the MLflow run ids closed."""
    if no_store():
        return []
    c = client()
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    tags = {"airflow.run_id": run_id, "airflow.dag_id": dag_id}
    closed = [r.info.run_id for r in _earlier_tries(c, exp.experiment_id, tags, "RUNNING")]
    for mlflow_run in closed:
        c.set_terminated(mlflow_run, status="KILLED")
    return closed


def _finished_unregistered(c, exp_id: str, tags: dict[str, str]):
    """The MLflow run an earlier try of this Airflow run completed (FINISHED) for this same bundle
    without registering it, or None."""
    # Exactly this bundle: a run logged before the tag was could hold a candidate trained again since.
    same = (r for r in _earlier_tries(c, exp_id, tags, "FINISHED") if r.data.tags.get(BUNDLE_TAG) == tags[BUNDLE_TAG])
    # A run that found its model held by a version uploaded no bundle: registered from, it would be an
    # empty version (its holder may be gone since: encoderflow prune --versions).
    return next(
        (r for r in same if REGISTERED_AS not in r.data.tags or c.list_artifacts(r.info.run_id, "bundle")), None
    )


def registered_for_run(
    name: str, run_id: str, dag_id: str = DAG_ID, bundle_sha256: str | None = None
) -> dict[str, Any] | None:
    """The version an Airflow run registered (its ``promote`` ran), or None; with ``bundle_sha256``
    (:func:`encoderflow.bundle.identity`), only a version of that very bundle."""
    if no_store():
        return None
    tags = {"airflow.run_id": run_id, "airflow.dag_id": dag_id}
    return _registered_for(client(), name, {**tags, **({BUNDLE_TAG: bundle_sha256} if bundle_sha256 else {})})


def _versions_of_run(c, name: str, tags: dict[str, str]) -> list:
    """The versions of ``name`` registered by the Airflow run ``tags`` name (dag and run id)."""
    run = tags.get("airflow.run_id")
    if not run:
        return []
    return [
        mv
        for mv in c.search_model_versions(f"name='{name}'")
        if mv.tags.get("airflow.run_id") == run and mv.tags.get("airflow.dag_id") == tags.get("airflow.dag_id")
    ]


def _same_bundle(theirs: dict[str, str], tags: dict[str, str]) -> bool:
    """Whether tags recorded earlier name the bundle ``tags`` name; either side without the tag (a
    version registered before it was recorded) matches, as it did then."""
    return theirs.get(BUNDLE_TAG, tags.get(BUNDLE_TAG)) == tags.get(BUNDLE_TAG, theirs.get(BUNDLE_TAG))


def _registered_for(c, name: str, tags: dict[str, str]) -> dict[str, Any] | None:
    """The version an earlier try of the same Airflow run registered for the same bundle, or found
    holding it (``registry.version`` on its MLflow run), so a retry adds none. A candidate trained
    again since (a cleared ``finetune``) is another model: no match."""
    for mv in _versions_of_run(c, name, tags):
        if _same_bundle(mv.tags, tags):
            return _described(mv, mv.run_id)
    exp = c.get_experiment_by_name(EXPERIMENT) if tags.get("airflow.run_id") else None
    from mlflow.exceptions import MlflowException

    for run in _earlier_tries(c, exp.experiment_id, tags, "FINISHED") if exp is not None else ():
        if REGISTERED_AS in run.data.tags and _same_bundle(run.data.tags, tags):
            try:
                holder = c.get_model_version(name, run.data.tags[REGISTERED_AS])
            except MlflowException as exc:  # deleted since (encoderflow prune --versions): it holds nothing
                _absent(exc, c, name)
                continue
            return _described(holder, run.info.run_id, earlier=True)
    return None


def _holders(c, name: str, identity: str, content: str | None = None) -> list:
    """The versions of ``name`` that hold the model: their ``bundle.sha256`` tag is ``identity``
    (:func:`encoderflow.bundle.identity`) or their ``bundle.content_sha256`` is ``content``
    (:func:`encoderflow.bundle.content_identity`: the same weights saved again), oldest first.
    Versions registered before the first tag was are not among them."""
    found = c.search_model_versions(f"name='{name}'")
    held = [
        mv
        for mv in found
        if mv.tags.get(BUNDLE_TAG) == identity or (content is not None and mv.tags.get(CONTENT_TAG) == content)
    ]
    return sorted(held, key=lambda mv: int(mv.version))


def _holding(c, name: str, identity: str, content: str | None = None):
    """The registered version holding the model ``identity`` (or ``content``) names: the champion if it
    does, else the newest; None when none does (or the model is not registered yet)."""
    if not (holders := _holders(c, name, identity, content)):
        return None
    current = champion(name)  # a search's versions carry no aliases
    return max(holders, key=lambda mv: (current is not None and str(mv.version) == current["version"], int(mv.version)))


def _described(mv, run_id: str, earlier: bool = False) -> dict[str, Any]:
    """What :func:`log_candidate` returns for version ``mv``, this Airflow run's MLflow run being
    ``run_id``; ``earlier``: ``mv`` was registered by another run (``registered_by`` names it)."""
    out = {"run_id": run_id, "version": str(mv.version), "source": mv.source, "tracking_uri": tracking_uri()}
    return {**out, "registered_by": mv.tags.get("airflow.run_id") or "an earlier run"} if earlier else out


# The gate and baseline settings a decision was made under (Config.promotion_hash).
SETTINGS_TAG = "gate.settings_hash"


def rejected_under(name: str, lineage: dict[str, str], champion_version: str, settings_hash: str) -> dict | None:
    """The newest version of ``name`` trained from ``lineage`` (data, code and config hashes) that the
    gate rejected against ``champion_version`` under ``settings_hash``, as ``{"version", "reasons"}``;
    None when there is none (or only versions decided before decisions recorded their settings)."""
    from mlflow.exceptions import MlflowException

    c = client()
    judged = [(int(mv.version), mv.tags, None) for mv in c.search_model_versions(f"name='{name}'")]
    try:
        model_tags = c.get_registered_model(name).tags
    except MlflowException as exc:
        _absent(exc, c, name)
        model_tags = {}
    # A version encoderflow prune --versions deleted was judged all the same: its record answers.
    judged += [(int(number), record.get("tags") or {}, record) for number, record in pruned_in(model_tags).items()]
    for number, tags, pruned in sorted(judged, key=lambda j: -j[0]):
        if (
            all(tags.get(k) == v for k, v in lineage.items())
            and tags.get("gate.blessed") == "false"
            and tags.get("gate.champion_version") == str(champion_version)
            and tags.get(SETTINGS_TAG) == settings_hash
        ):
            reasons = tags.get("gate.reasons", "")
            if pruned is None:
                return {"version": str(number), "reasons": reasons}
            when = str(pruned.get("deleted_at") or "")[:10]
            return {
                "version": str(number),
                "reasons": f"{reasons} (v{number} itself was deleted by encoderflow prune --versions on {when}; "
                f"its record is {name}'s {PRUNED_TAG}{number:06d} tag)",
                "pruned": pruned,
            }
    return None


def decision_tags(decision: dict[str, Any]) -> dict[str, str]:
    tags = {
        "gate.blessed": str(bool(decision["blessed"])).lower(),
        "gate.reasons": "; ".join(decision.get("reasons") or []) or "all checks passed",
        # A first champion has no champion figures: no tag, rather than one reading "None".
        **{metric_tag(metric): str(v) for name, metric in METRICS.items() if (v := decision.get(name)) is not None},
        **({"gate.champion_version": str(v)} if (v := decision.get("champion_version")) is not None else {}),
        **({SETTINGS_TAG: decision["settings_hash"]} if decision.get("settings_hash") else {}),
    }
    for check in decision.get("checks", []):
        tags[f"gate.check.{check['name']}"] = ("pass: " if check["passed"] else "FAIL: ") + check["detail"]
    tags.update(interval_tags(decision.get("intervals")))
    return tags


def interval_tags(intervals: dict[str, Any] | None) -> dict[str, str]:
    """The gate's bootstrap intervals (``gate.json``'s ``intervals``) as ``[low, high]`` version tags."""
    if not intervals:
        return {}
    tags = {
        "gate.intervals": f"{intervals['confidence']:.0%} paired bootstrap over {intervals['examples']} dev "
        f"sentences, {intervals['resamples']} resamples, seed {intervals['seed']}"
    }
    for name, metric in METRICS.items():
        if interval := intervals.get(name):
            tags[f"gate.{metric}_ci"] = f"[{interval['low']:.4f}, {interval['high']:.4f}]"
    if diff := intervals.get("candidate_minus_champion"):
        tags["gate.candidate_minus_champion_ci"] = f"[{diff['low']:+.4f}, {diff['high']:+.4f}]"
    return tags


@contextmanager
def promotion_lock() -> Iterator[None]:
    """Serialises compare-and-move of the champion alias across processes on one volume."""
    path = layout.mlflow_dir() / ".promote.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def move_champion(
    name: str,
    version: str,
    expected: str | None,
    reason: str,
    who: str | None = None,
    action: str = "promote",
    demote: bool = False,
) -> dict[str, Any]:
    """Point ``champion`` at ``version`` if the champion is still ``expected``.

    With ``demote`` (a person's move: :func:`promote`, :func:`rollback`), the version it moves off is
    tagged :data:`DEMOTED` first, under the lock, so no crash can move the champion and lose the
    demotion; ``version`` loses that tag once it is champion.

    A promotion makes the version it replaces ``previous``, first, so a crash between the two steps
    leaves ``champion`` on the old, complete version. A rollback never makes the version it rejects
    ``previous`` (a second rollback would serve it again): ``previous`` becomes what ``version``
    itself replaced when it was last promoted, or is removed when it replaced none, after
    ``champion`` moved. The move is recorded (who, why, from, to) on the version and in the
    registered model's ``champion.history`` tag.

    Raises:
        StaleChampion: someone moved the champion since the caller looked at ``expected``.
        EncoderflowError: ``version`` does not exist.
    """
    from mlflow.exceptions import MlflowException

    c = client()
    who = who or os.environ.get("ENCODERFLOW_USER") or getpass.getuser()
    try:
        c.get_model_version(name, version)
    except MlflowException as exc:
        _absent(exc, c, name)
        versions = sorted((int(v.version) for v in c.search_model_versions(f"name='{name}'")), reverse=True)
        raise EncoderflowError(
            f"{name}: no version {version} in {tracking_uri()}{_deleted(c, name, version)}; its versions: "
            f"{versions[:20]}",
            fix="give --version one of them (the runs page and the MLflow UI show each version's gate decision)",
        ) from None
    if demote:
        _verified_in_store(name, version)
    with promotion_lock():
        current = champion(name)
        current_version = current["version"] if current else None
        if current_version == version and action == "promote":  # a retry after the move went through
            log.info("registry: %s v%s is champion already", name, version)
            moves = history(name)
            if not moves or moves[-1]["to"] != version:  # the try that moved it died before recording it
                _record_move(c, name, version, _event(action, who, reason, expected, version), moves)
            if demote:
                _undemote(c, name, version)
            return {"action": action, "who": who, "reason": reason, "from": expected, "to": version, "already": True}
        if current_version != expected:

            def said(version: str | None) -> str:
                return f"v{version}" if version else "no champion"

            if demote:  # a person's promote or rollback, which looked a moment ago
                raise StaleChampion(
                    f"{name}: the champion moved to {said(current_version)} (from {said(expected)}) while this "
                    f"{action} ran; nothing moved",
                    fix="check the champion (encoderflow runs) and run the command again if it is still wanted",
                )
            moved = next((m for m in reversed(history(name)) if str(m.get("to")) == str(current_version)), None)
            raise StaleChampion(
                f"{name}: champion is {said(current_version)}, but the gate decided against "
                f"{said(expected)}: {moved_text(moved) if moved else 'it moved since'}",
                fix="clear evaluate_and_gate with its downstream tasks (or run again) to gate against today's champion",
            )
        event = _event(action, who, reason, current_version, version)
        if demote and current_version is not None:
            _demote(c, name, current_version, event)
        if action == "rollback":
            c.set_registered_model_alias(name, CHAMPION, version)
            previous = _replaced_by(c, name, version)
            if previous == current_version:
                previous = None
            if previous is not None:
                c.set_registered_model_alias(name, PREVIOUS, previous)
            else:
                c.delete_registered_model_alias(name, PREVIOUS)
        else:
            if current_version is not None:
                c.set_registered_model_alias(name, PREVIOUS, current_version)
            c.set_registered_model_alias(name, CHAMPION, version)
        # When the alias moved: the calls before it took 14 s against the stack's server, and the record said
        # "champion since" a time when the old champion still served.
        event["at"] = datetime.now(UTC).isoformat()
        if demote:
            _undemote(c, name, version)
        if action == "promote" and NOT_PROMOTED in c.get_model_version(name, version).tags:
            c.delete_model_version_tag(name, version, NOT_PROMOTED)  # champion now, as blessed
        _record_move(c, name, version, event, history(name))
    before = f"v{current_version}" if current_version is not None else "none"
    log.info("registry: %s champion %s -> v%s (%s: %s, by %s)", name, before, version, action, reason, who)
    return {**event, "previous": previous} if action == "rollback" else event


def moved_text(move: dict[str, Any]) -> str:
    """How a champion move on record came about, for a person: "v3 became champion by alice at
    2026-12-07 12:14 UTC (promote: a reason)"."""
    at = str(move.get("at") or "")[:16].replace("T", " ")
    how = f"{move.get('action')}: {move.get('reason')}"
    return f"v{move.get('to')} became champion by {move.get('who')} at {at} UTC ({how})"


def not_promoted(name: str, version: str, why: str) -> None:
    """Tag ``version``, registered as blessed, with why it did not become champion (a stale decision):
    its ``gate.blessed`` tag alone read as a champion that never was. A later promotion of it removes
    the tag."""
    client().set_model_version_tag(name, version, NOT_PROMOTED, why[:TAG_VALUE_MAX])


def _replaced_by(c, name: str, version: str) -> str | None:
    """The champion ``version`` replaced when it was last promoted (its ``champion.promote`` tag), or None."""
    recorded = c.get_model_version(name, version).tags.get("champion.promote")
    return json.loads(recorded).get("from") if recorded else None


# MLflow's SQL stores keep a tag's value in a VARCHAR(5000) (PostgreSQL, under make stack and the
# compose file, refuses a longer one): each move is a tag of its own, so the record only grows.
TAG_VALUE_MAX = 5000
MOVE_TAG = "champion.move."
LEGACY_HISTORY_TAG = "champion.history"  # the newest moves in one tag, as written before 2026-12-07
# A --reason is a sentence or a link, recorded with each move; longer is refused before anything moves.
REASON_MAX = 1000


def _event(action: str, who: str, reason: str, from_version: str | None, to_version: str) -> dict[str, Any]:
    at = datetime.now(UTC).isoformat()
    return {"at": at, "action": action, "who": who, "reason": reason, "from": from_version, "to": to_version}


def _record_move(c, name: str, version: str, event: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    """The move on the version (its latest move of that kind) and as the registered model's next
    ``champion.move.NNNNNN`` tag, after the ``earlier`` moves."""
    value = move_tag(event)
    c.set_model_version_tag(name, version, f"champion.{event['action']}", value)
    c.set_registered_model_tag(name, f"{MOVE_TAG}{len(earlier) + 1:06d}", value)


def move_tag(event: dict[str, Any]) -> str:
    """One move as JSON within ``TAG_VALUE_MAX`` characters: a reason too long for it (only a move made
    without :func:`check_reason`) is cut and ends ``[cut]``.

    Not ASCII-escaped: the SQL stores' VARCHAR(5000) counts characters, and as ``\\uXXXX`` escapes a
    1,000-character reason in Chinese took 6,000 and was cut to nothing.
    """

    def dumped(e: dict[str, Any]) -> str:
        # A lone surrogate (bytes that were not UTF-8, from a script) stays an escape: no store takes it.
        return json.dumps(e, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")

    text, reason = dumped(event), event["reason"]
    while len(text) > TAG_VALUE_MAX and reason:  # a quote or control character escapes to 2-6: cut until it fits
        reason = reason[: max(0, len(reason) - (len(text) - TAG_VALUE_MAX) - len(" [cut]"))]
        text = dumped({**event, "reason": reason + " [cut]"})
    return text


def check_reason(reason: str, who: str | None = None) -> None:
    """A person's ``--reason`` (and ``--who``): given, UTF-8, and short enough to keep whole with the move."""
    if not reason.strip():
        raise EncoderflowError("give a --reason; it is recorded with the move")
    for flag, text in (("--reason", reason), ("--who", who or "")):
        check_utf8(
            flag, text, after="; nothing moved", fix=f"give {flag} as UTF-8 text (a UTF-8 terminal, or iconv -t utf-8)"
        )
    if len(reason) > REASON_MAX:
        raise EncoderflowError(
            f"--reason is {len(reason):,} characters; the registry keeps at most {REASON_MAX:,} with each move",
            fix="give a shorter --reason (a link to the incident notes, say)",
        )


def moves_in(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The champion moves a registered model's tags record, oldest first."""
    own = [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(MOVE_TAG))]
    return json.loads(tags.get(LEGACY_HISTORY_TAG, "[]")) + own


def history(name: str) -> list[dict[str, Any]]:
    """Every champion move on record, oldest first (:func:`moves_in`)."""
    return moves_in(_model_tags(name))


def pruned_versions(name: str) -> dict[str, dict[str, Any]]:
    """The versions of ``name`` that ``encoderflow prune --versions`` deleted, by number (:func:`pruned_in`)."""
    return pruned_in(_model_tags(name))


def _model_tags(name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        return c.get_registered_model(name).tags
    except MlflowException as exc:  # an outage read as "no history" would overwrite it with one move
        _absent(exc, c, name)
        return {}


def promoted_from(name: str, before: str | None, version: str) -> bool:
    """Whether a promotion on record moved ``name``'s champion from ``before`` (None: no champion) to
    ``version``: a gate decision against ``before`` that blessed ``version`` was carried out (the
    champion may have moved on since)."""

    def said(v: Any) -> str | None:
        return None if v is None else str(v)

    return any(
        move.get("action") == "promote"
        and said(move.get("from")) == said(before)
        and said(move.get("to")) == str(version)
        for move in history(name)
    )


def versions_of_model(name: str, identity: str, content: str | None = None) -> list[dict[str, Any]]:
    """The versions of ``name`` that hold the model ``identity`` or ``content`` names (:func:`_holders`),
    oldest first: each ``version``, and ``demoted``, the move a person made off it (``champion.demoted``),
    or None."""
    if no_store():
        return []
    return [
        {"version": str(mv.version), "demoted": json.loads(mv.tags[DEMOTED]) if DEMOTED in mv.tags else None}
        for mv in _holders(client(), name, identity, content)
    ]


def _demote(c, name: str, version: str, move: dict[str, Any]) -> None:
    """A person moved the champion off ``version``: the gate will not bring its model back."""
    c.set_model_version_tag(name, version, DEMOTED, json.dumps({k: move.get(k) for k in _MOVE_FIELDS}))


def _undemote(c, name: str, version: str) -> None:
    """A person made ``version`` champion: its model is no longer demoted."""
    if DEMOTED in c.get_model_version(name, version).tags:
        c.delete_model_version_tag(name, version, DEMOTED)


_MOVE_FIELDS = ("at", "action", "who", "reason", "from", "to")


def promote(name: str, version: str, reason: str, who: str | None = None) -> dict[str, Any]:
    """A person's explicit promotion of ``version`` (no gate), recorded with who and why; the version
    it replaces is demoted (:data:`DEMOTED`)."""
    check_reason(reason, who)
    current = champion(name)
    expected = current["version"] if current else None
    return move_champion(name, version_number(version), expected, reason, who, action="promote", demote=True)


def version_number(version: str | int) -> str:
    """A version as the registry numbers it: ``3``, ``"3"`` and ``"v3"`` (as ``encoderflow runs`` prints
    it) are ``"3"``. Anything else is returned as given, for the caller's lookup to refuse by name."""
    text = str(version).strip()
    return str(int(text[1:] if text[:1] in "vV" else text)) if re.fullmatch(r"[vV]?\d+", text) else text


def rollback(name: str, reason: str, who: str | None = None) -> dict[str, Any]:
    """Put ``previous`` back as champion. The rejected version does not become ``previous``: what the
    restored one replaced does (:func:`move_champion`), so rollbacks walk back, never forth.

    Raises:
        EncoderflowError: no ``previous`` version (none, or the last rollback reached the first champion).
    """
    if reason and reason.strip():
        check_reason(reason, who)
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        prev = c.get_model_version_by_alias(name, PREVIOUS)
    except MlflowException as exc:
        _absent(exc, c, name)
        raise EncoderflowError(
            f"{name}: no 'previous' version to roll back to",
            fix="make a version champion by number: encoderflow promote --version N --reason ...",
        ) from None
    current = champion(name)
    target = str(prev.version)
    if current is not None and target == current["version"]:
        # A move killed between its two alias writes: 'previous' already names the champion. What the
        # champion replaced is on record (its champion.promote tag): that is the version to go back to.
        target = _replaced_by(c, name, target)
        if target is None:
            c.delete_registered_model_alias(name, PREVIOUS)
            raise EncoderflowError(
                f"{name}: 'previous' is the champion v{prev.version} itself (a move was interrupted), and "
                "it replaced no version: removed it",
                fix="make a version champion by number: encoderflow promote --version N --reason ...",
            )
        log.info(
            "registry: 'previous' is the champion v%s itself (a move was interrupted): v%s replaced it",
            prev.version,
            target,
        )
    expected = current["version"] if current else None
    return move_champion(name, target, expected, reason or "rollback", who, action="rollback", demote=True)


def pruned_in(tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The versions ``encoderflow prune --versions`` deleted, by number, from a registered model's tags:
    each one's record (``deleted_at``, ``who``, ``why``, ``bytes`` and the tags it was judged on)."""
    out = {}
    for key, value in tags.items():
        if key.startswith(PRUNED_TAG) and key[len(PRUNED_TAG) :].isdigit():
            try:
                out[str(int(key[len(PRUNED_TAG) :]))] = json.loads(value)
            except ValueError:  # cut or edited by hand: that version is simply not on record
                continue
    return out


def _champion_record(tags: dict[str, str], version: str, moves: list[dict[str, Any]]) -> str | None:
    """Why version ``version`` (its ``tags``) counts as having been champion, or None: a move onto or
    off it on record, its own move tags, or a person's demotion of it."""
    for move in moves:
        if version in (str(move.get("to")), str(move.get("from"))):
            return f"was champion ({moved_text(move) if str(move.get('to')) == version else 'moved off it'})"
    for tag in ("champion.promote", "champion.rollback", DEMOTED):
        if tag in tags:
            return f"was champion (its {tag} tag)"
    return None


def versions_for_prune() -> dict[str, Any]:
    """Every registered version of every model in the MLflow store in use, as ``encoderflow prune
    --versions`` judges them, and the files of versions a killed prune deleted but left on disk.

    Returns:
        ``store`` (the tracking URI); ``versions``: one dict each with ``model``, ``version``,
        ``run_id``, ``created`` (seconds since the epoch), ``tags``, ``aliases``, ``champion`` (why it
        was champion once, or None), ``files`` (its MLflow run's artifact folder on this machine, None
        when unknown) and ``shares_run`` (another version was registered from the same MLflow run);
        ``leftovers``: ``run_id`` and ``files`` of each such deleted run whose folder is still there.

    Raises:
        EncoderflowError: the store is a server: its files are not this machine's to delete.
    """
    uri = tracking_uri()
    if not uri.startswith("sqlite:"):
        raise EncoderflowError(
            f"prune --versions deletes versions from an MLflow store on this machine (the embedded one, or a "
            f"sqlite: MLFLOW_TRACKING_URI); {uri} is a server, whose files it cannot reach",
            fix="leave out --versions here, and delete versions on the server (its UI or MlflowClient."
            "delete_model_version, then mlflow gc there)",
        )
    if no_store():
        return {"store": uri, "versions": [], "leftovers": []}
    from mlflow.entities import ViewType

    c = client()
    found = []
    for model in c.search_registered_models():
        moves = moves_in(model.tags)
        aliases: dict[str, list[str]] = {}
        for alias, number in (model.aliases or {}).items():  # a search's versions carry none
            aliases.setdefault(str(number), []).append(alias)
        for mv in c.search_model_versions(f"name='{model.name}'"):
            version = str(mv.version)
            try:
                files = local_artifacts(c.get_run(mv.run_id).info.artifact_uri)
            except Exception:  # noqa: BLE001 - a run gone from the store: its files are not known
                files = None
            found.append(
                {
                    "model": model.name,
                    "version": version,
                    "run_id": mv.run_id,
                    "created": (mv.creation_timestamp or 0) / 1000,
                    "tags": dict(mv.tags),
                    "aliases": sorted(aliases.get(version, [])),
                    "champion": _champion_record(mv.tags, version, moves),
                    "files": files,
                }
            )
    runs = [v["run_id"] for v in found]
    for v in found:
        v["shares_run"] = runs.count(v["run_id"]) > 1
    leftovers = []
    if (exp := c.get_experiment_by_name(EXPERIMENT)) is not None:
        for run in c.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY, max_results=5000):
            files = local_artifacts(run.info.artifact_uri) if PRUNED_RUN_TAG in run.data.tags else None
            if files is not None and files.exists():
                leftovers.append({"run_id": run.info.run_id, "files": files})
    return {"store": uri, "versions": found, "leftovers": leftovers}


def delete_version(name: str, version: str, why: str, since: float, size: int = 0) -> dict[str, Any]:
    """Delete version ``version`` of ``name``, which ``encoderflow prune --versions`` judged at ``since``
    (seconds since the epoch) as going, for the reason ``why``, if that still holds.

    Under the promotion lock, so no champion move (a gate's, a person's) interleaves: a version that
    has an alias now, was made champion, was blessed by a later gate, or whose model a run found in it
    since ``since`` (``registry.version`` on its MLflow run: the run registered no bundle of its own)
    stays. Otherwise, in this order, so a crash at any point leaves a consistent store: the version's
    record becomes the registered model's ``pruned.version.NNNNNN`` tag (:func:`rejected_under` reads it,
    so that training is not run again for hours to be rejected again); its MLflow run is tagged; the
    version is deleted; its MLflow run is deleted (MLflow marks it deleted: its few KB of rows stay until
    ``mlflow gc``), unless another version was registered from it. The run's files are the caller's to
    remove, once they are not an MLflow run's of record.

    Args:
        size: the bytes its files hold, for the record.

    Returns:
        ``deleted`` (bool), ``why`` (the reason it stays, when not deleted) and ``files`` (the deleted
        MLflow run's artifact folder on this machine, or None: nothing to remove).
    """
    from mlflow.exceptions import MlflowException

    c = client()
    with promotion_lock():
        try:
            mv = c.get_model_version(name, version)
        except MlflowException as exc:
            _absent(exc, c, name)
            return {"deleted": False, "why": "deleted since the plan", "files": None}
        tags = dict(mv.tags)
        stays = None
        if mv.aliases:
            stays = f"it is the {', '.join(mv.aliases)} version now"
        elif was := _champion_record(tags, str(version), history(name)):
            stays = was
        elif tags.get("gate.blessed") != "false":
            stays = "a gate blessed it since the plan"
        else:
            exp = c.get_experiment_by_name(EXPERIMENT)
            query = f"tags.`{REGISTERED_AS}` = '{version}' and attributes.start_time > {int(since * 1000)}"
            if exp is not None and (later := c.search_runs([exp.experiment_id], filter_string=query, max_results=1)):
                stays = f"{later[0].data.tags.get('airflow.run_id', 'a run')} found its model in it since the plan"
        if stays:
            return {"deleted": False, "why": stays, "files": None}
        at = datetime.now(UTC).isoformat(timespec="seconds")
        record = {
            "deleted_at": at,
            "who": os.environ.get("ENCODERFLOW_USER") or getpass.getuser(),
            "why": why,
            "bytes": size,
            "run_id": mv.run_id,
            "tags": {
                k: v
                for k, v in tags.items()
                if k in _PRUNED_KEEPS or (k.startswith("data.") and k.endswith(".content_hash"))
            },
        }
        c.set_registered_model_tag(name, f"{PRUNED_TAG}{int(version):06d}", _pruned_value(record))
        c.set_tag(mv.run_id, PRUNED_RUN_TAG, json.dumps({"model": name, "version": str(version), "at": at}))
        c.delete_model_version(name, version)
        if any(other.run_id == mv.run_id for other in c.search_model_versions(f"name='{name}'")):
            return {"deleted": True, "why": "", "files": None}
        c.delete_run(mv.run_id)
        files = local_artifacts(c.get_run(mv.run_id).info.artifact_uri)
    log.info("registry: %s v%s deleted (%s); its MLflow run %s marked deleted", name, version, why, mv.run_id)
    return {"deleted": True, "why": "", "files": files}


# What a deleted version's record keeps of its tags: how it was judged, on what (with the data hashes),
# and which model it held.
_PRUNED_KEEPS = (
    "airflow.run_id",
    "airflow.dag_id",
    BUNDLE_TAG,
    CONTENT_TAG,
    "config.training_hash",
    "code.hash",
    "lineage.starts_from",  # steps.STARTS_FROM_TAG: a warm start's lineage
    "gate.blessed",
    "gate.champion_version",
    SETTINGS_TAG,
    "gate.reasons",
    metric_tag(METRICS["candidate"]),
)


def _pruned_value(record: dict[str, Any]) -> str:
    """A deleted version's record as JSON within ``TAG_VALUE_MAX`` characters: the gate's reasons are
    cut (ending ``[cut]``) when the whole would not fit."""
    text = json.dumps(record, ensure_ascii=False)
    reasons = record["tags"].get("gate.reasons", "")
    while len(text) > TAG_VALUE_MAX and reasons:
        reasons = reasons[: max(0, len(reasons) - (len(text) - TAG_VALUE_MAX) - len(" [cut]"))]
        text = json.dumps(
            {**record, "tags": {**record["tags"], "gate.reasons": reasons + " [cut]"}}, ensure_ascii=False
        )
    return text
