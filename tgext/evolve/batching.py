"""Running a :class:`~.evolution.BatchEvolution`: short batches, each committed with its checkpoint.

Backend-agnostic, like the runner beside it: the backend opens each batch's transaction, runs
the batch's work inside it and commits it together with the checkpoint and the fencing check
(:meth:`~.backends.base.Backend.run_batch`); this module decides what each batch does, how big
it is, and what happens when one fails.
"""
import json
import time
from typing import NamedTuple, Optional

#: Batches never grow past this many items unless the class says otherwise: a batch's objects
#: live in the session until it commits.
DEFAULT_MAX_BATCH_SIZE = 10_000
#: A failing batch is retried this many times, at half its size each time, before the
#: evolution is recorded failed (its checkpoint kept).
BATCH_RETRIES = 3


class BatchSizer:
    """Adapts the batch size so that one batch takes about ``target`` seconds.

    The time per item is smoothed over batches so that one noisy batch does not swing the size;
    a slowdown is followed at once (short transactions come first) while growth is bounded per
    batch (x1.5, as GitLab's batch optimizer bounds its steps), so a size that overshoots when
    rows get costlier costs at most one long batch.
    """

    GROWTH = 1.5
    SMOOTHING = 0.3  # weight of the newest batch in the smoothed time per item

    def __init__(self, size, target, ceiling=DEFAULT_MAX_BATCH_SIZE, floor=1):
        self.target = target
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.size = self._bounded(size)
        self.per_item = None

    def _bounded(self, size):
        return int(min(self.ceiling, max(self.floor, size)))

    def observe(self, items, seconds):
        """A batch of ``items`` items took ``seconds``: choose the next size."""
        if items <= 0:
            return self.size
        latest = max(seconds, 1e-9) / items
        if self.per_item is None:
            self.per_item = latest
        else:
            smoothed = self.SMOOTHING * latest + (1 - self.SMOOTHING) * self.per_item
            self.per_item = max(smoothed, latest) if latest > self.per_item else smoothed
        ideal = self.target / self.per_item
        self.size = self._bounded(min(ideal, self.size * self.GROWTH))
        return self.size

    def halve(self):
        """A batch failed: the next attempt takes half as many items."""
        self.size = max(self.floor, self.size // 2)
        return self.size


class RateMeter:
    """Items per second over wall time (throttle sleeps included), smoothed: for the ETA."""

    SMOOTHING = 0.3

    def __init__(self, rate=None):
        self.rate = rate
        self._since = None

    def start(self):
        self._since = time.monotonic()

    def observe(self, items):
        now = time.monotonic()
        if self._since is not None and now > self._since:
            latest = items / (now - self._since)
            self.rate = latest if self.rate is None else (
                self.SMOOTHING * latest + (1 - self.SMOOTHING) * self.rate)
        self._since = now
        return self.rate


def eta_seconds(done, total, rate):
    """Seconds left at ``rate`` items/s, or None when the total or the rate is unknown."""
    if total is None or not rate or rate <= 0:
        return None
    return max(0.0, (total - done) / rate)


class BatchOutcome(NamedTuple):
    """What one batch did, as the backend commits it with the checkpoint."""
    items: int  # items processed in this batch
    cursor: Optional[str]  # the checkpoint after it, JSON text (None: at the start)
    exhausted: bool  # nothing after it: the evolution is applied with this batch
    next_size: int  # the size the next batch takes
    rate: Optional[float]  # items/s for the ETA


def dump_cursor(value):
    """A cursor as stored (JSON text); None stays None (the start)."""
    return None if value is None else json.dumps(value, allow_nan=False, separators=(',', ':'))


def load_cursor(text):
    return None if text is None else json.loads(text)
