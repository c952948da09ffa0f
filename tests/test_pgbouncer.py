"""tgext.evolve behind a real pgbouncer in transaction mode (issue 12, item 9).

pgbouncer in ``pool_mode = transaction`` runs each transaction of a client on whichever server
connection is free, so anything a client leaves in a server session is gone, or someone
else's, at its next transaction.  psycopg 3 leaves exactly that: by default it prepares a
statement on the server at its sixth execution on a connection (``prepare_threshold = 5``) and
afterwards only sends its name, which fails on any other server connection with
``prepared statement "_pg3_5" does not exist``.  tgext.evolve's own statements (the same few,
every poll, every renewal, every evolution) must never be prepared, whatever the application
configured; the application's statements are the application's (README, Deployment).

The processes are ``tests/procapp.py``, as in ``test_processes.py``; pgbouncer is the one the
``pgbouncer`` fixture starts (``tests/pgbouncer.py``).
"""
import pytest
import sqlalchemy as sa
import zope.sqlalchemy
from sqlalchemy import orm

import conftest
import fault_scenarios
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend

PROCESSES = 8
EVOLUTIONS = 30
#: What README tells applications on psycopg 3 behind a transaction pooler.
README_SETTINGS = {'sqlalchemy.connect_args': {'prepare_threshold': None}}


@pytest.fixture
def bouncer(pgbouncer, postgresql_database_url):
    """The run's pgbouncer, on an emptied database, with fresh server connections: nothing
    an earlier test prepared in a server session can be found by this one."""
    conftest.empty_sql_database(postgresql_database_url)
    pgbouncer.reconnect()
    return pgbouncer


# --- on one connection, directly: what is prepared, and what the application keeps ----------

#: Executions of one statement: past psycopg 3's default threshold (prepared at the sixth).
REPEATS = 8
#: The application's statement, and how the server records it once prepared.
APP_STATEMENT = 'SELECT 1 + :n'
APP_STATEMENT_ON_THE_SERVER = 'SELECT 1 + $1'


def _prepared_statements(engine):
    """The statements prepared in the server session of the engine's one pooled connection,
    and that connection's ``prepare_threshold``: read as its first statement (a rollback makes
    psycopg deallocate them all)."""
    with engine.connect() as conn:
        statements = conn.exec_driver_sql(
            'SELECT statement FROM pg_prepared_statements').scalars().all()
        return statements, conn.connection.driver_connection.prepare_threshold


@pytest.mark.parametrize('app_threshold', [None, 2], ids=['psycopg-default', 'app-sets-2'])
def test_own_statements_are_never_prepared_and_the_apps_setting_is_kept(
        postgresql_database_url, app_threshold):
    conftest.empty_sql_database(postgresql_database_url)
    # One pooled connection shared by the application and tgext.evolve, as a small pool
    # shares them; psycopg's default (5) or the application's own threshold.
    connect_args = {} if app_threshold is None else {'prepare_threshold': app_threshold}
    engine = sa.create_engine(postgresql_database_url, pool_size=1, max_overflow=0,
                              connect_args=connect_args)
    session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope.sqlalchemy.register(session)
    backend = SQLAlchemyBackend(engine, session)
    try:
        assert backend.read_history() == {}  # ours, failing inside: no tables yet
        backend.ensure_storage()
        lease = backend.acquire('tester', 60)
        for _ in range(REPEATS):
            lease = backend.renew(lease)

        def work():
            for n in range(REPEATS):
                session.execute(sa.text(APP_STATEMENT), {'n': n})

        for n in range(REPEATS):
            backend.record_running(lease, f'e{n}')
            backend.apply(lease, f'e{n}', work)
        statements, threshold = _prepared_statements(engine)
    finally:
        session.remove()
        engine.dispose()

    # Ours (renewals, running records, fencing checks, history rows: each run 8 times or
    # more) were never prepared; the application's statement, run as often in the same
    # transactions, was, as its setting says; and that setting is the one the connection has.
    assert [s for s in statements if 'tgext_evolve' in s] == []
    assert statements == [APP_STATEMENT_ON_THE_SERVER]
    assert threshold == (5 if app_threshold is None else app_threshold)


# --- real processes through a real pgbouncer ------------------------------------------------

def _evolution_ids():
    return [f'e{n:02}' for n in range(1, EVOLUTIONS + 1)]


def _shared_few_server_connections(outcome, bouncer):
    """The processes did go through pgbouncer, and shared its few server connections: the
    case where one client's transactions run on several server connections."""
    connections = outcome.measures['connections']
    return connections['clients'] >= PROCESSES > bouncer.default_pool_size >= \
        connections['servers']


@pytest.mark.slow
def test_app_configured_as_readme_says_applies_every_evolution_once_through_pgbouncer(
        bouncer, postgresql_database_url, tmp_path):
    outcome = fault_scenarios.through_pgbouncer(
        bouncer, postgresql_database_url, tmp_path, PROCESSES, EVOLUTIONS, write=True,
        blueprint=README_SETTINGS)

    # Also: every process observed exactly 503 then 200 and logged no error or tgext.evolve
    # warning; every evolution is recorded applied after one attempt.
    assert outcome.problems() == []
    assert _shared_few_server_connections(outcome, bouncer), outcome.measures
    # Exactly one committed row per evolution, written through DBSession.
    assert outcome.side_effects == {evolution_id: 1 for evolution_id in _evolution_ids()}


@pytest.mark.slow
def test_psycopg_defaults_do_not_break_tgext_evolves_own_statements_through_pgbouncer(
        bouncer, postgresql_database_url, tmp_path):
    # The application keeps psycopg 3's defaults (statements prepared from their sixth
    # execution), and its evolutions run no statement of their own: every statement that
    # repeats is tgext.evolve's (lock, history, fencing, polling).  Their own statements
    # would be the application's business (README: prepare_threshold=None, or a pgbouncer
    # that tracks prepared statements).
    outcome = fault_scenarios.through_pgbouncer(
        bouncer, postgresql_database_url, tmp_path, PROCESSES, EVOLUTIONS, write=False)

    # Also: 503 then 200 everywhere, no error or warning logged, every evolution recorded
    # applied after one attempt.
    assert outcome.problems() == []
    assert _shared_few_server_connections(outcome, bouncer), outcome.measures
    # Each evolve() ran once, in one process.
    assert outcome.measures['runs'] == {evolution_id: 1 for evolution_id in _evolution_ids()}
