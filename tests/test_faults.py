"""Faults tgext.evolve must survive (issue 4, items 1-5, 7, 8; item 6 is test_gunicorn.py).

SQL databases: real ``tests/procapp.py`` processes on SQLite, PostgreSQL and MariaDB, hurt for
real (SIGKILL, SIGSTOP, a database that is not there yet, ``pg_terminate_backend`` / ``KILL``);
each scenario lives in ``fault_scenarios.py`` (``bench/faults.py`` repeats them) and returns an
:class:`~fault_scenarios.Outcome` that the tests below judge.  The settings are short (a 2 s
lease, 0.2 s poll interval) and every wait has a deadline.

MongoDB (Ming's MIM, or a real server when configured): one process cannot be killed or paused
in parts, so two runners with distinct owners stand for two processes, and a backend that
stops answering stands for a paused one.  MongoDB evolutions are at-least-once (documented);
what is asserted there is what the history promises.
"""
import logging
import threading
import time

import pytest
from pymongo.errors import AutoReconnect

import conftest
import fault_scenarios
from fault_scenarios import LEASE, POLL_INTERVAL, TAKEOVER_MARGIN
from polling import wait_until
from tgext.evolve import Evolution
from tgext.evolve.records import APPLIED, FAILED, RUNNING
from tgext.evolve.options import Settings
from tgext.evolve.runner import Runner

pytestmark = pytest.mark.slow


@pytest.fixture(params=['postgresql', 'mysql'])
def server_sql_url(request):
    """This run's PostgreSQL or MySQL database, emptied: databases with connections to kill."""
    url = request.getfixturevalue(f'{request.param}_database_url')
    conftest.empty_sql_database(url)
    return url


@pytest.fixture
def sqlite_url(sqlite_database_url):
    conftest.empty_sql_database(sqlite_database_url)
    return sqlite_database_url


def owner_of(outcome, name):
    return outcome.process(name).report['owner']


# --- 1. the leader is killed in the middle of an evolution ---------------------------------------

def test_leader_killed_mid_evolution_is_taken_over_and_leaves_no_trace(sql_url, tmp_path):
    outcome = fault_scenarios.leader_killed(sql_url, tmp_path)

    # Also: one takeover, within lease + poll_interval (+ margin) of the kill; no survivor
    # logged trouble.
    assert outcome.problems() == []
    # e2 ran twice: the killed attempt (its row was written, not committed) and the takeover's;
    # one row is in the database.
    e2 = outcome.history['e2']
    assert (e2.attempts, outcome.side_effects['e2']) == (2, 1)
    assert e2.owner != owner_of(outcome, outcome.measures['leader'])
    assert outcome.measures['takeover_in'] <= LEASE + POLL_INTERVAL + TAKEOVER_MARGIN


# --- 2. the leader is paused past its lease, then resumes ------------------------------------

def test_paused_leader_neither_commits_nor_starts_another_evolution(sql_url, tmp_path):
    outcome = fault_scenarios.leader_paused(sql_url, tmp_path)

    # Also: the history did not change when the leader resumed; it applied e1 only.
    assert outcome.problems() == []
    leader = outcome.process(outcome.measures['leader'])
    assert {outcome.history[i].owner for i in ('e2', 'e3')} != {leader.report['owner']}
    assert leader.log_lines("lock lost while 'e2' ran: its work was rolled back")
    assert not leader.log_lines("evolving 'e3'")
    assert outcome.side_effects == {'e1': 1, 'e2': 1, 'e3': 1}


# --- 3. the database is unreachable at start-up ------------------------------------------------

def test_database_unreachable_at_start_is_waited_for_with_backoff(sql_url, tmp_path):
    outcome = fault_scenarios.unreachable_at_start(sql_url, tmp_path)

    # Also, per process: 503s answered at once during the outage; the outage and its end
    # logged once each; retries no more frequent than a doubling backoff allows.
    assert outcome.problems() == []
    for process in outcome.processes:
        assert process.observed == [503, 200], process.name
        assert not process.log_lines('Traceback'), process.name
        assert outcome.measures['retries'][process.name] >= 2


# --- 4. the database connection is lost -----------------------------------------------------

def test_connection_lost_mid_evolution_rolls_back_and_retries(server_sql_url, tmp_path):
    outcome = fault_scenarios.connection_lost(server_sql_url, tmp_path, 'evolution')

    # Also: nothing logged as an error (the evolution was retried, not recorded as failed) and
    # the lock was not left behind.
    assert outcome.problems() == []
    e1 = outcome.history['e1']
    assert (e1.attempts, outcome.side_effects['e1']) == (2, 1)
    leader = outcome.process(outcome.measures['leader'])
    assert len(leader.log_lines('database unavailable')) == 1


def test_heartbeat_connection_lost_is_reconnected_without_losing_the_lease(server_sql_url,
                                                                          tmp_path):
    outcome = fault_scenarios.connection_lost(server_sql_url, tmp_path, 'heartbeat')

    # Also: the leader kept its lease (one acquisition) and committed e1 itself.
    assert outcome.problems() == []
    assert outcome.measures['terminated'] >= 1
    assert outcome.history['e1'].attempts == 1
    leader = outcome.process(outcome.measures['leader'])
    assert not leader.log_lines('lock lost|database unavailable')


# --- 5. an evolution raises ----------------------------------------------------------------

def test_failing_evolution_blocks_every_process_until_a_fixed_restart(sql_url, tmp_path):
    outcome = fault_scenarios.evolution_raises(sql_url, tmp_path, 'block')

    # Also: e2 recorded failed with its traceback and its row rolled back; at most one attempt
    # per process start and none while watched afterwards.  Then the fixed restart applied it.
    assert outcome.problems() == []
    failed = outcome.measures['failed_record']
    assert 'Traceback' in failed.error
    assert 1 <= failed.attempts <= sum(outcome.measures['attempts_per_process'].values())
    for process in outcome.measures['first_start']:
        assert process.observed == [503], process.name
        assert process.report['phase'] == 'failed'
    assert outcome.history['e2'].attempts == failed.attempts + 1


def test_failing_evolution_with_on_failure_serve_lets_every_process_serve(sqlite_url, tmp_path):
    outcome = fault_scenarios.evolution_raises(sqlite_url, tmp_path, 'serve', restart=False)

    assert outcome.problems() == []
    # A process that first asked after the failure settled serves at once.
    assert all(observed in ([503, 200], [200]) for observed in outcome.observed.values()), (
        outcome.observed)
    assert all(p.report['phase'] == 'serving-after-failure'
               for p in outcome.measures['first_start'])
    assert outcome.history['e2'].state == FAILED
    assert 'e3' not in outcome.history  # it waits behind the failed one


# --- 7. many processes ---------------------------------------------------------------------

def test_32_processes_at_once(sql_url, tmp_path):
    outcome = fault_scenarios.start_together(sql_url, tmp_path, 32)

    # Also: every process observed exactly 503 then 200, and none logged an error or a
    # tgext.evolve warning.
    assert outcome.problems() == []
    assert len(outcome.observed) == 32
    assert outcome.side_effects == {'e1': 1, 'e2': 1, 'e3': 1}


class CountingEvolution(Evolution):
    evolution_id = 'e1'

    def __init__(self):
        self.runs = 0

    def evolve(self):
        self.runs += 1


@pytest.fixture
def locked_sqlite(sqlite_url):
    """``(engine, writer)``: an engine with a 0.05 s busy timeout (5 s by default) on a file
    that ``writer`` holds locked with ``BEGIN EXCLUSIVE``, as another program could."""
    import sqlite3

    import sqlalchemy as sa

    from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend

    engine = sa.create_engine(sqlite_url, connect_args={'timeout': 0.05})
    SQLAlchemyBackend(engine).ensure_storage()
    writer = sqlite3.connect(sa.make_url(sqlite_url).database, isolation_level=None)
    writer.execute('BEGIN EXCLUSIVE')
    try:
        yield engine, writer
    finally:
        writer.close()
        engine.dispose()


def run_behind_a_locked_file(locked_sqlite, caplog, lease, until):
    """Start a runner on the locked file, wait for ``until(messages)``, unlock, wait for the
    runner to serve; return the runner and its evolution."""
    from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend

    engine, writer = locked_sqlite
    evolution = CountingEvolution()
    runner = Runner(SQLAlchemyBackend(engine), [evolution],
                    Settings(lease=lease, poll_interval=0.05))
    with caplog.at_level(logging.DEBUG, logger='tgext.evolve'):
        runner.start()
        try:
            wait_until(lambda: until([r.getMessage() for r in caplog.records]),
                       'the runner finding the database busy')
            assert not runner.state.open
            writer.execute('COMMIT')
            wait_until(lambda: runner.state.open, 'the runner serving')
        finally:
            runner.stop(MONGO_DEADLINE)
    return runner, evolution


def test_sqlite_writer_holding_the_file_briefly_is_contention_not_an_outage(locked_sqlite,
                                                                           caplog):
    # What 32 processes on one SQLite file can do to each other: a write keeps the file
    # locked past the driver's busy timeout.
    runner, evolution = run_behind_a_locked_file(
        locked_sqlite, caplog, lease=2,
        until=lambda messages: any('database busy' in m for m in messages))

    assert evolution.runs == 1
    assert runner.backend.read_history()['e1'].state == APPLIED
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_sqlite_file_locked_for_longer_than_a_lease_is_reported_once(locked_sqlite, caplog):
    runner, evolution = run_behind_a_locked_file(
        locked_sqlite, caplog, lease=0.3,
        until=lambda messages: any('database busy for' in m for m in messages))

    assert evolution.runs == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert 'another connection keeps its write lock (database is locked)' in warnings[0]
    assert 'database unavailable' not in warnings[0]
    assert [r.getMessage() for r in caplog.records].count('database no longer busy') == 1


# --- 8. interrupted table creation ----------------------------------------------------------

@pytest.mark.parametrize('kind', ['sqlite', 'mysql'])
def test_half_created_storage_is_completed_by_processes_starting_together(kind, request,
                                                                         tmp_path):
    # SQLite and MySQL commit each CREATE TABLE on its own, so a creator killed between the
    # two leaves the lock table alone (PostgreSQL creates both in one transaction).
    url = request.getfixturevalue(f'{kind}_database_url')
    conftest.empty_sql_database(url)
    outcome = fault_scenarios.start_together(url, tmp_path, 4, storage='half-created')

    assert outcome.problems() == []


# --- MongoDB: two runners in one process ------------------------------------------------------

MONGO_SETTINGS = Settings(lease=0.6, poll_interval=0.05)
MONGO_DEADLINE = 30.0


@pytest.fixture
def mongo(mongo_url):
    harness = conftest.MongoHarness('mim' if mongo_url.startswith('mim:') else 'mongodb',
                                    mongo_url)
    try:
        yield harness
    finally:
        harness.close()


class WritingEvolution(Evolution):
    """Writes one document through the app's Ming session; optionally parks or fails first."""

    def __init__(self, evolution_id, harness, park=False, transient_failures=0):
        self.evolution_id = evolution_id
        self.harness = harness
        self.entered = threading.Event()
        self.resume = threading.Event()
        if not park:
            self.resume.set()
        self.transient_failures = transient_failures

    def evolve(self):
        self.entered.set()
        if not self.resume.wait(MONGO_DEADLINE):
            raise RuntimeError(f'{self.evolution_id} was never resumed')
        if self.transient_failures:
            self.transient_failures -= 1
            raise AutoReconnect('connection closed')  # what pymongo raises on a lost socket
        self.harness.write_side_effect(self.evolution_id)


class FailingEvolution(Evolution):
    def __init__(self, evolution_id):
        self.evolution_id = evolution_id

    def evolve(self):
        raise RuntimeError(f'{self.evolution_id} fails on purpose')


class PausableBackend:
    """A backend whose process can be paused: while paused every call waits (the heartbeat
    cannot renew), as in a process stopped with SIGSTOP."""

    def __init__(self, backend):
        self._backend = backend
        self.running = threading.Event()
        self.running.set()

    def __getattr__(self, name):
        attribute = getattr(self._backend, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if not self.running.wait(MONGO_DEADLINE):
                raise RuntimeError('never resumed')
            return attribute(*args, **kwargs)
        return call


def evolutions_for(harness, **e2):
    return [WritingEvolution('e1', harness), WritingEvolution('e2', harness, **e2),
            WritingEvolution('e3', harness)]


def started(runner):
    runner.start()
    return runner


def test_mongo_dead_holder_is_taken_over_after_its_lease(mongo):
    dead = mongo.make_backend()
    dead.ensure_storage()
    lease = dead.acquire('dead-host:1:0', MONGO_SETTINGS.lease)
    dead.record_running(lease, 'e1')
    dead_since = time.time()
    runner = started(Runner(mongo.make_backend(), evolutions_for(mongo), MONGO_SETTINGS))
    try:
        wait_until(lambda: runner.state.open, 'the survivor serving')
    finally:
        runner.stop(MONGO_DEADLINE)
    history = runner.backend.read_history()
    assert {i: (r.state, r.owner) for i, r in history.items()} == {
        i: (APPLIED, runner.owner) for i in ('e1', 'e2', 'e3')}
    assert history['e1'].attempts == 2
    lock = runner.backend.read_lock()
    assert (lock.generation, lock.owner) == (2, None)
    assert lock.acquired_at - dead_since <= (MONGO_SETTINGS.lease + MONGO_SETTINGS.poll_interval
                                             + TAKEOVER_MARGIN)


def test_mongo_paused_holder_records_nothing_and_starts_nothing(mongo):
    paused_evolutions = evolutions_for(mongo, park=True)
    paused_backend = PausableBackend(mongo.make_backend())
    paused = started(Runner(paused_backend, paused_evolutions, MONGO_SETTINGS))
    taker = None
    try:
        assert paused_evolutions[1].entered.wait(MONGO_DEADLINE)
        paused_backend.running.clear()  # SIGSTOP
        taker = started(Runner(mongo.make_backend(), evolutions_for(mongo), MONGO_SETTINGS))
        wait_until(lambda: taker.state.open, 'the other runner taking over and finishing')
        taker.stop(MONGO_DEADLINE)
        before_resume = taker.backend.read_history()
        paused_backend.running.set()  # SIGCONT
        paused_evolutions[1].resume.set()
        wait_until(lambda: paused.state.open, 'the resumed runner serving')
    finally:
        paused_backend.running.set()
        paused_evolutions[1].resume.set()
        paused.stop(MONGO_DEADLINE)
        if taker is not None:
            taker.stop(MONGO_DEADLINE)
    history = taker.backend.read_history()
    assert history == before_resume
    assert (history['e2'].owner, history['e3'].owner) == (taker.owner, taker.owner)
    assert paused.applied == ['e1']
    assert not paused_evolutions[2].entered.is_set()
    assert mongo.count_side_effects('e3') == 1


def test_mongo_connection_lost_in_an_evolution_is_retried_not_failed(mongo, caplog):
    evolutions = [WritingEvolution('e1', mongo, transient_failures=1)]
    runner = started(Runner(mongo.make_backend(), evolutions, MONGO_SETTINGS))
    with caplog.at_level(logging.INFO, logger='tgext.evolve'):
        try:
            wait_until(lambda: runner.state.open, 'the runner serving')
        finally:
            runner.stop(MONGO_DEADLINE)
    record = runner.backend.read_history()['e1']
    assert (record.state, record.attempts) == (APPLIED, 2)
    assert runner.backend.read_lock().owner is None
    assert len([r for r in caplog.records if 'database unavailable' in r.getMessage()]) == 1
    assert mongo.count_side_effects('e1') == 1


def test_mongo_failing_evolution_blocks_until_a_fixed_restart(mongo):
    first = started(Runner(mongo.make_backend(),
                           [WritingEvolution('e1', mongo), FailingEvolution('e2')],
                           MONGO_SETTINGS))
    try:
        wait_until(lambda: first.state.phase == 'failed', 'the failure blocking')
    finally:
        first.stop(MONGO_DEADLINE)
    failed = first.backend.read_history()['e2']
    assert (failed.state, failed.attempts, first.state.open) == (FAILED, 1, False)
    assert 'RuntimeError: e2 fails on purpose' in failed.error
    restarted = started(Runner(mongo.make_backend(), evolutions_for(mongo), MONGO_SETTINGS))
    try:
        wait_until(lambda: restarted.state.open, 'the fixed restart serving')
    finally:
        restarted.stop(MONGO_DEADLINE)
    history = restarted.backend.read_history()
    assert (history['e2'].state, history['e2'].attempts) == (APPLIED, 2)
    assert restarted.applied == ['e2', 'e3']
    assert RUNNING not in {r.state for r in history.values()}
