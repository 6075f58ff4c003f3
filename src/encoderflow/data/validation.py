"""Great Expectations suites for every input file, with Data Docs and a one-line-per-failure report.

Each file is read into a pandas frame of raw strings plus a few derived columns (leading ``_``:
field count, UTF-8 validity, numeric label, header flags), so that every check, encoding and
row shape included, is a real GX expectation with an observed value in the Data Docs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from encoderflow import layout
from encoderflow.data import tokenizer
from encoderflow.data.inputs import CSV_RULES, not_text
from encoderflow.errors import EncoderflowError
from encoderflow.results import SST2_LABELS, files_of, split_path

log = logging.getLogger(__name__)

# Row counts of the genuine files (SST-2 from GLUE; WikiText-103 raw lines; BERT uncased vocab).
REAL_ROWS = {
    "SST-2/train.tsv": 67_349,
    "SST-2/dev.tsv": 872,
    "SST-2/test.tsv": 1_821,
    "wikitext-103-raw/wiki.train.raw": 1_801_350,
    "wikitext-103-raw/wiki.valid.raw": 3_760,
    "wikitext-103-raw/wiki.test.raw": 4_358,
    "bert_vocab_uncased.txt": 30_522,
}
# Lines over 100 bytes (what the guide trains on) in the genuine WikiText files.
REAL_LONG_LINES = {
    "wikitext-103-raw/wiki.train.raw": (100_000, 1_801_350),
    "wikitext-103-raw/wiki.valid.raw": (1_648, 1_648),
    "wikitext-103-raw/wiki.test.raw": (1_833, 1_833),
}
# Every token Vocab.special_ids() looks up; [PAD] has its own check (at id 0) in the suite.
SPECIAL_TOKENS = [t for t in tokenizer.SPECIAL_TOKENS if t != "[PAD]"]
HEADER_RE = re.compile(r"^ = [^=].* = $")


class ValidationFailed(EncoderflowError):
    """Data failed its suite. ``str()`` is one line per failed expectation; the Data Docs page is in
    the fix (:func:`errors.cause_of`), so a task log names it once."""

    def __init__(self, lines: list[str], docs: str | None, fix: str | None = None):
        self.lines, self.docs = lines, docs
        super().__init__("\n".join(lines), fix=fix)


@dataclass(frozen=True)
class Failure:
    dataset: str
    file: str
    expectation: str
    observed: str

    def line(self) -> str:
        if not self.expectation:  # a whole-file defect: no expectation ran, the cause is the whole line
            return f"{self.dataset}: {self.file}: {self.observed}"
        return f"{self.dataset}: {self.file}: {self.expectation} failed, observed {self.observed}"


def _row_range(member: str, strict: bool) -> tuple[int, int]:
    """Exact genuine counts for the pinned official archives; loose bounds for any other copy."""
    if strict and member in REAL_ROWS:
        return REAL_ROWS[member], REAL_ROWS[member]
    return (5, 50_000_000) if member.endswith("vocab_uncased.txt") else (10, 50_000_000)


# Read this much at a time: a sparse or binary file of gigabytes costs this, not frames of many times its size.
SCAN_CHUNK = 1 << 20
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def whole_file_defect(path: Path, empty: bool = True) -> str | None:
    """Why a text file is no text file at all (compressed, binary, UTF-16, empty), or None.

    Streams the file in :data:`SCAN_CHUNK` pieces before any frame is built: a 2 GB sparse file read
    whole into a frame took 17 GB, and a smaller one passed as one over-long line.

    Args:
        empty: an empty or all-blank file is a defect too; a corpus file's row count and text checks
            say that of it instead.

    Returns:
        One sentence naming the defect and its fix, the file's only failure.
    """
    with path.open("rb") as f:
        chunk = f.read(SCAN_CHUNK)
        if kind := not_text(chunk):
            return "the file is {}: {}".format(*kind)
        if chunk.startswith(UTF16_BOMS):
            return "the file is UTF-16 text, not UTF-8: save it as UTF-8"
        size, blank = 0, True
        while chunk:
            if (nul := chunk.find(b"\x00")) >= 0:
                if size == 0 and _utf16_without_bom(chunk):
                    return "the file is UTF-16 text (no byte-order mark), not UTF-8: save it as UTF-8"
                # Counted from 1, as a person (and `cmp`) counts bytes.
                return (
                    f"the file is binary, not text: NUL bytes from byte {size + nul + 1:,} "
                    "(a sparse or corrupt file?): download or copy it again"
                )
            blank = blank and not chunk.strip()
            size += len(chunk)
            chunk = f.read(SCAN_CHUNK)
    if empty and size == 0:
        return "the file is empty (0 bytes): download or copy it again"
    if empty and blank:
        return f"the file is empty ({size:,} bytes, all whitespace): download or copy it again"
    return None


def _utf16_without_bom(head: bytes) -> bool:
    """Whether ``head`` reads as UTF-16 text: a NUL beside most characters, always on the same side (ASCII
    in UTF-16), where a sparse or corrupt file has runs of NULs on both."""
    pairs = len(head) // 2
    even, odd = head[0 : 2 * pairs : 2].count(0), head[1 : 2 * pairs : 2].count(0)
    return pairs > 0 and max(even, odd) >= pairs / 2 and min(even, odd) <= pairs / 20


# Windows-1252 (Latin-1 with curly quotes and the euro sign): what older Excel and Windows editors save.
CP1252 = "Windows-1252 (Latin-1)"


def not_utf8_hint(raw: bytes) -> str | None:
    """What the lines of ``raw`` that are not UTF-8 are, from the first of them, and how to convert them.

    Returns:
        ``"the first at line 6 ('... caf\u00e9 ...') reads as Windows-1252 (Latin-1) text: ..."``, or None
        when every line is UTF-8.
    """
    first, cp1252, utf8_beyond_ascii = None, True, False
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            if first is None:
                first = (number, line, exc.start)
            try:
                line.decode("cp1252")
            except UnicodeDecodeError:  # bytes 0x81, 0x8D, 0x8F, 0x90, 0x9D: no Windows-1252 text
                cp1252 = False
        else:
            utf8_beyond_ascii = utf8_beyond_ascii or not line.isascii()
    if first is None:
        return None
    number, line, at = first
    text = line.decode("cp1252" if cp1252 else "latin-1").strip()  # one byte a character: `at` still points
    if len(text) > 60:
        start = max(0, at - 30)
        text = ("..." if start else "") + text[start : start + 60] + ("..." if start + 60 < len(text) else "")
    where = f"the first at line {number} ({text!r})"
    if not cp1252:
        return f"{where} is in another encoding: save the file as UTF-8 (`file -i` names its encoding)"
    if utf8_beyond_ascii:  # converting the whole file would garble the lines that are UTF-8 already
        return f"{where} reads as {CP1252} text, the other lines as UTF-8 (files joined?): save those lines as UTF-8"
    return f"{where} reads as {CP1252} text: save the file as UTF-8 (iconv -f cp1252 -t utf-8)"


def _defective(defect: str):
    """The frame of a file with a whole-file defect: no rows, the defect in ``attrs`` (no expectation runs)."""
    import pandas as pd

    df = pd.DataFrame()
    df.attrs["defect"] = defect
    return df


def _decode_lines(path: Path) -> tuple[list[str], list[bool]]:
    from encoderflow.data.inputs import decode_lines

    return decode_lines(path.read_bytes())


def frame_tsv(path: Path):
    """A GLUE TSV as strings under its own header, plus ``_fields`` and ``_utf8`` per row."""
    import pandas as pd

    lines, ok = _decode_lines(path)
    header = lines[0].split("\t") if lines else []
    rows = []
    for line in lines[1:]:
        fields = line.split("\t")
        rows.append((fields + [None] * len(header))[: len(header)] + [len(fields)])
    df = pd.DataFrame(rows, columns=header + ["_fields"]) if header else pd.DataFrame({"_fields": []})
    df["_utf8"] = ok[1:] if lines else []
    if "label" in df.columns:
        # A label outside the set is its own failure, not also a skew of the class balance.
        df["_label_value"] = pd.to_numeric(df["label"].where(df["label"].isin(SST2_LABELS)), errors="coerce")
    df.attrs["first_line"] = 2  # under the header
    return df


def frame_wikitext(path: Path):
    import pandas as pd

    lines, ok = _decode_lines(path)
    df = pd.DataFrame({"line": lines, "_utf8": ok})
    df["_header"] = df["line"].map(lambda s: int(bool(HEADER_RE.match(s))))
    df["_long"] = df["line"].map(lambda s: int(len(s.encode("utf-8", errors="replace")) > 100))
    return df


def frame_vocab(path: Path):
    import pandas as pd

    lines, ok = _decode_lines(path)
    return pd.DataFrame({"token": lines, "id": range(len(lines)), "_utf8": ok})


# The rows of a GLUE TSV that parse; a row that does not is the `_fields` failure alone, not also a
# label or sentence made of its pieces.
# A TSV row that parses: two fields.
TSV_PARSED = {"_fields": 2}


def when(**equal: Any) -> Any:
    """The rows whose columns hold these values, as GX's row condition: its ``Column`` objects (a pandas
    query string with ``condition_parser`` is deprecated since GX 1.9)."""
    from great_expectations.expectations.row_conditions import Column

    conditions = [Column(name) == value for name, value in equal.items()]
    condition = conditions[0]
    for more in conditions[1:]:
        condition = condition & more
    return condition


def suite_for(member: str, strict: bool, df=None) -> list[Any]:
    """The expectations for one file of the layout (``SST-2/dev.tsv``, ``wikitext-103-raw/...``).

    Args:
        member: the file's path in the layout.
        strict: the pinned official archive: adds the genuine row and long-line counts.
        df: the file's frame, when read: a whole-file defect gets no expectations (it is the one
            failure), and an SST-2 file with no label in the label set no class balance check.
    """
    import great_expectations as gx

    if df is not None and df.attrs.get("defect"):
        return []
    E = gx.expectations
    parsed = {"row_condition": when(**TSV_PARSED)}
    lo, hi = _row_range(member, strict)
    common = [
        E.ExpectTableRowCountToBeBetween(min_value=lo, max_value=hi),
        E.ExpectColumnValuesToBeInSet(column="_utf8", value_set=[True]),
    ]
    if member.startswith("SST-2/"):
        columns = ["index", "sentence"] if member.endswith("test.tsv") else ["sentence", "label"]
        if df is not None and [c for c in df.columns if not str(c).startswith("_")] != columns:
            # A misnamed header is one failure naming the columns there are, not also every check of a
            # column it lacks ("no value (column missing?)" five times).
            return common + [E.ExpectTableColumnsToMatchOrderedList(column_list=columns)]
    if member.startswith("SST-2/") and member.endswith("test.tsv"):
        return common + [
            E.ExpectTableColumnsToMatchOrderedList(column_list=["index", "sentence", "_fields", "_utf8"]),
            E.ExpectColumnValuesToBeInSet(column="_fields", value_set=[2]),
            E.ExpectColumnValuesToBeUnique(column="index", **parsed),
            E.ExpectColumnValuesToMatchRegex(column="index", regex=r"^\d+$", **parsed),
            E.ExpectColumnValuesToMatchRegex(column="sentence", regex=r"\S", **parsed),
        ]
    if member.startswith("SST-2/"):
        suite = common + [
            E.ExpectTableColumnsToMatchOrderedList(
                column_list=["sentence", "label", "_fields", "_utf8", "_label_value"]
            ),
            E.ExpectColumnValuesToBeInSet(column="_fields", value_set=[2]),
            E.ExpectColumnValuesToBeInSet(column="label", value_set=list(SST2_LABELS), **parsed),
            E.ExpectColumnValuesToMatchRegex(column="sentence", regex=r"\S", **parsed),
            E.ExpectColumnValueLengthsToBeBetween(column="sentence", min_value=1, max_value=1000, **parsed),
            # Real duplicate rate: 0.55% in train.
            E.ExpectColumnProportionOfUniqueValuesToBeBetween(
                column="sentence", min_value=0.95, max_value=1.0, **parsed
            ),
        ]
        # With no row that parses holding a label in the set, the balance has no value to observe: the
        # label (or field count) check is the one failure.
        if df is None or ("_label_value" in df.columns and df.loc[df["_fields"] == 2, "_label_value"].notna().any()):
            # Real class balance: 55.8% positive in train, 50.9% in dev.
            suite.append(E.ExpectColumnMeanToBeBetween(column="_label_value", min_value=0.3, max_value=0.7, **parsed))
        return suite
    if member.startswith("wikitext-103-raw/"):
        long_lo, long_hi = REAL_LONG_LINES[member] if strict and member in REAL_LONG_LINES else (1, 50_000_000)
        return common + [
            # `<unk>` marks the tokenized WikiText variant, a different dataset from the raw one.
            E.ExpectColumnValuesToNotMatchRegex(column="line", regex=r"<unk>"),
            E.ExpectColumnSumToBeBetween(column="_header", min_value=1),
            E.ExpectColumnSumToBeBetween(column="_long", min_value=long_lo, max_value=long_hi),
            E.ExpectColumnValueLengthsToBeBetween(column="line", max_value=100_000),
        ]
    if member.endswith(".txt"):
        return common + [
            E.ExpectColumnValuesToBeUnique(column="token"),
            # No ASCII blank in a token; Unicode's others (U+2028) may sit inside one, as in a vocabulary
            # trained on text holding them, which the tokenizer matches whole.
            E.ExpectColumnValuesToMatchRegex(column="token", regex=r"^[^ \t\n\r\f\v]+$"),
            E.ExpectColumnValuesToBeInSet(column="token", value_set=["[PAD]"], row_condition=when(id=0)),
            E.ExpectColumnDistinctValuesToContainSet(column="token", value_set=SPECIAL_TOKENS),
        ]
    raise ValueError(f"no validation suite for {member!r}")


def frame_for(member: str, path: Path):
    """A built-in file's frame; one with a whole-file defect (:func:`whole_file_defect`) is not read."""
    if defect := whole_file_defect(path):
        return _defective(defect)
    if member.endswith(".tsv"):
        return frame_tsv(path)
    if member.startswith("wikitext-103-raw/"):
        return frame_wikitext(path)
    return frame_vocab(path)


def _describe_expectation(cfg: Any) -> str:
    kwargs = {
        k: v
        for k, v in cfg.kwargs.items()
        if k in ("column", "value_set", "regex", "min_value", "max_value", "column_list", "row_condition")
    }
    if "row_condition" in kwargs:
        condition = condition_text(kwargs["row_condition"])
        if any(column in condition for column in ("_parsed", *TSV_PARSED)):  # rows that parse: said above
            del kwargs["row_condition"]
        else:
            kwargs["row_condition"] = condition
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{cfg.type}({args})"


def _line_numbers(df, rows: list[int]) -> list[int]:
    """The file lines of frame rows (a frame's ``attrs`` say how its rows map to lines; default row i is line i + 1)."""
    if df is not None and df.attrs.get("lines"):
        return [df.attrs["lines"][i] for i in rows]
    first = df.attrs.get("first_line", 1) if df is not None else 1
    return [i + first for i in rows]


# The frames' own columns (per-row flags), said as what their failing rows are.
_FLAGS: dict[str, str | dict[str, str]] = {
    "_utf8": "not UTF-8",
    # ASCII saved as UTF-16 decodes as UTF-8, a NUL beside each letter: the tokenizer splits every word.
    "_no_nul": "with NUL bytes (UTF-16 text, or not text: save it as UTF-8)",
    "_parsed": {
        "jsonl": "not a JSON object",
        "csv": "not the header's number of fields",
        "tsv": "not the header's number of fields",
    },
    "_fields": "not 2 tab-separated fields",
    "_scalar": "with a list or object where the text or label belongs (a string; a label may be a number)",
    "_label_clash": "with a label also spelled another way: one label, two classes",
    "_not_header": "that repeat the header line (files joined with their headers?): delete them",
}


def _observed(result: Any, df=None) -> str:
    if result.exception_info and result.exception_info.get("raised_exception"):
        msg = str(result.exception_info.get("exception_message", "error")).splitlines()[0]
        return f"error: {msg[:200]}"
    r = result.result or {}
    if "observed_value" in r and r["observed_value"] is not None:
        value = r["observed_value"]
        if getattr(value, "shape", None) == ():  # numpy 2 scalars repr as "np.int64(0)"
            value = value.item()
        column = str((result.expectation_config.kwargs or {}).get("column", ""))
        if column.startswith("_class_") and df is not None and df.attrs.get("labels"):
            return f"{value:.4f}, the share of label {df.attrs['labels'][int(column.removeprefix('_class_'))]!r}"
        if column == "_in_train":
            return f"{value:.4f}, the share of dev rows whose text is also a train row's (leaked into training)"
        if column == "_long":
            why = ": no article text, only headings or short lines" if value == 0 else ""
            return f"{int(value):,} lines over 100 bytes{why}"
        if result.expectation_config.type == "expect_column_proportion_of_unique_values_to_be_between":
            return f"{value:.4f}, the share of distinct texts (the rest are copies of other rows)"
        return repr(value)[:200]
    if "unexpected_count" in r:
        rows = r.get("partial_unexpected_index_list") or []
        where = f" at lines {_line_numbers(df, rows[:5])}" if rows else ""
        column = (result.expectation_config.kwargs or {}).get("column")
        if result.expectation_config.type == "expect_column_value_lengths_to_be_between":
            lengths = sorted({len(v) for v in r.get("partial_unexpected_list", []) if isinstance(v, str)})[-3:]
            longest = f" ({', '.join(f'{n:,}' for n in lengths)} characters)" if lengths else ""
            limit = (result.expectation_config.kwargs or {}).get("max_value")
            over = f"over {limit:,} characters" if isinstance(limit, int) else "out of bounds in length"
            return f"{r['unexpected_count']} of {r.get('element_count')} lines {over}{longest}{where}"
        flag = _FLAGS.get(column)
        if flag is not None:  # a column the frame adds: its True/False values say nothing to a reader
            fmt = df.attrs.get("format", "tsv") if df is not None else "tsv"
            what = flag[fmt] if isinstance(flag, dict) else flag
            if column == "_fields":  # the one flag that holds counts, worth showing
                what += f" (they have {sorted(set(r.get('partial_unexpected_list', [])))[:5]})"
            if column == "_label_clash" and df is not None:
                what += f" ({df.attrs.get('clashes')})"
            tail = ""
            if column == "_utf8" and df is not None and df.attrs.get("encoding"):
                tail = f": {df.attrs['encoding']}"
            if column == "_parsed" and df is not None and (quoted := df.attrs.get("open_quote_lines")):
                if len(quoted) == r["unexpected_count"]:  # the field counts are all right: say what is not
                    what, tail = "with a quote left open", f" ({CSV_RULES})"
                else:
                    tail = f"; a quote left open at lines {quoted[:5]} ({CSV_RULES})"
            return f"{r['unexpected_count']} of {r.get('element_count')} rows {what}{where}{tail}"
        return (
            f"{r['unexpected_count']} unexpected of {r.get('element_count')}, "
            f"e.g. {repr(r.get('partial_unexpected_list', [])[:3])[:160]}{where}"
        )
    if r.get("partial_missing_list"):
        return f"missing {r['partial_missing_list']}"
    return repr(r)[:200] if r else "no value (column missing?)"


def _context(docs_dir: Path):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # That module sets its own logger to INFO on import, over the WARNING given to the package:
    # each run's log then named a "temporary directory for ephemeral docs site" nobody writes to.
    logging.getLogger(ProgressBarsConfig.__module__).setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    # tqdm bars write carriage returns into Airflow task logs.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    ctx.add_data_docs_site(
        site_name="encoderflow",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return ctx


def frame_text(path: Path):
    """A corpus file: one row per line, with ``_utf8`` and ``_nonblank`` flags; a file that is no text
    (compressed, an image, UTF-16, NUL bytes: :func:`whole_file_defect`) is that one failure, not also
    its lines' bytes as not UTF-8 and as NULs."""
    import pandas as pd

    from encoderflow.data.inputs import decode_lines

    if defect := whole_file_defect(path, empty=False):
        return _defective(defect)
    raw = path.read_bytes()
    lines, ok = decode_lines(raw)
    df = pd.DataFrame({"line": pd.Series(lines, dtype=object), "_utf8": ok})
    df["_nonblank"] = [int(bool(line.strip())) for line in lines]
    if not all(ok):
        df.attrs["encoding"] = not_utf8_hint(raw)
    return df


def suite_corpus_file() -> list[Any]:
    """A file of your own corpus: some text, all UTF-8, no line of absurd length (NUL bytes, UTF-16 and
    binaries are the whole-file defects of :func:`frame_text`)."""
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToBeInSet(column="_utf8", value_set=[True]),
        E.ExpectColumnSumToBeBetween(column="_nonblank", min_value=1),
        E.ExpectColumnValueLengthsToBeBetween(column="line", max_value=1_000_000),
    ]


def _label_key(label: str) -> str:
    """What two spellings of one label share: case, surrounding space and number format aside
    (``1``, ``1.0`` and JSON ``true`` are one label; so are ``positive`` and ``Positive ``)."""
    text = label.strip().casefold()
    if text in ("true", "false"):
        return repr(float(text == "true"))
    try:
        number = float(text)
    except ValueError:
        return text
    return repr(number) if math.isfinite(number) else text


def label_clashes(labels) -> list[list[str]]:
    """Groups of distinct labels that are one label spelled two ways (:func:`_label_key`)."""
    groups: dict[str, set[str]] = {}
    for label in labels:
        if label:
            groups.setdefault(_label_key(label), set()).add(label)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def frame_labeled(
    path: Path, fmt: str, columns: dict[str, str], labels: list[str], train_texts: set[str] | None = None
):
    """A labeled file under its own columns, plus ``_utf8``, ``_parsed``, one ``_class_<i>`` per label,
    ``_label_clash`` (a label also spelled another way, here or in train's label set) and, for dev
    (``train_texts`` given), ``_in_train`` (its text is a train row's)."""
    import pandas as pd

    from encoderflow.data.inputs import read_table

    table = read_table(path, fmt)
    df = pd.DataFrame(table.rows, columns=table.columns, dtype=object)
    df["_utf8"], df["_parsed"] = table.utf8, table.parsed
    if not all(table.utf8):
        df.attrs["encoding"] = not_utf8_hint(path.read_bytes())
    df.attrs["open_quote_lines"] = [n for n, bad in zip(table.lines, table.open_quote) if bad]
    df["_no_nul"] = [not any(isinstance(v, str) and "\x00" in v for v in row.values()) for row in table.rows]
    if fmt != "jsonl":  # the header line's names as a row: `cat a.csv b.csv`
        df["_not_header"] = [not again for again in table.header_again]
    df.attrs["lines"], df.attrs["format"], df.attrs["labels"] = table.lines, fmt, list(labels or ())
    text, label_column = columns["text"], columns["label"]
    if fmt == "jsonl":
        df["_scalar"] = [not ({text, label_column} & keys) for keys in table.nested]
    if label_column in df.columns:
        for i, label in enumerate(labels):
            df[f"_class_{i}"] = (df[label_column] == label).astype(int)
        # A row that does not parse has no label, only a piece of text where one belongs: no spelling.
        spelled = df[label_column].where(df["_parsed"])
        clashes = label_clashes(set(labels or ()) | {v for v in spelled if isinstance(v, str)})
        df.attrs["clashes"] = " / ".join(repr(g)[1:-1].replace("', '", "' = '") for g in clashes)
        # The rows to correct: those not under their group's most common spelling in this file.
        counts = Counter(spelled)
        odd = {label for group in clashes for label in sorted(group, key=lambda v: -counts[v])[1:]}
        df["_label_clash"] = [v in odd for v in spelled]
        df.attrs["odd_labels"] = sorted(odd)
    if train_texts is not None and text in df.columns:
        df["_in_train"] = [int(isinstance(v, str) and v.strip() in train_texts) for v in df[text]]
    return df


def texts_of(df, text_column: str) -> set[str]:
    """A labeled frame's distinct texts (stripped), for dev's ``_in_train``."""
    if text_column not in df.columns:
        return set()
    return {v.strip() for v in df[text_column] if isinstance(v, str)}


def suite_labeled(df, split: str, columns: dict[str, str], labels: list[str], bounds) -> list[Any]:
    """Generated from the declaration: schema, parse and encoding, non-empty text, the share of
    distinct texts, on dev the share of rows leaked from train, the label set (read from train,
    checked on dev) with no label spelled two ways, row-count bounds and, on train, class balance
    bounds."""
    import great_expectations as gx

    E = gx.expectations
    text, label = columns["text"], columns["label"]
    suite = [
        E.ExpectTableRowCountToBeBetween(min_value=bounds.min_rows, max_value=bounds.max_rows),
        E.ExpectColumnToExist(column=text),
        E.ExpectColumnToExist(column=label),
        E.ExpectColumnValuesToBeInSet(column="_utf8", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="_no_nul", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="_parsed", value_set=[True]),
    ]
    # A row that does not parse (or holds a list where its text or label belongs, or repeats the header)
    # fails once, below, not again for each value it lacks.
    good = {"_parsed": True}
    for flag in ("_not_header", "_scalar"):
        if flag in df.columns:
            suite.append(E.ExpectColumnValuesToBeInSet(column=flag, value_set=[True]))
            good[flag] = True
    parsed = {"row_condition": when(**good)}
    if text in df.columns:  # a missing column is one failure above, not one per check on it
        suite += [
            E.ExpectColumnValuesToNotBeNull(column=text, **parsed),
            E.ExpectColumnValuesToMatchRegex(column=text, regex=r"\S", **parsed),
            E.ExpectColumnProportionOfUniqueValuesToBeBetween(column=text, min_value=bounds.min_unique_text_share),
        ]
        if "_in_train" in df.columns:
            suite.append(E.ExpectColumnMeanToBeBetween(column="_in_train", max_value=bounds.max_dev_in_train_share))
    if label in df.columns:
        suite.append(E.ExpectColumnValuesToNotBeNull(column=label, **parsed))
        suite.append(E.ExpectColumnValuesToBeInSet(column="_label_clash", value_set=[False]))
        if labels:  # none when train has none: that failure is reported on train, not echoed per dev row
            suite.append(E.ExpectColumnValuesToBeInSet(column=label, value_set=labels, **parsed))
        if split == "train":
            # Classes and their shares are of the rows that parse: a stray quote's row is one failure, not
            # also a class of its own or a smaller share of the others.
            suite.append(E.ExpectColumnUniqueValueCountToBeBetween(column=label, min_value=2, **parsed))
            # A label spelled another way is one failure (_label_clash), not a rare class besides; nor is
            # one holding bytes that are not UTF-8 ('pos caf\ufffd'), which the `_utf8` failure names.
            odd = set(df.attrs.get("odd_labels") or ())
            if df.attrs.get("encoding"):
                odd |= {name for name in labels if "\ufffd" in name}
            suite += [
                E.ExpectColumnMeanToBeBetween(
                    column=f"_class_{i}",
                    min_value=bounds.min_class_share,
                    max_value=bounds.max_class_share,
                    **parsed,
                )
                for i, name in enumerate(labels)
                if name not in odd
            ]
    return suite


# Expectations on a share of the rows (distinct texts, class balance, rows leaked from train) and on a
# total over them (a sum, a count of classes): what they observe of a file with no rows is only its
# row count again ("observed 0.0000, the share of distinct texts (the rest are copies of other rows)").
SHARES = ("expect_column_proportion_of_unique_values_to_be_between", "expect_column_mean_to_be_between")
TOTALS = ("expect_column_sum_to_be_between", "expect_column_unique_value_count_to_be_between")


def _rows_seen(df, expectation: Any) -> int:
    """The rows of ``df`` that ``expectation`` looks at: those its row condition (:func:`when`'s) selects,
    else all."""
    condition = expectation.row_condition
    return int(len(df)) if condition is None else int(_selects(df, condition).sum())


def _selects(df, condition: Any):
    """The rows of ``df`` a :func:`when` condition holds for, as a boolean Series."""
    import numpy as np
    import pandas as pd

    parts = getattr(condition, "conditions", None) or [condition]
    mask = pd.Series(np.ones(len(df), dtype=bool), index=df.index)
    for part in parts:
        if str(part.operator) != "==":
            raise ValueError(f"row condition {part}: only the == conditions encoderflow.data.validation.when writes")
        mask &= df[part.column.name] == part.parameter
    return mask


def condition_text(condition: Any) -> str:
    """A row condition as a person reads it (``id == 0``), from the condition or the dict a suite stores."""
    if isinstance(condition, dict):
        parts = condition.get("conditions") or [condition]
        return " and ".join(f"{p['column']['name']} {p['operator']} {p['parameter']!r}" for p in parts)
    return str(condition)


def with_rows_to_observe(expectations: list[Any], df, floor: int) -> list[Any]:
    """``expectations`` less those that would only echo the row count: a total over no rows, a share over
    fewer than ``floor`` (the fewest rows a file of its kind may have, below which the row count fails).

    Args:
        expectations: a file's suite.
        df: the file's frame.
        floor: the row count's lower bound for any copy of the file (not a pinned archive's exact count:
            a share over 800 of dev's 872 rows still means what it says).
    """
    kept = []
    for e in expectations:
        if e.expectation_type in SHARES + TOTALS:
            seen = _rows_seen(df, e)
            if seen == 0 or (e.expectation_type in SHARES and seen < floor):
                continue
        kept.append(e)
    return kept


def _plans(
    info: dict[str, Any], strict: bool, inputs_cfg
) -> tuple[list[tuple[str, Path, Any, list[Any]]], list | None]:
    """What to check per file: (member, path, frame, expectations), and the label set of labeled data."""
    kind = info.get("kind")
    members = sorted(files_of(info).items())
    if kind == "corpus_folder":
        frames = [(m, Path(f["path"]), frame_text(Path(f["path"]))) for m, f in members]
        return [(m, path, df, with_rows_to_observe(suite_corpus_file(), df, 1)) for m, path, df in frames], None
    if kind == "trained_vocab":
        return [
            (m, Path(f["path"]), frame_vocab(Path(f["path"])), suite_for("vocab.txt", False)) for m, f in members
        ], None
    labels = None
    if info.get("splits") and "dev" in info["splits"]:
        from encoderflow.data.inputs import labels_of

        # An archive or a binary for train is its one failure: no label set read from its bytes, and none
        # that dev's labels would each fail against.
        labels = [] if not_a_table(Path(split_path(info, "train"))) else _as_origin(info, labels_of, info)
    if kind == "labeled_folder":
        plans, train_texts = [], None
        # Train first: dev's rows are checked against its texts.
        for split, member in sorted(info["splits"].items(), key=lambda kv: kv[0] != "train"):
            path = Path(files_of(info)[member]["path"])
            if defect := not_a_table(path):
                plans.append((member, path, _defective(defect), []))
                continue
            dev_of = train_texts if split == "dev" else None
            df = _as_origin(info, frame_labeled, path, info["format"], info["columns"], labels, dev_of)
            if split == "train":
                train_texts = texts_of(df, info["columns"]["text"])
            suite = suite_labeled(df, split, info["columns"], labels, inputs_cfg)
            plans.append((member, path, df, with_rows_to_observe(suite, df, inputs_cfg.min_rows)))
        return plans, labels
    plans = []
    for m, f in members:
        df = frame_for(m, Path(f["path"]))
        suite = suite_for(m, strict, df)
        plans.append((m, Path(f["path"]), df, with_rows_to_observe(suite, df, _row_range(m, False)[0])))
    return plans, labels


def not_a_table(path: Path) -> str | None:
    """Why a labeled file is no table at all, when it is an archive or a binary (:func:`not_text`): one
    failure saying what it is, not its bytes read as a header of no known column and rows of no text.
    (UTF-16 and empty files are read: their header's failure says what they are.)"""
    with path.open("rb") as f:
        kind = not_text(f.read(4096))
    return "the file is {}: {}".format(*kind) if kind else None


def _as_origin(info: dict[str, Any], read: Callable[..., Any], *args: Any) -> Any:
    """``read(*args)``; a file it refuses is named as you know it (its origin), not as the verified copy."""
    from encoderflow.data.sources import DataError

    try:
        return read(*args)
    except DataError as exc:
        message = exc.message
        for f in files_of(info).values():
            if f.get("origin"):
                message = message.replace(str(f["path"]), str(f["origin"]))
        if message == exc.message:
            raise
        raise DataError(message, fix=exc.fix) from None


def validate_dataset(
    info: dict[str, Any], docs_dir: str | os.PathLike, strict: bool | None = None, inputs_cfg=None
) -> dict[str, Any]:
    """Validate every file a dataset provided. Never raises on bad data; returns the report.

    Args:
        info: what :func:`encoderflow.data.inputs.get` returned.
        docs_dir: where the Data Docs site is written.
        strict: demand the genuine row counts; default: whether ``info`` is the pinned official
            archive (``info["pinned"]``). A mirror re-pack or an offline folder is not.
        inputs_cfg: the ``inputs`` config section (bounds for your own labeled data); default its defaults.
    """
    import great_expectations as gx

    t0 = time.monotonic()
    dataset = info["dataset"]
    strict = bool(info.get("pinned")) if strict is None else strict
    docs_dir = Path(docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    ctx = _context(docs_dir)
    source = ctx.data_sources.add_pandas(dataset)
    failures: list[Failure] = []
    files: dict[str, Any] = {}
    if inputs_cfg is None:
        from encoderflow.config import InputsConfig

        inputs_cfg = InputsConfig()
    plans, labels = _plans(info, strict, inputs_cfg)
    for member, path, df, expectations in plans:
        # Your own file is named as you know it (its origin), not as the verified copy that was read.
        named = files_of(info).get(member, {}).get("origin") or str(path)
        if defect := df.attrs.get("defect"):  # no expectation has a value to observe: no Data Docs page
            failures.append(Failure(dataset, named, "", defect))
            files[member] = {"path": str(path), "rows": 0, "expectations": 0, "failed": 1}
            continue
        name = re.sub(r"[^A-Za-z0-9_]+", "_", member)
        batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{dataset}.{name}", expectations=expectations))
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"{dataset}.{name}", data=batch_def, suite=suite)
        )
        # Data Docs are built once below: rebuilding the site after each file tripled the time.
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(name=f"{dataset}.{name}", validation_definitions=[vd]))
        result = checkpoint.run(batch_parameters={"dataframe": df})
        file_failures = []
        for run_result in result.run_results.values():
            for r in run_result.results:
                if not r.success:
                    observed = _observed(r, df)
                    if r.expectation_config.type in (
                        "expect_column_to_exist",
                        "expect_table_columns_to_match_ordered_list",
                    ):
                        observed = f"columns {[c for c in df.columns if not str(c).startswith('_')]}"
                    file_failures.append(Failure(dataset, named, _describe_expectation(r.expectation_config), observed))
        failures += file_failures
        files[member] = {
            "path": str(path),
            "rows": int(len(df)),
            "expectations": len(suite.expectations),
            "failed": len(file_failures),
        }
    # GX writes each static file in place ("wb"): a re-validation in this folder must not rewrite the
    # copy every run shares (layout.share_identical), so it writes new files.
    shutil.rmtree(docs_dir / "static", ignore_errors=True)
    ctx.build_data_docs(site_names=["encoderflow"])
    layout.share_identical(docs_dir / "static")
    docs_index = docs_dir / "index.html"
    for member, f in files.items():
        if page := _result_page(docs_dir, dataset, member):
            f["docs"] = str(page)
    report = {
        "dataset": dataset,
        "success": not failures,
        "strict": strict,
        "files": files,
        "failures": [f.line() for f in failures],
        "labels": labels,
        "docs": str(docs_index),
        "validated_at": datetime.now(UTC).isoformat(),
        "seconds": round(time.monotonic() - t0, 2),
    }
    layout.write_json(docs_dir / "validation.json", report)
    if len(files) <= 20:
        for f in files.values():
            log.info(
                "validate %s: %s: %d rows, %d expectations, %d failed",
                dataset,
                f["path"],
                f["rows"],
                f["expectations"],
                f["failed"],
            )
    else:  # a corpus of thousands of files gets one line; its failures are each listed in the report
        log.info(
            "validate %s: %d files under %s, %d rows, %d expectations, %d failed",
            dataset,
            len(files),
            info["root"],
            sum(f["rows"] for f in files.values()),
            sum(f["expectations"] for f in files.values()),
            sum(f["failed"] for f in files.values()),
        )
    # The failures themselves are not logged here: check() raises them, and the task's exception
    # record lists each once (the CLI prints them).
    log.info(
        "validate %s: %s in %.1fs; Data Docs: %s",
        dataset,
        "PASSED" if not failures else "FAILED",
        report["seconds"],
        docs_index,
    )
    return report


def _result_page(docs_dir: Path, dataset: str, member: str) -> Path | None:
    """One file's newest validation result page. The site's index lists them with scripts it loads from
    CDNs, so an offline browser shows an empty list; a result page renders without them."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", member)
    pages = sorted(
        docs_dir.glob(f"validations/{dataset.replace('.', '/')}/{name}/*/*/*.html"), key=lambda p: p.parent.name
    )
    return pages[-1] if pages else None


def check(
    info: dict[str, Any], docs_dir: str | os.PathLike, strict: bool | None = None, inputs_cfg=None
) -> dict[str, Any]:
    """Validate and raise :class:`ValidationFailed` (one line per failure) on bad data."""
    report = validate_dataset(info, docs_dir, strict, inputs_cfg)
    if not report["success"]:
        raise ValidationFailed(report["failures"], failed_docs(report), fix=own_fix(info, report))
    return report


def own_fix(info: dict[str, Any], report: dict[str, Any]) -> str | None:
    """Your own data's fix: the file or the column settings, not another download (None: the guide's data)."""
    if info.get("kind") not in ("labeled_folder", "corpus_folder", "trained_vocab"):
        return None
    fixes = []
    # The file to convert, named (a failure line is "<dataset>: <file>: <what failed>").
    for failure in report["failures"]:
        if f"reads as {CP1252} text: save the file as UTF-8" in failure:
            named = shlex.quote(failure.split(": ", 2)[1])
            convert = f"iconv -f cp1252 -t utf-8 {named} > utf8.tmp && mv utf8.tmp {named}"
            fixes.append(f"convert {named} to UTF-8: {convert}")
    columns = info.get("columns") or {}
    sep = "<tab>" if info.get("format") == "tsv" else ","
    header = f"{columns.get('text')}{sep}{columns.get('label')}"
    for role, column in columns.items():
        missing = f"expect_column_to_exist(column={column!r}) failed, observed columns "
        if seen := next((f.split(missing, 1)[1] for f in report["failures"] if missing in f), None):
            if why := _unreadable_header(_names(seen), info.get("format"), header):
                fixes.append(why)  # renaming a column would not help: the file is not read as written
                break
            fixes.append(f"name the {role} column: --set inputs.{role}_column=<one of {seen}> (now {column!r})")
    fixes.append("correct the file(s) named above, or point the source at good ones")
    return "; ".join(fixes) + f"; the Data Docs show each failed expectation: {failed_docs(report)}"


def failed_docs(report: dict[str, Any]) -> str:
    """Where a person reads the failed expectations: the first failing file's result page, else the site."""
    pages = [f["docs"] for f in report["files"].values() if f.get("failed") and f.get("docs")]
    return pages[0] if pages else report["docs"]


def _names(columns: str) -> list[str] | None:
    """The column names a failure prints (``['id', 'body']``), or None when they cannot be read back."""
    import ast

    try:
        names = ast.literal_eval(columns)
    except (ValueError, SyntaxError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _unreadable_header(names: list[str] | None, fmt: str | None, header: str) -> str | None:
    """Why a labeled file's header cannot name its columns, when it cannot (None: a column is misnamed)."""
    if names is None or fmt not in ("csv", "tsv", "jsonl"):
        return None
    if not names and fmt == "jsonl":  # no line read as a JSON object: nothing names a key
        return (
            "no line of the file is a JSON object (empty, not UTF-8, or not JSON lines): write one object per "
            f"line with the keys {header.replace(',', ' and ')}"
        )
    if not names:
        return f"the file is empty or has no first line: give it a header line ({header}) and rows under it"
    if any("\x00" in n or "\ufffd" in n for n in names):
        return "the file is not UTF-8 (UTF-16, as some editors save 'Unicode text'?): save it as UTF-8"
    if fmt == "csv" and len(names) == 1 and (other := next((d for d in (";", "\t", "|") if d in names[0]), None)):
        return f"its fields are separated by {other!r}, not commas: save it comma-separated (or as .tsv for tabs)"
    if fmt in ("csv", "tsv") and any(len(n.split()) >= 4 or len(n) > 40 for n in names):
        return f"the first line looks like data, not a header: add one naming the columns ({header} in their order)"
    return None
