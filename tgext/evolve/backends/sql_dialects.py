"""What differs between the SQL databases tgext.evolve supports, one small object per dialect.

After Alembic's ``DefaultImpl.get_by_dialect()``: :func:`impl_for` gives the backend the object
for its engine's dialect, and the backend never tests ``dialect.name`` itself.  What is the same
everywhere stays in :mod:`.sqlalchemy`.
"""
import contextlib

import sqlalchemy as sa

#: The longest a storage upgrade's ALTER waits for a table lock, in seconds.  Short: while an
#: ALTER waits, every read of that table queues behind it (PostgreSQL's lock queue, MySQL's
#: metadata locks), and the whole cluster reads the history and the lock.
DDL_LOCK_WAIT = 1


class DefaultImpl:
    """A dialect that needs nothing special (and the behaviour the others start from)."""

    #: The database clock as float epoch seconds with sub-second precision (``db_now()``).
    now_sql = 'CURRENT_TIMESTAMP'

    def transaction_from_first_statement(self, conn):
        """Around an evolution's work on ``conn``: make its first statement open the
        transaction, where the driver would leave DDL outside it."""
        return contextlib.nullcontext()

    def is_busy(self, error):
        """True when ``error`` means another connection keeps the database's single write lock
        (SQLite): contention to retry at the next poll, not an outage."""
        return False

    def no_lock_wait(self, conn):
        """Around a lock acquisition's write on ``conn``: fail busy at once rather than wait
        for another connection's write lock (SQLite)."""
        return contextlib.nullcontext()

    def holds_write_lock(self, conn):
        """True when ``conn``'s open transaction holds the database's single write lock
        (SQLite): any other connection's write then waits for it, and fails busy."""
        return False

    def bounded_lock_wait(self, conn):
        """Around a storage upgrade's DDL on ``conn``: wait at most :data:`DDL_LOCK_WAIT` for a
        table lock, then fail with an error :meth:`is_lock_timeout` recognises."""
        return contextlib.nullcontext()

    def is_lock_timeout(self, error):
        """True when ``error`` is the end of a :meth:`bounded_lock_wait` (or SQLite's busy
        wait): the DDL can be tried again later."""
        return self.is_busy(error)

    def has_skip_locked(self, dialect):
        """True when the connected server has ``SELECT ... FOR UPDATE SKIP LOCKED``: a claim
        of a parallel evolution's range then skips rows other claimers are taking instead of
        comparing-and-setting (``dialect`` of a connected engine: its server version is
        known)."""
        return False


class SQLiteImpl(DefaultImpl):
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    @contextlib.contextmanager
    def transaction_from_first_statement(self, conn):
        """Open the transaction at the work's first statement on ``conn``.

        Python's sqlite3 driver begins a transaction only before a data change, so an evolution
        whose first statement is DDL (CREATE TABLE, ALTER TABLE) would have it committed at once
        and kept after a failure.  SQLite's DDL is transactional: begun here, it rolls back with
        the rest of the evolution, as on PostgreSQL.  IMMEDIATE takes the write lock at once: a
        transaction that reads and then writes cannot upgrade its lock while another connection
        writes (SQLite fails it at once with "database is locked", without waiting).  At the
        first statement, not before: work that writes through a connection of its own (an
        Alembic env.py that ignores the one it is given) must not find the database locked by
        this one.
        """
        def begin(connection, *args):
            driver = connection.connection.driver_connection
            if not driver.in_transaction:
                driver.execute('BEGIN IMMEDIATE')  # on the driver: we are inside SQLAlchemy's event

        sa.event.listen(conn, 'before_cursor_execute', begin)
        try:
            yield
        finally:
            sa.event.remove(conn, 'before_cursor_execute', begin)

    @contextlib.contextmanager
    def no_lock_wait(self, conn):
        """A lease that looks expired on SQLite is mostly a holder inside a long evolution
        (its transaction keeps even its own renewals out): the takeover's UPDATE would wait
        for that write lock for the whole busy timeout (5 s by default), on every poll and at
        a process's first look.  Busy at once is the same answer: somebody is writing."""
        driver = conn.connection.driver_connection
        previous = driver.execute('PRAGMA busy_timeout').fetchone()[0]
        driver.execute('PRAGMA busy_timeout = 0')
        try:
            yield
        finally:
            driver.execute(f'PRAGMA busy_timeout = {int(previous):d}')

    def holds_write_lock(self, conn):
        # transaction_from_first_statement() began it IMMEDIATE: the write lock is ours.
        try:
            driver = conn.connection.driver_connection
        except Exception:  # closed (the work aborted the transaction): it holds nothing
            return False
        return driver is not None and driver.in_transaction

    def is_busy(self, error):
        import sqlite3  # loaded already: only an engine on SQLite gets this object
        orig = getattr(error, 'orig', None)
        return isinstance(orig, sqlite3.OperationalError) and str(orig) == 'database is locked'


class PostgreSQLImpl(DefaultImpl):
    # clock_timestamp(), not now(): now() is frozen at the start of the transaction, and
    # apply()'s transaction lasts as long as the evolution.
    now_sql = 'CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)'

    @contextlib.contextmanager
    def bounded_lock_wait(self, conn):
        # LOCAL: for this transaction only, and back to the session's value after the DDL.
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{DDL_LOCK_WAIT * 1000:.0f}ms'")
        yield
        conn.exec_driver_sql('SET LOCAL lock_timeout TO DEFAULT')

    def has_skip_locked(self, dialect):
        return True  # since 9.5, older than anything SQLAlchemy 2 supports

    def is_lock_timeout(self, error):
        orig = getattr(error, 'orig', None)
        # 55P03 lock_not_available: psycopg 3 says sqlstate, psycopg2 pgcode.
        return '55P03' in (getattr(orig, 'sqlstate', None), getattr(orig, 'pgcode', None))


class MySQLImpl(DefaultImpl):
    # Pure UTC arithmetic: UNIX_TIMESTAMP(NOW()) goes through the session time zone and is
    # ambiguous for an hour every autumn.
    now_sql = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1000000.0)"

    #: ER_LOCK_WAIT_TIMEOUT, also for a metadata lock (what an ALTER waits for).
    LOCK_WAIT_TIMEOUT = 1205

    @contextlib.contextmanager
    def bounded_lock_wait(self, conn):
        # SESSION, not LOCAL: MySQL has no transaction-scoped setting, and DDL commits anyway.
        # The connection goes back to the application's pool: its own value is put back, or
        # the connection is discarded.
        previous = conn.exec_driver_sql('SELECT @@SESSION.lock_wait_timeout').scalar_one()
        conn.exec_driver_sql(f'SET SESSION lock_wait_timeout = {DDL_LOCK_WAIT:d}')
        try:
            yield
        finally:
            try:
                conn.exec_driver_sql(f'SET SESSION lock_wait_timeout = {int(previous):d}')
            except Exception:
                # Never back to the pool with our setting.  Not raised: an error of the DDL
                # says more, and without one the next statement fails on this connection.
                conn.invalidate()

    def has_skip_locked(self, dialect):
        version = dialect.server_version_info or ()
        return version >= ((10, 6) if dialect.is_mariadb else (8, 0, 1))

    def is_lock_timeout(self, error):
        args = getattr(getattr(error, 'orig', None), 'args', ())
        return bool(args) and args[0] == self.LOCK_WAIT_TIMEOUT


_IMPLS = {
    'sqlite': SQLiteImpl(),
    'postgresql': PostgreSQLImpl(),
    'mysql': MySQLImpl(),
    'mariadb': MySQLImpl(),
}
_DEFAULT = DefaultImpl()


def impl_for(dialect):
    """The object for a SQLAlchemy ``dialect`` (an engine's, or a compiler's)."""
    return _IMPLS.get(dialect.name, _DEFAULT)
