"""Dataset specs and getting the bytes: HTTP downloads with pinned hashes, or an offline folder.

Downloads go through :func:`pooch.retrieve`, which writes to a temporary name, checks the pinned
hash and only then moves the file into place (a wrong file never becomes visible). Pooch's own
downloader neither retries nor resumes, so :class:`ResumingDownloader` does that part: a real
User-Agent (the WikiText host refuses urllib's), retries with exponential backoff on 5xx and
connection errors, a read timeout for stalled connections, HTTP range resume of a cut body, and
progress as plain log lines. A server that drips bytes (each read quick, so the read timeout
never fires) is caught by a throughput floor: fewer than ``ENCODERFLOW_DOWNLOAD_MIN_RATE`` bytes
per second (default 10,000) over the last ``ENCODERFLOW_DOWNLOAD_RATE_WINDOW`` seconds (default 60)
ends that URL's download, and the next source is tried.

Archives are extracted safely (no absolute paths, ``..`` or links) into a temporary folder that
is renamed into the content-addressed data folder, ``ENCODERFLOW_HOME/data/<dataset>/<hash>``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from encoderflow import __version__, layout
from encoderflow.config import ConfigError
from encoderflow.errors import EncoderflowError

log = logging.getLogger(__name__)

USER_AGENT = f"encoderflow/{__version__} (+https://github.com/encoderflow; python-requests)"
# Ask for the file's own bytes: Content-Length and Range count the transferred representation, so
# with gzip allowed the cut-body check and the resume offset would mix compressed and decoded bytes.
REQUEST_HEADERS = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
CHUNK_BYTES = 1 << 16
# The throughput floor. Not config knobs: like the mirror, they change how bytes arrive, never
# which bytes (the pinned hash decides that), so they stay out of the config hash.
MIN_RATE_ENV, DEFAULT_MIN_RATE = "ENCODERFLOW_DOWNLOAD_MIN_RATE", 10_000.0
RATE_WINDOW_ENV, DEFAULT_RATE_WINDOW = "ENCODERFLOW_DOWNLOAD_RATE_WINDOW", 60.0


class DataError(EncoderflowError):
    """Missing, corrupt or unverifiable input data. The message names the file and the fix."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from and what it must look like.

    Attributes:
        name: dataset key (``wikitext``, ``sst2``, ``vocab``).
        filename: name of the downloaded file (also its name on a mirror).
        urls: official addresses, tried in order after a user mirror.
        known_hash: pinned hash in pooch form (``md5:...`` or ``sha256:...``).
        size: pinned size in bytes, or None when unpublished.
        archive: ``"zip"`` or None for a plain file.
        members: every path the archive extracts to (or the file itself), relative to the
            dataset root; the offline folder has the same layout.
    """

    name: str
    filename: str
    urls: tuple[str, ...]
    known_hash: str
    size: int | None = None
    archive: str | None = None
    members: tuple[str, ...] = field(default_factory=tuple)

    def candidate_urls(self, mirror: str | None = None) -> list[str]:
        """Where a download tries, in order: the user's mirror (when given), then :attr:`urls`."""
        return ([f"{mirror.rstrip('/')}/{self.filename}"] if mirror else []) + list(self.urls)


DEFAULT_SPECS: dict[str, DatasetSpec] = {
    "wikitext": DatasetSpec(
        name="wikitext",
        filename="wikitext-103-raw-v1.zip",
        urls=(
            "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
            # The guide's address; it answers 403 today but is kept as a fallback.
            "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
        ),
        known_hash="md5:0ca3512bd7a238be4a63ce7b434f8935",
        size=191_984_949,
        archive="zip",
        members=(
            "wikitext-103-raw/wiki.train.raw",
            "wikitext-103-raw/wiki.valid.raw",
            "wikitext-103-raw/wiki.test.raw",
        ),
    ),
    "sst2": DatasetSpec(
        name="sst2",
        filename="SST-2.zip",
        urls=("https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",),
        known_hash="md5:9f81648d4199384278b86e315dac217c",
        archive="zip",
        members=("SST-2/train.tsv", "SST-2/dev.tsv", "SST-2/test.tsv"),
    ),
    "vocab": DatasetSpec(
        name="vocab",
        filename="bert_vocab_uncased.txt",
        urls=("https://storage.googleapis.com/tensorflow/keras-nlp/examples/bert/bert_vocab_uncased.txt",),
        known_hash="sha256:07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        size=231_508,
        members=("bert_vocab_uncased.txt",),
    ),
}

DATASETS = tuple(DEFAULT_SPECS)


def wikitext_member(split: str) -> str:
    return f"wikitext-103-raw/wiki.{split}.raw"


def load_specs(sources_file: str | None = None) -> dict[str, DatasetSpec]:
    """The pinned specs, optionally replaced per dataset by a JSON file.

    The file maps a dataset name to spec fields, for organisations that host re-packed copies
    under their own hashes; ``ENCODERFLOW_SOURCES`` names it when the argument is empty.
    """
    specs = dict(DEFAULT_SPECS)
    sources_file = sources_file or os.environ.get("ENCODERFLOW_SOURCES") or None
    if not sources_file:
        return specs
    try:
        payload = json.loads(Path(sources_file).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(
            f"sources file {sources_file}: cannot read it as JSON ({exc})",
            fix=f"correct it (python -m json.tool {sources_file} shows where), or unset ENCODERFLOW_SOURCES",
        ) from None
    settable = sorted(f.name for f in fields(DatasetSpec) if f.name != "name")
    example = '{"sst2": {"urls": ["https://mirror.example/SST-2.zip"], "known_hash": "sha256:..."}}'
    if not isinstance(payload, dict):
        raise DataError(
            f"sources file {sources_file}: holds a JSON {type(payload).__name__}, not an object of datasets",
            fix=f"write it as {example}",
        )
    for name, fields_ in payload.items():
        if name not in specs:
            raise DataError(f"sources file {sources_file}: unknown dataset {name!r}; known: {list(specs)}")
        if not isinstance(fields_, dict):
            raise DataError(
                f"sources file {sources_file}: {name!r} is a JSON {type(fields_).__name__}, not an object of fields",
                fix=f"write it as {example}",
            )
        unknown = sorted(set(fields_) - set(settable))
        if unknown:
            raise DataError(
                f"sources file {sources_file}: {name!r} has unknown fields {unknown}", fix=f"use only {settable}"
            )
        merged = {**asdict(specs[name]), **fields_, "name": name}
        for listed in ("urls", "members"):
            if isinstance(merged[listed], str) or not all(isinstance(u, str) for u in merged[listed]):
                raise DataError(
                    f"sources file {sources_file}: {name}.{listed} must be a list of strings, got {merged[listed]!r}",
                    fix=f"write it as {example}",
                )
            merged[listed] = tuple(merged[listed])
        specs[name] = DatasetSpec(**merged)
    return specs


class _LogProgress:
    """A pooch-compatible progress sink that logs plain lines every ~10% or ~10 s."""

    def __init__(self, label: str, every_s: float = 10.0):
        self.label, self.every_s = label, every_s
        self.total: int | None = None
        self.n = 0
        self._last_t = time.monotonic()
        self._last_decile = -1

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        decile = int(10 * self.n / self.total) if self.total else -1
        if decile > self._last_decile or now - self._last_t >= self.every_s:
            self._last_decile, self._last_t = max(decile, self._last_decile), now
            pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
            total = f" of {self.total:,}" if self.total else ""
            log.info("download %s: %s%s bytes%s", self.label, f"{self.n:,}", total, pct)

    def reset(self) -> None:
        self.n, self._last_decile = 0, -1

    def close(self) -> None:
        log.info("download %s: done, %s bytes", self.label, f"{self.n:,}")


class _Throughput:
    """Bytes per second over a sliding window of one connection's body.

    Args:
        floor: bytes per second the window must average; 0 turns the check off.
        window: seconds averaged over; nothing is judged before one window has passed.
        clock: seconds, monotonic.
    """

    def __init__(self, floor: float, window: float, clock: Callable[[], float] = time.monotonic):
        self.floor, self.window, self.clock = floor, window, clock
        self.start = clock()
        self.total = 0
        # (time, bytes so far), at most ~64 per window: enough resolution for the window's start.
        self.samples: deque[tuple[float, int]] = deque([(self.start, 0)])

    def add(self, n: int) -> tuple[int, float] | None:
        """Count ``n`` more bytes; return the last window's (bytes, seconds) if it fell under the floor."""
        now = self.clock()
        self.total += n
        if now - self.samples[-1][0] >= self.window / 64:
            self.samples.append((now, self.total))
        if self.floor <= 0 or now - self.start < self.window:
            return None
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        t0, before = self.samples[0]
        got, seconds = self.total - before, now - t0
        return (got, seconds) if got < self.floor * seconds else None


def _env_number(name: str, default: float, positive: bool = False) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 if positive else value >= 0) or value == float("inf"):
        raise ConfigError(
            f"{name}={raw!r}: expected a number {'>' if positive else '>='} 0; unset it for the default {default:g}"
        )
    return value


class ResumingDownloader:
    """A pooch downloader with retries, backoff, read timeouts, a throughput floor and HTTP range resume.

    Args:
        timeout: seconds to connect and to wait for each read; a stalled server fails fast.
        retries: attempts after the first, on 5xx/429/408, connection errors and cut bodies.
        backoff: first retry delay in seconds, doubled per attempt.
        min_rate: bytes per second a connection must average over ``rate_window`` once it has
            been open that long; a slower one ends this URL's download with a ``DataError``
            (not retried: a server that drips would drip again). 0 turns the floor off.
        rate_window: seconds the floor is averaged over, so a short hiccup does not count.
    """

    def __init__(
        self,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 1.0,
        min_rate: float = DEFAULT_MIN_RATE,
        rate_window: float = DEFAULT_RATE_WINDOW,
    ):
        if rate_window <= 0:
            raise ConfigError(f"download rate window must be > 0 seconds, got {rate_window!r}")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.min_rate, self.rate_window = min_rate, rate_window

    @classmethod
    def from_env(cls, **kwargs: Any) -> ResumingDownloader:
        """The defaults, with the throughput floor from ``ENCODERFLOW_DOWNLOAD_MIN_RATE`` and
        ``ENCODERFLOW_DOWNLOAD_RATE_WINDOW`` when set."""
        kwargs.setdefault("min_rate", _env_number(MIN_RATE_ENV, DEFAULT_MIN_RATE))
        kwargs.setdefault("rate_window", _env_number(RATE_WINDOW_ENV, DEFAULT_RATE_WINDOW, positive=True))
        return cls(**kwargs)

    def __call__(self, url: str, output_file: str, pooch_obj: Any = None, check_only: bool = False) -> bool | None:
        import requests
        import urllib3

        if check_only:
            r = requests.head(url, headers=REQUEST_HEADERS, timeout=self.timeout, allow_redirects=True)
            return r.status_code == 200
        progress = _LogProgress(PurePosixPath(url).name)
        written, attempt = 0, 0
        with open(output_file, "w+b") as out:
            while True:
                headers = dict(REQUEST_HEADERS)
                if written:
                    headers["Range"] = f"bytes={written}-"
                try:
                    with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as r:
                        if r.status_code in RETRYABLE_STATUS:
                            raise _Retryable(f"HTTP {r.status_code}")
                        if r.status_code >= 400:
                            raise DataError(f"download {url}: HTTP {r.status_code} {r.reason}")
                        if written and r.status_code != 206:
                            log.info("download %s: server ignored the range request; starting over", url)
                            out.seek(0)
                            out.truncate()
                            written = 0
                            progress.reset()
                        length = r.headers.get("Content-Length")
                        expected = written + int(length) if length is not None else None
                        progress.total = expected if progress.total is None else progress.total
                        meter = _Throughput(self.min_rate, self.rate_window)
                        # read1 returns whatever has arrived; a full-chunk read (iter_content) would sit
                        # in one call while a server drips a byte at a time, and nothing could judge it.
                        while chunk := r.raw.read1(CHUNK_BYTES, decode_content=True):
                            out.write(chunk)
                            written += len(chunk)
                            progress.update(len(chunk))
                            if slow := meter.add(len(chunk)):
                                raise self._too_slow(url, slow, written, progress.total)
                        if expected is not None and written < expected:
                            raise _Retryable(f"body cut at {written} of {expected} bytes")
                    progress.close()
                    return None
                except (
                    requests.ConnectionError,
                    requests.Timeout,
                    requests.exceptions.ChunkedEncodingError,
                    urllib3.exceptions.HTTPError,  # read1 raises urllib3's own: read timeout, cut body, reset
                    _Retryable,
                ) as exc:
                    out.flush()
                    attempt += 1
                    reason = _describe(exc)
                    if attempt > self.retries:
                        raise DataError(
                            f"download {url}: gave up after {attempt} attempts: {reason}",
                            fix="check the network, or pass a reachable --mirror or an offline --data-dir",
                        ) from None
                    delay = self.backoff * 2 ** (attempt - 1)
                    resume = f", resuming at byte {written:,}" if written else ""
                    log.warning(
                        "download %s: %s; retry %d/%d in %.1fs%s", url, reason, attempt, self.retries, delay, resume
                    )
                    time.sleep(delay)
                except requests.RequestException as exc:
                    # Not transient (redirect loop, bad URL or scheme): this URL is done, but the
                    # caller must still get a DataError so that it moves on to the next source.
                    raise DataError(f"download {url}: {_describe(exc)}") from None

    def _too_slow(self, url: str, slow: tuple[int, float], written: int, total: int | None) -> DataError:
        got, seconds = slow
        of = f" of {total:,}" if total else ""
        return DataError(
            f"download {url}: too slow: {got:,} bytes in the last {seconds:.1f}s ({got / seconds:,.1f} bytes/s, "
            f"under the floor of {self.min_rate:,.0f} bytes/s); {written:,}{of} bytes received in all, "
            "not kept",
            fix=f"use a nearer --mirror or an offline --data-dir, or, on a link this slow, lower the floor with "
            f"{MIN_RATE_ENV}=<bytes per second> (0 turns it off) or lengthen {RATE_WINDOW_ENV} (seconds)",
        )


class _Retryable(Exception):
    pass


def _describe(exc: BaseException) -> str:
    import requests
    import urllib3

    text = str(exc)
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)) or "timed out" in text.lower():
        return "timed out waiting for data (server stalled)"
    # urllib3 reports a cut body as a nested tuple with IncompleteRead; say it plainly.
    if isinstance(exc, requests.exceptions.ChunkedEncodingError) or "IncompleteRead" in text:
        return "connection closed before the whole body arrived"
    return text[:300]


def _dataset_root(spec: DatasetSpec) -> Path:
    return layout.data_dir(spec.name, spec.known_hash.split(":")[-1])


def _safe_extract_zip(archive: Path, target: Path) -> None:
    """Extract into a temp folder beside ``target``, refusing unsafe entries, then rename."""
    with layout.atomic_dir(target, prefix=".extract-") as tmp:
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{archive}: not a valid zip archive ({exc}); delete it and download again") from None
        with zf:
            for info in zf.infolist():
                name = info.filename
                parts = PurePosixPath(name.replace("\\", "/")).parts
                mode = info.external_attr >> 16
                if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
                    raise DataError(f"{archive}: refusing absolute path {name!r} in archive")
                if ".." in parts:
                    raise DataError(f"{archive}: refusing path traversal entry {name!r} in archive")
                if stat.S_ISLNK(mode):
                    raise DataError(f"{archive}: refusing symbolic link {name!r} in archive")
            bad = zf.testzip()
            if bad is not None:
                raise DataError(f"{archive}: member {bad!r} fails its CRC check; the archive is corrupt")
            zf.extractall(tmp)


def _describe_files(root: Path, members: Iterable[str], where: str, fix: str) -> dict[str, dict[str, Any]]:
    missing = [m for m in members if not (root / m).is_file()]
    if missing:
        raise DataError(f"{where}: missing {', '.join(str(root / m) for m in missing)}", fix=fix)
    files: dict[str, dict[str, Any]] = {}
    for member in members:
        path = root / member
        try:
            files[member] = {"path": str(path), "bytes": path.stat().st_size, "sha256": layout.sha256_file(path)}
        except OSError as exc:  # no retry reads a file its permissions refuse
            raise DataError(f"{where}: cannot read {path} ({exc.strerror or exc})", fix=UNREADABLE_FIX) from None
    return files


UNREADABLE_FIX = "make it readable by the user the tasks run as (permissions, a broken link), or replace it"


def unreadable(root: Path, members: Iterable[str]) -> dict[str, str]:
    """member -> why, for each file present under ``root`` that cannot be read (its first byte), or is
    no regular file (a FIFO would block the reader, a folder fails it)."""
    out = {}
    for member in members:
        path = root / member
        if not path.exists():
            continue
        if not path.is_file():
            out[member] = "not a regular file"
            continue
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            out[member] = exc.strerror or str(exc)
    return out


def unreadable_text(bad: dict[str, str]) -> str:
    return ", ".join(f"{member} ({why})" for member, why in bad.items())


def _layout_hint(members: Iterable[str]) -> str:
    return "\n".join(f"  {m}" for m in members)


def _offline_fix(root: Path) -> str:
    return (
        f"put the missing file(s) under {root} as the archives extract, or point --data-dir at a folder that has them"
    )


def quiet_pooch() -> Any:
    """Import pooch with its INFO lines ("Downloading data from ...") silenced.

    pooch's logger sits outside ``logging``'s tree (``steps.setup_logging`` cannot reach it by name)
    and writes to stderr, which Airflow's task supervisor records at ERROR: a clean download would
    leave ERROR lines in its task log. Our own progress lines say the same thing.
    """
    import pooch

    pooch.get_logger().setLevel(logging.WARNING)
    return pooch


def fetch(
    spec: DatasetSpec, members: Iterable[str], mirror: str | None = None, downloader: ResumingDownloader | None = None
) -> dict[str, Any]:
    """Download (or reuse) a dataset, verify it, extract it, and describe the needed files.

    Returns:
        A small dict for XCom: dataset, source, root, files (path, bytes, sha256 per member)
        and a content hash over the files.
    """
    pooch = quiet_pooch()
    root = _dataset_root(spec)
    root.mkdir(parents=True, exist_ok=True)
    members = tuple(members)
    urls = spec.candidate_urls(mirror)
    downloader = downloader or ResumingDownloader.from_env()
    archive_path = root / spec.filename
    errors: list[str] = []
    fixes: dict[str, None] = {}  # each source's fix once, in order
    for url in urls:
        try:
            pooch.retrieve(
                url,
                known_hash=spec.known_hash,
                fname=spec.filename,
                path=root,
                downloader=downloader,
                progressbar=False,
            )
            break
        except ValueError as exc:  # pooch's hash mismatch; it already deleted the temp file
            errors.append(f"{url}: hash mismatch: {exc}")
            fixes["try another --mirror, or give a re-packed copy its own hash with --sources-file"] = None
            log.warning("download %s: %s", url, exc)
        except DataError as exc:  # pooch deletes its temp file: nothing partial stays visible
            errors.append(exc.message)
            fixes[exc.fix or "pass a reachable --mirror or an offline --data-dir"] = None
            # A warning: the next source may still deliver; when none does, the DataError below says it all.
            log.warning("%s", exc)
    else:
        raise DataError(
            f"dataset {spec.name}: no source gave a verified {spec.filename} "
            f"(expected {spec.known_hash}):\n  " + "\n  ".join(errors),
            fix="; or ".join(fixes) or "pass a reachable --mirror or an offline --data-dir",
        )
    if spec.size is not None and archive_path.stat().st_size != spec.size:
        size = archive_path.stat().st_size
        archive_path.unlink()
        raise DataError(f"{archive_path}: {size:,} bytes, expected {spec.size:,}; deleted, download again")
    log.info(
        "dataset %s: %s verified (%s, %s bytes)",
        spec.name,
        archive_path,
        spec.known_hash,
        f"{archive_path.stat().st_size:,}",
    )

    if spec.archive == "zip":
        extracted = root / "extracted"
        if not (extracted / ".complete").exists():
            _safe_extract_zip(archive_path, extracted)
            (extracted / ".complete").write_text(spec.known_hash + "\n")
            log.info("dataset %s: extracted into %s", spec.name, extracted)
        files_root = extracted
    elif spec.archive is None:
        files_root = root
    else:
        raise DataError(f"dataset {spec.name}: unsupported archive kind {spec.archive!r}")
    files = _describe_files(
        files_root,
        members,
        f"dataset {spec.name}, extracted from {archive_path}",
        fix=f"delete {files_root} and run again to extract it afresh; for a --sources-file dataset, check "
        "the members it declares",
    )
    return _result(spec.name, "download", files_root, files, url=url)


def offline_root(data_dir: str | os.PathLike, members: Iterable[str] | None = None) -> Path:
    """The offline folder, resolved; a DataError listing ``members`` (default: every file of the
    guide's datasets) when it is not a folder."""
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        listed = members if members is not None else [m for s in DEFAULT_SPECS.values() for m in s.members]
        raise DataError(
            f"offline data folder {root} {'is not a folder' if root.exists() else 'does not exist'}; "
            f"a run here reads:\n{_layout_hint(listed)}",
            fix="point --data-dir at a folder laid out as the archives extract (the files above), or leave it "
            "empty to download",
        )
    return root


def locate(spec: DatasetSpec, members: Iterable[str], data_dir: str | os.PathLike) -> dict[str, Any]:
    """Offline mode: find the needed files in a folder laid out as the archives extract.

    No network is touched. Each file's sha256 is recorded for lineage.
    """
    members = tuple(members)
    root = offline_root(data_dir, members)
    files = _describe_files(root, members, f"offline data folder {root}", fix=_offline_fix(root))
    return _result(spec.name, "offline", root, files)


def check_offline(
    data_dir: str | os.PathLike, needs: dict[str, tuple[str, ...]], splits: dict[str, str] | None = None
) -> Path:
    """Every file a run reads from an offline folder, checked at once before any download task starts:
    one failure naming each missing file, not one per download task.

    Args:
        data_dir: the offline folder.
        needs: dataset -> the members the run reads (:func:`required_members`).
        splits: the WikiText split keys (``pretrain_split``, ``validation_split``) when WikiText is
            read: a missing split the folder could replace by another gets the key to set.

    Raises:
        DataError: the folder is not there, lacks a file, or holds one that cannot be read.
    """
    members = tuple(dict.fromkeys(m for ms in needs.values() for m in ms))
    root = offline_root(data_dir, members)
    missing = [m for m in members if not (root / m).exists()]  # a FIFO or folder there: unreadable, below
    problems = _split_problems(root, splits) if splits else []
    if problems and set(missing) == {p[0] for p in problems}:  # only splits: each key's way out
        raise DataError("; ".join(p[1] for p in problems), fix="; ".join(p[2] for p in problems))
    if missing:
        fix = "; ".join([_offline_fix(root), *(f"for {p[0]}: {p[2]}" for p in problems)])
        raise DataError(f"offline data folder {root}: missing {', '.join(missing)}", fix=fix)
    if bad := unreadable(root, members):
        raise DataError(f"offline data folder {root}: cannot read {unreadable_text(bad)}", fix=UNREADABLE_FIX)
    return root


def _result(
    name: str, source: str, root: Path, files: dict[str, dict[str, Any]], url: str | None = None
) -> dict[str, Any]:
    content_hash = layout.sha256_json({m: f["sha256"] for m, f in files.items()})
    for f in files.values():
        log.info("dataset %s: %s (%s bytes, sha256 %s)", name, f["path"], f"{f['bytes']:,}", f["sha256"])
    out = {"dataset": name, "source": source, "root": str(root), "files": files, "content_hash": content_hash}
    if url:
        out["url"] = url
    return out


def _offline_splits_present(data_dir: str | os.PathLike, splits: dict[str, str]) -> None:
    """A configured WikiText split an offline folder lacks, while it holds another: name the key to set.

    Offline copies usually lack the 540 MB train split, and the guide and recipe presets pretrain on it.
    """
    root = offline_root(data_dir, tuple(dict.fromkeys(wikitext_member(s) for s in splits.values())))
    if problems := _split_problems(root, splits):
        raise DataError("; ".join(p[1] for p in problems), fix="; ".join(p[2] for p in problems))


def _split_problems(root: Path, splits: dict[str, str]) -> list[tuple[str, str, str]]:
    """(member, message, fix) for each WikiText split a key names that the folder lacks while it holds
    another. The ways out are chosen together: no split suggested for two keys, nor for a key the
    other reads (pretraining on the validation text, or the reverse)."""
    present = [s for s in ("train", "valid", "test") if (root / wikitext_member(s)).is_file()]
    if not present:
        return []
    taken = {split for split in splits.values() if (root / wikitext_member(split)).is_file()}
    problems = []
    for key, split in splits.items():
        path = root / wikitext_member(split)
        if path.is_file():
            continue
        order = ("test", "train", "valid") if key == "pretrain_split" else ("valid", "test", "train")
        other = next((s for s in order if s in present and s not in taken), None)
        said = f"offline data folder {root}: missing {path}, the {split} split data.{key} names"
        if other is None:
            problems.append(
                (
                    wikitext_member(split),
                    f"{said} (this folder holds WikiText's {', '.join(present)}, which data.{key} cannot share)",
                    f"put wiki.{split}.raw there",
                )
            )
            continue
        taken.add(other)
        problems.append(
            (
                wikitext_member(split),
                f"{said} (this folder holds WikiText's {', '.join(present)})",
                f"put wiki.{split}.raw there, or use a split it holds: --set data.{key}={other} "
                f'(make run SET="data.{key}={other}")',
            )
        )
    return problems


def present_members(spec: DatasetSpec, data_dir: str | os.PathLike) -> tuple[str, ...]:
    """The layout's WikiText splits found in an offline folder (all members for other datasets).

    A folder without any of them gets the full list back, so ``locate`` names what is missing.
    """
    if spec.name != "wikitext":
        return spec.members
    root = Path(data_dir).expanduser()
    return tuple(m for m in spec.members if (root / m).is_file()) or spec.members


def required_members(
    dataset: str, pretrain_split: str, validation_split: str, specs: dict[str, DatasetSpec] | None = None
) -> tuple[str, ...]:
    """Files a run needs: the configured WikiText splits, every SST-2 file, the vocab."""
    specs = specs or DEFAULT_SPECS
    if dataset == "wikitext":
        return tuple(dict.fromkeys(wikitext_member(s) for s in (pretrain_split, validation_split)))
    return specs[dataset].members


def get_dataset(
    dataset: str,
    pretrain_split: str = "train",
    validation_split: str = "valid",
    data_dir: str | None = None,
    mirror: str | None = None,
    sources_file: str | None = None,
    downloader: ResumingDownloader | None = None,
) -> dict[str, Any]:
    """One entry point for the download task: offline folder when given, else HTTP."""
    specs = load_specs(sources_file)
    if dataset not in specs:
        raise DataError(f"unknown dataset {dataset!r}; known: {list(specs)}")
    spec = specs[dataset]
    members = required_members(dataset, pretrain_split, validation_split, specs)
    if data_dir:
        if dataset == "wikitext":
            _offline_splits_present(data_dir, {"pretrain_split": pretrain_split, "validation_split": validation_split})
        # An offline folder is whatever someone put there: validated with loose bounds.
        return {**locate(spec, members, data_dir), "pinned": False}
    mirror = mirror or os.environ.get("ENCODERFLOW_MIRROR") or None
    # The built-in spec's sha256 pins the official archive's bytes, from any mirror.
    return {**fetch(spec, members, mirror=mirror, downloader=downloader), "pinned": spec == DEFAULT_SPECS[dataset]}
