"""The key ranges of parallel evolutions on MongoDB and MIM (``tgext_evolve_ranges``).

A mixin of :class:`~.ming.MingBackend`.  One document per range, ``_id`` =
``'<evolution id>#<range number>'``.  A claim is one ``find_one_and_update`` whose filter says
"pending, or running with an expired claim": of many concurrent claimers at most one matches a
given document.  A claimer's writes to its range are fenced by repeating ``(owner,
claim_generation)`` in the filter of the same atomic update.  As for whole evolutions on this
backend, a batch is at least once: its work is flushed before its checkpoint is written, and a
claimer that dies (or loses its claim) in between leaves the batch to be done again.
"""
import time

from pymongo import ASCENDING, ReturnDocument

from .. import records
from ..errors import ClaimLost
from . import base


def _range_id(evolution_id, range_no):
    return f'{evolution_id}#{range_no}'


def _range_record(doc, now):
    fields = {name: doc.get(name) for name in records.RangeRecord._fields if name != 'now'}
    for name in ('items_done', 'batches_done', 'attempts', 'claim_generation'):
        fields[name] = fields[name] or 0
    return records.RangeRecord(**fields, now=now)


class MingRanges:
    """``Backend``'s range methods for :class:`~.ming.MingBackend`."""

    @property
    def _ranges(self):
        return self._collection(base.RANGES_TABLE)

    def read_ranges(self, evolution_id=None):
        query = {} if evolution_id is None else {'evolution_id': evolution_id}
        with self._guard():
            if not self._exists(base.RANGES_TABLE):
                return []
            docs = list(self._ranges.find(query))
        now = time.time()
        docs.sort(key=lambda doc: (doc['evolution_id'], doc['range_no']))
        return [_range_record(doc, now) for doc in docs]

    def prepare_ranges(self, lease, evolution_id, ranges):
        with self._guard():
            self._fence(lease, time.time())
            if ranges is not None:
                self._ranges.delete_many({'evolution_id': evolution_id})
                if ranges:
                    self._ranges.insert_many([
                        {'_id': _range_id(evolution_id, number), 'evolution_id': evolution_id,
                         'range_no': number, 'after_key': after, 'upto_key': upto,
                         'checkpoint': None, 'state': records.RANGE_PENDING, 'owner': None,
                         'claim_generation': 0, 'claimed_at': None, 'expires_at': None,
                         'items_done': 0, 'batches_done': 0, 'batch_size': None,
                         'attempts': 0, 'error': None, 'finished_at': None}
                        for number, (after, upto) in enumerate(ranges)])
            else:
                self._ranges.update_many(
                    {'evolution_id': evolution_id, 'state': records.RANGE_FAILED},
                    {'$set': {'state': records.RANGE_PENDING, 'owner': None,
                              'expires_at': None, 'error': None, 'finished_at': None}})
        return self.read_ranges(evolution_id)

    def claim_range(self, evolution_id, owner, lease_seconds):
        with self._guard():
            if not self._exists(base.RANGES_TABLE):
                return None
            now = time.time()
            doc = self._ranges.find_one_and_update(
                {'evolution_id': evolution_id,
                 '$or': [{'state': records.RANGE_PENDING},
                         {'state': records.RANGE_RUNNING, 'expires_at': {'$lt': now}}]},
                {'$set': {'state': records.RANGE_RUNNING, 'owner': owner, 'claimed_at': now,
                          'expires_at': now + lease_seconds},
                 '$inc': {'claim_generation': 1, 'attempts': 1}},
                sort=[('range_no', ASCENDING)], return_document=ReturnDocument.AFTER)
        if doc is None:
            return None
        return records.RangeClaim(evolution_id, doc['range_no'], owner, doc['claim_generation'],
                                  lease_seconds, doc.get('after_key'), doc.get('upto_key'),
                                  doc.get('checkpoint'), doc.get('batch_size'), doc['attempts'])

    def _claim_write(self, claim, update):
        doc = self._ranges.find_one_and_update(
            {'_id': _range_id(claim.evolution_id, claim.range_no), 'owner': claim.owner,
             'claim_generation': claim.claim_generation, 'state': records.RANGE_RUNNING},
            update, projection={'_id': True})
        if doc is None:
            raise ClaimLost(f'range {claim.range_no} of {claim.evolution_id!r} is no longer '
                            f'claimed by {claim.owner} (claim {claim.claim_generation})')

    def run_range_batch(self, claim, work):
        # Fenced before the work too (renewing the claim): a claim lost since the last batch
        # starts nothing.
        with self._guard():
            self._claim_write(claim, {'$set': {'expires_at': time.time() + claim.lease_seconds}})
        try:
            # Under the guard: claimers of one process (threads) on MIM would otherwise flush
            # into it at the same time (on MongoDB the guard is a no-op).
            with self._guard():
                checkpoint = work()
                if self.session is not None:
                    self._flush_session()
        finally:
            if self.session is not None:
                self._clear_session()
        now = time.time()
        done = checkpoint.exhausted
        with self._guard():
            self._claim_write(claim, {
                '$set': {'checkpoint': checkpoint.cursor, 'batch_size': checkpoint.batch_size,
                         'expires_at': now + claim.lease_seconds,
                         'state': records.RANGE_DONE if done else records.RANGE_RUNNING,
                         'finished_at': now if done else None},
                '$inc': {'items_done': checkpoint.items, 'batches_done': 1}})

    def release_range(self, claim):
        return self._end_claim(claim, {'state': records.RANGE_PENDING, 'owner': None,
                                       'expires_at': None})

    def fail_range(self, claim, error):
        return self._end_claim(claim, {'state': records.RANGE_FAILED, 'error': error,
                                       'finished_at': time.time(), 'expires_at': None})

    def _end_claim(self, claim, values):
        try:
            with self._guard():
                self._claim_write(claim, {'$set': values})
        except ClaimLost:
            return False
        return True

    def record_parallel_progress(self, lease, evolution_id, done, batches_done, rate):
        with self._guard():
            now = time.time()
            self._fence(lease, now)
            self._history.update_one(
                {'_id': evolution_id},
                {'$set': {'progress_done': done, 'batches_done': batches_done, 'rate': rate,
                          'progress_at': now}})
