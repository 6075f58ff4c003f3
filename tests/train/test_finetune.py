"""Fine-tuning's pooling and length buckets: each factor of the quality ablation switches on its own."""

from __future__ import annotations

import logging
import os
import re

import pytest

from encoderflow import layout
from encoderflow.config import ConfigError, from_overrides
from encoderflow.data.sources import get_dataset
from tests.fixtures_pipeline import write_tree


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from encoderflow import model as models

    root = tmp_path_factory.mktemp("ft")
    tree = write_tree(root / "data")
    sst2 = get_dataset("sst2", data_dir=str(tree))
    vocab = tree / "bert_vocab_uncased.txt"
    cfg = from_overrides("smoke")
    encoder = models.build_encoder(cfg.model, len(vocab.read_text().splitlines()), cfg.data.seq_length)
    encoder.save(root / "encoder.keras")
    return root / "encoder.keras", sst2, vocab


@pytest.mark.parametrize(
    "overrides, pooling, buckets",
    [
        ({}, "pooled_tokens:MaskedMeanPooling", "on"),
        ({"finetune.pooling": "all_tokens"}, "pooled_tokens:GlobalAveragePooling1D", "off"),
        ({"model.padding_mask": False, "finetune.pooling": "real_tokens"}, "pooled_tokens:MaskedMeanPooling", "off"),
    ],
)
def test_pooling_and_buckets_follow_the_config(inputs, tmp_path, caplog, overrides, pooling, buckets):
    from encoderflow import bundle
    from encoderflow.data.inputs import read_labeled
    from encoderflow.train.finetune import finetune

    encoder, sst2, vocab = inputs
    cfg = from_overrides("smoke", {"finetune.steps_per_epoch": 3, **overrides})
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        result = finetune(cfg, encoder, sst2, vocab, tmp_path)
    assert f"length buckets {buckets}" in caplog.text
    # The shape is in finetune's own log: a run that reused its pretraining has no pretrain line of it.
    assert "finetune: encoder 1 layer of width" in caplog.text
    scorer = bundle.Scorer(result["bundle"])
    layer = scorer.classifier.get_layer("pooled_tokens")
    assert f"{layer.name}:{type(layer).__name__}" == pooling
    # The accuracy recorded is what the bundle scores on the dev split, as the gate scores it (and the
    # champion): the same number, not an approximation of it.
    assert (
        scorer.accuracy(*read_labeled(sst2, "dev"))
        == result["val_accuracy"]
        == bundle.metadata(result["bundle"])["val_accuracy"]
    )
    assert layout.sha256_json(result["config"]) == result["key"] and result["config"]["finetune"]["pooling"] == (
        cfg.finetune.pooling
    )


def test_buckets_on_are_refused_where_outputs_depend_on_padding():
    for overrides in ({"model.padding_mask": False}, {"finetune.pooling": "all_tokens"}):
        with pytest.raises(ConfigError, match="finetune.length_buckets.*set finetune.length_buckets=auto or off"):
            from_overrides("smoke", {"finetune.length_buckets": "on", **overrides})
    cfg = from_overrides("smoke", {"finetune.length_buckets": "on"})
    assert cfg.length_buckets() and cfg.pooling() == "real_tokens" and cfg.padding_free()
    guide_way = from_overrides("guide", {"model.padding_mask": False})
    assert (guide_way.pooling(), guide_way.length_buckets()) == ("all_tokens", False)
    off = from_overrides("guide", {"finetune.length_buckets": "off"})
    assert (off.pooling(), off.length_buckets()) == ("real_tokens", False)


def test_fine_tuning_continues_from_the_champions_classifier_and_refuses_another_label_set(inputs, tmp_path, caplog):
    """finetune.init_from=champion: the champion's classifier is where training starts (at a vanishing rate
    it ends where the champion was); another label set or vocabulary is refused naming both sides."""
    from encoderflow import registry, steps
    from encoderflow.errors import EncoderflowError
    from encoderflow.train.finetune import finetune

    encoder, sst2, vocab = inputs
    cfg = from_overrides("smoke", {"finetune.steps_per_epoch": 40})
    first = finetune(cfg, encoder, sst2, vocab, tmp_path / "first")
    name = cfg.gate.registered_model
    decision = {"blessed": True, "reasons": [], "candidate": first["val_accuracy"], "checks": []}
    version = registry.log_candidate(name, first["bundle"], cfg.to_dict(), {}, {}, {}, decision)["version"]
    registry.move_champion(name, version, expected=None, reason="test", who="test")

    params = {
        "preset": "smoke",
        "overrides": ["finetune.init_from=champion", "finetune.learning_rate=1e-9", "finetune.steps_per_epoch=1"],
    }
    vocab_info = {
        "dataset": "vocab",
        "files": {"v": {"path": str(vocab), "sha256": __import__("encoderflow").layout.sha256_file(vocab)}},
    }
    pretrained = {"encoder": str(encoder), "encoder_sha256": layout.sha256_file(encoder)}
    # Nothing is pretrained for it (the guide preset's hours): fine-tuning would not read that encoder. The
    # shard set named does not exist: pretrain does not even look.
    no_shards = {"manifest": str(tmp_path / "no-shards" / "manifest.json"), "manifest_sha256": "0" * 64}
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        skipped = steps.pretrain(no_shards, params, "warm")
        warm = steps.finetune(skipped, sst2, vocab_info, params, "warm")
    assert skipped["mlm_val_accuracy"] is None and skipped["encoder"] == ""
    assert f"pretrain: not run: finetune.init_from=champion: fine-tuning continues champion v{version}" in caplog.text
    assert layout.read_json(skipped["result"])["skipped"] == skipped["skipped"]
    assert warm["parent"] == version
    assert f"warm start from finetune.init_from=champion v{version}" in caplog.text
    assert warm["val_accuracy"] == pytest.approx(first["val_accuracy"], abs=1e-6)  # started where it was

    relabeled = {**sst2, "labels": ["neg", "pos"]}
    with pytest.raises(
        EncoderflowError,
        match=r"champion v\d+ of encoderflow-sst2 has labels \['0', '1'\], "
        r"this run has \['neg', 'pos'\].*fix: set finetune.init_from=none",
    ):
        steps.finetune(pretrained, relabeled, vocab_info, params, "relabeled")
    # The champion demoted between the two tasks: no encoder to fine-tune, said once, with the way on.
    registry.client().delete_registered_model_alias(name, "champion")
    with pytest.raises(EncoderflowError, match=r"pretrain did not run \(finetune.init_from=champion: .* no champion "):
        steps.finetune(skipped, sst2, vocab_info, params, "demoted")


def test_an_encoder_pretrained_on_another_vocabulary_is_refused(inputs, tmp_path):
    """Same size, other tokens: its embeddings would be read under the wrong words, with no error from Keras."""
    from encoderflow import steps
    from encoderflow.errors import EncoderflowError

    encoder, sst2, vocab = inputs
    vocab_info = {"dataset": "vocab", "files": {"v": {"path": str(vocab), "sha256": layout.sha256_file(vocab)}}}
    pretrained = {"encoder": str(encoder), "encoder_sha256": layout.sha256_file(encoder), "vocab_sha256": "0" * 64}
    with pytest.raises(EncoderflowError, match=r"pretrained on vocabulary sha256 0{64}, this run tokenizes with"):
        steps.finetune(pretrained, sst2, vocab_info, {"preset": "smoke"}, "other-vocab")
    assert not (layout.run_dir("other-vocab") / "finetune" / "bundle").exists()


def test_an_encoder_altered_since_pretrain_wrote_it_is_refused_naming_the_way_out(inputs):
    """The checksum pretrain handed on is checked: a damaged file fails here with the fix, not as a
    Keras load error (that pointed at re-running pretrain, which reused the damaged file)."""
    from encoderflow import steps
    from encoderflow.errors import EncoderflowError

    encoder, sst2, vocab = inputs
    vocab_info = {"dataset": "vocab", "files": {"v": {"path": str(vocab), "sha256": layout.sha256_file(vocab)}}}
    pretrained = {"encoder": str(encoder), "encoder_sha256": "f" * 64}
    with pytest.raises(
        EncoderflowError,
        match=r"is not the encoder pretrain wrote \(sha256 f{64}\).*fix: clear pretrain with its downstream",
    ):
        steps.finetune(pretrained, sst2, vocab_info, {"preset": "smoke"}, "altered")
    assert not (layout.run_dir("altered") / "finetune").exists()


def test_full_epochs_over_length_buckets_raise_no_ran_out_of_data_warning(inputs, tmp_path, recwarn, caplog):
    """Whole epochs (no step cap) over the bucketed train split: its batches are counted, so Keras
    does not warn "Your input ran out of data" at the end of every epoch of a run's log, and the
    steps/epoch logged before it are the steps it runs (not the schedule's bound, a partial batch per
    bucket width more)."""
    from encoderflow.train.finetune import finetune

    encoder, sst2, vocab = inputs
    cfg = from_overrides("smoke", {"finetune.steps_per_epoch": 0, "finetune.epochs": 1})
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        result = finetune(cfg, encoder, sst2, vocab, tmp_path)
    assert len(result["history"]["loss"]) == 1
    assert not [w for w in recwarn if "ran out of data" in str(w.message)], [str(w.message) for w in recwarn]
    log = "\n".join(caplog.messages)
    [planned] = re.findall(r"^finetune: .* (\d+) steps/epoch, 1 epoch, \d+ steps in all$", log, re.M)
    [ran] = re.findall(r"^finetune epoch 1/1: .* steps=(\d+) ", log, re.M)
    assert planned == ran


def test_fine_tuning_logs_its_plan_a_measured_step_time_and_progress_during_the_first_epoch(
    inputs, tmp_path, caplog, monkeypatch
):
    """The guide's fine-tuning on a CPU takes hours: its log says the plan and the rate before training,
    then a measured ms/step with the time it makes and progress lines (at most one per
    LOG_EVERY_SECONDS; every step here), as pretraining's does, not only the device and the pooling."""
    from encoderflow.data.inputs import read_labeled
    from encoderflow.train import finetune

    monkeypatch.setattr(finetune, "LOG_EVERY_SECONDS", 0.0, raising=False)
    monkeypatch.setattr(finetune, "ESTIMATE_STEPS", 10)  # 50 in a real run; 12 steps here
    encoder, sst2, vocab = inputs
    overrides = {"finetune.steps_per_epoch": 12, "finetune.epochs": 1, "finetune.lr_schedule": "warmup_cosine"}
    cfg = from_overrides("smoke", overrides)
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        finetune.finetune(cfg, encoder, sst2, vocab, tmp_path)
    lines = [m for m in caplog.messages if m.startswith("finetune")]
    before = lines[: next(i for i, m in enumerate(lines) if m.startswith("finetune epoch 1/1: "))]
    train, dev = (len(read_labeled(sst2, split)[0]) for split in ("train", "dev"))
    assert (
        f"finetune: {train:,} train examples, {dev:,} dev examples, batch {cfg.finetune.batch_size}, "
        "12 steps/epoch (finetune.steps_per_epoch), 1 epoch, 12 steps in all"
    ) in before
    lr, decay = cfg.finetune.learning_rate, cfg.finetune.weight_decay
    assert (
        f"finetune: AdamW, learning rate {lr:g} (warmup_cosine, warmup_ratio 0.1), weight decay {decay:g}"
        in " ".join(before)
    )
    # 1 step compiles, 10 are timed: the estimate comes at step 11 of 12.
    [estimate] = [m for m in before if "ms/step" in m]
    assert re.fullmatch(
        r"finetune: \d+\.\d ms/step measured over 10 steps( \(after \d+ in which JAX compiled other shapes\))?; "
        r"estimated training time \S+ for 12 steps \(\+ validation"
        r"(, \+ compiling each batch shape met for the first time \(\S+ compiling so far\))?\)",
        estimate,
    ), estimate
    progress = [m for m in before if m.startswith("finetune progress: ")]
    assert len(progress) >= 10, before
    progress_line = r"finetune progress: epoch step \d+/12 loss=\d+\.\d{4} seq/s=\d+ eta=\S+"
    assert all(re.fullmatch(progress_line, m) for m in progress), progress
    assert not [m for m in caplog.messages if "\r" in m]


def test_an_ema_fine_tuning_saves_the_averaged_classifier_it_evaluated(inputs, tmp_path, caplog):
    from encoderflow import bundle
    from encoderflow.data.inputs import read_labeled
    from encoderflow.train.finetune import finetune

    encoder, sst2, vocab = inputs
    scorers = {}
    for momentum in (0.0, 0.9):
        cfg = from_overrides("smoke", {"finetune.steps_per_epoch": 6, "finetune.ema_momentum": momentum})
        with caplog.at_level(logging.INFO, logger="encoderflow"):
            result = finetune(cfg, encoder, sst2, vocab, tmp_path / str(momentum))
        scorers[momentum] = bundle.Scorer(result["bundle"])
        # the saved classifier scores the dev split as it was evaluated and gated
        assert scorers[momentum].accuracy(*read_labeled(sst2, "dev")) == pytest.approx(result["val_accuracy"], abs=1e-6)
    assert "moving average of the weights (ema_momentum 0.9)" in caplog.text
    # same seed, same batches, same iterates: only the averaging differs
    last, average = (scorers[m].classifier.get_layer("sentiment").get_weights()[0] for m in (0.0, 0.9))
    assert abs(last - average).max() > 1e-4


def test_another_runs_bundle_from_the_same_key_and_code_is_copied_and_checked_first(inputs, caplog):
    from encoderflow import bundle
    from encoderflow.train.finetune import finetune

    encoder, sst2, vocab = inputs
    cfg = from_overrides("smoke", {"finetune.steps_per_epoch": 2, "finetune.epochs": 1})
    first = finetune(cfg, encoder, sst2, vocab, layout.run_dir("first") / "finetune")
    out = layout.run_dir("second") / "finetune"
    caplog.clear()  # the first fine-tuning's lines, when an earlier test left the loggers at INFO
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        second = finetune(cfg, encoder, sst2, vocab, out)
    assert second["reused_from"] == str(layout.run_dir("first") / "finetune" / "result.json")
    assert second["bundle"] == str(out / "bundle") and second["val_accuracy"] == first["val_accuracy"]
    assert bundle.verify(second["bundle"]) and bundle.metadata(second["bundle"]) == bundle.metadata(first["bundle"])
    assert "finetune: reusing the bundle run first trained from the same encoder" in caplog.text
    assert "finetune: device" not in caplog.text  # nothing was built
    # A bundle file altered since bundle.json was written fails bundle.verify: the next run trains.
    for run in ("first", "second"):
        (layout.run_dir(run) / "finetune" / "bundle" / bundle.VOCAB).write_text("[PAD]\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        third = finetune(cfg, encoder, sst2, vocab, layout.run_dir("third") / "finetune")
    assert "reused_from" not in third and "finetune: device" in caplog.text
    assert caplog.text.count("missing or altered (sha256 differs from bundle.json)") == 2
    forced = finetune(cfg, encoder, sst2, vocab, layout.run_dir("forced") / "finetune", earlier_runs=False)
    assert "reused_from" not in forced
    # The same encoder under another seed (finetune.init_from=champion: the encoder is the champion's)
    # shuffles and initialises differently: its bundle is another run's to train, not this one's.
    seeded = from_overrides("smoke", {"finetune.steps_per_epoch": 2, "finetune.epochs": 1, "data.seed": 7})
    other = finetune(seeded, encoder, sst2, vocab, layout.run_dir("seeded") / "finetune")
    assert "reused_from" not in other and bundle.metadata(other["bundle"])["config"]["data"]["seed"] == 7


def test_a_change_to_the_dev_split_alone_rescores_the_same_model_and_trains_nothing(inputs, tmp_path, caplog):
    """The dev split is only scored: a dev-only change used to train an identical classifier again, which
    the gate blessed as a new model and moved champion to. Now the run reuses the bundle (so the gate
    sees the champion's own model) and its val_accuracy is that bundle's on the new dev file."""
    import shutil

    from encoderflow import bundle
    from encoderflow.data.inputs import read_labeled
    from encoderflow.train.finetune import finetune

    encoder, sst2, vocab = inputs
    cfg = from_overrides("smoke", {"finetune.steps_per_epoch": 2, "finetune.epochs": 1})
    first = finetune(cfg, encoder, sst2, vocab, layout.run_dir("dev-first") / "finetune")
    tree = tmp_path / "data"
    shutil.copytree(sst2["root"], tree)
    dev = tree / "SST-2" / "dev.tsv"
    rows = dev.read_text().splitlines(keepends=True)
    # An odd number of labels flipped one way: the accuracy moves, whatever the model predicts on them.
    ones = [i for i, r in enumerate(rows) if r.endswith("\t1\n")][:7]
    dev.write_text("".join(r.replace("\t1\n", "\t0\n") if i in ones else r for i, r in enumerate(rows)))
    (tree / "SST-2" / "test.tsv").write_text("index\tsentence\n0\tanother unlabeled sentence\n")
    changed = get_dataset("sst2", data_dir=str(tree))
    assert changed["content_hash"] != sst2["content_hash"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        second = finetune(cfg, encoder, changed, vocab, layout.run_dir("dev-second") / "finetune")
    assert "finetune: device" not in caplog.text  # nothing was trained
    assert second["reused_from"] == str(layout.run_dir("dev-first") / "finetune" / "result.json")
    assert bundle.identity(second["bundle"]) == bundle.identity(first["bundle"])  # the gate's model check sees v1's
    rescored = bundle.Scorer(second["bundle"]).accuracy(*read_labeled(changed, "dev"))
    assert second["val_accuracy"] == rescored != first["val_accuracy"]
    # The loss too is this dev file's; scored the same way on the first dev file, it is fine-tuning's own.
    assert second["val_loss"] != first["val_loss"]
    again_first = bundle.Scorer(first["bundle"]).evaluate(*read_labeled(sst2, "dev"))
    assert again_first[0] == first["val_accuracy"] and again_first[1] == pytest.approx(first["val_loss"], rel=1e-3)
    assert second["history"] == first["history"] and second["history_dev_sha256"] == first["dev_sha256"]
    assert second["dev_sha256"] == layout.sha256_file(dev)
    assert "finetune: dev file changed since this bundle was trained" in caplog.text
    # Its result says so for a retry, which reuses it as it is.
    assert layout.read_json(layout.run_dir("dev-second") / "finetune" / "result.json")["val_accuracy"] == rescored
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        again = finetune(cfg, encoder, changed, vocab, layout.run_dir("dev-second") / "finetune")
    assert again["val_accuracy"] == rescored and "dev file changed" not in caplog.text


def test_a_run_waits_while_another_fine_tunes_the_same_model_then_reuses_its_bundle(inputs, caplog):
    """Two runs of one config (differing only in gate settings) fine-tuned side by side: twice the work on one
    accelerator, and two bundles of one model that could both be registered. The second now waits."""
    import threading
    import time

    from encoderflow.train.finetune import finetune

    encoder, sst2, vocab = inputs
    cfg = from_overrides("smoke", {"finetune.steps_per_epoch": 3, "finetune.epochs": 1, "data.seed": 11})
    first_out, second_out = layout.run_dir("twin-first") / "finetune", layout.run_dir("twin-second") / "finetune"
    second = {}

    def second_run():
        deadline = time.monotonic() + 120
        while layout.trains_now(first_out) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        second["result"] = finetune(cfg, encoder, sst2, vocab, second_out)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        waiter = threading.Thread(target=second_run)
        waiter.start()
        first = finetune(cfg, encoder, sst2, vocab, first_out)
        waiter.join(120)
    assert second["result"]["reused_from"] == str(first_out / "result.json")
    assert second["result"]["val_accuracy"] == first["val_accuracy"]
    assert caplog.text.count("finetune: device") == 1  # one fine-tuning
    assert (
        f"finetune: run twin-first fine-tunes the same encoder on the same data with the same config and code now "
        f"(pid {os.getpid()}): waiting for it, then reusing its bundle (or training here if it stops)"
    ) in caplog.messages
    assert layout.trains_now(first_out) is None and layout.busy_twin(second_out, first["key"]) is None


def test_a_finite_fine_tuning_loss_far_above_guessing_is_called_diverging(inputs, tmp_path, caplog):
    """finetune.learning_rate=1 ended "success" at loss 7.2 (ten times a guess's ln 2), told at INFO only."""
    from encoderflow.train import finetune

    encoder, sst2, vocab = inputs
    cfg = from_overrides("smoke", {"finetune.steps_per_epoch": 30, "finetune.epochs": 1, "finetune.learning_rate": 1.0})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        finetune.finetune(cfg, encoder, sst2, vocab, tmp_path)
    [warned] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert re.fullmatch(
        r"finetune: epoch 1 loss \d+\.\d{4} is above 1\.39, twice what a uniform guess scores: training is diverging; "
        r"lower finetune.learning_rate \(now 1\) or check the input data",
        warned,
    ), warned
