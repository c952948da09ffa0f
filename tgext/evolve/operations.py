"""What ``gearbox evolve`` does: one plain function per verb, after Alembic's ``command.py``.

:func:`load_service` configures an application from its .ini without building it (so no
evolution thread starts); every other function takes the :class:`~.service.EvolveService` it
returns, works through the same backend and protocol as the thread, and returns data.  The
gearbox command (``commands.py``) parses arguments and prints; a deploy script may call these
functions directly.

Every write is fenced like the runner's: the lock is acquired first (waiting while another
process holds it), tgext.evolve's own storage is brought to this release's version under it,
the write checks the lease, the lock is released.  The reading verbs (status, history, plan)
create and upgrade nothing.
"""
import contextlib
import dataclasses
import getpass
import importlib
import os
import socket
import sys
import time
from typing import Optional

from . import logs
from .errors import ConfigurationError, LockWaitTimeout, OperationRefused
from .planning import fingerprints, missing_dependencies, plan as plan_steps, run_order
from .records import (BROKEN_BY_PREFIX, DONE_STATES, FAILED, MARKED, PAUSE, PAUSED, RESUME, RETRY,
                      RUNNING, HistoryRecord, LockRecord)
from .runner import AGAIN, DONE, Runner, legacy_adoptions, make_owner
from .service import SERVICE_KEY, service_for_config
from .state import BLOCKED, MISCONFIGURED, READY

log = logs.cli

#: The state ``status`` shows for an evolution that ``run`` would run.
PENDING = 'pending'


# --- loading the application -----------------------------------------------------------------

def load_service(config_file, app_name='main', relative_to=None):
    """Configure the application of ``config_file`` (section ``[app:<app_name>]``) and return
    its :class:`~.service.EvolveService`.

    Runs the application configurator's ``configure`` and ``setup`` like ``gearbox setup-app``
    (engine, model, tgext.evolve's settings and backend) but builds no WSGI application, so no
    evolution thread starts.  ``tgext.evolve.enabled`` is ignored: it switches off the web
    processes' thread and gate, never an operator's explicit command.
    """
    from paste.deploy import appconfig

    path = os.path.abspath(os.path.join(relative_to or os.getcwd(), config_file))
    if not os.path.isfile(path):
        raise ConfigurationError(f'configuration file {config_file!r} not found ({path})')
    try:
        conf = appconfig(f'config:{path}#{app_name}')
    except LookupError as e:
        raise ConfigurationError(f'{config_file}: {e}') from None
    configurator = _find_configurator(conf.context.object, config_file)
    app_conf = dict(conf.local_conf, **{'tgext.evolve.enabled': 'true'})
    tg_conf = configurator.configure(conf.global_conf, app_conf)
    configurator.setup(tg_conf)
    if SERVICE_KEY not in tg_conf:
        raise ConfigurationError(
            f'{config_file}: tgext.evolve is not plugged into this application (no '
            f'tgext.evolve.plugme() on its base_config)')
    return service_for_config(tg_conf)


def process_local_warning(service):
    """What to tell an operator whose application's database exists only inside each process
    (``mim://``, SQLite in memory), or None: every command then starts from an empty database
    of its own, so ``run`` "applies" what the next ``status`` shows pending."""
    if not service.backend.process_local:
        return None
    return ('warning: this application\'s database is in memory (mim:// or SQLite :memory:): '
            'this command has an empty one of its own, gone when it exits, which no web process '
            'and no other command ever sees')


def _find_configurator(factory, config_file):
    """The configurator behind the app factory: ``base_config`` of the factory's module, as
    in a quickstarted project, else of ``<package>.config.app_cfg``."""
    from tg.configurator.application import ApplicationConfigurator

    module_name = getattr(factory, '__module__', None) or ''
    places = [module_name, module_name.split('.')[0] + '.config.app_cfg']
    for place in places:
        module = sys.modules.get(place)
        if module is None:
            try:
                module = importlib.import_module(place)
            except ImportError:
                continue
        base_config = getattr(module, 'base_config', None)
        if isinstance(base_config, ApplicationConfigurator):
            return base_config
        legacy = getattr(base_config, '_configurator', None)  # AppConfig wraps a configurator
        if isinstance(legacy, ApplicationConfigurator):
            return legacy
    raise ConfigurationError(
        f'{config_file}: cannot find the application\'s base_config (looked for it in '
        f'{" and ".join(places)}); it is the configurator tgext.evolve.plugme() was given')


# --- reading -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvolutionStatus:
    """One evolution as ``status`` shows it."""
    evolution_id: str
    state: str  # PENDING, or the state history records
    reason: Optional[str]  # why ``run`` would run it; None when there is nothing to do
    record: Optional[HistoryRecord]
    running_now: bool = False  # recorded running by the current, live, lock holder


@dataclasses.dataclass(frozen=True)
class Status:
    evolutions: tuple  # EvolutionStatus of every registered evolution, in run order
    unregistered: tuple  # HistoryRecord of ids no registered evolution has
    lock: Optional[LockRecord]
    #: The key ranges of parallel evolutions (RangeRecord lists), by evolution id.
    ranges: dict = dataclasses.field(default_factory=dict)

    @property
    def settled(self):
        """Nothing pending, running or failed: what a deploy gate waits for."""
        return all(e.reason is None for e in self.evolutions)


@dataclasses.dataclass(frozen=True)
class PlanItem:
    evolution_id: str
    action: str  # 'run', or 'adopt' (applied by tgext.evolve 0.0.5: recorded, not run)
    reason: str


#: The storage version with operators' requests (pause, resume, retry) and the audit trail.
REQUESTS_VERSION = 3


def _has_requests(service):
    return service.backend.read_storage_version() >= REQUESTS_VERSION


def _read(service):
    # Read-only verbs create nothing and upgrade nothing: on a new database they read an
    # empty history and no lock.  The batch fields (checkpoints, requests) where they exist.
    history = service.backend.read_history(batches=_has_requests(service))
    return history, service.backend.read_lock()


def _plan(service, history, lock, *, check_dependencies=True):
    steps = plan_steps(service.evolutions, history,
                       fingerprints(service.evolutions, service.config),
                       check_dependencies=check_dependencies)
    adopted = set(legacy_adoptions(service.evolutions, service.backend.read_legacy(), history))
    return [PlanItem(s.evolution_id, 'adopt', 'applied by tgext.evolve 0.0.5: recorded, not run')
            if s.evolution_id in adopted else PlanItem(s.evolution_id, 'run', _reason(s, lock))
            for s in steps]


def _reason(step, lock):
    # A running record is "interrupted" only once its holder is gone: while the live holder
    # runs it, run waits for the lock and finds it applied (or resumes it).
    if _running_now(step.record, lock):
        return f'running now, by {step.record.owner}: run waits for it'
    return step.reason


def _running_now(record, lock):
    return (record is not None and record.state == RUNNING and lock is not None and lock.held
            and lock.owner == record.owner and lock.generation == record.generation)


def status(service):
    """Every registered evolution with its state, the lock, and history of unknown ids.

    A dependency neither registered nor done is shown in the reason of the evolution that has
    it, where :func:`plan` and :func:`run` raise :class:`~.errors.ConfigurationError`."""
    history, lock = _read(service)
    items = _plan(service, history, lock, check_dependencies=False)
    reasons = {item.evolution_id: item.reason for item in items}
    # Shown, not refused: run and plan refuse until the deployment is fixed.
    for evolution_id, dependency in missing_dependencies(service.evolutions, history, items):
        reasons[evolution_id] += (f'; depends on {dependency!r}, neither registered nor '
                                  f'recorded as applied: run refuses until that is fixed')
    evolutions = []
    for evolution in run_order(service.evolutions):
        evolution_id = evolution.evolution_id
        record = history.get(evolution_id)
        reason = reasons.get(evolution_id)
        running_now = _running_now(record, lock)
        if running_now:
            reason = f'running now, by {record.owner}'
            if record.requested == PAUSE:
                reason += (f'; pause asked by {record.requested_by}: it stops at its next batch '
                           f'boundary')
        if record is None or (reason is not None and record.state not in (FAILED, RUNNING,
                                                                          PAUSED)):
            state = PENDING
        elif record.state == FAILED and record.requested == RETRY:
            state = PENDING  # the next process to take the lock runs it again
        else:
            state = record.state
        evolutions.append(EvolutionStatus(evolution_id, state, reason, record, running_now))
    registered = {e.evolution_id for e in service.evolutions}
    unregistered = tuple(r for i, r in sorted(history.items()) if i not in registered)
    return Status(tuple(evolutions), unregistered, lock, _ranges(service))


def _ranges(service):
    """The ranges of every registered parallel evolution (an empty list before it is cut, or
    on storage without ranges), read only when there is one."""
    ranges = {e.evolution_id: [] for e in service.evolutions if getattr(e, 'parallel', False)}
    if ranges:
        for record in service.backend.read_ranges():
            ranges.setdefault(record.evolution_id, []).append(record)
    return ranges


def history(service, ids=()):
    """``(record, registered)`` for every history record, oldest first, ``registered`` saying
    whether a registered evolution still has its id.

    With ``ids``: the records of those ids, in that order; an id without a record is refused
    (:class:`~.errors.OperationRefused` naming it).
    """
    records, _ = _read(service)
    registered = {e.evolution_id for e in service.evolutions}
    if ids:
        audited = {entry.evolution_id for entry in audit(service)}
        missing = [i for i in ids if i not in records and i not in audited]
        if missing:
            raise OperationRefused(
                f'history: nothing recorded for {", ".join(map(repr, missing))}')
        # An id whose record unmark forgot has its audit trail still: shown without a state.
        chosen = [records.get(i) or HistoryRecord(i, 'forgotten') for i in dict.fromkeys(ids)]
    else:
        chosen = sorted(records.values(),
                        key=lambda r: (r.started_at is None, r.started_at or 0, r.evolution_id))
    return [(record, record.evolution_id in registered) for record in chosen]


def audit(service, evolution_id=None):
    """The audit trail (:class:`~.records.AuditEntry`), oldest first: every attempt (started,
    applied, failed with its traceback, paused, lost, stopped) and every operator's action
    (mark, unmark, retry, pause, resume, release-lock); of one evolution with
    ``evolution_id``.  Empty on storage older than the trail."""
    if not _has_requests(service):
        return []
    return service.backend.read_audit(evolution_id)


@dataclasses.dataclass(frozen=True)
class Plan:
    items: tuple  # PlanItem, in the order run would take them
    wait_for: Optional[LockRecord]  # the live lock run would first wait for, or None


def plan(service):
    """What :func:`run` would do now, in order, with the reason for each."""
    history, lock = _read(service)
    return Plan(tuple(_plan(service, history, lock)),
                lock if lock is not None and lock.held else None)


# --- running -------------------------------------------------------------------------------------

def _while_another_holds_the_lock(service, attempt, on_wait, timeout):
    """Call ``attempt()`` until it returns something else than None (None: another process
    holds the lock), and return that.

    Between attempts: ``on_wait(lock)`` hears who holds it, :class:`LockWaitTimeout` ends the
    wait after ``timeout`` seconds, and the next attempt comes after ``poll_interval``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        result = attempt()
        if result is not None:
            return result
        lock = service.backend.read_lock()
        if on_wait is not None:
            on_wait(lock)
        if deadline is not None and time.monotonic() >= deadline:
            holder = lock.owner if lock is not None else 'another process'
            raise LockWaitTimeout(f'gave up waiting for the lock held by {holder}')
        time.sleep(service.settings.poll_interval)


@dataclasses.dataclass(frozen=True)
class RunResult:
    applied: tuple  # ids applied by this run, in order
    phase: str  # the runner's final phase
    paused: Optional[str] = None  # the paused evolution the run stopped at

    @property
    def ok(self):
        return self.phase == READY and self.paused is None


def _check_dependencies(service):
    """Raise the ConfigurationError the runner would only log (a ``depends_on`` naming an id
    neither registered nor done), from one read of the history: a run pays for nothing else
    before its runner reads what it needs."""
    plan_steps(service.evolutions, service.backend.read_history(errors=False),
               fingerprints(service.evolutions, service.config))


def run(service, *, listener=None, on_wait=None, timeout=None):
    """Run the pending evolutions in this process, under the lock, like the thread does.

    ``listener`` (a :class:`~.runner.RunListener`) hears progress; ``on_wait(lock)`` is called
    on every poll while another process holds the lock; after ``timeout`` seconds of waiting
    :class:`LockWaitTimeout` is raised.  Unlike the thread, a database error is raised at once
    and a failed evolution ends the run with :class:`~.errors.EvolutionFailed` (with
    ``on_failure = block`` the thread would wait), and a paused evolution ends it too
    (``RunResult.paused``: the thread would wait for its resume).  A ``depends_on`` naming an evolution neither
    registered nor done raises :class:`~.errors.ConfigurationError` before anything runs.
    """
    _check_dependencies(service)
    runner = Runner(service.backend, service.evolutions, service.settings,
                    config=service.config, state=service.state, listener=listener)

    def attempt():
        outcome = runner.step()
        while outcome == AGAIN:  # the lock was just released: look again at once
            outcome = runner.step()
        if outcome == DONE or runner.state.phase in (BLOCKED, MISCONFIGURED):
            return outcome
        if runner.paused is not None:  # waits for an operator's resume: not for this run
            return outcome
        return None

    _while_another_holds_the_lock(service, attempt, on_wait, timeout)
    if runner.failure is not None:
        raise runner.failure
    return RunResult(tuple(runner.applied), runner.state.phase, runner.paused)


# --- fenced writes -------------------------------------------------------------------------------

def _acquire_current(backend, owner, lease_seconds):
    """The lease, on storage at this release's version; None while another process holds the
    lock (or a table the upgrade needs is in use: wait as for the lock)."""
    lease = backend.acquire(owner, lease_seconds)
    if lease is None:
        return None
    try:
        current = backend.upgrade_storage(lease)
    except BaseException:
        backend.release(lease)
        raise
    if not current:
        backend.release(lease)
        return None
    return lease


@contextlib.contextmanager
def _holding_lock(service, on_wait, timeout):
    """Acquire the lock (waiting while another process holds it), yield the lease, release."""
    backend = service.backend
    backend.ensure_storage()
    owner = make_owner()
    lease = _while_another_holds_the_lock(
        service, lambda: _acquire_current(backend, owner, service.settings.lease), on_wait,
        timeout)
    try:
        yield lease
    finally:
        backend.release(lease)


def _refuse_unknown(service, ids, force, verb, forceable=True):
    """Refuse ids no registered evolution has, unless ``force``; ``forceable=False`` for a
    verb that has no ``--force`` to suggest."""
    registered = {e.evolution_id for e in service.evolutions}
    unknown = [i for i in ids if i not in registered]
    if unknown and not force:
        way_out = f', or use --force to {verb} it anyway' if forceable else ''
        raise OperationRefused(
            f'{verb}: no registered evolution has the id {", ".join(map(repr, unknown))}; '
            f'check the spelling{way_out}')


@dataclasses.dataclass(frozen=True)
class WriteResult:
    changed: tuple  # ids whose history this call changed
    unchanged: tuple  # ids it left alone (already marked/applied, or nothing to forget)


def operator_name(user=None):
    """Who an operator is, for the audit trail: ``user`` (the status page passes the user
    TurboGears identified), by default the OS user running this process."""
    if user is not None:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return f'uid {os.getuid()}' if hasattr(os, 'getuid') else 'unknown'


def _audit(service, evolution_id, action, operator, detail=None, error=None):
    service.backend.record_audit(evolution_id, action, operator_name(operator),
                                 socket.gethostname(), detail, error)


def _record_text(record):
    """What a history record said, for the audit line of a verb that changes or forgets it."""
    text = f'was {record.state}, {record.attempts} attempt{"" if record.attempts == 1 else "s"}'
    if record.progress_done is not None:
        text += f', {record.progress_done} items done'
    if record.checkpoint is not None:
        text += f', checkpoint {record.checkpoint}'
    return text


def mark(service, ids, *, force=False, operator=None, on_wait=None, timeout=None):
    """Record evolutions as applied without running them (a baseline).

    Ids already recorded as done keep their record.  Unregistered ids are refused unless
    ``force`` (recording an evolution that a later release will register).  Each id marked
    is in the audit trail, with ``operator`` (by default the OS user).
    """
    ids = tuple(dict.fromkeys(ids))
    _refuse_unknown(service, ids, force, 'mark')
    with _holding_lock(service, on_wait, timeout) as lease:
        history = service.backend.read_history(batches=True)
        done = tuple(i for i in ids if i in history and history[i].done)
        service.backend.record_states(lease, ids, MARKED)
        marked = tuple(i for i in ids if i not in done)
        for evolution_id in marked:
            before = history.get(evolution_id)
            _audit(service, evolution_id, 'mark', operator,
                   'never run before' if before is None else _record_text(before),
                   None if before is None else before.error)
    if marked:
        log.info('marked as applied by %s: %s', operator_identity(lease.owner, operator),
                 ', '.join(marked))
    return WriteResult(marked, done)


def mark_all(service, *, operator=None, on_wait=None, timeout=None):
    """Record every registered evolution as applied without running it (``mark --all``): the
    baseline of a database built by this release's code.  Those already done keep their
    record."""
    return mark(service, [e.evolution_id for e in run_order(service.evolutions)],
                operator=operator, on_wait=on_wait, timeout=timeout)


def baseline(config, *, timeout=None):
    """Record every registered evolution as applied on a freshly created database; return the
    ids recorded (nothing, on a database whose history is not empty).

    For ``websetup`` (``gearbox setup-app``), right after creating the schema from the
    current model, as quickstart stamps Alembic's head: the data is already in the shape
    every evolution would give it.  ``config`` is the application's configuration
    (``tg.config`` in websetup).  A database that has any tgext.evolve history (or the 0.0.5
    state) is not fresh and is left alone, so running setup-app again never skips a pending
    evolution; nor does anything happen when tgext.evolve is disabled (test suites).
    """
    service = service_for_config(config)
    if service is None:
        if SERVICE_KEY not in config:
            raise ConfigurationError('tgext.evolve.baseline: tgext.evolve is not plugged into '
                                     'this application (no tgext.evolve.plugme())')
        return ()  # tgext.evolve.enabled = false
    backend = service.backend
    if backend.read_history(errors=False) or backend.read_legacy() is not None:
        log.info('baseline: the database has a history already: nothing recorded')
        return ()
    return mark_all(service, timeout=timeout).changed


def unmark(service, ids, *, force=False, operator=None, on_wait=None, timeout=None):
    """Forget evolutions' history records, so that the next run runs them again (from the
    start: a batched evolution's checkpoint goes too).

    What each record said (state, attempts, checkpoint, its traceback) stays in the audit
    trail, which ``history ID`` shows.  Unregistered ids are refused unless ``force``
    (cleaning up the history of a removed one).
    """
    ids = tuple(dict.fromkeys(ids))
    _refuse_unknown(service, ids, force, 'unmark')
    with _holding_lock(service, on_wait, timeout) as lease:
        history = service.backend.read_history(batches=True)
        present = tuple(i for i in ids if i in history)
        if present:
            for evolution_id in present:
                record = history[evolution_id]
                _audit(service, evolution_id, 'unmark', operator, _record_text(record),
                       record.error)
            service.backend.delete_history(lease, present)
            log.info('history forgotten by %s: %s', operator_identity(lease.owner, operator),
                     ', '.join(present))
    return WriteResult(present, tuple(i for i in ids if i not in present))


def _refuse_not_failed(ids, history):
    not_failed = [f'{i!r} ({history[i].state if i in history else "no history"})'
                  for i in ids if i not in history or history[i].state != FAILED]
    if not_failed:
        raise OperationRefused(f'retry: not failed: {", ".join(not_failed)}; retry only '
                               f'clears a failed state (see unmark to run an evolution again)')
    requested = [repr(i) for i in ids if history[i].requested == RETRY]
    if requested:
        raise OperationRefused(f'retry: already requested for {", ".join(requested)}: the '
                               f'next process to take the lock runs it again')


def retry(service, ids, *, operator=None, on_wait=None, timeout=None):
    """Ask for failed evolutions to run again: the next run (or a waiting process, within one
    poll interval) retries them, a batched one from its checkpoint.  Returns the failed
    records, as they were.

    The record stays (its attempts keep counting, its traceback is replaced by the next
    attempt's); the retry and each attempt are in the audit trail.  ``operator`` names who
    asked (the status page passes the user TG identified); by default the OS user running
    this process."""
    ids = tuple(dict.fromkeys(ids))
    _refuse_unknown(service, ids, False, 'retry', forceable=False)
    _refuse_not_failed(ids, service.backend.read_history(batches=_has_requests(service)))
    with _holding_lock(service, on_wait, timeout) as lease:
        history = service.backend.read_history(batches=True)
        _refuse_not_failed(ids, history)
        who = operator_name(operator)
        for evolution_id in ids:
            if service.backend.record_request(evolution_id, RETRY, who, FAILED) is None:
                raise OperationRefused(f'retry: {evolution_id!r} changed meanwhile; see '
                                       f'gearbox evolve status')
            _audit(service, evolution_id, 'retry', operator, _record_text(history[evolution_id]),
                   history[evolution_id].error)
    log.info('failed state cleared by %s, to be retried: %s',
             operator_identity(lease.owner, operator), ', '.join(ids))
    return tuple(history[i] for i in ids)


# --- pause and resume ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RequestResult:
    """What :func:`pause` or :func:`resume` did."""
    evolution_id: str
    outcome: str  # 'requested' (the process running it honours it), or 'paused' (at once)
    record: HistoryRecord  # as written
    blocking: bool  # the gate waits for it: paused, it keeps every process answering 503
    batched: bool


def _evolution(service, evolution_id, verb):
    for evolution in service.evolutions:
        if evolution.evolution_id == evolution_id:
            return evolution
    raise OperationRefused(f'{verb}: no registered evolution has the id {evolution_id!r}; '
                           f'check the spelling (gearbox evolve status lists them)')


#: How long pause and resume wait for the lock when tgext.evolve's storage must be upgraded
#: first (a new database, or one an older release wrote).
UPGRADE_LOCK_WAIT = 30.0


def _current(service, evolution_id, verb):
    """``(EvolutionStatus, blocking)`` of a registered evolution, on storage that has the
    operators' requests (upgraded under the lock first if it has not)."""
    if not _has_requests(service):
        try:
            with _holding_lock(service, None, UPGRADE_LOCK_WAIT):
                pass
        except LockWaitTimeout as e:
            raise OperationRefused(
                f'{verb}: tgext.evolve\'s storage must be upgraded first, by the holder of '
                f'the lock ({e}); try again') from None
    entry = {e.evolution_id: e for e in status(service).evolutions}[evolution_id]
    history, _ = _read(service)
    steps = plan_steps(service.evolutions, history,
                       fingerprints(service.evolutions, service.config))
    blocking = next((s.blocking for s in steps if s.evolution_id == evolution_id),
                    not _evolution(service, evolution_id, verb).background)
    return entry, blocking


def pause(service, evolution_id, *, operator=None):
    """Pause an evolution: a batched one stops at its next batch boundary, its checkpoint
    committed; one that has not started yet is paused before it starts.  A plain
    (non-batched) evolution that is running now cannot be paused: it runs in one transaction.

    No lock is needed (a compare-and-set on its history record): the process running the
    evolution honours the request.  A paused blocking evolution keeps the gate closed (every
    process answers 503) until :func:`resume`; a paused background one leaves the site
    serving.  Refused (:class:`~.errors.OperationRefused`, saying why) for an unknown id, an
    evolution that is applied (or marked, adopted), failed, already paused or being paused.
    """
    from .evolution import BatchEvolution
    evolution = _evolution(service, evolution_id, 'pause')
    entry, blocking = _current(service, evolution_id, 'pause')
    record, batched = entry.record, isinstance(evolution, BatchEvolution)
    if entry.state in DONE_STATES:
        raise OperationRefused(f'pause: {evolution_id} is {entry.state}: there is nothing '
                               f'left to pause')
    if entry.state == PAUSED:
        raise OperationRefused(f'pause: {evolution_id} is paused already (gearbox evolve '
                               f'resume {evolution_id} continues it)')
    if entry.state == FAILED:
        raise OperationRefused(f'pause: {evolution_id} failed and is not running: nothing '
                               f'to pause (gearbox evolve retry {evolution_id} runs it again)')
    if record is not None and record.requested == PAUSE:
        raise OperationRefused(f'pause: a pause of {evolution_id} was already asked for by '
                               f'{record.requested_by}; it stops at its next batch boundary')
    if entry.running_now and not batched:
        raise OperationRefused(
            f'pause: {evolution_id} is running now and is not a BatchEvolution: it runs in '
            f'one transaction and cannot stop half-way; wait for it to finish (or fail)')
    who = operator_name(operator)
    written = service.backend.record_request(evolution_id, PAUSE, who,
                                             None if record is None else record.state)
    if written is None:
        raise OperationRefused(f'pause: {evolution_id} changed meanwhile (it started or '
                               f'finished); nothing was changed, see gearbox evolve status')
    outcome = 'paused' if written.state == PAUSED else 'requested'
    _audit(service, evolution_id, 'pause', operator,
           'paused before it started' if outcome == 'paused' else
           f'asked while {written.state}{"" if record is None else ", " + _record_text(record)}')
    log.info('pause of %r %s by %s', evolution_id,
             'done' if outcome == 'paused' else 'requested', who)
    return RequestResult(evolution_id, outcome, written, blocking, batched)


def resume(service, evolution_id, *, operator=None):
    """Resume a paused evolution: whichever process holds the lock (or takes it, within one
    poll interval) continues it, a batched one from its checkpoint.  No lock is needed.
    Refused for an unknown id, or an evolution that is not paused (or whose resume is
    already asked for)."""
    from .evolution import BatchEvolution
    evolution = _evolution(service, evolution_id, 'resume')
    entry, blocking = _current(service, evolution_id, 'resume')
    record = entry.record
    if entry.state != PAUSED:
        pausing = record is not None and record.requested == PAUSE
        raise OperationRefused(
            f'resume: {evolution_id} is {entry.state}, not paused: nothing to resume'
            + (' (a pause is asked for: it pauses at its next batch boundary, then it can be '
               'resumed)' if pausing else ''))
    if record.requested == RESUME:
        raise OperationRefused(f'resume: {evolution_id} is being resumed already (asked by '
                               f'{record.requested_by})')
    who = operator_name(operator)
    written = service.backend.record_request(evolution_id, RESUME, who, PAUSED)
    if written is None:
        raise OperationRefused(f'resume: {evolution_id} changed meanwhile; nothing was changed, '
                               f'see gearbox evolve status')
    _audit(service, evolution_id, 'resume', operator, _record_text(record))
    log.info('resume of %r requested by %s', evolution_id, who)
    return RequestResult(evolution_id, 'requested', written, blocking,
                         isinstance(evolution, BatchEvolution))


# --- the lock ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReleaseResult:
    action: str  # 'free' (nothing to do), 'released' (its holder is gone), 'broken'
    lock: Optional[LockRecord]  # the lock as it was before
    broken_by: Optional[str] = None
    why: Optional[str] = None  # for 'released': how we know its holder is gone


def _gone_from_this_host(owner):
    """True when ``owner`` (``host:pid:token``) names this host and a PID no process has.

    A hostname shared by machines (or by containers with their own PID namespaces, e.g. with
    host networking) could make a live holder look gone: breaking its lock is still safe (its
    next fenced write fails and rolls back), only its work is wasted.
    """
    host, pid, _token = (owner.rsplit(':', 2) + ['', ''])[:3]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, under another user
        return False
    return False


def operator_identity(owner, user=None):
    """Who is running this command, for the audit trail: the owner string plus ``user``, by
    default the OS user."""
    if user is None:
        try:
            user = getpass.getuser()
        except Exception:  # no login name in some containers
            user = f'uid {os.getuid()}' if hasattr(os, 'getuid') else 'unknown'
    return f'{owner} (user {user})'


def release_lock(service, *, force=False, operator=None):
    """Release a lock whose holder is gone.

    A lock whose lease is still valid is refused unless its holder is a process of this host
    that no longer exists, or ``force``: otherwise its holder may be alive and renewing it.
    An expired one is taken and released in one compare-and-set, so that a holder renewing
    at that very moment cannot lose it.  ``force`` breaks the lock whatever its state and
    records who broke it (``released_by`` ``broken by <who>``); the holder's next fenced
    write then fails.  Only the lock record is touched, which every storage version has:
    nothing is created or upgraded.
    """
    backend = service.backend
    lock = backend.read_lock()
    if lock is None or lock.owner is None:
        return ReleaseResult('free', lock)
    if force:
        broken_by = operator_identity(make_owner())
        broken = backend.break_lock(BROKEN_BY_PREFIX + broken_by) or lock
        log.warning('lock of %s (generation %d) broken by %s', broken.owner, broken.generation,
                    broken_by)
        _audit_lock(service, operator, f'broke the lock held by {broken.owner} (generation '
                                       f'{broken.generation}, lease valid: {broken.held})')
        return ReleaseResult('broken', broken, broken_by)
    if lock.held and _gone_from_this_host(lock.owner):
        released_by = make_owner()
        if backend.break_lock(released_by, lock.name, generation=lock.generation) is None:
            raise OperationRefused(f'release-lock: the lock of {lock.owner} changed hands '
                                   f'meanwhile')
        pid = lock.owner.rsplit(':', 2)[1]
        log.info('lock left by %s (generation %d, process %s gone from this host) released by '
                 '%s', lock.owner, lock.generation, pid, released_by)
        _audit_lock(service, operator, f'released the lock left by {lock.owner} (generation '
                                       f'{lock.generation}, process {pid} gone from this host)')
        return ReleaseResult('released', lock, why=f'process {pid} is gone from this host')
    if lock.held:
        raise OperationRefused(
            f'release-lock: the lock is held by {lock.owner} (generation {lock.generation}) and '
            f'its lease is valid for another {lock.expires_in:.1f} s: that process may be alive '
            f'and renewing it (it is not a gone process of this host).  Wait for it, or use '
            f'--force if you know it is gone for good')
    lease = backend.acquire(make_owner(), service.settings.lease)
    if lease is None:
        taken = backend.read_lock()
        raise OperationRefused(f'release-lock: {taken.owner if taken else "another process"} '
                               f'took the lock over meanwhile')
    backend.release(lease)
    log.info('lock left by %s (generation %d, lease expired) released by %s', lock.owner,
             lock.generation, lease.owner)
    _audit_lock(service, operator, f'released the lock left by {lock.owner} (generation '
                                   f'{lock.generation}, lease expired)')
    return ReleaseResult('released', lock, why='lease expired')


def _audit_lock(service, operator, detail):
    # release-lock touches only the lock record, which every storage version has: on storage
    # older than the audit trail there is nowhere to write this (and nothing is created).
    if _has_requests(service):
        _audit(service, None, 'release-lock', operator, detail)
