"""Cursors as JSON values: the resume point of a batched evolution, as stored in its checkpoint.

Two kinds of cursor reach storage:

*Key cursors* are made by tgext.evolve's walkers from the primary key of the last item of a
batch.  :func:`encode_key` turns a key into a JSON value and :func:`decode_key` gives the very
same key back, so that a walk resumed in another process continues exactly after it:

=======================  ==================================================================
key                      JSON value
=======================  ==================================================================
``int``, ``str``,        themselves (``bool`` and finite ``float`` too)
``tuple`` (composite)    a list of the encoded parts; decoded as a tuple
``uuid.UUID``            ``{"$uuid": "6f1c...e2"}`` (32 hex digits)
``datetime.datetime``    ``{"$datetime": "2024-05-01T12:00:00.000001+02:00"}``: microseconds
                         kept; an aware datetime keeps its UTC offset, a naive one has none
``datetime.date``        ``{"$date": "2024-05-01"}``
``decimal.Decimal``      ``{"$decimal": "12.50"}`` (exponent kept: ``12.50`` is not ``12.5``)
``bytes``                ``{"$bytes": "<base64>"}``
``bson.ObjectId``        ``{"$oid": "<24 hex digits>"}``
``bson.Binary``          ``{"$binary": ["<base64>", subtype]}`` (subtype 0 is plain ``bytes``)
=======================  ==================================================================

A JSON object inside a key cursor is *always* one of these one-member tags: keys are never
dicts, so a user's plain JSON object can never be mistaken for a tag, and :func:`decode_key`
refuses any object that is not exactly a known tag instead of guessing.

*User cursors* are what the low-level ``batch(cursor, size)`` form returns: any JSON value,
stored as it is and never decoded.  :func:`check_user_cursor` rejects, with the evolution's id
and the offending part, a value that JSON cannot store faithfully.
"""
import base64
import datetime
import decimal
import json
import math
import reprlib
import uuid
from typing import Any, Union

try:  # bson comes with pymongo, which the SQL-only install does not have
    import bson
except ImportError:  # pragma: no cover - exercised only without the ming extra
    bson = None

from .errors import ConfigurationError

#: A JSON value as :mod:`json` reads it back.
JSONValue = Union[None, bool, int, float, str, list, dict]

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode('ascii')


def _encode_scalar(key):
    """The JSON form of one key part; ValueError for what a key cursor cannot hold."""
    if isinstance(key, (bool, str)):
        return key
    if isinstance(key, int):
        return int(key)  # an int subclass (bson.Int64, an IntEnum) is stored as its value
    if isinstance(key, float):
        if not math.isfinite(key):
            raise ValueError(f'{key!r} has no JSON form')
        return key
    # datetime before date: a datetime is a date.
    if isinstance(key, datetime.datetime):
        return {'$datetime': key.isoformat(timespec='microseconds')}
    if isinstance(key, datetime.date):
        return {'$date': key.isoformat()}
    if isinstance(key, uuid.UUID):
        return {'$uuid': key.hex}
    if isinstance(key, decimal.Decimal):
        if not key.is_finite():
            raise ValueError(f'{key!r} has no JSON form')
        return {'$decimal': str(key)}
    if bson is not None and isinstance(key, bson.ObjectId):
        return {'$oid': str(key)}
    # bson.Binary is a bytes subclass whose subtype matters to MongoDB's comparisons.
    if bson is not None and isinstance(key, bson.Binary) and key.subtype != 0:
        return {'$binary': [_b64(bytes(key)), key.subtype]}
    if isinstance(key, (bytes, bytearray, memoryview)):
        return {'$bytes': _b64(bytes(key))}
    if key is None:
        # None is the cursor of a walk that has not started: a key must differ from it.
        raise ValueError('a key of None cannot be stored in a cursor')
    raise ValueError(f'a key of type {type(key).__name__} ({_repr.repr(key)}) cannot be '
                     f'stored in a cursor')


def encode_key(key: Any) -> JSONValue:
    """The JSON value that stands for ``key`` (a scalar, or a tuple for a composite key).

    Raises :class:`ValueError` naming the value when the key's type has no JSON form here
    (dicts, sets, NaN, unknown classes).
    """
    if isinstance(key, (tuple, list)):
        return [_encode_scalar(part) for part in key]
    return _encode_scalar(key)


def _decode_tag(value: dict):
    if len(value) != 1:
        raise ValueError(f'{_repr.repr(value)} is not a key cursor written by tgext.evolve')
    (tag, payload), = value.items()
    if tag == '$datetime':
        return datetime.datetime.fromisoformat(payload)
    if tag == '$date':
        return datetime.date.fromisoformat(payload)
    if tag == '$uuid':
        return uuid.UUID(hex=payload)
    if tag == '$decimal':
        return decimal.Decimal(payload)
    if tag == '$bytes':
        return base64.b64decode(payload)
    if tag in ('$oid', '$binary') and bson is None:  # pragma: no cover
        raise ValueError(f'the cursor {_repr.repr(value)} needs bson (install pymongo)')
    if tag == '$oid':
        return bson.ObjectId(payload)
    if tag == '$binary':
        data, subtype = payload
        return bson.Binary(base64.b64decode(data), subtype)
    raise ValueError(f'{_repr.repr(value)} is not a key cursor written by tgext.evolve '
                     f'(unknown tag {tag!r})')


def _decode_scalar(value):
    if isinstance(value, dict):
        return _decode_tag(value)
    if isinstance(value, list):
        raise ValueError(f'{_repr.repr(value)}: a composite key cursor cannot nest lists')
    return value


def decode_key(value: JSONValue) -> Any:
    """The key :func:`encode_key` made ``value`` from: ``decode_key(encode_key(k)) == k``.

    Lists come back as tuples (composite keys).  Raises :class:`ValueError` for a value
    :func:`encode_key` cannot have written.
    """
    if isinstance(value, list):
        return tuple(_decode_scalar(part) for part in value)
    return _decode_scalar(value)


# --- cursors returned by the low-level batch(cursor, size) -------------------------------------

def _not_json(value, path, open_containers=()):
    """A description of the first part of ``value`` that JSON cannot store faithfully, or None.

    ``open_containers`` holds the ids of the lists and dicts ``value`` is inside of, so that a
    container holding itself is reported instead of recursing forever.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f'{path} is {value!r}, which JSON has no form for'
    if isinstance(value, (list, tuple, dict)):
        if id(value) in open_containers:
            return f'{path} contains itself'
        open_containers = (*open_containers, id(value))
    if isinstance(value, (list, tuple)):
        for index, part in enumerate(value):
            problem = _not_json(part, f'{path}[{index}]', open_containers)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, part in value.items():
            if not isinstance(key, str):
                return (f'{path} has the key {_repr.repr(key)} ({type(key).__name__}), which '
                        f'JSON would turn into a string: use string keys')
            problem = _not_json(part, f'{path}[{key!r}]', open_containers)
            if problem:
                return problem
        return None
    return (f'{path} is {_repr.repr(value)}, a {type(value).__module__}.'
            f'{type(value).__qualname__}, not a JSON value')


def check_user_cursor(evolution_id: str, value: Any) -> JSONValue:
    """Check a cursor returned by ``batch(cursor, size)`` and return it as storage gives it back.

    The returned value is what a resumed evolution will receive, so the caller should continue
    with it rather than with ``value``: tuples become lists; everything else is unchanged.
    Raises :class:`~tgext.evolve.errors.ConfigurationError` naming the evolution and the part
    of the value JSON cannot store faithfully: objects of other types, NaN and infinities,
    dict keys that are not strings.
    """
    try:
        problem = _not_json(value, 'cursor')
        if problem is None:
            return json.loads(json.dumps(value, allow_nan=False))
    except RecursionError:
        problem = 'cursor is nested too deeply'
    raise ConfigurationError(
        f'evolution {evolution_id!r}: batch() returned a cursor that cannot be stored: '
        f'{problem}.  Cursors must be JSON values (None, bool, int, float, str, and lists or '
        f'dicts with string keys of these): convert other values, e.g. a datetime with '
        f'isoformat()')
