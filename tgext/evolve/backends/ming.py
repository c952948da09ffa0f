"""MongoDB storage, through Ming 0.17 / pymongo 4, on a real server or on Ming's MIM (``mim://``).

The lock is one document per lock name in ``tgext_evolve_lock``; the history is one document per
evolution id in ``tgext_evolve_history``.  Both are keyed by ``_id`` (the lock name, the
evolution id), which MongoDB keeps unique on every deployment and MIM honours too.

What this backend guarantees, and what it does not:

* **One lease holder at a time.**  A free lock is taken by inserting its document (a duplicate
  ``_id`` loses); a released or expired one by a single ``find_one_and_update`` whose filter
  repeats the ``generation`` just read, so of many concurrent takers at most one matches.
* **Fenced writes are check-then-write.**  MongoDB has no transaction spanning two collections
  on a standalone server, and MIM has none at all, so every fenced write first checks
  ``(owner, generation)`` on the lock document and, in the same atomic update, extends the lease
  by its full length; the history write follows as a second step.  Another process can only
  slip in between if this one stalls for longer than a whole lease between the two steps.
* **Evolutions are at-least-once.**  :meth:`MingBackend.apply` flushes the evolution's work
  before it records it ``applied``; a crash or a lost lease in between leaves the record
  ``running``, and the next holder runs the evolution again.  Evolutions on MongoDB must
  therefore be safe to re-run.  If ``work()`` raises, only its *unflushed* changes in the
  application's Ming session are discarded: whatever it already wrote stays written.
* **Times come from the client clock** (``time.time()``): MongoDB offers no server time that
  MIM can also give.  A host whose clock is ahead by S seconds sees every other host's lease
  expire S seconds early.  The holder renews every lease/3, so a lease normally has at least
  two thirds of its length left; keep the clock skew between hosts below lease/3 (5 s with the
  default 15 s lease) so that even a late renewal leaves no host a wrong view of the expiry.
  NTP keeps real skew in milliseconds.
* The lock and history collections are used with ``w='majority'`` and primary reads whatever
  the application's defaults are: an unacknowledged insert could not report the duplicate key
  that tells a loser it lost, a write acknowledged by a lone primary can be rolled back after a
  failover, and a secondary read could miss an evolution that has just been applied.

MIM is in-process memory: two processes never share it, so it only ever serves tests of one
process.  It has no locking either (see ``_mim_lock``).
"""
import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional

from ming import mim
from ming.odm import ThreadLocalODMSession
from pymongo import ASCENDING, ReadPreference, ReturnDocument
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError
from pymongo.write_concern import WriteConcern

from .. import logs, records
from ..errors import LeaseLost
from ..forking import after_fork_in_child
from . import base
from .ming_ranges import MingRanges

if TYPE_CHECKING:
    from .walker import Walker

log = logs.backend


# MIM takes no lock anywhere: two threads of one process (the runner and its heartbeat, or two
# backends standing for two processes in a test) interleaving inside one of its calls lose the
# atomicity of find_one_and_update and of unique inserts, or crash it.  Every MIM call of this
# module therefore runs under this lock; pymongo is thread-safe and never takes it.
_mim_lock = threading.RLock()


@after_fork_in_child
def _new_mim_lock():
    # A MIM lock that another thread of the parent held at the moment of the fork would never
    # be released: that thread does not exist in the child.
    global _mim_lock
    _mim_lock = threading.RLock()

# createIndexes racing with itself on a collection that does not exist yet can fail, depending
# on the server version, because the implicit collection creation or the index build of another
# caller won: these codes mean "someone else is creating the same thing, try again".
_RACING_CREATE_CODES = frozenset((
    48,  # NamespaceExists
    112,  # WriteConflict
    276,  # IndexBuildAlreadyInProgress
))
_CREATE_ATTEMPTS = 5

#: The field of each store that a unique index covers.  ``_id`` already makes lock names and
#: evolution ids unique; these make the documented key fields unique for anyone who queries by
#: them, and creating them is also what creates the collections on a real server.  The schema
#: store has none: its one document is found by ``_id``.
_KEY_FIELDS = {base.LOCK_TABLE: 'name', base.HISTORY_TABLE: 'evolution_id'}

_HISTORY_FIELDS = records.HistoryRecord._fields
# Every history document carries every field, as the SQL table does; ``progress_at`` (when the
# progress was last reported) exists only here.
_BLANK_HISTORY = {**dict.fromkeys(_HISTORY_FIELDS), 'attempts': 0, 'progress_at': None}
_NOT_PROGRESSED = {'progress_done': None, 'progress_total': None, 'progress_at': None}


class MingBackend(MingRanges, base.Backend):
    """The storage contract on MongoDB.

    ``db`` is the application's pymongo ``Database`` or ``ming.mim.Database``
    (``config['tg.app_globals'].ming_datastore.db``); ``session`` is the application's Ming
    session (``ThreadLocalODMSession`` or ``ODMSession``), flushed by :meth:`apply` after the
    evolution's work and cleared afterwards, or None when evolutions write through pymongo.
    """

    atomic_apply = False

    def __init__(self, db, session=None):
        self.db = db
        self.session = session
        self._is_mim = self.process_local = isinstance(db, mim.Database)

    # Collections are looked up on every call rather than kept: MIM forgets a dropped collection
    # object, so one kept across a test's drop would no longer be the one the database holds.
    @property
    def _locks(self):
        return self._collection(base.LOCK_TABLE)

    @property
    def _history(self):
        return self._collection(base.HISTORY_TABLE)

    def _collection(self, name):
        return self.db[name].with_options(read_preference=ReadPreference.PRIMARY,
                                          write_concern=WriteConcern(w='majority'))

    def _guard(self):
        return _mim_lock if self._is_mim else contextlib.nullcontext()

    # --- set-up --------------------------------------------------------------------------------

    def ensure_storage(self) -> None:
        self._create_stores(_KEY_FIELDS)

    def _create_stores(self, names):
        for name in names:
            if name not in _KEY_FIELDS:
                continue  # created by its first document
            for attempt in range(1, _CREATE_ATTEMPTS + 1):
                try:
                    with self._guard():
                        self._collection(name).create_index([(_KEY_FIELDS[name], ASCENDING)],
                                                            unique=True)
                    break
                except OperationFailure as exc:
                    if exc.code not in _RACING_CREATE_CODES or attempt == _CREATE_ATTEMPTS:
                        raise
                    time.sleep(0.05 * attempt)

    def _exists(self, name):
        # MIM creates a collection merely by being asked for it: reading must not create one.
        # A real server creates nothing on a read, and is not asked.
        return not self._is_mim or name in self.db.list_collection_names()

    def read_storage_version(self) -> int:
        with self._guard():
            record = (self._collection(base.SCHEMA_TABLE).find_one({'_id': base.STORAGE_RECORD})
                      if self._exists(base.SCHEMA_TABLE) else None)
            names = set(self.db.list_collection_names())
        if record is not None:
            return record['version']
        return 1 if names & set(_KEY_FIELDS) else 0

    def storage_is_current(self, version):
        from .upgrades import upgrades_after
        return not upgrades_after(version)

    def upgrade_storage(self, lease: records.Lease) -> bool:
        from .upgrades import upgrades_after  # only the lock holder needs the steps
        for step in upgrades_after(self.read_storage_version()):
            # New fields need nothing: a document without one reads as None, and new documents
            # get every field from _BLANK_HISTORY.
            self._create_stores(step.new_stores)
            with self._guard():
                self._fence(lease, time.time())
                self._record_version(step, lease.owner)
            log.info('storage version %d: %s (by %s)', step.version, step.description,
                     lease.owner)
        return True

    def _record_version(self, step, owner):
        """Compare-and-set from the version before ``step`` (no document: version 1)."""
        schema = self._collection(base.SCHEMA_TABLE)
        values = {'version': step.version, 'upgraded_at': time.time(), 'upgraded_by': owner}
        if step.version - 1 == 1:
            try:
                schema.insert_one({'_id': base.STORAGE_RECORD, **values})
                return
            except DuplicateKeyError:
                pass
        schema.update_one({'_id': base.STORAGE_RECORD, 'version': step.version - 1},
                          {'$set': values})

    def now(self) -> float:
        return time.time()

    # dispose_after_fork(): nothing to do.  The pymongo client belongs to the application's Ming
    # datastore, not to this backend, and pymongo >= 4.3 resets its own pools in a forked child;
    # the MIM lock is reset by _new_mim_lock().

    # close(): nothing to do, the connections are the application's.

    def is_transient(self, error: BaseException) -> bool:
        # ConnectionFailure covers network errors, server selection timeouts and a primary that
        # stepped down; the server labels the other errors that a retry can cure.
        return isinstance(error, ConnectionFailure) or (
            isinstance(error, PyMongoError) and error.has_error_label('RetryableWriteError'))

    # --- reading -------------------------------------------------------------------------------

    def read_history(self, *, errors: bool = True,
                     batches: bool = False) -> Mapping[str, records.HistoryRecord]:
        fields = [f for f in records.HISTORY_V1_FIELDS if errors or f != 'error']
        if batches:
            fields += records.HISTORY_BATCH_FIELDS
        with self._guard():
            if not self._exists(base.HISTORY_TABLE):
                return {}
            return {doc['_id']: _history_record(doc)
                    for doc in self._history.find({}, projection=dict.fromkeys(fields, True))}

    def read_lock(self, name: str = records.DEFAULT_LOCK_NAME) -> Optional[records.LockRecord]:
        with self._guard():
            doc = self._locks.find_one({'_id': name}) if self._exists(base.LOCK_TABLE) else None
        return None if doc is None else _lock_record(doc, time.time())

    def read_legacy(self) -> Optional[records.LegacyState]:
        with self._guard():
            # Looking the collection up first: MIM creates a collection merely by being asked
            # for it, and reading must not leave an empty ``tgext_evolve`` behind.
            if base.LEGACY_TABLE not in self.db.list_collection_names():
                return None
            legacy = self.db[base.LEGACY_TABLE].with_options(
                read_preference=ReadPreference.PRIMARY)
            version = legacy.find_one({'type': 'version'})
            lock = legacy.find_one({'type': 'lock'})
        if version is None and lock is None:
            return None
        holder = None if lock is None else lock.get('process')
        return records.LegacyState(version=None if version is None else version.get('current'),
                                lock_holder=None if holder is None else str(holder))

    # --- the lease -----------------------------------------------------------------------------

    def acquire(self, owner: str, lease_seconds: float,
                name: str = records.DEFAULT_LOCK_NAME) -> Optional[records.Lease]:
        with self._guard():
            now = time.time()
            taken = {'owner': owner, 'acquired_at': now, 'renewed_at': now,
                     'expires_at': now + lease_seconds, 'released_by': None}
            try:
                self._locks.insert_one({'_id': name, 'name': name, 'generation': 1, **taken})
                return records.Lease(name, owner, 1, lease_seconds)
            except DuplicateKeyError:
                pass
            current = self._locks.find_one({'_id': name})
            if current is None or _lock_record(current, now).held:
                return None
            # No upsert: MIM asserts on an upsert whose filter has operators, and the document
            # exists anyway.  Repeating the generation read above is the compare-and-set.
            generation = current['generation'] + 1
            won = self._locks.find_one_and_update(
                {'_id': name, 'generation': current['generation'],
                 '$or': [{'owner': None}, {'expires_at': {'$lt': now}}]},
                {'$set': {**taken, 'generation': generation}},
                projection={'_id': True})
        if won is None:
            return None
        if current['owner'] is not None:
            log.warning('lock %r: the lease of %s expired %.1f s ago, taken over by %s',
                        name, current['owner'], now - current['expires_at'], owner)
        return records.Lease(name, owner, generation, lease_seconds)

    def renew(self, lease: records.Lease) -> records.Lease:
        with self._guard():
            self._fence(lease, time.time())
        return lease

    def release(self, lease: records.Lease) -> bool:
        with self._guard():
            released = self._locks.find_one_and_update(
                _held_by(lease), {'$set': {'owner': None, 'released_by': lease.owner}},
                projection={'_id': True})
        return released is not None

    def break_lock(self, broken_by: str, name: str = records.DEFAULT_LOCK_NAME,
                   generation: Optional[int] = None) -> Optional[records.LockRecord]:
        which = {'_id': name} if generation is None else {'_id': name, 'generation': generation}
        with self._guard():
            now = time.time()
            before = self._locks.find_one_and_update(
                which,
                {'$set': {'owner': None, 'released_by': broken_by}, '$inc': {'generation': 1}},
                return_document=ReturnDocument.BEFORE)
        return None if before is None else _lock_record(before, now)

    def _fence(self, lease, now):
        """Check that ``lease`` still holds the lock and extend it, in one atomic update."""
        held = self._locks.find_one_and_update(
            _held_by(lease),
            {'$set': {'renewed_at': now, 'expires_at': now + lease.lease_seconds}},
            projection={'_id': True})
        if held is None:
            raise LeaseLost(f'lock {lease.name!r} is no longer held by {lease.owner} '
                            f'(generation {lease.generation})')

    # --- fenced history writes -----------------------------------------------------------------

    def record_running(self, lease: records.Lease, evolution_id: str,
                       fingerprint: Optional[str] = None) -> records.HistoryRecord:
        with self._guard():
            now = time.time()
            self._fence(lease, now)
            self._write_history(
                evolution_id,
                {'state': records.RUNNING, 'started_at': now, 'finished_at': None,
                 'duration_ms': None, 'owner': lease.owner, 'generation': lease.generation,
                 'error': None, 'fingerprint': fingerprint, **_NOT_PROGRESSED},
                count_attempt=True)
            return self._clear_honoured_requests(evolution_id)

    def apply(self, lease: records.Lease, evolution_id: str, work: Callable[[], None],
              fingerprint: Optional[str] = None,
              final_progress: Optional[Callable[[], Optional[tuple]]] = None
              ) -> records.HistoryRecord:
        # Checked before the work too, so that a lease lost since record_running does not start
        # work that nothing could ever record.
        with self._guard():
            self._fence(lease, time.time())
        try:
            work()
            if self.session is not None:
                self._flush_session()
        finally:
            # Clears the session whatever happened: after a failure its unflushed changes must
            # not reach the database with the next flush, and after a success the objects it
            # tracks would only keep the runner's thread holding memory.
            if self.session is not None:
                self._clear_session()
        finished = {'state': records.APPLIED, 'error': None}
        if fingerprint is not None:
            finished['fingerprint'] = fingerprint
        progress = final_progress() if final_progress is not None else None
        if progress is not None:
            finished.update(progress_done=progress[0], progress_total=progress[1])
        return self._finish(lease, evolution_id, finished)

    def record_failure(self, lease: records.Lease, evolution_id: str,
                       error: str) -> records.HistoryRecord:
        return self._finish(lease, evolution_id, {'state': records.FAILED, 'error': error})

    def record_progress(self, lease: records.Lease, evolution_id: str, done: int,
                        total: Optional[int]) -> None:
        with self._guard():
            now = time.time()
            self._fence(lease, now)
            self._history.update_one(
                {'_id': evolution_id, 'state': records.RUNNING},
                {'$set': {'progress_done': done, 'progress_total': total, 'progress_at': now}})

    def record_states(self, lease: records.Lease, evolution_ids: Iterable[str], state: str) -> None:
        records.require_done_state(state)
        evolution_ids = list(dict.fromkeys(evolution_ids))
        with self._guard():
            now = time.time()
            self._fence(lease, now)
            done = {doc['_id'] for doc in self._history.find(
                {'_id': {'$in': evolution_ids}, 'state': {'$in': sorted(records.DONE_STATES)}},
                projection={'_id': True})}
            for evolution_id in evolution_ids:
                if evolution_id not in done:
                    self._write_history(evolution_id, {
                        **_BLANK_HISTORY, 'state': state, 'started_at': now,
                        'finished_at': now, 'duration_ms': 0.0,
                        'owner': lease.owner, 'generation': lease.generation})

    def delete_history(self, lease: records.Lease, evolution_ids: Iterable[str]) -> int:
        evolution_ids = list(evolution_ids)
        with self._guard():
            self._fence(lease, time.time())
            return self._history.delete_many({'_id': {'$in': evolution_ids}}).deleted_count

    def _finish(self, lease, evolution_id, fields):
        """Fence, then record the end of a run with its duration since ``started_at``."""
        with self._guard():
            now = time.time()
            self._fence(lease, now)
            running = self._history.find_one({'_id': evolution_id},
                                             projection={'started_at': True})
            started_at = None if running is None else running.get('started_at')
            duration_ms = 0.0 if started_at is None else max(0.0, (now - started_at) * 1000.0)
            return self._write_history(evolution_id, {
                **fields, 'finished_at': now, 'duration_ms': duration_ms,
                'owner': lease.owner, 'generation': lease.generation})

    def _write_history(self, evolution_id, fields, count_attempt=False):
        """Upsert one history document with ``fields`` and return it as a HistoryRecord.

        The filter is a plain equality on ``_id``, the only kind of upsert filter MIM accepts.
        A document created here gets every other field from ``_BLANK_HISTORY``.
        """
        update = {'$set': {**fields, 'evolution_id': evolution_id}}
        on_insert = {key: value for key, value in _BLANK_HISTORY.items()
                     if key not in update['$set']}
        if count_attempt:
            update['$inc'] = {'attempts': 1}
            del on_insert['attempts']
        # MongoDB before 5.0 rejects an empty operator.
        if on_insert:
            update['$setOnInsert'] = on_insert
        doc = self._history.find_one_and_update({'_id': evolution_id}, update, upsert=True,
                                                return_document=ReturnDocument.AFTER)
        return _history_record(doc)

    # --- batched evolutions --------------------------------------------------------------------

    def walker(self, evolution_id: str, collection: Any) -> 'Walker':
        from .ming_walker import MingWalker
        with self._guard():
            return _GuardedWalker(MingWalker(evolution_id, collection, self.session),
                                  self._guard)

    def in_session(self, work: Callable[[], Any]) -> Any:
        try:
            return work()
        finally:
            if self.session is not None:
                self._clear_session()

    def record_batches_running(self, lease: records.Lease, evolution_id: str, batch_size: int,
                               total: Optional[int], fingerprint: Optional[str] = None,
                               audit: Optional[base.AuditFor] = None) -> records.HistoryRecord:
        with self._guard():
            now = time.time()
            self._fence(lease, now)
            doc = self._history.find_one({'_id': evolution_id}) or {}
            resuming = bool(doc) and doc.get('state') not in records.DONE_STATES

            def kept(name, otherwise):
                value = doc.get(name) if resuming else None
                return otherwise if value is None else value

            self._write_history(evolution_id, {
                'state': records.RUNNING, 'started_at': kept('started_at', now),
                'finished_at': None, 'duration_ms': None, 'error': None, 'progress_at': None,
                'owner': lease.owner, 'generation': lease.generation, 'fingerprint': fingerprint,
                'checkpoint': kept('checkpoint', None), 'rate': kept('rate', None),
                'progress_done': kept('progress_done', 0),
                'batches_done': kept('batches_done', 0),
                'progress_total': kept('progress_total', total),
                'batch_size': kept('batch_size', batch_size)},
                count_attempt=True)
            return self._audited(self._clear_honoured_requests(evolution_id), audit)

    def run_batch(self, lease: records.Lease, evolution_id: str,
                  work: Callable[[], base.BatchCheckpoint],
                  audit: Optional[base.AuditFor] = None,
                  renew: bool = True) -> records.HistoryRecord:
        # Fenced before the work too: a lease lost since the last batch starts nothing.  Always
        # renewing: the fence is a findAndModify either way.
        with self._guard():
            self._fence(lease, time.time())
        try:
            checkpoint = work()
            if self.session is not None:
                self._flush_session()
        finally:
            if self.session is not None:
                self._clear_session()  # unflushed changes of a failed batch must not leak
        with self._guard():
            return self._audited(self._write_checkpoint(lease, evolution_id, checkpoint), audit)

    def _write_checkpoint(self, lease, evolution_id, checkpoint):
        # At least once: the batch's writes are flushed, and a process that dies before this
        # write leaves the checkpoint where it was, so the next holder does the batch again.
        now = time.time()
        self._fence(lease, now)
        written = {'checkpoint': checkpoint.cursor, 'batch_size': checkpoint.batch_size,
                   'rate': checkpoint.rate, 'progress_at': now, 'owner': lease.owner,
                   'generation': lease.generation}
        if checkpoint.total is not None:
            written['progress_total'] = checkpoint.total
        doc = self._history.find_one_and_update(
            {'_id': evolution_id},
            {'$set': written,
             '$inc': {'progress_done': checkpoint.items, 'batches_done': 1}},
            return_document=ReturnDocument.AFTER)
        if doc is None:
            raise LookupError(f'no history record for {evolution_id!r}: record_batches_running '
                              f'first')
        if checkpoint.exhausted:
            return self._finish(lease, evolution_id, {'state': records.APPLIED, 'error': None})
        paused = self._history.find_one_and_update(
            {'_id': evolution_id, 'requested': records.PAUSE},
            {'$set': {'state': records.PAUSED, 'requested': None, 'finished_at': now}},
            return_document=ReturnDocument.AFTER)
        return _history_record(paused or doc)

    def record_paused(self, lease: records.Lease, evolution_id: str) -> records.HistoryRecord:
        with self._guard():
            self._fence(lease, time.time())
            return self._write_history(evolution_id, {
                'state': records.PAUSED, 'requested': None, 'requested_by': None,
                'requested_at': None, 'owner': lease.owner, 'generation': lease.generation})

    def _clear_honoured_requests(self, evolution_id):
        """Starting an attempt honours a ``retry`` or ``resume`` request (cleared), never a
        ``pause`` one: a pause that arrived after the plan was read stops the first batch."""
        self._history.update_one(
            {'_id': evolution_id, 'requested': {'$in': [records.RETRY, records.RESUME]}},
            {'$set': {'requested': None, 'requested_by': None, 'requested_at': None}})
        return _history_record(self._history.find_one({'_id': evolution_id}))

    # --- operators' requests and the audit trail -----------------------------------------------

    @property
    def _audit(self):
        return self._collection(base.AUDIT_TABLE)

    def record_request(self, evolution_id: str, request: str, requested_by: str,
                       seen_state: Optional[str]) -> Optional[records.HistoryRecord]:
        with self._guard():
            now = time.time()
            if seen_state is None:
                if request != records.PAUSE:
                    return None
                doc = {**_BLANK_HISTORY, '_id': evolution_id, 'evolution_id': evolution_id,
                       'state': records.PAUSED, 'requested_by': requested_by,
                       'requested_at': now}
                try:
                    self._history.insert_one(doc)  # a duplicate _id: it started meanwhile
                except DuplicateKeyError:
                    return None
                return _history_record(doc)
            doc = self._history.find_one_and_update(
                {'_id': evolution_id, 'state': seen_state, 'requested': {'$ne': request}},
                {'$set': {'requested': request, 'requested_by': requested_by,
                          'requested_at': now}},
                return_document=ReturnDocument.AFTER)
        return None if doc is None else _history_record(doc)

    def record_audit(self, evolution_id: Optional[str], action: str, actor: Optional[str],
                     host: Optional[str], detail: Optional[str] = None,
                     error: Optional[str] = None) -> None:
        with self._guard():
            self._append_audit(evolution_id, action, actor, host, detail, error)

    def _append_audit(self, evolution_id, action, actor, host, detail=None, error=None):
        # _id: an ObjectId, whose leading seconds and counter keep the insertion order.
        self._audit.insert_one({
            'evolution_id': evolution_id, 'at': time.time(), 'action': action, 'actor': actor,
            'host': host, 'detail': base.audit_text(detail), 'error': base.audit_text(error)})

    def _audited(self, record, audit):
        """``record``, once the line ``audit(record)`` gives (if any) is appended, right after
        the history write (MongoDB has no transaction to share)."""
        line = audit(record) if audit is not None else None
        if line is not None:
            self._append_audit(record.evolution_id, line.action, line.actor, line.host,
                               line.detail)
        return record

    def read_audit(self, evolution_id: Optional[str] = None) -> list:
        query = {} if evolution_id is None else {'evolution_id': evolution_id}
        with self._guard():
            if not self._exists(base.AUDIT_TABLE):
                return []
            docs = list(self._audit.find(query, sort=[('at', ASCENDING), ('_id', ASCENDING)]))
        return [records.AuditEntry(id=str(doc['_id']), evolution_id=doc.get('evolution_id'),
                                   at=doc['at'], action=doc['action'], actor=doc.get('actor'),
                                   host=doc.get('host'), detail=doc.get('detail'),
                                   error=doc.get('error')) for doc in docs]

    # --- the application's Ming session --------------------------------------------------------

    def _flush_session(self):
        # A ThreadLocalODMSession's flush_all() flushes every thread-local session of this
        # thread, for evolutions that use more than one; ContextualODMSession.flush_all() needs
        # a context this backend does not know, so every other kind flushes itself only.
        if isinstance(self.session, ThreadLocalODMSession):
            self.session.flush_all()
        else:
            self.session.flush()

    def _clear_session(self):
        if isinstance(self.session, ThreadLocalODMSession):
            self.session.close_all()
        else:
            self.session.close()


def _held_by(lease):
    return {'_id': lease.name, 'owner': lease.owner, 'generation': lease.generation}


def _lock_record(doc, now):
    return records.LockRecord(
        name=doc.get('name', doc['_id']), owner=doc.get('owner'), generation=doc['generation'],
        acquired_at=doc.get('acquired_at'), renewed_at=doc.get('renewed_at'),
        expires_at=doc.get('expires_at'), released_by=doc.get('released_by'), now=now)


def _history_record(doc):
    fields = {key: doc[key] for key in _HISTORY_FIELDS if doc.get(key) is not None}
    fields['evolution_id'] = doc['_id']
    return records.HistoryRecord(**fields)


class _GuardedWalker:
    """A :class:`~.walker.Walker` whose every database call holds the backend's MIM guard (MIM is not
    thread-safe; on MongoDB the guard is a no-op)."""

    def __init__(self, walker, guard):
        self._walker = walker
        self._guard = guard
        self.evolution_id = walker.evolution_id

    def next_batch(self, cursor, size, upper=None):
        with self._guard():
            return self._walker.next_batch(cursor, size, upper)

    def count(self, after=None):
        with self._guard():
            return self._walker.count(after)

    def split(self, n):
        with self._guard():
            return self._walker.split(n)
