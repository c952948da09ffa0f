"""What the gate knows: whether this process may serve, kept current by the runner."""
import threading

from .forking import after_fork_in_child

STARTING = 'starting'  # nothing read from the database yet
UNREACHABLE = 'unreachable'  # the database cannot be reached; retrying with backoff
WAITING = 'waiting'  # evolutions pending, another process holds the lock
EVOLVING = 'evolving'  # this process holds the lock and runs evolutions
# An evolution failed and on_failure = block.  The value predates the name: it is what reports,
# logs and ``gearbox evolve run`` ("still pending (failed)") have always shown.
BLOCKED = 'failed'
PAUSED = 'paused'  # an operator paused a blocking evolution: answering 503 until resumed
MISCONFIGURED = 'misconfigured'  # depends_on names an id neither registered nor done
READY = 'ready'  # nothing pending: serve
SERVING_AFTER_FAILURE = 'serving-after-failure'  # an evolution failed and on_failure = serve

OPEN_PHASES = frozenset((READY, SERVING_AFTER_FAILURE))


class GateState:
    """One per application.  ``open`` is the only thing a request looks at once ready.

    Open is final: once a process has served, it never answers 503 again.
    """

    def __init__(self):
        self.open = False
        self.phase = STARTING
        self.progress = None  # percentage of the running evolution, when it reports one
        self.eta = None  # seconds it has left, when a batched evolution knows its total
        # Path prefixes ('/evolve/') that reach the application while closed: where its status
        # page is mounted, found when the application is built.  Read only while closed.
        self.passthrough = ()
        self._first_look = threading.Event()
        after_fork_in_child(self._after_fork)

    def set_phase(self, phase):
        if self.open:
            return
        self.phase = phase
        if phase != EVOLVING:
            self.progress = self.eta = None
        if phase != STARTING:
            self._first_look.set()
        if phase in OPEN_PHASES:
            self.open = True

    def wait_first_look(self, timeout):
        """Block until the runner has read the database once (or ``timeout`` passes)."""
        return self._first_look.wait(timeout)

    def _after_fork(self):
        # An event copied from the parent may be mid-update by a thread that does not exist
        # here any more; what it said (has the first look happened?) is kept.
        first_look = threading.Event()
        if self.phase != STARTING:
            first_look.set()
        self._first_look = first_look
