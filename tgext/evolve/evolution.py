"""The :class:`Evolution` base class and the checks run on what an application registers."""
# Type hints for readers and checkers, never evaluated: that would cost every process start-up.
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from .errors import ConfigurationError
from .records import MAX_ID_LENGTH


class Evolution:
    """One data evolution: subclass it, set ``evolution_id`` and write ``evolve()``.

    ``evolution_id`` identifies the evolution in the history table forever: never rename it.
    ``evolve()`` runs in a background thread (or in ``gearbox evolve run``) with no request;
    the application's configuration is available as ``self.config``.  On SQL databases its work
    through ``model.DBSession`` is committed by tgext.evolve, together with the history record:
    do not commit it yourself.
    """

    #: Unique, at most 128 characters, never renamed.
    evolution_id: Optional[str] = None

    #: Ids of evolutions that must be applied before this one.
    depends_on: Sequence[str] = ()

    #: The application's configuration, set before ``evolve()`` is called.
    config: Optional[Mapping[str, Any]] = None

    _progress_sink: Optional[Callable[[int, Optional[int]], None]] = None  # set by the runner

    def evolve(self) -> None:
        raise NotImplementedError

    def fingerprint(self) -> Optional[str]:
        """A string identifying what this evolution would do, or None (the default).

        An evolution with a fingerprint is *repeatable*: it runs again whenever its fingerprint
        differs from the one recorded when it last applied (at most 128 characters: hash
        anything longer).  Called before anything is planned, with ``self.config`` set.
        """
        return None

    def progress(self, done: int, total: Optional[int] = None) -> None:
        """Report how far ``evolve()`` got: ``done`` units of ``total`` (if known).

        Cheap to call in a loop: storage writes and log lines are throttled.  Raises
        :class:`~tgext.evolve.errors.LeaseLost` once this process has lost the lock, so that a
        long evolution stops early instead of doing work that cannot be committed.
        """
        sink = self._progress_sink
        if sink is not None:
            sink(done, total)

    def __repr__(self) -> str:
        return f'<{type(self).__name__} {self.evolution_id!r}>'


def _describe(item):
    if isinstance(item, type):
        return f'class {item.__module__}.{item.__qualname__}'
    return f'{type(item).__module__}.{type(item).__qualname__} instance {item!r}'


def _instantiate(item, position):
    if isinstance(item, type):
        if not issubclass(item, Evolution):
            raise ConfigurationError(
                f'evolutions[{position}]: {_describe(item)} is not a subclass of '
                f'tgext.evolve.Evolution')
        try:
            return item()
        except TypeError as e:
            raise ConfigurationError(
                f'evolutions[{position}]: {_describe(item)} cannot be created without '
                f'arguments ({e}); register an instance instead') from e
    if not isinstance(item, Evolution):
        raise ConfigurationError(
            f'evolutions[{position}]: {_describe(item)} is not an Evolution subclass or instance')
    return item


def _check_id(evolution, position):
    evolution_id = evolution.evolution_id
    where = f'evolutions[{position}] ({type(evolution).__qualname__})'
    if evolution_id is None:
        raise ConfigurationError(f'{where} has no evolution_id')
    if not isinstance(evolution_id, str):
        raise ConfigurationError(
            f'{where}: evolution_id must be a string, not {type(evolution_id).__name__} '
            f'{evolution_id!r}')
    if not evolution_id.strip():
        raise ConfigurationError(f'{where}: evolution_id {evolution_id!r} is empty')
    if len(evolution_id) > MAX_ID_LENGTH:
        raise ConfigurationError(
            f'{where}: evolution_id {evolution_id[:40]!r}... is {len(evolution_id)} characters '
            f'long, the limit is {MAX_ID_LENGTH}')
    if type(evolution).evolve is Evolution.evolve:
        raise ConfigurationError(f'{where}: evolution {evolution_id!r} defines no evolve() method')
    depends_on = evolution.depends_on
    if isinstance(depends_on, str) or not all(isinstance(d, str) for d in depends_on):
        raise ConfigurationError(
            f'{where}: depends_on of {evolution_id!r} must be a tuple of evolution ids, '
            f'not {depends_on!r}')


def collect_evolutions(items, registered=None):
    """Validate registered classes/instances and return the new instances in order.

    ``registered`` maps each evolution id already registered (by an earlier ``plugme`` call)
    to ``(what was registered, instance)`` and is updated in place.  Registering the very same
    class or instance again is harmless; a different one with the same id is an error.
    """
    if items is None or isinstance(items, (str, bytes)) or not hasattr(items, '__iter__'):
        raise ConfigurationError(
            f'the "evolutions" option must be a list of Evolution classes or instances, '
            f'not {items!r}')
    items = list(items)
    if not items:
        raise ConfigurationError('the "evolutions" option is empty: register at least one '
                                 'Evolution')
    registered = {} if registered is None else registered
    collected = []
    for position, item in enumerate(items):
        if any(source is item for source, _ in registered.values()):
            continue
        evolution = _instantiate(item, position)
        _check_id(evolution, position)
        if evolution.evolution_id in registered:
            _, other = registered[evolution.evolution_id]
            if type(other) is type(evolution):
                raise ConfigurationError(
                    f'evolution_id {evolution.evolution_id!r} is used by two different '
                    f'registrations of {_describe(type(evolution))}: register it once')
            raise ConfigurationError(
                f'evolution_id {evolution.evolution_id!r} is used by both '
                f'{type(other).__module__}.{type(other).__qualname__} and '
                f'{type(evolution).__module__}.{type(evolution).__qualname__}')
        registered[evolution.evolution_id] = (item, evolution)
        collected.append(evolution)
    return collected
