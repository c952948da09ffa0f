"""The backend contract: what every storage backend must do, tested on every database.

This module is the definition of a backend (``tgext/evolve/backends/base.py`` is its prose).
Each test is parametrised by the ``db`` harness of ``conftest.py`` over sqlite, postgresql, mysql
(SQLAlchemyBackend) and mim, mongodb (MingBackend); each checks one behaviour.

Two kinds of databases, two promises:

* SQL backends are ``atomic_apply``: an evolution's work through the app session, its
  ``applied`` record and the fencing check commit in one transaction, so a failure or a stolen
  lease leaves no trace of the work.
* MongoDB has no such transaction: writes the work already flushed stay (at-least-once, as the
  docs say).  There the tests assert only what the contract promises: the exception propagates
  unchanged, LeaseLost is raised, and no ``applied`` record is written.

Waiting for a lease to expire is done by polling with a deadline, never by a fixed sleep.
"""
import os
import threading
import time
import traceback
from collections.abc import Mapping

import pytest

import backend_workers
from polling import wait_until
from backend_workers import LATER_COLUMN
from tgext.evolve.backends.base import HISTORY_TABLE, LOCK_TABLE, SCHEMA_TABLE, Backend
from tgext.evolve.backends.upgrades import STORAGE_VERSION
from tgext.evolve.errors import LeaseLost
from tgext.evolve.records import (
    ADOPTED, APPLIED, DEFAULT_LOCK_NAME, FAILED, MARKED, MAX_ID_LENGTH, MAX_OWNER_LENGTH, RUNNING,
    HistoryRecord, Lease, LegacyState, LockRecord)

#: Slack for comparing two readings of the same clock taken around one call.
CLOCK_TOLERANCE = 0.05
#: A lease long enough never to expire during a test.
LONG = 60.0
#: A lease short enough to wait for its expiry.
SHORT = 0.3
#: How long to poll for something that should happen within a second or so.
DEADLINE = 15.0


# --- helpers ------------------------------------------------------------------------------------

def take_over(db, owner='owner-B', lease_seconds=LONG):
    """Another process waits for the current lease to expire and takes the lock."""
    thief = db.make_backend(with_session=False)
    lease = wait_until(lambda: thief.acquire(owner, lease_seconds), what=f'takeover by {owner}')
    return thief, lease


def run_threads(n, target):
    """Run ``target(i, barrier)`` in ``n`` threads started together; return results or raise."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def runner(i):
        try:
            results[i] = target(i, barrier)
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=runner, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE * 4)
    assert not any(t.is_alive() for t in threads), 'threads still running after the deadline'
    assert not errors, '\n'.join(errors)
    return results


class Boom(Exception):
    """What a failing evolution raises."""


@pytest.fixture(scope='module')
def racers():
    """Eight spawned processes, kept for the module, that race a backend call at once."""
    pool = backend_workers.RacePool(8)
    yield pool
    pool.close()


@pytest.fixture
def backend(db):
    """A backend with its stores created: the process under test."""
    b = db.make_backend()
    b.ensure_storage()
    return b


@pytest.fixture
def lease(backend):
    return backend.acquire('owner-A', LONG)


# --- identity -----------------------------------------------------------------------------------

def test_backend_is_a_backend(db):
    assert isinstance(db.make_backend(), Backend)


def test_atomic_apply_on_sql_only(db):
    # SQL: work + history + fencing in one transaction; MongoDB: at-least-once.
    assert db.make_backend().atomic_apply is db.is_sql


# --- ensure_storage -----------------------------------------------------------------------------

def test_ensure_storage_creates_lock_and_history_stores(db):
    assert not {LOCK_TABLE, HISTORY_TABLE} & db.store_names()
    db.make_backend().ensure_storage()
    assert {LOCK_TABLE, HISTORY_TABLE} <= db.store_names()


def test_ensure_storage_is_idempotent(db):
    b = db.make_backend()
    b.ensure_storage()
    b.ensure_storage()
    db.make_backend().ensure_storage()
    assert b.read_history() == {}
    assert b.read_lock() is None


def test_ensure_storage_keeps_existing_data(db):
    b = db.make_backend()
    b.ensure_storage()
    lease = b.acquire('owner-A', LONG)
    b.record_running(lease, 'evo-1')
    before = db.snapshot()
    other = db.make_backend()
    other.ensure_storage()
    assert db.snapshot() == before
    assert other.read_lock().generation == 1
    assert other.read_history()['evo-1'].state == RUNNING


def test_ensure_storage_concurrent_processes_on_empty_database(db, request):
    if db.is_mim:
        # MIM is an in-memory database inside this process: other processes cannot see it, and
        # it is not thread-safe (no lock anywhere in ming/mim.py), so "concurrent" creators can
        # only be several backend instances called one after the other.
        for _ in range(8):
            db.make_backend().ensure_storage()
    else:
        outcome = request.getfixturevalue('racers').run(db.kind, db.url, 'ensure_storage')
        assert len(outcome) == 8
    b = db.make_backend()
    assert b.read_history() == {}
    assert b.acquire('owner-A', LONG).generation == 1


def test_ensure_storage_concurrent_threads_on_empty_database(db):
    # MIM itself is not thread-safe; the backend must serialize its own MIM calls.
    backends = [db.make_backend() for _ in range(8)]

    def create(i, barrier):
        barrier.wait(DEADLINE)
        backends[i].ensure_storage()

    run_threads(8, create)
    assert db.make_backend().read_history() == {}


# --- the storage version ------------------------------------------------------------------------

def make_version_1(db, backend):
    """Storage as 1.0's development versions left it: lock and history with rows, no version
    record (the stores are the same; version 2 added only the record)."""
    lease = backend.acquire('owner-old', LONG)
    backend.record_states(lease, ['old-1', 'old-2'], MARKED)
    backend.record_running(lease, 'old-3')
    backend.release(lease)
    db.drop_store(SCHEMA_TABLE)
    assert backend.read_storage_version() == 1


def upgrade_under_the_lock(backend, owner='owner-A'):
    lease = backend.acquire(owner, LONG)
    try:
        return backend.upgrade_storage(lease)
    finally:
        backend.release(lease)


def history_rows(db):
    """The history rows but for the column a later version adds: what must be kept."""
    return [{k: v for k, v in row.items() if k != LATER_COLUMN}
            for row in db.snapshot()['history'] or []]


def assert_recorded(db, version, owner):
    (record,) = db.storage_records()
    assert record['version'] == version
    assert record['upgraded_by'] == owner
    assert abs(float(record['upgraded_at']) - time.time()) < 60  # the database clock


def test_storage_version_is_0_without_stores_and_1_for_stores_without_a_record(db):
    b = db.make_backend()
    assert b.read_storage_version() == 0
    b.ensure_storage()
    assert b.read_storage_version() == 1  # until a lock holder records the version
    assert not db.storage_records()


def test_new_storage_is_created_at_the_latest_version_and_recorded_under_the_lock(db):
    with backend_workers.a_later_storage_version() as step:
        b = db.make_backend()
        b.ensure_storage()
        if db.is_sql:
            assert LATER_COLUMN in db.column_names(HISTORY_TABLE)  # created with it
        assert upgrade_under_the_lock(b) is True
        assert b.read_storage_version() == step.version == STORAGE_VERSION + 1
    assert_recorded(db, STORAGE_VERSION + 1, 'owner-A')


def test_version_1_storage_is_upgraded_in_place_and_nothing_is_lost(db, backend):
    make_version_1(db, backend)
    history = db.snapshot()['history']
    assert upgrade_under_the_lock(backend) is True
    assert backend.read_storage_version() == STORAGE_VERSION
    assert_recorded(db, STORAGE_VERSION, 'owner-A')
    assert db.snapshot()['history'] == history
    assert backend.read_lock().generation == 2
    # Idempotent: an upgrade of current storage changes nothing, not even the record.
    records = db.storage_records()
    assert upgrade_under_the_lock(db.make_backend(), 'owner-B') is True
    assert db.storage_records() == records
    assert db.snapshot()['history'] == history


def test_a_later_step_alters_the_history_table_and_keeps_its_rows(db, backend):
    lease = backend.acquire('owner-old', LONG)
    backend.record_states(lease, ['old-1'], MARKED)
    assert backend.upgrade_storage(lease) is True
    backend.release(lease)
    history = backend.read_history()
    with backend_workers.a_later_storage_version() as step:
        assert backend.read_storage_version() == step.version - 1
        assert upgrade_under_the_lock(backend) is True
        assert backend.read_storage_version() == step.version
        if db.is_sql:
            assert LATER_COLUMN in db.column_names(HISTORY_TABLE)
        assert backend.read_history() == history
        assert upgrade_under_the_lock(backend, 'owner-B') is True
    assert_recorded(db, STORAGE_VERSION + 1, 'owner-A')


def test_a_step_skips_what_exists_already(db, backend):
    # On MySQL every DDL statement commits by itself: a process can die after a step's ALTER
    # and before its version is recorded.  The next holder must not fail on the column.
    if not db.is_sql:
        pytest.skip('a new Mongo field needs no DDL')
    assert upgrade_under_the_lock(backend) is True
    with db.reader.begin() as conn:
        conn.exec_driver_sql(f'ALTER TABLE {HISTORY_TABLE} ADD COLUMN {LATER_COLUMN} TEXT')
    with backend_workers.a_later_storage_version() as step:
        assert upgrade_under_the_lock(backend) is True
        assert backend.read_storage_version() == step.version


def test_upgrade_storage_with_a_stale_lease_raises_lease_lost_and_changes_nothing(db, stale):
    backend, old, thief, new = stale
    with backend_workers.a_later_storage_version():
        with pytest.raises(LeaseLost):
            backend.upgrade_storage(old)
        assert backend.read_storage_version() == 1
        if db.is_sql:
            assert LATER_COLUMN not in db.column_names(HISTORY_TABLE)
    assert not db.storage_records()


def test_reading_creates_nothing(db):
    b = db.make_backend()
    assert b.read_history() == {}
    assert b.read_lock() is None
    assert b.read_storage_version() == 0
    assert not {LOCK_TABLE, HISTORY_TABLE, SCHEMA_TABLE} & db.store_names()


def _starting_together(db, request, action):
    """``start_writing`` (see backend_workers) by eight processes at once: each creates what
    is missing, takes the lock if it can and upgrades; MIM: eight backends taking turns."""
    if db.is_mim:
        with backend_workers.a_later_storage_version():
            return [backend_workers.start_writing(db.make_backend(), f'racer-{i}', LONG)
                    for i in range(8)]
    return list(request.getfixturevalue('racers').run(db.kind, db.url, action).values())


@pytest.mark.parametrize('storage', ['empty', 'version 1'])
def test_processes_starting_together_upgrade_once_and_lose_nothing(db, backend, storage,
                                                                   request):
    if storage == 'empty':
        db.drop_store(LOCK_TABLE)
        db.drop_store(HISTORY_TABLE)
        db.drop_store(SCHEMA_TABLE)
    else:
        make_version_1(db, backend)
    history = history_rows(db)
    outcome = _starting_together(db, request, 'start_writing_later')
    assert len(outcome) == 8
    # Each one took the lock and found the storage current (True), or lost the race (None);
    # none gave up waiting for a table.
    assert set(outcome) <= {True, None} and True in outcome, outcome
    assert backend.read_storage_version() == STORAGE_VERSION + 1
    assert len(db.storage_records()) == 1
    assert history_rows(db) == history
    if db.is_sql:
        assert LATER_COLUMN in db.column_names(HISTORY_TABLE)


def test_threads_starting_together_upgrade_once_and_lose_nothing(db, backend):
    make_version_1(db, backend)
    history = history_rows(db)
    backends = [db.make_backend(with_session=False) for _ in range(8)]

    def start(i, barrier):
        barrier.wait(DEADLINE)
        return backend_workers.start_writing(backends[i], f'racer-{i}', LONG)

    with backend_workers.a_later_storage_version():
        outcome = run_threads(8, start)
    assert set(outcome) <= {True, None} and True in outcome, outcome
    assert backend.read_storage_version() == STORAGE_VERSION + 1
    assert history_rows(db) == history


#: What a storage upgrade changes for its DDL, and must put back (PostgreSQL, MySQL).
DDL_LOCK_SETTING = {'postgresql': 'SHOW lock_timeout',
                    'mysql': 'SELECT @@SESSION.lock_wait_timeout'}


def test_an_alter_gives_up_behind_a_long_reader_and_restores_the_session(db):
    # While an ALTER waits for its table lock every other read of the table queues behind it
    # (PostgreSQL's lock queue, MySQL's metadata locks), so the wait is bounded: the upgrade
    # gives up, and comes back at the next acquisition.  (SQLite: a write waits for readers
    # anyway, bounded by its busy timeout, as every write does.)
    if db.kind not in DDL_LOCK_SETTING:
        pytest.skip('PostgreSQL and MySQL bound the wait of DDL for a table lock')
    import sqlalchemy as sa
    engine = sa.create_engine(db.url, pool_size=1, max_overflow=0)  # one connection: the app's
    try:
        backend = type(db.make_backend())(engine)
        backend.ensure_storage()
        assert upgrade_under_the_lock(backend) is True
        with engine.connect() as conn:
            setting = conn.exec_driver_sql(DDL_LOCK_SETTING[db.kind]).scalar()
        with backend_workers.a_later_storage_version(), db.reader.connect() as reader:
            reader.exec_driver_sql(f'SELECT * FROM {HISTORY_TABLE}').fetchall()  # keeps its lock
            outcome = run_threads(1, lambda i, barrier: upgrade_under_the_lock(backend))
            assert outcome == [False]
            assert backend.read_storage_version() == STORAGE_VERSION
            reader.rollback()
            assert upgrade_under_the_lock(backend) is True
            assert LATER_COLUMN in db.column_names(HISTORY_TABLE)
        with engine.connect() as conn:
            assert conn.exec_driver_sql(DDL_LOCK_SETTING[db.kind]).scalar() == setting
    finally:
        engine.dispose()


# --- reading ------------------------------------------------------------------------------------

def test_read_lock_is_none_before_first_acquire(backend):
    assert backend.read_lock() is None


def test_read_history_is_empty_mapping_before_any_record(backend):
    history = backend.read_history()
    assert isinstance(history, Mapping)
    assert dict(history) == {}


def test_read_history_returns_every_record_in_one_call(db, backend, lease):
    marked = [f'evo-{i:03d}' for i in range(40)]
    backend.record_states(lease, marked, MARKED)
    backend.record_running(lease, 'evo-running')
    backend.record_running(lease, 'evo-failed')
    backend.record_failure(lease, 'evo-failed', 'Traceback: boom')

    history = db.make_backend().read_history()

    assert set(history) == set(marked) | {'evo-running', 'evo-failed'}
    for evolution_id, record in history.items():
        assert isinstance(record, HistoryRecord)
        assert record.evolution_id == evolution_id
    assert history['evo-000'].state == MARKED
    assert history['evo-running'].state == RUNNING
    assert history['evo-failed'].state == FAILED


def test_read_history_is_one_query(db, backend, lease):
    if not db.is_sql:
        pytest.skip('statements are counted on SQL engines only')
    backend.record_states(lease, [f'evo-{i:03d}' for i in range(25)], MARKED)
    backend.read_history()  # warm up: first-connection dialect queries are not the backend's
    with db.count_statements(backend) as statements:
        history = backend.read_history()
    assert len(history) == 25
    assert len(statements) == 1, statements


# --- acquiring ----------------------------------------------------------------------------------

def test_acquire_on_empty_gives_generation_1(backend):
    lease = backend.acquire('owner-A', LONG)
    assert isinstance(lease, Lease)
    assert lease.name == DEFAULT_LOCK_NAME
    assert lease.owner == 'owner-A'
    assert lease.generation == 1
    assert lease.lease_seconds == LONG


def test_acquire_writes_the_lock_record(db, backend):
    backend.acquire('owner-A', LONG)
    record = db.make_backend().read_lock()
    assert isinstance(record, LockRecord)
    assert record.name == DEFAULT_LOCK_NAME
    assert record.owner == 'owner-A'
    assert record.generation == 1
    assert record.held
    assert record.released_by is None
    for t in (record.acquired_at, record.renewed_at, record.expires_at, record.now):
        assert isinstance(t, float)
    assert record.renewed_at == pytest.approx(record.acquired_at, abs=CLOCK_TOLERANCE)
    assert record.expires_at - record.acquired_at == pytest.approx(LONG, abs=CLOCK_TOLERANCE)


def test_second_owner_gets_none_while_held(db, backend, lease):
    before = db.snapshot()
    assert db.make_backend().acquire('owner-B', LONG) is None
    assert db.snapshot() == before


def test_lock_names_are_independent(db, backend):
    a = backend.acquire('owner-A', LONG, name='lock-a')
    b = db.make_backend().acquire('owner-B', LONG, name='lock-b')
    assert (a.name, a.generation) == ('lock-a', 1)
    assert (b.name, b.generation) == ('lock-b', 1)
    assert backend.read_lock('lock-a').owner == 'owner-A'
    assert backend.read_lock('lock-b').owner == 'owner-B'
    assert backend.read_lock() is None


def test_owner_of_max_length_round_trips(backend):
    owner = 'h' * (MAX_OWNER_LENGTH - 20) + ':4242:' + 'x' * 14
    assert len(owner) == MAX_OWNER_LENGTH
    lease = backend.acquire(owner, LONG)
    assert lease.owner == owner
    assert backend.read_lock().owner == owner


def test_takeover_after_expiry_bumps_generation(db, backend):
    thief = db.make_backend(with_session=False)
    thief.read_lock()  # connected before the clock starts
    old = backend.acquire('owner-A', 1.5)
    old_expiry = backend.read_lock().expires_at
    assert thief.acquire('owner-B', LONG) is None  # still held
    new = wait_until(lambda: thief.acquire('owner-B', LONG), what='takeover')
    assert new.generation == old.generation + 1 == 2
    assert new.owner == 'owner-B'
    record = backend.read_lock()
    assert (record.owner, record.generation) == ('owner-B', 2)
    # taken over only once the old lease had expired, by the same clock
    assert record.acquired_at >= old_expiry - CLOCK_TOLERANCE


def test_release_then_acquire_by_another_owner_bumps_generation(db, backend, lease):
    assert backend.release(lease) is True
    released = backend.read_lock()
    assert released.owner is None
    assert released.released_by == lease.owner  # status shows who let go last
    assert released.generation == 1
    assert not released.held
    assert released.expires_in is None
    other = db.make_backend().acquire('owner-B', LONG)
    assert (other.owner, other.generation) == ('owner-B', 2)


def test_release_twice_returns_false(backend, lease):
    assert backend.release(lease) is True
    assert backend.release(lease) is False


# --- renewing -----------------------------------------------------------------------------------

def test_renew_extends_expiry_and_keeps_generation(backend):
    started = time.monotonic()
    lease = backend.acquire('owner-A', 5.0)
    acquired = backend.read_lock()
    time.sleep(0.1)
    renewed = backend.renew(lease)
    elapsed = time.monotonic() - started
    assert (renewed.name, renewed.owner, renewed.generation, renewed.lease_seconds) == (
        lease.name, lease.owner, lease.generation, lease.lease_seconds)
    record = backend.read_lock()
    # pushed forward by the time that passed: sub-second precision, no rounding to seconds
    assert 0.1 - 0.01 <= record.expires_at - acquired.expires_at <= elapsed + 0.01
    assert record.generation == 1
    assert record.renewed_at > record.acquired_at


def test_renew_after_expiry_succeeds_while_nobody_took_over(backend):
    # Fencing is on (owner, generation): a late heartbeat still owns an unclaimed lock.
    lease = backend.acquire('owner-A', SHORT)
    wait_until(lambda: not backend.read_lock().held, what='expiry')
    renewed = backend.renew(lease)
    assert renewed.generation == lease.generation
    assert backend.read_lock().held


# --- the clock ----------------------------------------------------------------------------------

def test_now_is_close_to_real_time_with_subsecond_precision(backend):
    started = time.monotonic()
    first = backend.now()
    time.sleep(0.05)
    second = backend.now()
    elapsed = time.monotonic() - started
    assert isinstance(first, float)
    assert abs(first - time.time()) < 5
    # advanced by the time that passed: sub-second precision, no rounding to seconds
    assert 0.05 - 0.01 <= second - first <= elapsed + 0.01


def test_acquire_expiry_is_now_plus_lease(backend):
    before = backend.now()
    backend.acquire('owner-A', 7.5)
    after = backend.now()
    record = backend.read_lock()
    assert before + 7.5 - CLOCK_TOLERANCE <= record.expires_at <= after + 7.5 + CLOCK_TOLERANCE
    assert before - CLOCK_TOLERANCE <= record.acquired_at <= after + CLOCK_TOLERANCE


def test_read_lock_reports_now_held_and_expires_in(backend):
    backend.acquire('owner-A', 10.0)
    before = backend.now()
    record = backend.read_lock()
    after = backend.now()
    assert before - CLOCK_TOLERANCE <= record.now <= after + CLOCK_TOLERANCE
    assert record.held
    assert record.expires_in == pytest.approx(record.expires_at - record.now, abs=1e-3)
    assert record.expires_at - after - CLOCK_TOLERANCE <= record.expires_in <= 10.0 + 1e-3


def test_read_lock_reports_expired_lease_as_not_held(backend):
    backend.acquire('owner-A', SHORT)
    record = wait_until(lambda: (lambda r: r if not r.held else None)(backend.read_lock()),
                        what='expiry')
    assert record.owner == 'owner-A'
    assert record.expires_in <= 0


def test_lease_times_come_from_the_database_clock(db, backend, monkeypatch):
    if not db.is_sql:
        pytest.skip('the Ming backend uses the client clock (documented skew tolerance)')
    real_time = time.time
    skewed = lambda: real_time() + 3600.0  # noqa: E731 - this host's clock is an hour fast
    monkeypatch.setattr(time, 'time', skewed)
    try:
        now = backend.now()
        backend.acquire('owner-A', 10.0)
        record = backend.read_lock()
    finally:
        monkeypatch.undo()
    assert abs(now - real_time()) < 5
    assert abs(record.expires_at - (real_time() + 10.0)) < 5


# --- fencing ------------------------------------------------------------------------------------

def _fenced_calls(db):
    """Each fenced write, with the stale lease: every one must raise LeaseLost."""
    return {
        'renew': lambda b, lease: b.renew(lease),
        'record_running_new': lambda b, lease: b.record_running(lease, 'evo-new'),
        'record_running_existing': lambda b, lease: b.record_running(lease, 'evo-1'),
        'apply': lambda b, lease: b.apply(lease, 'evo-1', lambda: db.write_side_effect('evo-1')),
        'record_failure': lambda b, lease: b.record_failure(lease, 'evo-1', 'Traceback'),
        'record_progress': lambda b, lease: b.record_progress(lease, 'evo-1', 5, 10),
        'record_states': lambda b, lease: b.record_states(lease, ['evo-1', 'evo-new'], MARKED),
        'delete_history': lambda b, lease: b.delete_history(lease, ['evo-1', 'evo-2']),
    }


FENCED = ['renew', 'record_running_new', 'record_running_existing', 'apply', 'record_failure',
          'record_progress', 'record_states', 'delete_history']


@pytest.fixture
def stale(db, backend):
    """A's lease expired and B took the lock over: A holds a stale lease."""
    old = backend.acquire('owner-A', SHORT)
    backend.record_running(old, 'evo-1')
    backend.record_states(old, ['evo-2'], MARKED)
    thief, new = take_over(db)
    return backend, old, thief, new


@pytest.mark.parametrize('call', FENCED)
def test_fenced_write_after_takeover_raises_lease_lost(db, stale, call):
    backend, old, thief, new = stale
    before = db.snapshot()
    with pytest.raises(LeaseLost):
        _fenced_calls(db)[call](backend, old)
    assert db.snapshot() == before
    assert thief.read_lock().owner == 'owner-B'
    if call == 'apply' and db.is_sql:
        assert db.count_side_effects('evo-1') == 0


def test_release_after_takeover_returns_false_and_changes_nothing(db, stale):
    backend, old, thief, new = stale
    before = db.snapshot()
    assert backend.release(old) is False
    assert db.snapshot() == before
    assert thief.read_lock().held


def test_fencing_checks_generation_not_only_owner(db, backend):
    # The same owner string acquiring again (e.g. after its lease expired) gets a new
    # generation: the older lease must be dead even though the owner matches.
    old = backend.acquire('same-owner', SHORT)
    _, new = take_over(db, owner='same-owner')
    assert new.generation == old.generation + 1
    before = db.snapshot()
    with pytest.raises(LeaseLost):
        backend.renew(old)
    with pytest.raises(LeaseLost):
        backend.record_running(old, 'evo-1')
    assert backend.release(old) is False
    assert db.snapshot() == before


def test_fenced_write_after_own_release_raises_lease_lost(db, backend, lease):
    assert backend.release(lease)
    before = db.snapshot()
    with pytest.raises(LeaseLost):
        backend.renew(lease)
    with pytest.raises(LeaseLost):
        backend.record_running(lease, 'evo-1')
    assert db.snapshot() == before


def test_fenced_writes_succeed_for_the_new_holder(db, stale):
    backend, old, thief, new = stale
    thief.record_running(new, 'evo-1')
    assert thief.renew(new).generation == new.generation
    assert backend.read_history()['evo-1'].generation == new.generation


# --- break_lock ---------------------------------------------------------------------------------

def test_break_lock_bumps_generation_and_clears_owner(db, backend, lease):
    broken = db.make_backend().break_lock('operator@ops-host')
    assert isinstance(broken, LockRecord)
    assert (broken.owner, broken.generation) == ('owner-A', 1)
    record = backend.read_lock()
    assert record.owner is None
    assert record.generation == 2
    assert record.released_by == 'operator@ops-host'
    assert not record.held


def test_break_lock_fences_the_old_lease(db, backend, lease):
    db.make_backend().break_lock('operator@ops-host')
    before = db.snapshot()
    with pytest.raises(LeaseLost):
        backend.renew(lease)
    with pytest.raises(LeaseLost):
        backend.record_running(lease, 'evo-1')
    assert backend.release(lease) is False
    assert db.snapshot() == before


def test_acquire_after_break_lock(db, backend, lease):
    db.make_backend().break_lock('operator@ops-host')
    new = db.make_backend().acquire('owner-B', LONG)
    assert (new.owner, new.generation) == ('owner-B', 3)


def test_break_lock_of_a_generation_breaks_only_that_one(db, backend, lease):
    other = db.make_backend()
    assert other.break_lock('operator@ops-host', generation=lease.generation + 1) is None
    assert backend.read_lock().owner == lease.owner  # changed hands meanwhile: left alone
    broken = other.break_lock('operator@ops-host', generation=lease.generation)
    assert broken.owner == lease.owner
    assert backend.read_lock().generation == lease.generation + 1


def test_break_lock_never_acquired_returns_none(backend):
    assert backend.break_lock('operator@ops-host') is None


# --- history writes -----------------------------------------------------------------------------

def test_record_running_creates_running_record(backend, lease):
    before = backend.now()
    returned = backend.record_running(lease, 'evo-1', fingerprint='sha256:abc')
    record = backend.read_history()['evo-1']
    assert returned == record
    assert record.state == RUNNING
    assert record.attempts == 1
    assert (record.owner, record.generation) == ('owner-A', 1)
    assert record.fingerprint == 'sha256:abc'
    assert isinstance(record.started_at, float)
    assert before - CLOCK_TOLERANCE <= record.started_at <= backend.now() + CLOCK_TOLERANCE
    assert not record.done


def test_record_running_increments_attempts_across_retries(db, backend, lease):
    assert backend.record_running(lease, 'evo-1').attempts == 1
    backend.record_failure(lease, 'evo-1', 'Traceback 1')
    assert backend.record_running(lease, 'evo-1').attempts == 2
    backend.record_failure(lease, 'evo-1', 'Traceback 2')
    assert backend.release(lease)
    other = db.make_backend()
    new = other.acquire('owner-B', LONG)
    third = other.record_running(new, 'evo-1')
    assert third.attempts == 3
    assert (third.owner, third.generation, third.state) == ('owner-B', 2, RUNNING)
    assert backend.read_history()['evo-1'].attempts == 3


def test_evolution_id_of_max_length_round_trips(backend, lease):
    evolution_id = 'e' * MAX_ID_LENGTH
    backend.record_running(lease, evolution_id)
    assert backend.read_history()[evolution_id].evolution_id == evolution_id


def _real_traceback():
    def inner():
        raise Boom('d\u00e9j\u00e0 vu \u2713 ' + 'x' * 5000)
    try:
        inner()
    except Boom:
        return traceback.format_exc()


def test_record_failure_stores_traceback_text(db, backend, lease):
    backend.record_running(lease, 'evo-1')
    text = _real_traceback()
    assert len(text) > 5000
    returned = backend.record_failure(lease, 'evo-1', text)
    record = db.make_backend().read_history()['evo-1']
    assert returned == record
    assert record.state == FAILED
    assert record.error == text
    assert record.attempts == 1
    assert (record.owner, record.generation) == ('owner-A', 1)
    assert record.finished_at >= record.started_at
    assert record.duration_ms is not None and record.duration_ms >= 0
    assert not record.done


def test_record_failure_without_running_record(db, backend, lease):
    # No precondition in the contract: a failure is recordable even if `running` never was.
    record = backend.record_failure(lease, 'evo-1', 'Traceback')
    assert (record.state, record.error) == (FAILED, 'Traceback')
    assert db.make_backend().read_history()['evo-1'].state == FAILED


def test_apply_records_the_final_progress_and_a_late_progress_write_keeps_it(backend, lease):
    backend.record_running(lease, 'evo-1')
    backend.record_progress(lease, 'evo-1', 13, 22)  # the last throttled write
    record = backend.apply(lease, 'evo-1', lambda: None, final_progress=lambda: (22, 22))
    assert (record.state, record.progress_done, record.progress_total) == (APPLIED, 22, 22)
    backend.record_progress(lease, 'evo-1', 13, 22)  # the heartbeat, late
    record = backend.read_history()['evo-1']
    assert (record.state, record.progress_done, record.progress_total) == (APPLIED, 22, 22)

    backend.record_running(lease, 'evo-2')  # reported nothing: nothing recorded
    record = backend.apply(lease, 'evo-2', lambda: None, final_progress=lambda: None)
    assert (record.progress_done, record.progress_total) == (None, None)


def test_record_progress_stores_progress(backend, lease):
    backend.record_running(lease, 'evo-1')
    backend.record_progress(lease, 'evo-1', 5, 10)
    record = backend.read_history()['evo-1']
    assert (record.progress_done, record.progress_total) == (5, 10)
    backend.record_progress(lease, 'evo-1', 7, 10)
    record = backend.read_history()['evo-1']
    assert (record.progress_done, record.progress_total, record.state) == (7, 10, RUNNING)


def test_record_states_adds_records_and_keeps_done_ones(db, backend, lease):
    backend.record_running(lease, 'applied-1')
    backend.apply(lease, 'applied-1', lambda: None)
    backend.record_states(lease, ['marked-1'], MARKED)
    backend.record_running(lease, 'failed-1')
    backend.record_failure(lease, 'failed-1', 'Traceback')
    backend.record_running(lease, 'running-1')
    kept = {k: v for k, v in backend.read_history().items() if k in ('applied-1', 'marked-1')}

    ids = ['applied-1', 'marked-1', 'failed-1', 'running-1', 'new-1']
    backend.record_states(lease, (i for i in ids), ADOPTED)  # any iterable, even a generator

    history = db.make_backend().read_history()
    assert set(history) == set(ids)
    assert history['applied-1'] == kept['applied-1']
    assert history['marked-1'] == kept['marked-1']
    for evolution_id in ('failed-1', 'running-1', 'new-1'):
        assert history[evolution_id].state == ADOPTED
        assert history[evolution_id].done
        # "when" for status: a record made without running starts and finishes at once
        # (PostgreSQL's clock_timestamp() moves on between two columns of one statement)
        record = history[evolution_id]
        assert 0 <= record.finished_at - record.started_at < CLOCK_TOLERANCE
        assert record.duration_ms == 0.0
        assert history[evolution_id].attempts == 0


def test_record_states_refuses_states_that_are_not_done(backend, lease):
    with pytest.raises(ValueError, match="'running'"):
        backend.record_states(lease, ['evo-1'], RUNNING)
    assert backend.read_history() == {}


def test_delete_history_returns_how_many_were_deleted(db, backend, lease):
    backend.record_states(lease, ['a', 'b', 'c'], MARKED)
    assert backend.delete_history(lease, iter(['a', 'b', 'not-there'])) == 2
    assert set(db.make_backend().read_history()) == {'c'}
    assert backend.delete_history(lease, []) == 0


# --- apply --------------------------------------------------------------------------------------

def test_apply_commits_work_and_applied_record(db, backend, lease):
    backend.record_running(lease, 'evo-1')
    calls = []

    def work():
        calls.append(1)
        db.write_side_effect('evo-1')

    returned = backend.apply(lease, 'evo-1', work, fingerprint='sha256:abc')
    assert calls == [1]
    assert db.count_side_effects('evo-1') == 1
    record = db.make_backend().read_history()['evo-1']
    assert returned == record
    assert record.state == APPLIED
    assert record.done
    assert record.attempts == 1
    assert (record.owner, record.generation) == ('owner-A', 1)
    assert record.fingerprint == 'sha256:abc'
    assert record.finished_at >= record.started_at
    assert record.duration_ms is not None and record.duration_ms >= 0
    assert record.error is None


def test_apply_commits_unflushed_session_work(db, backend, lease):
    if not db.is_sql:
        pytest.skip('SQL only: the transaction manager flushes the session at commit')
    backend.record_running(lease, 'evo-1')
    backend.apply(lease, 'evo-1', lambda: db.write_side_effect('evo-1', flush=False))
    assert db.count_side_effects('evo-1') == 1


def test_apply_without_running_record_records_applied(db, backend, lease):
    # The runner writes `running` first, but the contract sets no such precondition (the CLI
    # or a caller that skipped record_running must still get an `applied` record).
    record = backend.apply(lease, 'evo-1', lambda: db.write_side_effect('evo-1'))
    assert record.state == APPLIED
    assert db.make_backend().read_history()['evo-1'].state == APPLIED
    assert db.count_side_effects('evo-1') == 1


def test_apply_clears_error_of_an_earlier_failure(backend, lease):
    backend.record_running(lease, 'evo-1')
    backend.record_failure(lease, 'evo-1', 'Traceback')
    backend.record_running(lease, 'evo-1')
    record = backend.apply(lease, 'evo-1', lambda: None)
    assert (record.state, record.attempts, record.error) == (APPLIED, 2, None)


def test_apply_work_raising_propagates_unchanged_and_records_nothing(db, backend, lease):
    backend.record_running(lease, 'evo-1')
    before = db.snapshot()
    error = Boom('evolution failed')

    def work():
        db.write_side_effect('evo-1')
        raise error

    with pytest.raises(Boom) as raised:
        backend.apply(lease, 'evo-1', work)
    assert raised.value is error
    record = backend.read_history()['evo-1']
    assert record.state == RUNNING  # not applied, and not failed: record_failure does that
    if db.is_sql:
        assert db.count_side_effects('evo-1') == 0
        assert db.snapshot() == before
    # MongoDB: the flushed side effect stays (at-least-once); nothing more is promised.


def test_apply_work_raising_leaves_lease_and_session_usable(db, backend, lease):
    backend.record_running(lease, 'evo-1')

    def failing():
        db.write_side_effect('evo-1')
        raise Boom()

    with pytest.raises(Boom):
        backend.apply(lease, 'evo-1', failing)
    assert backend.renew(lease).generation == 1
    backend.record_failure(lease, 'evo-1', 'Traceback')
    backend.record_running(lease, 'evo-1')
    backend.apply(lease, 'evo-1', lambda: db.write_side_effect('evo-1-retry'))
    assert backend.read_history()['evo-1'].state == APPLIED
    assert db.count_side_effects('evo-1-retry') == 1


def test_apply_lease_stolen_during_work_raises_lease_lost(db, backend):
    lease = backend.acquire('owner-A', SHORT)
    backend.record_running(lease, 'evo-1')
    thief = db.make_backend(with_session=False)
    stolen = []

    def work():
        # The evolution outlives its lease (a long pause without heartbeat) and another
        # process takes the lock over; then the evolution writes.
        stolen.append(wait_until(lambda: thief.acquire('owner-B', LONG), what='takeover'))
        db.write_side_effect('evo-1')

    with pytest.raises(LeaseLost):
        backend.apply(lease, 'evo-1', work)
    assert stolen and stolen[0].generation == 2
    record = backend.read_history()['evo-1']
    assert record.state != APPLIED
    assert thief.read_lock().owner == 'owner-B'
    if db.is_sql:
        # atomic_apply: the work is rolled back with everything else
        assert db.count_side_effects('evo-1') == 0
        assert (record.state, record.generation) == (RUNNING, 1)


# --- legacy (tgext.evolve 0.0.5) ----------------------------------------------------------------

def test_read_legacy_none_without_legacy_store(db):
    b = db.make_backend()
    assert b.read_legacy() is None  # before ensure_storage: no table at all
    b.ensure_storage()
    assert b.read_legacy() is None


def test_read_legacy_none_when_legacy_store_empty(db, backend):
    db.create_legacy([])
    assert backend.read_legacy() is None


def test_read_legacy_reads_version_and_lock_holder(db, backend):
    if db.is_sql:
        db.create_legacy([('version', 'add_slugs'), ('lock', '1234')])
    else:
        db.create_legacy([{'type': 'version', 'current': 'add_slugs'},
                          {'type': 'lock', 'process': 1234}])
    assert backend.read_legacy() == LegacyState('add_slugs', '1234')


def test_read_legacy_version_without_lock(db, backend):
    if db.is_sql:
        db.create_legacy([('version', 'add_slugs')])  # 0.0.5 deletes its lock row on unlock
    else:
        db.create_legacy([{'type': 'version', 'current': 'add_slugs'},
                          {'type': 'lock', 'process': None}])  # 0.0.5 sets process None
    assert backend.read_legacy() == LegacyState('add_slugs', None)


def test_read_legacy_works_before_ensure_storage(db):
    if db.is_sql:
        db.create_legacy([('version', 'add_slugs')])
    else:
        db.create_legacy([{'type': 'version', 'current': 'add_slugs'}])
    assert db.make_backend().read_legacy() == LegacyState('add_slugs', None)


# --- many acquirers at once ---------------------------------------------------------------------

def _prepare_lock(db, backend, state):
    """Put the lock in ``state`` and return the generation the race winner must get."""
    if state == 'empty':
        return 1
    lease = backend.acquire('owner-previous', SHORT if state == 'expired' else LONG)
    if state == 'released':
        assert backend.release(lease)
    else:
        wait_until(lambda: not backend.read_lock().held, what='expiry')
    return 2


@pytest.mark.parametrize('state', ['empty', 'released', 'expired'])
def test_concurrent_acquire_processes_exactly_one_wins(db, backend, state, request):
    generation = _prepare_lock(db, backend, state)
    if db.is_mim:
        # MIM exists only inside this process and is not thread-safe: the racers can only be
        # separate backend instances taking turns.
        outcome = {}
        for i in range(8):
            lease = db.make_backend().acquire(f'racer-{i}', LONG)
            outcome[f'racer-{i}'] = None if lease is None else lease.generation
    else:
        outcome = request.getfixturevalue('racers').run(db.kind, db.url, 'acquire')
    winners = {owner: gen for owner, gen in outcome.items() if gen is not None}
    assert len(outcome) == 8
    assert len(winners) == 1, outcome
    (owner, won_generation), = winners.items()
    assert won_generation == generation
    record = backend.read_lock()
    assert (record.owner, record.generation) == (owner, generation)


@pytest.mark.parametrize('state', ['empty', 'released', 'expired'])
def test_concurrent_acquire_threads_sharing_one_backend_exactly_one_wins(db, backend, state):
    # MIM itself is not thread-safe; the backend must serialize its own MIM calls.
    generation = _prepare_lock(db, backend, state)
    shared = db.make_backend(with_session=False)

    def acquire(i, barrier):
        barrier.wait(DEADLINE)
        return shared.acquire(f'racer-{i}', LONG)

    leases = run_threads(8, acquire)
    winners = [lease for lease in leases if lease is not None]
    assert len(winners) == 1, leases
    assert winners[0].generation == generation
    assert backend.read_lock().owner == winners[0].owner


# --- process life cycle -------------------------------------------------------------------------

def test_dispose_after_fork_leaves_the_parent_connections_working(db, backend):
    # gunicorn --preload / uWSGI fork after the app (and its backend) exist.  The child must be
    # able to use the backend after dispose_after_fork(), and must not have closed the
    # connections it inherited: they are the parent's too.
    backend.read_history()  # the parent now holds a pooled connection / client socket
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            backend.dispose_after_fork()
            code = 0 if backend.acquire('child', LONG) is not None else 1
        except BaseException:
            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)
    end = time.monotonic() + DEADLINE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > end:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail('the forked child did not finish')
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    record = backend.read_lock()  # the parent's inherited connection still works
    if not db.is_mim:  # a MIM child writes to its own copy of the memory
        assert record.owner == 'child'
    assert backend.read_history() == {}


def test_close_leaves_the_application_session_alone(db, backend):
    # close() releases the backend's own connections, not the application's: an object the
    # app has pending in its session must still be there.
    db.write_side_effect('pending', flush=False)
    pending = db.pending_objects()
    assert len(pending) == 1
    backend.close()
    assert db.pending_objects() == pending
