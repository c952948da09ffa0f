"""The status page in a real browser: Debian's headless Chromium, driven over WebDriver
(:mod:`browser`), against applications served by a real HTTP server on loopback ports.

Each test deploys a release the way a cluster sees it: the *old* release's process serves (its
evolutions applied), the operator logs in there through TurboGears' login form, then the *new*
release's process starts behind its closed gate.  Both share the database and the cookie secret,
and a browser's cookies for 127.0.0.1 go to every port, so the operator is signed in on both.

``TGEXT_EVOLVE_SCREENSHOTS=docs`` also saves the page mid-evolution as ``docs/status-page.png``
(README shows it); every run saves it in the test's temporary directory.
"""
import html
import logging
import os
import pathlib
import shutil
import struct

import pytest

import browser as browsers
from statuspages import NOBODY, OPERATOR, PASSWORDS, FailsUntilFixed, page_apps  # noqa: F401
from tgapps import NoteEvolution, tg_apps  # noqa: F401 (fixture)
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


def save_screenshot(png, tmp_path):
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    width, height = struct.unpack('>II', png[16:24])
    assert (width, height) >= (1000, 600), (width, height)
    (tmp_path / 'status-page.png').write_bytes(png)
    if SCREENSHOTS:
        target = pathlib.Path(SCREENSHOTS)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / 'status-page.png', target / 'status-page.png')


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
    deployed.new.wait_for_phase('failed')  # still not fixed: it failed again
    assert convert.calls == 2
    post(fields, 'convert_currencies changed since this page showed it')
    assert convert.calls == 2
    assert html.unescape(chromium.source).count('Nothing was changed') == 1
