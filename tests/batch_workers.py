"""A real TurboGears application process running batched evolutions (``BatchEvolution``), for
``tests/test_batch_processes.py`` and the storage upgrade tests.

It is ``tests/procapp.py``'s application (same observer, same report file, same log), whose job
may also list batched evolutions::

    python tests/batch_workers.py '<json job>'

``evolutions`` items with ``"kind": "batch"`` are :class:`CountedBump` evolutions over the
application's table :data:`ITEMS` (``id`` integer primary key, ``n`` integer): ``process(row)``
does ``row.n += 1`` (not idempotent: a batch applied twice leaves ``n == 2``), and appends the
row's id to ``calls-<evolution id>-<process name>.log`` *outside* the transaction, with one
``write(2)`` on an ``O_APPEND`` descriptor (it survives a SIGKILL), so that the test can count
every ``process()`` call, committed or not.  Their optional keys:

``background``, ``depends_on``, ``batch_size``, ``max_batch_size``
    the class attributes.
``cost``
    seconds each ``process()`` call sleeps (the work's cost, not a synchronisation).
``stop_after``
    ``{"item": id, "once_file": name}``: the first process to meet ``item`` sends itself
    SIGSTOP right there, inside the batch's open transaction; ``once_file`` (created
    atomically) makes it happen in one process only.  The test decides when to SIGCONT it.

Other items are procapp's scripted evolutions (``steps``).

:func:`assert_resumed` judges the call logs of successive holders (here and in
``tests/test_batches.py``): every row committed once, each killed holder's uncommitted batch
redone once by its successor, and nothing else.
"""
import os
import signal
import sys
import time

import sqlalchemy as sa
from sqlalchemy import orm

import procapp
import tgext.evolve

#: The application's table that batched evolutions walk.
ITEMS = 'batch_items'


class ItemsBase(orm.DeclarativeBase):
    pass


class Item(ItemsBase):
    __tablename__ = ITEMS
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=False)
    n: orm.Mapped[int] = orm.mapped_column(default=0)


def create_items(engine, count):
    """The application's table with rows ``1..count``, all ``n = 0`` (a fresh one)."""
    ItemsBase.metadata.drop_all(engine)
    ItemsBase.metadata.create_all(engine)
    table = Item.__table__
    with engine.begin() as conn:
        for start in range(1, count + 1, 5000):
            conn.execute(table.insert(), [{'id': i, 'n': 0}
                                          for i in range(start, min(count, start + 4999) + 1)])


def item_counts(engine):
    """``{n: how many rows have it}``: ``{1: count}`` when every row changed exactly once."""
    table = Item.__table__
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(table.c.n, sa.func.count()).group_by(table.c.n)).all())


def calls_path(workdir, evolution_id, name):
    return os.path.join(workdir, f'calls-{evolution_id}-{name}.log')


def read_calls(workdir, evolution_id, name):
    """The ids ``process()`` was called with in process ``name``, in order."""
    try:
        with open(calls_path(workdir, evolution_id, name)) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split('\n')[:-1]]  # a partial last line is not a call


def assert_resumed(logs, rows, max_batch):
    """``logs``: the call logs of the successive holders, the last one finishing.

    Each holder but the last was killed: its calls end with the batch it never committed
    (possibly none), which its successor redid first, and nothing else; so the committed calls
    of the holders, end to end, are every row once, in key order.
    """
    committed = []
    for killed, successor in zip(logs, logs[1:]):
        assert successor, 'a holder took over and processed nothing'
        start = killed.index(successor[0]) if successor[0] in killed else len(killed)
        uncommitted = killed[start:]
        assert uncommitted == successor[:len(uncommitted)], (
            'the successor did not redo exactly the uncommitted batch first')
        assert len(uncommitted) <= max_batch, f'{len(uncommitted)} calls redone'
        committed += killed[:start]
    committed += logs[-1]
    assert committed == list(range(1, rows + 1)), 'the committed calls are not every row once'


class CountedBump(tgext.evolve.BatchEvolution):
    """``row.n += 1`` over :data:`ITEMS`, every call counted outside the transaction."""

    def __init__(self, spec, model, workdir, name):
        self.evolution_id = spec['id']
        self.background = spec.get('background', False)
        self.depends_on = tuple(spec.get('depends_on', ()))
        self.batch_size = spec.get('batch_size', 100)
        self.max_batch_size = spec.get('max_batch_size', 500)
        self.cost = spec.get('cost', 0.0)
        self.stop = spec.get('stop_after')
        self.model = model
        self.workdir = workdir
        self._calls = os.open(calls_path(workdir, self.evolution_id, name),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def collection(self):
        return self.model.DBSession.query(Item)

    def process(self, row):
        row.n += 1
        if self.cost:
            time.sleep(self.cost)
        os.write(self._calls, b'%d\n' % row.id)
        if self.stop is not None and row.id == self.stop['item'] and self._first_to_stop():
            os.kill(os.getpid(), signal.SIGSTOP)  # inside the batch's open transaction

    def _first_to_stop(self):
        try:
            fd = os.open(os.path.join(self.workdir, self.stop['once_file']),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        os.write(fd, b'%d\n' % os.getpid())
        os.close(fd)
        return True


def build_evolutions(job, model):
    evolutions = []
    for spec in job['evolutions']:
        if spec.get('kind') == 'batch':
            evolutions.append(CountedBump(spec, model, job['dir'], job['name']))
        else:
            evolution = procapp.ScriptedEvolution(spec['id'], spec['steps'], model, job['dir'])
            evolution.depends_on = tuple(spec.get('depends_on', ()))
            evolution.background = spec.get('background', False)
            evolutions.append(evolution)
    return evolutions


def main(argv):
    procapp.make_evolutions = build_evolutions
    procapp.main(argv)


if __name__ == '__main__':
    main(sys.argv)
