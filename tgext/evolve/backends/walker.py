"""Walking a batched evolution's collection, batch by batch, in primary-key order.

A backend turns what ``BatchEvolution.collection()`` returned into a :class:`Walker`; the
runner asks it for one batch at a time, inside that batch's transaction, and stores the cursor
it returns in the checkpoint.  Walkers use keyset pagination (``key > cursor ORDER BY key
LIMIT size``): never OFFSET, never the whole collection in memory, and the items a batch
changes, even the column the collection filters on, cannot shift the next batch.

Cursors are the JSON values of :mod:`tgext.evolve.cursors`: ``None`` before the first batch,
then the encoded key of the last item walked.  Walkers keep no state between calls, so any
process can resume a walk from a stored cursor.
"""
import abc
from typing import Any, List, NamedTuple

from ..cursors import JSONValue, encode_key
from ..errors import ConfigurationError


class Batch(NamedTuple):
    """One batch: its items in key order and the cursor to resume after them.

    ``cursor`` is the encoded key of the last item, or the cursor asked for when ``items`` is
    empty, so it can always be stored as the new checkpoint.
    """
    items: List[Any]
    cursor: JSONValue


class KeyRange(NamedTuple):
    """A slice of the key space: keys ``> after`` and ``<= upto``; None means unbounded."""
    after: JSONValue
    upto: JSONValue


class Walker(abc.ABC):
    """Walks one evolution's collection in batches, in the caller's session and transaction.

    Creating a walker validates the collection and raises
    :class:`~tgext.evolve.errors.ConfigurationError`, naming the evolution, for one that
    cannot be walked by key.  Walkers hold no items between calls and never commit, flush or
    clear a session.  The caller, once per batch: begins the batch's transaction, calls
    :meth:`next_batch`, processes the items, flushes the session, stores the returned cursor
    in the checkpoint, commits, and (Ming, whose identity map holds every object it loaded)
    clears the session.  A walker may be kept across batches and transactions, or made anew
    in another process to resume from a stored cursor.
    """

    evolution_id: str

    @abc.abstractmethod
    def next_batch(self, cursor: JSONValue, size: int, upper: JSONValue = None) -> Batch:
        """Up to ``size`` items with keys after ``cursor`` (None: from the first item).

        ``upper``, when given, is an inclusive upper bound (``KeyRange.upto``): the walk of a
        range stops there.  An empty batch means the walk (of the range) is over; a shorter
        one does not (collections that join other tables lose duplicate rows after the LIMIT).
        """

    @abc.abstractmethod
    def count(self, after: JSONValue = None) -> int:
        """How many items the collection holds now, in one query: the total for progress.

        ``after``: only those with keys after that cursor, the walk's part still to do (added
        to the items done, a total that holds for a collection that leaves out what is done,
        ``WHERE words IS NULL``, as well as for one that does not)."""

    @abc.abstractmethod
    def split(self, n: int) -> List[KeyRange]:
        """At most ``n`` ranges that cover the whole key space exactly once, for parallel work.

        The first range starts at None and the last one ends at None, so keys outside today's
        smallest and largest (rows inserted later) belong to a range too; each range's
        ``after`` is the previous one's ``upto``.  Raises ConfigurationError, saying why, for a
        key that cannot be cut into ranges.
        """


def check_batch_size(size: int) -> None:
    """Refuse a size the runner should never ask for (a programming error, not bad input)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f'batch size must be a positive int, not {size!r}')


def check_range_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f'split() needs a positive int, not {n!r}')


def encode_cursor(evolution_id: str, key: Any) -> JSONValue:
    """``encode_key(key)``, with an error naming the evolution for a key it cannot store."""
    try:
        return encode_key(key)
    except ValueError as exc:
        raise ConfigurationError(
            f'evolution {evolution_id!r}: the collection cannot be walked by key: {exc}') from exc


def integer_boundaries(low: int, high: int, n: int) -> List[int]:
    """Up to ``n - 1`` increasing cut points between ``low`` and ``high`` (the smallest and
    largest keys), evenly spaced, each in ``[low, high)`` so that no range is empty of today's
    keys by construction: range i holds the keys ``> cut[i-1]`` and ``<= cut[i]``.
    """
    cuts = (low + (high - low) * i // n for i in range(1, n))
    return sorted({cut for cut in cuts if cut < high})


def ranges_from_boundaries(boundaries: List[JSONValue]) -> List[KeyRange]:
    """The ranges ``(None, b1], (b1, b2], ..., (bk, None)`` for increasing cut points."""
    edges = [None, *boundaries, None]
    return [KeyRange(after, upto) for after, upto in zip(edges, edges[1:])]

