"""``gearbox evolve``: every verb run as a real subprocess against a real application .ini.

The application is ``tests/cliapp`` (a small quickstart-shaped TurboGears project whose
evolutions write rows to ``cliapp_effects``); each test writes its ``development.ini`` into a
temporary directory and runs the installed ``gearbox`` script there, on SQLite, PostgreSQL and
MariaDB.  The test process plays "another process" where one is needed, by holding the lock
through a backend of its own.
"""
import collections
import fcntl
import getpass
import json
import os
import pathlib
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from tgext.evolve.backends.sqlalchemy import SQLAlchemyBackend
from tgext.evolve.errors import LeaseLost

TESTS_DIR = pathlib.Path(__file__).resolve().parent
GEARBOX = pathlib.Path(sys.executable).parent / 'gearbox'
IDS = ['seed_effects', 'count_slowly', 'maybe_fail']
#: Seconds one gearbox invocation may take on a loaded CI machine.
COMMAND_TIMEOUT = 180
#: Seconds to wait for something another process does.
DEADLINE = 90
#: Lock holder the test process pretends to be.
OTHER = 'elsewhere:1:cafe'
OWNER_PATTERN = rf'{re.escape(socket.gethostname())}:\d+:[0-9a-f]+'

SQL_DATABASES = pytest.mark.parametrize('sql_url', ['sqlite', 'postgresql', 'mysql'],
                                        indirect=True)
SQLITE_ONLY = pytest.mark.parametrize('sql_url', ['sqlite'], indirect=True)

pytestmark = pytest.mark.slow

INI = '''[DEFAULT]
debug = false

[app:main]
use = call:cliapp.config.application:make_app
sqlalchemy.url = {url}
tgext.evolve.poll_interval = 0.2
{extra}
'''


class Finished:
    """What a gearbox invocation did."""

    def __init__(self, args, returncode, stdout, stderr):
        self.args = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self):
        return (f'<gearbox {" ".join(self.args)} -> {self.returncode}>\n--- stdout\n'
                f'{self.stdout}--- stderr\n{self.stderr}')

    def json(self):
        return json.loads(self.stdout)


class Background:
    """A gearbox invocation still running, with its output collected as it comes."""

    def __init__(self, args, popen):
        self.args = args
        self.popen = popen
        self._output = {'stdout': [], 'stderr': []}
        self._changed = threading.Condition()
        self._pumps = [threading.Thread(target=self._pump, args=(name, getattr(popen, name)),
                                        daemon=True) for name in self._output]
        for pump in self._pumps:
            pump.start()

    def _pump(self, name, stream):
        for line in stream:
            with self._changed:
                self._output[name].append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self, name='stdout'):
        with self._changed:
            return ''.join(self._output[name])

    def wait_for_output(self, pattern, timeout=DEADLINE):
        """Block until stdout matches ``pattern`` (regex); fail if the process ends first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                stdout = ''.join(self._output['stdout'])
                if re.search(pattern, stdout):
                    return stdout
                if self.popen.poll() is not None and not any(p.is_alive() for p in self._pumps):
                    pytest.fail(f'{self.args} ended without printing {pattern!r}:\n'
                                f'{stdout}\n{self.output("stderr")}')
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f'{self.args} did not print {pattern!r} within {timeout} s:\n'
                                f'{stdout}\n{"".join(self._output["stderr"])}')
                self._changed.wait(min(left, 0.5))

    def finish(self, timeout=COMMAND_TIMEOUT):
        self.popen.wait(timeout)
        for pump in self._pumps:
            pump.join(timeout)
        return Finished(self.args, self.popen.returncode, self.output(), self.output('stderr'))

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(30)


class CliApp:
    """The test application in a directory of its own, and ways to look at its database."""

    def __init__(self, url, directory):
        self.url = url
        self.directory = directory
        self.engine = sa.create_engine(url, poolclass=NullPool)
        self._backends = []
        self._background = []
        self.configure()

    def configure(self, **options):
        """(Re)write development.ini; ``options`` become ``cliapp.<key>`` or raw lines."""
        extra = '\n'.join(f'{k if "." in k else "cliapp." + k} = {v}' for k, v in options.items())
        self.ini = self.directory / 'development.ini'
        self.ini.write_text(INI.format(url=self.url, extra=extra))

    def env(self):
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(TESTS_DIR),
                                                          env.get('PYTHONPATH')]))
        env.pop('COLUMNS', None)
        return env

    def command(self, args, without_tqdm=False):
        if without_tqdm:
            # The real gearbox entry point, in an interpreter where tqdm cannot be imported.
            prelude = ("import sys; sys.modules['tqdm'] = None; from gearbox.main import main; "
                       "sys.exit(main())")
            return [sys.executable, '-c', prelude, 'evolve', *args]
        return [str(GEARBOX), 'evolve', *args]

    def gearbox(self, *args):
        """Run ``gearbox evolve ARGS`` in the app's directory and wait for it."""
        done = subprocess.run(self.command(args), cwd=self.directory, env=self.env(),
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        return Finished(args, done.returncode, done.stdout, done.stderr)

    def start(self, *args):
        """Start ``gearbox evolve ARGS`` and return at once."""
        popen = subprocess.Popen(self.command(args), cwd=self.directory, env=self.env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        background = Background(args, popen)
        self._background.append(background)
        return background

    def on_terminal(self, *args, without_tqdm=False):
        """Run ``gearbox evolve ARGS`` with stdout and stderr on a 100-column pseudo-terminal."""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 30, 100, 0, 0))
        popen = subprocess.Popen(self.command(args, without_tqdm), cwd=self.directory,
                                 env=self.env(), stdin=subprocess.DEVNULL, stdout=slave,
                                 stderr=slave)
        os.close(slave)
        output = bytearray()
        deadline = time.monotonic() + COMMAND_TIMEOUT
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 1.0)
                if not ready:
                    continue
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
        finally:
            os.close(master)
            popen.wait(COMMAND_TIMEOUT)
        return Finished(args, popen.returncode, output.decode('utf-8', 'replace'), '')

    # -- the database, read directly --

    def effects(self):
        """How many times each evolution's work was committed."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table('cliapp_effects'):
                return collections.Counter()
            rows = conn.execute(sa.text('SELECT evolution_id FROM cliapp_effects')).scalars()
            return collections.Counter(rows)

    def history(self):
        return self.backend().read_history()

    def backend(self):
        """A backend of the test process: "another process" as far as the CLI can tell."""
        backend = SQLAlchemyBackend(sa.create_engine(self.url, poolclass=NullPool))
        backend.ensure_storage()
        self._backends.append(backend)
        return backend

    def close(self):
        for background in self._background:
            background.kill()
        for backend in self._backends:
            backend.engine.dispose()
        self.engine.dispose()


@pytest.fixture
def cliapp(sql_url, tmp_path):
    app = CliApp(sql_url, tmp_path)
    yield app
    app.close()


def status_lines(finished):
    """``{evolution_id: (state, detail)}`` from the text of ``status``."""
    lines = {}
    for line in finished.stdout.splitlines():
        match = re.match(r'  (\S+)\s+(pending|running|paused|applied|failed|adopted|marked)\s+(.*)$',
                         line)
        if match:
            lines[match.group(1)] = (match.group(2), match.group(3))
    return lines


# --- reading and running ---------------------------------------------------------------------

@SQL_DATABASES
def test_run_applies_what_status_and_plan_show_pending_exactly_once(cliapp):
    status = cliapp.gearbox('status')
    assert status.returncode == 1, status
    assert status_lines(status) == {i: ('pending', 'never applied') for i in IDS}, status
    assert 'lock: never taken' in status.stdout, status

    plan = cliapp.gearbox('plan')
    assert plan.returncode == 0, plan
    steps = re.findall(r'^  \d+\. (\w+)\s+(\S+)\s+(.*)$', plan.stdout, re.M)
    assert steps == [('run', i, 'never applied') for i in IDS], plan

    run = cliapp.gearbox('run')  # -c defaults to development.ini
    assert run.returncode == 0, run
    assert f'applied 3 evolution(s): {", ".join(IDS)}' in run.stdout, run
    # Not a terminal: plain progress lines instead of a bar.
    assert 'count_slowly: 10/10 (100%)' in run.stdout, run
    assert cliapp.effects() == collections.Counter(IDS)

    history = cliapp.history()
    status = cliapp.gearbox('status', '--json')
    assert status.returncode == 0, status
    report = status.json()
    assert report['ok'] is True
    assert [(e['id'], e['state'], e['attempts']) for e in report['evolutions']] == [
        (i, 'applied', 1) for i in IDS]
    run_owner = history['seed_effects'].owner
    assert re.fullmatch(OWNER_PATTERN, run_owner)
    assert {e['owner'] for e in report['evolutions']} == {run_owner}
    assert report['lock']['owner'] is None and report['lock']['held'] is False

    again = cliapp.gearbox('run')
    assert again.returncode == 0, again
    assert 'nothing to do: all 3 evolutions are applied' in again.stdout, again
    assert cliapp.effects() == collections.Counter(IDS)


#: The keys of every entry of ``status --json``, registered or not, whatever its state.
ENTRY_KEYS = {'id', 'registered', 'state', 'reason', 'running_now', 'attempts', 'started_at',
              'finished_at', 'duration_ms', 'owner', 'generation', 'error', 'progress',
              'ranges'}


@SQLITE_ONLY
def test_status_json_gives_every_entry_one_schema_with_nulls_where_unknown(cliapp):
    pending = cliapp.gearbox('status', '--json')
    assert pending.returncode == 1, pending
    report = pending.json()
    assert report['ok'] is False and report['lock'] is None and report['unregistered'] == []
    for entry in report['evolutions']:
        assert set(entry) == ENTRY_KEYS, entry
        assert entry == dict.fromkeys(ENTRY_KEYS) | {
            'id': entry['id'], 'registered': True, 'state': 'pending',
            'reason': 'never applied', 'running_now': False, 'attempts': 0}

    # A baseline of the first one, and a record of an id this release does not register.
    marked = cliapp.gearbox('mark', '--force', 'seed_effects', 'dropped_last_release')
    assert marked.returncode == 0, marked
    report = cliapp.gearbox('status', '--json').json()
    entries = report['evolutions'] + report['unregistered']
    assert all(set(entry) == ENTRY_KEYS for entry in entries), entries
    seed, = (e for e in report['evolutions'] if e['id'] == 'seed_effects')
    assert (seed['state'], seed['reason'], seed['error'], seed['progress']) == (
        'marked', None, None, None)
    assert seed['finished_at'] is not None and re.fullmatch(OWNER_PATTERN, seed['owner'])
    dropped, = report['unregistered']
    assert (dropped['id'], dropped['registered'], dropped['state'], dropped['reason'],
            dropped['running_now']) == ('dropped_last_release', False, 'marked', None, False)
    assert set(report['lock']) == {'name', 'owner', 'held', 'generation', 'acquired_at',
                                   'renewed_at', 'expires_at', 'expires_in', 'released_by'}


@SQL_DATABASES
def test_a_failed_evolution_fails_the_run_until_retried_and_fixed(cliapp):
    cliapp.configure(fail='true')
    run = cliapp.gearbox('run')
    assert run.returncode == 1, run
    assert ("evolution 'maybe_fail' failed: RuntimeError: cliapp.fail is set"
            in run.stderr), run
    # The failed evolution's own write was rolled back with it.
    assert cliapp.effects() == collections.Counter(['seed_effects', 'count_slowly'])

    status = cliapp.gearbox('status')
    assert status.returncode == 1, status
    state, detail = status_lines(status)['maybe_fail']
    assert state == 'failed'
    assert detail.endswith('attempt 1: RuntimeError: cliapp.fail is set'), status

    details = cliapp.gearbox('history', 'maybe_fail')
    assert details.returncode == 0, details
    assert 'Traceback (most recent call last)' in details.stdout, details
    assert "raise RuntimeError('cliapp.fail is set')" in details.stdout, details

    refused = cliapp.gearbox('retry', 'seed_effects')
    assert refused.returncode == 2, refused
    assert "'seed_effects' (applied)" in refused.stderr, refused
    assert cliapp.history()['seed_effects'].state == 'applied'

    retry = cliapp.gearbox('retry', 'maybe_fail')
    assert retry.returncode == 0, retry
    assert 'cleared the failed state of maybe_fail' in retry.stdout, retry
    # The record stays (what happened is kept): a retry is a request the next run honours.
    assert cliapp.backend().read_history(batches=True)['maybe_fail'].requested == 'retry'

    cliapp.configure(fail='false')
    run = cliapp.gearbox('run')
    assert run.returncode == 0, run
    assert 'applied 1 evolution(s): maybe_fail' in run.stdout, run
    assert cliapp.effects() == collections.Counter(IDS)


@SQL_DATABASES
def test_mark_records_without_running_and_unmark_forgets(cliapp):
    mark = cliapp.gearbox('mark', 'seed_effects', 'count_slowly')
    assert mark.returncode == 0, mark
    assert 'marked as applied: seed_effects, count_slowly' in mark.stdout, mark
    before = cliapp.history()
    assert {i: r.state for i, r in before.items()} == {
        'seed_effects': 'marked', 'count_slowly': 'marked'}

    unknown = cliapp.gearbox('mark', 'seed_efects')
    assert unknown.returncode == 2, unknown
    assert "'seed_efects'" in unknown.stderr and '--force' in unknown.stderr, unknown
    assert cliapp.history() == before

    run = cliapp.gearbox('run')
    assert run.returncode == 0, run
    assert cliapp.effects() == collections.Counter(['maybe_fail'])  # marked ones did not run

    refused = cliapp.gearbox('unmark', 'seed_effects', 'retired')
    assert refused.returncode == 2, refused
    assert "'retired'" in refused.stderr, refused
    assert cliapp.history()['seed_effects'].state == 'marked'  # all or nothing

    forced = cliapp.gearbox('mark', '--force', 'retired')
    assert forced.returncode == 0, forced
    assert cliapp.history()['retired'].state == 'marked'

    history = cliapp.gearbox('history')
    assert history.returncode == 0, history
    assert re.search(r'^  retired\s+marked .*\(not registered\)$', history.stdout, re.M), history
    assert re.search(r'^  maybe_fail\s+applied .*\d+ ms  1 attempt  ' + OWNER_PATTERN + '$',
                     history.stdout, re.M), history

    unmark = cliapp.gearbox('unmark', '--force', 'seed_effects', 'retired')
    assert unmark.returncode == 0, unmark
    assert 'forgotten (the next run runs them): seed_effects, retired' in unmark.stdout, unmark
    assert set(cliapp.history()) == {'count_slowly', 'maybe_fail'}


# --- the lock -------------------------------------------------------------------------------------

@SQL_DATABASES
def test_release_lock_refuses_a_live_lease_unless_forced(cliapp):
    holder = cliapp.backend()
    lease = holder.acquire(OTHER, 600)

    refused = cliapp.gearbox('release-lock')
    assert refused.returncode == 2, refused
    assert f'held by {OTHER} (generation {lease.generation})' in refused.stderr, refused
    assert holder.read_lock().owner == OTHER
    holder.renew(lease)  # still the holder's

    forced = cliapp.gearbox('release-lock', '--force')
    assert forced.returncode == 0, forced
    assert f'broke the lock held by {OTHER}' in forced.stdout, forced
    lock = holder.read_lock()
    assert lock.owner is None and lock.generation == lease.generation + 1
    assert re.fullmatch(rf'broken by {OWNER_PATTERN} \(user {re.escape(getpass.getuser())}\)',
                        lock.released_by), lock.released_by
    with pytest.raises(LeaseLost):
        holder.renew(lease)  # the old holder's fenced writes fail from now on

    gone = holder.acquire('gone:2:beef', 0.5)
    deadline = time.monotonic() + DEADLINE
    while holder.read_lock().held:
        assert time.monotonic() < deadline, 'a 0.5 s lease never expired'
        time.sleep(0.1)
    released = cliapp.gearbox('release-lock')
    assert released.returncode == 0, released
    assert 'released the lock left by gone:2:beef' in released.stdout, released
    lock = holder.read_lock()
    assert lock.owner is None and lock.generation == gone.generation + 1
    # released by the command's own short-lived lease, not by the holder that had gone
    assert re.fullmatch(OWNER_PATTERN, lock.released_by), lock.released_by


@SQL_DATABASES
@pytest.mark.parametrize('verb', [['run'], ['mark', 'seed_effects']], ids=['run', 'mark'])
def test_run_and_writes_wait_visibly_while_another_process_holds_the_lock(cliapp, verb):
    holder = cliapp.backend()
    lease = holder.acquire(OTHER, 600)

    impatient = cliapp.gearbox(*verb, '--timeout', '0.5')
    assert impatient.returncode == 3, impatient
    assert f'waiting for the lock: held by {OTHER}' in impatient.stdout, impatient
    assert f'gave up waiting for the lock held by {OTHER}' in impatient.stderr, impatient
    assert cliapp.history() == {}

    patient = cliapp.start(*verb)
    patient.wait_for_output(f'waiting for the lock: held by {OTHER} '
                            rf'\(generation {lease.generation}\)')
    assert cliapp.history() == {} and cliapp.effects() == collections.Counter()
    assert holder.release(lease)
    finished = patient.finish()
    assert finished.returncode == 0, finished
    if verb == ['run']:
        assert cliapp.effects() == collections.Counter(IDS)
    else:
        assert cliapp.history()['seed_effects'].state == 'marked'


@SQL_DATABASES
def test_status_shows_the_progress_and_lock_of_a_running_evolution(cliapp):
    pause = cliapp.directory / 'go-on'
    cliapp.configure(pause_file=pause)
    runner = cliapp.start('run')
    backend = cliapp.backend()
    deadline = time.monotonic() + DEADLINE
    while True:  # until the throttled progress write of 3/10 reached the database
        record = backend.read_history().get('count_slowly')
        if record is not None and record.progress_done == 3:
            break
        assert time.monotonic() < deadline, f'no progress stored:\n{runner.output("stderr")}'
        time.sleep(0.1)
    owner = record.owner

    status = cliapp.gearbox('status')
    assert status.returncode == 1, status
    lines = status_lines(status)
    assert lines['seed_effects'][0] == 'applied'
    assert lines['count_slowly'][0] == 'running'
    assert lines['count_slowly'][1].endswith(f', 3/10 (30%), by {owner}'), status
    assert lines['maybe_fail'] == ('pending', 'never applied')
    assert f'lock: held by {owner}' in status.stdout, status

    report = cliapp.gearbox('status', '--json').json()
    running = report['evolutions'][1]
    assert running['state'] == 'running' and running['reason'] == f'running now, by {owner}'
    assert running['progress'] == {'done': 3, 'total': 10, 'percent': 30.0, 'rate': None,
                                   'eta_seconds': None, 'batches': None,
                                   'batch_size': None}
    assert running['running_now'] is True
    assert report['lock']['owner'] == owner and report['lock']['held'] is True
    assert 0 < report['lock']['expires_in'] <= 15

    refused = cliapp.gearbox('release-lock')
    assert refused.returncode == 2, refused
    assert f'held by {owner}' in refused.stderr, refused

    second = cliapp.gearbox('run', '--timeout', '1')
    assert second.returncode == 3, second
    assert f'waiting for the lock: held by {owner}' in second.stdout, second

    pause.touch()
    finished = runner.finish()
    assert finished.returncode == 0, finished
    assert cliapp.effects() == collections.Counter(IDS)


# --- on a terminal, and bad input --------------------------------------------------------------

@SQLITE_ONLY
def test_run_draws_a_progress_bar_on_a_terminal_with_tqdm_and_plain_lines_without(cliapp):
    plain = cliapp.on_terminal('run', without_tqdm=True)
    assert plain.returncode == 0, plain
    assert 'count_slowly: 10/10 (100%)' in plain.stdout, plain
    assert '100%|' not in plain.stdout, plain

    cliapp.gearbox('unmark', 'count_slowly')
    bar = cliapp.on_terminal('run')
    assert bar.returncode == 0, bar
    assert re.search(r'count_slowly: 100%\|█+\| 10/10', bar.stdout), bar
    assert 'count_slowly: 10/10 (100%)' not in bar.stdout, bar
    assert cliapp.effects() == collections.Counter(IDS + ['count_slowly'])


@SQLITE_ONLY
def test_bad_configuration_is_a_clear_error_naming_the_culprit(cliapp):
    missing = cliapp.gearbox('-c', 'production.ini', 'status')
    assert missing.returncode == 2, missing
    assert "configuration file 'production.ini' not found" in missing.stderr, missing

    cliapp.configure(**{'tgext.evolve.leese': '30'})
    typo = cliapp.gearbox('status')
    assert typo.returncode == 2, typo
    assert "'tgext.evolve.leese' (did you mean 'lease'?)" in typo.stderr, typo
    assert 'Traceback' not in typo.stderr, typo

    cliapp.ini.write_text(cliapp.ini.read_text().replace(
        'call:cliapp.config.application:make_app', 'call:json:loads'))
    not_tg = cliapp.gearbox('status')
    assert not_tg.returncode == 2, not_tg
    assert "cannot find the application's base_config" in not_tg.stderr, not_tg

    cliapp.url = 'postgresql://postgres@127.0.0.1:1/nowhere'
    cliapp.configure()
    unreachable = cliapp.gearbox('status')
    assert unreachable.returncode == 4, unreachable
    assert 'OperationalError' in unreachable.stderr, unreachable
    assert 'Traceback' not in unreachable.stderr, unreachable
