"""Start-up on an evolved database: app creation to first 200, with vs without tgext.evolve.

Per database: evolve a new database once, then start the hello-world app in fresh processes,
alternating bare / with tgext.evolve, :data:`ROUNDS` times each (after one warm-up pair that
is not counted).  Each process measures, on its own clock, the seconds from the start of
``make_wsgi_app`` (TG's "make_app": app creation) to the first 200 of a request through the
WSGI callable.  With tgext.evolve the first request waits for the runner's first look at the
database, so that read is included.  Wall-clock time on a shared machine is noisy, and other
processes only ever add to it: the figure is the ratio of the means of the fastest quarter of
the start-ups of each variant (the ratios of the single fastest and of the medians are shown
beside it; the single fastest swung by +-10 % from one run to the next).  Beside it too: the
Python opcodes executed from app creation to the first 200 in all threads, counted once per
variant; deterministic, but blind to C code and to waiting on the database (a driver's
connection set-up).

Second figure, from one more process per variant run under valgrind's callgrind (skipped where
valgrind is not installed): the machine instructions from app creation to the first 200, in
every thread, C code included (a driver's TLS set-up, SQLite opening its file).  The same from
one run to the next (to about 0.01 %), so it says what the start-up *work* costs, free of the
machine's noise; what it leaves out is waiting (for the database server to set up a
connection), which only the timed figure sees.

Also shown, for information: the seconds the process spends before app creation importing
tgext.evolve and calling ``plugme`` (what the application's ``app_cfg.py`` does on import).

    python bench/bench_startup.py [--db ...] [--rounds N]
"""
import glob
import os
import shutil
import statistics
import tempfile

import _apps
import _harness

ROUNDS = 40
TARGET = 1.05


#: What ``/`` does (see ``_apps.make_configurator``): the hello world never opens a database
#: connection, so with it tgext.evolve's first look pays the process's first connection alone;
#: a page that reads the database pays that connection with or without tgext.evolve.
PAGES = ('hello', 'query')


def _job(url, workdir, plugged, page, mode='startup'):
    return dict(mode=mode, url=url, dir=workdir, plugged=plugged, page=page)


def evolve_database(url, workdir):
    """Apply the benchmark evolution to a new database, in a process of its own."""
    _harness.finish_evolution(workdir)
    with _harness.cluster() as processes:
        processes.append(_harness.start_member(url, workdir, 'evolver', {}))
        report = _harness.wait_for_reports(workdir, ['evolver'], processes)['evolver']
    if report['first_200'] is None:
        raise RuntimeError('the evolver never served a 200')


def callgrind_command(out_file):
    """valgrind counting instructions between the marks of ``_apps`` mode startup_instructions."""
    return ['valgrind', '--tool=callgrind', f'--callgrind-out-file={out_file}',
            f'--zero-before={_apps.CALLGRIND_START_MARK}',
            f'--dump-before={_apps.CALLGRIND_END_MARK}']


def count_instructions(url, workdir, plugged, page):
    """``(instructions, requests)`` from app creation to the first 200 in every thread, C code
    included (callgrind); None where valgrind is not installed."""
    if shutil.which('valgrind') is None:
        return None
    out_dir = tempfile.mkdtemp(prefix='callgrind-', dir=workdir)
    try:
        result = _harness.measure(_job(url, workdir, plugged, page, 'startup_instructions'),
                                  wrapper=callgrind_command(os.path.join(out_dir, 'out.%p')))
        # One dump, written when the end mark was entered: anything else means a mark was hit
        # where it should not have been, and the count would not be the span.
        dumps = glob.glob(os.path.join(out_dir, 'out.*.*'))
        if len(dumps) != 1:
            raise RuntimeError(f'callgrind: expected one dump, got {len(dumps)}')
        with open(dumps[0]) as f:
            for line in f:
                if line.startswith('summary:'):
                    return int(line.split()[1]), result['requests']
        raise RuntimeError(f'callgrind: no summary line in {dumps[0]}')
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def fastest_quarter(values):
    """The mean of the fastest quarter of ``values``: steadier than the single fastest, and
    like it, free of the slow runs other processes cause."""
    values = sorted(values)
    fastest = values[:max(1, len(values) // 4)]
    return sum(fastest) / len(fastest)


def _milliseconds(runs, key, summary=fastest_quarter):
    return 1e3 * summary([m[key] for m in runs])


def measure_page(kind, url, workdir, page, rounds):
    """Alternate bare / with tgext.evolve ``rounds`` times; report the ratio of the fastest
    quarters.

    Another process on the machine can only make a start-up slower, never faster, so the
    fastest runs are the best estimate of what start-up costs by itself.
    """
    measured = {False: [], True: []}
    for plugged in (False, True):  # warm-up: bytecode cache, OS caches
        _harness.measure(_job(url, workdir, plugged, page))
    for round_number in range(rounds):
        # Alternate who goes first, so that a slow spell hurts both alike.
        order = (False, True) if round_number % 2 == 0 else (True, False)
        for plugged in order:
            measured[plugged].append(_harness.measure(_job(url, workdir, plugged, page)))
    for plugged, runs in measured.items():
        _harness.info(
            f'{page:<5} {"evolve" if plugged else "bare":<6} fastest quarter '
            f'{_milliseconds(runs, "seconds"):6.1f} ms to first 200 (fastest '
            f'{_milliseconds(runs, "seconds", min):.1f}, median '
            f'{_milliseconds(runs, "seconds", statistics.median):.1f}); make_wsgi_app '
            f'{_milliseconds(runs, "make_wsgi_app"):.1f} ms, first request '
            f'{_milliseconds(runs, "first_request"):.1f} ms, CPU {_milliseconds(runs, "cpu"):.1f}'
            f' ms; before it, imports + plugme {_milliseconds(runs, "configure"):.1f} ms')

    def ratio(key, summary=fastest_quarter):
        return (_milliseconds(measured[True], key, summary)
                / _milliseconds(measured[False], key, summary))

    # Deterministic, so one process each is enough: what is work and what is waiting.
    opcodes = {plugged: _harness.measure(_job(url, workdir, plugged, page, 'startup_opcodes'))
               ['opcodes'] for plugged in (False, True)}
    _harness.report(f'start-up, {page} page', kind, ratio('seconds'), TARGET, 'x',
                    detail=f'fastest alone {ratio("seconds", min):.3f}x, medians '
                           f'{ratio("seconds", statistics.median):.3f}x, CPU '
                           f'{ratio("cpu"):.3f}x, Python opcodes {opcodes[True]:,} / '
                           f'{opcodes[False]:,} = {opcodes[True] / opcodes[False]:.3f}x '
                           f'(information only)')
    counted = {plugged: count_instructions(url, workdir, plugged, page)
               for plugged in (False, True)}
    if None in counted.values():
        _harness.info('valgrind is not installed: start-up instructions not counted')
        return
    (bare, _), (evolve, requests) = counted[False], counted[True]
    retried = f'; the first 200 came at request {requests}' if requests > 1 else ''
    _harness.report(f'start-up instructions, {page} page', kind, evolve / bare, TARGET, 'x',
                    detail=f'{evolve:,} / {bare:,} machine instructions (callgrind), waits not '
                           f'included{retried}')


def run(kind, rounds=ROUNDS, pages=PAGES):
    with _harness.scenario(kind) as (url, workdir):
        evolve_database(url, workdir)
        for page in pages:
            measure_page(kind, url, workdir, page, rounds)


def main(argv=None):
    p = _harness.parser(__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=ROUNDS)
    p.add_argument('--page', nargs='+', choices=PAGES, default=PAGES)
    args = p.parse_args(argv)
    for kind in _harness.selected_kinds(args.db):
        run(kind, args.rounds, args.page)


if __name__ == '__main__':
    main()
