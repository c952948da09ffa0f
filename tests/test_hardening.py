"""Issue 12's hardening: evolutions that escape their transaction, failures the database cannot
store, BaseException from evolve(), what polling transfers, and SQLite's expected waits.

Each test is a case a hostile (or a 0.0.5) user ran into; each runs on every database the case
concerns.
"""
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
import transaction

import conftest
from polling import wait_until
from tgext.evolve import BatchEvolution, Evolution
from tgext.evolve.options import Settings
from tgext.evolve.records import APPLIED, FAILED
from tgext.evolve.runner import AGAIN, Runner

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=conftest.SQL_KINDS)
def sql(request):
    """A SQLHarness on this run's database of each SQL kind, emptied."""
    yield from conftest.emptied_sql_harness(request)


def settings(**overrides):
    return Settings(**{'lease': 5.0, 'poll_interval': 0.05, **overrides})


def run_steps(runner, limit=10):
    """Step a runner in the test's thread until it has nothing more to do at once."""
    outcome = AGAIN
    for _ in range(limit):
        outcome = runner.step()
        if outcome != AGAIN:
            return outcome
    raise AssertionError(f'the runner still steps again after {limit} steps')


def evolution(evolution_id, evolve):
    """An Evolution whose evolve() is ``evolve()``."""
    return type(f'E_{evolution_id}', (Evolution,), {
        'evolution_id': evolution_id, 'evolve': lambda self: evolve()})()


# --- 1 and 2: commit or abort of the evolution's transaction from inside evolve() ------------

def _commit_then_raise(db):
    db.write_side_effect('escaped')
    transaction.commit()
    raise RuntimeError('after the commit')


def _commit_without_flush(db):
    db.write_side_effect('escaped', flush=False)
    transaction.commit()


def _abort(db):
    db.write_side_effect('escaped')
    transaction.abort()


def _abort_caught_then_commit(db):
    db.write_side_effect('escaped')
    try:
        transaction.abort()
    except Exception:
        pass
    db.write_side_effect('escaped')
    transaction.commit()


def _commit_caught_then_write(db):
    db.write_side_effect('escaped')
    try:
        transaction.commit()
    except Exception:
        pass
    db.write_side_effect('escaped')


def _begin(db):
    db.write_side_effect('escaped')
    transaction.begin()
    db.write_side_effect('escaped')


def _session_commit(db):
    db.write_side_effect('escaped')
    db.session.commit()


ESCAPES = {
    'session-commit': (_session_commit, 'DBSession.commit()'),
    'commit-then-raise': (_commit_then_raise, 'transaction.commit()'),
    'commit-without-flush': (_commit_without_flush, 'transaction.commit()'),
    'abort': (_abort, 'transaction.abort()'),
    'abort-caught-then-commit': (_abort_caught_then_commit, 'transaction.abort()'),
    'commit-caught-then-write': (_commit_caught_then_write, 'transaction.commit()'),
    'begin': (_begin, 'transaction.abort()'),
}


@pytest.mark.parametrize('escape', sorted(ESCAPES))
def test_evolve_that_commits_or_aborts_its_transaction_is_refused(sql, escape):
    body, called = ESCAPES[escape]
    runner = Runner(sql.make_backend(), [evolution('e1', lambda: body(sql))], settings())

    run_steps(runner)

    assert sql.count_side_effects('escaped') == 0  # nothing of it committed
    record = sql.make_backend().read_history()['e1']
    assert record.state == FAILED
    assert f'called {called}: refused, nothing of it is committed' in record.error
    assert 'remove transaction.commit(), transaction.abort()' in record.error
    assert runner.failure is not None and runner.failure.evolution_id == 'e1'


def test_savepoints_inside_evolve_keep_working(sql):
    # The guard joined to the transaction must not make savepoints fail.
    if sql.kind == 'sqlite':
        pytest.skip('zope.sqlalchemy offers no savepoints on SQLite')
    def evolve():
        sql.write_side_effect('kept')
        savepoint = transaction.savepoint()
        sql.write_side_effect('undone')
        savepoint.rollback()

    runner = Runner(sql.make_backend(), [evolution('e1', evolve)], settings())
    run_steps(runner)

    assert sql.make_backend().read_history()['e1'].state == APPLIED
    assert (sql.count_side_effects('kept'), sql.count_side_effects('undone')) == (1, 0)


class CommittingBatches(BatchEvolution):
    """The low-level form, committing each batch itself as 0.0.5 users would."""
    evolution_id = 'batches'
    harness = None

    def batch(self, cursor, size):
        self.harness.write_side_effect('escaped')
        transaction.commit()
        return (cursor or 0) + 1 if (cursor or 0) < 3 else None


class CommittingItems(BatchEvolution):
    evolution_id = 'items'
    harness = None

    def collection(self):
        return self.harness.session.query(conftest.SideEffect)

    def process(self, item):
        item.key = 'escaped'
        transaction.commit()


@pytest.mark.parametrize('cls', [CommittingBatches, CommittingItems])
def test_batch_that_commits_its_transaction_is_refused_at_once(sql, cls, caplog):
    if cls is CommittingItems:
        with sql.engine.begin() as conn:
            conn.execute(conftest.SideEffect.__table__.insert(), [{'key': 'item'}] * 3)
    batched = cls()
    batched.harness = sql
    runner = Runner(sql.make_backend(), [batched], settings())

    with caplog.at_level(logging.WARNING, logger='tgext.evolve'):
        run_steps(runner)

    assert sql.count_side_effects('escaped') == 0
    record = sql.make_backend().read_history(batches=True)[cls.evolution_id]
    assert record.state == FAILED
    assert 'called transaction.commit(): refused' in record.error
    assert record.batches_done == 0
    # Refused every time alike: not retried at half size like a batch that failed.
    assert not [r for r in caplog.records if 'retrying with' in r.getMessage()]


def run_worker(url, tmp_path, name, scenario, lease=1.0, **job):
    """One real process of ``hardening_worker.py``; returns (exit code, its result or None)."""
    result = tmp_path / f'{name}.json'
    job = {'url': url, 'scenario': scenario, 'lease': lease, 'result': str(result), **job}
    with open(tmp_path / f'{name}.log', 'w') as log:
        code = subprocess.run([sys.executable, os.path.join(HERE, 'hardening_worker.py'),
                               json.dumps(job)], stdout=log, stderr=subprocess.STDOUT,
                              timeout=120).returncode
    return code, json.loads(result.read_text()) if result.exists() else None


@pytest.mark.slow
def test_commit_then_kill_is_never_applied_twice_across_processes(sql, tmp_path):
    # Process A commits from inside evolve() and is killed before tgext.evolve records
    # anything; process B takes over (or retries).  Before: two copies of the work.
    first = run_worker(sql.url, tmp_path, 'a', 'commit-then-die')
    second = run_worker(sql.url, tmp_path, 'b', 'commit-then-die')

    assert sql.count_side_effects('escaped') == 0
    record = sql.make_backend().read_history()['commit-then-die']
    assert (record.state, record.attempts) == (FAILED, 2)
    assert 'called transaction.commit(): refused' in record.error
    assert first == second == (0, {'phase': 'failed', 'thread_alive': True})


# --- 7. SystemExit, KeyboardInterrupt, GeneratorExit from evolve() ---------------------------

def _raiser(kind):
    def evolve():
        raise kind(4) if kind is SystemExit else kind()
    return evolve


BASE_EXCEPTIONS = [SystemExit, KeyboardInterrupt, GeneratorExit]


@pytest.mark.parametrize('on_failure', ['block', 'serve'])
@pytest.mark.parametrize('kind', BASE_EXCEPTIONS, ids=lambda k: k.__name__)
def test_base_exception_from_evolve_is_a_failure_the_thread_survives(db, kind, on_failure,
                                                                     caplog):
    def evolve():
        db.write_side_effect('rolled-back', flush=db.is_sql)
        _raiser(kind)()

    runner = Runner(db.make_backend(), [evolution('e1', evolve), evolution('e2', lambda: None)],
                    settings(on_failure=on_failure))
    expected = 'failed' if on_failure == 'block' else 'serving-after-failure'
    with caplog.at_level(logging.INFO, logger='tgext.evolve'):
        runner.start()
        try:
            wait_until(lambda: runner.state.phase == expected, f'the runner following '
                       f'on_failure = {on_failure}', timeout=30)
            # block: the thread polls on; serve: it opened the gate and ends its loop.
            if on_failure == 'block':
                assert runner.alive and not runner.state.open
            else:
                assert runner.state.open
                wait_until(lambda: not runner.alive, 'the thread ending its loop')
        finally:
            runner.stop(30)

    history = db.make_backend().read_history()
    assert history['e1'].state == FAILED
    assert kind.__name__ in history['e1'].error
    assert 'e2' not in history  # stopped at the failure, as for any failure
    if db.is_sql:
        assert db.count_side_effects('rolled-back') == 0
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
                and "evolution 'e1' failed (attempt 1)" in r.getMessage()]
    assert len(failures) == 1 and kind.__name__ in failures[0]


class ExitingBatches(BatchEvolution):
    evolution_id = 'exiting'

    def batch(self, cursor, size):
        sys.exit(5)


def test_base_exception_from_a_batch_is_a_failure_not_retried(db, caplog):
    runner = Runner(db.make_backend(), [ExitingBatches()], settings())
    with caplog.at_level(logging.INFO, logger='tgext.evolve'):
        runner.start()
        try:
            wait_until(lambda: runner.state.phase == 'failed', 'the batched failure recorded')
            assert runner.alive
        finally:
            runner.stop(30)
    record = db.make_backend().read_history()['exiting']
    assert record.state == FAILED and 'SystemExit: 5' in record.error
    assert not [r for r in caplog.records if 'retrying with' in r.getMessage()]


@pytest.mark.slow
def test_sys_exit_in_evolve_leaves_a_real_process_serving_its_failure(sql, tmp_path):
    code, result = run_worker(sql.url, tmp_path, 'a', 'sys-exit', on_failure='serve')

    assert (code, result) == (0, {'phase': 'serving-after-failure', 'thread_alive': False})
    assert sql.make_backend().read_history()['sys-exit'].state == FAILED
    assert sql.count_side_effects('escaped') == 0
    assert "evolution 'sys-exit' failed (attempt 1)" in (tmp_path / 'a.log').read_text()


# --- 6. failures whose text the database cannot store ----------------------------------------

FAILURE_MESSAGES = {
    'nul': ('a NUL \x00 byte', 'a NUL \\x00 byte'),
    'surrogate': ('a lone surrogate \udcff', 'a lone surrogate \\udcff'),
    'five-megabytes': ('HEAD' + 'x' * 5_000_000 + 'TAIL', None),
}


@pytest.mark.parametrize('message', sorted(FAILURE_MESSAGES))
def test_any_failure_text_is_recorded_and_on_failure_serve_honoured(db, message, caplog):
    from tgext.evolve.failure_text import MAX_LOGGED_CHARS, MAX_STORED_CHARS
    text, stored = FAILURE_MESSAGES[message]
    runs = []

    def evolve():
        runs.append(1)
        raise RuntimeError(text)

    runner = Runner(db.make_backend(), [evolution('e1', evolve)], settings(on_failure='serve'))
    with caplog.at_level(logging.INFO, logger='tgext.evolve'):
        outcome = run_steps(runner)

    assert (outcome, runner.state.phase, len(runs)) == ('done', 'serving-after-failure', 1)
    error = db.make_backend().read_history()['e1'].error
    assert error.startswith('Traceback (most recent call last):')
    if stored is not None:
        assert error.rstrip().endswith(f'RuntimeError: {stored}')
    else:
        assert len(error) <= MAX_STORED_CHARS
        assert 'RuntimeError: HEADxxx' in error and error.rstrip().endswith('xxxTAIL')
        assert 'characters cut ...]' in error
    assert not [r for r in caplog.records if 'database unavailable' in r.getMessage()]
    assert max(len(r.getMessage()) for r in caplog.records) <= MAX_LOGGED_CHARS + 200


class RefusingFailures:
    """A backend whose database refuses every failure record (a column it cannot store)."""

    def __init__(self, backend):
        self._backend = backend
        self.refused = 0

    def record_failure(self, lease, evolution_id, error):
        self.refused += 1
        raise ValueError('this database refuses that text')

    def __getattr__(self, name):
        return getattr(self._backend, name)


@pytest.mark.parametrize('on_failure', ['block', 'serve'])
def test_failure_the_database_refuses_to_record_is_no_outage_and_never_rerun(db, on_failure,
                                                                           caplog):
    runs = []

    def evolve():
        runs.append(1)
        raise RuntimeError('boom')

    backend = RefusingFailures(db.make_backend())
    runner = Runner(backend, [evolution('e1', evolve)], settings(on_failure=on_failure))
    with caplog.at_level(logging.INFO, logger='tgext.evolve'):
        outcomes = [run_steps(runner) for _ in range(3)]

    assert len(runs) == 1 and backend.refused == 1  # ASCII already: nothing plainer to try
    assert outcomes == (['done'] * 3 if on_failure == 'serve' else ['wait'] * 3)
    assert runner.state.phase == ('failed' if on_failure == 'block' else 'serving-after-failure')
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if 'database unavailable' in m]
    assert [m for m in messages if m.startswith("cannot record the failure of 'e1'")]


def test_mariadb_latin1_error_column_gets_the_plain_text(request, caplog):
    # A database whose column cannot hold the text (strict mode refuses, never truncates).
    url = request.getfixturevalue('mysql_database_url')
    conftest.empty_sql_database(url)
    harness = conftest.SQLHarness('mysql', url)
    try:
        backend = harness.make_backend()
        backend.ensure_storage()
        with harness.engine.begin() as conn:
            conn.exec_driver_sql('ALTER TABLE tgext_evolve_history MODIFY error TEXT '
                                 'CHARACTER SET latin1')

        def evolve():
            raise RuntimeError('naïve → ☃')

        runner = Runner(backend, [evolution('e1', evolve)], settings())
        run_steps(runner)
        record = harness.make_backend().read_history()['e1']
        assert record.state == FAILED
        assert record.error.rstrip().endswith('RuntimeError: na\\xefve \\u2192 \\u2603')
    finally:
        harness.close()


# --- 8. what polling transfers, and how long a log line is -----------------------------------

class ReadSpy:
    """A backend recording how its history is read."""

    def __init__(self, backend):
        self._backend = backend
        self.reads = []

    def read_history(self, **kwargs):
        self.reads.append(kwargs.get('errors', True))
        return self._backend.read_history(**kwargs)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_blocked_processes_never_read_the_traceback_text(db):
    def evolve():
        raise RuntimeError('x' * 100_000)

    run_steps(Runner(db.make_backend(), [evolution('e1', evolve)], settings()))
    assert len(db.make_backend().read_history()['e1'].error) > 10_000

    # Another process tries its one retry (which writes its own failure), then, blocked by
    # it, polls.
    spy = ReadSpy(db.make_backend(with_session=False))
    blocked = Runner(spy, [evolution('e1', lambda: 1 / 0)], settings())
    assert run_steps(blocked) == 'wait'
    if db.is_sql:
        with db.count_statements(spy._backend) as statements:
            outcomes = [run_steps(blocked) for _ in range(5)]
        history_reads = [s for s in statements if 'tgext_evolve_history' in s
                         and s.lstrip().upper().startswith('SELECT')]
        assert history_reads and not [s for s in history_reads if 'error' in s.lower()]
    else:
        outcomes = [run_steps(blocked) for _ in range(5)]
    assert outcomes == ['wait'] * 5 and blocked.state.phase == 'failed'
    assert spy.reads and not any(spy.reads)  # every read: errors=False


def test_no_log_line_is_huge(sql, caplog):
    # A connection lost while the evolution sent a huge statement: SQLAlchemy's message
    # carries the whole statement, which the "database unavailable" line quoted in full.

    def evolve():
        raise sa.exc.OperationalError('INSERT ' + 'x' * 2_000_000, {},
                                      Exception('server closed the connection'),
                                      connection_invalidated=True)

    runner = Runner(sql.make_backend(), [evolution('e1', evolve)], settings())
    with caplog.at_level(logging.DEBUG, logger='tgext.evolve'):
        runner.run(deadline=time.monotonic() + 0.3)  # the first failure is the line

    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if line.startswith('database unavailable')]
    assert max(len(line) for line in lines) <= 8_000  # logs.MAX_LINE, as README documents


# --- 3. coroutine and generator evolve() -------------------------------------------------------

class AsyncEvolve(Evolution):
    evolution_id = 'async_evolve'

    async def evolve(self):
        pass


class GeneratorEvolve(Evolution):
    evolution_id = 'generator_evolve'

    def evolve(self):
        yield


class AsyncGeneratorEvolve(Evolution):
    evolution_id = 'async_generator_evolve'

    async def evolve(self):
        yield


class GeneratorProcess(BatchEvolution):
    evolution_id = 'generator_process'

    def collection(self):
        return None

    def process(self, item):
        yield


@pytest.mark.parametrize('cls', [AsyncEvolve, GeneratorEvolve, AsyncGeneratorEvolve,
                                 GeneratorProcess], ids=lambda c: c.evolution_id)
def test_coroutine_or_generator_method_is_a_start_up_error_naming_the_evolution(cls):
    from tgext.evolve.evolution import collect_evolutions
    from tgext.evolve.errors import ConfigurationError
    with pytest.raises(ConfigurationError, match=f"evolution '{cls.evolution_id}': "
                       r"(evolve|process)\(\) is a (coroutine|generator) function"):
        collect_evolutions([cls])


def _synchronous_wrapper(function):
    # A decorator that hides the async def from the start-up check.
    def wrapper(*args):
        return function(*args)
    return wrapper


class DecoratedAsyncEvolve(Evolution):
    evolution_id = 'decorated_async'
    ran = False

    @_synchronous_wrapper
    async def evolve(self):
        type(self).ran = True


class InstanceGeneratorEvolve(Evolution):
    evolution_id = 'instance_generator'

    def __init__(self):
        def evolve():
            yield
        self.evolve = evolve

    def evolve(self):
        pass


class DecoratedGeneratorBatch(BatchEvolution):
    evolution_id = 'decorated_generator_batch'

    @_synchronous_wrapper
    def batch(self, cursor, size):
        yield


@pytest.mark.parametrize('cls', [DecoratedAsyncEvolve, InstanceGeneratorEvolve,
                                 DecoratedGeneratorBatch], ids=lambda c: c.evolution_id)
def test_evolve_whose_body_never_ran_is_recorded_failed_not_applied(db, cls):
    from tgext.evolve.evolution import collect_evolutions
    evolutions = collect_evolutions([cls])  # the start-up check cannot see these
    runner = Runner(db.make_backend(), evolutions, settings())
    run_steps(runner)

    record = db.make_backend().read_history()[cls.evolution_id]
    assert record.state == FAILED
    assert 'instead of running: its body never ran' in record.error
    assert not DecoratedAsyncEvolve.ran


# --- 5. SQLite: an evolution waiting for its own write lock ---------------------------------

@pytest.fixture
def sqlite_app(sqlite_database_url):
    """(engine, session, backend) on the SQLite file, with a 0.3 s busy timeout (5 s by
    default: the same wait, shorter)."""
    from sqlalchemy import orm
    import zope.sqlalchemy
    from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
    conftest.empty_sql_database(sqlite_database_url)
    engine = sa.create_engine(sqlite_database_url, connect_args={'timeout': 0.3})
    conftest.SideEffectBase.metadata.create_all(engine)
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)
    try:
        yield engine, session, SQLAlchemyBackend(engine, session)
    finally:
        transaction.abort()
        session.remove()
        engine.dispose()


def in_thread_until_failed(runner, timeout):
    runner.start()
    try:
        wait_until(lambda: runner.state.phase == 'failed', 'the failure recorded', timeout)
    finally:
        runner.stop(30)


def test_sqlite_evolution_writing_through_its_own_connection_is_a_failure(sqlite_app):
    engine, session, backend = sqlite_app
    table = conftest.SideEffect.__table__

    def evolve():
        session.add(conftest.SideEffect(key='through-the-session'))
        session.flush()  # the evolution's transaction now holds SQLite's write lock
        with engine.begin() as conn:
            conn.execute(table.insert().values(key='own-connection'))

    runner = Runner(backend, [evolution('e1', evolve)], settings(lease=1.0))
    in_thread_until_failed(runner, timeout=4.0)  # before: re-run every poll, for ever

    record = backend.read_history()['e1']
    assert (record.state, record.attempts) == (FAILED, 1)
    assert "its own transaction holds that lock" in record.error
    assert 'Write through DBSession only' in record.error
    assert runner.state.phase == 'failed'


def test_evolution_busy_attempt_after_attempt_for_longer_than_a_lease_is_a_failure(
        sqlite_app):
    import sqlite3
    engine, session, backend = sqlite_app

    def evolve():
        raise sa.exc.OperationalError('UPDATE pages SET n = n + 1', {},
                                      sqlite3.OperationalError('database is locked'))

    runner = Runner(backend, [evolution('e1', evolve)], settings(lease=0.5))
    in_thread_until_failed(runner, timeout=5.0)

    record = backend.read_history()['e1']
    assert record.state == FAILED and record.attempts > 1
    assert 'The database stayed busy for' in record.error
    assert runner.state.phase == 'failed'


# --- 12. SQLite: the expected waits are neither warnings nor late --------------------------

def test_sqlite_long_evolution_neither_warns_nor_delays_a_waiting_process(sqlite_database_url,
                                                                         caplog):
    import threading
    from sqlalchemy import orm
    import zope.sqlalchemy
    from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
    conftest.empty_sql_database(sqlite_database_url)
    # The holder's renewals give up after 0.3 s (5 s by default: the same wait, sooner); the
    # waiting process would wait 60 s for a write lock.
    engine = sa.create_engine(sqlite_database_url, connect_args={'timeout': 0.3})
    waiter_engine = sa.create_engine(sqlite_database_url, connect_args={'timeout': 60})
    conftest.SideEffectBase.metadata.create_all(engine)
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)
    release = threading.Event()
    looked = []

    def evolve():
        session.add(conftest.SideEffect(key='x'))
        session.flush()  # holds SQLite's write lock until the commit
        release.wait(60)

    holder = Runner(SQLAlchemyBackend(engine, session), [evolution('e1', evolve)],
                    settings(lease=0.6))
    waiter = Runner(SQLAlchemyBackend(waiter_engine), [evolution('e1', evolve)],
                    settings(lease=0.6))
    with caplog.at_level(logging.DEBUG, logger='tgext.evolve'):
        holder.start()
        try:
            wait_until(lambda: holder.state.phase == 'evolving', 'the holder evolving')
            # Its lease runs out while it writes: renewals wait (and give up) meanwhile.
            lock = waiter.backend.read_lock()
            wait_until(lambda: waiter.backend.read_lock().expires_in < -0.5,
                       'the lease looking expired')
            first_look = threading.Thread(target=lambda: looked.append(waiter.step()))
            first_look.start()
            # Before: the takeover's UPDATE sat in a lock wait until the holder committed.
            wait_until(lambda: looked, "the waiting process's first look, while the holder "
                       "still writes", timeout=10)
            assert looked == ['wait'] and waiter.state.phase == 'waiting'
            assert lock.owner == holder.owner
        finally:
            release.set()
            first_look.join(90)
            holder.stop(30)
            waiter.stop()
            session.remove()
            engine.dispose()
            waiter_engine.dispose()

    assert holder.backend.read_history()['e1'].state == APPLIED
    lines = [(r.levelno, r.name, r.getMessage()) for r in caplog.records]
    assert [line for line in lines if line[0] >= logging.WARNING] == []
    assert not [line for line in lines if '[SQL:' in line[2] and line[0] >= logging.INFO]


# --- 4. Core statements inside the atomic unit --------------------------------------------

@pytest.mark.parametrize('fails', [False, True], ids=['applied', 'failed'])
def test_core_statements_through_dbsession_are_inside_the_atomic_unit(sql, fails):
    # README's supported way: DBSession.execute(...) and DBSession.connection().
    table = conftest.SideEffect.__table__

    def evolve():
        sql.session.execute(table.insert().values(key='core'))
        sql.session.connection().execute(table.insert().values(key='core'))
        if fails:
            raise RuntimeError('after the Core statements')

    run_steps(Runner(sql.make_backend(), [evolution('e1', evolve)], settings()))

    assert sql.make_backend().read_history()['e1'].state == (FAILED if fails else APPLIED)
    assert sql.count_side_effects('core') == (0 if fails else 2)
