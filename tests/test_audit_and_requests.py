"""The backend contract for operators: the audit trail and the requests (pause, resume, retry).

Part of the contract (``backends/base.py``), on every database of the ``db`` harness: the audit
trail is append-only and read back in order, with texts every database can store; a request is
a compare-and-set on the state the operator saw, needing no lock; starting an attempt honours a
retry or resume request and keeps a pause request for the first batch boundary.
"""
import pytest

from tgext.evolve.backends.base import AUDIT_TEXT_LIMIT, AuditLine, BatchCheckpoint
from tgext.evolve.errors import LeaseLost
from tgext.evolve.records import APPLIED, FAILED, PAUSE, PAUSED, RESUME, RETRY, RUNNING

LONG = 60.0


@pytest.fixture
def backend(db):
    b = db.make_backend()
    b.ensure_storage()
    return b


@pytest.fixture
def lease(backend):
    return backend.acquire('owner-A', LONG)


def history(backend):
    return backend.read_history(batches=True)


# --- the audit trail ---------------------------------------------------------------------------

def test_audit_is_empty_before_its_store_exists_and_reading_creates_nothing(db):
    fresh = db.make_backend()
    assert fresh.read_audit() == []
    assert fresh.read_audit('evo-1') == []
    assert db.store_names() <= {'evo_side_effects'}


def test_audit_entries_are_appended_and_read_back_in_order(db, backend):
    before = backend.now()
    backend.record_audit('evo-1', 'started', 'host:1:aa', 'web-1', 'attempt 1: never applied')
    backend.record_audit('evo-2', 'pause', 'olivia via the status page', 'web-2')
    backend.record_audit('evo-1', 'failed', 'host:1:aa', 'web-1', 'attempt 1',
                         'Traceback (most recent call last):\n  ...\nValueError: bad row\n')
    backend.record_audit(None, 'release-lock', 'root', 'ops-1', 'released the lock')
    entries = backend.read_audit()
    assert [(e.evolution_id, e.action, e.actor, e.host) for e in entries] == [
        ('evo-1', 'started', 'host:1:aa', 'web-1'),
        ('evo-2', 'pause', 'olivia via the status page', 'web-2'),
        ('evo-1', 'failed', 'host:1:aa', 'web-1'),
        (None, 'release-lock', 'root', 'ops-1')]
    assert entries[0].detail == 'attempt 1: never applied' and entries[0].error is None
    assert entries[2].error.endswith('ValueError: bad row\n')
    assert all(before - 1 <= e.at <= backend.now() + 1 for e in entries)
    assert len({e.id for e in entries}) == 4
    assert [e.action for e in backend.read_audit('evo-1')] == ['started', 'failed']


def test_audit_stores_any_text_and_caps_long_tracebacks_keeping_head_and_tail(backend):
    nasty = 'NUL \x00, lone surrogate \udcff, ' + 'x' * 200_000 + ' the last line'
    backend.record_audit('evo-1', 'failed', 'owner', 'host', 'detail \x00', nasty)
    entry, = backend.read_audit('evo-1')
    assert len(entry.error) <= AUDIT_TEXT_LIMIT
    assert entry.error.startswith('NUL \\x00, lone surrogate \\udcff')
    assert entry.error.endswith(' the last line') and 'characters left out' in entry.error
    assert entry.detail == 'detail \\x00'


def test_an_attempt_s_audit_lines_are_written_with_the_history_they_describe(backend, lease):
    """The start of an attempt and the batch that ends it bring their audit line with them,
    given the record as written; a batch that does not commit (a lost lease) writes neither
    its checkpoint nor its line."""
    def line(record):
        if record.state == RUNNING and not record.batches_done:
            return AuditLine('started', 'owner-A', 'web-1', f'attempt {record.attempts}')
        if record.state == APPLIED:
            return AuditLine(APPLIED, 'owner-A', 'web-1', f'{record.progress_done} items')
        return None

    backend.record_batches_running(lease, 'evo-1', 10, 20, audit=line)
    backend.run_batch(lease, 'evo-1', lambda: BatchCheckpoint(10, '10', False, 10, 5.0),
                      audit=line)
    assert [(e.action, e.detail) for e in backend.read_audit('evo-1')] == [
        ('started', 'attempt 1')]

    assert backend.break_lock('operator') is not None
    with pytest.raises(LeaseLost):
        backend.run_batch(lease, 'evo-1', lambda: BatchCheckpoint(10, '20', True, 10, 5.0),
                          audit=line)
    assert history(backend)['evo-1'].state == RUNNING
    assert [e.action for e in backend.read_audit('evo-1')] == ['started']

    again = backend.acquire('owner-A', LONG)
    applied = backend.run_batch(again, 'evo-1', lambda: BatchCheckpoint(10, '20', True, 10, 5.0),
                                audit=line)
    assert applied.state == APPLIED
    assert [(e.action, e.detail, e.actor, e.host) for e in backend.read_audit('evo-1')] == [
        ('started', 'attempt 1', 'owner-A', 'web-1'), (APPLIED, '20 items', 'owner-A', 'web-1')]


# --- requests ----------------------------------------------------------------------------------

def test_a_pause_of_an_evolution_without_a_record_records_it_paused(backend):
    written = backend.record_request('evo-1', PAUSE, 'olivia', None)
    assert (written.state, written.attempts, written.requested_by) == (PAUSED, 0, 'olivia')
    assert history(backend)['evo-1'].state == PAUSED
    # Once a record exists, "no record" is not what is seen any more: nothing changes.
    assert backend.record_request('evo-1', PAUSE, 'someone else', None) is None
    assert history(backend)['evo-1'].requested_by == 'olivia'


def test_a_request_is_a_compare_and_set_on_the_state_seen(backend, lease):
    backend.record_batches_running(lease, 'evo-1', 10, 100)
    assert backend.record_request('evo-1', PAUSE, 'olivia', PAUSED) is None  # not what it is
    assert history(backend)['evo-1'].requested is None
    written = backend.record_request('evo-1', PAUSE, 'olivia', RUNNING)
    assert (written.state, written.requested, written.requested_by) == (RUNNING, PAUSE, 'olivia')
    assert written.requested_at is not None
    assert backend.record_request('evo-1', PAUSE, 'uma', RUNNING) is None  # pending already
    assert history(backend)['evo-1'].requested_by == 'olivia'


def test_a_pause_request_is_kept_by_a_new_attempt_and_honoured_at_its_first_batch(backend,
                                                                                  lease):
    backend.record_batches_running(lease, 'evo-1', 10, 100)
    backend.record_request('evo-1', PAUSE, 'olivia', RUNNING)
    # The holder died; the next one starts the evolution again before seeing the request.
    again = backend.record_batches_running(lease, 'evo-1', 10, 100)
    assert (again.state, again.requested) == (RUNNING, PAUSE)
    paused = backend.run_batch(lease, 'evo-1', lambda: BatchCheckpoint(10, '10', False, 10, 5.0))
    assert (paused.state, paused.requested, paused.progress_done, paused.checkpoint) == (
        PAUSED, None, 10, '10')


def test_resume_and_retry_requests_are_cleared_by_the_attempt_that_honours_them(backend, lease):
    backend.record_batches_running(lease, 'batched', 10, 100)
    backend.run_batch(lease, 'batched', lambda: BatchCheckpoint(10, '10', False, 10, 5.0))
    backend.record_request('batched', PAUSE, 'olivia', RUNNING)
    backend.run_batch(lease, 'batched', lambda: BatchCheckpoint(10, '20', False, 10, 5.0))
    assert backend.record_request('batched', RESUME, 'olivia', PAUSED).requested == RESUME
    resumed = backend.record_batches_running(lease, 'batched', 10, 100)
    assert (resumed.state, resumed.requested, resumed.checkpoint, resumed.progress_done) == (
        RUNNING, None, '20', 20)

    backend.record_running(lease, 'plain')
    backend.record_failure(lease, 'plain', 'Traceback: boom')
    assert backend.record_request('plain', RETRY, 'root', FAILED).requested == RETRY
    retried = backend.record_running(lease, 'plain')
    assert (retried.state, retried.attempts, retried.requested, retried.requested_by) == (
        RUNNING, 2, None, None)


def test_requests_need_no_lock(db, backend, lease):
    """Another process asks while this one holds the lock: nothing waits, nothing is fenced."""
    backend.record_batches_running(lease, 'evo-1', 10, 100)
    operator = db.make_backend(with_session=False)
    assert operator.record_request('evo-1', PAUSE, 'olivia', RUNNING).requested == PAUSE
    operator.record_audit('evo-1', 'pause', 'olivia', 'ops')
    assert [e.action for e in backend.read_audit('evo-1')] == ['pause']
