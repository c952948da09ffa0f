"""The storage contract every backend implements.

A backend owns three stores, named the same on every database:

``tgext_evolve_lock``
    one record per lock name: ``name``, ``owner``, ``generation`` (+1 on every acquisition,
    never reset), ``acquired_at``, ``renewed_at``, ``expires_at``, ``released_by``.
``tgext_evolve_history``
    one record per evolution id: ``evolution_id``, ``state``, ``attempts``, ``started_at``,
    ``finished_at``, ``duration_ms``, ``owner``, ``generation``, ``error``, ``progress_done``,
    ``progress_total``, ``fingerprint``.
``tgext_evolve_schema``
    the version of these stores: one record, ``name = 'storage'``, with ``version``,
    ``upgraded_at`` and ``upgraded_by`` (an owner string).  Lock and history stores without it
    are version 1 (what 1.0's development versions created).

Times are float seconds since the epoch.  SQL backends take them from the database clock so
that hosts with skewed clocks cannot steal or extend a lease; the Ming backend uses the client
clock.

Every write to either store, except acquiring a free or expired lock, is *fenced*: it happens
only while ``(owner, generation)`` of the given :class:`Lease` still matches the lock record,
checked in the same atomic step as the write.  A fenced write that finds the lock taken raises
:class:`~tgext.evolve.errors.LeaseLost` and changes nothing.

The runner (``tgext.evolve.runner``) is the only caller during normal operation; the CLI uses
the same methods.  Backends know nothing about HTTP, TurboGears requests or the runner's state.
"""
# Annotations stay unevaluated: this module is loaded while the application is created, and
# evaluating two dozen typing expressions there is start-up time spent for nothing.
from __future__ import annotations

import abc
from typing import (TYPE_CHECKING, Any, Callable, Iterable, List, Mapping, NamedTuple, Optional,
                    Sequence, Tuple)

from ..records import (DEFAULT_LOCK_NAME, AuditEntry, HistoryRecord, Lease, LegacyState,
                       LockRecord, RangeClaim, RangeRecord)

if TYPE_CHECKING:  # the walkers are loaded by the backends that make them, when they do
    from .walker import Walker

#: The stores, named the same on every database.
LOCK_TABLE = 'tgext_evolve_lock'
HISTORY_TABLE = 'tgext_evolve_history'
SCHEMA_TABLE = 'tgext_evolve_schema'
AUDIT_TABLE = 'tgext_evolve_audit'  # append-only: every attempt and every operator action
RANGES_TABLE = 'tgext_evolve_ranges'  # key ranges of parallel evolutions, each claimed by lease
LEGACY_TABLE = 'tgext_evolve'
#: The name of the storage version's record in :data:`SCHEMA_TABLE`.
STORAGE_RECORD = 'storage'


class Backend(abc.ABC):
    """One database's implementation of the storage contract.

    Implementations must be safe to call from several threads of one process (the runner's
    thread, its heartbeat timer, the CLI) and from many processes at once.  Each method is one
    short transaction unless it says otherwise; none holds a database lock while it returns.
    """

    #: Whether :meth:`apply` commits the evolution's work and its history row atomically.
    atomic_apply: bool = False

    #: Whether a collection may be counted in a thread of its own while the first batches run:
    #: its readers never hold up its writers (PostgreSQL, MySQL / MariaDB).  A count of a big
    #: table takes seconds that the batches (and, for a blocking evolution, the site) need not
    #: wait.
    counts_aside: bool = False

    #: A database that lives and dies with this process (Ming's ``mim://``, SQLite in memory):
    #: no other process, not even the next ``gearbox evolve`` call, ever sees what it holds.
    process_local: bool = False

    # --- set-up --------------------------------------------------------------------------------

    @abc.abstractmethod
    def ensure_storage(self) -> None:
        """Create the stores (and their indexes) that are missing, as the latest storage
        version defines them: an empty database gets the latest storage directly.

        Idempotent, and safe when many processes call it at the same moment on an empty
        database: every caller returns normally once the stores exist.  It never alters a
        store that exists, nor records a version (:meth:`upgrade_storage` does both), so it
        may run at any time, also while another process holds the lock.
        """

    @abc.abstractmethod
    def read_storage_version(self) -> int:
        """The recorded version of the stores: 1 for lock and history stores without a
        record, 0 when there are no stores at all."""

    @abc.abstractmethod
    def storage_is_current(self, version: int) -> bool:
        """Whether storage at ``version`` (as :meth:`read_storage_version` read it) is at this
        release's version: nothing to create, nothing to upgrade.  A backend method, not the
        runner's: the steps are loaded by a process with something to write only, inside a
        call that a fork waits for (a module half imported when the process forks stays half
        imported in the child)."""

    @abc.abstractmethod
    def upgrade_storage(self, lease: Lease) -> bool:
        """Bring the stores to ``STORAGE_VERSION``, one step of :data:`.upgrades.UPGRADES` at a
        time.

        Only for the holder of the lock (fenced: LeaseLost if ``lease`` is stale), so that a
        step that alters a store never waits behind, nor blocks, an evolution's transaction.
        Each step is idempotent (what exists already is skipped, so on storage that
        :meth:`ensure_storage` created at the latest version a step only records its version;
        what a concurrent creator added meanwhile is tolerated) and records its version with a
        compare-and-set from the version before it.  A step waits for a database lock on a store only briefly (readers
        queue behind a waiting ALTER): when that wait runs out it returns False, nothing
        recorded, to be tried again at the next acquisition.  True once the stores are current.
        """

    @abc.abstractmethod
    def now(self) -> float:
        """The clock that decides lease expiry (the database's where it has one)."""

    def dispose_after_fork(self) -> None:
        """Forget connections inherited from a parent process without closing them.

        A backend that holds connections registers this with
        ``forking.after_fork_in_child``, which calls it once in every forked child.
        """

    def close(self) -> None:
        """Release the backend's own connections (not the application's)."""

    def is_transient(self, error: BaseException) -> bool:
        """True when ``error`` means the connection died (retry later), not that an evolution
        is wrong (record it as failed)."""
        return False

    def is_busy(self, error: BaseException) -> bool:
        """True when ``error`` means another writer kept the database busy past the driver's
        wait (SQLite's single writer): contention to retry at the next poll, not an outage."""
        return False

    # --- reading (never fenced, never locking, never creating) ---------------------------------

    @abc.abstractmethod
    def read_history(self, *, errors: bool = True,
                     batches: bool = False) -> Mapping[str, HistoryRecord]:
        """Every history record, keyed by evolution id, in one query; empty when the history
        store does not exist yet.

        Reads what storage version 1 has; without ``errors`` no traceback text (``error`` is
        None: what the runner polls with, so that a stored traceback is never transferred
        again and again); with ``batches`` also the batch fields of storage version 3, which
        only a caller that knows the storage has them may ask for.
        """

    @abc.abstractmethod
    def read_lock(self, name: str = DEFAULT_LOCK_NAME) -> Optional[LockRecord]:
        """The lock record, or None when it was never acquired (or its store does not exist
        yet).  Reads only what storage version 1 has."""

    @abc.abstractmethod
    def read_legacy(self) -> Optional[LegacyState]:
        """The 0.0.5 state, or None when its table/collection does not exist or is empty."""

    # --- the lease -----------------------------------------------------------------------------

    @abc.abstractmethod
    def acquire(self, owner: str, lease_seconds: float,
                name: str = DEFAULT_LOCK_NAME) -> Optional[Lease]:
        """Take the lock if it is free, released or expired; return None if someone holds it.

        Inserts the record (generation 1) when missing, otherwise takes it over with one
        compare-and-set that succeeds only while the record is released or expired; either way
        ``generation`` is incremented and ``acquired_at``/``renewed_at``/``expires_at`` are set
        from :meth:`now`.  Of many concurrent callers, at most one gets a Lease.
        """

    @abc.abstractmethod
    def renew(self, lease: Lease) -> Lease:
        """Push ``expires_at`` to now + lease and return the lease to use from now on (the same
        one, for both backends); raise LeaseLost if the lock changed hands.

        One statement: it runs every lease/3 for as long as evolutions run.
        """

    @abc.abstractmethod
    def release(self, lease: Lease) -> bool:
        """Release the lock (owner cleared, ``released_by`` set to the releasing owner,
        generation kept); False if it had changed hands."""

    @abc.abstractmethod
    def break_lock(self, broken_by: str, name: str = DEFAULT_LOCK_NAME,
                   generation: Optional[int] = None) -> Optional[LockRecord]:
        """Release the lock whoever holds it, recording ``broken_by``; return what was broken.

        The operator's last resort (``gearbox evolve release-lock --force``): the generation is
        still incremented so the previous holder's fenced writes fail from now on.  With
        ``generation``, only the lock of that generation is broken (compare-and-set): None if
        it changed hands meanwhile.
        """

    # --- fenced history writes -----------------------------------------------------------------

    @abc.abstractmethod
    def record_running(self, lease: Lease, evolution_id: str,
                       fingerprint: Optional[str] = None) -> HistoryRecord:
        """Commit ``state=running``, ``attempts+1``, ``started_at``, owner and generation."""

    @abc.abstractmethod
    def apply(self, lease: Lease, evolution_id: str, work: Callable[[], None],
              fingerprint: Optional[str] = None,
              final_progress: Optional[Callable[[], Optional[tuple]]] = None) -> HistoryRecord:
        """Run ``work()`` and record the evolution ``applied``.

        The work's writes through the application's session, the fencing check and the
        ``applied`` history record are committed together where the database allows it
        (:attr:`atomic_apply`).  If ``work()`` raises, its writes are rolled back and the
        exception propagates unchanged; if the fencing check fails, everything is rolled back
        and LeaseLost is raised.  Nothing is recorded as failed here: see
        :meth:`record_failure`.  ``final_progress()``, called once ``work()`` returned, gives
        the last ``(done, total)`` the evolution reported (or None): recorded with ``applied``,
        not the last throttled progress write.
        """

    @abc.abstractmethod
    def record_failure(self, lease: Lease, evolution_id: str, error: str) -> HistoryRecord:
        """Commit ``state=failed`` with the traceback text and ``finished_at``/``duration_ms``."""

    @abc.abstractmethod
    def record_progress(self, lease: Lease, evolution_id: str, done: int,
                        total: Optional[int]) -> None:
        """Store the progress of a running evolution; nothing once it is no longer running (a
        late, throttled write must not overwrite the final figure)."""

    @abc.abstractmethod
    def record_states(self, lease: Lease, evolution_ids: Iterable[str], state: str) -> None:
        """Record evolutions as done without running them (``adopted`` or ``marked``).

        Ids already recorded as done keep their record; other records are replaced.
        """

    @abc.abstractmethod
    def delete_history(self, lease: Lease, evolution_ids: Iterable[str]) -> int:
        """Forget history records (``unmark``, ``retry``); return how many were deleted."""

    # --- batched evolutions (storage version 3) ------------------------------------------------

    @abc.abstractmethod
    def walker(self, evolution_id: str, collection: Any) -> Walker:
        """A :class:`~.walker.Walker` over what ``BatchEvolution.collection()`` returned,
        through the application's session; ConfigurationError, naming the evolution, for a
        collection that cannot be walked by key."""

    @abc.abstractmethod
    def in_session(self, work: Callable[[], Any]) -> Any:
        """Run ``work()`` (reads through the application's session, such as a walker's
        ``count()``) in a transaction of its own that is rolled back; return its result."""

    @abc.abstractmethod
    def record_batches_running(self, lease: Lease, evolution_id: str, batch_size: int,
                               total: Optional[int], fingerprint: Optional[str] = None,
                               audit: Optional[AuditFor] = None) -> HistoryRecord:
        """:meth:`record_running` for a batched evolution, keeping its checkpoint.

        ``state=running``, ``attempts+1``, owner and generation as :meth:`record_running`
        writes them; but the checkpoint, the items and batches done are kept (a resumed
        evolution continues from them); ``batch_size`` and ``progress_total`` are set only
        where none is recorded yet; ``started_at`` only on the first attempt, so that the
        duration spans the whole evolution; an operator's ``resume`` or ``retry`` request is
        cleared (honoured).  ``audit(record)``, given the record as written, returns the
        :class:`AuditLine` to append with it (or None), in the same write.
        """

    @abc.abstractmethod
    def run_batch(self, lease: Lease, evolution_id: str, work: Callable[[], BatchCheckpoint],
                  audit: Optional[AuditFor] = None, renew: bool = True) -> HistoryRecord:
        """Run one batch's ``work()`` and commit it with its checkpoint.

        ``work()`` returns the :class:`BatchCheckpoint` to record.  Its writes through the
        application's session, the fencing check and the checkpoint commit together where the
        database allows it (:attr:`atomic_apply`).  The fencing check renews the lease when
        ``renew`` is true; otherwise (a backend may renew anyway) it only checks that the lease
        is still this holder's and keeps it so until the commit (a takeover waits for it, or
        the batch sees it and rolls back).  A batch is then
        never applied twice, whatever happens to this process.  The checkpoint adds the
        batch's items to ``progress_done`` and one to ``batches_done``; an ``exhausted``
        checkpoint records the evolution ``applied``; a pending ``pause`` request turns the
        state to ``paused`` in the same write (and is cleared).  If ``work()`` raises its
        writes are rolled back and the exception propagates; a failed fencing check raises
        LeaseLost with everything rolled back.  Returns the record as committed.
        ``audit(record)``, given the record as written, returns the :class:`AuditLine` to
        commit with it (or None): the end of an attempt (``applied``, ``paused``) is then in
        the audit trail exactly when it is in the history.
        """

    @abc.abstractmethod
    def record_paused(self, lease: Lease, evolution_id: str) -> HistoryRecord:
        """Honour a ``pause`` request for an evolution that has not started (or is between
        attempts): ``state=paused``, the request cleared, the checkpoint kept."""

    # --- parallel evolutions: key ranges (storage version 3) ------------------------------------
    #
    # The coordinator (the lock holder) writes ranges fenced by its lease; claimers (any
    # process) write a range fenced by their claim on it: ``(owner, claim_generation)``
    # checked in the same atomic step as the write, ClaimLost when it does not match.

    @abc.abstractmethod
    def read_ranges(self, evolution_id: Optional[str] = None) -> List[RangeRecord]:
        """The ranges of one evolution (or of all), ordered by evolution id and range number,
        each with the expiry clock; empty when there are none (or no store yet)."""

    @abc.abstractmethod
    def prepare_ranges(self, lease: Lease, evolution_id: str,
                       ranges: Optional[Sequence[Tuple[Optional[str], Optional[str]]]]
                       ) -> List[RangeRecord]:
        """Fenced by ``lease``.  With ``ranges`` (``(after_key, upto_key)`` JSON texts): replace
        the evolution's ranges by these, all ``pending``.  Without: keep them, every ``failed``
        one back to ``pending`` with its checkpoint (a retry resumes what is left).  Returns
        the ranges as committed."""

    @abc.abstractmethod
    def claim_range(self, evolution_id: str, owner: str,
                    lease_seconds: float) -> Optional[RangeClaim]:
        """Claim one ``pending`` range of the evolution, or a ``running`` one whose claim
        expired: ``state=running``, owner, ``claim_generation+1``, ``expires_at`` = now +
        lease, ``attempts+1``, in one atomic step that at most one of many concurrent
        claimers wins.  Never waits for a lock another claimer holds.  None when nothing is
        claimable."""

    @abc.abstractmethod
    def run_range_batch(self, claim: RangeClaim, work: Callable[[], BatchCheckpoint]) -> None:
        """:meth:`run_batch` for a range: ``work()``'s writes, the range's checkpoint (cursor,
        ``items_done``, ``batches_done``, batch size), the claim's renewal (``expires_at``) and
        the fencing check on the claim commit together where the database allows it
        (:attr:`atomic_apply`); an ``exhausted`` checkpoint makes the range ``done``.  If
        ``work()`` raises its writes are rolled back and the exception propagates; a failed
        fencing check raises ClaimLost with everything rolled back (on MongoDB, the flushed
        work stays: at least once)."""

    @abc.abstractmethod
    def release_range(self, claim: RangeClaim) -> bool:
        """Give a claimed range back (``pending``, no owner, checkpoint kept); False if the
        claim was lost already."""

    @abc.abstractmethod
    def fail_range(self, claim: RangeClaim, error: str) -> bool:
        """Record the claimed range ``failed`` with the traceback text, checkpoint kept;
        False if the claim was lost already."""

    @abc.abstractmethod
    def record_parallel_progress(self, lease: Lease, evolution_id: str, done: int,
                                 batches_done: int, rate: Optional[float]) -> None:
        """Fenced by ``lease``: the summed progress of every range in the history record
        (``progress_done``, ``batches_done``, ``rate``, ``progress_at``)."""

    # --- operators' requests and the audit trail (storage version 3) ---------------------------

    @abc.abstractmethod
    def record_request(self, evolution_id: str, request: str, requested_by: str,
                       seen_state: Optional[str]) -> Optional[HistoryRecord]:
        """An operator's ``pause``, ``resume`` or ``retry``, for the process that runs the
        evolution to honour: a compare-and-set, unfenced (no lock needed, so a pause never
        waits behind the evolution it pauses).

        Sets ``requested``, ``requested_by`` and ``requested_at`` (:meth:`now`) only while the
        record's state still is ``seen_state`` and the same request is not pending already.
        ``seen_state`` None means "no record": then a ``pause`` inserts the record as
        ``paused`` (the evolution never started; nothing to wait for).  Returns the record as
        written, or None when it had changed (the caller reads it again and says why).
        """

    @abc.abstractmethod
    def record_audit(self, evolution_id: Optional[str], action: str, actor: Optional[str],
                     host: Optional[str], detail: Optional[str] = None,
                     error: Optional[str] = None) -> None:
        """Append one entry to the audit trail, at :meth:`now`.  Unfenced: an attempt's
        outcome and an operator's action are both facts to keep, whoever holds the lock."""

    @abc.abstractmethod
    def read_audit(self, evolution_id: Optional[str] = None) -> list[AuditEntry]:
        """The audit trail, oldest first (of one evolution id when given); empty while its
        store does not exist.  Never creates anything."""


#: Longest text an audit entry keeps in ``detail`` or ``error`` (characters): MySQL's TEXT holds
#: 65,535 bytes, four per character at worst.  A longer traceback keeps its head and its tail.
AUDIT_TEXT_LIMIT = 16_000


def audit_text(text: Optional[str]) -> Optional[str]:
    """``text`` as every database can store it: no NUL (PostgreSQL), no lone surrogate (all of
    them), at most :data:`AUDIT_TEXT_LIMIT` characters."""
    if text is None:
        return None
    text = text.replace('\x00', '\\x00').encode('utf-8', 'backslashreplace').decode('utf-8')
    if len(text) > AUDIT_TEXT_LIMIT:
        half = AUDIT_TEXT_LIMIT // 2 - 50
        text = (f'{text[:half]}\n[... {len(text) - 2 * half} characters left out ...]\n'
                f'{text[-half:]}')
    return text


class AuditLine(NamedTuple):
    """An audit entry written in the same write as the history record it describes."""
    action: str
    actor: Optional[str]
    host: Optional[str]
    detail: Optional[str] = None


#: ``audit(record)``: the :class:`AuditLine` a history write appends (or None), given the
#: record as written.
AuditFor = Callable[[HistoryRecord], Optional[AuditLine]]


class BatchCheckpoint(NamedTuple):
    """What one batch commits with its work: where the next batch starts, and how big it is."""
    items: int  # items this batch processed
    cursor: Optional[str]  # JSON text of the cursor after this batch (None: the start)
    exhausted: bool  # nothing left: the evolution is applied with this batch
    batch_size: int  # this batch's size: where a resumed run's sizing starts
    rate: Optional[float]  # items per second, for the ETA (None: not measured yet)
    total: Optional[int] = None  # the collection's count, once known (None: leave it as is)
