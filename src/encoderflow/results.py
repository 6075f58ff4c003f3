"""What the steps hand each other through XCom: small typed dicts of paths, hashes and metrics.

TypedDicts, not classes: XCom stores them as plain JSON and the Airflow UI shows them as they
are. Metrics carry one name everywhere (step result and ``result.json``, ``summary.json``, MLflow
metrics, the version's ``gate.*`` tags, the champion asset event, the runs page): ``val_accuracy``
(the fine-tuned classifier on the labeled data's dev split, whatever that data is),
``baseline_val_accuracy``, ``champion_val_accuracy`` (the champion re-evaluated on the same split)
and ``mlm_val_accuracy``. Per-epoch curves keep the names Keras gives them, under their stage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NotRequired, TypedDict

# The names of before the metrics had one name each (``sst2_val_accuracy`` was the classifier's on any
# labeled data): summaries and version tags written then are read under today's names.
RENAMED = {
    "sst2_val_accuracy": "val_accuracy",
    "gate.candidate_accuracy": "gate.val_accuracy",
    "gate.baseline_accuracy": "gate.baseline_val_accuracy",
    "gate.champion_accuracy": "gate.champion_val_accuracy",
}


def current_names(record: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics dict or a model version's tags, with any name of before :data:`RENAMED` read as today's."""
    out = dict(record)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


class FileInfo(TypedDict):
    path: str
    bytes: int
    sha256: str


class Validation(TypedDict):
    """``rows`` per file while the record lists its files inline; ``total_rows`` always (the per-file
    counts of a large corpus are in the Data Docs' ``validation.json``)."""

    success: bool
    strict: bool
    docs: str
    rows: dict[str, int]
    total_rows: int


class Dataset(TypedDict):
    """One role's data (``download_<role>``), plus its validation report (``validate_<role>``).

    ``role`` is corpus, labeled or vocab; ``kind`` the guide's dataset (wikitext, sst2, vocab) or
    your own (corpus_folder, labeled_folder, trained_vocab). ``splits`` maps a split (train, valid;
    train, dev) to its member of ``files``; labeled data adds ``format``, ``columns`` (text, label)
    and, once validated, ``labels`` (the label set read from train, in class-index order).

    ``files`` travels in XCom up to :data:`INLINE_FILES_MAX` files; a larger dataset (a corpus
    folder) carries ``files_index``, ``files_index_sha256`` and ``file_count`` instead (see
    :func:`compact`). Read the files with :func:`files_of`, never ``info["files"]``.
    """

    dataset: str
    role: str
    kind: str
    source: str
    pinned: bool
    root: str
    files: dict[str, FileInfo]
    content_hash: str
    files_index: NotRequired[str]
    files_index_sha256: NotRequired[str]
    file_count: NotRequired[int]
    splits: NotRequired[dict[str, str]]
    format: NotRequired[str]
    columns: NotRequired[dict[str, str]]
    labels: NotRequired[list[str]]
    location: NotRequired[str]
    url: NotRequired[str]
    validation: NotRequired[Validation]


class Sealed(TypedDict):
    manifest: str
    manifest_sha256: str
    shards_hash: str
    num_shards: int
    totals: dict[str, Any]


class Baseline(TypedDict):
    baseline_val_accuracy: float
    result: str


class Pretrained(TypedDict):
    encoder: str  # empty when ``skipped``
    encoder_sha256: str
    mlm_val_accuracy: float | None  # None when ``skipped``
    result: str
    parent: str | None  # the champion version or encoder path a warm start began from
    init_sha256: NotRequired[str | None]  # the sha256 of the encoder it began from, as pretraining read it
    vocab_sha256: NotRequired[str]  # the vocabulary its token ids index (absent in results before it)
    reused_from: NotRequired[str]  # the run folder whose encoder this is, trained from the same key and code
    skipped: NotRequired[str]  # why nothing was pretrained (fine-tuning continues the champion's classifier)


class Finetuned(TypedDict):
    bundle: str
    val_accuracy: float
    result: str
    parent: NotRequired[str | None]  # the champion version whose classifier fine-tuning continued
    reused_from: NotRequired[str]  # the run folder whose bundle this is, trained from the same key and code


# The SST-2 members the pipeline reads (test.tsv has no labels: validated, never scored).
SST2_TRAIN, SST2_DEV = "SST-2/train.tsv", "SST-2/dev.tsv"
# SST-2's labels in class-index order (negative, positive); also what a bundle without ``labels`` has.
SST2_LABELS = ("0", "1")


# XCom carries paths and small results: at ~230 bytes a file, a corpus folder of 100,000 files would
# make a 23 MB record that every task after download_corpus reads and writes again.
INLINE_FILES_MAX = 64
_INDEXES: dict[str, dict[str, FileInfo]] = {}  # by sha256: an index is immutable, read once per process


def compact(info: Dataset) -> Dataset:
    """The record as it goes into XCom: over :data:`INLINE_FILES_MAX` files, the list moves to a
    content-addressed index file (``data/index/<sha256>.json``, written once, atomically) and the
    record keeps its path, sha256 and the file count."""
    from encoderflow import layout

    files = info.get("files")
    if files is None or len(files) <= INLINE_FILES_MAX:
        return info
    text = json.dumps({"dataset": info["dataset"], "role": info["role"], "files": files}, sort_keys=True)
    sha = hashlib.sha256(text.encode()).hexdigest()
    path = layout.home() / "data" / "index" / f"{sha}.json"
    if not path.exists() or layout.sha256_file(path) != sha:
        with layout.atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    _INDEXES[sha] = files
    rest = {k: v for k, v in info.items() if k != "files"}
    return {**rest, "files_index": str(path), "files_index_sha256": sha, "file_count": len(files)}


def files_of(info: Dataset) -> dict[str, FileInfo]:
    """Every member of the dataset (name -> path, bytes, sha256), inline or from its verified index."""
    if "files" in info:
        return info["files"]
    sha, path = info["files_index_sha256"], Path(info["files_index"])
    if sha not in _INDEXES:
        from encoderflow.data.sources import DataError

        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"{info['role']} data {info['dataset']}: its file index {path} is unreadable ({exc})",
                fix=f"re-run download_{info['role']} and the tasks after it",
            ) from None
        if hashlib.sha256(raw).hexdigest() != sha:
            raise DataError(
                f"{info['role']} data {info['dataset']}: its file index {path} does not match sha256 {sha}",
                fix=f"re-run download_{info['role']} and the tasks after it",
            )
        _INDEXES[sha] = json.loads(raw)["files"]
    return _INDEXES[sha]


def file_info(info: Dataset, member: str) -> FileInfo:
    """Path, size and sha256 of one member (``SST-2/dev.tsv``); a missing member names what there is."""
    files = files_of(info)
    try:
        return files[member]
    except KeyError:
        raise KeyError(f"dataset {info['dataset']} has no {member!r}; it has {sorted(files)[:20]}") from None


def file_path(info: Dataset, member: str) -> str:
    """The local path of one member."""
    return file_info(info, member)["path"]


# A record without ``splits`` (made before roles had them) is SST-2's layout.
SST2_SPLITS = {"train": SST2_TRAIN, "dev": SST2_DEV}


def split_info(info: Dataset, split: str) -> FileInfo:
    """Path, size and sha256 of one split (``train``, ``dev``) of a role's data."""
    try:
        return file_info(info, (info.get("splits") or SST2_SPLITS)[split])
    except KeyError:
        raise KeyError(
            f"{info['role']} data {info['dataset']} has no {split!r} split; it has {info.get('splits')}"
        ) from None


def split_path(info: Dataset, split: str) -> str:
    return split_info(info, split)["path"]


def only_file(info: Dataset) -> FileInfo:
    """The single file of a one-file dataset (the vocabulary)."""
    files = files_of(info)
    if len(files) != 1:
        raise ValueError(f"dataset {info['dataset']} has {len(files)} files, expected one")
    return next(iter(files.values()))
