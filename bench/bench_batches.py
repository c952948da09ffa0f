"""Batched evolutions: what the framework costs, and what it keeps bounded (issue 14's table).

Per database, each figure against a baseline measured in the same run (``_batch_apps.py`` is
what the measuring processes run):

framework overhead
    200,000 rows, ``process()`` sets one column; median wall time of :data:`RUNS` foreground
    runs (``operations.run``, as ``gearbox evolve run``) against the median of as many runs of a
    hand-written keyset loop with the same batch size (:data:`BATCH`, fixed) committing each
    batch through the same ``DBSession``, alternated in one process.  Also as CPU time of that
    process: on a machine shared with other work the wall-time ratio of two runs swings by
    +-30 %; on SQLite, whose work is all in the process, the CPU time is the steadier figure
    (on a server database it leaves out the server's share).
bulk form
    the same with ``process_batch()`` issuing one UPDATE per batch, against the hand-written
    loop issuing that UPDATE, in batches of :data:`BULK_BATCH`; medians of :data:`BULK_RUNS`
    runs each.  A run takes 0.3 to 1 s, and a full collection of the application's heap
    (three or four of them fall in a run, 50 to 80 ms each) moves one run by 10 to 25 %: five
    runs leave the median ratio to where they fell.

Before every timed run of either loop on PostgreSQL the table is vacuumed: every run starts
from the same table, rather than from the dead rows of the run before it (200,000 per run,
which autovacuum would otherwise clear during a later run of either side).
memory
    peak RSS growth above the idle application's RSS while a ``process()`` evolution walks
    1,000,000 rows, against the same for 100,000 rows, each in a process of its own, in batches
    of :data:`MEMORY_BATCH`.
transaction length
    ``batch_seconds = 0.5``, items of a fixed cost: p50 and p95 of the batch transactions'
    durations (the session's begin to its commit) after the warm-up (the batches before the
    first one of at least half the target, the size growing from ``batch_size``).
crash cost
    a leader and a waiter (lease :data:`LEASE` s, poll_interval :data:`POLL` s); the leader is
    SIGKILLed at a random moment of the batch after half the rows are committed.  Rows whose ``n += 1`` was applied twice (or
    never) in the final state; time lost: from the kill to the waiter's first committed batch.
503 window
    a leader and a waiter started together, a 0.2 s blocking evolution and a background
    backfill: how long each answered 503 (first request to first 200), while the backfill runs.
serving under a backfill
    hello-page requests per second in the leader while its background evolution runs (default
    ``throttle``), against the same process idle (before the evolution starts and once it is
    applied, the load of a shared machine drifts); p50/p99 latency reported.

    python bench/bench_batches.py [--db ...] [--quick]

``--quick``: a tenth of the rows and fewer runs: a smoke run of every figure (the memory
figure's ratio then says little).
"""
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import time

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import _batch_apps
import _harness

RUNS = 5
#: Runs of the bulk form (each side): see the module doc.  A pair of runs differs by up to
#: +-25 %; with 15 pairs the median ratio moved by +-5 % from one invocation to the next (the
#: size of the target's margin), with 41 by about +-3 %.
BULK_RUNS = 41
BATCH = 1000
#: The bulk form's batches: the size the adaptive sizing reaches within a few batches when one
#: UPDATE of a batch takes milliseconds (the default max_batch_size).  With 1,000 the batch's
#: own UPDATE is ~2 ms on SQLite, and the checkpoint and fencing writes that commit with it
#: (the exactly-once guarantee) cost ~1 ms more.
BULK_BATCH = 10_000
#: The memory figure's batches, fixed: a batch's objects are what a walk holds, and the size the
#: adaptive sizing picks follows the speed of the moment (on a shared machine two runs pick
#: different ones).  The default max_batch_size: the most a default run ever holds.
MEMORY_BATCH = 10_000
LEASE = 3.0
POLL = 1.0
BATCH_SECONDS = 0.5
BLOCKING_SECONDS = 0.2
#: Seconds of the serving figure's loaded window (and so of its idle one).
SERVING_WINDOW = 5.0
#: Runs of the serving figure (median reported): its ratio swings most with the machine's load.
SERVING_RUNS = 3

#: Rows of each figure: (full, --quick).
ROWS = {
    'overhead': (200_000, 20_000),
    'memory': ((100_000, 1_000_000), (20_000, 200_000)),
    'batches': (150_000, 40_000),
    'crash': (100_000, 30_000),
    'window': (250_000, 40_000),
    'serving': (200_000, 60_000),
}


def rows(figure, quick):
    return ROWS[figure][1 if quick else 0]


def measure(job):
    """Run one ``_batch_apps.py`` job in a fresh process; its JSON result."""
    done = subprocess.run(_batch_apps.command(job), env=_harness.child_environment(),
                          capture_output=True, text=True, timeout=_harness.PROCESS_TIMEOUT)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f'benchmark process failed ({done.returncode}):\n{done.stderr}')
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def filled(kind, count):
    """A scenario (see ``_harness.scenario``) whose ``items`` table has ``count`` rows."""
    with _harness.scenario(kind) as (url, workdir):
        _batch_apps.fill(url, count)
        yield url, workdir


# --- framework overhead, bulk form -------------------------------------------------------------

def run_overhead(kind, quick):
    with filled(kind, rows('overhead', quick)) as (url, _):
        for form, size, runs, figure, target in (
                ('item', BATCH, RUNS, 'batches: framework overhead', 1.10),
                ('bulk', BULK_BATCH, BULK_RUNS, 'batches: bulk form overhead', 1.05)):
            times = measure(dict(mode='overhead', url=url, form=form, batch_size=size,
                                 runs=3 if quick else runs))
            for clock, suffix, what in (('', '', 'wall'), ('_cpu', ', CPU', 'CPU')):
                framework, hand = times['framework' + clock], times['hand' + clock]
                ratio = statistics.median(framework) / statistics.median(hand)
                _harness.report(figure + suffix, kind, ratio, target, 'x',
                                spread=[f / h for f, h in zip(framework, hand)],
                                detail=f'median {statistics.median(framework):.2f} s vs '
                                       f'{statistics.median(hand):.2f} s {what} hand-written, '
                                       f'{rows("overhead", quick)} rows, batches of {size}')


# --- memory ------------------------------------------------------------------------------------

def run_memory(kind, quick):
    small, large = rows('memory', quick)
    growth = {}
    for count in (small, large):
        with filled(kind, count) as (url, _):
            result = measure(dict(mode='memory', url=url, batch_size=MEMORY_BATCH))
        growth[count] = (result['peak_kb'] - result['idle_kb']) / 1024
        _harness.info(f'{count} rows: idle {result["idle_kb"] / 1024:.1f} MB, peak '
                      f'{result["peak_kb"] / 1024:.1f} MB, {result["seconds"]:.1f} s')
    _harness.report('batches: memory growth ratio', kind,
                    max(growth[large], 1.0) / max(growth[small], 1.0), 1.2, 'x',
                    detail=f'{growth[large]:.1f} MB for {large} rows vs {growth[small]:.1f} MB '
                           f'for {small} (each floored at 1 MB)')
    _harness.report('batches: memory above idle', kind, growth[large], 64, ' MB',
                    detail=f'{large} rows')


# --- transaction length ------------------------------------------------------------------------

def run_transaction_length(kind, quick):
    with filled(kind, rows('batches', quick)) as (url, _):
        result = measure(dict(mode='batches', url=url, item_cost=0.0001,
                              options=dict(batch_seconds=BATCH_SECONDS)))
    durations = result['durations']
    warm = next((i for i, d in enumerate(durations) if d >= BATCH_SECONDS / 2), len(durations))
    steady = durations[warm + 1:]
    if len(steady) < 4:
        raise RuntimeError(f'only {len(steady)} batches after the warm-up: {durations}')
    p50 = statistics.median(steady)
    p95 = statistics.quantiles(steady, n=20, method='inclusive')[-1]
    detail = (f'{len(steady)} batches after {warm + 1} of warm-up; p50 {p50:.3f} s, p95 '
              f'{p95:.3f} s, max {max(steady):.3f} s')
    _harness.report('batches: txn p50 off target', kind, abs(p50 / BATCH_SECONDS - 1) * 100,
                    30, ' %', detail=detail)
    _harness.report('batches: txn p95 / target', kind, p95 / BATCH_SECONDS, 2, 'x')


# --- clusters ----------------------------------------------------------------------------------

def start(url, workdir, name, options, evolutions, **extra):
    job = dict(mode='member', url=url, dir=workdir, name=name, options=options,
               evolutions=evolutions, **extra)
    log = open(os.path.join(workdir, f'{name}.log'), 'w')
    return subprocess.Popen(_batch_apps.command(job), env=_harness.child_environment(),
                            stdout=log, stderr=subprocess.STDOUT)


def history_row(engine, evolution_id):
    """``(state, progress_done)`` of the evolution, or None before it has a record."""
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(
                'SELECT state, progress_done FROM tgext_evolve_history WHERE evolution_id = :i'),
                dict(i=evolution_id)).first()
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):
        return None  # the table does not exist yet; SQLite: or a writer holds the file


def lock_owner_pid(engine):
    with engine.connect() as conn:
        owner = conn.execute(sa.text('SELECT owner FROM tgext_evolve_lock')).scalar()
    return int(owner.split(':')[1]) if owner else None


def calls(workdir, names):
    """process() calls every member made, read from the side channel."""
    total = 0
    for name in names:
        try:
            with open(os.path.join(workdir, f'{name}.calls'), 'rb') as f:
                total += f.read().count(b'\n')
        except FileNotFoundError:
            pass
    return total


def run_crash(kind, quick):
    count = rows('crash', quick)
    options = dict(lease=LEASE, poll_interval=POLL, batch_seconds=BATCH_SECONDS)
    evolutions = [dict(kind='batch', increments=True)]
    names = ('first', 'second')
    with filled(kind, count) as (url, workdir), _harness.cluster() as processes:
        engine = sa.create_engine(url, poolclass=NullPool)
        try:
            for name in names:
                processes.append(start(url, workdir, name, options, evolutions, stay=True))

            def half_done():
                row = history_row(engine, _batch_apps.BACKFILL_ID)
                return row is not None and (row.progress_done or 0) >= count / 2

            _harness.wait_until(half_done, 'half the rows committed', processes=processes)
            # Anywhere in the batch after the one that crossed half-way, not just after a
            # commit: the killed batch's process() calls are then (mostly) under way.
            time.sleep(random.uniform(0, BATCH_SECONDS))
            victim_pid = lock_owner_pid(engine)
            victim = next(p for p in processes if p.pid == victim_pid)
            killed_at = time.monotonic()
            os.kill(victim_pid, signal.SIGKILL)
            victim.wait()
            processes.remove(victim)
            done_at_kill = history_row(engine, _batch_apps.BACKFILL_ID).progress_done
            resumed = []

            def progressed():
                row = history_row(engine, _batch_apps.BACKFILL_ID)
                if row is not None and row.progress_done > done_at_kill and not resumed:
                    resumed.append(time.monotonic())
                return row is not None and row.state == 'applied'

            _harness.wait_until(progressed, 'the survivor to finish', processes=processes)
            with engine.connect() as conn:
                twice = conn.execute(sa.text('SELECT count(*) FROM items WHERE n > 1')).scalar()
                never = conn.execute(sa.text('SELECT count(*) FROM items WHERE n < 1')).scalar()
        finally:
            engine.dispose()
        made = calls(workdir, names)
    lost = resumed[0] - killed_at
    _harness.report('batches: crash, rows applied twice', kind, twice + never, 0,
                    detail=f'{twice} twice, {never} never, of {count}; {made - count} '
                           f'process() calls redone (the killed, uncommitted batch)')
    _harness.report('batches: crash, time lost', kind, lost, LEASE + POLL + BATCH_SECONDS, ' s',
                    detail=f'kill to the first batch committed by the survivor; lease {LEASE:g}'
                           f' s + poll_interval {POLL:g} s + one batch {BATCH_SECONDS:g} s')


def run_window(kind, quick):
    options = dict(poll_interval=POLL)
    evolutions = [dict(kind='blocking', seconds=BLOCKING_SECONDS),
                  dict(kind='batch', background=True)]
    names = ('first', 'second')
    with filled(kind, rows('window', quick)) as (url, workdir), _harness.cluster() as processes:
        engine = sa.create_engine(url, poolclass=NullPool)
        try:
            for name in names:
                processes.append(start(url, workdir, name, options, evolutions, stay=True))
            reports = _harness.wait_for_reports(workdir, names, processes)
            backfill = history_row(engine, _batch_apps.BACKFILL_ID)
        finally:
            engine.dispose()
    windows = {n: r['first_200'] - r['first_request'] for n, r in reports.items()}
    still_running = backfill is not None and backfill.state == 'running'
    _harness.report('batches: 503 window', kind, max(windows.values()),
                    BLOCKING_SECONDS + POLL + 0.2, ' s', spread=sorted(windows.values()),
                    detail=f'{BLOCKING_SECONDS:g} s blocking, poll_interval {POLL:g} s; the '
                           f'backfill {"still running" if still_running else "FINISHED"} once '
                           f'both served ({backfill.progress_done if backfill else 0} rows done)')


def serve_once(kind, quick, window):
    """One leader process measuring itself: ``(loaded, idle)`` (see ``_batch_apps``)."""
    evolutions = [dict(kind='batch', background=True)]
    with filled(kind, rows('serving', quick)) as (url, workdir), _harness.cluster() as processes:
        processes.append(start(url, workdir, 'leader', {}, evolutions, measure_serving=window))
        report, = _harness.wait_for_reports(workdir, ['leader'], processes).values()
    if not report['backfill_running_after'] and report['loaded']['seconds'] < window:
        _harness.info(f'the backfill ended {report["loaded"]["seconds"]:.1f} s into the '
                      f'{window:g} s window')
    before, after = report['idle_before'], report['idle_after']
    idle = dict(seconds=before['seconds'] + after['seconds'],
                latencies=before['latencies'] + after['latencies'])
    _harness.info(f'idle {_rate(before):.0f} req/s before the backfill, {_rate(after):.0f} '
                  f'after; {_rate(report["loaded"]):.0f} while it ran')
    return report['loaded'], idle


def _rate(part):
    return len(part['latencies']) / part['seconds']


def _percentile_ms(part, q):
    return statistics.quantiles(part['latencies'], n=100, method='inclusive')[q - 1] * 1000


def run_serving(kind, quick):
    window = SERVING_WINDOW / 2 if quick else SERVING_WINDOW
    runs = [serve_once(kind, quick, window) for _ in range(1 if quick else SERVING_RUNS)]
    ratios = [_rate(loaded) / _rate(idle) for loaded, idle in runs]
    loaded, idle = runs[ratios.index(statistics.median_low(ratios))]
    _harness.report('batches: serving under a backfill', kind, statistics.median(ratios), 0.6,
                    'x', at_least=True, spread=ratios if len(ratios) > 1 else None,
                    detail=f'median run: {_rate(loaded):.0f} vs {_rate(idle):.0f} req/s idle; '
                           f'p50 {_percentile_ms(loaded, 50):.2f} ms vs '
                           f'{_percentile_ms(idle, 50):.2f}, p99 {_percentile_ms(loaded, 99):.2f}'
                           f' ms vs {_percentile_ms(idle, 99):.2f}')


FIGURES = {'overhead': run_overhead, 'memory': run_memory, 'txn': run_transaction_length,
           'crash': run_crash, 'window': run_window, 'serving': run_serving}


def run(kind, quick=False, figures=tuple(FIGURES)):
    for figure in figures:
        FIGURES[figure](kind, quick)


def main(argv=None):
    p = _harness.parser(__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='fewer rows and runs: a smoke run')
    p.add_argument('--only', nargs='+', choices=FIGURES, default=list(FIGURES),
                   help='figures to measure (default: all)')
    args = p.parse_args(argv)
    for kind in _harness.selected_kinds(args.db):
        run(kind, args.quick, args.only)


if __name__ == '__main__':
    main()
