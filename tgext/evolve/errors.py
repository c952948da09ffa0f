"""Every error of tgext.evolve that a user can catch: all exported by ``tgext.evolve``.

A caller's mistake that no user input can cause (a backend asked to record a state that is not
a done state) stays a plain ``ValueError``.
"""


class EvolveError(Exception):
    """Base class of every tgext.evolve error."""


class ConfigurationError(EvolveError, ValueError):
    """Bad options or evolutions, detected at start-up; the message names the culprit."""


class LeaseLost(EvolveError):
    """The lock changed hands: this process must not write history or start another evolution."""


class EvolutionFailed(EvolveError):
    """An evolution raised; its work was rolled back and it is recorded as failed."""

    def __init__(self, evolution_id, error):
        super().__init__(f'evolution {evolution_id!r} failed: {error}')
        self.evolution_id = evolution_id
        self.error = error


class OperationRefused(EvolveError):
    """A ``gearbox evolve`` verb (or its function in ``tgext.evolve.operations``) names unknown
    evolutions or would be unsafe; nothing was changed."""


class LockWaitTimeout(EvolveError):
    """Another process held the lock for longer than the caller was willing to wait."""
