"""The three roles a run reads: pretraining ``corpus``, ``labeled`` data, ``vocab``ulary.

By default they are the guide's datasets (WikiText-103, GLUE SST-2, the BERT uncased vocabulary:
pinned downloads, :mod:`encoderflow.data.sources`). Your own corpus and labeled data are folders
(:mod:`encoderflow.data.folders`); your own vocabulary is trained on the corpus
(:func:`encoderflow.data.tokenizer.train_vocabulary`). Whatever the source, a role's record says
where its splits are (``splits``), and for labeled data its format, columns and, once validated,
its label set, so every consumer reads them the same way.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoderflow import layout
from encoderflow.data.sources import DataError, wikitext_member
from encoderflow.results import file_info, files_of, split_info, split_path

log = logging.getLogger(__name__)

BUILTIN = {"corpus": "wikitext", "labeled": "sst2", "vocab": "vocab"}
LABELED_FORMATS = ("tsv", "csv", "jsonl")
LABELED_SPLITS = ("train", "dev")
# Bumped when the materialised corpus layout changes, so older folders are not reused.
CORPUS_FORMAT = 1

# A file's first bytes when it is an archive or a binary format: (what it is, the fix). Such a file is
# named as what it is, once, rather than read as text into a failure per check (a gzip train.csv was
# told it was UTF-16 and had no `review` column).
NOT_TEXT = {
    b"\x1f\x8b": ("gzip-compressed", "gunzip it first"),
    b"PK\x03\x04": ("a zip archive", "unzip it first"),
    b"BZh": ("bzip2-compressed", "bunzip2 it first"),
    b"\xfd7zXZ\x00": ("xz-compressed", "unxz it first"),
    b"(\xb5/\xfd": ("zstd-compressed", "unzstd it first"),
    b"\x89PNG\r\n\x1a\n": ("a PNG image, not text", "remove it, or put the text file there"),
    b"\xff\xd8\xff": ("a JPEG image, not text", "remove it, or put the text file there"),
    b"GIF8": ("a GIF image, not text", "remove it, or put the text file there"),
    b"%PDF-": ("a PDF document, not text", "extract its text first (pdftotext), or remove it"),
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1": (
        "an Office document (.xls or .doc), not text",
        "save it as text (from a spreadsheet: CSV UTF-8)",
    ),
}
# Within a zip's first member names: a workbook renamed .csv, not an archive to unzip.
XLSX_MARKS = (b"[Content_Types].xml", b"xl/")


def not_text(head: bytes) -> tuple[str, str] | None:
    """What a file starting with ``head`` is, when an archive or a binary format (:data:`NOT_TEXT`),
    and how to get its text: ``("gzip-compressed", "gunzip it first")``; None for anything else."""
    kind = next((kind for magic, kind in NOT_TEXT.items() if head.startswith(magic)), None)
    if kind and head.startswith(b"PK") and all(mark in head for mark in XLSX_MARKS):
        return "an Excel workbook (.xlsx), not text", "save it as text (from the spreadsheet: CSV UTF-8)"
    return kind


def _largest_field_limit() -> int:
    """The largest CSV field this platform's ``csv`` accepts: ``sys.maxsize`` overflows a C long on some
    (Windows), and the default, 131,072 characters, refused a 2,000,000-character review outright."""
    limit = sys.maxsize
    while True:
        try:
            old = csv.field_size_limit(limit)
        except OverflowError:
            limit //= 2
            continue
        csv.field_size_limit(old)  # set by read_table when it reads, not as a side effect of an import
        return limit


FIELD_LIMIT = _largest_field_limit()


def get(role: str, cfg, src, downloader=None) -> dict[str, Any]:
    """Download, copy or locate one role's data and describe it (the ``download_<role>`` task)."""
    from encoderflow.data import folders, sources

    custom = src.custom()
    if role == "corpus" and "corpus" in custom:
        return {**folders.fetch("corpus", custom["corpus"], downloader), "kind": "corpus_folder"}
    if role == "labeled" and "labeled" in custom:
        return _labeled_folder(folders.fetch("labeled", custom["labeled"], downloader), cfg)
    if role == "vocab" and cfg.inputs.vocab == "trained":
        log.info("vocab: inputs.vocab=trained: prepare_vocab trains one on the corpus; nothing to download")
        return {
            "dataset": "vocab",
            "role": "vocab",
            "kind": "trained_vocab",
            "source": "trained",
            "pinned": False,
            "root": "",
            "files": {},
            # What it will be trained from is in the corpus's hash and the config hash.
            "content_hash": layout.sha256_json({"trained": True}),
        }
    d = cfg.data
    info = sources.get_dataset(
        BUILTIN[role],
        d.pretrain_split,
        d.validation_split,
        data_dir=src.data_dir,
        mirror=src.mirror,
        sources_file=src.sources_file,
        downloader=downloader,
    )
    extra: dict[str, Any] = {"role": role, "kind": BUILTIN[role]}
    if role == "corpus":
        extra["splits"] = wikitext_splits(d)
    elif role == "labeled":
        from encoderflow.results import SST2_DEV, SST2_TRAIN

        extra |= {
            "splits": {"train": SST2_TRAIN, "dev": SST2_DEV},
            "format": "tsv",
            "columns": {"text": "sentence", "label": "label"},
        }
    return {**info, **extra}


def offline_needs(cfg, src) -> dict[str, tuple[str, ...]]:
    """dataset -> the files a run's roles read from an offline folder: none for a role with your own
    data, or for a vocabulary trained on the corpus."""
    from encoderflow.data import sources

    specs = sources.load_specs(src.sources_file)
    custom = src.custom()
    d = cfg.data
    return {
        BUILTIN[role]: sources.required_members(BUILTIN[role], d.pretrain_split, d.validation_split, specs)
        for role in BUILTIN
        if role not in custom and not (role == "vocab" and cfg.inputs.vocab == "trained")
    }


def check_offline(cfg, src) -> None:
    """With an offline folder (``src.data_dir``), every file the run's roles read from it is there
    (:func:`offline_needs`): checked by ``check_params`` (and ``encoderflow run`` before Airflow starts),
    so a wrong folder fails the run once, naming each missing file, before any download task, not once
    per download task. A folder no role reads is not checked."""
    from encoderflow.data import sources

    if not src.data_dir or not (needs := offline_needs(cfg, src)):
        return
    d = cfg.data
    splits = {"pretrain_split": d.pretrain_split, "validation_split": d.validation_split}
    sources.check_offline(src.data_dir, needs, splits if "wikitext" in needs else None)


def wikitext_splits(d) -> dict[str, str]:
    """The WikiText members a run pretrains and validates on (``data.pretrain_split``, ``data.validation_split``)."""
    return {"train": wikitext_member(d.pretrain_split), "valid": wikitext_member(d.validation_split)}


def _labeled_folder(info: dict[str, Any], cfg) -> dict[str, Any]:
    """Keep ``train.<ext>`` and ``dev.<ext>`` of a labeled folder; their hash is the record's."""
    listed = files_of(info)
    names = set(listed)
    found = [fmt for fmt in LABELED_FORMATS if {f"train.{fmt}", f"dev.{fmt}"} <= names]
    if len(found) != 1:
        have = ", ".join(sorted(names)[:10])
        raise DataError(
            f"labeled folder {info['location']}: "
            + ("no train.<ext> and dev.<ext> pair" if not found else f"several formats ({', '.join(found)})")
            + f" among its files ({have})",
            fix="put exactly one train.<ext> and one dev.<ext> there, ext one of tsv, csv, jsonl",
        )
    fmt = found[0]
    splits = {split: f"{split}.{fmt}" for split in LABELED_SPLITS}
    # A train.tsv beside the train.csv/dev.csv pair is not read: the file someone edits may be that one.
    if strays := sorted(
        n
        for n in names
        if n.partition(".")[0] in LABELED_SPLITS
        and n.rpartition(".")[2] in LABELED_FORMATS
        and n not in splits.values()
    ):
        raise DataError(
            f"labeled folder {info['location']}: {', '.join(strays)} beside the {splits['train']} and "
            f"{splits['dev']} pair it reads",
            fix=f"keep one train and one dev file there (remove or rename {', '.join(strays)})",
        )
    files = {m: listed[m] for m in splits.values()}
    return {
        **info,
        "kind": "labeled_folder",
        "files": files,
        "content_hash": layout.sha256_json({m: f["sha256"] for m, f in files.items()}),
        "splits": splits,
        "format": fmt,
        "columns": {"text": cfg.inputs.text_column, "label": cfg.inputs.label_column},
    }


# ---------------------------------------------------------------------------------------------
# Labeled tables


@dataclass
class Table:
    """A labeled file as strings: ``columns`` in file order, one dict per row, and per-row flags.

    ``lines`` holds the file line each row starts on (1-based): what an error points a person to
    (a header, blank JSONL lines and quoted line breaks in CSV make it differ from the row's index).
    """

    columns: list[str]
    rows: list[dict[str, str | None]]
    utf8: list[bool]
    parsed: list[bool]
    lines: list[int] = field(default_factory=list)
    # JSONL: the keys of each row whose value is a list or an object (kept as JSON text in ``rows``).
    nested: list[set[str]] = field(default_factory=list)
    # CSV and TSV: each row that repeats the header line (two files joined with ``cat``, say).
    header_again: list[bool] = field(default_factory=list)
    # CSV: each row whose quoting does not parse (a quote left open); also not ``parsed``.
    open_quote: list[bool] = field(default_factory=list)


def decode_lines(raw: bytes, strip_cr: bool = False) -> tuple[list[str], list[bool]]:
    """Split on LF; undecodable lines keep their content (replacement chars) and a False flag.

    Args:
        strip_cr: drop a CR before each LF (CRLF tables); a vocabulary or corpus keeps it, to be caught.
    """
    parts = raw.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    lines, ok = [], []
    for part in parts:
        part = part.removesuffix(b"\r") if strip_cr else part
        try:
            lines.append(part.decode("utf-8"))
            ok.append(True)
        except UnicodeDecodeError:
            lines.append(part.decode("utf-8", errors="replace"))
            ok.append(False)
    return lines, ok


def check_recorded(info: dict[str, Any]) -> None:
    """Each file of a role's data is as ``download_<role>`` recorded it (its sha256), before validation
    reads it: a file fixed after a failed validation, with the validation cleared alone, would pass and be
    refused only when training reads it, after shards and pretraining ran.

    Raises:
        DataError: a file changed or gone since; the fix clears the download too.
    """
    role = info.get("role", "data")
    fix = (
        f"clear download_{role} with its downstream tasks (or trigger a new run), so that the file is recorded "
        "as it is now and then validated"
    )
    for member, recorded in files_of(info).items():
        path = recorded["path"]
        try:
            now = layout.sha256_file(path)
        except OSError as exc:
            raise DataError(
                f"{path} ({member}): unreadable since download_{role} recorded it ({exc})", fix=fix
            ) from None
        if now != recorded["sha256"]:
            raise DataError(
                f"{path}: changed since download_{role} recorded it (sha256 {now[:16]}, recorded "
                f"{recorded['sha256'][:16]}); not validated",
                fix=fix,
            )


def read_table(path: str | os.PathLike, fmt: str, sha256: str | None = None, name: str | None = None) -> Table:
    """Read a TSV (GLUE style: split on tabs, no quoting), CSV (RFC 4180 quoting) or JSONL file.

    A leading UTF-8 byte-order mark (spreadsheets' "CSV UTF-8" writes one) is not part of the first
    column's name or the first JSON line. A CSV row whose quoting does not parse is a row that does not
    parse (:attr:`Table.open_quote`), and the rows after it are read as if it were not there.

    Args:
        sha256: the file's as recorded and validated: bytes that differ (the file was changed since)
            raise :class:`DataError` instead of being read.
        name: the file as a person knows it, for messages (default ``path``).

    Raises:
        DataError: the file changed since ``sha256``; it is an archive or binary (:func:`not_text`); a CSV
            the reader cannot go through (naming the line).
    """
    name = name or str(path)
    raw = Path(path).read_bytes()
    if sha256 is not None and (now := hashlib.sha256(raw).hexdigest()) != sha256:
        raise DataError(
            f"{path}: changed since this run recorded and validated it (sha256 {now[:16]}, recorded "
            f"{sha256[:16]}); nothing was trained or scored on it",
            fix="run again, so that download and validation record the file as it is now (or put the recorded "
            "file back and clear this task)",
        )
    raw = raw.removeprefix(codecs.BOM_UTF8)
    if kind := not_text(raw[:4096]):
        what, fix = kind
        raise DataError(f"{name}: the file is {what}", fix=fix)
    if fmt == "jsonl":
        lines, ok = decode_lines(raw, strip_cr=True)
        columns: dict[str, None] = {}
        rows, utf8, parsed, numbers, nested = [], [], [], [], []
        for number, (line, good) in enumerate(zip(lines, ok, strict=True), start=1):
            if not line.strip():
                continue
            numbers.append(number)
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                columns.update(dict.fromkeys(obj))
                rows.append({k: _cell(v) for k, v in obj.items()})
                nested.append({k for k, v in obj.items() if isinstance(v, (list, dict))})
            else:
                rows.append({})
                nested.append(set())
            utf8.append(good)
            parsed.append(isinstance(obj, dict))
        return Table(list(columns), rows, utf8, parsed, numbers, nested)
    # Blank lines (a trailing one an editor adds, say) hold no row in any format, as in JSONL above.
    if fmt == "tsv":
        decoded, decoded_ok = decode_lines(raw, strip_cr=True)
        kept = [n for n, line in enumerate(decoded) if line.strip() or "\t" in line]
        records = [decoded[n].split("\t") for n in kept]
        ok = [decoded_ok[n] for n in kept]
        starts = [n + 1 for n in kept]
    elif fmt == "csv":
        try:
            text, bad = raw.decode("utf-8"), False
        except UnicodeDecodeError:
            text, bad = raw.decode("utf-8", errors="replace"), True
        records, starts, open_quote = _csv_records(text, name)
        # A row holding a replacement character came from undecodable bytes when the file had any.
        ok = [not (bad and any("\ufffd" in f for f in r)) for r in records]
    else:
        raise ValueError(f"unknown labeled format {fmt!r}; known: {LABELED_FORMATS}")
    if not records:
        return Table([], [], [], [])
    if fmt == "csv" and open_quote[0]:
        raise DataError(
            f"{name}: line {starts[0]}: the header line's quoting does not parse (a quote left open)",
            fix=f"correct line {starts[0]}: the header line names the columns, separated by commas",
        )
    header = records[0]
    if dupes := sorted({name for name in header if header.count(name) > 1}):
        where = "; ".join(f"{name!r} in columns {[i + 1 for i, n in enumerate(header) if n == name]}" for name in dupes)
        raise DataError(
            f"{path}: its header line names a column twice ({where}): a value under it could not be told apart",
            fix="give each column its own name in the first line of the file",
        )
    rows = [dict(zip(header, (r + [None] * len(header))[: len(header)], strict=True)) for r in records[1:]]
    again = [r == header for r in records[1:]]
    quotes = open_quote[1:] if fmt == "csv" else []
    parsed = [len(r) == len(header) and not (quotes and quotes[n]) for n, r in enumerate(records[1:])]
    return Table(header, rows, ok[1:], parsed, starts[1:], [], again, quotes)


# What csv's strict mode says of quoting that does not parse ("',' expected after '\"'", "unexpected end
# of data"); any other csv.Error is no row's quoting but the reader itself stopping.
_QUOTE_ERRORS = ("expected after", "end of data")
CSV_RULES = "RFC 4180: a field holding a comma, a quote or a line break is quoted, each quote in it doubled"


def _csv_records(text: str, name: str) -> tuple[list[list[str]], list[int], list[bool]]:
    """A CSV's records (blank lines left out), the line each starts on and whether its quoting failed.

    Strict parsing: a stray quote made the lenient reader run on into the next rows (a review and a
    label of one row, the id and text of the next, as one row with a text fragment for a label), or to
    the end of the file, quietly, when it was in the last column. A record that fails is one row that
    does not parse, and reading starts again on the line after its first: the quote that broke it is
    most likely on that line, and the rows after it are whole.

    Raises:
        DataError: the reader stopped for another reason, naming the line.
    """
    csv.field_size_limit(FIELD_LIMIT)
    lines = io.StringIO(text, newline="").readlines()  # the lines csv sees: split at LF, CRLF or CR
    at = 0  # the next line the reader is given

    def feed():
        nonlocal at
        while at < len(lines):
            at += 1
            yield lines[at - 1]

    records, starts, open_quote = [], [], []
    reader = csv.reader(feed(), strict=True)
    while True:
        first = at  # the reader takes a line only when it needs one: this record starts here
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if not any(why in str(exc) for why in _QUOTE_ERRORS):
                long = "field larger than" in str(exc)
                raise DataError(
                    f"{name}: line {first + 1}: the CSV reader stopped there ({exc})",
                    fix=(
                        f"split the text at line {first + 1} over several rows, or save the file as .jsonl"
                        if long
                        else f"correct line {first + 1} ({CSV_RULES}), or save the file as .jsonl"
                    ),
                ) from None
            records.append([])
            starts.append(first + 1)
            open_quote.append(True)
            at = first + 1
            reader = csv.reader(feed(), strict=True)
            continue
        if len(record) > 1 or (record and record[0].strip()):  # not a blank or whitespace-only line
            records.append(record)
            starts.append(first + 1)
            open_quote.append(False)
    return records, starts, open_quote


def _cell(value: Any) -> str | None:
    """A JSON value as the string a table holds: numbers and booleans as Python writes them (a label
    set's ``1``), a list or object as its JSON text, which validation refuses where a text or label
    belongs (:attr:`Table.nested`) rather than training on ``"['a', 'list']"``."""
    if value is None:
        return None
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


_INT = re.compile(r"^-?\d+$")


def label_set(values) -> list[str]:
    """The distinct labels in a stable order: numerically when all are integers, else as strings."""
    distinct = {v for v in values if v is not None and v != ""}
    if distinct and all(_INT.match(v) for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


SST2_COLUMNS = {"text": "sentence", "label": "label"}


def _read_split(info: dict[str, Any], split: str) -> Table:
    """One split's table, a file it cannot read named as you know it (its origin), not the verified copy."""
    recorded = split_info(info, split)
    return read_table(recorded["path"], info.get("format", "tsv"), recorded.get("sha256"), recorded.get("origin"))


def labels_of(info: dict[str, Any]) -> list[str]:
    """The record's label set (``validate`` sets it), or read from its train split when it has none."""
    if info.get("labels"):
        return list(info["labels"])
    columns = info.get("columns", SST2_COLUMNS)
    table = _read_split(info, "train")
    # A list or object is no label (validation names its rows), nor a class the classifier would learn,
    # nor is the header's label column name on a line that repeats the header, nor a fragment of a row
    # that does not parse (a stray quote's: "' despite several attempts at lengthy dialogue scenes '").
    nested = table.nested or [set()] * len(table.rows)
    again = table.header_again or [False] * len(table.rows)
    return label_set(
        r.get(columns["label"])
        for r, keys, header, parsed in zip(table.rows, nested, again, table.parsed, strict=True)
        if columns["label"] not in keys and not header and parsed
    )


def read_labeled(info: dict[str, Any], split: str) -> tuple[list[str], np.ndarray]:
    """The texts of a labeled split and their labels as indices into the record's label set
    (``labels``; read from train when the record has none yet).

    Raises:
        DataError: a row's label is not in the set (validation checks this first).
    """
    columns = info.get("columns", SST2_COLUMNS)
    path = split_path(info, split)
    table = _read_split(info, split)
    labels = labels_of(info)
    index = {label: i for i, label in enumerate(labels)}
    texts, ids = [], []
    for n, row in enumerate(table.rows, start=1):
        label = row.get(columns["label"])
        if label not in index:
            raise DataError(f"{path}: row {n}: label {label!r} is not one of {labels} (from train)")
        texts.append(row.get(columns["text"]) or "")
        ids.append(index[label])
    return texts, np.asarray(ids, dtype=np.int32)


def documents(info: dict[str, Any], mode: str) -> list[list[str]]:
    """A custom corpus's documents, each its non-blank lines, files in name order.

    Args:
        mode: ``file`` (a file is one document) or ``blank_line`` (blank lines separate documents).
    """
    docs: list[list[str]] = []
    files = files_of(info)
    for name in sorted(files):
        lines = Path(files[name]["path"]).read_text(encoding="utf-8").splitlines()
        if mode == "file":
            docs.append([line for line in lines if line.strip()])
            continue
        docs.append([])
        for line in lines:
            if line.strip():
                docs[-1].append(line)
            elif docs[-1]:
                docs.append([])
    return [d for d in docs if d]


def corpus_texts(info: dict[str, Any], cfg) -> dict[str, dict[str, Any]]:
    """The pretraining and validation text files: ``{"train": FileInfo, "valid": FileInfo}``.

    A custom corpus is written once per (content, document mode, hold-out) as ``train.txt`` and
    ``valid.txt``, one document per block of lines, blocks separated by a blank line; a document
    is held out when its sha256, read as a fraction, is below ``inputs.holdout``.
    """
    if info.get("kind") != "corpus_folder":
        splits = info.get("splits") or wikitext_splits(cfg.data)
        return {role: file_info(info, member) for role, member in splits.items()}
    i = cfg.inputs
    key = layout.sha256_json(
        {"format": CORPUS_FORMAT, "content": info["content_hash"], "documents": i.documents, "holdout": i.holdout}
    )
    folder = layout.home() / "data" / "corpus-docs" / key[:16]
    names = {"train": "train.txt", "valid": "valid.txt"}
    if not (folder / ".complete").exists():
        docs = documents(info, i.documents)
        if len(docs) < 2:
            raise DataError(
                f"corpus {info['location']}: {len(docs)} document(s) with text; pretraining and its "
                "validation need at least 2",
                fix="add documents, or with inputs.documents=blank_line separate them by blank lines",
            )
        fraction = [int(layout.sha256_json(d)[:8], 16) / 16**8 for d in docs]
        held = [f < i.holdout for f in fraction]
        if not any(held):  # at least one: the document with the smallest fraction
            held[int(np.argmin(fraction))] = True
        if all(held):
            held[int(np.argmax(fraction))] = False
        parts = {"train": [d for d, h in zip(docs, held) if not h], "valid": [d for d, h in zip(docs, held) if h]}
        private = any(layout.is_private(f["path"]) for f in files_of(info).values())
        with layout.atomic_dir(folder, prefix=".docs-") as tmp:
            for role, name in names.items():
                (tmp / name).write_text("\n\n".join("\n".join(d) for d in parts[role]) + "\n", encoding="utf-8")
                if private:
                    (tmp / name).chmod(0o600)
            (tmp / ".complete").write_text(key + "\n")
        log.info(
            "corpus: %d documents from %s: %d for pretraining, %d held out for validation, in %s",
            len(docs),
            info["location"],
            len(parts["train"]),
            len(parts["valid"]),
            folder,
        )
    return {
        role: {
            "path": str(folder / name),
            "bytes": (folder / name).stat().st_size,
            "sha256": layout.sha256_file(folder / name),
        }
        for role, name in names.items()
    }
