"""Keyset walks of a SQLAlchemy collection: a legacy ``Query``, an ORM ``select()``, a Core
``select()``.

Each batch is the collection's own statement with its ORDER BY replaced by the primary key, a
key criterion and a LIMIT::

    SELECT ... WHERE <the collection's criteria> AND id > :cursor ORDER BY id LIMIT :size

A composite key ``(a, b)`` gets the expanded form, not a row value::

    a >= :a AND (a > :a OR (a = :a AND b > :b))

Measured on MariaDB 10.11, PostgreSQL 15 and SQLite 3.40: MariaDB reads a row-value comparison ``(a, b) > (:a, :b)`` with a full index scan from the
first entry, 50,105 index reads for a batch of 100 in the middle of 100,000 rows, where the
expanded form is a range scan of 101 reads.  PostgreSQL bounds its index scan only by the
leading ``a >= :a``: without it, it filtered 50,006 rows to return 100; SQLite, when the
collection has a criterion of its own, scans the whole index without it.

Statements run through the application's session (``model.DBSession``), so ORM items are
tracked in the caller's session and every read belongs to the caller's transaction; with the
session's default autoflush, changes the caller made to the previous batch are flushed before
the next batch is read.  The walker never flushes, commits or closes the session itself.
"""
import operator
from typing import Any, List

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.exc import InvalidRequestError

from ..cursors import JSONValue, decode_key
from ..errors import ConfigurationError
from .walker import (Batch, KeyRange, Walker, check_batch_size, check_range_count,
                     encode_cursor, integer_boundaries, ranges_from_boundaries)

#: Oldest servers with window functions (``ntile``), needed to split non-integer keys.
_WINDOW_FUNCTIONS_SINCE = {'sqlite': (3, 25), 'mysql': (8, 0), 'mariadb': (10, 2)}


class SQLWalker(Walker):
    """Walks ``collection`` by its primary key through ``session``, the application's
    ``scoped_session`` (or a plain ``Session``).

    ``collection`` is one of:

    * ``DBSession.query(Page).filter(...)``: a legacy Query of one entity; items are ``Page``
      objects.  Joins, options and execution options are kept.
    * ``select(Page).where(...)``: an ORM select of one entity (or ``aliased(Page)``); items
      are ``Page`` objects.
    * ``select(pages).where(...)`` or ``select(pages.c.id, pages.c.title)``: a select of the
      columns of one table (joins allowed), including its primary key columns; items are
      ``Row`` objects.

    The collection's own ORDER BY is replaced by the key order.  One with LIMIT, OFFSET or a
    textual statement cannot be walked by key and is refused.  The session is looked up on
    every batch: a scoped session may hand out a new ``Session`` after each commit.
    """

    def __init__(self, evolution_id: str, collection: Any, session: Any):
        self.evolution_id = evolution_id
        if session is None:
            raise ConfigurationError(
                f'evolution {evolution_id!r}: batched evolutions on SQLAlchemy need the '
                f"application's session: set config['DBSession'] (model.DBSession)")
        self._session = session
        self._form = _form_of(evolution_id, collection)
        self._keys = self._form.keys

    # --- the walk ------------------------------------------------------------------------------

    def next_batch(self, cursor: JSONValue, size: int, upper: JSONValue = None) -> Batch:
        check_batch_size(size)
        criteria = []
        if cursor is not None:
            criteria.append(_beyond(self._keys, self._key_values(cursor), after=True))
        if upper is not None:
            criteria.append(_beyond(self._keys, self._key_values(upper), after=False))
        criterion = sa.and_(*criteria) if criteria else None
        items = self._form.fetch(self._current_session(), criterion, size)
        if not items:
            return Batch([], cursor)
        return Batch(items, self._encode(self._form.key_of(items[-1])))

    def count(self, after: JSONValue = None) -> int:
        keyed = self._keyed_subquery(after=after)
        return self._execute(sa.select(sa.func.count()).select_from(keyed)).scalar_one()

    def split(self, n: int) -> List[KeyRange]:
        check_range_count(n)
        if len(self._keys) > 1:
            names = ', '.join(_name(key) for key in self._keys)
            raise ConfigurationError(
                f'evolution {self.evolution_id!r}: parallel ranges are cut on one key column, '
                f'and this collection has the composite primary key ({names}): cutting it would '
                f'need quantiles of row values, which SQLite, MySQL and MariaDB cannot compute '
                f'in one query.  Walk it without parallel = True')
        if n == 1:
            return ranges_from_boundaries([])
        if _is_integer(self._keys[0]):
            boundaries = self._integer_boundaries(n)
        else:
            boundaries = self._quantile_boundaries(n)
        return ranges_from_boundaries([self._encode((b,)) for b in boundaries])

    # --- helpers ---------------------------------------------------------------------------------

    def _current_session(self) -> orm.Session:
        session = self._session
        return session() if isinstance(session, orm.scoped_session) else session

    def _execute(self, statement):
        return self._current_session().execute(statement)

    def _key_values(self, cursor: JSONValue) -> tuple:
        """The key parts a stored cursor stands for, checked against this collection's key."""
        try:
            key = decode_key(cursor)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f'evolution {self.evolution_id!r}: unreadable cursor {cursor!r}: {exc}') from exc
        values = key if isinstance(key, tuple) else (key,)
        if len(values) != len(self._keys) or (len(self._keys) > 1) != isinstance(key, tuple):
            names = ', '.join(_name(k) for k in self._keys)
            raise ConfigurationError(
                f'evolution {self.evolution_id!r}: the cursor {cursor!r} does not fit the '
                f'collection\'s key ({names}); did collection() change since it was stored?')
        return values

    def _encode(self, key: tuple) -> JSONValue:
        return encode_cursor(self.evolution_id, key if len(key) > 1 else key[0])

    def _keyed_subquery(self, keys_only=False, after=None):
        """The collection (its items after the cursor ``after``) as a subquery, once per item:
        deduplicated by key when it joins."""
        statement = self._form.unordered
        if after is not None:
            statement = statement.where(_beyond(self._keys, self._key_values(after), after=True))
        subquery = statement.subquery()
        if not (self._form.may_repeat or keys_only):
            return subquery
        keys = [_corresponding(subquery, key) for key in self._keys]
        keyed = sa.select(*keys).select_from(subquery)
        return (keyed.distinct() if self._form.may_repeat else keyed).subquery()

    def _integer_boundaries(self, n: int) -> List[int]:
        # MIN and MAX of the key: two index lookups on every database (with criteria, a walk of
        # the key index from each end to the first row that matches).
        subquery = self._form.unordered.subquery()
        key = _corresponding(subquery, self._keys[0])
        low, high = self._execute(sa.select(sa.func.min(key), sa.func.max(key))
                                  .select_from(subquery)).one()
        return [] if low is None else integer_boundaries(low, high, n)

    def _quantile_boundaries(self, n: int) -> List[Any]:
        # NTILE deals the keys in order into n buckets of (almost) equal size; the last key of
        # each bucket but the final one is a cut point.  LEAD finds "last of its bucket" where
        # MAX() per bucket would not do: PostgreSQL has no max(uuid).  One query, reading the
        # keys once.
        self._refuse_without_window_functions()
        keys = self._keyed_subquery(keys_only=True)
        key = list(keys.c)[0]
        dealt = sa.select(key.label('k'), sa.func.ntile(sa.literal_column(str(n)))
                          .over(order_by=key).label('bucket')).subquery()
        marked = sa.select(dealt.c.k, dealt.c.bucket,
                           sa.func.lead(dealt.c.bucket).over(order_by=dealt.c.k)
                           .label('next_bucket')).subquery()
        return self._execute(sa.select(marked.c.k)
                             .where(marked.c.next_bucket != marked.c.bucket)
                             .order_by(marked.c.k)).scalars().all()

    def _refuse_without_window_functions(self) -> None:
        dialect = self._current_session().get_bind(clause=self._form.unordered).dialect
        name = 'mariadb' if getattr(dialect, 'is_mariadb', False) else dialect.name
        needed = _WINDOW_FUNCTIONS_SINCE.get(name)
        version = tuple(dialect.server_version_info or ())
        if needed and version and version < needed:
            have = '.'.join(map(str, version[:3]))
            raise ConfigurationError(
                f'evolution {self.evolution_id!r}: splitting the non-integer key '
                f'{_name(self._keys[0])} into ranges needs window functions (ntile), which '
                f'{name} {have} does not have (since {".".join(map(str, needed))}); use an '
                f'integer key, or walk it without parallel = True')


# --- the three forms of collection ---------------------------------------------------------------

def _identity(item) -> tuple:
    """An ORM object's primary key as loaded, in the mapper's key order."""
    return sa.inspect(item).identity


class _QueryForm:
    """A legacy ``Query`` of one entity, kept a Query so its load options stay in force."""

    def __init__(self, evolution_id, query, entity):
        self.keys = _entity_keys(entity)
        try:
            # Query refuses criteria after LIMIT/OFFSET or from_statement(): ask it now.
            query.filter(sa.true())
        except InvalidRequestError as exc:
            raise ConfigurationError(
                f'evolution {evolution_id!r}: collection() returned a Query that cannot be '
                f'walked by key ({exc}); return the query without LIMIT, OFFSET or '
                f'from_statement()') from exc
        self._query = query.order_by(None)
        self.unordered = query.enable_eagerloads(False).order_by(None).statement
        self.may_repeat = _joins(self.unordered)  # for count() and split(); fetch() dedupes

    def fetch(self, session, criterion, size):
        # A Query of one entity returns each object once, however many rows join it.
        query = self._query.with_session(session)
        if criterion is not None:
            query = query.filter(criterion)
        return query.order_by(*self.keys).limit(size).all()

    key_of = staticmethod(_identity)


class _EntitySelectForm:
    """``select(Page)``: items are ORM objects, executed through the session."""

    def __init__(self, statement, entity):
        self.keys = _entity_keys(entity)
        self.unordered = statement.order_by(None)
        self.may_repeat = _joins(self.unordered)

    def fetch(self, session, criterion, size):
        statement = self.unordered if criterion is None else self.unordered.where(criterion)
        result = session.execute(statement.order_by(*self.keys).limit(size))
        # unique(): joined rows repeat an object, and joined eager loads of collections
        # require it.
        return result.scalars().unique().all()

    key_of = staticmethod(_identity)


class _RowSelectForm:
    """A select of one table's columns: items are Rows, the key read from its columns."""

    def __init__(self, evolution_id, statement):
        table = _selected_table(evolution_id, statement)
        if not table.primary_key.columns:
            raise ConfigurationError(
                f'evolution {evolution_id!r}: the table {_name(table)} of collection() has no '
                f'primary key to walk by')
        self.keys = list(table.primary_key.columns)
        self._positions = _key_positions(evolution_id, statement, self.keys)
        self.unordered = statement.order_by(None)
        self.may_repeat = _joins(self.unordered)

    def fetch(self, session, criterion, size):
        statement = self.unordered if criterion is None else self.unordered.where(criterion)
        rows = session.execute(statement.order_by(*self.keys).limit(size)).all()
        if not self.may_repeat:
            return rows
        seen = set()
        unique = []
        for row in rows:  # a join repeats a row once per match; keep it once
            key = self.key_of(row)
            if key not in seen:
                seen.add(key)
                unique.append(row)
        return unique

    def key_of(self, row):
        return tuple(row[i] for i in self._positions)


def _form_of(evolution_id, collection):
    """The form of ``collection``, validated; ConfigurationError naming the problem."""
    if isinstance(collection, orm.Query):
        entity = _lone_entity(evolution_id, collection.column_descriptions, 'Query')
        if entity is None:
            raise ConfigurationError(
                f'evolution {evolution_id!r}: collection() returned a Query of columns '
                f'({_described(collection.column_descriptions)}); query the entity, as in '
                f'DBSession.query(Page), or return select() of the table\'s columns')
        return _QueryForm(evolution_id, collection, entity)
    if isinstance(collection, sa.Select):
        _refuse_limit_offset(evolution_id, collection)
        entity = _lone_entity(evolution_id, collection.column_descriptions, 'select()')
        if entity is not None:
            return _EntitySelectForm(collection, entity)
        return _RowSelectForm(evolution_id, collection)
    if isinstance(collection, (sa.TextClause, sa.TextualSelect, orm.FromStatement)):
        raise ConfigurationError(
            f'evolution {evolution_id!r}: collection() returned a textual statement '
            f'({_short(collection)}): tgext.evolve cannot add its key criteria to SQL text; '
            f'build it with select(), or write batch(cursor, size) yourself')
    raise ConfigurationError(
        f'evolution {evolution_id!r}: collection() must return a Query '
        f'(DBSession.query(Page)) or a select(), not {_short(collection)}')


def _is_entity(description):
    entity = description.get('entity')
    return entity is not None and description['expr'] is entity


def _lone_entity(evolution_id, descriptions, what):
    """The one ORM entity selected, None for a select of columns only; refuse mixtures."""
    entities = [d for d in descriptions if _is_entity(d)]
    if len(descriptions) == 1 and entities:
        return entities[0]['entity']
    if entities:
        raise ConfigurationError(
            f'evolution {evolution_id!r}: collection() returned a {what} of several entities '
            f'or columns ({_described(descriptions)}); walk one entity: its items are what '
            f'process() receives')
    return None


def _entity_keys(entity):
    """The entity's primary key attributes in the mapper's order (an alias's, for aliases)."""
    mapper = sa.inspect(entity).mapper
    return [getattr(entity, mapper.get_property_by_column(column).key)
            for column in mapper.primary_key]


def _table_of(column):
    if isinstance(column, sa.Label):
        column = column.element
    return getattr(column, 'table', None)


def _selected_table(evolution_id, statement):
    """The one table (or alias) whose columns the select returns."""
    tables = []
    for column in statement.selected_columns:
        table = _table_of(column)
        if table is not None and not any(table is t for t in tables):
            tables.append(table)
    if not tables:
        raise ConfigurationError(
            f'evolution {evolution_id!r}: collection() returned a select() of no table\'s '
            f'columns ({_short(statement)}), e.g. of text(): tgext.evolve needs the primary '
            f'key columns of one table to walk by')
    if len(tables) > 1:
        names = ', '.join(_name(t) for t in tables)
        raise ConfigurationError(
            f'evolution {evolution_id!r}: collection() returned a select() of columns of '
            f'several tables ({names}); select the columns of one table, joining the others '
            f'for the criteria only')
    return tables[0]


def _key_positions(evolution_id, statement, keys):
    """Where each key column is among the selected columns (rows are read by position)."""
    selected = list(statement.selected_columns)
    positions = []
    for key in keys:
        found = statement.selected_columns.corresponding_column(key)
        index = next((i for i, column in enumerate(selected) if column is found), None)
        if index is None:
            raise ConfigurationError(
                f'evolution {evolution_id!r}: the select() of collection() does not include '
                f'the primary key column {_name(key)}, which tgext.evolve needs to resume '
                f'after each batch: add it to the selected columns')
        positions.append(index)
    return positions


def _refuse_limit_offset(evolution_id, statement):
    # Select has no public accessor for these; the attributes are GenerativeSelect's own
    # (SQLAlchemy 2.0 and 2.1).  A LIMIT would be silently replaced by the batch's LIMIT and
    # the whole collection walked, so it must not pass unnoticed.
    clauses = [name for name, attribute in
               (('LIMIT', '_limit_clause'), ('OFFSET', '_offset_clause'),
                ('FETCH', '_fetch_clause'))
               if getattr(statement, attribute, None) is not None]
    if clauses:
        raise ConfigurationError(
            f'evolution {evolution_id!r}: the select() of collection() has '
            f'{" and ".join(clauses)}, which a walk by key cannot keep (every batch has its own '
            f'LIMIT); select the items with criteria instead')


def _joins(statement) -> bool:
    """Whether the statement may return an item's row more than once (it reads other tables)."""
    froms = statement.get_final_froms()
    return len(froms) != 1 or isinstance(froms[0], sa.Join)


def _beyond(keys, values, after):
    """``keys > values`` (``after``) or ``keys <= values``, in lexicographic order, expanded.

    The leading redundant ``a >= x`` (``a <= x``) of a composite key is what lets PostgreSQL
    bound its index scan; see the module docstring.
    """
    strict, last = (operator.gt, operator.gt) if after else (operator.lt, operator.le)
    clause = last(keys[-1], values[-1])
    for key, value in zip(reversed(keys[:-1]), reversed(values[:-1])):
        clause = sa.or_(strict(key, value), sa.and_(key == value, clause))
    if len(keys) > 1:
        leading = operator.ge if after else operator.le
        clause = sa.and_(leading(keys[0], values[0]), clause)
    return clause


def _corresponding(subquery, key):
    column = key.__clause_element__() if hasattr(key, '__clause_element__') else key
    found = subquery.corresponding_column(column)
    if found is None:  # pragma: no cover - the forms above only accept selects of their key
        raise AssertionError(f'{key} is not a column of {subquery}')
    return found


def _is_integer(key) -> bool:
    try:
        python_type = key.type.python_type
    except NotImplementedError:
        return False
    return issubclass(python_type, int) and not issubclass(python_type, bool)


def _name(element) -> str:
    if hasattr(element, '__clause_element__'):  # an ORM attribute: its column
        element = element.__clause_element__()
    table = getattr(element, 'table', None)
    name = getattr(element, 'name', None) or getattr(element, 'key', None) or str(element)
    table_name = getattr(table, 'name', None)
    return f'{table_name}.{name}' if table_name else str(name)


def _described(descriptions) -> str:
    return ', '.join(str(d.get('name') or d['expr']) for d in descriptions)


def _short(value, limit=120) -> str:
    text = repr(value) if not isinstance(value, sa.ClauseElement) else str(value)
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'
