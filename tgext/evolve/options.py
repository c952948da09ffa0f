"""Every tgext.evolve setting, parsed and validated in one place.

A setting may come from ``plugme(options={...})`` or from the .ini as ``tgext.evolve.<key>``;
the .ini wins.  Values from the .ini are strings.  A bad value is a start-up error naming the
key and the value.
"""
import math
from typing import NamedTuple

from tg.support.converters import asbool

from .errors import ConfigurationError

PREFIX = 'tgext.evolve.'
ON_FAILURE_CHOICES = ('block', 'serve')

#: Options of ``plugme`` that are not settings: what to run, and what tgext.pluggable passes.
REGISTRATION_KEYS = frozenset(('evolutions', 'appid'))


class Settings(NamedTuple):
    enabled: bool = True
    lease: float = 15.0
    poll_interval: float = 1.0
    retry_after: int = 5
    on_failure: str = 'block'
    readonly: bool = False
    batch_seconds: float = 1.0
    throttle: float = 1.0

    @property
    def heartbeat_interval(self):
        return self.lease / 3


SETTING_KEYS = Settings._fields


def _bool(key, value, source):
    try:
        return asbool(value)
    except ValueError:
        raise ConfigurationError(
            f'{source}: {key} = {value!r} is not a boolean (use true/false, yes/no, on/off, 1/0)'
        ) from None


def _number(kind, minimum=None, above=None, maximum=None):
    def parse(key, value, source):
        if isinstance(value, bool):
            raise ConfigurationError(f'{source}: {key} = {value!r} is not a number')
        try:
            number = kind(value.strip() if isinstance(value, str) else value)
            if number != value and not isinstance(value, str):
                raise ValueError  # int(2.5) would silently truncate, as '2.5' in the .ini cannot
        except (TypeError, ValueError, OverflowError):
            raise ConfigurationError(
                f'{source}: {key} = {value!r} is not {"an integer" if kind is int else "a number"}'
            ) from None
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigurationError(f'{source}: {key} = {value!r} is not a finite number')
        if above is not None and not number > above:
            raise ConfigurationError(f'{source}: {key} = {value!r} must be greater than {above}')
        if minimum is not None and number < minimum:
            raise ConfigurationError(f'{source}: {key} = {value!r} must be at least {minimum}')
        if maximum is not None and number > maximum:
            raise ConfigurationError(f'{source}: {key} = {value!r} must be at most {maximum}')
        return number
    return parse


def _choice(choices):
    def parse(key, value, source):
        choice = value.strip().lower() if isinstance(value, str) else value
        if choice not in choices:
            raise ConfigurationError(
                f'{source}: {key} = {value!r} must be one of {", ".join(choices)}')
        return choice
    return parse


_PARSERS = {
    'enabled': _bool,
    'lease': _number(float, above=0),
    'poll_interval': _number(float, above=0),
    'retry_after': _number(int, minimum=0),
    'on_failure': _choice(ON_FAILURE_CHOICES),
    'readonly': _bool,
    # A batch is one transaction: beyond minutes it holds locks and undo as long as the
    # single transaction batching exists to avoid.
    'batch_seconds': _number(float, above=0, maximum=600),
    # Sleeping more than 100x the batch's own time would make a backfill crawl for no gain.
    'throttle': _number(float, minimum=0, maximum=100),
}


def _suggest(key):
    import difflib
    match = difflib.get_close_matches(key, SETTING_KEYS, n=1)
    return f' (did you mean {match[0]!r}?)' if match else ''


def check_plug_options(options):
    """Reject unknown ``plugme`` options; return the settings among them, unparsed."""
    settings = {}
    for key, value in options.items():
        if key in REGISTRATION_KEYS:
            continue
        if key not in _PARSERS:
            raise ConfigurationError(
                f'tgext.evolve.plugme: unknown option {key!r}{_suggest(key)}; known options: '
                f'evolutions, {", ".join(SETTING_KEYS)}')
        settings[key] = _PARSERS[key](key, value, 'tgext.evolve.plugme options')
    return settings


def parse_settings(plug_settings, conf):
    """Merge ``plugme`` settings with the ``tgext.evolve.*`` keys of the app's config."""
    values = dict(plug_settings)
    for conf_key, value in conf.items():
        if not isinstance(conf_key, str) or not conf_key.startswith(PREFIX):
            continue
        key = conf_key[len(PREFIX):]
        if key not in _PARSERS:
            raise ConfigurationError(
                f'configuration: unknown key {conf_key!r}{_suggest(key)}; known keys: '
                f'{", ".join(PREFIX + k for k in SETTING_KEYS)}')
        values[key] = _PARSERS[key](conf_key, value, 'configuration')
    return Settings(**values)
