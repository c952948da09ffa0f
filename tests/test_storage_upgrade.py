"""tgext.evolve's own storage, created by 1.0's development versions (storage version 1: lock
and history, no version record) or by the previous release (version 2: with the version
record), upgraded in place by this release's code started on many processes at once (issues 13
and 14).

The old storage is built from a frozen copy of the DDL (and, on Mongo, of the documents) those
versions created, never from the package's current tables: the test must keep meaning "what
the old release left", whatever the package defines later.
"""
import collections
import threading

import pytest
import sqlalchemy as sa

import conftest
from cluster import START_DEADLINE, Cluster
from fault_scenarios import CALM_OPTIONS
from polling import wait_until
from tgext.evolve import Evolution
from tgext.evolve.backends.ming import MingBackend
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
from tgext.evolve.options import Settings
from tgext.evolve.records import APPLIED, HISTORY_V1_FIELDS, MARKED
from tgext.evolve.runner import Runner

PROCESSES = 8
VERSION = 3  # this release's storage version
OLD_OWNER = 'old-host:1:0ld'

# --- storage version 1, frozen -------------------------------------------------------------------

_TIME = sa.Float(precision=53)
V1 = sa.MetaData()
sa.Table('tgext_evolve_lock', V1,
         sa.Column('name', sa.String(128), primary_key=True),
         sa.Column('owner', sa.String(255), nullable=True),
         sa.Column('generation', sa.Integer, nullable=False),
         sa.Column('acquired_at', _TIME, nullable=True),
         sa.Column('renewed_at', _TIME, nullable=True),
         sa.Column('expires_at', _TIME, nullable=True),
         sa.Column('released_by', sa.String(255), nullable=True))
sa.Table('tgext_evolve_history', V1,
         sa.Column('evolution_id', sa.String(128), primary_key=True),
         sa.Column('state', sa.String(16), nullable=False),
         sa.Column('attempts', sa.Integer, nullable=False, default=0),
         sa.Column('started_at', _TIME, nullable=True),
         sa.Column('finished_at', _TIME, nullable=True),
         sa.Column('duration_ms', _TIME, nullable=True),
         sa.Column('owner', sa.String(255), nullable=True),
         sa.Column('generation', sa.Integer, nullable=True),
         sa.Column('error', sa.Text, nullable=True),
         sa.Column('progress_done', sa.BigInteger, nullable=True),
         sa.Column('progress_total', sa.BigInteger, nullable=True),
         sa.Column('progress_at', _TIME, nullable=True),
         sa.Column('fingerprint', sa.String(128), nullable=True))

#: What the old release left: a released lock, the first evolution applied, and one that a
#: later release no longer registers.
V1_LOCK = dict(name='tgext.evolve', owner=None, generation=7, acquired_at=1.7e9,
               renewed_at=1.7e9 + 3, expires_at=1.7e9 + 3, released_by=OLD_OWNER)
V1_HISTORY = [
    dict(evolution_id='e1', state=APPLIED, attempts=1, started_at=1.7e9, finished_at=1.7e9 + 1,
         duration_ms=1000.0, owner=OLD_OWNER, generation=7, error=None, progress_done=None,
         progress_total=None, progress_at=None, fingerprint=None),
    dict(evolution_id='retired', state=MARKED, attempts=0, started_at=1.6e9,
         finished_at=1.6e9, duration_ms=0.0, owner=OLD_OWNER, generation=3, error=None,
         progress_done=None, progress_total=None, progress_at=None, fingerprint=None),
]
EVOLUTIONS = ['e1', 'e2', 'e3']


def create_v1_sql(engine):
    V1.create_all(engine)
    with engine.begin() as conn:
        conn.execute(V1.tables['tgext_evolve_lock'].insert().values(**V1_LOCK))
        conn.execute(V1.tables['tgext_evolve_history'].insert(), V1_HISTORY)


def version_record(engine):
    with engine.connect() as conn:
        return conn.execute(sa.text('SELECT name, version, upgraded_by FROM tgext_evolve_schema')
                            ).all()


def v1_fields(record):
    """What the old release wrote: the fields storage version 1 has."""
    return {name: getattr(record, name) for name in HISTORY_V1_FIELDS}


# --- SQL: real processes -------------------------------------------------------------------------

@pytest.mark.slow
def test_processes_started_at_once_upgrade_version_1_storage_and_lose_nothing(sql_url, tmp_path):
    evolutions = [{'id': i, 'steps': ['write']} for i in EVOLUTIONS]
    with Cluster(sql_url, tmp_path, evolutions, CALM_OPTIONS) as c:
        c.prepare_database()
        create_v1_sql(c.engine)
        processes = c.start(PROCESSES)
        c.wait_serving(processes, START_DEADLINE)
        owners = {p.report['owner'] for p in processes}
        history = c.history()
        # Nothing lost: the old rows are as the old release wrote them, the new evolutions
        # ran once each, the one the old release applied did not run again.
        old = SQLAlchemyBackend(c.engine)
        assert {i: v1_fields(history[i]) for i in ('e1', 'retired')} == {
            r['evolution_id']: {k: v for k, v in r.items() if k != 'progress_at'}
            for r in V1_HISTORY}
        assert {i: history[i].state for i in EVOLUTIONS} == dict.fromkeys(EVOLUTIONS, APPLIED)
        assert c.side_effects() == {'e2': 1, 'e3': 1}
        assert c.lock().generation > V1_LOCK['generation']
        # The version is recorded, once, by one of the new processes.
        (record,) = version_record(c.engine)
        assert (record.name, record.version) == ('storage', VERSION)
        assert record.upgraded_by in owners
        assert old.read_storage_version() == VERSION
        upgrades = [line for p in processes for line in p.log_lines('storage version 2')]
        assert len(upgrades) == 1, upgrades
        assert [p.error_lines() for p in processes] == [[]] * PROCESSES


# --- Mongo: runners of one process on MIM --------------------------------------------------------

def create_v1_mongo(db):
    """The collections, indexes and documents the old release's Ming backend left."""
    db['tgext_evolve_lock'].create_index('name', unique=True)
    db['tgext_evolve_history'].create_index('evolution_id', unique=True)
    db['tgext_evolve_lock'].insert_one({'_id': V1_LOCK['name'], **V1_LOCK})
    for row in V1_HISTORY:
        db['tgext_evolve_history'].insert_one({'_id': row['evolution_id'], **row})


class CountingEvolution(Evolution):
    """Counts its runs in memory: MIM is not thread-safe, so the work writes nothing there."""

    def __init__(self, evolution_id, runs, guard):
        self.evolution_id = evolution_id
        self.runs = runs
        self.guard = guard

    def evolve(self):
        with self.guard:
            self.runs[self.evolution_id] += 1


def test_runners_started_at_once_upgrade_version_1_storage_on_mim(mim_database_url):
    conftest.empty_mongo_database(mim_database_url)
    harness = conftest.MongoHarness('mim', mim_database_url)
    try:
        create_v1_mongo(harness.reader_db)
        runs, guard = collections.Counter(), threading.Lock()
        runners = [Runner(MingBackend(harness.new_datastore().db),
                          [CountingEvolution(i, runs, guard) for i in EVOLUTIONS],
                          Settings(lease=15.0, poll_interval=0.05)) for _ in range(PROCESSES)]
        for runner in runners:
            runner.start()
        try:
            wait_until(lambda: all(r.state.open for r in runners), 'every runner serving')
        finally:
            for runner in runners:
                runner.stop(30)
        backend = MingBackend(harness.reader_db)
        history = backend.read_history()
        for row in V1_HISTORY:
            assert v1_fields(history[row['evolution_id']]) == {
                k: v for k, v in row.items() if k != 'progress_at'}
        assert runs == {'e2': 1, 'e3': 1}
        assert backend.read_storage_version() == VERSION
        (record,) = harness.reader_db['tgext_evolve_schema'].find()
        assert record['upgraded_by'] in {r.owner for r in runners}
    finally:
        harness.close()


# --- storage version 2 (the previous release), frozen ----------------------------------------------

V2 = sa.MetaData()
for _table in V1.sorted_tables:
    _table.to_metadata(V2)
sa.Table('tgext_evolve_schema', V2,
         sa.Column('name', sa.String(128), primary_key=True),
         sa.Column('version', sa.Integer, nullable=False),
         sa.Column('upgraded_at', _TIME, nullable=True),
         sa.Column('upgraded_by', sa.String(255), nullable=True))
V2_RECORD = dict(name='storage', version=2, upgraded_at=1.7e9, upgraded_by=OLD_OWNER)
#: What storage version 3 adds: the batch fields of the history, and two tables.
V3_HISTORY_COLUMNS = {'checkpoint', 'batches_done', 'batch_size', 'rate', 'requested',
                      'requested_by', 'requested_at'}
V3_TABLES = {'tgext_evolve_audit', 'tgext_evolve_ranges'}
BATCH_ROWS = 3_000


def create_v2_sql(engine):
    V2.create_all(engine)
    with engine.begin() as conn:
        conn.execute(V2.tables['tgext_evolve_lock'].insert().values(**V1_LOCK))
        conn.execute(V2.tables['tgext_evolve_history'].insert(), V1_HISTORY)
        conn.execute(V2.tables['tgext_evolve_schema'].insert().values(**V2_RECORD))


@pytest.mark.slow
def test_processes_started_at_once_upgrade_version_2_storage_and_run_a_batched_evolution(
        sql_url, tmp_path):
    """The previous release's storage (version 2) and a release that brings a batched
    evolution: its checkpoints need version 3, added in place by one of 8 processes started at
    once, before the first batch."""
    import batch_workers
    from test_batch_processes import BatchCluster
    evolutions = [{'id': 'e1', 'steps': ['write']},
                  {'id': 'bump', 'kind': 'batch', 'batch_size': 200, 'max_batch_size': 1000},
                  {'id': 'e3', 'steps': ['write']}]
    with BatchCluster(sql_url, tmp_path, evolutions, CALM_OPTIONS) as c:
        c.prepare_items(BATCH_ROWS)
        create_v2_sql(c.engine)
        processes = c.start(PROCESSES)
        c.wait_serving(processes, START_DEADLINE)
        owners = {p.report['owner'] for p in processes}

        inspector = sa.inspect(c.engine)
        assert V3_TABLES <= set(inspector.get_table_names())
        history_columns = {column['name'] for column in inspector.get_columns(
            'tgext_evolve_history')}
        assert V3_HISTORY_COLUMNS <= history_columns
        (record,) = version_record(c.engine)
        assert (record.name, record.version) == ('storage', VERSION)
        assert record.upgraded_by in owners
        upgrades = [line for p in processes for line in p.log_lines('storage version')]
        assert len(upgrades) == 1 and 'storage version 3' in upgrades[0], upgrades

        # Nothing lost, nothing run twice: the old rows as the old release wrote them, e1 not
        # run again, every row of the batched evolution changed once, by one process.
        history = SQLAlchemyBackend(c.engine).read_history(batches=True)
        assert {i: v1_fields(history[i]) for i in ('e1', 'retired')} == {
            r['evolution_id']: {k: v for k, v in r.items() if k != 'progress_at'}
            for r in V1_HISTORY}
        assert c.side_effects() == {'e3': 1}
        assert batch_workers.item_counts(c.engine) == {1: BATCH_ROWS}
        bump = history['bump']
        assert (bump.state, bump.progress_done, bump.attempts) == (APPLIED, BATCH_ROWS, 1)
        assert bump.batches_done >= 2 and bump.batch_size is not None
        assert sum(len(c.calls(p)) for p in processes) == BATCH_ROWS
        assert [p.error_lines() for p in processes] == [[]] * PROCESSES


def create_v2_mongo(db):
    create_v1_mongo(db)
    db['tgext_evolve_schema'].insert_one({'_id': 'storage', **{
        k: v for k, v in V2_RECORD.items() if k != 'name'}})


def test_runners_started_at_once_upgrade_version_2_storage_on_mim(mim_database_url):
    conftest.empty_mongo_database(mim_database_url)
    harness = conftest.MongoHarness('mim', mim_database_url)
    try:
        create_v2_mongo(harness.reader_db)
        runs, guard = collections.Counter(), threading.Lock()
        runners = [Runner(MingBackend(harness.new_datastore().db),
                          [CountingEvolution(i, runs, guard) for i in EVOLUTIONS],
                          Settings(lease=15.0, poll_interval=0.05)) for _ in range(PROCESSES)]
        for runner in runners:
            runner.start()
        try:
            wait_until(lambda: all(r.state.open for r in runners), 'every runner serving')
        finally:
            for runner in runners:
                runner.stop(30)
        assert runs == {'e2': 1, 'e3': 1}
        (record,) = harness.reader_db['tgext_evolve_schema'].find()
        assert record['version'] == VERSION
        assert record['upgraded_by'] in {r.owner for r in runners}
    finally:
        harness.close()
