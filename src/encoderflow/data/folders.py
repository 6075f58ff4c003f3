"""Your own data as a folder of files: a local path, a ``file://`` URL, or an ``http(s)://`` folder.

A local folder is every regular, non-hidden file under it. An HTTP folder cannot be listed, so it
holds a ``manifest.json`` naming its files, optionally with their sha256 (then each download is
verified and an unchanged folder is reused without a request)::

    {"files": [{"name": "a.txt", "sha256": "..."}, "b/c.txt"]}

Either way the files are copied into the content-addressed ``ENCODERFLOW_HOME/data/<role>/<hash>/``
(assembled in a temporary folder, renamed into place), so the bytes validated are the bytes
trained on even if the source changes mid-run, and a folder already there is reused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from encoderflow import layout
from encoderflow.data.sources import DataError, ResumingDownloader, quiet_pooch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
COMPLETE = ".complete"


def is_http(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def local_path(location: str) -> Path:
    """``/a/b`` or ``file:///a/b`` as a path."""
    return Path(unquote(urlparse(location).path)) if location.startswith("file://") else Path(location)


def _safe_name(name: str, where: str) -> str:
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or "\\" in name:
        raise DataError(f"{where}: refusing file name {name!r} (absolute or outside the folder)")
    return str(PurePosixPath(*parts))


def _local_listing(root: Path, role: str) -> list[str]:
    if not root.is_dir():
        raise DataError(
            f"{role} folder {root}: {'not a folder (a file)' if root.exists() else 'does not exist'}",
            fix=f"give the {role} source as an existing folder (absolute path or file:// URL) readable by every worker",
        )
    found = [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts) and p.name != MANIFEST
    ]
    # A link out of the folder would copy whatever this worker may read (a key, secrets.json) into the data
    # store and the training text: a folder someone else can write to must not choose what a run reads.
    real = root.resolve()
    if outside := [p for p in found if not p.resolve().is_relative_to(real)]:
        raise DataError(
            f"{role} folder {root}: {outside[0].relative_to(root)} is a link to {outside[0].resolve()}, outside the "
            f"folder{f' (and {len(outside) - 1} more)' if len(outside) > 1 else ''}: not read",
            fix="copy the file into the folder (a link to a file inside it is read)",
        )
    names = sorted(p.relative_to(root).as_posix() for p in found)
    if not names:
        raise DataError(
            f"{role} folder {root}: no files in it", fix="put the data files in the folder, or fix the path"
        )
    return names


def _http_manifest(base: str, role: str, downloader: ResumingDownloader) -> list[dict[str, str | None]]:
    url = f"{base.rstrip('/')}/{MANIFEST}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / MANIFEST
        downloader(url, str(out))
        try:
            payload = json.loads(out.read_text(encoding="utf-8"))
            entries = payload["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{role} manifest {url}: not a JSON object with a 'files' list ({exc})",
                fix='serve {"files": [{"name": ..., "sha256": ...}, ...]} as manifest.json',
            ) from None
    files = []
    for entry in entries:
        name, sha = (entry, None) if isinstance(entry, str) else (entry.get("name"), entry.get("sha256"))
        files.append({"name": _safe_name(str(name or ""), f"{role} manifest {url}"), "sha256": sha})
    if not files:
        raise DataError(f"{role} manifest {url}: lists no files", fix="list the data files in manifest.json")
    return files


def fingerprint(location: str, role: str, timeout: float = 30.0) -> dict[str, Any]:
    """What a source looks like now, cheaply: per file size and mtime (local) or the manifest's sha256s (HTTP).

    Equal fingerprints mean no new data; a changed one is worth a run, whose lineage check then
    compares content hashes (a touched but unchanged file costs that check, not a training run).
    """
    if is_http(location):
        import requests

        from encoderflow.data.sources import REQUEST_HEADERS

        r = requests.get(f"{location.rstrip('/')}/{MANIFEST}", headers=REQUEST_HEADERS, timeout=timeout)
        if r.status_code != 200:
            raise DataError(f"{role} source {location}: {MANIFEST} answered HTTP {r.status_code}")
        return {"location": location, "manifest_sha256": layout.sha256_json(r.content.decode("utf-8", "replace"))}
    root = local_path(location)
    files = {}
    for name in _local_listing(root, role):
        st = (root / name).stat()
        files[name] = [st.st_size, st.st_mtime_ns]
    return {"location": location, "files": files}


def fetch(role: str, location: str, downloader: ResumingDownloader | None = None) -> dict[str, Any]:
    """Copy (local) or download (HTTP) a folder into ``data/<role>/<content hash>/files``; reuse it when there.

    Returns:
        The dataset record: role, source, root, files (relative name -> path, bytes, sha256),
        content_hash over the files, location.
    """
    downloader = downloader or ResumingDownloader.from_env()
    if is_http(location):
        listing = _http_manifest(location, role, downloader)
        known = {e["name"]: e["sha256"] for e in listing}
        source = "download"
    else:
        root = local_path(location).expanduser().resolve()
        names = _local_listing(root, role)
        known = {name: layout.sha256_file(root / name) for name in names}
        source = "folder"
    content_hash = layout.sha256_json(known) if all(known.values()) else None
    if content_hash and (done := _complete(role, content_hash)) is not None:
        log.info(
            "%s: %s unchanged (%d files, content hash %s), reusing %s", role, location, len(known), content_hash, done
        )
        return _record(role, source, location, done, content_hash, known)

    # A copy killed midway leaves its .fetch-* folder; temp_dir sweeps those no live writer holds.
    with layout.temp_dir(layout.home() / "data" / role, ".fetch-") as tmp:
        for i, (name, sha) in enumerate(sorted(known.items())):
            dest = tmp / "files" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if is_http(location):
                _download(f"{location.rstrip('/')}/{name}", sha, tmp / "dl", f"{i:06d}", downloader, dest)
            else:
                shutil.copyfile(root / name, dest)
                # A private source stays private in the data store (the copy was 0644 under umask 022).
                shutil.copymode(root / name, dest)
        got = {name: layout.sha256_file(tmp / "files" / name) for name in known}
        if source == "folder" and got != known:
            changed = sorted(n for n in known if got[n] != known[n])
            raise DataError(
                f"{role} folder {root}: {', '.join(changed[:5])} changed while being copied",
                fix="run again once the folder has stopped changing",
            )
        content_hash = layout.sha256_json(got)
        shutil.rmtree(tmp / "dl", ignore_errors=True)
        (tmp / "files" / COMPLETE).write_text(content_hash + "\n")
        final = layout.data_dir(role, content_hash)
        if (final / "files" / COMPLETE).exists():  # another run won the race: same bytes
            done = final / "files"
        else:
            final.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(final / "files", ignore_errors=True)
            os.replace(tmp / "files", final / "files")
            done = final / "files"
        log.info("%s: %s copied into %s (%d files, content hash %s)", role, location, done, len(got), content_hash)
    return _record(role, source, location, done, content_hash, got)


def _download(url: str, sha256: str | None, tmp: Path, fname: str, downloader, dest: Path) -> None:
    pooch = quiet_pooch()
    try:
        path = pooch.retrieve(
            url,
            known_hash=f"sha256:{sha256}" if sha256 else None,
            fname=fname,
            path=tmp,
            downloader=downloader,
            progressbar=False,
        )
    except ValueError as exc:  # pooch's hash mismatch; it deleted the temp file
        raise DataError(f"download {url}: {exc}", fix="fix the sha256 in manifest.json, or the file it names") from None
    os.replace(path, dest)


def _complete(role: str, content_hash: str) -> Path | None:
    files = layout.data_dir(role, content_hash) / "files"
    return files if (files / COMPLETE).exists() else None


def _record(
    role: str, source: str, location: str, root: Path, content_hash: str, hashes: dict[str, str]
) -> dict[str, Any]:
    # ``origin``: the file as the user knows it, for messages; ``path``: the verified copy that is read.
    base = location.rstrip("/") if is_http(location) else str(local_path(location).expanduser().resolve())
    files = {
        name: {
            "path": str(root / name),
            "bytes": (root / name).stat().st_size,
            "sha256": sha,
            "origin": f"{base}/{name}",
        }
        for name, sha in sorted(hashes.items())
    }
    return {
        "dataset": role,
        "role": role,
        "source": source,
        "pinned": False,
        "location": location,
        "root": str(root),
        "files": files,
        "content_hash": content_hash,
    }
