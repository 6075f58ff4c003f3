"""The promotion gate: every check, its boundaries, missing or NaN numbers, and the bootstrap intervals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from encoderflow.config import GateConfig
from encoderflow.gate import (
    Interval,
    Intervals,
    bootstrap,
    correctness_from_text,
    correctness_text,
    decide,
    model_check,
)

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


def test_a_model_no_better_than_the_majority_label_is_never_blessed():
    """The smoke floor is 0.5; a diverged classifier answering one label scored 444/872 on SST-2 dev."""
    smoke_floor = GateConfig(min_accuracy=0.5, min_gain_over_baseline=-1.0)
    constant = decide(444 / 872, 0.75, None, smoke_floor, majority=444 / 872)
    by = {c.name: c for c in constant.checks}
    assert by["floor"].passed and not by["majority"].passed and not constant.blessed
    assert by["majority"].threshold == pytest.approx(0.5092, abs=1e-4)
    assert any("most common label" in r for r in constant.reasons)
    assert decide(445 / 872, 0.75, None, smoke_floor, majority=444 / 872).blessed  # one sentence better
    # Without the dev split's label counts the check is absent, not passed on nothing.
    assert "majority" not in {c.name for c in decide(0.85, 0.80, None, G).checks}


def test_a_zero_margin_prints_as_zero_not_minus_zero():
    d = decide(0.80, 0.75, 0.79, GateConfig(min_accuracy=0.5, max_regression=0.0), champion_version="3")
    champion = next(line for line in d.table().splitlines() if line.startswith("champion"))
    assert "needs >= +0.0000" in champion and "-0.0000" not in d.table()


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


# --- the bootstrap intervals and the significance check ---------------------------------------------------------------

N = 872  # SST-2 dev sentences: one sentence is 0.11 points
SIGNIFICANT = GateConfig(min_accuracy=0.5, max_regression=0.0, require_significant_gain=True)


def paired(right_both: int, gains: int, losses: int, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Per-sentence correctness of a candidate and a champion: both right on ``right_both`` sentences,
    only the candidate on ``gains``, only the champion on ``losses``, both wrong on the rest (shuffled)."""
    both_wrong = n - right_both - gains - losses
    pairs = [(1, 1)] * right_both + [(1, 0)] * gains + [(0, 1)] * losses + [(0, 0)] * both_wrong
    order = np.random.default_rng(7).permutation(n)
    table = np.array(pairs, dtype=bool)[order]
    return table[:, 0], table[:, 1]


def _gate(candidate, champion, gate=SIGNIFICANT, seed=42, resamples=2000):
    intervals = bootstrap(candidate, champion, resamples=resamples, seed=seed)
    decision = decide(
        float(np.mean(candidate)), 0.5, float(np.mean(champion)), gate, champion_version="3", intervals=intervals
    )
    return intervals, decision


def test_identical_models_give_a_zero_interval_and_no_significant_gain():
    champion = paired(700, 0, 0)[1]
    intervals, decision = _gate(champion.copy(), champion)
    diff = intervals.candidate_minus_champion
    # Every resample scores both models on the same sentences: their difference is 0 every time.
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0)
    # Each accuracy alone still has the dev set's sampling noise: about +-2.7 points at 80% on 872.
    assert intervals.candidate == intervals.champion
    assert intervals.candidate.low < 700 / N < intervals.candidate.high
    assert 0.04 < intervals.candidate.high - intervals.candidate.low < 0.07
    # The point-estimate champion check passes a tie (TFX semantics); the significance check does not.
    assert decision.blessed is False
    assert [c.name for c in decision.checks] == [*CHECKS, "significance"]
    assert [c.name for c in decision.checks if not c.passed] == ["significance"]
    assert "does not clear +0.0000" in decision.reasons[0]
    # Off (the default), the same numbers are blessed and the check is not there.
    off = decide(0.8, 0.5, 0.8, GateConfig(min_accuracy=0.5), champion_version="3", intervals=intervals)
    assert off.blessed and [c.name for c in off.checks] == CHECKS


def test_thirty_more_right_sentences_are_a_significant_gain():
    candidate, champion = paired(690, 30, 0)
    intervals, decision = _gate(candidate, champion)
    diff = intervals.candidate_minus_champion
    assert diff.estimate == pytest.approx(30 / N)
    assert 0 < diff.low < 30 / N < diff.high
    check = decision.checks[-1]
    assert decision.blessed and check.name == "significance" and check.passed
    assert check.value == diff.low and check.threshold == 0.0
    # Still significant when the candidate also loses sentences the champion had (net +30 of 90 disagreements).
    candidate, champion = paired(660, 60, 30)
    intervals, decision = _gate(candidate, champion)
    assert intervals.candidate_minus_champion.estimate == pytest.approx(30 / N)
    assert intervals.candidate_minus_champion.low > 0 and decision.blessed


def test_the_same_raw_gain_is_noise_when_the_models_disagree_a_lot():
    # +30 again, but out of 370 sentences they disagree on: the raw gate would promote it.
    candidate, champion = paired(500, 200, 170)
    intervals, decision = _gate(candidate, champion)
    diff = intervals.candidate_minus_champion
    assert diff.estimate == pytest.approx(30 / N)
    assert diff.low < 0 < diff.high
    assert not decision.blessed and [c.name for c in decision.checks if not c.passed] == ["significance"]


def test_significance_threshold_is_minus_max_regression_and_must_be_cleared():
    gate = GateConfig(min_accuracy=0.5, max_regression=0.01, require_significant_gain=True)

    def with_low(low: float):
        accuracy = Interval(0.8, 0.77, 0.83)
        intervals = Intervals(
            examples=N,
            resamples=2000,
            seed=42,
            confidence=0.95,
            candidate=accuracy,
            champion=accuracy,
            candidate_minus_champion=Interval(0.0, low, 0.02),
        )
        return decide(0.8, 0.5, 0.8, gate, champion_version="3", intervals=intervals).checks[-1]

    # The interval may reach below 0 by less than max_regression: "at most 1 point worse", at 95%.
    assert with_low(-0.0099).passed and with_low(-0.0099).threshold == -0.01
    # On the threshold (here with float rounding) is not clearing it.
    assert not with_low(-0.01).passed and not with_low(85 / 100 - 86 / 100).passed
    assert not with_low(-0.02).passed
    # A candidate 30 sentences worse is not within 1 point at 95%, nor on the point estimate.
    candidate, champion = paired(660, 0, 30)
    _, decision = _gate(candidate, champion, gate)
    assert [c.name for c in decision.checks if not c.passed] == ["champion", "significance"]


def test_significance_without_a_champion_or_without_intervals():
    first = decide(0.85, 0.5, None, SIGNIFICANT, intervals=bootstrap(paired(700, 0, 0)[0], resamples=200, seed=1))
    assert first.blessed and first.checks[-1].detail == "no champion yet: nothing to compare"
    assert first.intervals.champion is None and first.intervals.candidate_minus_champion is None
    blind = decide(0.85, 0.5, 0.80, SIGNIFICANT, champion_version="3")
    assert not blind.blessed
    assert blind.reasons == ["significance: cannot compare: no paired dev predictions of candidate and champion"]


def test_intervals_are_deterministic_for_a_seed():
    candidate, champion = paired(660, 60, 30)
    baseline = paired(640, 40, 40)[1]
    first = bootstrap(candidate, champion, baseline, resamples=2000, seed=42)
    assert bootstrap(candidate, champion, baseline, resamples=2000, seed=42) == first
    others = [bootstrap(candidate, champion, baseline, resamples=2000, seed=s) for s in range(5)]
    assert any(o != first for o in others)  # another seed, other resamples
    for other in others:  # ... but only Monte Carlo noise apart
        for a, b in (
            (other.candidate, first.candidate),
            (other.candidate_minus_champion, first.candidate_minus_champion),
        ):
            assert a.estimate == b.estimate
            assert abs(a.low - b.low) < 0.006 and abs(a.high - b.high) < 0.006
    assert first.baseline.estimate == pytest.approx(680 / N) and first.seed == 42 and first.resamples == 2000


def test_bootstrap_matches_resampling_sentence_indices():
    # The multinomial-over-outcome-patterns shortcut against the textbook index resampling.
    candidate, champion = paired(660, 60, 30)
    idx = np.random.default_rng(0).integers(0, N, size=(20_000, N))
    textbook = {
        "candidate": candidate[idx].mean(axis=1),
        "candidate_minus_champion": candidate[idx].mean(axis=1) - champion[idx].mean(axis=1),
    }
    fast = bootstrap(candidate, champion, resamples=20_000, seed=1)
    for name, samples in textbook.items():
        low, high = np.quantile(samples, [0.025, 0.975])
        got = getattr(fast, name)
        assert got.low == pytest.approx(low, abs=0.003) and got.high == pytest.approx(high, abs=0.003), name


def test_bootstrap_refuses_unpaired_or_non_binary_input():
    with pytest.raises(ValueError, match="champion has 871 per-sentence values, the candidate 872"):
        bootstrap(np.ones(N), np.ones(N - 1), resamples=200, seed=0)
    with pytest.raises(ValueError, match="baseline must be per-sentence correctness"):
        bootstrap(np.ones(N), None, np.full(N, 0.5), resamples=200, seed=0)
    with pytest.raises(ValueError, match="candidate needs one 0/1 value per dev sentence"):
        bootstrap([], resamples=200, seed=0)


def test_intervals_reach_gate_json_and_the_table():
    candidate, champion = paired(660, 60, 30)
    _, decision = _gate(candidate, champion)
    recorded = json.loads(json.dumps(decision.to_dict()))  # what gate.json holds
    diff = recorded["intervals"]["candidate_minus_champion"]
    assert set(diff) == {"estimate", "low", "high"} and diff["low"] < diff["estimate"] < diff["high"]
    assert recorded["intervals"]["examples"] == N and recorded["intervals"]["confidence"] == 0.95
    assert recorded["intervals"]["baseline"] is None
    line = decision.table().splitlines()[-1]
    assert line.startswith("gate intervals (95% paired bootstrap over 872 dev sentences, 2000 resamples, seed 42): ")
    assert f"candidate - champion {decision.intervals.candidate_minus_champion.text(signed=True)}" in line
    assert line.endswith("baseline: no per-sentence predictions")


def test_correctness_text_round_trips():
    correct = paired(660, 60, 30)[0]
    text = correctness_text(correct)
    assert len(text) == N and set(text) == {"0", "1"}
    np.testing.assert_array_equal(correctness_from_text(text), correct)
    with pytest.raises(ValueError, match="string of 0 and 1"):
        correctness_from_text("01x")


def test_the_model_check_refuses_the_champions_own_model_and_a_demoted_one():
    rollback = {"at": "2026-12-06T16:00:00+00:00", "action": "rollback", "who": "alice", "reason": "bad", "to": "1"}
    new = model_check([], "3")
    assert new.passed and new.detail == "a model not registered before"
    own = model_check([{"version": "3", "demoted": None}], "3")
    assert not own.passed and own.detail == "the champion v3's own model: nothing new to promote"
    demoted = model_check([{"version": "2", "demoted": rollback}], "1")
    assert not demoted.passed
    assert demoted.detail == (
        "the model of v2, which alice moved the champion off (rollback to v1, 2026-12-06: 'bad'); "
        "only a person brings it back: encoderflow promote --version 2"
    )
    again = model_check([{"version": "2", "demoted": None}, {"version": "4", "demoted": None}], "5")
    assert again.passed and again.detail == "the model of v2, v4, which no one demoted"
    # Added to the decision as given: one failing check is enough to refuse a blessing.
    decision = decide(0.9, 0.8, 0.85, GateConfig(), champion_version="1", model=demoted)
    assert not decision.blessed and decision.reasons == [f"model: {demoted.detail}"]
    assert decide(0.9, 0.8, 0.85, GateConfig(), champion_version="1", model=new).blessed
