"""Start, observe and hurt clusters of real application processes (``tests/procapp.py``).

Used by the multi-process and fault tests and by ``bench/faults.py``.  Every wait polls with a
deadline; nothing sleeps in place of synchronisation.
"""
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import procapp
from polling import POLL, wait_until
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend

TESTS_DIR = pathlib.Path(__file__).resolve().parent
PROCAPP = TESTS_DIR / 'procapp.py'

#: Deadline for anything a cluster does "soon": generous, the machine is shared and loaded.
DEADLINE = 120.0
#: Deadline for many processes to import TurboGears and start (32 processes on 2 cores).
START_DEADLINE = 300.0
#: How often to look at every process's report: reading many files is not free.
CLUSTER_POLL = 0.1

#: What no healthy process ever logs: errors, and tgext.evolve's warnings (an outage, a lost
#: lock, a failed renewal).
TROUBLE = re.compile(r'Traceback|\b(ERROR|CRITICAL) |WARNING tgext\.evolve(\.\w+)*:')


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers that cannot report
    the port they bound, unlike gunicorn with ``--bind 127.0.0.1:0``)."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def child_environment():
    """Unbuffered output (logs are read while the process runs), ``tests/`` importable."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get('PYTHONPATH')]))
    return env


class LogReader:
    """Reading a process's log (``log_text()``)."""

    def log_lines(self, pattern):
        """Lines of the log matching the regular expression ``pattern``."""
        return [line for line in self.log_text().splitlines() if re.search(pattern, line)]

    def error_lines(self):
        """Lines no healthy process logs (:data:`TROUBLE`)."""
        return self.log_lines(TROUBLE)


class AppProcess(LogReader):
    """One ``procapp.py`` process."""

    def __init__(self, cluster, name, popen):
        self.cluster = cluster
        self.name = name
        self.popen = popen
        self.pid = popen.pid

    def __repr__(self):
        return f'<AppProcess {self.name} pid {self.pid}>'

    @property
    def report(self):
        return procapp.read_json(self.cluster.workdir / f'{self.name}.json') or {}

    @property
    def observed(self):
        """The distinct statuses this process observed, in order (e.g. ``[503, 200]``)."""
        return [status for status, _ in self.report.get('statuses', [])]

    @property
    def serving(self):
        observed = self.observed
        return bool(observed) and observed[-1] == 200

    def log_text(self):
        return (self.cluster.workdir / f'{self.name}.log').read_text(errors='replace')

    def get(self, path='/'):
        """One request from the test, over HTTP: the status code."""
        url = f'http://127.0.0.1:{self.report["port"]}{path}'
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    def signal(self, signum):
        self.popen.send_signal(signum)

    @property
    def alive(self):
        return self.popen.poll() is None


class Cluster:
    """Processes of one application on one database, sharing a working directory.

    ``url`` is what the processes connect to; ``db_url`` is how the test reads the database
    (they differ when the processes go through a :class:`PortForwarder` or a pgbouncer).
    ``blueprint`` adds TurboGears settings to the application's (``sqlalchemy.connect_args``).
    ``script`` is the program each process runs (a subclass may run another application).
    """

    script = PROCAPP

    def __init__(self, url, workdir, evolutions, options=None, db_url=None, blueprint=None):
        self.url = url
        self.db_url = db_url or url
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.evolutions = evolutions
        self.evolution_ids = [e['id'] for e in evolutions]
        self.options = dict(options or {})
        self.blueprint = dict(blueprint or {})
        self.processes = []
        self._batches = 0
        self._engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # --- processes ---------------------------------------------------------------------------

    def job(self, name, **extra):
        return {'url': self.url, 'dir': str(self.workdir), 'name': name,
                'evolutions': self.evolutions, 'options': self.options,
                'blueprint': self.blueprint, **extra}

    def start(self, count, together=True, prefix='p'):
        """Start ``count`` processes; with ``together`` they build their apps at the same
        moment (each waits, fully imported, for one shared go file)."""
        self._batches += 1
        go = f'go-{self._batches}' if together else None
        started = []
        for _ in range(count):
            name = f'{prefix}{len(self.processes) + 1}'
            with open(self.workdir / f'{name}.log', 'wb') as log:
                popen = subprocess.Popen(
                    [sys.executable, str(self.script), json.dumps(self.job(name, go=go))],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=child_environment(), cwd=self.workdir)
            process = AppProcess(self, name, popen)
            self.processes.append(process)
            started.append(process)
        if together:
            wait_until(lambda: self._all_ready(started), f'{count} processes importing',
                       START_DEADLINE, CLUSTER_POLL)
            (self.workdir / go).touch()
        return started

    def _all_ready(self, processes):
        for process in processes:
            if not process.alive:
                raise AssertionError(f'{process} exited with {process.popen.returncode}:\n'
                                     f'{process.log_text()}')
        return all((self.workdir / f'{p.name}.ready').exists() for p in processes)

    @property
    def living(self):
        return [p for p in self.processes if p.alive]

    def check_alive(self, processes):
        for process in processes:
            if not process.alive:
                raise AssertionError(f'{process} exited with {process.popen.returncode}:\n'
                                     f'{process.log_text()[-5000:]}')

    def wait_all_observed(self, status, processes=None, timeout=START_DEADLINE):
        """Wait until every process has observed ``status`` at least once."""
        processes = self.living if processes is None else processes

        def seen():
            self.check_alive(processes)
            return all(status in p.observed for p in processes)

        wait_until(seen, f'every process observing {status}', timeout, CLUSTER_POLL)

    def wait_serving(self, processes=None, timeout=DEADLINE):
        """Wait until every process (default: every living one) observes 200."""
        processes = self.living if processes is None else processes

        def serving():
            self.check_alive(processes)
            return all(p.serving for p in processes)

        wait_until(serving, f'{len(processes)} processes serving', timeout, CLUSTER_POLL)

    def stop(self):
        for process in self.processes:
            if process.alive:
                with contextlib.suppress(ProcessLookupError):
                    process.signal(signal.SIGCONT)  # a paused process cannot die of SIGTERM
                    process.popen.terminate()
        for process in self.processes:
            try:
                process.popen.wait(20)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(20)
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- evolutions ------------------------------------------------------------------------------

    def release(self, evolution_id):
        """Let every current and future run of a ``hold`` step of ``evolution_id`` go on."""
        (self.workdir / f'release-{evolution_id}').touch()

    def entered(self, evolution_id):
        """``[{pid, owner, time, connection_id}]`` of every run of ``evolution_id`` so far."""
        paths = sorted(self.workdir.glob(f'entered-{evolution_id}-*.json'))
        return [procapp.read_json(path) for path in paths]

    def wait_entered(self, evolution_id, count=1, timeout=START_DEADLINE):
        return wait_until(lambda: len(self.entered(evolution_id)) >= count and
                          self.entered(evolution_id), f'{evolution_id} entered {count} time(s)',
                          timeout, POLL)

    def process_of(self, pid):
        return next(p for p in self.processes if p.pid == pid)

    # --- the database, read by the test ------------------------------------------------------

    @property
    def engine(self):
        if self._engine is None:
            self._engine = sa.create_engine(self.db_url, poolclass=NullPool)
        return self._engine

    def prepare_database(self):
        """The application's own table, as ``setup-app`` would create it."""
        procapp.create_side_effects_table(self.engine)

    def side_effects(self):
        return procapp.count_side_effects(self.engine)

    def history(self):
        return SQLAlchemyBackend(self.engine).read_history()

    def lock(self):
        return SQLAlchemyBackend(self.engine).read_lock()


# --- faults the tests inject -------------------------------------------------------------------

def terminate_connection(url, connection_id):
    """Make the server end one connection (``pg_terminate_backend`` / ``KILL``)."""
    engine = sa.create_engine(url, poolclass=NullPool, isolation_level='AUTOCOMMIT')
    try:
        with engine.connect() as conn:
            if engine.dialect.name == 'postgresql':
                conn.execute(sa.text('SELECT pg_terminate_backend(:pid)'), {'pid': connection_id})
            else:
                with contextlib.suppress(sa.exc.OperationalError):  # already gone
                    conn.exec_driver_sql(f'KILL {int(connection_id)}')
    finally:
        engine.dispose()


def open_connections(url, connection_ids):
    """Which of ``connection_ids`` the server still has open."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == 'postgresql':
                rows = conn.execute(sa.text('SELECT pid FROM pg_stat_activity'))
            else:
                rows = conn.execute(sa.text('SELECT id FROM information_schema.processlist'))
            return set(connection_ids) & {row[0] for row in rows}
    finally:
        engine.dispose()


class PortForwarder:
    """A TCP port that refuses connections until :meth:`open`, then forwards to a server.

    The port is bound (so nobody else can take it) but not listening: the kernel refuses
    every connection, exactly as for a database that is not up yet.
    """

    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.bind(('127.0.0.1', 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets = []

    def url_for(self, url):
        """``url`` pointed at this forwarder instead of its server."""
        return make_url(url).set(host='127.0.0.1', port=self.port).render_as_string(
            hide_password=False)

    def open(self):
        self._listener.listen(64)
        threading.Thread(target=self._accept, name='forwarder', daemon=True).start()

    def _accept(self):
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self):
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@dataclasses.dataclass
class ProcessSummary(LogReader):
    """What one process showed, kept after it stopped."""
    name: str
    pid: int
    observed: list
    report: dict
    log: str

    @classmethod
    def of(cls, process):
        return cls(process.name, process.pid, process.observed, process.report,
                   process.log_text())

    def log_text(self):
        return self.log
