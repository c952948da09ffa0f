"""tgext.evolve inside real TurboGears applications, driven with WebTest in this process.

Every test runs on every way to plug tgext.evolve (FullStack configurator with ``plugme`` or
``tgext.pluggable.plug``; legacy ``AppConfig`` with ``plugme``) and on every database of the run
(SQLAlchemy on SQLite, PostgreSQL and MySQL/MariaDB; Ming on MIM, and MongoDB when configured).

"While an evolution runs" is made deterministic with :class:`~tgapps.BlockingEvolution`: the
evolution parks on an event the test releases, so no test depends on timing.  An application
stands for one process; "restarting" is stopping its evolution thread and building a new
application on the same database.
"""
import json
import threading

import pytest
import sqlalchemy as sa

from tgapps import (ERROR_PAGE_BLUEPRINT, ERROR_PAGE_MARK, FailingEvolution, NoteEvolution,
                    app_style, application_wrappers, database_url, tg_apps,  # noqa: F401
                    unwrap_middlewares)
from tgext.evolve.backends.base import HISTORY_TABLE, LOCK_TABLE
from tgext.evolve.records import APPLIED, FAILED
from tgext.evolve.gate import MaintenanceApplicationWrapper, MaintenanceMiddleware

RETRY_AFTER = 7


def assert_maintenance(response, retry_after=RETRY_AFTER):
    """A 503 from the gate, with the configured Retry-After."""
    assert response.status_int == 503, response
    assert response.headers['Retry-After'] == str(retry_after)


class StatementLog:
    """Every SQL statement any engine of this process sends that touches tgext.evolve's tables."""

    def __init__(self):
        self.statements = []

    def __enter__(self):
        sa.event.listen(sa.engine.Engine, 'before_cursor_execute', self._seen)
        return self

    def __exit__(self, *exc):
        sa.event.remove(sa.engine.Engine, 'before_cursor_execute', self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany):
        if 'tgext_evolve' in statement:
            self.statements.append(statement)


# --- 503 while evolving, 200 after, for good --------------------------------------------------------

def test_503_while_evolving_then_200_for_good(tg_apps, database_url, app_style):
    model = tg_apps.model(database_url)
    slow = tg_apps.blocking('slow', model)
    app = tg_apps.build(app_style, model, [slow, NoteEvolution('after_slow', model)],
                        app_conf={'tgext.evolve.retry_after': str(RETRY_AFTER)})
    slow.wait_started()

    for accept, content_type in ((None, 'text/html'), ('application/json', 'application/json')):
        response = app.request('/', accept=accept)
        assert_maintenance(response)
        assert response.content_type == content_type
    assert json.loads(app.request('/', accept='application/json').body)['status'] == 503
    assert app.history()['slow'].state == 'running'  # visible while it runs
    assert model.notes() == []

    slow.release.set()
    statuses = app.wait_until_serving()
    # The gate opens only once the last evolution has committed.
    history = app.history()
    assert {i: r.state for i, r in history.items()} == {'slow': APPLIED, 'after_slow': APPLIED}
    assert set(statuses[:-1]) <= {503}, statuses

    assert [app.request('/').status_int for _ in range(20)] == [200] * 20
    assert app.request('/').text == 'hello from the application'
    assert not app.service.runner.alive  # nothing left that could close the gate again
    assert model.notes() == ['after_slow', 'slow']
    assert history['slow'].attempts == history['after_slow'].attempts == 1


def test_evolution_work_commits_with_its_history_row(tg_apps, database_url, app_style):
    """Between two evolutions, the first one's work and its ``applied`` row are both visible,
    and the second one's are not: each evolution commits as one unit, in order."""
    model = tg_apps.model(database_url)
    second = tg_apps.blocking('second', model)
    app = tg_apps.build(app_style, model, [NoteEvolution('first', model), second])
    second.wait_started()

    history = app.history()
    assert history['first'].state == APPLIED
    assert history['second'].state == 'running'
    assert model.notes() == ['first']

    second.release.set()
    app.wait_until_serving()
    assert model.notes() == ['first', 'second']
    assert app.history()['second'].generation == history['first'].generation


# --- a failing evolution --------------------------------------------------------------------------

SECRET_MESSAGE = 'cannot backfill row 1234 of table accounts'


@pytest.mark.parametrize('on_failure', ['block', 'serve'])
def test_failing_evolution_is_rolled_back_recorded_and_on_failure_decides(
        tg_apps, database_url, app_style, on_failure):
    model = tg_apps.model(database_url)
    # On SQL the failing evolution flushes its note before raising, so only a database rollback
    # removes it; MongoDB cannot roll back, so there only unflushed work is discarded.
    evolutions = [NoteEvolution('before', model),
                  FailingEvolution('broken', model, SECRET_MESSAGE, flush=model.is_sql),
                  NoteEvolution('after', model)]
    app = tg_apps.build(app_style, model, evolutions, options={'retry_after': RETRY_AFTER},
                        app_conf={'tgext.evolve.on_failure': on_failure})

    if on_failure == 'block':
        app.wait_for_phase('failed')
        for _ in range(5):
            assert_maintenance(app.request('/'))
    else:
        statuses = app.wait_until_serving()
        assert set(statuses[:-1]) <= {503}, statuses
        assert app.request('/').text == 'hello from the application'

    history = app.history()
    assert history['before'].state == APPLIED
    broken = history['broken']
    assert broken.state == FAILED
    assert broken.attempts == 1
    assert 'Traceback (most recent call last)' in broken.error
    assert f'RuntimeError: {SECRET_MESSAGE}' in broken.error
    assert 'after' not in history  # nothing runs after a failure
    assert model.notes() == ['before']


def test_restart_with_the_fixed_evolution_applies_it(tg_apps, database_url, app_style):
    model = tg_apps.model(database_url)
    broken = tg_apps.build(app_style, model, [
        NoteEvolution('before', model), FailingEvolution('fixme', model, 'bug', flush=False)])
    broken.wait_for_phase('failed')
    broken.stop()

    fixed = tg_apps.build(app_style, model, [NoteEvolution('before', model),
                                             NoteEvolution('fixme', model)])
    fixed.wait_until_serving()
    record = fixed.history()['fixme']
    assert (record.state, record.attempts, record.error) == (APPLIED, 2, None)
    assert model.notes() == ['before', 'fixme']


class CreatesTableThenFails(NoteEvolution):
    """Creates a table (DDL first: nothing else happened in its transaction), fills it, fails."""

    def evolve(self):
        self.model.DBSession.execute(sa.text('CREATE TABLE evolved_schema (x INTEGER)'))
        self.model.DBSession.execute(sa.text('INSERT INTO evolved_schema VALUES (1)'))
        raise RuntimeError('fails after its DDL')


def test_failed_evolution_rolls_its_ddl_back_where_the_database_can(tg_apps, sql_url, app_style):
    """PostgreSQL and SQLite roll DDL back with the rest; MySQL/MariaDB commit each DDL
    statement at once (the README says so: make DDL evolutions idempotent there)."""
    kind = sa.engine.make_url(sql_url).get_backend_name()
    model = tg_apps.model((kind, sql_url))
    app = tg_apps.build(app_style, model, [CreatesTableThenFails('schema', model)])
    app.wait_for_phase('failed')

    engine = sa.create_engine(sql_url)
    try:
        created = sa.inspect(engine).has_table('evolved_schema')
        rows = 0
        if created:
            with engine.connect() as conn:
                rows = conn.execute(sa.text('SELECT COUNT(*) FROM evolved_schema')).scalar()
    finally:
        engine.dispose()
    assert created == (kind == 'mysql')
    assert rows == 0  # the row change is rolled back everywhere


# --- restarts on an evolved database ---------------------------------------------------------------

def test_process_started_on_evolved_database_serves_its_first_request(
        tg_apps, database_url, app_style):
    model = tg_apps.model(database_url)
    first = tg_apps.build(app_style, model, [NoteEvolution('a', model), NoteEvolution('b', model)])
    first.wait_until_serving()
    first.stop()
    generation = first.service.backend.read_lock().generation

    with StatementLog() as log:
        later = tg_apps.build(app_style, model, [NoteEvolution('a', model),
                                                 NoteEvolution('b', model)])
        assert later.request('/').status_int == 200  # the very first request: no 503 at all
    if model.is_sql:
        # All it waited for: one read of the history.
        assert len(log.statements) == 1, log.statements
        assert log.statements[0].lstrip().upper().startswith('SELECT')
    assert later.service.backend.read_lock().generation == generation  # never took the lock
    assert model.notes() == ['a', 'b']


def test_evolution_inserted_before_applied_ones_still_runs(tg_apps, database_url, app_style):
    model = tg_apps.model(database_url)
    first = tg_apps.build(app_style, model, [NoteEvolution('a', model), NoteEvolution('c', model)])
    first.wait_until_serving()
    first.stop()

    later = tg_apps.build(app_style, model, [NoteEvolution('a', model), NoteEvolution('b', model),
                                             NoteEvolution('c', model)])
    later.wait_until_serving()
    assert model.notes() == ['a', 'b', 'c']  # b ran once; a and c did not run again
    history = later.history()
    assert history['b'].state == APPLIED
    assert history['b'].generation == history['a'].generation + 1


# --- the application's own error page (the opt-in) ---------------------------------------------------

def test_error_page_renders_the_503_and_keeps_retry_after(tg_apps, database_url, app_style):
    model = tg_apps.model(database_url)
    slow = tg_apps.blocking('slow', model)
    app = tg_apps.build(app_style, model, [slow], options={'retry_after': RETRY_AFTER},
                        blueprint=ERROR_PAGE_BLUEPRINT)
    slow.wait_started()

    assert not any(isinstance(layer, MaintenanceMiddleware)
                   for layer in unwrap_middlewares(app.wsgi_app))
    response = app.request('/')
    assert_maintenance(response)
    assert ERROR_PAGE_MARK in response.text

    slow.release.set()
    app.wait_until_serving()
    assert app.request('/').text == 'hello from the application'


# --- enabled = false ------------------------------------------------------------------------------

def _evolve_threads():
    return {t for t in threading.enumerate() if t.name.startswith('tgext.evolve')}


def _store_names(model):
    if model.is_sql:
        engine = sa.create_engine(model.url)
        try:
            return set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()
    return set(model.DBSession.bind.db.list_collection_names())


@pytest.mark.parametrize('gate', ['middleware', 'error-page'])
@pytest.mark.parametrize('enabled', ['true', 'false'])
def test_enabled_setting_adds_or_removes_everything(tg_apps, database_url, app_style, enabled,
                                                    gate):
    """``tgext.evolve.enabled = false`` in the .ini: no thread, nothing in the request path, no
    database access.  ``true`` is the control showing that each check can see what it looks
    for."""
    model = tg_apps.model(database_url)
    evolution = tg_apps.blocking('a', model)  # keeps the thread alive for the control
    threads_before = _evolve_threads()
    with StatementLog() as log:
        app = tg_apps.build(app_style, model, [evolution],
                            app_conf={'tgext.evolve.enabled': enabled},
                            blueprint=ERROR_PAGE_BLUEPRINT if gate == 'error-page' else None)
        if enabled == 'true':
            evolution.wait_started()
        new_threads = _evolve_threads() - threads_before
        layers = unwrap_middlewares(app.wsgi_app)
        wrappers = application_wrappers(app.tg_app)
        evolution.release.set()
        statuses = app.wait_until_serving()

    in_path = ([layer for layer in layers if isinstance(layer, MaintenanceMiddleware)]
               + [w for w in wrappers if isinstance(w, MaintenanceApplicationWrapper)])
    tgext_stores = {HISTORY_TABLE, LOCK_TABLE} & _store_names(model)
    if enabled == 'false':
        assert app.service is None
        assert new_threads == set()
        assert not evolution.started.is_set()
        assert in_path == []
        assert statuses == [200]
        assert log.statements == []
        assert tgext_stores == set()
        assert model.notes() == []
    else:
        assert 'tgext.evolve' in {t.name for t in new_threads}
        assert [type(g) for g in in_path] == [
            MaintenanceMiddleware if gate == 'middleware' else MaintenanceApplicationWrapper]
        assert tgext_stores == {HISTORY_TABLE, LOCK_TABLE}
        assert (log.statements != []) == model.is_sql
        assert model.notes() == ['a']


# --- what a 503 may say ---------------------------------------------------------------------------

#: Accept headers of browsers, API clients and tools, and whether the gate answers them JSON.
ACCEPT_HEADERS = [
    (None, False),
    ('text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8', False),
    ('*/*', False),
    ('text/plain', False),
    ('application/json', True),
    ('application/json, text/plain, */*', True),
]

#: Never in a 503: what would tell an outsider how the application works inside.
LEAKS = ('Traceback', 'File "', 'RuntimeError', 'OperationalError', 'Exception', 'tgext_evolve',
         'sqlalchemy', 'pymongo', 'mim://')


def assert_503_bodies_reveal_nothing(app, secrets, gate):
    """Every Accept header, GET and HEAD: a 503 with Retry-After and a body free of secrets."""
    for method in ('GET', 'HEAD'):
        for accept, wants_json in ACCEPT_HEADERS:
            response = app.request('/', method=method, accept=accept)
            assert_maintenance(response)
            if method == 'HEAD':
                assert response.body == b''
                continue
            body = response.text
            for secret in (*secrets, *LEAKS):
                assert secret not in body, (secret, accept, body)
            if wants_json:  # whichever gate: the JSON body, not the application's page
                payload = json.loads(body)
                assert payload['status'] == 503
                assert payload['retry_after'] == RETRY_AFTER
            elif gate == 'error-page':
                assert ERROR_PAGE_MARK in body  # the application's page
            else:
                assert response.content_type == 'text/html'
                assert 'Upgrading' in body


def _url_secrets(url):
    """The URL and each part of it that could identify the database."""
    parsed = sa.engine.make_url(url) if '://' in url and not url.startswith('mim') else None
    parts = [url]
    if parsed is not None:
        parts += [p for p in (parsed.database, parsed.username, parsed.password, parsed.host)
                  if p]
    else:
        parts.append(url.rsplit('/', 1)[-1])  # the database name
    return parts


@pytest.mark.parametrize('gate', ['middleware', 'error-page'])
@pytest.mark.parametrize('situation', ['evolving', 'failed'])
def test_503_bodies_reveal_nothing(tg_apps, database_url, situation, gate):
    model = tg_apps.model(database_url)
    secret_id = 'rehash_passwords_of_admin_accounts'
    if situation == 'evolving':
        evolution = tg_apps.blocking(secret_id, model)
    else:
        evolution = FailingEvolution(secret_id, model, SECRET_MESSAGE, flush=False)
    app = tg_apps.build(('fullstack', 'plugme'), model,
                        [NoteEvolution('backfill_slugs', model), evolution],
                        options={'retry_after': RETRY_AFTER},
                        blueprint=ERROR_PAGE_BLUEPRINT if gate == 'error-page' else None)
    if situation == 'evolving':
        evolution.wait_started()
    else:
        app.wait_for_phase('failed')
    owner = app.service.backend.read_lock().owner or app.history()[secret_id].owner
    secrets = [secret_id, 'backfill_slugs', SECRET_MESSAGE, owner, *_url_secrets(model.url)]
    assert_503_bodies_reveal_nothing(app, secrets, gate)


#: Databases that cannot be reached: a directory that does not exist, closed ports.
UNREACHABLE_URLS = {
    'sqlite': 'sqlite:////nonexistent-tgext-evolve-dir/secret_db.sqlite',
    'postgresql': 'postgresql://app_user:s3cret-pw@127.0.0.1:1/secret_db',
    'mysql': 'mysql+pymysql://app_user:s3cret-pw@127.0.0.1:1/secret_db',
    'mongodb': 'mongodb://app_user:s3cret-pw@127.0.0.1:1/secret_db?serverSelectionTimeoutMS=200',
}


@pytest.mark.parametrize('gate', ['middleware', 'error-page'])
@pytest.mark.parametrize('kind', list(UNREACHABLE_URLS))
def test_503_bodies_reveal_nothing_while_the_database_is_unreachable(tg_apps, kind, gate):
    model = tg_apps.model((kind, UNREACHABLE_URLS[kind]), create_tables=False)
    app = tg_apps.build(('fullstack', 'plugme'), model, [NoteEvolution('backfill_slugs', model)],
                        options={'retry_after': RETRY_AFTER},
                        blueprint=ERROR_PAGE_BLUEPRINT if gate == 'error-page' else None)
    app.wait_for_phase('unreachable')
    assert_503_bodies_reveal_nothing(app, ['backfill_slugs', *_url_secrets(model.url)], gate)
