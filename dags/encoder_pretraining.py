"""encoder_pretraining: download → lineage check → validate → vocab → shards → pretrain → fine-tune → gate → promote.

Every task body is a call into ``encoderflow.steps``, which imports the ML stack inside each
step: parsing this file imports no TensorFlow, Keras, JAX or Great Expectations and touches no
file or network. Airflow glue (trigger form, failure handling, presets, assets) lives in
``encoderflow.airflow_adapter``; the form's fields are generated from ``encoderflow.config``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from encoderflow import airflow_adapter as af
from encoderflow import steps

DOC = f"""
### Pretrain a Transformer text encoder, promote it only when it earns it

The Keras guide *Pretraining a Transformer from scratch with KerasNLP* as a production workflow:
WikiText-103 → masked-LM TFRecord shards → encoder pretraining → SST-2 fine-tuning → a gate
against a floor, this run's bag-of-words baseline and the current champion (re-evaluated on this
run's data) → MLflow registry, where only a blessed candidate becomes `champion`.

**How to trigger.** Pick **Preset** `smoke` (tiny model, a few minutes on a CPU), `guide` (the
guide's exact numbers; needs a GPU) or `recipe` (the guide's model with the best recipe measured
so far). Every field left empty keeps the preset's value, shown in its description as
*guide / smoke / recipe*; every key is listed in `docs/parameters.md`. Offline: set
**Offline data folder** to a folder laid out as the archives extract (`SST-2/`,
`wikitext-103-raw/`, `bert_vocab_uncased.txt`); offline copies usually lack the WikiText train
split, so set **WikiText split to pretrain on** to `test` (the smoke preset already does). A
**Mirror URL** is tried before the official addresses; files must still match the pinned sha256.

**Your own data.** Under **Your own data**, give a **Pretraining corpus** folder (UTF-8 text files)
and/or **Labeled data** (a folder with `train.<ext>` and `dev.<ext>`, ext `tsv`, `csv` or `jsonl`, any
number of classes) with its **Text column** and **Label column**, and a **Vocabulary** (`trained` learns
one on the corpus); or keep them in a YAML **Data file** (`ENCODERFLOW_DATA_FILE` for scheduled runs).
Each source is validated by a suite generated from the declaration (README, *Your own data*).

**What it writes** (all under `$ENCODERFLOW_HOME`, the volume every worker shares):
`data/<dataset>/<hash>/` (verified downloads), `shards/<hash>/` (TFRecord shards, `manifest.json`),
`runs/<run id>/` (`data_docs/`, `baseline/`, `pretrain/`, `finetune/bundle/`, `gate.json`,
`summary.json`), and one MLflow model version of `{af.REGISTERED_MODEL}` per run.

**Assets.** `seal_shards` updates `encoderflow_shards`; `promote` updates
`{af.REGISTERED_MODEL}@champion` only when the champion actually moves, so a DAG scheduled on it
runs once per new champion.

**No wasted reruns.** `check_lineage` compares the data's content hashes, the config hash (gate
settings aside) and the code's hash with the champion's; when all are equal the run skips everything after it (training
would rebuild the same model) and its summary says "nothing changed since champion vN". Tick
**Train even if nothing changed** (`force`) to train anyway.

**Resources.** `pretrain` and `finetune` run on queue `gpu` in pool `gpu` (one slot): one
training job on the accelerator at a time. Schedule: `ENCODERFLOW_SCHEDULE` (cron or preset;
`assets`: whenever `encoderflow_sources` sees your corpus or labeled data change; `assets|<cron>`:
both; unset = manual only); no catch-up. The **Encoderflow runs** page lists every run with its gate
decision, metrics, champion history and links.
"""


@dag(
    dag_id=af.DAG_ID,
    schedule=af.schedule_from_env(),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=af.params(),
    doc_md=DOC,
    tags=["encoderflow", "ml"],
    default_args=af.DEFAULT_ARGS,
)
def encoder_pretraining():
    # Retried like a network task: a scheduled run's first try can die before it runs (the api-server not
    # up yet); a bad trigger is an expected failure and fails once.
    @task(**af.NETWORK, execution_timeout=timedelta(minutes=5))
    @af.expected_failures
    def check_params(params=None, dag_run=None, run_id=None) -> dict:
        """Resolve the config once, before anything downloads: a trigger key that is no param, an unknown
        override, a value out of bounds or your own labeled data without its own model name fails here."""
        return steps.check_params(params, dict(dag_run.conf or {}), run_id, af.triggered_by(dag_run))

    @task(**af.NETWORK, execution_timeout=timedelta(hours=2))
    @af.expected_failures
    def download(role: str, params=None) -> dict:
        """Get one role's data: the guide's dataset (mirror first, then the official URLs; resumable, pinned
        sha256; or the offline folder), or your own folder (copied, or downloaded from its manifest.json),
        into the content-addressed `data/<dataset>/<hash>/`."""
        return steps.download(role, params)

    @task(retries=0, execution_timeout=timedelta(minutes=30))
    @af.expected_failures
    def validate(info: dict, params=None, run_id=None) -> dict:
        """Run the role's Great Expectations suite on every file it uses (genuine row counts for the pinned
        archives; generated from the declaration for your own data); any failure fails the run, one line
        each. Data Docs: `runs/<run id>/data_docs/`."""
        return steps.validate(info, params, run_id)

    @task.short_circuit(**af.NETWORK, execution_timeout=timedelta(minutes=10))
    @af.expected_failures
    def check_lineage(corpus: dict, labeled: dict, vocab: dict, params=None, run_id=None) -> bool:
        """Compare this run's data content hashes, config hash (gate, baseline, housekeeping aside) and code
        hash with the champion's. Equal: nothing would change, so every later task is skipped and `summary.json` says
        "nothing changed since champion vN". The `force` param trains anyway. Labeled data of another
        label set than the champion's fails here: another task, another registered model."""
        return steps.check_lineage({"corpus": corpus, "labeled": labeled, "vocab": vocab}, params, run_id)

    @task(execution_timeout=timedelta(hours=2))
    @af.expected_failures
    def prepare_vocab(corpus: dict, vocab: dict, params=None, run_id=None) -> dict:
        """The BERT vocabulary, or with `inputs.vocab=trained` one computed on the corpus's pretraining
        documents (keras-hub WordPiece trainer), validated by the vocabulary suite; reused when there."""
        return steps.prepare_vocab(corpus, vocab, params, run_id)

    @task(execution_timeout=timedelta(minutes=15))
    @af.expected_failures
    def plan_shards(corpus: dict, vocab: dict, labeled: dict, params=None) -> list:
        """Split the pretraining text into `num_shards` pieces under `shards/<hash>/`, the hash of the
        data config, vocabulary and texts; one spec per shard for `build_shard`. With
        `data.task_adaptive` the labeled train texts (no labels) get shards of their own."""
        specs = steps.plan_shards(corpus, vocab, params, labeled)
        return af.mappable(specs, "shards", fix="lower data.num_shards or data.dupe_factor")

    @task(execution_timeout=timedelta(hours=2))
    @af.expected_failures
    def build_shard(shard: dict, params=None) -> dict:
        """Tokenize one piece, mask it with a seeded RNG, write one TFRecord shard atomically (temp file,
        rename, sidecar with its sha256). A finished shard is reused."""
        return steps.build_shard(shard, params)

    @task(outlets=[af.SHARDS], execution_timeout=timedelta(minutes=15))
    @af.expected_failures
    def seal_shards(plan: list, built: list, params=None, outlet_events=None) -> dict:
        """Verify every planned shard against its sidecar sha256, write `manifest.json` last; updates the
        `encoderflow_shards` asset."""
        sealed = steps.seal_shards(plan, params)
        af.record_shards(outlet_events, sealed)
        return sealed

    @task(execution_timeout=timedelta(minutes=30))
    @af.expected_failures
    def train_baseline(labeled: dict, params=None, run_id=None) -> dict:
        """The guide's bag-of-words baseline on the labeled data, the bar a pretrained encoder must clear."""
        return steps.train_baseline(labeled, params, run_id)

    @task(**af.GPU, execution_timeout=timedelta(hours=24))
    @af.expected_failures
    def pretrain(sealed: dict, params=None, run_id=None) -> dict:
        """Masked-LM pretraining from the sealed shards, one log line per epoch; a retry resumes from the
        last backup. A NaN loss fails without retry. Writes `runs/<run id>/pretrain/encoder.keras`."""
        return steps.pretrain(sealed, params, run_id)

    @task(**af.GPU, execution_timeout=timedelta(hours=12))
    @af.expected_failures
    def finetune(pretrained: dict, labeled: dict, vocab: dict, params=None, run_id=None) -> dict:
        """Fine-tune the encoder with a pooled classifier (sigmoid for two classes, softmax for more) on the
        labeled data; writes the model bundle `runs/<run id>/finetune/bundle/` (classifier, encoder,
        vocabulary, `bundle.json` with labels and sha256s)."""
        return steps.finetune(pretrained, labeled, vocab, params, run_id)

    @task(**af.NETWORK, inlets=af.champion_inlets(), execution_timeout=timedelta(hours=1))
    @af.expected_failures
    def evaluate_and_gate(finetuned: dict, baseline: dict, labeled: dict, params=None, run_id=None) -> dict:
        """Re-evaluate the champion on this run's dev data, then check the floor, the gain over the
        baseline and the regression against the champion. A rejection is a result, not a failure."""
        return steps.evaluate_and_gate(finetuned, baseline, labeled, params, run_id)

    @task(
        **af.NETWORK, inlets=[af.CHAMPION_MOVES], outlets=[af.CHAMPION_MOVES], execution_timeout=timedelta(minutes=30)
    )
    @af.expected_failures
    def promote(run: dict, params=None, run_id=None, ti=None, dag_run=None, outlet_events=None, inlet_events=None):
        """Register the candidate in MLflow (bundle, metrics, curves, decision, lineage); move `champion`
        to it only if blessed, and only then update the `<model>@champion` asset (once per move)."""
        lineage = {"airflow.dag_id": af.DAG_ID, "airflow.run_id": run_id, "airflow.try_number": str(ti.try_number)}
        lineage["airflow.triggered_by"] = af.triggered_by(dag_run)
        promoted = steps.promote(**run, params=params, lineage=lineage)
        af.record_champion(
            outlet_events, promoted, steps.val_accuracy(run["finetuned"], run["decision"]), inlet_events, run_id
        )
        return promoted

    @task(execution_timeout=timedelta(minutes=10))
    @af.expected_failures
    def report(run: dict, promoted: dict, params=None, run_id=None) -> dict:
        """Collect metrics, gate decision, registry version and artifact paths into `summary.json`."""
        return steps.report(run_id, params, {**run, "promoted": promoted})

    downloaded = {role: download.override(task_id=f"download_{role}")(role) for role in af.ROLES}
    check_params() >> list(downloaded.values())
    checked = check_lineage(**downloaded)
    corpus, labeled, bert = (validate.override(task_id=f"validate_{r}")(info) for r, info in downloaded.items())
    checked >> [corpus, labeled, bert]
    vocab = prepare_vocab(corpus, bert)
    plan = plan_shards(corpus, vocab, labeled)
    sealed = seal_shards(plan, build_shard.expand(shard=plan))
    baseline = train_baseline(labeled)
    [corpus, bert] >> baseline  # a run whose corpus or vocabulary fails validation trains nothing
    pretrained = pretrain(sealed)
    finetuned = finetune(pretrained, labeled, vocab)
    decision = evaluate_and_gate(finetuned, baseline, labeled)
    run = {"decision": decision, "finetuned": finetuned, "pretrained": pretrained, "baseline": baseline}
    run |= {"sealed": sealed, "inputs": {"corpus": corpus, "labeled": labeled, "vocab": vocab}}
    report(run, promote(run))


dag = encoder_pretraining()
