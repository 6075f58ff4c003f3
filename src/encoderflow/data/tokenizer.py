"""WordPiece tokenization on the BERT uncased vocabulary (keras-hub), run by TensorFlow on CPU."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from encoderflow import runtime

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class Vocab:
    """The vocabulary as read from disk, with the ids the pipeline depends on."""

    path: str
    tokens: tuple[str, ...]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        # Read exactly as keras-hub's WordPieceTokenizer reads it (lines on \n or \r, each right-stripped),
        # so a token's id here is its id there; str.splitlines also breaks on U+2028 and kin.
        with open(path, encoding="utf-8") as f:
            return cls(path=str(path), tokens=tuple(line.rstrip() for line in f))

    @property
    def size(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        try:
            return self.tokens.index(token)
        except ValueError:
            raise KeyError(f"vocabulary {self.path} has no {token!r} token") from None

    @property
    def pad_id(self) -> int:
        return self.id("[PAD]")

    def special_ids(self) -> dict[str, int]:
        return {t: self.id(t) for t in SPECIAL_TOKENS}


def make_tokenizer(
    vocab_path: str | os.PathLike, seq_length: int | None, lowercase: bool = True, strip_accents: bool = True
):
    """The guide's tokenizer: WordPiece, truncated and zero-padded to ``seq_length``.

    With ``seq_length=None`` it neither pads nor truncates (one id vector per sentence).
    """
    runtime.tensorflow()  # keras-hub imports TensorFlow: hide its GPUs first
    import keras_hub

    return keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=str(vocab_path),
        sequence_length=seq_length,
        lowercase=lowercase,
        strip_accents=strip_accents,
        dtype="int32",
    )


def tokenize(tokenizer, lines: list[str]):
    """Eager tokenization to a numpy int array (keras-hub hands back backend arrays outside tf.data)."""
    import numpy as np

    tf = runtime.tensorflow()
    out = tokenizer(tf.constant(lines, dtype=tf.string))
    return out.numpy() if hasattr(out, "numpy") else np.asarray(out)


def train_vocabulary(
    text_path: str | os.PathLike, text_sha256: str, inputs, lowercase: bool, strip_accents: bool
) -> Path:
    """A WordPiece vocabulary computed on the corpus's pretraining text, written once per input and settings.

    keras-hub's ``compute_word_piece_vocabulary`` reads the file line by line; the special tokens
    come first, ``[PAD]`` at id 0 as the shards and the padding mask expect. The file lands in
    ``ENCODERFLOW_HOME/data/vocab-trained/<key>/vocab.txt`` (temp file, rename) and is reused.

    Args:
        text_path: the pretraining documents (``data.inputs.corpus_texts``'s ``train``).
        text_sha256: its sha256, part of the key.
        inputs: the ``inputs`` config section (``vocab_size``).
    """
    from encoderflow import layout

    key = layout.sha256_json(
        {
            "text": text_sha256,
            "size": inputs.vocab_size,
            "lowercase": lowercase,
            "strip_accents": strip_accents,
            "special": SPECIAL_TOKENS,
        }
    )
    out = layout.home() / "data" / "vocab-trained" / key[:16] / "vocab.txt"
    if out.exists():
        log.info("vocabulary: trained already for this text and settings (key %s), reused: %s", key[:16], out)
        return out
    t0 = time.monotonic()
    runtime.tensorflow()
    import keras_hub

    tokens = keras_hub.tokenizers.compute_word_piece_vocabulary(
        [str(text_path)],
        inputs.vocab_size,
        lowercase=lowercase,
        strip_accents=strip_accents,
        reserved_tokens=list(SPECIAL_TOKENS),
    )
    # Pieces must read back as written: the trainer can end one with Unicode whitespace that is no
    # line break ('\u2028', '##\u2028'), which the reader strips into '' or a duplicate '##'. Inside
    # a piece it stays ('alpha\u2028beta'): the tokenizer does not split text on U+2028 either.
    kept = [t for t in tokens if t and t == t.rstrip() and "\r" not in t and "\n" not in t]
    out.parent.mkdir(parents=True, exist_ok=True)
    with layout.atomic_path(out) as tmp:
        tmp.write_text("".join(f"{t}\n" for t in kept), encoding="utf-8")
    log.info(
        "vocabulary: trained %d WordPiece tokens (inputs.vocab_size=%d) on %s in %.1fs: %s",
        len(kept),
        inputs.vocab_size,
        text_path,
        time.monotonic() - t0,
        out,
    )
    if len(kept) < inputs.vocab_size / 2:
        # Not an error: a small corpus is a legitimate trial. But a model on a vocabulary of mostly
        # characters is not what inputs.vocab_size promised, and nothing else would say so.
        log.warning(
            "vocabulary: the corpus yields %d tokens, under half the inputs.vocab_size=%d asked: its words "
            "will be cut into pieces and characters; give more text, or lower inputs.vocab_size",
            len(kept),
            inputs.vocab_size,
        )
    return out
