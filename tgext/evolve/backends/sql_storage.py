"""Creating tgext.evolve's SQL tables, and upgrading them in place from an older storage version.

Loaded, like :mod:`.sql_schema`, only by a process that has something to write.  The steps are
``upgrades.UPGRADES``; the tables they lead to are :mod:`.sql_schema`'s, whose columns give every
ALTER its type.  What differs per database (how long DDL may wait for a lock) is the dialect
object's (:mod:`.sql_dialects`).
"""
import time

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.schema import CreateColumn

from .. import logs
from . import base, sql_schema

log = logs.storage

#: How long a process keeps looking for tables that concurrent creators are creating.
CREATE_DEADLINE = 30.0
#: What a CREATE TABLE raises when another process created the table first.
_CREATE_RACE_ERRORS = (sa_exc.OperationalError, sa_exc.ProgrammingError, sa_exc.IntegrityError)
_VERSIONED_TABLES = (base.LOCK_TABLE, base.HISTORY_TABLE)


class _VersionMoved(Exception):
    """The version record changed between reading it and replacing it: look again."""


def _tables(names=None):
    # sql_schema.metadata looked up at every call: the contract tests define a later version.
    return [t for t in sql_schema.metadata.sorted_tables if names is None or t.name in names]


def create_missing_tables(engine, impl, names=None):
    """Create the tables (those in ``names``; by default all) that do not exist yet; return
    the names of those this call created.

    Concurrent CREATE TABLE on an empty database fails in all but one process (duplicate table,
    or PostgreSQL's unique violation on pg_type); the loser looks again and finds the table the
    winner created (and does not count it as its own).
    """
    created = set()
    deadline = time.monotonic() + CREATE_DEADLINE
    delay = 0.05
    while True:
        try:
            present = set(sa.inspect(engine).get_table_names())
            for table in _tables(names):
                if table.name not in present | created:
                    table.create(engine)
                    created.add(table.name)
            return created
        except _CREATE_RACE_ERRORS as e:
            if impl.is_busy(e):
                raise  # another writer holds the file: the runner polls again
            # An unreachable database is an outage for the runner's backoff, not a race to
            # wait out here: this raises the connection error at once.
            with engine.connect():
                pass
            if time.monotonic() > deadline:
                raise
            log.debug('tables are being created elsewhere (%s), retrying', type(e).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _recorded(conn):
    schema = sql_schema.schema_table
    return conn.execute(sa.select(schema.c.version)
                        .where(schema.c.name == base.STORAGE_RECORD)).scalar()


def _record(conn, version, owner, previous):
    """Replace the recorded version ``previous`` (None: no record yet) by ``version``."""
    schema = sql_schema.schema_table
    values = dict(version=version, upgraded_at=sql_schema.db_now(), upgraded_by=owner)
    if previous is None:
        conn.execute(schema.insert().values(name=base.STORAGE_RECORD, **values))
        return
    moved = conn.execute(schema.update().where(schema.c.name == base.STORAGE_RECORD,
                                               schema.c.version == previous).values(**values))
    if moved.rowcount != 1:
        raise _VersionMoved


def storage_version(engine):
    """See ``Backend.read_storage_version``."""
    present = set(sa.inspect(engine).get_table_names())
    if base.SCHEMA_TABLE in present:
        with engine.connect() as conn:
            recorded = _recorded(conn)
        if recorded is not None:
            return recorded
    return 1 if present.intersection(_VERSIONED_TABLES) else 0


def _add_column(conn, column):
    """``ALTER TABLE ... ADD COLUMN``, as the latest table defines the column, unless the
    column exists (a step interrupted after its DDL, on MySQL which commits DDL at once)."""
    table = column.table
    if column.name in {c['name'] for c in sa.inspect(conn).get_columns(table.name)}:
        return
    spec = CreateColumn(column).compile(dialect=conn.dialect)
    name = conn.dialect.identifier_preparer.format_table(table)
    conn.exec_driver_sql(f'ALTER TABLE {name} ADD COLUMN {spec}')


def upgrade(engine, impl, step, fence, owner):
    """Run ``step`` and record its version, fenced by ``fence(conn)``; False when a table lock
    could not be had within the dialect's bound."""
    create_missing_tables(engine, impl, step.new_stores)
    columns = [sql_schema.metadata.tables[store].c[name] for store, name in step.new_columns]
    for attempt in (1, 2):
        try:
            with engine.begin() as conn:
                fence(conn)
                previous = _recorded(conn)
                if (previous or 1) >= step.version:
                    return True  # recorded meanwhile
                with impl.bounded_lock_wait(conn):
                    for column in columns:
                        _add_column(conn, column)
                fence(conn)  # again: on MySQL the DDL committed the first one
                _record(conn, step.version, owner, previous)
        except (sa_exc.DBAPIError, _VersionMoved) as e:
            if isinstance(e, sa_exc.DBAPIError) and impl.is_lock_timeout(e):
                log.debug('storage version %d: %s', step.version, e)
                return False
            if attempt == 2:
                raise
            # Someone else added a column or the record meanwhile: look again, and skip what
            # exists now.
            continue
        log.info('storage version %d: %s (by %s)', step.version, step.description, owner)
        return True
