"""The promotion gate: every check, its boundaries, and missing or NaN numbers."""

from __future__ import annotations

import math

import pytest

from encoderflow.config import GateConfig
from encoderflow.gate import decide

NAN = float("nan")
G = GateConfig(min_accuracy=0.80, min_gain_over_baseline=0.02, max_regression=0.01)
STRICT = GateConfig(min_accuracy=0.80, min_gain_over_baseline=0.0, max_regression=0.0)
CHECKS = ["metric", "floor", "baseline", "champion"]


# (id, candidate, baseline, champion, gate, blessed, failing checks)
CASES = [
    ("first-run-passes-floor", 0.85, 0.80, None, G, True, []),
    ("first-run-below-floor", 0.79, 0.70, None, G, False, ["floor"]),
    ("first-run-exactly-on-floor", 0.80, 0.70, None, G, True, []),
    ("first-run-just-below-floor", 0.7999, 0.70, None, G, False, ["floor"]),
    # A Keras metric is float32: 70% of examples arrives as 0.699999988079071.
    ("float32-accuracy-on-floor", 0.699999988079071, 0.5, None, GateConfig(min_accuracy=0.7), True, []),
    ("beats-baseline", 0.85, 0.82, None, G, True, []),
    ("misses-baseline-gain", 0.85, 0.84, None, G, False, ["baseline"]),
    ("below-baseline", 0.85, 0.90, None, G, False, ["baseline"]),
    ("negative-gain-tolerated", 0.85, 0.86, None, GateConfig(min_gain_over_baseline=-0.05), True, []),
    ("improves-on-champion", 0.86, 0.80, 0.84, G, True, []),
    ("regression-within-tolerance", 0.855, 0.80, 0.86, G, True, []),
    ("regression-beyond-tolerance", 0.84, 0.80, 0.86, G, False, ["champion"]),
    # On the boundary in exact arithmetic; float subtraction gives -0.010000000000000009.
    ("regression-exactly-at-tolerance", 85 / 100, 0.80, 86 / 100, G, True, []),
    # 57/100 - 55/100 = 0.019999999999999907 in floats: still exactly the required gain.
    (
        "gain-exactly-at-threshold",
        0.57,
        0.55,
        None,
        GateConfig(min_accuracy=0.5, min_gain_over_baseline=0.02),
        True,
        [],
    ),
    # TFX semantics, change >= -max_regression: a tie with no tolerance still promotes.
    ("tie-with-champion-no-tolerance", 0.85, 0.80, 0.85, STRICT, True, []),
    ("tiny-regression-no-tolerance", 0.85, 0.80, 0.851, STRICT, False, ["champion"]),
    ("everything-fails", 0.70, 0.75, 0.90, G, False, ["floor", "baseline", "champion"]),
    ("nan-candidate", NAN, 0.80, None, G, False, ["metric", "floor", "baseline"]),
    ("nan-candidate-with-champion", NAN, 0.80, 0.85, G, False, ["metric", "floor", "baseline", "champion"]),
    ("none-candidate", None, 0.80, None, G, False, ["metric", "floor", "baseline"]),
    ("inf-candidate", math.inf, 0.80, None, G, False, ["metric", "floor", "baseline"]),
    ("nan-baseline", 0.90, NAN, None, G, False, ["baseline"]),
    ("none-baseline", 0.90, None, None, G, False, ["baseline"]),
    ("nan-champion", 0.90, 0.80, NAN, G, False, ["champion"]),
    ("bool-candidate", True, 0.80, None, G, False, ["metric", "floor", "baseline"]),
]


@pytest.mark.parametrize(
    "candidate, baseline, champion, gate, blessed, failing", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decide(candidate, baseline, champion, gate, blessed, failing):
    d = decide(candidate, baseline, champion, gate, champion_version="3")
    assert d.blessed is blessed
    assert [c.name for c in d.checks] == CHECKS
    assert [c.name for c in d.checks if not c.passed] == failing
    # Reasons name exactly the failing checks, in order, each with its detail.
    assert [r.split(":")[0] for r in d.reasons] == failing
    assert all(r.split(": ", 1)[1] for r in d.reasons)
    assert d.to_dict()["reasons"] == d.reasons
    assert d.to_dict()["blessed"] is blessed
    table = d.table()
    assert table.splitlines()[0] == f"gate decision: {'BLESSED' if blessed else 'NOT BLESSED'}"
    for name in CHECKS:
        row = next(line for line in table.splitlines() if line.startswith(name + " "))
        assert ("FAIL" if name in failing else "pass") in row


def test_check_values_and_thresholds_are_recorded():
    d = decide(0.85, 0.80, 0.86, G, champion_version="7")
    by = {c.name: c for c in d.checks}
    assert by["floor"].value == 0.85 and by["floor"].threshold == 0.80
    assert by["baseline"].value == pytest.approx(0.05) and by["baseline"].threshold == 0.02
    assert by["champion"].value == pytest.approx(-0.01) and by["champion"].threshold == -0.01
    assert "v7" in by["champion"].detail
    assert (d.candidate, d.baseline, d.champion, d.champion_version) == (0.85, 0.80, 0.86, "7")
    row = next(line for line in d.table().splitlines() if line.startswith("baseline"))
    assert "0.0500" in row and "0.0200" in row


def test_first_run_champion_check_passes_with_no_value():
    champion = decide(0.85, 0.80, None, G).checks[3]
    assert champion.passed and champion.value is None and champion.detail == "no champion yet"
    assert " - " in next(
        line for line in decide(0.85, 0.80, None, G).table().splitlines() if line.startswith("champion")
    )


def test_missing_candidate_reason_says_what_it_was():
    d = decide(None, 0.80, None, G)
    assert d.reasons[0] == "metric: candidate accuracy is None"
    assert "nan" in decide(NAN, 0.80, None, G).reasons[0]
