"""Applications that mount the status page, with TurboGears' own authentication, for its tests.

Built with :mod:`tgapps` (a fresh configurator and model per application); the root controller
of each is :func:`root_controller`, which mounts ``EvolveStatusController`` at ``/evolve`` and
has a login form.  Authentication is TurboGears' ``sa_auth`` (repoze.who, its auth_tkt cookie and
form plugin, and a ``TGAuthMetadata``) over two users: ``olivia`` has the ``manage`` permission,
``uma`` has none.  Every application shares one cookie secret, as the processes of a cluster do,
so a user signed in on one is signed in on all of them.
"""
import threading

import pytest
from repoze.who.plugins.auth_tkt import AuthTktCookiePlugin
from tg import expose, predicates
from tg.configuration.auth import TGAuthMetadata

import tgapps
from tgapps import DEADLINE, NoteEvolution
from tgext.evolve import BatchEvolution

COOKIE_SECRET = 'the cluster-wide secret of this test suite'
PASSWORDS = {'olivia': 'olivia-password', 'uma': 'uma-password'}
PERMISSIONS = {'olivia': ['manage'], 'uma': []}
OPERATOR, NOBODY = 'olivia', 'uma'

LOGIN_FORM = '''<!DOCTYPE html><html><head><title>Log in</title></head><body>
<form method="post" action="/login_handler?came_from={came_from}">
<input name="login" id="login"> <input name="password" id="password" type="password">
<button type="submit" id="submit">Log in</button></form></body></html>'''


class Users(TGAuthMetadata):
    """What a quickstarted ApplicationAuthMetadata does, over a dictionary."""

    def authenticate(self, environ, identity):
        login = identity['login']
        return login if PASSWORDS.get(login) == identity['password'] else None

    def get_user(self, identity, userid):
        return {'user_name': userid} if userid in PASSWORDS else None

    def get_groups(self, identity, userid):
        return []

    def get_permissions(self, identity, userid):
        return PERMISSIONS[userid]


def auth_blueprint():
    return {'sa_auth.enabled': True, 'sa_auth.cookie_secret': COOKIE_SECRET,
            'sa_auth.authmetadata': Users(), 'sa_auth.post_login_url': '/',
            'identity.allow_missing_user': False}


#: tgapps' own root (``/`` says hello, ``/error/document`` is the error page), which ours extends.
_plain_root_controller = tgapps._root_controller


def root_controller(page_options=None):
    """tgapps' root, plus ``/login`` (the form) and ``/evolve/`` (the status page)."""
    from tgext.evolve import EvolveStatusController

    options = {'allow_only': predicates.has_permission('manage'), 'refresh_seconds': 0.3,
               **(page_options or {})}

    class RootController(type(_plain_root_controller())):
        evolve = EvolveStatusController(**options)

        @expose()
        def login(self, came_from='/', **kwargs):
            return LOGIN_FORM.format(came_from=came_from)

    return RootController()


@pytest.fixture
def page_apps(tg_apps, monkeypatch):
    """A :class:`PageApps` on top of ``tg_apps``; parked evolutions are released after."""
    apps = PageApps(tg_apps, monkeypatch)
    yield apps
    for evolution in apps.parked_evolutions:
        evolution.release.set()


class PageApps:
    """Builds applications whose root mounts the status page."""

    def __init__(self, tg_apps, monkeypatch):
        self.tg_apps = tg_apps
        self._monkeypatch = monkeypatch
        self.parked_evolutions = []

    def parked(self, evolution_id, model, **kwargs):
        """A :class:`ParkedWithProgress`, released at teardown if the test did not."""
        evolution = ParkedWithProgress(evolution_id, model, **kwargs)
        self.parked_evolutions.append(evolution)
        return evolution

    def build(self, model, evolutions, *, page_options=None, blueprint=None, **kwargs):
        # tgapps builds the root controller after resetting TurboGears' milestones, as it must.
        self._monkeypatch.setattr(tgapps, '_root_controller',
                                  lambda: root_controller(page_options))
        return self.tg_apps.build(('fullstack', 'plugme'), model, evolutions,
                                  blueprint={**auth_blueprint(), **(blueprint or {})}, **kwargs)


def sign_in(test_app, user):
    """Give a WebTest app the auth_tkt cookie TurboGears sets when ``user`` logs in."""
    plugin = AuthTktCookiePlugin(COOKIE_SECRET, 'authtkt')
    environ = {'REMOTE_ADDR': '127.0.0.1', 'HTTP_HOST': 'localhost', 'wsgi.url_scheme': 'http'}
    header = plugin.remember(environ, {'repoze.who.userid': user})[0][1]
    value = header.split(';')[0].split('=', 1)[1].strip('"')
    test_app.set_cookie('authtkt', value)
    return test_app


# --- evolutions ----------------------------------------------------------------------------------

class ParkedWithProgress(NoteEvolution):
    """Reports ``done``/``total``, then parks until the test sets ``release``."""

    def __init__(self, evolution_id, model, done=3, total=10):
        super().__init__(evolution_id, model)
        self.done, self.total = done, total
        self.started = threading.Event()
        self.release = threading.Event()

    def evolve(self):
        self.progress(self.done, self.total)
        self.started.set()
        if not self.release.wait(DEADLINE):
            raise RuntimeError(f'{self.evolution_id} was never released by the test')
        super().evolve()


class FailsUntilFixed(NoteEvolution):
    """Raises until the test sets ``fixed``: a bug that the next release (or a retry after the
    data was corrected) gets past."""

    def __init__(self, evolution_id, model):
        super().__init__(evolution_id, model)
        self.fixed = threading.Event()
        self.calls = 0

    def evolve(self):
        self.calls += 1
        if not self.fixed.is_set():
            raise RuntimeError(f'{self.evolution_id} met a row it cannot convert')
        super().evolve()


class SteppedSweep(BatchEvolution):
    """A parallel evolution over the application's notes (``notes`` more of them added): each
    item (one per batch) waits for a permit, so that "one item of one range done" is a fact
    the test makes."""
    evolution_id = 'sweep'
    parallel = True
    batch_size = max_batch_size = 1

    def __init__(self, model, notes):
        self.model = model
        self.permits = threading.Semaphore(0)
        with model._reader.begin() as conn:
            conn.execute(model.Note.__table__.insert(),
                         [{'text': f'note {i}'} for i in range(notes)])

    def collection(self):
        return self.model.DBSession.query(self.model.Note)

    def process(self, note):
        if not self.permits.acquire(timeout=DEADLINE):
            raise RuntimeError(f'no permit for note {note.id}')
        note.text += ' (swept)'
