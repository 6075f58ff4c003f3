"""Masked-LM examples written once into TFRecord shards, BERT ``create_pretraining_data`` style.

Plan → build one shard per mapped task → seal with a manifest written last. Every random choice
comes from one ``numpy.random.Generator`` per shard, seeded from (seed, split, copy, index) and
passed explicitly, so the same inputs and config give byte-identical shards.

Record schema (one ``tf.train.Example`` per sequence):
    token_ids       int64[seq_length]            masked input, 0-padded
    mask_positions  int64[predictions_per_seq]   positions of predicted tokens, 0-padded
    mask_ids        int64[predictions_per_seq]   original ids at those positions (labels)
    mask_weights    float[predictions_per_seq]   1.0 for real predictions, 0.0 for padding
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from encoderflow import layout, runtime
from encoderflow.config import Config, DataConfig
from encoderflow.errors import EncoderflowError
from encoderflow.results import only_file, split_info

log = logging.getLogger(__name__)

# 2: exactly min(ceil(rate * selectable), cap) predictions per row, as the guide's tf.data masking
# (1 chose each token with probability rate); the version is in the shards' hash, so sets rebuild.
FORMAT_VERSION = 2
SPLIT_CODES = {"train": 0, "valid": 1}
SOURCE_CODES = {"sst2": 1}
MASK_TOKEN_RATE = 0.8
RANDOM_TOKEN_RATE = 0.1
MANIFEST = "manifest.json"


class ShardError(EncoderflowError):
    """Shards that do not match the config or their manifest; the message says which value."""


def eligible_lines(path: str | os.PathLike, min_chars: int) -> list[str]:
    """The guide's filter: lines whose UTF-8 byte length exceeds ``min_chars`` (tf.strings.length)."""
    st = os.stat(path)
    # Every shard of a set scans the same file for its slice: one scan per process and file
    # version (size and mtime in the key), not one per shard.
    return list(_eligible_lines(str(path), st.st_size, st.st_mtime_ns, min_chars))


@functools.lru_cache(maxsize=2)
def _eligible_lines(path: str, size: int, mtime_ns: int, min_chars: int) -> tuple[str, ...]:
    with open(path, "rb") as f:
        return tuple(raw.rstrip(b"\n").decode("utf-8") for raw in f if len(raw.rstrip(b"\n")) > min_chars)


# A top-level WikiText heading (" = Title = "); section headings have doubled "= =".
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def articles(path: str | os.PathLike, split: str = "heading") -> list[list[str]]:
    """Each document's non-blank lines; blank lines hold no tokens.

    Args:
        split: ``heading``: a WikiText article starts at its top-level heading (kept); ``blank_line``:
            a blank line ends a document (your own corpus, as ``data.inputs.corpus_texts`` writes it).
    """
    out: list[list[str]] = []
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\n").decode("utf-8")
            starts = _ARTICLE_HEADING.match(line) if split == "heading" else not line.strip()
            if starts or not out:
                out.append([])
            if line.strip():
                out[-1].append(line)
    return [a for a in out if a]


def sentences(labeled: dict[str, Any]) -> list[str]:
    """The texts of the labeled train split, labels dropped (task-adaptive pretraining text)."""
    from encoderflow.data.inputs import read_labeled

    return read_labeled(labeled, "train")[0]


def pack(token_lists: list[list[int]], seq_length: int, pad_id: int) -> np.ndarray:
    """One article's tokens, concatenated and cut into consecutive windows; the last one padded."""
    flat = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int64)
    n = max(1, math.ceil(len(flat) / seq_length))
    out = np.full(n * seq_length, pad_id, dtype=np.int64)
    out[: len(flat)] = flat
    return out.reshape(n, seq_length)


def mask_batch(
    token_ids: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    mask_id: int,
    unselectable_ids: tuple[int, ...],
    mask_rate: float,
    predictions_per_seq: int,
    mask_token_rate: float = MASK_TOKEN_RATE,
    random_token_rate: float = RANDOM_TOKEN_RATE,
) -> dict[str, np.ndarray]:
    """BERT-style static masking with the semantics of keras-hub's ``MaskedLMMaskGenerator`` in tf.data.

    Each row gets exactly ``min(ceil(mask_rate * selectable), predictions_per_seq)`` predictions at
    a uniformly random subset of its selectable positions: what the generator does on its
    TensorFlow path (``tensorflow_text.RandomItemSelector``), the path the guide's ``tf.data`` map
    takes. (Its eager Python path flips a coin per token instead, ~5% fewer predictions on
    WikiText.) A chosen token becomes ``[MASK]`` (80%), a uniformly random id (10%) or stays (10%).

    Args:
        token_ids: int array ``[batch, seq_length]``.
        rng: the shard's generator; the only source of randomness.

    Returns:
        Dict of ``token_ids``, ``mask_positions`` (ascending), ``mask_ids``, ``mask_weights``.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    batch, length = ids.shape
    p = predictions_per_seq
    selectable = ~np.isin(ids, np.asarray(unselectable_ids, dtype=np.int64))
    # float32 as tensorflow_text computes it, so the count matches at rates like 0.15 too.
    wanted = np.ceil(selectable.sum(axis=1).astype(np.float32) * np.float32(mask_rate)).astype(np.int64)
    count = np.minimum(wanted, p)
    # Random priorities order the selectable tokens; the first ``count`` of a row are its subset.
    priority = np.where(selectable, rng.random((batch, length)), 2.0)
    order = np.argsort(priority, axis=1, kind="stable")[:, :p]
    if order.shape[1] < p:
        order = np.pad(order, ((0, 0), (0, p - order.shape[1])), constant_values=0)
    kept = np.arange(p)[None, :] < count[:, None]
    positions = np.sort(np.where(kept, order, length), axis=1)
    weights = positions < length
    positions = np.where(weights, positions, 0)
    labels = np.where(weights, np.take_along_axis(ids, positions, axis=1), 0)

    action = rng.random((batch, p))
    random_ids = rng.integers(0, vocab_size, size=(batch, p))
    replaced = np.where(
        action < mask_token_rate, mask_id, np.where(action < mask_token_rate + random_token_rate, random_ids, labels)
    )
    masked = ids.copy()
    rows = np.broadcast_to(np.arange(batch)[:, None], positions.shape)
    masked[rows[weights], positions[weights]] = replaced[weights]
    return {
        "token_ids": masked,
        "mask_positions": positions.astype(np.int64),
        "mask_ids": labels.astype(np.int64),
        "mask_weights": weights.astype(np.float32),
    }


def shards_hash(cfg: DataConfig, vocab_sha256: str, text_sha256: dict[str, str]) -> str:
    """Content address of a shard set: data config, exact inputs and record format."""
    import dataclasses

    data = dataclasses.asdict(cfg)
    # Line mode is what every set built before the field existed holds: keep their addresses.
    if data.get("sequence_mode") == "line":
        del data["sequence_mode"]
    if data.get("task_adaptive") is False:  # likewise for sets built before task-adaptive text existed
        del data["task_adaptive"]
    return layout.sha256_json(
        {
            "format": FORMAT_VERSION,
            "data": data,
            "vocab": vocab_sha256,
            "text": text_sha256,
        }
    )


def plan(
    cfg: Config, corpus: dict[str, Any], vocab: dict[str, Any], labeled: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Split the corpus into shards. Returns the plan; ``shards`` is the mapped-task input.

    With ``data.task_adaptive`` the labeled data's train texts (never dev or test) become train
    shards of their own, ``train-sst2-...``, packed into windows.
    """
    from encoderflow.data.inputs import SST2_COLUMNS, corpus_texts

    d = cfg.data
    vocab_file = only_file(vocab)
    texts = corpus_texts(corpus, cfg)
    hashed = {role: t["sha256"] for role, t in texts.items()}
    # Your own corpus is written one document per blank-line-separated block; WikiText has headings.
    doc_split = "blank_line" if corpus.get("kind") == "corpus_folder" else "heading"
    tapt = None
    if d.task_adaptive:
        if labeled is None:
            raise ShardError("data.task_adaptive=true needs the labeled data: pass validate_labeled's result to plan")
        tapt = {**split_info(labeled, "train"), "record": labeled}
        hashed["task_adaptive"] = tapt["sha256"]
        read_as = {"format": labeled.get("format", "tsv"), "text": labeled.get("columns", SST2_COLUMNS)["text"]}
        # The same file read through another column is other text; the TSV's sentence column
        # (SST-2's, the default) keeps the address of the sets built before this was hashed.
        if read_as != {"format": "tsv", "text": SST2_COLUMNS["text"]}:
            hashed["task_adaptive"] = layout.sha256_json({"sha256": tapt["sha256"], **read_as})
    h = shards_hash(d, vocab_file["sha256"], hashed)
    out_dir = layout.shards_dir(h)
    shards: list[dict[str, Any]] = []
    packed = d.sequence_mode == "packed"
    # Packed shards split the text between articles, so no window straddles two shards.
    start_key, end_key = ("article_start", "article_end") if packed else ("line_start", "line_end")
    # Your own corpus's texts are files made from its documents: a message names the folder you gave too.
    of = f" (the documents of {corpus['location']})" if corpus.get("kind") == "corpus_folder" else ""
    for role, text in texts.items():
        # Units a shard boundary may fall between: articles (packed) or eligible lines.
        if packed:
            n_units = len(articles(text["path"], doc_split))
            if n_units == 0:
                raise ShardError(f"{text['path']}{of}: no text; nothing to pretrain on")
        else:
            n_units = len(eligible_lines(text["path"], d.min_line_chars))
            if n_units == 0:
                raise ShardError(
                    f"{text['path']}{of}: no line longer than {d.min_line_chars} bytes; nothing to pretrain on",
                    fix="lower data.min_line_chars, or pretrain on whole documents with data.sequence_mode=packed",
                )
        num = d.num_shards if role == "train" else max(1, math.ceil(d.num_shards / 8))
        num = min(num, n_units)
        copies = d.dupe_factor if role == "train" else 1
        bounds = np.linspace(0, n_units, num + 1).astype(int)
        for copy in range(copies):
            for i in range(num):
                shards.append(
                    {
                        "split": role,
                        "copy": copy,
                        "index": i,
                        "num": num,
                        "text_path": text["path"],
                        "text_sha256": text["sha256"],
                        **({"doc_split": doc_split} if packed and doc_split != "heading" else {}),
                        start_key: int(bounds[i]),
                        end_key: int(bounds[i + 1]),
                        "file": str(out_dir / f"{role}-c{copy:02d}-{i:05d}-of-{num:05d}.tfrecord"),
                    }
                )
    if tapt is not None:
        n_units = len(sentences(tapt["record"]))
        if n_units == 0:
            raise ShardError(f"{tapt['path']}: no sentences for task-adaptive pretraining")
        num = min(d.num_shards, n_units)
        bounds = np.linspace(0, n_units, num + 1).astype(int)
        for copy in range(d.dupe_factor):
            for i in range(num):
                shards.append(
                    {
                        "split": "train",
                        "source": "sst2",
                        "copy": copy,
                        "index": i,
                        "num": num,
                        "text_path": tapt["path"],
                        "text_sha256": tapt["sha256"],
                        "labeled": {
                            k: v
                            for k, v in tapt["record"].items()
                            if k in ("splits", "format", "columns", "files", "labels")
                        },
                        "sentence_start": int(bounds[i]),
                        "sentence_end": int(bounds[i + 1]),
                        "file": str(out_dir / f"train-sst2-c{copy:02d}-{i:05d}-of-{num:05d}.tfrecord"),
                    }
                )
    sealed = (out_dir / MANIFEST).exists()
    log.info(
        "shards plan: %d shards into %s (%s)%s",
        len(shards),
        out_dir,
        "already sealed, will reuse" if sealed else "to build",
        _cap_note(d),
    )
    return {
        "shards_dir": str(out_dir),
        "shards_hash": h,
        "vocab_path": vocab_file["path"],
        "vocab_sha256": vocab_file["sha256"],
        "sealed": sealed,
        "shards": shards,
    }


def _cap_note(d) -> str:
    """What the manifest's ``mask_rate`` does not say: when ``predictions_per_seq`` caps a full row below
    it, as the smoke preset's does (a run's MLM figures are over fewer masked tokens than the rate asks)."""

    def wanted(tokens: int) -> int:  # as mask_batch counts them, in float32
        return math.ceil(float(np.float32(tokens) * np.float32(d.mask_rate)))

    full = d.seq_length - 2  # [CLS] and [SEP] are never masked
    if (asked := wanted(full)) <= d.predictions_per_seq:
        return ""
    uncapped = max(n for n in range(full + 1) if wanted(n) <= d.predictions_per_seq)
    return (
        f"; a full row has {full} tokens to mask, and data.mask_rate {d.mask_rate:g} asks {asked} of them, but "
        f"data.predictions_per_seq caps it at {d.predictions_per_seq} (a masked share of "
        f"{d.predictions_per_seq / full:.3f}): only rows of up to {uncapped} tokens get the rate"
    )


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


@functools.lru_cache(maxsize=4)
def graph_tokenizer(
    vocab_path: str, vocab_sha256: str, seq_length: int | None, lowercase: bool = True, strip_accents: bool = True
):
    """The guide's tokenizer run as one traced graph: ``lines -> int32 [len(lines), seq_length]``.

    Eagerly, keras-hub's WordPieceTokenizer dispatches its tf_text ops one by one and tokenizes
    ~15x slower than the same layer traced; the ids are the same (tested on WikiText). Cached so
    the building process traces once for all its shards, not once per shard; ``vocab_sha256``
    is part of the cache key so a vocabulary rewritten in place is never served stale.
    """
    from encoderflow.data.tokenizer import make_tokenizer

    tf = runtime.tensorflow()
    tokenizer = make_tokenizer(vocab_path, seq_length, lowercase, strip_accents)
    traced = tf.function(tokenizer, input_signature=[tf.TensorSpec([None], tf.string)])

    def tokenize(lines: list[str]):
        out = traced(tf.constant(lines, dtype=tf.string))
        # Untruncated (seq_length None) the ids are ragged: one list per line.
        return out.to_list() if isinstance(out, tf.RaggedTensor) else out.numpy()

    return tokenize


def _tokenized_chunks(tokenize, lines: list[str], chunk: int, part: int = 128, workers: int = 2):
    """``tokenize`` over ``lines`` in order, as int64 arrays of ``chunk`` rows (the last shorter).

    TensorFlow releases the GIL while it tokenizes, so parts of a few hundred lines run on a
    small thread pool, ahead of and alongside the masking and proto writing that hold it
    (measured in benchmarks/shards.py). Ids do not depend on how lines are grouped.
    """
    from concurrent.futures import ThreadPoolExecutor

    if not lines:
        return
    starts = range(0, len(lines), part)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize") as pool:
        # Bounded read-ahead: at most two chunks' parts tokenized but not yet consumed.
        ahead = max(1, 2 * chunk // part)
        futures = [pool.submit(tokenize, lines[i : i + part]) for i in starts[:ahead]]
        submitted = len(futures)
        done: list[np.ndarray] = []
        rows = 0
        while futures:
            ids = np.asarray(futures.pop(0).result(), dtype=np.int64)
            if submitted < len(starts):
                futures.append(pool.submit(tokenize, lines[starts[submitted] : starts[submitted] + part]))
                submitted += 1
            done.append(ids)
            rows += len(ids)
            while rows >= chunk:
                block = np.concatenate(done)
                yield block[:chunk]
                done, rows = [block[chunk:]], len(block) - chunk
        if rows:
            yield np.concatenate(done)


def build_shard(shard: dict[str, Any], cfg: Config, vocab_path: str, vocab_sha256: str | None = None) -> dict[str, Any]:
    """Tokenize, mask and write one shard atomically; reuse it when already complete."""
    from encoderflow.data.tokenizer import Vocab

    d = cfg.data
    path = Path(shard["file"])
    sidecar = _sidecar(path)
    if path.exists() and sidecar.exists():
        info = layout.read_json(sidecar)
        if info.get("sha256") == layout.sha256_file(path):
            log.info(
                "shard %s: complete already (%d records, sha256 %s), reused", path.name, info["records"], info["sha256"]
            )
            return info
        # Written whole and renamed, then altered (truncated, bytes flipped): rebuilt, and said so.
        log.warning("shard %s: differs from the sha256 recorded when it was written: altered, rebuilding it", path)
    if layout.sha256_file(shard["text_path"]) != shard["text_sha256"]:
        raise ShardError(f"{shard['text_path']}: changed since the shard plan (sha256 differs); re-run the DAG")
    if vocab_sha256 and layout.sha256_file(vocab_path) != vocab_sha256:
        raise ShardError(f"{vocab_path}: changed since the shard plan (sha256 differs); re-run the DAG")

    t0 = time.monotonic()
    tf = runtime.tensorflow()
    vocab = Vocab.load(vocab_path)
    special = vocab.special_ids()
    vocab_sha = layout.sha256_file(vocab_path)
    # Masked 1024 sequences at a time: the generator's draws, hence the bytes, depend on it.
    if "sentence_start" in shard:  # task-adaptive text: short sentences, packed in order
        text = sentences(shard["labeled"])[shard["sentence_start"] : shard["sentence_end"]]
        untruncated = graph_tokenizer(str(vocab_path), vocab_sha, None, d.lowercase, d.strip_accents)
        sequences = np.zeros((0, d.seq_length), np.int64)
        if text:
            sequences = pack(untruncated(text), d.seq_length, special["[PAD]"])
        chunks = (sequences[i : i + 1024] for i in range(0, len(sequences), 1024))
    elif "article_start" in shard:
        docs = articles(shard["text_path"], shard.get("doc_split", "heading"))[
            shard["article_start"] : shard["article_end"]
        ]
        untruncated = graph_tokenizer(str(vocab_path), vocab_sha, None, d.lowercase, d.strip_accents)
        windows = [pack(untruncated(doc), d.seq_length, special["[PAD]"]) for doc in docs]
        sequences = np.concatenate(windows) if windows else np.zeros((0, d.seq_length), np.int64)
        chunks = (sequences[i : i + 1024] for i in range(0, len(sequences), 1024))
    else:
        tokenize = graph_tokenizer(str(vocab_path), vocab_sha, d.seq_length, d.lowercase, d.strip_accents)
        lines = eligible_lines(shard["text_path"], d.min_line_chars)[shard["line_start"] : shard["line_end"]]
        chunks = _tokenized_chunks(tokenize, lines, 1024)
    stream = [d.seed, SPLIT_CODES[shard["split"]], shard["copy"], shard["index"]]
    # Task-adaptive shards draw from a stream of their own; WikiText shards keep theirs (and their bytes).
    rng = np.random.default_rng(stream + [SOURCE_CODES[shard["source"]]] if "source" in shard else stream)

    records = tokens = 0
    with layout.atomic_path(path, private=layout.is_private(shard["text_path"])) as tmp:
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for ids in chunks:
                ex = mask_batch(
                    ids,
                    rng,
                    vocab_size=vocab.size,
                    mask_id=special["[MASK]"],
                    unselectable_ids=(special["[PAD]"], special["[CLS]"], special["[SEP]"]),
                    mask_rate=d.mask_rate,
                    predictions_per_seq=d.predictions_per_seq,
                )
                # Protos fill faster from Python ints than from numpy scalars; the bytes are the same.
                rows = {k: v.tolist() for k, v in ex.items()}
                for row in range(ids.shape[0]):
                    writer.write(_example(tf, rows, row))
                records += ids.shape[0]
                tokens += int((ids != special["[PAD]"]).sum())
    info = {
        "file": path.name,
        **({"source": shard["source"]} if "source" in shard else {}),
        "split": shard["split"],
        "copy": shard["copy"],
        "index": shard["index"],
        "records": records,
        "tokens": tokens,
        "bytes": path.stat().st_size,
        "sha256": layout.sha256_file(path),
    }
    layout.write_json(sidecar, info)
    log.info(
        "shard %s: %d records, %d tokens, %s bytes, sha256 %s, %.1fs",
        path.name,
        records,
        tokens,
        f"{info['bytes']:,}",
        info["sha256"],
        time.monotonic() - t0,
    )
    return info


def _example(tf, ex: dict[str, Any], row: int) -> bytes:
    feature = {
        "token_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=ex["token_ids"][row])),
        "mask_positions": tf.train.Feature(int64_list=tf.train.Int64List(value=ex["mask_positions"][row])),
        "mask_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=ex["mask_ids"][row])),
        "mask_weights": tf.train.Feature(float_list=tf.train.FloatList(value=ex["mask_weights"][row])),
    }
    # ``feature`` is a proto map: without ``deterministic`` its key order follows a hash seeded
    # per process, so the same records gave different shard bytes (and sha256) in another process.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def seal(shard_plan: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Verify every shard and write ``manifest.json`` last: its presence means the set is complete.

    A manifest found in place is reused only when it holds what sealing would write: the plan's
    shards and build records, this config's values, the vocabulary's sha256, size and special ids,
    its duplicated values agreeing. Otherwise (edited, damaged) it is written again from the
    verified shards, with a warning: nothing in it is known only to the manifest.
    """
    from encoderflow.data.tokenizer import Vocab

    out_dir = Path(shard_plan["shards_dir"])
    manifest_path = out_dir / MANIFEST
    vocab_path = shard_plan["vocab_path"]
    # The shards' vocabulary: its token count and special ids go into (and check) the manifest.
    if not Path(vocab_path).is_file():
        raise ShardError(f"{vocab_path}: the vocabulary is gone since the shard plan; re-run the DAG")
    if layout.sha256_file(vocab_path) != shard_plan["vocab_sha256"]:
        raise ShardError(f"{vocab_path}: changed since the shard plan (sha256 differs); re-run the DAG")
    vocab = Vocab.load(vocab_path)
    if manifest_path.exists():
        faults = _reuse_faults(manifest_path, shard_plan, cfg, vocab)
        if not faults:
            manifest = layout.read_json(manifest_path)
            log.info("shards %s: sealed already (%d shards), reused", out_dir, len(manifest["shards"]))
            return _summary(manifest_path, manifest)
        log.warning(
            "shards %s: manifest %s does not hold what sealing writes (%s): writing it again from the verified shards",
            out_dir,
            manifest_path,
            "; ".join(faults),
        )
    entries = []
    for shard in shard_plan["shards"]:
        path = Path(shard["file"])
        sidecar = _sidecar(path)
        if not path.exists() or not sidecar.exists():
            raise ShardError(
                f"shard {path} is missing; its build task did not finish. Clear the failed "
                "build_shard task to rebuild it."
            )
        info = layout.read_json(sidecar)
        actual = layout.sha256_file(path)
        if actual != info["sha256"]:
            raise ShardError(
                f"shard {path}: sha256 {actual} differs from its build record {info['sha256']}; "
                "delete it and re-run build_shard"
            )
        entries.append(info)
    # A writer killed mid-shard (OOM, SIGKILL) leaves its temp file behind, a shard's worth of disk.
    # Another run may be building the same shards right now: the files go only when no writer is left.
    # The pattern covers the shard's build record (``<shard>.json``) as well.
    temps = [tmp for s in shard_plan["shards"] for tmp in out_dir.glob(f".{Path(s['file']).name}.*.tmp")]
    stale = layout.remove_dead_temps(out_dir, temps)
    if len(stale) < len(temps):
        log.info("shards %s: kept %d temp files: another run is writing here", out_dir, len(temps) - len(stale))
    if stale:
        log.info("shards %s: removed %d temp files left by interrupted writers", out_dir, len(stale))
    manifest = _manifest(shard_plan, cfg, vocab, entries)
    layout.write_json(manifest_path, manifest)
    log.info(
        "shards %s: sealed %d shards, train %d records, valid %d records; manifest %s",
        out_dir,
        len(entries),
        manifest["totals"]["train"]["records"],
        manifest["totals"]["valid"]["records"],
        manifest_path,
    )
    return _summary(manifest_path, manifest)


def _summary(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "manifest": str(path),
        "manifest_sha256": layout.sha256_file(path),
        "shards_hash": manifest["shards_hash"],
        "num_shards": len(manifest["shards"]),
        "totals": manifest["totals"],
    }


def _manifest(shard_plan: dict[str, Any], cfg: Config, vocab, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest sealing writes: a function of the plan, the config, the vocabulary and the build records."""
    d = cfg.data
    return {
        "format_version": FORMAT_VERSION,
        "shards_hash": shard_plan["shards_hash"],
        "config": {"data": cfg.to_dict()["data"]},
        "seq_length": d.seq_length,
        "predictions_per_seq": d.predictions_per_seq,
        "mask_rate": d.mask_rate,
        "mask_token_rate": MASK_TOKEN_RATE,
        "random_token_rate": RANDOM_TOKEN_RATE,
        "vocab_size": vocab.size,
        "vocab_sha256": shard_plan["vocab_sha256"],
        "vocab_path": str(shard_plan["vocab_path"]),
        "special_ids": vocab.special_ids(),
        "inputs": sorted({(s["split"], s["text_path"], s["text_sha256"]) for s in shard_plan["shards"]}),
        "shards": entries,
        "totals": _totals(entries),
    }


def _totals(entries: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    return {
        split: {
            "records": sum(e["records"] for e in entries if e["split"] == split),
            "tokens": sum(e["tokens"] for e in entries if e["split"] == split),
        }
        for split in SPLIT_CODES
    }


# Values a manifest holds twice: at the top (what readers use) and in the data config it records.
DUPLICATED = ("seq_length", "predictions_per_seq", "mask_rate")
# The recorded data config's values every manifest has and readers check against the training config.
COUPLED_DATA = (*DUPLICATED, "lowercase", "strip_accents")


def _reuse_faults(path: Path, shard_plan: dict[str, Any], cfg: Config, vocab) -> list[str]:
    """How the manifest at ``path`` differs from what :func:`seal` would write now; empty: reuse it.

    Shards are not hashed again here (that is what sealing anew does): their entries are compared
    with the build records beside them. Paths are not compared (a home may move); the contents'
    sha256s are.
    """
    try:
        recorded = layout.read_json(path)
    except ValueError as e:
        return [f"not valid JSON ({e})"]
    if not isinstance(recorded, dict):
        return [f"not a JSON object but a {type(recorded).__name__}"]
    names = [Path(s["file"]).name for s in shard_plan["shards"]]
    records = [layout.read_json_or_none(_sidecar(Path(s["file"]))) for s in shard_plan["shards"]]
    expected = _manifest(shard_plan, cfg, vocab, [r for r in records if isinstance(r, dict)])
    where = {
        "format_version": "this code's record format",
        "shards_hash": "the plan's",
        "mask_token_rate": "the masking's",
        "random_token_rate": "the masking's",
        "vocab_size": f"the token count of {vocab.path}",
        "vocab_sha256": f"the plan's sha256 of {vocab.path}",
        "special_ids": f"the ids in {vocab.path}",
        "totals": "the sums of its shards' build records",
        **{key: f"data.{key}" for key in DUPLICATED},
    }
    faults = []
    for key, source in where.items():
        if key == "totals" and None in records:
            continue  # reported below, with the missing build record
        got, want = recorded.get(key), expected[key]
        if got != want:
            faults.append(f"{key}={got!r}, not {want!r} ({source})")
    data = recorded.get("config", {}).get("data") if isinstance(recorded.get("config"), dict) else None
    if not isinstance(data, dict):
        faults.append("no config.data")
    else:
        want_data = expected["config"]["data"]
        # A key this code no longer or not yet writes is left alone; the coupled ones must be there.
        for key in sorted({*COUPLED_DATA, *(k for k in data if k in want_data)}):
            if data.get(key) != want_data.get(key):
                faults.append(f"config.data.{key}={data.get(key)!r}, not {want_data.get(key)!r} (data.{key})")
    inputs = recorded.get("inputs")
    try:
        texts = sorted({(split, sha) for split, _, sha in inputs})
    except (TypeError, ValueError):
        texts = None
    if texts != sorted({(split, sha) for split, _, sha in expected["inputs"]}):
        faults.append("inputs: other texts (split and sha256) than the plan's")
    entries = recorded.get("shards")
    if not isinstance(entries, list):
        faults.append("no shards list")
    elif [e.get("file") if isinstance(e, dict) else None for e in entries] != names:
        faults.append(f"shards: {len(entries)} files, not the plan's {len(names)} ({', '.join(names[:2])}, ...)")
    else:
        for name, entry, record in zip(names, entries, records):
            if record is None:
                faults.append(f"{name}: no build record beside it")
            elif entry != record:
                faults.append(f"{name}: its entry differs from the shard's build record")
    return faults


def _rewrite_fix(path: str | os.PathLike | None) -> str:
    return (
        f"delete {path or 'the manifest.json of the shard set'} and re-run seal_shards and the tasks after it "
        "(clear seal_shards, or run the DAG again): sealing writes the manifest again from the verified shards"
    )


def _inconsistencies(manifest: dict[str, Any]) -> list[str]:
    """Where a manifest disagrees with itself, or with the vocabulary file it names (when readable)."""
    from encoderflow.data.tokenizer import Vocab

    faults = []
    data = manifest.get("config", {}).get("data", {}) if isinstance(manifest.get("config"), dict) else {}
    for key in DUPLICATED:
        if manifest.get(key) != data.get(key):
            faults.append(f"{key}={manifest.get(key)!r} but its config.data.{key}={data.get(key)!r}")
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        faults.append("no list of shards")
    else:
        try:
            totals = _totals(entries)
        except (KeyError, TypeError):
            faults.append("shard entries without records and tokens")
        else:
            if manifest.get("totals") != totals:
                faults.append(f"totals={manifest.get('totals')!r} but its shards add up to {totals!r}")
    vocab_path = manifest.get("vocab_path")
    try:
        # Only the vocabulary the shards were built with says what vocab_size must be.
        same = bool(vocab_path) and layout.sha256_file(vocab_path) == manifest.get("vocab_sha256")
    except OSError:
        same = False  # moved or gone: nothing to compare with
    if same:
        vocab = Vocab.load(vocab_path)
        if manifest.get("vocab_size") != vocab.size:
            faults.append(f"vocab_size={manifest.get('vocab_size')!r} but {vocab_path} holds {vocab.size} tokens")
        if manifest.get("special_ids") != vocab.special_ids():
            faults.append(f"special_ids={manifest.get('special_ids')!r} but {vocab_path} has {vocab.special_ids()!r}")
    return faults


def check_manifest(manifest: dict[str, Any], cfg: Config, path: str | os.PathLike | None = None) -> None:
    """Refuse a manifest that disagrees with itself or its vocabulary, or with the training config.

    Args:
        path: where the manifest was read from, named in the errors.
    """
    what = f"{path}: shard manifest" if path else "shard manifest"
    faults = _inconsistencies(manifest)
    if faults:
        raise ShardError(
            f"{what} disagrees with itself or its vocabulary (edited or damaged after sealing): {'; '.join(faults)}",
            fix=_rewrite_fix(path),
        )
    expected = {
        "format_version": FORMAT_VERSION,
        "seq_length": cfg.data.seq_length,
        "predictions_per_seq": cfg.data.predictions_per_seq,
        "mask_rate": cfg.data.mask_rate,
    }
    # How the text became token ids (fine-tuning and serving tokenize with the training config's),
    # recorded in the data config the shards were built with.
    expected |= {"lowercase": cfg.data.lowercase, "strip_accents": cfg.data.strip_accents}
    data = manifest.get("config", {}).get("data", {})
    recorded = {**manifest, "lowercase": data.get("lowercase"), "strip_accents": data.get("strip_accents")}
    for key, want in expected.items():
        got = recorded.get(key)
        if got != want:
            raise ShardError(
                f"{what} {key}={got!r} but the training config expects {want!r}",
                # Another data config addresses another shard set; an edited set's manifest fails
                # sealing's check and is written again.
                fix="re-run plan_shards and the tasks after it with this config: it plans the shard set for these "
                "settings, and seal_shards checks a sealed set's manifest before reusing it",
            )


def load_manifest(path: str | os.PathLike, cfg: Config) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: no manifest; the shard set was never sealed (run seal_shards)")
    try:
        manifest = layout.read_json(path)
    except ValueError as e:
        raise ShardError(f"{path}: shard manifest is not valid JSON ({e})", fix=_rewrite_fix(path)) from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: shard manifest is not a JSON object", fix=_rewrite_fix(path))
    check_manifest(manifest, cfg, path)
    return manifest


def num_copies(manifest: dict[str, Any], split: str = "train") -> int:
    """How many differently-masked copies of ``split`` the shard set holds (``dupe_factor``)."""
    return 1 + max((e.get("copy", 0) for e in manifest["shards"] if e["split"] == split), default=0)


def copy_records(manifest: dict[str, Any], split: str = "train", copy: int = 0) -> int:
    """Records in one copy of ``split``; every copy masks the same lines, so all copies agree."""
    return sum(e["records"] for e in manifest["shards"] if e["split"] == split and e.get("copy", 0) == copy)


def epoch_seed(seed: int, epoch: int) -> int:
    """A shuffle seed per epoch, so an epoch's order depends on (seed, epoch) only, not on history."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def make_dataset(
    manifest_path: str | os.PathLike,
    cfg: Config,
    split: str,
    batch_size: int,
    shuffle: bool = True,
    repeat: bool = False,
    seed: int | None = None,
    epoch: int | None = None,
    drop_remainder: bool = False,
):
    """``(features, labels, weights)`` batches exactly as the guide's ``preprocess`` yields them.

    Args:
        epoch: serve only copy ``epoch % dupe_factor``, shuffled with a seed derived from
            ``(seed, epoch)``, so epoch ``e`` sees the same masks and order however training got
            there (fresh or resumed). ``None`` serves every copy at once.
        drop_remainder: leave out the last batch when it is short (data-parallel training).
    """
    tf = runtime.tensorflow()
    manifest = load_manifest(manifest_path, cfg)
    root = Path(manifest_path).parent
    entries = [e for e in manifest["shards"] if e["split"] == split]
    if epoch is not None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        copy = epoch % num_copies(manifest, split)
        entries = [e for e in entries if e.get("copy", 0) == copy]
    files = [str(root / e["file"]) for e in entries]
    if not files:
        raise ShardError(f"{manifest_path}: no {split!r} shards")
    seq, p = manifest["seq_length"], manifest["predictions_per_seq"]
    spec = {
        "token_ids": tf.io.FixedLenFeature([seq], tf.int64),
        "mask_positions": tf.io.FixedLenFeature([p], tf.int64),
        "mask_ids": tf.io.FixedLenFeature([p], tf.int64),
        "mask_weights": tf.io.FixedLenFeature([p], tf.float32),
    }

    def parse(serialized):
        ex = tf.io.parse_example(serialized, spec)
        features = {
            "token_ids": tf.cast(ex["token_ids"], tf.int32),
            "mask_positions": tf.cast(ex["mask_positions"], tf.int32),
        }
        return features, tf.cast(ex["mask_ids"], tf.int32), ex["mask_weights"]

    seed = cfg.data.seed if seed is None else seed
    if epoch is not None:
        seed = epoch_seed(seed, epoch)
    # reshuffle_each_iteration=False: with the default, each iter() over the same dataset draws
    # the next order from a generator the iterators share, so the batches fit saw depended on how
    # often Keras had iterated before, and runs of one config in two processes differed. Every
    # pass (repeat) is then the same permutation: each pass still holds every record once.
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=False)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if shuffle:
        ds = ds.shuffle(10 * batch_size, seed=seed, reshuffle_each_iteration=False)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
