"""The model bundle: written atomically, verified against its sha256s, scored as it was trained.

Most bundles here are small files with a real ``bundle.json``; only the round trip needs Keras.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from encoderflow import bundle, layout
from encoderflow.config import from_overrides
from encoderflow.errors import EncoderflowError
from tests import fixtures_pipeline


def fake_bundle(root: Path, tag: str) -> Path:
    """A bundle of small text files (no Keras) with a real ``bundle.json``."""
    root.mkdir(parents=True)
    files = {"classifier.keras": f"clf-{tag}", "encoder.keras": f"enc-{tag}", "vocab.txt": "[PAD]\n"}
    for fname, body in files.items():
        (root / fname).write_text(body)
    bundle.seal(root)
    return root


class FakeClassifier:
    """Stands in for a ``keras.Model`` where only ``save`` matters."""

    def __init__(self, body: str = "clf", fail: bool = False):
        self.body, self.fail = body, fail

    def save(self, path):
        if self.fail:
            raise OSError("disk full")
        Path(path).write_text(self.body)


@pytest.fixture
def inputs(tmp_path):
    vocab = tmp_path / "in" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_text("\n".join(fixtures_pipeline.vocab_tokens()) + "\n")
    encoder = tmp_path / "in" / "encoder.keras"
    encoder.write_text("enc")
    return encoder, vocab


@pytest.mark.parametrize("fname", bundle.FILES)
def test_a_tampered_or_missing_file_fails_verify_naming_it(tmp_path, fname):
    path = fake_bundle(tmp_path / "b", "x")
    assert bundle.verify(path) == path
    with open(path / fname, "a") as f:
        f.write("!")
    with pytest.raises(EncoderflowError, match=rf"{fname}: missing or altered .* incomplete"):
        bundle.verify(path)
    (path / fname).unlink()
    with pytest.raises(EncoderflowError, match=rf"{fname}: missing or altered"):
        bundle.verify(path)


def test_a_bundle_json_that_lists_fewer_files_fails_verify_naming_them(tmp_path):
    """Only listed files were checked: {"files": {}} beside no model at all passed."""
    path = fake_bundle(tmp_path / "b", "x")
    layout.write_json(path / "bundle.json", {"files": {}})
    for fname in bundle.FILES:
        (path / fname).unlink()
    with pytest.raises(EncoderflowError, match="lists no sha256 for classifier.keras, encoder.keras, vocab.txt"):
        bundle.verify(path)
    path = fake_bundle(tmp_path / "c", "y")
    meta = layout.read_json(path / "bundle.json")
    del meta["files"]["encoder.keras"]
    layout.write_json(path / "bundle.json", meta)
    with pytest.raises(
        EncoderflowError, match=r"bundle.json: lists no sha256 for encoder.keras; the bundle is incomplete"
    ):
        bundle.verify(path)


def test_a_folder_without_bundle_json_is_not_a_bundle(tmp_path):
    with pytest.raises(EncoderflowError, match="incomplete model bundle .no bundle.json."):
        bundle.verify(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        bundle.Scorer(tmp_path)


def test_write_records_settings_and_hashes_and_replaces_the_old_bundle(tmp_path, inputs):
    encoder, vocab = inputs
    cfg = from_overrides("smoke")
    out = tmp_path / "finetune"
    first = bundle.write(out / "bundle", FakeClassifier("one"), encoder, vocab, cfg, 0.75)
    assert first == out / "bundle" and (first / "classifier.keras").read_text() == "one"
    second = bundle.write(out / "bundle", FakeClassifier("two"), encoder, vocab, cfg, np.float32(0.8))
    assert bundle.verify(second) == first
    assert (second / "classifier.keras").read_text() == "two"
    assert sorted(p.name for p in out.iterdir()) == ["bundle"]  # no temp or set-aside folder left
    meta = bundle.metadata(second)
    assert meta["val_accuracy"] == pytest.approx(0.8) and isinstance(meta["val_accuracy"], float)
    assert (meta["seq_length"], meta["lowercase"], meta["strip_accents"]) == (
        cfg.data.seq_length,
        cfg.data.lowercase,
        cfg.data.strip_accents,
    )
    assert meta["pad_id"] == 0 and meta["vocab_size"] == len(fixtures_pipeline.vocab_tokens())
    assert meta["config"] == cfg.to_dict()
    assert meta["files"] == {f: layout.sha256_file(second / f) for f in bundle.FILES}


def test_a_killed_writers_temp_folder_is_swept_by_the_next_write(tmp_path, inputs):
    """A kill -9 during fine-tuning's bundle write left .bundle-<pid> beside the bundle for good."""
    encoder, vocab = inputs
    out = tmp_path / "finetune"
    (out / ".bundle-1727" / "sub").mkdir(parents=True)  # what a killed writer (no lock held now) left
    (out / ".bundle-1727" / "sub" / "classifier.keras").write_text("half")
    bundle.write(out / "bundle", FakeClassifier("one"), encoder, vocab, from_overrides("smoke"), 0.5)
    assert sorted(p.name for p in out.iterdir()) == ["bundle"]


def test_a_failed_write_leaves_the_old_bundle_whole(tmp_path, inputs):
    encoder, vocab = inputs
    cfg = from_overrides("smoke")
    out = tmp_path / "finetune"
    bundle.write(out / "bundle", FakeClassifier("old"), encoder, vocab, cfg, 0.7)
    with pytest.raises(OSError, match="disk full"):
        bundle.write(out / "bundle", FakeClassifier(fail=True), encoder, vocab, cfg, 0.9)
    assert (bundle.verify(out / "bundle") / "classifier.keras").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["bundle"]


def _classifier(tmp_path, vocab, sentences, num_classes: int = 2):
    """A fresh smoke classifier (its encoder saved as ``in/encoder.keras``) and its outputs on ``sentences``."""
    from encoderflow import model as models
    from encoderflow.data.tokenizer import make_tokenizer, tokenize

    cfg = from_overrides("smoke")
    encoder = models.build_encoder(cfg.model, len(fixtures_pipeline.vocab_tokens()), cfg.data.seq_length)
    encoder_path = tmp_path / "in" / "encoder.keras"
    encoder.save(encoder_path)
    classifier = models.build_classifier(encoder, num_classes=num_classes)
    # What fine-tuning measures: the in-memory classifier on the bundle's tokenization.
    ids = tokenize(make_tokenizer(vocab, cfg.data.seq_length, cfg.data.lowercase, cfg.data.strip_accents), sentences)
    return cfg, classifier, encoder_path, np.asarray(classifier.predict(ids, verbose=0))


def test_round_trip_scores_the_accuracy_recorded(tmp_path, inputs):
    _, vocab = inputs
    rows = fixtures_pipeline.sst2_rows(40, random.Random(0))
    sentences, labels = [s for s, _ in rows], np.array([y for _, y in rows])
    cfg, classifier, encoder_path, probs = _classifier(tmp_path, vocab, sentences)
    probs = probs.reshape(-1)
    recorded = float(np.mean((probs > 0.5) == labels))

    path = bundle.write(tmp_path / "bundle", classifier, encoder_path, vocab, cfg, recorded)
    scorer = bundle.Scorer(bundle.verify(path))
    np.testing.assert_allclose(scorer.probabilities(sentences, batch_size=16), probs, atol=1e-6)
    assert scorer.accuracy(sentences, labels) == bundle.metadata(path)["val_accuracy"] == recorded
    # Per sentence, in the order given: what the gate pairs with the champion's.
    np.testing.assert_array_equal(scorer.correct(sentences, labels), (probs > 0.5) == labels)
    assert scorer.probabilities([]).shape == (0,)
    # The confidence `encoderflow predict` prints is the predicted class's probability, either way.
    predicted, confidence = scorer.predict(sentences)
    np.testing.assert_array_equal(predicted, (probs > 0.5).astype(np.int32))
    np.testing.assert_allclose(confidence, np.where(probs > 0.5, probs, 1 - probs), atol=1e-6)
    # As the two classes' probabilities [1 - p, p] say it: the label is their argmax, the confidence its entry.
    both = np.stack([1 - probs, probs], axis=1)
    np.testing.assert_array_equal(predicted, both.argmax(axis=1))
    np.testing.assert_allclose(confidence, both[np.arange(len(sentences)), predicted], atol=1e-6)
    # At the threshold and either side of it (a fresh classifier's outputs may all fall on one side):
    # 0.5 is class 0, as Keras's binary accuracy counts it, and each confidence is its class's probability.
    edge_label, edge_conf = scorer._classes(np.array([0.2, 0.5, 0.9], dtype=np.float32))
    np.testing.assert_array_equal(edge_label, [0, 0, 1])
    np.testing.assert_allclose(edge_conf, [0.8, 0.5, 0.9], atol=1e-6)
    # A notebook's mistakes are refused, not scored: one string was 11 predictions (one per character),
    # a batch size of -1 an empty result, None a TensorFlow conversion error.
    for bad, error, said in (
        ("a dull mess", TypeError, "got one str: pass [text]"),
        (["fine", None], TypeError, "sentences[1] is NoneType None, not a string"),
        ([3.5], TypeError, "sentences[0] is float 3.5"),
    ):
        with pytest.raises(error, match=re.escape(said)):
            scorer.predict(bad)
    for size, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="batch_size must be"):
            scorer.probabilities(["a"], batch_size=size)
    assert scorer.probabilities(np.array(sentences[:3]), batch_size=np.int64(2)).shape == (3,)  # numpy's own

    # At the threshold itself the gate's count (Scorer) and fine-tuning's (Keras) must agree.
    import keras

    at = np.array([0.5, np.nextafter(np.float32(0.5), np.float32(1)), 0.2], dtype=np.float32)
    scorer.probabilities = lambda s, batch_size=64: at
    keras_metric = keras.metrics.BinaryAccuracy()
    keras_metric.update_state(np.array([0, 1, 0]), at)
    assert scorer.accuracy(["a", "b", "c"], [0, 1, 0]) == float(keras_metric.result()) == 1.0


def test_a_three_class_bundle_predicts_by_argmax_and_keeps_its_labels(tmp_path, inputs):
    _, vocab = inputs
    sentences, labels = [s for s, _ in fixtures_pipeline.sst2_rows(30, random.Random(0))], np.arange(30) % 3
    cfg, classifier, encoder_path, probs = _classifier(tmp_path, vocab, sentences, num_classes=3)
    assert classifier.output_shape == (None, 3) and classifier.get_layer("classes").activation.__name__ == "softmax"
    path = bundle.write(tmp_path / "bundle", classifier, encoder_path, vocab, cfg, 0.5, ["bug", "billing", "praise"])
    scorer = bundle.Scorer(bundle.verify(path))
    assert scorer.labels == ["bug", "billing", "praise"] == bundle.metadata(path)["labels"]
    np.testing.assert_allclose(scorer.probabilities(sentences), probs, atol=1e-6)
    predicted, confidence = scorer.predict(sentences)
    np.testing.assert_array_equal(predicted, probs.argmax(axis=-1))
    np.testing.assert_allclose(confidence, probs.max(axis=-1), atol=1e-6)
    np.testing.assert_array_equal(scorer.correct(sentences, labels), probs.argmax(axis=-1) == labels)
    assert scorer.probabilities([]).shape == (0, 3)


def test_a_bundle_keeps_the_weights_not_the_optimizer_state(tmp_path, inputs):
    """A compiled classifier's .keras file carried AdamW's two moments per weight: 3x the bytes served."""
    import zipfile

    import h5py

    from encoderflow.train.finetune import compile_classifier

    _, vocab = inputs
    rows = fixtures_pipeline.sst2_rows(16, random.Random(1))
    sentences, labels = [s for s, _ in rows], np.array([y for _, y in rows])
    cfg, classifier, encoder_path, _ = _classifier(tmp_path, vocab, sentences)
    compile_classifier(classifier, cfg.finetune, total_steps=1)
    scorer = bundle.Scorer.for_classifier(classifier, vocab, cfg, ["0", "1"])
    ids = __import__("encoderflow.data.tokenizer", fromlist=["tokenize"]).tokenize(scorer.tokenizer, sentences)
    classifier.fit(ids, labels, epochs=1, batch_size=16, verbose=0)  # the optimizer now holds state
    path = bundle.write(tmp_path / "bundle", classifier, encoder_path, vocab, cfg, 0.5)
    with zipfile.ZipFile(path / "classifier.keras") as z:
        z.extract("model.weights.h5", tmp_path)
    names = []
    with h5py.File(tmp_path / "model.weights.h5") as f:
        f.visit(names.append)
    assert names and not [n for n in names if "optimizer" in n], names
    np.testing.assert_allclose(
        bundle.Scorer(path).probabilities(sentences), scorer.probabilities(sentences), rtol=0, atol=1e-6
    )


def test_the_same_weights_saved_again_are_the_same_model_by_content_not_by_bytes(tmp_path, inputs):
    """Keras writes the save time into each .keras file: a model trained again to the same weights (a forced
    run, a code change that leaves the numbers alone) had another identity, and the gate blessed it as new."""
    import time

    _, vocab = inputs
    cfg, classifier, encoder_path, _ = _classifier(tmp_path, vocab, ["a fine film"])
    first = bundle.write(tmp_path / "first", classifier, encoder_path, vocab, cfg, 0.5)
    time.sleep(1.1)  # Keras's date_saved has whole seconds
    again = bundle.write(tmp_path / "again", classifier, encoder_path, vocab, cfg, 0.75)
    assert bundle.metadata(first)["files"]["classifier.keras"] != bundle.metadata(again)["files"]["classifier.keras"]
    assert bundle.identity(first) != bundle.identity(again)
    assert bundle.content_identity(first) == bundle.content_identity(again)  # its accuracy is history, not identity
    # Saved by another process: Keras writes each shared object's id() into config.json, another address.
    import re
    import shutil
    import zipfile

    moved = tmp_path / "moved"
    shutil.copytree(again, moved)
    config = zipfile.ZipFile(again / "encoder.keras").read("config.json").decode()
    ids = sorted(set(re.findall(r'"shared_object_id": (\d+)', config)))
    assert ids, "the encoder's layers share objects, which Keras records by id()"
    with zipfile.ZipFile(again / "encoder.keras") as src, zipfile.ZipFile(moved / "encoder.keras", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                data = config.replace(ids[0], str(int(ids[0]) + 4096)).encode()
            dst.writestr(item, data)
    bundle.seal(moved, {k: v for k, v in bundle.metadata(again).items() if k != "files"})
    assert bundle.identity(moved) != bundle.identity(again)
    assert bundle.content_identity(moved) == bundle.content_identity(again)
    # Other weights are another model.
    classifier.layers[-1].set_weights([w + 1 for w in classifier.layers[-1].get_weights()])
    other = bundle.write(tmp_path / "other", classifier, encoder_path, vocab, cfg, 0.5)
    assert bundle.content_identity(other) != bundle.content_identity(first)


def test_the_same_weights_loaded_where_other_layers_were_built_first_are_the_same_model(tmp_path, inputs):
    """encoderflow run trains every task in one process: sub-layers Keras names itself (attention's dropout,
    softmax) come out dropout_1, softmax_1 there, and the weights file's group names with them."""
    import zipfile

    import keras

    from encoderflow import model as models

    _, vocab = inputs
    cfg, _, encoder_path, _ = _classifier(tmp_path, vocab, ["a fine film"])

    def fine_tuned(name: str):  # as finetune does: the pretrained encoder loaded, a seeded head on it
        keras.utils.set_random_seed(1)
        classifier = models.build_classifier(models.load(encoder_path), num_classes=2)
        return bundle.write(tmp_path / name, classifier, encoder_path, vocab, cfg, 0.5)

    first = fine_tuned("first")
    models.build_encoder(cfg.model, len(fixtures_pipeline.vocab_tokens()), cfg.data.seq_length)  # as pretrain does
    again = fine_tuned("again")
    weights = [zipfile.ZipFile(b / bundle.CLASSIFIER).read("model.weights.h5") for b in (first, again)]
    assert weights[0] != weights[1]  # the same arrays under other group names
    assert bundle.content_identity(again) == bundle.content_identity(first)
