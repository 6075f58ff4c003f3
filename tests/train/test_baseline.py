"""The bag-of-words baseline: trains, records its dev accuracy and per-sentence results, and is reused only for the
same inputs."""

from __future__ import annotations

from encoderflow import config, gate, layout
from encoderflow.data import sources
from encoderflow.train.baseline import train_baseline

from ..data.fixtures_data import DEV, TEST, TRAIN, sst2_labeled, sst2_test


def _sst2(tmp_path):
    root = tmp_path / "data"
    (root / "SST-2").mkdir(parents=True)
    (root / TRAIN).write_text(sst2_labeled(60))
    (root / DEV).write_text(sst2_labeled(20, offset=60))
    (root / TEST).write_text(sst2_test())
    return sources.get_dataset("sst2", data_dir=str(root))


def test_the_reuse_key_covers_the_seed(tmp_path, monkeypatch):
    import keras

    sst2 = _sst2(tmp_path)
    cfg = config.from_overrides("smoke")
    out = tmp_path / "baseline"

    first = train_baseline(cfg, sst2, out)
    assert len(first["history"]["loss"]) == cfg.baseline.epochs
    # Same inputs and config: the recorded result comes back as is, and nothing trains.
    with monkeypatch.context() as m:

        def no_training(*args, **kwargs):
            raise AssertionError("the baseline trained again for the same inputs and config")

        m.setattr(keras.Model, "fit", no_training)
        assert train_baseline(cfg, sst2, out) == first
    # Another seed shuffles and initialises differently: it must train again, under a new key.
    reseeded = train_baseline(config.from_overrides("smoke", {"data.seed": 7}), sst2, out)
    assert reseeded["key"] != first["key"]
    assert layout.read_json(out / "result.json")["key"] == reseeded["key"]
    # Each result carries what it was trained from, which its key is the hash of.
    for result, seed in ((first, cfg.data.seed), (reseeded, 7)):
        assert layout.sha256_json(result["config"]) == result["key"] and result["config"]["seed"] == seed


def test_per_sentence_dev_correctness_is_recorded_for_the_gate(tmp_path):
    sst2 = _sst2(tmp_path)
    result = train_baseline(config.from_overrides("smoke"), sst2, tmp_path / "baseline")
    correct = gate.correctness_from_text(result["dev_correct"])
    # One per dev sentence, in file order, thresholded as the accuracy metric: their mean is it.
    assert correct.size == result["dev_rows"] == 20
    # Exactly, as the candidate's (a count over a count): Keras's float32 metric read 656/872 above the
    # candidate's exact tie, which then failed min_gain_over_baseline 0.
    assert float(correct.mean()) == result["baseline_val_accuracy"] == correct.sum() / correct.size
    # Tied to the dev file it was scored on, so the gate pairs it only with predictions on that file.
    assert result["dev_sha256"] == layout.sha256_file(tmp_path / "data" / DEV)


def test_the_baseline_trains_in_float32_whatever_policy_an_earlier_task_left(tmp_path, monkeypatch):
    """dag.test runs every task in one process: pretrain's mixed_bfloat16 (a GPU's precision=auto) was
    still Keras's global policy when the baseline, the gate's bar, trained after it."""
    import keras

    from encoderflow.train import callbacks

    seen = []

    class Watched(callbacks.EpochLogger):
        def set_model(self, model):
            super().set_model(model)
            seen.extend(layer.dtype_policy.name for layer in model.layers if layer.weights)

    monkeypatch.setattr(callbacks, "EpochLogger", Watched)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        train_baseline(config.from_overrides("smoke"), _sst2(tmp_path), tmp_path / "baseline")
    finally:
        keras.config.set_dtype_policy("float32")
    assert seen and set(seen) == {"float32"}, seen
