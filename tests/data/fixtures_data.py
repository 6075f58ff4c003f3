"""Tiny, valid copies of the input files, laid out like the offline data folder.

Small enough to validate in well under a second, shaped like the genuine files (GLUE headers and
the space before the tab, WikiText's ` = Title = ` lines and blank " " lines, BERT's special tokens
first) so that every expectation of the smoke preset passes and each corruption trips exactly one
thing on purpose.
"""

from __future__ import annotations

from pathlib import Path

ADJECTIVES = ["gripping", "dull", "warm", "clumsy", "witty", "tedious", "moving", "bland", "sharp", "limp"]
NOUNS = ["story", "script", "cast", "score", "ending", "premise", "pace", "look", "plot", "finale"]

TRAIN = "SST-2/train.tsv"
DEV = "SST-2/dev.tsv"
TEST = "SST-2/test.tsv"
WIKI_TEST = "wikitext-103-raw/wiki.test.raw"
WIKI_VALID = "wikitext-103-raw/wiki.valid.raw"
VOCAB = "bert_vocab_uncased.txt"

VOCAB_TOKENS = [
    "[PAD]",
    "[unused0]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "a",
    "film",
    "##s",
    "good",
    "bad",
    ",",
    ".",
]


def sentences(n: int, offset: int = 0) -> list[str]:
    """Distinct short review phrases (the suite wants >= 95 % unique sentences)."""
    out = []
    for i in range(offset, offset + n):
        out.append(f"a {ADJECTIVES[i % 10]} {NOUNS[(i // 10) % 10]} , take {i} ")  # GLUE keeps the space
    return out


def sst2_labeled(n: int = 20, offset: int = 0) -> str:
    rows = [f"{s}\t{i % 2}" for i, s in enumerate(sentences(n, offset))]  # balanced: mean label 0.5
    return "sentence\tlabel\n" + "\n".join(rows) + "\n"


def sst2_test(n: int = 20) -> str:
    rows = [f"{i}\t{s.strip()}" for i, s in enumerate(sentences(n, 100))]
    return "index\tsentence\n" + "\n".join(rows) + "\n"


def wikitext(title: str = "Fixture Article") -> str:
    long_line = (
        " The fixture article is long enough that this paragraph runs well past one hundred bytes , "
        "as most of the genuine WikiText paragraphs do . "
    )
    lines = [
        " ",
        f" = {title} = ",
        " ",
        long_line,
        " ",
        " = = Early life = = ",
        " ",
        " A short line . ",
        long_line.replace("fixture", "second"),
        " ",
        " = = Career = = ",
        " ",
        long_line.replace("fixture", "third"),
    ]
    return "\n".join(lines) + "\n"


def vocab(tokens: list[str] | None = None) -> str:
    return "\n".join(VOCAB_TOKENS if tokens is None else tokens) + "\n"


VALID_FILES = {
    TRAIN: sst2_labeled(20),
    DEV: sst2_labeled(20, offset=40),
    TEST: sst2_test(20),
    WIKI_TEST: wikitext("Test Article"),
    WIKI_VALID: wikitext("Valid Article"),
    VOCAB: vocab(),
}


def write_valid_folder(root: Path) -> Path:
    """Write every fixture file under ``root`` in the offline layout; returns ``root``."""
    for member, text in VALID_FILES.items():
        path = root / member
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
