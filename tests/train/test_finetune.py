"""Fine-tuning's pooling and length buckets: each factor of the quality ablation switches on its own."""

from __future__ import annotations

import logging

import pytest

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
    from encoderflow.train.finetune import finetune

    encoder, sst2, vocab = inputs
    cfg = from_overrides("smoke", {"finetune.steps_per_epoch": 3, **overrides})
    with caplog.at_level(logging.INFO, logger="encoderflow"):
        result = finetune(cfg, encoder, sst2, vocab, tmp_path)
    assert f"length buckets {buckets}" in caplog.text
    clf = bundle.Scorer(result["bundle"]).classifier
    layer = clf.get_layer("pooled_tokens")
    assert f"{layer.name}:{type(layer).__name__}" == pooling
    assert 0.0 <= result["val_accuracy"] <= 1.0


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
