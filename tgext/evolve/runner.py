"""The protocol: plan, lock, re-plan, run, poll.

Backend-agnostic: it talks to storage only through :class:`~.backends.base.Backend` and to
the gate only through :class:`~.state.GateState`.  One :class:`Runner` per process and
application, driven either by its own daemon thread (the web application) or in the foreground
(``gearbox evolve run``).  While it holds the lock, a :class:`~.heartbeat.Heartbeat` renews the
lease.
"""
import logging
import os
import random
import secrets
import socket
import threading
import time
import traceback

from . import failure_text, logs
from .errors import ConfigurationError, EvolutionFailed, LeaseLost
from .evolution import BatchEvolution, interrupts_foreground, ran_its_body
from .planning import fingerprints, plan
from .records import (ADOPTED, APPLIED, DEFAULT_LOCK_NAME, FAILED, PAUSE, PAUSED, RESUME, RETRY,
                      STARTED)
from .state import (BLOCKED, EVOLVING, MISCONFIGURED, PAUSED as PAUSED_PHASE, READY,
                    SERVING_AFTER_FAILURE, UNREACHABLE, WAITING, GateState)

#: The audit trail's name for an attempt that lost the lock (its work rolled back).
LOST = 'lost'
#: The storage version whose history has the batch fields (checkpoints, requests).
BATCH_FIELDS_VERSION = 3


log = logs.runner

#: Ceiling of the retry delay while the database cannot be reached.
MAX_BACKOFF = 30.0

# What Runner.step() asks its driver to do next.
DONE = 'done'  # the gate is open for good: stop
WAIT = 'wait'  # poll again after poll_interval
AGAIN = 'again'  # step again at once (the lock was just released)

# How far a runner has brought tgext.evolve's own storage.
CREATED = 'created'  # every store exists
CURRENT = 'current'  # and is at this release's storage version


def make_owner():
    """``host:pid:token``: PIDs repeat across hosts and containers, the token never does."""
    return f'{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}'


def legacy_adoptions(evolutions, legacy, history):
    """Ids tgext.evolve 0.0.5 applied (every one up to its recorded version) that history lacks."""
    ids = [e.evolution_id for e in evolutions]
    if legacy is None or not legacy.version or legacy.version not in ids:
        return []
    return [i for i in ids[:ids.index(legacy.version) + 1] if i not in history]


class RunListener:
    """What a foreground driver hears while evolutions run (``gearbox evolve run`` draws its
    progress bars from it).  Called in the thread running ``evolve()``: it must not raise."""

    def progress(self, evolution_id, done, total):
        """``Evolution.progress()`` was called (every call, unthrottled)."""

    def finished(self, evolution_id):
        """``evolve()`` returned or raised; the log says which."""


class Runner:
    """Runs the pending evolutions once across all processes sharing the database."""

    def __init__(self, backend, evolutions, settings, *, config=None, state=None, owner=None,
                 lock_name=DEFAULT_LOCK_NAME, listener=None):
        self.backend = backend
        self.evolutions = list(evolutions)
        self.settings = settings
        self.config = config
        self.state = state if state is not None else GateState()
        self.owner = owner or make_owner()
        self.lock_name = lock_name
        self.listener = listener or RunListener()
        self.fingerprints = fingerprints(self.evolutions, config)
        self.applied = []  # ids this runner applied, in order
        self.failure = None  # EvolutionFailed for the evolution that failed in this runner
        self._stop = threading.Event()
        self._thread = None
        self._storage = None  # CREATED once ensure_storage() ran, CURRENT once upgraded
        self._batch_fields = None  # whether the history has them: known once something is pending
        self._failures_at_start = None
        self.paused = None  # the paused evolution the last step stopped at, if any
        self._attempted = set()
        self._unrecorded = {}  # id: attempt of a failure the database refused to record
        self._evolution_busy_since = {}  # id: when its runs began failing busy
        self._waiting = False
        self._waited_generation = None  # of the lock another process held when we began waiting
        self._last_note = None
        self._busy_since = None
        self._claimer = None  # parallel.RangeClaimer, once a parallel evolution is pending

    # --- drivers -------------------------------------------------------------------------------

    def start(self):
        """Run in a daemon thread: the web application's way."""
        self._thread = threading.Thread(target=self.run, name='tgext.evolve', daemon=True)
        self._thread.start()
        return self._thread

    @property
    def stopping(self):
        """Set once ``stop()`` was called: a batched evolution stops at its next boundary."""
        return self._stop

    @property
    def alive(self):
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout=None):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._claimer is not None:
            self._claimer.join(timeout)  # it gives its range back at the batch boundary

    def run(self, deadline=None):
        """Step until the gate opens (or ``stop()``/``deadline``); returns the final phase."""
        backoff = self.settings.poll_interval
        while not self._stop.is_set():
            try:
                outcome = self.step()
            except Exception as e:
                if self.backend.is_busy(e):
                    self._busy(e)
                    delay = self.settings.poll_interval * random.uniform(0.85, 1.0)
                else:
                    self._note(('unreachable', type(e).__name__), logging.WARNING,
                               'database unavailable (%s: %s); answering 503, retrying in up '
                               'to %.0f s', type(e).__name__, e, MAX_BACKOFF)
                    self.state.set_phase(UNREACHABLE)
                    delay = backoff * random.uniform(0.85, 1.0)
                    backoff = min(backoff * 2, MAX_BACKOFF)
            else:
                backoff = self.settings.poll_interval
                self._busy_since = None
                if outcome == DONE:
                    break
                # Jitter spreads the polls of many processes started together; it only ever
                # shortens the interval, so convergence stays within one poll_interval.
                delay = 0 if outcome == AGAIN else (
                    self.settings.poll_interval * random.uniform(0.85, 1.0))
            if deadline is not None and time.monotonic() + delay > deadline:
                break
            if delay:
                self._stop.wait(delay)
        return self.state.phase

    # --- one look at the database --------------------------------------------------------------

    def step(self):
        """Look at the database once and act; returns DONE, WAIT or AGAIN."""
        try:
            return self._step()
        except ConfigurationError as e:
            # A dependency neither registered nor done: known only once the history is read.
            # Nothing runs until the deployment is fixed (or the history satisfies it).
            self.state.set_phase(MISCONFIGURED)
            self._note(('misconfigured', str(e)), logging.ERROR,
                       'cannot run evolutions: %s; answering 503', e)
            return WAIT

    def _step(self):
        self.paused = None
        if self._waiting:
            # While another process holds a live lease, one indexed read per poll is enough.
            # A new generation of a held lock is news while the gate is closed: the holder
            # takes it again once the blocking evolutions are applied (see _run_locked).
            lock = self.backend.read_lock(self.lock_name)
            self._database_answered()
            if (lock is not None and lock.held and lock.owner != self.owner
                    and (self.state.open or lock.generation == self._waited_generation)):
                self._set_waiting(lock)
                return WAIT
            self._waiting = False
        steps = self._plan()
        if not steps:
            self._open(READY, 'all %d evolutions applied: serving', len(self.evolutions),
                       key='all-applied')
            return DONE
        self._claim_ranges(steps)
        if not any(step.blocking for step in steps):
            self._open_for_background(steps)
        if self._runnable(steps) == []:
            return self._blocked(steps[0])
        self._ensure_storage()
        lease = self.backend.acquire(self.owner, self.settings.lease, self.lock_name)
        if lease is None:
            self._waiting = True
            lock = self.backend.read_lock(self.lock_name)
            self._waited_generation = lock.generation if lock is not None else None
            self._set_waiting(lock)
            return WAIT
        self._note(('lock', lease.generation), logging.INFO,
                   'lock acquired (generation %d) by %s: %d evolution(s) pending',
                   lease.generation, self.owner, len(steps))
        return self._run_locked(lease)

    def _plan(self):
        """Read the history (never its traceback text) and plan; on storage that has them, with
        the batch fields (checkpoints, operators' requests), which only a process with
        something pending needs: one on an evolved database reads the history once, and that
        is all."""
        history = self.backend.read_history(errors=False, batches=bool(self._batch_fields))
        self._database_answered()
        if self._failures_at_start is None:
            self._failures_at_start = {i: r.attempts for i, r in history.items()
                                       if r.state == FAILED}
        steps = plan(self.evolutions, history, self.fingerprints)
        if steps and self._batch_fields is None:
            version = self.backend.read_storage_version()
            self._batch_fields = version >= BATCH_FIELDS_VERSION
            if self.backend.storage_is_current(version):
                # Storage versions only go up, and every store exists before the first version
                # is recorded: neither creating nor upgrading has anything left to look at.
                self._storage = CURRENT
            if self._batch_fields:
                return self._plan()
        return steps

    def _claim_ranges(self, steps):
        """Every process with a parallel evolution pending works on its ranges."""
        parallel = [s for s in steps if getattr(s.evolution, 'parallel', False)]
        if parallel:
            from .parallel import RangeClaimer
            if self._claimer is None:
                self._claimer = RangeClaimer(self)
            self._claimer.want(parallel)

    def _open_for_background(self, steps):
        self._open(READY, 'every blocking evolution is applied: serving while %d background '
                   'evolution(s) run: %s', len(steps), ', '.join(s.evolution_id for s in steps),
                   key='background')

    def _database_answered(self):
        # Here, not in run(): a step that succeeds logs its own news (lock acquired...), and
        # the recovery must come first.
        if self._last_note and self._last_note[0] == 'unreachable':
            self._note(('reachable',), logging.INFO, 'database reachable again')
        elif self._last_note and self._last_note[0] == 'busy':
            self._note(('not busy',), logging.INFO, 'database no longer busy')

    def _busy(self, error):
        # 32 processes starting at once on one SQLite file can keep a read or a write waiting
        # past the driver's busy timeout: contention, not an outage.  Only a file that stays
        # locked for longer than a lease (another program holding a transaction open) is news.
        now = time.monotonic()
        if self._busy_since is None:
            self._busy_since = now
        busy_for = now - self._busy_since
        if busy_for > self.settings.lease:
            self._note(('busy',), logging.WARNING,
                       'database busy for %.0f s: another connection keeps its write lock '
                       '(%s); answering 503, retrying', busy_for, error.orig
                       if getattr(error, 'orig', None) is not None else error)
        else:
            log.debug('database busy (%s), retrying at the next poll', error)

    def _ensure_storage(self):
        # Only a process with something to write gets here: one on an evolved database only
        # ever reads the history (no table built, no version read).
        if self._storage is None:
            self.backend.ensure_storage()
            self._storage = CREATED

    def _upgrade_storage(self, heartbeat):
        """Bring tgext.evolve's own storage to this release's version, under the lock; False
        if that has to wait (then so do the evolutions)."""
        if self._storage == CURRENT:
            return True
        try:
            current = self.backend.upgrade_storage(heartbeat.lease)
        except LeaseLost:
            heartbeat.lost.set()
            current = False
        if not current:
            self.state.set_phase(WAITING)
            self._note(('storage-wait',), logging.INFO,
                       "evolutions pending; upgrading tgext.evolve's storage waits for tables "
                       'other connections are using, retrying at the next poll')
            return False
        self._storage = CURRENT
        self._batch_fields = True
        return True

    def _retryable(self, step):
        """A failure is retried once per process start, and only if nobody retried it since."""
        record = step.record
        evolution_id = step.evolution_id
        if record is not None and self._unrecorded.get(evolution_id) == record.attempts:
            return False  # failed here, unrecorded: never retried for it (no retry storm)
        if record is None or record.state != FAILED or record.requested == RETRY:
            return True  # an operator's retry request is honoured by whoever takes the lock
        return (evolution_id not in self._attempted
                and self._failures_at_start.get(evolution_id) == record.attempts)

    @staticmethod
    def _paused(step):
        record = step.record
        return record is not None and record.state == PAUSED and record.requested != RESUME

    def _runnable(self, steps):
        runnable = []
        for step in steps:
            if self._paused(step) or not self._retryable(step):
                break
            runnable.append(step)
        return runnable

    def _blocked(self, step):
        if self._batch_fields is False:
            # Storage older than the operators' requests when this process looked: an
            # operator's retry or resume upgrades it, and must be seen here at the next poll.
            self._batch_fields = None
        if self._paused(step):
            return self._paused_wait(step)
        record = step.record
        if not step.blocking:
            self._note(('blocked', step.evolution_id, record.attempts), logging.ERROR,
                       'background evolution %r failed (%d attempts): serving without it until '
                       'it is fixed and retried (restart, or gearbox evolve retry %s)',
                       step.evolution_id, record.attempts, step.evolution_id)
            return DONE if self.settings.on_failure == 'serve' else WAIT
        if self.settings.on_failure == 'serve':
            self._open(SERVING_AFTER_FAILURE,
                       'evolution %r failed (%d attempts); on_failure = serve: serving without it',
                       step.evolution_id, record.attempts)
            return DONE
        self.state.set_phase(BLOCKED)
        self._note(('blocked', step.evolution_id, record.attempts), logging.ERROR,
                   'evolution %r failed (%d attempts); on_failure = block: answering 503 until it '
                   'is fixed and retried (restart, or gearbox evolve retry %s)',
                   step.evolution_id, record.attempts, step.evolution_id)
        return WAIT

    def _paused_wait(self, step):
        """A paused evolution waits for an operator's resume: polled at every poll_interval."""
        by = step.record.owner
        self.paused = step.evolution_id
        if step.blocking:
            self.state.set_phase(PAUSED_PHASE)
            self._note(('paused', step.evolution_id), logging.WARNING,
                       'evolution %r is paused: answering 503 until it is resumed (gearbox '
                       'evolve resume %s)', step.evolution_id, step.evolution_id)
        else:
            self._note(('paused', step.evolution_id), logging.INFO,
                       'background evolution %r is paused (last run by %s): serving; it '
                       'continues once resumed', step.evolution_id, by)
        return WAIT

    def _set_waiting(self, lock):
        self.state.set_phase(WAITING)
        holder = lock.owner if lock is not None else None
        if holder is None or lock.expires_in is None:
            # Lost the race for a free lock: the winner's row is not visible yet.
            self._note(('waiting', None), logging.INFO,
                       'evolutions pending, another process is taking the lock')
            return
        if lock.expires_in <= 0:
            # On SQLite a holder inside a long evolution cannot renew (one writer at a time),
            # and nobody can take its lock over before it commits.
            self._note(('waiting', holder), logging.INFO,
                       'evolutions pending, waiting for %s (its lease is %.1f s overdue: it '
                       'is still writing, or it is gone and its lock will be taken over)',
                       holder, -lock.expires_in)
            return
        self._note(('waiting', holder), logging.INFO,
                   'evolutions pending, waiting for %s (lease expires in %.1f s)', holder,
                   lock.expires_in)

    def _open(self, phase, message, *args, key=None):
        self.state.set_phase(phase)
        self._note((key or phase,),
                   logging.WARNING if phase == SERVING_AFTER_FAILURE else logging.INFO,
                   message, *args)

    def _note(self, key, level, message, *args):
        """Log one line per state change, never one per poll."""
        if key != self._last_note:
            self._last_note = key
            log.log(level, message, *args)

    # --- holding the lock ----------------------------------------------------------------------

    def _run_locked(self, lease):
        # Imported by the lock holder only: a process started on an evolved database, which
        # only reads the history, never loads it.
        from .heartbeat import Heartbeat
        heartbeat = Heartbeat(self.backend, lease, self.settings.heartbeat_interval)
        heartbeat.start()
        try:
            if not self._upgrade_storage(heartbeat):
                return WAIT
            self._adopt_legacy(heartbeat)
            # Re-plan inside the lock: another process may have finished meanwhile.
            steps = self._plan()
            blocking = {step.evolution_id for step in steps if step.blocking}
            for index, step in enumerate(self._runnable(steps)):
                if heartbeat.lost.is_set() or self._stop.is_set():
                    break
                if not self._run_one(step, heartbeat, first=index == 0):
                    break
                blocking.discard(step.evolution_id)
                left = [s for s in steps if s.evolution_id not in self.applied]
                if not blocking and left and not self.state.open:
                    self._open_for_background(left)
                    # Let go of the lock and take it again (AGAIN): the new generation tells
                    # the processes waiting on 503 to look at the history at their next poll
                    # and serve too, instead of when the background evolutions are done.
                    break
        finally:
            heartbeat.stop()
            if not heartbeat.lost.is_set():
                try:
                    self.backend.release(heartbeat.lease)
                except Exception as e:
                    log.warning('could not release the lock (%s: %s); it expires in %s s',
                                type(e).__name__, e, self.settings.lease)
        return AGAIN

    def _adopt_legacy(self, heartbeat):
        legacy = self.backend.read_legacy()
        if legacy is None:
            return
        if legacy.lock_holder:
            self._note(('legacy-lock',), logging.INFO,
                       'ignoring the lock left by tgext.evolve 0.0.5 (process %s)',
                       legacy.lock_holder)
        if not legacy.version:
            return
        ids = [e.evolution_id for e in self.evolutions]
        if legacy.version not in ids:
            self._note(('legacy-unknown', legacy.version), logging.WARNING,
                       'tgext.evolve 0.0.5 recorded %r as its last evolution, but no registered '
                       'evolution has that id: adopting nothing', legacy.version)
            return
        history = self.backend.read_history(errors=False)
        adopt = legacy_adoptions(self.evolutions, legacy, history)
        if adopt:
            self.backend.record_states(heartbeat.lease, adopt, ADOPTED)
            log.info('adopted %d evolution(s) applied by tgext.evolve 0.0.5, up to %r',
                     len(adopt), legacy.version)

    def _audit(self, evolution_id, action, detail=None, error=None):
        """One line of the audit trail for an attempt; a failure to write it is logged, never
        allowed to fail the evolution it describes."""
        try:
            self.backend.record_audit(evolution_id, action, self.owner, socket.gethostname(),
                                      detail, error)
        except Exception as e:
            log.warning('could not write the audit trail of %r (%s: %s): %s', evolution_id,
                        type(e).__name__, e, action)

    def _run_one(self, step, heartbeat, first=False):
        """``first``: the plan was read just before, under this lease."""
        evolution = step.evolution
        evolution_id = step.evolution_id
        if not first:
            # Read again: an operator may have paused it since the plan was read, while the
            # evolutions before it ran.
            step = step._replace(record=self.backend.read_history(
                errors=False, batches=True).get(evolution_id))
        record = step.record
        if self._paused(step):
            return False
        if record is not None and record.requested == PAUSE:
            self.backend.record_paused(heartbeat.lease, evolution_id)
            log.info('paused %r before it started, as %s asked', evolution_id,
                     record.requested_by)
            self._audit(evolution_id, PAUSED, f'before it started, as {record.requested_by} '
                                              f'asked')
            return False
        self.state.set_phase(EVOLVING)
        self.state.progress = self.state.eta = None  # the previous evolution's are not this one's
        self._attempted.add(evolution_id)
        evolution.config = self.config
        if isinstance(evolution, BatchEvolution):
            return self._run_batched(step, heartbeat)
        fingerprint = self.fingerprints.get(evolution_id)
        running = self.backend.record_running(heartbeat.lease, evolution_id, fingerprint)
        log.info('evolving %r (%s, attempt %d)', evolution_id, step.reason, running.attempts)
        self._audit(evolution_id, STARTED, f'attempt {running.attempts}: {step.reason}')
        from .heartbeat import ProgressSink
        sink = evolution._progress_sink = ProgressSink(evolution_id, heartbeat, self.state,
                                                       self.listener)
        try:
            record = self.backend.apply(heartbeat.lease, evolution_id,
                                        lambda: ran_its_body(evolution, 'evolve'), fingerprint,
                                        final_progress=sink.last)
        except LeaseLost:
            heartbeat.lost.set()
            log.warning('lock lost while %r ran: %s', evolution_id,
                        'its work was rolled back' if self.backend.atomic_apply else
                        'its work may be partly written and will run again (at-least-once)')
            self._audit(evolution_id, LOST, 'the lock was lost while it ran')
            return False
        except Exception as e:
            if self.backend.is_transient(e):
                raise  # the connection died, not the evolution
            if self.backend.is_busy(e) and not self._busy_past_a_lease(evolution_id):
                raise  # contention: the runner retries at the next poll
            self._failed(heartbeat, evolution_id, running.attempts, traceback.format_exc()
                         + self._busy_note(evolution_id, e))
            return False
        except BaseException as e:
            # SystemExit, KeyboardInterrupt, GeneratorExit: in the evolution thread they would
            # end it, leaving the record running and the gate closed for good.
            self._failed(heartbeat, evolution_id, running.attempts, traceback.format_exc())
            if interrupts_foreground(e):
                raise
            return False
        finally:
            evolution._progress_sink = None
            self.listener.finished(evolution_id)
        self._evolution_busy_since.pop(evolution_id, None)
        self.applied.append(evolution_id)
        log.info('applied %r in %.0f ms', evolution_id, record.duration_ms or 0)
        self._audit(evolution_id, APPLIED, f'attempt {running.attempts}, '
                                           f'{record.duration_ms or 0:.0f} ms')
        return True

    def _busy_past_a_lease(self, evolution_id):
        """An evolution that keeps failing busy for longer than a lease is failing: its own
        code waits for a lock it cannot get (its own write lock, on SQLite, through a
        connection of its own).  Re-run forever, it would keep the site on 503 for good."""
        since = self._evolution_busy_since.setdefault(evolution_id, time.monotonic())
        return time.monotonic() - since > self.settings.lease

    def _busy_note(self, evolution_id, error):
        since = self._evolution_busy_since.pop(evolution_id, None)
        if since is None or not self.backend.is_busy(error):
            return ''
        return (f'\nThe database stayed busy for {time.monotonic() - since:.0f} s (longer than '
                f'the {self.settings.lease:g} s lease) while this evolution ran, attempt after '
                f'attempt: its own code waits for a lock it cannot get.  On SQLite: write '
                f'through DBSession only, not through a connection of its own '
                f'(engine.begin()) or another thread.\n')

    def _failed(self, heartbeat, evolution_id, attempts, error):
        """Record that ``evolution_id`` failed with the traceback ``error``, and log it."""
        error = self.record_failure(heartbeat, evolution_id, attempts, error)
        self.failure = EvolutionFailed(evolution_id, error, self.applied)
        self._audit(evolution_id, FAILED, f'attempt {attempts}', error)
        log.error('evolution %r failed (attempt %d); its work was rolled back:\n%s',
                  evolution_id, attempts, failure_text.loggable(error))

    def record_failure(self, heartbeat, evolution_id, attempts, error):
        """Record the failure whatever its text says (sanitised and capped: see
        :mod:`.failure_text`); returns the text recorded.

        A database that refuses to store the record is no outage, and the evolution must not
        run again for it: if even the plain-ASCII text is refused, this process remembers the
        failure and follows ``on_failure`` without running the evolution again.
        """
        text = failure_text.storable(error)
        problem = None
        for attempt in dict.fromkeys((text, failure_text.plain(error))):
            try:
                self.backend.record_failure(heartbeat.lease, evolution_id, attempt)
                return attempt
            except LeaseLost:
                heartbeat.lost.set()
                log.warning('lock lost before the failure of %r was recorded: the next holder '
                            'runs it again', evolution_id)
                break
            except Exception as e:
                problem = e
                if self.backend.is_transient(e) or self.backend.is_busy(e):
                    break  # the database went away meanwhile: nothing else would be stored
        self._unrecorded[evolution_id] = attempts
        if problem is not None:
            log.error('cannot record the failure of %r (%s: %s): this process will not run it '
                      'again', evolution_id, type(problem).__name__,
                      failure_text.loggable(str(problem))[:500])
        return text

    def _run_batched(self, step, heartbeat):
        from .batching import DONE as BATCHES_DONE, FAILED as BATCHES_FAILED
        if step.evolution.parallel:
            from .parallel import ParallelRun as Run
        else:
            from .batching import BatchedRun as Run
        run = Run(self, step, heartbeat)
        try:
            outcome = run.run()
        finally:
            self.listener.finished(step.evolution_id)
        if outcome == BATCHES_FAILED:
            self.failure = EvolutionFailed(step.evolution_id, run.error, self.applied)
        if outcome != BATCHES_DONE:
            return False
        self.applied.append(step.evolution_id)
        return True
