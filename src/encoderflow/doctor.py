"""``encoderflow doctor``: one screen on what a run here would use, and what would stop it.

Each check is one line: ``ok``/``warn``/``FAIL``, what was checked, the value found, and the fix
when it is not ok. A run can start when no check FAILs (exit 0; 1 otherwise). Checked: Python,
JAX (version, backend, devices and their memory), the dtype policy ``precision=auto`` resolves to,
that TensorFlow sees no GPU, free disk under ``ENCODERFLOW_HOME``, and the data: with
``--data-dir`` the offline folder's layout for the configs a run would use (no network), else
whether each dataset's sources (the ``--mirror`` first, then the pinned URLs) answer a HEAD request;
and whether a scheduler runs on the home's Airflow (``encoderflow run`` is refused beside one).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from encoderflow import layout, runtime
from encoderflow.config import DEFAULT_PRESET, PRESETS, from_overrides, parse_set
from encoderflow.data import sources

OK, WARN, FAIL = "ok", "warn", "FAIL"
GIB = 1 << 30
# A guide run downloads and extracts WikiText-103 (about 0.7 GB), writes shards, checkpoints and MLflow runs.
DISK_FAIL_BYTES = 1 * GIB
DISK_WARN_BYTES = 5 * GIB
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    status: str
    what: str
    value: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.what:<22} {self.value}"
        return f"{text}  -> fix: {self.fix}" if self.fix and self.status != OK else text


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info[:2] == (3, 11):
        return Check(OK, "python", f"{version} ({sys.executable})")
    return Check(
        WARN,
        "python",
        f"{version} ({sys.executable}); the pins are for Python 3.11",
        "make venv (PYTHON=python3.11)",
    )


def nvidia_gpus() -> list[str] | None:
    """The GPUs ``nvidia-smi -L`` lists; None when there is no nvidia-smi (or it does not answer)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in proc.stdout.splitlines() if line.startswith("GPU ")]


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _describe_devices(devices: Sequence) -> str:
    groups: dict[tuple[str, str], list] = {}
    for d in devices:
        groups.setdefault((d.platform, getattr(d, "device_kind", "") or d.platform), []).append(d)
    parts = []
    for (plat, kind), group in groups.items():
        memory = ""
        try:
            stats = group[0].memory_stats() or {}
        except Exception:  # noqa: BLE001 - a backend without memory stats (CPU) says nothing
            stats = {}
        if stats.get("bytes_limit"):
            memory = f", {_gib(stats['bytes_limit'])} usable each"
        where = f" ({plat}{memory})" if kind != plat or memory else ""
        parts.append(f"{len(group)} x {kind}{where}")
    return "; ".join(parts)


def check_jax(gpus: list[str] | None) -> tuple[list[Check], str | None]:
    """JAX's version, backend and devices; returns the checks and the backend (None if JAX fails)."""
    try:
        import jax

        backend = jax.default_backend()
        devices = jax.devices()
    except Exception as exc:  # noqa: BLE001 - any import or backend failure is the finding
        return [Check(FAIL, "jax", f"unusable: {type(exc).__name__}: {str(exc)[:200]}", "make venv")], None
    checks = [Check(OK, "jax", f"{jax.__version__}, backend {backend}")]
    devices_text = _describe_devices(devices)
    plugin = _installed("jax-cuda12-plugin")
    if backend == "cpu" and gpus:
        if plugin:
            checks.append(
                Check(
                    WARN,
                    "devices",
                    f"{devices_text}; nvidia-smi lists {len(gpus)} GPU(s) but the CUDA plugin "
                    f"(jax-cuda12-plugin {plugin}) did not load",
                    "check the NVIDIA driver supports CUDA 12 (nvidia-smi) and "
                    "python -c \"import jax; print(jax.devices('cuda'))\" for the error",
                )
            )
        else:
            checks.append(
                Check(
                    WARN,
                    "devices",
                    f"{devices_text}; nvidia-smi lists {len(gpus)} GPU(s) but this venv has the CPU build of JAX",
                    "make ACCEL=cuda12 venv (installs jax[cuda12])",
                )
            )
    else:
        note = "" if backend != "cpu" else " (no GPU: training runs on the CPU)"
        checks.append(Check(OK, "devices", devices_text + note))
    return checks, backend


def check_dtype_policy(backend: str | None) -> Check:
    if backend is None:
        return Check(WARN, "precision=auto", "unknown (JAX unusable)", "make venv")
    return Check(OK, "precision=auto", f"{runtime.dtype_policy('auto', platform=backend)} (backend {backend})")


def check_tensorflow() -> Check:
    try:
        tf = runtime.tensorflow()  # its native start-up lines go to the log, not this screen
        gpus = tf.config.get_visible_devices("GPU")
    except Exception as exc:  # noqa: BLE001
        return Check(FAIL, "tensorflow", f"unusable: {type(exc).__name__}: {str(exc)[:200]}", "make venv")
    if gpus:
        return Check(
            FAIL,
            "tensorflow",
            f"{tf.__version__} sees {len(gpus)} GPU(s): it would compete with JAX for GPU memory",
            "import TensorFlow only through encoderflow.runtime.tensorflow(), before anything else imports it",
        )
    return Check(OK, "tensorflow", f"{tf.__version__}, sees no GPU (feeds data on the CPU)")


def nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(path.anchor or ".")


def check_disk(home: Path | None = None) -> Check:
    home = home or layout.home()
    where = nearest_existing(home)
    label = str(home) if where == home else f"{home} (not created yet; {where})"
    if not where.is_dir():
        return Check(
            FAIL,
            "disk (ENCODERFLOW_HOME)",
            f"{where} is a file, not a folder" + ("" if where == home else f" ({home} would be under it)"),
            "set ENCODERFLOW_HOME to a folder",
        )
    free = shutil.disk_usage(where).free
    value = f"{_gib(free)} free under {label}"
    try:
        layout.write_probe(where)
    except OSError as exc:
        return Check(
            FAIL,
            "disk (ENCODERFLOW_HOME)",
            f"{value}; not writable ({exc.strerror or exc})",
            "set ENCODERFLOW_HOME to a writable folder",
        )
    if free < DISK_FAIL_BYTES:
        return Check(
            FAIL,
            "disk (ENCODERFLOW_HOME)",
            value,
            f"free space, or set ENCODERFLOW_HOME elsewhere (>= {_gib(DISK_WARN_BYTES)})",
        )
    if free < DISK_WARN_BYTES:
        return Check(
            WARN,
            "disk (ENCODERFLOW_HOME)",
            value + f"; a guide run wants >= {_gib(DISK_WARN_BYTES)}",
            "free space, or set ENCODERFLOW_HOME elsewhere",
        )
    return Check(OK, "disk (ENCODERFLOW_HOME)", value)


# --- data: offline folder ---------------------------------------------------------------------------


def expected_layout(specs: dict[str, sources.DatasetSpec]) -> list[str]:
    return [m for s in specs.values() for m in s.members]


def check_offline(
    data_dir: str | os.PathLike,
    configs: dict[str, tuple[str, str]],
    specs: dict[str, sources.DatasetSpec],
    required: bool,
) -> list[Check]:
    """One line per config: are the files it reads (``required_members``) in the folder?

    Args:
        configs: label -> (pretrain split, validation split).
        required: every config must be complete (an explicit ``--preset``); otherwise one
            complete config is enough and the incomplete ones are warnings.
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        return [
            Check(
                FAIL,
                "data (offline)",
                f"{root} is not a folder",
                "pass --data-dir pointing at a folder laid out as the archives extract (layout below)",
            )
        ]
    missing: dict[str, list[str]] = {}
    needed: dict[str, list[str]] = {}
    for label, (pretrain_split, validation_split) in configs.items():
        files = [m for ds in specs for m in sources.required_members(ds, pretrain_split, validation_split, specs)]
        needed[label] = files
        missing[label] = [m for m in files if not (root / m).exists()]
    bad = sources.unreadable(root, dict.fromkeys(m for files in needed.values() for m in files))
    usable = {label: not missing[label] and not bad.keys() & set(needed[label]) for label in configs}
    any_complete = any(usable.values())
    checks = []
    for label, files in missing.items():
        what = f"data ({label})"
        if usable[label]:
            checks.append(Check(OK, what, f"complete: {len(needed[label])} files under {root}"))
            continue
        if not files:  # all there, one unreadable: the line below names it
            continue
        status = WARN if any_complete and not required else FAIL
        fix = f"put {', '.join(files)} under {root} (layout below)"
        train = sources.wikitext_member("train")
        if train in files and len(files) == 1:
            fix += ", or run with --set data.pretrain_split=test (pretrain on wiki.test.raw; figures must say so)"
        checks.append(Check(status, what, f"missing {', '.join(str(root / f) for f in files)}", fix))
    if bad:
        checks.append(
            Check(
                FAIL,
                "data (offline)",
                f"cannot read {sources.unreadable_text(bad)} under {root}",
                sources.UNREADABLE_FIX,
            )
        )
    return checks


# --- data: URLs ------------------------------------------------------------------------------------


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """HEAD ``url`` (GET without reading the body where HEAD is refused); (answers, description)."""
    import requests

    try:
        r = requests.head(url, headers=sources.REQUEST_HEADERS, timeout=timeout, allow_redirects=True)
        if r.status_code in (405, 501):
            with requests.get(url, headers=sources.REQUEST_HEADERS, timeout=timeout, stream=True) as r:
                pass
    except requests.Timeout:
        return False, f"no answer within {timeout:g}s"
    except requests.ConnectionError as exc:
        reason = str(exc)
        for short in ("Connection refused", "Name or service not known", "Temporary failure in name resolution"):
            if short in reason:
                reason = short
                break
        return False, f"cannot connect ({reason[:160]})"
    except requests.RequestException as exc:
        return False, f"{type(exc).__name__}: {str(exc)[:160]}"
    if r.status_code >= 400:
        return False, f"HTTP {r.status_code} {r.reason}"
    length = r.headers.get("Content-Length")
    size = f", {int(length):,} bytes" if length and length.isdigit() else ""
    return True, f"HTTP {r.status_code}{size}"


def _check_dataset_urls(spec: sources.DatasetSpec, mirror: str | None, timeout: float) -> Check:
    urls = spec.candidate_urls(mirror)
    failures = []
    what = f"source ({spec.name})"
    for i, url in enumerate(urls):
        answers, detail = probe(url, timeout)
        if answers:
            if i == 0:
                return Check(OK, what, f"{url} answers ({detail})")
            return Check(
                WARN,
                what,
                f"{url} answers ({detail}) after: " + "; ".join(failures),
                f"the run falls back to it; check that the mirror serves {spec.filename}" if mirror else "",
            )
        failures.append(f"{url}: {detail}")
    return Check(
        FAIL,
        what,
        "no source answers: " + "; ".join(failures),
        "check the network or proxy (HTTPS_PROXY), pass --mirror URL serving "
        f"{spec.filename}, or an offline --data-dir",
    )


def check_sources(
    specs: dict[str, sources.DatasetSpec], mirror: str | None = None, timeout: float = PROBE_TIMEOUT_S
) -> list[Check]:
    """One line per dataset, probed in parallel; a dataset still unanswered at the deadline FAILs."""
    results: dict[str, Check] = {}

    def work(name: str) -> None:
        results[name] = _check_dataset_urls(specs[name], mirror, timeout)

    threads = {name: threading.Thread(target=work, args=(name,), daemon=True) for name in specs}
    for t in threads.values():
        t.start()
    # Bounded as a whole: a stalled network must not make the screen wait per URL.
    deadline = time.monotonic() + 2 * timeout + 1
    for t in threads.values():
        t.join(max(0.0, deadline - time.monotonic()))
    out = []
    for name in specs:
        out.append(
            results.get(name)
            or Check(
                FAIL,
                f"source ({name})",
                "no answer before the deadline (DNS or network stalled)",
                "check the network or proxy, or pass --mirror URL / an offline --data-dir",
            )
        )
    return out


# What ``encoderflow run`` is refused beside (airflow_adapter.refuse_beside_scheduler): the doctor said "a run
# can start" while the run it was asked about was then refused.
HOME_AIRFLOW = "airflow (this home)"
_SCHEDULER_PROBE = "from encoderflow import airflow_adapter as af; print(af.live_scheduler() or '')"


def check_home_airflow(home: Path | None = None, timeout: float = 120.0) -> Check | None:
    """Whether an Airflow scheduler runs on the home's embedded Airflow (None: that Airflow was never
    set up, so nothing can run on it). Asked in a child process: this one stays free of Airflow's
    configuration."""
    from encoderflow.cli import airflow_env

    airflow = (home or layout.home()) / "airflow"
    if not (airflow / "airflow.db").exists():
        return None
    env = {**os.environ, **airflow_env(), "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SCHEDULER_PROBE], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return Check(WARN, HOME_AIRFLOW, f"its metadata DB did not answer in {timeout:.0f} s", "")
    said = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else None
    if said is None:
        return Check(WARN, HOME_AIRFLOW, f"could not be asked: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    if not said or not said[0]:
        return Check(OK, HOME_AIRFLOW, f"no scheduler running on {airflow}")
    return Check(
        WARN,
        HOME_AIRFLOW,
        f"a scheduler runs on it ({said[0]}): `encoderflow run` is refused beside it",
        "trigger runs in that Airflow (its UI, or POST /api/v2/dags/encoder_pretraining/dagRuns), or stop it first",
    )


# --- the screen ------------------------------------------------------------------------------------


def _configs(preset: str | None, overrides: Iterable[str]) -> dict[str, tuple[str, str]]:
    names = (preset,) if preset else PRESETS
    out = {}
    for name in names:
        cfg = from_overrides(name, parse_set(list(overrides)))
        out[f"{name} preset"] = (cfg.data.pretrain_split, cfg.data.validation_split)
    return out


def run_checks(
    data_dir: str | None = None,
    mirror: str | None = None,
    sources_file: str | None = None,
    preset: str | None = None,
    overrides: Iterable[str] = (),
    timeout: float = PROBE_TIMEOUT_S,
) -> tuple[list[Check], list[str]]:
    """All checks, in screen order, and notes printed after them (the expected layout)."""
    overrides = list(overrides)
    configs = _configs(preset, overrides)  # a bad --preset/--set fails here, before anything is imported
    specs = sources.load_specs(sources_file)
    gpus = nvidia_gpus()
    checks = [check_python()]
    jax_checks, backend = check_jax(gpus)
    checks += jax_checks
    checks.append(check_dtype_policy(backend))
    checks.append(check_tensorflow())
    checks.append(check_disk())
    if (airflow := check_home_airflow()) is not None:
        checks.append(airflow)
    notes: list[str] = []
    if data_dir:
        data_checks = check_offline(data_dir, configs, specs, required=preset is not None)
        if any(c.status != OK and c.fix != sources.UNREADABLE_FIX for c in data_checks):  # a file to put there
            root = Path(data_dir).expanduser().resolve()
            notes = [f"expected layout under {root} (as the archives extract; WikiText train only to pretrain on it):"]
            notes += [f"  {m}" for m in expected_layout(specs)]
    else:
        data_checks = check_sources(specs, mirror, timeout)
    checks += data_checks
    return checks, notes


def report(checks: Sequence[Check], notes: Sequence[str], out: TextIO) -> int:
    print("encoderflow doctor: what a run here would use", file=out)
    for c in checks:
        print(c.line(), file=out)
    for line in notes:
        print(line, file=out)
    fails = [c for c in checks if c.status == FAIL]
    warns = [c for c in checks if c.status == WARN]
    if fails:
        print(f"doctor: {len(fails)} FAIL, {len(warns)} warn: a run would not start; fix the FAIL lines", file=out)
        return 1
    # A preset whose files are missing is a warn while another preset's are complete: say which.
    blocked = [c.what[len("data (") : -len(" preset)")] for c in warns if re.fullmatch(r"data \(\w+ preset\)", c.what)]
    beside = any(c.what == HOME_AIRFLOW and c.status == WARN and "refused" in c.value for c in warns)
    # Said whatever else is warned about: with the shared data two presets lack a file, and the line read
    # as if `encoderflow run --preset smoke` could start beside the scheduler.
    where = " in the Airflow running on this home (not with encoderflow run)" if beside else ""
    if blocked:
        named = ", ".join(f"{p} (the default)" if p == DEFAULT_PRESET else p for p in blocked)
        which = f"presets {named}: see their warn lines" if len(blocked) > 1 else f"preset {named}: see its warn line"
        print(f"doctor: a run can start{where}, but not with {which} ({len(warns)} warn)", file=out)
    else:
        print(f"doctor: a run can start{where} ({len(warns)} warn)", file=out)
    return 0


def main(
    data_dir: str | None = None,
    mirror: str | None = None,
    sources_file: str | None = None,
    preset: str | None = None,
    overrides: Iterable[str] = (),
    timeout: float = PROBE_TIMEOUT_S,
    out: TextIO | None = None,
) -> int:
    checks, notes = run_checks(data_dir, mirror, sources_file, preset, overrides, timeout)
    return report(checks, notes, out or sys.stdout)
