"""Offline quality benchmark: this pipeline against the guide's own code, same data and machine.

    .venv/bin/python benchmarks/quality.py --data-dir ../shared/data            # the issue's run
    .venv/bin/python benchmarks/quality.py --data-dir ../shared/data \\
        --pretrain-epochs 1 --finetune-steps 300                                # a shorter one

Both sides pretrain on WikiText ``test`` (the offline folder has no train split) and validate
on ``valid``, then fine-tune on SST-2 train and report SST-2 dev accuracy:

* encoderflow: ``encoderflow run --preset guide`` through Airflow (download/validate/shards/
  baseline/pretrain/finetune/gate), in a fresh ENCODERFLOW_HOME; the wall time is the whole run;
* guide: ``seed_guide.py --stage all`` (baseline, on-the-fly preprocessing, pretrain, fine-tune;
  ``../shared/peers/``, or ``ENCODERFLOW_GUIDE_SCRIPT``), always the guide's own model: against
  another preset the table gives both rows and no verdict.

Runs one after the other (never side by side: they would share the CPU). Prints a table.

Ablation (``--ablation``): the encoderflow side once more per factor, each turned back to the
guide's way one at a time, plus a no-pretraining row, in one table:

    .venv/bin/python benchmarks/quality.py --data-dir ../shared/data --ablation all \\
        --results benchmarks/results/oqb.jsonl

Each finished row is appended to ``--results`` (JSON lines: row, overrides, commit, figures) and a
row already there for the same overrides and commit is not run again, so an interrupted ablation
resumes; ``--table FILE`` prints the table of a results file without running anything.

The guide's code several times (it seeds nothing, so each run is another draw), mean ± std:

    .venv/bin/python benchmarks/quality.py --data-dir ../shared/data --only guide --seeds 3 \\
        --results benchmarks/results/oqb.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peer import GuideMissing, guide_script, run_guide

from encoderflow.config import PRESETS, from_overrides, parse_set

# One row per factor, each turned back to the guide's way alone. The padding mask and all-token
# pooling make outputs depend on padding, so length buckets go off with them (the config refuses
# buckets there): compare those two rows with the buckets-off row, not with the first.
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "full": ("encoderflow ({preset} preset)", []),
    "buckets": ("- length buckets (pad to 128)", ["finetune.length_buckets=off"]),
    "padding_mask": (
        "- padding mask (buckets off)",
        ["model.padding_mask=false", "finetune.pooling=real_tokens", "finetune.length_buckets=off"],
    ),
    "pooling": ("- real-token pooling (buckets off)", ["finetune.pooling=all_tokens", "finetune.length_buckets=off"]),
    "copies": ("- per-epoch mask copies (1 copy)", ["data.dupe_factor=1"]),
    "pretraining": ("no pretraining (random encoder)", ["pretrain.epochs=0"]),
    # The recipe's own changes, each back to the guide's value (on the guide preset they change nothing).
    "pre_norm": ("- pre-norm blocks (post-norm)", ["model.normalize_first=false"]),
    "dropout_off": ("- no pretraining dropout (0.1)", ["pretrain.dropout_off=false"]),
    "schedule": (
        "- warm-up + cosine 1e-3 (constant 5e-4)",
        ["pretrain.lr_schedule=constant", "pretrain.learning_rate=5e-4"],
    ),
    "packing": ("- packed windows (lines)", ["data.sequence_mode=line"]),
    "weight_decay": ("- weight decay 0.01 (0.004)", ["pretrain.weight_decay=0.004"]),
}


def epochs(args, preset: str = "guide") -> int:
    """Pretraining epochs of a side: --pretrain-epochs, else 8 (the guide), else the preset's."""
    if args.pretrain_epochs is not None:
        return args.pretrain_epochs
    return 8 if preset == "guide" else from_overrides(preset).pretrain.epochs


def finetune_epochs(args, preset: str = "guide") -> int:
    """Fine-tuning epochs of a side: --finetune-epochs, else 1 (the OQB's guide side), else the preset's."""
    if args.finetune_epochs is not None:
        return args.finetune_epochs
    return 1 if preset == "guide" else from_overrides(preset).finetune.epochs


def ours_epochs(args) -> tuple[int, int]:
    """The encoderflow side's pretraining and fine-tuning epochs as :func:`ours` runs them, ``--set`` included."""
    cfg = from_overrides(args.preset, parse_set(ours_sets(args)))
    return cfg.pretrain.epochs, cfg.finetune.epochs


def commit() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=Path(__file__).parent).returncode
    return proc.stdout.strip() + ("+dirty" if dirty else "")


def load_results(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def print_table(rows: list[dict]) -> None:
    print(f"{'':<38} {'SST-2 dev':>9} {'MLM val':>8} {'BoW':>7} {'pretrain':>9} {'finetune':>9} {'wall':>7}  overrides")

    def minutes(seconds, width):
        return f"{seconds / 60:>{width}.1f}m" if seconds is not None else f"{'-':>{width + 1}}"

    for r in rows:
        # A fine-tuning-only row (benchmarks/finetune.py on an OQB run's encoder) has no wall time of its own.
        via = f"  (fine-tuned {r['encoder_of']}'s encoder)" if r.get("encoder_of") else ""
        print(
            f"{r['row']:<38} {r['sst2']:>9.4f} {r['mlm']:>8.4f} {r['baseline']:>7.4f} {minutes(r['pretrain_s'], 8)} "
            f"{minutes(r['finetune_s'], 8)} {minutes(r.get('wall_s'), 6)}  {' '.join(r.get('extra', [])) or '-'}{via}"
        )


def run(cmd: list[str], env: dict[str, str], log_path: Path) -> tuple[float, str]:
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    seconds = time.monotonic() - t0
    Path(str(log_path) + ".out").write_text(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:])
        raise SystemExit(f"{cmd[1]} failed with exit {proc.returncode}; see {log_path}")
    return seconds, proc.stdout


def ours_sets(args, extra: list[str] = ()) -> list[str]:
    """The ``--set`` overrides of the encoderflow side's run: the OQB's splits and epochs, then the user's."""
    sets = [
        "data.pretrain_split=test",
        "data.validation_split=valid",
        f"finetune.epochs={finetune_epochs(args, args.preset)}",
    ]
    # The guide's 8 epochs; another preset keeps its own unless --pretrain-epochs says otherwise.
    if args.pretrain_epochs is not None or args.preset == "guide":
        sets.append(f"pretrain.epochs={epochs(args)}")
    if args.pretrain_steps:
        sets.append(f"pretrain.steps_per_epoch={args.pretrain_steps}")
    if args.finetune_steps:
        sets.append(f"finetune.steps_per_epoch={args.finetune_steps}")
    return sets + args.set + list(extra)


def ours(args, work: Path, extra: list[str] = ()) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    sets = ours_sets(args, extra)
    cmd = [
        str(Path(sys.executable).with_name("encoderflow")),
        "run",
        "--preset",
        args.preset,
        "--data-dir",
        str(args.data_dir),
        *[a for s in sets for a in ("--set", s)],
    ]
    seconds, _ = run(cmd, {**os.environ, "ENCODERFLOW_HOME": str(home)}, work / "encoderflow.log")
    summary = json.loads(next((home / "runs").glob("*/summary.json")).read_text())
    run_dir = next((home / "runs").glob("*/"))
    pre = json.loads((run_dir / "pretrain" / "result.json").read_text())
    fin = json.loads((run_dir / "finetune" / "result.json").read_text())
    return {
        "wall_s": seconds,
        "sst2": summary["metrics"]["val_accuracy"],
        "mlm": summary["metrics"]["mlm_val_accuracy"],
        "baseline": summary["metrics"]["baseline_val_accuracy"],
        "pretrain_s": pre["seconds"],
        "finetune_s": fin["seconds"],
        "sets": sets,
    }


def guide(args, work: Path) -> dict:
    r, seconds = run_guide(
        args.data_dir,
        "all",
        "--pretrain-epochs",
        str(epochs(args)),
        "--finetune-epochs",
        str(finetune_epochs(args)),
        "--pretrain-steps",
        str(args.pretrain_steps),
        "--finetune-steps",
        str(args.finetune_steps),
        log_path=work / "guide.log",
    )
    return {
        "wall_s": seconds,
        "sst2": r["finetune_val_accuracy"][-1],
        "mlm": r["pretrain_val_mlm_accuracy"][-1],
        "baseline": r["baseline_val_accuracy"][-1],
        "pretrain_s": r["pretrain_s"],
        "finetune_s": r["finetune_s"],
    }


def main() -> int:
    try:
        return run_benchmark()
    except GuideMissing as exc:  # --only guide: nothing ran before it
        print(f"quality.py: {exc}", file=sys.stderr)
        return 2


def run_benchmark() -> int:
    ap = argparse.ArgumentParser(
        prog="quality.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-dir", type=lambda p: Path(p).resolve(), help="the offline folder (not for --table)")
    ap.add_argument(
        "--preset", default="guide", choices=sorted(PRESETS), help="encoderflow's preset (the guide side is the guide)"
    )
    ap.add_argument("--pretrain-epochs", type=int, help="default: 8 for the guide side and the guide preset")
    ap.add_argument("--finetune-epochs", type=int, help="default: 1 for the guide side and the guide preset")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="cap steps per pretraining epoch (0 = full)")
    ap.add_argument("--finetune-steps", type=int, default=0, help="cap steps per fine-tuning epoch (0 = full)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra encoderflow override")
    ap.add_argument("--only", choices=["encoderflow", "guide"], help="run one side only")
    ap.add_argument(
        "--ablation",
        metavar="ROWS",
        help=f"encoderflow only, one run per row: 'all' or a comma list of {', '.join(ABLATIONS)}",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="ablation rows over data.seed 42, 43, ...; with --only guide, that many runs of the guide's code",
    )
    ap.add_argument("--results", type=Path, help="append finished ablation rows here (JSON lines); reuse them")
    ap.add_argument("--table", type=Path, metavar="FILE", help="print the ablation table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        if not args.table.is_file():
            ap.error(f"--table {args.table}: no such file; name a results file written by --results")
        rows = load_results(args.table)
        if not rows:
            ap.error(f"--table {args.table}: holds no rows; name a results file written by --results")
        print_table(rows)
        return 0
    if args.data_dir is None:
        ap.error("--data-dir is required (except with --table)")
    names = []
    if args.ablation:
        names = list(ABLATIONS) if args.ablation == "all" else args.ablation.split(",")
        if unknown := [n for n in names if n not in ABLATIONS]:
            ap.error(f"unknown ablation row(s) {unknown}: choose from {', '.join(ABLATIONS)} or all")
    if args.seeds < 1 or (args.seeds > 1 and not names and args.only != "guide"):
        ap.error("--seeds N (N >= 1) repeats --ablation rows or, with --only guide, the guide's code: add one of them")
    if args.results and not names and args.only != "guide":
        ap.error(
            f"--results {args.results}: keeps --ablation rows or --only guide runs, and this run is neither; "
            "add one of them or drop --results"
        )
    # 0 pretraining epochs is a row of its own (a random encoder, --only encoderflow); fine-tuning needs one.
    for name, least in (("pretrain_epochs", 0), ("finetune_epochs", 1)):
        if (value := getattr(args, name)) is not None and value < least:
            ap.error(f"--{name.replace('_', '-')} {value}: must be >= {least}")
    for name in ("pretrain_steps", "finetune_steps"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0 (0 = the whole epoch)")
    # Checked before any work (the encoderflow side's hours come first); a --results series may need no
    # new run of the guide's code, so there a missing script is said only once one is due.
    if not names and (args.only is None or (args.only == "guide" and not args.results)):
        try:
            guide_script()
        except GuideMissing as exc:
            ap.error(f"{exc}" + ("; or pass --only encoderflow" if args.only is None else ""))
    work = Path(tempfile.mkdtemp(prefix="encoderflow-quality-"))
    print(f"logs in {work}", flush=True)
    if names:
        return ablation(args, names, work)
    if args.only == "guide" and (args.seeds > 1 or args.results):
        return guide_runs(args, work)

    results = {}
    if args.only in (None, "encoderflow"):
        results["encoderflow"] = ours(args, work)
        print("encoderflow", json.dumps(results["encoderflow"]), flush=True)
    if args.only in (None, "guide"):
        results["guide (seed_guide.py)"] = guide(args, work)
        print("guide", json.dumps(results["guide (seed_guide.py)"]), flush=True)

    caps = (f", pretrain steps/epoch {args.pretrain_steps}" if args.pretrain_steps else "") + (
        f", fine-tune steps/epoch {args.finetune_steps}" if args.finetune_steps else ""
    )
    pre, ft = ours_epochs(args)
    print(
        f"\nquality benchmark: {args.preset} preset, pretrain {pre} epochs on wiki.test.raw "
        f"(validation wiki.valid.raw), fine-tune {ft} epoch(s) on SST-2 train{caps}; "
        f"{os.cpu_count()} cpus"
    )
    print(f"{'':<24} {'SST-2 dev':>9} {'MLM val':>8} {'BoW':>7} {'pretrain':>9} {'finetune':>9} {'wall':>9}")
    for name, r in results.items():
        print(
            f"{name:<24} {r['sst2']:>9.4f} {r['mlm']:>8.4f} {r['baseline']:>7.4f} {r['pretrain_s'] / 60:>8.1f}m "
            f"{r['finetune_s'] / 60:>8.1f}m {r['wall_s'] / 60:>8.1f}m"
        )
    if len(results) == 2:
        print("\n" + verdict(args.preset, results["encoderflow"], results["guide (seed_guide.py)"]))
    return 0


def verdict(preset: str, a: dict, b: dict) -> str:
    """The target's verdict for encoderflow (``a``) against the guide's code (``b``); none unless
    encoderflow ran the guide preset, as the guide's side always runs the guide's model."""
    points, wall = 100 * (a["sst2"] - b["sst2"]), a["wall_s"] / b["wall_s"]
    gap = f"SST-2 dev: {points:+.1f} points; wall time {wall:.2f}x the guide's"
    if preset != "guide":
        return (
            f"{gap}; NOT COMPARABLE: encoderflow ran the {preset} preset, the guide its own model: no verdict "
            "on the target (use --preset guide)"
        )
    met = a["sst2"] - b["sst2"] >= 0.03 and a["wall_s"] < b["wall_s"]
    return f"{gap}; target >= +3.0 points in less wall time: {'met' if met else 'NOT met'}"


def keep(args, rows: list[dict], row: dict) -> None:
    """A finished row: into the table, onto stdout and appended to ``--results`` at once."""
    rows.append(row)
    print(row["name"], json.dumps(row), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


def guide_runs(args, work: Path) -> int:
    """The guide's code ``--seeds`` times, each run a row in ``--results``, then mean ± std.

    ``seed_guide.py`` seeds nothing (the guide does not), so its runs differ by the random state
    Keras and TensorFlow draw at start: N runs are N seeds, not the same seeds as encoderflow's.
    Rows already in ``--results`` for the same epochs and step caps count towards N, so a stopped
    series resumes; the commit is not part of that key, as the guide's code is not this checkout's.
    """
    key = {
        "pretrain_epochs": epochs(args),
        "finetune_epochs": finetune_epochs(args),
        "pretrain_steps": args.pretrain_steps,
        "finetune_steps": args.finetune_steps,
    }
    rows = [
        r for r in load_results(args.results) if r.get("name") == "guide" and all(r.get(k) == v for k, v in key.items())
    ]
    rows = rows[: args.seeds]
    if rows:
        print(f"guide: reusing {len(rows)} run(s) in {args.results}", flush=True)
    while len(rows) < args.seeds:
        run_dir = work / f"guide-{len(rows)}"
        run_dir.mkdir(parents=True)
        r = guide(args, run_dir)
        row = {"row": f"guide (seed_guide.py), run {len(rows) + 1}", "name": "guide", "commit": commit(), **key, **r}
        keep(args, rows, row)
    print(
        f"\nthe guide's code: pretrain {key['pretrain_epochs']} epochs on wiki.test.raw, fine-tune "
        f"{key['finetune_epochs']} epoch(s) on SST-2 train; {os.cpu_count()} cpus"
    )
    print_table(rows)
    if len(rows) > 1:
        acc = [r["sst2"] for r in rows]
        print(
            f"\nover {len(rows)} runs: SST-2 dev {statistics.mean(acc):.4f} ± {statistics.stdev(acc):.4f}   "
            f"BoW {statistics.mean(r['baseline'] for r in rows):.4f}   "
            f"wall {statistics.mean(r['wall_s'] for r in rows) / 60:.1f} min"
        )
    return 0


def ablation(args, names: list[str], work: Path) -> int:
    head = commit()
    done = load_results(args.results)
    rows = []
    # Seed 42 is the config's default: its rows carry no data.seed override and are shared.
    seeds = [None] + [f"data.seed={42 + i}" for i in range(1, args.seeds)]
    for name in names:
        for seed in seeds:
            label, extra = ABLATIONS[name]
            label = label.format(preset=args.preset)
            extra = [*extra, *args.set, *([seed] if seed else [])]
            # A fine-tuning-only row (benchmarks/finetune.py, ``encoder_of``) may carry the same overrides
            # (data.seed=43 on one encoder) and is not an end-to-end run.
            same = [
                r
                for r in done
                if not r.get("encoder_of")
                and r.get("extra") == extra
                and r["commit"] == head
                and r.get("preset", "guide") == args.preset
                and r.get("finetune_epochs", 1) == finetune_epochs(args, args.preset)
            ]
            if same:
                print(f"{label} {seed or ''}: reusing the result in {args.results} (commit {head})", flush=True)
                rows.append(same[-1])
                continue
            r = ours(argparse.Namespace(**{**vars(args), "set": []}), work / f"{name}-{len(rows)}", extra)
            row = {
                "row": label,
                "name": name,
                "extra": extra,
                "commit": head,
                "preset": args.preset,
                "finetune_epochs": finetune_epochs(args, args.preset),
                **r,
            }
            keep(args, rows, row)
    pre, ft = ours_epochs(args)
    print(
        f"\nablation: {args.preset} preset, pretrain {pre} epochs on wiki.test.raw, fine-tune "
        f"{ft} epoch(s) on SST-2 train, commit {head}; {os.cpu_count()} cpus"
    )
    print_table(rows)
    if args.seeds > 1:
        print(f"\nover {args.seeds} seeds (data.seed 42..{41 + args.seeds}):")
        for name in names:
            acc = [r["sst2"] for r in rows if r["name"] == name]
            bow = statistics.mean(r["baseline"] for r in rows if r["name"] == name)
            mean, label = statistics.mean(acc), ABLATIONS[name][0].format(preset=args.preset)
            print(
                f"{label:<38} SST-2 dev {mean:.4f} ± {statistics.stdev(acc):.4f}   "
                f"BoW {bow:.4f}   gain {100 * (mean - bow):+.1f} points"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
