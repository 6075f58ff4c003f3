"""The promotion decision: a pure function with TFX Evaluator semantics, and the noise around it.

Checks, all of which must pass for a blessing:
    metric        the candidate's accuracy is a finite number
    floor         candidate >= min_accuracy
    majority      candidate > the dev split's most common label's share (when given): a model no
                  better than always answering that label is never blessed, whatever the floor
    baseline      candidate - baseline >= min_gain_over_baseline (same run's bag-of-words model)
    champion      candidate - champion >= -max_regression, where the champion was re-evaluated on
                  this run's validation data; passes when there is no champion yet
    significance  only with ``gate.require_significant_gain``: the lower bound of the 95% paired
                  bootstrap interval of candidate - champion is strictly above -max_regression;
                  passes when there is no champion yet
    model         (when the registry was asked) the candidate is neither the champion's own model
                  (nothing to promote) nor the model of a version a person moved the champion off
                  (a rollback, a promote by hand): only a person brings that one back

A missing or NaN value on either side of a comparison fails that check: it is never blessed.
Comparisons allow 1e-6 for float rounding, so a value exactly on its threshold passes, except in
``significance``, where it must clear the threshold.

``significance`` asks of the whole interval what ``champion`` asks of the point estimate: the
candidate may be at most ``max_regression`` worse than the champion. Requiring the interval's lower
bound to lie above ``-max_regression`` (a non-inferiority test with that margin) makes it hold at
95% confidence, not just on this dev set's draw. With ``max_regression`` 0 (both presets) that is
a significant gain: the interval must exclude 0, and "clears" is strict because a candidate that
predicts exactly like the champion has the interval [0, 0], which is no gain at all.

With 872 SST-2 dev sentences one sentence is 0.11 points, so a raw comparison at threshold 0 promotes
noise; :func:`bootstrap` gives the intervals, computed on per-sentence correctness of every model
on the same dev file, and :func:`decide` records them with the decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from encoderflow.config import GateConfig

CONFIDENCE = 0.95

# The decision's name for each accuracy it compares, and that accuracy's one name everywhere else:
# XCom, summary.json, MLflow metrics and, as gate.<name> (:func:`metric_tag`), version tags.
METRICS = {"candidate": "val_accuracy", "baseline": "baseline_val_accuracy", "champion": "champion_val_accuracy"}


def metric_tag(metric: str) -> str:
    """The model-version tag holding a metric the gate measured: ``gate.val_accuracy``."""
    return f"gate.{metric}"


@dataclass(frozen=True)
class Interval:
    """A point estimate on the dev set and its bootstrap interval."""

    estimate: float
    low: float
    high: float

    def text(self, signed: bool = False) -> str:
        """``0.8108 [0.7844, 0.8372]``; signed (``+0.0058 [-0.0103, +0.0218]``) for a difference."""
        f = "+.4f" if signed else ".4f"
        return f"{self.estimate:{f}} [{self.low:{f}}, {self.high:{f}}]"


@dataclass(frozen=True)
class Intervals:
    """Paired bootstrap intervals of the gate's accuracies, all from the same resamples of one dev set.

    Attributes:
        examples: dev sentences every model was scored on (the same ones, in the same order).
        resamples: bootstrap resamples (``gate.bootstrap_resamples``).
        seed: the resampling seed (``data.seed``).
        confidence: the intervals' coverage, 0.95.
        candidate: this run's classifier.
        champion: the current champion re-evaluated on this run's dev data; None without a champion.
        baseline: this run's bag-of-words baseline; None when its per-sentence predictions are not
            recorded (a baseline result written before they were).
        candidate_minus_champion: the paired difference; None without a champion.
    """

    examples: int
    resamples: int
    seed: int
    confidence: float
    candidate: Interval
    champion: Interval | None = None
    baseline: Interval | None = None
    candidate_minus_champion: Interval | None = None

    def line(self) -> str:
        """One readable line for a task log."""
        parts = [f"candidate {self.candidate.text()}"]
        if self.champion is not None and self.candidate_minus_champion is not None:
            parts += [
                f"champion {self.champion.text()}",
                f"candidate - champion {self.candidate_minus_champion.text(signed=True)}",
            ]
        else:
            parts.append("no champion")
        parts.append(f"baseline {self.baseline.text()}" if self.baseline else "baseline: no per-sentence predictions")
        return (
            f"gate intervals ({self.confidence:.0%} paired bootstrap over {self.examples} dev sentences, "
            f"{self.resamples} resamples, seed {self.seed}): " + "; ".join(parts)
        )


def correctness_text(correct: Sequence[Any]) -> str:
    """Per-sentence correctness as ``"0110..."``, for a result JSON (a list would be a line per sentence)."""
    return "".join("1" if c else "0" for c in correct)


def correctness_from_text(text: str):
    """The bool array :func:`correctness_text` wrote.

    Raises:
        ValueError: a character other than 0 or 1.
    """
    import numpy as np

    if set(text) - {"0", "1"}:
        raise ValueError(f"per-sentence correctness must be a string of 0 and 1, got {text[:40]!r}...")
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def _correctness(name: str, values: Sequence[Any] | None, n: int | None):
    import numpy as np

    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"bootstrap: {name} needs one 0/1 value per dev sentence, got shape {array.shape}")
    if n is not None and array.size != n:
        raise ValueError(
            f"bootstrap: {name} has {array.size} per-sentence values, the candidate {n}: "
            "both must be scored on the same dev file"
        )
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"bootstrap: {name} must be per-sentence correctness (0/1 or bool)")
    return array.astype(bool)


def bootstrap(
    candidate: Sequence[Any],
    champion: Sequence[Any] | None = None,
    baseline: Sequence[Any] | None = None,
    *,
    resamples: int,
    seed: int,
) -> Intervals:
    """95% paired percentile-bootstrap intervals of each accuracy and of candidate - champion.

    Each resample draws the dev sentences with replacement and scores every model on the same
    draw, so the difference keeps the pairing: sentences both models get right (or both wrong) do
    not widen its interval, only those they disagree on do.

    Drawing n sentence indices and counting outcomes is, in distribution, drawing multinomial
    counts over the distinct outcome patterns (which models got a sentence right: at most 8 with
    three models). So a resample is one multinomial draw of at most 8 counts instead of n indices:
    2000 resamples take about a millisecond, with no resamples x n array.

    The interval ends are resampled values (numpy quantile methods ``lower`` and ``higher``), never
    interpolated between two: never narrower than the percentiles, and identical predictions get
    exactly [0, 0].

    Args:
        candidate: per dev sentence, whether the candidate classified it correctly (bool or 0/1).
        champion: the same for the champion on the same sentences, in the same order; None if none.
        baseline: the same for the bag-of-words baseline; None when not available.
        resamples: how many bootstrap resamples.
        seed: seeds ``numpy.random.default_rng``: the same seed and inputs give the same intervals.

    Returns:
        The intervals, each with its point estimate (the plain accuracy on the dev set).

    Raises:
        ValueError: empty input, lengths that differ, or values other than 0/1.
    """
    import numpy as np

    if resamples < 1:
        raise ValueError(f"bootstrap: resamples must be >= 1, got {resamples}")
    columns = {"candidate": _correctness("candidate", candidate, None)}
    n = columns["candidate"].size
    for name, values in (("champion", champion), ("baseline", baseline)):
        if values is not None:
            columns[name] = _correctness(name, values, n)
    names = list(columns)
    correct = np.stack([columns[k] for k in names], axis=1)  # n x models
    codes = correct.astype(np.int64) @ (1 << np.arange(len(names)))
    patterns, counts = np.unique(codes, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=resamples)  # resamples x patterns
    right = (patterns[:, None] >> np.arange(len(names))) & 1  # patterns x models
    accuracy = draws @ right / n  # resamples x models

    tail = (1 - CONFIDENCE) / 2

    def interval(estimate: float, samples) -> Interval:
        low = np.quantile(samples, tail, method="lower")
        high = np.quantile(samples, 1 - tail, method="higher")
        return Interval(float(estimate), float(low), float(high))

    col = {k: i for i, k in enumerate(names)}
    estimates = correct.mean(axis=0)
    each = {k: interval(estimates[i], accuracy[:, i]) for k, i in col.items()}
    difference = None
    if "champion" in col:
        difference = interval(
            estimates[col["candidate"]] - estimates[col["champion"]],
            accuracy[:, col["candidate"]] - accuracy[:, col["champion"]],
        )
    return Intervals(
        examples=int(n),
        resamples=int(resamples),
        seed=int(seed),
        confidence=CONFIDENCE,
        candidate=each["candidate"],
        champion=each.get("champion"),
        baseline=each.get("baseline"),
        candidate_minus_champion=difference,
    )


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str


@dataclass(frozen=True)
class Decision:
    blessed: bool
    checks: tuple[Check, ...]
    candidate: float | None
    baseline: float | None
    champion: float | None
    champion_version: str | None = None
    intervals: Intervals | None = None

    @property
    def reasons(self) -> list[str]:
        """Why it was not blessed (empty when blessed)."""
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checks"] = [asdict(c) for c in self.checks]
        out["reasons"] = self.reasons
        return out

    def table(self) -> str:
        rows = [("check", "result", "value", "threshold", "detail")]
        for c in self.checks:
            rows.append((c.name, "pass" if c.passed else "FAIL", _fmt(c.value), _fmt(c.threshold), c.detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
        if self.intervals is not None:
            lines.append(self.intervals.line())
        verdict = "BLESSED" if self.blessed else "NOT BLESSED"
        return f"gate decision: {verdict}\n" + "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


# Accuracies arrive as float32 (Keras metrics) and their differences carry rounding
# (0.85 - 0.86 = -0.010000000000000009), which would fail a candidate sitting exactly on a
# threshold. 1e-6 covers both and is far below one example's worth (1/872 on SST-2).
_EPS = 1e-6


def _at_least(value: float, threshold: float) -> bool:
    return value >= threshold - _EPS


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def decide(
    candidate: float | None,
    baseline: float | None,
    champion: float | None,
    gate: GateConfig,
    champion_version: str | None = None,
    intervals: Intervals | None = None,
    majority: float | None = None,
    model: Check | None = None,
) -> Decision:
    """Bless or not, with every check and its numbers.

    Args:
        candidate: this run's classifier's ``val_accuracy`` (the labeled data's dev split).
        baseline: this run's bag-of-words baseline on the same data.
        champion: the current champion re-evaluated on the same data; None if there is none.
        gate: the thresholds; ``require_significant_gain`` adds the ``significance`` check.
        champion_version: the registry version the champion number belongs to (for the record).
        intervals: :func:`bootstrap` on the same dev data, recorded with the decision; the
            ``significance`` check reads its ``candidate_minus_champion`` (and fails without it
            when there is a champion).
        majority: the dev split's share of its most common label, what always answering that
            label scores; adds the ``majority`` check, which the candidate must beat (strictly).
        model: :func:`model_check` of the candidate against the registry, added as it is.
    """
    checks: list[Check] = []
    ok = _finite(candidate)
    checks.append(
        Check(
            "metric",
            ok,
            candidate if ok else None,
            None,
            "candidate accuracy present" if ok else f"candidate accuracy is {candidate!r}",
        )
    )
    if ok:
        passed = _at_least(candidate, gate.min_accuracy)
        checks.append(
            Check(
                "floor",
                passed,
                candidate,
                gate.min_accuracy,
                f"{candidate:.4f} {'>=' if passed else '<'} floor {gate.min_accuracy:.4f}",
            )
        )
    else:
        checks.append(Check("floor", False, None, gate.min_accuracy, "no candidate accuracy"))

    if ok and _finite(baseline):
        gain = candidate - baseline
        passed = _at_least(gain, gate.min_gain_over_baseline)
        checks.append(
            Check(
                "baseline",
                passed,
                gain,
                gate.min_gain_over_baseline,
                f"gain over baseline {baseline:.4f} is {gain:+.4f}, needs >= {gate.min_gain_over_baseline:+.4f}",
            )
        )
    else:
        checks.append(
            Check(
                "baseline",
                False,
                None,
                gate.min_gain_over_baseline,
                f"cannot compare: candidate {candidate!r}, baseline {baseline!r}",
            )
        )

    allowed = 0.0 - gate.max_regression  # not -max_regression: -0.0 would print as -0.0000
    if champion is None:
        checks.append(Check("champion", True, None, allowed, "no champion yet"))
    elif ok and _finite(champion):
        delta = candidate - champion
        passed = _at_least(delta, allowed)
        checks.append(
            Check(
                "champion",
                passed,
                delta,
                allowed,
                f"vs champion v{champion_version} at {champion:.4f} on this run's data: {delta:+.4f}, "
                f"needs >= {allowed:+.4f}",
            )
        )
    else:
        checks.append(
            Check(
                "champion",
                False,
                None,
                allowed,
                f"cannot compare: candidate {candidate!r}, champion {champion!r}",
            )
        )
    if majority is not None:
        beats = ok and candidate > majority + _EPS
        checks.append(
            Check(
                "majority",
                beats,
                candidate if ok else None,
                majority,
                f"{candidate:.4f} {'>' if beats else '<='} {majority:.4f}, what always answering the dev "
                "split's most common label scores"
                if ok
                else "no candidate accuracy",
            )
        )
    if gate.require_significant_gain:
        checks.append(_significance(champion, champion_version, intervals, gate))
    if model is not None:
        checks.append(model)
    return Decision(
        all(c.passed for c in checks), tuple(checks), candidate, baseline, champion, champion_version, intervals
    )


def model_check(versions: Sequence[dict[str, Any]], champion_version: str | None) -> Check:
    """The ``model`` check: may the gate make this model champion, given the registered versions
    that hold it already (``registry.versions_of_model``: each ``version`` and the person's
    ``demoted`` move off it, or None)?

    A candidate reused from an earlier run (its inputs changed only in what it does not depend on) is
    that earlier model: blessing it again would make the champion a copy of itself, or undo a
    person's rollback on the next scheduled run.
    """
    same = [str(v["version"]) for v in versions]
    if champion_version is not None and str(champion_version) in same:
        return Check(
            "model", False, None, None, f"the champion v{champion_version}'s own model: nothing new to promote"
        )
    for v in reversed(versions):
        if (move := v.get("demoted")) is not None:
            return Check(
                "model",
                False,
                None,
                None,
                f"the model of v{v['version']}, which {move['who']} moved the champion off "
                f"({move['action']} to v{move['to']}, {str(move['at'])[:10]}: {move['reason']!r}); "
                f"only a person brings it back: encoderflow promote --version {v['version']}",
            )
    if same:
        return Check("model", True, None, None, f"the model of v{', v'.join(same)}, which no one demoted")
    return Check("model", True, None, None, "a model not registered before")


def _significance(
    champion: float | None, champion_version: str | None, intervals: Intervals | None, gate: GateConfig
) -> Check:
    """The champion check asked of the interval's lower bound, strictly (module docstring)."""
    threshold = 0.0 - gate.max_regression  # not -max_regression: -0.0 would print as -0.0000
    if champion is None:
        return Check("significance", True, None, threshold, "no champion yet: nothing to compare")
    diff = intervals.candidate_minus_champion if intervals is not None else None
    if diff is None:
        return Check(
            "significance",
            False,
            None,
            threshold,
            "cannot compare: no paired dev predictions of candidate and champion",
        )
    # Strict, and a bound within rounding of the threshold does not clear it: identical
    # predictions give exactly [0, 0], which is no gain.
    passed = diff.low > threshold + _EPS
    return Check(
        "significance",
        passed,
        diff.low,
        threshold,
        f"vs champion v{champion_version}: candidate - champion {diff.text(signed=True)} "
        f"({intervals.confidence:.0%} interval over {intervals.examples} sentences), lower bound "
        + (f"{diff.low:+.4f} > {threshold:+.4f}" if passed else f"{diff.low:+.4f} does not clear {threshold:+.4f}"),
    )
