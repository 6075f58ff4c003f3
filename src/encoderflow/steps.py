"""One function per DAG task: typed params in, small dicts of paths/hashes/metrics out.

Nothing here imports Airflow; the DAG passes ``params`` and the run id, and each function
rebuilds the same frozen :class:`~encoderflow.config.Config` from them.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from encoderflow import layout
from encoderflow.config import Config, from_overrides, parse_set

log = logging.getLogger("encoderflow")

# DAG param name -> config key. Params left empty (None) keep the preset's value.
PARAM_KEYS = {
    "seed": "data.seed",
    "seq_length": "data.seq_length",
    "num_shards": "data.num_shards",
    "dupe_factor": "data.dupe_factor",
    "pretrain_split": "data.pretrain_split",
    "padding_mask": "model.padding_mask",
    "pretrain_epochs": "pretrain.epochs",
    "pretrain_steps_per_epoch": "pretrain.steps_per_epoch",
    "pretrain_batch_size": "pretrain.batch_size",
    "pretrain_learning_rate": "pretrain.learning_rate",
    "finetune_epochs": "finetune.epochs",
    "finetune_steps_per_epoch": "finetune.steps_per_epoch",
    "finetune_batch_size": "finetune.batch_size",
    "finetune_learning_rate": "finetune.learning_rate",
    "gate_min_accuracy": "gate.min_accuracy",
    "gate_min_gain_over_baseline": "gate.min_gain_over_baseline",
    "gate_max_regression": "gate.max_regression",
}
# Params about where the data comes from, not what is computed.
SOURCE_PARAMS = ("data_dir", "mirror", "sources_file")


def config_from_params(params: Mapping[str, Any]) -> Config:
    """The run's Config: preset, then the typed params, then free-form ``overrides`` strings."""
    overrides: dict[str, Any] = {key: params.get(name) for name, key in PARAM_KEYS.items()}
    overrides.update(parse_set(list(params.get("overrides") or [])))
    return from_overrides(params.get("preset") or "guide", overrides)


def setup_logging() -> None:
    """Quiet the chattiest libraries so task logs show our lines."""
    for name in ("great_expectations", "absl", "mlflow", "alembic", "urllib3", "pooch", "h5py", "jax._src"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("encoderflow").setLevel(logging.INFO)


def _source(params: Mapping[str, Any], name: str) -> str | None:
    value = params.get(name)
    return str(value) if value not in (None, "") else None


def download(dataset: str, params: Mapping[str, Any]) -> dict[str, Any]:
    from encoderflow.data import sources

    setup_logging()
    cfg = config_from_params(params)
    return sources.get_dataset(dataset, cfg.data.pretrain_split, cfg.data.validation_split,
                               data_dir=_source(params, "data_dir"), mirror=_source(params, "mirror"),
                               sources_file=_source(params, "sources_file"))


def validate(info: dict[str, Any], params: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """Raises ``ValidationFailed`` (one line per failed expectation) on bad data."""
    from encoderflow.data import validation

    setup_logging()
    cfg = config_from_params(params)
    docs = layout.run_dir(run_id) / "data_docs" / info["dataset"]
    report = validation.check(info, cfg.preset, docs)
    return {**info, "validation": {"success": report["success"], "docs": report["docs"],
                                   "rows": {m: f["rows"] for m, f in report["files"].items()}}}


SHARED_PLAN_KEYS = ("shards_dir", "shards_hash", "vocab_path", "vocab_sha256")


def plan_shards(wikitext: dict[str, Any], vocab: dict[str, Any], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One self-contained spec per shard: the list a mapped ``build_shard`` expands over."""
    from encoderflow.data import shards

    setup_logging()
    plan = shards.plan(config_from_params(params), wikitext, vocab)
    return [{**shard, **{k: plan[k] for k in SHARED_PLAN_KEYS}} for shard in plan["shards"]]


def build_shard(shard: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    from encoderflow.data import shards

    setup_logging()
    return shards.build_shard(shard, config_from_params(params), shard["vocab_path"], shard["vocab_sha256"])


def seal_shards(planned: list[dict[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
    from encoderflow.data import shards

    setup_logging()
    plan = {**{k: planned[0][k] for k in SHARED_PLAN_KEYS}, "shards": planned}
    return shards.seal(plan, config_from_params(params))


def train_baseline(sst2: dict[str, Any], params: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    from encoderflow.train.baseline import train_baseline as fit

    setup_logging()
    result = fit(config_from_params(params), sst2, layout.run_dir(run_id) / "baseline")
    return {"val_accuracy": result["val_accuracy"], "result": str(layout.run_dir(run_id) / "baseline" / "result.json")}


def pretrain(sealed: dict[str, Any], params: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    from encoderflow.train.pretrain import pretrain as fit

    setup_logging()
    out = layout.run_dir(run_id) / "pretrain"
    result = fit(config_from_params(params), sealed["manifest"], out)
    return {"encoder": result["encoder"], "encoder_sha256": result["encoder_sha256"],
            "val_mlm_accuracy": result["val_mlm_accuracy"], "result": str(out / "result.json")}


def finetune(pretrained: dict[str, Any], sst2: dict[str, Any], vocab: dict[str, Any], params: Mapping[str, Any],
             run_id: str) -> dict[str, Any]:
    from encoderflow.train.finetune import finetune as fit

    setup_logging()
    out = layout.run_dir(run_id) / "finetune"
    vocab_path = next(iter(vocab["files"].values()))["path"]
    result = fit(config_from_params(params), pretrained["encoder"], sst2, vocab_path, out)
    return {"bundle": result["bundle"], "val_accuracy": result["val_accuracy"], "result": str(out / "result.json")}


def evaluate_and_gate(finetuned: dict[str, Any], baseline: dict[str, Any], sst2: dict[str, Any],
                      params: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """Re-evaluate the champion on this run's dev data, decide, write ``gate.json``."""
    from encoderflow import gate, registry

    setup_logging()
    cfg = config_from_params(params)
    current = registry.champion(cfg.gate.registered_model)
    champion_acc = None
    if current is not None:
        from encoderflow.data.sst2 import read_split
        from encoderflow.train.finetune import Scorer

        dst = layout.run_dir(run_id) / "champion" / f"v{current['version']}"
        bundle = registry.download_version(cfg.gate.registered_model, current["version"], dst)
        dev_x, dev_y = read_split(sst2["files"]["SST-2/dev.tsv"]["path"])
        champion_acc = Scorer(bundle).accuracy(dev_x, dev_y)
        log.info("gate: champion v%s re-evaluated on %s: accuracy %.4f", current["version"],
                 sst2["files"]["SST-2/dev.tsv"]["path"], champion_acc)
    decision = gate.decide(finetuned.get("val_accuracy"), baseline.get("val_accuracy"), champion_acc, cfg.gate,
                           champion_version=current["version"] if current else None)
    for line in decision.table().splitlines():
        log.info("%s", line)
    path = layout.write_json(layout.run_dir(run_id) / "gate.json", decision.to_dict())
    return {**decision.to_dict(), "gate_json": str(path)}


def promote(decision: dict[str, Any], finetuned: dict[str, Any], pretrained: dict[str, Any],
            baseline: dict[str, Any], sealed: dict[str, Any], inputs: dict[str, dict[str, Any]],
            params: Mapping[str, Any], lineage: dict[str, str]) -> dict[str, Any]:
    """Register the candidate (always) and move ``champion`` only when blessed."""
    from encoderflow import registry

    setup_logging()
    cfg = config_from_params(params)
    run_id = lineage.get("airflow.run_id", "manual")
    tags = {**lineage,
            "config.hash": cfg.config_hash(),
            "config.preset": cfg.preset,
            "shards.manifest_sha256": sealed["manifest_sha256"],
            "shards.hash": sealed["shards_hash"],
            **{f"data.{name}.content_hash": info["content_hash"] for name, info in inputs.items()},
            **{f"data.{name}.source": info["source"] for name, info in inputs.items()}}
    from encoderflow import curves

    histories = {}
    for stage, res in (("pretrain", pretrained), ("finetune", finetuned), ("baseline", baseline)):
        histories[stage] = layout.read_json(res["result"]).get("history", {})
    curves_png = curves.plot(histories, layout.run_dir(run_id) / "curves.png", title=f"{cfg.preset} · {run_id}")
    metrics = {"sst2_val_accuracy": finetuned["val_accuracy"], "baseline_val_accuracy": baseline["val_accuracy"],
               "mlm_val_accuracy": pretrained["val_mlm_accuracy"]}
    if decision.get("champion") is not None:
        metrics["champion_val_accuracy"] = decision["champion"]
    registered = registry.log_candidate(cfg.gate.registered_model, finetuned["bundle"], cfg.to_dict(), metrics,
                                        histories, tags, decision, extra_artifacts=[curves_png])
    promoted = None
    if decision["blessed"]:
        promoted = registry.move_champion(cfg.gate.registered_model, registered["version"],
                                          expected=decision.get("champion_version"),
                                          reason=f"gate blessed run {run_id}", who="airflow")
    else:
        log.info("promote: not blessed, champion stays at v%s: %s", decision.get("champion_version"),
                 "; ".join(decision["reasons"]))
    current = registry.champion(cfg.gate.registered_model)
    return {**registered, "blessed": decision["blessed"], "promoted": promoted,
            "champion_version": current["version"] if current else None,
            "registered_model": cfg.gate.registered_model}


def report(run_id: str, params: Mapping[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` in the run folder: metrics, decision, where everything is."""
    setup_logging()
    cfg = config_from_params(params)
    summary = {
        "run_id": run_id,
        "preset": cfg.preset,
        "config_hash": cfg.config_hash(),
        "metrics": {
            "baseline_val_accuracy": results["baseline"]["val_accuracy"],
            "mlm_val_accuracy": results["pretrained"]["val_mlm_accuracy"],
            "sst2_val_accuracy": results["finetuned"]["val_accuracy"],
            "champion_val_accuracy": results["decision"].get("champion"),
        },
        "gate": {"blessed": results["decision"]["blessed"], "reasons": results["decision"]["reasons"],
                 "gate_json": results["decision"]["gate_json"]},
        "registry": {k: results["promoted"].get(k) for k in ("registered_model", "version", "champion_version",
                                                              "run_id", "tracking_uri")},
        "artifacts": {
            "run_dir": str(layout.run_dir(run_id)),
            "shards_manifest": results["sealed"]["manifest"],
            "encoder": results["pretrained"]["encoder"],
            "bundle": results["finetuned"]["bundle"],
            "curves": str(layout.run_dir(run_id) / "curves.png"),
            "data_docs": {name: info["validation"]["docs"] for name, info in results["inputs"].items()},
        },
    }
    path = layout.write_json(layout.run_dir(run_id) / "summary.json", summary)
    log.info("report: %s", path)
    return {"summary": str(path), **summary["metrics"], "blessed": summary["gate"]["blessed"]}
