"""Code run in child processes (multiprocessing 'spawn') by the backend contract tests.

A module of its own, not the test module, so that spawned children import it by a stable name
whatever pytest's import mode (``tests/conftest.py`` puts ``tests/`` on ``sys.path``, which
children inherit).  Each child opens its own backend from a URL, as another process of the
cluster would.

Starting a Python process that imports TurboGears costs seconds, so the racers are a pool of
spawned processes kept for the whole test session (:class:`RacePool`); every race still opens a
fresh backend with its own engine or client in each child and closes it afterwards.
"""
import contextlib
import multiprocessing
import os
import traceback

BARRIER_TIMEOUT = 60  # seconds children wait for each other before giving up

_barrier = None


def _init_worker(barrier):
    global _barrier
    _barrier = barrier
    # Pay the imports once per worker, not inside the race.
    import sqlalchemy  # noqa: F401
    import tgext.evolve.backends.ming  # noqa: F401
    import tgext.evolve.backends.sqlalchemy  # noqa: F401


def open_backend(kind, url):
    """A backend of a fresh process: its own engine or client, no app session.

    Returns ``(backend, close)``; the connection is opened before returning so that the race
    measures the backend, not the connection set-up.
    """
    if kind == 'mongodb':
        import pymongo
        from tgext.evolve.backends.ming import MingBackend
        client = pymongo.MongoClient(url)
        client.admin.command('ping')
        return MingBackend(client.get_default_database()), client.close
    if kind == 'mim':
        raise ValueError('MIM lives in one process: it cannot be shared with a child')
    import sqlalchemy as sa
    from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
    engine = sa.create_engine(url)
    with engine.connect():
        pass
    return SQLAlchemyBackend(engine), engine.dispose


#: The column :func:`a_later_storage_version` adds to the history table.
LATER_COLUMN = 'later_release_note'


@contextlib.contextmanager
def a_later_storage_version():
    """This process's tgext.evolve with one more storage step, as a later release would append
    it: a NULLable ``later_release_note`` column on the history table, so that the upgrade mechanism is tested with a step that ALTERs a table.  Yields the
    step.  The package's own tables are left alone: the SQL backend finds the latest tables in
    ``sql_schema.metadata`` at every call, which is replaced by a copy here.
    """
    import sqlalchemy as sa
    from tgext.evolve.backends import base, sql_schema, upgrades
    step = upgrades.StorageUpgrade(upgrades.STORAGE_VERSION + 1, 'a later column (test)',
                                   new_columns=((base.HISTORY_TABLE, LATER_COLUMN),))
    later = sa.MetaData()
    for table in sql_schema.metadata.sorted_tables:
        table.to_metadata(later)
    later.tables[base.HISTORY_TABLE].append_column(sa.Column(LATER_COLUMN, sa.Text))
    saved = upgrades.UPGRADES, upgrades.STORAGE_VERSION, sql_schema.metadata
    upgrades.UPGRADES, upgrades.STORAGE_VERSION = upgrades.UPGRADES + (step,), step.version
    sql_schema.metadata = later
    try:
        yield step
    finally:
        upgrades.UPGRADES, upgrades.STORAGE_VERSION, sql_schema.metadata = saved


def start_writing(backend, owner, lease_seconds):
    """What a process with evolutions to run does first: create what is missing, take the lock
    if it is free, upgrade the storage under it, let go.  Returns whether it upgraded (True),
    lost the race for the lock (None), or found a table busy (False)."""
    backend.ensure_storage()
    lease = backend.acquire(owner, lease_seconds)
    if lease is None:
        return None
    try:
        return backend.upgrade_storage(lease)
    finally:
        backend.release(lease)


def race(task):
    """Open a backend, wait for every sibling at the barrier, then do ``action`` once.

    Returns ``(owner, 'ok', value)`` or ``(owner, 'error', traceback)``; value is the acquired
    lease's generation (or None) for ``acquire``, :func:`start_writing`'s result for
    ``start_writing`` and ``start_writing_later`` (the same with
    :func:`a_later_storage_version`), None for ``ensure_storage``.
    """
    kind, url, action, owner, lease_seconds = task
    close = None
    try:
        backend, close = open_backend(kind, url)
        _barrier.wait(BARRIER_TIMEOUT)
        if action == 'ensure_storage':
            backend.ensure_storage()
            value = None
        elif action == 'acquire':
            lease = backend.acquire(owner, lease_seconds)
            value = None if lease is None else lease.generation
        elif action in ('start_writing', 'start_writing_later'):
            later = a_later_storage_version if action.endswith('later') else contextlib.nullcontext
            with later():
                value = start_writing(backend, owner, lease_seconds)
        else:
            raise ValueError(action)
        return owner, 'ok', value
    except BaseException:
        return owner, 'error', f'{owner} (pid {os.getpid()}):\n{traceback.format_exc()}'
    finally:
        if close is not None:
            try:
                close()
            except Exception:
                pass


class RacePool:
    """``n`` spawned processes that race one backend call at the same instant."""

    def __init__(self, n=8):
        self.n = n
        self._pool = None

    def _start(self):
        ctx = multiprocessing.get_context('spawn')
        self._pool = ctx.Pool(self.n, initializer=_init_worker, initargs=(ctx.Barrier(self.n),))

    def run(self, kind, url, action, lease_seconds=60.0, deadline=120.0):
        """Every process does ``action`` at once on its own backend; return ``{owner: value}``.

        Raises AssertionError with the children's tracebacks if any failed, or if the race did
        not finish within ``deadline`` seconds (the pool is then replaced).
        """
        if self._pool is None:
            self._start()
        owners = [f'racer-{i}:{os.getpid()}' for i in range(self.n)]
        tasks = [(kind, url, action, owner, lease_seconds) for owner in owners]
        # chunksize=1 and a barrier: each of the n idle workers takes exactly one task.
        pending = self._pool.map_async(race, tasks, chunksize=1)
        try:
            results = pending.get(deadline)
        except multiprocessing.TimeoutError:
            self.close()
            raise AssertionError(f'{action} race did not finish within {deadline}s')
        errors = [value for _, status, value in results if status != 'ok']
        if errors:
            self.close()  # the barrier may be broken: start afresh next time
        assert not errors, (f'{action} race: {len(errors)} of {self.n} processes failed:\n'
                            + '\n'.join(errors))
        return {owner: value for owner, _, value in results}

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
