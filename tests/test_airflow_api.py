"""Airflow for real: api-server, scheduler and dag-processor on loopback (SQLite, LocalExecutor).

``encoder_pretraining`` is triggered through the REST API v2 with a smoke conf on the fixture
tree (offline, ``data_dir``), polled to success, and a training task's log is read back through
the API. The same servers answer the plugin page and the headless-browser checks (which need
Debian's ``chromium``; skipped without it): the trigger form, and the runs page after that run,
its charts read from the DOM and a full-page screenshot checked where the DOM put them.
``ENCODERFLOW_SCREENSHOT_DIR`` keeps a copy of the runs-page screenshots.

``AirflowStack`` is also what ``tests/test_plugin.py`` starts. Every process it starts, and
every process those start, is ended by id when the block exits, failed or not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from encoderflow import errors, layout
from encoderflow.stack import descendants
from tests import fixtures_pipeline as fixtures_data

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "encoder_pretraining"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_all(tree: dict[str, list[int]], sig: int) -> None:
    for pids in tree.values():
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


class AirflowStack:
    """Airflow components in subprocesses around one temporary AIRFLOW_HOME and ENCODERFLOW_HOME."""

    def __init__(self, root: Path, encoderflow_home: Path, components=("api-server", "scheduler", "dag-processor")):
        self.root, self.components = root, components
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        self.viewer_password = secrets.token_urlsafe(12)
        self.procs: dict[str, subprocess.Popen] = {}
        self._tokens: dict[str, str] = {}
        self.logs = root / "component-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "ENCODERFLOW_HOME": str(encoderflow_home)}
        env.pop("AIRFLOW_HOME", None)
        # The embedded Airflow `encoderflow run` and `make airflow` use, plus what a test needs:
        # loopback only, a free port, one api worker, known logins, quick parsing.
        from encoderflow.cli import airflow_env

        saved = os.environ.get("ENCODERFLOW_HOME")
        os.environ["ENCODERFLOW_HOME"] = str(encoderflow_home)
        try:
            env.update(airflow_env())
        finally:
            if saved is None:
                os.environ.pop("ENCODERFLOW_HOME", None)
            else:
                os.environ["ENCODERFLOW_HOME"] = saved
        self.home = Path(env["AIRFLOW_HOME"])
        self.passwords_file = self.home / "passwords.json"
        env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__BASE_URL": self.url,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
                "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "False",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
                "ENCODERFLOW_MLFLOW_UI_URL": "http://127.0.0.1:5000",
                # The training DAG runs on the source watcher's events, as a data-aware deployment does;
                # the watcher runs when triggered (its hourly schedule would add runs of its own).
                "ENCODERFLOW_SCHEDULE": "assets",
                "ENCODERFLOW_SOURCE_CHECK_SCHEDULE": "off",
            }
        )
        self.env = env

    def airflow(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"airflow {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.passwords_file.write_text(json.dumps({"admin": self.password, "viewer": self.viewer_password}))
        self.airflow("db", "migrate")
        for name in self.components:
            log = open(self.logs / f"{name}.log", "wb")
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "airflow", name],
                env=self.env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
        if "api-server" in self.components:
            self.wait_for(lambda: self._health_ok(), 180, "api-server health")
            # pretrain and finetune wait in pool `gpu` (one slot); without it they would never be queued.
            status, body = self.request(
                "POST", "/api/v2/pools", {"name": "gpu", "slots": 1, "description": "one training job at a time"}
            )
            assert status in (200, 201), (status, body)

    def _health_ok(self) -> bool:
        try:
            status, _ = self.request("GET", "/api/v2/monitor/health", token=None)
            return status == 200
        except OSError:
            return False

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(
                        f"{name} exited ({proc.returncode}) while waiting for {what}:\n" + self.tail(name)
                    )
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}\n" + "\n".join(self.tail(n) for n in self.procs)
        )

    def tail(self, name: str, chars: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return f"--- {name} ---\n" + (path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)")

    def stop(self) -> None:
        tree = {name: [p.pid, *descendants(p.pid)] for name, p in self.procs.items() if p.poll() is None}
        _signal_all(tree, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _signal_all(tree, signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    # --- HTTP ---------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = "admin",
        headers: dict[str, str] | None = None,
        cookie: str | None = None,
    ) -> tuple[int, Any]:
        headers = dict(headers or {})
        if token == "admin":
            token = self.token("admin", self.password)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if cookie:
            headers["Cookie"] = f"_token={cookie}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        headers.setdefault("Accept", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raw, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
        text = raw.decode(errors="replace")
        return status, (json.loads(text) if "json" in ctype and text else text)

    def token(self, username: str, password: str) -> str:
        key = f"{username}:{password}"
        if key not in self._tokens:
            status, body = self.request("POST", "/auth/token", {"username": username, "password": password}, token=None)
            assert status in (200, 201), (status, body)
            self._tokens[key] = body["access_token"]
        return self._tokens[key]


@contextmanager
def airflow_stack(root: Path, encoderflow_home: Path, **kwargs) -> Iterator[AirflowStack]:
    stack = AirflowStack(root, encoderflow_home, **kwargs)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def smoke_conf(data_dir: Path) -> dict[str, Any]:
    """The smoke preset on the fixture tree: a real run of every task in a couple of minutes."""
    return {"preset": "smoke", "data_dir": str(data_dir), "pretrain_split": "train", "finetune_steps_per_epoch": 40}


def task_log(stack, run_id: str, task_id: str, until: str, try_number: int = 1, timeout: float = 60) -> str:
    """A task try's log as plain text once it holds ``until``: the run reads failed as soon as the try
    does, and the try's last records (its exception's) can land in the log a moment later."""
    quoted = urllib.parse.quote(run_id, safe="")
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/{task_id}/logs/{try_number}?full_content=true"
    deadline = time.monotonic() + timeout
    while True:
        _, log = stack.request("GET", path)
        text = "\n".join(log_lines(log["content"]))
        if until in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


def log_lines(content: list[Any]) -> list[str]:
    """Plain text of a task log as the API returns it (structured records or strings)."""
    lines = []
    for rec in content:
        if isinstance(rec, dict):
            lines.append(" ".join(str(rec.get(k, "")) for k in ("event", "error_detail") if rec.get(k)))
        else:
            lines.append(str(rec))
    return lines


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("airflow-api")
    with airflow_stack(root, root / "efhome") as s:
        yield s


def trigger(stack, dag_id: str, conf: dict[str, Any], timeout: float, what: str, **fields) -> tuple[dict, str]:
    """Trigger a run through the REST API and poll it to its end: (the run as created, its final state)."""
    body = {"logical_date": None, "conf": conf, **fields}
    status, run = stack.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)
    assert status == 200, (status, run)
    quoted = urllib.parse.quote(run["dag_run_id"], safe="")

    def finished():
        _, dr = stack.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}")
        return dr["state"] if dr["state"] in ("success", "failed") else None

    return run, stack.wait_for(finished, timeout, what, interval=2)


@pytest.fixture(scope="module")
def smoke_run(stack) -> dict[str, Any]:
    """One smoke run triggered through the REST API and polled to its end; the tests that need a finished run share it.

    Returns:
        ``run_id``, ``quoted`` (for URLs), final ``state``, ``task_instances`` as the API lists them,
        ``states`` ((task, map index) -> state) and ``seconds`` from trigger to end.
    """
    tree = fixtures_data.write_tree(stack.root / "data")
    t0 = time.monotonic()
    stack.wait_for(lambda: stack.request("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200, 120, "the DAG to be parsed")
    run, state = trigger(stack, DAG_ID, smoke_conf(tree), 480, "the smoke run to finish", note="REST API test")
    run_id = run["dag_run_id"]
    quoted = urllib.parse.quote(run_id, safe="")
    _, tis = stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances")
    return {
        "run_id": run_id,
        "quoted": quoted,
        "state": state,
        "task_instances": tis["task_instances"],
        "states": {(ti["task_id"], ti["map_index"]): ti["state"] for ti in tis["task_instances"]},
        "seconds": time.monotonic() - t0,
    }


@pytest.mark.slow
def test_rest_api_run_to_success_with_epoch_logs(stack, smoke_run):
    stack.wait_for(lambda: stack.request("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200, 120, "the DAG to be parsed")

    # A conf the form would refuse is refused by the API too (typed params are enforced).
    status, body = stack.request(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"preset": "tiny"}}
    )
    assert status == 400, (status, body)
    # So is an override of no config section, in a message short enough to read (a key's typo is
    # check_params', which suggests the key: tests/test_steps.py).
    typo = {"logical_date": None, "conf": {"preset": "smoke", "overrides": ["modle.num_layers=2"]}}
    status, body = stack.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", typo)
    assert status == 400 and "modle.num_layers=2" in json.dumps(body), (status, body)
    assert len(json.dumps(body)) < 600, body

    run_id, quoted, state, states = (smoke_run[k] for k in ("run_id", "quoted", "state", "states"))
    assert state == "success", f"{states}\n" + "\n".join(stack.tail(n) for n in stack.procs)
    assert all(s == "success" for s in states.values()), states
    print(f"\nREST run {run_id}: success in {smoke_run['seconds']:.0f}s, {len(states)} task instances")

    # Training logs one line per epoch, readable through the API.
    _, ti = stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/pretrain")
    assert ti["pool"] == "gpu" and ti["queue"] == "gpu", ti
    status, log = stack.request(
        "GET",
        f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/pretrain/logs/{ti['try_number']}?full_content=true",
    )
    assert status == 200, log
    lines = log_lines(log["content"])
    epochs = [line for line in lines if "pretrain epoch" in line]
    assert any("pretrain epoch 1/2" in line for line in epochs), "\n".join(lines[-60:])
    assert any("pretrain epoch 2/2" in line for line in epochs), "\n".join(lines[-60:])
    assert all("loss=" in line and "seq/s=" in line for line in epochs), epochs
    # ... and says what it read and wrote.
    assert any("pretrain output encoder:" in line and "sha256" in line for line in lines), "\n".join(lines[-60:])
    _, flog = stack.request(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/finetune/logs/1?full_content=true"
    )
    assert any("finetune epoch 1/1" in line for line in log_lines(flog["content"]))

    # A successful run's task logs hold no ERROR line: no third-party start-up noise at that level.
    errors = []
    for t in smoke_run["task_instances"]:
        mapped = f"/{t['map_index']}" if t["map_index"] >= 0 else ""
        _, tlog = stack.request(
            "GET",
            f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/{t['task_id']}/logs/{t['try_number']}"
            f"?full_content=true&map_index={t['map_index']}",
        )
        for rec in tlog["content"]:
            level = str(rec.get("level", "")).lower() if isinstance(rec, dict) else ""
            text = log_lines([rec])[0]
            if level in ("error", "critical") or text.lstrip().startswith(("E0000", "ERROR")):
                errors.append(f"{t['task_id']}{mapped}: [{level}] {text[:300]}")
    assert not errors, "\n".join(errors)

    # The sealed shards and the new champion are asset events other DAGs can be scheduled on.
    _, events = stack.request("GET", f"/api/v2/assets/events?source_dag_id={DAG_ID}&limit=50")
    uris = {e["uri"] for e in events["asset_events"] if e["source_run_id"] == run_id}
    assert {"x-encoderflow://shards/sealed", "x-encoderflow://registry/encoderflow-sst2/champion"} <= uris, events

    # The plugin page lists this run with its decision, to a signed-in user only.
    status, _ = stack.request("GET", "/encoderflow/runs.json", token=None)
    assert status == 401
    status, snap = stack.request("GET", "/encoderflow/runs.json")
    assert status == 200, snap
    mine = next(r for r in snap["runs"] if r["run_id"] == run_id)
    assert mine["state"] == "success" and mine["gate"]["blessed"] is True, mine
    assert set(mine["data_docs"]) == {"corpus", "labeled", "vocab"}
    # ... and what its charts are drawn from: every stage's per-epoch history, the gate's figures.
    assert set(mine["curves"]) == {"pretrain", "finetune", "baseline"}, mine["curves"]
    assert mine["gate_chart"]["blessed"] is True and mine["gate_chart"]["champion"] is None, mine["gate_chart"]
    assert snap["registry"]["champion"]["version"] == "1"
    # The champion's asset event carries the metric under its one name, the summary's value.
    [moved] = [e for e in events["asset_events"] if e["source_run_id"] == run_id and e["uri"].endswith("/champion")]
    assert moved["extra"]["val_accuracy"] == mine["metrics"]["val_accuracy"] > 0, moved


# Open the trigger form the way a person does: the DAG page's Trigger button.
OPEN_FORM_JS = r"""
(async () => {
  const sleep = (ms) => new Promise(r => setTimeout(r, ms));
  for (let i = 0; i < 60; i++) {
    const btn = [...document.querySelectorAll('button')].find(b => /^\s*Trigger\s*$/.test(b.innerText));
    if (btn) { btn.click(); break; }
    await sleep(500);
  }
  for (let i = 0; i < 60; i++) {
    if ([...document.querySelectorAll('[role=dialog]')].some(e => /Trigger Dag/.test(e.innerText))) return true;
    await sleep(500);
  }
  return false;
})()
"""
FORM = "[...document.querySelectorAll('[role=dialog]')].find(e => /Trigger Dag/.test(e.innerText))"
# Where a collapsed param section's header is, so a real mouse click can open it.
SECTION_JS = (
    "(() => { const b = [...(" + FORM + ").querySelectorAll('button[aria-expanded=\"false\"]')]"
    ".find(b => b.innerText.trim() === %s); if (!b) return null; b.scrollIntoView({block: 'center'});"
    " const r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
)
SECTIONS = ("Data generation", "Pretraining", "Fine-tuning", "Promotion gate", "Advanced")


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# CI (.ci/run) installs chromium and sets ENCODERFLOW_REQUIRE_BROWSER=1: there a missing browser fails.
needs_chromium = pytest.mark.skipif(
    chromium_binary() is None and not os.environ.get("ENCODERFLOW_REQUIRE_BROWSER"),
    reason="needs Debian's chromium (make stack-deps, or apt-get install chromium)",
)


class Cdp:
    """Just enough of the Chrome DevTools Protocol over one page's websocket: commands, JS, screenshots."""

    def __init__(self, ws):
        self.ws, self._ids = ws, iter(range(1, 1_000_000))

    async def call(self, method: str, **params) -> dict[str, Any]:
        i = next(self._ids)
        await self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:  # events arrive in between; only this command's answer counts
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == i:
                assert "error" not in msg, msg
                return msg.get("result", {})

    async def js(self, expression: str, **kw) -> Any:
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, **kw)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res.get("result", {}).get("value")

    async def shoot(self, path: Path) -> None:
        await self.js("window.scrollTo(0, 0)")
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    async def shoot_page(self, path: Path, width: int = 1400, max_height: int = 8000) -> None:
        """The whole page, not only the window: the viewport is resized to the page's height first."""
        metrics = await self.call("Page.getLayoutMetrics")
        height = min(max_height, math.ceil(metrics["cssContentSize"]["height"]))
        await self.call(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
        )
        await asyncio.sleep(0.5)  # let it lay out at the new size
        await self.shoot(path)

    async def sign_in_and_open(self, url: str, token: str, path: str) -> None:
        await self.call("Page.enable")
        await self.call("Network.enable")
        # The session cookie the login page would set, for this origin only.
        await self.call("Network.setCookie", name="_token", value=token, url=url + "/", httpOnly=True)
        await self.call("Page.navigate", url=url + path)


@contextmanager
def chromium(workdir: Path, window: str = "1400,1800") -> Iterator[str]:
    """Headless Chromium with a debugging port on loopback; yields its page's websocket URL, killed on exit."""
    profile = workdir / f"chromium-profile-{secrets.token_hex(4)}"
    port = free_port()
    proc = subprocess.Popen(
        [
            chromium_binary(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--remote-debugging-port={port}",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile}",
            f"--window-size={window}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def target():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
                    return pages[0]["webSocketDebuggerUrl"] if pages else None
            except OSError:
                return None

        deadline = time.monotonic() + 60
        ws_url = None
        while not ws_url and time.monotonic() < deadline:
            ws_url = target()
            time.sleep(0.5)
        assert ws_url, "chromium did not open its debugging port"
        yield ws_url
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


def drive(ws_url: str, script, timeout: float = 150) -> Any:
    """Run ``await script(cdp)`` against the page at ``ws_url``; its result."""
    import websockets

    async def main():
        async with websockets.connect(ws_url, max_size=64 * 1024 * 1024) as ws:
            return await script(Cdp(ws))

    return asyncio.run(asyncio.wait_for(main(), timeout))


def browser_check(url: str, token: str, workdir: Path, screenshot: Path) -> str:
    """Open the DAG signed in, press Trigger, screenshot the form; returns the form's text."""

    async def script(cdp: Cdp) -> str:
        await cdp.sign_in_and_open(url, token, f"/dags/{DAG_ID}")
        assert await cdp.js(OPEN_FORM_JS, awaitPromise=True, timeout=90_000), "the trigger form did not open"
        await asyncio.sleep(1)
        texts = [await cdp.js(f"({FORM}).innerText")]
        await cdp.shoot(screenshot)
        # The form's sections are an accordion (one open at a time): open each, read, shoot.
        for section in SECTIONS:
            point = await cdp.js(SECTION_JS % json.dumps(section))
            assert point, f"no collapsed section {section!r} in the form"
            for kind in ("mousePressed", "mouseReleased"):
                await cdp.call(
                    "Input.dispatchMouseEvent", type=kind, x=point[0], y=point[1], button="left", clickCount=1
                )
            await asyncio.sleep(0.8)
            texts.append(await cdp.js(f"({FORM}).innerText"))
            await cdp.shoot(screenshot.with_name(f"{screenshot.stem}-{section.lower().replace(' ', '-')}.png"))
        return "\n".join(texts)

    with chromium(workdir) as ws_url:
        return drive(ws_url, script)


@pytest.mark.slow
@needs_chromium
def test_trigger_form_in_a_real_browser(stack):
    stack.wait_for(lambda: stack.request("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200, 120, "the DAG to be parsed")
    shot = Path(os.environ.get("ENCODERFLOW_SCREENSHOT") or stack.root / "trigger-form.png")
    text = browser_check(stack.url, stack.token("admin", stack.password), stack.root, shot)
    assert shot.exists() and shot.stat().st_size > 10_000
    for label in (
        "Preset",
        "Offline data folder",
        "Mirror URL",
        "Pretraining epochs",
        "Fine-tuning learning rate",
        "Gate: accuracy floor",
    ):
        assert label in text, f"{label!r} not in the trigger form:\n{text[:3000]}"
    print(f"\ntrigger form screenshot: {shot}")


# What the runs page shows for one run, read from its DOM once the run's chart row is there.
RUN_CHARTS_JS = r"""
(async (RUN, doc) => {
  const sleep = (ms) => new Promise(r => setTimeout(r, ms));
  let row = null;
  for (let i = 0; i < 60 && !row; i++) {
    const d = doc();
    row = d && [...d.querySelectorAll('tr.ef-charts')].find(t => t.dataset.run === RUN);
    if (!row) await sleep(500);
  }
  if (!row) { const d = doc(); return {found: false, text: d && d.body ? d.body.innerText.slice(0, 3000) : null}; }
  const d = doc();
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; };
  const main = [...d.querySelectorAll('tr.ef-run')].find(t => t.dataset.run === RUN);
  const gate = row.querySelector('svg.ef-gate');
  return {
    found: true,
    curves: [...row.querySelectorAll('svg.ef-curves')].map(s => ({
      stage: s.dataset.stage, epochs: +s.dataset.epochs, points: s.querySelectorAll('circle').length,
      series: [...s.querySelectorAll('g.ef-series')].map(g => g.dataset.series),
      text: [...s.querySelectorAll('text')].map(t => t.textContent), box: box(s)})),
    gate: gate && {blessed: gate.dataset.blessed, box: box(gate),
      bars: Object.fromEntries([...gate.querySelectorAll('rect.ef-bar')].map(b => [b.dataset.name, b.dataset.value])),
      floor: gate.querySelector('.ef-floor') && gate.querySelector('.ef-floor').dataset.value},
    links: main ? [...main.querySelectorAll('a')].map(a => [a.textContent.trim(), a.href]) : [],
    text: main ? main.innerText : null,
  };
})(%s, %s)
"""
PAGE_DOC = "() => document"
# Inside the Airflow UI the page is an iframe under the UI's navigation.
FRAME_DOC = (
    "() => { const f = [...document.querySelectorAll('iframe')].find(f => /encoderflow\\/$/.test(f.src));"
    " return f && f.contentDocument; }"
)


def runs_page_check(url: str, token: str, workdir: Path, run_id: str, shots: Path) -> dict[str, Any]:
    """Open the runs page signed in, read one run's charts from its DOM, screenshot the whole page.

    The same page is then opened as a person reaches it, from the Airflow UI's navigation (an
    iframe under ``/plugin/encoderflow-runs``), and shot again. Writes ``runs-page.png`` and
    ``runs-page-in-ui.png`` under ``shots``; returns the two DOM readings.
    """

    async def script(cdp: Cdp) -> dict[str, Any]:
        await cdp.sign_in_and_open(url, token, "/encoderflow/")
        page = await cdp.js(RUN_CHARTS_JS % (json.dumps(run_id), PAGE_DOC), awaitPromise=True, timeout=60_000)
        assert page and page["found"], f"no charts for {run_id} on the runs page: {page}"
        await cdp.shoot_page(shots / "runs-page.png")
        # Chart positions after the resize, in the screenshot's pixels (the page is shot from its top).
        page = await cdp.js(RUN_CHARTS_JS % (json.dumps(run_id), PAGE_DOC), awaitPromise=True, timeout=60_000)
        await cdp.call("Emulation.clearDeviceMetricsOverride")
        await cdp.call("Page.navigate", url=f"{url}/plugin/encoderflow-runs")
        in_ui = await cdp.js(RUN_CHARTS_JS % (json.dumps(run_id), FRAME_DOC), awaitPromise=True, timeout=60_000)
        await asyncio.sleep(1)
        await cdp.shoot(shots / "runs-page-in-ui.png")
        return {"page": page, "in_ui": in_ui}

    with chromium(workdir) as ws_url:
        return drive(ws_url, script)


def png_pixels_near(path: Path, box: list[float], colour: str, tolerance: int = 40) -> int:
    """How many pixels inside ``box`` (x, y, width, height) are within ``tolerance`` of ``colour`` (#rrggbb)."""
    from PIL import Image

    want = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    with Image.open(path) as img:
        x, y, w, h = (round(v) for v in box)
        crop = img.convert("RGB").crop((x, y, x + w, y + h))
        return sum(
            count
            for count, pixel in crop.getcolors(maxcolors=w * h + 1)
            if all(abs(a - b) <= tolerance for a, b in zip(pixel, want))
        )


@pytest.mark.slow
@needs_chromium
def test_runs_page_in_a_real_browser_shows_the_runs_charts(stack, smoke_run):
    """After a real run, the runs page draws its training curves and gate decision, and a screenshot shows them."""
    if str(REPO / "plugins") not in sys.path:
        sys.path.insert(0, str(REPO / "plugins"))
    import encoderflow_runs_page as page

    assert smoke_run["state"] == "success", smoke_run["states"]
    run_id = smoke_run["run_id"]
    shots = stack.root / "screens"
    shots.mkdir(exist_ok=True)
    seen = runs_page_check(stack.url, stack.token("admin", stack.password), stack.root, run_id, shots)
    dom = seen["page"]

    # One chart per training stage, each with a point for every epoch of every series the run recorded.
    folder = stack.root / "efhome" / "runs" / layout.safe_run_id(run_id)
    assert [c["stage"] for c in dom["curves"]] == ["pretrain", "finetune", "baseline"], dom["curves"]
    for chart in dom["curves"]:
        history = json.loads((folder / chart["stage"] / "result.json").read_text())["history"]
        assert chart["epochs"] == len(history["loss"]), chart
        assert len(chart["series"]) == 4 and set(chart["series"]) <= set(history), chart
        assert chart["points"] == sum(len(history[s]) for s in chart["series"]), chart
        assert {"epoch", "loss", "accuracy", "train", "val"} <= set(chart["text"]), chart["text"]
    # The gate chart holds the numbers gate.json decided on, and the floor it used.
    gate = json.loads((folder / "gate.json").read_text())
    floor = next(c["threshold"] for c in gate["checks"] if c["name"] == "floor")
    assert dom["gate"]["blessed"] == "true" and gate["blessed"] is True
    assert dom["gate"]["bars"] == {"candidate": f"{gate['candidate']:.4f}", "baseline": f"{gate['baseline']:.4f}"}
    assert dom["gate"]["floor"] == f"{floor:.4f}"
    # The run's row links its MLflow run and registered model version.
    summary = json.loads((folder / "summary.json").read_text())
    links = dict(dom["links"])
    mlflow_ui = stack.env["ENCODERFLOW_MLFLOW_UI_URL"]
    version = summary["registry"]["version"]
    assert links["model version"] == f"{mlflow_ui}/#/models/encoderflow-sst2/versions/{version}", links
    assert links["MLflow run"] == f"{mlflow_ui}/#/runs/{summary['registry']['run_id']}", links

    # The screenshot is a real picture of those charts: a full-width PNG whose pixels, where the
    # DOM put each chart, carry its curves' and bars' colours.
    shot = shots / "runs-page.png"
    with open(shot, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width == 1400 and height >= max(c["box"][1] + c["box"][3] for c in dom["curves"]), (width, height)
    for chart in dom["curves"]:
        for colour in (page.TRAIN_COLOUR, page.VAL_COLOUR):
            assert png_pixels_near(shot, chart["box"], colour) > 15, (chart["stage"], colour)
    assert png_pixels_near(shot, dom["gate"]["box"], page.GATE_COLOURS["blessed"]) > 200  # the candidate's bar
    assert png_pixels_near(shot, dom["gate"]["box"], page.GATE_COLOURS["baseline"]) > 200

    # Reached from Airflow's navigation, the same charts are inside the UI's frame.
    in_ui = seen["in_ui"]
    assert in_ui and in_ui["found"], in_ui
    assert [c["stage"] for c in in_ui["curves"]] == ["pretrain", "finetune", "baseline"] and in_ui["gate"]
    assert (shots / "runs-page-in-ui.png").stat().st_size > 20_000

    keep = os.environ.get("ENCODERFLOW_SCREENSHOT_DIR")
    if keep:  # a copy that outlives pytest's temporary folders, for a person to look at
        Path(keep).mkdir(parents=True, exist_ok=True)
        for name in ("runs-page.png", "runs-page-in-ui.png"):
            shutil.copy2(shots / name, Path(keep) / name)
    print(f"\nruns page screenshots: {shots}" + (f" (copied to {keep})" if keep else ""))


# --- fast: the DAG's failure handling (encoderflow.airflow_adapter), without servers ---------------------------

PROBE = r"""
import json, logging, sys
from encoderflow import airflow_adapter as d
from encoderflow.errors import EncoderflowError
records = []
class H(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger("encoderflow.dag").addHandler(H())
logging.getLogger("encoderflow.dag").setLevel(logging.INFO)

@d.expected_failures
def validate(info):
    raise EncoderflowError("sst2: SST-2/dev.tsv: expect_column_values_to_be_in_set label failed (3 rows)")
try:
    validate({})
except Exception as exc:
    failed = {"type": type(exc).__name__, "message": str(exc), "cause": repr(exc.__cause__),
              "suppressed": exc.__suppress_context__}

class TI:
    dag_id, task_id, run_id, try_number, max_tries, map_index = "encoder_pretraining", "build_shard", "r1", 2, 1, 3
    log_url = "http://localhost:8080/dags/encoder_pretraining/runs/r1/tasks/build_shard/mapped/3?try_number=2"
failed_write = ValueError("disk full\n  while writing shard 3")
d.log_failure({"ti": TI(), "exception": failed_write, "params": {"preset": "smoke"}})
from encoderflow import errors
first = errors.read_failure("r1")
import os
os.environ["ENCODERFLOW_CLI_RUN"] = "1"  # encoderflow run: no UI to link the log to
class CliTI(TI):
    run_id = "r-cli"
d.log_failure({"ti": CliTI(), "exception": failed_write, "params": {"preset": "smoke"}})
cli_log_url = errors.read_failure("r-cli")["log_url"]
del os.environ["ENCODERFLOW_CLI_RUN"]
records.pop()  # that call's failure line; the test reads the ones before it
try:
    validate({})
except Exception as exc:
    d.log_failure({"ti": TI(), "exception": exc})
class Other(TI):
    run_id = "r2"
@d.expected_failures
def download(info):
    raise EncoderflowError("sst2: no SST-2 under the data folder", fix="pass --data-dir with SST-2/ in it")
try:
    download({})
except Exception as exc:
    told = str(exc)
    d.log_failure({"ti": Other(), "exception": exc})
from encoderflow import errors
kept_fix = errors.read_failure("r2")["fix"]
errors.failure_path("r2").unlink()
d.log_failure({"ti": Other(), "exception": told})  # the wrapper's text alone, its context lost
kept_fix_from_text = errors.read_failure("r2")["fix"]
schedules = {}
import os
for value in ("", "@daily", "0 3 * * 1", "off", "None"):
    os.environ["ENCODERFLOW_SCHEDULE"] = value
    schedules[value] = d.schedule_from_env()
print(json.dumps({"failed": failed, "records": records, "schedules": schedules, "kept_fix": kept_fix,
                  "kept_fix_from_text": kept_fix_from_text, "first": first, "cli_log_url": cli_log_url}))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dag-probe")
    env = {
        **{k: v for k, v in os.environ.items() if k != "ENCODERFLOW_CLI_RUN"},  # a task outside `encoderflow run`
        "AIRFLOW_HOME": str(tmp / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp / 'airflow.db'}",
        # The probe calls the failure hook, which records the failure under ENCODERFLOW_HOME.
        "ENCODERFLOW_HOME": str(tmp / "efhome"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "dags")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_expected_failure_is_a_message_and_failure_callback_one_line(probe):
    # The exception Airflow logs is the diagnosis and its fix (the error's default one where its
    # message spells none), with no chained traceback behind it.
    message = (
        "EncoderflowError: sst2: SST-2/dev.tsv: expect_column_values_to_be_in_set label failed (3 rows); "
        f"fix: {errors.GENERIC_FIX}"
    )
    assert probe["failed"] == {"type": "AirflowFailException", "cause": "None", "suppressed": True, "message": message}
    # The callback's line names the task, run, try and error type, and never repeats the cause.
    assert probe["records"] == [
        "encoderflow FAILED encoder_pretraining.build_shard[3] run=r1 try=2/2: ValueError",
        "encoderflow FAILED encoder_pretraining.build_shard[3] run=r1 try=2, no retry: EncoderflowError",
        "encoderflow FAILED encoder_pretraining.build_shard[3] run=r2 try=2, no retry: EncoderflowError",
        "encoderflow FAILED encoder_pretraining.build_shard[3] run=r2 try=2/2: EncoderflowError",
    ]
    # A run that fails before it reports keeps its preset, and where the try's log is, with its cause.
    first = probe["first"]
    assert (first["task_id"], first["map_index"], first["try_number"], first["error"]) == (
        "build_shard",
        3,
        2,
        "ValueError",
    )
    assert first["preset"] == "smoke" and first["log_url"].endswith("/runs/r1/tasks/build_shard/mapped/3?try_number=2")
    assert first["log_folder"].endswith("/airflow/logs"), first  # the probe's AIRFLOW_HOME, Airflow's default
    assert probe["cli_log_url"] is None
    # The failure kept for the runs page names the trigger form's field as the task log does.
    kept = "pass --data-dir with SST-2/ in it (trigger form: --data-dir is 'Offline data folder')"
    assert probe["kept_fix"] == probe["kept_fix_from_text"] == kept


def test_schedule_comes_from_the_environment(probe):
    assert probe["schedules"] == {"": None, "@daily": "@daily", "0 3 * * 1": "0 3 * * 1", "off": None, "None": None}


@pytest.mark.slow
def test_a_failed_task_says_its_cause_and_fix_once_in_its_log(stack, smoke_run):
    """Bad labeled data through the scheduler and a worker: ``validate_labeled`` fails at once, and its
    log says what is wrong and what to do once (Airflow's own exception record), not three times."""
    tree = fixtures_data.write_tree(stack.root / "bad-data")
    dev = tree / "SST-2" / "dev.tsv"
    dev.write_text(dev.read_text().replace("\t1\n", "\t2\n", 1))
    run, state = trigger(stack, DAG_ID, smoke_conf(tree), 300, "the bad-data run to finish", note="bad data")
    assert state == "failed"
    quoted = urllib.parse.quote(run["dag_run_id"], safe="")
    _, ti = stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/validate_labeled")
    assert (ti["state"], ti["try_number"]) == ("failed", 1), ti  # an expected failure is not retried
    cause = f"{dev}: expect_column_values_to_be_in_set(column='label'"
    text = task_log(stack, run["dag_run_id"], "validate_labeled", until=cause)
    fix = errors.DEFAULT_FIXES["ValidationFailed"]
    assert text.count(cause) == 1 and text.count(fix) == 1, text[-4000:]
    [summary] = [line for line in text.splitlines() if "encoderflow FAILED" in line]
    assert f"encoderflow FAILED {DAG_ID}.validate_labeled run={run['dag_run_id']} try=1, no retry" in summary


@pytest.mark.slow
def test_a_trigger_key_that_is_no_param_fails_the_first_task_once(stack, smoke_run):
    """Airflow keeps any conf key; one that is no param changed nothing and the run went on as if
    it had not been given. check_params fails it before anything downloads, saying what was meant."""
    conf = {**smoke_conf(stack.root / "data"), "pretrain_epoch": 3}
    run, state = trigger(stack, DAG_ID, conf, 300, "the mistyped run to finish", note="typo")
    assert state == "failed"
    quoted = urllib.parse.quote(run["dag_run_id"], safe="")
    _, tis = stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances")
    states = {ti["task_id"]: (ti["state"], ti["try_number"]) for ti in tis["task_instances"]}
    assert states["check_params"] == ("failed", 1) and states["download_corpus"][0] == "upstream_failed", states
    said = "unknown trigger params 'pretrain_epoch': did you mean 'pretrain_epochs'?"
    text = task_log(stack, run["dag_run_id"], "check_params", until=said)
    assert text.count(said) == 1, text[-4000:]


@pytest.mark.slow
def test_a_changed_source_makes_the_scheduler_start_a_training_run(stack, smoke_run, tmp_path):
    """The live chain: encoderflow_sources sees a corpus it has not seen, adds an event to
    encoderflow_source_corpus, and the scheduler creates an asset-triggered run of the training DAG
    (stopped here: what that run decides is check_lineage's, tested with the data that lands)."""
    from tests.data.fixtures_own import write_corpus

    watcher = "encoderflow_sources"
    corpus = write_corpus(tmp_path / "corpus", n_files=3)

    def runs(run_type: str) -> list[dict[str, Any]]:
        listed = stack.wait_for(
            lambda: (r := stack.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100"))[0] == 200 and r[1],
            30,
            "the DAG's runs",
        )
        return [r for r in listed["dag_runs"] if r["run_type"] == run_type]

    assert runs("asset_triggered") == []  # manual and asset-free so far
    stack.wait_for(lambda: stack.request("GET", f"/api/v2/dags/{watcher}")[0] == 200, 120, "the watcher to be parsed")
    run, state = trigger(stack, watcher, {"corpus": str(corpus)}, 180, "the source watcher to finish")
    assert state == "success"

    def recorded():  # polled: SQLite under a busy scheduler can answer one request with an error
        status, events = stack.request("GET", f"/api/v2/assets/events?source_dag_id={watcher}&limit=10")
        mine = [e for e in events["asset_events"] if e["source_run_id"] == run["dag_run_id"]] if status == 200 else []
        return mine or None

    [event] = stack.wait_for(recorded, 60, "the watcher's asset event", interval=1)
    assert event["uri"] == "x-encoderflow://sources/corpus" and event["extra"]["location"] == str(corpus), event
    triggered = stack.wait_for(lambda: runs("asset_triggered"), 120, "an asset-triggered training run", interval=1)
    assert len(triggered) == 1, triggered
    # Its conf is empty (a scheduled run has no form): stop it rather than let it download WikiText.
    quoted_run = urllib.parse.quote(triggered[0]["dag_run_id"], safe="")
    status, _ = stack.request("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted_run}", {"state": "failed"})
    assert status == 200
