"""Wiring into TurboGears: ``plugme`` and the hooks it registers.

What runs in each process once the hooks fire (the runner thread, the gate state, fork
handling) is the service's (:mod:`.service`); this module only connects it to TurboGears.
"""
# Type hints for readers and checkers, never evaluated: that would cost every process start-up.
from __future__ import annotations

import weakref
from typing import Any, Dict, Mapping, Optional

from tg import hooks

from .errors import ConfigurationError
from .evolution import collect_evolutions
from .gate import MaintenanceApplicationWrapper, MaintenanceMiddleware
from .options import check_plug_options
from .planning import run_order
from .service import SERVICE_KEY, install_service

_registrations: 'weakref.WeakKeyDictionary[Any, _Registration]' = weakref.WeakKeyDictionary()


def plugme(configurator: Any, options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
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
    known = _registrations.get(target)
    registration = known if known is not None else _Registration(target)
    registration.add(options)
    if known is None:
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
        if self._mine(configurator):
            install_service(conf, self.plug_settings, self.evolutions)

    def on_new_app(self, app):
        conf = app.config
        owner = conf.get('tg.configurator')
        if owner is None or not self._mine(owner()):
            return
        service = conf.get(SERVICE_KEY)
        self._new_service = service
        if service is not None:
            from .status_page import mount_prefixes  # imported by apps that plug tgext.evolve only
            service.state.passthrough = mount_prefixes(conf)
            service.start()

    def on_middlewares(self, app):
        service, self._new_service = self._new_service, None
        if service is None or service.renders_error_page:
            return app
        return MaintenanceMiddleware(app, service)
