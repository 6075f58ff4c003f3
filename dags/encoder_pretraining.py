"""encoder_pretraining: download → validate → shards → pretrain → fine-tune → gate → promote.

Thin by design: every task body is one call into ``encoderflow.steps``, imported inside the task,
so parsing this file imports no TensorFlow, Keras, JAX or Great Expectations and touches no file
or network.
"""

from __future__ import annotations

import functools
import os
from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

DOC = """
### Pretrain a Transformer text encoder, promote it only when it earns it

The Keras guide *Pretraining a Transformer from scratch with KerasNLP* as a production workflow:
WikiText-103 → masked-LM TFRecord shards → encoder pretraining → SST-2 fine-tuning → a gate
against a floor, this run's bag-of-words baseline and the current champion (re-evaluated on this
run's data) → MLflow registry, where only a blessed candidate becomes `champion`.

Trigger with **preset** `smoke` (tiny, CPU, minutes) or `guide` (the guide's exact numbers; needs a
GPU). Leave a number empty to keep the preset's value. Offline: set **data_dir** to a folder laid
out as the archives extract (like `shared/data`); offline runs pretrain on WikiText `test`
(`pretrain_split`), as there is no train split there.

Artifacts: `$ENCODERFLOW_HOME/runs/<run_id>/` (metrics, gate.json, summary.json, Data Docs),
`$ENCODERFLOW_HOME/shards/<hash>/`, MLflow under `$ENCODERFLOW_HOME/mlflow`.
"""


def _int(default, title, description, minimum=None, maximum=None):
    return Param(default, type=["null", "integer"], title=title, description=description,
                 **({"minimum": minimum} if minimum is not None else {}),
                 **({"maximum": maximum} if maximum is not None else {}))


def _num(default, title, description, minimum=None, maximum=None):
    return Param(default, type=["null", "number"], title=title, description=description,
                 **({"minimum": minimum} if minimum is not None else {}),
                 **({"maximum": maximum} if maximum is not None else {}))


PARAMS = {
    "preset": Param("guide", type="string", enum=["guide", "smoke"], title="Preset",
                    description="guide: the guide's hyperparameters (GPU). smoke: tiny model, minutes on CPU."),
    "data_dir": Param(None, type=["null", "string"], title="Offline data folder",
                      description="Folder laid out as the archives extract (SST-2/, wikitext-103-raw/, "
                                  "bert_vocab_uncased.txt). Empty: download."),
    "mirror": Param(None, type=["null", "string"], title="Mirror URL",
                    description="Base URL tried first for every file, with the same pinned hashes."),
    "sources_file": Param(None, type=["null", "string"], title="Sources file",
                          description="JSON replacing dataset specs (URLs, hashes) for re-packed copies."),
    "pretrain_split": Param(None, type=["null", "string"], enum=[None, "train", "valid", "test"],
                            title="WikiText split to pretrain on",
                            description="Empty: the preset's (guide: train, smoke: test)."),
    "seed": _int(None, "Seed", "Root of every random choice in data generation and training.", 0, 2**31 - 1),
    "seq_length": _int(None, "Sequence length", "Tokens per sequence (guide: 128).", 8, 512),
    "num_shards": _int(None, "Shards", "TFRecord shards for the pretraining split.", 1, 1024),
    "dupe_factor": _int(None, "Dupe factor", "Copies of the corpus with different masks.", 1, 64),
    "padding_mask": Param(None, type=["null", "boolean"], title="Padding mask",
                          description="Attend to real tokens only (false reproduces the guide)."),
    "pretrain_epochs": _int(None, "Pretraining epochs", "Guide: 8.", 1, 1000),
    "pretrain_steps_per_epoch": _int(None, "Pretraining steps per epoch", "0: the whole split.", 0),
    "pretrain_batch_size": _int(None, "Pretraining batch size", "Guide: 128.", 1, 65536),
    "pretrain_learning_rate": _num(None, "Pretraining learning rate", "AdamW; guide: 5e-4.", 0, 1),
    "finetune_epochs": _int(None, "Fine-tuning epochs", "Guide: 3.", 1, 1000),
    "finetune_steps_per_epoch": _int(None, "Fine-tuning steps per epoch", "0: the whole train split.", 0),
    "finetune_batch_size": _int(None, "Fine-tuning batch size", "Guide: 32.", 1, 65536),
    "finetune_learning_rate": _num(None, "Fine-tuning learning rate", "AdamW; guide: 5e-5.", 0, 1),
    "gate_min_accuracy": _num(None, "Gate: accuracy floor", "SST-2 dev accuracy the candidate must reach.", 0, 1),
    "gate_min_gain_over_baseline": _num(None, "Gate: minimum gain over the BoW baseline",
                                        "Negative tolerates a deficit.", -1, 1),
    "gate_max_regression": _num(None, "Gate: maximum regression vs champion",
                                "How far below the re-evaluated champion a candidate may be.", 0, 1),
    "overrides": Param([], type="array", items={"type": "string"}, title="Other overrides",
                       description="section.key=value, e.g. model.num_layers=2 (see encoderflow config keys)."),
}


def expected_failures(fn):
    """Bad data, bad config or diverged training fails the task once, with the message alone."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from airflow.sdk.exceptions import AirflowFailException

        from encoderflow.errors import EncoderflowError

        try:
            return fn(*args, **kwargs)
        except EncoderflowError as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from None

    return wrapper


def _context():
    ctx = get_current_context()
    return ctx["params"], ctx["run_id"]


NETWORK = {"retries": 3, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True,
           "max_retry_delay": timedelta(minutes=10)}


@dag(
    dag_id="encoder_pretraining",
    schedule=os.environ.get("ENCODERFLOW_SCHEDULE") or None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    doc_md=DOC,
    tags=["encoderflow", "ml"],
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
)
def encoder_pretraining():
    @task(**NETWORK)
    @expected_failures
    def download(dataset: str) -> dict:
        """Fetch (pinned hash, retries, resume) or locate offline; record per-file sha256."""
        from encoderflow import steps

        params, _ = _context()
        return steps.download(dataset, params)

    @task(retries=0)
    @expected_failures
    def validate(info: dict) -> dict:
        """Great Expectations suite per file; any failure stops the run. Writes Data Docs."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.validate(info, params, run_id)

    @task
    @expected_failures
    def plan_shards(wikitext: dict, vocab: dict) -> list:
        """Split the pretraining text into shards under a content-addressed folder."""
        from encoderflow import steps

        params, _ = _context()
        return steps.plan_shards(wikitext, vocab, params)

    @task
    @expected_failures
    def build_shard(shard: dict) -> dict:
        """Tokenize, mask (seeded) and write one TFRecord shard atomically."""
        from encoderflow import steps

        params, _ = _context()
        return steps.build_shard(shard, params)

    @task
    @expected_failures
    def seal_shards(plan: list, built: list) -> dict:
        """Verify every shard and write manifest.json last."""
        from encoderflow import steps

        params, _ = _context()
        return steps.seal_shards(plan, params)

    @task
    @expected_failures
    def train_baseline(sst2: dict) -> dict:
        """The guide's bag-of-words baseline on SST-2."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.train_baseline(sst2, params, run_id)

    @task
    @expected_failures
    def pretrain(sealed: dict) -> dict:
        """Masked-LM pretraining from the shards; resumes after a retry."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.pretrain(sealed, params, run_id)

    @task
    @expected_failures
    def finetune(pretrained: dict, sst2: dict, vocab: dict) -> dict:
        """Encoder + pooled classifier on SST-2; writes the model bundle."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.finetune(pretrained, sst2, vocab, params, run_id)

    @task
    @expected_failures
    def evaluate_and_gate(finetuned: dict, baseline: dict, sst2: dict) -> dict:
        """Floor, baseline and re-evaluated champion checks; writes gate.json."""
        from encoderflow import steps

        params, run_id = _context()
        return steps.evaluate_and_gate(finetuned, baseline, sst2, params, run_id)

    @task
    @expected_failures
    def promote(decision: dict, finetuned: dict, pretrained: dict, baseline: dict, sealed: dict,
                wikitext: dict, sst2: dict, vocab: dict) -> dict:
        """Register the candidate in MLflow with lineage; move `champion` only if blessed."""
        from encoderflow import steps

        ctx = get_current_context()
        lineage = {"airflow.dag_id": ctx["dag"].dag_id, "airflow.run_id": ctx["run_id"],
                   "airflow.try_number": str(ctx["ti"].try_number)}
        return steps.promote(decision, finetuned, pretrained, baseline, sealed,
                             {"wikitext": wikitext, "sst2": sst2, "vocab": vocab}, ctx["params"], lineage)

    @task
    def report(decision: dict, promoted: dict, finetuned: dict, pretrained: dict, baseline: dict, sealed: dict,
               wikitext: dict, sst2: dict, vocab: dict) -> dict:
        """summary.json: metrics, the gate decision and where every artifact is."""
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
