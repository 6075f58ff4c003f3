"""The vocabulary as the pipeline reads it is the vocabulary keras-hub's tokenizer reads: same tokens, same ids."""

from __future__ import annotations

from encoderflow.config import from_overrides
from encoderflow.data.tokenizer import SPECIAL_TOKENS, Vocab, make_tokenizer, train_vocabulary


def test_vocab_load_reads_the_file_as_keras_hub_does(tmp_path):
    import keras_hub

    path = tmp_path / "vocab.txt"
    # U+2028 and U+0085 break lines for str.splitlines, not for a file's lines; trailing blanks go.
    tokens = [*SPECIAL_TOKENS, "alpha\u2028beta", "gamma\x85", "delta  ", "eps\r\n", "zeta"]
    path.write_text("".join(t if t.endswith("\n") else t + "\n" for t in tokens), encoding="utf-8")
    theirs = keras_hub.tokenizers.WordPieceTokenizer(vocabulary=str(path)).get_vocabulary()
    ours = Vocab.load(path)
    assert list(ours.tokens) == list(theirs)
    assert ours.size == len(theirs) == len(tokens) and ours.tokens[-1] == "zeta" and ours.pad_id == 0


def test_a_trained_vocabulary_reads_back_as_written_and_matches_what_it_learned(tmp_path):
    """Trained on text holding U+2028: the piece 'alpha\u2028beta' is a word to the tokenizer too; pieces
    ending in it would read back stripped ('' or a second '##'), so they are left out."""
    corpus = tmp_path / "train.txt"
    corpus.write_text(
        "".join(f"alpha\u2028beta gamma{i % 7} delta\u2028 eps zeta words here\n" for i in range(60)), encoding="utf-8"
    )
    cfg = from_overrides("smoke", {"inputs.vocab": "trained", "inputs.vocab_size": 200})
    path = train_vocabulary(corpus, "0" * 64, cfg.inputs, cfg.data.lowercase, cfg.data.strip_accents)
    written = path.read_text(encoding="utf-8").split("\n")[:-1]
    vocab = Vocab.load(path)
    assert list(vocab.tokens) == written and len(set(written)) == len(written) and all(written)
    assert vocab.tokens[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS and "alpha\u2028beta" in vocab.tokens
    tokenizer = make_tokenizer(path, None, cfg.data.lowercase, cfg.data.strip_accents)
    assert tokenizer.vocabulary_size() == vocab.size
    ids = [int(i) for i in tokenizer("alpha\u2028beta")]
    assert [vocab.tokens[i] for i in ids] == ["alpha\u2028beta"]
    # And the vocabulary suite takes it as it is.
    from encoderflow import layout
    from encoderflow.data import validation

    info = {
        "dataset": "vocab",
        "kind": "trained_vocab",
        "files": {"vocab.txt": {"path": str(path), "sha256": layout.sha256_file(path)}},
    }
    report = validation.validate_dataset(info, tmp_path / "docs")
    assert report["success"], report["failures"]


def test_a_trained_vocabulary_says_whether_it_was_trained_or_reused(tmp_path, caplog):
    import logging

    corpus = tmp_path / "train.txt"
    corpus.write_text("".join(f"some words here number{i % 9}\n" for i in range(40)), encoding="utf-8")
    cfg = from_overrides("smoke", {"inputs.vocab": "trained", "inputs.vocab_size": 100})
    with caplog.at_level(logging.INFO, logger="encoderflow.data.tokenizer"):
        first = train_vocabulary(corpus, "1" * 64, cfg.inputs, cfg.data.lowercase, cfg.data.strip_accents)
        again = train_vocabulary(corpus, "1" * 64, cfg.inputs, cfg.data.lowercase, cfg.data.strip_accents)
    size = Vocab.load(first).size
    assert again == first and len(caplog.messages) == 3, caplog.messages
    assert caplog.messages[0].startswith(f"vocabulary: trained {size} WordPiece tokens (inputs.vocab_size=100) on ")
    # 40 short lines cannot give 100 tokens: said once, as a warning with the way out.
    assert size < 50 and [r.levelname for r in caplog.records] == ["INFO", "WARNING", "INFO"]
    assert caplog.messages[1] == (
        f"vocabulary: the corpus yields {size} tokens, under half the inputs.vocab_size=100 asked: its words "
        "will be cut into pieces and characters; give more text, or lower inputs.vocab_size"
    )
    assert caplog.messages[2].startswith("vocabulary: trained already for this text and settings (key ")
    assert caplog.messages[2].endswith(f"), reused: {first}")
