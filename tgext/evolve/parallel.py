"""Parallel batched evolutions: the key space cut into ranges, worked on by every process.

Two roles, both backend-agnostic:

:class:`ParallelRun`
    the lock holder's run of a ``parallel = True`` evolution (the *coordinator*): it records the
    evolution running, cuts the collection's key space into ranges (``Walker.split``) and
    records them, fenced by its lease, then watches them: it writes the summed progress and
    rate into the history, and records the evolution ``applied`` once every range is done, or
    ``failed`` once a range failed.  It does no batch itself: its process's
    :class:`RangeClaimer` does, as every other process's does.
:class:`RangeClaimer`
    one thread per process that has a parallel evolution pending (waiting on 503 for a blocking
    one, or serving while a background one runs): it claims ranges under a lease of their own
    and runs their batches, each committed with the range's checkpoint and the fencing check
    on the claim (``Backend.run_range_batch``).  A claim whose lease expired (its claimer died
    or stalled) is claimed again and resumed from its checkpoint; the stale claimer's next
    batch is rolled back.  With ``max_workers``, a process works only while it holds one of
    that many *slots*: leases on lock records named after the evolution.
"""
import hashlib
import math
import random
import threading
import time
import traceback

from . import logs
from .batching import (BATCH_RETRIES, DONE, FAILED, LOST, STOPPED, STOPPED_PAUSED,
                       BatchedRun, BatchSizer, dump_cursor, load_cursor,
                       smoothed_rate, _short)
from .backends.base import BatchCheckpoint
from .errors import ClaimLost, ConfigurationError, LeaseLost
from .records import MAX_ID_LENGTH, PAUSE, RANGE_DONE, RANGE_FAILED, RUNNING

log = logs.runner

#: Bounds of the number of ranges a key space is cut into.
MAX_RANGES = 256
#: Ranges when the total is unknown.
DEFAULT_RANGES = 64
#: A range holds about this many batches, so that a slow claimer's range is not the last one
#: everybody waits for, and claims stay a small cost beside the batches.
BATCHES_PER_RANGE = 4
#: The coordinator looks at the ranges (and writes the summed progress) at most this often.
WATCH_INTERVAL = 1.0
#: Per-claimer progress is logged at most this often.
PROGRESS_LOG_INTERVAL = 5.0


def range_count(total, batch_size):
    """How many ranges to cut ``total`` items into: about :data:`BATCHES_PER_RANGE` batches
    of the class's ``batch_size`` each, within ``[1, MAX_RANGES]``."""
    if total is None:
        return DEFAULT_RANGES
    return max(1, min(MAX_RANGES, math.ceil(total / batch_size / BATCHES_PER_RANGE)))


def slot_name(evolution_id, slot):
    """The lock record of one of an evolution's ``max_workers`` slots."""
    name = f'{evolution_id}#slot{slot}'
    if len(name) <= MAX_ID_LENGTH:
        return name
    digest = hashlib.sha256(evolution_id.encode()).hexdigest()[:32]
    return f'{evolution_id[:MAX_ID_LENGTH - 48]}~{digest}#slot{slot}'


def check_splittable(backend, evolution):
    """Refuse, before any work, a parallel evolution whose collection cannot be cut into
    ranges (a composite key; on Ming an ``_id`` that is neither ObjectId nor integer):
    ConfigurationError saying why, naming the evolution."""
    walker = backend.walker(evolution.evolution_id, evolution.collection())
    backend.in_session(lambda: walker.split(1))


# --- the coordinator -------------------------------------------------------------------------------

class ParallelRun(BatchedRun):
    """The lock holder's attempt at a parallel evolution: cut, record, watch, conclude.

    Returns the same outcomes as :class:`~.batching.BatchedRun`.
    """

    count_aside = False  # the ranges are cut from the total

    def _started(self, walker, total, record):
        try:
            ranges = self._prepare(walker, total)
        except ConfigurationError:
            return self._fail(traceback.format_exc())
        except LeaseLost:
            self.heartbeat.lost.set()
            return LOST
        left = sum(1 for r in ranges if r.state != RANGE_DONE)
        log.info('evolving %r in parallel: %d ranges, %d left (%s, attempt %d)',
                 self.evolution_id, len(ranges), left, self.step.reason, record.attempts)
        return self._watch(total)

    def _prepare(self, walker, total):
        """The ranges to work on: those recorded (a resumed or retried evolution), else the
        key space cut anew (the first run, or a done evolution run again)."""
        existing = self.backend.read_ranges(self.evolution_id)
        previous = self.step.record
        rerun = all(r.state == RANGE_DONE for r in existing) and (
            previous is None or previous.done)
        if existing and not rerun:
            return self.backend.prepare_ranges(self.heartbeat.lease, self.evolution_id, None)
        n = range_count(total, self.evolution.batch_size)
        cuts = self.backend.in_session(lambda: walker.split(n))
        return self.backend.prepare_ranges(
            self.heartbeat.lease, self.evolution_id,
            [(dump_cursor(cut.after), dump_cursor(cut.upto)) for cut in cuts])

    def _watch(self, total):
        rate = None
        seen_done, seen_at = None, time.monotonic()
        while True:
            if self.heartbeat.lost.is_set():
                return LOST
            if self.stopping.is_set():
                return STOPPED
            try:
                ranges = self.backend.read_ranges(self.evolution_id)
            except Exception as e:
                if not self.backend.is_busy(e):
                    raise
                # SQLite's one writer is busy with the claimers' batches: look again later,
                # instead of giving the lock up and starting another attempt.
                self.stopping.wait(min(WATCH_INTERVAL, self.settings.poll_interval))
                continue
            done = sum(r.items_done for r in ranges)
            batches = sum(r.batches_done for r in ranges)
            self.done, self.batches = done, batches  # for the audit trail
            now = time.monotonic()
            if seen_done is not None:
                rate = smoothed_rate(rate, done - seen_done, now - seen_at)
            seen_done, seen_at = done, now
            failed = [r for r in ranges if r.state == RANGE_FAILED]
            try:
                self.backend.record_parallel_progress(self.heartbeat.lease, self.evolution_id,
                                                      done, batches, rate)
                self.heartbeat.note_renewed()
                self._report(done, total, rate)
                # A failed range ends the evolution once nothing else is left to do: every
                # other range's work is then committed, and a retry redoes none of it.
                if failed and all(r.state in (RANGE_DONE, RANGE_FAILED) for r in ranges):
                    return self._fail(self._range_failure(failed[0], len(failed)))
                if all(r.state == RANGE_DONE for r in ranges):
                    record = self.backend.apply(self.heartbeat.lease, self.evolution_id,
                                                lambda: None, self.fingerprint)
                    log.info('applied %r: %d items in %d batches over %d ranges, %.0f ms',
                             self.evolution_id, done, batches, len(ranges),
                             record.duration_ms or 0)
                    return DONE
                if self._pause_requested():
                    self.backend.record_paused(self.heartbeat.lease, self.evolution_id)
                    log.info('paused %r (%d items done; every range keeps its checkpoint)',
                             self.evolution_id, done)
                    return STOPPED_PAUSED
            except LeaseLost:
                self.heartbeat.lost.set()
                return LOST
            except Exception as e:
                if not self.backend.is_busy(e):
                    raise
            self.stopping.wait(min(WATCH_INTERVAL, self.settings.poll_interval))

    def _pause_requested(self):
        record = self.backend.read_history(errors=False, batches=True).get(self.evolution_id)
        return record is not None and record.requested == PAUSE

    def _range_failure(self, failed, count):
        return (f'{(failed.error or "").rstrip()}\n\nRange {failed.range_no} of '
                f'{self.evolution_id!r} (keys after {failed.after_key or "the start"} up to '
                f'{failed.upto_key or "the end"}) failed ({count} of the ranges failed); '
                f'every batch committed before it, in every range, is kept, and retry resumes '
                f'only what is left.\n')


def _running(record):
    return record is not None and record.state == RUNNING and record.requested != PAUSE


# --- claimers --------------------------------------------------------------------------------------

class RangeClaimer:
    """This process's worker for parallel evolutions: claims ranges and runs their batches in
    a thread of its own, for as long as one of them is pending and the runner runs."""

    def __init__(self, runner):
        self.backend = runner.backend
        self.settings = runner.settings
        self.config = runner.config
        self.owner = runner.owner
        self.stopping = runner.stopping
        self._pending = {}  # evolution id -> (evolution, blocking), in run order
        self._checked = set()
        self._thread = None
        self._guard = threading.Lock()
        self._slot = None
        self._slot_renewed = 0.0
        self._last_note = None
        self._looked_at = {}  # evolution id -> when its history was last read
        #: Ranges this process finished, per evolution id (what the tests and bench read).
        self.ranges_done = {}

    # --- the runner's side -----------------------------------------------------------------

    def want(self, steps):
        """The runner's plan has these parallel steps pending: check them once, and work on
        them (in the claimer's thread) until they are done."""
        for step in steps:
            evolution = step.evolution
            if step.evolution_id not in self._checked:
                evolution.config = self.config
                check_splittable(self.backend, evolution)
                self._checked.add(step.evolution_id)
            with self._guard:
                self._pending[step.evolution_id] = (evolution, step.blocking)
        with self._guard:
            if self._pending and self._thread is None:
                self._thread = threading.Thread(target=self._run, name='tgext.evolve-ranges',
                                                daemon=True)
                self._thread.start()

    @property
    def alive(self):
        thread = self._thread
        return thread is not None and thread.is_alive()

    def join(self, timeout=None):
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # --- the thread ------------------------------------------------------------------------

    def _run(self):
        try:
            self._claim_until_done()
        finally:
            with self._guard:
                self._thread = None  # under the guard: want() starts another one if needed

    def _claim_until_done(self):
        while not self.stopping.is_set():
            try:
                worked = self._round()
            except Exception as e:
                # The database went away (or SQLite stayed busy): claims expire by themselves,
                # and the next round claims again.
                if self.backend.is_busy(e):
                    log.debug('parallel work: database busy (%s), claiming again later', e)
                else:
                    self._note(('trouble', type(e).__name__), 'parallel work paused: %s: %s',
                               type(e).__name__, _short(str(e)))
                worked = False
            with self._guard:
                if not self._pending:
                    return
            if not worked:
                self.stopping.wait(self.settings.poll_interval * random.uniform(0.85, 1.0))

    def _note(self, key, message, *args):
        if key != self._last_note:
            self._last_note = key
            log.warning(message, *args)

    def _round(self):
        history = self.backend.read_history(errors=False, batches=True)
        looked_at = time.monotonic()
        worked = False
        with self._guard:
            pending = list(self._pending.items())
        for evolution_id, (evolution, blocking) in pending:
            record = history.get(evolution_id)
            if record is not None and record.done:
                with self._guard:
                    self._pending.pop(evolution_id, None)
                continue
            if not _running(record):
                continue  # not started, paused (or about to be) or failed: its coordinator decides
            self._looked_at[evolution_id] = looked_at
            worked = self._work_on(evolution, blocking) or worked
            if self.stopping.is_set():
                break
        self._last_note = None
        return worked

    def _work_on(self, evolution, blocking):
        """Claim and run ranges of ``evolution`` until none is left; True if any was run."""
        evolution_id = evolution.evolution_id
        if evolution.max_workers and not self._take_slot(evolution):
            return False
        try:
            walker = None
            worked = False
            while not self.stopping.is_set() and self.still_running(evolution_id):
                claim = self.backend.claim_range(evolution_id, self.owner, self.settings.lease)
                if claim is None:
                    return worked
                worked = True
                if walker is None:
                    walker = self.backend.walker(evolution_id, evolution.collection())
                outcome = _RangeRun(self, evolution, walker, claim, blocking).run()
                if outcome == DONE:
                    self.ranges_done[evolution_id] = self.ranges_done.get(evolution_id, 0) + 1
                elif outcome != LOST:
                    return worked  # stopped, failed or no longer running: look again later
            return worked
        finally:
            self._release_slot()

    def still_running(self, evolution_id):
        """At most once per poll interval, whatever the ranges' sizes: the evolution is still
        running and not asked to pause (every claimer stops within a poll interval of an
        operator's request, not of the coordinator's seeing it)."""
        now = time.monotonic()
        if now - self._looked_at.get(evolution_id, 0.0) < self.settings.poll_interval:
            return True
        self._looked_at[evolution_id] = now
        return _running(self.backend.read_history(errors=False, batches=True).get(evolution_id))

    # --- max_workers -----------------------------------------------------------------------

    def _take_slot(self, evolution):
        slots = list(range(evolution.max_workers))
        random.shuffle(slots)
        for slot in slots:
            lease = self.backend.acquire(self.owner, self.settings.lease,
                                         slot_name(evolution.evolution_id, slot))
            if lease is not None:
                self._slot, self._slot_renewed = lease, time.monotonic()
                log.debug('%s holds worker slot %d of %r', self.owner, slot,
                          evolution.evolution_id)
                return True
        return False

    def slot_held(self):
        """Renew this process's slot when due; False once it was lost (its lease expired
        while this process stalled, and another took it)."""
        if self._slot is None:
            return True
        if time.monotonic() - self._slot_renewed < self.settings.heartbeat_interval:
            return True
        try:
            self._slot = self.backend.renew(self._slot)
        except LeaseLost:
            self._slot = None
            return False
        self._slot_renewed = time.monotonic()
        return True

    def _release_slot(self):
        if self._slot is not None:
            slot, self._slot = self._slot, None
            try:
                self.backend.release(slot)
            except Exception as e:  # it expires by itself
                log.debug('could not release worker slot %s: %s', slot.name, e)


class _RangeRun:
    """One claimed range, batch after batch, until it is done, failed, lost or given back."""

    def __init__(self, claimer, evolution, walker, claim, blocking):
        self.claimer = claimer
        self.backend = claimer.backend
        self.settings = claimer.settings
        self.stopping = claimer.stopping
        self.evolution = evolution
        self.evolution_id = evolution.evolution_id
        self.walker = walker
        self.claim = claim
        self.throttle = 0.0 if blocking else self.settings.throttle
        self.upper = load_cursor(claim.upto_key)
        self.cursor = load_cursor(claim.checkpoint if claim.checkpoint is not None
                                  else claim.after_key)
        self._logged_at = time.monotonic()

    def run(self):
        claim = self.claim
        # One line per range would flood the log of a cluster working through 256 of them:
        # only a resumed range (a takeover, a range given back) is news.
        if claim.checkpoint is None:
            log.debug('%s claimed range %d of %r', claim.owner, claim.range_no,
                      self.evolution_id)
        else:
            log.info('%s claimed range %d of %r, resuming from its checkpoint (claim %d)',
                     claim.owner, claim.range_no, self.evolution_id, claim.claim_generation)
        sizer = BatchSizer(claim.batch_size or self.evolution.batch_size,
                           self.settings.batch_seconds, self.evolution.max_batch_size)
        failures = 0
        items = 0
        while True:
            if self.stopping.is_set() or not self._still_wanted():
                self.backend.release_range(claim)
                log.info('%s gave range %d of %r back at a batch boundary', claim.owner,
                         claim.range_no, self.evolution_id)
                return STOPPED
            saved = sizer.state()
            started = time.monotonic()
            work = _RangeWork(self, sizer)
            try:
                self.backend.run_range_batch(claim, work)
            except ClaimLost:
                log.warning('%s lost its claim on range %d of %r (its lease expired and another '
                            'process took it over): its batch was rolled back%s', claim.owner,
                            claim.range_no, self.evolution_id, '' if self.backend.atomic_apply
                            else ' (its flushed writes stay: at least once)')
                return LOST
            except ConfigurationError:
                return self._fail(traceback.format_exc())
            except Exception as e:
                if self.backend.is_transient(e) or self.backend.is_busy(e):
                    # The database, not the batch: give the range back if the database lets
                    # us (else the claim expires), and claim again at the next poll.
                    try:
                        self.backend.release_range(claim)
                    except Exception:
                        pass
                    raise
                sizer.restore(saved)
                failures += 1
                if failures > BATCH_RETRIES:
                    return self._fail(self._failure_text(sizer.size))
                log.warning('batch of range %d of %r after cursor %s failed (%s: %s): rolled '
                            'back, retrying with %d items', claim.range_no, self.evolution_id,
                            _short(self.cursor), type(e).__name__, _short(str(e)),
                            sizer.halve())
                continue
            failures = 0
            self.cursor = work.cursor
            items += work.items
            if work.exhausted:
                log.debug('%s finished range %d of %r (%d items)', claim.owner,
                          claim.range_no, self.evolution_id, items)
                return DONE
            self._log_progress(items)
            if self.throttle:
                self.stopping.wait(self.throttle * (time.monotonic() - started))

    def _still_wanted(self):
        """Between batches: the slot is still ours and the evolution still running (an
        operator's pause, the coordinator recording a failure)."""
        return self.claimer.slot_held() and self.claimer.still_running(self.evolution_id)

    def _log_progress(self, items):
        now = time.monotonic()
        if now - self._logged_at >= PROGRESS_LOG_INTERVAL:
            self._logged_at = now
            log.debug('%s: range %d of %r: %d items so far', self.claim.owner,
                     self.claim.range_no, self.evolution_id, items)

    def _failure_text(self, size):
        return (f'{traceback.format_exc().rstrip()}\n\nThe batch of range {self.claim.range_no} '
                f'after cursor {_short(self.cursor)} failed {BATCH_RETRIES + 1} times (the last '
                f'one with {size} items).\n')

    def _fail(self, error):
        self.backend.fail_range(self.claim, error)
        log.error('range %d of %r failed; its last batch was rolled back, its checkpoint '
                  'kept:\n%s', self.claim.range_no, self.evolution_id, error.rstrip())
        return FAILED


class _RangeWork:
    """One batch of a range, called by the backend inside the batch's transaction."""

    def __init__(self, run, sizer):
        self.run = run
        self.sizer = sizer
        self.cursor = run.cursor
        self.items = 0
        self.exhausted = False

    def __call__(self):
        started = time.monotonic()
        batch = self.run.walker.next_batch(self.run.cursor, self.sizer.size, self.run.upper)
        if batch.items:
            self.run.evolution.process_batch(batch.items)
        self.items, self.cursor, self.exhausted = len(batch.items), batch.cursor, not batch.items
        next_size = self.sizer.observe(self.items, time.monotonic() - started)
        return BatchCheckpoint(self.items, dump_cursor(self.cursor), self.exhausted, next_size,
                               None)

