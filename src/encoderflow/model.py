"""The guide's encoder, its masked-LM pretraining model and the SST-2 classifier (keras-hub layers).

Import this module only inside tasks: it imports Keras (JAX backend).
"""

from __future__ import annotations

import os

from encoderflow import runtime

runtime.use_jax()  # before the first ``import keras`` of the process, or Keras picks its default backend
runtime.tensorflow(optional=True)  # keras-hub imports TensorFlow: do it first, GPUs hidden, notes logged

import keras  # noqa: E402
import keras_hub  # noqa: E402

from encoderflow.config import ModelConfig  # noqa: E402


@keras.saving.register_keras_serializable(package="encoderflow")
class PaddingMask(keras.layers.Layer):
    """Boolean mask of real tokens: ``token_ids != pad_id``.

    Args:
        pad_id: id of ``[PAD]`` in the vocabulary.
    """

    def __init__(self, pad_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.pad_id = pad_id

    def call(self, token_ids):
        return keras.ops.not_equal(token_ids, self.pad_id)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, token_ids):
        return keras.KerasTensor(token_ids.shape, dtype="bool")

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}


@keras.saving.register_keras_serializable(package="encoderflow")
class MaskedMeanPooling(keras.layers.Layer):
    """Average of the encoder outputs over real tokens only (``[PAD]`` positions excluded)."""

    def call(self, sequence, mask):
        weights = keras.ops.expand_dims(keras.ops.cast(mask, sequence.dtype), -1)
        total = keras.ops.sum(sequence * weights, axis=1)
        count = keras.ops.maximum(keras.ops.sum(weights, axis=1), 1.0)
        return total / count

    def compute_output_shape(self, sequence_shape, mask_shape=None):
        return (sequence_shape[0], sequence_shape[-1])


def build_encoder(cfg: ModelConfig, vocab_size: int, seq_length: int, pad_id: int = 0) -> keras.Model:
    """Token + position embedding, LayerNorm, dropout, then ``num_layers`` Transformer encoders.

    With ``cfg.padding_mask`` the encoder attends to real tokens only; without it, it is the
    guide's model exactly (padding attended to). ``cfg.normalize_first`` makes the blocks pre-norm
    and adds a final LayerNorm.

    Returns:
        A functional model ``token_ids [batch, length] -> [batch, length, model_dim]`` for any
        ``length <= seq_length`` (position embeddings are sliced), so fine-tuning can feed
        sequences cut to the data instead of always ``seq_length``.
    """
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    embedding = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=vocab_size,
        sequence_length=seq_length,
        embedding_dim=cfg.model_dim,
        name="token_and_position_embedding",
    )
    x = embedding(token_ids)
    x = keras.layers.LayerNormalization(epsilon=cfg.norm_epsilon, name="embeddings_layer_norm")(x)
    x = keras.layers.Dropout(rate=cfg.dropout, name="embeddings_dropout")(x)
    padding_mask = PaddingMask(pad_id, name="padding_mask")(token_ids) if cfg.padding_mask else None
    for i in range(cfg.num_layers):
        x = keras_hub.layers.TransformerEncoder(
            intermediate_dim=cfg.intermediate_dim,
            num_heads=cfg.num_heads,
            dropout=cfg.dropout,
            layer_norm_epsilon=cfg.norm_epsilon,
            normalize_first=cfg.normalize_first,
            name=f"transformer_layer_{i}",
        )(x, padding_mask=padding_mask)
    if cfg.normalize_first:  # pre-norm blocks leave the residual stream un-normalised
        x = keras.layers.LayerNormalization(epsilon=cfg.norm_epsilon, name="final_layer_norm")(x)
    return keras.Model(token_ids, x, name="encoder")


def describe(cfg: ModelConfig) -> str:
    """The encoder's shape as a log line says it: ``3 layers of width 256 (4 heads, feed-forward 512),
    post-norm, dropout 0.1``. A preset's choices (the recipe's pre-norm) were in no log line."""
    norm = "pre-norm (a final layer norm)" if cfg.normalize_first else "post-norm (the guide's)"
    return (
        f"{cfg.num_layers} layer{'s' * (cfg.num_layers != 1)} of width {cfg.model_dim} ({cfg.num_heads} heads, "
        f"feed-forward {cfg.intermediate_dim}), {norm}, dropout {cfg.dropout:g}"
    )


def with_dropout(encoder: keras.Model, cfg: ModelConfig, pad_id: int = 0) -> keras.Model:
    """``encoder`` itself when its dropout is ``cfg.dropout``, else the same weights in an encoder
    built with ``cfg.dropout`` (pretraining may run at another rate than fine-tuning)."""
    if float(encoder.get_layer("embeddings_dropout").rate) == float(cfg.dropout):
        return encoder
    rebuilt = build_encoder(cfg, int(token_embedding(encoder).input_dim), max_length(encoder), pad_id)
    rebuilt.set_weights(encoder.get_weights())
    return rebuilt


def token_embedding(encoder: keras.Model):
    return encoder.get_layer("token_and_position_embedding").token_embedding


def max_length(encoder: keras.Model) -> int:
    """The longest sequence the encoder's position embedding covers."""
    return int(encoder.get_layer("token_and_position_embedding").position_embedding.sequence_length)


def build_pretraining_model(encoder: keras.Model, predictions_per_seq: int) -> keras.Model:
    """Encoder plus a MaskedLMHead tied to the encoder's token embedding (the guide's model).

    The head returns logits over the vocabulary (the guide's head applies a softmax; its loss then
    takes probabilities): compile with ``from_logits=True``, as ``train.pretrain.compile_mlm`` does.
    """
    seq_length = max_length(encoder)
    inputs = {
        "token_ids": keras.Input(shape=(seq_length,), dtype="int32", name="token_ids"),
        "mask_positions": keras.Input(shape=(predictions_per_seq,), dtype="int32", name="mask_positions"),
    }
    encoded = encoder(inputs["token_ids"])
    outputs = keras_hub.layers.MaskedLMHead(
        token_embedding=token_embedding(encoder),
        # Logits: the loss applies the softmax (from_logits=True), stable under bfloat16.
        activation=None,
        name="mlm_head",
    )(encoded, mask_positions=inputs["mask_positions"])
    return keras.Model(inputs, outputs, name="pretraining_model")


def build_classifier(
    encoder: keras.Model, pad_id: int = 0, masked_pooling: bool = True, num_classes: int = 2
) -> keras.Model:
    """Encoder, mean pooling, and one sigmoid unit (two classes, the guide) or a softmax over ``num_classes``.

    The guide pooled ``encoded_tokens[0]``, which on Keras 3.15 indexes the batch axis of a
    single-output model; pooling the encoder output itself is what it meant.

    Args:
        masked_pooling: average over real tokens only; ``False`` is the guide's plain average,
            ``[PAD]`` positions included.
        num_classes: size of the label set; 2 keeps the guide's single sigmoid unit.
    """
    # Any length up to the encoder's: fine-tuning feeds length buckets, serving pads to the max.
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    encoded = encoder(token_ids)
    if masked_pooling:
        mask = PaddingMask(pad_id, name="pooling_mask")(token_ids)
        pooled = MaskedMeanPooling(name="pooled_tokens")(encoded, mask)
    else:
        pooled = keras.layers.GlobalAveragePooling1D(name="pooled_tokens")(encoded)
    # Both heads in float32 (Keras's mixed-precision rule for the last layer): a bfloat16 sigmoid
    # rounds every probability within ~0.002 of 0.5 to 0.5 itself, where thresholds disagree.
    if num_classes <= 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="sentiment")(pooled)
        return keras.Model(token_ids, outputs, name="sst2_classifier")
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="classes")(pooled)
    return keras.Model(token_ids, outputs, name="classifier")


def load(path: str | os.PathLike) -> keras.Model:
    """Load a saved model in Keras safe mode (no lambdas, no arbitrary code).

    Raises:
        EncoderflowError: the file is missing, damaged or not a Keras model; the message names it. A
            damaged file is bad input, not an outage: retrying cannot help.
    """
    import zipfile

    from encoderflow.errors import EncoderflowError

    not_ours = (
        "do not load it: give a .keras file encoderflow wrote (for pretrain.init_from, another encoder, or none; "
        "for a run's model, re-run the step that wrote it, or serve another version: encoderflow rollback, or "
        "promote --version N)"
    )
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except TypeError as exc:
        # A layer or function Keras cannot find here (a Lambda over a named function, a custom class): not a
        # model encoderflow wrote, which holds only Keras's, keras-hub's and this module's registered layers.
        # Retrying cannot find it either.
        raise EncoderflowError(
            f"{path}: not a model encoderflow can load: it names code that is not Keras's, keras-hub's or "
            f"encoderflow's (TypeError: {str(exc).splitlines()[0][:160]})",
            fix=not_ours,
        ) from None
    except (zipfile.BadZipFile, OSError, KeyError, ValueError) as exc:
        if "safe_mode" in str(exc):
            # Not damage: a model that would run code of its own when loaded, which no encoderflow model does.
            raise EncoderflowError(
                f"{path}: refused: loading it would run Python code it carries (Keras safe mode: "
                f"{str(exc).split('.')[0][:160]}); encoderflow's models hold none, so this file was not written "
                "by encoderflow or has been altered",
                fix=not_ours,
            ) from None
        raise EncoderflowError(
            f"{path}: not a readable Keras model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            fix="give an intact .keras file: re-run the step that wrote it, or, for a registered version, "
            "serve another (encoderflow rollback, or promote --version N)",
        ) from None
