"""The storage contract on SQLAlchemy 2.x: SQLite, PostgreSQL, MySQL/MariaDB.

Every time comes from the database clock (``db_now()``), so a host with a skewed clock can
neither steal nor extend a lease.  Times are stored as double-precision epoch seconds: MySQL's
``FLOAT`` is 32-bit and would be off by up to a minute.

:meth:`SQLAlchemyBackend.apply` runs the evolution inside the ``transaction`` manager with the
application's session joined, and issues the fencing check and the ``applied`` history row on
that session's connection, so all three commit or roll back together.
"""
import contextlib
import functools

import sqlalchemy as sa
import transaction
import zope.sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import scoped_session, sessionmaker

from ..errors import LeaseLost
from .. import forking, logs
from ..records import (APPLIED, DEFAULT_LOCK_NAME, DONE_STATES, FAILED, HISTORY_BATCH_FIELDS,
                       HISTORY_V1_FIELDS, PAUSE, PAUSED, RESUME, RETRY, RUNNING, AuditEntry,
                       HistoryRecord, Lease, LegacyState, LockRecord, require_done_state)
from .base import AUDIT_TABLE, HISTORY_TABLE, LEGACY_TABLE, LOCK_TABLE, Backend, audit_text
from .sql_ranges import SQLRanges
from .sql_unprepared import unprepared, unprepared_engine

log = logs.backend

# read_history() is every process's first look at the database, on the path of its first
# request: spelled out, it needs neither SQLAlchemy's compiler (~4 ms the first time in a
# process) nor the tables (:mod:`.sql_schema`, loaded by the first write).  No identifier here
# needs quoting on any dialect.
def _history_query(errors, batches):
    fields = [f for f in HISTORY_V1_FIELDS if errors or f != 'error']
    if batches:
        fields += HISTORY_BATCH_FIELDS
    return sa.text(f'SELECT {", ".join(fields)} FROM {HISTORY_TABLE}')


_READ_HISTORY = {(errors, batches): _history_query(errors, batches)
                 for errors in (False, True) for batches in (False, True)}


class SelfLocked(RuntimeError):
    """The evolution waited for SQLite's write lock, which its own transaction holds."""


_SELF_LOCKED = (
    "{where} waited for SQLite's write lock until it gave up ('database is locked'), and its "
    "own transaction holds that lock: it wrote through DBSession first, then through another "
    "connection (engine.begin(), engine.connect(), another session, another thread), which "
    "can never get the lock while the evolution's transaction is open.  Write through "
    "DBSession only (DBSession.execute() runs Core statements in the evolution's "
    "transaction).")


# What zope.sqlalchemy raises for DBSession.commit() in a session it manages.
_ZOPE_REFUSED_COMMIT = 'Transaction must be committed using the transaction manager'


def _float(value):
    # MySQL returns DECIMAL for db_now(); everything else is already a float.
    return None if value is None else float(value)


def _reading_from_master(session):
    """While an evolution runs, a balancing session (TG's ``BalancedSession``, which reads from
    ``sqlalchemy.slaves.*``) reads from the master too: a lagging replica must not hand an
    evolution rows older than those it updates."""
    using_engine = getattr(session, 'using_engine', None)
    return using_engine('master') if using_engine is not None else contextlib.nullcontext()


_FLOAT_FIELDS = frozenset(('started_at', 'finished_at', 'duration_ms', 'rate', 'requested_at'))


def _history_record(row):
    m = row._mapping
    fields = {name: m[name] for name in HistoryRecord._fields if name in m}
    for name in _FLOAT_FIELDS.intersection(fields):
        fields[name] = _float(fields[name])
    fields['attempts'] = fields['attempts'] or 0
    return HistoryRecord(**fields)


def _clear_honoured_requests(conn, evolution_id):
    """Starting an attempt honours a ``retry`` or ``resume`` request (cleared), never a
    ``pause`` one: a pause that arrived after the plan was read stops the first batch."""
    from .sql_schema import history_table as h
    conn.execute(h.update().where(h.c.evolution_id == evolution_id,
                                  h.c.requested.in_((RETRY, RESUME)))
                 .values(requested=None, requested_by=None, requested_at=None))


class SQLAlchemyBackend(SQLRanges, Backend):
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
        self.process_local = (engine.dialect.name == 'sqlite'
                              and engine.url.database in (None, '', ':memory:'))
        # SQLite's readers hold its one writer's commit up (outside WAL mode).
        self.counts_aside = engine.dialect.name != 'sqlite'
        self._owns_session = session is None
        if session is None:
            session = scoped_session(sessionmaker(bind=engine))
            zope.sqlalchemy.register(session)
        self.session = session
        forking.after_fork_in_child(self.dispose_after_fork)

    @functools.cached_property
    def _impl(self):
        # Loaded at its first use (a write, an error): a process that only reads the history
        # never needs it.
        from .sql_dialects import impl_for
        return impl_for(self.engine.dialect)

    # --- set-up --------------------------------------------------------------------------------

    def ensure_storage(self):
        from . import sql_storage
        sql_storage.create_missing_tables(self.engine, self._impl)

    def read_storage_version(self):
        from . import sql_storage
        return sql_storage.storage_version(self.engine)

    def storage_is_current(self, version):
        from .upgrades import upgrades_after
        return not upgrades_after(version)

    def upgrade_storage(self, lease):
        from . import sql_storage, upgrades
        for step in upgrades.upgrades_after(self.read_storage_version()):
            if not sql_storage.upgrade(self.engine, self._impl, step,
                                       lambda conn: self._fence(conn, lease), lease.owner):
                return False
        return True

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
        return self._impl.is_busy(error)

    # --- reading -------------------------------------------------------------------------------

    def _reading(self, table, statement, missing):
        """The rows ``statement`` reads from ``table``, or ``missing`` while the table does not
        exist.  Looked into only after a failure: an evolved database pays the read alone."""
        try:
            with self.engine.connect() as conn:
                return conn.execute(statement).fetchall()
        except sa_exc.DBAPIError:
            try:
                if not sa.inspect(self.engine).has_table(table):
                    return missing
            except sa_exc.DBAPIError:
                pass  # the database cannot tell: the read below raises what is wrong
        # Created meanwhile (many processes starting on a new database), or an outage.
        with self.engine.connect() as conn:
            return conn.execute(statement).fetchall()

    def read_history(self, *, errors=True, batches=False):
        rows = self._reading(HISTORY_TABLE, _READ_HISTORY[errors, batches], ())
        return {row.evolution_id: _history_record(row) for row in rows}

    def read_lock(self, name=DEFAULT_LOCK_NAME):
        from .sql_schema import db_now, lock_table
        query = sa.select(lock_table, db_now().label('now')).where(lock_table.c.name == name)
        rows = self._reading(LOCK_TABLE, query, ())
        return self._lock_record(rows[0]) if rows else None

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
            with self.engine.begin() as conn, self._impl.no_lock_wait(conn):
                # The compare-and-set: the condition is evaluated under the row lock, so of two
                # processes that both saw the lease expired, only the first one's UPDATE matches.
                taking = (lock_table.update()
                          .where(lock_table.c.name == name)
                          .where(sa.or_(lock_table.c.owner.is_(None),
                                        lock_table.c.expires_at < now))
                          .values(generation=lock_table.c.generation + 1, **taken))
                if conn.dialect.update_returning:  # the new generation without a read
                    generation = conn.execute(
                        taking.returning(lock_table.c.generation)).scalar()
                    if generation is not None:
                        return Lease(name=name, owner=owner, generation=generation,
                                     lease_seconds=lease_seconds)
                elif conn.execute(taking).rowcount == 1:
                    return self._lease(conn, name, owner, lease_seconds)
                exists = conn.execute(
                    sa.select(lock_table.c.name).where(lock_table.c.name == name)).first()
        except sa_exc.OperationalError as e:
            if not self._impl.is_busy(e):
                raise
            # SQLite has one writer: a long evolution's transaction keeps even its own
            # heartbeat from renewing, so the lease looks expired while the work goes on.
            # Somebody is writing: the lock is not free, and this is no outage.
            return None
        if exists:
            return None
        try:
            with self.engine.begin() as conn, self._impl.no_lock_wait(conn):
                conn.execute(lock_table.insert().values(name=name, generation=1, **taken))
                return self._lease(conn, name, owner, lease_seconds)
        except sa_exc.IntegrityError:
            return None  # another process inserted it first
        except sa_exc.OperationalError as e:
            if not self._impl.is_busy(e):
                raise
            return None  # the first process inserted it and is writing its evolution

    @staticmethod
    def _lease(conn, name, owner, lease_seconds):
        from .sql_schema import lock_table
        generation = conn.execute(
            sa.select(lock_table.c.generation)
            .where(lock_table.c.name == name, lock_table.c.owner == owner)).scalar_one()
        return Lease(name=name, owner=owner, generation=generation, lease_seconds=lease_seconds)

    def _fence(self, conn, lease):
        """Extend the lease if it is still ours, in the caller's transaction; else LeaseLost.

        One statement: it runs every lease/3, and before every history write.
        """
        result = conn.execute(_fence_statement(), dict(
            lock_name=lease.name, lock_owner=lease.owner, lock_generation=lease.generation,
            lease_seconds=lease.lease_seconds))
        if result.rowcount != 1:
            raise LeaseLost(f'lock {lease.name!r} is no longer held by {lease.owner} '
                            f'(generation {lease.generation})')

    def renew(self, lease):
        with self.engine.begin() as conn:
            self._fence(conn, lease)
        return lease

    def release(self, lease):
        from .sql_schema import db_now, lock_table
        with self.engine.begin() as conn:
            result = conn.execute(
                lock_table.update()
                .where(lock_table.c.name == lease.name, lock_table.c.owner == lease.owner,
                       lock_table.c.generation == lease.generation)
                .values(owner=None, expires_at=db_now(), released_by=lease.owner))
            return result.rowcount == 1

    def break_lock(self, broken_by, name=DEFAULT_LOCK_NAME, generation=None):
        from .sql_schema import db_now, lock_table
        # The write lock from the first statement: on SQLite a transaction that reads and then
        # writes fails at once ("database is locked") while the holder writes a batch.
        with self.engine.begin() as conn, self._impl.transaction_from_first_statement(conn):
            row = conn.execute(
                sa.select(lock_table, db_now().label('now')).where(lock_table.c.name == name)
            ).first()
            if row is None or generation is not None and row.generation != generation:
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
        row = conn.execute(_read_one_statement(), dict(record_id=evolution_id)).one()
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
            _clear_honoured_requests(conn, evolution_id)
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

    def _in_app_transaction(self, work, finish, where="an evolution's work"):
        """``work()`` then ``finish(conn, result)`` in one transaction of the application's
        session, committed together; rolled back (and the error raised) if either raises.
        ``where`` names the work for a :class:`~.transaction_guard.TransactionGuard`."""
        from .transaction_guard import TransactionGuard
        manager = transaction.manager  # thread-local: this thread's own transaction
        manager.begin()
        guard = TransactionGuard(where, manager)
        try:
            session = self.session()
            conn = session.connection(bind_arguments={'bind': self._session_engine})
            guard.arm()  # armed around the work only: tgext.evolve's own abort must pass
            try:
                with (_reading_from_master(session),
                      self._impl.transaction_from_first_statement(conn)):
                    result = work()
            except sa_exc.OperationalError as e:
                if self._impl.is_busy(e) and self._impl.holds_write_lock(conn):
                    raise SelfLocked(_SELF_LOCKED.format(where=where)) from e
                raise
            except AssertionError as e:
                if _ZOPE_REFUSED_COMMIT in str(e):
                    raise guard.session_commit_refused() from e
                raise
            finally:
                guard.disarm()  # raises if the work committed or aborted the transaction
            session.flush()
            # On the session's own connection to our engine: the same database transaction
            # as the work, even when the session also talks to other engines.
            conn = session.connection(bind_arguments={'bind': self._session_engine})
            with unprepared(conn):
                record = finish(conn, result)
            # Joins the session to the transaction if the app never registered it with
            # zope.sqlalchemy, and stops zope.sqlalchemy from rolling back a session that
            # only executed statements.
            zope.sqlalchemy.mark_changed(session)
            manager.commit()
        except BaseException:
            manager.abort()
            raise
        finally:
            # Also what keeps a long batched walk's memory flat: the objects of a batch go
            # with its session.
            self.session.remove()
        return record

    def apply(self, lease, evolution_id, work, fingerprint=None, final_progress=None):
        def finish(conn, _):
            self._fence(conn, lease)
            progress = final_progress() if final_progress is not None else None
            shown = {} if progress is None else dict(progress_done=progress[0],
                                                     progress_total=progress[1])
            return self._record_finished(conn, lease, evolution_id, APPLIED, error=None,
                                         fingerprint=fingerprint, **shown)

        return self._in_app_transaction(work, finish, f'evolve() of {evolution_id!r}')

    def record_failure(self, lease, evolution_id, error):
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            return self._record_finished(conn, lease, evolution_id, FAILED, error=error)

    def record_progress(self, lease, evolution_id, done, total):
        from .sql_schema import db_now, history_table
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            conn.execute(history_table.update()
                         .where(history_table.c.evolution_id == evolution_id,
                                history_table.c.state == RUNNING)
                         .values(progress_done=done, progress_total=total,
                                 progress_at=db_now()))

    def record_states(self, lease, evolution_ids, state):
        from .sql_schema import db_now, history_table
        require_done_state(state)
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

    # --- batched evolutions --------------------------------------------------------------------

    def walker(self, evolution_id, collection):
        from .sql_walker import SQLWalker
        return SQLWalker(evolution_id, collection, self.session)

    def in_session(self, work):
        manager = transaction.manager
        manager.begin()
        try:
            with _reading_from_master(self.session()):
                return work()
        finally:
            manager.abort()
            self.session.remove()

    def record_batches_running(self, lease, evolution_id, batch_size, total, fingerprint=None,
                               audit=None):
        from .sql_schema import db_now, history_table as h
        now = db_now()
        # An evolution that is not done resumes from its checkpoint; a done one that runs again
        # (a repeatable evolution whose fingerprint changed) starts over.
        resuming = h.c.state.notin_(DONE_STATES)

        def kept(column, otherwise):
            return sa.case((resuming, sa.func.coalesce(column, otherwise)), else_=otherwise)

        with self.engine.begin() as conn:
            self._fence(conn, lease)
            # In this order, ``state`` last: MySQL evaluates SET assignments left to right,
            # each seeing the ones before it, and the others must see the state before it.
            updated = conn.execute(h.update().where(h.c.evolution_id == evolution_id)
                                   .ordered_values(
                (h.c.attempts, sa.func.coalesce(h.c.attempts, 0) + 1),
                (h.c.started_at, kept(h.c.started_at, now)),
                (h.c.checkpoint, sa.case((resuming, h.c.checkpoint), else_=None)),
                (h.c.progress_done, kept(h.c.progress_done, 0)),
                (h.c.batches_done, kept(h.c.batches_done, 0)),
                (h.c.progress_total, kept(h.c.progress_total, total)),
                (h.c.batch_size, kept(h.c.batch_size, batch_size)),
                (h.c.rate, sa.case((resuming, h.c.rate), else_=None)),
                (h.c.finished_at, None), (h.c.duration_ms, None), (h.c.error, None),
                (h.c.progress_at, None), (h.c.fingerprint, fingerprint),
                (h.c.owner, lease.owner), (h.c.generation, lease.generation),
                (h.c.state, RUNNING)))
            if updated.rowcount == 0:
                conn.execute(h.insert().values(
                    evolution_id=evolution_id, state=RUNNING, attempts=1, started_at=now,
                    owner=lease.owner, generation=lease.generation, fingerprint=fingerprint,
                    progress_done=0, batches_done=0, progress_total=total,
                    batch_size=batch_size))
            _clear_honoured_requests(conn, evolution_id)
            return _audited(conn, self._read_one(conn, evolution_id), audit)

    def run_batch(self, lease, evolution_id, work, audit=None, renew=True):
        def finish(conn, checkpoint):
            if renew:
                self._fence(conn, lease)
            return _audited(conn, self._write_checkpoint(conn, lease, evolution_id, checkpoint,
                                                         fenced=not renew), audit)

        return self._in_app_transaction(
            work, finish, f'a batch of {evolution_id!r} (process(), process_batch(), batch())')

    def _write_checkpoint(self, conn, lease, evolution_id, checkpoint, fenced=False):
        """Write the checkpoint; the record as written.  Read back by the UPDATE's RETURNING
        where the database has it (PostgreSQL, SQLite >= 3.35): one round trip less per batch.

        ``fenced``: the UPDATE is also the fencing check, without renewing the lease: it writes
        only while the lock row holds this lease, and keeps that row from a takeover until the
        commit (a share lock on PostgreSQL and MySQL; SQLite's batch holds the one write lock
        from its first statement).  One statement a batch instead of two: on PostgreSQL the
        fencing UPDATE cost as much as the checkpoint itself (0.6 ms, parsed anew every time:
        our statements are never prepared, :mod:`.sql_unprepared`)."""
        returning = conn.dialect.update_returning
        result = conn.execute(_checkpoint_statement(checkpoint.exhausted, returning, fenced),
                              dict(record_id=evolution_id, items=checkpoint.items,
                                   cursor=checkpoint.cursor, size=checkpoint.batch_size,
                                   batch_rate=checkpoint.rate, total=checkpoint.total,
                                   holder=lease.owner, holder_generation=lease.generation,
                                   lock_name=lease.name, lock_owner=lease.owner,
                                   lock_generation=lease.generation))
        row = result.first() if returning else None
        if (row is None) if returning else (result.rowcount != 1):
            if fenced:
                self._fence(conn, lease)  # LeaseLost, unless the record is what is missing
            raise LookupError(f'no history record for {evolution_id!r}: record_batches_running '
                              f'first')
        return _history_record(row) if returning else self._read_one(conn, evolution_id)

    def record_paused(self, lease, evolution_id):
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            self._upsert_history(conn, evolution_id, dict(
                state=PAUSED, requested=None, requested_by=None, requested_at=None,
                owner=lease.owner, generation=lease.generation),
                on_insert=dict(attempts=0))
            return self._read_one(conn, evolution_id)

    # --- operators' requests and the audit trail -----------------------------------------------

    def record_request(self, evolution_id, request, requested_by, seen_state):
        from .sql_schema import db_now, history_table as h
        try:
            with self.engine.begin() as conn:
                if seen_state is None:
                    if request != PAUSE:
                        return None
                    # The unique key is the compare-and-set: a record written meanwhile (the
                    # evolution started) makes this INSERT fail, and the caller looks again.
                    conn.execute(h.insert().values(
                        evolution_id=evolution_id, state=PAUSED, attempts=0,
                        requested_by=requested_by, requested_at=db_now()))
                else:
                    result = conn.execute(
                        h.update()
                        .where(h.c.evolution_id == evolution_id, h.c.state == seen_state,
                               sa.or_(h.c.requested.is_(None), h.c.requested != request))
                        .values(requested=request, requested_by=requested_by,
                                requested_at=db_now()))
                    if result.rowcount != 1:
                        return None
                return self._read_one(conn, evolution_id)
        except sa_exc.IntegrityError:
            return None

    def record_audit(self, evolution_id, action, actor, host, detail=None, error=None):
        with self.engine.begin() as conn:
            _append_audit(conn, evolution_id, action, actor, host, detail, error)

    def read_audit(self, evolution_id=None):
        from .sql_schema import audit_table as a
        query = sa.select(a).order_by(a.c.id)  # ids grow with every insert: the order they happened
        if evolution_id is not None:
            query = query.where(a.c.evolution_id == evolution_id)
        rows = self._reading(AUDIT_TABLE, query, ())
        return [AuditEntry(id=row.id, evolution_id=row.evolution_id, at=_float(row.at),
                           action=row.action, actor=row.actor, host=row.host, detail=row.detail,
                           error=row.error) for row in rows]


def _append_audit(conn, evolution_id, action, actor, host, detail=None, error=None):
    from .sql_schema import audit_table, db_now
    conn.execute(audit_table.insert().values(
        evolution_id=evolution_id, at=db_now(), action=action, actor=actor, host=host,
        detail=audit_text(detail), error=audit_text(error)))


def _audited(conn, record, audit):
    """``record``, once the line ``audit(record)`` gives (if any) is appended in ``conn``'s
    transaction."""
    line = audit(record) if audit is not None else None
    if line is not None:
        _append_audit(conn, record.evolution_id, line.action, line.actor, line.host,
                      line.detail)
    return record


# --- statements of every batch, built once ----------------------------------------------------
# A batch of a bulk evolution can take a few milliseconds; building these statements (and
# looking up their compiled form by structure) took about as long again.  Their values are
# bound parameters; the names differ from the columns', which SQLAlchemy reserves.

def _lease_holds():
    """The lock row's condition of holding the lease in ``lock_name``, ``lock_owner`` and
    ``lock_generation``: the one fencing test, whether it renews the lease or not."""
    from .sql_schema import lock_table as lock
    return sa.and_(lock.c.name == sa.bindparam('lock_name'),
                   lock.c.owner == sa.bindparam('lock_owner'),
                   lock.c.generation == sa.bindparam('lock_generation'))


@functools.lru_cache(maxsize=None)
def _fence_statement():
    from .sql_schema import db_now, lock_table as lock
    now = db_now()
    return (lock.update()
            .where(_lease_holds())
            .values(renewed_at=now,
                    expires_at=now + sa.bindparam('lease_seconds', type_=now.type)))


@functools.lru_cache(maxsize=None)
def _read_one_statement():
    from .sql_schema import history_table as h
    return sa.select(h).where(h.c.evolution_id == sa.bindparam('record_id'))


@functools.lru_cache(maxsize=None)
def _checkpoint_statement(exhausted, returning, fenced=False):
    from .sql_schema import db_now, history_table as h, lock_table as lock
    now = db_now()
    pausing = h.c.requested == PAUSE
    if exhausted:
        state, stops = sa.literal(APPLIED), sa.true()
    else:
        state = sa.case((pausing, sa.literal(PAUSED)), else_=h.c.state)
        stops = pausing
    # In this order: MySQL evaluates SET assignments left to right, each seeing the ones
    # before it, and ``state`` must see the request before it is cleared.
    statement = h.update().where(h.c.evolution_id == sa.bindparam('record_id')).ordered_values(
        (h.c.state, state),
        (h.c.finished_at, sa.case((stops, now), else_=None)),
        (h.c.duration_ms, sa.case((stops, (now - h.c.started_at) * 1000.0), else_=None)),
        (h.c.progress_done, sa.func.coalesce(h.c.progress_done, 0)
         + sa.bindparam('items', type_=h.c.progress_done.type)),
        (h.c.progress_at, now),
        (h.c.checkpoint, sa.bindparam('cursor', type_=h.c.checkpoint.type)),
        (h.c.batches_done, sa.func.coalesce(h.c.batches_done, 0) + 1),
        (h.c.batch_size, sa.bindparam('size', type_=h.c.batch_size.type)),
        (h.c.rate, sa.bindparam('batch_rate', type_=h.c.rate.type)),
        (h.c.progress_total, sa.func.coalesce(
            sa.bindparam('total', type_=h.c.progress_total.type), h.c.progress_total)),
        (h.c.requested, sa.case((pausing, None), else_=h.c.requested)),
        (h.c.owner, sa.bindparam('holder', type_=h.c.owner.type)),
        (h.c.generation, sa.bindparam('holder_generation', type_=h.c.generation.type)),
    )
    if fenced:
        statement = statement.where(sa.exists(
            sa.select(lock.c.name).where(_lease_holds()).with_for_update(read=True)))
    return statement.returning(*h.c) if returning else statement
