"""Running a :class:`~.evolution.BatchEvolution`: short batches, each committed with its checkpoint.

Backend-agnostic, like the runner beside it: the backend opens each batch's transaction, runs
the batch's work inside it and commits it together with the checkpoint and the fencing check
(:meth:`~.backends.base.Backend.run_batch`); this module decides what each batch does, how big
it is, and what happens when one fails.
"""
import collections
import json
import socket
import threading
import time
import traceback

from . import failure_text, logs
from .cursors import check_user_cursor
from .errors import ConfigurationError, LeaseLost, TransactionEscaped
from .evolution import interrupts_foreground, ran_its_body
from .backends.base import AuditLine, BatchCheckpoint
from .records import APPLIED, PAUSED, STARTED

log = logs.runner

#: Batches never grow past this many items unless the class says otherwise: a batch's objects
#: live in the session until it commits.
DEFAULT_MAX_BATCH_SIZE = 10_000
#: Progress is logged at most this often.
PROGRESS_LOG_INTERVAL = 5.0
#: Seconds a walk runs before its collection is counted (the default ``count()``, a scan of the
#: whole collection): a walk that ends sooner takes its total from the walk itself, exact and
#: for free, and a longer one shows percent and ETA from then on (its rate is only known after
#: a few batches anyway).  What is counted then is the part after the checkpoint, added to the
#: items done: a collection that leaves out what is done (``WHERE words IS NULL``) holds only
#: the rest by then.  Over a table of 200,000 rows the scan took more of PostgreSQL's time
#: than a tenth of the walk's own batches.  A count() of the class's own is called at once.
WALK_COUNT_AFTER = 1.0
#: A failing batch is retried this many times, at half its size each time, before the
#: evolution is recorded failed (its checkpoint kept).
BATCH_RETRIES = 3


class BatchSizer:
    """Adapts the batch size so that one batch takes about ``target`` seconds.

    A batch's duration is modelled as a fixed cost (the statements every batch sends, the
    walk's query) plus a cost per item, fitted over the last few batches, so that neither one
    noisy batch nor a fixed cost larger than the target swings the size (a per-item model alone
    would shrink batches to one item when the fixed cost dominates).  A batch that took more
    than twice the target shrinks the next one at once (short transactions come first); growth
    is bounded per batch (x1.5, as GitLab's batch optimizer bounds its steps), so a size that
    overshoots when items get costlier costs at most one long batch.

    A batch the model is wrong about by more than ``CHANGE`` times starts a new window: the
    items changed (costlier or cheaper from some key on), and a fit across both kinds of items
    describes neither (it once took a fixed cost near the target from them and shrank batches
    to one item).  Unless the batch after it runs at the old pace again: then it was a stall
    (the machine or the database paused a moment), the old window comes back without it, and
    so does the size it interrupted, at once rather than regrowing x1.5 at a time.
    """

    GROWTH = 1.5
    WINDOW = 8  # batches the model is fitted on
    MIN_SPREAD = 0.15  # coefficient of variation of the sizes below which no line is fitted
    CHANGE = 2.0  # a batch this many times slower or faster than predicted breaks the model

    def __init__(self, size, target, ceiling=DEFAULT_MAX_BATCH_SIZE, floor=1):
        self.target = target
        self.floor = floor
        self.ceiling = max(floor, ceiling)
        self.size = self._bounded(size)
        self.samples = collections.deque(maxlen=self.WINDOW)
        self._before_change = None  # (the window, the size) before a batch that broke it

    def _bounded(self, size):
        return int(min(self.ceiling, max(self.floor, size)))

    def observe(self, items, seconds):
        """A batch of ``items`` items took ``seconds``: choose the next size."""
        if items <= 0:
            return self.size
        seconds = max(seconds, 1e-9)
        # Growth by at least one item, or a size of 1 could never grow again.
        ceiling = max(self.size * self.GROWTH, self.size + 1)
        ceiling = max(ceiling, self._update_window(items, seconds))
        if seconds > 2 * self.target:
            ideal = items * self.target / seconds
        else:
            fixed, per_item = self._fit(self.samples)
            # The items get at least half of the target, so that a fixed cost near the target
            # cannot shrink batches to nothing (nor one above it grow them without bound).
            ideal = max(self.target - fixed, self.target / 2) / per_item
        self.size = self._bounded(min(ideal, ceiling))
        return self.size

    def _update_window(self, items, seconds):
        """Adds the batch to the window, or starts a new one; the size a stall interrupted
        (when this batch proves the one before it was a stall), else 0."""
        sample = (items, seconds)
        before, self._before_change = self._before_change, None
        if before is not None:
            window, interrupted = before
            if self._agrees(window, sample):
                self.samples = collections.deque(window, maxlen=self.WINDOW)
                self.samples.append(sample)
                return interrupted
        elif len(self.samples) >= 2 and not self._agrees(self.samples, sample):
            self._before_change = (tuple(self.samples), items)
            self.samples.clear()
        self.samples.append(sample)
        return 0

    def _agrees(self, window, sample):
        items, seconds = sample
        fixed, per_item = self._fit(window)
        predicted = fixed + per_item * items
        return predicted / self.CHANGE <= seconds <= predicted * self.CHANGE

    def _fit(self, samples):
        """``(fixed seconds, seconds per item)`` by least squares over ``samples``."""
        n = len(samples)
        sx = sum(x for x, _ in samples)
        sy = sum(y for _, y in samples)
        sxx = sum(x * x for x, _ in samples)
        sxy = sum(x * y for x, y in samples)
        spread = n * sxx - sx * sx  # n^2 x the variance of the sizes
        # Sizes that barely differ (a converged run) leave the slope to the noise of the
        # durations: a noisy slope once grew a converged 0.5 s batch to 0.9 s.  Below this
        # spread, the proportional model, averaged over the window, is the steadier one.
        if spread > (self.MIN_SPREAD * sx) ** 2:
            per_item = (n * sxy - sx * sy) / spread
            fixed = (sy - per_item * sx) / n
            if per_item > 0 and fixed >= 0:
                return fixed, per_item
            if per_item <= 0:
                return sy / n, 1e-12  # the size makes no difference: the fixed cost is all
        return 0.0, sy / sx  # one size so far (or noise): proportional

    def halve(self):
        """A batch failed: the next attempt takes half as many items."""
        self.size = max(self.floor, self.size // 2)
        return self.size

    def state(self):
        return self.size, tuple(self.samples)

    def restore(self, state):
        self.size, samples = state
        self.samples = collections.deque(samples, maxlen=self.WINDOW)
        self._before_change = None


#: Weight of the newest batch in the smoothed rate.
RATE_SMOOTHING = 0.3


def smoothed_rate(previous, items, seconds):
    """Items per second after a batch of ``items`` that took ``seconds`` of wall time since
    the batch before it (throttle sleeps included, so that the ETA is what a person waits)."""
    if items <= 0 or seconds <= 0:
        return previous
    latest = items / seconds
    return latest if previous is None else (
        RATE_SMOOTHING * latest + (1 - RATE_SMOOTHING) * previous)


def eta_seconds(done, total, rate):
    """Seconds left at ``rate`` items/s, or None when the total or the rate is unknown."""
    if total is None or not rate or rate <= 0:
        return None
    return max(0.0, (total - done) / rate)


def dump_cursor(value):
    """A cursor as stored (JSON text); None stays None (the start)."""
    return None if value is None else json.dumps(value, allow_nan=False, separators=(',', ':'))


def load_cursor(text):
    return None if text is None else json.loads(text)


# How a batched run ended.
DONE = 'applied'  # the last batch committed: the evolution is applied
STOPPED_PAUSED = 'paused'  # an operator's pause request was honoured at a batch boundary
FAILED = 'failed'  # recorded failed, its checkpoint kept
LOST = 'lost'  # the lease was lost: another process resumes from the checkpoint
STOPPED = 'stopped'  # this process is stopping: the next holder resumes from the checkpoint


#: The audit trail's detail of each way a batched attempt ends (FAILED has its traceback).
_OUTCOME_NOTES = {
    DONE: 'attempt {attempt}: {done} items in {batches} batches',
    STOPPED_PAUSED: 'at a batch boundary: {done} items in {batches} batches, checkpoint kept',
    LOST: 'the lock was lost: {done} items in {batches} batches committed, the next holder '
          'resumes',
    STOPPED: 'this process stopped: {done} items in {batches} batches committed, the next '
             'holder resumes',
}
#: The history states a batch's commit can end an attempt in, and the outcome each one is.
_ENDING_STATES = {APPLIED: DONE, PAUSED: STOPPED_PAUSED}


class BatchedRun:
    """One attempt at a :class:`~.evolution.BatchEvolution`, batch after batch, under a lease.

    ``runner`` gives the backend, the settings, the gate state, the listener and the stop
    event; ``step`` is the planned step (its record, read with the batch fields, says where a
    resumed evolution stands); ``heartbeat`` holds the lease.
    """

    def __init__(self, runner, step, heartbeat):
        self.runner = runner
        self.backend = runner.backend
        self.settings = runner.settings
        self.state = runner.state
        self.listener = runner.listener
        self.stopping = runner.stopping
        self.evolution = step.evolution
        self.evolution_id = step.evolution_id
        self.step = step
        self.heartbeat = heartbeat
        self.fingerprint = runner.fingerprints.get(self.evolution_id)
        self.audit = runner._audit
        self.attempt = self.done = self.batches = 0  # for the audit trail
        self.throttle = 0.0 if step.blocking else self.settings.throttle
        self._logged_at = 0.0
        self.error = None  # the traceback text recorded when the run failed
        # A batch committed the attempt's end (applied, paused) with its audit line.
        self.ended_in_history = False
        self.attempts = step.record.attempts if step.record is not None else 0  # until started

    # --- the run ---------------------------------------------------------------------------

    #: Whether the count may run beside the first batches (where the backend allows it): the
    #: parallel coordinator needs it before anything, to cut the ranges.
    count_aside = True

    def run(self):
        """Start (or resume) the evolution and run its batches; returns how it ended."""
        self.counting = None
        self.walk_count = None  # (the walk's count, when it is due) until it is started
        try:
            walker = self._walker()
            total = self._total(walker)
        except Exception as e:
            if self.backend.is_transient(e) or self.backend.is_busy(e):
                raise
            return self._fail(traceback.format_exc())  # collection() or count() raised
        except BaseException as e:
            return self._fail_on_base_exception(e)
        try:
            record = self.backend.record_batches_running(
                self.heartbeat.lease, self.evolution_id, self.evolution.batch_size, total,
                self.fingerprint, audit=self._started_line)
        except LeaseLost:
            self.heartbeat.lost.set()
            return LOST
        self.attempts = self.attempt = record.attempts
        outcome = self._started(walker, total, record)
        # _fail() wrote its own line, with the traceback; a batch wrote applied or paused.
        if outcome != FAILED and not self.ended_in_history:
            self.audit(self.evolution_id, outcome, _OUTCOME_NOTES[outcome].format(
                attempt=record.attempts, done=self.done, batches=self.batches))
        return outcome

    def _line(self, action, detail):
        return AuditLine(action, self.runner.owner, socket.gethostname(), detail)

    def _started_line(self, record):
        return self._line(STARTED, f'attempt {record.attempts}: {self.step.reason}'
                                   f'{_resume_note(record)}')

    def _ended_line(self, record):
        """The audit line of a batch that ends the attempt (applied, or paused at its end),
        committed with it."""
        outcome = _ENDING_STATES.get(record.state)
        if outcome is None:
            return None
        return self._line(outcome, _OUTCOME_NOTES[outcome].format(
            attempt=record.attempts, done=record.progress_done or 0,
            batches=record.batches_done or 0))

    def _started(self, walker, total, record):
        """Run the batches of the evolution recorded running; returns how it ended."""
        log.info('evolving %r in batches (%s, attempt %d)%s', self.evolution_id,
                 self.step.reason, record.attempts, _resume_note(record))
        return self._batches(walker, record)

    def _walker(self):
        if self.evolution.walks:
            return self.backend.walker(self.evolution_id, self.evolution.collection())
        return None

    def _total(self, walker):
        """The total for progress and ETA: the one recorded (resuming), else counted once;
        None while it is counted aside (:class:`_Count`), or unknown."""
        record = self.step.record
        if record is not None and not record.done and record.progress_total is not None:
            return record.progress_total
        if self.evolution.counts:
            count = self.evolution.count
        elif walker is not None:
            count = walker.count
            if self.count_aside:
                self.walk_count = (count, time.monotonic() + WALK_COUNT_AFTER)
                return None
        else:
            return None
        if self.count_aside and self.backend.counts_aside:
            self.counting = _Count(self.backend, count, self.evolution_id)
            return None
        return self.backend.in_session(count)

    def _start_walk_count(self, cursor):
        """The walk's count, once it is due: the items done plus those after ``cursor`` (the
        checkpoint they were done up to); aside where the backend allows it, else here, at a
        batch boundary (SQLite: a read between two write transactions)."""
        count, due = self.walk_count
        if time.monotonic() < due:
            return
        self.walk_count = None
        done = self.done

        def total():
            return done + count(after=cursor)
        self.counting = _Count(self.backend, total, self.evolution_id,
                                    aside=self.backend.counts_aside)

    def _batches(self, walker, record):
        sizer = BatchSizer(record.batch_size or self.evolution.batch_size,
                           self.settings.batch_seconds, self.evolution.max_batch_size)
        cursor = load_cursor(record.checkpoint)
        done, total, rate = record.progress_done or 0, record.progress_total, record.rate
        self.done, self.batches = done, record.batches_done or 0
        failures = 0
        since = time.monotonic()
        counted = None  # the count taken aside, until a batch has committed it
        while True:
            if self.heartbeat.lost.is_set():
                return LOST
            if self.stopping.is_set():
                return STOPPED
            if self.walk_count is not None:
                self._start_walk_count(cursor)
            if self.counting is not None and self.counting.finished.is_set():
                counting, self.counting = self.counting, None
                error = counting.exception
                if error is None:
                    counted = counting.value
                elif self.backend.is_transient(error) or self.backend.is_busy(error):
                    # The database, not the count: this attempt goes on without a total.
                    log.warning('could not count the items of %r (%s): progress goes on '
                                'without a total', self.evolution_id, error)
                else:
                    return self._fail(_count_failure_text(error))
            started = time.monotonic()
            work = _BatchWork(self, walker, cursor, sizer, since, rate, counted,
                              totalled=total is not None)
            renew = self.heartbeat.renewal_due()
            try:
                record = self.backend.run_batch(self.heartbeat.lease, self.evolution_id, work,
                                                audit=self._ended_line, renew=renew)
            except LeaseLost:
                self.heartbeat.lost.set()
                log.warning('lock lost while %r ran: its batch was rolled back%s',
                            self.evolution_id, '' if self.backend.atomic_apply else
                            ' (its flushed writes stay: at least once)')
                return LOST
            except (ConfigurationError, TransactionEscaped):
                return self._fail(traceback.format_exc())  # the same every time: no retry
            except Exception as e:
                if self.backend.is_transient(e) or self.backend.is_busy(e):
                    raise  # the database, not the batch: the runner retries, resuming here
                failures += 1
                if failures > BATCH_RETRIES:
                    return self._fail(self._failure_text(cursor, sizer.size))
                log.warning('batch of %r after cursor %s failed (%s: %s): rolled back, '
                            'retrying with %d items', self.evolution_id, _short(cursor),
                            type(e).__name__, _short(str(e)), sizer.halve())
                continue
            except BaseException as e:
                return self._fail_on_base_exception(e)  # not retried: it was no accident
            if renew:
                self.heartbeat.note_renewed()  # the batch's fencing check renewed the lease
            # The whole transaction, its flush and commit included: with ORM writes, sent at
            # the flush, most of a batch's time can be spent after process() returned.
            duration = time.monotonic() - started
            sizer.observe(work.items, duration)
            failures = 0
            cursor, done, rate = work.cursor, record.progress_done or 0, record.rate
            total, counted = record.progress_total, None
            self.done, self.batches = done, record.batches_done or 0
            since = work.finished
            self._report(done, total, rate)
            self.ended_in_history = record.state in _ENDING_STATES
            if record.state == APPLIED:
                log.info('applied %r: %d items in %d batches, %.0f ms', self.evolution_id,
                         done, record.batches_done or 0, record.duration_ms or 0)
                return DONE
            if record.state == PAUSED:
                log.info('paused %r at a batch boundary (%d items done; checkpoint kept)',
                         self.evolution_id, done)
                return STOPPED_PAUSED
            if self.throttle:
                # Leaves the database to live traffic: the rate (and the ETA) include it.
                self.stopping.wait(self.throttle * duration)

    # --- what the runner sees ---------------------------------------------------------------

    def _report(self, done, total, rate):
        percent = min(100.0, 100.0 * done / total) if total else None
        self.state.progress = percent
        self.state.eta = eta_seconds(done, total, rate)
        self.listener.progress(self.evolution_id, done, total)
        now = time.monotonic()
        if now - self._logged_at >= PROGRESS_LOG_INTERVAL:
            self._logged_at = now
            eta = self.state.eta
            log.info('evolving %r: %d%s%s%s', self.evolution_id, done,
                     f'/{total} ({percent:.0f}%)' if total else '',
                     f', {rate:.0f} items/s' if rate else '',
                     f', about {eta:.0f} s left' if eta is not None else '')

    def _failure_text(self, cursor, size):
        return (f'{traceback.format_exc().rstrip()}\n\nThe batch after cursor {_short(cursor)} '
                f'failed {BATCH_RETRIES + 1} times (the last one with {size} items); every '
                f'batch before it is committed and the checkpoint is kept there: retry resumes '
                f'from it.\n')

    def _fail_on_base_exception(self, error):
        """SystemExit, KeyboardInterrupt, GeneratorExit from the evolution: its failure (the
        thread lives on); a Ctrl-C in a foreground run is raised once recorded."""
        outcome = self._fail(traceback.format_exc())
        if interrupts_foreground(error):
            raise error
        return outcome

    def _fail(self, error):
        self.error = self.runner.record_failure(self.heartbeat, self.evolution_id,
                                                self.attempts, error)
        self.audit(self.evolution_id, FAILED, f'attempt {self.attempt}, checkpoint kept',
                   self.error)
        log.error('evolution %r failed; its last batch was rolled back, its checkpoint kept:'
                  '\n%s', self.evolution_id, failure_text.loggable(self.error))
        return FAILED


class _BatchWork:
    """One batch's work, called by the backend inside the batch's transaction: fetch the next
    items, process them, and return the checkpoint to commit with them."""

    def __init__(self, run, walker, cursor, sizer, since, rate, total, totalled):
        self.run = run
        self.walker = walker
        self.cursor = cursor
        self.sizer = sizer
        self.since = since
        self.rate = rate
        self.total = total
        self.totalled = totalled  # a total is recorded already
        self.items = 0

    def __call__(self):
        size = self.sizer.size
        evolution = self.run.evolution
        if self.walker is not None:
            batch = self.walker.next_batch(self.cursor, size)
            if batch.items:
                ran_its_body(evolution, 'process_batch', batch.items)
            items, cursor, exhausted = len(batch.items), batch.cursor, not batch.items
        else:
            returned = ran_its_body(evolution, 'batch', self.cursor, size)
            exhausted = returned is None
            cursor = self.cursor if exhausted else check_user_cursor(self.run.evolution_id,
                                                                     returned)
            items = 0 if exhausted else size
        self.cursor = cursor
        self.items = items
        # From the previous batch's work to this one's: one whole cycle (the previous flush,
        # commit and throttle sleep included), known before this batch commits.  The size to
        # resume with is this batch's: the next one is chosen once this one has committed.
        self.finished = time.monotonic()
        total = self.total
        if exhausted and total is None and not self.totalled and self.walker is not None:
            total = self.run.done + items  # a walk that ended before it was counted
        return BatchCheckpoint(items, dump_cursor(cursor), exhausted, size,
                               smoothed_rate(self.rate, items, self.finished - self.since),
                               total)


class _Count:
    """A collection's count, in a read transaction of its own: taken in a thread of its own
    while batches run (``aside``), or at once in this one; the batch after it finished records
    it."""

    def __init__(self, backend, count, evolution_id, aside=True):
        self.value = self.exception = None
        self.finished = threading.Event()
        self._backend = backend
        self._count = count
        if aside:
            threading.Thread(target=self._run, name=f'tgext.evolve-count {evolution_id}',
                             daemon=True).start()
        else:
            self._run()

    def _run(self):
        try:
            self.value = self._backend.in_session(self._count)
        except Exception as e:
            self.exception = e
        finally:
            self.finished.set()


def _count_failure_text(error):
    text = ''.join(traceback.format_exception(error)).rstrip()
    return (f'{text}\n\ncount() failed; the batches committed before it stay, and a retry '
            f'resumes from the checkpoint.\n')


def _resume_note(record):
    if not record.progress_done:
        return ''
    return (f': resuming after {record.progress_done} items in {record.batches_done} batches'
            if record.checkpoint is not None else '')


def _short(value, limit=200):
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'
