"""Exceptions raised by tgext.evolve."""


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
