"""One process of a cluster working on a parallel evolution, for tests/test_parallel.py and
bench/bench_parallel.py::

    python tests/parallel_worker.py '<json job>'

The process runs tgext.evolve's :class:`~tgext.evolve.runner.Runner` in the foreground, as
``gearbox evolve run`` does, on an application-like SQLAlchemy session (``scoped_session``
registered with zope.sqlalchemy), with one registered evolution, :class:`Backfill`:
``parallel = True`` over every row of :data:`ITEMS` (created and filled by the test), and a
non-idempotent ``process()``: ``n += 1``, so that a batch applied twice shows.

The job:

``url``, ``dir``, ``name``
    the database, the working directory, this process's name.
``options``
    :class:`~tgext.evolve.options.Settings` fields (``lease``, ``poll_interval``...).
``batch_size``, ``max_workers``, ``background``
    the evolution's.
``iterations``
    ``hashlib.pbkdf2_hmac`` iterations per row: CPU-bound work, as real backfills do.
``fail_ids``
    ids whose ``process()`` raises: a failing range.
``deadline``
    seconds before the process gives up.
``go``
    optional file name: the process writes ``<name>.ready`` once everything is imported and
    built, then waits until ``go`` exists before it runs, so that many processes start at once.

Files it writes in ``dir``: ``<name>.owner`` (its runner's owner, at start), ``<name>.json``
(at the end: owner, phase, ranges it finished, applied ids, its wall and CPU seconds), its log in ``<name>.log``
(stderr, redirected by the caller).  When ``stop-<name>`` exists, the process stops itself
with SIGSTOP at the start of its next batch, inside the batch's transaction, as a process
paused by the OS or a debugger would be.
"""
import hashlib
import importlib
import json
import logging
import os
import pathlib
import signal
import sys
import time

import sqlalchemy as sa
import zope.sqlalchemy
from sqlalchemy import orm

from polling import wait_until
from tgext.evolve import BatchEvolution
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
from tgext.evolve.options import Settings
from tgext.evolve.runner import Runner, make_owner

EVOLUTION_ID = 'parallel_backfill'


class Base(orm.DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = 'parallel_items'
    id = sa.Column(sa.Integer, primary_key=True, autoincrement=False)
    n = sa.Column(sa.Integer, nullable=False, default=0)
    digest = sa.Column(sa.String(64), nullable=True)
    worker = sa.Column(sa.String(64), nullable=True)


ITEMS = Item.__table__


def create_items(engine, count):
    """(Re)create the table with ``count`` rows, ``n = 0``."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        for start in range(1, count + 1, 5000):
            conn.execute(ITEMS.insert(), [dict(id=i, n=0) for i in
                                          range(start, min(count, start + 4999) + 1)])


def item_counts(engine):
    """``{n: rows}``: ``{1: count}`` when every row was changed exactly once."""
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(ITEMS.c.n, sa.func.count()).group_by(ITEMS.c.n)).all())


def make_backfill(session, name, job, workdir):
    fail_ids = frozenset(job.get('fail_ids', ()))
    iterations = job.get('iterations', 0)
    stop_file = workdir / f'stop-{name}'

    class Backfill(BatchEvolution):
        evolution_id = EVOLUTION_ID
        parallel = True
        batch_size = job.get('batch_size', 100)
        max_workers = job.get('max_workers')
        background = job.get('background', False)

        def collection(self):
            return session.query(Item)

        def process_batch(self, items):
            if stop_file.exists():
                stop_file.unlink()
                os.kill(os.getpid(), signal.SIGSTOP)
            super().process_batch(items)

        def process(self, item):
            if item.id in fail_ids:
                raise RuntimeError(f'item {item.id} cannot be processed')
            if iterations:
                item.digest = hashlib.pbkdf2_hmac('sha256', str(item.id).encode(), b'salt',
                                                  iterations).hex()
            item.n += 1
            item.worker = name

    return Backfill()


def main(argv):
    job = json.loads(argv[1])
    workdir = pathlib.Path(job['dir'])
    name = job['name']
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    engine = sa.create_engine(job['url'], poolclass=sa.pool.NullPool
                              if job['url'].startswith('sqlite') else sa.pool.QueuePool)
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)
    backend = SQLAlchemyBackend(engine, session=session)
    settings = Settings(**job.get('options', {}))
    owner = f'{name}:{make_owner()}'
    (workdir / f'{name}.owner').write_text(owner)
    runner = Runner(backend, [make_backfill(session, name, job, workdir)], settings,
                    owner=owner)
    if job.get('go'):
        # What a long-lived process has loaded by the time a parallel evolution comes: the
        # processes started together must not spend their first seconds importing.
        for module in ('backends.sql_schema', 'backends.sql_walker', 'heartbeat', 'parallel'):
            importlib.import_module(f'tgext.evolve.{module}')
        (workdir / f'{name}.ready').write_text('')
        wait_until(lambda: (workdir / job['go']).exists(), 'the go file', timeout=600,
                   interval=0.01)
    started, cpu_started = time.monotonic(), time.process_time()
    phase = runner.run(deadline=time.monotonic() + job.get('deadline', 60))
    runner.stop(timeout=30)
    claimer = runner._claimer
    report = {'owner': owner, 'phase': phase, 'applied': runner.applied,
              'ranges_done': claimer.ranges_done.get(EVOLUTION_ID, 0) if claimer else 0,
              'seconds': time.monotonic() - started,
              'cpu_seconds': time.process_time() - cpu_started}
    (workdir / f'{name}.json').write_text(json.dumps(report))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
