"""Database fixtures shared by every test module.

Servers
    PostgreSQL, MySQL/MariaDB and MongoDB are found through environment variables::

        TGEXT_EVOLVE_TEST_POSTGRES_URL  e.g. postgresql://postgres@127.0.0.1:5432/test
        TGEXT_EVOLVE_TEST_MYSQL_URL     e.g. mysql+pymysql://root@127.0.0.1:3306/test
        TGEXT_EVOLVE_TEST_MONGODB_URL   e.g. mongodb://127.0.0.1:27017

    A variable that is unset skips the tests of that database (the reason is printed by
    ``-ra``).  A variable that is set but whose server cannot be reached is a FAILURE: a CI that
    meant to test a database must not go green because the database was down.  SQLite (a file in
    a temporary directory) and Ming's in-memory MIM always run.

Isolation
    Each test run creates its own database on every server it uses (``tgext_evolve_<random>``)
    the first time a test needs it, and drops it at the end of the run, so concurrent or
    earlier runs never see each other's rows.  Every test starts on an empty database: the
    function-scoped fixtures below drop everything in the run database before handing it out.

Fixtures
    ``sqlite_database_url``, ``postgresql_database_url``, ``mysql_database_url``,
    ``mim_database_url``, ``mongodb_database_url``
        session-scoped: the URL of this run's database (not cleaned; for code that starts
        TurboGears apps in subprocesses and needs a URL string).
    ``pgbouncer``
        session-scoped: a real pgbouncer (``pool_mode = transaction``) in front of this run's
        PostgreSQL database, started by the tests (see ``tests/pgbouncer.py``); its ``url``
        is the database's URL through it.  Skipped with the other PostgreSQL tests; with the
        PostgreSQL URL set, a pgbouncer that is not installed is a FAILURE.
    ``sql_url``
        function-scoped, parametrised over sqlite/postgresql/mysql: this run's database URL,
        emptied before the test.
    ``mongo_url``
        function-scoped, parametrised over mim/mongodb: this run's MongoDB URL (``mim:///name``
        for MIM), emptied before the test.  MIM lives in the test process only.
    ``db``
        function-scoped, parametrised over all five: a :class:`SQLHarness` or
        :class:`MongoHarness` on an emptied database; see their docstrings.
"""
import contextlib
import faulthandler
import os
import pathlib
import secrets
import sys
import urllib.parse

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS_DIR = pathlib.Path(__file__).resolve().parent


# --- guard: test this repository's tgext.evolve, never an installed release ----------------------

def _check_tested_package():
    """Fail the whole session if ``tgext.evolve`` is not this repository's source tree.

    tgext.evolve 0.0.5 (PyPI) installs ``tgext/evolve`` with a namespace ``.pth``; if it is in the
    environment it can shadow the checkout, and every test would exercise the wrong code.
    """
    expected = REPO_ROOT / 'tgext' / 'evolve' / '__init__.py'
    try:
        import tgext.evolve
    except Exception as exc:  # pragma: no cover - the message is the point
        raise pytest.UsageError(
            f'cannot import tgext.evolve ({exc!r}); install this checkout with '
            f"`pip install -e '{REPO_ROOT}[test]'`") from exc
    found = getattr(tgext.evolve, '__file__', None)
    if found is None or pathlib.Path(found).resolve() != expected:
        raise pytest.UsageError(
            'the tgext.evolve under test is not this repository\'s!\n'
            f'  imported: {found} (path {list(getattr(tgext.evolve, "__path__", []))})\n'
            f'  expected: {expected}\n'
            'Probably the broken tgext.evolve 0.0.5 release from PyPI is installed: run '
            f"`pip uninstall tgext.evolve && pip install -e '{REPO_ROOT}[test]'`.")


_check_tested_package()

# The multiprocessing helpers (tests/backend_workers.py) must be importable by name in spawned
# children whatever pytest's import mode; children inherit the parent's sys.path.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import sqlalchemy as sa  # noqa: E402
import transaction  # noqa: E402
import zope.sqlalchemy  # noqa: E402
from sqlalchemy import orm  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

import ming  # noqa: E402
from ming import schema as ming_schema  # noqa: E402
from ming.odm import FieldProperty, MappedClass, ThreadLocalODMSession  # noqa: E402

from tgext.evolve.backends.base import (  # noqa: E402
    HISTORY_TABLE, LEGACY_TABLE, LOCK_TABLE, SCHEMA_TABLE)


# --- a hang must not eat the CI's time budget ---------------------------------------------------

#: Seconds one test may take before the run is aborted with every thread's traceback.
TEST_TIMEOUT = float(os.environ.get('TGEXT_EVOLVE_TEST_TIMEOUT', '300'))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if TEST_TIMEOUT > 0:
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    try:
        yield
    finally:
        if TEST_TIMEOUT > 0:
            faulthandler.cancel_dump_traceback_later()


# --- servers and run databases ------------------------------------------------------------------

ENV_VARS = {
    'postgresql': 'TGEXT_EVOLVE_TEST_POSTGRES_URL',
    'mysql': 'TGEXT_EVOLVE_TEST_MYSQL_URL',
    'mongodb': 'TGEXT_EVOLVE_TEST_MONGODB_URL',
}
SQL_KINDS = ['sqlite', 'postgresql', 'mysql']
MONGO_KINDS = ['mim', 'mongodb']
ALL_KINDS = SQL_KINDS + MONGO_KINDS
CONNECT_TIMEOUT = 5  # seconds


def _run_db_name():
    return f'tgext_evolve_{secrets.token_hex(5)}'


def _server_url(kind):
    """The server URL from the environment: skip when unset."""
    var = ENV_VARS[kind]
    url = os.environ.get(var, '').strip()
    if not url:
        pytest.skip(f'{var} is not set: {kind} tests skipped')
    return var, url


def _masked(url):
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _unreachable(var, url, exc):
    pytest.fail(
        f'{var}={_masked(url)} is set but that server cannot be used: '
        f'{type(exc).__name__}: {exc}\n'
        f'Start the server (see .ci/run) or unset {var} to skip these tests.', pytrace=False)


def _create_database(var, server, admin, statement):
    error = None
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(statement)
    except Exception as exc:
        error = exc
    if error is not None:
        _unreachable(var, server, error)  # outside the except block: no chained traceback


def _admin_engine(url):
    return sa.create_engine(url, isolation_level='AUTOCOMMIT', poolclass=NullPool,
                            connect_args={'connect_timeout': CONNECT_TIMEOUT})


@pytest.fixture(scope='session')
def sqlite_database_url(tmp_path_factory):
    """This run's SQLite database: a file (``sqlite://`` would be per-connection memory)."""
    path = tmp_path_factory.mktemp('sqlite') / f'{_run_db_name()}.sqlite'
    return f'sqlite:///{path}'


@pytest.fixture(scope='session')
def postgresql_database_url():
    """A fresh PostgreSQL database for this run, dropped (WITH (FORCE)) at the end."""
    var, server = _server_url('postgresql')
    name = _run_db_name()
    admin = _admin_engine(server)
    _create_database(var, server, admin, f'CREATE DATABASE "{name}"')
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope='session')
def pgbouncer(postgresql_database_url):
    """pgbouncer in transaction mode in front of this run's PostgreSQL database, stopped at the
    end of the run."""
    import pgbouncer as pgbouncer_process
    if pgbouncer_process.executable() is None:
        pytest.fail(f'{ENV_VARS["postgresql"]} is set but pgbouncer is not installed: '
                    f'{pgbouncer_process.INSTALL_HINT}', pytrace=False)
    bouncer = pgbouncer_process.started(postgresql_database_url)
    yield bouncer
    bouncer.stop()


@pytest.fixture(scope='session')
def mysql_database_url():
    """A fresh MySQL/MariaDB database for this run, dropped at the end."""
    var, server = _server_url('mysql')
    name = _run_db_name()
    admin = _admin_engine(server)
    _create_database(var, server, admin, f'CREATE DATABASE `{name}` CHARACTER SET utf8mb4')
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        # Connections of this run are disposed by the harnesses; a leftover one would make
        # DROP DATABASE wait for its metadata lock: bound that wait.
        conn.exec_driver_sql('SET SESSION lock_wait_timeout = 30')
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS `{name}`')
    admin.dispose()


@pytest.fixture(scope='session')
def mim_database_url():
    """A MIM database name of this run.  MIM is process-wide and in memory: nothing to drop."""
    return f'mim:///{_run_db_name()}'


def _mongo_url_with_db(server, name):
    parts = urllib.parse.urlsplit(server)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, '/' + name, parts.query, ''))


@pytest.fixture(scope='session')
def mongodb_database_url():
    """A random database name on the MongoDB server, dropped at the end."""
    var, server = _server_url('mongodb')
    import pymongo
    name = _run_db_name()
    client = pymongo.MongoClient(server, serverSelectionTimeoutMS=CONNECT_TIMEOUT * 1000)
    error = None
    try:
        client.admin.command('ping')
    except Exception as exc:
        error = exc
    if error is not None:
        client.close()
        _unreachable(var, server, error)
    yield _mongo_url_with_db(server, name)
    client.drop_database(name)
    client.close()


# --- emptying a run database --------------------------------------------------------------------

def empty_sql_database(url):
    """Drop every table (and, on PostgreSQL, every other object) in the run database."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            name = conn.dialect.name
            if name == 'postgresql':
                # Everything in the schema: tables, sequences, enum types.  A lingering
                # transaction of an earlier test must turn into an error, not a hang.
                conn.exec_driver_sql("SET LOCAL lock_timeout = '20s'")
                conn.exec_driver_sql('DROP SCHEMA IF EXISTS public CASCADE')
                conn.exec_driver_sql('CREATE SCHEMA public')
                return
            if name == 'mysql':
                conn.exec_driver_sql('SET SESSION lock_wait_timeout = 20')
                conn.exec_driver_sql('SET FOREIGN_KEY_CHECKS = 0')
            metadata = sa.MetaData()
            metadata.reflect(conn)
            metadata.drop_all(conn)
            if name == 'mysql':
                conn.exec_driver_sql('SET FOREIGN_KEY_CHECKS = 1')
    finally:
        engine.dispose()


def _mongo_client_and_name(url):
    if url.startswith('mim:'):
        from ming import mim
        return mim.Connection.get(), urllib.parse.urlsplit(url).path.lstrip('/')
    import pymongo
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=CONNECT_TIMEOUT * 1000)
    return client, client.get_default_database().name


def empty_mongo_database(url):
    client, name = _mongo_client_and_name(url)
    client.drop_database(name)
    if not url.startswith('mim:'):
        client.close()


@pytest.fixture(params=SQL_KINDS)
def sql_url(request):
    """This run's SQL database URL (sqlite, postgresql, mysql), emptied before the test."""
    url = request.getfixturevalue(f'{request.param}_database_url')
    empty_sql_database(url)
    return url


@pytest.fixture(params=MONGO_KINDS)
def mongo_url(request):
    """This run's MongoDB URL (``mim:///<name>`` or ``mongodb://.../<name>``), emptied."""
    url = request.getfixturevalue(f'{request.param}_database_url')
    empty_mongo_database(url)
    return url


# --- the app-like models used as evolution side effects ----------------------------------------

SIDE_EFFECTS = 'evo_side_effects'


class SideEffectBase(orm.DeclarativeBase):
    pass


class SideEffect(SideEffectBase):
    """One row per write made by an evolution's work (SQL)."""
    __tablename__ = SIDE_EFFECTS
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=True)
    key: orm.Mapped[str] = orm.mapped_column(sa.String(128), index=True)


#: Like a quickstarted Ming app: ``DBSession = ThreadLocalODMSession(ming.Session())`` whose
#: ``bind`` is set when the app starts (here: when a test starts).
ming_doc_session = ming.Session()
MingDBSession = ThreadLocalODMSession(ming_doc_session)


class MingSideEffect(MappedClass):
    """One document per write made by an evolution's work (Ming ODM)."""

    class __mongometa__:
        session = MingDBSession
        name = SIDE_EFFECTS

    _id = FieldProperty(ming_schema.ObjectId)
    key = FieldProperty(str)


# --- harnesses -----------------------------------------------------------------------------------

def _sql_backend_class():
    from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
    return SQLAlchemyBackend


def _ming_backend_class():
    from tgext.evolve.backends.ming import MingBackend
    return MingBackend


class SQLHarness:
    """A SQL run database, emptied, with an app-like session.

    ``engine``
        the application's engine; ``session`` is bound to it.
    ``session``
        ``scoped_session(sessionmaker(bind=engine))`` registered with ``zope.sqlalchemy``, as
        in a quickstarted TurboGears app: the session evolutions write through.
    ``make_backend(with_session=True)``
        a new ``SQLAlchemyBackend``.  By default the application's: on ``engine`` with
        ``session``, as TurboGears wires it (its apply() joins the session's transaction).
        ``with_session=False``: another process's, on an engine of its own and no app session.
    ``write_side_effect(key, flush=True)``
        inside a ``work()`` callable: add one ``evo_side_effects`` row through the app session
        and, by default, flush it (so it is in the database transaction, not just in the
        session).
    ``count_side_effects(key)``
        rows committed with that key, read on a separate connection.
    ``snapshot()``
        every row of the lock and history tables, read directly: to assert "unchanged".
    """
    is_sql = True
    is_mongo = False
    is_mim = False

    def __init__(self, kind, url):
        self.kind = kind
        self.url = url
        self.dialect = kind
        self._engines = []
        self._backends = []
        self._backend_engines = {}
        self.engine = self.new_engine()
        self.reader = self.new_engine()
        SideEffectBase.metadata.create_all(self.engine)
        self.session = orm.scoped_session(orm.sessionmaker(bind=self.engine))
        zope.sqlalchemy.register(self.session)

    def __repr__(self):
        return f'<SQLHarness {self.kind} {_masked(self.url)}>'

    def new_engine(self):
        """A plain engine, as an application would configure it."""
        engine = sa.create_engine(self.url)
        self._engines.append(engine)
        return engine

    def make_backend(self, with_session=True):
        # With the session: the application's own backend, on the engine its session is bound
        # to (as TurboGears configures it).  Without: another process, with its own engine.
        engine = self.engine if with_session else self.new_engine()
        backend = _sql_backend_class()(engine, session=self.session if with_session else None)
        self._backends.append(backend)
        self._backend_engines[id(backend)] = engine
        return backend

    def engine_of(self, backend):
        return self._backend_engines[id(backend)]

    @contextlib.contextmanager
    def count_statements(self, backend):
        """Collect the SQL statements the backend's own engine sends."""
        statements = []

        def listener(conn, cursor, statement, parameters, context, executemany):
            statements.append(statement)

        engine = self.engine_of(backend)
        sa.event.listen(engine, 'before_cursor_execute', listener)
        try:
            yield statements
        finally:
            sa.event.remove(engine, 'before_cursor_execute', listener)

    # -- app-side writes and direct reads --

    def write_side_effect(self, key, flush=True):
        self.session.add(SideEffect(key=key))
        if flush:
            self.session.flush()

    def pending_objects(self):
        """Objects added to the app session (this thread's) and not yet flushed."""
        return list(self.session.new)

    def count_side_effects(self, key):
        with self.reader.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(SideEffect.__table__)
                                .where(SideEffect.__table__.c.key == key)).scalar_one()

    def store_names(self):
        """Names of the tables that exist in the run database."""
        return set(sa.inspect(self.reader).get_table_names())

    def _rows(self, conn, table, pk):
        if not sa.inspect(conn).has_table(table):
            return None
        t = sa.Table(table, sa.MetaData(), autoload_with=conn)
        return [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(t.c[pk]))]

    def snapshot(self):
        """Every row of the lock and history tables (None for a missing table)."""
        with self.reader.connect() as conn:
            return {'lock': self._rows(conn, LOCK_TABLE, 'name'),
                    'history': self._rows(conn, HISTORY_TABLE, 'evolution_id')}

    def storage_records(self):
        """Every row of the storage version table (None while it does not exist)."""
        with self.reader.connect() as conn:
            return self._rows(conn, SCHEMA_TABLE, 'name')

    def drop_store(self, name):
        """Storage as an older version left it: without ``name``."""
        with self.reader.begin() as conn:
            conn.exec_driver_sql(f'DROP TABLE {name}')

    def column_names(self, store):
        return {column['name'] for column in sa.inspect(self.reader).get_columns(store)}

    def create_legacy(self, rows):
        """The 0.0.5 table ``tgext_evolve(type VARCHAR(16) PK, value VARCHAR(255))`` with rows."""
        table = sa.Table(LEGACY_TABLE, sa.MetaData(),
                         sa.Column('type', sa.String(16), primary_key=True),
                         sa.Column('value', sa.String(255), nullable=False))
        with self.reader.begin() as conn:
            table.create(conn)
            for type_, value in rows:
                conn.execute(table.insert().values(type=type_, value=value))

    def close(self):
        transaction.abort()
        self.session.remove()
        for backend in self._backends:
            with contextlib.suppress(Exception):
                backend.close()
        for engine in self._engines:
            engine.dispose()


class MongoHarness:
    """A MongoDB (or MIM) run database, emptied, with an app-like Ming session.

    ``session``
        ``MingDBSession``, a ``ThreadLocalODMSession(ming.Session())`` bound to this database
        for the test, as in a quickstarted Ming app.
    ``make_backend(with_session=True)``
        a new ``MingBackend``; on MongoDB with its own client (another process), on MIM on the
        process-wide MIM connection (there is no other).
    ``write_side_effect(key, flush=True)``
        inside ``work()``: create one ``MingSideEffect`` document through the session and, by
        default, flush it (so it is in the database: MongoDB cannot roll it back).
    ``count_side_effects(key)`` / ``snapshot()``
        read from the database directly, not through the session.
    """
    is_sql = False
    is_mongo = True

    def __init__(self, kind, url):
        self.kind = kind
        self.url = url
        self.is_mim = kind == 'mim'
        self.dialect = 'mongodb'
        self._backends = []
        self._datastores = []
        self.datastore = self.new_datastore()
        self.reader_db = self.new_datastore().db
        ming_doc_session.bind = self.datastore
        self.session = MingDBSession
        self.session.close()

    def __repr__(self):
        return f'<MongoHarness {self.kind} {self.url}>'

    def new_datastore(self):
        datastore = ming.create_datastore(self.url)
        self._datastores.append(datastore)
        return datastore

    def make_backend(self, with_session=True):
        backend = _ming_backend_class()(self.new_datastore().db,
                                        session=self.session if with_session else None)
        self._backends.append(backend)
        return backend

    def write_side_effect(self, key, flush=True):
        MingSideEffect(key=key)
        if flush:
            self.session.flush()

    def pending_objects(self):
        """Objects created in the app session (this thread's) and not yet flushed."""
        return list(self.session.uow.new)

    def count_side_effects(self, key):
        return self.reader_db[SIDE_EFFECTS].count_documents({'key': key})

    def store_names(self):
        return set(self.reader_db.list_collection_names())

    def _docs(self, name):
        if name not in self.store_names():
            return None
        return list(self.reader_db[name].find({}, sort=[('_id', 1)]))

    def snapshot(self):
        return {'lock': self._docs(LOCK_TABLE), 'history': self._docs(HISTORY_TABLE)}

    def storage_records(self):
        return self._docs(SCHEMA_TABLE)

    def drop_store(self, name):
        if name in self.store_names():  # MIM fails on a collection it does not have
            self.reader_db.drop_collection(name)

    def create_legacy(self, docs):
        """The 0.0.5 collection ``tgext_evolve`` (unique index on ``type``) with documents."""
        col = self.reader_db[LEGACY_TABLE]
        col.create_index('type', unique=True)
        for doc in docs:
            col.insert_one(dict(doc))

    def close(self):
        with contextlib.suppress(Exception):
            ThreadLocalODMSession.close_all()
        for backend in self._backends:
            with contextlib.suppress(Exception):
                backend.close()
        ming_doc_session.bind = None
        if not self.is_mim:
            for datastore in self._datastores:
                with contextlib.suppress(Exception):
                    datastore.conn.close()


@pytest.fixture(params=ALL_KINDS)
def db(request):
    """A harness on this run's database of each kind, emptied before the test."""
    kind = request.param
    url = request.getfixturevalue(f'{kind}_database_url')
    if kind in SQL_KINDS:
        empty_sql_database(url)
        harness = SQLHarness(kind, url)
    else:
        empty_mongo_database(url)
        harness = MongoHarness(kind, url)
    try:
        yield harness
    finally:
        harness.close()


def emptied_sql_harness(request):
    """For a fixture parametrized over ``SQL_KINDS``: a SQLHarness on this run's database of
    that kind, emptied first and closed after."""
    url = request.getfixturevalue(f'{request.param}_database_url')
    empty_sql_database(url)
    harness = SQLHarness(request.param, url)
    try:
        yield harness
    finally:
        harness.close()
