"""encoder_pretraining: download → lineage check → validate → shards → pretrain → fine-tune → gate → promote.

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

**How to trigger.** Pick **Preset** `smoke` (tiny model, a few minutes on a CPU) or `guide` (the
guide's exact numbers; needs a GPU). Every field left empty keeps the preset's value, shown in its
description as *guide / smoke*; every key is listed in `docs/parameters.md`. Offline: set
**Offline data folder** to a folder laid out as the archives extract (`SST-2/`,
`wikitext-103-raw/`, `bert_vocab_uncased.txt`); offline copies usually lack the WikiText train
split, so set **WikiText split to pretrain on** to `test` (the smoke preset already does). A
**Mirror URL** is tried before the official addresses; files must still match the pinned sha256.

**What it writes** (all under `$ENCODERFLOW_HOME`, the volume every worker shares):
`data/<dataset>/<hash>/` (verified downloads), `shards/<hash>/` (TFRecord shards, `manifest.json`),
`runs/<run id>/` (`data_docs/`, `baseline/`, `pretrain/`, `finetune/bundle/`, `gate.json`,
`summary.json`), and one MLflow model version of `{af.REGISTERED_MODEL}` per run.

**Assets.** `seal_shards` updates `encoderflow_shards`; `promote` updates
`{af.REGISTERED_MODEL}@champion` only when the champion actually moves, so a DAG scheduled on it
runs once per new champion.

**No wasted reruns.** `check_lineage` compares the data's content hashes, the config hash and the
code's hash with the champion's; when all are equal the run skips everything after it (training
would rebuild the same model) and its summary says "nothing changed since champion vN". Tick
**Train even if nothing changed** (`force`) to train anyway.

**Resources.** `pretrain` and `finetune` run on queue `gpu` in pool `gpu` (one slot): one
training job on the accelerator at a time. Schedule: `ENCODERFLOW_SCHEDULE` (cron or preset;
unset = manual only); no catch-up. The **Encoderflow runs** page lists every run with its gate
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
    @task(**af.NETWORK, execution_timeout=timedelta(hours=2))
    @af.expected_failures
    def download(dataset: str, params=None) -> dict:
        """Fetch one dataset (mirror first, then the official URLs; resumable, pinned sha256), or locate it
        in the offline folder; extract it safely into `data/<dataset>/<hash>/`. A hash mismatch fails."""
        return steps.download(dataset, params)

    @task(retries=0, execution_timeout=timedelta(minutes=30))
    @af.expected_failures
    def validate(info: dict, params=None, run_id=None) -> dict:
        """Run the dataset's Great Expectations suite on every file it uses (genuine row counts for the
        pinned archives); any failure fails the run, one line each. Data Docs: `runs/<run id>/data_docs/`."""
        return steps.validate(info, params, run_id)

    @task.short_circuit(**af.NETWORK, execution_timeout=timedelta(minutes=10))
    @af.expected_failures
    def check_lineage(wikitext: dict, sst2: dict, vocab: dict, params=None, run_id=None) -> bool:
        """Compare this run's data content hashes, config hash and code hash with the champion's. Equal:
        nothing would change, so every later task is skipped and `summary.json` says "nothing changed
        since champion vN". The `force` param trains anyway."""
        return steps.check_lineage({"wikitext": wikitext, "sst2": sst2, "vocab": vocab}, params, run_id)

    @task(execution_timeout=timedelta(minutes=15))
    @af.expected_failures
    def plan_shards(wikitext: dict, vocab: dict, sst2: dict, params=None) -> list:
        """Split the pretraining text into `num_shards` pieces under `shards/<hash>/`, the hash of the
        data config, vocabulary and texts; one spec per shard for `build_shard`. With
        `data.task_adaptive` the SST-2 train sentences (no labels) get shards of their own."""
        return steps.plan_shards(wikitext, vocab, params, sst2)

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
    def train_baseline(sst2: dict, params=None, run_id=None) -> dict:
        """The guide's bag-of-words baseline on SST-2, the bar a pretrained encoder must clear."""
        return steps.train_baseline(sst2, params, run_id)

    @task(**af.GPU, execution_timeout=timedelta(hours=24))
    @af.expected_failures
    def pretrain(sealed: dict, params=None, run_id=None) -> dict:
        """Masked-LM pretraining from the sealed shards, one log line per epoch; a retry resumes from the
        last backup. A NaN loss fails without retry. Writes `runs/<run id>/pretrain/encoder.keras`."""
        return steps.pretrain(sealed, params, run_id)

    @task(**af.GPU, execution_timeout=timedelta(hours=12))
    @af.expected_failures
    def finetune(pretrained: dict, sst2: dict, vocab: dict, params=None, run_id=None) -> dict:
        """Fine-tune the encoder with a pooled classifier on SST-2; writes the model bundle
        `runs/<run id>/finetune/bundle/` (classifier, encoder, vocabulary, `bundle.json` with sha256s)."""
        return steps.finetune(pretrained, sst2, vocab, params, run_id)

    @task(**af.NETWORK, execution_timeout=timedelta(hours=1))
    @af.expected_failures
    def evaluate_and_gate(finetuned: dict, baseline: dict, sst2: dict, params=None, run_id=None) -> dict:
        """Re-evaluate the champion on this run's dev data, then check the floor, the gain over the
        baseline and the regression against the champion. A rejection is a result, not a failure."""
        return steps.evaluate_and_gate(finetuned, baseline, sst2, params, run_id)

    @task(**af.NETWORK, outlets=[af.CHAMPION_MOVES], execution_timeout=timedelta(minutes=30))
    @af.expected_failures
    def promote(run: dict, params=None, run_id=None, ti=None, outlet_events=None) -> dict:
        """Register the candidate in MLflow (bundle, metrics, curves, decision, lineage); move `champion`
        to it only if blessed, and only then update the `<model>@champion` asset."""
        lineage = {"airflow.dag_id": af.DAG_ID, "airflow.run_id": run_id, "airflow.try_number": str(ti.try_number)}
        promoted = steps.promote(**run, params=params, lineage=lineage)
        af.record_champion(outlet_events, promoted, run["finetuned"]["sst2_val_accuracy"])
        return promoted

    @task(execution_timeout=timedelta(minutes=10))
    @af.expected_failures
    def report(run: dict, promoted: dict, params=None, run_id=None) -> dict:
        """Collect metrics, gate decision, registry version and artifact paths into `summary.json`."""
        return steps.report(run_id, params, {**run, "promoted": promoted})

    downloaded = {name: download.override(task_id=f"download_{name}")(name) for name in ("wikitext", "sst2", "vocab")}
    checked = check_lineage(**downloaded)
    wikitext, sst2, vocab = (validate.override(task_id=f"validate_{n}")(info) for n, info in downloaded.items())
    checked >> [wikitext, sst2, vocab]
    plan = plan_shards(wikitext, vocab, sst2)
    sealed = seal_shards(plan, build_shard.expand(shard=plan))
    baseline = train_baseline(sst2)
    pretrained = pretrain(sealed)
    finetuned = finetune(pretrained, sst2, vocab)
    decision = evaluate_and_gate(finetuned, baseline, sst2)
    run = {"decision": decision, "finetuned": finetuned, "pretrained": pretrained, "baseline": baseline}
    run |= {"sealed": sealed, "inputs": {"wikitext": wikitext, "sst2": sst2, "vocab": vocab}}
    report(run, promote(run))


dag = encoder_pretraining()
