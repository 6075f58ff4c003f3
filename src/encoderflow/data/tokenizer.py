"""WordPiece tokenization on the BERT uncased vocabulary (keras-hub), run by TensorFlow on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from encoderflow import runtime

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class Vocab:
    """The vocabulary as read from disk, with the ids the pipeline depends on."""

    path: str
    tokens: tuple[str, ...]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        text = Path(path).read_text(encoding="utf-8")
        return cls(path=str(path), tokens=tuple(text.splitlines()))

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
