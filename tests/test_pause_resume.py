"""Pause, resume and retry as an operator uses them (``tgext.evolve.operations``, which the CLI
and the status page call), against a real application whose evolution thread runs the batches,
on every database; and the audit trail they and every attempt leave.

The batched evolution here takes one item per batch and waits, inside each batch, for a permit
the test hands out: "the evolution is between batch 2 and batch 3" is then a fact, not a
timing.  MIM is not thread-safe: the test thread reads through the application's own backend
(which serialises its MIM calls) and reads the notes only once the evolution thread is idle.
"""
import socket

import pytest

from polling import wait_until
from tgapps import NoteEvolution, database_url, tg_apps  # noqa: F401 (fixtures)
from stepped import Stepped
from tgext.evolve import operations
from tgext.evolve.errors import OperationRefused
from tgext.evolve.records import APPLIED, FAILED, PAUSE, PAUSED, RESUME

STYLE = ('fullstack', 'plugme')


def record(app, evolution_id):
    return app.service.backend.read_history(batches=True).get(evolution_id)


def wait_for(app, evolution_id, what, condition):
    return wait_until(lambda: (lambda r: r if r is not None and condition(r) else None)(
        record(app, evolution_id)), f'{evolution_id} {what}')


def trail(app, evolution_id):
    return [entry.action for entry in operations.audit(app.service, evolution_id)]


def test_a_batched_evolution_pauses_at_a_batch_boundary_and_resumes_from_its_checkpoint(
        tg_apps, database_url):
    model = tg_apps.model(database_url)
    backfill = Stepped('backfill', model)
    app = tg_apps.build(STYLE, model, [NoteEvolution('seed', model), backfill])
    backfill.allow(2)
    wait_for(app, 'backfill', 'at 2 items', lambda r: r.progress_done == 2)

    paused = operations.pause(app.service, 'backfill', operator='olivia')
    assert (paused.outcome, paused.blocking, paused.batched) == ('requested', True, True)
    assert (paused.record.requested, paused.record.requested_by) == (PAUSE, 'olivia')
    with pytest.raises(OperationRefused, match='already asked for by olivia'):
        operations.pause(app.service, 'backfill')
    entry, = [e for e in operations.status(app.service).evolutions if e.evolution_id == 'backfill']
    assert entry.reason.endswith('; pause asked by olivia: it stops at its next batch boundary')

    backfill.allow(1)  # the batch under way when the pause came commits, then it stops
    stopped = wait_for(app, 'backfill', 'paused', lambda r: r.state == PAUSED)
    assert (stopped.progress_done, stopped.batches_done, stopped.checkpoint) == (3, 3, '3')
    app.wait_for_phase('paused')  # a paused blocking evolution keeps the gate closed
    assert app.request('/').status_int == 503
    backfill.allow(10)  # nothing may take them while it is paused
    entry, = [e for e in operations.status(app.service).evolutions if e.evolution_id == 'backfill']
    assert entry.state == PAUSED and entry.reason.startswith('paused; resumes from its checkpoint')
    with pytest.raises(OperationRefused, match='is paused already'):
        operations.pause(app.service, 'backfill')
    assert record(app, 'backfill').progress_done == 3

    resumed = operations.resume(app.service, 'backfill', operator='olivia')
    assert resumed.record.requested == RESUME
    app.wait_until_serving()
    done = record(app, 'backfill')
    assert (done.state, done.progress_done, done.attempts) == (APPLIED, 6, 2)
    # Every item exactly once: nothing was done twice across the pause, nothing skipped.
    assert model.notes() == sorted(['seed'] + [f'backfill-{n}' for n in range(6)])
    assert trail(app, 'backfill') == ['started', 'pause', 'paused', 'resume', 'started',
                                      'applied']
    pause_entry = operations.audit(app.service, 'backfill')[1]
    assert (pause_entry.actor, pause_entry.host) == ('olivia', socket.gethostname())


def test_an_evolution_that_has_not_started_is_paused_before_it_starts(tg_apps, database_url):
    model = tg_apps.model(database_url)
    first = tg_apps.blocking('first', model)
    app = tg_apps.build(STYLE, model, [first, NoteEvolution('second', model)])
    first.wait_started()

    with pytest.raises(OperationRefused, match='cannot stop half-way'):
        operations.pause(app.service, 'first')  # a plain evolution, running now
    assert record(app, 'first').requested is None
    paused = operations.pause(app.service, 'second')
    assert (paused.outcome, paused.record.state, paused.blocking) == ('paused', PAUSED, True)

    first.release.set()
    wait_for(app, 'first', 'applied', lambda r: r.state == APPLIED)
    app.wait_for_phase('paused')
    assert record(app, 'second').state == PAUSED and app.request('/').status_int == 503
    operations.resume(app.service, 'second')
    app.wait_until_serving()
    assert record(app, 'second').state == APPLIED
    assert model.notes() == ['first', 'second']
    assert trail(app, 'second') == ['pause', 'resume', 'started', 'applied']


def test_pausing_a_background_evolution_leaves_the_site_serving(tg_apps, database_url):
    model = tg_apps.model(database_url)
    backfill = Stepped('backfill', model, total=3, background=True)
    app = tg_apps.build(STYLE, model, [backfill])
    wait_for(app, 'backfill', 'running', lambda r: r.state == 'running')
    app.wait_until_serving()
    result = operations.pause(app.service, 'backfill')
    assert (result.outcome, result.blocking) == ('requested', False)
    backfill.allow(1)
    wait_for(app, 'backfill', 'paused', lambda r: r.state == PAUSED)
    assert app.request('/').status_int == 200
    operations.resume(app.service, 'backfill')
    backfill.allow(5)
    wait_for(app, 'backfill', 'applied', lambda r: r.state == APPLIED)
    assert record(app, 'backfill').progress_done == 3


def test_refusals_name_the_evolution_and_change_nothing(tg_apps, database_url):
    model = tg_apps.model(database_url)
    app = tg_apps.build(STYLE, model, [NoteEvolution('seed', model)])
    app.wait_until_serving()
    before = app.service.backend.read_history(batches=True)
    refusals = [
        (lambda: operations.pause(app.service, 'nosuch'),
         "pause: no registered evolution has the id 'nosuch'"),
        (lambda: operations.resume(app.service, 'nosuch'),
         "resume: no registered evolution has the id 'nosuch'"),
        (lambda: operations.pause(app.service, 'seed'),
         'pause: seed is applied: there is nothing left to pause'),
        (lambda: operations.resume(app.service, 'seed'),
         'resume: seed is applied, not paused: nothing to resume'),
        (lambda: operations.retry(app.service, ['seed']), "retry: not failed: 'seed' (applied)"),
    ]
    for call, message in refusals:
        with pytest.raises(OperationRefused) as refused:
            call()
        assert str(refused.value).startswith(message), refused.value
    assert app.service.backend.read_history(batches=True) == before
    assert trail(app, 'seed') == ['started', 'applied']


def test_retry_of_a_failed_batched_evolution_resumes_from_its_checkpoint_and_keeps_the_failure(
        tg_apps, database_url):
    model = tg_apps.model(database_url)
    convert = Stepped('convert', model, total=5, fail_at=3)
    app = tg_apps.build(STYLE, model, [convert])
    convert.allow(3 + 4)  # three items, then item 3 fails four times (halving cannot go lower)
    failed = wait_for(app, 'convert', 'failed', lambda r: r.state == FAILED)
    assert (failed.progress_done, failed.checkpoint) == (3, '3')
    with pytest.raises(OperationRefused, match='cannot be paused|failed and is not running'):
        operations.pause(app.service, 'convert')

    convert.fixed.set()
    retried, = operations.retry(app.service, ['convert'], operator='olivia')
    assert retried.state == FAILED  # as it was
    with pytest.raises(OperationRefused, match='already requested'):
        operations.retry(app.service, ['convert'])
    convert.allow(2)
    done = wait_for(app, 'convert', 'applied', lambda r: r.state == APPLIED)
    assert (done.progress_done, done.attempts) == (5, 2)
    app.wait_until_serving()
    assert model.notes() == [f'convert-{n}' for n in range(5)]
    entries = operations.audit(app.service, 'convert')
    assert [e.action for e in entries] == ['started', 'failed', 'retry', 'started', 'applied']
    assert 'cannot convert item 3' in entries[1].error
    assert entries[2].actor == 'olivia' and 'was failed, 1 attempt' in entries[2].detail
    assert entries[3].detail == ('attempt 2: retried by olivia: failed before (1 attempt); resumes '
                                 'from its checkpoint (3 items done): resuming after 3 items in '
                                 '3 batches')


def test_unmark_forgets_the_record_and_the_audit_keeps_what_it_said(tg_apps, database_url):
    model = tg_apps.model(database_url)
    app = tg_apps.build(STYLE, model, [NoteEvolution('seed', model)])
    app.wait_until_serving()
    app.stop()  # an operator's shell: no evolution thread to run it again meanwhile
    result = operations.unmark(app.service, ['seed'], operator='root')
    assert result.changed == ('seed',)
    assert 'seed' not in app.service.backend.read_history()
    (forgotten, registered), = operations.history(app.service, ['seed'])
    assert (forgotten.state, registered) == ('forgotten', True)
    entries = operations.audit(app.service, 'seed')
    assert [e.action for e in entries] == ['started', 'applied', 'unmark']
    assert entries[-1].actor == 'root' and entries[-1].detail.startswith('was applied, 1 attempt')
    operations.mark(app.service, ['seed'], operator='root')
    assert trail(app, 'seed')[-1] == 'mark'


@pytest.mark.parametrize('database_url', ['sqlite', 'postgresql', 'mysql'], indirect=True)
def test_a_process_of_the_next_start_resumes_what_a_stopped_one_paused(tg_apps, database_url):
    """The process that paused is gone; another one, started later, waits behind the closed
    gate until the resume, then continues from the checkpoint (SQL: MIM is per process)."""
    model = tg_apps.model(database_url)
    before = Stepped('backfill', model, total=5)
    first = tg_apps.build(STYLE, model, [before])
    before.allow(2)
    wait_for(first, 'backfill', 'at 2 items', lambda r: r.progress_done == 2)
    operations.pause(first.service, 'backfill')
    before.allow(1)
    wait_for(first, 'backfill', 'paused', lambda r: r.state == PAUSED)
    first.stop()

    after = Stepped('backfill', model, total=5)
    second = tg_apps.build(STYLE, model, [after])
    second.wait_for_phase('paused')
    after.allow(5)
    assert second.request('/').status_int == 503
    operations.resume(second.service, 'backfill', operator='olivia')
    second.wait_until_serving()
    done = record(second, 'backfill')
    assert (done.state, done.progress_done, done.attempts) == (APPLIED, 5, 2)
    assert model.notes() == [f'backfill-{n}' for n in range(5)]
    owners = {e.actor for e in operations.audit(second.service, 'backfill')
              if e.action in ('started', 'applied')}
    assert owners == {first.service.runner.owner, second.service.runner.owner}
