"""The JSON cursor codec: keys survive storage exactly; user cursors that would not are refused."""
import datetime
import decimal
import json
import math
import uuid

import bson
import pytest

from tgext.evolve.cursors import check_user_cursor, decode_key, encode_key
from tgext.evolve.errors import ConfigurationError

UTC_PLUS_2 = datetime.timezone(datetime.timedelta(hours=2))

KEYS = [
    0, -7, 2 ** 70, True, 1.25, '', 'page-ü/€', '{"$oid": "not a tag"}',
    uuid.UUID('6f1c2a3b-4d5e-4f60-8172-93a4b5c6d7e8'),
    datetime.datetime(2024, 5, 1, 12, 0, 0, 1),
    datetime.datetime(2024, 5, 1, 12, 0, 0, 999999, tzinfo=UTC_PLUS_2),
    datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc),
    datetime.date(1999, 12, 31),
    decimal.Decimal('12.50'), decimal.Decimal('-1E+3'),
    b'\x00\xffbinary', bson.ObjectId('6650f1c2a3b4d5e6f7a8b9c0'),
    bson.Binary(b'\x01' * 16, 4),
    (3, 'b'), (uuid.UUID(int=5), datetime.date(2020, 1, 1), decimal.Decimal('0.10')),
]


def stored(value):
    """What storage gives back: the value written as JSON text and read again."""
    return json.loads(json.dumps(value, allow_nan=False))


@pytest.mark.parametrize('key', KEYS, ids=repr)
def test_a_key_comes_back_from_storage_exactly(key):
    decoded = decode_key(stored(encode_key(key)))
    assert decoded == key
    assert type(decoded) is type(key)
    if isinstance(key, datetime.datetime):
        assert decoded.utcoffset() == key.utcoffset()  # naive stays naive, offset kept
    if isinstance(key, decimal.Decimal):
        assert str(decoded) == str(key)  # 12.50 is not 12.5
    if isinstance(key, bson.Binary):
        assert decoded.subtype == key.subtype


def test_a_composite_key_given_as_a_list_comes_back_as_a_tuple():
    assert decode_key(stored(encode_key([1, 'a']))) == (1, 'a')


def test_tagged_values_are_one_member_objects_and_strings_stay_strings():
    assert encode_key(bson.ObjectId('6650f1c2a3b4d5e6f7a8b9c0')) == {
        '$oid': '6650f1c2a3b4d5e6f7a8b9c0'}
    # A string that looks like a tag is a string, never mistaken for the tagged value.
    assert decode_key(stored(encode_key('{"$oid": "x"}'))) == '{"$oid": "x"}'


@pytest.mark.parametrize('value', [
    {'$oid': '6650f1c2a3b4d5e6f7a8b9c0', 'extra': 1},  # a user's object with a tag in it
    {'slug': 'a'},
    {'$uuid': 'not hex'},
    [[1, 2]],  # nested lists are not a key
])
def test_a_value_no_key_encodes_to_is_refused_when_decoded(value):
    with pytest.raises(ValueError):
        decode_key(value)


@pytest.mark.parametrize('key', [None, math.nan, math.inf, decimal.Decimal('NaN'), {'a': 1},
                                 {1, 2}, object(), (1, None)], ids=repr)
def test_a_key_without_a_json_form_is_refused_naming_it(key):
    with pytest.raises(ValueError) as error:
        encode_key(key)
    assert 'cursor' in str(error.value) or 'JSON' in str(error.value)


@pytest.mark.parametrize('value', [
    None, 0, 'abc', 2.5, [1, 'a', None], {'page': 12, 'phase': 'copy', 'done': [1, 2]},
    {'$oid': 'a user object is stored as it is'},
])
def test_a_json_user_cursor_is_stored_as_it_is(value):
    assert check_user_cursor('backfill', value) == value


def test_a_user_cursor_tuple_is_returned_as_the_list_a_resume_will_see():
    assert check_user_cursor('backfill', (3, ('a', 1))) == [3, ['a', 1]]


@pytest.mark.parametrize('value, culprit', [
    (datetime.datetime(2024, 1, 1), "cursor is datetime.datetime(2024, 1, 1, 0, 0)"),
    ({'at': math.nan}, "cursor['at'] is nan"),
    ([1, math.inf], 'cursor[1] is inf'),
    ({'ids': [1, {2, 3}]}, "cursor['ids'][1] is {2, 3}"),
    ({1: 'a'}, 'has the key 1 (int)'),
    (decimal.Decimal('1.5'), "cursor is Decimal('1.5')"),
])
def test_a_user_cursor_json_cannot_store_is_refused_naming_the_evolution_and_the_value(
        value, culprit):
    with pytest.raises(ConfigurationError) as error:
        check_user_cursor('backfill_slugs', value)
    message = str(error.value)
    assert "evolution 'backfill_slugs'" in message
    assert culprit in message


def test_a_cursor_that_contains_itself_is_refused_not_a_crash():
    value = [1]
    value.append(value)
    with pytest.raises(ConfigurationError, match="evolution 'loop'"):
        check_user_cursor('loop', value)


def test_a_huge_offending_value_is_shortened_in_the_message():
    with pytest.raises(ConfigurationError) as error:
        check_user_cursor('big', [object()] + ['x' * 10_000_000])
    assert len(str(error.value)) < 1000
    with pytest.raises(ConfigurationError) as error:
        check_user_cursor('big', {'blob': b'y' * 10_000_000})
    assert len(str(error.value)) < 1000
