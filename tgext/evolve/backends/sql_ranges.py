"""The key ranges of parallel evolutions on SQL databases (``tgext_evolve_ranges``).

A mixin of :class:`~.sqlalchemy.SQLAlchemyBackend`, kept apart because only a process with a
parallel evolution pending ever calls it.  Claims never wait for a lock another claimer holds:
where the server has ``FOR UPDATE SKIP LOCKED`` (PostgreSQL, MySQL 8, MariaDB 10.6+) a claim
locks the first free row nobody else is locking, then takes it; elsewhere (SQLite, older MySQL
and MariaDB) it reads a few candidates and takes one with a compare-and-set on its
``claim_generation``.  A claimer's writes to its range are fenced on ``(owner,
claim_generation)``, and a batch's fencing check runs on the application session's connection,
in the batch's own transaction.
"""
import random

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ..errors import ClaimLost
from ..records import (RANGE_DONE, RANGE_FAILED, RANGE_PENDING, RANGE_RUNNING, RangeClaim,
                       RangeRecord)
from .base import RANGES_TABLE

#: How many claimable ranges a compare-and-set claim picks from at random: claimers that
#: read at the same moment then rarely race for the same row.
CAS_CANDIDATES = 8

_FLOAT_FIELDS = ('claimed_at', 'expires_at', 'finished_at', 'now')


def _range_record(row):
    fields = dict(row._mapping)
    for name in _FLOAT_FIELDS:
        if fields.get(name) is not None:
            fields[name] = float(fields[name])  # MySQL: DECIMAL for db_now()
    for name in ('items_done', 'batches_done', 'attempts', 'claim_generation'):
        fields[name] = fields.get(name) or 0
    return RangeRecord(**{k: v for k, v in fields.items() if k in RangeRecord._fields})


def _lost(claim):
    return ClaimLost(f'range {claim.range_no} of {claim.evolution_id!r} is no longer claimed by '
                     f'{claim.owner} (claim {claim.claim_generation})')


class SQLRanges:
    """``Backend``'s range methods for :class:`~.sqlalchemy.SQLAlchemyBackend`."""

    def read_ranges(self, evolution_id=None):
        from .sql_schema import db_now, ranges_table as r
        query = sa.select(r, db_now().label('now')).order_by(r.c.evolution_id, r.c.range_no)
        if evolution_id is not None:
            query = query.where(r.c.evolution_id == evolution_id)
        return [_range_record(row) for row in self._reading(RANGES_TABLE, query, ())]

    def prepare_ranges(self, lease, evolution_id, ranges):
        from .sql_schema import ranges_table as r
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            if ranges is not None:
                conn.execute(r.delete().where(r.c.evolution_id == evolution_id))
                conn.execute(r.insert(), [
                    dict(evolution_id=evolution_id, range_no=number, after_key=after,
                         upto_key=upto, checkpoint=None, state=RANGE_PENDING,
                         claim_generation=0, items_done=0, batches_done=0, attempts=0)
                    for number, (after, upto) in enumerate(ranges)])
            else:
                conn.execute(r.update().where(r.c.evolution_id == evolution_id,
                                              r.c.state == RANGE_FAILED)
                             .values(state=RANGE_PENDING, owner=None, expires_at=None,
                                     error=None, finished_at=None))
        return self.read_ranges(evolution_id)

    @staticmethod
    def _claimable(evolution_id, now):
        from .sql_schema import ranges_table as r
        return sa.and_(r.c.evolution_id == evolution_id,
                       sa.or_(r.c.state == RANGE_PENDING,
                              sa.and_(r.c.state == RANGE_RUNNING, r.c.expires_at < now)))

    def claim_range(self, evolution_id, owner, lease_seconds):
        from .sql_schema import db_now, ranges_table as r
        now = db_now()
        columns = (r.c.range_no, r.c.claim_generation, r.c.after_key, r.c.upto_key,
                   r.c.checkpoint, r.c.batch_size, r.c.attempts)
        claimable = self._claimable(evolution_id, now)

        def take(conn, row):
            return conn.execute(
                r.update()
                .where(r.c.evolution_id == evolution_id, r.c.range_no == row.range_no,
                       r.c.claim_generation == row.claim_generation, claimable)
                .values(state=RANGE_RUNNING, owner=owner,
                        claim_generation=row.claim_generation + 1, claimed_at=now,
                        expires_at=now + lease_seconds,
                        attempts=sa.func.coalesce(r.c.attempts, 0) + 1)).rowcount == 1

        def claim(row):
            return RangeClaim(evolution_id, row.range_no, owner, row.claim_generation + 1,
                              lease_seconds, row.after_key, row.upto_key, row.checkpoint,
                              row.batch_size, (row.attempts or 0) + 1)

        with self.engine.connect() as conn:
            # The server version is known once connected.
            skip_locked = self._impl.has_skip_locked(conn.dialect)
            if skip_locked:
                with conn.begin():
                    row = conn.execute(sa.select(*columns).where(claimable)
                                       .order_by(r.c.range_no).limit(1)
                                       .with_for_update(skip_locked=True)).first()
                    return claim(row) if row is not None and take(conn, row) else None
            candidates = conn.execute(sa.select(*columns).where(claimable)
                                      .order_by(r.c.range_no).limit(CAS_CANDIDATES)).all()
            conn.rollback()  # the read's transaction: SQLite's shared lock ends here
        random.shuffle(candidates)
        for row in candidates:
            try:
                with self.engine.begin() as conn:
                    if take(conn, row):
                        return claim(row)
            except sa_exc.OperationalError as e:
                if not self._impl.is_busy(e):
                    raise
                return None  # another writer holds SQLite's lock: try at the next poll
        return None

    def _claim_write(self, conn, claim, **values):
        """UPDATE the claimed range, fenced on the claim; ClaimLost when it is not ours."""
        from .sql_schema import ranges_table as r
        result = conn.execute(
            r.update().where(r.c.evolution_id == claim.evolution_id,
                             r.c.range_no == claim.range_no, r.c.owner == claim.owner,
                             r.c.claim_generation == claim.claim_generation,
                             r.c.state == RANGE_RUNNING)
            .values(**values))
        if result.rowcount != 1:
            raise _lost(claim)

    def run_range_batch(self, claim, work):
        from .sql_schema import db_now, ranges_table as r

        def finish(conn, checkpoint):
            now = db_now()
            done = checkpoint.exhausted
            self._claim_write(
                conn, claim, checkpoint=checkpoint.cursor,
                items_done=sa.func.coalesce(r.c.items_done, 0) + checkpoint.items,
                batches_done=sa.func.coalesce(r.c.batches_done, 0) + 1,
                batch_size=checkpoint.batch_size,
                expires_at=now + claim.lease_seconds,
                state=RANGE_DONE if done else RANGE_RUNNING,
                finished_at=now if done else None)

        self._in_app_transaction(work, finish)

    def release_range(self, claim):
        return self._end_claim(claim, state=RANGE_PENDING, owner=None, expires_at=None)

    def fail_range(self, claim, error):
        from .sql_schema import db_now
        return self._end_claim(claim, state=RANGE_FAILED, error=error, finished_at=db_now(),
                               expires_at=None)

    def _end_claim(self, claim, **values):
        try:
            with self.engine.begin() as conn:
                self._claim_write(conn, claim, **values)
        except ClaimLost:
            return False
        return True

    def record_parallel_progress(self, lease, evolution_id, done, batches_done, rate):
        from .sql_schema import db_now, history_table as h
        with self.engine.begin() as conn:
            self._fence(conn, lease)
            conn.execute(h.update().where(h.c.evolution_id == evolution_id)
                         .values(progress_done=done, batches_done=batches_done, rate=rate,
                                 progress_at=db_now()))
