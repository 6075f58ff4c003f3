"""Your own data as folders: local copies, HTTP folders with a manifest (loopback server), fingerprints."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from encoderflow import layout
from encoderflow.data import folders
from encoderflow.data.sources import DataError, ResumingDownloader

FAST = ResumingDownloader(timeout=5, retries=0, backoff=0.0)


def _tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text\n")
    (root / "sub" / "b.txt").write_text("beta text\n")
    (root / ".hidden").write_text("editor swap file\n")
    return root


def test_a_local_folder_is_copied_content_addressed_and_reused(tmp_path, encoderflow_home, caplog):
    src = _tree(tmp_path / "corpus")
    killed = encoderflow_home / "data" / "corpus" / ".fetch-killed"  # a copy killed midway, swept by the next
    (killed / "files").mkdir(parents=True)
    first = folders.fetch("corpus", str(src))
    assert not killed.exists()
    assert sorted(first["files"]) == ["a.txt", "sub/b.txt"]  # hidden files are not data
    copy = first["files"]["sub/b.txt"]
    assert copy["path"].startswith(str(encoderflow_home / "data" / "corpus"))
    assert copy["origin"] == str(src / "sub" / "b.txt")
    assert copy["sha256"] == hashlib.sha256(b"beta text\n").hexdigest()
    assert first["content_hash"] == layout.sha256_json({n: f["sha256"] for n, f in first["files"].items()})
    # The copy is what gets read: changing the source after the download cannot reach this run.
    (src / "a.txt").write_text("changed\n")
    assert open(first["files"]["a.txt"]["path"]).read() == "alpha text\n"
    second = folders.fetch("corpus", f"file://{src}")
    assert second["content_hash"] != first["content_hash"]
    # Back to the first content: the first copy is found and reused, not copied again.
    (src / "a.txt").write_text("alpha text\n")
    caplog.set_level("INFO")
    third = folders.fetch("corpus", str(src))
    assert third["root"] == first["root"] and "unchanged" in caplog.text
    assert not list((encoderflow_home / "data" / "corpus").glob(".fetch-*"))  # no temp folder left


def test_a_link_out_of_the_folder_is_refused_and_a_private_file_stays_private(tmp_path, encoderflow_home):
    """A link in a corpus folder copied any file the worker could read (a 0600 key) into the data store,
    world-readable, and into the training text."""
    src = _tree(tmp_path / "corpus")
    secret = tmp_path / "victim.txt"
    secret.write_text("top secret api key\n")
    secret.chmod(0o600)
    (src / "link.txt").symlink_to(secret)
    with pytest.raises(DataError) as err:
        folders.fetch("corpus", str(src))
    assert str(err.value) == (
        f"corpus folder {src}: link.txt is a link to {secret}, outside the folder: not read; fix: copy the file "
        "into the folder (a link to a file inside it is read)"
    )
    with pytest.raises(DataError, match="outside the folder"):
        folders.fingerprint(str(src), "corpus")
    assert not (encoderflow_home / "data" / "corpus").exists() or not list(
        (encoderflow_home / "data" / "corpus").rglob("link.txt")
    )
    # A link within the folder is its own data; a private file's copy keeps its mode.
    (src / "link.txt").unlink()
    (src / "again.txt").symlink_to(src / "a.txt")
    (src / "sub" / "b.txt").chmod(0o600)
    got = folders.fetch("corpus", str(src))
    assert sorted(got["files"]) == ["a.txt", "again.txt", "sub/b.txt"]
    assert os.stat(got["files"]["sub/b.txt"]["path"]).st_mode & 0o777 == 0o600


def test_a_missing_or_empty_folder_is_refused_with_the_fix(tmp_path, encoderflow_home):
    with pytest.raises(DataError, match=r"corpus folder .*nope: does not exist; fix: give the corpus source"):
        folders.fetch("corpus", str(tmp_path / "nope"))
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"labeled folder .*a.jsonl: not a folder \(a file\); fix: give the labeled"):
        folders.fingerprint(str(tmp_path / "a.jsonl"), "labeled")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no files in it"):
        folders.fetch("labeled", str(tmp_path / "empty"))


def test_an_http_folder_is_read_from_its_manifest_and_verified(http_server, encoderflow_home):
    body_a, body_b = b"first document\n", b"second document\n"
    manifest = {"files": [{"name": "a.txt", "sha256": hashlib.sha256(body_a).hexdigest()}, "docs/b.txt"]}
    http_server.files.update(
        {"/c/manifest.json": json.dumps(manifest).encode(), "/c/a.txt": body_a, "/c/docs/b.txt": body_b}
    )
    info = folders.fetch("corpus", http_server.url("/c"), FAST)
    assert info["source"] == "download" and sorted(info["files"]) == ["a.txt", "docs/b.txt"]
    assert open(info["files"]["docs/b.txt"]["path"], "rb").read() == body_b
    assert info["files"]["a.txt"]["origin"] == http_server.url("/c/a.txt")

    # Every sha256 in the manifest and the folder already here: reused without fetching a file.
    full = {"files": [{"name": n, "sha256": f["sha256"]} for n, f in info["files"].items()]}
    http_server.files["/c/manifest.json"] = json.dumps(full).encode()
    before = len(http_server.seen)
    again = folders.fetch("corpus", http_server.url("/c"), FAST)
    assert again["root"] == info["root"]
    assert [s.path for s in http_server.seen[before:]] == ["/c/manifest.json"]

    # A file that does not match its manifest entry is refused; nothing half-made stays.
    full["files"][0]["sha256"] = hashlib.sha256(b"the new first document\n").hexdigest()
    http_server.files["/c/manifest.json"] = json.dumps(full).encode()
    http_server.files["/c/a.txt"] = b"tampered\n"
    with pytest.raises(DataError, match=r"download http://127\.0\.0\.1:\d+/c/a\.txt: .*fix: fix the sha256"):
        folders.fetch("corpus", http_server.url("/c"), FAST)
    assert not list((encoderflow_home / "data" / "corpus").glob(".fetch-*"))


def test_a_manifest_may_not_point_outside_its_folder(http_server, encoderflow_home):
    http_server.files["/c/manifest.json"] = json.dumps({"files": ["../secret.txt"]}).encode()
    with pytest.raises(DataError, match=r"refusing file name '\.\./secret\.txt'"):
        folders.fetch("corpus", http_server.url("/c"), FAST)
    http_server.files["/c/manifest.json"] = b"not json"
    with pytest.raises(DataError, match=r"manifest .*not a JSON object with a 'files' list"):
        folders.fetch("corpus", http_server.url("/c"), FAST)


def test_the_fingerprint_changes_when_a_file_does(tmp_path, http_server):
    src = _tree(tmp_path / "corpus")
    fp = folders.fingerprint(str(src), "corpus")
    assert sorted(fp["files"]) == ["a.txt", "sub/b.txt"] and folders.fingerprint(str(src), "corpus") == fp
    (src / "a.txt").write_text("alpha text, with more words\n")
    assert folders.fingerprint(str(src), "corpus") != fp
    st = os.stat(src / "sub" / "b.txt")
    os.utime(src / "sub" / "b.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same size
    assert folders.fingerprint(str(src), "corpus")["files"]["sub/b.txt"] != fp["files"]["sub/b.txt"]

    http_server.files["/c/manifest.json"] = b'{"files": ["a.txt"]}'
    remote = folders.fingerprint(http_server.url("/c"), "corpus")
    http_server.files["/c/manifest.json"] = b'{"files": ["a.txt", "b.txt"]}'
    assert folders.fingerprint(http_server.url("/c"), "corpus") != remote
