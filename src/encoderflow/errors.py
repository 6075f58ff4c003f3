"""Expected failures: bad input, bad config, diverged training, a stale comparison.

The DAG turns these into a failed task with the message alone (no traceback, no retry): a retry
cannot fix bad data. Anything else is a bug or an outage and keeps its traceback and retries.
"""


class EncoderflowError(RuntimeError):
    """Base of every expected, user-actionable failure; the message says what and how to fix."""
