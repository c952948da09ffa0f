"""Forks happen between tgext.evolve's database calls, never in the middle of one.

gunicorn ``--preload`` and uWSGI build the application, which starts the evolution thread, and
then fork their workers.  ``fork()`` copies only the forking thread: a lock that the evolution
thread (or its heartbeat) held at that instant stays locked in the child forever.  Database
drivers hold such locks while they connect and query (OpenSSL while pymysql builds its TLS
context, SQLite's own mutexes, an import lock while a dialect loads lazily): measured with a
real ``gunicorn --preload -w 4`` on MariaDB and SQLite, a worker forked at the wrong moment had
its restarted evolution thread hang on its first connection, and answered 503 for good.

So every backend call of the runner and its heartbeat passes through one :class:`ForkGate`,
and ``os.register_at_fork(before=...)`` waits until no call is in flight (and holds new ones
back) before the fork proceeds.  The evolution's own ``evolve()`` is not held: it may run for
hours, and the workers must start and answer 503 meanwhile.

Log lines pass through the gate too (:data:`log`): a thread writing to a buffered
``sys.stderr`` holds the buffer's lock, and a child forked at that instant blocks for good on
its first log line (measured: one uWSGI worker in about twenty, whose master was logging
"evolving ..." as it forked).
"""
import contextlib
import logging
import os
import threading

_logger = logging.getLogger('tgext.evolve')

#: The longest a fork waits for a database call in flight (a connection attempt to a database
#: that does not answer can take this long); after it the fork goes ahead regardless.
FORK_WAIT = 10.0


class ForkGate:
    """Counts database calls in flight; a fork waits for zero and blocks new ones."""

    def __init__(self):
        self.reset()

    def reset(self):
        """A new, open gate: in a forked child, whatever the parent's threads held is void."""
        self._condition = threading.Condition()
        self._calls = 0
        self._forking = False
        self._depth = threading.local()  # calls the current thread is inside

    def _enter(self):
        depth = getattr(self._depth, 'value', 0)
        with self._condition:
            # A thread already inside a call (a backend that logs) goes on: waiting for the
            # fork would wait for itself.
            if depth == 0:
                self._condition.wait_for(lambda: not self._forking)
            self._calls += 1
        self._depth.value = depth + 1

    def _leave(self):
        self._depth.value -= 1
        with self._condition:
            self._calls -= 1
            self._condition.notify_all()

    @contextlib.contextmanager
    def call(self):
        """Around one database call: a fork waits until it is over."""
        self._enter()
        try:
            yield
        finally:
            self._leave()

    @contextlib.contextmanager
    def open_during(self):
        """Inside :meth:`call`, around code a fork must not wait for (``evolve()``)."""
        self._leave()
        try:
            yield
        finally:
            self._enter()

    def before_fork(self):
        with self._condition:
            self._forking = True
            if not self._condition.wait_for(lambda: self._calls == 0, FORK_WAIT):
                # Not through the gate: this thread is the one about to fork.
                _logger.warning('forking while a database call of tgext.evolve is still in '
                                'flight after %.0f s', FORK_WAIT)

    def after_fork_in_parent(self):
        with self._condition:
            self._forking = False
            self._condition.notify_all()


#: One gate per process: a fork copies every thread's state at once.
fork_gate = ForkGate()


class ForkGatedBackend:
    """A backend whose every call passes through :data:`fork_gate` (``evolve()`` excepted)."""

    def __init__(self, backend, gate=fork_gate):
        self._backend = backend
        self._gate = gate

    def __getattr__(self, name):
        attribute = getattr(self._backend, name)
        if not callable(attribute):
            return attribute

        def gated(*args, **kwargs):
            with self._gate.call():
                return attribute(*args, **kwargs)
        return gated

    def apply(self, lease, evolution_id, work, fingerprint=None):
        def ungated_work():
            with self._gate.open_during():
                work()

        with self._gate.call():
            return self._backend.apply(lease, evolution_id, ungated_work, fingerprint)


class GatedLogger:
    """The ``tgext.evolve`` logger, writing each line through :data:`fork_gate`."""

    def __init__(self, logger, gate):
        self._logger = logger
        self._gate = gate

    def log(self, level, message, *args, **kwargs):
        if self._logger.isEnabledFor(level):
            with self._gate.call():
                self._logger.log(level, message, *args, **kwargs)

    def debug(self, message, *args, **kwargs):
        self.log(logging.DEBUG, message, *args, **kwargs)

    def info(self, message, *args, **kwargs):
        self.log(logging.INFO, message, *args, **kwargs)

    def warning(self, message, *args, **kwargs):
        self.log(logging.WARNING, message, *args, **kwargs)

    def error(self, message, *args, **kwargs):
        self.log(logging.ERROR, message, *args, **kwargs)

    def isEnabledFor(self, level):  # noqa: N802 - logging's spelling
        return self._logger.isEnabledFor(level)


#: What the runner, its heartbeat, the plugin and the backends log through.
log = GatedLogger(_logger, fork_gate)


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(before=fork_gate.before_fork,
                        after_in_parent=fork_gate.after_fork_in_parent,
                        after_in_child=fork_gate.reset)
