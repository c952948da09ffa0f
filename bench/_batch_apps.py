"""One batched-evolution benchmark process (``bench_batches.py`` starts them)::

    python bench/_batch_apps.py '<json job>'

Every job names a database (``url``) whose table ``items`` (:func:`fill`) holds the rows to
walk, and a ``mode``:

``overhead``
    in one process, alternately: a :class:`~tgext.evolve.BatchEvolution` run in the foreground
    (``tgext.evolve.operations.run``, what ``gearbox evolve run`` does) and a hand-written keyset
    loop with the same batch size committing each batch through the same ``DBSession``; ``form``
    ``item`` (``process()`` sets one column of each ORM object) or ``bulk`` (``process_batch()``
    issues one UPDATE per batch).  Prints the wall and CPU time (this process's, every thread)
    of every run.
``memory``
    the application's idle RSS, then the peak RSS while a ``process()`` evolution walks every row
    in batches of ``batch_size``.
``batches``
    the duration of every batch transaction (the session's begin to its commit) of a run with
    ``batch_seconds`` set, each item costing ``item_cost`` seconds.
``member``
    a process of a cluster: the TurboGears app with a hello page and ``evolutions`` (a blocking
    one of ``seconds``, a batched one); asks for ``/`` every :data:`TICK` seconds and writes
    ``<dir>/<name>.json`` once it answers 200; with ``measure_serving``, it then measures the
    hello page's throughput idle (its background evolution held back), while the evolution
    runs, and idle again once it is applied.

Every process() call of a member is counted through a side channel outside the transaction: a
line appended to ``<dir>/<name>.calls``.
"""
import json
import os
import sys
import threading
import time

import sqlalchemy as sa
import transaction
import zope.sqlalchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

import _apps
from tg import FullStackApplicationConfigurator, TGController, expose
from tg.configuration import milestones

#: Seconds between two requests of a member still answered 503.
TICK = 0.01
#: A member gives up after this long.
DEADLINE = 600.0
BACKFILL_ID = 'bench_backfill'
BLOCKING_ID = 'bench_blocking'

#: A backfill's collection() waits for this: the serving figure measures the idle process first.
BACKFILL_MAY_START = threading.Event()
BACKFILL_MAY_START.set()

DBSession = scoped_session(sessionmaker())
zope.sqlalchemy.register(DBSession)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = 'items'
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int] = mapped_column(default=0)  # incremented: non-idempotent work
    value: Mapped[int] = mapped_column(default=0)  # set: the overhead figures' one column
    note: Mapped[str] = mapped_column(sa.String(40))


items = Item.__table__


def fill(url, rows):
    """Create ``items`` with ``rows`` rows (ids 1..rows), in one statement on the server."""
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        if engine.dialect.name == 'postgresql':
            conn.exec_driver_sql(
                f"INSERT INTO items (id, n, value, note) SELECT i, 0, 0, 'item ' || i "
                f"FROM generate_series(1, {rows}) AS i")
        elif engine.dialect.name == 'sqlite':
            conn.exec_driver_sql(
                f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows})"
                f" INSERT INTO items (id, n, value, note) SELECT i, 0, 0, 'item ' || i FROM s")
        else:  # MySQL/MariaDB: recursive CTEs stop at 1000 levels by default; chunks of ids
            for start in range(1, rows + 1, 10_000):
                stop = min(rows, start + 9_999)
                conn.execute(items.insert(), [dict(id=i, n=0, value=0, note=f'item {i}')
                                              for i in range(start, stop + 1)])
    engine.dispose()


class _Calls:
    """The side channel: one line (the item's id) per process() call, appended unbuffered."""

    def __init__(self, path):
        self.fd = None if path is None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def item(self, row):
        if self.fd is not None:
            os.write(self.fd, b'%d\n' % row.id)


def _busy(seconds):
    """Work of a fixed wall-clock duration, standing in for a per-item computation."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def make_evolutions(specs, calls):
    """The evolutions ``specs`` describe (see the module doc), with their side channel."""
    from tgext.evolve import BatchEvolution, Evolution

    made = []
    for spec in specs:
        if spec['kind'] == 'blocking':
            class Blocking(Evolution):
                evolution_id = BLOCKING_ID
                seconds = spec['seconds']

                def evolve(self):
                    time.sleep(self.seconds)
            made.append(Blocking())
            continue

        bulk = spec.get('form') == 'bulk'

        class Backfill(BatchEvolution):
            evolution_id = spec.get('id', BACKFILL_ID)
            background = spec.get('background', False)
            batch_size = spec.get('batch_size', BatchEvolution.batch_size)
            max_batch_size = spec.get('max_batch_size', BatchEvolution.max_batch_size)
            item_cost = spec.get('item_cost', 0.0)
            increments = spec.get('increments', False)
            value = 1  # what the overhead runs set: changed before every run

            def collection(self):
                BACKFILL_MAY_START.wait()
                if bulk:
                    return sa.select(items.c.id)
                return DBSession.query(Item)

            if bulk:
                def process_batch(self, rows):
                    DBSession.execute(items.update()
                                      .where(items.c.id.between(rows[0].id, rows[-1].id))
                                      .values(value=self.value))
            else:
                def process(self, row):
                    if self.item_cost:
                        _busy(self.item_cost)
                    if self.increments:
                        row.n += 1
                    else:
                        row.value = self.value
                    calls.item(row)
        made.append(Backfill())
    return made


# --- the application ---------------------------------------------------------------------------

class Model:
    DBSession = DBSession

    @staticmethod
    def init_model(engine):
        DBSession.configure(bind=engine)


def make_configurator(url, options, evolutions):
    """A hello-world TG app on ``url`` with tgext.evolve and ``evolutions`` plugged."""
    import tgext.evolve

    milestones._reset_all()

    class RootController(TGController):
        @expose()
        def index(self):
            return 'Hello World'

    configurator = FullStackApplicationConfigurator()
    configurator.update_blueprint({
        'root_controller': RootController(), 'use_sqlalchemy': True, 'model': Model,
        'sqlalchemy.url': url, 'session.enabled': False, 'cache.enabled': False,
        'i18n.enabled': False, 'sa_auth.enabled': False, 'trace_errors.enable': False,
        'debug': False,
    })
    tgext.evolve.plugme(configurator, dict(options, evolutions=evolutions))
    return configurator


def foreground_service(job, evolutions):
    """The configured application's EvolveService, no WSGI app built (as ``gearbox evolve``)."""
    from tgext.evolve.service import service_for_config
    configurator = make_configurator(job['url'], job.get('options', {}), evolutions)
    conf = configurator.configure({}, {})
    configurator.setup(conf)
    return service_for_config(conf)


def forget_history(service):
    """Let the evolutions run again: their history rows deleted."""
    with service.backend.engine.begin() as conn:
        if sa.inspect(conn).has_table('tgext_evolve_history'):
            conn.exec_driver_sql('DELETE FROM tgext_evolve_history')


# --- modes -------------------------------------------------------------------------------------

def hand_loop(size, value, bulk):
    """The baseline: a keyset walk by id with batches of ``size``, each committed."""
    last = 0
    while last is not None:
        last = _hand_batch(size, value, bulk, last)


def _hand_batch(size, value, bulk, last):
    """One batch after the key ``last``; the batch's last key, None when there was nothing.

    A function of its own, as each batch of the framework is: its items are gone before the
    next batch is read.  (A loop whose variable kept them until the next fetch returned held
    two batches at once, and paid a full garbage collection of the heap more per run for it:
    a baseline 8 % slower than it need be.)"""
    transaction.begin()
    if bulk:
        # The rows of the same select the evolution's collection() is, as Rows: what
        # process_batch() is handed (a Row is a container the garbage collector tracks, an id
        # from scalars() is not).
        rows = DBSession.execute(sa.select(items.c.id).where(items.c.id > last)
                                 .order_by(items.c.id).limit(size)).all()
        if rows:
            DBSession.execute(items.update().where(items.c.id.between(rows[0].id, rows[-1].id))
                              .values(value=value))
            zope.sqlalchemy.mark_changed(DBSession())
    else:
        rows = DBSession.query(Item).filter(Item.id > last).order_by(Item.id).limit(size).all()
        for row in rows:
            row.value = value
    if not rows:
        transaction.abort()
        return None
    last = rows[-1].id
    transaction.commit()
    return last


def _same_start(service):
    """Before a timed run on PostgreSQL: the table vacuumed, so that no run inherits the dead
    rows of the one before it (nor autovacuum clearing them while it runs).

    The garbage collector is left where it is.  A collection before every run would put the
    same number of full collections of the heap (60 ms each here) in every run of a side: a
    side that keeps a few objects more would pay one whole collection more in every run, or
    in none.  Left alone, they fall where the allocations bring them, in proportion."""
    engine = service.backend.engine
    if engine.dialect.name == 'postgresql':
        with engine.connect().execution_options(isolation_level='AUTOCOMMIT') as conn:
            conn.exec_driver_sql('VACUUM items')


def measure_overhead(job):
    from tgext.evolve import operations
    bulk = job['form'] == 'bulk'
    spec = dict(kind='batch', form=job['form'], batch_size=job['batch_size'],
                max_batch_size=job['batch_size'])
    evolution, = evolutions = make_evolutions([spec], _Calls(None))
    service = foreground_service(job, evolutions)
    framework, hand, framework_cpu, hand_cpu = [], [], [], []
    for run in range(job['runs']):
        # Alternating, so that a slow spell of the shared machine hits both alike.
        forget_history(service)
        evolution.value = 2 * run + 1
        _same_start(service)
        started, cpu = time.perf_counter(), time.process_time()
        result = operations.run(service)
        framework.append(time.perf_counter() - started)
        framework_cpu.append(time.process_time() - cpu)
        if result.applied != (BACKFILL_ID,):
            raise SystemExit(f'the evolution did not apply: {result}')
        _same_start(service)
        started, cpu = time.perf_counter(), time.process_time()
        hand_loop(job['batch_size'], 2 * run + 2, bulk)
        hand.append(time.perf_counter() - started)
        hand_cpu.append(time.process_time() - cpu)
    with service.backend.engine.connect() as conn:
        wrong = conn.execute(sa.select(sa.func.count()).select_from(items)
                             .where(items.c.value != 2 * job['runs'])).scalar_one()
    if wrong:
        raise SystemExit(f'{wrong} rows were not updated by the last run')
    return {'framework': framework, 'hand': hand, 'framework_cpu': framework_cpu,
            'hand_cpu': hand_cpu}


def _status_kb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise LookupError(field)


def measure_memory(job):
    from tgext.evolve import operations
    size = job['batch_size']
    evolutions = make_evolutions([dict(kind='batch', batch_size=size, max_batch_size=size)],
                                 _Calls(None))
    service = foreground_service(job, evolutions)
    # Idle: configured, connected, a query answered, as a serving process is.
    transaction.begin()
    DBSession.query(Item).filter(Item.id == 1).all()
    transaction.abort()
    DBSession.remove()
    idle = _status_kb('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM (the peak) to the current RSS
    started = time.perf_counter()
    result = operations.run(service)
    seconds = time.perf_counter() - started
    if result.applied != (BACKFILL_ID,):
        raise SystemExit(f'the evolution did not apply: {result}')
    return {'idle_kb': idle, 'peak_kb': _status_kb('VmHWM'), 'seconds': seconds}


def measure_batches(job):
    from tgext.evolve import operations
    spec = dict(kind='batch', item_cost=job['item_cost'], max_batch_size=1_000_000)
    evolutions = make_evolutions([spec], _Calls(None))
    service = foreground_service(job, evolutions)
    began, durations = {}, []

    def after_begin(session, trans, connection):
        began[id(session)] = time.perf_counter()

    def after_commit(session):
        start = began.pop(id(session), None)
        if start is not None:
            durations.append(time.perf_counter() - start)

    sa.event.listen(sa.orm.Session, 'after_begin', after_begin)
    sa.event.listen(sa.orm.Session, 'after_commit', after_commit)
    result = operations.run(service)
    if result.applied != (BACKFILL_ID,):
        raise SystemExit(f'the evolution did not apply: {result}')
    return {'durations': durations}


def _write_json(path, value):
    temporary = f'{path}.{os.getpid()}.tmp'
    with open(temporary, 'w') as f:
        json.dump(value, f)
    os.replace(temporary, path)


def _serving(app, environ, seconds, while_true=lambda: True):
    """Requests answered in ``seconds`` (or until ``while_true()`` is false): count, latencies."""
    latencies = []
    started = time.perf_counter()
    end = started + seconds
    now = started
    while now < end and while_true():
        _apps.call(app, environ)
        after = time.perf_counter()
        latencies.append(after - now)
        now = after
    return {'seconds': now - started, 'latencies': latencies}


def run_member(job):
    name, workdir = job['name'], job['dir']
    calls = _Calls(os.path.join(workdir, f'{name}.calls'))
    evolutions = make_evolutions(job['evolutions'], calls)
    if job.get('measure_serving'):
        BACKFILL_MAY_START.clear()
    configurator = make_configurator(job['url'], job.get('options', {}), evolutions)
    app, service = _apps.make_app(configurator)
    environ = _apps._environ()
    report = {'name': name, 'pid': os.getpid(), 'first_request': time.time()}
    phase_file = os.path.join(workdir, f'{name}.phase')
    phase = None
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if service.state.phase != phase:
            phase = service.state.phase
            _write_json(phase_file, {'phase': phase, 'pid': os.getpid()})
        status = _apps.call(app, environ)
        if status == 200:
            report['first_200'] = time.time()
            break
        time.sleep(TICK)
    if job.get('measure_serving'):
        # Idle before and after the backfill: the shared machine's load drifts.
        seconds = job['measure_serving']
        _serving(app, environ, 0.5)  # warm-up
        report['idle_before'] = _serving(app, environ, seconds)
        BACKFILL_MAY_START.set()
        _serving(app, environ, 0.5)  # the backfill's first batches (its size still growing)
        report['loaded'] = _serving(app, environ, seconds, lambda: service.runner.alive)
        report['backfill_running_after'] = service.runner.alive
        polling_wait(lambda: not service.runner.alive, 'the background evolution to finish')
        report['idle_after'] = _serving(app, environ, seconds)
    _write_json(os.path.join(workdir, f'{name}.json'), report)
    if job.get('stay'):
        while True:
            time.sleep(1)


def polling_wait(predicate, what):
    sys.path.append(_apps.TESTS_DIR)
    import polling
    polling.wait_until(predicate, what, DEADLINE, interval=0.05)


MODES = {'overhead': measure_overhead, 'memory': measure_memory, 'batches': measure_batches,
         'member': run_member}


def main(argv):
    job = json.loads(argv[1])
    result = MODES[job['mode']](job)
    if result is not None:
        print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # the runner's daemon threads may still hold connections


def command(job):
    return [sys.executable, os.path.abspath(__file__), json.dumps(job)]


if __name__ == '__main__':
    main(sys.argv)
