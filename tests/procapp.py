"""A real TurboGears application process with tgext.evolve, for multi-process and fault tests.

The tests and ``bench/faults.py`` start it as real processes, never in the test process::

    python tests/procapp.py '<json job>'        # one process serving HTTP on 127.0.0.1
    gunicorn 'procapp:gunicorn_app()'           # the job in $PROCAPP_JOB (fault_scenarios.py)

It is a quickstart-shaped TG 2.5 FullStack application on SQLAlchemy (``model.DBSession``
registered with zope.sqlalchemy), built from the job:

``url``
    the database URL (``sqlalchemy.url``).
``dir``
    the cluster's working directory: the files below live there.
``name``
    this process's name (script mode).
``evolutions``
    ``[{"id": "e1", "steps": ["write", "hold"]}, ...]``, registered in that order.  Each
    evolution first records that it entered (``entered-<id>-<pid>.json``: pid, owner, the
    server-side id of the connection its work runs on), then runs its steps:
    ``write`` adds one row ``(evolution_id, pid)`` to :data:`SIDE_EFFECTS` through
    ``DBSession`` and flushes it, so that exactly-once can be counted; ``hold`` waits until the
    file ``release-<id>`` exists (the test decides how long the evolution runs); ``raise``
    raises ``RuntimeError``.  ``"background": true`` makes it a background evolution.
``options``
    ``plugme`` options (``lease``, ``poll_interval``, ``on_failure``...).
``blueprint``
    optional TurboGears settings added to the application's, as ``app_cfg.py`` would
    (``{"sqlalchemy.connect_args": {"prepare_threshold": null}}``).
``go``
    optional file name: the process imports everything, writes ``<name>.ready``, then waits
    until ``go`` exists before building the app, so that many processes start at once.

What a process records, for the test to judge (``<name>.json``, rewritten on every change):
the HTTP statuses it *observed* by asking itself ``GET /`` over HTTP from its first moment,
run-length encoded (``[[503, 12], [200, 10]]``: "saw 503 then 200, never 200 then 503"), its
gate phase, its runner's owner and applied evolutions, the server-side ids of every database
connection it opened, the time of every connection attempt (successful or not), and whether
it built tgext.evolve's SQL tables (``built_sql_tables``).  Its log (stderr) goes to
``<name>.log``.

Under gunicorn every worker records the statuses it *served* in ``served-<pid>.json`` and
adds an ``X-Procapp-Pid`` header to every response, so that a client can tell workers apart.
"""
import faulthandler
import json
import logging
import os
import signal
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import sqlalchemy as sa
import zope.sqlalchemy
from sqlalchemy import orm
from tg import FullStackApplicationConfigurator, TGController, config as tg_config, expose
from tg.configuration import milestones

import tgext.evolve
from tgext.evolve.service import service_for_config
from tgext.evolve.state import UNREACHABLE, GateState

#: Loaded by a process's first lock or history write: one that starts on an evolved database
#: only reads the history, and never needs it.
SQL_SCHEMA_MODULE = 'tgext.evolve.backends.sql_schema'

#: The table evolutions write their side effects to: one row per ``write`` step committed.
SIDE_EFFECTS = 'procapp_side_effects'
#: How often a process asks itself for ``/`` while it is not serving yet.
OBSERVE_INTERVAL = 0.1
#: Consecutive 200s after which a process stops asking (the gate never closes again once
#: open; a test may ask again from outside).
STABLE_OBSERVATIONS = 10
#: How often the report is refreshed once the observations stopped.
REPORT_INTERVAL = 0.2
#: A held evolution gives up after this long, so that a failed test cannot leave it parked.
HOLD_DEADLINE = 300.0
HOLD_POLL = 0.02
JOB_ENVIRONMENT_VARIABLE = 'PROCAPP_JOB'
PID_HEADER = 'X-Procapp-Pid'

log = logging.getLogger('procapp')


# --- the model: what a quickstarted project's ``model`` package offers ---------------------------

class Base(orm.DeclarativeBase):
    pass


class SideEffect(Base):
    __tablename__ = SIDE_EFFECTS
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=True)
    evolution_id: orm.Mapped[str] = orm.mapped_column(sa.String(128), index=True)
    pid: orm.Mapped[int] = orm.mapped_column()


def create_side_effects_table(engine):
    """The application's own schema (a project would create it with ``setup-app``)."""
    Base.metadata.create_all(engine)


def count_side_effects(engine):
    """``{evolution_id: committed rows}``."""
    table = SideEffect.__table__
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.evolution_id, sa.func.count())
                            .group_by(table.c.evolution_id)).all()
    return {evolution_id: count for evolution_id, count in rows}


def server_connection_id(dbapi_connection):
    """The id the database server gives this connection (what pg_terminate_backend / KILL
    take), or None on SQLite."""
    backend_pid = getattr(getattr(dbapi_connection, 'info', None), 'backend_pid', None)
    if backend_pid is not None:  # psycopg 3
        return backend_pid
    thread_id = getattr(dbapi_connection, 'thread_id', None)
    if callable(thread_id):  # PyMySQL
        return thread_id()
    return None


class ConnectionLog:
    """The server id of every connection this process's engine opened."""

    def __init__(self):
        self.server_ids = []

    def watch(self, engine):
        sa.event.listen(engine, 'connect', self._connected)

    def _connected(self, dbapi_connection, connection_record):
        server_id = server_connection_id(dbapi_connection)
        if server_id is not None:
            self.server_ids.append(server_id)


class OutageLog:
    """When the runner found the database unreachable: one entry per failed look, so that
    the retry rhythm can be judged from outside (instrumentation of this test app only)."""

    def __init__(self):
        self.times = []

    def install(self):
        record_phase = GateState.set_phase

        def recording(state, phase):
            if phase == UNREACHABLE:
                self.times.append(time.time())
            record_phase(state, phase)
        GateState.set_phase = recording


class Model:
    """``model`` as TurboGears expects it: ``DBSession`` and ``init_model(engine)``."""

    def __init__(self, connections):
        self.DBSession = orm.scoped_session(orm.sessionmaker())
        zope.sqlalchemy.register(self.DBSession)
        self._connections = connections

    def init_model(self, engine):
        self._connections.watch(engine)
        self.DBSession.configure(bind=engine)
        return self.DBSession


# --- the files a test reads ----------------------------------------------------------------------

def _write_json(path, value):
    temporary = f'{path}.{os.getpid()}.{threading.get_ident()}.tmp'
    with open(temporary, 'w') as f:
        json.dump(value, f)
    os.replace(temporary, path)


def read_json(path):
    """The JSON in ``path``, or None while it does not exist yet."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- evolutions built from the job ---------------------------------------------------------------

class ScriptedEvolution(tgext.evolve.Evolution):
    """An evolution that runs the steps the job lists (module docstring)."""

    STEPS = ('write', 'hold', 'raise')

    def __init__(self, evolution_id, steps, model, workdir):
        unknown = [step for step in steps if step not in self.STEPS]
        if unknown:
            raise ValueError(f'evolution {evolution_id!r}: unknown steps {unknown}')
        self.evolution_id = evolution_id
        self.steps = list(steps)
        self.model = model
        self.workdir = workdir

    def evolve(self):
        session = self.model.DBSession
        service = service_for_config(self.config)
        connection = session.connection().connection.dbapi_connection
        _write_json(os.path.join(self.workdir, f'entered-{self.evolution_id}-{os.getpid()}.json'),
                    {'pid': os.getpid(), 'owner': service.runner.owner, 'time': time.time(),
                     'connection_id': server_connection_id(connection)})
        for step in self.steps:
            if step == 'write':
                session.add(SideEffect(evolution_id=self.evolution_id, pid=os.getpid()))
                session.flush()
            elif step == 'hold':
                self._hold()
            else:
                raise RuntimeError(f'{self.evolution_id} fails on purpose')

    def _hold(self):
        release = os.path.join(self.workdir, f'release-{self.evolution_id}')
        deadline = time.monotonic() + HOLD_DEADLINE
        while not os.path.exists(release):
            if time.monotonic() > deadline:
                raise RuntimeError(f'{self.evolution_id} was never released')
            time.sleep(HOLD_POLL)


def scripted_evolutions(job, model):
    evolutions = [ScriptedEvolution(item['id'], item['steps'], model, job['dir'])
                  for item in job['evolutions']]
    for evolution, item in zip(evolutions, job['evolutions']):
        evolution.background = item.get('background', False)
    return evolutions


#: What builds the job's evolutions: ``tests/batch_workers.py`` puts its own here.
make_evolutions = scripted_evolutions


# --- the application -----------------------------------------------------------------------------

def build_app(job, connections):
    """The WSGI application described by ``job``, with its runner thread started."""
    milestones._reset_all()  # before defining the controller (tg-ecosystem.md 1.3)

    class RootController(TGController):
        @expose()
        def index(self):
            return f'served by {os.getpid()}'

    model = Model(connections)
    evolutions = make_evolutions(job, model)
    configurator = FullStackApplicationConfigurator()
    configurator.update_blueprint({
        'root_controller': RootController(), 'use_sqlalchemy': True, 'model': model,
        'sqlalchemy.url': job['url'], 'session.enabled': False, 'cache.enabled': False,
        'i18n.enabled': False, 'sa_auth.enabled': False, 'trace_errors.enable': False,
        'debug': False, **job.get('blueprint', {}),
    })
    tgext.evolve.plugme(configurator, dict(job.get('options', {}), evolutions=evolutions))
    return configurator.make_wsgi_app({}, {})


def _service():
    return service_for_config(tg_config)


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass  # one line per request would drown the tgext.evolve log the tests read


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Observer:
    """Asks this process for ``/`` over HTTP and keeps ``<name>.json`` current."""

    def __init__(self, name, workdir, port, connections, outages):
        self.url = f'http://127.0.0.1:{port}/'
        self.path = os.path.join(workdir, f'{name}.json')
        self.connections = connections
        self.outages = outages
        self.report = {'name': name, 'pid': os.getpid(), 'port': port, 'statuses': [],
                       'first_served': None, 'slowest_503': 0.0, 'phase': None, 'owner': None,
                       'applied': [], 'connections': [], 'unreachable': [],
                       'built_sql_tables': False}

    def _status(self):
        try:
            with urllib.request.urlopen(self.url, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError as e:
            return f'{type(e).__name__}: {e}'

    def _observe(self):
        asked = time.time()
        status = self._status()
        answered = time.time()
        if status == 200 and self.report['first_served'] is None:
            self.report['first_served'] = answered
        elif status == 503:
            self.report['slowest_503'] = max(self.report['slowest_503'], answered - asked)
        statuses = self.report['statuses']
        if statuses and statuses[-1][0] == status:
            statuses[-1][1] += 1
        else:
            statuses.append([status, 1])
        return statuses[-1] == [200, STABLE_OBSERVATIONS]

    def _refresh(self):
        service = _service()
        runner = service.runner
        self.report.update(phase=service.state.phase, owner=runner.owner,
                           applied=list(runner.applied),
                           connections=list(self.connections.server_ids),
                           unreachable=list(self.outages.times),
                           built_sql_tables=SQL_SCHEMA_MODULE in sys.modules)

    def run(self):
        stable = False
        written, written_at = None, 0.0
        while True:
            if not stable:
                stable = self._observe()
            self._refresh()
            # Rewritten at once when something but a repeat count changed, else once a second.
            snapshot = json.dumps({**self.report,
                                   'statuses': [s for s, _ in self.report['statuses']]})
            if snapshot != written or time.monotonic() - written_at > 1.0:
                _write_json(self.path, self.report)
                written, written_at = snapshot, time.monotonic()
            time.sleep(REPORT_INTERVAL if stable else OBSERVE_INTERVAL)


def serve(job):
    """Script mode: build the app, serve it on 127.0.0.1, observe it until killed."""
    name, workdir = job['name'], job['dir']
    connections, outages = ConnectionLog(), OutageLog()
    outages.install()
    if job.get('go'):
        open(os.path.join(workdir, f'{name}.ready'), 'w').close()
        go = os.path.join(workdir, job['go'])
        while not os.path.exists(go):
            time.sleep(0.005)
    app = build_app(job, connections)
    server = ThreadingServer(('127.0.0.1', 0), QuietHandler)
    server.set_app(app)
    observer = Observer(name, workdir, server.server_address[1], connections, outages)
    threading.Thread(target=observer.run, name='procapp-observer', daemon=True).start()
    server.serve_forever()


# --- gunicorn ------------------------------------------------------------------------------------

class ServedStatusRecorder:
    """WSGI middleware: tags responses with the worker's pid and records what it served."""

    def __init__(self, app, workdir):
        self.app = app
        self.workdir = workdir
        self._guard = threading.Lock()
        self._statuses = []

    def __call__(self, environ, start_response):
        def recording_start_response(status, headers, exc_info=None):
            self._record(int(status[:3]))
            return start_response(status, [*headers, (PID_HEADER, str(os.getpid()))], exc_info)

        return self.app(environ, recording_start_response)

    def _record(self, status):
        with self._guard:
            if self._statuses and self._statuses[-1][0] == status:
                self._statuses[-1][1] += 1
                return
            self._statuses.append([status, 1])
            _write_json(os.path.join(self.workdir, f'served-{os.getpid()}.json'),
                        {'pid': os.getpid(), 'statuses': self._statuses})


def gunicorn_app():
    """The application for gunicorn, from the job in ``$PROCAPP_JOB``."""
    job = json.loads(os.environ[JOB_ENVIRONMENT_VARIABLE])
    _configure_logging()
    return ServedStatusRecorder(build_app(job, ConnectionLog()), job['dir'])


def _configure_logging():
    # `kill -PROF <pid>` prints every thread's stack: how a stuck process is diagnosed (gunicorn
    # workers reset USR1/USR2 to their own uses).
    faulthandler.register(signal.SIGPROF, all_threads=True)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format='%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s')


def main(argv):
    _configure_logging()
    serve(json.loads(argv[1]))


if __name__ == '__main__':
    main(sys.argv)
