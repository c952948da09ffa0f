"""Batched evolutions on real processes and real databases (issue 14): exactly once per batch
whatever happens to the holder, resumed from the checkpoint, and the site serving while a
background evolution runs.

Each test starts real TurboGears processes (``tests/batch_workers.py``, procapp's application
with :class:`batch_workers.CountedBump`: ``row.n += 1`` over :data:`ROWS` rows, every
``process()`` call appended to a file of its process outside the transaction).  "Exactly once"
is read in the database (every row ``n == 1``); "resumed" is read in the call files: what the
killed holders did but never committed is redone once by the next holder, and nothing else is.
"""
import signal
import types

import pytest

import batch_workers
from batch_workers import assert_resumed
from cluster import DEADLINE, START_DEADLINE, Cluster
from polling import wait_until
from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
from tgext.evolve.operations import release_lock
from tgext.evolve.options import Settings
from tgext.evolve.records import APPLIED, RUNNING

ROWS = 20_000
#: Short leases, so that a takeover after a kill costs about two seconds.
OPTIONS = {'lease': 2.0, 'poll_interval': 0.2, 'batch_seconds': 0.1}
MAX_BATCH = 500
BUMP = 'bump'


class BatchCluster(Cluster):
    """A cluster of ``batch_workers.py`` processes on a table of ``rows`` items."""

    script = batch_workers.__file__

    def prepare_items(self, rows):
        self.prepare_database()
        batch_workers.create_items(self.engine, rows)

    def calls(self, process, evolution_id=BUMP):
        return batch_workers.read_calls(str(self.workdir), evolution_id, process.name)

    def items(self):
        return batch_workers.item_counts(self.engine)

    def record(self, evolution_id=BUMP):
        return self.history().get(evolution_id)

    def wait_applied(self, *evolution_ids, timeout=DEADLINE):
        def applied():
            self.check_alive([p for p in self.processes if p not in self.killed])
            history = self.history()
            return all(i in history and history[i].state == APPLIED for i in evolution_ids)

        wait_until(applied, f'{", ".join(evolution_ids)} applied', timeout, 0.1)

    killed = ()

    def kill(self, process):
        process.signal(signal.SIGKILL)
        process.popen.wait(DEADLINE)
        self.killed = (*self.killed, process)

    def holder_with(self, calls, exclude=()):
        """Wait for the process (not in ``exclude``) that made at least ``calls`` calls."""
        def found():
            self.check_alive([p for p in self.processes if p not in self.killed])
            return next((p for p in self.processes
                         if p not in exclude and len(self.calls(p)) >= calls), None)

        return wait_until(found, f'a process past {calls} process() calls', DEADLINE, 0.02)


def bump(**spec):
    return {'id': BUMP, 'kind': 'batch', 'max_batch_size': MAX_BATCH, **spec}


@pytest.mark.slow
def test_a_holder_killed_twice_mid_walk_leaves_every_row_changed_exactly_once(sql_url, tmp_path):
    with BatchCluster(sql_url, tmp_path, [bump()], OPTIONS) as c:
        c.prepare_items(ROWS)
        processes = c.start(3)
        first = c.holder_with(ROWS // 4)
        c.kill(first)
        second = c.holder_with(ROWS // 4, exclude=(first,))
        c.kill(second)
        c.wait_applied(BUMP)

        assert c.items() == {1: ROWS}
        survivors = [p for p in processes if p not in (first, second)]
        finisher = next(p for p in survivors if c.calls(p))
        assert [p for p in survivors if p is not finisher and c.calls(p)] == []
        assert_resumed([c.calls(first), c.calls(second), c.calls(finisher)], ROWS, MAX_BATCH)
        record = c.record()
        assert (record.progress_done, record.progress_total) == (ROWS, ROWS)
        assert record.attempts == 3  # each holder once: nobody started over
        c.wait_serving(survivors)


def test_calls_of_killed_holders_are_judged_strictly():
    """The judge above is able to fail: a restart from scratch, a batch redone twice, a skipped
    batch."""
    rows = list(range(1, 11))
    assert_resumed([rows[:4], rows[2:]], 10, 5)  # 3 and 4 uncommitted, redone once
    for logs in ([rows[:8], rows], [rows[:4], rows[5:]], [rows[:4], rows[3:4] + rows[3:]],
                 [rows[:9], rows[1:]]):
        with pytest.raises(AssertionError):
            assert_resumed(logs, 10, 5)


@pytest.mark.slow
def test_a_stale_holder_commits_nothing_after_waking_or_after_its_lease_was_broken(
        sql_url, tmp_path):
    """SIGSTOP past the lease, then a lease broken by ``release-lock --force``.

    The holder stops inside a batch, with its rows read and half of them processed
    (PostgreSQL and MariaDB; not SQLite, whose one write lock a stopped process can keep).
    """
    if sql_url.startswith('sqlite'):
        # Stopped right after a commit, the holder can still be stopped with SQLite's only
        # write lock (its lease renewal, waiting for that commit, takes it at that instant):
        # then nobody writes until it continues, and there is no takeover to test (README,
        # "Transaction semantics per database").  Seen in 1 run out of 5.
        pytest.skip('SQLite: a stopped process may hold the only write lock')
    rows = 6_000
    spec = bump(cost=0.0005, batch_size=50, max_batch_size=200,
                stop_after={'item': 1_000, 'once_file': 'stopped'})
    with BatchCluster(sql_url, tmp_path, [spec], OPTIONS) as c:
        c.prepare_items(rows)
        processes = c.start(3)
        stopped = c.process_of(wait_until(
            lambda: _read_pid(tmp_path / 'stopped'), 'a holder stopping', START_DEADLINE))
        wait_until(lambda: _state_of(stopped) == 'T', 'the holder stopped', DEADLINE)
        before = len(c.calls(stopped))
        # Another process takes over and gets past the stopped one's batch.
        successor = c.holder_with(400, exclude=(stopped,))
        stopped.signal(signal.SIGCONT)
        # Woken, it finds its lease lost at its next fenced write: nothing it does from now
        # on is committed.  Meanwhile, the successor's lease is broken while it works (on
        # SQLite the woken one may get no write lock before the successor is done: the break
        # cannot wait for it).
        assert c.record().state == RUNNING
        service = types.SimpleNamespace(backend=SQLAlchemyBackend(c.engine),
                                        settings=Settings(**OPTIONS))

        def break_a_held_lock():
            # On SQLite the woken holder's batch can make the successor's next one busy: the
            # successor then gives the lock up until its next poll, and a break in between
            # would find it free (and keep everybody from taking it).  Break it while held.
            lock = service.backend.read_lock()
            if lock is not None and lock.owner is not None:
                result = release_lock(service, force=True)
                if result.action == 'broken' and result.lock.owner:
                    return result
            return 'applied' if c.record().state == APPLIED else None

        broken = wait_until(break_a_held_lock, 'a held lock broken', DEADLINE)
        victim = None
        if broken == 'applied':
            # Only SQLite's one writer can keep every holder from being seen before the end.
            assert sql_url.startswith('sqlite'), 'the lock was never seen held'
        else:
            victims = [p for p in processes if p.report.get('owner') == broken.lock.owner]
            assert victims and victims[0] is not stopped, broken.lock.owner
            victim = victims[0]
        c.wait_applied(BUMP)

        assert c.items() == {1: rows}, 'a stale holder committed a batch after waking'
        assert stopped.alive and successor.alive
        wait_until(lambda: stopped.log_lines('lock lost') and (
            victim is None or victim.log_lines('lock lost')), 'both stale holders noticing',
            DEADLINE)
        # It went on with the batch it was stopped in, and none of it was committed.
        assert len(c.calls(stopped)) > before
        record = c.record()
        assert (record.state, record.progress_done) == (APPLIED, rows)
        c.wait_serving(processes)


def _read_pid(path):
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _state_of(process):
    """The process's state letter in /proc (``T``: stopped)."""
    with open(f'/proc/{process.pid}/stat') as f:
        return f.read().rsplit(')', 1)[1].split()[0]


# --- background ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_processes_serve_while_a_background_evolution_runs_and_take_it_over(sql_url, tmp_path):
    rows = 1_500
    # About 3 s of work at full speed, twice that with the default throttle: long enough to
    # see, short enough for a test.
    spec = bump(background=True, cost=0.002, batch_size=50, max_batch_size=200)
    with BatchCluster(sql_url, tmp_path, [spec], OPTIONS) as c:
        c.prepare_items(rows)
        processes = c.start(3)
        c.wait_serving(processes, START_DEADLINE)
        # Every process serves while most rows are still pending.
        assert c.items().get(0, 0) > rows // 2
        assert all(p.observed == [200] or p.observed == [503, 200] for p in processes)
        holder = c.holder_with(rows // 5)
        record = c.record()
        assert record.state == RUNNING
        # A process started while it runs serves at once: it never answers 503.
        (late,) = c.start(1, together=False, prefix='late')
        c.wait_serving([late], START_DEADLINE)
        assert late.observed == [200]
        assert c.record().state == RUNNING
        c.kill(holder)
        survivors = [p for p in c.processes if p is not holder]
        successor = c.holder_with(1, exclude=(holder,))
        # The survivors served throughout the takeover.
        assert [p.get('/') for p in survivors] == [200] * 3
        c.wait_applied(BUMP)

        assert c.items() == {1: rows}
        assert_resumed([c.calls(holder), c.calls(successor)], rows, 200)
        assert [p.get('/') for p in survivors] == [200] * 3
        assert all(503 not in p.observed[p.observed.index(200):] for p in survivors)


@pytest.mark.slow
def test_a_blocking_evolution_depending_on_a_background_one_keeps_the_gate_closed(
        sql_url, tmp_path):
    rows = 2_000
    evolutions = [bump(background=True, cost=0.001, batch_size=50, max_batch_size=200),
                  {'id': 'after_bump', 'steps': ['write'], 'depends_on': [BUMP]}]
    with BatchCluster(sql_url, tmp_path, evolutions, OPTIONS) as c:
        c.prepare_items(rows)
        processes = c.start(3)
        c.wait_all_observed(503, processes)
        c.wait_applied(BUMP, 'after_bump', timeout=START_DEADLINE)
        c.wait_serving(processes)

        history = c.history()
        done = max(history[BUMP].finished_at, history['after_bump'].finished_at)
        for p in processes:
            assert p.observed == [503, 200], p.observed
            assert p.report['first_served'] >= done - 0.05, 'served before both were applied'
        assert c.items() == {1: rows}
        assert c.side_effects() == {'after_bump': 1}
