"""The status document: what ``gearbox evolve status --json`` prints and the status page's
``status.json`` serves, built by one function so that both keep one schema.

Every entry, of a registered evolution or of an id only the history knows, has the same keys;
what is not known is ``null`` (an evolution that never ran has no start time, no owner, no
progress).  The schema is documented in README.rst ("The status document").
"""
import datetime

from .errors import exception_line
from .records import PAUSED, RANGE_DONE, RANGE_FAILED, RANGE_PENDING, RUNNING


def iso(timestamp):
    """Epoch seconds as an ISO 8601 UTC string with milliseconds, or None."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.isoformat(timespec='milliseconds')


def error_summary(error):
    """The exception line of a traceback: what ``status`` shows; ``history ID`` shows it all."""
    return exception_line(error)


def progress_document(done, total, rate=None, eta_seconds=None, batches=None, batch_size=None):
    """A progress report: ``percent`` is None when the total is unknown; ``rate`` (items per
    second) and ``eta_seconds`` are None until the runner measures them; ``batches`` (batches
    committed) and ``batch_size`` (the size of the next one) are None but for a batched
    evolution."""
    percent = round(min(100.0, 100.0 * done / total), 1) if total else None
    return {'done': done, 'total': total, 'percent': percent, 'rate': rate,
            'eta_seconds': eta_seconds, 'batches': batches, 'batch_size': batch_size}


def recorded_progress(record):
    """The progress a history record holds, or None; the ETA of a running or paused batched
    evolution comes from its recorded rate."""
    if record is None or record.progress_done is None:
        return None
    done, total, rate = record.progress_done, record.progress_total, record.rate
    eta = None
    if record.state in (RUNNING, PAUSED) and total is not None and rate:
        eta = round(max(0.0, (total - done) / rate), 1)
    return progress_document(done, total, None if rate is None else round(rate, 3), eta,
                             record.batches_done, record.batch_size)


def record_fields(record):
    """The fields of a history record (or of no record: nulls, and 0 attempts)."""
    if record is None:
        return {'attempts': 0, 'started_at': None, 'finished_at': None, 'duration_ms': None,
                'owner': None, 'generation': None, 'error': None, 'progress': None}
    return {
        'attempts': record.attempts,
        'started_at': iso(record.started_at), 'finished_at': iso(record.finished_at),
        'duration_ms': record.duration_ms, 'owner': record.owner,
        'generation': record.generation, 'error': error_summary(record.error),
        'progress': recorded_progress(record),
    }


def lock_document(lock):
    """The lock, or None when it was never taken."""
    if lock is None:
        return None
    return {
        'name': lock.name, 'owner': lock.owner, 'held': lock.held,
        'generation': lock.generation, 'acquired_at': iso(lock.acquired_at),
        'renewed_at': iso(lock.renewed_at), 'expires_at': iso(lock.expires_at),
        'expires_in': None if lock.expires_in is None else round(lock.expires_in, 3),
        'released_by': lock.released_by,
    }


def ranges_document(ranges):
    """A parallel evolution's key ranges: how many in each state, and who works on what now
    (the claims whose lease is valid)."""
    count = {state: sum(1 for r in ranges if r.state == state)
             for state in (RANGE_DONE, RANGE_FAILED, RANGE_PENDING)}
    return {
        'total': len(ranges), 'done': count[RANGE_DONE], 'failed': count[RANGE_FAILED],
        'pending': count[RANGE_PENDING],
        'working': [{'range': r.range_no, 'owner': r.owner, 'items_done': r.items_done,
                     'expires_in': round(r.expires_at - r.now, 3)}
                    for r in ranges if r.claimed],
    }


def ranges_text(document):
    """A :func:`ranges_document` in one line, as ``gearbox evolve status`` and the status page
    show it (the page's script has the same rule)."""
    working = ', '.join(f'{w["owner"]} (range {w["range"]}, {w["items_done"]} items)'
                        for w in document['working'])
    failed = f', {document["failed"]} failed' if document['failed'] else ''
    return (f'ranges: {document["done"]}/{document["total"]} done{failed}; '
            f'{"working: " + working if working else "nobody working now"}')


def _entry(evolution_id, registered, state, reason, running_now, record, ranges=None):
    return {'id': evolution_id, 'registered': registered, 'state': state, 'reason': reason,
            'running_now': running_now, **record_fields(record),
            'ranges': None if ranges is None else ranges_document(ranges)}


def _held_by_its_owner(record, lock):
    return (record.state == RUNNING and lock is not None and lock.held
            and lock.owner == record.owner and lock.generation == record.generation)


def status_document(status):
    """The JSON-ready document of an :class:`~tgext.evolve.operations.Status`.

    ``ok``: nothing pending, running or failed.  ``evolutions``: every registered evolution in
    run order.  ``unregistered``: history records of ids no registered evolution has.
    ``lock``: the lock, or None.  ``ranges``: None but for parallel evolutions.
    """
    ranges = getattr(status, 'ranges', {})
    return {
        'ok': status.settled,
        'evolutions': [_entry(e.evolution_id, True, e.state, e.reason, e.running_now, e.record,
                              ranges.get(e.evolution_id))
                       for e in status.evolutions],
        'unregistered': [_entry(r.evolution_id, False, r.state, None,
                                _held_by_its_owner(r, status.lock), r,
                                ranges.get(r.evolution_id))
                         for r in status.unregistered],
        'lock': lock_document(status.lock),
    }
