"""What runs, and in which order: the one plan shared by the runner, the plugin and the CLI.

The run order is a topological order of ``depends_on`` (standard library ``graphlib``), ties
broken by registration order, so that an application without dependencies runs its evolutions
exactly in the order it registered them.

A dependency may name an evolution that is no longer registered (a pluggable app dropped it, a
release removed old evolutions): it is satisfied when the history records it applied, adopted or
marked.  The history is only known once the database has been read, so such a dependency is
checked by :func:`plan`, not at start-up; cycles are checked at start-up by :func:`run_order`.
"""
import graphlib
import heapq
from typing import NamedTuple, Optional

from .errors import ConfigurationError
from .records import FAILED, MAX_ID_LENGTH, PAUSED, RESUME, RETRY, RUNNING, HistoryRecord


class PlannedStep(NamedTuple):
    """One evolution the plan would run, and why."""
    evolution: object
    reason: str
    record: Optional[HistoryRecord] = None
    #: False for a background evolution: the gate opens without waiting for it.
    blocking: bool = True

    @property
    def evolution_id(self):
        return self.evolution.evolution_id


def run_order(evolutions):
    """``evolutions`` (in registration order) in the order they must run.

    Every evolution comes after the registered evolutions it ``depends_on``; whenever several
    are ready to run, the earliest registered runs first.  A cycle is a
    :class:`ConfigurationError` naming its path.
    Dependencies on ids that are not registered do not constrain the order (see :func:`plan`).
    """
    evolutions = list(evolutions)
    position = {evolution.evolution_id: index for index, evolution in enumerate(evolutions)}
    sorter = graphlib.TopologicalSorter()
    for evolution in evolutions:
        sorter.add(evolution.evolution_id,
                   *(d for d in evolution.depends_on if d in position))
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        # graphlib lists each node before the one that depends on it; reversed, each id
        # depends on the next, as the user wrote it.
        path = ' -> '.join(repr(i) for i in reversed(e.args[1]))
        raise ConfigurationError(
            f'depends_on forms a cycle: {path} (each depends on the next)') from None
    # Kahn's algorithm taking the earliest-registered ready evolution first.
    ready = []
    ordered = []
    while len(ordered) < len(evolutions):
        for evolution_id in sorter.get_ready():
            heapq.heappush(ready, position[evolution_id])
        evolution = evolutions[heapq.heappop(ready)]
        ordered.append(evolution)
        sorter.done(evolution.evolution_id)
    return ordered


def fingerprints(evolutions, config):
    """``{evolution_id: fingerprint}`` of the repeatable evolutions (None for the others).

    ``config`` (the application's) is set on each evolution first: ``fingerprint()`` may need
    it, as ``evolve()`` does.  A fingerprint must be None or a string of at most 128
    characters (the history column).
    """
    result = {}
    for evolution in evolutions:
        evolution.config = config
        fingerprint = evolution.fingerprint()
        if fingerprint is not None and (not isinstance(fingerprint, str)
                                        or len(fingerprint) > MAX_ID_LENGTH):
            raise ConfigurationError(
                f'evolution {evolution.evolution_id!r}: fingerprint() must return None or a '
                f'string of at most {MAX_ID_LENGTH} characters, not {fingerprint!r}')
        result[evolution.evolution_id] = fingerprint
    return result


def _unsatisfied_dependencies(evolutions, history, pending_ids):
    """``(evolution_id, missing_id)`` for each dependency of a pending evolution that is
    neither registered nor recorded as done in ``history``."""
    registered = {evolution.evolution_id for evolution in evolutions}
    missing = []
    for evolution in evolutions:
        if evolution.evolution_id not in pending_ids:
            continue
        for dependency in evolution.depends_on:
            record = history.get(dependency)
            if dependency not in registered and (record is None or not record.done):
                missing.append((evolution.evolution_id, dependency))
    return missing


def _resumes(record):
    if record.checkpoint is None:
        return ''
    return f'; resumes from its checkpoint ({record.progress_done or 0} items done)'


def _blocking_ids(steps):
    """Ids of the pending steps the gate waits for: every evolution that is not
    ``background``, and every pending evolution one of them depends on (transitively)."""
    pending = {step.evolution_id: step.evolution for step in steps}
    blocking = {i for i, evolution in pending.items() if not evolution.background}
    frontier = list(blocking)
    while frontier:
        for dependency in pending[frontier.pop()].depends_on:
            if dependency in pending and dependency not in blocking:
                blocking.add(dependency)
                frontier.append(dependency)
    return blocking


def _blocking_first(steps):
    """The blocking steps, then the background ones, each group in run order.

    Still a valid run order: a blocking step depends only on blocking pending steps (a
    background one it depends on became blocking), and background steps come after anything.
    """
    blocking = _blocking_ids(steps)
    return ([step for step in steps if step.evolution_id in blocking]
            + [step._replace(blocking=False) for step in steps
               if step.evolution_id not in blocking])


def plan(evolutions, history, fingerprints=None):
    """The evolutions that still have to run, in run order, each with the reason it runs.

    ``evolutions`` are in registration order.  Set-based: an evolution is pending unless
    history records it applied, adopted or marked, wherever it sits in the list.  A repeatable
    evolution (one with a fingerprint) is also pending when its recorded fingerprint differs.

    Raises :class:`ConfigurationError` when a pending evolution depends on an id that is
    neither registered nor done in ``history``, naming both: nothing may run before the
    deployment is fixed.
    """
    fingerprints = fingerprints or {}
    ordered = run_order(evolutions)
    steps = []
    for evolution in ordered:
        evolution_id = evolution.evolution_id
        record = history.get(evolution_id)
        fingerprint = fingerprints.get(evolution_id)
        if record is None:
            reason = 'never applied'
        elif record.done:
            if fingerprint is None or record.fingerprint == fingerprint:
                continue
            reason = f'fingerprint changed ({record.fingerprint} -> {fingerprint})'
        elif record.state == FAILED and record.requested == RETRY:
            reason = f'retried by {record.requested_by}{_resumes(record)}'
        elif record.state == FAILED:
            plural = 's' if record.attempts != 1 else ''
            reason = f'failed before ({record.attempts} attempt{plural})'
        elif record.state == RUNNING:
            reason = f'interrupted while {record.owner} ran it{_resumes(record)}'
        elif record.state == PAUSED:
            reason = (f'resumed by {record.requested_by}{_resumes(record)}'
                      if record.requested == RESUME else f'paused{_resumes(record)}')
        else:
            reason = f'recorded as {record.state!r}'
        steps.append(PlannedStep(evolution, reason, record))
    steps = _blocking_first(steps)
    missing = _unsatisfied_dependencies(ordered, history, {step.evolution_id for step in steps})
    if missing:
        raise ConfigurationError('; '.join(
            f'evolution {evolution_id!r} depends on {dependency!r}, which is neither registered '
            f'nor recorded as applied, adopted or marked' for evolution_id, dependency in missing)
            + ': register it or correct depends_on')
    return steps
