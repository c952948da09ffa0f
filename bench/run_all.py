"""Every performance figure of tgext.evolve, on every configured database, then a summary table.

    TGEXT_EVOLVE_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test \\
    TGEXT_EVOLVE_TEST_MYSQL_URL=mysql+pymysql://root@127.0.0.1:3306/test \\
    python bench/run_all.py [--db sqlite postgresql mysql] [--runs N] [--rounds N] [--quick]

Each figure is a ratio against, or a count compared with, a baseline measured in the same run.
The summary at the end is a reStructuredText table.  Exits with status 1 if a figure missed
its target.  Takes about 10-12 minutes per database on a 2-core machine (the batched
evolutions' figures about 5 of them).
"""
import sys

import _harness
import bench_batches
import bench_cluster
import bench_parallel
import bench_requests
import bench_startup
import bench_takeover


def _cell(result):
    def short(value):
        # A ratio near 1 needs its small excess shown (1.0023); anything else, 3 digits.
        near_one = result['unit'] == 'x' and abs(value - 1) <= 0.01
        return _harness.format_value(value, digits=5 if near_one else 3)

    value = short(result['value'])
    runs = result['spread']
    if runs and len(runs) > 1:
        value += f' ({short(min(runs))}..{short(max(runs))})'
    return value if result['passed'] else f'{value} FAIL'


def summary():
    """The figures as a reStructuredText grid table: one row per figure, one column per db."""
    kinds = list(dict.fromkeys(r['db'] for r in _harness.results))
    rows = {}
    for r in _harness.results:
        target = f'{r["relation"]} {_harness.format_value(r["target"])} {r["unit"]}'.rstrip()
        rows.setdefault(r['figure'], {'target': target})[r['db']] = _cell(r)
    header = ['figure', 'target', *kinds]
    return _harness.rst_grid([header] + [[figure, row['target'], *(row.get(k, '') for k in kinds)]
                                         for figure, row in rows.items()])


def main(argv=None):
    p = _harness.parser(__doc__.splitlines()[0])
    p.add_argument('--runs', type=int, default=bench_cluster.RUNS,
                   help='runs of each multi-process scenario (median reported)')
    p.add_argument('--rounds', type=int, default=bench_startup.ROUNDS,
                   help='start-up rounds per variant (mean of the fastest quarter reported)')
    p.add_argument('--quick', action='store_true',
                   help='batched evolutions on a tenth of the rows (bench_batches --quick)')
    args = p.parse_args(argv)
    for kind in _harness.selected_kinds(args.db):
        print(f'--- {kind} ---', flush=True)
        bench_requests.run(kind)
        bench_startup.run(kind, args.rounds)
        bench_takeover.run(kind, args.runs)
        bench_cluster.run(kind, args.runs)
        bench_batches.run(kind, args.quick)
        bench_parallel.run(kind, args.runs)
    print()
    print(summary())
    return 0 if all(r['passed'] for r in _harness.results) else 1


if __name__ == '__main__':
    sys.exit(main())
