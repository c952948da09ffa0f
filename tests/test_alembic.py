"""Alembic schema upgrades under tgext.evolve's lock and gate (``tgext.evolve.AlembicUpgrade``).

The script directory is ``tests/alembic_scripts``: revision ``pages_0001`` creates ``pages``
(and ``upgrade_log``, one row per step that ran), revision ``slug_0002`` adds ``pages.slug``.
Its ``env.py`` follows Alembic's recipe for sharing a connection and, like a quickstarted
TurboGears app, keeps its version in ``migrate_version``.  The data evolution
:class:`FillSlugs` depends on the upgrade.

The multi-process test starts real TurboGears processes (this file run as a script: see
:func:`child`) on SQLite and PostgreSQL; the others build applications in this process.
"""
import contextlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import alembic
import pytest
import sqlalchemy as sa
import zope.sqlalchemy
from sqlalchemy import orm
from sqlalchemy.pool import NullPool

import conftest
from polling import wait_until
from tgapps import tg_apps  # noqa: F401 (fixture)
from tgext.evolve import AlembicUpgrade, ConfigurationError, Evolution, LeaseLost
from tgext.evolve.records import APPLIED
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend

TESTS_DIR = pathlib.Path(__file__).resolve().parent
SCRIPTS = TESTS_DIR / 'alembic_scripts'
SCHEMA_ID = 'alembic:migration'
FIRST, HEAD = 'pages_0001', 'slug_0002'
TITLES = ('Hello World', 'Second Page', 'Third One')
FULLSTACK_PLUGME = ('fullstack', 'plugme')

#: Deadlines of the multi-process test: the machine is shared and has two cores.
START_DEADLINE = 300.0
RUN_DEADLINE = 180.0
POLL = 0.05


class FillSlugs(Evolution):
    """The data half of the release: fill the column the schema upgrade added."""

    evolution_id = 'fill_slugs'
    depends_on = (SCHEMA_ID,)

    def evolve(self):
        session = self.config['DBSession']
        session.execute(sa.text("UPDATE pages SET slug = lower(replace(title, ' ', '-')) "
                                "WHERE slug IS NULL"))
        session.execute(sa.text("INSERT INTO upgrade_log (step) VALUES ('fill_slugs')"))


def schema_upgrade(revision='head', scripts=SCRIPTS):
    return AlembicUpgrade(str(scripts), revision, evolution_id=SCHEMA_ID)


def release(revision):
    """What a release registers: the data evolution first, to show that depends_on orders."""
    if revision == HEAD:
        return [FillSlugs, schema_upgrade(HEAD)]
    return [schema_upgrade(revision)]


def what_the_app_sees(session):
    """The application's view of its schema and data: revision and pages still without slug."""
    revision = session.execute(sa.text('SELECT version_num FROM migrate_version')).scalar_one()
    columns = {c['name'] for c in sa.inspect(session.connection()).get_columns('pages')}
    if 'slug' not in columns:
        return f'{revision} no-slug-column'
    missing = session.execute(sa.text('SELECT count(*) FROM pages WHERE slug IS NULL'))
    return f'{revision} {missing.scalar_one()}'


# --- the child process -----------------------------------------------------------------------

def child(job):
    """One application process: build the app when ``go`` exists, ask it for ``/`` until it
    serves, record what it saw in ``<name>.json``."""
    from tg import FullStackApplicationConfigurator, TGController, config as tg_config, expose
    from tg.configuration import milestones
    from webtest import TestApp

    import tgext.evolve
    from tgext.evolve.service import service_for_config

    workdir = pathlib.Path(job['dir'])
    name = job['name']
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(asctime)s %(process)d %(threadName)s %(name)s: %(message)s')
    milestones._reset_all()
    session = orm.scoped_session(orm.sessionmaker())
    zope.sqlalchemy.register(session)

    class RootController(TGController):
        @expose()
        def index(self):
            return what_the_app_sees(session)

    configurator = FullStackApplicationConfigurator()
    configurator.update_blueprint({
        'root_controller': RootController(), 'use_sqlalchemy': True,
        'model': SimpleNamespace(DBSession=session,
                                 init_model=lambda engine: session.configure(bind=engine)),
        'sqlalchemy.url': job['url'], 'session.enabled': False, 'cache.enabled': False,
        'i18n.enabled': False, 'sa_auth.enabled': False, 'trace_errors.enable': False,
        'debug': False})
    tgext.evolve.plugme(configurator, {'evolutions': release(job['revision']),
                                       'poll_interval': 0.2})
    (workdir / f'{name}.ready').touch()
    while not (workdir / 'go').exists():
        time.sleep(0.005)
    app = TestApp(configurator.make_wsgi_app({}, {}))
    statuses, deadline = [], time.monotonic() + RUN_DEADLINE
    while True:
        response = app.get('/', status='*')
        if not statuses or statuses[-1] != response.status_int:
            statuses.append(response.status_int)
        if response.status_int == 200 or time.monotonic() > deadline:
            break
        time.sleep(POLL)
    report = {'pid': os.getpid(), 'statuses': statuses, 'body': response.text,
              'applied': service_for_config(tg_config).runner.applied}
    (workdir / f'{name}.json').write_text(json.dumps(report))


# --- the cluster -----------------------------------------------------------------------------

def run_cluster(workdir, url, revision, processes):
    """Start ``processes`` application processes of the release at once; their reports."""
    env = dict(os.environ, PYTHONUNBUFFERED='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR),
                                                        os.environ.get('PYTHONPATH')])))
    names = [f'p{i}' for i in range(processes)]
    popens = {}
    try:
        for name in names:
            job = {'dir': str(workdir), 'name': name, 'url': url, 'revision': revision}
            with open(workdir / f'{name}.log', 'w') as log:
                popens[name] = subprocess.Popen([sys.executable, __file__, json.dumps(job)],
                                                stdout=log, stderr=subprocess.STDOUT, env=env)

        def logs():
            return '\n'.join(f'--- {n} ---\n{(workdir / f"{n}.log").read_text()[-3000:]}'
                             for n in names)

        def all_ready():
            crashed = [n for n, p in popens.items() if p.poll() not in (None, 0)]
            assert not crashed, f'{crashed} exited early:\n{logs()}'
            return all((workdir / f'{n}.ready').exists() for n in names)

        wait_until(all_ready, 'every process ready', START_DEADLINE, POLL)
        (workdir / 'go').touch()
        wait_until(lambda: all(p.poll() is not None for p in popens.values()),
                   'every process serving', RUN_DEADLINE + 60, POLL)
        failed = {n: p.returncode for n, p in popens.items() if p.returncode != 0}
        assert not failed, f'exit codes {failed}:\n{logs()}'
        return {n: json.loads((workdir / f'{n}.json').read_text()) for n in names}
    finally:
        for popen in popens.values():
            if popen.poll() is None:
                popen.kill()
                popen.wait(30)


# --- reading the database ----------------------------------------------------------------------

def query(url, statement):
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(statement))]
    finally:
        engine.dispose()


def history(url):
    backend = SQLAlchemyBackend(sa.create_engine(url, poolclass=NullPool))
    try:
        return backend.read_history()
    finally:
        backend.engine.dispose()


def table_names(url):
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def steps_run(url):
    return sorted(step for step, in query(url, 'SELECT step FROM upgrade_log'))


def schema_revision(url):
    return query(url, 'SELECT version_num FROM migrate_version')


def build(tg_apps, database_url, evolutions, app_conf=None):
    """An application of this process on ``(kind, url)``, serving once its evolutions ran."""
    model = tg_apps.model(database_url)
    app = tg_apps.build(FULLSTACK_PLUGME, model, evolutions, app_conf=app_conf)
    app.wait_until_serving()
    return app


def _emptied(request, kind):
    url = request.getfixturevalue(f'{kind}_database_url')
    conftest.empty_sql_database(url)
    return kind, url


@pytest.fixture(params=conftest.SQL_KINDS)
def sql_database(request):
    """``(kind, url)`` of each SQL database of the run, emptied."""
    return _emptied(request, request.param)


@pytest.fixture(params=['sqlite', 'postgresql'])
def transactional_ddl_database(request):
    """``(kind, url)`` of each database whose DDL is transactional, emptied."""
    return _emptied(request, request.param)


@pytest.fixture
def sqlite_database(request):
    return _emptied(request, 'sqlite')


@pytest.mark.slow
def test_eight_processes_upgrade_the_schema_then_fill_it_once(
        tg_apps, transactional_ddl_database, tmp_path):
    """Release 1 upgraded to ``pages_0001`` and the app got pages.  Release 2 registers
    ``FillSlugs`` (depends on the upgrade) before the upgrade to ``head``; 8 processes start at
    once.  One process upgrades, the same or another fills the slugs after it, each step runs
    once, and no process serves before both are committed: each one's first 200 already sees
    revision ``slug_0002`` and no page without a slug."""
    url = transactional_ddl_database[1]
    build(tg_apps, transactional_ddl_database, release(FIRST)).stop()
    assert schema_revision(url) == [(FIRST,)]
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        for title in TITLES:
            conn.execute(sa.text('INSERT INTO pages (title) VALUES (:title)'), {'title': title})
    engine.dispose()

    reports = run_cluster(tmp_path, url, HEAD, processes=8)

    applied = [step for report in reports.values() for step in report['applied']]
    assert sorted(applied) == [SCHEMA_ID, 'fill_slugs'], reports
    for name, report in reports.items():
        assert report['statuses'] in ([503, 200], [200]), (name, report)
        assert report['body'] == f'{HEAD} 0', (name, report)
    assert steps_run(url) == ['fill_slugs', FIRST, HEAD]
    assert schema_revision(url) == [(HEAD,)]
    assert sorted(query(url, 'SELECT slug FROM pages')) == [
        ('hello-world',), ('second-page',), ('third-one',)]
    records = history(url)
    upgrade, fill = records[SCHEMA_ID], records['fill_slugs']
    assert (upgrade.state, upgrade.fingerprint, upgrade.attempts) == (APPLIED, HEAD, 2)
    assert (fill.state, fill.attempts) == (APPLIED, 1)
    assert fill.started_at >= upgrade.finished_at


def test_upgrade_runs_again_only_when_its_target_changes(tg_apps, sql_database):
    """Restarts on the same head upgrade nothing; a release with a new head upgrades once.
    On MySQL/MariaDB too (its DDL commits by itself, which a successful upgrade never shows)."""
    url = sql_database[1]
    first = build(tg_apps, sql_database, release(FIRST))
    first.stop()
    again = build(tg_apps, sql_database, release(FIRST))
    again.stop()
    later = build(tg_apps, sql_database, [schema_upgrade(HEAD)])

    assert first.service.runner.applied == [SCHEMA_ID]
    assert again.service.runner.applied == []
    assert later.service.runner.applied == [SCHEMA_ID]
    assert later.history()[SCHEMA_ID].fingerprint == HEAD
    assert schema_revision(url) == [(HEAD,)]
    assert steps_run(url) == [FIRST, HEAD]


@contextlib.contextmanager
def evolving_backend(url):
    """The backend of a process evolving ``url``, with an application session registered with
    zope.sqlalchemy (what evolutions write through), holding the lock."""
    engine = sa.create_engine(url)
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)
    backend = SQLAlchemyBackend(engine, session)
    backend.ensure_storage()
    try:
        yield backend, backend.acquire('the-evolving-process', 30)
    finally:
        session.remove()
        engine.dispose()


def test_lost_lease_rolls_the_schema_change_back_with_its_record(transactional_ddl_database):
    """The upgrade runs in the transaction of its history record: when the lock turns out to
    be lost at commit time, the new tables disappear with the record (PostgreSQL, SQLite)."""
    url = transactional_ddl_database[1]
    with evolving_backend(url) as (backend, lease):
        upgrade = schema_upgrade(FIRST)
        upgrade.config = {'tg.app_globals': SimpleNamespace(sa_engine=backend.engine),
                          'DBSession': backend.session}
        operator = SQLAlchemyBackend(sa.create_engine(url, poolclass=NullPool))
        operator.break_lock('an-operator')
        operator.engine.dispose()

        with pytest.raises(LeaseLost):
            backend.apply(lease, SCHEMA_ID, upgrade.evolve, upgrade.fingerprint())

        assert SCHEMA_ID not in backend.read_history()
    assert {'pages', 'upgrade_log', 'migrate_version'} & table_names(url) == set()


def test_sqlite_evolution_reading_then_writing_is_not_failed_by_another_writer(sqlite_database):
    """Alembic reads its version table before its DDL.  On SQLite a transaction that read
    cannot take the write lock while another connection holds it: SQLite fails it at once with
    "database is locked".  The transaction of an evolution therefore takes the write lock at its
    first statement: here the other writer is the one kept waiting (it gives up after 0.1 s),
    and the evolution commits."""
    url = sqlite_database[1]
    impatient = sa.create_engine(url, poolclass=NullPool, connect_args={'timeout': 0.1})
    with impatient.begin() as conn:
        conn.exec_driver_sql('CREATE TABLE pages (title VARCHAR(100))')
    other_writer = {}
    evolution_wrote = threading.Event()

    def write_meanwhile():
        try:
            with impatient.begin() as conn:
                conn.exec_driver_sql("INSERT INTO pages (title) VALUES ('other writer')")
                other_writer['outcome'] = 'holds the write lock'
                evolution_wrote.wait(60)
        except sa.exc.OperationalError as e:
            other_writer['outcome'] = str(e.orig)

    with evolving_backend(url) as (backend, lease):
        def reads_then_writes():
            backend.session.execute(sa.text('SELECT count(*) FROM pages')).scalar_one()
            thread = threading.Thread(target=write_meanwhile)
            thread.start()
            try:
                wait_until(lambda: other_writer, 'the other writer tried', 60, POLL)
                backend.session.execute(sa.text("INSERT INTO pages (title) VALUES ('evolution')"))
            finally:
                evolution_wrote.set()
                thread.join(60)

        record = backend.apply(lease, 'reads_then_writes', reads_then_writes)
    impatient.dispose()

    assert record.state == APPLIED
    assert other_writer['outcome'] == 'database is locked'
    assert query(url, 'SELECT title FROM pages') == [('evolution',)]


def test_env_py_ignoring_the_connection_still_upgrades_and_says_so(
        tg_apps, tmp_path, caplog, transactional_ddl_database):
    """Alembic's stock env.py opens its own engine from ``sqlalchemy.url``: the upgrade runs
    under the lock all the same, committed apart from its record, and a warning says so."""
    caplog.set_level(logging.INFO, logger='tgext.evolve')
    scripts = tmp_path / 'migration'
    shutil.copytree(SCRIPTS, scripts)
    shutil.copy(pathlib.Path(alembic.__file__).parent / 'templates' / 'generic' / 'env.py',
                scripts / 'env.py')

    app = build(tg_apps, transactional_ddl_database, [schema_upgrade(scripts=scripts)])

    url = transactional_ddl_database[1]
    assert app.service.runner.applied == [SCHEMA_ID]
    assert query(url, 'SELECT version_num FROM alembic_version') == [(HEAD,)]
    assert steps_run(url) == [FIRST, HEAD]
    warnings = [r.getMessage() for r in caplog.records
                if r.name.startswith('tgext.evolve') and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ignores config.attributes['connection']" in warnings[0]


def test_default_id_and_script_location_next_to_the_ini(tg_apps, tmp_path, sqlite_database):
    """``AlembicUpgrade()`` upgrades ``migration`` beside the .ini (``here``) to head, as
    ``gearbox migrate upgrade`` would, under the id ``alembic:migration``."""
    shutil.copytree(SCRIPTS, tmp_path / 'migration')

    app = build(tg_apps, sqlite_database, [AlembicUpgrade()], app_conf={'here': str(tmp_path)})

    assert app.service.runner.applied == ['alembic:migration']
    assert schema_revision(sqlite_database[1]) == [(HEAD,)]


@pytest.mark.parametrize('arguments, culprit', [
    (('no/such/directory',), 'no/such/directory'),
    ((str(SCRIPTS), 'no_such_revision'), 'no_such_revision'),
])
def test_bad_script_location_or_revision_is_a_startup_error(
        tg_apps, sqlite_database, arguments, culprit):
    model = tg_apps.model(sqlite_database)
    with pytest.raises(ConfigurationError, match=culprit):
        tg_apps.build(FULLSTACK_PLUGME, model, [AlembicUpgrade(*arguments)])



def test_alembic_upgrade_in_a_ming_application_is_a_startup_error(tg_apps, mim_database_url):
    conftest.empty_mongo_database(mim_database_url)
    model = tg_apps.model(('mim', mim_database_url))
    with pytest.raises(ConfigurationError, match="'alembic:migration': Alembic upgrades need an "
                                                 "application on SQLAlchemy"):
        tg_apps.build(FULLSTACK_PLUGME, model, [AlembicUpgrade()])


if __name__ == '__main__':
    child(json.loads(sys.argv[1]))
