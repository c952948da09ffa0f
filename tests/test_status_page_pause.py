"""The status page's pause and resume buttons, through WebTest, on every database: the forms
it offers for each kind of evolution, what posting them does (the user's name in the audit
trail), and every bad form refused with a clear message and nothing changed.
"""
import pytest
import webtest

from polling import wait_until
from statuspages import NOBODY, OPERATOR, page_apps, sign_in  # noqa: F401 (fixture)
from stepped import Stepped
from tgapps import NoteEvolution, database_url, tg_apps  # noqa: F401 (fixtures)
from tgext.evolve import operations
from tgext.evolve.records import APPLIED, PAUSED
from tgext.evolve.status_page import csrf
from test_status_page import page_form, said

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def record(app, evolution_id):
    return app.service.backend.read_history(batches=True).get(evolution_id)


def offered(page, action, evolution_id):
    try:
        return bool(page_form(page, action, evolution_id)['token'])
    except AssertionError:
        return False


def test_an_operator_pauses_and_resumes_from_the_page_and_is_named_in_the_audit(
        page_apps, database_url):
    model = page_apps.tg_apps.model(database_url)
    backfill = Stepped('backfill', model)
    later = NoteEvolution('later', model)
    app = page_apps.build(model, [NoteEvolution('seed', model), backfill, later])
    backfill.allow(1)
    wait_until(lambda: getattr(record(app, 'backfill'), 'progress_done', None) == 1,
               'backfill at 1 item')
    operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
    page = operator.get('/evolve/')
    assert offered(page, 'pause', 'backfill') and not offered(page, 'resume', 'backfill')
    assert offered(page, 'pause', 'later')  # a plain one, before it starts
    assert not offered(page, 'pause', 'seed') and not offered(page, 'retry', 'backfill')

    form = page_form(page, 'pause', 'backfill')
    done = operator.post('/evolve/act', form)
    assert 'Pause of backfill requested: it stops at its next batch boundary' in said(done)
    assert 'It is a blocking evolution: while it is paused the site answers 503.' in said(done)
    replayed = operator.post('/evolve/act', form, expect_errors=True)
    assert replayed.status_int == 409
    assert 'Nothing was changed: backfill changed since this page showed it' in said(replayed)

    backfill.allow(1)
    wait_until(lambda: record(app, 'backfill').state == PAUSED, 'backfill paused')
    app.wait_for_phase('paused')
    page = operator.get('/evolve/')
    assert offered(page, 'resume', 'backfill') and not offered(page, 'pause', 'backfill')
    assert record(app, 'backfill').progress_done == 2
    done = operator.post('/evolve/act', page_form(page, 'resume', 'backfill'))
    assert ('Resume of backfill requested: the process holding the lock continues it from its '
            'checkpoint (2 items done)') in said(done)
    backfill.allow(10)
    app.wait_until_serving()
    assert (record(app, 'backfill').state, record(app, 'later').state) == (APPLIED, APPLIED)
    entries = [(e.action, e.actor) for e in operations.audit(app.service, 'backfill')]
    page_user = f'{OPERATOR} via the status page'
    assert entries == [('started', entries[0][1]), ('pause', page_user), ('paused', entries[0][1]),
                       ('resume', page_user), ('started', entries[0][1]),
                       ('applied', entries[0][1])]


def test_bad_pause_and_resume_forms_say_why_and_change_nothing(page_apps, database_url):
    model = page_apps.tg_apps.model(database_url)
    first = page_apps.tg_apps.blocking('first', model)
    app = page_apps.build(model, [NoteEvolution('seed', model), first])
    first.wait_started()
    operator = sign_in(webtest.TestApp(app.wsgi_app), OPERATOR)
    page = operator.get('/evolve/')
    assert not offered(page, 'pause', 'first')  # plain, and running: it cannot stop half-way
    tokens = csrf.FormTokens(csrf.derive_key(app.config), 900)
    history = app.service.backend.read_history(batches=True)

    def signed(action, evolution_id, user=OPERATOR):
        seen = csrf.state_seen(history.get(evolution_id))
        return {'action': action, 'id': evolution_id, 'seen': seen,
                'token': tokens.issue(user, action, evolution_id, seen)}

    good = signed('pause', 'seed')
    no = 'Nothing was changed: '
    cases = [
        (signed('pause', 'nosuch'), 404, f"{no}no registered evolution has the id 'nosuch'"),
        (signed('resume', 'nosuch'), 404, f"{no}no registered evolution has the id 'nosuch'"),
        (signed('pause', 'seed'), 409,
         f'{no}seed is applied; pause is only possible while it is pending or running'),
        (signed('resume', 'seed'), 409,
         f'{no}seed is applied; resume is only possible while it is paused'),
        (signed('resume', 'first'), 409,
         f'{no}first is running; resume is only possible while it is paused'),
        (signed('pause', 'first'), 409, f'{no}first is running now and is not a '
                                        f'BatchEvolution: it runs in one transaction and '
                                        f'cannot stop half-way'),
        (dict(good, token=''), 403, f'{no}the form carries no CSRF token'),
        (dict(good, id='first'), 403, 'forged or altered'),
        (dict(good, action='resume'), 403, 'forged or altered'),
        (signed('pause', 'first', user=NOBODY), 403, 'forged or altered'),
    ]
    for fields, status, message in cases:
        refused = operator.post('/evolve/act', fields, expect_errors=True)
        assert refused.status_int == status, (fields, said(refused)[:300])
        text = said(refused)
        assert 'Nothing was changed: ' in text and message in text, (fields, message)
    assert app.service.backend.read_history(batches=True) == history
    assert [(e.evolution_id, e.action) for e in operations.audit(app.service)] == [
        ('seed', 'started'), ('seed', 'applied'), ('first', 'started')]
    first.release.set()
    app.wait_until_serving()
