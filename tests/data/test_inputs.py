"""The roles a run reads: labeled tables in three formats, label sets, a custom corpus's documents."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from encoderflow import config
from encoderflow.data import inputs
from encoderflow.data.sources import DataError

from .fixtures_own import REVIEWS, review_rows, write_corpus, write_labeled, write_reviews_csv


def _src(**kw):
    return config.Sources(**kw)


def test_tables_read_the_same_rows_from_tsv_csv_and_jsonl(tmp_path):
    rows = [('a film, "quoted"', "pos"), ("plain text", "neg")]
    (tmp_path / "t.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    # CSV with RFC 4180 quoting and CRLF line ends, as spreadsheets write it.
    (tmp_path / "t.csv").write_bytes(b'text,label\r\n"a film, ""quoted""",pos\r\nplain text,neg\r\n')
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows) + "\n")
    for fmt in inputs.LABELED_FORMATS:
        table = inputs.read_table(tmp_path / f"t.{fmt}", fmt)
        assert table.columns == ["text", "label"], fmt
        assert [(r["text"], r["label"]) for r in table.rows] == rows, fmt
        assert all(table.utf8) and all(table.parsed), fmt
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok", "label": 1}\n[1, 2]\n{"text": "caf\xe9", "label": 2}\n')
    bad = inputs.read_table(tmp_path / "bad.jsonl", "jsonl")
    assert bad.parsed == [True, False, True] and bad.utf8 == [True, True, False]
    assert bad.rows[0] == {"text": "ok", "label": "1"}  # JSON numbers become the strings a label set holds


def test_a_byte_order_mark_is_not_part_of_the_first_column_or_row(tmp_path):
    """Spreadsheets' "CSV UTF-8" export starts with one; so do some JSONL writers on Windows."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "t.tsv").write_bytes(bom + b"text\tlabel\r\nfine\tpos\r\n")
    (tmp_path / "t.csv").write_bytes(bom + b"text,label\r\nfine,pos\r\n")
    (tmp_path / "t.jsonl").write_bytes(bom + b'{"text": "fine", "label": "pos"}\r\n')
    for fmt in inputs.LABELED_FORMATS:
        table = inputs.read_table(tmp_path / f"t.{fmt}", fmt)
        assert table.columns == ["text", "label"], (fmt, table.columns)
        assert table.rows == [{"text": "fine", "label": "pos"}] and table.parsed == [True], fmt


def test_each_row_knows_the_file_line_it_starts_on(tmp_path):
    """What an error names: a header, blank JSONL lines and a quoted line break in CSV move it off the row index."""
    (tmp_path / "t.tsv").write_text("text\tlabel\na\t0\nb\t1\n")
    (tmp_path / "t.csv").write_text('text,label\n"two\nlines",0\nb,1\n')
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 0}\n\n\n{"text": "b", "label": 1}\n')
    lines = {fmt: inputs.read_table(tmp_path / f"t.{fmt}", fmt).lines for fmt in inputs.LABELED_FORMATS}
    assert lines == {"tsv": [2, 3], "csv": [2, 4], "jsonl": [1, 4]}
    # A blank line holds no row in any format (it failed a whole run as a row of the wrong width).
    (tmp_path / "t.tsv").write_text("text\tlabel\na\t0\n\n  \nb\t1\n\n")
    (tmp_path / "t.csv").write_bytes(b'text,label\r\n"two\r\nlines",0\r\n  \r\nb,1\r\n\n')
    for fmt, starts in (("tsv", [2, 5]), ("csv", [2, 5])):
        table = inputs.read_table(tmp_path / f"t.{fmt}", fmt)
        assert (table.lines, table.parsed, [r["label"] for r in table.rows]) == (starts, [True, True], ["0", "1"]), fmt
    # A row of empty fields is a row (its blank text is then named, with its line).
    (tmp_path / "t.tsv").write_text("text\tlabel\n\t\n")
    assert inputs.read_table(tmp_path / "t.tsv", "tsv").rows == [{"text": "", "label": ""}]


def test_label_sets_are_ordered_numerically_when_they_are_numbers():
    assert inputs.label_set(["2", "10", "1", "2", None, ""]) == ["1", "2", "10"]
    assert inputs.label_set(["praise", "bug", "billing"]) == ["billing", "bug", "praise"]


def test_a_labeled_folder_gives_its_splits_and_columns(tmp_path, encoderflow_home):
    folder = write_labeled(tmp_path / "tickets")
    (folder / "test.jsonl").write_text("{}\n")  # other files are not part of the record or its hash
    cfg = config.from_overrides("smoke", {"inputs.text_column": "body", "inputs.label_column": "category"})
    info = inputs.get("labeled", cfg, _src(labeled=str(folder)))
    assert info["kind"] == "labeled_folder" and info["format"] == "jsonl"
    assert info["splits"] == {"train": "train.jsonl", "dev": "dev.jsonl"} and sorted(info["files"]) == sorted(
        info["splits"].values()
    )
    assert info["columns"] == {"text": "body", "label": "category"}
    texts, ids = inputs.read_labeled({**info, "labels": ["billing", "bug", "praise"]}, "dev")
    assert len(texts) == 48 and sorted(set(ids.tolist())) == [0, 1, 2]
    # A split changed after this run recorded and validated it (every label rewritten mid-run) was
    # trained on and its model kept under the recorded file's key, reused by later runs on the real file.
    dev = Path(info["files"][info["splits"]["dev"]]["path"])  # where the record read it
    recorded = dev.read_bytes()
    dev.write_bytes(recorded.replace(b'"billing"', b'"bug"'))
    with pytest.raises(DataError, match=rf"{dev}: changed since this run recorded and validated it") as changed:
        inputs.read_labeled({**info, "labels": ["billing", "bug", "praise"]}, "dev")
    assert "nothing was trained or scored on it" in str(changed.value) and "run again" in changed.value.fix
    dev.write_bytes(recorded)
    (folder / "dev.csv").write_text("body,category\nx,bug\n")
    (folder / "train.csv").write_text("body,category\nx,bug\n")
    with pytest.raises(DataError, match=r"several formats \(csv, jsonl\).*fix: put exactly one train"):
        inputs.get("labeled", cfg, _src(labeled=str(folder)))
    # A lone train.csv beside the pair was never read, without a word: someone edits the file not read.
    (folder / "dev.csv").unlink()
    with pytest.raises(DataError, match=r"train.csv beside the train.jsonl and dev.jsonl pair it reads") as stray:
        inputs.get("labeled", cfg, _src(labeled=str(folder)))
    assert stray.value.fix == "keep one train and one dev file there (remove or rename train.csv)"


def test_a_custom_corpus_splits_into_documents_and_holds_some_out(tmp_path, encoderflow_home):
    folder = write_corpus(tmp_path / "corpus", n_files=40)
    for mode, expected in (("file", 40), ("blank_line", 160)):  # each file holds 4 paragraphs
        cfg = config.from_overrides("smoke", {"inputs.documents": mode, "inputs.holdout": 0.1})
        info = inputs.get("corpus", cfg, _src(corpus=str(folder)))
        assert len(inputs.documents(info, mode)) == expected
        texts = inputs.corpus_texts(info, cfg)
        blocks = {role: open(t["path"]).read().strip().split("\n\n") for role, t in texts.items()}
        assert len(blocks["train"]) + len(blocks["valid"]) == expected, mode
        assert 1 <= len(blocks["valid"]) < expected // 4, mode  # ~10%, chosen by content, never empty
        assert inputs.corpus_texts(info, cfg) == texts  # written once, then reused as it is
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("a single document\n")
    cfg = config.from_overrides("smoke")
    with pytest.raises(DataError, match=r"1 document\(s\) with text; .*at least 2"):
        inputs.corpus_texts(inputs.get("corpus", cfg, _src(corpus=str(one))), cfg)


def _reviews(folder: Path) -> dict:
    """The record ``download_labeled`` makes of a review CSV folder (what check_lineage reads labels from)."""
    cfg = config.from_overrides("smoke", {f"inputs.{k}": v for k, v in REVIEWS.items()})
    return inputs.get("labeled", cfg, _src(labeled=str(folder)))


def test_a_csv_field_of_two_million_characters_is_read(tmp_path):
    """A document is a legitimate field: csv's default limit (131,072 characters) failed check_lineage's
    label read with a raw `_csv.Error`, retried four times as a bug."""
    folder = write_reviews_csv(tmp_path / "reviews")
    train = folder / "train.csv"
    document = "word " * 400_000
    train.write_text(train.read_text() + f'60,"{document}",pos\n')

    table = inputs.read_table(train, "csv")
    assert table.rows[-1] == {"id": "60", "review": document, "sentiment": "pos"} and all(table.parsed)
    assert len(document) == 2_000_000 and table.lines[-1] == 62
    assert inputs.labels_of(_reviews(folder)) == ["neg", "pos"]


def test_a_csv_the_reader_stops_on_is_a_data_error_naming_the_line_and_the_fix(tmp_path, monkeypatch):
    """Not a traceback retried as a bug. A platform whose csv takes no field this long is the one way to
    make the reader stop on a line (with a quote or a field count the row is read as one that does not parse)."""
    monkeypatch.setattr(inputs, "FIELD_LIMIT", 1_000)
    path = tmp_path / "train.csv"
    path.write_text("id,review,sentiment\n1,short,pos\n2," + "x" * 5_000 + ",neg\n3,short,pos\n")
    before = csv.field_size_limit()
    try:
        with pytest.raises(DataError, match=rf"^{path}: line 3: the CSV reader stopped there \(field larger") as err:
            inputs.read_table(path, "csv")
    finally:
        csv.field_size_limit(before)
    assert err.value.fix == "split the text at line 3 over several rows, or save the file as .jsonl"


def test_a_stray_quote_is_one_row_that_does_not_parse_and_the_rows_after_it_are_read(tmp_path):
    """An unclosed quote ran on into the next row: their pieces were one row whose 'label' was a piece of
    review text, a class of its own in the label set; in the last column it ran to the end of the file."""
    folder = write_reviews_csv(tmp_path / "reviews")
    train = folder / "train.csv"
    lines = train.read_text().splitlines(keepends=True)
    lines[4] = lines[4].replace(', take 3",', ", take 3,")  # the review's closing quote lost
    lines[9] = lines[9].replace(",neg\n", ',"neg\n')  # the last field's quote opened, never closed
    train.write_text("".join(lines))

    table = inputs.read_table(train, "csv")
    assert [line for line, ok in zip(table.lines, table.parsed, strict=True) if not ok] == [5, 10]
    assert table.open_quote == [not ok for ok in table.parsed]
    assert len(table.rows) == 60 and table.lines[4] == 6 and table.lines[-1] == 61  # nothing after them lost
    assert table.rows[4] == dict(zip(["id", "review", "sentiment"], review_rows(60, 0)[4], strict=True))
    assert inputs.labels_of(_reviews(folder)) == ["neg", "pos"]


def test_a_compressed_labeled_file_is_refused_naming_the_file_as_you_know_it(tmp_path):
    """check_lineage reads train's labels before validation: gzip bytes gave it a label set of garbage."""
    folder = write_reviews_csv(tmp_path / "reviews")
    train = folder / "train.csv"
    train.write_bytes(gzip.compress(train.read_bytes()))

    with pytest.raises(DataError) as err:
        inputs.labels_of(_reviews(folder))
    assert err.value.message == f"{train}: the file is gzip-compressed" and err.value.fix == "gunzip it first"
