"""Applications that read from replicas (``sqlalchemy.master.url`` + ``sqlalchemy.slaves.*``).

TurboGears then uses ``BalancedSession``, which sends reads to a replica.  A replica lags: it may
still show an evolution pending, or a lock held, that the master has long finished with, or
(after history was cleared on the master) show as done what must run again.  tgext.evolve must
decide from the master only: every lock, plan and history access goes there, and so do an
evolution's own reads while it runs.

Each test builds a real TurboGears application (in this process, WebTest) on a master and a
deliberately stale "replica": on SQLite two files, on PostgreSQL two schemas of one database
(the replica connects with ``search_path`` set to its schema).  The replica holds stale copies
of the tgext.evolve tables and of the application's data.  The tests check what the
application does, that the master holds the results, and that the replica was never touched.
"""
import contextlib

import pytest
import sqlalchemy as sa
import tg
import zope.sqlalchemy
from sqlalchemy import orm
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from tg.configuration.sqla.balanced_session import BalancedSession

import conftest
from tgapps import tg_apps  # noqa: F401 (fixture)
from tgext.evolve import Evolution
from tgext.evolve.records import APPLIED
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend

FULLSTACK_PLUGME = ('fullstack', 'plugme')
REPLICA_SCHEMA = 'stale_replica'
#: Rows in the master's ``pages``; the stale replica has none.
MASTER_PAGES = 3


class ReplicaFirstSession(BalancedSession):
    """An application's own balancing, as some apps write it: reads go to a replica unless an
    engine is forced, even outside a request (TurboGears' falls back to the master there)."""

    def get_bind(self, mapper=None, clause=None, **kwargs):
        engines = tg.config['balanced_engines']
        if self._force_engine:
            return engines['all'][self._force_engine]
        if self._flushing:
            return engines['master']
        return engines['slaves']['replica']


class ReplicatedModel:
    """A ``model`` package whose ``DBSession`` balances reads over replicas."""

    is_sql = True

    def __init__(self, master_url, replica_url, session_class):
        self.master_url = master_url
        self.replica_url = replica_url
        self.DBSession = orm.scoped_session(orm.sessionmaker(class_=session_class))
        zope.sqlalchemy.register(self.DBSession)

    def init_model(self, engine):
        return self.DBSession  # a balancing session picks its engine per statement

    def blueprint(self):
        return {'use_sqlalchemy': True, 'model': self,
                'sqlalchemy.master.url': self.master_url,
                'sqlalchemy.slaves.replica.url': self.replica_url}


class CountPages(Evolution):
    """Reads the pages through ``DBSession`` and records how many it saw."""

    evolution_id = 'count_pages'

    def evolve(self):
        session = self.config['DBSession']
        seen = session.execute(sa.text('SELECT count(*) FROM pages')).scalar_one()
        session.execute(sa.text('INSERT INTO evolution_reads (evolution_id, pages) '
                                'VALUES (:evolution_id, :pages)'),
                        {'evolution_id': self.evolution_id, 'pages': seen})


@pytest.fixture(params=['sqlite', 'postgresql'])
def databases(request, tmp_path):
    """``(master_url, replica_url)``, both with the application's tables."""
    if request.param == 'sqlite':
        master = f'sqlite:///{tmp_path / "master.sqlite"}'
        replica = f'sqlite:///{tmp_path / "replica.sqlite"}'
    else:
        master = request.getfixturevalue('postgresql_database_url')
        conftest.empty_sql_database(master)
        _execute(master, f'CREATE SCHEMA {REPLICA_SCHEMA}')
        replica = make_url(master).update_query_dict(
            {'options': f'-csearch_path={REPLICA_SCHEMA}'}).render_as_string(hide_password=False)
    for url, pages in ((master, MASTER_PAGES), (replica, 0)):
        _execute(url, 'CREATE TABLE pages (id INTEGER PRIMARY KEY)',
                 'CREATE TABLE evolution_reads (evolution_id VARCHAR(128), pages INTEGER)',
                 *(f'INSERT INTO pages (id) VALUES ({i})' for i in range(pages)))
    yield master, replica
    if request.param == 'postgresql':
        _execute(master, f'DROP SCHEMA {REPLICA_SCHEMA} CASCADE')


def _execute(url, *statements):
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def _backend(url):
    backend = SQLAlchemyBackend(sa.create_engine(url, poolclass=NullPool))
    backend.ensure_storage()
    return backend


def stale_replica(url, applied=(), lock_owner=None):
    """Give the replica tgext.evolve tables that say ``applied`` are done and, with
    ``lock_owner``, that this owner holds a live lock for an hour."""
    backend = _backend(url)
    lease = backend.acquire(lock_owner or 'a-long-gone-process', 3600)
    if applied:
        backend.record_states(lease, applied, APPLIED)
    if lock_owner is None:
        backend.release(lease)
    backend.engine.dispose()


def snapshot(url):
    """Every row of every table."""
    engine = sa.create_engine(url, poolclass=NullPool)
    metadata = sa.MetaData()
    with engine.connect() as conn:
        metadata.reflect(conn)
        rows = {name: sorted(map(tuple, conn.execute(sa.select(table))))
                for name, table in metadata.tables.items()}
    engine.dispose()
    return rows


def evolution_reads(url):
    return snapshot(url)['evolution_reads']


@contextlib.contextmanager
def statements_to(url):
    """Collect every statement any engine of this process sends to the database at ``url``."""
    url = make_url(url)
    statements = []

    def seen(conn, cursor, statement, *args):
        if conn.engine.url == url:
            statements.append(statement)

    sa.event.listen(sa.engine.Engine, 'before_cursor_execute', seen)
    try:
        yield statements
    finally:
        sa.event.remove(sa.engine.Engine, 'before_cursor_execute', seen)


@pytest.fixture
def replicated_app(tg_apps):
    """Build an application on a master and a replica; its engines are disposed after."""
    models = []

    def build(databases, session_class):
        model = ReplicatedModel(*databases, session_class)
        models.append(model)
        return tg_apps.build(FULLSTACK_PLUGME, model, [CountPages])

    yield build
    for model in models:
        model.DBSession.remove()
    engines = tg.config.get('balanced_engines') or {}
    for engine in (engines.get('all') or {}).values():
        engine.dispose()


@pytest.mark.parametrize('session_class', [BalancedSession, ReplicaFirstSession],
                         ids=['BalancedSession', 'ReplicaFirstSession'])
def test_replica_showing_done_and_locked_does_not_stop_an_evolution(
        replicated_app, databases, session_class):
    """The replica says the evolution is applied and the lock held for an hour; the master has
    neither.  The evolution runs at once, on the master, reading the master's pages."""
    master, replica = databases
    stale_replica(replica, applied=['count_pages'], lock_owner='stale-holder')
    replica_before = snapshot(replica)

    with statements_to(replica) as to_replica:
        app = replicated_app(databases, session_class)
        app.wait_until_serving()

    assert app.service.runner.applied == ['count_pages']
    assert evolution_reads(master) == [('count_pages', MASTER_PAGES)]
    assert app.history()['count_pages'].state == APPLIED
    assert to_replica == []
    assert snapshot(replica) == replica_before


def test_replica_showing_pending_and_locked_does_not_hold_a_process_back(
        replicated_app, databases):
    """The master has applied the evolution; the replica still shows it pending and its lock
    held for an hour.  A new process serves its very first request and runs nothing."""
    master, replica = databases
    master_backend = _backend(master)
    lease = master_backend.acquire('the-process-that-evolved', 60)
    master_backend.record_states(lease, ['count_pages'], APPLIED)
    master_backend.release(lease)
    master_backend.engine.dispose()
    stale_replica(replica, lock_owner='stale-holder')
    replica_before = snapshot(replica)

    with statements_to(replica) as to_replica:
        app = replicated_app(databases, BalancedSession)
        statuses = app.wait_until_serving()

    assert statuses == [200]
    assert app.service.runner.applied == []
    assert evolution_reads(master) == []
    assert to_replica == []
    assert snapshot(replica) == replica_before
