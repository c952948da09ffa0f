"""The SQL tables of the storage contract, and the database clock as an SQL expression.

Kept apart from :mod:`.sqlalchemy` so that building them (~4 ms of a process's start-up) is
paid by the first statement that needs them: a process started on an evolved database only
reads the history, with a textual query, and never loads this module.
"""
import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from ..records import MAX_ID_LENGTH, MAX_OWNER_LENGTH
from .base import HISTORY_TABLE, LEGACY_TABLE, LOCK_TABLE


Time = sa.Float(precision=53)  # DOUBLE PRECISION on PostgreSQL, DOUBLE on MySQL, REAL on SQLite

metadata = sa.MetaData()

lock_table = sa.Table(
    LOCK_TABLE, metadata,
    sa.Column('name', sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column('owner', sa.String(MAX_OWNER_LENGTH), nullable=True),
    sa.Column('generation', sa.Integer, nullable=False),
    sa.Column('acquired_at', Time, nullable=True),
    sa.Column('renewed_at', Time, nullable=True),
    sa.Column('expires_at', Time, nullable=True),
    sa.Column('released_by', sa.String(MAX_OWNER_LENGTH), nullable=True),
)

history_table = sa.Table(
    HISTORY_TABLE, metadata,
    sa.Column('evolution_id', sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column('state', sa.String(16), nullable=False),
    sa.Column('attempts', sa.Integer, nullable=False, default=0),
    sa.Column('started_at', Time, nullable=True),
    sa.Column('finished_at', Time, nullable=True),
    sa.Column('duration_ms', Time, nullable=True),
    sa.Column('owner', sa.String(MAX_OWNER_LENGTH), nullable=True),
    sa.Column('generation', sa.Integer, nullable=True),
    sa.Column('error', sa.Text, nullable=True),
    sa.Column('progress_done', sa.BigInteger, nullable=True),
    sa.Column('progress_total', sa.BigInteger, nullable=True),
    sa.Column('progress_at', Time, nullable=True),
    sa.Column('fingerprint', sa.String(MAX_ID_LENGTH), nullable=True),
)

# Read-only view of the 0.0.5 table; never created by us.
legacy_table = sa.Table(
    LEGACY_TABLE, sa.MetaData(),
    sa.Column('type', sa.String(16), primary_key=True),
    sa.Column('value', sa.String(255)),
)


class db_now(FunctionElement):
    """The database's current time as float epoch seconds, with sub-second precision."""
    type = Time
    inherit_cache = True


@compiles(db_now)
def _db_now_default(element, compiler, **kw):
    return 'CURRENT_TIMESTAMP'  # pragma: no cover - every supported dialect has its own below


@compiles(db_now, 'postgresql')
def _db_now_postgresql(element, compiler, **kw):
    # clock_timestamp(), not now(): now() is frozen at the start of the transaction, and
    # apply()'s transaction lasts as long as the evolution.
    return 'CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)'


@compiles(db_now, 'mysql')
@compiles(db_now, 'mariadb')
def _db_now_mysql(element, compiler, **kw):
    # Pure UTC arithmetic: UNIX_TIMESTAMP(NOW()) goes through the session time zone and is
    # ambiguous for an hour every autumn.
    return "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1000000.0)"


@compiles(db_now, 'sqlite')
def _db_now_sqlite(element, compiler, **kw):
    return "((julianday('now') - 2440587.5) * 86400.0)"
