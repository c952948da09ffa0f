"""Evolutions registered by several packages, and their dependencies, in real TurboGears apps.

An application and the pluggable applications it plugs each call ``plugme`` (directly or through
``tgext.pluggable.plug``): every registration merges into one plan, ordered by ``depends_on``
(ties: registration order).  Cycles are start-up errors; a dependency on an id that is not
registered is satisfied by the history, and otherwise keeps the gate closed with one error.

Composition is database-independent (the plan is computed in Python); these tests run on
SQLite, in this process, with WebTest.
"""
import logging
import re
import secrets
import sys

import pytest
import sqlalchemy as sa
from tgext.pluggable import plug

import conftest
import tgext.evolve
from polling import wait_until
from tgapps import FAST, EvolvingApp, NoteEvolution, tg_apps, unwrap_middlewares  # noqa: F401
from tgext.evolve import ConfigurationError, Evolution, operations
from tgext.evolve.records import APPLIED
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
from tgext.evolve.state import MISCONFIGURED

FULLSTACK_PLUGME = ('fullstack', 'plugme')
FULLSTACK_PLUGGABLE = ('fullstack', 'pluggable')

#: A pluggable application, as a package of its own, registering its evolutions from its
#: ``plugme`` (tgext.pluggable calls it).  Its evolutions write through the application's
#: ``DBSession``, the only one they can know.
PLUGGABLE_SOURCE = '''
import sqlalchemy as sa
import tgext.evolve


class PlugEvolution(tgext.evolve.Evolution):
    def evolve(self):
        self.config['DBSession'].execute(
            sa.text('INSERT INTO tgapp_notes (text) VALUES (:text)'), {'text': self.evolution_id})


class CreateWidgets(PlugEvolution):
    evolution_id = 'plug_create_widgets'


class FillWidgets(PlugEvolution):
    evolution_id = 'plug_fill_widgets'
    depends_on = ('plug_create_widgets',)


def plugme(app_config, options):
    tgext.evolve.plugme(app_config, {'evolutions': [CreateWidgets, FillWidgets]})
    return dict(appid=__name__, plug_models=False, plug_controller=False, plug_helpers=False,
                plug_bootstrap=False, plug_statics=False)
'''


@pytest.fixture
def sqlite_url(sqlite_database_url):
    conftest.empty_sql_database(sqlite_database_url)
    return ('sqlite', sqlite_database_url)


@pytest.fixture
def pluggable(tmp_path, monkeypatch):
    """The name of an importable pluggable application package (``PLUGGABLE_SOURCE``)."""
    name = f'evolving_pluggable_{secrets.token_hex(4)}'
    package = tmp_path / name
    package.mkdir()
    (package / '__init__.py').write_text(PLUGGABLE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture
def start(tg_apps):
    """Start an application from a configurator a test composed itself (several plugme calls).

    Runs before ``tg_apps`` tears down hooks and milestones: the apps' threads stop first.
    """
    started = []

    def start_app(configurator, model):
        wsgi_app = tg_apps.make_wsgi_app(configurator)
        app = EvolvingApp(wsgi_app, unwrap_middlewares(wsgi_app)[-1], model, configurator)
        started.append(app)
        return app

    yield start_app
    for app in started:
        app.service.runner.stop(30)
        app.config['tg.app_globals'].sa_engine.dispose()


def note(evolution_id, model, *depends_on):
    evolution = NoteEvolution(evolution_id, model)
    evolution.depends_on = depends_on
    return evolution


def history_states(app):
    return {i: r.state for i, r in app.history().items()}


# --- several registrations, one plan ----------------------------------------------------------

def test_app_and_pluggable_app_evolutions_run_in_one_ordered_plan(tg_apps, sqlite_url,
                                                                   pluggable, start):
    """The application plugs tgext.evolve and a pluggable app that registers its own
    evolutions; an app evolution depends on one of the pluggable's.  One lock acquisition runs
    all four, each once, dependencies first, otherwise in registration order."""
    model = tg_apps.model(sqlite_url)
    configurator = tg_apps.configurator(FULLSTACK_PLUGGABLE, model, {**FAST, 'evolutions': [
        note('app_first', model), note('app_needs_widgets', model, 'plug_create_widgets')]})
    plug(configurator, pluggable)
    app = start(configurator, model)

    app.wait_until_serving()
    assert app.service.runner.applied == [
        'app_first', 'plug_create_widgets', 'app_needs_widgets', 'plug_fill_widgets']
    assert model.notes() == sorted(app.service.runner.applied)
    history = app.history()
    assert {r.state for r in history.values()} == {APPLIED}
    assert {r.generation for r in history.values()} == {1}  # one lock, one plan


@pytest.mark.parametrize('registered_as', ['class', 'instance'])
def test_registering_the_same_evolution_again_is_harmless(tg_apps, sqlite_url, start,
                                                          registered_as):
    model = tg_apps.model(sqlite_url)

    class Shared(NoteEvolution):
        evolution_id = 'shared'

        def __init__(self):
            super().__init__('shared', model)

    shared = Shared if registered_as == 'class' else Shared()
    configurator = tg_apps.configurator(FULLSTACK_PLUGME, model,
                                        {**FAST, 'evolutions': [shared]})
    tgext.evolve.plugme(configurator, {'evolutions': [shared, note('other', model)]})
    app = start(configurator, model)

    app.wait_until_serving()
    assert app.service.runner.applied == ['shared', 'other']
    assert model.notes() == ['other', 'shared']
    assert app.history()['shared'].attempts == 1


class NotANote(Evolution):
    evolution_id = 'taken'

    def evolve(self):
        pass


def test_two_evolutions_with_one_id_is_an_error_naming_both(tg_apps, sqlite_url):
    model = tg_apps.model(sqlite_url)
    configurator = tg_apps.configurator(FULLSTACK_PLUGME, model,
                                        {**FAST, 'evolutions': [note('taken', model)]})
    with pytest.raises(ConfigurationError) as error:
        tgext.evolve.plugme(configurator, {'evolutions': [NotANote]})
    message = str(error.value)
    assert "'taken'" in message
    assert 'tgapps.NoteEvolution' in message and 'test_composition.NotANote' in message


def test_two_instances_of_one_class_with_one_id_is_an_error(tg_apps, sqlite_url):
    model = tg_apps.model(sqlite_url)
    configurator = tg_apps.configurator(FULLSTACK_PLUGME, model,
                                        {**FAST, 'evolutions': [note('taken', model)]})
    with pytest.raises(ConfigurationError,
                       match=r"'taken' is used by two different registrations of class "
                             r"tgapps\.NoteEvolution"):
        tgext.evolve.plugme(configurator, {'evolutions': [note('taken', model)]})


# --- dependencies ---------------------------------------------------------------------------

def test_dependencies_run_first_ties_in_registration_order(tg_apps, sqlite_url):
    """Registered c(needs a), b, d(needs c), a: whenever several are ready, the earliest
    registered runs first, so b, a, c, d."""
    model = tg_apps.model(sqlite_url)
    app = tg_apps.build(FULLSTACK_PLUGME, model, [
        note('c', model, 'a'), note('b', model), note('d', model, 'c'), note('a', model)])

    app.wait_until_serving()
    assert app.service.runner.applied == ['b', 'a', 'c', 'd']
    history = app.history()
    started = sorted(history, key=lambda i: history[i].started_at)
    assert started == ['b', 'a', 'c', 'd']


def _cycle_path(message):
    found = re.search(r'depends_on forms a cycle: (.*) \(each depends on the next\)', message)
    assert found, message
    return re.findall(r"'([^']*)'", found.group(1))


@pytest.mark.parametrize('case', ['itself', 'three', 'across-plugme-calls'])
def test_a_cycle_is_a_startup_error_naming_its_path(tg_apps, sqlite_url, case):
    model = tg_apps.model(sqlite_url)
    first, second = {
        'itself': ([note('loner', model, 'loner')], None),
        'three': ([note('a', model, 'b'), note('b', model, 'c'), note('c', model, 'a'),
                   note('outside', model, 'a')], None),
        'across-plugme-calls': ([note('a', model, 'b')], [note('b', model, 'a')]),
    }[case]
    depends_on = {e.evolution_id: e.depends_on for e in first + (second or [])}
    with pytest.raises(ConfigurationError) as error:
        configurator = tg_apps.configurator(FULLSTACK_PLUGME, model,
                                            {**FAST, 'evolutions': first})
        assert second is not None, 'the first plugme call should have failed'
        tgext.evolve.plugme(configurator, {'evolutions': second})

    path = _cycle_path(str(error.value))
    assert path[0] == path[-1] and len(set(path)) == len(path) - 1, path
    for evolution_id, dependency in zip(path, path[1:]):
        assert dependency in depends_on[evolution_id], (path, depends_on)
    assert set(path) == {'itself': {'loner'}, 'three': {'a', 'b', 'c'},
                         'across-plugme-calls': {'a', 'b'}}[case]


def test_depends_on_must_be_a_tuple_of_ids(tg_apps, sqlite_url):
    model = tg_apps.model(sqlite_url)
    needy = note('needy', model)
    needy.depends_on = 'a'
    with pytest.raises(ConfigurationError,
                       match=r"depends_on of 'needy' must be a tuple of evolution ids, not 'a'"):
        tg_apps.configurator(FULLSTACK_PLUGME, model,
                             {**FAST, 'evolutions': [note('a', model), needy]})


def test_unregistered_dependency_done_in_history_is_satisfied(tg_apps, sqlite_url):
    """A release drops an evolution that later ones depend on: applied before, it still
    counts."""
    model = tg_apps.model(sqlite_url)
    first = tg_apps.build(FULLSTACK_PLUGME, model, [note('old', model),
                                                    note('new', model, 'old')])
    first.wait_until_serving()
    first.stop()

    later = tg_apps.build(FULLSTACK_PLUGME, model, [note('new', model, 'old'),
                                                    note('newer', model, 'old', 'new')])
    later.wait_until_serving()
    assert later.service.runner.applied == ['newer']
    assert model.notes() == ['new', 'newer', 'old']


def _record_failed(url, evolution_id):
    """History as a process left it after ``evolution_id`` failed."""
    backend = SQLAlchemyBackend(sa.create_engine(url))
    try:
        backend.ensure_storage()
        lease = backend.acquire('an-earlier-process', 30)
        backend.record_running(lease, evolution_id)
        backend.record_failure(lease, evolution_id, 'Traceback: it failed')
        backend.release(lease)
    finally:
        backend.engine.dispose()


class HistoryReads:
    """Counts the history reads an engine sends: the runner's polls."""

    def __init__(self, engine):
        self.count = 0
        sa.event.listen(engine, 'before_cursor_execute', self._seen)

    def _seen(self, conn, cursor, statement, *args):
        if 'tgext_evolve_history' in statement and statement.lstrip().upper().startswith('SELECT'):
            self.count += 1


@pytest.mark.parametrize('ghost_history', ['absent', 'failed'])
def test_unsatisfied_dependency_keeps_503_with_one_error_until_satisfied(
        tg_apps, sqlite_url, caplog, ghost_history):
    """``x`` depends on ``ghost``, which is not registered and not done: nothing runs (not even
    the independent ``y``), every request gets 503, the log has one error naming both ids however
    often the runner polls, and ``gearbox evolve plan`` refuses with the same message.  Once
    another process applies ``ghost``, this one carries on by itself."""
    caplog.set_level(logging.INFO, logger='tgext.evolve')
    url = sqlite_url[1]
    if ghost_history == 'failed':
        _record_failed(url, 'ghost')
    model = tg_apps.model(sqlite_url)
    app = tg_apps.build(FULLSTACK_PLUGME, model, [note('x', model, 'ghost'), note('y', model)])
    reads = HistoryReads(app.config['tg.app_globals'].sa_engine)

    app.wait_for_phase(MISCONFIGURED)
    wait_until(lambda: reads.count >= 5, 'five more polls')
    assert app.request('/').status_int == 503
    errors = [r.getMessage() for r in caplog.records
              if r.name.startswith('tgext.evolve') and r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "evolution 'x' depends on 'ghost'" in errors[0]
    assert set(history_states(app)) <= {'ghost'}
    assert model.notes() == []
    with pytest.raises(ConfigurationError, match="evolution 'x' depends on 'ghost'"):
        operations.plan(app.service)  # what ``gearbox evolve plan`` reports

    provider_model = tg_apps.model(sqlite_url)
    provider = tg_apps.build(FULLSTACK_PLUGME, provider_model, [note('ghost', provider_model)])
    provider.wait_until_serving()
    app.wait_until_serving()
    assert app.service.runner.applied == ['x', 'y']
    assert history_states(app) == {'ghost': APPLIED, 'x': APPLIED, 'y': APPLIED}
