"""What operators trip over (issue 12): ``gearbox evolve`` run as a real subprocess against the
``tests/cliapp`` application, as in ``test_cli.py`` (whose helpers these tests share)."""
import collections
import getpass
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import sqlalchemy as sa

from polling import wait_until
from test_cli import (DEADLINE, IDS, OTHER, OWNER_PATTERN, SQL_DATABASES, SQLITE_ONLY,  # noqa: F401
                      cliapp, status_lines)
from tgext.evolve.backends.base import BatchCheckpoint
from tgext.evolve.errors import LeaseLost

pytestmark = pytest.mark.slow


# --- -c and -n after the verb --------------------------------------------------------------------

@SQLITE_ONLY
def test_config_and_app_name_may_follow_the_verb(cliapp):
    production = cliapp.directory / 'production.ini'
    production.write_text(cliapp.ini.read_text().replace('[app:main]', '[app:site]'))
    cliapp.ini.unlink()  # the default would fail: only the options given can make it work

    after = cliapp.gearbox('status', '-c', 'production.ini', '-n', 'site')
    assert after.returncode == 1, after
    assert status_lines(after) == {i: ('pending', 'never applied') for i in IDS}, after

    mixed = cliapp.gearbox('-c', 'production.ini', 'mark', 'seed_effects', '--app-name', 'site')
    assert mixed.returncode == 0, mixed
    assert cliapp.history()['seed_effects'].state == 'marked'

    # Given before the verb, an option is not undone by the verb's own (absent) one.
    before = cliapp.gearbox('--config', 'production.ini', '-n', 'site', 'plan')
    assert before.returncode == 0, before
    assert re.findall(r'^  \d+\. run\s+(\S+)', before.stdout, re.M) == IDS[1:], before

    wrong = cliapp.gearbox('status', '-c', 'production.ini')  # no [app:main] in it
    assert wrong.returncode == 2, wrong
    assert 'production.ini' in wrong.stderr, wrong


# --- messages and behaviours (item 11) -----------------------------------------------------------

@SQLITE_ONLY
def test_retry_of_an_unknown_id_names_it_without_suggesting_a_force_it_lacks(cliapp):
    refused = cliapp.gearbox('retry', 'nosuch')
    assert refused.returncode == 2, refused
    assert "'nosuch'" in refused.stderr and 'check the spelling' in refused.stderr, refused
    assert '--force' not in refused.stderr, refused

    mark = cliapp.gearbox('mark', 'nosuch')  # mark has --force: it is still suggested there
    assert mark.returncode == 2 and '--force' in mark.stderr, mark


@SQLITE_ONLY
def test_plan_calls_an_evolution_interrupted_only_once_its_holder_is_gone(cliapp):
    holder = cliapp.backend()
    lease = holder.acquire(OTHER, 600)
    holder.record_running(lease, 'count_slowly')

    live = cliapp.gearbox('plan')
    assert live.returncode == 0, live
    steps = dict(re.findall(r'^  \d+\. run\s+(\S+)\s+(.*)$', live.stdout, re.M))
    assert steps['count_slowly'] == f'running now, by {OTHER}: run waits for it', live
    assert 'interrupted' not in live.stdout, live
    assert f'run would first wait for the lock: held by {OTHER}' in live.stdout, live

    assert holder.release(lease)  # gone without finishing it
    gone = cliapp.gearbox('plan', '--json').json()
    reasons = {step['id']: step['reason'] for step in gone['steps']}
    assert reasons['count_slowly'] == f'interrupted while {OTHER} ran it', gone
    assert gone['wait_for'] is None


def _dead_pid():
    child = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


@SQLITE_ONLY
def test_release_lock_frees_at_once_a_lock_whose_process_on_this_host_is_gone(cliapp):
    holder = cliapp.backend()
    host = socket.gethostname()
    alive = holder.acquire(f'{host}:{os.getpid()}:a11ce', 600)  # this test process: alive
    refused = cliapp.gearbox('release-lock')
    assert refused.returncode == 2, refused
    assert holder.read_lock().owner == f'{host}:{os.getpid()}:a11ce'
    holder.release(alive)

    elsewhere = holder.acquire(f'another-host:{_dead_pid()}:e15e', 600)
    refused = cliapp.gearbox('release-lock')  # a PID of another host tells nothing here
    assert refused.returncode == 2, refused
    holder.release(elsewhere)

    pid = _dead_pid()
    dead = holder.acquire(f'{host}:{pid}:dead', 600)
    released = cliapp.gearbox('release-lock')
    assert released.returncode == 0, released
    assert (f'released the lock left by {host}:{pid}:dead (generation {dead.generation}, '
            f'process {pid} is gone from this host)') in released.stdout, released
    lock = holder.read_lock()
    assert lock.owner is None and lock.generation == dead.generation + 1
    assert re.fullmatch(OWNER_PATTERN, lock.released_by), lock.released_by
    with pytest.raises(LeaseLost):
        holder.renew(dead)
    status = cliapp.gearbox('status')
    assert re.search(rf'lock: free \(generation {lock.generation}, released by '
                     rf'{OWNER_PATTERN}\)$', status.stdout, re.M), status


@SQLITE_ONLY
def test_a_forced_release_is_logged_by_the_holder_and_shown_by_status_as_a_break(cliapp):
    pause = cliapp.directory / 'go-on'
    cliapp.configure(pause_file=pause, **{'tgext.evolve.lease': '3'})
    runner = cliapp.start('run')
    backend = cliapp.backend()
    wait_until(lambda: getattr(backend.read_history().get('count_slowly'), 'progress_done',
                               None) == 3, 'count_slowly reached 3/10', DEADLINE, 0.1)

    forced = cliapp.gearbox('release-lock', '--force')
    assert forced.returncode == 0, forced
    breaker = re.search(r'recorded as broken by (.*)$', forced.stdout, re.M).group(1)
    assert re.fullmatch(rf'{OWNER_PATTERN} \(user {re.escape(getpass.getuser())}\)', breaker)
    wait_until(lambda: 'lock lost' in runner.output('stderr'), 'the holder noticed', DEADLINE,
               0.1)
    lost = [line for line in runner.output('stderr').splitlines() if 'lock lost:' in line]
    assert f'broken by {breaker} (release-lock --force)' in lost[0], lost
    assert 'expired' not in lost[0], lost
    pause.touch()
    runner.finish()

    # Nobody takes the lock over here, so status still sees the break.
    holder = cliapp.backend()
    lease = holder.acquire(OTHER, 600)
    forced = cliapp.gearbox('release-lock', '--force')
    breaker = re.search(r'recorded as broken by (.*)$', forced.stdout, re.M).group(1)
    status = cliapp.gearbox('status')
    assert (f'lock: free (generation {lease.generation + 1}, broken by {breaker})'
            in status.stdout), status
    assert 'released by' not in status.stdout, status
    report = cliapp.gearbox('status', '--json').json()
    assert report['lock']['released_by'] == f'broken by {breaker}', report


@SQLITE_ONLY
def test_status_shows_the_state_when_a_dependency_is_missing(cliapp, monkeypatch):
    monkeypatch.setenv('CLIAPP_MAYBE_FAIL_DEPENDS_ON', 'not_plugged')
    status = cliapp.gearbox('status')
    assert status.returncode == 1, status
    lines = status_lines(status)
    assert lines['seed_effects'] == ('pending', 'never applied'), status
    state, reason = lines['maybe_fail']
    assert state == 'pending' and "depends on 'not_plugged'" in reason, status
    report = cliapp.gearbox('status', '--json')
    assert report.returncode == 1, report
    entry, = (e for e in report.json()['evolutions'] if e['id'] == 'maybe_fail')
    assert "depends on 'not_plugged'" in entry['reason']

    for verb in ('plan', 'run'):  # these still refuse: nothing may run
        refused = cliapp.gearbox(verb)
        assert refused.returncode == 2, refused
        assert "'maybe_fail' depends on 'not_plugged'" in refused.stderr, refused
    assert cliapp.effects() == collections.Counter()

    assert cliapp.gearbox('mark', '--force', 'not_plugged').returncode == 0
    status = cliapp.gearbox('status')
    assert status_lines(status)['maybe_fail'] == ('pending', 'never applied'), status


@SQL_DATABASES
def test_reading_verbs_create_no_table_on_a_fresh_database(cliapp):
    for args in (['status'], ['status', '--json'], ['plan'], ['plan', '--json'], ['history']):
        finished = cliapp.gearbox(*args)
        assert finished.returncode in (0, 1), finished
    with cliapp.engine.connect() as conn:
        tables = sa.inspect(conn).get_table_names()
    assert [t for t in tables if t.startswith('tgext_evolve')] == [], tables


# --- the final progress figure (item 13) ---------------------------------------------------------

@SQLITE_ONLY
def test_an_applied_evolution_shows_its_final_progress_not_the_last_throttled_one(cliapp):
    pause = cliapp.directory / 'go-on'
    cliapp.configure(pause_file=pause)
    runner = cliapp.start('run')
    backend = cliapp.backend()
    wait_until(lambda: getattr(backend.read_history().get('count_slowly'), 'progress_done',
                               None) == 3, 'count_slowly stored 3/10', DEADLINE, 0.1)
    pause.touch()  # then 4/10 .. 10/10 within a few milliseconds: throttled away
    assert runner.finish().returncode == 0

    record = backend.read_history()['count_slowly']
    assert (record.state, record.progress_done, record.progress_total) == ('applied', 10, 10)
    entry = cliapp.gearbox('status', '--json').json()['evolutions'][1]
    assert entry['id'] == 'count_slowly' and entry['progress']['done'] == 10, entry
    assert entry['progress']['percent'] == 100.0, entry
    details = cliapp.gearbox('history', 'count_slowly')
    assert 'progress:    10/10 (100%)' in details.stdout, details


# --- in-memory databases (item 17) ---------------------------------------------------------------

IN_MEMORY = 'warning: this application\'s database is in memory'


@SQLITE_ONLY
def test_every_command_against_an_in_memory_database_says_it_has_its_own(cliapp, monkeypatch):
    on_disk = cliapp.gearbox('status')
    assert IN_MEMORY not in on_disk.stderr, on_disk

    (cliapp.directory / 'mim.ini').write_text(
        '[app:main]\nuse = call:cliapp.config.application:make_app\nming.url = mim:///cliapp\n')
    monkeypatch.setenv('CLIAPP_MING', '1')
    mark = cliapp.gearbox('mark', '-c', 'mim.ini', 'seed_effects')
    assert mark.returncode == 0, mark
    assert IN_MEMORY in mark.stderr, mark
    status = cliapp.gearbox('status', '-c', 'mim.ini')
    assert IN_MEMORY in status.stderr, status
    # What the warning is about: the mark above went to a database that no longer exists.
    assert status_lines(status)['seed_effects'] == ('pending', 'never applied'), status

    monkeypatch.delenv('CLIAPP_MING')
    cliapp.url = 'sqlite://'
    cliapp.configure()
    memory = cliapp.gearbox('status')
    assert IN_MEMORY in memory.stderr, memory


# --- a baseline for a new install (item 16) ------------------------------------------------------

def _setup_app(cliapp):
    """``cliapp.websetup.setup_app`` called the way ``gearbox setup-app`` calls it."""
    script = ('import sys; from paste.deploy import appconfig; '
              'from cliapp.websetup import setup_app; '
              'setup_app(None, appconfig("config:" + sys.argv[1]), {})')
    return subprocess.run([sys.executable, '-c', script, str(cliapp.ini)], cwd=cliapp.directory,
                          env=cliapp.env(), capture_output=True, text=True, timeout=180)


@SQL_DATABASES
def test_websetup_baseline_records_every_evolution_on_a_new_database_only(cliapp):
    setup = _setup_app(cliapp)
    assert setup.returncode == 0, setup.stderr
    assert {i: r.state for i, r in cliapp.history().items()} == dict.fromkeys(IDS, 'marked')
    run = cliapp.gearbox('run')
    assert run.returncode == 0 and 'nothing to do' in run.stdout, run
    assert cliapp.effects() == collections.Counter()  # none of the old evolutions ran

    assert cliapp.gearbox('unmark', 'maybe_fail').returncode == 0
    again = _setup_app(cliapp)  # setup-app once more, on a database that has a history
    assert again.returncode == 0, again.stderr
    assert 'maybe_fail' not in cliapp.history()  # still pending: not skipped by the baseline


@SQLITE_ONLY
def test_mark_all_records_every_registered_evolution(cliapp):
    cliapp.configure(fail='true')
    assert cliapp.gearbox('run').returncode == 1  # two applied, maybe_fail failed
    before = cliapp.history()

    mark = cliapp.gearbox('mark', '--all')
    assert mark.returncode == 0, mark
    assert 'marked as applied: maybe_fail' in mark.stdout, mark
    assert 'already applied, left as recorded: seed_effects, count_slowly' in mark.stdout, mark
    after = cliapp.history()
    assert after['maybe_fail'].state == 'marked'
    assert after['seed_effects'] == before['seed_effects']

    for args in (['mark'], ['mark', '--all', 'seed_effects'], ['unmark', '--all']):
        refused = cliapp.gearbox(*args)
        assert refused.returncode == 2, refused


# --- batched evolutions' figures -----------------------------------------------------------------

def _batches_by_another_process(cliapp, batches):
    """The test process runs ``batches`` batches of 100 items of ``count_slowly`` as a batched
    evolution would (1000 items, 50 items/s, next batch 200) and keeps the lock."""
    holder = cliapp.backend()
    lease = holder.acquire(OTHER, 600)
    assert holder.upgrade_storage(lease)
    holder.record_batches_running(lease, 'count_slowly', 100, 1000)
    for number in range(1, batches + 1):
        holder.run_batch(lease, 'count_slowly',
                         lambda n=number: BatchCheckpoint(100, json.dumps(n * 100), False, 200,
                                                          50.0))
    return holder, lease


@SQLITE_ONLY
def test_status_and_history_show_a_batched_evolutions_figures_running_and_paused(cliapp):
    holder, lease = _batches_by_another_process(cliapp, 3)

    status = cliapp.gearbox('status')
    state, detail = status_lines(status)['count_slowly']
    assert state == 'running', status
    assert detail.endswith(', 300/1000 (30%), 3 batches (next of 200), 50 items/s, about 14 s '
                           f'left, by {OTHER}'), status
    entry = cliapp.gearbox('status', '--json').json()['evolutions'][1]
    assert entry['progress'] == {'done': 300, 'total': 1000, 'percent': 30.0, 'rate': 50.0,
                                 'eta_seconds': 14.0, 'batches': 3, 'batch_size': 200}, entry
    details = cliapp.gearbox('history', 'count_slowly')
    assert 'checkpoint:  300 (the next batch starts after it)' in details.stdout, details
    assert 'progress:    300/1000 (30%), 3 batches (next of 200)' in details.stdout, details
    assert cliapp.gearbox('history', '--json', 'count_slowly').json()[0]['checkpoint'] == '300'

    holder.record_paused(lease, 'count_slowly')
    holder.release(lease)
    paused = cliapp.gearbox('status')
    assert paused.returncode == 1, paused
    state, detail = status_lines(paused)['count_slowly']
    assert state == 'paused', paused
    assert detail == ('paused; resumes from its checkpoint (300 items done), 300/1000 (30%), '
                      '3 batches (next of 200), 50 items/s, about 14 s left'), paused
    entry = cliapp.gearbox('status', '--json').json()['evolutions'][1]
    assert (entry['state'], entry['running_now'], entry['progress']['batches']) == (
        'paused', False, 3), entry

    # An evolution that is not batched has the same keys, null.
    seed = cliapp.gearbox('status', '--json').json()['evolutions'][0]
    assert seed['progress'] is None and seed['state'] == 'pending'
