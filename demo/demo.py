"""tgext.evolve demo: a small TurboGears app on SQLite that answers 503 while its evolutions run.

Two blocking evolutions run behind the 503 (the new code needs their data); then the site
serves 200 while a background ``BatchEvolution`` backfills a column batch by batch, its progress
(items done/total, rate, ETA) read from the status document that ``gearbox evolve status --json``
prints; then the history.

Run it from the repository root (README.rst has the one-line command)::

    python demo/demo.py            # runs, prints the timeline and the history, exits
    python demo/demo.py --serve    # then keeps serving on http://127.0.0.1:8080/

Every run uses a new SQLite file, so the evolutions run every time.  Run it with ``--db FILE``
twice to see the second start serve at once: nothing is pending any more.
"""
import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import sqlalchemy as sa
import zope.sqlalchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker
from tg import FullStackApplicationConfigurator, TGController, expose

import tgext.evolve
from tgext.evolve import BatchEvolution, Evolution, operations
from tgext.evolve.service import service_for_config
from tgext.evolve.status_document import status_document

# --- the application's model, as a TurboGears quickstart lays it out ---------------------------

DBSession = scoped_session(sessionmaker(autoflush=True))
zope.sqlalchemy.register(DBSession)


class Base(DeclarativeBase):
    pass


class Page(Base):
    __tablename__ = 'pages'
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(200))
    slug: Mapped[str | None] = mapped_column(sa.String(200), nullable=True)
    words: Mapped[int | None] = mapped_column(nullable=True)  # filled in the background


def init_model(engine):
    DBSession.configure(bind=engine)
    Base.metadata.create_all(engine)  # the schema; data evolutions below fill it
    return DBSession


class model:  # what TurboGears' 'model' option expects: init_model and DBSession
    init_model = staticmethod(init_model)
    DBSession = DBSession


# --- the evolutions: data changes that must run exactly once, before the new code serves -------

PAGES = 2000


class ImportPages(Evolution):
    evolution_id = 'import_pages'

    def evolve(self):
        titles = ['Hello World', 'Release Notes 2.5', 'How We Evolve Data', 'About Us',
                  'Contact', 'Frequently Asked Questions', 'Batches That Resume']
        DBSession.execute(sa.insert(Page), [dict(title=f'{titles[n % len(titles)]} #{n}')
                                            for n in range(1, PAGES + 1)])


class AddSlugs(Evolution):
    """Blocking: the new pages link by slug, so nobody is served before every page has one."""
    evolution_id = 'add_slugs'

    def evolve(self):
        pages = DBSession.query(Page).filter(Page.slug.is_(None)).all()
        for done, page in enumerate(pages, 1):
            page.slug = '-'.join(page.title.lower().replace('#', '').split())
            if done % 200 == 0:
                self.progress(done, len(pages))
                time.sleep(0.2)  # stands in for real work, so that the 503s are visible


class CountWords(BatchEvolution):
    """Background: the site serves while it runs; each batch commits with its checkpoint."""
    evolution_id = 'count_words'
    background = True

    def collection(self):
        return DBSession.query(Page).filter(Page.words.is_(None))

    def process(self, page):
        page.words = len(page.title.split())
        time.sleep(0.0015)  # stands in for real work (a page to render, a file to read)


# --- the controller: the new code, which needs slugs ---------------------------------------------

class RootController(TGController):
    @expose('json')
    def index(self):
        pages = DBSession.query(Page).order_by(Page.id).limit(2).all()
        counted = DBSession.query(Page).filter(Page.words.isnot(None)).count()
        return {'pages': DBSession.query(Page).count(), 'first': [p.slug for p in pages],
                'words_counted': counted}


def make_app(db_path):
    config = FullStackApplicationConfigurator()
    config.update_blueprint({
        'root_controller': RootController(),
        'use_sqlalchemy': True, 'model': model, 'sqlalchemy.url': f'sqlite:///{db_path}',
        'session.enabled': False, 'cache.enabled': False, 'i18n.enabled': False,
        'sa_auth.enabled': False, 'trace_errors.enable': False, 'debug': False,
    })
    tgext.evolve.plugme(config, options={'evolutions': [ImportPages, AddSlugs, CountWords],
                                         'retry_after': 2, 'poll_interval': 0.5,
                                         'batch_seconds': 0.5})
    app = config.make_wsgi_app({}, {})
    import tg
    return app, service_for_config(tg.config)


# --- the demo itself -----------------------------------------------------------------------------

class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def fetch(url, accept='application/json'):
    request = urllib.request.Request(url, headers={'Accept': accept})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def backfill_progress(service):
    """The background evolution's entry of the status document (``gearbox evolve status
    --json`` prints the same document; the status page serves it as status.json)."""
    document = status_document(operations.status(service))
    return next(e for e in document['evolutions'] if e['id'] == CountWords.evolution_id)


def describe_progress(entry):
    progress = entry['progress']
    if progress is None:
        return f"{entry['state']}, not started"
    total = '' if progress['total'] is None else f"/{progress['total']}"  # not counted yet
    text = f"{entry['state']}: {progress['done']}{total} items"
    if progress['percent'] is not None:
        text += f" ({progress['percent']:.0f}%)"
    if progress['rate']:
        text += f", {progress['rate']:.0f} items/s"
    if progress['eta_seconds'] is not None:
        text += f", ETA {progress['eta_seconds']:.0f} s"
    return text


def print_history(db_path):
    engine = sa.create_engine(f'sqlite:///{db_path}')
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            'SELECT evolution_id, state, attempts, duration_ms, progress_done, batches_done, '
            'owner FROM tgext_evolve_history ORDER BY started_at')).all()
    print('\nHistory (table tgext_evolve_history):')
    print(f'  {"evolution_id":<14} {"state":<8} {"attempts":>8} {"duration":>10} {"items":>6} '
          f'{"batches":>7}  owner')
    for evolution_id, state, attempts, duration_ms, done, batches, owner in rows:
        batched = batches is not None  # a plain evolution's progress is a throttled report
        print(f'  {evolution_id:<14} {state:<8} {attempts:>8} {duration_ms:>8.0f}ms '
              f'{done if batched else "":>6} {batches if batched else "":>7}  {owner}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--db', help='SQLite file to use (default: a new temporary file)')
    parser.add_argument('--port', type=int, default=0, help='port (default: any free one)')
    parser.add_argument('--serve', action='store_true', help='keep serving after the demo')
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # in order with the log lines, even in a pipe
    logging.basicConfig(level=logging.WARNING, format='    log: %(message)s')
    logging.getLogger('tgext.evolve').setLevel(logging.INFO)
    logging.getLogger('tg').setLevel(logging.ERROR)  # a one-file app has no lib/helpers
    db_path = args.db or os.path.join(tempfile.mkdtemp(prefix='tgext-evolve-demo-'), 'demo.db')

    started = time.monotonic()
    app, service = make_app(db_path)
    server = make_server('127.0.0.1', args.port or (8080 if args.serve else 0), app,
                         handler_class=QuietHandler)
    url = f'http://127.0.0.1:{server.server_port}/'
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f'Serving {url} (database {db_path})\n')

    deadline = started + 60
    while time.monotonic() < deadline:
        status, headers, body = fetch(url)
        elapsed = time.monotonic() - started
        if status == 503:
            progress = json.loads(body).get('progress')
            print(f't={elapsed:4.1f}s  GET / -> 503, Retry-After: {headers.get("Retry-After")}'
                  + (f', progress {progress:.0f}%' if progress is not None else ''))
            time.sleep(0.4)
            continue
        print(f't={elapsed:4.1f}s  GET / -> {status}: {body.decode()}')
        break
    else:
        raise SystemExit('the blocking evolutions did not finish within 60 s')

    print('\nServing, while the background evolution backfills:')
    while time.monotonic() < deadline:
        status, _, body = fetch(url)
        entry = backfill_progress(service)
        elapsed = time.monotonic() - started
        print(f't={elapsed:4.1f}s  GET / -> {status}, words_counted '
              f'{json.loads(body)["words_counted"]:>4};  {CountWords.evolution_id} '
              f'{describe_progress(entry)}')
        if entry['state'] == 'applied':
            break
        time.sleep(1.0)
    else:
        raise SystemExit('the background evolution did not finish within 60 s')

    print_history(db_path)
    if args.serve:
        print(f'\nStill serving {url}; Ctrl-C to stop.')
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    server.shutdown()


if __name__ == '__main__':
    main()
