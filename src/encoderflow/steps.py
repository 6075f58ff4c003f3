"""One function per DAG task: typed params in, small typed dicts of paths, hashes and metrics out.

Nothing here imports Airflow; the DAG passes ``params`` and the run id, and each function
rebuilds the same frozen :class:`~encoderflow.config.Config` from them. Each step logs what it
read and what it wrote (path and sha256) once, so a task log says where its artifacts are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from encoderflow import layout
from encoderflow.config import (
    ConfigError,
    RunOptions,
    Sources,
    check_conf_keys,
    from_params,
    resolve,
    set_item,
    training_schedule,
)
from encoderflow.gate import METRICS, metric_tag
from encoderflow.results import (
    Baseline,
    Dataset,
    Finetuned,
    Pretrained,
    Sealed,
    compact,
    only_file,
    split_info,
    split_path,
)
from encoderflow.runs import CHAMPION_BASIS, FORCE_HINT, skipped_text

log = logging.getLogger("encoderflow")


def setup_logging() -> None:
    """Quiet the chattiest libraries so task logs show our lines."""
    # MLflow sets its own level and stderr handler when imported (after this): tell it by environment.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # pooch's logger is not in this tree: data.sources.quiet_pooch quiets it where it is imported.
    for name in ("great_expectations", "absl", "mlflow", "alembic", "urllib3", "h5py", "jax._src"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("encoderflow").setLevel(logging.INFO)


def _inputs(step: str, **paths: str) -> None:
    for label, path in paths.items():
        log.info("%s input %s: %s", step, label, path)


def _output(step: str, label: str, path: str, sha256: str | None = None) -> None:
    log.info("%s output %s: %s%s", step, label, path, f" (sha256 {sha256})" if sha256 else "")


def check_params(
    params: Mapping[str, Any], conf: Mapping[str, Any], run_id: str | None = None, triggered_by: str | None = None
) -> dict[str, Any]:
    """Resolve the run's config once, before anything downloads, and say what it resolved to; the run
    folder keeps it (``resolved.json``, with ``triggered_by``: who started the run), so a run stopped
    before it reported still says what it ran, and ``encoderflow runs`` says who asked for it.

    Raises:
        ConfigError: a trigger key that is no param (``conf``: the trigger's own keys), an unknown
            override key, a value out of bounds, or labeled data of your own without a model name.
    """
    setup_logging()
    check_conf_keys(conf)
    cfg, given, sources = resolve(params)
    check_files(cfg, sources)
    declared = {k: v for k, v in dataclasses.asdict(sources).items() if v}
    log.info(
        "check_params: preset %s, config hash %s (training hash %s: what the model is trained from, gate.* "
        "and baseline.* aside, as the registry's config.training_hash); set: %s; data: %s",
        cfg.preset,
        cfg.config_hash()[:16],
        cfg.training_hash()[:16],
        # As resolved (a REST client's 3.0 for an integer reads 3), not as given.
        ", ".join(f"{k}={_resolved(cfg, k)}" for k in sorted(given)) or "nothing (the preset's values)",
        ", ".join(f"{k}={v}" for k, v in sorted(declared.items())) or "the guide's datasets",
    )
    out = {"preset": cfg.preset, "config_hash": cfg.config_hash(), "training_hash": cfg.training_hash()}
    if run_id == ".":
        # Airflow takes it, then fails every task on storing its results (its API redirects the '.' path).
        raise ConfigError("run id '.': Airflow cannot store this run's results", fix="trigger it under another run id")
    if run_id and (owner := layout.run_folder_owner(run_id)):
        # Two ids one folder name apart: the later run's files would replace the earlier's, summary included.
        raise ConfigError(
            f"run id {run_id!r}: its folder {layout.run_dir(run_id)} belongs to run {owner!r} (in folder names "
            "every character but letters, digits, '.', '_' and '-' becomes '_')",
            fix="trigger it again under another run id",
        )
    if run_id:
        # Its run id as Airflow spells it: the folder's name is a filesystem-safe form (':' and '+' gone).
        record = {"run_id": run_id, **out, "set": {k: _resolved(cfg, k) for k in sorted(given)}, "data": declared}
        if triggered_by:
            record["triggered_by"] = triggered_by
        layout.write_json(layout.run_dir(run_id) / layout.RESOLVED_FILE, {**record, "config": cfg.to_dict()})
    return out


def _resolved(cfg, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def check_files(cfg, sources: Sources) -> None:
    """The files a run names that must already exist, before anything downloads or trains: the
    offline folder's (one failure naming each missing file) and ``pretrain.init_from``'s encoder.

    Raises:
        DataError: the offline folder is not there or lacks a file the run reads.
        EncoderflowError: ``pretrain.init_from`` names a file that is not there.
    """
    from encoderflow.data import inputs

    inputs.check_offline(cfg, sources)
    _given_encoder(cfg)


def _given_encoder(cfg) -> str | None:
    """``pretrain.init_from``'s path when it names a file (not ``none`` or ``champion``)."""
    source = cfg.pretrain.init_from
    if source in ("none", "champion"):
        return None
    if not Path(source).is_file():
        from encoderflow.errors import EncoderflowError

        raise EncoderflowError(
            f"pretrain.init_from={source}: no such file",
            fix="give the path of an encoder.keras that exists (every worker must read it), or none",
        )
    return source


def download(role: str, params: Mapping[str, Any]) -> Dataset:
    """One role's data: the guide's dataset (pinned download or offline folder) or your own folder."""
    from encoderflow.data import inputs

    setup_logging()
    return compact(inputs.get(role, from_params(params), Sources.from_params(params)))


def validate(info: Dataset, params: Mapping[str, Any], run_id: str) -> Dataset:
    """Raises ``ValidationFailed`` (one line per failed expectation) on bad data.

    Exact genuine row counts apply to the pinned official archives only (``info["pinned"]``):
    a mirror re-pack, an offline folder or your own data is checked with its declared or loose
    bounds. Labeled data leaves with its label set (``labels``), read from train.
    """
    from encoderflow.data import inputs, validation

    setup_logging()
    inputs.check_recorded(info)
    docs = layout.run_dir(run_id) / "data_docs" / info["role"]
    # validation logs each file it read (rows, result) and the Data Docs it wrote: not repeated here.
    report = validation.check(info, docs, inputs_cfg=from_params(params).inputs)
    if report["labels"] is not None:
        log.info("validate %s: %d classes %s (from train)", info["role"], len(report["labels"]), report["labels"])
    rows = {m: f["rows"] for m, f in report["files"].items()}
    return {
        **info,
        **({"labels": report["labels"]} if report["labels"] is not None else {}),
        "validation": {
            "success": report["success"],
            "strict": report["strict"],
            "docs": report["docs"],
            "rows": rows if "files" in info else {},  # a large corpus's are in validation.json beside docs
            "total_rows": sum(rows.values()),
        },
    }


def prepare_vocab(corpus: Dataset, vocab: Dataset, params: Mapping[str, Any], run_id: str) -> Dataset:
    """The vocabulary this run tokenizes with: the validated BERT one, or one trained on the corpus
    (``inputs.vocab=trained``), validated by the same suite and recorded with its sha256."""
    from encoderflow.data import inputs, tokenizer

    setup_logging()
    cfg = from_params(params)
    if cfg.inputs.vocab != "trained":
        log.info("prepare_vocab: the BERT vocabulary %s", only_file(vocab)["path"])
        return vocab
    train = inputs.corpus_texts(corpus, cfg)["train"]
    path = tokenizer.train_vocabulary(
        train["path"], train["sha256"], cfg.inputs, cfg.data.lowercase, cfg.data.strip_accents
    )
    info = {
        **vocab,
        "root": str(path.parent),
        "files": {"vocab.txt": {"path": str(path), "bytes": path.stat().st_size, "sha256": layout.sha256_file(path)}},
    }
    # content_hash stays download_vocab's: the lineage of a trained vocabulary is the corpus's hash and the
    # config's, which check_lineage compares before it exists; the file's own sha256 is in ``files``.
    _output("prepare_vocab", "vocab", str(path), info["files"]["vocab.txt"]["sha256"])
    return validate(info, params, run_id)


SHARED_PLAN_KEYS = ("shards_dir", "shards_hash", "vocab_path", "vocab_sha256")


def plan_shards(
    corpus: Dataset, vocab: Dataset, params: Mapping[str, Any], labeled: Dataset | None = None
) -> list[dict[str, Any]]:
    """One self-contained spec per shard: the list a mapped ``build_shard`` expands over.

    ``labeled`` is read only with ``data.task_adaptive`` (its train texts join the corpus)."""
    from encoderflow.data import shards

    setup_logging()
    plan = shards.plan(from_params(params), corpus, vocab, labeled)
    return [{**shard, **{k: plan[k] for k in SHARED_PLAN_KEYS}} for shard in plan["shards"]]


def build_shard(shard: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    from encoderflow.data import shards

    setup_logging()
    _inputs("build_shard", text=shard["text_path"], vocab=shard["vocab_path"])
    built = shards.build_shard(shard, from_params(params), shard["vocab_path"], shard["vocab_sha256"])
    _output("build_shard", "file", shard["file"], built["sha256"])
    return built


def seal_shards(planned: list[dict[str, Any]], params: Mapping[str, Any]) -> Sealed:
    from encoderflow.data import shards

    setup_logging()
    plan = {**{k: planned[0][k] for k in SHARED_PLAN_KEYS}, "shards": planned}
    sealed = shards.seal(plan, from_params(params))
    _output("seal_shards", "manifest", sealed["manifest"], sealed["manifest_sha256"])
    return sealed


def train_baseline(labeled: Dataset, params: Mapping[str, Any], run_id: str) -> Baseline:
    from encoderflow.train.baseline import train_baseline as fit

    setup_logging()
    out = layout.run_dir(run_id) / "baseline"
    _inputs("train_baseline", train=split_path(labeled, "train"), dev=split_path(labeled, "dev"))
    result = fit(from_params(params), labeled, out)
    _output("train_baseline", "result", str(out / "result.json"), layout.sha256_file(out / "result.json"))
    return {"baseline_val_accuracy": result["baseline_val_accuracy"], "result": str(out / "result.json")}


# In a run's pretrain folder: the shard set it pretrains on.
SHARDS_RECORD = "shards.json"


def pretrain(sealed: Sealed, params: Mapping[str, Any], run_id: str) -> Pretrained:
    from encoderflow.train.pretrain import pretrain as fit

    setup_logging()
    out = layout.run_dir(run_id) / "pretrain"
    cfg = from_params(params)
    if skipped := _not_read(cfg, out):
        return skipped
    init = _init_encoder(cfg, out)
    _inputs("pretrain", manifest=sealed["manifest"], **({"init_from": init["path"]} if init else {}))
    # Which shard set this run reads, before it reads it: `encoderflow prune` keeps it while the run is kept.
    layout.write_json(
        out / SHARDS_RECORD, {"manifest": sealed["manifest"], "manifest_sha256": sealed["manifest_sha256"]}
    )
    result = fit(cfg, sealed["manifest"], out, init, earlier_runs=not RunOptions.from_params(params).force)
    _output("pretrain", "encoder", result["encoder"], result["encoder_sha256"])
    return {
        **_reused(result),
        "encoder": result["encoder"],
        "encoder_sha256": result["encoder_sha256"],
        "mlm_val_accuracy": result["mlm_val_accuracy"],
        "result": str(out / "result.json"),
        "parent": (init.get("version") or init["path"]) if init else None,
        "init_sha256": (result.get("config") or {}).get("init"),
        **({"vocab_sha256": result["vocab_sha256"]} if "vocab_sha256" in result else {}),
    }


def _warm_parent(cfg, pretrained: Pretrained, finetuned: Finetuned) -> str | None:
    """The champion version this run's warm start began from, if it began from one."""
    if cfg.finetune.init_from == "champion" and finetuned.get("parent"):
        return str(finetuned["parent"])
    if cfg.pretrain.init_from == "champion" and pretrained.get("parent"):
        return str(pretrained["parent"])
    return None


def _init_sha256(pretrained: Pretrained) -> str | None:
    """The sha256 of the encoder pretraining began from, as it read it: from its result.json for a
    result passed on before ``init_sha256`` was (every result since warm starts records it)."""
    if "init_sha256" in pretrained:
        return pretrained["init_sha256"]
    recorded = layout.read_json_or_none(pretrained["result"]) or {}
    return (recorded.get("config") or {}).get("init")


def _reused(result: dict[str, Any]) -> dict[str, str]:
    """The run folder a stage's result was copied from (``adopt_earlier``), when it was."""
    return {"reused_from": Path(result["reused_from"]).parents[1].name} if result.get("reused_from") else {}


def _not_read(cfg, out: Path) -> Pretrained | None:
    """What pretrain hands on when fine-tuning will not read its encoder (``finetune.init_from=champion``
    with a champion: fine-tuning continues that classifier), else None. Pretraining it anyway cost hours on
    the guide preset whenever no earlier run's result was there to reuse (``--force``, a pruned folder)."""
    if cfg.finetune.init_from != "champion":
        return None
    from encoderflow import registry

    name = cfg.gate.registered_model
    if (champ := registry.champion(name)) is None:
        return None  # finetune then fine-tunes a new classifier on this run's encoder
    why = (
        f"finetune.init_from=champion: fine-tuning continues champion v{champ['version']} of {name} "
        "(its classifier and fine-tuned encoder), so it would not read an encoder pretrained here"
    )
    result = {
        "skipped": why,
        "champion_version": champ["version"],
        "history": {},
        "seconds": 0.0,
        "device": None,
        "dtype_policy": None,
        "code_hash": layout.code_hash(),
    }
    path = layout.write_json(out / "result.json", result)
    log.info("pretrain: not run: %s; this run has no mlm_val_accuracy (finetune.init_from=none pretrains)", why)
    return {
        "encoder": "",
        "encoder_sha256": "",
        "mlm_val_accuracy": None,
        "result": str(path),
        "parent": None,
        "init_sha256": None,
        "skipped": why,
    }


def _init_encoder(cfg, out: Path) -> dict[str, Any] | None:
    """``pretrain.init_from`` resolved: None (random), the champion's bundle encoder, or a given path."""
    source = cfg.pretrain.init_from
    if source == "none":
        return None
    if path := _given_encoder(cfg):
        return {"label": "path", "path": path}
    from encoderflow import bundle, registry

    name = cfg.gate.registered_model
    champ = registry.champion(name)
    if champ is None:
        log.info(
            "pretrain: pretrain.init_from=champion, but %s has no champion yet: starting from random weights", name
        )
        return None
    folder = registry.download_version(name, champ["version"], out / "init")
    meta = bundle.metadata(folder)
    return {
        "label": f"champion v{champ['version']}",
        "path": str(folder / bundle.ENCODER),
        "version": champ["version"],
        "vocab_sha256": meta["files"][bundle.VOCAB],
    }


def finetune(
    pretrained: Pretrained, labeled: Dataset, vocab: Dataset, params: Mapping[str, Any], run_id: str
) -> Finetuned:
    from encoderflow.train.finetune import finetune as fit

    setup_logging()
    cfg = from_params(params)
    out = layout.run_dir(run_id) / "finetune"
    vocab_file = only_file(vocab)
    vocab_path = vocab_file["path"]
    init = _init_classifier(cfg, labeled, vocab_file["sha256"], out)
    from encoderflow.errors import EncoderflowError

    if not init and pretrained.get("skipped"):
        raise EncoderflowError(
            f"finetune: pretrain did not run ({pretrained['skipped']}), but "
            f"{cfg.gate.registered_model} has no champion now (demoted since): there is no encoder to fine-tune",
            fix="clear pretrain with its downstream tasks: it pretrains an encoder now that there is no champion",
        )
    if init and pretrained.get("encoder"):  # a champion that came after pretrain looked for one
        log.info("finetune: the encoder pretrain wrote (%s) is not used", pretrained["encoder"])
    encoder = init["encoder"] if init else pretrained["encoder"]
    pretrained_on = pretrained.get("vocab_sha256")
    if not init and layout.sha256_file(encoder) != pretrained["encoder_sha256"]:
        raise EncoderflowError(
            f"finetune: {encoder} is not the encoder pretrain wrote (sha256 {pretrained['encoder_sha256']}): "
            "altered since",
            fix="clear pretrain with its downstream tasks: it trains an altered encoder again",
        )
    if not init and pretrained_on and pretrained_on != vocab_file["sha256"]:
        # Same size, other tokens: the encoder's embeddings would be read under the wrong words, silently.
        raise EncoderflowError(
            f"finetune: the encoder {encoder} was pretrained on vocabulary sha256 {pretrained_on}, "
            f"this run tokenizes with {vocab_path} (sha256 {vocab_file['sha256']})",
            fix="fine-tune with the vocabulary the encoder was pretrained with (the same prepare_vocab result)",
        )
    _inputs("finetune", encoder=encoder, train=split_path(labeled, "train"), vocab=vocab_path)
    result = fit(
        cfg,
        encoder,
        labeled,
        vocab_path,
        out,
        init_classifier=init["classifier"] if init else None,
        earlier_runs=not RunOptions.from_params(params).force,
    )
    from encoderflow.bundle import identity

    _output("finetune", "bundle", result["bundle"], identity(result["bundle"]))  # the registry's bundle.sha256
    return {
        **_reused(result),
        "bundle": result["bundle"],
        "val_accuracy": result["val_accuracy"],
        "result": str(out / "result.json"),
        "parent": init["version"] if init else None,
    }


def _init_classifier(cfg, labeled: Dataset, vocab_sha256: str, out: Path) -> dict[str, Any] | None:
    """``finetune.init_from=champion`` resolved: the champion bundle's classifier and the encoder it came from,
    after checking that its labels, vocabulary and sequence length are this run's; None for ``none``."""
    if cfg.finetune.init_from == "none":
        return None
    from encoderflow import bundle, registry
    from encoderflow.data.inputs import labels_of
    from encoderflow.errors import EncoderflowError

    name = cfg.gate.registered_model
    champ = registry.champion(name)
    if champ is None:
        log.info("finetune: finetune.init_from=champion, but %s has no champion yet: a new classifier", name)
        return None
    folder = registry.download_version(name, champ["version"], out / "init")
    meta = bundle.metadata(folder)
    mine = {"labels": labels_of(labeled), "vocabulary sha256": vocab_sha256, "sequence length": cfg.data.seq_length}
    theirs = {
        "labels": bundle.labels_of(meta),
        "vocabulary sha256": meta["files"][bundle.VOCAB],
        "sequence length": meta["seq_length"],
    }
    for what in mine:
        if mine[what] != theirs[what]:
            raise EncoderflowError(
                f"finetune.init_from=champion: champion v{champ['version']} of {name} has {what} {theirs[what]}, "
                f"this run has {mine[what]}",
                fix="set finetune.init_from=none to fine-tune a new classifier on this run's encoder",
            )
    log.info(
        "finetune: warm start from finetune.init_from=champion v%s (its classifier, fine-tuned encoder and head)",
        champ["version"],
    )
    return {
        "version": champ["version"],
        "classifier": str(folder / bundle.CLASSIFIER),
        "encoder": str(folder / bundle.ENCODER),
    }


def evaluate_and_gate(
    finetuned: Finetuned, baseline: Baseline, labeled: Dataset, params: Mapping[str, Any], run_id: str
) -> dict[str, Any]:
    """Score candidate and champion on this run's dev data, bootstrap their intervals, decide, write ``gate.json``.

    Both bundles are scored here, by the same :class:`~encoderflow.bundle.Scorer` on the same dev
    file, so their per-sentence results pair up sentence for sentence (fine-tuning's own
    evaluation batches by length and does not keep the order). The baseline's come from its
    ``result.json``. The decision's numbers are the metrics of record (``val_accuracy``, this
    scoring's, not fine-tuning's, which was measured on its own device; ``baseline_val_accuracy``;
    the re-evaluated ``champion_val_accuracy``); the intervals are computed around the per-sentence
    scores.
    """
    import numpy as np

    from encoderflow import gate, registry
    from encoderflow.bundle import Scorer, content_identity, identity
    from encoderflow.data.inputs import read_labeled

    setup_logging()
    cfg = from_params(params)
    gate_json = layout.run_dir(run_id) / "gate.json"
    candidate = identity(finetuned["bundle"])
    if (kept := _decided(gate_json, candidate, cfg.gate.registered_model, run_id)) is not None:
        return kept
    dev = split_path(labeled, "dev")
    sentences, labels = read_labeled(labeled, "dev")
    candidate_correct = Scorer(finetuned["bundle"]).correct(sentences, labels)
    # The gate's val_accuracy is its own score, as the champion's is: fine-tuning's was measured where it
    # ran (on the stack a GPU worker, in bfloat16), this one here, and a sentence at 0.5 can round either way.
    candidate_acc = float(candidate_correct.mean())
    if candidate_acc == finetuned["val_accuracy"]:
        log.info("gate: candidate %s scored on %s: val_accuracy %.4f", finetuned["bundle"], dev, candidate_acc)
    else:
        ran = layout.read_json(finetuned["result"])
        log.info(
            "gate: candidate %s scored on %s: val_accuracy %.4f (%d of %d sentences) here, where the champion "
            "is re-evaluated; fine-tuning measured %.4f on %s (%s): the gate and the registry take this one",
            finetuned["bundle"],
            dev,
            candidate_acc,
            int(candidate_correct.sum()),
            len(labels),
            finetuned["val_accuracy"],
            ran.get("device", "its device"),
            ran.get("dtype_policy", "its dtype policy"),
        )
    current = registry.champion(cfg.gate.registered_model)
    champion_acc = champion_correct = None
    if current is not None:
        bundle = registry.fetch_verified(cfg.gate.registered_model, current["version"], _champion_dir(run_id, current))
        champion = Scorer(bundle)
        _same_task("gate", current["version"], cfg.gate.registered_model, champion.labels, labeled)
        champion_correct = champion.correct(sentences, labels)
        champion_acc = float(champion_correct.mean())
        log.info("gate: champion v%s re-evaluated on %s: accuracy %.4f", current["version"], dev, champion_acc)
    intervals = gate.bootstrap(
        candidate_correct,
        champion_correct,
        _baseline_correct(baseline, labeled, len(labels)),
        resamples=cfg.gate.bootstrap_resamples,
        seed=cfg.data.seed,
    )
    champion_version = current["version"] if current else None
    decision = gate.decide(
        candidate_acc,
        baseline["baseline_val_accuracy"],
        champion_acc,
        cfg.gate,
        champion_version=champion_version,
        intervals=intervals,
        majority=float(np.bincount(labels).max() / len(labels)),
        model=gate.model_check(
            registry.versions_of_model(cfg.gate.registered_model, candidate, content_identity(finetuned["bundle"])),
            champion_version,
        ),
    )
    for line in decision.table().splitlines():
        log.info("%s", line)
    decided = {**decision.to_dict(), "settings_hash": cfg.promotion_hash()}
    path = layout.write_json(gate_json, {**decided, "candidate_bundle_sha256": candidate})
    _output("evaluate_and_gate", "gate_json", str(path), layout.sha256_file(path))
    return {**decided, "gate_json": str(path)}


def val_accuracy(finetuned: Finetuned, decision: Mapping[str, Any]) -> float:
    """The candidate's metric of record: the gate's score of it (:func:`evaluate_and_gate`), measured as
    the champion's was; fine-tuning's own where the gate recorded none."""
    return decision["candidate"] if decision.get("candidate") is not None else finetuned["val_accuracy"]


def _decided(gate_json: Path, candidate: str, name: str, run_id: str) -> dict[str, Any] | None:
    """The decision this run made on this same candidate and registered, when a cleared gate runs
    again: once registered (and maybe champion), gating it again would compare it with itself and
    rewrite a ``gate.json`` its model version's tags no longer match."""
    from encoderflow import registry

    if not gate_json.exists():
        return None
    decision = layout.read_json(gate_json)
    if decision.get("candidate_bundle_sha256") != candidate:
        return None
    if (version := registry.registered_for_run(name, run_id, bundle_sha256=candidate)) is None:
        return None
    current = registry.champion(name)
    now = current["version"] if current else None
    stale = (
        decision.get("blessed")
        and now not in (decision.get("champion_version"), version["version"])
        and not registry.promoted_from(name, decision.get("champion_version"), version["version"])
    )
    if stale:
        # promote failed StaleChampion (blessed, never champion): its fix is this clear, and the decision
        # must be made again. A decision that was carried out, or a rejection, is this run's history: a
        # later champion does not rewrite it.
        was = decision.get("champion_version")
        log.info(
            "gate: the champion moved since this run's blessing (from %s to v%s) and its model never became "
            "champion: gating again",
            f"v{was}" if was is not None else "none",
            now,
        )
        return None
    log.info(
        "gate: this candidate is registered already, as %s v%s, under the decision in %s: kept (set force "
        "and trigger a new run to gate again)",
        name,
        version["version"],
        gate_json,
    )
    decision.pop("candidate_bundle_sha256")
    return {**decision, "gate_json": str(gate_json)}


def _baseline_correct(baseline: Baseline, labeled: Dataset, sentences: int):
    """The baseline's per-sentence dev correctness from its ``result.json``, or None (logged why)."""
    from encoderflow import gate

    path = baseline["result"]
    result = layout.read_json(path)
    if "dev_correct" not in result:
        log.info(
            "gate: %s records no per-sentence dev predictions (written before they were): no baseline interval", path
        )
        return None
    dev = split_info(labeled, "dev")
    correct = gate.correctness_from_text(result["dev_correct"])
    if result.get("dev_sha256") != dev["sha256"] or correct.size != sentences:
        log.warning(
            "gate: %s was scored on another dev file (sha256 %s, %d sentences) than %s (sha256 %s, %d sentences): "
            "no baseline interval; re-run train_baseline to pair them",
            path,
            result.get("dev_sha256"),
            correct.size,
            dev["path"],
            dev["sha256"],
            sentences,
        )
        return None
    return correct


def promote(
    decision: dict[str, Any],
    finetuned: Finetuned,
    pretrained: Pretrained,
    baseline: Baseline,
    sealed: Sealed,
    inputs: dict[str, Dataset],
    params: Mapping[str, Any],
    lineage: dict[str, str],
) -> dict[str, Any]:
    """Register the candidate (always) and move ``champion`` only when blessed."""
    from encoderflow import curves, registry

    setup_logging()
    cfg = from_params(params)
    run_id = lineage.get("airflow.run_id", "manual")
    stages = (("pretrain", pretrained), ("finetune", finetuned))
    tags = {
        **lineage,
        # The encoder pretraining began from as it read it: the file at init_from's path may have
        # changed since (a newer latest/encoder.keras), or gone.
        **lineage_tags(cfg, inputs, _init_sha256(pretrained), _warm_parent(cfg, pretrained, finetuned)),
        "config.preset": cfg.preset,
        "shards.manifest_sha256": sealed["manifest_sha256"],
        "shards.hash": sealed["shards_hash"],
        **{f"data.{name}.source": info["source"] for name, info in inputs.items()},
        **_labels_tag(inputs["labeled"]),
        **({"lineage.parent": str(pretrained["parent"])} if pretrained.get("parent") else {}),
        **({"lineage.finetune_parent": str(finetuned["parent"])} if finetuned.get("parent") else {}),
        **{f"{stage}.reused_from": res["reused_from"] for stage, res in stages if res.get("reused_from")},
    }
    histories = {
        stage: layout.read_json(res["result"]).get("history", {})
        for stage, res in (("pretrain", pretrained), ("finetune", finetuned), ("baseline", baseline))
    }
    curves_png = curves.plot(histories, layout.run_dir(run_id) / "curves.png", title=f"{cfg.preset} · {run_id}")
    metrics = {
        "val_accuracy": val_accuracy(finetuned, decision),
        "baseline_val_accuracy": baseline["baseline_val_accuracy"],
        "mlm_val_accuracy": pretrained["mlm_val_accuracy"],
    }
    if decision.get("champion") is not None:
        metrics["champion_val_accuracy"] = decision["champion"]
    _inputs("promote", bundle=finetuned["bundle"])
    _decided_for(decision, finetuned["bundle"])
    registered = registry.log_candidate(
        cfg.gate.registered_model,
        finetuned["bundle"],
        cfg.to_dict(),
        metrics,
        histories,
        tags,
        decision,
        extra_artifacts=[curves_png],
    )
    name = cfg.gate.registered_model
    # What this run registered, before the champion moves: a promote that fails after registering (a
    # stale champion) left a version `encoderflow runs` and the runs page called "not registered".
    layout.write_json(layout.run_dir(run_id) / layout.REGISTERED_FILE, {"registered_model": name, **registered})
    promoted = None
    current = registry.champion(name)
    if decision["blessed"] and _carried_out(name, decision, registered["version"], current):
        # An old run's tasks cleared after later champions: its blessing made this version champion
        # then, and moving the alias back now would undo every promotion since.
        log.info(
            "promote: %s v%s was made champion by this blessing before; the champion has moved on since (now "
            "v%s): nothing moves",
            name,
            registered["version"],
            current["version"] if current else None,
        )
    elif decision["blessed"]:
        promoted = _move_blessed(name, registered["version"], decision, run_id, lineage.get("airflow.triggered_by"))
    else:
        log.info(
            "promote: not blessed, champion stays at v%s: %s",
            decision.get("champion_version"),
            "; ".join(decision["reasons"]),
        )
    current = registry.champion(name)
    log.info(
        "promote output: models:/%s/%s at %s (champion v%s)",
        name,
        registered["version"],
        registered.get("tracking_uri") or registry.tracking_uri(),
        current["version"] if current else None,
    )
    return {
        **registered,
        "blessed": decision["blessed"],
        "promoted": promoted,
        "champion_version": current["version"] if current else None,
        "registered_model": name,
    }


def _move_blessed(name: str, version: str, decision: Mapping[str, Any], run_id: str, who: str | None) -> dict[str, Any]:
    """Make the blessed, registered ``version`` champion if the champion is still the one the gate
    judged it against; the move records who started the run (``who``) and the gate's run.

    Raises:
        StaleChampion: the champion moved since the gate; ``version`` stays registered, tagged with why
            it is not champion (``gate.blessed`` alone read as a champion that never was).
    """
    from encoderflow import registry

    try:
        return registry.move_champion(
            name,
            version,
            expected=decision.get("champion_version"),
            reason=f"gate blessed run {run_id}",
            who=who or "airflow",
        )
    except registry.StaleChampion as exc:
        said = f"{name} v{version} registered, not champion: {exc.message.removeprefix(f'{name}: ')}"
        registry.not_promoted(name, version, said)
        raise registry.StaleChampion(said, fix=exc.fix) from None


def _carried_out(name: str, decision: Mapping[str, Any], version: str, current: Mapping[str, Any] | None) -> bool:
    """Whether this blessing of ``version`` was carried out already (the champion moved from the one it
    was judged against to ``version``) and the champion has moved on since."""
    from encoderflow import registry

    moved_on = current is None or current["version"] != str(version)
    return moved_on and registry.promoted_from(name, decision.get("champion_version"), version)


def _decided_for(decision: dict[str, Any], candidate: str) -> None:
    """Refuse to register a candidate under a decision the gate made about another one: ``finetune``
    cleared and trained again after the gate, and ``promote`` cleared alone.

    Raises:
        EncoderflowError: ``gate.json`` names another bundle than ``candidate``'s.
    """
    from encoderflow.bundle import identity
    from encoderflow.errors import EncoderflowError

    gate_json = decision.get("gate_json")
    if gate_json is None or not Path(gate_json).exists():
        return
    decided = layout.read_json(gate_json).get("candidate_bundle_sha256")
    if decided is not None and decided != (mine := identity(candidate)):
        raise EncoderflowError(
            f"promote: the gate decided about another candidate (bundle sha256 {decided[:12]}, {gate_json}) than "
            f"{candidate} ({mine[:12]}): fine-tuning ran again after the gate",
            fix="clear evaluate_and_gate with its downstream tasks, so the gate decides about this candidate",
        )


def lineage_tags(
    cfg, inputs: Mapping[str, Dataset], init_sha256: str | None = None, starts_from: str | None = None
) -> dict[str, str]:
    """What a model is a function of: each dataset's content hash, the config's training hash
    (:meth:`~encoderflow.config.Config.training_hash`) and the code's hash; for a warm start from the
    champion (``*.init_from=champion``), the version it starts from (``starts_from``).

    Recorded on every model version; a run whose lineage equals the champion's would train the same
    model again (same seed, same shards), so :func:`check_lineage` skips it. A ``pretrain.init_from``
    path counts by its encoder's sha256: another encoder copied over it is a change (it was skipped as
    "nothing changed"), and the same encoder at another path is none. So does the champion a warm start
    continues: v3, continued from v2, was "nothing changed" for a run that would continue v3 itself."""
    if cfg.pretrain.init_from in ("none", "champion"):
        init_sha256 = None
    elif init_sha256 is None:  # before training: the file as it is now
        init_sha256 = layout.sha256_file(_given_encoder(cfg))
    warm = "champion" in (cfg.pretrain.init_from, cfg.finetune.init_from)
    return {
        **{f"data.{name}.content_hash": info["content_hash"] for name, info in sorted(inputs.items())},
        "config.training_hash": cfg.training_hash(init_sha256),
        "code.hash": layout.code_hash(),
        **({STARTS_FROM_TAG: str(starts_from)} if warm and starts_from is not None else {}),
    }


# The champion version a warm start (*.init_from=champion) began from: part of the model's lineage.
STARTS_FROM_TAG = "lineage.starts_from"


# A model version's label set, as a tag: check_lineage refuses another task's data before training.
LABELS_TAG = "data.labeled.labels"


def _labels_tag(labeled: Dataset) -> dict[str, str]:
    from encoderflow.data.inputs import labels_of

    value = json.dumps(labels_of(labeled))
    return {LABELS_TAG: value} if len(value) <= 4000 else {}  # MLflow caps a tag's value; the gate checks anyway


def _same_task(step: str, version: str, name: str, theirs: list[str], labeled: Dataset) -> None:
    """Refuse labeled data whose label set is not the champion's: another task, not a better model.

    No labels read (a missing label column) is validation's to report, with the file's columns.
    """
    from encoderflow.data.inputs import labels_of
    from encoderflow.errors import EncoderflowError

    if (mine := labels_of(labeled)) and list(theirs) != mine:
        train = split_info(labeled, "train")
        raise EncoderflowError(
            f"{step}: champion v{version} of {name} classifies labels {list(theirs)}, this run's labeled data "
            f"{train.get('origin') or train['path']} has {mine}: they are different tasks",
            fix="if they are the same labels written another way, correct the file; if the task is another, "
            "give it a registered model of its own with gate.registered_model=<name>",
        )


# The model settings a weight's shape depends on: an encoder warm-started from (pretrain.init_from) must share them.
SHAPE_SETTINGS = ("num_layers", "model_dim", "intermediate_dim", "num_heads", "normalize_first")


def _warm_starts_fit(cfg, folder: Path, version: str, vocab: Dataset) -> None:
    """Refuse, before anything trains, a warm start from the champion its model settings or vocabulary do
    not fit.

    ``finetune.init_from=champion`` continues the champion's classifier as it is: a run with other
    ``model.*`` or ``finetune.pooling`` settings (another preset) registered a model its recorded config
    did not describe. ``pretrain.init_from=champion`` copies its encoder's weights: other shapes failed
    only at pretrain, after validation, the baseline and the shards. Another vocabulary (the same size,
    other words) failed there too; a trained one (``inputs.vocab=trained``) is not known before
    ``prepare_vocab``, and pretrain and finetune still compare it.
    """
    from encoderflow import bundle
    from encoderflow.errors import EncoderflowError

    meta = bundle.metadata(folder)
    warm = [
        k for k in ("finetune.init_from", "pretrain.init_from") if getattr(cfg, k.split(".")[0]).init_from == "champion"
    ]
    files = vocab.get("files") or {}
    if warm and cfg.inputs.vocab != "trained" and len(files) == 1:
        mine_vocab, theirs_vocab = next(iter(files.values())), meta["files"].get(bundle.VOCAB)
        if theirs_vocab and theirs_vocab != mine_vocab["sha256"]:
            trained = ((meta.get("config") or {}).get("inputs") or {}).get("vocab") == "trained"
            raise EncoderflowError(
                f"{' and '.join(f'{k}=champion' for k in warm)}: champion v{version} of {cfg.gate.registered_model} "
                f"tokenizes with {'a vocabulary trained on its corpus' if trained else 'another vocabulary'} "
                f"(sha256 {theirs_vocab}), this run's {mine_vocab['path']} has sha256 {mine_vocab['sha256']}: its "
                "embeddings would be read under other words",
                fix=(
                    "--set inputs.vocab=trained with the champion's corpus"
                    if trained
                    else f"give this run the vocabulary the champion was trained with (a copy: {folder / bundle.VOCAB})"
                )
                + f", or {' and '.join(f'{k}=none' for k in warm)}",
            )
    theirs = meta.get("config") or {}
    if not theirs.get("model"):
        return  # a bundle without its config: pretrain and finetune still check the shapes they load
    mine = cfg.to_dict()
    checks = []
    if cfg.finetune.init_from == "champion":
        keys = [f"model.{k}" for k in mine["model"]] + ["finetune.pooling", "data.seq_length"]
        how = "continues its classifier as it is, so the model it registers would not be the one its config describes"
        checks.append(("finetune.init_from=champion", how, keys, "finetune.init_from"))
    if cfg.pretrain.init_from == "champion":
        keys = [f"model.{k}" for k in SHAPE_SETTINGS] + ["data.seq_length"]  # its position embedding's
        how = "copies its encoder's weights, which do not fit this config's layers"
        checks.append(("pretrain.init_from=champion", how, keys, "pretrain.init_from"))
    for label, how, keys, knob in checks:
        differ = []
        for key in keys:
            section, name = key.split(".")
            if name in (theirs.get(section) or {}) and theirs[section][name] != mine[section][name]:
                differ.append((key, theirs[section][name], mine[section][name]))
        if differ:
            said = ", ".join(f"{k} {t!r} (this run {m!r})" for k, t, m in differ)
            fix_set = " ".join(set_item(k, t) for k, t, _ in differ)
            raise EncoderflowError(
                f"{label}: champion v{version} of {cfg.gate.registered_model} was built with {said}; this run {how}",
                fix=f"use the champion's settings (--set {fix_set}), or {knob}=none",
            )


def _champion_dir(run_id: str, champ: Mapping[str, Any]) -> Path:
    """Where a run keeps the champion's bundle: fetched and verified by check_lineage, scored by the gate."""
    return layout.run_dir(run_id) / "champion" / f"v{champ['version']}"


def _changed_settings(cfg, champ: Mapping[str, Any]) -> str:
    """The training settings in which this run's config differs from the one the champion's MLflow run
    logged (its params), by name: the hash alone told a person nothing."""
    from encoderflow import registry
    from encoderflow.config import knobs, param_text

    try:
        params = registry.client().get_run(champ["run_id"]).data.params
    except Exception as exc:  # noqa: BLE001 - a detail of a log line: the run trains either way
        return f"the champion's settings could not be read: {type(exc).__name__}"
    diffs = []
    for k in knobs():
        mine = getattr(getattr(cfg, k.section), k.name)
        # Champions logged before 2026-12-07 spell booleans True/False.
        if k.in_lineage and (theirs := params.get(k.key)) is not None and theirs not in (str(mine), param_text(mine)):
            diffs.append(f"{k.key} {theirs} -> {mine}")
    if not diffs and cfg.pretrain.init_from.startswith("/"):
        return (
            f"the encoder at pretrain.init_from={cfg.pretrain.init_from}, by its sha256: other bytes than the "
            "champion began from, or a champion registered before 2026-12-07, whose lineage recorded the path"
        )
    return "; ".join(diffs) or "settings the champion's run did not log"


def check_lineage(inputs: Mapping[str, Dataset], params: Mapping[str, Any], run_id: str) -> bool:
    """True when this run must train: force, no champion yet, or a lineage value that differs from the
    champion's and from every version the gate rejected against this champion under these gate and
    baseline settings (the same candidate would be rejected again). False writes the run's
    ``summary.json`` saying why; the DAG's short-circuit then skips every task after this one."""
    from encoderflow import registry

    setup_logging()
    cfg = from_params(params)
    registry.check_store_in_place()
    champ = registry.champion(cfg.gate.registered_model)
    mine = lineage_tags(cfg, inputs, starts_from=champ["version"] if champ else None)
    if champ is not None and (theirs := champ["tags"].get(LABELS_TAG)) is not None:  # older versions: the gate checks
        _same_task("check_lineage", champ["version"], cfg.gate.registered_model, json.loads(theirs), inputs["labeled"])
    if champ is None:
        log.info("check_lineage: no champion of %s yet: training", cfg.gate.registered_model)
        return True
    changed = [k for k, v in mine.items() if champ["tags"].get(k) != v]
    force = RunOptions.from_params(params).force
    rejected = (
        None
        if force or not changed
        else registry.rejected_under(cfg.gate.registered_model, mine, champ["version"], cfg.promotion_hash())
    )
    if rejected is None and (changed or force):
        # The gate re-scores the champion after training (hours on a GPU): a damaged one fails now.
        folder = registry.fetch_verified(cfg.gate.registered_model, champ["version"], _champion_dir(run_id, champ))
        _warm_starts_fit(cfg, folder, champ["version"], inputs["vocab"])
        if changed:
            began = champ["tags"].get(STARTS_FROM_TAG)
            why = {  # what each changed tag means, asked of MLflow only when that one changed
                "config.training_hash": lambda: f"config.training_hash ({_changed_settings(cfg, champ)})",
                STARTS_FROM_TAG: lambda: (
                    f"{STARTS_FROM_TAG} (this run continues champion v{champ['version']}, which "
                    + (f"began from v{began})" if began else "was not a warm start from a champion)")
                ),
            }
            said = [why[k]() if k in why else k for k in changed]
            log.info("check_lineage: changed since champion v%s: %s; training", champ["version"], ", ".join(said))
        else:
            log.info("check_lineage: force=true: training whatever the champion's lineage")
        return True
    if rejected is None:
        unchanged = {"message": f"nothing changed since champion v{champ['version']}", "basis": CHAMPION_BASIS}
    else:
        # Training would reuse v<rejected>'s model and the gate would judge it as before: same
        # candidate, champion, dev data, seed and gate settings. Only the runs list would grow.
        unchanged = {
            "message": f"nothing changed since v{rejected['version']}, which the gate rejected against champion "
            f"v{champ['version']}",
            "basis": f"data, code and config hashes equal v{rejected['version']}'s, as do the champion and the "
            f"gate.* and baseline.* settings it was judged under; it failed {rejected['reasons']}",
            "rejected_version": rejected["version"],
        }
    try:
        accuracy = float(champ["tags"].get(metric_tag(METRICS["candidate"])))
    except (TypeError, ValueError):
        accuracy = None
    summary = {
        "run_id": run_id,
        "preset": cfg.preset,
        "config_hash": cfg.config_hash(),
        "training_hash": mine["config.training_hash"],
        "unchanged": {"champion_version": champ["version"], **unchanged, "lineage": mine},
        "metrics": {"champion_val_accuracy": accuracy},
        "registry": {"registered_model": cfg.gate.registered_model, "champion_version": champ["version"]},
    }
    path = layout.write_json(layout.run_dir(run_id) / "summary.json", summary)
    log.info(
        "check_lineage: %s; training skipped, %s; summary %s", skipped_text(summary["unchanged"]), FORCE_HINT, path
    )
    return False


def report(run_id: str, params: Mapping[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` in the run folder: metrics, decision, where everything is."""
    setup_logging()
    cfg = from_params(params)
    summary = {
        "run_id": run_id,
        "preset": cfg.preset,
        "config_hash": cfg.config_hash(),
        # The registry's config.training_hash: what matches this summary to a model version.
        "training_hash": cfg.training_hash(_init_sha256(results["pretrained"])),
        "metrics": {
            "baseline_val_accuracy": results["baseline"]["baseline_val_accuracy"],
            "mlm_val_accuracy": results["pretrained"]["mlm_val_accuracy"],
            "val_accuracy": val_accuracy(results["finetuned"], results["decision"]),
            "champion_val_accuracy": results["decision"].get("champion"),
        },
        "runtime": {
            stage: {
                **{
                    k: layout.read_json(res["result"]).get(k)
                    for k in ("device", "dtype_policy", "seconds", "skipped", "resumed_from_step")
                },
                "reused_from": res.get("reused_from"),
            }
            for stage, res in (("pretrain", results["pretrained"]), ("finetune", results["finetuned"]))
        },
        "gate": {
            "blessed": results["decision"]["blessed"],
            "reasons": results["decision"]["reasons"],
            "gate_json": results["decision"]["gate_json"],
        },
        "registry": {
            k: results["promoted"].get(k)
            for k in ("registered_model", "version", "champion_version", "run_id", "tracking_uri", "registered_by")
        },
        "artifacts": {
            "run_dir": str(layout.run_dir(run_id)),
            "shards_manifest": results["sealed"]["manifest"],
            "encoder": results["pretrained"]["encoder"] or None,  # none: pretrain did not run
            "bundle": results["finetuned"]["bundle"],
            "curves": str(layout.run_dir(run_id) / "curves.png"),
            "data_docs": {name: info["validation"]["docs"] for name, info in results["inputs"].items()},
        },
    }
    # JSON has no NaN: a metric that is none (no champion) or not a finite number is null.
    summary["metrics"] = {
        k: v if isinstance(v, (int, float)) and math.isfinite(v) else None for k, v in summary["metrics"].items()
    }
    path = layout.write_json(layout.run_dir(run_id) / "summary.json", summary)
    m, r = summary["metrics"], summary["registry"]
    # The run's outcome in the last task's log, where a reader of the Airflow UI looks for it.
    log.info(
        "report: %s; val_accuracy %s (baseline_val_accuracy %s, champion_val_accuracy %s, mlm_val_accuracy %s); "
        "%s, champion %s",
        "BLESSED" if summary["gate"]["blessed"] else "NOT BLESSED: " + "; ".join(summary["gate"]["reasons"]),
        *(_fmt_metric(m[k]) for k in ("val_accuracy", "baseline_val_accuracy", "champion_val_accuracy")),
        _fmt_metric(m["mlm_val_accuracy"]),
        registered_text(r),
        f"v{r['champion_version']}" if r["champion_version"] else "none",
    )
    _output("report", "summary", str(path), layout.sha256_file(path))
    return {"summary": str(path), **summary["metrics"], "blessed": summary["gate"]["blessed"]}


def registered_text(registry: Mapping[str, Any]) -> str:
    """``encoderflow-sst2 v3 registered``, or, for a candidate a version held already, which run registered it."""
    name, version = registry["registered_model"], registry["version"]
    if by := registry.get("registered_by"):
        return f"{name} v{version} (this model, registered by {by})"
    return f"{name} v{version} registered"


def _fmt_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def check_source(role: str, params: Mapping[str, Any], run_id: str | None = None) -> dict[str, Any]:
    """Fingerprint the role's declared source (``corpus``, ``labeled``) and say whether it changed since the
    last check, which is kept in ``ENCODERFLOW_HOME/sources/<role>.json``. The guide's datasets are pinned:
    nothing to watch.

    Airflow emits the asset event only when the task succeeds, after this has saved the fingerprint:
    a retry within the run that saved it (``run_id``) reports the change again, so a try that died
    in between costs a duplicate event (which ``check_lineage`` absorbs), never a lost one."""
    from datetime import UTC, datetime

    from encoderflow.data import folders

    setup_logging()
    custom = Sources.from_params(params).custom()
    location = custom.get(role)
    if location is None:
        if not custom and training_schedule()[0] == "assets":
            # Nothing to watch at all: a training DAG scheduled on these events never runs.
            log.warning(
                "check_source: ENCODERFLOW_SCHEDULE=assets, but no corpus or labeled data of your own is declared: "
                "the training DAG will not run; fix: set ENCODERFLOW_DATA_FILE (its sources) on every Airflow "
                "component, or schedule on a cron"
            )
        else:
            log.info(
                "check_source: no %s source of your own declared (the guide's pinned dataset): nothing to watch", role
            )
        return {"role": role, "location": None, "changed": False, "fingerprint_sha256": None}
    fingerprint = folders.fingerprint(location, role)
    digest = layout.sha256_json(fingerprint)
    state = layout.home() / "sources" / f"{role}.json"
    previous = layout.read_json(state) if state.exists() else {}
    changed = previous.get("fingerprint_sha256") != digest or previous.get("location") != location
    retried = not changed and run_id is not None and previous.get("run_id") == run_id
    if changed:
        layout.write_json(
            state,
            {
                "location": location,
                "fingerprint_sha256": digest,
                "fingerprint": fingerprint,
                "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "run_id": run_id,
            },
        )
    elif retried:
        log.info("check_source: %s: this run's earlier try saved this fingerprint; its event may be lost", role)
        changed = True
    files = len(fingerprint.get("files", {})) or "manifest"
    log.info(
        "check_source: %s %s (%s files) %s",
        role,
        location,
        files,
        ("changed since the last check" if previous else "seen for the first time") + ": asset event recorded"
        if changed
        else "unchanged since the last check: no event",
    )
    return {"role": role, "location": location, "changed": changed, "fingerprint_sha256": digest}
