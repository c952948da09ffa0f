"""Everything tgext.evolve does about ``fork()``, in one place.

gunicorn ``--preload`` and uWSGI build the application, which starts the evolution thread, and
then fork their workers.  ``fork()`` copies only the forking thread, so two things go wrong in
a child, and this module handles both:

* A lock that another thread held at that instant stays locked in the child forever.
  Database drivers hold such locks while they connect and query (OpenSSL while pymysql builds
  its TLS context, SQLite's own mutexes, an import lock while a dialect loads lazily): measured
  with a real ``gunicorn --preload -w 4`` on MariaDB and SQLite, a worker forked at the wrong
  moment had its restarted evolution thread hang on its first connection, and answered 503 for
  good.  So every backend call of the runner and its heartbeat, and every log line
  (:mod:`.logs`), passes through one :class:`ForkGate`, and ``os.register_at_fork(before=...)``
  waits until no call is in flight (and holds new ones back) before the fork proceeds.  The
  evolution's own ``evolve()`` is not held: it may run for hours, and the workers must start
  and answer 503 meanwhile.
* State copied from the parent is void in the child: locks and events its threads held, the
  connections in a pool.  Whatever holds such state registers a reset with
  :func:`after_fork_in_child` (the service, the gate state, the backends), and
  :func:`reset_after_fork` runs them all once in each forked process.

The evolution thread itself is restarted lazily, by the service, on the child's first request.
"""
# Type hints for readers and checkers, never evaluated: that would cost every process start-up.
from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from typing import Callable, List, Optional

# Not a gated logger (:mod:`.logs`): its one line is written by the thread about to fork, while
# the gate is closed.
_logger = logging.getLogger('tgext.evolve.fork')

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
    """A backend whose every call passes through :data:`fork_gate` (the application's own
    code, ``evolve()`` and a batch's work, excepted)."""

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

    def _ungated(self, work):
        def ungated_work():
            with self._gate.open_during():
                return work()
        return ungated_work

    def apply(self, lease, evolution_id, work, fingerprint=None, final_progress=None):
        with self._gate.call():
            return self._backend.apply(lease, evolution_id, self._ungated(work), fingerprint,
                                       final_progress)

    def run_batch(self, lease, evolution_id, work, audit=None, renew=True):
        # A batch's work runs the application's code, like evolve(): a fork does not wait.
        with self._gate.call():
            return self._backend.run_batch(lease, evolution_id, self._ungated(work), audit,
                                           renew)


# --- resets in a forked child --------------------------------------------------------------

# Each returns the reset to call (None once a registered object is gone).
_resets: List[Callable[[], Optional[Callable[[], None]]]] = []
_resets_guard = threading.Lock()
_reset_in_pid = os.getpid()


def after_fork_in_child(reset):
    """Have ``reset()`` called in every process forked from this one, before tgext.evolve does
    anything there.  A bound method is held weakly: registering an object does not keep it
    alive (tests create thousands of backends)."""
    ref = weakref.WeakMethod(reset) if hasattr(reset, '__self__') else (lambda: reset)
    with _resets_guard:
        _resets[:] = [r for r in _resets if r() is not None] + [ref]
    return reset


def reset_after_fork():
    """Run every registered reset, once per forked process.

    CPython's ``after_in_child`` hook calls it at the fork; a server that forks without
    running CPython's hooks (uWSGI without ``--py-call-uwsgi-fork-hooks``) gets it from the
    first request that finds the evolution thread missing (``EvolveService.ensure_running``).
    """
    global _reset_in_pid
    if _reset_in_pid == os.getpid():
        return
    with _resets_guard:
        if _reset_in_pid == os.getpid():
            return
        fork_gate.reset()
        for ref in list(_resets):
            reset = ref()
            if reset is not None:
                reset()
        _reset_in_pid = os.getpid()


def _at_fork_in_child():
    global _resets_guard
    # The only thread here: a guard some thread of the parent held is void.
    _resets_guard = threading.Lock()
    reset_after_fork()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(before=fork_gate.before_fork,
                        after_in_parent=fork_gate.after_fork_in_parent,
                        after_in_child=_at_fork_in_child)
