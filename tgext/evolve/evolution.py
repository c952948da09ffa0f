"""The :class:`Evolution` and :class:`BatchEvolution` base classes, and the checks run on what
an application registers."""
# Type hints for readers and checkers, never evaluated: that would cost every process start-up.
from __future__ import annotations

import inspect
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

from .errors import ConfigurationError
from .records import MAX_ID_LENGTH


class Evolution:
    """One data evolution: subclass it, set ``evolution_id`` and write ``evolve()``.

    ``evolution_id`` identifies the evolution in the history table forever: never rename it.
    ``evolve()`` runs in a background thread (or in ``gearbox evolve run``) with no request;
    the application's configuration is available as ``self.config``.  On SQL databases its work
    through ``model.DBSession`` is committed by tgext.evolve, together with the history record:
    do not commit it yourself (``transaction.commit()`` or ``abort()`` in ``evolve()`` is
    refused, and the evolution recorded failed with nothing of it committed).
    """

    #: Unique, at most 128 characters, never renamed.
    evolution_id: Optional[str] = None

    #: Ids of evolutions that must be applied before this one.
    depends_on: Sequence[str] = ()

    #: True: the site serves (200) while this evolution runs, once every blocking evolution is
    #: applied.  A blocking evolution that depends on it makes it blocking.
    background: bool = False

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


class BatchEvolution(Evolution):
    """A data evolution over many items, run in short batches that resume after any crash.

    Either walk a collection: ``collection()`` returns what to walk (a SQLAlchemy ``Query`` or
    ``select()`` of one entity or table, or a Ming query), which tgext.evolve pages through by
    its primary key, and ``process(item)`` (or ``process_batch(items)``) changes the items.
    Or the low-level form: ``batch(cursor, size)`` does up to ``size`` items after ``cursor``
    (None at the start) and returns the new cursor (a JSON value), or None when nothing was
    left.

    Each batch's work, its checkpoint and the fencing check commit in one transaction on
    PostgreSQL, SQLite and InnoDB, so ``process()`` may be non-idempotent: a batch is never
    applied twice, and the next holder resumes from the last committed checkpoint.  On
    MongoDB a batch may be applied again after a crash (at least once).
    """

    #: Items in the first batch; then the size adapts so that a batch takes ``batch_seconds``.
    batch_size = 100

    #: The adaptive size never grows past this: a batch's objects stay in memory until it
    #: commits.
    max_batch_size = 10_000

    #: True: every process of the cluster works on key ranges of the collection at once.
    parallel = False

    #: With ``parallel``: at most this many processes work at once (None: no limit).
    max_workers = None

    def collection(self):
        """What to walk: a ``Query``/``select()`` (SQL) or a Ming query."""
        raise NotImplementedError

    def process(self, item):
        """Change one item (through the application's session)."""
        raise NotImplementedError

    def process_batch(self, items):
        """Change a batch of items at once (bulk statements); by default ``process()`` each."""
        for item in items:
            ran_its_body(self, 'process', item)

    def batch(self, cursor, size):
        """The low-level form: do up to ``size`` items after ``cursor``, return the new cursor,
        or None when nothing was left."""
        raise NotImplementedError

    def count(self):
        """The number of items, for progress and ETA; by default the collection's count, taken
        once.  None: unknown."""
        return None

    def evolve(self):
        raise TypeError(f'{self!r} is a BatchEvolution: tgext.evolve runs it batch by batch')

    @property
    def walks(self) -> bool:
        """True for the collection() form, False for the low-level batch() form."""
        return _defines(self, 'collection', BatchEvolution)

    @property
    def counts(self) -> bool:
        """True when the class gives its own count()."""
        return _defines(self, 'count', BatchEvolution)


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


def _defines(evolution, name, base):
    """Whether the evolution's class overrides ``base.<name>``."""
    return getattr(type(evolution), name, None) is not getattr(base, name)


def _check_id(evolution, where):
    evolution_id = evolution.evolution_id
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


def _check_plain_function(evolution, name):
    """``async def`` and generator methods return an object instead of running their body:
    tgext.evolve would record an evolution applied whose work never ran."""
    function = getattr(type(evolution), name, None)
    function = getattr(function, '__func__', function)
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        kind = 'a coroutine function (async def)'
    elif inspect.isgeneratorfunction(function):
        kind = 'a generator function (it contains yield)'
    else:
        return
    raise ConfigurationError(
        f'evolution {evolution.evolution_id!r}: {name}() is {kind}; tgext.evolve calls it '
        f'in a plain thread and would never run its body: make it a plain method')


def interrupts_foreground(error):
    """True for a Ctrl-C in a foreground run (``gearbox evolve run``): recorded as the
    evolution's failure, then raised, so that the command still stops.  Anywhere else a
    BaseException from an evolution is only its failure."""
    return (isinstance(error, KeyboardInterrupt)
            and threading.current_thread() is threading.main_thread())


def ran_its_body(evolution, name, *args):
    """Call ``evolution.<name>(*args)``; raise ConfigurationError if what it returned is a
    coroutine or a generator, whose body did not run.

    The start-up check sees ``async def`` and generator methods of the class; this one sees
    the rest (a synchronous decorator around an ``async def``, a method set on the instance),
    so that such an evolution is recorded failed instead of applied."""
    result = getattr(evolution, name)(*args)
    if inspect.iscoroutine(result) or inspect.isgenerator(result):
        result.close()  # never started: closing it only silences "never awaited"
    elif not inspect.isasyncgen(result):
        return result
    raise ConfigurationError(
        f'evolution {evolution.evolution_id!r}: {name}() returned a {type(result).__name__} '
        f'instead of running: its body never ran.  tgext.evolve calls it in a plain thread: '
        f'make it a plain method (no async def, no yield, no decorator that makes one)')


def _check_flag(evolution, name):
    value = getattr(evolution, name)
    if not isinstance(value, bool):
        raise ConfigurationError(
            f'evolution {evolution.evolution_id!r}: {name} must be True or False, not {value!r}')


def _check_positive_int(evolution, name, allow_none=False):
    value = getattr(evolution, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f'evolution {evolution.evolution_id!r}: {name} must be a positive integer'
            f'{" or None" if allow_none else ""}, not {value!r}')


def _check_batch_forms(evolution):
    evolution_id = evolution.evolution_id
    walks = _defines(evolution, 'collection', BatchEvolution)
    low_level = _defines(evolution, 'batch', BatchEvolution)
    per_item = _defines(evolution, 'process', BatchEvolution)
    bulk = _defines(evolution, 'process_batch', BatchEvolution)
    if _defines(evolution, 'evolve', BatchEvolution):
        raise ConfigurationError(
            f'evolution {evolution_id!r} is a BatchEvolution and defines evolve(), which would '
            f'never be called: use collection() and process(), or batch()')
    if walks and low_level:
        raise ConfigurationError(
            f'evolution {evolution_id!r} defines both collection() and batch(): define '
            f'collection() with process()/process_batch(), or batch() alone')
    if not walks and not low_level:
        raise ConfigurationError(
            f'evolution {evolution_id!r} defines neither collection() nor batch(): a '
            f'BatchEvolution needs one of them')
    if walks and not (per_item or bulk):
        raise ConfigurationError(
            f'evolution {evolution_id!r} defines collection() but neither process(item) nor '
            f'process_batch(items)')
    if walks and per_item and bulk:
        raise ConfigurationError(
            f'evolution {evolution_id!r} defines both process() and process_batch(): define '
            f'one (process_batch() is the one called)')
    if low_level and (per_item or bulk):
        raise ConfigurationError(
            f'evolution {evolution_id!r} defines batch() and process()/process_batch(), which '
            f'batch() makes unused: remove them, or use collection() instead of batch()')
    _check_positive_int(evolution, 'batch_size')
    _check_positive_int(evolution, 'max_batch_size')
    _check_flag(evolution, 'parallel')
    _check_positive_int(evolution, 'max_workers', allow_none=True)
    if evolution.parallel and low_level:
        raise ConfigurationError(
            f'evolution {evolution_id!r}: parallel = True needs collection() (tgext.evolve '
            f'splits its key space into ranges); batch() cannot be split')
    for name in ('collection', 'process', 'process_batch', 'batch', 'count'):
        _check_plain_function(evolution, name)


def _check_evolution(evolution, position):
    where = f'evolutions[{position}] ({type(evolution).__qualname__})'
    _check_id(evolution, where)
    evolution_id = evolution.evolution_id
    if isinstance(evolution, BatchEvolution):
        _check_batch_forms(evolution)
    elif type(evolution).evolve is Evolution.evolve:
        raise ConfigurationError(f'{where}: evolution {evolution_id!r} defines no evolve() method')
    else:
        _check_plain_function(evolution, 'evolve')
    _check_flag(evolution, 'background')
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
        _check_evolution(evolution, position)
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
