"""Fault scenarios on real processes, each returning what happened as an :class:`Outcome`.

One implementation, two users: the tests judge one run of each scenario
(``tests/test_processes.py``, ``tests/test_faults.py``, ``tests/test_gunicorn.py``), and
``bench/faults.py`` repeats them and counts.  A scenario starts a :class:`cluster.Cluster` of
``procapp.py`` processes (or a gunicorn) on a SQL database, injects its fault, waits (with
deadlines) until the cluster recovers, and stops every process it started.  What "survived"
means is the scenario's to say: :meth:`Outcome.problems` lists every way it did not.

The evolutions are always the same three, so that exactly-once can be counted per evolution:
``e1`` and ``e3`` write one row; ``e2`` writes one row and then holds (see :func:`evolutions`),
which is how a scenario catches a process "in the middle of an evolution".
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import cluster
import procapp
from cluster import DEADLINE, Cluster, ProcessSummary
from polling import wait_until
from tgext.evolve.records import APPLIED, FAILED

#: Settings of the fault scenarios: short enough for a test, the real protocol all the same.
LEASE = 2.0
POLL_INTERVAL = 0.2
FAULT_OPTIONS = {'lease': LEASE, 'poll_interval': POLL_INTERVAL}
#: Scenarios that are not about losing the lease use a lease no loaded machine can outlast.
CALM_OPTIONS = {'lease': 15.0, 'poll_interval': POLL_INTERVAL}
HELD = 'e2'
#: Slack on top of "lease + poll_interval" for a takeover: process scheduling on a shared,
#: loaded 2-core machine, plus the test's own polling.
TAKEOVER_MARGIN = 1.5
#: A 503 must not wait for a first look that cannot come (gate.FIRST_LOOK_TIMEOUT is 5 s).
PROMPT_503 = 2.5


def evolutions(hold=('write', 'hold'), failing=False):
    """``e1`` write; ``e2`` runs ``hold`` (then raises if ``failing``); ``e3`` write.

    ``('write', 'hold')`` holds with the row written but not committed: the strongest case
    for "the interrupted attempt left no trace".  On SQLite a held write transaction locks the
    whole database, so scenarios that need other processes to write meanwhile (a takeover)
    hold first and write after: ``('hold', 'write')``.
    """
    steps = list(hold) + (['raise'] if failing else [])
    return [{'id': 'e1', 'steps': ['write']}, {'id': HELD, 'steps': steps},
            {'id': 'e3', 'steps': ['write']}]


def dialect_of(url):
    return make_url(url).get_backend_name()


@dataclasses.dataclass
class Outcome:
    """What one run of a scenario left behind."""
    fault: str
    applied_once: list  # ids that must be applied, with exactly one committed row
    side_effects: dict  # evolution id -> committed rows
    history: dict  # evolution id -> HistoryRecord
    lock: object  # LockRecord or None
    processes: list  # ProcessSummary of every process started
    observed: dict  # name -> distinct statuses, of everything that must serve at the end
    recovered_in: Optional[float] = None  # seconds from the fault to every process serving
    measures: dict = dataclasses.field(default_factory=dict)
    failures: list = dataclasses.field(default_factory=list)  # the scenario's own findings

    @property
    def duplicates(self):
        """Evolution runs committed more than once."""
        return sum(max(0, n - 1) for n in self.side_effects.values())

    def process(self, name):
        return next(p for p in self.processes if p.name == name)

    def problems(self):
        """Everything a user would call a failure, as sentences; empty when it survived."""
        found = []
        for evolution_id in self.applied_once:
            record = self.history.get(evolution_id)
            if record is None or record.state != APPLIED:
                found.append(f'{evolution_id} is {record.state if record else "not recorded"}')
        for evolution_id, count in sorted(self.side_effects.items()):
            if count > 1:
                found.append(f'{evolution_id} committed {count} times')
        for evolution_id in self.applied_once:
            if evolution_id not in self.side_effects:
                found.append(f'{evolution_id} left no row')
        if self.lock is not None and self.lock.held:
            found.append(f'lock left held by {self.lock.owner}')
        for name, observed in self.observed.items():
            if not observed or observed[-1] != 200:
                found.append(f'{name} is not serving (observed {observed})')
            elif observed.index(200) != len(observed) - 1:
                found.append(f'{name} answered 503 again after serving (observed {observed})')
        return found + self.failures


def _outcome(c, fault, serving, observed=None, applied_once=None, **kwargs):
    """The outcome; ``serving`` are the processes that must serve at the end."""
    return Outcome(
        fault=fault, applied_once=c.evolution_ids if applied_once is None else applied_once,
        side_effects=c.side_effects(), history=dict(c.history()), lock=c.lock(),
        processes=[ProcessSummary.of(p) for p in c.processes],
        observed=observed or {p.name: p.observed for p in serving}, **kwargs)


def _recovered_in(processes, since):
    """Seconds from ``since`` to the first 200 of the last of ``processes`` to serve."""
    served = [p.report.get('first_served') for p in processes]
    return None if None in served else max(served) - since


def _troubled(processes):
    """One sentence per process that logged an error or a tgext.evolve warning."""
    return [f'{p.name} logged: {p.error_lines()[0][:200]}' for p in processes if p.error_lines()]


# --- issue 2 and faults 7, 8: many processes start at once -----------------------------------

def start_together(url, workdir, count, storage='empty', late=False):
    """``count`` processes build their apps at the same moment; ``e2`` holds until every one of
    them has observed a 503, so each must show exactly 503 then 200, and log no trouble.

    ``storage='half-created'`` first creates the lock table alone, as a creator interrupted
    between its two CREATE TABLEs would leave it (SQLite and MySQL commit each DDL statement).
    With ``late``, one more process starts once all serve: it must never answer 503.
    """
    with Cluster(url, workdir, evolutions(hold=('write', 'hold')), CALM_OPTIONS) as c:
        c.prepare_database()
        if storage == 'half-created':
            from tgext.evolve.backends.sql_schema import lock_table
            lock_table.create(c.engine)
        processes = c.start(count)
        c.wait_all_observed(503)
        c.release(HELD)
        released_at = time.time()
        c.wait_serving(processes, cluster.START_DEADLINE)
        recovered_in = _recovered_in(processes, released_at)
        failures = [f'{p.name} observed {p.observed}' for p in processes
                    if p.observed != [503, 200]]
        # Asked once more from outside, after the processes stopped asking themselves.
        failures += [f'{p.name} answered the test {status}' for p in processes
                     if (status := p.get()) != 200]
        measures = {}
        if late:
            latecomer = c.start(1, prefix='late')
            c.wait_serving(latecomer)
            measures['late'] = latecomer[0].observed
            if measures['late'] != [200]:
                failures.append(f'a process started after evolving observed {measures["late"]}')
            # Its one history read is textual: building the tables is start-up time spent for
            # nothing (README, Performance).  The processes that evolved did need them.
            measures['built_sql_tables'] = {p.name: p.report['built_sql_tables']
                                            for p in processes + latecomer}
        outcome = _outcome(c, f'{count} processes at once ({storage} storage)', processes,
                           recovered_in=recovered_in, measures=measures, failures=failures)
        outcome.failures += _troubled(outcome.processes)
        return outcome


# --- fault 1: the leader is killed in the middle of an evolution ----------------------------

def leader_killed(url, workdir, count=3):
    """SIGKILL the process running ``e2`` (its row written, not committed).

    Measures ``takeover_in``: from the kill to the next holder's acquisition (database clock),
    which must be within ``lease + poll_interval`` (+ :data:`TAKEOVER_MARGIN`).
    """
    with Cluster(url, workdir, evolutions(hold=('write', 'hold')), FAULT_OPTIONS) as c:
        c.prepare_database()
        c.start(count)
        leader = c.process_of(c.wait_entered(HELD)[0]['pid'])
        generation = c.lock().generation
        leader.signal(signal.SIGKILL)
        killed_at = time.time()
        leader.popen.wait(30)
        c.release(HELD)
        survivors = [p for p in c.processes if p is not leader]
        c.wait_serving(survivors)
        lock = c.lock()
        takeover_in = lock.acquired_at - killed_at
        failures = []
        if lock.generation != generation + 1:
            failures.append(f'{lock.generation - generation} acquisitions after the kill')
        if takeover_in > LEASE + POLL_INTERVAL + TAKEOVER_MARGIN:
            failures.append(f'takeover took {takeover_in:.1f} s')
        outcome = _outcome(c, 'leader killed (SIGKILL) mid-evolution', survivors,
                           recovered_in=_recovered_in(survivors, killed_at), failures=failures,
                           measures={'leader': leader.name, 'takeover_in': takeover_in})
        outcome.failures += _troubled([outcome.process(p.name) for p in survivors])
        return outcome


# --- fault 2: the leader is paused past its lease ---------------------------------------------

def leader_paused(url, workdir, count=3):
    """SIGSTOP the process running ``e2`` until another one took over and finished, then
    SIGCONT it: it must neither commit ``e2`` nor start ``e3``, and then serve."""
    hold = ('hold', 'write') if dialect_of(url) == 'sqlite' else ('write', 'hold')
    with Cluster(url, workdir, evolutions(hold=hold), FAULT_OPTIONS) as c:
        c.prepare_database()
        c.start(count)
        leader = c.process_of(c.wait_entered(HELD)[0]['pid'])
        generation = c.lock().generation
        _stop_between_renewals(c, leader)
        paused_at = time.time()
        others = [p for p in c.processes if p is not leader]
        wait_until(lambda: c.lock().generation > generation, 'another process taking over',
                   DEADLINE)
        c.wait_entered(HELD, 2)
        c.release(HELD)
        c.wait_serving(others)
        recovered_in = _recovered_in(others, paused_at)
        history_before_resume = dict(c.history())
        leader.signal(signal.SIGCONT)
        c.wait_serving([leader])
        wait_until(lambda: leader.log_lines('lock lost'), 'the resumed leader noticing', DEADLINE)
        failures = []
        if dict(c.history()) != history_before_resume:
            failures.append('the resumed leader changed the history')
        if leader.report['applied'] != ['e1']:
            failures.append(f'the resumed leader applied {leader.report["applied"]}')
        return _outcome(c, 'leader paused (SIGSTOP) past its lease', c.processes,
                        recovered_in=recovered_in, failures=failures,
                        measures={'leader': leader.name})


def _stop_between_renewals(c, process):
    """SIGSTOP ``process`` just after its heartbeat renewed the lease.

    A process paused *inside* its renewal transaction would keep the lock row (PostgreSQL,
    MySQL) or the whole database (SQLite) locked until it resumes, and nobody could take
    over: a real but different fault.  Stopping right after a renewal leaves a whole
    heartbeat interval (lease/3) of margin.
    """
    renewed = c.lock().renewed_at
    wait_until(lambda: c.lock().renewed_at != renewed, 'a lease renewal', DEADLINE, 0.005)
    process.signal(signal.SIGSTOP)


# --- fault 3: the database is unreachable at start-up -------------------------------------

class Outage:
    """A database the processes cannot reach until :meth:`end`; one way per database.

    * SQLite: the directory of the database file does not exist yet (a volume not mounted);
      it appears, with the application's schema, in one ``rename``.
    * PostgreSQL: the database does not exist yet; it is created from this run's (prepared)
      database as a template, so it appears with the application's schema at once.
    * MySQL/MariaDB: nothing listens on the port yet (a server still starting); a forwarder
      to the real server starts listening.
    """

    def __init__(self, url, workdir):
        self.url = url
        self.workdir = workdir
        self.dialect = dialect_of(url)
        self._forwarder = None
        self._late_database = None
        if self.dialect == 'sqlite':
            self.app_url = f'sqlite:///{workdir}/volume/app.sqlite'
            self.db_url = self.app_url
        elif self.dialect == 'postgresql':
            self._late_database = f'{make_url(url).database}_late'
            self.app_url = make_url(url).set(database=self._late_database).render_as_string(
                hide_password=False)
            self.db_url = self.app_url
        else:
            target = make_url(url)
            self._forwarder = cluster.PortForwarder(target.host or '127.0.0.1',
                                                    target.port or 3306)
            self.app_url = self._forwarder.url_for(url)
            self.db_url = url

    def prepare(self):
        """The application's schema where the database will come from."""
        if self.dialect != 'sqlite':
            engine = sa.create_engine(self.url, poolclass=NullPool)
            procapp.create_side_effects_table(engine)
            engine.dispose()

    def end(self):
        if self.dialect == 'sqlite':
            staging = self.workdir / 'volume.staging'
            staging.mkdir()
            engine = sa.create_engine(f'sqlite:///{staging}/app.sqlite', poolclass=NullPool)
            procapp.create_side_effects_table(engine)
            engine.dispose()
            staging.rename(self.workdir / 'volume')
        elif self.dialect == 'postgresql':
            with _admin(self.url) as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{self._late_database}" '
                                     f'TEMPLATE "{make_url(self.url).database}"')
        else:
            self._forwarder.open()

    def close(self):
        if self._forwarder is not None:
            self._forwarder.close()
        if self._late_database is not None:
            with _admin(self.url) as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self._late_database}" '
                                     f'WITH (FORCE)')


@contextlib.contextmanager
def _admin(url):
    engine = sa.create_engine(url, poolclass=NullPool, isolation_level='AUTOCOMMIT')
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def max_backoff_looks(seconds, first_delay=POLL_INTERVAL * 0.85):
    """The most looks a doubling backoff from ``first_delay`` takes in ``seconds`` (+1 slack);
    a retry every ``first_delay`` would take ``seconds / first_delay``."""
    return math.floor(math.log2(seconds / first_delay + 1)) + 2


def unreachable_at_start(url, workdir, count=3, retries=5):
    """Processes start while the database cannot be reached and look ``retries`` times; then
    the database appears.  Each process must answer 503 at once meanwhile, log the outage
    once and its end once, and retry with a doubling backoff."""
    outage = Outage(url, workdir)
    try:
        outage.prepare()
        with Cluster(outage.app_url, workdir, evolutions(hold=('write',)), FAULT_OPTIONS,
                     db_url=outage.db_url) as c:
            processes = c.start(count)
            c.wait_all_observed(503)

            def retried():
                c.check_alive(processes)
                return all(len(p.report.get('unreachable', [])) >= retries for p in processes)

            wait_until(retried, f'every process retrying {retries} times', DEADLINE)
            outage.end()
            reachable_at = time.time()
            c.wait_serving(processes)
            failures, measures = [], {'retries': {}, 'outage_seconds': {}}
            for p in processes:
                looks = [at for at in p.report['unreachable'] if at < reachable_at]
                tries = len(looks)
                seconds = reachable_at - looks[0]
                measures['retries'][p.name] = tries
                measures['outage_seconds'][p.name] = seconds
                if tries > max_backoff_looks(seconds):
                    failures.append(f'{p.name} retried {tries} times in {seconds:.1f} s')
                if p.report['slowest_503'] >= PROMPT_503:
                    failures.append(f'{p.name} took {p.report["slowest_503"]:.1f} s for a 503')
                for line in ('database unavailable', 'database reachable again'):
                    if len(p.log_lines(line)) != 1:
                        failures.append(f'{p.name} logged {line!r} '
                                        f'{len(p.log_lines(line))} times')
            return _outcome(c, 'database unreachable at start-up', processes,
                            recovered_in=_recovered_in(processes, reachable_at),
                            measures=measures, failures=failures)
    finally:
        outage.close()


# --- fault 4: the database connection is lost ------------------------------------------------

def connection_lost(url, workdir, target, count=2):
    """The server terminates connections of the process running ``e1``.

    ``target='evolution'``: the connection ``e1``'s work runs on, mid-evolution: its work is
    rolled back and retried, not recorded as failed.  ``target='heartbeat'``: every other
    connection of that process: the heartbeat reconnects and the leader keeps its lease.
    """
    steps = [{'id': 'e1', 'steps': ['write', 'hold']}, {'id': 'e2', 'steps': ['write']}]
    with Cluster(url, workdir, steps, FAULT_OPTIONS) as c:
        c.prepare_database()
        c.start(count)
        entered = c.wait_entered('e1')[0]
        leader = c.process_of(entered['pid'])
        if target == 'evolution':
            victims = {entered['connection_id']}
        else:
            # The heartbeat's own connection exists once it renewed while the work holds one.
            victims = wait_until(
                lambda: set(leader.report.get('connections', ())) - {entered['connection_id']},
                'the heartbeat opening its connection', DEADLINE)
        for connection_id in victims:
            cluster.terminate_connection(url, connection_id)
        lost_at = time.time()
        wait_until(lambda: not cluster.open_connections(url, victims), 'connections gone',
                   DEADLINE)
        if target == 'heartbeat':
            wait_until(lambda: c.lock().renewed_at > lost_at, 'a renewal after the loss',
                       DEADLINE)
        c.release('e1')
        c.wait_serving()
        failures = []
        if leader.log_lines(r'\bERROR\b|Traceback'):
            failures.append(f'the leader logged: {leader.log_lines(r"ERROR|Traceback")[0]}')
        if target == 'heartbeat' and (c.lock().generation, c.history()['e1'].owner) != (
                1, leader.report['owner']):
            failures.append('the leader lost its lease')
        return _outcome(c, f'connection lost ({target})', c.processes, failures=failures,
                        recovered_in=_recovered_in(c.processes, lost_at),
                        measures={'leader': leader.name, 'terminated': len(victims)})


# --- fault 5: an evolution raises --------------------------------------------------------------

def evolution_raises(url, workdir, on_failure, count=3, watch_polls=10, restart=True):
    """``e2`` raises in every process that runs it; then (with ``restart``) the cluster
    restarts with ``e2`` fixed and must apply it.

    While it fails: ``e2`` is recorded failed with its traceback, its row rolled back, each
    process tries it at most once (counted in its log), and nothing tries it again during
    ``watch_polls`` poll intervals after every process settled.
    """
    options = dict(FAULT_OPTIONS, on_failure=on_failure)
    settled_phase = 'failed' if on_failure == 'block' else 'serving-after-failure'
    with Cluster(url, workdir, evolutions(hold=('write',), failing=True), options) as c:
        c.prepare_database()
        first = c.start(count)
        wait_until(lambda: all(p.report.get('phase') == settled_phase for p in first),
                   f'every process settling in {settled_phase}', DEADLINE)
        attempts_settled = c.history()[HELD].attempts
        watch_end = time.monotonic() + watch_polls * POLL_INTERVAL
        wait_until(lambda: time.monotonic() > watch_end, 'the watch window', DEADLINE)
        failed = c.history()[HELD]
        side_effects_failing = c.side_effects()
        first_start = [ProcessSummary.of(p) for p in first]
        per_process = {p.name: len(p.log_lines(r"evolving 'e2'")) for p in first_start}
        failures = []
        if failed.state != FAILED or 'RuntimeError: e2 fails on purpose' not in failed.error:
            failures.append(f'e2 recorded {failed.state} with error {failed.error!r}')
        if any(n > 1 for n in per_process.values()) or failed.attempts != attempts_settled:
            failures.append(f'retry storm: {per_process}, {attempts_settled} -> '
                            f'{failed.attempts} attempts')
        if HELD in side_effects_failing:
            failures.append('the failed attempt left its row')
        measures = {'failed_record': failed, 'first_start': first_start,
                    'attempts_per_process': per_process}
        if not restart:
            return _outcome(c, f'evolution raises (on_failure={on_failure})', first,
                            applied_once=['e1'], measures=measures, failures=failures)
        c.stop()
        c.evolutions = evolutions(hold=('write',))
        fixed_at = time.time()
        second = c.start(count, prefix='fixed')
        c.wait_serving(second)
        return _outcome(c, f'evolution raises (on_failure={on_failure}), then fixed', second,
                        recovered_in=_recovered_in(second, fixed_at), measures=measures,
                        failures=failures)


# --- fault 6: gunicorn -------------------------------------------------------------------------

class Gunicorn:
    """A real ``gunicorn`` serving ``procapp:gunicorn_app()`` on 127.0.0.1 (a free port)."""

    def __init__(self, c, workers, preload):
        self.cluster = c
        self.log_path = c.workdir / 'gunicorn.log'
        command = [sys.executable, '-m', 'gunicorn', '--workers', str(workers),
                   '--bind', '127.0.0.1:0', '--pythonpath', str(cluster.TESTS_DIR),
                   '--graceful-timeout', '5', '--timeout', '120',
                   # Concurrent gunicorns (other test runs) would share the default socket.
                   '--no-control-socket']
        if preload:
            command.append('--preload')
        command.append('procapp:gunicorn_app()')
        env = dict(cluster.child_environment(),
                   **{procapp.JOB_ENVIRONMENT_VARIABLE: json.dumps(c.job('gunicorn'))})
        with open(self.log_path, 'wb') as log:
            self.popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, cwd=c.workdir)
        listening = wait_until(lambda: self._logged(r'Listening at: http://127\.0\.0\.1:(\d+)'),
                               'gunicorn listening', cluster.START_DEADLINE)
        self.port = int(listening[0])

    def check_alive(self):
        if self.popen.poll() is not None:
            raise AssertionError(f'gunicorn exited with {self.popen.returncode}:\n{self.log()}')
        return True

    def _logged(self, pattern):
        self.check_alive()
        return re.findall(pattern, self.log())

    def log(self):
        return self.log_path.read_text(errors='replace')

    def worker_pids(self):
        return {int(pid) for pid in re.findall(r'Booting worker with pid: (\d+)', self.log())}

    def served(self):
        """``{worker pid: distinct statuses it served, in order}``."""
        served = {}
        for path in self.cluster.workdir.glob('served-*.json'):
            report = procapp.read_json(path)
            if report:
                served[report['pid']] = [status for status, _ in report['statuses']]
        return served

    def _get(self):
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{self.port}/', timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def request_until(self, condition, what, clients=8):
        """Send requests from ``clients`` concurrent clients until ``condition()`` holds: a
        sync worker answers one request at a time, so concurrent clients reach every worker."""
        done = threading.Event()

        def client():
            while not done.is_set():
                self._get()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        try:
            return wait_until(lambda: self.check_alive() and condition(), what, DEADLINE)
        finally:
            done.set()
            for thread in threads:
                thread.join(60)

    def stop(self):
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(30)


class Uwsgi(Gunicorn):
    """A real uWSGI (the ``pyuwsgi`` build) serving ``procapp:gunicorn_app()`` on 127.0.0.1 with
    ``--master --processes N`` and the fork ``mode`` README.rst recommends: ``lazy-apps``
    (each worker builds its application) or ``fork-hooks`` (the master builds it and calls
    CPython's fork hooks around each fork, ``--py-call-uwsgi-fork-hooks``)."""

    MODES = {'lazy-apps': ['--lazy-apps'], 'fork-hooks': ['--py-call-uwsgi-fork-hooks']}

    def __init__(self, c, workers, mode):
        self.cluster = c
        self.log_path = c.workdir / 'uwsgi.log'
        self.port = cluster.free_port()
        command = [os.path.join(os.path.dirname(sys.executable), 'uwsgi'),
                   '--master', '--processes', str(workers), '--enable-threads',
                   '--http-socket', f'127.0.0.1:{self.port}', '--pythonpath',
                   str(cluster.TESTS_DIR), '--die-on-term', '--need-app', '--disable-logging',
                   '--eval', 'import procapp; application = procapp.gunicorn_app()',
                   *self.MODES[mode]]
        env = dict(cluster.child_environment(),
                   **{procapp.JOB_ENVIRONMENT_VARIABLE: json.dumps(c.job('uwsgi'))})
        with open(self.log_path, 'wb') as log:
            self.popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, cwd=c.workdir)
        wait_until(lambda: self._logged(rf'bound to TCP address 127\.0\.0\.1:{self.port}'),
                   'uwsgi listening', cluster.START_DEADLINE)

    def worker_pids(self):
        return {int(pid) for pid in re.findall(r'spawned uWSGI worker \d+ \(pid: (\d+)',
                                               self.log())}


def gunicorn_workers(url, workdir, preload, workers=4):
    """``gunicorn [--preload] -w 4``: every worker must answer 503 while ``e2`` holds, then 200;
    with ``--preload`` each worker restarts the evolution thread it did not inherit."""
    return _forked_workers(url, workdir, lambda c: Gunicorn(c, workers, preload), workers,
                           f'gunicorn -w {workers}{" --preload" if preload else ""}',
                           restarts=preload)


def uwsgi_workers(url, workdir, mode, workers=4):
    """``uwsgi --master --processes 4`` in a :class:`Uwsgi` ``mode``: as gunicorn; with
    ``fork-hooks`` each worker restarts the thread, with ``lazy-apps`` none needs to."""
    return _forked_workers(url, workdir, lambda c: Uwsgi(c, workers, mode), workers,
                           f'uwsgi --processes {workers} ({mode})',
                           restarts=mode == 'fork-hooks')


def _forked_workers(url, workdir, start_server, workers, title, restarts):
    with Cluster(url, workdir, evolutions(hold=('write', 'hold')), FAULT_OPTIONS) as c:
        c.prepare_database()
        server = start_server(c)
        try:
            pids = wait_until(lambda: len(server.worker_pids()) >= workers and
                              server.worker_pids(), 'the server booting its workers',
                              cluster.START_DEADLINE)
            server.request_until(lambda: all(503 in server.served().get(pid, ()) for pid in pids),
                                 'every worker answering 503')
            c.release(HELD)
            released_at = time.time()
            server.request_until(lambda: all(server.served().get(pid, [None])[-1] == 200
                                             for pid in pids), 'every worker answering 200')
            recovered_in = time.time() - released_at
        finally:
            server.stop()
        log = server.log()
        served = server.served()
        restarted = {int(pid) for pid in re.findall(
            rf'(\d+) \S+ INFO tgext\.evolve\.service: process forked from {server.popen.pid}: '
            rf'restarting', log)}
        failures = [f'worker {pid} served {served.get(pid)}' for pid in pids
                    if served.get(pid) != [503, 200]]
        if restarted != (pids if restarts else set()):
            failures.append(f'workers that restarted the evolution thread: {sorted(restarted)}')
        failures += [f'{title} logged: {line[:200]}' for line in log.splitlines()
                     if cluster.TROUBLE.search(line)]
        return _outcome(c, title, [],
                        observed={f'worker {pid}': served.get(pid) for pid in pids},
                        recovered_in=recovered_in, failures=failures,
                        measures={'worker_pids': sorted(pids), 'restarted': restarted})


# --- issue 12: many evolutions through pgbouncer in transaction mode --------------------------

def error_summary(traceback_text):
    """The exception line of a recorded traceback (SQLAlchemy adds the SQL and a link after
    it)."""
    lines = [line for line in (traceback_text or '').splitlines()
             if line and not line[0].isspace() and not line.startswith(('[', '(', 'Traceback'))]
    return lines[-1][:300] if lines else repr(traceback_text)


def through_pgbouncer(bouncer, url, workdir, count, evolution_count, write, blueprint=None):
    """``count`` processes reach the database at ``url`` through ``bouncer`` (a pgbouncer in
    transaction mode, :mod:`pgbouncer`) and run ``evolution_count`` evolutions; the first holds
    until every process observed a 503, so each must show exactly 503 then 200.

    With ``write``, each evolution writes one row through ``DBSession`` (exactly once is
    counted in committed rows).  Without, its only statements are tgext.evolve's own (lock,
    history, fencing, polling): exactly once is counted in runs of ``evolve()`` and attempts.
    ``blueprint`` is the application's own settings (``sqlalchemy.connect_args``).

    Measures ``connections``: pgbouncer's clients and server connections of the database
    while every process waits, to show the processes shared a few server connections.  An
    evolution recorded failed ends the wait (``on_failure = block``: the cluster would answer
    503 until the deadline).
    """
    ids = [f'e{n:02}' for n in range(1, evolution_count + 1)]
    steps = ['write'] if write else []
    evolutions = [{'id': evolution_id, 'steps': steps + (['hold'] if n == 0 else [])}
                  for n, evolution_id in enumerate(ids)]
    with Cluster(bouncer.url, workdir, evolutions, CALM_OPTIONS, db_url=url,
                 blueprint=blueprint) as c:
        c.prepare_database()
        processes = c.start(count)
        c.wait_all_observed(503)
        connections = bouncer.connections()
        c.release(ids[0])

        def settled():
            c.check_alive(processes)
            return (all(p.serving for p in processes)
                    or any(record.state == FAILED for record in c.history().values()))

        wait_until(settled, f'{count} processes serving or an evolution failed')
        runs = {evolution_id: len(c.entered(evolution_id)) for evolution_id in ids}
        history = c.history()
        failures = [f'{p.name} observed {p.observed}' for p in processes
                    if p.observed != [503, 200]]
        for evolution_id in ids:
            record = history.get(evolution_id)
            if record is not None and record.state == FAILED:
                failures.append(f'{evolution_id} failed: {error_summary(record.error)}')
            elif not write and (record is None or record.state != APPLIED):
                failures.append(f'{evolution_id} is {record.state if record else "not recorded"}')
            elif record is not None and record.attempts != 1:
                failures.append(f'{evolution_id} took {record.attempts} attempts')
        failures += [f'{evolution_id} ran {n} times' for evolution_id, n in runs.items()
                     if n != 1]
        outcome = _outcome(c, f'{count} processes, {evolution_count} evolutions through '
                              f'pgbouncer ({bouncer.pool_mode} pooling)', processes,
                           applied_once=ids if write else [], failures=failures,
                           measures={'runs': runs, 'connections': connections})
        outcome.failures += _troubled(outcome.processes)
        return outcome
