"""encoder_pretraining: download → validate → shards → pretrain → fine-tune → gate → promote.

Thin by design: every task body is one call into ``encoderflow.steps``, imported inside the task,
so parsing this file imports no TensorFlow, Keras, JAX or Great Expectations and touches no file
or network. (``encoderflow.config`` is plain dataclasses; it is read here so the trigger form can
show each preset's value next to every field.)
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task

from encoderflow.config import PRESETS, from_overrides

DAG_ID = "encoder_pretraining"
log = logging.getLogger("encoderflow.dag")

_GUIDE, _SMOKE = from_overrides("guide"), from_overrides("smoke")
REGISTERED_MODEL = _GUIDE.gate.registered_model

# Other DAGs schedule on these, e.g. ``@dag(schedule=CHAMPION)`` to run on every new champion.
SHARDS = Asset(name="encoderflow_shards", uri="x-encoderflow://shards/sealed", group="encoderflow")
CHAMPION_MOVES = AssetAlias(name="encoderflow_champion_moves", group="encoderflow")


def champion_asset(model: str = REGISTERED_MODEL) -> Asset:
    """The ``champion`` alias of a registered model, as an Airflow asset (one event per move)."""
    return Asset(name=f"{model}@champion", uri=f"x-encoderflow://registry/{model}/champion", group="encoderflow")


CHAMPION = champion_asset()


def schedule_from_env() -> str | None:
    """``ENCODERFLOW_SCHEDULE``: a cron expression or preset (``@daily``); empty/``off`` = manual only."""
    value = os.environ.get("ENCODERFLOW_SCHEDULE", "").strip()
    return None if value.lower() in ("", "none", "off", "manual") else value


DOC = f"""
### Pretrain a Transformer text encoder, promote it only when it earns it

The Keras guide *Pretraining a Transformer from scratch with KerasNLP* as a production workflow:
WikiText-103 → masked-LM TFRecord shards → encoder pretraining → SST-2 fine-tuning → a gate
against a floor, this run's bag-of-words baseline and the current champion (re-evaluated on this
run's data) → MLflow registry, where only a blessed candidate becomes `champion`.

**How to trigger.** Pick **Preset** `smoke` (tiny model, a few minutes on a CPU) or `guide` (the
guide's exact numbers; needs a GPU). Every number left empty keeps the preset's value, shown in
its description as *guide / smoke*. Offline: set **Offline data folder** to a folder laid out as
the archives extract (`SST-2/`, `wikitext-103-raw/`, `bert_vocab_uncased.txt`); offline copies
usually lack the WikiText train split, so set **WikiText split to pretrain on** to `test` (the
smoke preset already does). A **Mirror URL** is tried before the official addresses; files must
still match the pinned sha256.

**What it writes** (all under `$ENCODERFLOW_HOME`, the volume every worker shares):
`data/<dataset>/<hash>/` (verified downloads), `shards/<hash>/` (TFRecord shards, `manifest.json`),
`runs/<run id>/` (`data_docs/`, `baseline/`, `pretrain/`, `finetune/bundle/`, `gate.json`,
`summary.json`), and one MLflow model version of `{REGISTERED_MODEL}` per run.

**Assets.** `seal_shards` updates `encoderflow_shards`; `promote` updates
`{REGISTERED_MODEL}@champion` only when the champion actually moves, so a DAG scheduled on it
runs once per new champion.

**Resources.** `pretrain` and `finetune` run on queue `gpu` in pool `gpu` (one slot): one
training job on the accelerator at a time. Schedule: `ENCODERFLOW_SCHEDULE` (cron or preset;
unset = manual only); no catch-up. The **Encoderflow runs** page in the navigation lists every
run with its gate decision, metrics, champion history and links.
"""


def _presets(key: str, fmt: str = "{}") -> str:
    """'guide X / smoke Y' for a config key, so a person sees what an empty field means."""
    section, name = key.split(".")
    g, s = getattr(getattr(_GUIDE, section), name), getattr(getattr(_SMOKE, section), name)
    return f"Empty: the preset's value (guide {fmt.format(g)} / smoke {fmt.format(s)})."


def _int(key, title, description, minimum, maximum, section):
    return Param(None, type=["null", "integer"], title=title, description=f"{description} {_presets(key)}",
                 minimum=minimum, maximum=maximum, section=section)


def _num(key, title, description, minimum, maximum, section, exclusive_minimum=False):
    bounds = {"exclusiveMinimum": minimum} if exclusive_minimum else {"minimum": minimum}
    return Param(None, type=["null", "number"], title=title, description=f"{description} {_presets(key, '{:g}')}",
                 maximum=maximum, section=section, **bounds)


# The first fields (preset, where the data comes from) stay in the form's main section; the tuning
# knobs are grouped into collapsed sections below it.
DATA, TRAIN, TUNE, GATE, MORE = "Data generation", "Pretraining", "Fine-tuning", "Promotion gate", "Advanced"
PARAMS = {
    "preset": Param("guide", type="string", enum=sorted(PRESETS), title="Preset",
                    values_display={"guide": "guide: the Keras guide's numbers (GPU)",
                                    "smoke": "smoke: tiny model, minutes on a CPU"},
                    description="Hyperparameters every empty field below falls back to. guide: 3 layers, "
                                "dim 256, 8 pretraining epochs (needs a GPU). smoke: 1 layer, dim 32, "
                                "a plumbing check in minutes on a CPU."),
    "data_dir": Param(None, type=["null", "string"], pattern=r"^/", minLength=1, title="Offline data folder",
                      description="Absolute path, readable by every worker, laid out as the archives extract "
                                  "(SST-2/, wikitext-103-raw/, bert_vocab_uncased.txt). Empty: download."),
    "mirror": Param(None, type=["null", "string"], pattern=r"^(https?|file)://", title="Mirror URL",
                    description="Base URL tried before the official addresses for every file (same file names; "
                                "the pinned sha256 still applies). Empty: official addresses only."),
    "sources_file": Param(None, type=["null", "string"], pattern=r"^/", title="Sources file",
                          description="Absolute path of a JSON file replacing dataset specs (URLs, sha256) for "
                                      "re-packed copies. Empty: the pinned official archives."),
    "pretrain_split": Param(None, type=["null", "string"], enum=[None, "train", "valid", "test"],
                            title="WikiText split to pretrain on",
                            values_display={"null": "the preset's split", "train": "train (full WikiText-103)",
                                            "valid": "valid",
                                            "test": "test (offline copies without the train split)"},
                            description=f"Validation always uses WikiText valid. {_presets('data.pretrain_split')}"),
    "seed": _int("data.seed", "Seed", "Root of every random choice in data generation and training.",
                 0, 2**31 - 1, DATA),
    "seq_length": _int("data.seq_length", "Sequence length", "Tokens per sequence.", 8, 512, DATA),
    "num_shards": _int("data.num_shards", "Shards", "TFRecord shards for the pretraining split (one mapped "
                       "build_shard task each).", 1, 1024, DATA),
    "dupe_factor": _int("data.dupe_factor", "Dupe factor", "Copies of the corpus, each with different masks.",
                        1, 64, DATA),
    "padding_mask": Param(None, type=["null", "boolean"], title="Padding mask",
                          description="Attend to real tokens only; false reproduces the guide, which lets every "
                                      f"token attend to [PAD]. {_presets('model.padding_mask')}",
                          section=DATA),
    "pretrain_epochs": _int("pretrain.epochs", "Pretraining epochs", "Passes over the shards.", 1, 1000, TRAIN),
    "pretrain_steps_per_epoch": _int("pretrain.steps_per_epoch", "Pretraining steps per epoch",
                                     "0 = every shard record.", 0, 10_000_000, TRAIN),
    "pretrain_batch_size": _int("pretrain.batch_size", "Pretraining batch size", "Sequences per step.",
                                1, 65536, TRAIN),
    "pretrain_learning_rate": _num("pretrain.learning_rate", "Pretraining learning rate", "AdamW.", 0, 1, TRAIN,
                                   exclusive_minimum=True),
    "finetune_epochs": _int("finetune.epochs", "Fine-tuning epochs", "Passes over SST-2 train.", 1, 1000, TUNE),
    "finetune_steps_per_epoch": _int("finetune.steps_per_epoch", "Fine-tuning steps per epoch",
                                     "0 = the whole SST-2 train split.", 0, 10_000_000, TUNE),
    "finetune_batch_size": _int("finetune.batch_size", "Fine-tuning batch size", "Sentences per step.",
                                1, 65536, TUNE),
    "finetune_learning_rate": _num("finetune.learning_rate", "Fine-tuning learning rate", "AdamW.", 0, 1, TUNE,
                                   exclusive_minimum=True),
    "gate_min_accuracy": _num("gate.min_accuracy", "Gate: accuracy floor",
                              "SST-2 dev accuracy the candidate must reach.", 0, 1, GATE),
    "gate_min_gain_over_baseline": _num("gate.min_gain_over_baseline", "Gate: minimum gain over the BoW baseline",
                                        "Accuracy points over this run's bag-of-words baseline; negative "
                                        "tolerates a deficit.", -1, 1, GATE),
    "gate_max_regression": _num("gate.max_regression", "Gate: maximum regression vs champion",
                                "How far below the current champion (re-evaluated on this run's dev data) a "
                                "candidate may fall and still be promoted.", 0, 1, GATE),
    "overrides": Param(None, type=["null", "array"], items={"type": "string", "pattern": r"^[a-z_]+\.[a-z_]+=.*$"},
                       title="Other overrides",
                       description="One section.key=value per line for any other config value, e.g. "
                                   "model.num_layers=2 (list: `encoderflow config`). Applied after the fields "
                                   "above.",
                       section=MORE),
}


def _one_line(exc: BaseException | None, limit: int = 300) -> str:
    if exc is None:
        return "no exception recorded"
    text = " ".join(str(exc).split()) or repr(exc)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def log_failure(context) -> None:
    """on_failure_callback: one line that says which task of which run failed, on which try, and why."""
    ti = context["ti"]
    exc = context.get("exception")
    label = ti.task_id if getattr(ti, "map_index", -1) in (-1, None) else f"{ti.task_id}[{ti.map_index}]"
    if type(exc).__name__ == "AirflowFailException":
        # Raised by expected_failures: the message already starts with the encoderflow error type.
        attempt, why = f"try={ti.try_number}, no retry", _one_line(exc)
    else:
        attempt = f"try={ti.try_number}/{(getattr(ti, 'max_tries', 0) or 0) + 1}"
        why = f"{type(exc).__name__ if exc is not None else 'Failure'}: {_one_line(exc)}"
    log.error("encoderflow FAILED %s.%s run=%s %s: %s", ti.dag_id, label, ti.run_id, attempt, why)


# Input/output summary lines: the keys steps use for files and folders they read or wrote.
_PATH_KEYS = ("root", "path", "manifest", "encoder", "bundle", "result", "gate_json", "summary", "docs", "file",
              "shards_dir", "vocab_path")


def _size(path: str) -> str:
    try:
        if os.path.isdir(path):
            files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
            return f"{len(files)} files, {sum(os.path.getsize(f) for f in files):,} bytes"
        return f"{os.path.getsize(path):,} bytes"
    except OSError:
        return "missing"


def _paths(value, prefix: str = "", depth: int = 0, max_depth: int = 3):
    """(label, path, "sha256 …" or None) for every path-like entry of a step's dict, a few levels deep."""
    if depth > max_depth:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            label = f"{prefix}.{key}" if prefix else str(key)
            if key in _PATH_KEYS and isinstance(item, str) and item.startswith("/"):
                digest = value.get("sha256") or value.get(f"{key}_sha256")
                if digest:
                    digest = f"sha256 {digest}"
                elif key == "root" and value.get("content_hash"):
                    digest = f"content hash {value['content_hash']}"
                yield label, item, digest
            elif isinstance(item, (dict, list)):
                yield from _paths(item, label, depth + 1, max_depth)
    elif isinstance(value, list):
        for i, item in enumerate(value[:64]):
            yield from _paths(item, f"{prefix}[{i}]", depth, max_depth)


def _figures(result) -> str:
    if not isinstance(result, dict):
        return ""
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                    if isinstance(v, (int, float)))


def _log_io(task_id: str, args, result) -> None:
    """Inputs: the top-level paths of each argument. Outputs: every path the result names, except
    those merely passed through from an input (same path, same hash)."""
    seen = {path: digest for arg in args for _, path, digest in _paths(arg)}
    logged = set()
    for arg in args:
        for label, path, digest in _paths(arg, max_depth=0):
            if path not in logged:
                logged.add(path)
                log.info("%s input %s: %s%s", task_id, label, path, f" ({digest})" if digest else "")
    for label, path, digest in _paths(result):
        if path in seen and (digest is None or digest == seen[path]):
            continue
        log.info("%s output %s: %s (%s%s)", task_id, label, path, _size(path), f", {digest}" if digest else "")
    if figures := _figures(result):
        log.info("%s figures: %s", task_id, figures)


def expected_failures(fn):
    """Bad data, bad config or diverged training fails the task once, with the message alone.

    Also logs what the step read and wrote (paths, sizes, hashes) and its key figures.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from airflow.sdk.exceptions import AirflowFailException

        from encoderflow.errors import EncoderflowError

        try:
            result = fn(*args, **kwargs)
        except EncoderflowError as exc:
            # The message is the diagnosis; the stack below it (TF, GX, MLflow) only hides it.
            log.error("%s: %s", type(exc).__name__, exc)
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from None
        try:
            _log_io(get_current_context()["ti"].task_id, [*args, *kwargs.values()], result)
        except Exception:  # a summary line must never fail a finished step
            log.warning("could not summarise the inputs and outputs of %s", fn.__name__, exc_info=True)
        return result

    return wrapper


def _context():
    ctx = get_current_context()
    return ctx["params"], ctx["run_id"]


# Network-bound tasks: transient outages are worth waiting out, with growing pauses.
NETWORK = {"retries": 3, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True,
           "max_retry_delay": timedelta(minutes=10)}
# One training job at a time on the accelerator; the `gpu` pool holds one slot.
GPU = {"queue": "gpu", "pool": "gpu", "pool_slots": 1}


@dag(
    dag_id=DAG_ID,
    schedule=schedule_from_env(),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    doc_md=DOC,
    tags=["encoderflow", "ml"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30), "execution_timeout": timedelta(hours=1),
                  "on_failure_callback": log_failure},
)
def encoder_pretraining():
    @task(**NETWORK, execution_timeout=timedelta(hours=2))
    @expected_failures
    def download(dataset: str) -> dict:
        """Fetch one dataset (mirror first, then the official URLs; resumable, pinned sha256), or locate it
        in the offline folder, and extract it safely.

        Writes `data/<dataset>/<hash>/` under `$ENCODERFLOW_HOME`. Returns the root folder, every file's
        path, size and sha256, and a content hash. A hash mismatch fails without retry."""
        from encoderflow import steps

        params, _ = _context()
        return steps.download(dataset, params)

    @task(retries=0, execution_timeout=timedelta(minutes=30))
    @expected_failures
    def validate(info: dict) -> dict:
        """Run the dataset's Great Expectations suite on every file it uses; any failed expectation fails
        the run with one line per failure.

        Writes Data Docs to `runs/<run id>/data_docs/<dataset>/`."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.validate(info, params, run_id)

    @task(execution_timeout=timedelta(minutes=15))
    @expected_failures
    def plan_shards(wikitext: dict, vocab: dict) -> list:
        """Plan the masked-LM shards: split the pretraining text into `num_shards` pieces under a folder
        named by the hash of the data config, vocabulary and input texts.

        Writes nothing but the folder; returns one spec per shard for `build_shard`."""
        from encoderflow import steps

        params, _ = _context()
        return steps.plan_shards(wikitext, vocab, params)

    @task(execution_timeout=timedelta(hours=2))
    @expected_failures
    def build_shard(shard: dict) -> dict:
        """Tokenize one piece, mask it with a seeded RNG and write one TFRecord shard atomically (temp file,
        rename, sidecar with its sha256). A finished shard is reused.

        Writes `shards/<hash>/<split>-<n>.tfrecord`."""
        from encoderflow import steps

        params, _ = _context()
        return steps.build_shard(shard, params)

    @task(outlets=[SHARDS], execution_timeout=timedelta(minutes=15))
    @expected_failures
    def seal_shards(plan: list, built: list) -> dict:
        """Verify every planned shard against its sidecar sha256 and write `manifest.json` last.

        Writes `shards/<hash>/manifest.json`; updates the `encoderflow_shards` asset."""
        from encoderflow import steps

        params, _ = _context()
        sealed = steps.seal_shards(plan, params)
        get_current_context()["outlet_events"][SHARDS].extra = {
            "manifest": sealed.get("manifest"), "manifest_sha256": sealed.get("manifest_sha256")}
        return sealed

    @task(execution_timeout=timedelta(minutes=30))
    @expected_failures
    def train_baseline(sst2: dict) -> dict:
        """Train the guide's bag-of-words baseline on SST-2: the bar a pretrained encoder must clear.

        Writes `runs/<run id>/baseline/result.json` (dev accuracy, history)."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.train_baseline(sst2, params, run_id)

    @task(**GPU, execution_timeout=timedelta(hours=24))
    @expected_failures
    def pretrain(sealed: dict) -> dict:
        """Masked-LM pretraining of the encoder from the sealed shards, one log line per epoch; resumes
        from its last backup after a retry. A NaN loss fails without retry.

        Writes `runs/<run id>/pretrain/` (backup, `encoder.keras`, `result.json`)."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.pretrain(sealed, params, run_id)

    @task(**GPU, execution_timeout=timedelta(hours=12))
    @expected_failures
    def finetune(pretrained: dict, sst2: dict, vocab: dict) -> dict:
        """Fine-tune the pretrained encoder with a pooled classifier on SST-2, one log line per epoch.

        Writes the model bundle `runs/<run id>/finetune/bundle/` (classifier, encoder, vocabulary,
        `bundle.json` with sha256s) and `result.json`."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.finetune(pretrained, sst2, vocab, params, run_id)

    @task(**NETWORK, execution_timeout=timedelta(hours=1))
    @expected_failures
    def evaluate_and_gate(finetuned: dict, baseline: dict, sst2: dict) -> dict:
        """Re-evaluate the current champion on this run's dev data, then decide: accuracy floor, gain over
        the baseline, no regression against the champion. A rejection is a result, not a failure.

        Writes `runs/<run id>/gate.json` (checks and reasons)."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.evaluate_and_gate(finetuned, baseline, sst2, params, run_id)

    @task(**NETWORK, outlets=[CHAMPION_MOVES], execution_timeout=timedelta(minutes=30))
    @expected_failures
    def promote(decision: dict, finetuned: dict, pretrained: dict, baseline: dict, sealed: dict,
                wikitext: dict, sst2: dict, vocab: dict) -> dict:
        """Register the candidate as a new MLflow model version (bundle, metrics, curves, gate decision,
        lineage) and, only if blessed, move the `champion` alias to it.

        Writes to the MLflow registry; updates the `<model>@champion` asset only when the champion moved."""
        from encoderflow import steps

        ctx = get_current_context()
        lineage = {"airflow.dag_id": ctx["dag"].dag_id, "airflow.run_id": ctx["run_id"],
                   "airflow.try_number": str(ctx["ti"].try_number)}
        promoted = steps.promote(decision, finetuned, pretrained, baseline, sealed,
                                 {"wikitext": wikitext, "sst2": sst2, "vocab": vocab}, ctx["params"], lineage)
        if promoted.get("promoted"):
            ctx["outlet_events"][CHAMPION_MOVES].add(
                champion_asset(promoted["registered_model"]),
                extra={"version": promoted["version"], "run_id": promoted.get("run_id"),
                       "accuracy": finetuned.get("val_accuracy")})
        return promoted

    @task(execution_timeout=timedelta(minutes=10))
    @expected_failures
    def report(decision: dict, promoted: dict, finetuned: dict, pretrained: dict, baseline: dict, sealed: dict,
               wikitext: dict, sst2: dict, vocab: dict) -> dict:
        """Collect the run's metrics, gate decision, registry version and artifact paths.

        Writes `runs/<run id>/summary.json` (what the Encoderflow runs page shows)."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.report(run_id, params, {
            "decision": decision, "promoted": promoted, "finetuned": finetuned, "pretrained": pretrained,
            "baseline": baseline, "sealed": sealed,
            "inputs": {"wikitext": wikitext, "sst2": sst2, "vocab": vocab}})

    wikitext = validate.override(task_id="validate_wikitext")(download.override(task_id="download_wikitext")("wikitext"))
    sst2 = validate.override(task_id="validate_sst2")(download.override(task_id="download_sst2")("sst2"))
    vocab = validate.override(task_id="validate_vocab")(download.override(task_id="download_vocab")("vocab"))

    plan = plan_shards(wikitext, vocab)
    built = build_shard.expand(shard=plan)
    sealed = seal_shards(plan, built)
    baseline = train_baseline(sst2)
    pretrained = pretrain(sealed)
    finetuned = finetune(pretrained, sst2, vocab)
    decision = evaluate_and_gate(finetuned, baseline, sst2)
    promoted = promote(decision, finetuned, pretrained, baseline, sealed, wikitext, sst2, vocab)
    report(decision, promoted, finetuned, pretrained, baseline, sealed, wikitext, sst2, vocab)


dag = encoder_pretraining()
