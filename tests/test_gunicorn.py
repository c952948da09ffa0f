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
import logging
import os
import sys
import threading

import pytest

import conftest
import fault_scenarios
import polling
from tgext.evolve import logs
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


def fork_in_thread():
    """Start a thread that forks (the child exits at once); returns (thread, forked event)."""
    forked = threading.Event()

    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        forked.set()

    thread = threading.Thread(target=fork)
    thread.start()
    return thread, forked


class BlockingHandler(logging.Handler):
    """A handler that holds its ``emit`` open, as a write to a busy stderr does."""

    def __init__(self):
        super().__init__()
        self.writing, self.finish = threading.Event(), threading.Event()

    def emit(self, record):
        self.writing.set()
        self.finish.wait(30)


def test_a_fork_waits_for_a_log_line_being_written():
    # A child forked while the parent's thread holds sys.stderr's buffer lock would block on
    # its first log line for good: seen with uWSGI.
    handler = BlockingHandler()
    logger = logging.getLogger('tgext.evolve')
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    writer = threading.Thread(target=logs.runner.info, args=('evolving %r', 'e1'))
    try:
        writer.start()
        assert handler.writing.wait(30)
        forker, forked = fork_in_thread()
        assert not forked.wait(0.5), 'forked in the middle of a log line'
        handler.finish.set()
        writer.join(30)
        forker.join(30)
        assert forked.is_set()
    finally:
        handler.finish.set()
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def test_a_thread_inside_a_call_can_log_while_a_fork_waits_for_it(caplog):
    # A backend logs from inside its gated call: waiting for the fork there would deadlock
    # (the fork waits for that very call).
    in_call, may_log, logged = threading.Event(), threading.Event(), threading.Event()

    def database_call_that_logs():
        with fork_gate.call():
            in_call.set()
            may_log.wait(30)
            logs.backend.debug('a backend line')
            logged.set()

    caplog.set_level(logging.DEBUG, logger='tgext.evolve')  # the line is written, not dropped
    caller = threading.Thread(target=database_call_that_logs)
    caller.start()
    assert in_call.wait(30)
    forker, forked = fork_in_thread()
    try:
        polling.wait_until(lambda: fork_gate._forking, 'the fork waiting for the call', 30)
        may_log.set()
        assert logged.wait(5), 'the nested log line waited for the fork that waits for it'
    finally:
        may_log.set()
        caller.join(30)
        forker.join(30)
    assert forked.is_set()
    assert 'a backend line' in caplog.messages


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
