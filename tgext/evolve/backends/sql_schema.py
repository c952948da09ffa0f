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
from .base import (AUDIT_TABLE, HISTORY_TABLE, LEGACY_TABLE, LOCK_TABLE, RANGES_TABLE,
                   SCHEMA_TABLE)
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
    # Storage version 3.
    sa.Column('checkpoint', sa.Text, nullable=True),
    sa.Column('batches_done', sa.BigInteger, nullable=True),
    sa.Column('batch_size', sa.Integer, nullable=True),
    sa.Column('rate', Time, nullable=True),
    sa.Column('requested', sa.String(16), nullable=True),
    sa.Column('requested_by', sa.String(MAX_OWNER_LENGTH), nullable=True),
    sa.Column('requested_at', Time, nullable=True),
)

# Storage version 2.
schema_table = sa.Table(
    SCHEMA_TABLE, metadata,
    sa.Column('name', sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column('version', sa.Integer, nullable=False),
    sa.Column('upgraded_at', Time, nullable=True),
    sa.Column('upgraded_by', sa.String(MAX_OWNER_LENGTH), nullable=True),
)

# Storage version 3: append-only, one row per attempt (its outcome and traceback) and per
# operator action (mark, unmark, retry, pause, resume, release-lock).
audit_table = sa.Table(
    AUDIT_TABLE, metadata,
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('evolution_id', sa.String(MAX_ID_LENGTH), nullable=True, index=True),
    sa.Column('at', Time, nullable=False),
    sa.Column('action', sa.String(32), nullable=False),
    sa.Column('actor', sa.String(MAX_OWNER_LENGTH), nullable=True),
    sa.Column('host', sa.String(MAX_OWNER_LENGTH), nullable=True),
    sa.Column('detail', sa.Text, nullable=True),
    sa.Column('error', sa.Text, nullable=True),
)

# Storage version 3: the key ranges of a parallel evolution, each claimed under a lease and
# checkpointed batch by batch like a whole evolution is.
ranges_table = sa.Table(
    RANGES_TABLE, metadata,
    sa.Column('evolution_id', sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column('range_no', sa.Integer, primary_key=True, autoincrement=False),
    sa.Column('after_key', sa.Text, nullable=True),  # JSON; exclusive; NULL: from the start
    sa.Column('upto_key', sa.Text, nullable=True),  # JSON; inclusive; NULL: to the end
    sa.Column('checkpoint', sa.Text, nullable=True),  # JSON: the last key done in the range
    sa.Column('state', sa.String(16), nullable=False),
    sa.Column('owner', sa.String(MAX_OWNER_LENGTH), nullable=True),
    sa.Column('claim_generation', sa.Integer, nullable=False, default=0),
    sa.Column('claimed_at', Time, nullable=True),
    sa.Column('expires_at', Time, nullable=True),
    sa.Column('items_done', sa.BigInteger, nullable=True),
    sa.Column('batches_done', sa.BigInteger, nullable=True),
    sa.Column('batch_size', sa.Integer, nullable=True),
    sa.Column('attempts', sa.Integer, nullable=True),
    sa.Column('error', sa.Text, nullable=True),
    sa.Column('finished_at', Time, nullable=True),
    sa.Index('ix_tgext_evolve_ranges_state', 'evolution_id', 'state'),
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
