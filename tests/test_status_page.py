"""The status page through WebTest: who gets in while the gate is closed and once it is open, what
it shows, its JSON twin, its forms and their CSRF tokens, its layout.

In-process applications from :mod:`statuspages` (TurboGears' own authentication, the page
mounted at ``/evolve``) on SQLite; the retry, which writes, runs on every database.  The same
page in a real browser is ``test_status_page_browser.py``.
"""
import html
import json
import logging
import re
import time

import pytest
import webtest
from tg import FullStackApplicationConfigurator, predicates
from tg.configuration import milestones

import tgapps
from statuspages import (NOBODY, OPERATOR, FailsUntilFixed, SteppedSweep,  # noqa: F401
                         page_apps, sign_in)
from tgapps import (ERROR_PAGE_BLUEPRINT, ERROR_PAGE_MARK, NoteEvolution, database_url,  # noqa: F401
                    tg_apps, wait_until)
from tgext.evolve import ConfigurationError, EvolveStatusController
from tgext.evolve import operations
from tgext.evolve.status_document import status_document
from tgext.evolve.status_page import csrf

SQLITE = pytest.mark.parametrize('sql_url', ['sqlite'], indirect=True)
JSON_CLIENT = 'application/json, text/plain, */*'
BROWSER = 'text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8'
#: Status page URLs, and one beside it that the pass-through must not let in.
PAGE_URLS = ['/evolve/', '/evolve', '/evolve/status.json', '/evolve/actions.json',
             '/evolve/traceback?id=backfill', '/evolve/nosuchthing']


def page_form(response, action, evolution_id):
    """The fields of the form the page shows for ``action`` on ``evolution_id``."""
    for form in response.forms.values():
        if form.get('action').value == action and form.get('id').value == evolution_id:
            return {name: form.get(name).value for name in ('action', 'id', 'seen', 'token')}
    raise AssertionError(f'no {action} form for {evolution_id} on the page')


def said(response):
    """The text of a page, entities decoded."""
    return html.unescape(response.text)


def history_fields(app, evolution_id):
    record = app.history().get(evolution_id)
    return None if record is None else (record.state, record.attempts, record.started_at,
                                        record.finished_at)


def closed_app(page_apps, sql_url, **kwargs):
    """An application behind its closed gate: ``seed`` applied, ``backfill`` parked running."""
    model = page_apps.tg_apps.model(('sqlite', sql_url))
    parked = page_apps.parked('backfill', model)
    app = page_apps.build(model, [NoteEvolution('seed', model), parked], **kwargs)
    assert parked.started.wait(tgapps.DEADLINE), 'backfill never started'
    # The heartbeat stores reported progress in its own time.
    wait_until(lambda: app.history()['backfill'].progress_done == 3, 'progress stored')
    return app, parked


def failed_app(page_apps, database, **kwargs):
    """An application whose ``convert`` failed (``on_failure = block``): the gate stays closed."""
    model = page_apps.tg_apps.model(database)
    convert = FailsUntilFixed('convert', model)
    app = page_apps.build(model, [NoteEvolution('seed', model), convert], **kwargs)
    app.wait_for_phase('failed')
    return app, convert


# --- construction --------------------------------------------------------------------------------

def test_mounting_the_page_without_a_predicate_or_with_bad_options_is_refused():
    with pytest.raises(ConfigurationError, match=r"needs allow_only.*has_permission\('manage'\)"):
        EvolveStatusController()
    with pytest.raises(ConfigurationError, match="allow_only='manage' is not a TurboGears pred"):
        EvolveStatusController(allow_only='manage')
    manage = predicates.has_permission('manage')
    with pytest.raises(ConfigurationError, match='template=.*must be "engine:dotted.name"'):
        EvolveStatusController(allow_only=manage, template='myapp.templates.layout')
    with pytest.raises(ConfigurationError, match='refresh_seconds=0 must be a number'):
        EvolveStatusController(allow_only=manage, refresh_seconds=0)
    with pytest.raises(ConfigurationError, match="csrf_max_age='1h' must be a number"):
        EvolveStatusController(allow_only=manage, csrf_max_age='1h')


QUICKSTART_ROOT = '''
from tg import TGController, expose, predicates
from tgext.evolve import EvolveStatusController

class AdminArea(TGController):
    evolutions = EvolveStatusController({allow_only})

class RootController(TGController):
    admin = AdminArea()

    @expose()
    def index(self):
        return 'hello'
'''


@SQLITE
@pytest.mark.parametrize('allow_only', ["allow_only=predicates.has_permission('manage')", ''],
                         ids=['with-predicate', 'without'])
def test_a_quickstarted_root_is_read_at_start_up_to_find_the_page(
        tg_apps, sql_url, tmp_path, monkeypatch, allow_only):
    """No root_controller in the blueprint: TurboGears imports <package>.controllers.root at the
    first request; tgext.evolve imports it when the app is built, to find the page, so a page
    without a predicate stops the application from starting."""
    package = tmp_path / f'quickstarted_{bool(allow_only)}'
    (package / 'controllers').mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'controllers' / '__init__.py').write_text('')
    (package / 'controllers' / 'root.py').write_text(
        QUICKSTART_ROOT.format(allow_only=allow_only))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(package.name)
    model = tg_apps.model(('sqlite', sql_url))
    milestones._reset_all()
    configurator = FullStackApplicationConfigurator()
    configurator.update_blueprint({**tgapps.BASE_BLUEPRINT, **model.blueprint(),
                                   'package': module})
    import tgext.evolve
    tgext.evolve.plugme(configurator, {**tgapps.FAST, 'evolutions': [NoteEvolution('n', model)]})
    if not allow_only:
        with pytest.raises(ConfigurationError, match='EvolveStatusController needs allow_only'):
            configurator.make_wsgi_app({}, {})
        return
    wsgi_app = configurator.make_wsgi_app({}, {})
    tg_app = tgapps.unwrap_middlewares(wsgi_app)[-1]
    tg_apps._apps.append(tgapps.EvolvingApp(wsgi_app, tg_app, model, configurator))
    assert tg_app.config['tgext_evolve.service'].state.passthrough == ('/admin/evolutions/',)


# --- who gets in --------------------------------------------------------------------------------

def gate_answer(app, path, accept):
    """What the gate answers at ``path`` (a page of the site, not the status page)."""
    response = app.test_app.get(path, headers={'Accept': accept}, expect_errors=True)
    assert response.status_int == 503, response
    return response


def same_answer(response, expected):
    """The same 503: status, body and every header but the server's."""
    assert response.status == expected.status, response
    assert response.body == expected.body
    assert sorted(response.headerlist) == sorted(expected.headerlist)


@SQLITE
@pytest.mark.parametrize('rendered_by', ['gate', 'error_page'])
def test_while_closed_users_the_predicate_refuses_get_the_gates_503_for_every_page_url(
        page_apps, sql_url, rendered_by):
    blueprint = ERROR_PAGE_BLUEPRINT if rendered_by == 'error_page' else None
    app, parked = closed_app(page_apps, sql_url, blueprint=blueprint)
    assert app.service.state.passthrough == ('/evolve/',)
    for who in (None, NOBODY):
        client = webtest.TestApp(app.wsgi_app)
        if who is not None:
            sign_in(client, who)
        for accept in (BROWSER, JSON_CLIENT):
            expected = gate_answer(app, '/', accept)
            if rendered_by == 'error_page':  # JSON clients get the gate's JSON body
                assert (ERROR_PAGE_MARK in expected.text) == (accept == BROWSER)
            for url in PAGE_URLS:
                response = client.get(url, headers={'Accept': accept}, expect_errors=True)
                same_answer(response, expected)
            posted = client.post('/evolve/act', {'action': 'retry', 'id': 'backfill'},
                                 headers={'Accept': accept}, expect_errors=True)
            same_answer(posted, expected)
    # The operator gets the page, and nothing else of the site.
    operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
    page = operator.get('/evolve/')
    assert page.status_int == 200 and 'backfill' in page.text
    for elsewhere in ('/', '/evolvex/', '/evolve_/status.json', '/login'):
        assert operator.get(elsewhere, expect_errors=True).status_int == 503, elsewhere
    assert operator.get('/evolve', expect_errors=True).location.endswith('/evolve/')


@SQLITE
def test_once_open_the_page_denies_as_turbogears_does(page_apps, sql_url):
    model = page_apps.tg_apps.model(('sqlite', sql_url))
    app = page_apps.build(model, [NoteEvolution('seed', model)])
    app.wait_until_serving()
    anonymous = webtest.TestApp(app.wsgi_app).get('/evolve/', expect_errors=True)
    assert anonymous.status_int == 302 and '/login?came_from=' in anonymous.location
    nobody = sign_in(webtest.TestApp(app.wsgi_app), NOBODY)
    for url in PAGE_URLS[2:]:
        denied = nobody.get(url, expect_errors=True)
        assert denied.status_int == 403, (url, denied)
        assert 'seed' not in denied.text and 'tgext-evolve' not in denied.text
    assert sign_in(webtest.TestApp(app.wsgi_app), OPERATOR).get('/evolve/').status_int == 200


# --- what it shows --------------------------------------------------------------------------------

@SQLITE
def test_the_page_shows_each_evolution_in_run_order_the_lock_and_the_history(page_apps, sql_url):
    model = page_apps.tg_apps.model(('sqlite', sql_url))
    old = page_apps.build(model, [NoteEvolution('seed', model), NoteEvolution('retired', model)])
    old.wait_until_serving()
    app, parked = closed_app(page_apps, sql_url)
    operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
    page = operator.get('/evolve/')
    assert (page.headers['Cache-Control'], page.headers['X-Frame-Options']) == ('no-store', 'DENY')
    rows = re.findall(r'<tbody class="evolution state-(\w+)" data-id="(\w+)">', page.text)
    assert rows == [('applied', 'seed'), ('running', 'backfill')]
    owner = app.history()['backfill'].owner
    assert html.escape(owner) in page.text
    assert re.search(r'<span class="progress-text">3/10 \(30%\)</span>', page.text)
    assert f'<dd data-lock="owner">{html.escape(owner)}</dd>' in page.text
    assert re.search(r'<dd data-lock="lease">\d+\.\d s left</dd>', page.text)
    assert re.search(r'<tr><td><code>retired</code></td><td><span class="state state-applied">',
                     page.text)
    assert 'running now, by' in page.text and '<script>' in page.text


@SQLITE
def test_the_page_shows_who_works_on_which_range_of_a_parallel_evolution(page_apps, sql_url):
    """The status line ``gearbox evolve status`` prints under a parallel evolution, on the
    page and (for page.js) in status.json."""
    model = page_apps.tg_apps.model(('sqlite', sql_url))
    sweep = SteppedSweep(model, notes=8)
    app = page_apps.build(model, [sweep])
    try:
        sweep.permits.release()
        wait_until(lambda: sum(r.items_done for r in app.service.backend.read_ranges('sweep'))
                   == 1, 'one note swept')
        operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
        page = operator.get('/evolve/')
        owner = app.history()['sweep'].owner
        line = re.search(r'<div class="ranges" data-field="ranges">([^<]*)</div>', page.text)
        assert line is not None, page.text
        assert re.fullmatch(rf'ranges: 0/2 done; working: {re.escape(owner)} \(range [01], 1 '
                            r'items\)', html.unescape(line.group(1))), line.group(1)
        served = operator.get('/evolve/status.json').json['evolutions'][0]['ranges']
        assert (served['total'], served['done'], len(served['working'])) == (2, 0, 1)
        assert served['working'][0]['owner'] == owner
    finally:
        sweep.permits.release(8)
    app.wait_until_serving()
    assert model.notes() == sorted(f'note {i} (swept)' for i in range(8))
    page = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR).get('/evolve/')
    assert 'ranges: 2/2 done; nobody working now' in page.text


@SQLITE
def test_status_json_is_the_document_gearbox_evolve_status_prints(page_apps, sql_url):
    app, parked = closed_app(page_apps, sql_url)
    operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
    served = operator.get('/evolve/status.json')
    assert served.content_type == 'application/json'
    assert served.headers['Cache-Control'] == 'no-store'
    expected = status_document(operations.status(app.service))
    served, expected = served.json, json.loads(json.dumps(expected))
    assert abs(served['lock'].pop('expires_in') - expected['lock'].pop('expires_in')) < 5
    assert served == expected
    backfill = served['evolutions'][1]
    assert (backfill['state'], backfill['running_now'], backfill['progress']) == (
        'running', True, {'done': 3, 'total': 10, 'percent': 30.0, 'rate': None,
                          'eta_seconds': None, 'batches': None, 'batch_size': None})


@SQLITE
def test_with_tgext_evolve_disabled_the_page_says_so(page_apps, sql_url):
    model = page_apps.tg_apps.model(('sqlite', sql_url))
    app = page_apps.build(model, [NoteEvolution('seed', model)],
                          app_conf={'tgext.evolve.enabled': 'false'})
    operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
    page = operator.get('/evolve/', expect_errors=True)
    assert page.status_int == 503
    assert 'tgext.evolve does not run in this application (tgext.evolve.enabled = false' in \
        said(page)
    assert operator.get('/evolve/status.json', expect_errors=True).json == {
        'error': 'tgext.evolve does not run in this application (tgext.evolve.enabled = '
                 'false, or it is not plugged in)'}


# --- the retry button and its token ----------------------------------------------------------------

def test_retry_through_the_page_runs_the_evolution_again_and_names_the_operator(
        page_apps, database_url, caplog):
    app, convert = failed_app(page_apps, database_url)
    operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
    page = operator.get('/evolve/')
    assert 'RuntimeError: convert met a row it cannot convert' in said(page)
    assert 'Traceback (most recent call last)' in page.text  # behind its <details>
    form = page_form(page, 'retry', 'convert')
    assert form['token'], 'a failed evolution is offered its retry button'
    convert.fixed.set()
    caplog.set_level(logging.INFO, logger='tgext.evolve')
    done = operator.post('/evolve/act', form)
    assert done.status_int == 200
    assert 'Cleared the failed state of convert (1 attempt, last: RuntimeError' in said(done)
    app.wait_until_serving()
    record = app.history()['convert']
    # The record kept counting: the failed attempt and the retry's.
    assert (record.state, record.attempts, convert.calls) == ('applied', 2, 2)
    assert app.model.notes() == ['convert', 'seed']
    trail = [(e.action, e.actor) for e in app.service.backend.read_audit('convert')]
    assert [action for action, _ in trail] == ['started', 'failed', 'retry', 'started', 'applied']
    assert trail[2][1] == f'{OPERATOR} via the status page'
    audit = [r.getMessage() for r in caplog.records if 'failed state cleared by' in r.getMessage()]
    assert len(audit) == 1 and f'(user {OPERATOR} via the status page)' in audit[0], audit
    # The same form again: a replay.  Refused, and nothing changes.
    before = history_fields(app, 'convert')
    replayed = operator.post('/evolve/act', form, expect_errors=True)
    assert replayed.status_int == 409
    assert 'Nothing was changed: convert is applied; retry is only possible while it is ' \
           'failed' in said(replayed)
    assert history_fields(app, 'convert') == before and convert.calls == 2


@SQLITE
def test_a_form_without_or_with_a_forged_token_changes_nothing(page_apps, sql_url):
    app, convert = failed_app(page_apps, ('sqlite', sql_url))
    operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
    form = page_form(operator.get('/evolve/'), 'retry', 'convert')
    before = history_fields(app, 'convert')
    tokens = csrf.FormTokens(csrf.derive_key(app.config), 900)
    issued, nonce, mac = form['token'].split('.')
    forged = {
        'no token': dict(form, token=''),
        'no token field': {k: v for k, v in form.items() if k != 'token'},
        'garbage': dict(form, token='not-a-token'),
        'altered mac': dict(form, token=f'{issued}.{nonce}.{mac[::-1]}'),
        'altered time': dict(form, token=f'{int(issued) + 1}.{nonce}.{mac}'),
        'other state seen': dict(form, seen='0123456789abcdef'),
        "someone else's": dict(form, token=tokens.issue('mallory', 'retry', 'convert',
                                                         form['seen'])),
        'other evolution': dict(form, id='seed'),
        'other key': dict(form, token=csrf.FormTokens(b'k' * 32, 900).issue(
            OPERATOR, 'retry', 'convert', form['seen'])),
        'expired': dict(form, token=tokens.issue(OPERATOR, 'retry', 'convert', form['seen'],
                                                 now=time.time() - 901)),
    }
    for what, fields in forged.items():
        refused = operator.post('/evolve/act', fields, expect_errors=True)
        assert refused.status_int == 403, what
        assert 'Nothing was changed: the form' in said(refused), what
        assert history_fields(app, 'convert') == before, what
    assert 'carries no CSRF token' in operator.post('/evolve/act', forged['no token'],
                                                    expect_errors=True).text
    assert 'too old' in operator.post('/evolve/act', forged['expired'], expect_errors=True).text
    assert 'forged or altered' in operator.post('/evolve/act', forged['altered mac'],
                                                expect_errors=True).text
    # A token made for uma does not work for her either: the predicate refuses her first.
    nobody = sign_in(webtest.TestApp(app.wsgi_app), NOBODY)
    for_her = dict(form, token=tokens.issue(NOBODY, 'retry', 'convert', form['seen']))
    assert nobody.post('/evolve/act', for_her, expect_errors=True).status_int == 503
    assert history_fields(app, 'convert') == before and convert.calls == 1


@SQLITE
def test_unknown_ids_actions_and_evolutions_that_are_not_failed_get_a_clear_message(
        page_apps, sql_url):
    app, convert = failed_app(page_apps, ('sqlite', sql_url))
    operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
    tokens = csrf.FormTokens(csrf.derive_key(app.config), 900)
    history = app.history()

    def signed(action, evolution_id, record):
        seen = csrf.state_seen(record)
        return {'action': action, 'id': evolution_id, 'seen': seen,
                'token': tokens.issue(OPERATOR, action, evolution_id, seen)}

    cases = [
        (signed('retry', 'nosuch', None), 404,
         "Nothing was changed: no registered evolution has the id 'nosuch'"),
        (signed('retry', 'seed', history['seed']), 409,
         'Nothing was changed: seed is applied; retry is only possible while it is failed'),
        (signed('explode', 'convert', history['convert']), 400,
         "Nothing was changed: there is no action 'explode' (the page offers: retry, pause, resume)"),
    ]
    before = app.history()
    for fields, status, message in cases:
        refused = operator.post('/evolve/act', fields, expect_errors=True)
        assert (refused.status_int, message in said(refused)) == (status, True), said(refused)
        assert 'data-id="convert"' in refused.text  # the page, with the message on top
    assert operator.get('/evolve/act', expect_errors=True).status_int == 405
    assert app.history() == before and convert.calls == 1


# --- layout ------------------------------------------------------------------------------------------

#: A site's templates, per renderer: the page's own template puts ``content`` in the layout.
LAYOUTS = {
    # Kajiki, as a quickstarted project writes its pages: extend the master, fill its blocks.
    'kajiki': {
        'master.xhtml': '''<!DOCTYPE html>
<html>
<head>
  <meta charset="${response.charset}" />
  <title py:block="master_title">Example Site</title>
  <py:block name="head"></py:block>
</head>
<body>
  <nav id="site-nav"><a href="${tg.url('/')}">Example Site</a>
    <a py:if="request.identity" href="${tg.url('/logout_handler')}">Log out</a></nav>
  <main class="container"><py:block name="body"></py:block></main>
  <footer>${len(status['evolutions']) if defined('status') and status else 0} evolutions</footer>
</body>
</html>
''',
        'evolve_status.xhtml': '''<html py:extends="kajiki_site.master" py:strip="True">
  <head py:block="head" py:strip="True">
    <title py:block="master_title">${title} | Example Site</title>
  </head>
  <body py:block="body" py:strip="True">${content}</body>
</html>
''',
    },
    'mako': {
        'evolve_status.mak': '''<!DOCTYPE html><html><head><meta charset="${response.charset}" />
<title>${title} | Example Site</title></head>
<body><nav id="site-nav"><a href="${tg.url('/')}">Example Site</a></nav>
<main class="container">${content}</main>
<footer>${len(status['evolutions']) if status else 0} evolutions</footer></body></html>
''',
    },
}


@SQLITE
@pytest.mark.parametrize('engine', sorted(LAYOUTS))
def test_the_page_renders_inside_the_applications_layout_template(
        page_apps, sql_url, tmp_path, monkeypatch, engine):
    templates = tmp_path / f'{engine}_site'  # a package name of its own: imports are cached
    templates.mkdir()
    (templates / '__init__.py').write_text('')
    for name, text in LAYOUTS[engine].items():
        (templates / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = page_apps.tg_apps.model(('sqlite', sql_url))
    options = {'template': f'{engine}:{engine}_site.evolve_status', 'title': 'Upgrades'}
    app = page_apps.build(model, [NoteEvolution('seed', model), NoteEvolution('slugs', model)],
                          page_options=options, blueprint={'renderers': ['json', engine]})
    app.wait_until_serving()
    page = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR).get('/evolve/')
    text = ' '.join(page.text.split())
    assert '<meta charset="utf-8"' in text and '<title>Upgrades | Example Site</title>' in text
    assert re.search(r'<nav id="site-nav">.*</nav> <main class="container"> ?<div id="tgext-evolve"',
                     text)
    assert '<footer>2 evolutions</footer>' in text
    assert 'data-id="slugs"' in text and '<style>' in text and 'setTimeout(poll' in text
    assert '&lt;div id="tgext-evolve"' not in text  # the content is markup, not escaped text


@SQLITE
def test_a_layout_template_for_a_renderer_the_application_lacks_stops_it_at_start_up(
        page_apps, sql_url):
    model = page_apps.tg_apps.model(('sqlite', sql_url))
    with pytest.raises(ConfigurationError, match="needs the 'kajiki' renderer, which the appli"):
        page_apps.build(model, [NoteEvolution('seed', model)],
                        page_options={'template': 'kajiki:site.templates.evolve'},
                        blueprint={'renderers': ['json']})
