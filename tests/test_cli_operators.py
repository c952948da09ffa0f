"""``gearbox evolve pause / resume``, ``--json`` of the verbs that change state, and the audit
trail ``history ID`` shows: real gearbox subprocesses against ``tests/cliapp`` (see test_cli.py),
on SQLite, PostgreSQL and MariaDB.
"""
import collections
import getpass
import socket

import pytest

from test_cli import IDS, SQL_DATABASES, cliapp  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

REPORT_KEYS = {'verb', 'ok', 'exit_code', 'changed', 'unchanged', 'gate', 'lock', 'messages',
               'error'}


def report(finished, returncode):
    assert finished.returncode == returncode, finished
    document = finished.json()
    assert set(document) == REPORT_KEYS, document
    assert document['exit_code'] == returncode and document['ok'] == (returncode == 0)
    return document


@SQL_DATABASES
def test_pause_before_start_stops_run_until_resumed_and_the_audit_shows_who(cliapp):
    marked = report(cliapp.gearbox('mark', 'seed_effects', '--json'), 0)
    assert (marked['verb'], marked['changed'], marked['unchanged']) == (
        'mark', ['seed_effects'], [])
    assert marked['messages'] == ['marked as applied: seed_effects']

    paused = report(cliapp.gearbox('pause', 'count_slowly', '--json'), 0)
    assert (paused['changed'], paused['gate'], paused['error']) == (['count_slowly'], 'closed',
                                                                     None)
    assert paused['messages'][0] == 'paused count_slowly before it started'
    assert 'the gate stays closed (every process answers 503)' in paused['messages'][1]

    run = report(cliapp.gearbox('run', '--json'), 1)
    assert run['changed'] == [] and run['error'] == (
        'count_slowly is paused: nothing after it runs until gearbox evolve resume count_slowly')
    assert cliapp.effects() == collections.Counter()  # maybe_fail waits behind it

    refusals = {('pause', 'count_slowly'): 'pause: count_slowly is paused already',
                ('resume', 'maybe_fail'): 'resume: maybe_fail is pending, not paused',
                ('pause', 'nosuch'): "pause: no registered evolution has the id 'nosuch'"}
    before = cliapp.backend().read_history(batches=True)
    for args, message in refusals.items():
        refused = report(cliapp.gearbox(*args, '--json'), 2)
        assert refused['changed'] == [] and refused['error'].startswith(message), refused
    plain = cliapp.gearbox('pause', 'nosuch')  # the same, said on stderr without --json
    assert plain.returncode == 2 and plain.stdout == '', plain
    assert f'gearbox evolve: {refusals["pause", "nosuch"]}' in plain.stderr, plain
    assert cliapp.backend().read_history(batches=True) == before

    resumed = report(cliapp.gearbox('resume', 'count_slowly', '--json'), 0)
    assert resumed['changed'] == ['count_slowly']
    assert 'continues it' in resumed['messages'][0]
    run = report(cliapp.gearbox('run', '--json'), 0)
    assert run['changed'] == ['count_slowly', 'maybe_fail']
    assert cliapp.effects() == collections.Counter(IDS[1:])

    history = cliapp.gearbox('history', 'count_slowly')
    assert history.returncode == 0, history
    audit = history.stdout[history.stdout.index('  audit:'):].splitlines()[1:]
    user, host = getpass.getuser(), socket.gethostname()
    assert [line.split()[2] for line in audit] == ['pause', 'resume', 'started', 'applied']
    assert f'pause    by {user} on {host}: paused before it started' in audit[0], audit
    entries = cliapp.gearbox('history', 'count_slowly', '--json').json()[0]['audit']
    assert [(e['action'], e['actor'], e['host']) for e in entries][:2] == [
        ('pause', user, host), ('resume', user, host)]

    released = report(cliapp.gearbox('release-lock', '--json'), 0)
    assert released['messages'] == ['the lock is free: nothing to release']
    assert released['lock']['owner'] is None
