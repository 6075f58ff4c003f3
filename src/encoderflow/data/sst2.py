"""GLUE SST-2 as arrays and tf.data pipelines for the baseline and fine-tuning."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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
    from encoderflow.data.tokenizer import cpu_only_tensorflow

    tf = cpu_only_tensorflow()
    ds = tf.data.Dataset.from_tensor_slices((sentences, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(sentences), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size)


def token_dataset(sentences: list[str], labels: np.ndarray, tokenizer, batch_size: int,
                  shuffle_seed: int | None = None):
    """Batches of ``(token_ids, label)`` tokenized by ``tokenizer`` (the guide's ``ft_preprocess``)."""
    from encoderflow.data.tokenizer import cpu_only_tensorflow

    tf = cpu_only_tensorflow()
    ds = text_dataset(sentences, labels, batch_size, shuffle_seed)
    return ds.map(lambda x, y: (tokenizer(x), y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
