"""The SQL tables of the storage contract as the latest storage version defines them, and the
database clock as an SQL expression.

Kept apart from :mod:`.sqlalchemy` so that building them (~4 ms of a process's start-up) is
paid by the first statement that needs them: a process started on an evolved database only
reads the history, with a textual query, and never loads this module.  A column added here by
a later storage version also needs its step in ``upgrades.UPGRADES``.
"""
import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from ..records import MAX_ID_LENGTH, MAX_OWNER_LENGTH
from .base import HISTORY_TABLE, LEGACY_TABLE, LOCK_TABLE, SCHEMA_TABLE
from .sql_dialects import impl_for


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

# Storage version 2.
schema_table = sa.Table(
    SCHEMA_TABLE, metadata,
    sa.Column('name', sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column('version', sa.Integer, nullable=False),
    sa.Column('upgraded_at', Time, nullable=True),
    sa.Column('upgraded_by', sa.String(MAX_OWNER_LENGTH), nullable=True),
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
def _db_now(element, compiler, **kw):
    return impl_for(compiler.dialect).now_sql
