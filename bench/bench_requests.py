"""Cost per request: pass-through overhead, cost of a 503, database statements per request.

Three fresh processes per database, each calling a TG hello-world app through its WSGI callable:

* ``bare``: the app without tgext.evolve;
* ``evolving``: the same app with tgext.evolve, while its own runner holds the lock and runs an
  evolution (every request gets the gate's 503);
* ``ready``: the same app with tgext.evolve on the evolved database;
* ``evolving+page`` and ``ready+page``: the same two with the status page mounted at
  ``/evolve`` (the gate then also lets that path through while closed; requests go to ``/``).

Per request, after a warm-up, in the request thread: Python opcodes (``sys.settrace`` with
``f_trace_opcodes``, ``PYTHONHASHSEED=0``; deterministic), CPU time (for information) and SQL
statements sent (SQLAlchemy ``before_cursor_execute`` on every engine of the process).

    python bench/bench_requests.py [--db sqlite postgresql mysql]
"""
import statistics

import _harness

WARMUP = 50
TRACED = 200
CPU_REQUESTS = 2000

PASS_THROUGH_TARGET = 1.005
COST_OF_503_TARGET = 0.1


def _job(url, workdir, plugged, state=None, status_page=False):
    return dict(mode='opcodes', url=url, dir=workdir, plugged=plugged, state=state,
                warmup=WARMUP, requests=TRACED, cpu_requests=CPU_REQUESTS,
                status_page=status_page)


def _describe(name, measured):
    opcodes = measured['opcodes']
    spread = '' if min(opcodes) == max(opcodes) else f' ({min(opcodes)}..{max(opcodes)})'
    # The process-wide count shows the listener at work: the runner's own statements.
    _harness.info(f'{name:<9} {statistics.mean(opcodes):8.1f} opcodes/request{spread}, '
                  f'{measured["cpu_us"]:7.1f} us CPU/request, {measured["statements"]} '
                  f'statements in {measured["requests"]} requests '
                  f'({measured["statements_all_threads"]} by the whole process)')


def run(kind):
    with _harness.scenario(kind) as (url, workdir):
        # First, on the empty database: this process's runner takes the lock and evolves.
        evolving = _harness.measure(_job(url, workdir, True, state='evolving'))
        bare = _harness.measure(_job(url, workdir, False))
        ready = _harness.measure(_job(url, workdir, True))
    with _harness.scenario(kind) as (url, workdir):
        evolving_page = _harness.measure(_job(url, workdir, True, 'evolving', status_page=True))
        ready_page = _harness.measure(_job(url, workdir, True, status_page=True))
    for name, measured in (('bare', bare), ('ready', ready), ('evolving', evolving),
                           ('ready+page', ready_page), ('evolving+page', evolving_page)):
        _describe(name, measured)
    _harness.info(f'a plain WSGI 503 through the same harness: '
                  f'{evolving["plain_503_opcodes"]} opcodes')
    bare_opcodes = statistics.mean(bare['opcodes'])
    _harness.report('pass-through overhead', kind,
                    statistics.mean(ready['opcodes']) / bare_opcodes, PASS_THROUGH_TARGET, 'x',
                    detail=f'CPU {ready["cpu_us"] / bare["cpu_us"]:.3f}x (information only)')
    _harness.report('cost of a 503 / cost of a 200', kind,
                    statistics.mean(evolving['opcodes']) / bare_opcodes, COST_OF_503_TARGET, 'x')
    _harness.report('pass-through, status page mounted', kind,
                    statistics.mean(ready_page['opcodes']) / bare_opcodes, PASS_THROUGH_TARGET,
                    'x')
    _harness.report('503 / 200, status page mounted', kind,
                    statistics.mean(evolving_page['opcodes']) / bare_opcodes, COST_OF_503_TARGET,
                    'x')
    _harness.report('statements/request while evolving', kind,
                    evolving['statements'] / evolving['requests'], 0)
    _harness.report('statements/request when ready', kind,
                    ready['statements'] / ready['requests'], 0)


def main(argv=None):
    args = _harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    for kind in _harness.selected_kinds(args.db):
        run(kind)


if __name__ == '__main__':
    main()
