"""Every error of tgext.evolve that a user can catch: all exported by ``tgext.evolve``.

A caller's mistake that no user input can cause (a backend asked to record a state that is not
a done state) stays a plain ``ValueError``.
"""
# Type hints for readers and checkers, never evaluated: that would cost every process start-up.
from __future__ import annotations

from typing import Optional, Sequence


def exception_line(traceback_text: Optional[str]) -> Optional[str]:
    """The last line of a traceback, the exception itself: what a one-line report shows."""
    lines = [line for line in (traceback_text or '').splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


class EvolveError(Exception):
    """Base class of every tgext.evolve error."""


class ConfigurationError(EvolveError, ValueError):
    """Bad options or evolutions, detected at start-up; the message names the culprit."""


class LeaseLost(EvolveError):
    """The lock changed hands: this process must not write history or start another evolution."""


class ClaimLost(LeaseLost):
    """A range of a parallel evolution was claimed by another process (its lease expired):
    this process's batch in it was rolled back and it must not write to the range again."""


class EvolutionFailed(EvolveError):
    """An evolution raised; its work was rolled back and it is recorded as failed.

    Raised by a run in the foreground (``gearbox evolve run``, ``operations.run``); the web
    processes' thread follows ``on_failure`` instead.  ``error`` is the traceback as its history
    records it; ``applied`` the ids the same run applied before it, in order.
    """

    def __init__(self, evolution_id: str, error: str, applied: Sequence[str] = ()):
        super().__init__(f'evolution {evolution_id!r} failed: {exception_line(error)}')
        self.evolution_id = evolution_id
        self.error = error
        self.applied = tuple(applied)


class OperationRefused(EvolveError):
    """A ``gearbox evolve`` verb (or its function in ``tgext.evolve.operations``) names unknown
    evolutions or would be unsafe; nothing was changed."""


class LockWaitTimeout(EvolveError):
    """Another process held the lock for longer than the caller was willing to wait."""


class TransactionEscaped(EvolveError):
    """An evolution committed, aborted or replaced the transaction tgext.evolve runs it in
    (``transaction.commit()`` inside ``evolve()``, as 0.0.5 asked): refused, nothing of it is
    committed, and it is recorded failed with this message."""
