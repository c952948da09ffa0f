"""tgext.evolve's own SQL statements are never server-side prepared statements.

Behind a pooler in transaction mode (pgbouncer's ``pool_mode = transaction``) each transaction
of a client may run on another server connection, while a named prepared statement exists
only in the server session that prepared it.  psycopg 3 prepares a statement at its sixth
execution on a connection (``prepare_threshold``, 5 by default) and from then on sends only
its name: on any other server connection that fails with ``prepared statement "_pg3_5" does
not exist``.  tgext.evolve's statements are the same few, repeated at every poll, renewal and
evolution: without this module, the first to be prepared, and to fail, in any cluster behind
such a pooler.

So psycopg 3's ``prepare_threshold`` is ``None`` while each of our statements executes, and
the value the connection had is put back right after it: the application's own statements,
on the same pooled connections, keep whatever the application configured (prepared or not
is its choice; README, Deployment).  The other drivers need nothing: psycopg2 and PyMySQL
never prepare on the server by themselves, SQLite has no server.
"""
import contextlib
import threading

import sqlalchemy as sa

#: The SQLAlchemy drivers whose connections prepare statements on the server by themselves,
#: and how to turn that off on a connection: psycopg 3's ``prepare_threshold``.
_PREPARING_DRIVERS = {'psycopg'}

_in_flight = threading.local()  # (driver connection, its threshold) during one statement


def _driver_prepares(engine):
    return engine.dialect.driver in _PREPARING_DRIVERS


def unprepared_engine(engine):
    """``engine``, for statements that must never be prepared on the server.

    For a driver that prepares by itself, an :meth:`~sqlalchemy.engine.Engine.execution_options`
    copy of ``engine``: the same pool and settings, and events of its own, which turn
    preparing off around each statement executed through it.  ``engine`` itself otherwise.
    """
    if not _driver_prepares(engine):
        return engine
    unprepared = engine.execution_options()
    sa.event.listen(unprepared, 'before_cursor_execute', _before_statement)
    sa.event.listen(unprepared, 'after_cursor_execute', _after_statement)
    sa.event.listen(unprepared, 'handle_error', _after_failed_statement)
    return unprepared


@contextlib.contextmanager
def unprepared(connection):
    """Statements executed on ``connection`` (a connection of the application's, such as its
    session's) inside this block are not prepared on the server; its own setting is back
    after the block."""
    if not _driver_prepares(connection.engine):
        yield
        return
    driver_connection = connection.connection.driver_connection
    threshold = driver_connection.prepare_threshold
    driver_connection.prepare_threshold = None
    try:
        yield
    finally:
        driver_connection.prepare_threshold = threshold


def _before_statement(conn, cursor, statement, parameters, context, executemany):
    _after_statement()  # a statement whose end was never signalled: put its setting back
    driver_connection = cursor.connection
    _in_flight.saved = (driver_connection, driver_connection.prepare_threshold)
    driver_connection.prepare_threshold = None


def _after_statement(*args):
    saved = getattr(_in_flight, 'saved', None)
    if saved is not None:
        _in_flight.saved = None
        driver_connection, threshold = saved
        driver_connection.prepare_threshold = threshold


def _after_failed_statement(exception_context):
    _after_statement()
