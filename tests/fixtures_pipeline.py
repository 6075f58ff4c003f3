"""Small, valid stand-ins for the three datasets, packed like the official archives.

The SST-2 fixture is trivially learnable (sentiment carried by a handful of words), so a smoke
model separates it well above chance and a deliberately untrained one does not: that is what lets
the end-to-end test tell a better run from a worse one.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

POSITIVE = ["good", "great", "wonderful", "delightful", "moving", "brilliant"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "tedious"]
NEUTRAL = [
    "the",
    "film",
    "movie",
    "story",
    "a",
    "is",
    "was",
    "and",
    "plot",
    "acting",
    "it",
    "this",
    "of",
    "cast",
    "score",
    "scenes",
    "ending",
    "director",
    "very",
    "quite",
]
WIKI_WORDS = [
    "history",
    "river",
    "city",
    "king",
    "war",
    "music",
    "album",
    "team",
    "season",
    "built",
    "church",
    "north",
    "south",
    "year",
    "first",
    "league",
    "song",
    "released",
    "born",
    "game",
    "in",
    "on",
    "to",
    "by",
    "with",
    "as",
    "at",
    "for",
    "from",
    "he",
    "she",
    "his",
    "her",
    "which",
    "were",
    "later",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocab_tokens() -> list[str]:
    words = sorted(set(POSITIVE + NEGATIVE + NEUTRAL + WIKI_WORDS))
    chars = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,=-'" if c not in words]
    return SPECIAL + words + chars + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


def sst2_rows(n: int, rng: random.Random) -> list[tuple[str, int]]:
    rows = []
    for i in range(n):
        label = i % 2
        cue = rng.choice(POSITIVE if label else NEGATIVE)
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), cue)
        rows.append((" ".join(words) + f" {i} ", label))
    return rows


def wiki_text(n_articles: int, rng: random.Random) -> str:
    lines = [" "]
    for a in range(n_articles):
        lines += [f" = Article {a} = ", " "]
        for _ in range(6):
            lines.append(" " + " ".join(rng.choice(WIKI_WORDS) for _ in range(rng.randint(20, 40))) + " . ")
            lines.append(" ")
    return "\n".join(lines) + "\n"


def write_tree(root: Path, seed: int = 0) -> Path:
    """The offline layout (as the archives extract) under ``root``."""
    rng = random.Random(seed)
    (root / "SST-2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 400), ("dev", 64)):
        body = "".join(f"{s}\t{y}\n" for s, y in sst2_rows(n, rng))
        (root / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + body)
    test = "".join(f"{i}\t{s}\n" for i, (s, _) in enumerate(sst2_rows(32, rng)))
    (root / "SST-2" / "test.tsv").write_text("index\tsentence\n" + test)
    (root / "wikitext-103-raw").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 12), ("valid", 4), ("test", 4)):
        (root / "wikitext-103-raw" / f"wiki.{split}.raw").write_text(wiki_text(n, rng))
    (root / "bert_vocab_uncased.txt").write_text("\n".join(vocab_tokens()) + "\n")
    return root


def _zip(src_root: Path, folder: str, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((src_root / folder).iterdir()):
            zf.write(path, f"{folder}/{path.name}")
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_archives(tree: Path, served: Path) -> Path:
    """Pack ``tree`` like the official downloads into ``served`` and write a sources file for them.

    Returns:
        The sources JSON (pinned sha256 of these archives; URLs are supplied as ``--mirror``).
    """
    served.mkdir(parents=True, exist_ok=True)
    wiki = _zip(tree, "wikitext-103-raw", served / "wikitext-103-raw-v1.zip")
    sst = _zip(tree, "SST-2", served / "SST-2.zip")
    vocab = served / "bert_vocab_uncased.txt"
    vocab.write_bytes((tree / "bert_vocab_uncased.txt").read_bytes())
    sources = {
        # No official URL for fixtures: only the mirror may serve them.
        "wikitext": {"urls": [], "known_hash": f"sha256:{sha256(wiki)}", "size": wiki.stat().st_size},
        "sst2": {"urls": [], "known_hash": f"sha256:{sha256(sst)}", "size": sst.stat().st_size},
        "vocab": {"urls": [], "known_hash": f"sha256:{sha256(vocab)}", "size": vocab.stat().st_size},
    }
    path = served.parent / "sources.json"
    path.write_text(json.dumps(sources, indent=2))
    return path


class _QuietHandler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, fmt, *args):  # keep test output readable
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@contextmanager
def serve(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``directory`` on 127.0.0.1 (a free port); yields the base URL and the request log."""
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
