"""A cluster during a slow evolution: database load while waiting, heartbeat cost, convergence.

Per database and run: one member process starts on a new database, takes the lock and starts
the benchmark evolution; then :data:`WAITERS` more members start and wait.  Once every waiter
is waiting, the evolution goes on for :data:`WINDOW` more seconds, then returns and commits.
Each member asks its own WSGI callable for ``/`` every 10 ms until it gets a 200, and logs every
SQL statement any of its engines sends (time, thread).  From those logs:

database load while waiting
    statements per second the waiters send during the window, over ``WAITERS / poll_interval``
    (target: at most 1.2 times that).
heartbeat cost
    statements per second the leader sends while its evolution runs (lease renewals only: the
    evolution sends none), over ``3 / lease``.
convergence
    seconds from the evolution's commit (a ``transaction`` after-commit hook in the leader) to
    the last member's first 200 (target: ``poll_interval + 0.2``).

Process timing on a shared 2-core machine is noisy: every figure is the median of ``--runs``
runs, and every run's value is listed.

    python bench/bench_cluster.py [--db ...] [--runs N]
"""
import collections
import statistics
import time

import _harness

WAITERS = 16
WINDOW = 10.0
POLL_INTERVAL = 1.0
LEASE = 15.0
RUNS = 3

LOAD_FACTOR = 1.2
CONVERGENCE_SLACK = 0.2
RENEWALS_PER_LEASE = 3


def _statements_between(report, start, end):
    return [text for at, _, text in report['statements'] if start <= at <= end]


def _describe(what, statements):
    common = collections.Counter(statements).most_common(3)
    _harness.info(f'{what}: ' + '; '.join(f'{n} x {text[:70]}' for text, n in common))


def run_once(kind, waiters=WAITERS):
    """One cluster run; returns ``(load, heartbeat, convergence)``."""
    options = dict(poll_interval=POLL_INTERVAL, lease=LEASE)
    names = [f'waiter-{i:02d}' for i in range(waiters)]
    with _harness.scenario(kind) as (url, workdir), _harness.cluster() as processes:
        _harness.start_leader_and_waiters(url, workdir, options, names, processes)
        window_start = time.time()
        time.sleep(WINDOW)  # the measurement window itself, not a synchronisation
        window_end = time.time()
        _harness.finish_evolution(workdir)
        reports = _harness.wait_for_reports(workdir, ['leader', *names], processes)
    leader = reports['leader']
    evolution = leader['evolution']
    waiting = [text for n in names
               for text in _statements_between(reports[n], window_start, window_end)]
    renewals = _statements_between(leader, evolution['evolve_start'], evolution['evolve_end'])
    _describe('waiters during the window', waiting)
    _describe('leader while evolving', renewals)
    load = len(waiting) / (window_end - window_start)
    heartbeat = len(renewals) / (evolution['evolve_end'] - evolution['evolve_start'])
    if any(r['first_200'] is None for r in reports.values()):
        raise RuntimeError('a member never served a 200')
    convergence = max(r['first_200'] for r in reports.values()) - evolution['commit']
    return load, heartbeat, convergence


def heartbeat_with_progress(kind):
    """Statements per second of a leader whose evolution reports progress (information).

    Progress is written at most once a second, fenced: each write renews the lease too.
    """
    options = dict(poll_interval=POLL_INTERVAL, lease=LEASE)
    with _harness.scenario(kind) as (url, workdir), _harness.cluster() as processes:
        processes.append(_harness.start_member(url, workdir, 'leader', options,
                                               reports_progress=True))
        _harness.wait_until(lambda: _harness.member_phase(workdir, 'leader') == 'evolving',
                            'the leader to start evolving', processes=processes)
        time.sleep(WINDOW)  # the measurement window itself, not a synchronisation
        _harness.finish_evolution(workdir)
        leader = _harness.wait_for_reports(workdir, ['leader'], processes)['leader']
    evolution = leader['evolution']
    sent = _statements_between(leader, evolution['evolve_start'], evolution['evolve_end'])
    _describe('leader reporting progress', sent)
    _harness.info(f'with an evolution that reports progress the leader sends '
                  f'{len(sent) / (evolution["evolve_end"] - evolution["evolve_start"]):.2f} '
                  f'statements/s (information only)')


def run(kind, runs=RUNS, waiters=WAITERS):
    measured = [run_once(kind, waiters) for _ in range(runs)]
    loads, heartbeats, convergences = zip(*measured)
    _harness.report('database load while waiting', kind, statistics.median(loads),
                    LOAD_FACTOR * waiters / POLL_INTERVAL, ' /s', spread=loads,
                    detail=f'{waiters} waiters, poll_interval {POLL_INTERVAL:g} s')
    _harness.report('heartbeat cost', kind, statistics.median(heartbeats),
                    RENEWALS_PER_LEASE / LEASE, ' /s', spread=heartbeats,
                    detail=f'lease {LEASE:g} s')
    _harness.report('convergence', kind, statistics.median(convergences),
                    POLL_INTERVAL + CONVERGENCE_SLACK, ' s', spread=convergences,
                    detail=f'{waiters} waiters + the leader')
    heartbeat_with_progress(kind)


def main(argv=None):
    _harness.run_scenarios(__doc__.splitlines()[0], run, RUNS, WAITERS, argv)


if __name__ == '__main__':
    main()
