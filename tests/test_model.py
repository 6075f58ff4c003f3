"""The guide's architecture, keras-hub style: exact sizes, named layers, serialisation, padding."""

from __future__ import annotations

import numpy as np
import pytest

from encoderflow.config import ModelConfig, from_overrides


@pytest.fixture(scope="module")
def models():
    from encoderflow import model

    return model


def test_guide_encoder_has_the_guides_parameter_count(models):
    cfg = from_overrides("guide")
    encoder = models.build_encoder(cfg.model, vocab_size=30522, seq_length=cfg.data.seq_length)
    # 30522*256 token + 128*256 position embeddings, LayerNorm, 3 Transformer blocks (dim 256, FFN 512).
    assert encoder.count_params() == 9_428_224
    names = {layer.name for layer in encoder.layers}
    assert {
        "token_and_position_embedding",
        "embeddings_layer_norm",
        "embeddings_dropout",
        "transformer_layer_0",
        "transformer_layer_1",
        "transformer_layer_2",
    } <= names


def test_mlm_head_is_tied_to_the_token_embedding(models):
    cfg = ModelConfig(num_layers=1, model_dim=16, intermediate_dim=32, num_heads=2)
    encoder = models.build_encoder(cfg, vocab_size=50, seq_length=12)
    mlm = models.build_pretraining_model(encoder, predictions_per_seq=3)
    # Tied: the head adds only its own dense/LN/bias weights, not a second 50x16 matrix.
    head = mlm.get_layer("mlm_head")
    assert head.token_embedding is models.token_embedding(encoder)
    out = mlm.predict({"token_ids": np.ones((2, 12), "int32"), "mask_positions": np.zeros((2, 3), "int32")}, verbose=0)
    assert out.shape == (2, 3, 50)
    # Logits (the loss applies the softmax): not probabilities, but a distribution once normalised.
    assert (out < 0).any()
    probs = np.exp(out - out.max(-1, keepdims=True))
    np.testing.assert_allclose((probs / probs.sum(-1, keepdims=True)).sum(-1), 1.0, rtol=1e-5)


def test_guide_mode_attends_to_padding(models):
    """padding_mask=False is the guide's model: real-token outputs depend on the [PAD] positions."""
    cfg = ModelConfig(num_layers=2, model_dim=16, intermediate_dim=32, num_heads=2, dropout=0.0, padding_mask=True)
    masked = models.build_encoder(cfg, vocab_size=40, seq_length=10)
    guide = models.build_encoder(ModelConfig(**{**cfg.__dict__, "padding_mask": False}), vocab_size=40, seq_length=10)
    guide.set_weights(masked.get_weights())
    ids = np.array([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0]], "int32")
    assert np.abs(guide.predict(ids, verbose=0)[:, :3] - masked.predict(ids, verbose=0)[:, :3]).max() > 1e-4


def test_padding_mask_leaves_real_token_outputs_unchanged_when_padding_is_added(models):
    cfg = ModelConfig(num_layers=1, model_dim=16, intermediate_dim=32, num_heads=2, dropout=0.0)
    a = models.build_encoder(cfg, vocab_size=40, seq_length=6)
    b = models.build_encoder(cfg, vocab_size=40, seq_length=12)
    # Copy weights except the position table, whose length differs; share its first 6 rows.
    for la, lb in zip(a.layers, b.layers):
        wa, wb = la.get_weights(), lb.get_weights()
        lb.set_weights(
            [w_a if w_a.shape == w_b.shape else np.concatenate([w_a, w_b[w_a.shape[0] :]]) for w_a, w_b in zip(wa, wb)]
        )
    ids6 = np.array([[9, 8, 7, 0, 0, 0]], "int32")
    ids12 = np.array([[9, 8, 7] + [0] * 9], "int32")
    np.testing.assert_allclose(a.predict(ids6, verbose=0)[:, :3], b.predict(ids12, verbose=0)[:, :3], atol=1e-5)


def test_classifier_roundtrips_in_safe_mode(models, tmp_path):
    cfg = ModelConfig(num_layers=1, model_dim=16, intermediate_dim=32, num_heads=2)
    encoder = models.build_encoder(cfg, vocab_size=30, seq_length=8)
    clf = models.build_classifier(encoder)
    ids = np.array([[3, 4, 5, 0, 0, 0, 0, 0], [6, 7, 8, 9, 10, 11, 12, 13]], "int32")
    path = tmp_path / "clf.keras"
    clf.save(path)
    loaded = models.load(path)
    np.testing.assert_allclose(loaded.predict(ids, verbose=0), clf.predict(ids, verbose=0), atol=1e-6)
    assert loaded.get_config()["name"] == "sst2_classifier"


def test_classifier_heads_output_float32_under_mixed_precision(models):
    import keras

    cfg = ModelConfig(num_layers=1, model_dim=16, intermediate_dim=32, num_heads=2)
    ids = np.array([[3, 4, 5, 0, 0, 0, 0, 0]], "int32")
    keras.config.set_dtype_policy("mixed_bfloat16")  # what pretrain.precision=auto picks on a GPU
    try:
        encoder = models.build_encoder(cfg, vocab_size=30, seq_length=8)
        for classes in (2, 3):
            clf = models.build_classifier(encoder, num_classes=classes)
            assert clf.predict(ids, verbose=0).dtype == np.float32, classes
    finally:
        keras.config.set_dtype_policy("float32")


def test_custom_layers_get_config_roundtrip(models):
    mask = models.PaddingMask(pad_id=3, name="m")
    again = models.PaddingMask.from_config(mask.get_config())
    assert again.pad_id == 3 and again.name == "m"
    pooled = models.MaskedMeanPooling(name="p")
    assert models.MaskedMeanPooling.from_config(pooled.get_config()).name == "p"


def test_masked_mean_pooling_ignores_padding(models):
    seq = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], "float32")
    mask = np.array([[True, True, False]])
    out = np.asarray(models.MaskedMeanPooling()(seq, mask))
    np.testing.assert_allclose(out, [[2.0, 3.0]])


def test_pre_norm_encoder_adds_a_final_norm_and_round_trips(models, tmp_path):
    cfg = ModelConfig(num_layers=2, model_dim=16, intermediate_dim=32, num_heads=2, normalize_first=True)
    encoder = models.build_encoder(cfg, vocab_size=30, seq_length=8)
    post = models.build_encoder(ModelConfig(num_layers=2, model_dim=16, intermediate_dim=32, num_heads=2), 30, 8)
    assert encoder.get_layer("transformer_layer_0").normalize_first is True
    assert encoder.layers[-1].name == "final_layer_norm"
    # One LayerNorm more: 2 x 16 parameters.
    assert encoder.count_params() == post.count_params() + 32
    ids = np.array([[3, 4, 5, 0, 0, 0, 0, 0]], "int32")
    encoder.save(tmp_path / "e.keras")
    loaded = models.load(tmp_path / "e.keras")
    assert loaded.get_layer("transformer_layer_1").normalize_first is True
    np.testing.assert_allclose(loaded.predict(ids, verbose=0), encoder.predict(ids, verbose=0), atol=1e-6)


def test_with_dropout_keeps_the_weights_and_changes_only_the_rate(models):
    pre = ModelConfig(num_layers=1, model_dim=16, intermediate_dim=32, num_heads=2, dropout=0.0)
    encoder = models.build_encoder(pre, vocab_size=30, seq_length=8)
    assert models.with_dropout(encoder, pre) is encoder
    tuned = models.with_dropout(encoder, ModelConfig(**{**pre.__dict__, "dropout": 0.1}))
    assert tuned is not encoder and tuned.get_layer("embeddings_dropout").rate == 0.1
    assert tuned.get_layer("transformer_layer_0").dropout == 0.1
    ids = np.array([[3, 4, 5, 0, 0, 0, 0, 0]], "int32")
    # Inference ignores dropout: the same weights give the same outputs.
    np.testing.assert_allclose(tuned.predict(ids, verbose=0), encoder.predict(ids, verbose=0), atol=1e-6)


def test_a_damaged_or_missing_keras_file_is_named_as_bad_input(models, tmp_path):
    """A flipped byte gave BadZipFile, read as "a bug or an outage" and retried."""
    from encoderflow.errors import EncoderflowError

    encoder = models.build_encoder(from_overrides("smoke").model, 30, 12)
    path = tmp_path / "encoder.keras"
    encoder.save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    (tmp_path / "damaged.keras").write_bytes(bytes(data))
    for bad in (tmp_path / "damaged.keras", tmp_path / "missing.keras"):
        with pytest.raises(EncoderflowError, match=rf"^{bad}: not a readable Keras model \(") as err:
            models.load(bad)
        assert err.value.fix.startswith("give an intact .keras file")
    assert models.load(path).count_params() == encoder.count_params()


def test_a_model_that_would_run_code_is_refused_as_such_not_as_damage(models, tmp_path):
    """A .keras holding a Lambda layer was refused by safe mode, but named "not a readable Keras model ...
    If you trust the" (cut off) with the fix "give an intact .keras file": tampering read as a flipped byte."""
    import keras

    from encoderflow.errors import EncoderflowError

    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    said = rf"^{path}: refused: loading it would run Python code it carries"
    with pytest.raises(EncoderflowError, match=said) as err:
        models.load(path)
    assert "not written by encoderflow or has been altered" in str(err.value)
    assert err.value.fix.startswith("do not load it: give a .keras file encoderflow wrote (for pretrain.init_from")
    # A Lambda over a named function: Keras's bare TypeError, which the task retried as "a bug or an outage".
    named = tmp_path / "named.keras"
    keras.Model(inputs, keras.layers.Lambda(_doubled)(inputs)).save(named)
    with pytest.raises(EncoderflowError, match=rf"^{named}: not a model encoderflow can load: it names code") as err:
        models.load(named)
    assert err.value.fix.startswith("do not load it")


def _doubled(x):
    return x * 2
