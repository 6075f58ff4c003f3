"""What crosses XCom: old metric names read as today's, long file lists as a verified index, splits, single files."""

from __future__ import annotations

import json

import pytest

from encoderflow import layout, results
from encoderflow.data.sources import DataError


def test_names_of_before_the_rename_read_as_todays():
    old = {"sst2_val_accuracy": 0.81, "mlm_val_accuracy": 0.3, "gate.candidate_accuracy": "0.81"}
    assert results.current_names(old) == {"val_accuracy": 0.81, "mlm_val_accuracy": 0.3, "gate.val_accuracy": "0.81"}
    assert old == {"sst2_val_accuracy": 0.81, "mlm_val_accuracy": 0.3, "gate.candidate_accuracy": "0.81"}  # untouched
    # A record holding both names keeps today's value.
    assert results.current_names({"sst2_val_accuracy": 0.5, "val_accuracy": 0.9}) == {"val_accuracy": 0.9}


def _dataset(n: int) -> dict:
    files = {f"doc{i:04d}.txt": {"path": f"/data/doc{i:04d}.txt", "bytes": i, "sha256": f"{i:064x}"} for i in range(n)}
    return {"dataset": "corpus_folder", "role": "corpus", "content_hash": "c" * 64, "files": files}


def test_a_short_file_list_stays_inline():
    info = _dataset(results.INLINE_FILES_MAX)
    assert results.compact(info) is info and results.files_of(info) is info["files"]


def test_a_long_file_list_crosses_as_a_verified_index(monkeypatch):
    info = _dataset(results.INLINE_FILES_MAX + 1)
    record = results.compact(info)
    assert "files" not in record and record["file_count"] == results.INLINE_FILES_MAX + 1
    assert len(json.dumps(record)) < 600 < len(json.dumps(info))
    index = layout.home() / "data" / "index" / f"{record['files_index_sha256']}.json"
    assert record["files_index"] == str(index) and layout.sha256_file(index) == record["files_index_sha256"]
    assert results.compact(info) == record  # the same content, the same index
    # Another process (no cache) reads the index from disk and checks it.
    monkeypatch.setattr(results, "_INDEXES", {})
    assert results.files_of(record) == info["files"]
    assert results.file_info(record, "doc0003.txt") == info["files"]["doc0003.txt"]

    monkeypatch.setattr(results, "_INDEXES", {})
    index.write_text(index.read_text().replace("doc0003", "doc9999"))
    with pytest.raises(DataError, match="does not match sha256") as err:
        results.files_of(record)
    assert err.value.fix == "re-run download_corpus and the tasks after it"
    index.unlink()
    with pytest.raises(DataError, match="is unreadable"):
        results.files_of(record)


def test_splits_and_single_files_name_what_there_is():
    sst2 = {
        "dataset": "sst2",
        "role": "labeled",
        "files": {
            m: {"path": f"/d/{m}", "bytes": 1, "sha256": "0" * 64} for m in (results.SST2_TRAIN, results.SST2_DEV)
        },
    }
    assert results.split_path(sst2, "dev") == f"/d/{results.SST2_DEV}"  # a record without splits is SST-2's layout
    with pytest.raises(KeyError, match="has no 'test' split"):
        results.split_info(sst2, "test")
    with pytest.raises(KeyError, match=r"has no 'SST-2/test.tsv'; it has \['SST-2/dev.tsv', 'SST-2/train.tsv'\]"):
        results.file_info(sst2, "SST-2/test.tsv")
    with pytest.raises(ValueError, match="has 2 files, expected one"):
        results.only_file(sst2)
    vocab = {
        "dataset": "vocab",
        "role": "vocab",
        "files": {"v.txt": {"path": "/v.txt", "bytes": 1, "sha256": "1" * 64}},
    }
    assert results.only_file(vocab)["path"] == "/v.txt"
