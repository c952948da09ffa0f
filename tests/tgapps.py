"""Real, minimal TurboGears applications with tgext.evolve plugged in, for in-process tests.

Each test builds its applications with the ``tg_apps`` fixture (an :class:`AppFactory`), the way
a TurboGears project does in ``config/app_cfg.py``: a fresh configurator, a fresh ``model`` with
its own ``DBSession``, ``plugme`` or ``tgext.pluggable.plug``, then ``make_wsgi_app``.

TurboGears keeps hooks and configuration milestones in process globals, so the fixture hygiene of
TurboGears' own tests applies (research notes, sections 1.3 and 6): milestones are reset *before*
the root controller class is defined (``@expose`` resolves on a milestone, and resetting after the
definition would make every URL 404), and hooks plus milestones are cleared after the test.

Databases come from ``conftest.py``: the ``database_url`` fixture below runs a test on every
database the run has (SQLite, PostgreSQL, MySQL, MIM, MongoDB), each emptied first.

MIM, Ming's in-memory MongoDB, is not thread-safe.  Ming tests therefore never let the test
thread touch the database while the evolution thread does: they read only once the runner has
finished, or while it is parked on a :class:`BlockingEvolution`'s event, and they read history
through the application's own backend, which serialises its MIM calls.
"""
import dataclasses
import threading
import warnings
from typing import Any

import ming
import pytest
import sqlalchemy as sa
import tg
import transaction
import webtest
import zope.sqlalchemy
from ming import schema as ming_schema
from ming.odm import FieldProperty, MappedClass, ThreadLocalODMSession
from sqlalchemy import orm
from sqlalchemy.pool import NullPool
from tg import AppConfig, FullStackApplicationConfigurator, TGController, expose
from tg.configuration import milestones
from tg.wsgiapp import TGApp
from tgext.pluggable import plug

import conftest
import tgext.evolve
from tgext.evolve import Evolution
from tgext.evolve.service import service_for_config
from polling import DEADLINE, wait_until

#: The ways an application plugs tgext.evolve: (configurator, plug style).  tgext.pluggable 0.9
#: does not support the legacy AppConfig at all (it calls ``configurator.register``), so an
#: AppConfig application can only call ``tgext.evolve.plugme`` itself.
APP_STYLES = [
    ('fullstack', 'plugme'),
    ('fullstack', 'pluggable'),
    ('appconfig', 'plugme'),
]
APP_STYLE_IDS = [f'{configurator}-{plug}' for configurator, plug in APP_STYLES]

#: Table/collection in which evolutions write their side effects.
NOTES = 'tgapp_notes'

#: Settings that keep the tests quick: a waiting process re-reads the database every 0.1 s.
#: The lease is long so that a heartbeat never runs during a Ming test (MIM is not thread-safe).
FAST = {'poll_interval': 0.1, 'lease': 60}


# --- models: what a quickstarted project's ``model`` package offers -----------------------------

class SQLModel:
    """A SQLAlchemy ``model`` package: ``DBSession``, ``init_model`` and one mapped class.

    ``DBSession`` is a ``scoped_session`` registered with zope.sqlalchemy, as quickstart makes
    it; the ``tgapp_notes`` table is created up front (a project would use ``setup-app``)
    unless ``create_tables`` is false (a database that cannot be reached).
    """

    is_sql = True

    def __init__(self, url, create_tables=True):
        self.url = url
        self.DBSession = orm.scoped_session(orm.sessionmaker())
        zope.sqlalchemy.register(self.DBSession)

        class Base(orm.DeclarativeBase):
            pass

        class Note(Base):
            __tablename__ = NOTES
            id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=True)
            text: orm.Mapped[str] = orm.mapped_column(sa.String(200))

        self.Note = Note
        self._reader = sa.create_engine(url, poolclass=NullPool)
        if create_tables:
            Base.metadata.create_all(self._reader)

    def init_model(self, engine):
        self.DBSession.configure(bind=engine)
        return self.DBSession

    def blueprint(self):
        return {'use_sqlalchemy': True, 'sqlalchemy.url': self.url, 'model': self}

    def add_note(self, text):
        """Inside ``evolve()``: write one note through ``DBSession``, as an evolution would."""
        self.DBSession.add(self.Note(text=text))

    def flush(self):
        self.DBSession.flush()

    def notes(self):
        """Every committed note, read on a connection of its own."""
        with self._reader.connect() as conn:
            return sorted(conn.execute(sa.select(self.Note.__table__.c.text)).scalars())

    def close(self):
        transaction.abort()
        self.DBSession.remove()
        self._reader.dispose()


class MingModel:
    """A Ming ``model`` package: ``DBSession = ThreadLocalODMSession(Session())``, one class."""

    is_sql = False

    def __init__(self, url, create_tables=True):
        # Collections need no creating; the argument keeps both models interchangeable.
        self.url = url
        self._doc_session = ming.Session()
        self.DBSession = odm_session = ThreadLocalODMSession(self._doc_session)

        class Note(MappedClass):
            class __mongometa__:
                session = odm_session
                name = NOTES

            _id = FieldProperty(ming_schema.ObjectId)
            text = FieldProperty(str)

        self.Note = Note
        self._datastore = None

    def init_model(self, datastore):
        self._doc_session.bind = datastore
        self._datastore = datastore
        return self.DBSession

    def blueprint(self):
        # The transaction manager is for SQLAlchemy; a Ming app flushes through its wrapper.
        return {'use_ming': True, 'ming.url': self.url, 'model': self, 'tm.enabled': False}

    def add_note(self, text):
        self.Note(text=text)

    def flush(self):
        self.DBSession.flush()

    def notes(self):
        """Every note in the database.  Only while no evolution thread uses MIM (module doc)."""
        return sorted(doc['text'] for doc in self._datastore.db[NOTES].find())

    def close(self):
        self.DBSession.close()


def _new_model(kind, url, create_tables):
    model_class = SQLModel if kind in conftest.SQL_KINDS else MingModel
    return model_class(url, create_tables)


@pytest.fixture(params=conftest.ALL_KINDS)
def database_url(request):
    """``(kind, url)`` of this run's database of each kind, emptied before the test."""
    kind = request.param
    url = request.getfixturevalue(f'{kind}_database_url')
    if kind in conftest.SQL_KINDS:
        conftest.empty_sql_database(url)
    else:
        conftest.empty_mongo_database(url)
    return kind, url


@pytest.fixture(params=APP_STYLES, ids=APP_STYLE_IDS)
def app_style(request):
    """``(configurator, plug style)``: every way an application plugs tgext.evolve."""
    return request.param


# --- evolutions the tests register ----------------------------------------------------------------

class NoteEvolution(Evolution):
    """Writes one note, its own id, through the application's ``DBSession``."""

    def __init__(self, evolution_id, model):
        self.evolution_id = evolution_id
        self.model = model

    def evolve(self):
        self.model.add_note(self.evolution_id)


class BlockingEvolution(NoteEvolution):
    """Parks inside ``evolve()`` until the test sets ``release``: 'while it runs' on demand.

    ``started`` is set once it is parked.  It gives up (raises) after ``DEADLINE`` so that a
    failing test cannot hang the run.
    """

    def __init__(self, evolution_id, model):
        super().__init__(evolution_id, model)
        self.started = threading.Event()
        self.release = threading.Event()

    def evolve(self):
        self.started.set()
        if not self.release.wait(DEADLINE):
            raise RuntimeError(f'{self.evolution_id} was never released by the test')
        super().evolve()

    def wait_started(self):
        assert self.started.wait(DEADLINE), f'{self.evolution_id} never started'


class FailingEvolution(NoteEvolution):
    """Writes its note, then raises ``RuntimeError(message)``.

    With ``flush`` the note is sent to the database before the error, so only a database
    rollback can make it disappear (SQL); MongoDB cannot roll a flushed write back, so Ming
    tests leave it in the session, which tgext.evolve must discard.
    """

    def __init__(self, evolution_id, model, message, flush):
        super().__init__(evolution_id, model)
        self.message = message
        self.flush = flush

    def evolve(self):
        super().evolve()
        if self.flush:
            self.model.flush()
        raise RuntimeError(self.message)


# --- applications -----------------------------------------------------------------------------------

#: What the application's own error page says, so tests can tell it rendered the 503.
ERROR_PAGE_MARK = 'rendered by the application error page'

#: Blueprint of an application that renders 503 with its own ErrorController (the opt-in).
ERROR_PAGE_BLUEPRINT = {'errorpage.status_codes': [403, 404, 503]}


def _root_controller():
    # Defined per application, after milestones were reset (module docstring).
    class ErrorController(TGController):
        @expose()
        def document(self, *args, **kwargs):
            # What a quickstarted ErrorController shows: the original response's detail; and
            # what README suggests for a 503: refresh after its Retry-After.
            original = tg.request.environ.get('tg.original_response')
            retry_after = original.headers.get('Retry-After')
            refresh = f' (refresh after {retry_after} s)' if retry_after else ''
            return f'{ERROR_PAGE_MARK}: {original.status_int} {original.detail}{refresh}'

    class RootController(TGController):
        error = ErrorController()

        @expose()
        def index(self):
            return 'hello from the application'

    return RootController()


BASE_BLUEPRINT = {
    'session.enabled': False, 'cache.enabled': False, 'i18n.enabled': False,
    'sa_auth.enabled': False, 'trace_errors.enable': False, 'debug': False,
}


def unwrap_middlewares(wsgi_app):
    """Every WSGI layer from ``wsgi_app`` down to the ``TGApp``, outermost first."""
    layers = [wsgi_app]
    while not isinstance(layers[-1], TGApp):
        layer = layers[-1]
        inner = getattr(layer, 'app', None) or getattr(layer, 'application', None)
        assert inner is not None, f'cannot see inside {layer!r} to find the TGApp'
        layers.append(inner)
    return layers


def application_wrappers(tg_app):
    """Every application wrapper in the TGApp's chain, outermost first."""
    wrappers = []
    handler = tg_app.wrapped_dispatch
    while handler != tg_app._dispatch:
        wrappers.append(handler)
        handler = handler.next_handler
    return wrappers


@dataclasses.dataclass
class EvolvingApp:
    """One built application and what tests look at."""
    wsgi_app: Any
    tg_app: TGApp
    model: Any
    configurator: Any
    test_app: webtest.TestApp = dataclasses.field(init=False)

    def __post_init__(self):
        self.test_app = webtest.TestApp(self.wsgi_app)

    @property
    def config(self):
        return self.tg_app.config

    @property
    def service(self):
        """This application's EvolveService (None when tgext.evolve is disabled)."""
        return service_for_config(self.config)

    def request(self, path='/', method='GET', accept=None):
        """One request, whatever its status; ``accept`` sets the Accept header."""
        headers = {} if accept is None else {'Accept': accept}
        return self.test_app.request(path, method=method, headers=headers, expect_errors=True)

    def wait_until_serving(self, path='/'):
        """Poll ``path`` until it answers 200; return every status seen, in order."""
        statuses = []

        def served():
            statuses.append(self.request(path).status_int)
            return statuses[-1] == 200

        wait_until(served, 'the application serving')
        return statuses

    def wait_for_phase(self, phase):
        """Wait until this process's gate state reaches ``phase`` (see tgext.evolve.state)."""
        state = self.service.state
        wait_until(lambda: state.phase == phase, f'phase {phase!r} (still {state.phase!r})')

    def stop(self):
        """Stop the evolution thread, as if this process exited."""
        self.service.runner.stop(DEADLINE)
        assert not self.service.runner.alive, 'the evolution thread did not stop'

    def history(self):
        """The history records, through the application's own backend."""
        return self.service.backend.read_history()


class AppFactory:
    """Builds applications for one test, and tears every one of them down after it."""

    def __init__(self):
        self._apps = []
        self._models = []
        self._evolutions = []
        _forget_ming_sessions()

    def model(self, database_url, create_tables=True):
        """A fresh ``model`` package on ``(kind, url)`` (from ``database_url``)."""
        model = _new_model(*database_url, create_tables)
        self._models.append(model)
        return model

    def blocking(self, evolution_id, model):
        """A :class:`BlockingEvolution`, released at teardown if the test did not."""
        evolution = BlockingEvolution(evolution_id, model)
        self._evolutions.append(evolution)
        return evolution

    def configurator(self, style, model, options, blueprint=None):
        """A configurator with tgext.evolve plugged in: what ``config/app_cfg.py`` holds.

        ``model`` may be None for an application without a database.  ``options`` go to
        ``plugme`` / ``plug`` unchanged, so that bad ones reach tgext.evolve as a user's would.
        """
        configurator_kind, plug_style = style
        milestones._reset_all()
        settings = {**BASE_BLUEPRINT, 'root_controller': _root_controller(),
                    **(model.blueprint() if model is not None else {}), **(blueprint or {})}
        if configurator_kind == 'fullstack':
            configurator = FullStackApplicationConfigurator()
            configurator.update_blueprint(settings)
        else:
            configurator = AppConfig(**settings)
        if plug_style == 'plugme':
            tgext.evolve.plugme(configurator, options)
        else:
            plug(configurator, 'tgext.evolve', **options)
        return configurator

    def make_wsgi_app(self, configurator, app_conf=None):
        """``make_wsgi_app`` as each configurator API spells it; ``app_conf`` is the .ini."""
        app_conf = dict(app_conf or {})
        if isinstance(configurator, AppConfig):
            with warnings.catch_warnings():
                warnings.filterwarnings('ignore', 'Using AppConfig', DeprecationWarning)
                return configurator.make_wsgi_app(**app_conf)
        return configurator.make_wsgi_app({}, app_conf)

    def build(self, style, model, evolutions, options=None, app_conf=None, blueprint=None):
        """Configure, plug and start one application; return it as an :class:`EvolvingApp`."""
        plug_options = {**FAST, 'evolutions': evolutions, **(options or {})}
        configurator = self.configurator(style, model, plug_options, blueprint)
        wsgi_app = self.make_wsgi_app(configurator, app_conf)
        app = EvolvingApp(wsgi_app, unwrap_middlewares(wsgi_app)[-1], model, configurator)
        self._apps.append(app)
        return app

    def close(self):
        for evolution in self._evolutions:
            evolution.release.set()  # a test that failed half-way must not leave a thread parked
        for app in self._apps:
            service = app.service
            if service is not None and service.runner is not None:
                service.runner.stop(DEADLINE)
            engine = getattr(app.config.get('tg.app_globals'), 'sa_engine', None)
            if engine is not None:
                engine.dispose()
        for model in self._models:
            model.close()
        _forget_ming_sessions()
        tg.hooks._clear()
        milestones._reset_all()


def _forget_ming_sessions():
    # Ming remembers every ThreadLocalODMSession a thread ever used, and TurboGears' Ming
    # wrapper flushes them all after each request: sessions of earlier tests' models (or
    # conftest's, unbound after its test) must not be flushed by this test's requests.  A real
    # process has one model and never meets this.
    ThreadLocalODMSession._session_registry.clear()


@pytest.fixture
def tg_apps():
    """An :class:`AppFactory`; every application it built is stopped after the test."""
    factory = AppFactory()
    try:
        yield factory
    finally:
        factory.close()
