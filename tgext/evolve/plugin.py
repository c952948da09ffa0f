"""Wiring into TurboGears: ``plugme``, the hooks, the background thread and fork handling."""
import os
import threading
import weakref

from tg import hooks
from tg.support.converters import asbool, aslist

from .backends import backend_for_config
from .evolution import collect_evolutions
from .gate import MaintenanceApplicationWrapper, MaintenanceMiddleware
from .errors import ConfigurationError
from .forking import ForkGatedBackend, log
from .options import check_plug_options, parse_settings
from .planning import run_order
from .runner import Runner
from .state import STARTING, GateState


#: Where the per-application service lives in the app's config (outside the ``tgext.evolve.``
#: namespace, which holds settings only).
SERVICE_KEY = 'tgext_evolve.service'

_registrations = weakref.WeakKeyDictionary()  # configurator -> _Registration
_services = weakref.WeakSet()  # for the at-fork reset


def plugme(configurator, options=None):
    """Register evolutions (and settings) with a TurboGears configurator.

    ``configurator`` is an ``AppConfig`` or an application configurator (FullStack/Minimal);
    ``options`` holds ``evolutions`` (classes or instances, run in this order) and any setting
    (``lease``, ``poll_interval``, ``retry_after``, ``on_failure``, ``readonly``, ``enabled``).
    May be called several times (an application and its pluggable apps): the registrations
    merge into one plan.  Also the entry point of ``tgext.pluggable.plug``.
    """
    options = dict(options or {})
    if hasattr(configurator, 'register_application_wrapper'):
        target = configurator
    elif hasattr(configurator, 'register_wrapper') and hasattr(configurator, '_configurator'):
        target = configurator._configurator  # the legacy AppConfig wraps a FullStack one
    else:
        raise ConfigurationError(
            f'tgext.evolve.plugme: {configurator!r} is neither an AppConfig nor an application '
            f'configurator')
    if 'evolutions' not in options:
        raise ConfigurationError('tgext.evolve.plugme: the "evolutions" option is required')
    registration = _registrations.get(target)
    first = registration is None
    if first:
        registration = _Registration(target)
    registration.add(options)
    if first:
        _registrations[target] = registration
        if target is configurator:
            configurator.register_application_wrapper(MaintenanceApplicationWrapper,
                                                      after='TransactionApplicationWrapper')
        else:
            configurator.register_wrapper(MaintenanceApplicationWrapper,
                                          after='TransactionApplicationWrapper')
        hooks.register('config_setup', registration.on_config_setup)
        hooks.register('configure_new_app', registration.on_new_app)
        hooks.register('after_wsgi_middlewares', registration.on_middlewares)
    return dict(appid='tgext.evolve', plug_models=False, plug_controller=False,
                plug_helpers=False, plug_bootstrap=False, plug_statics=False)


def service_for_config(config):
    """The :class:`EvolveService` of an application, or None when disabled or not plugged."""
    return config.get(SERVICE_KEY)


class _Registration:
    """Everything ``plugme`` calls registered on one configurator."""

    def __init__(self, configurator):
        self.configurator = configurator
        self.registered = {}  # evolution_id -> (what was registered, instance)
        self.plug_settings = {}
        self._new_service = None

    def add(self, options):
        settings = check_plug_options(options)
        for key, value in settings.items():
            if key in self.plug_settings and self.plug_settings[key] != value:
                raise ConfigurationError(
                    f'tgext.evolve.plugme: option {key!r} given twice with different values '
                    f'({self.plug_settings[key]!r} and {value!r})')
        collect_evolutions(options['evolutions'], self.registered)
        # Cycles among what is registered so far: reported by the plugme call that closes one.
        run_order(self.evolutions)
        self.plug_settings.update(settings)

    @property
    def evolutions(self):
        return [evolution for _, evolution in self.registered.values()]

    def _mine(self, configurator):
        return configurator is self.configurator

    def on_config_setup(self, configurator, conf):
        if not self._mine(configurator):
            return
        settings = parse_settings(self.plug_settings, conf)
        if not settings.enabled:
            conf[SERVICE_KEY] = None
            log.info('tgext.evolve is disabled (tgext.evolve.enabled = false)')
            return
        conf[SERVICE_KEY] = EvolveService(conf, settings, self.evolutions,
                                          backend_for_config(conf))

    def on_new_app(self, app):
        conf = app.config
        owner = conf.get('tg.configurator')
        if owner is None or not self._mine(owner()):
            return
        service = conf.get(SERVICE_KEY)
        self._new_service = service
        if service is not None:
            from .status_page import mount_prefixes  # it imports this module
            service.state.passthrough = mount_prefixes(conf)
            service.start()

    def on_middlewares(self, app):
        service, self._new_service = self._new_service, None
        if service is None or service.renders_error_page:
            return app
        return MaintenanceMiddleware(app, service)


def _renders_error_page(conf):
    if not asbool(conf.get('errorpage.enabled', False)):
        return False
    try:
        # aslist: from the .ini the codes are one string ("403 404 503"), as ErrorPage reads them.
        return 503 in {int(code) for code in aslist(conf.get('errorpage.status_codes'))}
    except (TypeError, ValueError):
        return False


class EvolveService:
    """One application's evolutions in this process: the runner thread and the gate state."""

    def __init__(self, config, settings, evolutions, backend):
        self.config = config
        self.settings = settings
        self.evolutions = evolutions
        self.backend = backend
        self.state = GateState()
        self.renders_error_page = _renders_error_page(config)
        self.runner = None
        self._pid = None
        self._guard = threading.Lock()
        _services.add(self)

    def start(self):
        with self._guard:
            self._start()

    def _start(self):
        self._pid = os.getpid()
        # Gated: a forking server (gunicorn --preload) forks between our database calls only.
        self.runner = Runner(ForkGatedBackend(self.backend), self.evolutions, self.settings,
                             config=self.config, state=self.state)
        self.runner.start()

    def ensure_running(self):
        """Restart the runner in a process forked after the application was built.

        gunicorn ``--preload`` and uWSGI fork after the app exists; a thread does not survive
        a fork, so without this the child would answer 503 forever.
        """
        if self._pid is None or self._pid == os.getpid():
            return
        with self._guard:
            if self._pid == os.getpid():
                return
            log.info('process forked from %s: restarting the evolution thread', self._pid)
            self.backend.dispose_after_fork()
            self._start()

    def _after_fork(self):
        # Locks and events copied from the parent may be held by threads that do not exist
        # here any more.
        self._guard = threading.Lock()
        first_look = threading.Event()
        if self.state.phase != STARTING:
            first_look.set()
        self.state._first_look = first_look


def _reset_after_fork():
    for service in list(_services):
        service._after_fork()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_reset_after_fork)
