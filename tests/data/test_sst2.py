"""SST-2 input pipelines: the guide's fixed-length batches and length-bucketed batches."""

from __future__ import annotations

import numpy as np
import pytest

from encoderflow.data import sst2
from tests import fixtures_pipeline


def test_bucket_widths():
    assert sst2.bucket_widths(128) == [16, 32, 64, 128]
    assert sst2.bucket_widths(32) == [16, 32]
    assert sst2.bucket_widths(20) == [16, 20]
    assert sst2.bucket_widths(8) == [8]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from encoderflow.data.tokenizer import make_tokenizer

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(fixtures_pipeline.vocab_tokens()) + "\n")
    return make_tokenizer(vocab, None), make_tokenizer(vocab, 40)


def test_bucketed_batches_keep_every_token_at_the_smallest_width(tokenizers):
    from encoderflow.data.tokenizer import tokenize

    unpadded, padded40 = tokenizers
    # Lengths from 1 to ~45 words: some sentences exceed seq_length 40 and must be cut like the guide's.
    sentences = [" ".join(["good"] * n) + " film" for n in range(1, 46)] * 2
    labels = np.arange(len(sentences)) % 2
    expected = sorted(tuple(int(t) for t in row if t) for row in tokenize(padded40, sentences))

    seen, widths = [], set()
    for ids, _ in sst2.bucketed_token_dataset(sentences, labels, unpadded, batch_size=8, seq_length=40):
        ids = ids.numpy()
        widths.add(ids.shape[1])
        longest = int((ids != 0).sum(axis=1).max())
        # The batch is padded to the smallest bucket that holds its longest sentence.
        assert ids.shape[1] == min(w for w in sst2.bucket_widths(40) if w >= longest)
        seen += [tuple(int(t) for t in row if t) for row in ids]
    assert sorted(seen) == expected
    assert widths == {16, 32, 40}


def test_counted_dataset_declares_its_batches(tokenizers):
    import tensorflow as tf

    unpadded, _ = tokenizers
    sentences = ["good film", "bad plot"] * 10
    ds = sst2.bucketed_token_dataset(sentences, np.zeros(20, "int32"), unpadded, 8, 40, count_batches=True)
    assert int(ds.cardinality()) == 3 == sum(1 for _ in ds)
    assert (
        int(sst2.bucketed_token_dataset(sentences, np.zeros(20, "int32"), unpadded, 8, 40).cardinality())
        == tf.data.UNKNOWN_CARDINALITY
    )


def test_counting_a_shuffled_dataset_keeps_its_order_and_holds_every_epoch(tokenizers):
    """Training data is counted too (no Keras "ran out of data" warning per epoch): the count is taken
    on an unshuffled copy, so every epoch's order is the uncounted dataset's, and it matches each epoch."""
    unpadded, _ = tokenizers
    sentences = [" ".join(["good"] * (n % 37 + 1)) for n in range(100)]
    labels = np.arange(100) % 2

    def epochs(**kw):
        ds = sst2.bucketed_token_dataset(sentences, labels, unpadded, 8, 40, shuffle_seed=3, **kw)
        return ds, [[y.numpy().tolist() + [x.shape[1]] for x, y in ds] for _ in range(2)]

    counted, seen = epochs(count_batches=True)
    _, uncounted = epochs()
    assert seen == uncounted and seen[0] != seen[1]  # reshuffled each epoch, the same way either way
    assert int(counted.cardinality()) == len(seen[0]) == len(seen[1])
