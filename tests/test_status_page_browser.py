"""The status page in a real browser: Debian's headless Chromium, driven over WebDriver
(:mod:`browser`), against applications served by a real HTTP server on loopback ports.

Each test deploys a release the way a cluster sees it: the *old* release's process serves (its
evolutions applied), the operator logs in there through TurboGears' login form, then the *new*
release's process starts behind its closed gate.  Both share the database and the cookie secret,
and a browser's cookies for 127.0.0.1 go to every port, so the operator is signed in on both.

``TGEXT_EVOLVE_SCREENSHOTS=docs`` also saves the page mid-evolution as ``docs/status-page.png``
and, with a batched evolution's bar and ETA, ``docs/status-page-batched.png`` (README shows
them); every run saves them in the test's temporary directory.
"""
import html
import logging
import os
import pathlib
import re
import shutil
import struct

import pytest

import browser as browsers
from polling import wait_until
from statuspages import (NOBODY, OPERATOR, PASSWORDS, FailsUntilFixed, SteppedSweep,  # noqa: F401
                         page_apps)
from stepped import Stepped
from tgapps import NoteEvolution, tg_apps  # noqa: F401 (fixture)
from tgext.evolve import operations
from tgext.evolve.status_page import csrf

pytestmark = [pytest.mark.slow, pytest.mark.parametrize('sql_url', ['sqlite'], indirect=True)]

SCREENSHOTS = os.environ.get('TGEXT_EVOLVE_SCREENSHOTS')


@pytest.fixture(scope='module')
def chromium(tmp_path_factory):
    browsers.require_chromium()
    browser = browsers.Browser(tmp_path_factory.mktemp('chromium'))
    yield browser
    browser.quit()


class Release:
    """The old release serving and the new one behind its gate, each on its own port."""

    def __init__(self, page_apps, sql_url, new_evolutions):
        model = self.model = page_apps.tg_apps.model(('sqlite', sql_url))
        self.old = page_apps.build(model, [NoteEvolution('seed', model),
                                           NoteEvolution('retired_cleanup', model)])
        self.old.wait_until_serving()
        self.new = page_apps.build(model, [NoteEvolution('seed', model),
                                           *new_evolutions(model)])
        self.old_server = browsers.Server(self.old.wsgi_app)
        self.new_server = browsers.Server(self.new.wsgi_app)

    def close(self):
        self.old_server.close()
        self.new_server.close()


@pytest.fixture
def release(page_apps, sql_url, chromium):
    """``release(new_evolutions)`` deploys; the browser starts with no cookies."""
    made = []

    def deploy(new_evolutions):
        made.append(Release(page_apps, sql_url, new_evolutions))
        chromium.get(made[-1].old_server.url + '/login')
        chromium.delete_cookies()
        return made[-1]

    yield deploy
    for one in made:
        one.close()


def log_in(chromium, server, user):
    chromium.get(f'{server.url}/login')
    chromium.type('#login', user)
    chromium.type('#password', PASSWORDS[user])
    chromium.click('#submit')
    chromium.wait_for(lambda: 'hello from the application' in chromium.source, 'logged in')


def row(evolution_id):
    return f'tbody[data-id="{evolution_id}"]'


def state_of(chromium, evolution_id):
    return chromium.text(f'{row(evolution_id)} [data-field=state]')


def wait_for_state(chromium, evolution_id, state):
    chromium.wait_for(lambda: state_of(chromium, evolution_id) == state,
                      f'{evolution_id} shown {state}')


def save_screenshot(png, tmp_path, name='status-page.png'):
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    width, height = struct.unpack('>II', png[16:24])
    assert (width, height) >= (1000, 600), (width, height)
    (tmp_path / name).write_bytes(png)
    if SCREENSHOTS:
        target = pathlib.Path(SCREENSHOTS)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, target / name)


def test_an_operator_watches_an_evolution_apply_without_reloading_then_retries_a_failure(
        release, page_apps, chromium, tmp_path, caplog):
    convert = None

    def new_evolutions(model):
        nonlocal convert
        convert = FailsUntilFixed('convert_currencies', model)
        return [page_apps.parked('backfill_slugs', model, done=3, total=10), convert]

    deployed = release(new_evolutions)
    backfill = page_apps.parked_evolutions[-1]
    log_in(chromium, deployed.old_server, OPERATOR)
    assert backfill.started.wait(30)

    chromium.get(f'{deployed.new_server.url}/evolve/')
    assert 'tgext-evolve' in chromium.source
    assert [state_of(chromium, i) for i in ('seed', 'backfill_slugs', 'convert_currencies')] == [
        'applied', 'running', 'pending']
    chromium.wait_for(lambda: chromium.text(f'{row("backfill_slugs")} .progress-text')
                      == '3/10 (30%)', 'the progress bar at 3/10')
    owner = deployed.new.history()['backfill_slugs'].owner
    assert chromium.text('[data-lock=owner]') == owner
    assert chromium.text('[data-lock=lease]').endswith(' s left')
    assert 'retired_cleanup' in chromium.text('table.unregistered')
    save_screenshot(chromium.screenshot(), tmp_path)

    # Without reloading: a mark left on this very page must still be there afterwards.
    chromium.run('window.tgextEvolveTestMark = "the same page"')
    backfill.release.set()
    wait_for_state(chromium, 'backfill_slugs', 'applied')
    wait_for_state(chromium, 'convert_currencies', 'failed')
    assert chromium.run('return window.tgextEvolveTestMark') == 'the same page'
    failure = f'{row("convert_currencies")} [data-field=failure]'
    assert chromium.text(f'{failure} [data-field=error]') == (
        'RuntimeError: convert_currencies met a row it cannot convert')
    chromium.click(f'{failure} summary')  # the traceback, loaded when opened
    chromium.wait_for(lambda: 'Traceback (most recent call last)' in chromium.text(
        f'{failure} pre'), 'the traceback shown')

    convert.fixed.set()  # the data is corrected; retrying will work
    caplog.set_level(logging.INFO, logger='tgext.evolve')
    chromium.click(f'{row("convert_currencies")} form[data-action=retry] button')
    chromium.wait_for(lambda: chromium.alert_text().startswith(
        'Retry evolution convert_currencies?'), 'the confirmation')
    chromium.accept_alert()
    chromium.wait_for(lambda: chromium.url.endswith('/evolve/act'), 'the form posted')
    assert chromium.text('p.message-ok').startswith(
        'Cleared the failed state of convert_currencies (1 attempt, last: RuntimeError')
    wait_for_state(chromium, 'convert_currencies', 'applied')
    chromium.wait_for(lambda: '(nothing to do)' in chromium.text('[data-field=summary]'),
                      'the summary settled')

    record = deployed.new.history()['convert_currencies']
    assert (record.state, record.attempts, convert.calls) == ('applied', 2, 2)
    assert deployed.model.notes() == ['backfill_slugs', 'convert_currencies', 'retired_cleanup',
                                      'seed']
    audit = [r.getMessage() for r in caplog.records if 'failed state cleared by' in r.getMessage()]
    assert len(audit) == 1 and f'(user {OPERATOR} via the status page)' in audit[0], audit
    deployed.new.wait_until_serving()


def test_a_user_without_the_permission_sees_nothing_of_the_page(release, page_apps, chromium):
    deployed = release(lambda model: [page_apps.parked('backfill_slugs', model)])
    log_in(chromium, deployed.old_server, NOBODY)
    for path in ('/evolve/', '/evolve/status.json'):
        chromium.get(deployed.new_server.url + path)
        assert 'Upgrading, back in a moment' in chromium.source, path
        assert 'backfill_slugs' not in chromium.source and 'tgext-evolve' not in chromium.source
    chromium.get(deployed.new_server.url + '/')
    gate_page = chromium.source
    chromium.get(deployed.new_server.url + '/evolve/')
    assert chromium.source == gate_page

    chromium.get(deployed.old_server.url + '/evolve/')  # open: TurboGears' own 403
    assert 'rendered by the application error page: 403' in chromium.source
    assert 'seed' not in chromium.source and 'tgext-evolve' not in chromium.source


SUBMIT = '''
const [fields] = arguments;
const form = document.createElement('form');
form.method = 'post';
form.action = 'act';
for (const [name, value] of Object.entries(fields)) {
  const input = document.createElement('input');
  input.type = 'hidden';
  input.name = name;
  input.value = value;
  form.appendChild(input);
}
document.body.appendChild(form);
form.submit();
'''


def test_missing_forged_replayed_and_misdirected_forms_change_nothing_and_say_why(
        release, page_apps, chromium):
    convert = None

    def new_evolutions(model):
        nonlocal convert
        convert = FailsUntilFixed('convert_currencies', model)
        return [convert]

    deployed = release(new_evolutions)
    deployed.new.wait_for_phase('failed')
    log_in(chromium, deployed.old_server, OPERATOR)
    chromium.get(f'{deployed.new_server.url}/evolve/')
    fields = chromium.run('''
        const form = document.querySelector('form[data-action=retry]:not([hidden])');
        return Object.fromEntries(new FormData(form));''')
    assert fields['id'] == 'convert_currencies' and fields['token']
    tokens = csrf.FormTokens(csrf.derive_key(deployed.new.config), 900)

    def post(what, expected):
        before = deployed.new.history()
        chromium.get(f'{deployed.new_server.url}/evolve/')
        chromium.run(SUBMIT, what)
        chromium.wait_for(lambda: chromium.url.endswith('/evolve/act'), 'the form posted')
        said = chromium.text('p.message-refused')
        assert said.startswith('Nothing was changed: ') and expected in said, said
        assert deployed.new.history() == before

    issued, nonce, mac = fields['token'].split('.')
    post({**fields, 'token': ''}, 'the form carries no CSRF token')
    post({**fields, 'token': f'{issued}.{nonce}.{mac[:-2]}xx'}, 'forged or altered')
    post({**fields, 'id': 'seed'}, 'forged or altered')
    seen_none = csrf.state_seen(None)
    post({'action': 'retry', 'id': 'nosuch', 'seen': seen_none,
          'token': tokens.issue(OPERATOR, 'retry', 'nosuch', seen_none)},
         "no registered evolution has the id 'nosuch'")
    seed_seen = csrf.state_seen(deployed.new.history()['seed'])
    post({'action': 'retry', 'id': 'seed', 'seen': seed_seen,
          'token': tokens.issue(OPERATOR, 'retry', 'seed', seed_seen)},
         'seed is applied; retry is only possible while it is failed')
    assert convert.calls == 1

    # The real form works once; sent again, it is refused: the failure it named is gone.
    chromium.get(f'{deployed.new_server.url}/evolve/')
    chromium.run(SUBMIT, fields)
    chromium.wait_for(lambda: chromium.text('p.message-ok').startswith(
        'Cleared the failed state of convert_currencies'), 'the retry done')
    # The retry is a request the runner honours at its next poll (the phase stays "failed"
    # meanwhile): wait for the second call, then for its failure.
    wait_until(lambda: convert.calls == 2, 'the retried evolution run again')
    deployed.new.wait_for_phase('failed')  # still not fixed: it failed again
    post(fields, 'convert_currencies changed since this page showed it')
    assert convert.calls == 2
    assert html.unescape(chromium.source).count('Nothing was changed') == 1


def progress_shown(chromium, evolution_id):
    """``(done, eta_seconds or None, bar width %)`` as the page shows them now."""
    text = chromium.text(f'{row(evolution_id)} .progress-text')
    done = re.match(r'(\d+)/', text)
    eta = re.search(r'ETA (\d+) s', text)
    width = chromium.run(f'return document.querySelector(\'{row(evolution_id)} .bar span\')'
                         f'.style.width')
    return (int(done.group(1)) if done else None, int(eta.group(1)) if eta else None,
            float(width.rstrip('%') or 0))


def test_an_operator_watches_a_batched_evolution_pauses_it_and_resumes_it(
        release, page_apps, chromium, tmp_path):
    backfill = None

    def new_evolutions(model):
        nonlocal backfill
        backfill = Stepped('backfill_slugs', model, total=200, seconds_per_item=0.1)
        return [backfill]

    deployed = release(new_evolutions)
    log_in(chromium, deployed.old_server, OPERATOR)
    chromium.get(f'{deployed.new_server.url}/evolve/')
    wait_for_state(chromium, 'backfill_slugs', 'running')

    # The bar moves and the ETA falls, without reloading the page.
    first = chromium.wait_for(lambda: (lambda p: p if p[1] is not None else None)(
        progress_shown(chromium, 'backfill_slugs')), 'an ETA shown')
    later = chromium.wait_for(lambda: (lambda p: p if p[0] > first[0] and p[1] < first[1]
                                       and p[2] > first[2] else None)(
        progress_shown(chromium, 'backfill_slugs')), 'the bar moving and the ETA falling')
    assert later[0] < 200
    save_screenshot(chromium.screenshot(), tmp_path, 'status-page-batched.png')

    chromium.click(f'{row("backfill_slugs")} form[data-action=pause] button')
    chromium.wait_for(lambda: chromium.alert_text().startswith(
        'Pause evolution backfill_slugs?'), 'the confirmation')
    chromium.accept_alert()
    chromium.wait_for(lambda: chromium.url.endswith('/evolve/act'), 'the form posted')
    assert chromium.text('p.message-ok').startswith(
        'Pause of backfill_slugs requested: it stops at its next batch boundary')
    wait_for_state(chromium, 'backfill_slugs', 'paused')

    # Stopped: the page and the database agree, and stay so while the page refreshes.
    record = deployed.new.service.backend.read_history(batches=True)['backfill_slugs']
    committed = [n for n in deployed.model.notes() if n.startswith('backfill_slugs-')]
    assert record.progress_done == record.batches_done == len(committed) < 200
    for _ in range(3):
        before = chromium.text('[data-field=updated]')
        chromium.wait_for(lambda: chromium.text('[data-field=updated]') != before, 'a refresh')
    assert progress_shown(chromium, 'backfill_slugs')[0] == record.progress_done
    again = deployed.new.service.backend.read_history(batches=True)['backfill_slugs']
    assert (again.state, again.progress_done, again.batches_done) == (
        'paused', record.progress_done, record.batches_done)

    backfill.seconds_per_item = 0.002  # the rest goes quickly: this test has seen it run
    chromium.click(f'{row("backfill_slugs")} form[data-action=resume] button')
    chromium.wait_for(lambda: chromium.alert_text().startswith(
        'Resume evolution backfill_slugs?'), 'the confirmation')
    chromium.accept_alert()
    chromium.wait_for(lambda: chromium.text('p.message-ok').startswith(
        'Resume of backfill_slugs requested'), 'the resume posted')
    wait_for_state(chromium, 'backfill_slugs', 'applied')
    chromium.wait_for(lambda: '(nothing to do)' in chromium.text('[data-field=summary]'),
                      'the summary settled')

    done = deployed.new.service.backend.read_history(batches=True)['backfill_slugs']
    assert (done.state, done.progress_done) == ('applied', 200)
    assert sorted(n for n in deployed.model.notes() if n.startswith('backfill_slugs-')) == sorted(
        f'backfill_slugs-{n}' for n in range(200))
    who = [(e.action, e.actor) for e in operations.audit(deployed.new.service, 'backfill_slugs')
           if e.action in ('pause', 'resume')]
    assert who == [('pause', f'{OPERATOR} via the status page'),
                   ('resume', f'{OPERATOR} via the status page')]
    deployed.new.wait_until_serving()


def test_the_page_follows_who_works_on_which_range_of_a_parallel_evolution(
        release, page_apps, chromium):
    sweep = None

    def new_evolutions(model):
        nonlocal sweep
        sweep = SteppedSweep(model, notes=10)  # 12 notes with the old release's: 3 ranges
        return [sweep]

    deployed = release(new_evolutions)
    ranges = f'{row("sweep")} [data-field=ranges]'
    try:
        log_in(chromium, deployed.old_server, OPERATOR)
        chromium.get(f'{deployed.new_server.url}/evolve/')
        sweep.permits.release()
        shown = chromium.wait_for(lambda: (lambda text: text if ', 1 items)' in text else None)(
            chromium.text(ranges)), 'a range at work shown without reloading')
        owner = deployed.new.history()['sweep'].owner
        assert re.fullmatch(rf'ranges: 0/3 done; working: {re.escape(owner)} \(range [0-2], 1 '
                            r'items\)', shown), shown
        sweep.permits.release(12)
        chromium.wait_for(lambda: chromium.text(ranges) == 'ranges: 3/3 done; nobody working now',
                          'every range shown done')
    finally:
        sweep.permits.release(12)
    deployed.new.wait_until_serving()
