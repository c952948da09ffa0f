"""Walking a batched evolution's collection by key, on every database.

What a user notices: every item of ``collection()`` reaches ``process()`` exactly once, in key
order, whatever the key and whatever ``process()`` changes; a walk resumed from a stored cursor
continues right after it; ranges for parallel work share the items out exactly once; batches
are keyset queries that the index serves, and a walk of any length holds one batch in memory.
"""
import contextlib
import datetime
import gc
import json
import random
import re
import uuid
import weakref

import bson
import conftest
import ming
import pytest
import sqlalchemy as sa
import transaction
import zope.sqlalchemy
from ming import schema as ming_schema
from ming.odm import FieldProperty, MappedClass, ThreadLocalODMSession
from sqlalchemy import orm
from sqlalchemy.dialects import mysql

from tgext.evolve.backends.ming_walker import MingWalker
from tgext.evolve.backends.sql_walker import SQLWalker
from tgext.evolve.backends.walker import KeyRange
from tgext.evolve.errors import ConfigurationError

EVOLUTION = 'backfill_slugs'


def walk(walker, size, cursor=None, upper=None, after_batch=None):
    """Ask for batches until an empty one; ``after_batch(items)`` plays the runner's part."""
    batches = []
    while True:
        items, new_cursor = walker.next_batch(cursor, size, upper)
        if not items:
            assert new_cursor == cursor  # an empty batch keeps the checkpoint where it was
            return batches, cursor
        batches.append(items)
        if after_batch is not None:
            after_batch(items)
        # The runner stores every cursor as JSON: continue from what storage gives back.
        cursor = json.loads(json.dumps(new_cursor, allow_nan=False))


def flat(batches):
    return [item for items in batches for item in items]


def assert_partition(ranges):
    """Ranges cover the key space once: open at both ends, each starting where the last ended."""
    assert ranges[0].after is None and ranges[-1].upto is None
    for previous, following in zip(ranges, ranges[1:]):
        assert previous.upto == following.after
        assert previous.upto is not None


# === SQL ========================================================================================

class WalkBase(orm.DeclarativeBase):
    pass


class ItemColumns:
    """What every walked table has besides its key: the column a backfill fills in, a counter."""
    slug: orm.Mapped[str] = orm.mapped_column(sa.String(40), nullable=True)
    n: orm.Mapped[int] = orm.mapped_column(default=0)


class IntItem(ItemColumns, WalkBase):
    __tablename__ = 'walk_int'
    id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)


class StrItem(ItemColumns, WalkBase):
    __tablename__ = 'walk_str'
    code: orm.Mapped[str] = orm.mapped_column(sa.String(40), primary_key=True)


class UuidItem(ItemColumns, WalkBase):
    __tablename__ = 'walk_uuid'
    id: orm.Mapped[uuid.UUID] = orm.mapped_column(sa.Uuid, primary_key=True)


class DatetimeItem(ItemColumns, WalkBase):
    __tablename__ = 'walk_datetime'
    # MySQL's DATETIME drops microseconds unless told to keep them.
    at: orm.Mapped[datetime.datetime] = orm.mapped_column(
        sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb'), primary_key=True)


class CompositeItem(ItemColumns, WalkBase):
    __tablename__ = 'walk_composite'
    a: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=False)
    b: orm.Mapped[str] = orm.mapped_column(sa.String(20), primary_key=True)


class Tag(WalkBase):
    __tablename__ = 'walk_tag'
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=False)
    item_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey('walk_int.id'))
    name: orm.Mapped[str] = orm.mapped_column(sa.String(20))


IntItem.tags = orm.relationship(Tag)

MODELS = {'int': IntItem, 'str': StrItem, 'uuid': UuidItem, 'datetime': DatetimeItem,
          'composite': CompositeItem}
SINGLE_KEYS = ['int', 'str', 'uuid', 'datetime']
BASE_TIME = datetime.datetime(2024, 2, 28, 23, 59, 58)


def make_key(kind, i):
    """The i-th key of a kind; keys of one kind are distinct, their order differs from i's."""
    if kind == 'int':
        return i * 3 + 1
    if kind == 'str':
        return f'k{(i * 7919) % 100003:06d}-{i}'
    if kind == 'uuid':
        return uuid.UUID(int=random.Random(i).getrandbits(128), version=4)
    if kind == 'datetime':
        return BASE_TIME + datetime.timedelta(seconds=i // 3, microseconds=(i % 3) * 7 + 1)
    return (i // 4, f'b{(i * 3) % 4}')


def key_columns(model):
    return list(sa.inspect(model).primary_key)


def key_dict(model, key):
    names = [c.key for c in key_columns(model)]
    return dict(zip(names, key if isinstance(key, tuple) else (key,)))


class SQLDatabase:
    """The run database with the walked tables, emptied, and an app-like session."""

    def __init__(self, url):
        self.engine = sa.create_engine(url)
        # The tables are made once per run and emptied per test: rebuilding the schema for each
        # test (the ``sql_url`` fixture) costs half a second on MariaDB, ten times the test.
        WalkBase.metadata.create_all(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            for table in reversed(WalkBase.metadata.sorted_tables):
                conn.execute(table.delete())
        self.session = orm.scoped_session(orm.sessionmaker(bind=self.engine))
        zope.sqlalchemy.register(self.session)
        self.dialect = self.engine.dialect.name

    def fill(self, model, keys, filled=lambda i: False):
        """Insert one row per key, in shuffled order (so that storage order is not key order);
        rows whose index ``filled`` accepts get a slug, the others are left to backfill."""
        rows = [{**key_dict(model, key), 'slug': 'old' if filled(i) else None, 'n': 0}
                for i, key in enumerate(keys)]
        random.Random(7).shuffle(rows)
        with self.engine.begin() as conn:
            if rows:
                conn.execute(sa.insert(model.__table__), rows)

    def keys_in_order(self, model, where=None):
        """The keys the database holds, in its own key order (its collation, its types)."""
        columns = [model.__table__.c[c.name] for c in key_columns(model)]
        statement = sa.select(*columns).order_by(*columns)
        if where is not None:
            statement = statement.where(where)
        with self.engine.connect() as conn:
            return [tuple(row) if len(columns) > 1 else row[0] for row in conn.execute(statement)]

    def column_values(self, model, column):
        with self.engine.connect() as conn:
            return conn.execute(sa.select(model.__table__.c[column])).scalars().all()

    def close(self):
        transaction.abort()
        self.session.remove()
        self.engine.dispose()


@pytest.fixture(params=conftest.SQL_KINDS)
def sqldb(request):
    database = SQLDatabase(request.getfixturevalue(f'{request.param}_database_url'))
    try:
        yield database
    finally:
        database.close()


def collection_of(form, model, session, where=True):
    """The collection in one of the three forms users write, backfilling rows without a slug."""
    if form == 'query':
        query = session.query(model)
        return query.filter(model.slug.is_(None)) if where else query
    if form == 'select':
        statement = sa.select(model)
        return statement.where(model.slug.is_(None)) if where else statement
    table = model.__table__
    statement = sa.select(table)
    return statement.where(table.c.slug.is_(None)) if where else statement


def item_key(model, item):
    """The key of an ORM object or of a Row of the model's table."""
    if isinstance(item, sa.Row):
        values = tuple(item._mapping[model.__table__.c[c.name]] for c in key_columns(model))
    else:
        values = sa.inspect(item).identity
    return values if len(values) > 1 else values[0]


def walked_keys(model, batches):
    return [item_key(model, item) for item in flat(batches)]


# --- every item once, in key order --------------------------------------------------------------

@pytest.mark.parametrize('form', ['query', 'select', 'core'])
@pytest.mark.parametrize('kind', list(MODELS))
def test_a_walk_visits_every_item_of_the_collection_once_in_key_order(sqldb, kind, form):
    model = MODELS[kind]
    sqldb.fill(model, [make_key(kind, i) for i in range(60)], filled=lambda i: i % 3 == 0)
    walker = SQLWalker(EVOLUTION, collection_of(form, model, sqldb.session), sqldb.session)

    batches, _ = walk(walker, size=7)

    assert walked_keys(model, batches) == sqldb.keys_in_order(model, model.slug.is_(None))
    assert [len(items) for items in batches] == [7] * 5 + [5]
    assert walker.count() == 40
    assert walker.count(after=walker.next_batch(None, 7).cursor) == 33  # what is left to do


@pytest.mark.parametrize('form', ['query', 'select', 'core'])
def test_a_collection_that_joins_yields_each_item_once(sqldb, form):
    sqldb.fill(IntItem, [make_key('int', i) for i in range(20)])
    with sqldb.engine.begin() as conn:  # two matching tags on every item: two rows per item
        conn.execute(sa.insert(Tag.__table__), [
            {'id': i, 'item_id': make_key('int', i // 3), 'name': 'x' if i % 3 else 'y'}
            for i in range(60)])
    session = sqldb.session
    collection = {
        'query': session.query(IntItem).join(IntItem.tags).filter(Tag.name == 'x'),
        'select': sa.select(IntItem).join(IntItem.tags).where(Tag.name == 'x'),
        'core': sa.select(IntItem.__table__).join(Tag.__table__).where(Tag.name == 'x'),
    }[form]
    walker = SQLWalker(EVOLUTION, collection, session)

    batches, _ = walk(walker, size=3)

    assert walked_keys(IntItem, batches) == sqldb.keys_in_order(IntItem)
    assert walker.count() == 20
    first = walker.next_batch(None, 3)
    assert walker.count(after=first.cursor) == 20 - len(first.items)
    ranges = walker.split(3)
    in_ranges = [walked_keys(IntItem, walk(walker, 4, r.after, r.upto)[0]) for r in ranges]
    assert sum(in_ranges, []) == sqldb.keys_in_order(IntItem)


def test_the_users_order_by_options_and_aliases_are_kept_or_replaced_as_documented(sqldb):
    sqldb.fill(IntItem, [make_key('int', i) for i in range(12)])
    with sqldb.engine.begin() as conn:
        conn.execute(sa.insert(Tag.__table__),
                     [{'id': i, 'item_id': make_key('int', i % 12), 'name': 't'}
                      for i in range(24)])
    session = sqldb.session
    expected = sqldb.keys_in_order(IntItem)
    page = orm.aliased(IntItem)
    for collection in [
            session.query(IntItem).order_by(IntItem.id.desc()),
            session.query(IntItem).options(orm.joinedload(IntItem.tags)),
            sa.select(IntItem).options(orm.joinedload(IntItem.tags)).order_by(IntItem.n),
            sa.select(IntItem).options(orm.selectinload(IntItem.tags)),
            sa.select(page).where(page.n == 0),
            sa.select(IntItem.__table__.c.slug, IntItem.__table__.c.id.label('the_id'))]:
        walker = SQLWalker(EVOLUTION, collection, session)
        batches, _ = walk(walker, size=5)
        items = flat(batches)
        keys = [row.the_id if isinstance(row, sa.Row) else row.id for row in items]
        assert keys == expected, collection
        if not isinstance(items[0], sa.Row):
            assert all(len(item.tags) == 2 for item in items)  # eager loads still load
        assert walker.count() == 12
        transaction.abort()


# --- what process() changes ---------------------------------------------------------------------

def test_setting_the_filtered_column_neither_skips_nor_repeats_an_item(sqldb):
    """The typical backfill: each batch commits, and its items leave the collection."""
    sqldb.fill(IntItem, [make_key('int', i) for i in range(50)], filled=lambda i: i % 4 == 0)
    session = sqldb.session
    walker = SQLWalker(EVOLUTION, session.query(IntItem).filter(IntItem.slug.is_(None)), session)
    cursor = None
    while True:
        with transaction.manager:  # one batch, one transaction, as the runner does
            items, cursor = walker.next_batch(cursor, 6)
            for item in items:  # process(): non-idempotent on purpose
                item.slug = f'slug-{item.id}'
                item.n += 1
        if not items:
            break

    assert sorted(sqldb.column_values(IntItem, 'n')) == [0] * 13 + [1] * 37
    assert sqldb.column_values(IntItem, 'slug').count('old') == 13


def test_rows_changed_between_batches_behind_and_ahead_of_the_cursor(sqldb):
    """Keys ahead of the cursor are walked as they are when reached; keys behind it are done."""
    sqldb.fill(IntItem, [10 * i for i in range(1, 21)])  # 10 .. 200
    session = sqldb.session
    walker = SQLWalker(EVOLUTION, sa.select(IntItem).where(IntItem.slug.is_(None)), session)
    first, cursor = walker.next_batch(None, 5)  # 10 .. 50
    assert [item.id for item in first] == [10, 20, 30, 40, 50]
    with sqldb.engine.begin() as conn:  # another writer, between two batches
        table = IntItem.__table__
        conn.execute(sa.insert(table), [{'id': 5, 'n': 0}, {'id': 55, 'n': 0},
                                        {'id': 1000, 'n': 0}])
        conn.execute(sa.delete(table).where(table.c.id == 100))
        conn.execute(sa.update(table).where(table.c.id == 150).values(slug='filled elsewhere'))
    transaction.abort()  # a new transaction sees the other writer's commit

    batches, _ = walk(walker, 5, cursor)

    assert walked_keys(IntItem, batches) == (
        [55] + [10 * i for i in range(6, 21) if i not in (10, 15)] + [1000])


# --- resuming ------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', list(MODELS))
def test_a_walk_resumed_from_a_stored_cursor_continues_right_after_it(sqldb, kind):
    model = MODELS[kind]
    sqldb.fill(model, [make_key(kind, i) for i in range(30)])
    expected = sqldb.keys_in_order(model)
    first = SQLWalker(EVOLUTION, sa.select(model), sqldb.session).next_batch(None, 8)
    stored = json.dumps(first.cursor)  # the checkpoint, committed with the batch
    first_keys = [item_key(model, item) for item in first.items]
    transaction.abort()
    sqldb.session.remove()  # another process: another session, another walker, another form

    after = SQLWalker(EVOLUTION, collection_of('query', model, sqldb.session, where=False),
                      sqldb.session)
    rest, _ = walk(after, 5, json.loads(stored))

    assert first_keys + walked_keys(model, rest) == expected


@pytest.mark.parametrize('kind', list(MODELS))
def test_upper_bounds_stop_a_walk_at_the_given_key_inclusive(sqldb, kind):
    model = MODELS[kind]
    sqldb.fill(model, [make_key(kind, i) for i in range(30)])
    expected = sqldb.keys_in_order(model)
    walker = SQLWalker(EVOLUTION, sa.select(model.__table__), sqldb.session)
    ninth = walker.next_batch(None, 9).cursor
    twentieth = walker.next_batch(None, 20).cursor

    to_ninth, _ = walk(walker, 4, upper=ninth)
    between, _ = walk(walker, 4, cursor=ninth, upper=twentieth)
    single, _ = walk(walker, 4, cursor=ninth, upper=walker.next_batch(None, 10).cursor)

    assert walked_keys(model, to_ninth) == expected[:9]
    assert walked_keys(model, between) == expected[9:20]
    assert walked_keys(model, single) == [expected[9]]


# --- ranges for parallel work --------------------------------------------------------------------

def walk_ranges(walker, ranges, model, size=4):
    return [walked_keys(model, walk(walker, size, r.after, r.upto)[0]) for r in ranges]


@pytest.mark.parametrize('kind', SINGLE_KEYS)
def test_split_ranges_share_out_every_item_once(sqldb, kind):
    model = MODELS[kind]
    sqldb.fill(model, [make_key(kind, i) for i in range(90)], filled=lambda i: i % 9 == 4)
    expected = sqldb.keys_in_order(model, model.slug.is_(None))  # 80 items
    walker = SQLWalker(EVOLUTION, collection_of('select', model, sqldb.session), sqldb.session)

    for n in (1, 2, 3, 7, 80, 200):
        ranges = walker.split(n)
        assert_partition(ranges)
        # Quantiles never cut an empty range; integer arithmetic does where keys are sparse.
        assert 1 <= len(ranges) <= (n if kind == 'int' else min(n, 80))
        parts = walk_ranges(walker, ranges, model)
        assert sum(parts, []) == expected, n
        if n <= 7:  # evenly shared: keys of a kind are spread (int) or cut by quantile
            assert max(map(len, parts)) - min(map(len, parts)) <= 80 // n // 3 + 1, parts


@pytest.mark.parametrize('kind', SINGLE_KEYS)
def test_split_of_an_empty_or_one_item_collection_is_one_open_range(sqldb, kind):
    model = MODELS[kind]
    walker = SQLWalker(EVOLUTION, collection_of('query', model, sqldb.session), sqldb.session)
    assert walker.split(4) == [KeyRange(None, None)]
    assert walk(walker, 3) == ([], None)
    transaction.abort()  # the next transaction sees the row (REPEATABLE READ on MySQL)

    sqldb.fill(model, [make_key(kind, 5)])
    assert walker.split(4) == [KeyRange(None, None)]
    assert walked_keys(model, walk(walker, 3)[0]) == [make_key(kind, 5)]


def test_split_of_integer_keys_with_big_gaps_covers_the_keys_between_and_beyond(sqldb):
    keys = [1, 2, 3, 10 ** 12, 10 ** 12 + 1, 2 ** 62]
    sqldb.fill(IntItem, keys)
    walker = SQLWalker(EVOLUTION, sa.select(IntItem), sqldb.session)
    ranges = walker.split(5)
    assert_partition(ranges)
    assert len(ranges) == 5
    with sqldb.engine.begin() as conn:  # rows added after the split: below, between, above
        conn.execute(sa.insert(IntItem.__table__),
                     [{'id': k, 'n': 0} for k in (-5, 0, 10 ** 15, 2 ** 63 - 1)])
    transaction.abort()

    parts = walk_ranges(walker, ranges, IntItem)

    assert sum(parts, []) == sorted(keys + [-5, 0, 10 ** 15, 2 ** 63 - 1])


def test_split_refuses_a_composite_key_saying_why(sqldb):
    sqldb.fill(CompositeItem, [make_key('composite', i) for i in range(10)])
    walker = SQLWalker(EVOLUTION, sa.select(CompositeItem), sqldb.session)
    with pytest.raises(ConfigurationError) as error:
        walker.split(3)
    message = str(error.value)
    assert f"evolution '{EVOLUTION}'" in message
    assert 'composite primary key (walk_composite.a, walk_composite.b)' in message
    assert 'parallel' in message


# --- the SQL sent --------------------------------------------------------------------------------

@contextlib.contextmanager
def statements_sent(engine):
    sent = []

    def listener(conn, cursor, statement, parameters, context, executemany):
        sent.append((statement, parameters))

    sa.event.listen(engine, 'before_cursor_execute', listener)
    try:
        yield sent
    finally:
        sa.event.remove(engine, 'before_cursor_execute', listener)


@pytest.mark.parametrize('form', ['query', 'select', 'core'])
@pytest.mark.parametrize('kind', ['int', 'composite'])
def test_batches_are_keyset_queries_with_a_limit_and_no_offset(sqldb, kind, form):
    model = MODELS[kind]
    sqldb.fill(model, [make_key(kind, i) for i in range(25)])
    walker = SQLWalker(EVOLUTION, collection_of(form, model, sqldb.session), sqldb.session)
    with statements_sent(sqldb.engine) as sent:
        batches, _ = walk(walker, 10)
    selects = [(s, p) for s, p in sent if s.lstrip().upper().startswith('SELECT')]
    assert len(batches) == 3 and len(selects) == 4  # one query per batch, and the empty one
    for statement, parameters in selects:
        assert re.search(r'\bLIMIT\b', statement)
        assert 'ORDER BY' in statement
        if statement.rstrip().endswith('LIMIT ? OFFSET ?'):
            # SQLAlchemy's SQLite dialect always renders an OFFSET with LIMIT: it must be 0.
            assert parameters[-1] == 0
        else:
            assert not re.search(r'\bOFFSET\b', statement)
    selects = [s for s, _ in selects]
    assert all(' > ' in s for s in selects[1:])  # every batch after the first starts at its key


def explained(sqldb, statement, parameters):
    """The database's own account of how it ran a walker's statement."""
    with sqldb.engine.connect() as conn:
        raw = conn.connection.driver_connection.cursor()
        if sqldb.dialect == 'mysql':
            raw.execute('FLUSH STATUS')
            raw.execute(statement, parameters)
            raw.fetchall()
            raw.execute("SHOW SESSION STATUS LIKE 'Handler_read%%'")
            reads = {name: int(value) for name, value in raw.fetchall()}
            raw.execute('EXPLAIN ' + statement, parameters)
            names = [d[0] for d in raw.description]
            return [dict(zip(names, row)) for row in raw.fetchall()], reads
        prefix = 'EXPLAIN (ANALYZE) ' if sqldb.dialect == 'postgresql' else 'EXPLAIN QUERY PLAN '
        raw.execute(prefix + statement, parameters)
        return '\n'.join(str(row[-1] if sqldb.dialect == 'sqlite' else row[0])
                         for row in raw.fetchall()), None


def test_a_composite_key_batch_reads_the_index_from_the_cursor_not_from_the_start(sqldb):
    """The expanded ``a >= x AND (a > x OR (a = x AND b > y))`` is a range scan everywhere."""
    sqldb.fill(CompositeItem, [make_key('composite', i) for i in range(6000)])
    with sqldb.engine.begin() as conn:  # statistics, as a live table has them
        conn.exec_driver_sql({'mysql': 'ANALYZE TABLE walk_composite',
                              'postgresql': 'ANALYZE walk_composite'}.get(sqldb.dialect,
                                                                           'ANALYZE'))
    walker = SQLWalker(EVOLUTION, sa.select(CompositeItem).where(CompositeItem.n == 0),
                       sqldb.session)
    middle = walker.next_batch(None, 3001).cursor
    with statements_sent(sqldb.engine) as sent:
        items, _ = walker.next_batch(middle, 100)
    assert len(items) == 100
    transaction.abort()

    plan, reads = explained(sqldb, *sent[-1])

    if sqldb.dialect == 'mysql':
        assert [(row['type'], row['key']) for row in plan] == [('range', 'PRIMARY')], plan
        # A scan from the index's first entry would read ~3,100 entries to return these 100.
        assert reads['Handler_read_next'] + reads['Handler_read_key'] <= 110, reads
    elif sqldb.dialect == 'postgresql':
        assert 'Index Cond: ' in plan, plan
        removed = [int(n) for n in re.findall(r'Rows Removed by Filter: (\d+)', plan)]
        assert sum(removed) < 10, plan  # at most the rest of the cursor's own ``a``
    else:
        assert 'SEARCH walk_composite USING INDEX' in plan, plan


# --- memory --------------------------------------------------------------------------------------

def live_objects_per_batch(sqldb, rows, size):
    """Walk ``rows`` IntItems committing each batch, as the runner does; return the number of
    IntItem objects alive and in the session after each batch, and after the walk."""
    sqldb.fill(IntItem, range(rows))
    live = weakref.WeakSet()

    def loaded(target, context):
        live.add(target)

    sa.event.listen(IntItem, 'load', loaded)
    session = sqldb.session
    walker = SQLWalker(EVOLUTION, session.query(IntItem).filter(IntItem.slug.is_(None)), session)
    counts = []
    cursor = None
    try:
        while True:
            with transaction.manager:
                items, cursor = walker.next_batch(cursor, size)
                for item in items:
                    item.slug = 'new'
                counts.append((len(live), len(session().identity_map)))
            if not items:
                break
            del items
        del item  # noqa: F821 - the last item of the loop above
        gc.collect()
        return counts, len(live)
    finally:
        sa.event.remove(IntItem, 'load', loaded)


def test_a_walk_keeps_at_most_one_batch_of_objects_alive(sqldb):
    counts, left = live_objects_per_batch(sqldb, rows=2000, size=100)
    assert len(counts) == 21
    assert max(objects for objects, _ in counts) <= 100
    assert max(in_session for _, in_session in counts) <= 100
    assert left == 0  # the walker keeps nothing once its caller is done with the items


@pytest.mark.slow
def test_a_walk_over_100k_rows_keeps_at_most_one_batch_of_objects_alive(sqldb):
    counts, left = live_objects_per_batch(sqldb, rows=100_000, size=1000)
    assert len(counts) == 101
    assert max(max(pair) for pair in counts) <= 1000
    assert left == 0


# --- bad input -----------------------------------------------------------------------------------

metadata = sa.MetaData()
no_key_table = sa.Table('walk_no_key', metadata, sa.Column('x', sa.Integer))
other_table = sa.Table('walk_other', metadata, sa.Column('id', sa.Integer, primary_key=True))


@pytest.fixture
def session():
    """A session that never connects: the checks happen when the walker is created."""
    session = orm.scoped_session(orm.sessionmaker(bind=sa.create_engine('sqlite://')))
    yield session
    session.remove()


@pytest.mark.parametrize('make, problem', [
    (lambda s: [IntItem(id=1)], 'must return a Query (DBSession.query(Page)) or a select(), '
                                'not [<'),
    (lambda s: None, 'must return a Query'),
    (lambda s: IntItem, 'must return a Query'),
    (lambda s: s.query(IntItem, Tag), 'a Query of several entities or columns (IntItem, Tag)'),
    (lambda s: sa.select(IntItem, Tag.name), 'a select() of several entities or columns'),
    (lambda s: s.query(IntItem.id, IntItem.slug), 'a Query of columns (id, slug)'),
    (lambda s: sa.select(no_key_table), 'the table walk_no_key of collection() has no primary '
                                        'key'),
    (lambda s: sa.select(IntItem.__table__.c.slug), 'does not include the primary key column '
                                                    'walk_int.id'),
    (lambda s: sa.select(IntItem.slug).where(IntItem.n > 1), 'does not include the primary key'),
    (lambda s: sa.select(IntItem.__table__.c.id, other_table.c.id),
     'columns of several tables (walk_int, walk_other)'),
    (lambda s: sa.text('SELECT * FROM walk_int'), 'a textual statement (SELECT * FROM walk_int)'),
    (lambda s: sa.text('SELECT id FROM walk_int').columns(sa.column('id')),
     'a textual statement'),
    (lambda s: sa.select(IntItem).from_statement(sa.text('SELECT * FROM walk_int')),
     'a textual statement'),
    (lambda s: sa.select(sa.text('id')).select_from(sa.text('walk_int')), "of no table's columns"),
    (lambda s: s.query(IntItem).from_statement(sa.text('SELECT * FROM walk_int')),
     'existing full statement'),
    (lambda s: s.query(IntItem).limit(10), 'already has LIMIT or OFFSET'),
    (lambda s: s.query(IntItem).offset(10), 'already has LIMIT or OFFSET'),
    (lambda s: sa.select(IntItem).limit(10), 'has LIMIT, which a walk by key cannot keep'),
    (lambda s: sa.select(IntItem.__table__).offset(5).limit(1), 'has LIMIT and OFFSET'),
    (lambda s: sa.select(IntItem).fetch(3), 'has FETCH'),
], ids=lambda value: value if isinstance(value, str) else '')
def test_a_collection_that_cannot_be_walked_is_refused_naming_evolution_and_problem(
        session, make, problem):
    with pytest.raises(ConfigurationError) as error:
        SQLWalker(EVOLUTION, make(session), session)
    message = str(error.value)
    assert message.startswith(f"evolution '{EVOLUTION}': ")
    assert problem in message


def test_a_walker_without_the_applications_session_is_refused(session):
    with pytest.raises(ConfigurationError, match=f"evolution '{EVOLUTION}'.*DBSession"):
        SQLWalker(EVOLUTION, sa.select(IntItem), None)


@pytest.mark.parametrize('model, cursor, problem', [
    (IntItem, [1, 'a'], 'does not fit the collection\'s key (walk_int.id)'),
    (CompositeItem, 5, "does not fit the collection's key (walk_composite.a, walk_composite.b)"),
    (CompositeItem, [5], 'does not fit'),
    (IntItem, {'$what': 1}, 'unreadable cursor'),
])
def test_a_stored_cursor_that_does_not_fit_the_key_is_refused(session, model, cursor, problem):
    walker = SQLWalker(EVOLUTION, sa.select(model), session)
    with pytest.raises(ConfigurationError) as error:
        walker.next_batch(cursor, 10)
    assert f"evolution '{EVOLUTION}'" in str(error.value)
    assert problem in str(error.value)


@pytest.mark.parametrize('size', [0, -1, 2.0, True, None])
def test_a_batch_size_that_is_not_a_positive_int_is_a_programming_error(session, size):
    walker = SQLWalker(EVOLUTION, sa.select(IntItem), session)
    with pytest.raises(ValueError, match='positive int'):
        walker.next_batch(None, size)
    with pytest.raises(ValueError, match='positive int'):
        walker.split(size)


# === Ming ======================================================================================

# The application's one thread-local session, shared with conftest: a second, unbound
# ThreadLocalODMSession would be flushed (and fail) by every ThreadLocalODMSession.flush_all().
walk_doc_session = conftest.ming_doc_session
WalkSession = conftest.MingDBSession


def walked_class(name, collection, id_type):
    """A mapped class of the app's kind: an ``_id`` of ``id_type``, a slug to fill, a counter."""
    meta = type('__mongometa__', (), {'session': WalkSession, 'name': collection})
    return type(name, (MappedClass,), {
        '__mongometa__': meta, '_id': FieldProperty(id_type),
        'slug': FieldProperty(str, if_missing=None), 'n': FieldProperty(int, if_missing=0)})


WalkedPage = walked_class('WalkedPage', 'walk_pages', ming_schema.ObjectId)
WalkedNumber = walked_class('WalkedNumber', 'walk_numbers', int)
WalkedCode = walked_class('WalkedCode', 'walk_codes', str)
MING_MODELS = {'objectid': WalkedPage, 'int': WalkedNumber, 'str': WalkedCode}


def mongo_id(kind, i):
    if kind == 'objectid':
        # Distinct, and not in insertion order: random timestamps and counters.
        return bson.ObjectId(random.Random(i).getrandbits(96).to_bytes(12, 'big'))
    if kind == 'int':
        return (i * 7919) % 100003
    return f'code-{(i * 7919) % 100003:06d}'


class MongoDatabase:
    def __init__(self, url):
        self.datastore = ming.create_datastore(url)
        walk_doc_session.bind = self.datastore
        self.session = WalkSession
        self.session.close()
        self.db = self.datastore.db

    def fill(self, model, ids, filled=lambda i: False):
        docs = [{'_id': _id, 'slug': 'old' if filled(i) else None, 'n': 0}
                for i, _id in enumerate(ids)]
        random.Random(7).shuffle(docs)
        if docs:
            self.raw(model).insert_many(docs)

    def raw(self, model):
        return self.db[model.__mongometa__.name]

    def ids_in_order(self, model, filter_=None):
        return [doc['_id'] for doc in self.raw(model).find(filter_ or {}, sort=[('_id', 1)])]

    def close(self):
        ThreadLocalODMSession.close_all()
        walk_doc_session.bind = None
        if not isinstance(self.db, ming.mim.Database):
            self.datastore.conn.close()


@pytest.fixture
def mongodb(mongo_url):
    database = MongoDatabase(mongo_url)
    try:
        yield database
    finally:
        database.close()


def ming_collection(form, model):
    if form == 'cursor':
        return model.query.find({'slug': None})
    if form == 'sorted cursor':
        return model.query.find({'slug': None}).sort('n', -1)
    if form == 'class and filter':
        return (model, {'slug': None})
    return model


def flush_and_clear():
    """The caller's part after each batch on Ming."""
    WalkSession.flush()
    WalkSession.close()


def ids_of(batches):
    return [doc._id for doc in flat(batches)]


@pytest.mark.parametrize('form', ['cursor', 'sorted cursor', 'class and filter', 'class'])
@pytest.mark.parametrize('kind', list(MING_MODELS))
def test_a_ming_walk_visits_every_document_once_in_id_order(mongodb, kind, form):
    model = MING_MODELS[kind]
    mongodb.fill(model, [mongo_id(kind, i) for i in range(40)], filled=lambda i: i % 4 == 0)
    walker = MingWalker(EVOLUTION, ming_collection(form, model), WalkSession)

    batches, _ = walk(walker, 6, after_batch=lambda items: flush_and_clear())

    wanted = None if form == 'class' else {'slug': None}
    assert ids_of(batches) == mongodb.ids_in_order(model, wanted)
    assert all(isinstance(doc, model) for doc in flat(batches))
    assert walker.count() == (40 if form == 'class' else 30)
    assert walker.count(after=walker.next_batch(None, 6).cursor) == (34 if form == 'class' else 24)


def test_a_ming_filter_on_id_itself_is_kept_with_the_walk_bound(mongodb):
    ids = [mongo_id('int', i) for i in range(30)]
    mongodb.fill(WalkedNumber, ids)
    chosen = sorted(ids)[3:25:2]
    walker = MingWalker(EVOLUTION, WalkedNumber.query.find({'_id': {'$in': chosen}}),
                        WalkSession)
    batches, _ = walk(walker, 4)
    assert ids_of(batches) == chosen


def test_setting_the_filtered_field_neither_skips_nor_repeats_a_document(mongodb):
    mongodb.fill(WalkedPage, [mongo_id('objectid', i) for i in range(45)],
                 filled=lambda i: i % 5 == 0)
    walker = MingWalker(EVOLUTION, WalkedPage.query.find({'slug': None}), WalkSession)

    def process(items):
        for page in items:
            page.slug = 'new'
            page.n += 1
        flush_and_clear()

    batches, _ = walk(walker, 4, after_batch=process)

    assert len(flat(batches)) == 36
    assert sorted(d['n'] for d in mongodb.raw(WalkedPage).find()) == [0] * 9 + [1] * 36


@pytest.mark.parametrize('kind', list(MING_MODELS))
def test_a_ming_walk_resumed_from_a_stored_cursor_continues_right_after_it(mongodb, kind):
    model = MING_MODELS[kind]
    mongodb.fill(model, [mongo_id(kind, i) for i in range(25)])
    expected = mongodb.ids_in_order(model)
    first = MingWalker(EVOLUTION, model, WalkSession).next_batch(None, 9)
    stored = json.dumps(first.cursor)
    flush_and_clear()

    rest, _ = walk(MingWalker(EVOLUTION, model.query.find(), WalkSession), 4, json.loads(stored))

    assert [doc._id for doc in first.items] + ids_of(rest) == expected


@pytest.mark.parametrize('kind', list(MING_MODELS))
def test_ming_upper_bounds_are_inclusive(mongodb, kind):
    model = MING_MODELS[kind]
    mongodb.fill(model, [mongo_id(kind, i) for i in range(20)])
    expected = mongodb.ids_in_order(model)
    walker = MingWalker(EVOLUTION, model, WalkSession)
    fifth = walker.next_batch(None, 5).cursor
    twelfth = walker.next_batch(None, 12).cursor

    assert ids_of(walk(walker, 3, upper=fifth)[0]) == expected[:5]
    assert ids_of(walk(walker, 3, fifth, twelfth)[0]) == expected[5:12]


@pytest.mark.parametrize('kind', ['objectid', 'int'])
def test_ming_split_ranges_share_out_every_document_once(mongodb, kind):
    model = MING_MODELS[kind]
    mongodb.fill(model, [mongo_id(kind, i) for i in range(60)], filled=lambda i: i % 6 == 1)
    expected = mongodb.ids_in_order(model, {'slug': None})
    walker = MingWalker(EVOLUTION, model.query.find({'slug': None}), WalkSession)
    for n in (1, 2, 5, 50, 500):
        ranges = walker.split(n)
        assert_partition(ranges)
        assert 1 <= len(ranges) <= n
        parts = [ids_of(walk(walker, 7, r.after, r.upto)[0]) for r in ranges]
        assert sum(parts, []) == expected, n


@pytest.mark.parametrize('kind', ['objectid', 'int'])
def test_ming_split_of_empty_single_and_gapped_collections(mongodb, kind):
    model = MING_MODELS[kind]
    walker = MingWalker(EVOLUTION, model, WalkSession)
    assert walker.split(3) == [KeyRange(None, None)]
    if kind == 'int':
        ids = [7, -2 ** 40, 3, 2 ** 62]
    else:
        ids = [bson.ObjectId(b'\x00' * 11 + b'\x07'), bson.ObjectId(b'\x7f' * 12),
               bson.ObjectId(b'\xff' * 12), bson.ObjectId(b'\x00' * 11 + b'\x09')]
    mongodb.fill(model, ids[:1])
    assert MingWalker(EVOLUTION, model, WalkSession).split(3) == [KeyRange(None, None)]
    mongodb.fill(model, ids[1:])
    ranges = MingWalker(EVOLUTION, model, WalkSession).split(4)
    assert_partition(ranges)
    assert sum([ids_of(walk(walker, 2, r.after, r.upto)[0]) for r in ranges], []) == sorted(ids)


def test_ming_split_refuses_string_ids_saying_why(mongodb):
    mongodb.fill(WalkedCode, ['a', 'b', 'c'])
    with pytest.raises(ConfigurationError) as error:
        MingWalker(EVOLUTION, WalkedCode, WalkSession).split(2)
    assert f"evolution '{EVOLUTION}'" in str(error.value)
    assert 'ObjectId and integer _ids only' in str(error.value)
    assert "_ids are str" in str(error.value)


def test_a_collection_mixing_id_types_is_refused_when_the_walker_is_created(mongodb):
    mongodb.raw(WalkedCode).insert_many([{'_id': 'a'}, {'_id': 5}, {'_id': 'c'}])
    with pytest.raises(ConfigurationError) as error:
        MingWalker(EVOLUTION, WalkedCode, WalkSession)
    assert f"evolution '{EVOLUTION}'" in str(error.value)
    assert 'mixes _id types (int 5 ... str ' in str(error.value)
    # Numbers compare with numbers in MongoDB: ints and floats together are one type.
    mongodb.raw(WalkedNumber).insert_many([{'_id': 1}, {'_id': 2.5}, {'_id': 4}])
    MingWalker(EVOLUTION, WalkedNumber, WalkSession)


def test_document_ids_are_refused_when_the_walker_is_created(mongodb, mongo_url):
    if mongo_url.startswith('mim:'):
        pytest.skip('MIM cannot store documents as _id (unhashable dict)')
    mongodb.raw(WalkedCode).insert_many([{'_id': {'a': 1, 'b': 2}}, {'_id': {'a': 2, 'b': 1}}])
    with pytest.raises(ConfigurationError, match='cannot be stored in a cursor'):
        MingWalker(EVOLUTION, WalkedCode, WalkSession)


def live_documents_per_batch(mongodb, count, size):
    """Walk ``count`` documents flushing and clearing the session after each batch, as the
    runner does; return how many WalkedPage objects are alive after each batch."""
    mongodb.fill(WalkedPage, [mongo_id('objectid', i) for i in range(count)])
    walker = MingWalker(EVOLUTION, WalkedPage.query.find({'slug': None}), WalkSession)
    counts = []
    cursor = None
    while True:
        items, cursor = walker.next_batch(cursor, size)
        if not items:
            return counts
        for page in items:
            page.slug = 'new'
        flush_and_clear()
        gc.collect()
        counts.append(sum(isinstance(o, WalkedPage) for o in gc.get_objects()))
        del items, page


@pytest.mark.slow  # about 4 s: gc.get_objects() after each batch, in a process full of them
def test_a_ming_walk_keeps_at_most_one_batch_of_documents_alive(mongodb):
    counts = live_documents_per_batch(mongodb, 300, 25)
    assert len(counts) == 12
    assert max(counts) <= 25  # the batch just processed, still referenced by the loop
    assert sorted({d['slug'] for d in mongodb.raw(WalkedPage).find()}) == ['new']


@pytest.mark.parametrize('make, problem', [
    (lambda: WalkedPage.query.find({}).limit(10), 'query with limit, which a walk by _id'),
    (lambda: WalkedPage.query.find({}).skip(10), 'query with skip'),
    (lambda: WalkedPage.query.find({}, projection=['slug']), 'query with a projection'),
    (lambda: WalkedPage.query.find({}, decorate=lambda page: page), 'with decorate'),
    (lambda: WalkedPage.query.find({}, validate=False), 'made with validate=False'),
    (lambda: (WalkedPage, 'slug'), "the second item must be a filter dict"),
    (lambda: (dict, {}), 'is not a Ming mapped class'),
    (lambda: [WalkedPage], 'must return a Ming query (Page.query.find(filter)), a mapped class'),
    (lambda: None, 'must return a Ming query'),
], ids=lambda value: value if isinstance(value, str) else '')
def test_a_ming_collection_that_cannot_be_walked_is_refused(mongodb, make, problem):
    with pytest.raises(ConfigurationError) as error:
        MingWalker(EVOLUTION, make(), WalkSession)
    assert str(error.value).startswith(f"evolution '{EVOLUTION}': ")
    assert problem in str(error.value)
