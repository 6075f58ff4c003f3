"""Your own data, tiny: a corpus folder of text files and a 3-class labeled JSONL under other column names
(and a 2-class review CSV, ``id,review,sentiment``, as spreadsheets and pandas export one).

The labeled task is learnable from one cue word per class, so a smoke model separates it well
above chance (a third); the corpus uses the same words, so a vocabulary trained on it covers them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CLASSES = {
    "billing": ["invoice", "refund", "charge", "payment"],
    "bug": ["crash", "error", "broken", "freeze"],
    "praise": ["love", "thanks", "great", "awesome"],
}
FILLER = ["the", "app", "my", "account", "today", "again", "please", "help", "it", "with", "and", "team", "support"]


def ticket(label: str, rng: random.Random) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
    words.insert(rng.randint(0, len(words)), rng.choice(CLASSES[label]))
    return " ".join(words)


def write_corpus(root: Path, n_files: int = 24, seed: int = 0) -> Path:
    """``n_files`` text files (one document each), a sub-folder included; paragraphs split by blank lines."""
    rng = random.Random(seed)
    vocab = [w for words in CLASSES.values() for w in words] + FILLER
    for i in range(n_files):
        path = root / ("notes" if i % 3 == 0 else "") / f"doc-{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        paragraphs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(30, 60))) + " ." for _ in range(4)]
        path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return root


def labeled_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    labels = list(CLASSES)
    return [{"id": str(i), "body": ticket(labels[i % 3], rng), "category": labels[i % 3]} for i in range(n)]


def write_labeled(root: Path, n_train: int = 240, n_dev: int = 48, seed: int = 0) -> Path:
    """``train.jsonl`` and ``dev.jsonl`` with keys ``id``, ``body`` (text) and ``category`` (label)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("dev", n_dev, 1)):
        rows = labeled_rows(n, seed + offset)
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def write_data_file(path: Path, corpus: Path, labeled: Path, **inputs) -> Path:
    """The YAML declaration a user keeps in git (relative paths are taken from its folder)."""
    settings = {"text_column": "body", "label_column": "category", **inputs}
    lines = [f"corpus: {corpus}", f"labeled: {labeled}", "inputs:"]
    lines += [f"  {k}: {v}" for k, v in settings.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


REVIEW_WORDS = ["a", "film", "with", "lengthy", "dialogue", "scenes", "and", "fine", "acting", "plot", "dull", "great"]
REVIEWS = {"text_column": "review", "label_column": "sentiment"}


def review_rows(n: int, seed: int) -> list[list[str]]:
    """``[id, review, sentiment]`` rows; each review holds a comma, so a CSV writer quotes it (as in IMDB exports)."""
    rng = random.Random(seed)
    return [
        [str(i), " ".join(rng.choice(REVIEW_WORDS) for _ in range(8)) + f", take {i}", ("neg", "pos")[i % 2]]
        for i in range(n)
    ]


def write_reviews_csv(root: Path, n_train: int = 60, n_dev: int = 20, seed: int = 0) -> Path:
    """``train.csv`` and ``dev.csv`` with the header ``id,review,sentiment`` (RFC 4180, as ``csv`` writes it)."""
    import csv
    import io

    root.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("dev", n_dev, 1)):
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["id", "review", "sentiment"])
        writer.writerows(review_rows(n, seed + offset))
        (root / f"{split}.csv").write_text(out.getvalue(), encoding="utf-8")
    return root
