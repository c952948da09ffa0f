"""Keyset walks of a Ming (ODM) collection by ``_id``.

Each batch is one ``find``: the collection's filter with an ``_id`` bound, sorted by ``_id``,
limited to the batch size::

    Page.query.find({'slug': None, '_id': {'$gt': cursor}}).sort('_id').limit(size)

MongoDB serves that from the ``_id`` index.  The bound is merged into the filter rather than
combined with ``$and``, because MIM (Ming's in-memory MongoDB) does not know ``$and``: it reads
it as a field name and matches nothing, so a walk would silently find no items.  A filter that
already constrains ``_id`` is wrapped in a one-branch ``$or``, which both MongoDB (that reduces
it to its branch) and MIM read as "this filter, and the bound".

MongoDB compares ``_id`` values only within one BSON type (``{'$gt': 5}`` never matches a
string): a walk over a collection that mixes types would skip every type but the first, so such
a collection is refused when the walker is created.

Items are ODM objects loaded through the application's Ming session, which keeps each one in
its identity map (strong references) until the session is cleared: the caller flushes and
clears the session after every batch, or memory grows with the walk.
"""
from typing import Any, List, Mapping, Tuple

import bson
from ming.base import Cursor as MingCursor
from ming.odm import mapper
from ming.odm.odmsession import ODMCursor

from ..cursors import JSONValue, decode_key
from ..errors import ConfigurationError
from .walker import (Batch, KeyRange, Walker, check_batch_size, check_range_count,
                     encode_cursor, integer_boundaries, ranges_from_boundaries)

_ASCENDING = [('_id', 1)]
_DESCENDING = [('_id', -1)]
_OBJECT_ID_BYTES = 12


class MingWalker(Walker):
    """Walks ``collection`` by ``_id`` through ``session`` (the application's
    ``ThreadLocalODMSession``; by default the mapped class's own session).

    ``collection`` is one of:

    * ``Page.query.find({'slug': None})``: an ODM cursor; its filter (and ``refresh=``) is kept,
      its sort replaced by ``_id``.  A cursor with ``limit``, ``skip``, a projection or
      ``decorate`` is refused: the walk could not keep them.
    * ``Page``: the mapped class, every document of its collection;
    * ``(Page, {'slug': None})``: a mapped class and a filter.

    Creating the walker reads the smallest and largest ``_id`` (two index lookups), to refuse
    ``_id`` values of several types or of a type no cursor can hold.
    """

    def __init__(self, evolution_id: str, collection: Any, session: Any = None):
        self.evolution_id = evolution_id
        self._cls, self._filter, self._refresh = _collection_of(evolution_id, collection)
        self._session = session if session is not None else mapper(self._cls).session
        low, high = self._id_bounds()
        if low is not None:
            self._check_ids(low, high)

    # --- the walk ------------------------------------------------------------------------------

    def next_batch(self, cursor: JSONValue, size: int, upper: JSONValue = None) -> Batch:
        check_batch_size(size)
        bound = {}
        if cursor is not None:
            bound['$gt'] = self._decode(cursor)
        if upper is not None:
            bound['$lte'] = self._decode(upper)
        options = {'refresh': True} if self._refresh else {}
        items = self._session.find(self._cls, _bounded(self._filter, bound), sort=_ASCENDING,
                                   limit=size, **options).all()
        if not items:
            return Batch([], cursor)
        return Batch(items, encode_cursor(self.evolution_id, items[-1]._id))

    def count(self, after: JSONValue = None) -> int:
        bound = {} if after is None else {'$gt': self._decode(after)}
        return self._raw_collection().count_documents(_bounded(self._filter, bound))

    def split(self, n: int) -> List[KeyRange]:
        check_range_count(n)
        low, high = self._id_bounds()
        if low is None or n == 1:
            return ranges_from_boundaries([])
        if isinstance(low, bson.ObjectId):
            cuts = integer_boundaries(_oid_int(low), _oid_int(high), n)
            boundaries = [bson.ObjectId(cut.to_bytes(_OBJECT_ID_BYTES, 'big')) for cut in cuts]
        elif _is_int(low):
            boundaries = integer_boundaries(int(low), int(high), n)
        else:
            raise ConfigurationError(
                f'evolution {self.evolution_id!r}: parallel ranges are cut by interpolating '
                f'between the smallest and the largest _id, which works for ObjectId and integer '
                f'_ids only; this collection\'s _ids are {type(low).__name__}.  Walk it without '
                f'parallel = True')
        return ranges_from_boundaries([encode_cursor(self.evolution_id, b) for b in boundaries])

    # --- helpers ---------------------------------------------------------------------------------

    def _raw_collection(self):
        """The pymongo (or MIM) collection, on the database the session is bound to."""
        return self._session.db[mapper(self._cls).collection.m.collection_name]

    def _id_bounds(self) -> Tuple[Any, Any]:
        """The smallest and largest ``_id`` of the collection, or (None, None) when empty."""
        collection = self._raw_collection()

        def first(sort):
            found = list(collection.find(self._filter, projection={'_id': 1}, sort=sort,
                                         limit=1))
            return found[0]['_id'] if found else None

        return first(_ASCENDING), first(_DESCENDING)

    def _check_ids(self, low, high) -> None:
        if _type_family(low) != _type_family(high):
            raise ConfigurationError(
                f'evolution {self.evolution_id!r}: the collection mixes _id types '
                f'({type(low).__name__} {low!r} ... {type(high).__name__} {high!r}); MongoDB '
                f'compares _id only within one type, so a walk by _id would skip the others')
        encode_cursor(self.evolution_id, low)  # an _id no cursor can hold: refused now

    def _decode(self, cursor: JSONValue):
        try:
            return decode_key(cursor)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f'evolution {self.evolution_id!r}: unreadable cursor {cursor!r}: {exc}') from exc


def _bounded(filter_: Mapping, bound: dict) -> dict:
    """``filter_`` AND ``_id`` within ``bound``, in a form MIM reads too (no ``$and``)."""
    if not bound:
        return dict(filter_)
    if '_id' not in filter_:
        return {**filter_, '_id': bound}
    return {'$or': [dict(filter_)], '_id': bound}


def _collection_of(evolution_id, collection) -> Tuple[type, dict, bool]:
    """``(mapped class, filter, refresh)`` of what ``collection()`` returned."""
    if isinstance(collection, ODMCursor):
        return _cursor_parts(evolution_id, collection)
    if isinstance(collection, tuple) and len(collection) == 2:
        cls, filter_ = collection
        _check_mapped(evolution_id, cls)
        if not isinstance(filter_, Mapping):
            raise ConfigurationError(
                f'evolution {evolution_id!r}: collection() returned ({cls.__name__}, '
                f'{filter_!r}); the second item must be a filter dict')
        return cls, dict(filter_), False
    if isinstance(collection, type):
        _check_mapped(evolution_id, collection)
        return collection, {}, False
    raise ConfigurationError(
        f'evolution {evolution_id!r}: collection() must return a Ming query '
        f'(Page.query.find(filter)), a mapped class or (mapped class, filter), not '
        f'{collection!r:.120}')


def _check_mapped(evolution_id, cls):
    try:
        mapper(cls)
    except (KeyError, TypeError):
        raise ConfigurationError(
            f'evolution {evolution_id!r}: collection() returned {cls!r:.120}, which is not a '
            f'Ming mapped class') from None


def _cursor_parts(evolution_id, cursor: ODMCursor) -> Tuple[type, dict, bool]:
    ming_cursor = cursor.ming_cursor
    if not isinstance(ming_cursor, MingCursor):  # find(..., validate=False) returns a generator
        raise ConfigurationError(
            f'evolution {evolution_id!r}: collection() returned a {cursor.cls.__name__} query '
            f'made with validate=False, whose filter cannot be read back; return '
            f'({cursor.cls.__name__}, filter) instead')
    dropped = _options_a_walk_drops(cursor)
    if dropped:
        raise ConfigurationError(
            f'evolution {evolution_id!r}: collection() returned a {cursor.cls.__name__} query '
            f'with {", ".join(dropped)}, which a walk by _id cannot keep (every batch is a new '
            f'find with its own sort and limit); return Page.query.find(filter) without them')
    filter_ = ming_cursor.find_spec or {}
    return cursor.cls, dict(filter_), bool(_odm_options(cursor).get('refresh'))


def _odm_options(cursor: ODMCursor) -> dict:
    # ODMCursor keeps refresh/decorate/projection in its private ``_options`` (a ming
    # Object, a dict); Ming has no public accessor.  Read here only.
    return dict(getattr(cursor, '_options', None) or {})


def _options_a_walk_drops(cursor: ODMCursor) -> List[str]:
    """Options of the user's cursor that re-running its filter batch by batch would lose.

    pymongo's Cursor and MIM's both keep limit and skip in the private ``_limit``/``_skip``
    (0 or None when unset), with no public accessor: read here only.  Losing a limit would walk
    the whole collection where the user asked for part of it.
    """
    raw = cursor.ming_cursor.cursor
    options = _odm_options(cursor)
    dropped = [name for name, value in (('limit', getattr(raw, '_limit', None)),
                                        ('skip', getattr(raw, '_skip', None)),
                                        ('a projection', options.get('fields')),
                                        ('decorate', options.get('decorate')))
               if value]
    return dropped


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_family(value) -> str:
    """The BSON comparison bracket of an ``_id``: numbers compare with each other."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 'number'
    if isinstance(value, (bytes, bson.Binary)):
        return 'binary'
    return type(value).__name__


def _oid_int(oid: bson.ObjectId) -> int:
    return int.from_bytes(oid.binary, 'big')

