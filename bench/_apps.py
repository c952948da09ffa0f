"""One benchmark process: a TurboGears hello-world app, bare or with tgext.evolve.

Every figure is measured in processes started by the ``bench_*.py`` scripts through
:func:`command`; this module is what those processes run::

    python bench/_apps.py '<json job>'

The job says which database (``url``), whether tgext.evolve is plugged (``plugged``), its
settings (``options``) and what to measure (``mode``):

``opcodes``
    Python opcodes and CPU time per request, measured in this process's request thread, after
    a warm-up; with ``state = "evolving"`` the app's own runner holds the lock and runs a
    blocking evolution meanwhile, so every request gets the gate's 503.  Prints one JSON object.
``startup``
    seconds from app creation (``make_wsgi_app``) to its first 200.  Prints one JSON object.
``startup_opcodes``
    Python opcodes from app creation to its first 200, in every thread.  Prints one JSON object.
``startup_instructions``
    the same span, marked for valgrind's callgrind (see :func:`measure_startup_instructions`),
    which counts the machine instructions in it.  Prints one JSON object.
``member``
    a process of a cluster: builds the app, asks it for ``/`` every :data:`MEMBER_TICK` seconds
    until it answers 200, writes its phase changes to ``<dir>/<name>.phase`` as they happen and a
    report to ``<dir>/<name>.json`` at the end.

Every SQL statement any engine of the process sends is logged with its time and thread (a
SQLAlchemy ``before_cursor_execute`` listener on the Engine class, installed before the app
exists), so statement counts are per process and never polluted by other database users.

The benchmark evolution (:func:`blocking_evolution`) sends no statement of its own: it waits
until the file :func:`finish_path` exists, so the orchestrator decides how long it runs.
Started a second time (after its first runner was killed) it finishes at once.
"""
import collections
import json
import math
import os
import sys
import threading
import time

import sqlalchemy as sa
import transaction
import zope.sqlalchemy
from sqlalchemy.orm import scoped_session, sessionmaker

from tg import FullStackApplicationConfigurator, TGController, expose
from tg.configuration import milestones

#: Seconds between two requests of a cluster member still answered 503.
MEMBER_TICK = 0.01
#: A member gives up (and reports no 200) after this long.
MEMBER_DEADLINE = 600.0
#: How often the benchmark evolution looks for its finish file.
FINISH_POLL = 0.02
EVOLUTION_ID = 'bench_blocking'
#: ``tests/``, for its one wait-until helper (``polling.py``).
TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')


def command(job):
    """The argv that runs ``job`` in a fresh process."""
    return [sys.executable, os.path.abspath(__file__), json.dumps(job)]


def finish_path(workdir):
    """The file whose existence ends the benchmark evolution."""
    return os.path.join(workdir, 'finish')


# --- what the process records ----------------------------------------------------------------

class StatementLog:
    """Every statement sent by any engine of this process: ``(time, thread name, text)``."""

    def __init__(self):
        self.entries = []
        sa.event.listen(sa.engine.Engine, 'before_cursor_execute', self._record)

    def _record(self, conn, cursor, statement, parameters, context, executemany):
        self.entries.append((time.time(), threading.current_thread().name,
                             ' '.join(statement.split())[:100]))

    def count(self, thread_name=None):
        return sum(1 for _, thread, _ in self.entries
                   if thread_name is None or thread == thread_name)


#: Times the benchmark evolution recorded in this process (``evolve_start``, ``commit``...).
evolution_events = {}


def blocking_evolution(finish_file, started_file, reports_progress=False):
    """An Evolution instance that runs until ``finish_file`` exists (see the module doc).

    With ``reports_progress`` it calls ``self.progress()`` every :data:`FINISH_POLL` seconds
    while it waits, as a long evolution that reports its progress does.
    """
    from tgext.evolve import Evolution

    class Blocking(Evolution):
        evolution_id = EVOLUTION_ID

        def evolve(self):
            evolution_events['evolve_start'] = time.time()
            transaction.get().addAfterCommitHook(self._committed)
            try:
                fd = os.open(started_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                evolution_events['retry'] = True  # the first runner was killed: finish now
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                done = 0
                while not os.path.exists(finish_file):
                    time.sleep(FINISH_POLL)
                    if reports_progress:
                        done += 1
                        self.progress(done)
            evolution_events['evolve_end'] = time.time()

        @staticmethod
        def _committed(success):
            if success:
                evolution_events['commit'] = time.time()

    return Blocking()


# --- the application ---------------------------------------------------------------------------

def make_configurator(url, plugged, options, workdir, page='hello', reports_progress=False,
                      status_page=False):
    """The configurator of a hello-world TG app on ``url``; with tgext.evolve when ``plugged``.

    The two variants differ only by the ``plugme`` call (and the import it needs).  ``page``
    is what ``/`` does: ``hello`` returns a string, ``query`` also reads the database once
    (``SELECT 1`` through the app's session), as most real pages do.  ``reports_progress``:
    see :func:`blocking_evolution`.  ``status_page``: the root also mounts tgext.evolve's
    status page at ``/evolve`` (requests still go to ``/``).
    """
    milestones._reset_all()  # before defining the controller: see tg-ecosystem.md 1.3
    session = scoped_session(sessionmaker())
    zope.sqlalchemy.register(session)
    reads_database = {'hello': False, 'query': True}[page]

    class RootController(TGController):
        @expose()
        def index(self):
            if reads_database:
                session.execute(sa.text('SELECT 1')).scalar()
            return 'Hello World'

    if status_page:
        from tg import predicates
        from tgext.evolve import EvolveStatusController
        RootController.evolve = EvolveStatusController(allow_only=predicates.not_anonymous())

    class Model:
        DBSession = session

        @staticmethod
        def init_model(engine):
            session.configure(bind=engine)

    configurator = FullStackApplicationConfigurator()
    configurator.update_blueprint({
        'root_controller': RootController(), 'use_sqlalchemy': True, 'model': Model,
        'sqlalchemy.url': url, 'session.enabled': False, 'cache.enabled': False,
        'i18n.enabled': False, 'sa_auth.enabled': False, 'trace_errors.enable': False,
        'debug': False,
    })
    if plugged:
        import tgext.evolve
        evolution = blocking_evolution(finish_path(workdir), os.path.join(workdir, 'started'),
                                       reports_progress)
        tgext.evolve.plugme(configurator, dict(options, evolutions=[evolution]))
    return configurator


def make_app(configurator):
    """``(wsgi_app, service)``: service is tgext.evolve's EvolveService, None if not plugged."""
    app = configurator.make_wsgi_app({}, {})
    service = None
    if 'tgext.evolve' in sys.modules:
        import tg
        from tgext.evolve.service import service_for_config
        service = service_for_config(tg.config)
    return app, service


def job_configurator(job):
    """The configurator a job describes: see :func:`make_configurator`."""
    return make_configurator(job['url'], job['plugged'], job.get('options', {}), job['dir'],
                             job.get('page', 'hello'), job.get('reports_progress', False),
                             job.get('status_page', False))


def build_app(job):
    """The app a job describes: see :func:`job_configurator` and :func:`make_app`."""
    return make_app(job_configurator(job))


def _environ():
    from webob import Request
    return Request.blank('/', headers={'Accept': 'text/html'}).environ


def call(app, environ):
    """One request through the WSGI callable; returns the status code."""
    status = []

    def start_response(status_line, headers, exc_info=None):
        status.append(status_line)

    result = app(dict(environ), start_response)
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, 'close', None)
        if close is not None:
            close()
    return int(status[0][:3])


def serve_first_200(app, environ):
    """Ask until the app answers 200; the number of requests it took (1 once the app is ready,
    or when the gate's wait for the first look ended in time)."""
    requests = 1
    while call(app, environ) != 200:
        requests += 1
        time.sleep(0.001)
    return requests


def plain_503(environ, start_response):
    """The cheapest possible 503: what the gate's cost is compared with."""
    start_response('503 Service Unavailable', [('Content-Type', 'text/plain')])
    return [b'Service Unavailable']


def count_opcodes(function, all_threads=False):
    """Python opcodes executed by ``function()`` (and its return value): in this thread, or
    with ``all_threads`` also in the threads it starts."""
    executed = collections.Counter()  # per thread: each thread only ever updates its own key

    def trace_opcodes(frame, event, arg):
        if event == 'opcode':
            executed[threading.get_ident()] += 1
        return trace_opcodes

    def trace_calls(frame, event, arg):
        frame.f_trace_opcodes = True
        return trace_opcodes

    sys.settrace(trace_calls)
    if all_threads:
        threading.settrace(trace_calls)
    try:
        value = function()
    finally:
        sys.settrace(None)
        threading.settrace(None)
    return sum(executed.values()), value


def _wait_for(predicate, what, timeout=120.0):
    # tests/polling.py, imported only here: the start-up modes, which are measured, never wait.
    sys.path.append(TESTS_DIR)
    import polling
    polling.wait_until(predicate, what, timeout, interval=0.01)


# --- modes -------------------------------------------------------------------------------------

def measure_opcodes(job, statements):
    """Opcodes and CPU per request, in the request thread only."""
    app, service = build_app(job)
    environ = _environ()
    expected = 200
    if job.get('state') == 'evolving':
        expected = 503
        _wait_for(lambda: service.state.phase == 'evolving', 'the evolution to start')
    elif service is not None:
        _wait_for(lambda: call(app, environ) == 200, 'the gate to open')
    request_thread = threading.current_thread().name
    before = statements.count(request_thread)
    for _ in range(job['warmup']):
        call(app, environ)
    per_request = []
    for _ in range(job['requests']):
        opcodes, status = count_opcodes(lambda: call(app, environ))
        if status != expected:
            raise SystemExit(f'expected {expected}, got {status}')
        per_request.append(opcodes)
    cpu_requests = job['cpu_requests']
    started = time.thread_time()
    for _ in range(cpu_requests):
        call(app, environ)
    cpu = time.thread_time() - started
    reference, _ = count_opcodes(lambda: call(plain_503, environ))
    sent = statements.count(request_thread) - before
    if job.get('state') == 'evolving':
        open(finish_path(job['dir']), 'w').close()
        _wait_for(lambda: service.state.open, 'the evolution to finish')
    return {
        'opcodes': per_request,
        'cpu_us': 1e6 * cpu / cpu_requests,
        'requests': job['warmup'] + job['requests'] + cpu_requests,
        'statements': sent,
        'statements_all_threads': statements.count(),
        'plain_503_opcodes': reference,
    }


def measure_startup(job, statements):
    """Seconds from app creation (``make_wsgi_app``) to the first 200.

    Also reported: ``configure``, the seconds before that spent importing tgext.evolve and
    building the configurator (what the application's ``app_cfg.py`` does at import time).
    """
    started = time.perf_counter()
    configurator = job_configurator(job)
    creating = time.perf_counter()
    creating_cpu = time.process_time()
    app, service = make_app(configurator)
    created = time.perf_counter()
    serve_first_200(app, _environ())
    served = time.perf_counter()
    return {'seconds': served - creating, 'configure': creating - started,
            'make_wsgi_app': created - creating, 'first_request': served - created,
            'cpu': time.process_time() - creating_cpu,
            'statements': statements.count()}


def measure_startup_opcodes(job, statements):
    """Python opcodes from app creation to the first 200, in every thread of the process.

    Deterministic where time is not, but blind to C code and to waits: a driver's connection
    set-up (TLS, the server's reply) is not in it.
    """
    configurator = job_configurator(job)
    environ = _environ()

    def start_and_serve():
        app, _ = make_app(configurator)
        serve_first_200(app, environ)

    opcodes, _ = count_opcodes(start_and_serve, all_threads=True)
    return {'opcodes': opcodes}


#: The C functions that mark the span ``startup_instructions`` measures: callgrind zeroes its
#: counters when the first is entered and writes them out when the second is (its options
#: ``--zero-before`` / ``--dump-before``).  Builtins that nothing else calls at start-up, so the
#: marks need neither a compiled helper nor callgrind's headers.
CALLGRIND_START_MARK = 'math_lgamma'
CALLGRIND_END_MARK = 'math_erfc'


def measure_startup_instructions(job, statements):
    """Machine instructions from app creation to the first 200, C code included.

    Run under ``valgrind --tool=callgrind --zero-before=math_lgamma --dump-before=math_erfc``
    (``bench_startup.callgrind_command``): callgrind counts every thread's instructions between
    the two calls, the driver's C code (TLS set-up, SQLite opening its file) included.  Like
    opcodes it is the same from one run to the next, and like them it does not see waiting
    (the server's side of a connection).  ``requests`` is 1 unless the first request gave up
    waiting for the first look (callgrind runs code ~50x slower); each retry adds a 503, a
    few thousand instructions in a count of over a hundred million.
    """
    configurator = job_configurator(job)
    environ = _environ()
    math.lgamma(1.0)  # CALLGRIND_START_MARK
    app, _ = make_app(configurator)
    requests = serve_first_200(app, environ)
    math.erfc(1.0)  # CALLGRIND_END_MARK
    return {'requests': requests}


def _write_json(path, value):
    temporary = f'{path}.{os.getpid()}.tmp'
    with open(temporary, 'w') as f:
        json.dump(value, f)
    os.replace(temporary, path)


def run_member(job, statements):
    """A cluster member: serve-poll until 200, reporting phases and statements (module doc)."""
    name, workdir = job['name'], job['dir']
    created = time.time()
    app, service = build_app(dict(job, plugged=True))
    environ = _environ()
    phases = []
    phase_file = os.path.join(workdir, f'{name}.phase')
    deadline = time.monotonic() + MEMBER_DEADLINE
    first_200 = None
    while time.monotonic() < deadline:
        phase = service.state.phase
        if not phases or phases[-1][1] != phase:
            phases.append((time.time(), phase))
            _write_json(phase_file, {'phase': phase, 'pid': os.getpid()})
        if call(app, environ) == 200:
            first_200 = time.time()
            break
        time.sleep(MEMBER_TICK)
    _write_json(os.path.join(workdir, f'{name}.json'), {
        'name': name, 'pid': os.getpid(), 'created': created, 'first_200': first_200,
        'phases': phases, 'statements': statements.entries, 'evolution': evolution_events,
    })
    return None


MODES = {'opcodes': measure_opcodes, 'startup': measure_startup,
         'startup_opcodes': measure_startup_opcodes,
         'startup_instructions': measure_startup_instructions, 'member': run_member}


def main(argv):
    job = json.loads(argv[1])
    statements = StatementLog()
    result = MODES[job['mode']](job, statements)
    if result is not None:
        print(json.dumps(result))
    sys.stdout.flush()
    # Skip interpreter teardown: the runner's daemon threads may still hold connections.
    os._exit(0)


if __name__ == '__main__':
    main(sys.argv)
