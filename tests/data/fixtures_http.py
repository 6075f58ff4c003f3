"""A scriptable loopback HTTP server for the download tests.

It is a real ``ThreadingHTTPServer`` on 127.0.0.1 (port 0), so the code under test runs its own
sockets, headers, timeouts and range requests end to end; only the server's misbehaviour is scripted.
"""

from __future__ import annotations

import gzip
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# Scripted answers, consumed one per request to a path; when a path's script runs out, it is served.
SERVE = "serve"  # the file, honouring "Range: bytes=N-" with 206 when range support is on
CUT = "cut"  # announce the full Content-Length, send half of the body, close the socket
STALL = "stall"  # accept the request and send nothing until the test ends (or STALL_MAX_S)
STALL_BODY = "stall-body"  # send headers and half of the body, then go silent
DRIP = "drip"  # send headers, then the body one byte per Loopback.drip_every_s (each read is quick)
REDIRECT_SELF = "redirect-self"  # 302 to the same path, forever

STALL_MAX_S = 20.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None


@dataclass
class Loopback:
    files: dict[str, bytes] = field(default_factory=dict)
    scripts: dict[str, deque] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    honour_range: bool = True
    # User-Agent prefixes answered with 403, as some dataset hosts do for urllib's default agent.
    refused_agents: tuple[str, ...] = ()
    # Compress with Content-Encoding: gzip whenever the client allows it, and apply Range to the
    # compressed representation (as HTTP defines it) - what a host serving pre-gzipped objects does.
    gzip_when_accepted: bool = False
    # DRIP's pace: a byte every this many seconds, until the body is sent, the client leaves or the test ends.
    drip_every_s: float = 2.0
    release: threading.Event = field(default_factory=threading.Event)
    base: str = ""

    def url(self, path: str) -> str:
        return self.base + path

    def script(self, path: str, *answers: str | int) -> None:
        self.scripts.setdefault(path, deque()).extend(answers)

    def requests_for(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def _next(self, path: str) -> str | int:
        queue = self.scripts.get(path)
        return queue.popleft() if queue else SERVE


class _Handler(BaseHTTPRequestHandler):
    server_version = "loopback/1"

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
        pass

    def _answer(self, seen: Seen, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        seen.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        lb: Loopback = self.server.loopback  # type: ignore[attr-defined]
        seen = Seen("GET", self.path, dict(self.headers.items()))
        lb.seen.append(seen)
        agent = self.headers.get("User-Agent", "")
        if lb.refused_agents and agent.startswith(lb.refused_agents):
            return self._answer(seen, 403, {}, b"forbidden agent\n")
        action = lb._next(self.path)
        if isinstance(action, int):
            return self._answer(seen, action, {}, f"scripted {action}\n".encode())
        if action == STALL:
            lb.release.wait(STALL_MAX_S)
            return
        if action == REDIRECT_SELF:
            lb.scripts.setdefault(self.path, deque()).appendleft(REDIRECT_SELF)
            return self._answer(seen, 302, {"Location": self.path})
        if self.path not in lb.files:
            return self._answer(seen, 404, {}, b"not found\n")

        body, headers = lb.files[self.path], {"Content-Type": "application/octet-stream"}
        if lb.gzip_when_accepted and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, mtime=0)
            headers["Content-Encoding"] = "gzip"
        status, start = 200, 0
        rng = self.headers.get("Range")
        if rng and lb.honour_range:
            assert rng.startswith("bytes=") and rng.endswith("-"), f"unexpected Range {rng!r}"
            start = int(rng[len("bytes=") : -1])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        part = body[start:]
        headers["Content-Length"] = str(len(part))
        if action == DRIP:
            self._answer(seen, status, headers)
            for i in range(len(part)):
                try:
                    self.wfile.write(part[i : i + 1])
                    self.wfile.flush()
                except OSError:  # the client gave up
                    return
                if lb.release.wait(lb.drip_every_s):
                    break
            self.close_connection = True
            return
        if action in (CUT, STALL_BODY):
            self._answer(seen, status, headers, part[: len(part) // 2])
            self.wfile.flush()
            if action == STALL_BODY:
                lb.release.wait(STALL_MAX_S)
            self.close_connection = True
            return
        self._answer(seen, status, headers, part)


@pytest.fixture
def http_server():
    """A fresh loopback server per test; stalled handlers are released at teardown."""
    lb = Loopback()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.loopback = lb  # type: ignore[attr-defined]
    lb.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield lb
    finally:
        lb.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
