"""What the gate's statistics and the DAG parse cost: prints a table (targets beside them).

    .venv/bin/python benchmarks/gate.py [--repeats 5]

* bootstrap: ``gate.bootstrap`` on paired per-sentence correctness (candidate, champion,
  baseline) for SST-2's 872 dev sentences and a 10x larger dev set, at the default 2,000
  resamples; median of ``--repeats`` calls after one untimed call. Target: well under a second (it runs inside
  ``evaluate_and_gate``, next to two model evaluations).
* DAG parse: ``DagBag`` over ``dags/`` in a fresh interpreter once Airflow is imported, as the
  scheduler's processor parses it; median of ``--repeats``. Target: < 2 s (Airflow's default import timeout is 30 s;
  the thin-DAG rule keeps every ML library out of parse time, which ``tests/test_dag.py`` checks).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PARSE = """
import sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
print(t1 - t0, time.perf_counter() - t1)
"""


def bootstrap_seconds(n: int, repeats: int) -> float:
    from encoderflow.gate import bootstrap

    rng = np.random.default_rng(0)
    candidate, champion, baseline = (rng.random((3, n)) < [[0.85], [0.83], [0.80]]).astype(np.int8)
    # The first call pays for imports and caches the gate never pays again inside a run.
    bootstrap(candidate, champion, baseline, resamples=2000, seed=repeats)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        bootstrap(candidate, champion, baseline, resamples=2000, seed=i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_seconds(repeats: int) -> tuple[float, float]:
    """Median seconds to import Airflow, and to parse ``dags/`` once it is imported."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ENCODERFLOW_")},
            "AIRFLOW_HOME": tmp,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp}/airflow.db",
        }
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-c", PARSE, str(ROOT / "dags")], env=env, capture_output=True, text=True, check=True
            ).stdout
            times.append([float(x) for x in out.strip().splitlines()[-1].split()])
    return tuple(statistics.median(t[i] for t in times) for i in (0, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each measure, >= 1; medians reported")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be >= 1 (the median of that many runs is reported)")
    airflow_import, parse = parse_seconds(args.repeats)
    rows = [
        ("bootstrap, 872 sentences x 2,000 resamples", bootstrap_seconds(872, args.repeats), "< 0.5 s"),
        ("bootstrap, 8,720 sentences x 2,000 resamples", bootstrap_seconds(8720, args.repeats), "< 0.5 s"),
        ("import airflow (the processor has it already)", airflow_import, "-"),
        ("DagBag over dags/ (both DAGs)", parse, "< 2 s"),
    ]
    print(f"| what | median s ({args.repeats} runs) | target |\n|---|---:|---|")
    for what, seconds, target in rows:
        print(f"| {what} | {seconds:.4f} | {target} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
