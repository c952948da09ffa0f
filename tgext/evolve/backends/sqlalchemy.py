"""The storage contract on SQLAlchemy 2.x: SQLite, PostgreSQL, MySQL/MariaDB.

Every time comes from the database clock (``db_now()``), so a host with a skewed clock can
neither steal nor extend a lease.  Times are stored as double-precision epoch seconds: MySQL's
``FLOAT`` is 32-bit and would be off by up to a minute.

:meth:`SQLAlchemyBackend.apply` runs the evolution inside the ``transaction`` manager with the
application's session joined, and issues the fencing check and the ``applied`` history row on
that session's connection, so all three commit or roll back together.
"""
import contextlib
import sys
import time

import sqlalchemy as sa
import transaction
import zope.sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import scoped_session, sessionmaker

from ..errors import LeaseLost
from ..forking import log
from .base import (APPLIED, DEFAULT_LOCK_NAME, DONE_STATES, FAILED, HISTORY_TABLE, LEGACY_TABLE,
                   RUNNING, Backend, HistoryRecord, Lease, LegacyState, LockRecord)
from .sql_unprepared import unprepared, unprepared_engine

# read_history() is every process's first look at the database, on the path of its first
# request: spelled out, it needs neither SQLAlchemy's compiler (~4 ms the first time in a
# process) nor the tables (:mod:`.sql_schema`, loaded by the first write).  No identifier here
# needs quoting on any dialect.
_READ_HISTORY = sa.text(f'SELECT {", ".join(HistoryRecord._fields)} FROM {HISTORY_TABLE}')


def _float(value):
    # MySQL returns DECIMAL for db_now(); everything else is already a float.
    return None if value is None else float(value)


@contextlib.contextmanager
def _sqlite_transaction_from_first_statement(conn):
    """On SQLite, open the transaction at the work's first statement on ``conn``.

    Python's sqlite3 driver begins a transaction only before a data change, so an evolution
    whose first statement is DDL (CREATE TABLE, ALTER TABLE) would have it committed at once
    and kept after a failure.  SQLite's DDL is transactional: begun here, it rolls back with
    the rest of the evolution, as on PostgreSQL.  IMMEDIATE takes the write lock at once: a
    transaction that reads and then writes cannot upgrade its lock while another connection
    writes (SQLite fails it at once with "database is locked", without waiting).  At the first
    statement, not before: work that writes through a connection of its own (an Alembic
    env.py that ignores the one it is given) must not find the database locked by this one.
    """
    if conn.dialect.name != 'sqlite':
        yield
        return

    def begin(connection, *args):
        driver = connection.connection.driver_connection
        if not driver.in_transaction:
            driver.execute('BEGIN IMMEDIATE')  # on the driver: we are inside SQLAlchemy's event

    sa.event.listen(conn, 'before_cursor_execute', begin)
    try:
        yield
    finally:
        sa.event.remove(conn, 'before_cursor_execute', begin)


def _reading_from_master(session):
    """While an evolution runs, a balancing session (TG's ``BalancedSession``, which reads from
    ``sqlalchemy.slaves.*``) reads from the master too: a lagging replica must not hand an
    evolution rows older than those it updates."""
    using_engine = getattr(session, 'using_engine', None)
    return using_engine('master') if using_engine is not None else contextlib.nullcontext()


def _sqlite_busy(error):
    """True for SQLite's "database is locked": another connection holds the write lock."""
    # Not imported here: loading the sqlite3 driver costs a PostgreSQL/MySQL app ~2 ms of
    # start-up, and its errors can only come from a process that has loaded it.
    sqlite3 = sys.modules.get('sqlite3')
    orig = getattr(error, 'orig', None)
    return (sqlite3 is not None and isinstance(orig, sqlite3.OperationalError)
            and str(orig) == 'database is locked')


def _history_record(row):
    m = row._mapping
    return HistoryRecord(
        evolution_id=m['evolution_id'], state=m['state'], attempts=m['attempts'] or 0,
        started_at=_float(m['started_at']), finished_at=_float(m['finished_at']),
        duration_ms=_float(m['duration_ms']), owner=m['owner'], generation=m['generation'],
        error=m['error'], progress_done=m['progress_done'], progress_total=m['progress_total'],
        fingerprint=m['fingerprint'],
    )


class SQLAlchemyBackend(Backend):
    """Lock and history in two tables of the application's database.

    ``engine`` is the application's engine (the master in a master/replica set-up): every
    lock, plan and history statement goes there, never as a server-side prepared statement
    (:mod:`.sql_unprepared`).  ``session`` is the application's session factory
    (``model.DBSession``); evolutions run their work through it.
    """

    atomic_apply = True

    def __init__(self, engine, session=None):
        self._session_engine = engine  # the one the session knows: apply() joins its transaction
        self.engine = unprepared_engine(engine)
        self.dialect = engine.dialect.name
        self._owns_session = session is None
        if session is None:
            session = scoped_session(sessionmaker(bind=engine))
            zope.sqlalchemy.register(session)
        self.session = session

    # --- set-up --------------------------------------------------------------------------------

    def ensure_storage(self):
        # Concurrent CREATE TABLE on an empty database fails in all but one process (duplicate
        # table, or PostgreSQL's unique violation on pg_type); the loser retries and finds the
        # tables the winner created.
        from .sql_schema import metadata
        deadline = time.monotonic() + 30
        delay = 0.05
        while True:
            try:
                metadata.create_all(self.engine, checkfirst=True)
                return
            except (sa_exc.OperationalError, sa_exc.ProgrammingError,
                    sa_exc.IntegrityError) as e:
                if _sqlite_busy(e):
                    raise  # another writer holds the file: the runner polls again
                if self._storage_exists():
                    return
                # An unreachable database is an outage for the runner's backoff, not a race
                # to wait out here: this raises the connection error at once.
                self.now()
                if time.monotonic() > deadline:
                    raise
                log.debug('tables are being created elsewhere (%s), retrying', type(e).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _storage_exists(self):
        from .sql_schema import metadata
        try:
            inspector = sa.inspect(self.engine)
            return all(inspector.has_table(t.name) for t in metadata.sorted_tables)
        except sa_exc.DBAPIError:
            return False

    def now(self):
        from .sql_schema import db_now
        with self.engine.connect() as conn:
            return _float(conn.execute(sa.select(db_now())).scalar_one())

    def dispose_after_fork(self):
        # The parent's pooled connections must not be used, nor closed, by the child.
        self.engine.dispose(close=False)

    def close(self):
        if self._owns_session:
            self.session.remove()

    def is_transient(self, error):
        # SQLAlchemy flags errors that mean "this connection is gone" (server restart,
        # pg_terminate_backend, MySQL KILL, network loss) and invalidates the connection.
        return isinstance(error, sa_exc.DBAPIError) and bool(error.connection_invalidated)

    def is_busy(self, error):
        return _sqlite_busy(error)

    # --- reading -------------------------------------------------------------------------------

    def read_history(self):
        with self.engine.connect() as conn:
            rows = conn.execute(_READ_HISTORY).fetchall()
        return {row.evolution_id: _history_record(row) for row in rows}

    def read_lock(self, name=DEFAULT_LOCK_NAME):
        from .sql_schema import db_now, lock_table
        query = sa.select(lock_table, db_now().label('now')).where(lock_table.c.name == name)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return self._lock_record(row)

    @staticmethod
    def _lock_record(row):
        m = row._mapping
        return LockRecord(
            name=m['name'], owner=m['owner'], generation=m['generation'],
            acquired_at=_float(m['acquired_at']), renewed_at=_float(m['renewed_at']),
            expires_at=_float(m['expires_at']), released_by=m['released_by'],
            now=_float(m['now']),
        )

    def read_legacy(self):
        from .sql_schema import legacy_table
        if not sa.inspect(self.engine).has_table(LEGACY_TABLE):
            return None
        with self.engine.connect() as conn:
            rows = dict(conn.execute(sa.select(legacy_table.c.type, legacy_table.c.value)).all())
        if 'version' not in rows and 'lock' not in rows:
            return None
        return LegacyState(version=rows.get('version'), lock_holder=rows.get('lock'))

    # --- the lease -----------------------------------------------------------------------------

    def acquire(self, owner, lease_seconds, name=DEFAULT_LOCK_NAME):
        from .sql_schema import db_now, lock_table
        current = self.read_lock(name)
        if current is not None and current.held:
            # Read first, write only to take a free lock: a waiter never queues behind the
            # holder's row lock, nor, on SQLite, behind the evolution's open write transaction.
            return None
        now = db_now()
        taken = dict(owner=owner, acquired_at=now, renewed_at=now,
                     expires_at=now + lease_seconds, released_by=None)
        try:
            with self.engine.begin() as conn:
                # The compare-and-set: the condition is evaluated under the row lock, so of two
                # processes that both saw the lease expired, only the first one's UPDATE matches.
                result = conn.execute(
                    lock_table.update()
                    .where(lock_table.c.name == name)
                    .where(sa.or_(lock_table.c.owner.is_(None), lock_table.c.expires_at < now))
                    .values(generation=lock_table.c.generation + 1, **taken))
                if result.rowcount == 1:
                    return self._lease(conn, name, owner, lease_seconds)
                exists = conn.execute(
                    sa.select(lock_table.c.name).where(lock_table.c.name == name)).first()
        except sa_exc.OperationalError as e:
            if not _sqlite_busy(e):
                raise
            # SQLite has one writer: a long evolution's transaction keeps even its own
            # heartbeat from renewing, so the lease looks expired while the work goes on.
            # Somebody is writing: the lock is not free, and this is no outage.
            return None
        if exists:
            return None
        try:
            with self.engine.begin() as conn:
                conn.execute(lock_table.insert().values(name=name, generation=1, **taken))
                return self._lease(conn, name, owner, lease_seconds)
        except sa_exc.IntegrityError:
            return None  # another process inserted it first
        except sa_exc.OperationalError as e:
            if not _sqlite_busy(e):
                raise
            return None  # the first process inserted it and is writing its evolution

    @staticmethod
    def _lease(conn, name, owner, lease_seconds):
        from .sql_schema import lock_table
        row = conn.execute(
            sa.select(lock_table.c.generation, lock_table.c.expires_at)
            .where(lock_table.c.name == name, lock_table.c.owner == owner)).one()
        return Lease(name=name, owner=owner, generation=row.generation,
                     expires_at=_float(row.expires_at), lease_seconds=lease_seconds)

    def _fence(self, conn, lease):
        """Extend the lease if it is still ours, in the caller's transaction; else LeaseLost.

        One statement (it runs every lease/3), which also reports the new expiry: through
        RETURNING where the dialect has it for UPDATE, else (MySQL/MariaDB) through the
        documented ``LAST_INSERT_ID(expr)`` idiom, which hands the value back to the client
        with the statement's result.
        """
        from .sql_schema import db_now, lock_table
        now = db_now()
        expires_at = now + lease.lease_seconds
        returning = conn.dialect.update_returning
        if not returning:
            expires_at = sa.func.last_insert_id(sa.func.round(expires_at * 1000000)) / 1000000.0
        update = (lock_table.update()
                  .where(lock_table.c.name == lease.name, lock_table.c.owner == lease.owner,
                         lock_table.c.generation == lease.generation)
                  .values(renewed_at=now, expires_at=expires_at))
        if returning:
            row = conn.execute(update.returning(lock_table.c.expires_at)).first()
            matched = row is not None
        else:
            result = conn.execute(update)
            matched = result.rowcount == 1
        if not matched:
            raise LeaseLost(f'lock {lease.name!r} is no longer held by {lease.owner} '
                            f'(generation {lease.generation})')
        return _float(row.expires_at) if returning else result.lastrowid / 1000000.0

    def renew(self, lease):
        with self.engine.begin() as conn:
            expires_at = self._fence(conn, lease)
        return lease._replace(expires_at=expires_at)

    def release(self, lease):
        from .sql_schema import db_now, lock_table
        with self.engine.begin() as conn:
            result = conn.execute(
                lock_table.update()
                .where(lock_table.c.name == lease.name, lock_table.c.owner == lease.owner,
                       lock_table.c.generation == lease.generation)
                .values(owner=None, expires_at=db_now(), released_by=lease.owner))
            return result.rowcount == 1

    def break_lock(self, broken_by, name=DEFAULT_LOCK_NAME):
        from .sql_schema import db_now, lock_table
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(lock_table, db_now().label('now')).where(lock_table.c.name == name)
            ).first()
            if row is None:
                return None
            conn.execute(
                lock_table.update()
                .where(lock_table.c.name == name, lock_table.c.generation == row.generation)
                .values(owner=None, generation=lock_table.c.generation + 1,
                        expires_at=db_now(), released_by=broken_by))
        return self._lock_record(row)

    # --- fenced history writes -----------------------------------------------------------------

    def _upsert_history(self, conn, evolution_id, values, on_insert=None):
        """UPDATE the record, or INSERT it with ``on_insert`` replacing values that refer to
        the record's previous columns (an INSERT has none)."""
        from .sql_schema import history_table
        # Portable upsert: only the lock holder writes history (every caller is fenced first),
        # so an UPDATE-then-INSERT cannot race with another writer.
        result = conn.execute(history_table.update()
                              .where(history_table.c.evolution_id == evolution_id)
                              .values(**values))
        if result.rowcount == 0:
            conn.execute(history_table.insert().values(
                evolution_id=evolution_id, **{**values, **(on_insert or {})}))

    def _read_one(self, conn, evolution_id):
        from .sql_schema import history_table
        row = conn.execute(sa.select(history_table)
                           .where(history_table.c.evolution_id == evolution_id)).one()
        return _history_record(row)

    def record_running(self, lease, evolution_id, fingerprint=None):
        from .sql_schema import db_now, history_table
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            previous = conn.execute(sa.select(history_table.c.attempts)
                                    .where(history_table.c.evolution_id == evolution_id)
                                    ).scalar()
            self._upsert_history(conn, evolution_id, dict(
                state=RUNNING, attempts=(previous or 0) + 1, started_at=db_now(),
                finished_at=None, duration_ms=None, owner=lease.owner,
                generation=lease.generation, error=None, progress_done=None,
                progress_total=None, progress_at=None, fingerprint=fingerprint))
            return self._read_one(conn, evolution_id)

    def _record_finished(self, conn, lease, evolution_id, state, **values):
        """Write the end of an attempt; without a ``running`` record it is attempt 1 of 0 ms."""
        from .sql_schema import db_now, history_table
        now = db_now()
        self._upsert_history(
            conn, evolution_id,
            dict(state=state, finished_at=now,
                 duration_ms=sa.func.coalesce((now - history_table.c.started_at) * 1000.0, 0.0),
                 owner=lease.owner, generation=lease.generation, **values),
            on_insert=dict(attempts=1, started_at=now, duration_ms=0.0))
        return self._read_one(conn, evolution_id)

    def apply(self, lease, evolution_id, work, fingerprint=None):
        manager = transaction.manager  # thread-local: this thread's own transaction
        manager.begin()
        try:
            session = self.session()
            conn = session.connection(bind_arguments={'bind': self._session_engine})
            with _reading_from_master(session), _sqlite_transaction_from_first_statement(conn):
                work()
            session.flush()
            # On the session's own connection to our engine: the same database transaction
            # as the work, even when the session also talks to other engines.
            conn = session.connection(bind_arguments={'bind': self._session_engine})
            with unprepared(conn):
                self._fence(conn, lease)
                record = self._record_finished(conn, lease, evolution_id, APPLIED, error=None,
                                               fingerprint=fingerprint)
            # Joins the session to the transaction if the app never registered it with
            # zope.sqlalchemy, and stops zope.sqlalchemy from rolling back a session that
            # only executed statements.
            zope.sqlalchemy.mark_changed(session)
            manager.commit()
        except BaseException:
            manager.abort()
            raise
        finally:
            self.session.remove()
        return record

    def record_failure(self, lease, evolution_id, error):
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            return self._record_finished(conn, lease, evolution_id, FAILED, error=error)

    def record_progress(self, lease, evolution_id, done, total):
        from .sql_schema import db_now, history_table
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            conn.execute(history_table.update()
                         .where(history_table.c.evolution_id == evolution_id)
                         .values(progress_done=done, progress_total=total,
                                 progress_at=db_now()))

    def record_states(self, lease, evolution_ids, state):
        from .sql_schema import db_now, history_table
        if state not in DONE_STATES:
            raise ValueError(f'record_states() records done states only, not {state!r}')
        ids = list(dict.fromkeys(evolution_ids))
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            done = set(conn.execute(
                sa.select(history_table.c.evolution_id)
                .where(history_table.c.evolution_id.in_(ids),
                       history_table.c.state.in_(DONE_STATES))).scalars())
            now = db_now()
            for evolution_id in ids:
                if evolution_id in done:
                    continue
                self._upsert_history(conn, evolution_id, dict(
                    state=state, attempts=0, started_at=now, finished_at=now, duration_ms=0.0,
                    owner=lease.owner, generation=lease.generation, error=None,
                    progress_done=None, progress_total=None, progress_at=None))

    def delete_history(self, lease, evolution_ids):
        from .sql_schema import history_table
        ids = list(evolution_ids)
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            result = conn.execute(history_table.delete()
                                  .where(history_table.c.evolution_id.in_(ids)))
            return result.rowcount
