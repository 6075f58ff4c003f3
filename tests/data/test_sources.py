"""Downloads against a real loopback HTTP server, safe extraction, and the offline data folder."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from encoderflow.config import ConfigError
from encoderflow.data import sources
from encoderflow.data.sources import DataError, DatasetSpec, ResumingDownloader, fetch, get_dataset, locate
from encoderflow.errors import cause_of

from .fixtures_http import CUT, DRIP, REDIRECT_SELF, STALL, STALL_BODY, STALL_MAX_S

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared beside the checkout
OFFICIAL = "/official"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(n: int, seed: int = 0) -> bytes:
    # Incompressible bytes: a resumed file that splices the wrong ranges cannot match by chance.
    return random.Random(seed).randbytes(n)


def fast() -> ResumingDownloader:
    return ResumingDownloader(timeout=1, retries=3, backoff=0.01)


def serve_spec(
    lb,
    data: bytes,
    filename: str = "blob.bin",
    name: str = "vocab",
    archive: str | None = None,
    members: tuple[str, ...] | None = None,
    serve: bytes | None = None,
) -> DatasetSpec:
    """A spec pinned to ``data``'s sha256 whose one official URL is on the loopback server."""
    path = f"{OFFICIAL}/{filename}"
    lb.files[path] = data if serve is None else serve
    return DatasetSpec(
        name=name,
        filename=filename,
        urls=(lb.url(path),),
        known_hash=f"sha256:{sha256(data)}",
        archive=archive,
        members=members or (filename,),
    )


def expected_root(home: Path, spec: DatasetSpec) -> Path:
    # The documented content-addressed layout: ENCODERFLOW_HOME/data/<dataset>/<hash[:16]>.
    return home / "data" / spec.name / spec.known_hash.split(":")[1][:16]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def make_zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, content in entries:
            zf.writestr(info, content)
    return buf.getvalue()


SST2_MEMBERS = {
    "SST-2/train.tsv": b"sentence\tlabel\ngood film \t1\nbad film \t0\n",
    "SST-2/dev.tsv": b"sentence\tlabel\nfine \t1\n",
    "SST-2/test.tsv": b"index\tsentence\n0\tokay\n",
}


# 1. transient server errors --------------------------------------------------------------------


def test_a_500_is_retried_and_the_file_arrives_intact(http_server, encoderflow_home, caplog):
    data = payload(50_000)
    spec = serve_spec(http_server, data)
    http_server.script(f"{OFFICIAL}/blob.bin", 500)

    info = fetch(spec, spec.members, downloader=fast())

    final = expected_root(encoderflow_home, spec) / "blob.bin"
    assert [s.status for s in http_server.seen] == [500, 200]
    assert final.read_bytes() == data
    assert info["files"] == {"blob.bin": {"path": str(final), "bytes": 50_000, "sha256": sha256(data)}}
    assert info["source"] == "download" and info["url"] == spec.urls[0]
    assert "HTTP 500; retry 1/3" in caplog.text


def test_persistent_5xx_gives_up_after_the_configured_retries(http_server, encoderflow_home):
    spec = serve_spec(http_server, payload(1000))
    http_server.script(f"{OFFICIAL}/blob.bin", *[503] * 10)

    with pytest.raises(DataError) as err:
        fetch(spec, spec.members, downloader=fast())

    assert len(http_server.seen) == 4  # the first attempt and exactly `retries` more
    assert "gave up after 4 attempts: HTTP 503" in str(err.value)
    assert spec.urls[0] in str(err.value)
    assert tree(expected_root(encoderflow_home, spec)) == set()


# 2. a cut body is resumed ----------------------------------------------------------------------


def test_a_cut_body_is_resumed_with_a_range_request(http_server, encoderflow_home, caplog):
    data = payload(300_000)
    spec = serve_spec(http_server, data)
    http_server.script(f"{OFFICIAL}/blob.bin", CUT)

    fetch(spec, spec.members, downloader=fast())

    first, second = http_server.seen
    assert (first.status, "Range" in first.headers) == (200, False)
    assert second.status == 206
    # Resumes from what reached the disk: at most the 150,000 bytes sent (a partly read chunk is lost).
    start = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 150_000
    assert f"resuming at byte {start:,}" in caplog.text
    assert (expected_root(encoderflow_home, spec) / "blob.bin").read_bytes() == data


def test_a_cut_body_restarts_cleanly_when_the_server_ignores_range(http_server, encoderflow_home):
    data = payload(300_000)
    spec = serve_spec(http_server, data)
    http_server.honour_range = False
    http_server.script(f"{OFFICIAL}/blob.bin", CUT)

    fetch(spec, spec.members, downloader=fast())

    assert [s.status for s in http_server.seen] == [200, 200]
    assert http_server.seen[1].headers["Range"].startswith("bytes=")
    assert (expected_root(encoderflow_home, spec) / "blob.bin").read_bytes() == data


def test_resume_offsets_are_file_bytes_even_where_the_host_would_gzip(http_server, encoderflow_home):
    # Range and Content-Length count the transferred representation; if the client accepted gzip,
    # the decoded byte count it resumes from would index into the compressed stream.
    data = b"".join(b"token%06d\n" % i for i in range(30_000))
    spec = serve_spec(http_server, data)
    http_server.gzip_when_accepted = True
    http_server.script(f"{OFFICIAL}/blob.bin", CUT)

    fetch(spec, spec.members, downloader=fast())

    assert (expected_root(encoderflow_home, spec) / "blob.bin").read_bytes() == data
    assert [s.status for s in http_server.seen] == [200, 206]


# 3. wrong bytes --------------------------------------------------------------------------------


def test_wrong_bytes_fail_naming_url_and_both_hashes_and_leave_nothing(http_server, encoderflow_home):
    good, bad = payload(20_000, seed=1), payload(20_000, seed=2)
    spec = serve_spec(http_server, good, serve=bad)

    with pytest.raises(DataError) as err:
        fetch(spec, spec.members, downloader=fast())

    msg = str(err.value)
    assert spec.urls[0] in msg
    assert f"sha256:{sha256(good)}" in msg
    assert sha256(bad) in msg
    root = expected_root(encoderflow_home, spec)
    assert root.is_dir() and tree(root) == set()  # no blob.bin, no pooch temp file


def test_a_corrupt_file_already_in_place_is_downloaded_again(http_server, encoderflow_home):
    data = payload(10_000)
    spec = serve_spec(http_server, data)
    final = expected_root(encoderflow_home, spec) / "blob.bin"
    final.parent.mkdir(parents=True)
    final.write_bytes(data[:5000])  # e.g. left by an older, interrupted tool

    fetch(spec, spec.members, downloader=fast())

    assert final.read_bytes() == data
    assert len(http_server.seen) == 1


def test_a_wrong_pinned_size_deletes_the_file(http_server, encoderflow_home):
    data = payload(1000)
    spec = serve_spec(http_server, data)
    spec = DatasetSpec(**{**spec.__dict__, "size": 999})

    with pytest.raises(DataError, match=r"1,000 bytes, expected 999"):
        fetch(spec, spec.members, downloader=fast())

    assert tree(expected_root(encoderflow_home, spec)) == set()


# 4. stalls -------------------------------------------------------------------------------------


def test_a_stalled_server_fails_with_a_timeout_in_bounded_time(http_server, encoderflow_home):
    spec = serve_spec(http_server, payload(1000))
    http_server.script(f"{OFFICIAL}/blob.bin", *[STALL] * 10)

    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        fetch(spec, spec.members, downloader=fast())
    elapsed = time.monotonic() - t0

    assert "timed out" in str(err.value)
    assert len(http_server.seen) == 4
    # 4 attempts x 1 s read timeout plus 0.07 s of backoff (about 4 s, more on a loaded machine): each ended
    # on the client's timeout, none waited for the server, which holds a stalled request STALL_MAX_S (20 s).
    assert elapsed < STALL_MAX_S, elapsed
    assert tree(expected_root(encoderflow_home, spec)) == set()


def test_a_body_that_stalls_midway_times_out_and_resumes(http_server, encoderflow_home, caplog):
    data = payload(200_000)
    spec = serve_spec(http_server, data)
    http_server.script(f"{OFFICIAL}/blob.bin", STALL_BODY)
    caplog.clear()

    t0 = time.monotonic()
    fetch(spec, spec.members, downloader=fast())

    # Resumed after the client's 1 s read timeout, not when the server gave up on the body (STALL_MAX_S).
    assert time.monotonic() - t0 < STALL_MAX_S
    assert [s.status for s in http_server.seen] == [200, 206]
    assert (expected_root(encoderflow_home, spec) / "blob.bin").read_bytes() == data
    assert "timed out waiting for data" in caplog.text


# 4b. a server that drips ----------------------------------------------------------------------
# A byte every 50 ms keeps every read well inside the 1 s read timeout; only a throughput floor
# (here 1,000 bytes/s over 0.5 s instead of 10,000 over 60 s) ends it.
DRIP_EVERY_S = 0.05


def with_floor(min_rate: float = 1000) -> ResumingDownloader:
    return ResumingDownloader(timeout=1, retries=3, backoff=0.01, min_rate=min_rate, rate_window=0.5)


def test_a_dripping_server_fails_on_the_throughput_floor_and_leaves_nothing(http_server, encoderflow_home, monkeypatch):
    data = payload(200_000)
    spec = serve_spec(http_server, data)
    http_server.drip_every_s = DRIP_EVERY_S
    http_server.script(f"{OFFICIAL}/blob.bin", DRIP)
    # The limits a download task uses, from the environment (a task passes no downloader).
    monkeypatch.setenv("ENCODERFLOW_DOWNLOAD_MIN_RATE", "1000")
    monkeypatch.setenv("ENCODERFLOW_DOWNLOAD_RATE_WINDOW", "0.5")

    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        fetch(spec, spec.members)
    elapsed = time.monotonic() - t0

    msg = str(err.value)
    url = spec.urls[0]
    # What was received, from where, against which limit.
    assert re.search(
        rf"download {re.escape(url)}: too slow: \d+ bytes in the last 0\.\d+s \([\d.]+ bytes/s, under the floor "
        r"of 1,000 bytes/s\); \d+ of 200,000 bytes received in all, not kept",
        msg,
    ), msg
    # The fix: another source, or a lower floor.
    fix = err.value.fix
    assert "--mirror" in fix and "--data-dir" in fix and "ENCODERFLOW_DOWNLOAD_MIN_RATE=" in fix, fix
    assert msg.endswith(f"\nfix: {fix}")
    cause = cause_of(err.value)
    assert (
        cause.error == "DataError" and cause.fix == fix and "too slow" in cause.message and "fix" not in cause.message
    )
    assert len(http_server.seen) == 1  # a server that drips would drip again: no retry of that URL
    # Ended on the floor, about one 0.5 s rate window in (a loaded machine adds seconds); dripping on,
    # 200,000 bytes at a byte every 50 ms would take hours.
    assert elapsed < 20 * 0.5, elapsed
    # pooch downloads to a temp name and deletes it on failure: no partial blob.bin, no temp file.
    assert tree(expected_root(encoderflow_home, spec)) == set()


def test_without_the_floor_a_read_timeout_never_ends_a_drip(http_server, encoderflow_home):
    # Why the floor exists: with it off, the 1 s read timeout sees a byte every 50 ms and waits on.
    data = payload(20_000)
    spec = serve_spec(http_server, data)
    http_server.drip_every_s = DRIP_EVERY_S
    http_server.script(f"{OFFICIAL}/blob.bin", DRIP)
    outcome: dict = {}

    def run():
        try:
            outcome["info"] = fetch(spec, spec.members, downloader=with_floor(min_rate=0))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while not http_server.seen and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # counted from the request: a loaded machine may take a while to send it
    worker.join(2.5)
    # Still dripping after 2.5 read timeouts, on its one request: no timeout ended it and retried.
    assert worker.is_alive(), outcome
    assert [s.status for s in http_server.seen] == [200], http_server.seen
    http_server.release.set()  # the server cuts the body; the client resumes it with a range request
    worker.join(60)  # bounded, not a speed check: the rest is served at once
    assert not worker.is_alive() and "info" in outcome, outcome
    assert (expected_root(encoderflow_home, spec) / "blob.bin").read_bytes() == data


def test_a_dripping_mirror_falls_back_to_the_official_url(http_server, encoderflow_home):
    data = payload(50_000)
    spec = serve_spec(http_server, data)
    http_server.files["/mirror/blob.bin"] = data
    http_server.drip_every_s = DRIP_EVERY_S
    http_server.script("/mirror/blob.bin", DRIP)

    info = fetch(spec, spec.members, mirror=http_server.url("/mirror"), downloader=with_floor())

    assert [s.path for s in http_server.seen] == ["/mirror/blob.bin", f"{OFFICIAL}/blob.bin"]
    assert info["url"] == spec.urls[0]
    assert (expected_root(encoderflow_home, spec) / "blob.bin").read_bytes() == data


def test_the_floor_judges_the_last_window_with_the_default_limits():
    # 10,000 bytes/s over 60 s, on a clock the test drives.
    now = [0.0]

    def feed(meter, seconds: float, every: float, n: int):
        for _ in range(round(seconds / every)):
            now[0] += every
            if verdict := meter.add(n):
                return verdict
        return None

    # A byte every 5 s: judged once a window has passed, with what that window received.
    drip = sources._Throughput(sources.DEFAULT_MIN_RATE, sources.DEFAULT_RATE_WINDOW, clock=lambda: now[0])
    got, seconds = feed(drip, 3600, 5.0, 1)
    assert now[0] == 60.0 and 60 <= seconds <= 61 and got == 12
    # A 20 kB/s link that stalls for 20 s (under the 30 s read timeout): the window around the stall
    # still averages above the floor.
    now[0] = 0.0
    link = sources._Throughput(sources.DEFAULT_MIN_RATE, sources.DEFAULT_RATE_WINDOW, clock=lambda: now[0])
    assert feed(link, 120, 0.5, 10_000) is None
    now[0] += 20
    assert feed(link, 120, 0.5, 10_000) is None
    # The same link slowed to 5 kB/s for good: caught within a window.
    t_slow = now[0]
    assert feed(link, 600, 0.5, 2_500) is not None
    assert now[0] - t_slow <= 60
    # Off: never judged.
    now[0] = 0.0
    off = sources._Throughput(0, sources.DEFAULT_RATE_WINDOW, clock=lambda: now[0])
    assert feed(off, 3600, 5.0, 1) is None


@pytest.mark.parametrize(
    "name, value",
    [
        ("ENCODERFLOW_DOWNLOAD_MIN_RATE", "fast"),
        ("ENCODERFLOW_DOWNLOAD_MIN_RATE", "-1"),
        ("ENCODERFLOW_DOWNLOAD_RATE_WINDOW", "0"),
    ],
)
def test_a_bad_floor_setting_is_refused_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        ResumingDownloader.from_env()
    assert str(err.value).startswith(f"{name}={value!r}: expected a number")


def test_the_floor_defaults_and_reads_the_environment(monkeypatch):
    d = ResumingDownloader.from_env()
    assert (d.min_rate, d.rate_window) == (10_000, 60)
    monkeypatch.setenv("ENCODERFLOW_DOWNLOAD_MIN_RATE", "0")
    monkeypatch.setenv("ENCODERFLOW_DOWNLOAD_RATE_WINDOW", "120")
    d = ResumingDownloader.from_env()
    assert (d.min_rate, d.rate_window) == (0, 120)


# 5. User-Agent ---------------------------------------------------------------------------------


def test_hosts_that_refuse_urllibs_agent_accept_ours(http_server, encoderflow_home):
    data = payload(2000)
    spec = serve_spec(http_server, data)
    http_server.refused_agents = ("Python-urllib",)

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(spec.urls[0], timeout=5)
    assert err.value.code == 403

    fetch(spec, spec.members, downloader=fast())

    assert [s.status for s in http_server.seen] == [403, 200]
    assert http_server.seen[1].headers["User-Agent"] == sources.USER_AGENT
    assert (expected_root(encoderflow_home, spec) / "blob.bin").read_bytes() == data


# 6. archives -----------------------------------------------------------------------------------


def zip_spec(lb, archive: bytes, name: str = "sst2") -> DatasetSpec:
    return serve_spec(lb, archive, filename="SST-2.zip", name=name, archive="zip", members=tuple(SST2_MEMBERS))


def test_a_good_zip_is_extracted_and_every_member_described(http_server, encoderflow_home):
    spec = zip_spec(http_server, make_zip(list(SST2_MEMBERS.items())))
    # What a worker killed mid-extraction left: the retry's extraction sweeps it.
    killed = expected_root(encoderflow_home, spec) / ".extract-killed"
    (killed / "SST-2").mkdir(parents=True)
    (killed / "SST-2" / "train.tsv").write_text("half")

    info = fetch(spec, spec.members, downloader=fast())

    extracted = expected_root(encoderflow_home, spec) / "extracted"
    assert info["root"] == str(extracted)
    assert info["files"] == {
        m: {"path": str(extracted / m), "bytes": len(content), "sha256": sha256(content)}
        for m, content in SST2_MEMBERS.items()
    }
    assert (extracted / ".complete").read_text() == spec.known_hash + "\n"
    assert not [p for p in extracted.parent.iterdir() if p.name.startswith(".extract-")]


def test_a_zip_missing_a_member_names_it_and_the_layout(http_server, encoderflow_home):
    entries = [(m, c) for m, c in SST2_MEMBERS.items() if m != "SST-2/dev.tsv"]
    spec = zip_spec(http_server, make_zip(entries))

    with pytest.raises(DataError) as err:
        fetch(spec, spec.members, downloader=fast())

    extracted = expected_root(encoderflow_home, spec) / "extracted"
    assert err.value.message.endswith(f"missing {extracted / 'SST-2' / 'dev.tsv'}"), err.value.message
    assert err.value.fix.startswith(f"delete {extracted} and run again to extract it afresh"), err.value.fix


def _symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("SST-2/link")
    info.create_system = 3  # unix, so the mode bits below are meaningful
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink"])
def test_unsafe_zip_entries_are_refused_and_nothing_is_written(http_server, encoderflow_home, tmp_path, kind):
    evil_abs = tmp_path / "abs-evil.txt"
    entry, content, refusal = {
        "traversal": ("../evil.txt", b"pwned", "refusing path traversal entry '../evil.txt'"),
        "absolute": (str(evil_abs), b"pwned", f"refusing absolute path {str(evil_abs)!r}"),
        "symlink": (_symlink_entry(), b"../../../../../etc/passwd", "refusing symbolic link 'SST-2/link'"),
    }[kind]
    # A good member first: a check made while extracting (rather than before) would leave it behind.
    spec = zip_spec(http_server, make_zip([*SST2_MEMBERS.items(), (entry, content)]))

    with pytest.raises(DataError) as err:
        fetch(spec, spec.members, downloader=fast())

    assert refusal in str(err.value)
    root = expected_root(encoderflow_home, spec)
    assert tree(root) == {"SST-2.zip"}  # the verified archive only: no extracted/, no .extract-* temp
    for parent in [root, *root.parents]:
        assert not (parent / "evil.txt").exists(), parent
        if parent == tmp_path.parent:
            break
    assert not evil_abs.exists()


def test_a_file_that_is_not_a_zip_is_reported(http_server, encoderflow_home):
    spec = zip_spec(http_server, b"<html>an error page with a 200 status</html>")

    with pytest.raises(DataError, match="not a valid zip archive"):
        fetch(spec, spec.members, downloader=fast())

    assert tree(expected_root(encoderflow_home, spec)) == {"SST-2.zip"}


# 7. reuse --------------------------------------------------------------------------------------


def test_a_verified_file_is_reused_without_any_request(http_server, encoderflow_home):
    spec = zip_spec(http_server, make_zip(list(SST2_MEMBERS.items())))
    first = fetch(spec, spec.members, downloader=fast())
    marker = expected_root(encoderflow_home, spec) / "extracted" / ".complete"
    marker_mtime = marker.stat().st_mtime_ns

    second = fetch(spec, spec.members, downloader=fast())

    assert len(http_server.seen) == 1
    assert second["files"] == first["files"]
    assert second["content_hash"] == first["content_hash"]
    assert marker.stat().st_mtime_ns == marker_mtime  # not extracted again either


# 8. mirrors ------------------------------------------------------------------------------------


def test_a_working_mirror_is_used_and_the_official_host_is_not_contacted(http_server, encoderflow_home):
    data = payload(5000)
    spec = serve_spec(http_server, data)
    http_server.files["/mirror/blob.bin"] = data

    info = fetch(spec, spec.members, mirror=http_server.url("/mirror/"), downloader=fast())

    assert [s.path for s in http_server.seen] == ["/mirror/blob.bin"]
    assert info["url"] == http_server.url("/mirror/blob.bin")


@pytest.mark.parametrize("failure", ["404", "wrong-bytes", "redirect-loop"])
def test_a_failing_mirror_falls_back_to_the_official_url(http_server, encoderflow_home, failure, caplog):
    data = payload(5000)
    spec = serve_spec(http_server, data)
    if failure == "wrong-bytes":
        http_server.files["/mirror/blob.bin"] = payload(5000, seed=9)
    elif failure == "redirect-loop":
        http_server.script("/mirror/blob.bin", REDIRECT_SELF)

    info = fetch(spec, spec.members, mirror=http_server.url("/mirror"), downloader=fast())

    paths = [s.path for s in http_server.seen]
    assert paths[0] == "/mirror/blob.bin" and paths[-1] == f"{OFFICIAL}/blob.bin"
    assert set(paths[:-1]) == {"/mirror/blob.bin"}
    if failure != "redirect-loop":
        assert len(paths) == 2  # a 404 or a bad hash is final for that URL: no retry
    assert info["url"] == spec.urls[0]
    assert (expected_root(encoderflow_home, spec) / "blob.bin").read_bytes() == data
    # The run succeeded: the mirror's failure is a warning, not an ERROR line in a green task's log.
    assert [r.levelname for r in caplog.records if "mirror/blob.bin" in r.getMessage()] == ["WARNING"]


def test_when_every_source_fails_the_error_lists_each(http_server, encoderflow_home):
    spec = serve_spec(http_server, payload(100))
    http_server.files.clear()

    with pytest.raises(DataError) as err:
        fetch(spec, spec.members, mirror=http_server.url("/mirror"), downloader=fast())

    msg = str(err.value)
    assert f"no source gave a verified blob.bin (expected {spec.known_hash})" in msg
    assert f"download {http_server.url('/mirror/blob.bin')}: HTTP 404" in msg
    assert f"download {spec.urls[0]}: HTTP 404" in msg


def test_get_dataset_downloads_with_a_sources_file_and_the_mirror_variable(
    http_server, tmp_path, monkeypatch, encoderflow_home
):
    vocab = b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n"
    http_server.files["/mirror/my_vocab.txt"] = vocab
    sources_file = tmp_path / "sources.json"
    sources_file.write_text(
        json.dumps(
            {
                "vocab": {
                    "filename": "my_vocab.txt",
                    "urls": [http_server.url("/nowhere/my_vocab.txt")],
                    "known_hash": f"sha256:{sha256(vocab)}",
                    "size": len(vocab),
                    "members": ["my_vocab.txt"],
                }
            }
        )
    )
    monkeypatch.setenv("ENCODERFLOW_MIRROR", http_server.url("/mirror"))

    info = get_dataset("vocab", sources_file=str(sources_file), downloader=fast())

    assert [s.path for s in http_server.seen] == ["/mirror/my_vocab.txt"]
    assert info["dataset"] == "vocab"
    assert Path(info["files"]["my_vocab.txt"]["path"]).read_bytes() == vocab
    # A re-packed copy is nobody's pinned official archive: validation uses loose bounds on it.
    assert info["pinned"] is False


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared real data not mounted")
def test_the_pinned_archive_from_a_mirror_is_pinned_and_an_offline_copy_is_not(http_server, encoderflow_home):
    spec = sources.DEFAULT_SPECS["vocab"]
    http_server.files[f"/mirror/{spec.filename}"] = (SHARED / "bert_vocab_uncased.txt").read_bytes()

    downloaded = get_dataset("vocab", mirror=http_server.url("/mirror"), downloader=fast())
    offline = get_dataset("vocab", data_dir=str(SHARED))

    assert downloaded["pinned"] is True and offline["pinned"] is False
    assert downloaded["content_hash"] == offline["content_hash"]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "cannot read it as JSON"),
        ('{"imagenet": {}}', "unknown dataset 'imagenet'"),
        ('[{"sst2": {}}]', "holds a JSON list, not an object of datasets"),
        ('{"sst2": ["https://m/SST-2.zip"]}', "'sst2' is a JSON list, not an object of fields"),
        ('{"sst2": {"sha256": "abc"}}', "'sst2' has unknown fields ['sha256']"),
        ('{"sst2": {"urls": "https://m/SST-2.zip"}}', "sst2.urls must be a list of strings"),
    ],
)
def test_a_bad_sources_file_names_itself(tmp_path, content, problem):
    """Every mistake is a DataError (the task fails once, no retry) naming the file and the fix."""
    path = tmp_path / "sources.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        sources.load_specs(str(path))
    assert str(err.value).startswith(f"sources file {path}: {problem}")
    if problem.startswith("cannot read"):
        assert "json.tool" in err.value.fix
    elif "JSON" in problem or "fields" in problem or "strings" in problem:
        assert "known_hash" in err.value.fix or "urls" in err.value.fix


# 9. offline folder -----------------------------------------------------------------------------


def test_offline_missing_file_names_the_expected_path_and_layout(tmp_path):
    data_dir = tmp_path / "offline"
    (data_dir / "SST-2").mkdir(parents=True)
    (data_dir / "SST-2" / "train.tsv").write_bytes(SST2_MEMBERS["SST-2/train.tsv"])

    with pytest.raises(DataError) as err:
        get_dataset("sst2", data_dir=str(data_dir))

    # Each missing file once, and the fix naming them: not the layout of every dataset.
    assert err.value.message == (
        f"offline data folder {data_dir}: missing {data_dir / 'SST-2' / 'dev.tsv'}, {data_dir / 'SST-2' / 'test.tsv'}"
    )
    assert err.value.fix == (
        f"put the missing file(s) under {data_dir} as the archives extract, or point --data-dir at a folder that "
        "has them"
    )


def test_offline_folder_without_the_configured_split_names_the_key_and_a_split_it_holds(tmp_path):
    """Offline copies lack WikiText's train split, which the guide and recipe presets pretrain on."""
    data_dir = tmp_path / "offline"
    (data_dir / "wikitext-103-raw").mkdir(parents=True)
    for split in ("valid", "test"):
        (data_dir / sources.wikitext_member(split)).write_text(" = T = \n text\n")

    with pytest.raises(DataError) as err:
        get_dataset("wikitext", pretrain_split="train", data_dir=str(data_dir))

    assert str(err.value).startswith(
        f"offline data folder {data_dir}: missing {data_dir / 'wikitext-103-raw' / 'wiki.train.raw'}, "
        "the train split data.pretrain_split names (this folder holds WikiText's valid, test)"
    ), err.value
    assert err.value.fix.startswith("put wiki.train.raw there, or use a split it holds: --set data.pretrain_split=test")
    assert get_dataset("wikitext", pretrain_split="test", data_dir=str(data_dir))["files"]
    # Never the split the other key reads: no validating on the pretraining text, nor the reverse.
    (data_dir / sources.wikitext_member("valid")).unlink()
    (data_dir / sources.wikitext_member("train")).write_text(" = T = \n text\n")
    with pytest.raises(DataError) as err:
        get_dataset("wikitext", pretrain_split="train", data_dir=str(data_dir))
    assert "--set data.validation_split=test " in err.value.fix, err.value.fix
    (data_dir / sources.wikitext_member("train")).unlink()
    (data_dir / sources.wikitext_member("test")).unlink()
    (data_dir / sources.wikitext_member("valid")).write_text(" = T = \n text\n")
    with pytest.raises(DataError) as err:
        get_dataset("wikitext", pretrain_split="train", data_dir=str(data_dir))
    assert "which data.pretrain_split cannot share" in str(err.value) and err.value.fix == "put wiki.train.raw there"


def test_offline_folder_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(DataError) as err:
        get_dataset("vocab", data_dir=str(tmp_path / "nope"))
    assert f"offline data folder {tmp_path / 'nope'} does not exist" in str(err.value)
    assert "\n  bert_vocab_uncased.txt" in str(err.value)


def test_offline_records_each_files_sha256_and_asks_only_for_the_configured_splits(tmp_path):
    data_dir = tmp_path / "offline"
    (data_dir / "wikitext-103-raw").mkdir(parents=True)
    (data_dir / "wikitext-103-raw" / "wiki.test.raw").write_bytes(b" = A = \n")
    (data_dir / "wikitext-103-raw" / "wiki.valid.raw").write_bytes(b" = B = \n")

    info = locate(sources.DEFAULT_SPECS["wikitext"], sources.required_members("wikitext", "test", "valid"), data_dir)

    assert info["source"] == "offline" and info["root"] == str(data_dir)
    assert {m: f["sha256"] for m, f in info["files"].items()} == {
        "wikitext-103-raw/wiki.test.raw": sha256(b" = A = \n"),
        "wikitext-103-raw/wiki.valid.raw": sha256(b" = B = \n"),
    }
    assert sources.required_members("wikitext", "valid", "valid") == ("wikitext-103-raw/wiki.valid.raw",)


# Published sha256 values of the genuine files (PROVENANCE.md of the shared folder).
GENUINE_SHA256 = {
    "SST-2/train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    "SST-2/dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    "SST-2/test.tsv": "69a938605609b3e6663b4487918fe1565eb293734e6e520d0366d1d412fd2a13",
    "wikitext-103-raw/wiki.valid.raw": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
    "wikitext-103-raw/wiki.test.raw": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    "bert_vocab_uncased.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared real data not mounted")
def test_offline_on_the_shared_real_data(encoderflow_home):
    before = sorted((str(p), p.stat().st_mtime_ns) for p in SHARED.rglob("*"))

    recorded = {}
    for dataset in sources.DATASETS:
        info = get_dataset(dataset, "test", "valid", data_dir=str(SHARED))
        assert info["source"] == "offline" and info["root"] == str(SHARED)
        recorded.update({m: f["sha256"] for m, f in info["files"].items()})

    assert recorded == GENUINE_SHA256
    assert sources.DEFAULT_SPECS["vocab"].known_hash == f"sha256:{GENUINE_SHA256['bert_vocab_uncased.txt']}"
    assert sorted((str(p), p.stat().st_mtime_ns) for p in SHARED.rglob("*")) == before
    assert not encoderflow_home.exists()  # offline mode neither downloads nor copies


# 10. progress ----------------------------------------------------------------------------------


def test_progress_is_logged_as_plain_lines(http_server, encoderflow_home, caplog, capfd):
    caplog.set_level(logging.INFO)
    data = payload(1_000_000)
    spec = serve_spec(http_server, data)
    http_server.script(f"{OFFICIAL}/blob.bin", CUT)

    fetch(spec, spec.members, downloader=fast())

    lines = [r.getMessage() for r in caplog.records if r.name == "encoderflow.data.sources"]
    progress = [line for line in lines if line.startswith("download blob.bin: ")]
    assert progress[-1] == "download blob.bin: done, 1,000,000 bytes"
    assert "download blob.bin: 1,000,000 of 1,000,000 bytes (100%)" in progress
    assert 5 <= len(progress) <= 25  # about every 10 %, not once per 64 KiB chunk
    assert not [line for line in lines if "\r" in line or "\n" in line]
    out, err = capfd.readouterr()
    assert "\r" not in out and "\r" not in err  # nor from pooch's own stream handler or a tqdm bar


def test_a_download_writes_nothing_to_stderr(http_server, encoderflow_home):
    # Airflow's task supervisor records a task's stderr at ERROR. pooch's logger is outside
    # logging's tree and has its own stderr handler: its "Downloading data from" line would be an
    # ERROR line in a green task's log. A child process, as in a task, since pooch binds sys.stderr
    # at import and pytest's capture cannot see through that.
    data = payload(5000)
    spec = serve_spec(http_server, data)
    script = (
        "from encoderflow.data.sources import DatasetSpec, fetch\n"
        f"spec = DatasetSpec(name='vocab', filename='blob.bin', urls=({spec.urls[0]!r},),"
        f" known_hash={spec.known_hash!r}, members=('blob.bin',))\n"
        "fetch(spec, spec.members)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert (expected_root(encoderflow_home, spec) / "blob.bin").read_bytes() == data
    assert done.stderr == ""


def test_two_missing_splits_get_their_ways_out_together_never_the_same_split_twice(tmp_path):
    """A folder holding only the test split, for a run reading train and valid: suggesting test for both
    keys sent the second run into a failure the first could have said."""
    data_dir = tmp_path / "offline"
    (data_dir / "wikitext-103-raw").mkdir(parents=True)
    (data_dir / sources.wikitext_member("test")).write_text(" = T = \n text\n")
    needs = {"wikitext": sources.required_members("wikitext", "train", "valid")}
    with pytest.raises(DataError) as err:
        sources.check_offline(data_dir, needs, {"pretrain_split": "train", "validation_split": "valid"})
    assert "the train split data.pretrain_split names" in err.value.message
    assert "the valid split data.validation_split names" in err.value.message
    assert err.value.fix == (
        "put wiki.train.raw there, or use a split it holds: --set data.pretrain_split=test "
        '(make run SET="data.pretrain_split=test"); put wiki.valid.raw there'
    ), err.value.fix
