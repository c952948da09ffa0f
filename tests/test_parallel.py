"""Parallel batched evolutions: every process of the cluster works on key ranges, each batch
still exactly once (SQL), with claims taken over from dead and stalled processes.

Real processes (``tests/parallel_worker.py``) on the run's databases; MIM, which lives in one
process, with in-process runners of distinct owners.  Every wait polls with a deadline.
"""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

import parallel_worker
from cluster import child_environment
from polling import wait_until
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
from tgext.evolve.records import APPLIED, FAILED, RANGE_DONE, RANGE_RUNNING, RUNNING

WORKER = os.path.join(os.path.dirname(__file__), 'parallel_worker.py')
ROWS = 20_000
#: Generous: up to 8 processes on 2 shared cores.
DEADLINE = 90.0
#: Short leases so that takeovers happen within a test's time.
OPTIONS = {'lease': 2.0, 'poll_interval': 0.2, 'batch_seconds': 0.2}


class Workers:
    """Worker processes on one database, sharing a working directory."""

    def __init__(self, url, workdir, **job):
        self.url = url
        self.workdir = workdir
        self.job = {'url': url, 'dir': str(workdir), 'options': OPTIONS, 'batch_size': 50,
                    'deadline': DEADLINE, **job}
        self.engine = sa.create_engine(url)
        self.backend = SQLAlchemyBackend(self.engine)
        self.procs = {}

    def start(self, *names):
        for name in names:
            job = dict(self.job, name=name)
            with open(self.workdir / f'{name}.log', 'wb') as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, WORKER, json.dumps(job)], stderr=log,
                    stdout=subprocess.DEVNULL, env=child_environment())

    def owner(self, name):
        path = self.workdir / f'{name}.owner'
        return wait_until(lambda: path.exists() and path.read_text(), f'{name} started')

    def log(self, name):
        return (self.workdir / f'{name}.log').read_text(errors='replace')

    def report(self, name):
        return json.loads((self.workdir / f'{name}.json').read_text())

    def ranges(self):
        return self.backend.read_ranges(parallel_worker.EVOLUTION_ID)

    def record(self):
        return self.backend.read_history(batches=True).get(parallel_worker.EVOLUTION_ID)

    def state(self):
        record = self.record()
        return record and record.state

    def done_by(self, name):
        owner = self.owner(name)
        return [r for r in self.ranges() if r.state == RANGE_DONE and r.owner == owner]

    def claimed_by(self, name):
        owner = self.owner(name)
        return [r for r in self.ranges() if r.state == RANGE_RUNNING and r.owner == owner]

    def wait_exit(self, name, timeout=DEADLINE):
        proc = self.procs[name]
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f'{name} still running after {timeout} s:\n{self.log(name)}')

    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
        self.engine.dispose()


@pytest.fixture
def workers_on(tmp_path):
    made = []

    def make(url, rows=ROWS, **job):
        workers = Workers(url, tmp_path, **job)
        parallel_worker.create_items(workers.engine, rows)
        made.append(workers)
        return workers

    yield make
    for workers in made:
        workers.close()


def stopped(pid):
    with open(f'/proc/{pid}/stat') as stat:
        return stat.read().rsplit(')', 1)[1].split()[0] == 'T'


def sql_url(request, kind):
    from conftest import empty_sql_database
    url = request.getfixturevalue(f'{kind}_database_url')
    empty_sql_database(url)
    return url


def _killed_inside_a_batch(workers, name):
    """SIGKILL ``name`` once it stopped itself inside its next batch; the range it held."""
    (workers.workdir / f'stop-{name}').write_text('')
    wait_until(lambda: stopped(workers.procs[name].pid), f'{name} stopped inside a batch')
    claims = workers.claimed_by(name)
    assert len(claims) == 1, claims
    workers.procs[name].kill()
    return claims[0].range_no


def assert_every_row_changed_once(workers, rows=ROWS):
    assert parallel_worker.item_counts(workers.engine) == {1: rows}


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['postgresql', 'mysql'])
def test_processes_share_the_ranges_and_survive_a_killed_and_a_stopped_claimer(
        request, kind, workers_on):
    workers = workers_on(sql_url(request, kind), iterations=300)
    names = ['a', 'b', 'killed', 'stopped']
    workers.start(*names)
    # The one to kill: once it finished a range, inside a batch of the next one (stopped
    # there first, so that it cannot finish that range between the look and the kill).
    wait_until(lambda: workers.done_by('killed'), 'killed finished a range', timeout=DEADLINE)
    killed_range = _killed_inside_a_batch(workers, 'killed')
    # The one to stop: once it finished a range; it stops itself inside its next batch.
    wait_until(lambda: workers.done_by('stopped'), 'stopped finished a range', timeout=DEADLINE)
    (workers.workdir / 'stop-stopped').write_text('')
    wait_until(lambda: stopped(workers.procs['stopped'].pid), 'stopped is stopped')
    stopped_claims = workers.claimed_by('stopped')
    assert stopped_claims, 'the stopped process holds no claim'
    stopped_range = stopped_claims[0].range_no
    # Everything finishes without the two of them, past the stopped one's lease.
    wait_until(lambda: workers.state() == APPLIED,
               'the evolution applied by the others', timeout=DEADLINE)
    assert_every_row_changed_once(workers)
    ranges = {r.range_no: r for r in workers.ranges()}
    assert ranges[killed_range].owner not in (workers.owner('killed'), None)
    assert ranges[stopped_range].owner != workers.owner('stopped')
    # Woken up, the stopped one commits nothing: its claim was taken over.
    workers.procs['stopped'].send_signal(signal.SIGCONT)
    for name in ('a', 'b', 'stopped'):
        assert workers.wait_exit(name) == 0, workers.log(name)
    assert 'lost its claim on range' in workers.log('stopped')
    assert_every_row_changed_once(workers)
    for name in names:
        assert workers.done_by(name), f'{name} finished no range'
    assert workers.report('a')['phase'] == 'ready'
    record = workers.record()
    assert record.progress_done == ROWS
    assert record.batches_done == sum(r.batches_done for r in workers.ranges())


@pytest.mark.slow
def test_sqlite_processes_share_the_ranges_and_survive_a_killed_claimer(request, workers_on):
    # No SIGSTOP here: a stopped process inside a batch holds SQLite's only write lock, and
    # nobody can commit anything until it is continued.  SQLite's lock is not fair either: a
    # process may wait long for it, so the one killed is killed once it has committed some
    # batches of a range, whether or not it finished one before.
    workers = workers_on(sql_url(request, 'sqlite'), rows=ROWS, batch_size=100, iterations=300,
                         options=dict(OPTIONS, lease=5.0))
    names = ['a', 'b', 'c', 'd']
    workers.start(*names)

    def a_claimer_mid_range():
        for name in names:
            working = [r for r in workers.claimed_by(name) if r.items_done]
            if working:
                return name, working[0]
        return None

    # Whichever process is first seen mid-range is killed: with an unfair lock, a given one
    # may not get a claim for a long time on a loaded machine.  Killed inside a batch: the
    # write lock it holds there dies with it.
    victim, _ = wait_until(a_claimer_mid_range, 'a claimer mid-range', timeout=DEADLINE)
    killed_range = _killed_inside_a_batch(workers, victim)
    for name in names:
        if name != victim:
            assert workers.wait_exit(name) == 0, workers.log(name)
    assert workers.record().state == APPLIED
    assert_every_row_changed_once(workers)
    taken_over = workers.ranges()[killed_range]
    assert taken_over.state == RANGE_DONE and taken_over.owner != workers.owner(victim)
    assert sum(r.items_done for r in workers.ranges()) == ROWS
    # Correctness only: SQLite's one write lock is not fair, and on a loaded machine one
    # process can get every claim (README: no speed-up to expect from parallel on SQLite).


@pytest.mark.slow
def test_a_failing_range_fails_the_evolution_keeping_the_other_ranges_work(request,
                                                                          workers_on):
    url = sql_url(request, 'sqlite')
    rows = 2000
    workers = workers_on(url, rows=rows, fail_ids=[777], batch_size=50)
    workers.start('a', 'b')
    wait_until(lambda: workers.state() == FAILED,
               'the evolution recorded failed', timeout=DEADLINE)
    record = workers.backend.read_history()[parallel_worker.EVOLUTION_ID]
    assert 'item 777 cannot be processed' in record.error
    assert 'retry resumes only what is left' in record.error
    ranges = workers.ranges()
    failed = [r for r in ranges if r.state != RANGE_DONE]
    assert len(failed) == 1 and failed[0].state == 'failed'
    # Every row is done once, but those of the failed range after its checkpoint: its batches
    # were halved down to the failing item, each smaller batch before it committed.
    assert 'failed 4 times' in record.error
    after, upto = json.loads(failed[0].checkpoint), json.loads(failed[0].upto_key)
    assert after < 777 <= upto
    items = parallel_worker.ITEMS
    with workers.engine.connect() as conn:
        left = conn.execute(sa.select(items.c.id).where(items.c.n == 0)
                            .order_by(items.c.id)).scalars().all()
        assert conn.execute(sa.select(sa.func.count()).where(items.c.n > 1)).scalar() == 0
    assert left == list(range(after + 1, upto + 1))
    assert 777 - after < 50  # halved below the batch size, up to the failing item
    for name in ('a', 'b'):
        workers.procs[name].kill()
        workers.procs[name].wait()
    # The fix deployed, retry: only what is left is done.
    from tgext.evolve.runner import make_owner
    lease = workers.backend.acquire(make_owner(), 10)
    workers.backend.delete_history(lease, [parallel_worker.EVOLUTION_ID])
    workers.backend.release(lease)
    workers.job['fail_ids'] = []
    workers.start('c')
    assert workers.wait_exit('c') == 0, workers.log('c')
    assert workers.record().state == APPLIED
    assert_every_row_changed_once(workers, rows)
    done_by_c = workers.done_by('c')
    assert [r.range_no for r in done_by_c] == [failed[0].range_no]


@pytest.mark.slow
def test_max_workers_caps_the_processes_working_at_once(request, workers_on):
    workers = workers_on(sql_url(request, 'postgresql'), rows=6000, iterations=300,
                         max_workers=2)
    names = ['a', 'b', 'c', 'd']
    workers.start(*names)
    working = set()

    def finished():
        owners = {r.owner for r in workers.ranges() if r.claimed}
        assert len(owners) <= 2, f'{len(owners)} processes working at once: {owners}'
        working.update(owners)
        return workers.state() == APPLIED

    wait_until(finished, 'the evolution applied', timeout=DEADLINE, interval=0.05)
    for name in names:
        assert workers.wait_exit(name) == 0, workers.log(name)
    assert_every_row_changed_once(workers, 6000)
    assert len(working) >= 2
    slots = [n for n in (workers.backend.read_lock(f'{parallel_worker.EVOLUTION_ID}#slot{i}')
                         for i in range(3)) if n is not None]
    assert len(slots) == 2 and all(not lock.held for lock in slots)  # released when done


# --- in one process: MIM, and the start-up check --------------------------------------------

@pytest.mark.slow  # MIM scans every document at each batch: seconds, not milliseconds
def test_mim_runners_of_distinct_owners_share_the_ranges(mim_database_url):
    from conftest import empty_mongo_database
    import ming
    from ming import schema
    from ming.odm import FieldProperty, MappedClass, Mapper, ThreadLocalODMSession
    from tgext.evolve import BatchEvolution
    from tgext.evolve.backends.ming import MingBackend
    from tgext.evolve.options import Settings
    from tgext.evolve.runner import Runner

    empty_mongo_database(mim_database_url)
    datastore = ming.create_datastore(mim_database_url)
    session = ThreadLocalODMSession(ming.Session(datastore))

    class Doc(MappedClass):
        class __mongometa__:
            name = 'parallel_docs'
        __mongometa__.session = session
        _id = FieldProperty(int)
        n = FieldProperty(int)
        worker = FieldProperty(schema.Anything)

    Mapper.compile_all()
    rows = 1000
    datastore.db.parallel_docs.insert_many([{'_id': i, 'n': 0} for i in range(1, rows + 1)])
    owners = [f'runner-{i}' for i in range(4)]

    def make(owner):
        class Backfill(BatchEvolution):
            evolution_id = 'mim_backfill'
            parallel = True
            batch_size = 25

            def collection(self):
                return Doc.query.find()

            def process(self, doc):
                doc.n += 1
                doc.worker = owner

        backend = MingBackend(datastore.db, session=session)
        return Runner(backend, [Backfill()], Settings(lease=5.0, poll_interval=0.05,
                                                      batch_seconds=0.2), owner=owner)

    runners = [make(owner) for owner in owners]
    threads = [threading.Thread(target=r.run, kwargs={'deadline': None}, daemon=True)
               for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    try:
        assert not any(t.is_alive() for t in threads)
        backend = MingBackend(datastore.db)
        assert backend.read_history()['mim_backfill'].state == APPLIED
        counts = {}
        for doc in datastore.db.parallel_docs.find():
            counts[doc['n']] = counts.get(doc['n'], 0) + 1
        assert counts == {1: rows}  # at least once on Mongo; without faults, once
        done_by = {r.owner for r in backend.read_ranges('mim_backfill')}
        assert done_by == set(owners)
    finally:
        for r in runners:
            r.stop(5)


def test_a_composite_key_is_refused_before_any_work(sqlite_database_url):
    from conftest import empty_sql_database
    from sqlalchemy import orm
    import zope.sqlalchemy
    from tgext.evolve import BatchEvolution
    from tgext.evolve.options import Settings
    from tgext.evolve.runner import Runner
    from tgext.evolve.state import MISCONFIGURED

    empty_sql_database(sqlite_database_url)

    class Base(orm.DeclarativeBase):
        pass

    class Pair(Base):
        __tablename__ = 'pairs'
        a = sa.Column(sa.Integer, primary_key=True)
        b = sa.Column(sa.Integer, primary_key=True)

    engine = sa.create_engine(sqlite_database_url)
    Base.metadata.create_all(engine)
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)

    class Backfill(BatchEvolution):
        evolution_id = 'pairs_backfill'
        parallel = True

        def collection(self):
            return session.query(Pair)

        def process(self, pair):
            pass

    runner = Runner(SQLAlchemyBackend(engine, session=session), [Backfill()], Settings())
    runner.step()
    assert runner.state.phase == MISCONFIGURED
    assert SQLAlchemyBackend(engine).read_history() == {}
    assert SQLAlchemyBackend(engine).read_lock() is None


def test_status_shows_the_ranges_and_who_works_on_which(db):
    import types
    from tgext.evolve import BatchEvolution, Evolution
    from tgext.evolve import operations
    from tgext.evolve.backends.base import BatchCheckpoint
    from tgext.evolve.status_document import ranges_document, ranges_text
    from tgext.evolve.status_document import status_document

    class Backfill(BatchEvolution):
        evolution_id = 'backfill'
        parallel = True

        def collection(self):
            raise AssertionError('status never walks')

        def process(self, item):
            pass

    class Plain(Evolution):
        evolution_id = 'plain'

        def evolve(self):
            pass

    backend = db.make_backend()
    backend.ensure_storage()
    service = types.SimpleNamespace(backend=backend, evolutions=[Plain(), Backfill()],
                                    config={})
    before = {e['id']: e['ranges'] for e in status_document(operations.status(service))[
        'evolutions']}
    assert before == {'plain': None, 'backfill': {'total': 0, 'done': 0, 'failed': 0,
                                                  'pending': 0, 'working': []}}
    lease = backend.acquire('web1:1:a', 60)
    backend.record_batches_running(lease, 'backfill', 10, 30)
    backend.prepare_ranges(lease, 'backfill', [(None, '1'), ('1', '2'), ('2', None)])
    finished = backend.claim_range('backfill', 'web2:2:b', 60)
    backend.run_range_batch(finished, lambda: BatchCheckpoint(0, None, True, 10, None))
    working = backend.claim_range('backfill', 'web3:3:c', 60)
    backend.run_range_batch(working, lambda: BatchCheckpoint(4, '1', False, 10, None))
    status = operations.status(service)
    ranges = {e['id']: e['ranges'] for e in status_document(status)['evolutions']}
    assert ranges['plain'] is None
    shown = ranges['backfill']
    assert {k: shown[k] for k in ('total', 'done', 'failed', 'pending')} == {
        'total': 3, 'done': 1, 'failed': 0, 'pending': 1}
    assert [(w['range'], w['owner'], w['items_done']) for w in shown['working']] == [
        (working.range_no, 'web3:3:c', 4)]
    assert 0 < shown['working'][0]['expires_in'] <= 60
    assert ranges_text(ranges_document(status.ranges['backfill'])) == (
        f'ranges: 1/3 done; working: web3:3:c (range {working.range_no}, 4 items)')


def test_a_process_shutting_down_gives_its_range_back_at_a_batch_boundary(
        sqlite_database_url, tmp_path):
    from conftest import empty_sql_database
    from sqlalchemy import orm
    import zope.sqlalchemy
    from tgext.evolve.options import Settings
    from tgext.evolve.records import RANGE_PENDING
    from tgext.evolve.runner import Runner

    empty_sql_database(sqlite_database_url)
    engine = sa.create_engine(sqlite_database_url)
    parallel_worker.create_items(engine, 1000)
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)

    def runner(owner):
        evolution = parallel_worker.make_backfill(session, owner, {'iterations': 500,
                                                                   'batch_size': 25}, tmp_path)
        return Runner(SQLAlchemyBackend(engine, session=session), [evolution],
                      Settings(lease=30, poll_interval=0.1, batch_seconds=0.1), owner=owner)

    reader = SQLAlchemyBackend(engine)
    leaving = runner('leaving')
    evolution = leaving.evolutions[0]
    process_batch = evolution.process_batch

    def shut_down_during_the_first_batch(items):
        process_batch(items)
        leaving.stopping.set()  # as Runner.stop() does: SIGTERM, a deploy

    evolution.process_batch = shut_down_during_the_first_batch
    leaving.start()
    wait_until(leaving.stopping.is_set, 'a batch under way')
    leaving.stop(timeout=30)
    assert not leaving.alive and not leaving._claimer.alive
    # The batch under way was committed (a range of 100 items, 25 of them), then the range
    # given back, with its checkpoint.
    worked = [r for r in reader.read_ranges(parallel_worker.EVOLUTION_ID) if r.items_done]
    assert len(worked) == 1, worked
    given_back = worked[0]
    assert (given_back.state, given_back.owner, given_back.items_done) == (RANGE_PENDING, None, 25)
    assert given_back.checkpoint is not None
    # Nobody waits for its lease: the next process resumes the range from its checkpoint.
    finishing = runner('finishing')
    assert finishing.run(deadline=None) == 'ready'
    finishing.stop(timeout=30)  # its claimer thread too: the next test uses the same file
    assert parallel_worker.item_counts(engine) == {1: 1000}
    resumed = reader.read_ranges(parallel_worker.EVOLUTION_ID)[given_back.range_no]
    assert resumed.owner == 'finishing'
    assert sum(r.items_done for r in reader.read_ranges(parallel_worker.EVOLUTION_ID)) == 1000


def test_a_background_parallel_evolution_is_shared_by_serving_processes(sqlite_database_url,
                                                                      tmp_path):
    from conftest import empty_sql_database
    from sqlalchemy import orm
    import zope.sqlalchemy
    from tgext.evolve.options import Settings
    from tgext.evolve.runner import Runner

    empty_sql_database(sqlite_database_url)
    engine = sa.create_engine(sqlite_database_url)
    # Enough work (about 2 s of hashing in 24 ranges) that the second process's claimer,
    # which starts at its first look, gets ranges before the first one is done with them all.
    parallel_worker.create_items(engine, 1200)
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)
    reader = SQLAlchemyBackend(engine)

    def runner(owner):
        evolution = parallel_worker.make_backfill(
            session, owner, {'iterations': 3000, 'batch_size': 25, 'background': True},
            tmp_path)
        return Runner(SQLAlchemyBackend(engine, session=session), [evolution],
                      Settings(lease=30, poll_interval=0.05, batch_seconds=0.05, throttle=0),
                      owner=owner)

    runners = [runner('web1'), runner('web2')]
    for r in runners:
        r.start()
    served_while_running = set()

    def applied():
        record = reader.read_history().get(parallel_worker.EVOLUTION_ID)
        if record is not None and record.state == RUNNING:
            served_while_running.update(r.owner for r in runners if r.state.open)
        return record is not None and record.state == APPLIED

    try:
        wait_until(applied, 'the background evolution applied', interval=0.005)
    finally:
        for r in runners:
            r.stop(30)
    assert served_while_running == {'web1', 'web2'}
    assert parallel_worker.item_counts(engine) == {1: 1200}
    # Both runners claim (their threads share one SQLite file and one GIL here, so which one
    # gets how many ranges is up to the scheduler; the real-process tests show the sharing).
    assert {r.owner for r in reader.read_ranges(parallel_worker.EVOLUTION_ID)} <= {'web1', 'web2'}
    # The coordinator's attempt is in the audit trail like any batched evolution's.
    actions = [e.action for e in reader.read_audit(parallel_worker.EVOLUTION_ID)]
    assert actions[0] == 'started' and actions[-1] == 'applied', actions


def test_a_paused_parallel_evolution_stops_every_claimer_and_resumes_from_the_ranges(
        sqlite_database_url, tmp_path, monkeypatch):
    """An operator's pause stops the coordinator and, within a poll interval, every claimer
    at a batch boundary, its range given back with its checkpoint; resume finishes the rest,
    each row still changed once."""
    import threading
    from conftest import empty_sql_database
    from sqlalchemy import orm
    import zope.sqlalchemy
    from tgext.evolve import parallel
    from tgext.evolve.options import Settings
    from tgext.evolve.records import PAUSE, PAUSED, RESUME
    from tgext.evolve.runner import Runner

    empty_sql_database(sqlite_database_url)
    engine = sa.create_engine(sqlite_database_url)
    parallel_worker.create_items(engine, 1500)
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)
    reader = SQLAlchemyBackend(engine)
    evolution_id = parallel_worker.EVOLUTION_ID

    def runner(owner):
        evolution = parallel_worker.make_backfill(
            session, owner, {'iterations': 3000, 'batch_size': 20}, tmp_path)
        return Runner(SQLAlchemyBackend(engine, session=session), [evolution],
                      Settings(lease=30, poll_interval=0.1, batch_seconds=0.05, throttle=0),
                      owner=owner)

    def done():
        return sum(r.items_done for r in reader.read_ranges(evolution_id))

    # The claimers wait at a batch boundary (outside any transaction) once 100 items are done,
    # until the pause is recorded: a stalled test thread cannot let them finish first.
    pause_recorded = threading.Event()
    still_wanted = parallel._RangeRun._still_wanted

    def held_until_the_pause(run):
        if not pause_recorded.is_set() and done() > 100:
            pause_recorded.wait(60)
        return still_wanted(run)

    monkeypatch.setattr(parallel._RangeRun, '_still_wanted', held_until_the_pause)
    runners = [runner('web1'), runner('web2')]
    for r in runners:
        r.start()
    try:
        wait_until(lambda: done() > 100, 'some ranges worked on')
        assert reader.record_request(evolution_id, PAUSE, 'olivia', RUNNING) is not None
        pause_recorded.set()
        wait_until(lambda: reader.read_history()[evolution_id].state == PAUSED,
                   'the evolution paused')
        wait_until(lambda: not any(r.state == RANGE_RUNNING
                                   for r in reader.read_ranges(evolution_id)),
                   'every claimer gave its range back')
        paused_at = done()
        assert 0 < paused_at < 1500
        # Paused: nothing more is committed, however long the processes keep polling.
        for r in runners:
            assert not r.state.open  # a paused blocking evolution keeps the gate closed
        wait_until(lambda: all(r.alive for r in runners), 'the runners polling')
        assert done() == paused_at and parallel_worker.item_counts(engine) == {
            1: paused_at, 0: 1500 - paused_at}
        assert reader.record_request(evolution_id, RESUME, 'olivia', PAUSED) is not None
        wait_until(lambda: reader.read_history()[evolution_id].state == APPLIED,
                   'the evolution resumed and applied')
    finally:
        pause_recorded.set()
        for r in runners:
            r.stop(30)
    assert parallel_worker.item_counts(engine) == {1: 1500}
    assert done() == 1500
