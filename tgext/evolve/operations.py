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
import sys
import time
from typing import Optional

from . import logs
from .errors import ConfigurationError, LockWaitTimeout, OperationRefused
from .planning import fingerprints, plan as plan_steps, run_order
from .records import FAILED, MARKED, RUNNING, HistoryRecord, LockRecord
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


def _read(service):
    # Read-only verbs create nothing and upgrade nothing: on a new database they read an
    # empty history and no lock.
    return service.backend.read_history(), service.backend.read_lock()


def _plan(service, history):
    steps = plan_steps(service.evolutions, history,
                       fingerprints(service.evolutions, service.config))
    adopted = set(legacy_adoptions(service.evolutions, service.backend.read_legacy(), history))
    return [PlanItem(s.evolution_id, 'adopt', 'applied by tgext.evolve 0.0.5: recorded, not run')
            if s.evolution_id in adopted else PlanItem(s.evolution_id, 'run', s.reason)
            for s in steps]


def _running_now(record, lock):
    return (record is not None and record.state == RUNNING and lock is not None and lock.held
            and lock.owner == record.owner and lock.generation == record.generation)


def status(service):
    """Every registered evolution with its state, the lock, and history of unknown ids."""
    history, lock = _read(service)
    reasons = {item.evolution_id: item.reason for item in _plan(service, history)}
    evolutions = []
    for evolution in run_order(service.evolutions):
        evolution_id = evolution.evolution_id
        record = history.get(evolution_id)
        reason = reasons.get(evolution_id)
        running_now = _running_now(record, lock)
        if running_now:
            reason = f'running now, by {record.owner}'
        if record is None or (reason is not None and record.state not in (FAILED, RUNNING)):
            state = PENDING
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
        missing = [i for i in ids if i not in records]
        if missing:
            raise OperationRefused(
                f'history: nothing recorded for {", ".join(map(repr, missing))}')
        chosen = [records[i] for i in dict.fromkeys(ids)]
    else:
        chosen = sorted(records.values(),
                        key=lambda r: (r.started_at is None, r.started_at or 0, r.evolution_id))
    return [(record, record.evolution_id in registered) for record in chosen]


@dataclasses.dataclass(frozen=True)
class Plan:
    items: tuple  # PlanItem, in the order run would take them
    wait_for: Optional[LockRecord]  # the live lock run would first wait for, or None


def plan(service):
    """What :func:`run` would do now, in order, with the reason for each."""
    history, lock = _read(service)
    return Plan(tuple(_plan(service, history)), lock if lock is not None and lock.held else None)


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

    @property
    def ok(self):
        return self.phase == READY


def run(service, *, listener=None, on_wait=None, timeout=None):
    """Run the pending evolutions in this process, under the lock, like the thread does.

    ``listener`` (a :class:`~.runner.RunListener`) hears progress; ``on_wait(lock)`` is called
    on every poll while another process holds the lock; after ``timeout`` seconds of waiting
    :class:`LockWaitTimeout` is raised.  Unlike the thread, a database error is raised at once
    and a failed evolution ends the run with :class:`~.errors.EvolutionFailed` (with
    ``on_failure = block`` the thread would wait).  A ``depends_on`` naming an evolution neither
    registered nor done raises :class:`~.errors.ConfigurationError` before anything runs.
    """
    plan(service)  # raises the ConfigurationError the runner would only log
    runner = Runner(service.backend, service.evolutions, service.settings,
                    config=service.config, state=service.state, listener=listener)

    def attempt():
        outcome = runner.step()
        while outcome == AGAIN:  # the lock was just released: look again at once
            outcome = runner.step()
        if outcome == DONE or runner.state.phase in (BLOCKED, MISCONFIGURED):
            return outcome
        return None

    _while_another_holds_the_lock(service, attempt, on_wait, timeout)
    if runner.failure is not None:
        raise runner.failure
    return RunResult(tuple(runner.applied), runner.state.phase)


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


def _refuse_unknown(service, ids, force, verb):
    registered = {e.evolution_id for e in service.evolutions}
    unknown = [i for i in ids if i not in registered]
    if unknown and not force:
        raise OperationRefused(
            f'{verb}: no registered evolution has the id {", ".join(map(repr, unknown))}; '
            f'check the spelling, or use --force to {verb} it anyway')


@dataclasses.dataclass(frozen=True)
class WriteResult:
    changed: tuple  # ids whose history this call changed
    unchanged: tuple  # ids it left alone (already marked/applied, or nothing to forget)


def mark(service, ids, *, force=False, on_wait=None, timeout=None):
    """Record evolutions as applied without running them (a baseline).

    Ids already recorded as done keep their record.  Unregistered ids are refused unless
    ``force`` (recording an evolution that a later release will register).
    """
    ids = tuple(dict.fromkeys(ids))
    _refuse_unknown(service, ids, force, 'mark')
    with _holding_lock(service, on_wait, timeout) as lease:
        history = service.backend.read_history()
        done = tuple(i for i in ids if i in history and history[i].done)
        service.backend.record_states(lease, ids, MARKED)
    marked = tuple(i for i in ids if i not in done)
    if marked:
        log.info('marked as applied by %s: %s', operator_identity(lease.owner),
                 ', '.join(marked))
    return WriteResult(marked, done)


def unmark(service, ids, *, force=False, on_wait=None, timeout=None):
    """Forget evolutions' history, so that the next run runs them again.

    Unregistered ids are refused unless ``force`` (cleaning up the history of a removed one).
    """
    ids = tuple(dict.fromkeys(ids))
    _refuse_unknown(service, ids, force, 'unmark')
    with _holding_lock(service, on_wait, timeout) as lease:
        history = service.backend.read_history()
        present = tuple(i for i in ids if i in history)
        if present:
            service.backend.delete_history(lease, present)
            log.info('history forgotten by %s: %s', operator_identity(lease.owner),
                     ', '.join(present))
    return WriteResult(present, tuple(i for i in ids if i not in present))


def _refuse_not_failed(ids, history):
    not_failed = [f'{i!r} ({history[i].state if i in history else "no history"})'
                  for i in ids if i not in history or history[i].state != FAILED]
    if not_failed:
        raise OperationRefused(f'retry: not failed: {", ".join(not_failed)}; retry only '
                               f'clears a failed state (see unmark to run an evolution again)')


def retry(service, ids, *, operator=None, on_wait=None, timeout=None):
    """Clear the failed state of evolutions, so that the next run (or a waiting process,
    within one poll interval) runs them again.  Returns the failed records cleared.

    ``operator`` names who asked, for the audit line (the status page passes the user TG
    identified); by default the OS user running this process."""
    ids = tuple(dict.fromkeys(ids))
    _refuse_unknown(service, ids, False, 'retry')
    _refuse_not_failed(ids, service.backend.read_history())  # before waiting for the lock
    with _holding_lock(service, on_wait, timeout) as lease:
        history = service.backend.read_history()
        _refuse_not_failed(ids, history)
        service.backend.delete_history(lease, ids)
    log.info('failed state cleared by %s, to be retried: %s',
             operator_identity(lease.owner, operator), ', '.join(ids))
    return tuple(history[i] for i in ids)


# --- the lock ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReleaseResult:
    action: str  # 'free' (nothing to do), 'released' (its lease had expired), 'broken'
    lock: Optional[LockRecord]  # the lock as it was before
    broken_by: Optional[str] = None


def operator_identity(owner, user=None):
    """Who is running this command, for the audit trail: the owner string plus ``user``, by
    default the OS user."""
    if user is None:
        try:
            user = getpass.getuser()
        except Exception:  # no login name in some containers
            user = f'uid {os.getuid()}' if hasattr(os, 'getuid') else 'unknown'
    return f'{owner} (user {user})'


def release_lock(service, *, force=False):
    """Release a lock whose holder is gone.

    A lock whose lease is still valid is refused unless ``force``: its holder is alive and
    renewing it.  An expired one is taken and released in one compare-and-set, so that a
    holder renewing at that very moment cannot lose it.  ``force`` breaks the lock whatever
    its state and records who broke it; the holder's next fenced write then fails.  Only the
    lock record is touched, which every storage version has: nothing is created or upgraded.
    """
    backend = service.backend
    lock = backend.read_lock()
    if lock is None or lock.owner is None:
        return ReleaseResult('free', lock)
    if force:
        broken_by = operator_identity(make_owner())
        broken = backend.break_lock(broken_by) or lock
        log.warning('lock of %s (generation %d) broken by %s', broken.owner, broken.generation,
                    broken_by)
        return ReleaseResult('broken', broken, broken_by)
    if lock.held:
        raise OperationRefused(
            f'release-lock: the lock is held by {lock.owner} (generation {lock.generation}) and '
            f'its lease is valid for another {lock.expires_in:.1f} s: that process is alive and '
            f'renewing it.  Wait for it, or use --force if you know it is gone for good')
    lease = backend.acquire(make_owner(), service.settings.lease)
    if lease is None:
        taken = backend.read_lock()
        raise OperationRefused(f'release-lock: {taken.owner if taken else "another process"} '
                               f'took the lock over meanwhile')
    backend.release(lease)
    log.info('lock left by %s (generation %d, lease expired) released by %s', lock.owner,
             lock.generation, lease.owner)
    return ReleaseResult('released', lock)
