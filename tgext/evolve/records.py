"""What storage holds, as the rest of tgext.evolve sees it: the records and the history states.

Planning, the runner, the CLI and every backend share these; the storage contract that reads
and writes them is :mod:`.backends.base`.  Nothing here knows about a database.
"""
from typing import NamedTuple, Optional

#: The lock every process of an application competes for.
DEFAULT_LOCK_NAME = 'tgext.evolve'

#: History states.  ``running`` is written before ``evolve()`` starts so a crash is visible.
RUNNING = 'running'
APPLIED = 'applied'
FAILED = 'failed'
ADOPTED = 'adopted'  # applied by tgext.evolve 0.0.5, taken over from its ``tgext_evolve`` store
MARKED = 'marked'  # recorded as applied by an operator without running it
PAUSED = 'paused'  # stopped by an operator at a batch boundary (or before it started)

#: What an operator may ask of an evolution (the history's ``requested``): honoured by the
#: process that runs it, at the next batch boundary or before it starts.
PAUSE = 'pause'
RESUME = 'resume'
RETRY = 'retry'
#: States that mean "this evolution's work is in the database".
DONE_STATES = frozenset((APPLIED, ADOPTED, MARKED))

#: Longest evolution id (and fingerprint, and lock name): the width of their columns.
MAX_ID_LENGTH = 128
#: Longest owner string (``host:pid:token``).
MAX_OWNER_LENGTH = 255

# The records are NamedTuples rather than frozen dataclasses: defining a dataclass generates
# and compiles its methods, ~1.5 ms each at every process's start-up.


class Lease(NamedTuple):
    """Proof of holding the lock: what every fenced write checks.

    Its expiry is not part of it: that lives in the lock record, where only the clock that
    decides expiry (the database's) sets and reads it.
    """
    name: str
    owner: str
    generation: int
    lease_seconds: float


#: How ``released_by`` starts when an operator broke the lock (``release-lock --force``)
#: instead of its holder, or a process that found it gone, releasing it.
BROKEN_BY_PREFIX = 'broken by '


class LockRecord(NamedTuple):
    """The lock record as read, with the database clock at the time of reading."""
    name: str
    owner: Optional[str]  # None once released
    generation: int
    acquired_at: Optional[float]
    renewed_at: Optional[float]
    expires_at: Optional[float]
    released_by: Optional[str]
    now: float  # the clock that decides expiry, read in the same query

    @property
    def held(self) -> bool:
        """True while an owner holds an unexpired lease."""
        return self.owner is not None and self.expires_at is not None and self.expires_at > self.now

    @property
    def broken_by(self) -> Optional[str]:
        """Who broke the lock last (an operator), or None when it was released."""
        if self.released_by is None or not self.released_by.startswith(BROKEN_BY_PREFIX):
            return None
        return self.released_by[len(BROKEN_BY_PREFIX):]

    @property
    def expires_in(self) -> Optional[float]:
        if self.owner is None or self.expires_at is None:
            return None
        return self.expires_at - self.now


class HistoryRecord(NamedTuple):
    """One evolution's history.

    The fields up to ``fingerprint`` are columns (document fields) that storage version 1
    already had: the history is what every process reads before it serves, also while a
    process of an older release holds the lock.  The batch fields after them were added by
    storage version 3: they are read (``read_history(batches=True)``) only by code that knows
    the storage has them, and are None otherwise.
    """
    evolution_id: str
    state: str
    attempts: int = 0
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    duration_ms: Optional[float] = None
    owner: Optional[str] = None
    generation: Optional[int] = None
    error: Optional[str] = None
    progress_done: Optional[int] = None
    progress_total: Optional[int] = None
    fingerprint: Optional[str] = None
    # Storage version 3: the checkpoint of a batched evolution, and an operator's request.
    checkpoint: Optional[str] = None  # JSON: the cursor after the last committed batch
    batches_done: Optional[int] = None
    batch_size: Optional[int] = None  # the size the next batch takes
    rate: Optional[float] = None  # items per second, smoothed, for the ETA
    requested: Optional[str] = None  # PAUSE, RESUME or RETRY, until honoured
    requested_by: Optional[str] = None
    requested_at: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES


#: The history fields storage version 1 has, and those storage version 3 added.
HISTORY_V1_FIELDS = HistoryRecord._fields[:HistoryRecord._fields.index('fingerprint') + 1]
HISTORY_BATCH_FIELDS = HistoryRecord._fields[len(HISTORY_V1_FIELDS):]


#: States of a parallel evolution's key range (``tgext_evolve_ranges``).
RANGE_PENDING = 'pending'  # nobody works on it (never claimed, released, or reset by retry)
RANGE_RUNNING = 'running'  # claimed: ``owner`` works on it until ``expires_at``
RANGE_DONE = 'done'  # its last batch committed
RANGE_FAILED = 'failed'  # a batch failed after its retries; the checkpoint is kept


class RangeRecord(NamedTuple):
    """One key range of a parallel evolution as stored, with the clock that decides expiry."""
    evolution_id: str
    range_no: int
    after_key: Optional[str]  # JSON cursor, exclusive; None: from the start
    upto_key: Optional[str]  # JSON cursor, inclusive; None: to the end
    checkpoint: Optional[str]  # JSON cursor after the range's last committed batch
    state: str
    owner: Optional[str] = None
    claim_generation: int = 0  # +1 on every claim: what a claimer's writes are fenced on
    claimed_at: Optional[float] = None
    expires_at: Optional[float] = None
    items_done: int = 0
    batches_done: int = 0
    batch_size: Optional[int] = None
    attempts: int = 0  # claims so far
    error: Optional[str] = None
    finished_at: Optional[float] = None
    now: Optional[float] = None  # the clock that decides expiry, read with the record

    @property
    def claimed(self) -> bool:
        """True while a claimer holds an unexpired claim on it."""
        return (self.state == RANGE_RUNNING and self.expires_at is not None
                and self.now is not None and self.expires_at > self.now)


class RangeClaim(NamedTuple):
    """Proof of a claim on one range: what the claimer's range writes are fenced on."""
    evolution_id: str
    range_no: int
    owner: str
    claim_generation: int
    lease_seconds: float
    after_key: Optional[str]
    upto_key: Optional[str]
    checkpoint: Optional[str]  # where to resume (None: at ``after_key``)
    batch_size: Optional[int]  # the size the range's last batch chose
    attempts: int


class LegacyState(NamedTuple):
    """What tgext.evolve 0.0.5 left in its ``tgext_evolve`` table or collection."""
    version: Optional[str]  # the last evolution id it applied
    lock_holder: Optional[str]  # the pid in a leftover 0.0.5 lock, ignored but reported


def require_done_state(state: str) -> None:
    """``record_states()`` records evolutions as done without running them: only a done state
    makes sense there.  A ValueError, not an :class:`~.errors.EvolveError`: no user input
    reaches it (the runner passes ``adopted``, the CLI ``marked``), so it is a programming
    error in the caller."""
    if state not in DONE_STATES:
        raise ValueError(f'record_states() records done states only '
                         f'({", ".join(sorted(DONE_STATES))}), not {state!r}')


#: What the audit trail records (its ``action``).  Attempts, written by the process that runs
#: the evolution, with the owner as actor:
STARTED = 'started'  # an attempt began (``detail``: the reason, and where it resumes)
# APPLIED, FAILED (``error``: the traceback) and PAUSED (at a batch boundary or before it
# started) end an attempt, under the names of the states they leave behind.
#: Operators' actions, with the operator as actor (the OS user, or the status page's user):
OPERATOR_ACTIONS = ('mark', 'unmark', 'retry', 'pause', 'resume', 'release-lock')


class AuditEntry(NamedTuple):
    """One line of the append-only audit trail: an attempt of an evolution, or an operator's
    action.  Never updated nor deleted: ``unmark`` and ``retry`` leave what happened here."""
    id: object  # the store's key: an int on SQL, an ObjectId's text on MongoDB
    evolution_id: Optional[str]  # None for the lock's (release-lock)
    at: float
    action: str
    actor: Optional[str]  # who: the owner string of a process, or an operator's name
    host: Optional[str]
    detail: Optional[str] = None
    error: Optional[str] = None  # the traceback of a failed attempt
