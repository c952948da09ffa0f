"""What every ``bench_*.py`` script shares: databases, child processes, result lines.

Databases
    ``sqlite`` always; ``postgresql`` and ``mysql`` when ``TGEXT_EVOLVE_TEST_POSTGRES_URL`` /
    ``TGEXT_EVOLVE_TEST_MYSQL_URL`` are set (the same variables as the test suite).  Every
    scenario gets a database of its own, created for it and dropped afterwards.
Processes
    every figure is measured in fresh processes running ``_apps.py``; their bytecode is cached
    under :data:`PYCACHE` (as in a deployment) even where ``PYTHONDONTWRITEBYTECODE`` is set.
Results
    :func:`report` prints one line per figure: what, database, value, target, PASS/FAIL, and
    the spread over repeated runs where there is one.
"""
import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import _apps

sys.path.append(_apps.TESTS_DIR)
import polling  # noqa: E402 - tests/polling.py, the one wait-until helper

SERVER_VARIABLES = {
    'postgresql': 'TGEXT_EVOLVE_TEST_POSTGRES_URL',
    'mysql': 'TGEXT_EVOLVE_TEST_MYSQL_URL',
}
KINDS = ('sqlite', 'postgresql', 'mysql')
PYCACHE = os.path.join(tempfile.gettempdir(), 'tgext-evolve-bench-pycache')
#: Seconds a benchmark process may take before the scenario is abandoned.
PROCESS_TIMEOUT = 600

#: Every figure reported in this run, for run_all's summary.
results = []


# --- command line ------------------------------------------------------------------------------

def parser(description):
    """The options every bench script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--db', nargs='+', choices=KINDS, default=None,
                   help='databases to run on (default: sqlite, and postgresql/mysql when their '
                        'TGEXT_EVOLVE_TEST_*_URL variable is set)')
    return p


def run_scenarios(description, run, runs, waiters, argv=None):
    """The ``main`` of a multi-process bench script: ``run(kind, runs, waiters)`` per database."""
    p = parser(description)
    p.add_argument('--runs', type=int, default=runs, help='runs per database (median reported)')
    p.add_argument('--waiters', type=int, default=waiters, help='waiting processes')
    args = p.parse_args(argv)
    for kind in selected_kinds(args.db):
        run(kind, args.runs, args.waiters)


def selected_kinds(requested):
    """The databases to run on; a requested server without its variable is an error."""
    if requested is None:
        return [k for k in KINDS if k == 'sqlite' or os.environ.get(SERVER_VARIABLES[k])]
    for kind in requested:
        if kind != 'sqlite' and not os.environ.get(SERVER_VARIABLES[kind]):
            raise SystemExit(f'--db {kind}: set {SERVER_VARIABLES[kind]} to the server URL')
    return list(requested)


# --- databases ---------------------------------------------------------------------------------

@contextlib.contextmanager
def scenario(kind):
    """``(url, workdir)``: a new empty database of ``kind`` and a scratch directory."""
    workdir = tempfile.mkdtemp(prefix=f'tgext-evolve-bench-{kind}-')
    name = f'tgext_evolve_bench_{secrets.token_hex(4)}'
    try:
        if kind == 'sqlite':
            yield f'sqlite:///{os.path.join(workdir, name)}.sqlite', workdir
            return
        server = os.environ[SERVER_VARIABLES[kind]]
        admin = sa.create_engine(server, isolation_level='AUTOCOMMIT', poolclass=NullPool)
        quote = admin.dialect.identifier_preparer.quote
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE {quote(name)}')
        try:
            yield make_url(server).set(database=name).render_as_string(hide_password=False), \
                workdir
        finally:
            force = ' WITH (FORCE)' if kind == 'postgresql' else ''
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS {quote(name)}{force}')
            admin.dispose()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- processes ---------------------------------------------------------------------------------

def child_environment():
    """Deterministic hashing (``PYTHONHASHSEED=0``), unbuffered output, cached bytecode."""
    env = dict(os.environ, PYTHONHASHSEED='0', PYTHONUNBUFFERED='1')
    env.pop('PYTHONDONTWRITEBYTECODE', None)
    env['PYTHONPYCACHEPREFIX'] = PYCACHE
    return env


def measure(job, wrapper=()):
    """Run one measuring job (``opcodes``, ``startup``) in a fresh process; its JSON result.

    ``wrapper``: the argv of a program that runs the process (valgrind and its options).
    """
    done = subprocess.run([*wrapper, *_apps.command(job)], env=child_environment(),
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f'benchmark process failed ({done.returncode}):\n{done.stderr}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_member(url, workdir, name, options, reports_progress=False):
    """Start one cluster member (``_apps.py`` mode ``member``); returns the Popen."""
    job = dict(mode='member', url=url, dir=workdir, name=name, options=options,
               reports_progress=reports_progress)
    log = open(os.path.join(workdir, f'{name}.log'), 'w')
    return subprocess.Popen(_apps.command(job), env=child_environment(), stdout=log,
                            stderr=subprocess.STDOUT)


def member_phase(workdir, name):
    """The last phase a member wrote, or None."""
    try:
        with open(os.path.join(workdir, f'{name}.phase')) as f:
            return json.load(f)['phase']
    except FileNotFoundError:
        return None


def member_report(workdir, name):
    """A member's final report (see ``_apps.run_member``), or None if it has not finished."""
    try:
        with open(os.path.join(workdir, f'{name}.json')) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def wait_until(predicate, what, timeout=PROCESS_TIMEOUT, processes=()):
    """Poll ``predicate`` until true; fail on timeout or as soon as one of ``processes`` died
    (waiting on for a dead member would only end at the timeout)."""
    def condition():
        for process in processes:
            if process.poll() not in (None, 0):
                raise RuntimeError(f'benchmark process {process.pid} exited with '
                                   f'{process.returncode} while waiting for {what}')
        return predicate()

    polling.wait_until(condition, what, timeout, interval=0.05)


@contextlib.contextmanager
def cluster():
    """A list to put started Popens in; whatever is still running at the end is killed."""
    processes = []
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for process in processes:
            process.wait()


def start_leader_and_waiters(url, workdir, options, names, processes):
    """Start a leader, wait until it evolves, then start ``names`` and wait until they wait.

    Every Popen goes into ``processes``; returns the leader's.
    """
    leader = start_member(url, workdir, 'leader', options)
    processes.append(leader)
    wait_until(lambda: member_phase(workdir, 'leader') == 'evolving',
               'the leader to start evolving', processes=processes)
    processes.extend(start_member(url, workdir, name, options) for name in names)
    wait_until(lambda: all(member_phase(workdir, n) == 'waiting' for n in names),
               f'{len(names)} members to wait', processes=processes)
    return leader


def wait_for_reports(workdir, names, processes):
    """Every member's final report, once all of ``names`` have written theirs."""
    wait_until(lambda: all(member_report(workdir, n) is not None for n in names),
               'every member to serve', processes=processes)
    return {n: member_report(workdir, n) for n in names}


def finish_evolution(workdir):
    """Let the benchmark evolution return (see ``_apps.blocking_evolution``)."""
    open(_apps.finish_path(workdir), 'w').close()


# --- results -----------------------------------------------------------------------------------

def report(figure, kind, value, target, unit='', spread=None, detail='', at_least=False):
    """Print and record one figure: PASS when ``value <= target`` (``value >= target`` with
    ``at_least``)."""
    passed = value >= target if at_least else value <= target
    relation = '>=' if at_least else '<='
    runs = f'  (runs: {", ".join(format_value(v) for v in spread)})' if spread else ''
    print(f'{figure:<34} {kind:<10} {format_value(value):>9}{unit:<3} '
          f'target {relation} {format_value(target)}{unit:<3} {"PASS" if passed else "FAIL"}'
          f'{runs}{"  " + detail if detail else ""}', flush=True)
    results.append(dict(figure=figure, db=kind, value=value, target=target, unit=unit.strip(),
                        passed=passed, spread=spread, detail=detail, relation=relation,
                        at_least=at_least))
    return passed


def info(text):
    """A line of context that is not a figure."""
    print(f'    {text}', flush=True)


def format_value(value, digits=5):
    """A figure as printed: integers as such, others to ``digits`` significant digits."""
    if float(value).is_integer():
        return str(int(value))
    return f'{value:.{digits}g}' if abs(value) < 10 else f'{value:.1f}'


def rst_grid(rows):
    """``rows`` (the first is the header) as a reStructuredText grid table, for README.rst."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = '+' + '+'.join('-' * (w + 2) for w in widths) + '+'

    def line(cells):
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'

    out = [rule, line(rows[0]), rule.replace('-', '=')]
    for row in rows[1:]:
        out += [line(row), rule]
    return '\n'.join(out)
