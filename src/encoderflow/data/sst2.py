"""GLUE SST-2 as arrays and tf.data pipelines for the baseline and fine-tuning."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from encoderflow import runtime


def read_split(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``sentence<TAB>label`` rows under a header (validated upstream) → sentences, int labels."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    sentences, labels = [], []
    for line in lines[1:]:
        sentence, label = line.split("\t")
        sentences.append(sentence)
        labels.append(int(label))
    return sentences, np.asarray(labels, dtype=np.int32)


def text_dataset(sentences: list[str], labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None):
    """Batches of ``(sentence, label)``; shuffled per epoch when a seed is given."""
    tf = runtime.tensorflow()
    ds = tf.data.Dataset.from_tensor_slices((sentences, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(sentences), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size)


def token_dataset(
    sentences: list[str], labels: np.ndarray, tokenizer, batch_size: int, shuffle_seed: int | None = None
):
    """Batches of ``(token_ids, label)`` tokenized by ``tokenizer`` (the guide's ``ft_preprocess``)."""
    tf = runtime.tensorflow()
    ds = text_dataset(sentences, labels, batch_size, shuffle_seed)
    return ds.map(lambda x, y: (tokenizer(x), y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def bucket_widths(seq_length: int) -> list[int]:
    """Padded widths for length buckets: 16, 32, 64, ... up to ``seq_length``."""
    widths, w = [], 16
    while w < seq_length:
        widths.append(w)
        w *= 2
    return widths + [seq_length]


def bucketed_token_dataset(
    sentences: list[str],
    labels: np.ndarray,
    tokenizer,
    batch_size: int,
    seq_length: int,
    shuffle_seed: int | None = None,
    count_batches: bool = False,
):
    """Batches of sentences of similar length, padded to the bucket width, not to ``seq_length``.

    SST-2 sentences average ~13 WordPiece tokens, so padding every batch to 128 spends most of
    the encoder's work on [PAD]. A handful of fixed widths keeps XLA to one compilation per
    width. Only valid with a padding-masked encoder and masked pooling: the guide's model
    attends to and averages over [PAD], so its outputs depend on the padded length.

    Args:
        tokenizer: an unpadded tokenizer (``sequence_length=None``) returning one id vector per
            sentence; ids beyond ``seq_length`` are cut, as the guide's tokenizer does.
        count_batches: count the batches once and declare them: Keras warns "input ran out of
            data" at the end of every epoch over an unknown-length set. The count does not depend
            on the order (each bucket ends in at most one partial batch), so it is taken on an
            unshuffled copy and the shuffled order of the epochs stays what it was.
    """
    tf = runtime.tensorflow()
    widths = bucket_widths(seq_length)

    # Pad each batch up to its bucket's width so only len(widths) shapes ever reach XLA.
    def to_width(x, y):
        length = tf.shape(x)[1]
        width = tf.reduce_min(tf.boolean_mask(tf.constant(widths), tf.constant(widths) >= length))
        return tf.pad(x, [[0, 0], [0, width - length]]), y

    def batches(ds):
        ds = ds.map(lambda x, y: (tf.cast(tokenizer(x)[:seq_length], tf.int32), y), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.bucket_by_sequence_length(
            element_length_func=lambda x, y: tf.shape(x)[0],
            bucket_boundaries=[w + 1 for w in widths[:-1]],
            bucket_batch_sizes=[batch_size] * len(widths),
            padded_shapes=([None], []),
            pad_to_bucket_boundary=False,
        )
        return ds.map(to_width, num_parallel_calls=tf.data.AUTOTUNE)

    pairs = tf.data.Dataset.from_tensor_slices((sentences, labels))
    if shuffle_seed is None:
        ds = batches(pairs)
    else:
        ds = batches(pairs.shuffle(len(sentences), seed=shuffle_seed, reshuffle_each_iteration=True))
    if count_batches:
        ds = ds.apply(tf.data.experimental.assert_cardinality(int(batches(pairs).reduce(0, lambda n, _: n + 1))))
    return ds.prefetch(tf.data.AUTOTUNE)
