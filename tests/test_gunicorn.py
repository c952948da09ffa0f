"""Real gunicorn and uWSGI servers running the application with 4 workers (issue 4, item 6).

With ``--preload`` gunicorn builds the application in its master and forks the workers: the
evolution thread started by the master does not exist in the workers, so tgext.evolve restarts
it lazily in each one (on its first request while closed) after disposing of the inherited
engine connections, and forks wait for the master's database calls in flight
(``tgext/evolve/forking.py``).  Without ``--preload`` every worker builds its own application
and races for the lock like any other process.  Either way every worker must answer 503 while
``e2`` holds and 200 after, and each evolution must run once.  uWSGI runs in the two modes
README.rst recommends: ``--lazy-apps`` (like gunicorn without ``--preload``) and
``--py-call-uwsgi-fork-hooks`` (like gunicorn with it).
"""
import os
import sys
import threading

import pytest

import conftest
import fault_scenarios
from tgext.evolve.forking import fork_gate

WORKERS = 4

pytestmark = pytest.mark.slow


def test_gunicorn_preload_workers_restart_the_thread_and_serve_after(sql_url, tmp_path):
    outcome = fault_scenarios.gunicorn_workers(sql_url, tmp_path, preload=True,
                                               workers=WORKERS)

    # Also: each worker served exactly 503 then 200, logged its restart of the evolution
    # thread, and nothing logged an error or a tgext.evolve warning.
    assert outcome.problems() == []
    assert len(outcome.observed) == WORKERS
    assert outcome.measures['restarted'] == set(outcome.measures['worker_pids'])
    assert outcome.side_effects == {'e1': 1, 'e2': 1, 'e3': 1}


def test_gunicorn_without_preload_workers_race_for_the_lock(sqlite_database_url, tmp_path):
    conftest.empty_sql_database(sqlite_database_url)
    outcome = fault_scenarios.gunicorn_workers(sqlite_database_url, tmp_path, preload=False,
                                               workers=WORKERS)

    assert outcome.problems() == []
    assert len(outcome.observed) == WORKERS
    assert outcome.measures['restarted'] == set()  # each worker built its own application
    assert outcome.side_effects == {'e1': 1, 'e2': 1, 'e3': 1}


def test_a_fork_waits_for_the_database_call_in_flight():
    in_call, finish_call, forked = threading.Event(), threading.Event(), threading.Event()

    def database_call():
        with fork_gate.call():
            in_call.set()
            finish_call.wait(30)

    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        forked.set()

    caller = threading.Thread(target=database_call)
    caller.start()
    assert in_call.wait(30)
    forker = threading.Thread(target=fork)
    forker.start()
    try:
        assert not forked.wait(0.5), 'forked in the middle of a database call'
    finally:
        finish_call.set()
        caller.join(30)
        forker.join(30)
    assert forked.is_set()


# --- uWSGI ----------------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='the test extra installs uWSGI (pyuwsgi wheels) on Linux only')
@pytest.mark.parametrize('mode', ['lazy-apps', 'fork-hooks'])
def test_uwsgi_workers_serve_after_the_evolutions_in_the_recommended_modes(sqlite_database_url,
                                                                           tmp_path, mode):
    # README's uWSGI settings, run for real: --lazy-apps, or the master's application with
    # CPython's fork hooks called around each fork (--py-call-uwsgi-fork-hooks).
    conftest.empty_sql_database(sqlite_database_url)
    outcome = fault_scenarios.uwsgi_workers(sqlite_database_url, tmp_path, mode,
                                            workers=WORKERS)

    assert outcome.problems() == []
    assert len(outcome.observed) == WORKERS
    if mode == 'fork-hooks':
        assert outcome.measures['restarted'] == set(outcome.measures['worker_pids'])
    else:
        assert outcome.measures['restarted'] == set()
    assert outcome.side_effects == {'e1': 1, 'e2': 1, 'e3': 1}
