"""What people see at the 503 gate: the built-in page, the JSON body and its progress, readonly.

In-process TurboGears applications from :mod:`tgapps` on SQLite (the gate never touches the
database, so one database is enough).  "While an evolution runs" is made deterministic with
evolutions that park on events the test sets.  The 503 rendered by the application's own
ErrorController is covered in ``test_tg_integration.py``; here it meets readonly mode.
"""
import json
import threading

import pytest

from polling import DEADLINE, wait_until
from tgapps import (ERROR_PAGE_BLUEPRINT, ERROR_PAGE_MARK, BlockingEvolution,  # noqa: F401
                    NoteEvolution, tg_apps)

RETRY_AFTER = 7
FULLSTACK = ('fullstack', 'plugme')
BROWSER = 'text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8'
JSON_CLIENT = 'application/json, text/plain, */*'

pytestmark = pytest.mark.parametrize('sql_url', ['sqlite'], indirect=True)


class ReportingEvolution(BlockingEvolution):
    """Reports 1/4 done, waits for ``go_on``, reports 3/5, then parks like its base class."""

    def __init__(self, evolution_id, model):
        super().__init__(evolution_id, model)
        self.go_on = threading.Event()

    def evolve(self):
        self.progress(1, 4)
        if not self.go_on.wait(DEADLINE):
            raise RuntimeError(f'{self.evolution_id} was never told to go on')
        self.progress(3, 5)
        super().evolve()


class CompletingEvolution(NoteEvolution):
    """Reports its progress up to 100 % and finishes at once."""

    def evolve(self):
        for done in range(5):
            self.progress(done + 1, 5)
        super().evolve()


def json_503(app):
    response = app.request('/', accept=JSON_CLIENT)
    assert response.status_int == 503, response
    assert response.content_type == 'application/json'
    assert response.headers['Retry-After'] == str(RETRY_AFTER)
    return response.text, json.loads(response.text)


def test_built_in_page_says_upgrading_and_reloads_itself_after_retry_after(tg_apps, sql_url):
    model = tg_apps.model(('sqlite', sql_url))
    slow = tg_apps.blocking('backfill_invoice_totals', model)
    app = tg_apps.build(FULLSTACK, model, [slow], options={'retry_after': RETRY_AFTER})
    slow.wait_started()

    for accept in (None, BROWSER, '*/*'):
        page = app.request('/', accept=accept)
        assert page.status_int == 503, page
        assert page.headers['Content-Type'] == 'text/html; charset=utf-8'
        assert page.headers['Retry-After'] == str(RETRY_AFTER)
        assert page.headers['Cache-Control'] == 'no-store'
        assert '<title>Upgrading, back in a moment</title>' in page.text
        assert f'<meta http-equiv="refresh" content="{RETRY_AFTER}">' in page.text
        assert f'reloads by itself in {RETRY_AFTER} seconds' in page.text
        assert 'backfill_invoice_totals' not in page.text
    head = app.request('/', method='HEAD', accept=BROWSER)
    assert head.status_int == 503 and head.body == b''
    assert head.headers['Retry-After'] == str(RETRY_AFTER)

    slow.release.set()
    app.wait_until_serving()


def test_json_body_shows_the_running_evolutions_progress_and_no_ids(tg_apps, sql_url):
    model = tg_apps.model(('sqlite', sql_url))
    ids = ['quiet_first', 'counts_100', 'reports_progress', 'quiet_last']
    first = tg_apps.blocking(ids[0], model)
    reporting = ReportingEvolution(ids[2], model)
    last = tg_apps.blocking(ids[3], model)
    app = tg_apps.build(FULLSTACK, model, [first, CompletingEvolution(ids[1], model), reporting,
                                           last], options={'retry_after': RETRY_AFTER})

    first.wait_started()
    body, payload = json_503(app)
    assert payload == {'status': 503, 'message': 'Upgrading, back in a moment',
                       'retry_after': RETRY_AFTER}  # no progress reported yet

    first.release.set()
    wait_until(lambda: json_503(app)[1].get('progress') == 25.0, 'progress 25 %')
    reporting.go_on.set()
    reporting.wait_started()
    body, payload = json_503(app)
    assert payload == {'status': 503, 'message': 'Upgrading, back in a moment',
                       'retry_after': RETRY_AFTER, 'progress': 60.0}
    assert not any(evolution_id in body for evolution_id in ids), body

    reporting.release.set()
    last.wait_started()
    # The 100 % of an earlier evolution is not the progress of the one running now.
    assert 'progress' not in json_503(app)[1]

    last.release.set()
    app.wait_until_serving()
    assert model.notes() == sorted(ids)


@pytest.mark.parametrize('gate', ['middleware', 'error-page'])
def test_readonly_serves_reads_and_refuses_writes_while_evolving(tg_apps, sql_url, gate):
    model = tg_apps.model(('sqlite', sql_url))
    slow = tg_apps.blocking('recompute_balances', model)
    app = tg_apps.build(FULLSTACK, model, [slow], options={'retry_after': RETRY_AFTER},
                        app_conf={'tgext.evolve.readonly': 'true'},  # as the .ini says it
                        blueprint=ERROR_PAGE_BLUEPRINT if gate == 'error-page' else None)
    slow.wait_started()

    for method in ('GET', 'HEAD', 'OPTIONS'):
        response = app.request('/', method=method)
        assert response.status_int == 200, (method, response)
        assert 'Retry-After' not in response.headers
    assert app.request('/').text == 'hello from the application'
    for method in ('POST', 'PUT', 'PATCH', 'DELETE'):
        response = app.request('/', method=method)
        assert response.status_int == 503, (method, response)
        assert response.headers['Retry-After'] == str(RETRY_AFTER)
        if gate == 'error-page':
            assert response.text == (f'{ERROR_PAGE_MARK}: 503 Upgrading, back in a moment '
                                     f'(refresh after {RETRY_AFTER} s)')
        else:
            assert 'Upgrading, back in a moment' in response.text
    missing = app.request('/no/such/page')
    assert missing.status_int == 404, missing
    assert 'Retry-After' not in missing.headers  # a read's own error is not maintenance
    if gate == 'error-page':
        assert missing.text.startswith(f'{ERROR_PAGE_MARK}: 404')

    slow.release.set()
    wait_until(lambda: app.request('/', method='POST').status_int == 200, 'POST served')


def test_error_page_gate_answers_json_with_progress_and_a_page_never_cached(tg_apps, sql_url):
    model = tg_apps.model(('sqlite', sql_url))
    reporting = ReportingEvolution('reports_progress', model)
    app = tg_apps.build(FULLSTACK, model, [reporting], options={'retry_after': RETRY_AFTER},
                        blueprint=ERROR_PAGE_BLUEPRINT)
    wait_until(lambda: json_503(app)[1].get('progress') == 25.0, 'progress 25 %')
    body, payload = json_503(app)
    assert payload == {'status': 503, 'message': 'Upgrading, back in a moment',
                       'retry_after': RETRY_AFTER, 'progress': 25.0}
    assert ERROR_PAGE_MARK not in body and 'reports_progress' not in body
    assert app.request('/', accept=JSON_CLIENT).headers['Cache-Control'] == 'no-store'

    for accept in (None, BROWSER):
        page = app.request('/', accept=accept)
        assert page.status_int == 503, page
        # The application's page, which can refresh itself after retry_after, never cached.
        assert page.text == (f'{ERROR_PAGE_MARK}: 503 Upgrading, back in a moment '
                             f'(refresh after {RETRY_AFTER} s)')
        assert page.headers['Retry-After'] == str(RETRY_AFTER)
        assert page.headers['Cache-Control'] == 'no-store'

    reporting.go_on.set()
    reporting.release.set()
    app.wait_until_serving()
