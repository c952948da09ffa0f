"""Upgrading from tgext.evolve 0.0.5: its recorded state is adopted on the first start.

0.0.5 kept one table (SQL: ``tgext_evolve(type, value)`` with rows ``version`` = the last
evolution id it applied and ``lock`` = the pid holding its lock) or one collection (MongoDB:
``{type: 'version', current: <id>}`` and ``{type: 'lock', process: <pid or None>}``).  On the
first start every registered evolution up to and including that version, in registration
order, is recorded ``adopted`` and never run; later ones run.  A leftover 0.0.5 lock is reported
and ignored; a version no registered evolution has is reported and adopts nothing.  The 0.0.5
store itself is only read, never changed.

Real TurboGears applications in this process (WebTest), on SQLite, PostgreSQL, MySQL/MariaDB,
Ming's MIM (and MongoDB when configured).
"""
import logging

import ming
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import conftest
from tgapps import NoteEvolution, database_url, tg_apps  # noqa: F401 (fixtures)
from tgext.evolve.backends.base import LEGACY_TABLE
from tgext.evolve.records import ADOPTED, APPLIED

FULLSTACK_PLUGME = ('fullstack', 'plugme')

#: 0.0.5's table, as its SQLAEvolver created it.
legacy_table = sa.Table(LEGACY_TABLE, sa.MetaData(),
                        sa.Column('type', sa.String(16), primary_key=True),
                        sa.Column('value', sa.String(255), nullable=False))


def write_legacy(database_url, version=None, lock_pid=None):
    """Leave the database as tgext.evolve 0.0.5 would have: last version, maybe its lock."""
    kind, url = database_url
    if kind in conftest.SQL_KINDS:
        engine = sa.create_engine(url, poolclass=NullPool)
        with engine.begin() as conn:
            legacy_table.create(conn)
            if version is not None:
                conn.execute(legacy_table.insert().values(type='version', value=version))
            if lock_pid is not None:
                conn.execute(legacy_table.insert().values(type='lock', value=str(lock_pid)))
        engine.dispose()
        return
    datastore = ming.create_datastore(url)
    collection = datastore.db[LEGACY_TABLE]
    collection.create_index('type', unique=True)
    if version is not None:
        collection.insert_one({'type': 'version', 'current': version})
    # 0.0.5 on MongoDB keeps its lock document after a clean unlock, with process None.
    collection.insert_one({'type': 'lock', 'process': lock_pid})
    if kind != 'mim':
        datastore.conn.close()


def read_legacy(database_url):
    """Every row/document of the 0.0.5 store, to check that it is left alone."""
    kind, url = database_url
    if kind in conftest.SQL_KINDS:
        engine = sa.create_engine(url, poolclass=NullPool)
        with engine.connect() as conn:
            rows = sorted(tuple(row) for row in conn.execute(sa.select(legacy_table)))
        engine.dispose()
        return rows
    datastore = ming.create_datastore(url)
    docs = sorted((doc['type'], doc.get('current', doc.get('process')))
                  for doc in datastore.db[LEGACY_TABLE].find())
    if kind != 'mim':
        datastore.conn.close()
    return docs


def start(tg_apps, database_url, ids):
    model = tg_apps.model(database_url)
    app = tg_apps.build(FULLSTACK_PLUGME, model, [NoteEvolution(i, model) for i in ids])
    app.wait_until_serving()
    return app, model


def states(app):
    return {i: r.state for i, r in app.history().items()}


def evolve_log(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records
            if r.name.startswith('tgext.evolve') and r.levelno >= level]


def test_evolutions_up_to_the_recorded_version_are_adopted_later_ones_run(
        tg_apps, database_url, caplog):
    caplog.set_level(logging.INFO, logger='tgext.evolve')
    write_legacy(database_url, version='b')
    legacy_before = read_legacy(database_url)

    app, model = start(tg_apps, database_url, ['a', 'b', 'c', 'd'])

    assert states(app) == {'a': ADOPTED, 'b': ADOPTED, 'c': APPLIED, 'd': APPLIED}
    assert model.notes() == ['c', 'd']  # adopted ones never ran again
    assert app.service.runner.applied == ['c', 'd']
    assert any("adopted 2 evolution(s) applied by tgext.evolve 0.0.5, up to 'b'" in line
               for line in evolve_log(caplog))
    # What a cleanly stopped 0.0.5 leaves (no lock row; on MongoDB a lock document with process
    # None) is not a leftover lock.
    assert not any('ignoring the lock' in line for line in evolve_log(caplog))
    assert read_legacy(database_url) == legacy_before


def test_adoption_happens_once(tg_apps, database_url):
    """Restarted with one more evolution: only that one runs; the adopted records stay."""
    write_legacy(database_url, version='a')
    first, _ = start(tg_apps, database_url, ['a', 'b'])
    first.stop()

    later, model = start(tg_apps, database_url, ['a', 'b', 'c'])

    assert later.service.runner.applied == ['c']
    assert states(later) == {'a': ADOPTED, 'b': APPLIED, 'c': APPLIED}
    assert model.notes() == ['b', 'c']


def test_leftover_lock_is_reported_and_ignored(tg_apps, database_url, caplog):
    caplog.set_level(logging.INFO, logger='tgext.evolve')
    write_legacy(database_url, version='a', lock_pid=4242)

    app, model = start(tg_apps, database_url, ['a', 'b'])

    assert states(app) == {'a': ADOPTED, 'b': APPLIED}
    assert model.notes() == ['b']
    reported = [line for line in evolve_log(caplog) if '0.0.5' in line and '4242' in line]
    assert len(reported) == 1, evolve_log(caplog)
    assert 'ignoring the lock' in reported[0]


def test_leftover_lock_without_version_adopts_nothing(tg_apps, database_url, caplog):
    """0.0.5 died during its very first evolution: nothing was applied, everything runs."""
    caplog.set_level(logging.INFO, logger='tgext.evolve')
    write_legacy(database_url, lock_pid=4242)

    app, model = start(tg_apps, database_url, ['a', 'b'])

    assert states(app) == {'a': APPLIED, 'b': APPLIED}
    assert model.notes() == ['a', 'b']
    assert any('ignoring the lock' in line and '4242' in line for line in evolve_log(caplog))


def test_unknown_version_is_reported_and_adopts_nothing(tg_apps, database_url, caplog):
    caplog.set_level(logging.INFO, logger='tgext.evolve')
    write_legacy(database_url, version='renamed_since')

    app, model = start(tg_apps, database_url, ['a', 'b'])

    assert states(app) == {'a': APPLIED, 'b': APPLIED}
    assert model.notes() == ['a', 'b']
    warnings = evolve_log(caplog, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "'renamed_since'" in warnings[0] and 'adopting nothing' in warnings[0]


def test_database_fully_evolved_by_0_0_5_runs_nothing(tg_apps, database_url):
    write_legacy(database_url, version='b')

    app, model = start(tg_apps, database_url, ['a', 'b'])

    assert states(app) == {'a': ADOPTED, 'b': ADOPTED}
    assert app.service.runner.applied == []
    assert model.notes() == []
