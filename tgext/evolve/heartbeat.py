"""While this process holds the lock: the lease renewals and the evolution's progress.

:class:`Heartbeat` renews the lease every lease/3 in a thread of its own, and writes the last
progress the evolution reported (a progress write renews the lease too);
:class:`ProgressSink` is what ``Evolution.progress()`` calls, from the thread running
``evolve()``.  The runner (``runner.py``) starts one heartbeat per lock acquisition.
"""
import threading
import time

from . import logs
from .errors import LeaseLost

log = logs.heartbeat

#: Progress is written to storage at most this often (it doubles as a lease renewal).
PROGRESS_WRITE_INTERVAL = 1.0
#: Progress is logged at most this often.
PROGRESS_LOG_INTERVAL = 5.0


class Heartbeat:
    """Renews ``lease`` every ``interval`` seconds and writes throttled progress.

    ``lost`` is set once a renewal found the lock taken by another process: the runner then
    starts no other evolution, and the evolution's next ``progress()`` raises LeaseLost.
    """

    def __init__(self, backend, lease, interval):
        self.backend = backend
        self.lease = lease
        self.interval = interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._progress = None
        self._renewed_at = time.monotonic()  # the lease's last renewal (acquiring it, first)
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._run, name='tgext.evolve-heartbeat',
                                        daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def note_renewed(self):
        """A batch's fencing check just renewed the lease: the next renewal can wait.

        On SQLite (one writer) a renewal would otherwise queue behind the next batch."""
        self._renewed_at = time.monotonic()

    def renewal_due(self):
        """Whether the next batch's fencing check should renew the lease, rather than only
        check it: half a renewal interval after the last renewal, so that batches in a row
        renew it themselves, before this thread would have to (on SQLite, between two of
        their write transactions)."""
        return time.monotonic() - self._renewed_at >= self.interval / 2

    def set_progress(self, evolution_id, done, total):
        with self._guard:
            self._progress = (evolution_id, done, total)

    def _take_progress(self):
        with self._guard:
            progress, self._progress = self._progress, None
            return progress

    def _run(self):
        tick = min(self.interval, PROGRESS_WRITE_INTERVAL)
        next_renewal = time.monotonic() + self.interval
        failing = False
        while not self._stop.wait(tick):
            progress = self._take_progress()
            next_renewal = max(next_renewal, self._renewed_at + self.interval)
            if progress is None and time.monotonic() < next_renewal:
                continue
            try:
                if progress is not None:
                    self.backend.record_progress(self.lease, *progress)  # fenced: renews too
                else:
                    self.lease = self.backend.renew(self.lease)
            except LeaseLost:
                log.warning('lock lost: %s; stopping before the next evolution',
                            how_lost(self.backend, self.lease))
                self.lost.set()
                return
            except Exception as e:
                if self.backend.is_busy(e):
                    # SQLite, one writer: the evolution's own open transaction keeps the
                    # renewal out until it commits, which renews the lease.  Expected, and
                    # safe (nobody else can write meanwhile): no warning.
                    log.debug('lease renewal waits for the evolution\'s write transaction')
                    continue
                # The lease may expire while the database is away; fencing keeps that safe.
                if not failing:
                    log.warning('cannot renew the lease: %s: %s', type(e).__name__, e)
                failing = True
                continue
            if failing:
                log.info('lease renewed again')
                failing = False
            self._renewed_at = time.monotonic()
            next_renewal = self._renewed_at + self.interval


def how_lost(backend, lease):
    """Why ``lease`` no longer holds the lock, as far as the lock record tells: broken by an
    operator, or taken over after the lease expired.

    A later acquisition clears ``released_by``; only the generation then tells that something
    happened in between (a break, or a release, each adds one more).
    """
    expired = f'its lease of {lease.lease_seconds:g} s expired'
    try:
        lock = backend.read_lock(lease.name)
    except Exception:  # the database went away meanwhile
        return f'another process took it over ({expired}?)'
    if lock is None or lock.owner is None:
        if lock is not None and lock.broken_by is not None:
            return f'broken by {lock.broken_by} (release-lock --force)'
        return f'{expired}; released since'
    if lock.generation == lease.generation + 1:
        return f'{expired}; taken over by {lock.owner}'
    return (f'now held by {lock.owner} (generation {lock.generation}); {expired} or it was '
            f'broken meanwhile')


class ProgressSink:
    """What ``Evolution.progress()`` calls: the gate state and ``listener`` at once, storage
    (through the heartbeat) and the log throttled."""

    def __init__(self, evolution_id, heartbeat, state, listener):
        self._evolution_id = evolution_id
        self._heartbeat = heartbeat
        self._state = state
        self._listener = listener
        self._logged_at = 0.0
        self._last = None

    def last(self):
        """The last ``(done, total)`` reported, or None: recorded with ``applied``."""
        return self._last

    def __call__(self, done, total):
        if self._heartbeat.lost.is_set():
            raise LeaseLost(f'lock lost while {self._evolution_id!r} ran')
        done = int(done)
        total = None if total is None else int(total)
        self._last = (done, total)
        percent = min(100.0, 100.0 * done / total) if total else None
        self._state.progress = percent
        self._heartbeat.set_progress(self._evolution_id, done, total)
        self._listener.progress(self._evolution_id, done, total)
        now = time.monotonic()
        if now - self._logged_at >= PROGRESS_LOG_INTERVAL:
            self._logged_at = now
            # The runner's logger: a line about the evolution, not about the lease.
            logs.runner.info('evolving %r: %d%s', self._evolution_id, done,
                             f'/{total} ({percent:.0f}%)' if total else '')
