"""Takeover: the leader is SIGKILLed mid-evolution; how soon does another process apply it?

Per database and run: one member process (lease :data:`LEASE` s) takes the lock and starts the
benchmark evolution; :data:`WAITERS` more members start and wait.  Once they all wait, the
leader is SIGKILLed.  The figure is the time from the kill to the commit of the evolution by the
process that took over (its ``transaction`` after-commit hook), against
``lease + poll_interval + 0.5 s``.  The evolution finishes at once when it runs a second time.

    python bench/bench_takeover.py [--db ...] [--runs N]
"""
import os
import signal
import statistics
import time

import _harness

WAITERS = 3
LEASE = 3.0
POLL_INTERVAL = 1.0
RUNS = 3
SLACK = 0.5


def run_once(kind, waiters=WAITERS):
    """One takeover; returns the seconds from the kill to the commit."""
    options = dict(poll_interval=POLL_INTERVAL, lease=LEASE)
    names = [f'waiter-{i:02d}' for i in range(waiters)]
    with _harness.scenario(kind) as (url, workdir), _harness.cluster() as processes:
        leader = _harness.start_leader_and_waiters(url, workdir, options, names, processes)
        killed_at = time.time()
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait()
        processes.remove(leader)
        reports = _harness.wait_for_reports(workdir, names, processes)
    commits = [r['evolution']['commit'] for r in reports.values() if 'commit' in r['evolution']]
    if len(commits) != 1:
        raise RuntimeError(f'expected one process to apply the evolution, got {len(commits)}')
    return commits[0] - killed_at


def run(kind, runs=RUNS, waiters=WAITERS):
    takeovers = [run_once(kind, waiters) for _ in range(runs)]
    _harness.report('takeover', kind, statistics.median(takeovers),
                    LEASE + POLL_INTERVAL + SLACK, ' s', spread=takeovers,
                    detail=f'lease {LEASE:g} s, poll_interval {POLL_INTERVAL:g} s, '
                           f'{waiters} waiters')


def main(argv=None):
    _harness.run_scenarios(__doc__.splitlines()[0], run, RUNS, WAITERS, argv)


if __name__ == '__main__':
    main()
