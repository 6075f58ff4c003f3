"""The promotion decision: a pure function with TFX Evaluator semantics.

Checks, all of which must pass for a blessing:
    metric    the candidate's accuracy is a finite number
    floor     candidate >= min_accuracy
    baseline  candidate - baseline >= min_gain_over_baseline (same run's bag-of-words model)
    champion  candidate - champion >= -max_regression, where the champion was re-evaluated on
              this run's validation data; passes when there is no champion yet

A missing or NaN value on either side of a comparison fails that check: it is never blessed.
Comparisons allow 1e-6 for float rounding, so a value exactly on its threshold passes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from encoderflow.config import GateConfig


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
) -> Decision:
    """Bless or not, with every check and its numbers.

    Args:
        candidate: this run's classifier, SST-2 validation accuracy.
        baseline: this run's bag-of-words baseline on the same data.
        champion: the current champion re-evaluated on the same data; None if there is none.
        champion_version: the registry version the champion number belongs to (for the record).
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

    if champion is None:
        checks.append(Check("champion", True, None, -gate.max_regression, "no champion yet"))
    elif ok and _finite(champion):
        delta = candidate - champion
        passed = _at_least(delta, -gate.max_regression)
        checks.append(
            Check(
                "champion",
                passed,
                delta,
                -gate.max_regression,
                f"vs champion v{champion_version} at {champion:.4f} on this run's data: {delta:+.4f}, "
                f"needs >= {-gate.max_regression:+.4f}",
            )
        )
    else:
        checks.append(
            Check(
                "champion",
                False,
                None,
                -gate.max_regression,
                f"cannot compare: candidate {candidate!r}, champion {champion!r}",
            )
        )
    return Decision(all(c.passed for c in checks), tuple(checks), candidate, baseline, champion, champion_version)
