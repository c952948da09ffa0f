"""One application's tgext.evolve in one process: its settings, backend, gate state and runner.

:func:`install_service` builds the :class:`EvolveService` from the application's config (TG's
``config_setup`` hook, or the CLI) and keeps it in that config; the gate and the CLI find it
there with :func:`service_for_config`.  The service starts the runner thread, and restarts it
in a process forked after the application was built.
"""
# Type hints for readers and checkers, never evaluated: that would cost every process start-up.
from __future__ import annotations

import os
import threading
from typing import Optional

from tg.support.converters import asbool, aslist

from . import forking, logs
from .backends import backend_for_config
from .options import parse_settings
from .runner import Runner
from .state import GateState

log = logs.service

#: Where the per-application service lives in the app's config (outside the ``tgext.evolve.``
#: namespace, which holds settings only).
SERVICE_KEY = 'tgext_evolve.service'


def service_for_config(config) -> Optional['EvolveService']:
    """The :class:`EvolveService` of an application, or None when disabled or not plugged."""
    return config.get(SERVICE_KEY)


def install_service(conf, plug_settings, evolutions):
    """Parse the settings (``plugme``'s, overridden by the .ini's) and put the application's
    service in ``conf``: None when ``tgext.evolve.enabled`` is false."""
    settings = parse_settings(plug_settings, conf)
    if not settings.enabled:
        conf[SERVICE_KEY] = None
        log.info('tgext.evolve is disabled (tgext.evolve.enabled = false)')
        return
    conf[SERVICE_KEY] = EvolveService(conf, settings, evolutions, backend_for_config(conf))


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
        forking.after_fork_in_child(self._after_fork)

    def start(self):
        with self._guard:
            self._start()

    def _start(self):
        self._pid = os.getpid()
        # Gated: a forking server (gunicorn --preload) forks between our database calls only.
        self.runner = Runner(forking.ForkGatedBackend(self.backend), self.evolutions,
                             self.settings, config=self.config, state=self.state)
        self.runner.start()

    def ensure_running(self):
        """Restart the runner in a process forked after the application was built.

        gunicorn ``--preload`` and uWSGI fork after the app exists; a thread does not survive
        a fork, so without this the child would answer 503 forever.
        """
        if self._pid is None or self._pid == os.getpid():
            return
        forking.reset_after_fork()  # done already, unless the server skipped CPython's hooks
        with self._guard:
            if self._pid == os.getpid():
                return
            log.info('process forked from %s: restarting the evolution thread', self._pid)
            self._start()

    def _after_fork(self):
        # A lock copied from the parent may be held by a thread that does not exist here.
        self._guard = threading.Lock()
