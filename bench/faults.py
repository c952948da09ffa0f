"""Reliability figures: every fault of ``tests/fault_scenarios.py``, repeated, on every database.

    TGEXT_EVOLVE_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test \\
    TGEXT_EVOLVE_TEST_MYSQL_URL=mysql+pymysql://root@127.0.0.1:3306/test \\
    python bench/faults.py [--db sqlite postgresql mysql] [--runs N] [--faults kill pause ...]

Each run starts real application processes on a database of its own, injects the fault and
waits for the cluster to recover (the same scenarios the test suite runs once each).  One line
per fault and database: runs, runs survived (every evolution applied exactly once, every
process serving, nothing the scenario forbids), duplicates found (evolution rows committed
more than once, summed over runs) and the time to recover (median and worst, from the fault to
the last process serving).  A reStructuredText table of the same figures follows, one row per
fault and one column per database (README.rst shows it under "Reliability").  Exits with
status 1 if a run did not survive.  With the defaults (2 runs) it takes about 3 minutes per
database on a 2-core machine.
"""
import pathlib
import statistics
import sys
import time

TESTS_DIR = pathlib.Path(__file__).resolve().parent.parent / 'tests'
sys.path.insert(0, str(TESTS_DIR))

import _harness  # noqa: E402  (bench/, the script's own directory)
import fault_scenarios as scenarios  # noqa: E402

RUNS = 2
SERVERS = ('postgresql', 'mysql')


class Fault:
    """One line of the table: a scenario, where it applies, and what its recovery time means."""

    def __init__(self, name, title, run, recovery, kinds=_harness.KINDS):
        self.name = name
        self.title = title
        self.run = run
        self.kinds = kinds
        self.recovery = recovery


FAULTS = [
    Fault('kill', 'leader SIGKILLed mid-evolution', scenarios.leader_killed, 'the kill'),
    Fault('pause', 'leader SIGSTOPped past its lease, then resumed', scenarios.leader_paused,
          'the SIGSTOP'),
    Fault('unreachable', 'database unreachable at start-up', scenarios.unreachable_at_start,
          'database back'),
    Fault('lost-evolution', "evolution's connection terminated",
          lambda url, workdir: scenarios.connection_lost(url, workdir, 'evolution'),
          'the termination', kinds=SERVERS),
    Fault('lost-heartbeat', "heartbeat's connection terminated",
          lambda url, workdir: scenarios.connection_lost(url, workdir, 'heartbeat'),
          'the termination', kinds=SERVERS),
    Fault('raise', 'evolution raises (on_failure=block), restart with the fix',
          lambda url, workdir: scenarios.evolution_raises(url, workdir, 'block'),
          'the restart'),
    Fault('gunicorn', 'gunicorn --preload -w 4',
          lambda url, workdir: scenarios.gunicorn_workers(url, workdir, preload=True),
          'evolution done'),
    Fault('uwsgi', 'uWSGI --py-call-uwsgi-fork-hooks, 4 workers',
          lambda url, workdir: scenarios.uwsgi_workers(url, workdir, 'fork-hooks'),
          'evolution done'),
    Fault('32-processes', '32 processes started at once',
          lambda url, workdir: scenarios.start_together(url, workdir, 32),
          'evolution done'),
    Fault('half-created', 'tables half-created, 4 processes at once',
          lambda url, workdir: scenarios.start_together(url, workdir, 4,
                                                        storage='half-created'),
          'evolution done', kinds=('sqlite', 'mysql')),
]


class Tally:
    """The runs of one fault on one database."""

    def __init__(self, fault, kind):
        self.fault = fault
        self.kind = kind
        self.runs = 0
        self.survived = 0
        self.duplicates = 0
        self.recoveries = []
        self.failures = []

    def add(self, outcome=None, error=None):
        self.runs += 1
        if error is not None:
            self.failures.append(f'{type(error).__name__}: {str(error).splitlines()[0][:200]}')
            return
        self.duplicates += outcome.duplicates
        problems = outcome.problems()
        if problems:
            self.failures.append('; '.join(problems)[:300])
        else:
            self.survived += 1
        if outcome.recovered_in is not None:
            self.recoveries.append(outcome.recovered_in)

    def recovery(self):
        if not self.recoveries:
            return '-'
        median, worst = statistics.median(self.recoveries), max(self.recoveries)
        return f'{median:.1f} s (max {worst:.1f})'

    def cell(self):
        return f'{self.survived}/{self.runs}, {self.duplicates} dup, {self.recovery()}'


def run(fault, kind, runs):
    tally = Tally(fault, kind)
    for _ in range(runs):
        with _harness.scenario(kind) as (url, workdir):
            try:
                tally.add(fault.run(url, pathlib.Path(workdir)))
            except Exception as error:  # a scenario that times out is a run that did not survive
                tally.add(error=error)
    return tally


def rst_table(tallies):
    """One row per fault, one column per database: what README.rst shows under Reliability."""
    kinds = list(dict.fromkeys(t.kind for t in tallies))
    rows = {}
    for tally in tallies:
        rows.setdefault(tally.fault, {})[tally.kind] = tally.cell()
    header = ['fault (survived/runs, duplicates, time to recover)', 'recovery from', *kinds]
    return _harness.rst_grid([header] + [[fault.title, fault.recovery,
                                          *(cells.get(k, 'n/a') for k in kinds)]
                                         for fault, cells in rows.items()])


def main(argv=None):
    p = _harness.parser(__doc__.splitlines()[0])
    p.add_argument('--runs', type=int, default=RUNS, help=f'runs per fault and database '
                                                        f'(default {RUNS})')
    p.add_argument('--faults', nargs='+', choices=[f.name for f in FAULTS],
                   default=[f.name for f in FAULTS], help='faults to inject (default: all)')
    args = p.parse_args(argv)
    kinds = _harness.selected_kinds(args.db)
    started = time.monotonic()
    tallies = []
    for fault in (f for f in FAULTS if f.name in args.faults):
        for kind in (k for k in kinds if k in fault.kinds):
            tally = run(fault, kind, args.runs)
            tallies.append(tally)
            print(f'{fault.name:15} {kind:10} runs {tally.runs:3}  survived {tally.survived:3}  '
                  f'duplicates {tally.duplicates:2}  recovered in {tally.recovery()} '
                  f'(from {fault.recovery})', flush=True)
            for failure in tally.failures:
                print(f'    not survived: {failure}', flush=True)
    print(f'\n{len(tallies)} lines in {time.monotonic() - started:.0f} s\n')
    print(rst_table(tallies))
    return 0 if all(t.survived == t.runs for t in tallies) else 1


if __name__ == '__main__':
    sys.exit(main())
