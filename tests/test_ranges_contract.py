"""The storage contract of parallel evolutions' key ranges, on every database.

Claims (one winner per range among concurrent claimers, re-claimed after expiry), the batch
commit fenced on the claim (a stale claimer's batch leaves nothing on SQL), release, failure,
and the coordinator's writes (prepare, reset for retry, summed progress).
"""
import threading

import pytest

from polling import wait_until
from test_backend_contract import LONG, SHORT, run_threads
from tgext.evolve.backends.base import BatchCheckpoint
from tgext.evolve.errors import ClaimLost, LeaseLost
from tgext.evolve.records import (RANGE_DONE, RANGE_FAILED, RANGE_PENDING, RANGE_RUNNING,
                                  RUNNING)

EVOLUTION = 'backfill'
CUTS = [(None, '10'), ('10', '20'), ('20', None)]


@pytest.fixture
def backend(db):
    b = db.make_backend()
    b.ensure_storage()
    return b


@pytest.fixture
def lease(backend):
    lease = backend.acquire('coordinator', LONG)
    backend.record_batches_running(lease, EVOLUTION, 10, 30)
    return lease


@pytest.fixture
def ranges(backend, lease):
    return backend.prepare_ranges(lease, EVOLUTION, CUTS)


def checkpoint(items, cursor, exhausted=False):
    return BatchCheckpoint(items, cursor, exhausted, 10, None)


def test_prepare_records_pending_ranges_in_order(backend, ranges):
    assert [(r.range_no, r.after_key, r.upto_key, r.state) for r in ranges] == [
        (0, None, '10', RANGE_PENDING), (1, '10', '20', RANGE_PENDING),
        (2, '20', None, RANGE_PENDING)]
    assert [r._replace(now=None) for r in backend.read_ranges()] == [
        r._replace(now=None) for r in backend.read_ranges(EVOLUTION)]
    assert backend.read_ranges('other') == []


def test_prepare_with_a_stale_lease_changes_nothing(db, backend, lease, ranges):
    thief = db.make_backend(with_session=False)
    backend.break_lock('operator')
    thief.acquire('thief', LONG)
    with pytest.raises(LeaseLost):
        backend.prepare_ranges(lease, EVOLUTION, [(None, None)])
    assert len(backend.read_ranges(EVOLUTION)) == 3


def test_read_ranges_without_a_store_is_empty(db):
    assert db.make_backend().read_ranges() == []


def test_concurrent_claimers_each_get_a_different_range(db, backend, ranges):
    claimers = [db.make_backend(with_session=False) for _ in range(6)]

    def claim(i, barrier):
        barrier.wait()
        return claimers[i].claim_range(EVOLUTION, f'claimer-{i}', LONG)

    claims = [c for c in run_threads(6, claim) if c is not None]
    assert sorted(c.range_no for c in claims) == [0, 1, 2]
    stored = {r.range_no: r for r in backend.read_ranges(EVOLUTION)}
    for c in claims:
        assert stored[c.range_no].owner == c.owner
        assert stored[c.range_no].state == RANGE_RUNNING
        assert stored[c.range_no].claim_generation == c.claim_generation == 1
        assert stored[c.range_no].claimed
    assert backend.claim_range(EVOLUTION, 'late', LONG) is None


def test_a_batch_commits_its_work_and_the_range_checkpoint(db, backend, ranges):
    claim = backend.claim_range(EVOLUTION, 'claimer', LONG)
    backend.run_range_batch(claim, lambda: (db.write_side_effect('b1'), checkpoint(5, '4'))[1])
    stored = backend.read_ranges(EVOLUTION)[claim.range_no]
    assert (stored.checkpoint, stored.items_done, stored.batches_done, stored.state) == (
        '4', 5, 1, RANGE_RUNNING)
    assert db.count_side_effects('b1') == 1
    backend.run_range_batch(claim, lambda: checkpoint(0, '4', exhausted=True))
    stored = backend.read_ranges(EVOLUTION)[claim.range_no]
    assert stored.state == RANGE_DONE and stored.finished_at is not None
    assert stored.items_done == 5 and stored.batches_done == 2


def test_an_expired_claim_is_claimed_again_and_resumes_from_its_checkpoint(db, backend,
                                                                            ranges):
    first = backend.claim_range(EVOLUTION, 'slow', SHORT)
    backend.run_range_batch(first, lambda: checkpoint(3, '2'))
    other = db.make_backend(with_session=False)
    taken = {}

    def expired_range_claimed():
        claim = other.claim_range(EVOLUTION, 'fast', LONG)
        while claim is not None and claim.range_no != first.range_no:
            taken[claim.range_no] = claim
            claim = other.claim_range(EVOLUTION, 'fast', LONG)
        return claim

    second = wait_until(expired_range_claimed, 'the expired claim taken over')
    assert second.checkpoint == '2'
    assert second.claim_generation == first.claim_generation + 1
    assert second.attempts == 2

    def stale_batch():
        db.write_side_effect('stale')
        return checkpoint(7, '9')

    with pytest.raises(ClaimLost):
        backend.run_range_batch(first, stale_batch)
    stored = backend.read_ranges(EVOLUTION)[first.range_no]
    assert (stored.owner, stored.checkpoint, stored.items_done) == ('fast', '2', 3)
    if db.is_sql:
        assert db.count_side_effects('stale') == 0  # rolled back with the failed fencing check
    assert not backend.release_range(first)
    assert not backend.fail_range(first, 'too late')


def test_a_failing_batch_leaves_nothing_and_keeps_the_claim(db, backend, ranges):
    claim = backend.claim_range(EVOLUTION, 'claimer', LONG)

    def boom():
        db.write_side_effect('boom', flush=db.is_sql)
        raise RuntimeError('boom')

    with pytest.raises(RuntimeError):
        backend.run_range_batch(claim, boom)
    stored = backend.read_ranges(EVOLUTION)[claim.range_no]
    assert (stored.state, stored.owner, stored.items_done) == (RANGE_RUNNING, 'claimer', 0)
    if db.is_sql:
        assert db.count_side_effects('boom') == 0


def test_release_gives_the_range_back_with_its_checkpoint(backend, ranges):
    claim = backend.claim_range(EVOLUTION, 'leaving', LONG)
    backend.run_range_batch(claim, lambda: checkpoint(2, '1'))
    assert backend.release_range(claim)
    stored = backend.read_ranges(EVOLUTION)[claim.range_no]
    assert (stored.state, stored.owner, stored.checkpoint) == (RANGE_PENDING, None, '1')
    claimed = {}
    while (again := backend.claim_range(EVOLUTION, 'next', LONG)) is not None:
        claimed[again.range_no] = again
    assert claimed[claim.range_no].checkpoint == '1'


def test_a_failed_range_is_reset_for_retry_keeping_its_checkpoint(backend, lease, ranges):
    claim = backend.claim_range(EVOLUTION, 'claimer', LONG)
    backend.run_range_batch(claim, lambda: checkpoint(2, '1'))
    assert backend.fail_range(claim, 'Traceback...\nRuntimeError: boom')
    stored = backend.read_ranges(EVOLUTION)[claim.range_no]
    assert (stored.state, stored.error) == (RANGE_FAILED, 'Traceback...\nRuntimeError: boom')
    done = backend.claim_range(EVOLUTION, 'claimer', LONG)
    backend.run_range_batch(done, lambda: checkpoint(0, None, exhausted=True))
    reset = backend.prepare_ranges(lease, EVOLUTION, None)
    states = {r.range_no: (r.state, r.checkpoint, r.items_done) for r in reset}
    assert states[claim.range_no] == (RANGE_PENDING, '1', 2)
    assert states[done.range_no][0] == RANGE_DONE


def test_summed_progress_is_written_to_the_history(backend, lease, ranges):
    backend.record_parallel_progress(lease, EVOLUTION, 17, 4, 12.5)
    record = backend.read_history(batches=True)[EVOLUTION]
    assert (record.state, record.progress_done, record.batches_done, record.rate) == (
        RUNNING, 17, 4, 12.5)


def test_a_claim_costs_at_most_two_statements(db, backend, ranges):
    if not db.is_sql:
        pytest.skip('statements are counted on SQL engines')
    claimer = db.make_backend(with_session=False)
    claimer.claim_range(EVOLUTION, 'warm-up', LONG)  # connects: the server version is known
    with db.count_statements(claimer) as statements:
        assert claimer.claim_range(EVOLUTION, 'claimer', LONG) is not None
    assert len(statements) <= 2, statements
    skip_locked = db.kind != 'sqlite'  # this run's PostgreSQL and MariaDB (>= 10.6) have it
    assert any('SKIP LOCKED' in s for s in statements) == skip_locked


def test_claims_never_wait_for_a_range_being_claimed(db, backend, ranges):
    """A claimer inside its claim's transaction (row locked) does not make others wait."""
    if db.kind not in ('postgresql', 'mysql'):
        pytest.skip('SKIP LOCKED databases')
    import sqlalchemy as sa
    from tgext.evolve.backends.sql_schema import ranges_table as r
    holder = db.new_engine()
    with holder.begin() as conn:
        conn.execute(sa.select(r.c.range_no).where(r.c.evolution_id == EVOLUTION,
                                                   r.c.range_no == 0).with_for_update())
        done = threading.Event()
        result = {}

        def claim():
            result['claim'] = backend.claim_range(EVOLUTION, 'other', LONG)
            done.set()

        threading.Thread(target=claim, daemon=True).start()
        assert done.wait(10), 'the claim waited for the locked row'
    assert result['claim'].range_no == 1
