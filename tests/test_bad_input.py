"""Every bad option and registration error, in one table: refused at start-up, culprit named.

Each row is something a user can get wrong in ``config/app_cfg.py`` (the ``plugme`` /
``tgext.pluggable.plug`` options) or in the .ini (``tgext.evolve.*`` keys), and the words its
error message must contain: the key *and* the value, or the evolution id / class.  Every row runs
on every way to plug tgext.evolve and must raise :class:`tgext.evolve.ConfigurationError`, raised
by tgext.evolve's own checks (not an error from deep inside TurboGears or a database driver),
before the application serves anything: from ``plugme``/``plug``, or from ``make_wsgi_app``.
"""
import dataclasses
import pathlib
from typing import Optional

import pytest

import tgext.evolve
from tgapps import NoteEvolution, app_style, database_url, tg_apps  # noqa: F401 (fixtures)
from tgext.evolve import BatchEvolution, ConfigurationError, Evolution
from tgext.evolve.records import APPLIED, MAX_ID_LENGTH
from tgext.evolve.options import Settings

PACKAGE_DIR = pathlib.Path(tgext.evolve.__file__).resolve().parent


# --- what users register by mistake ---------------------------------------------------------------

class Valid(Evolution):
    evolution_id = 'valid'

    def evolve(self):
        pass


class NotAnEvolution:
    pass


class LooksLikeAnEvolution:
    """Has everything but the base class."""
    evolution_id = 'impostor'

    def evolve(self):
        pass


class WithoutEvolve(Evolution):
    evolution_id = 'without_evolve'


class WithoutId(Valid):
    evolution_id = None


def _with_id(evolution_id):
    return type('BadlyNamed', (Valid,), {'evolution_id': evolution_id})


class FirstWithSharedId(Valid):
    evolution_id = 'shared_id'


class SecondWithSharedId(Valid):
    evolution_id = 'shared_id'


class NeedsArguments(Valid):
    evolution_id = 'needs_arguments'

    def __init__(self, rounds):
        self.rounds = rounds


class DependsOnAString(Valid):
    evolution_id = 'depends_on_a_string'
    depends_on = 'valid'


class Backfill(BatchEvolution):
    """A valid batched evolution: the bad ones below each change one thing."""
    evolution_id = 'backfill'

    def collection(self):
        return []

    def process(self, item):
        pass


def _batched(name, base=BatchEvolution, **attributes):
    return type(name, (base,), {'evolution_id': name.lower(), **attributes})


def _collection(self):
    return []


def _process(self, item):
    pass


def _batch(self, cursor, size):
    return None


BOTH_FORMS = _batched('BothForms', collection=_collection, process=_process, batch=_batch)
NEITHER_FORM = _batched('NeitherForm', process=_process)
NO_PROCESS = _batched('NoProcess', collection=_collection)
PROCESS_AND_BULK = _batched('ProcessAndBulk', base=Backfill,
                            process_batch=lambda self, items: None)
BATCH_AND_PROCESS = _batched('BatchAndProcess', batch=_batch, process=_process)
WITH_EVOLVE = _batched('WithEvolve', base=Backfill, evolve=lambda self: None)


# --- the table ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BadInput:
    """What the user wrote (``options`` for plugme/plug, ``ini`` for the .ini) and what the
    message must name.  ``database`` False: the application configures no database."""
    options: dict
    names: tuple
    ini: Optional[dict] = None
    database: bool = True

    @property
    def fails_at(self):
        return 'make_wsgi_app' if self.ini is not None or not self.database else 'plugme'


def registration(evolutions, *names):
    return BadInput({'evolutions': evolutions}, names)


def option(key, value, *names):
    """A bad setting given as a plugme/plug option: the message names the key and the value."""
    return BadInput({'evolutions': [Valid], key: value}, (key, repr(value), *names))


def ini(key, value, *names):
    """A bad setting in the .ini (always a string there): names the full key and the value."""
    full_key = f'tgext.evolve.{key}'
    return BadInput({'evolutions': [Valid]}, (full_key, repr(value), *names), ini={full_key: value})


TOO_LONG_ID = 'x' * (MAX_ID_LENGTH + 1)

BAD_INPUTS = {
    # evolutions
    'evolutions-missing': BadInput({}, ('evolutions', 'required')),
    'evolutions-empty': registration([], 'evolutions', 'empty'),
    'evolutions-none': registration(None, 'evolutions', 'None'),
    'evolutions-a-string': registration('valid', 'evolutions', "'valid'"),
    'evolutions-a-single-class': registration(Valid, 'evolutions', 'Valid'),
    'not-an-evolution-class': registration([Valid, NotAnEvolution],
                                           'evolutions[1]', 'NotAnEvolution'),
    'not-an-evolution-instance': registration([NotAnEvolution()],
                                              'evolutions[0]', 'NotAnEvolution'),
    'not-an-evolution-at-all': registration([42], 'evolutions[0]', '42'),
    'non-evolution-with-evolution-id': registration([LooksLikeAnEvolution],
                                                    'LooksLikeAnEvolution', 'Evolution'),
    'non-evolution-instance-with-evolution-id': registration([LooksLikeAnEvolution()],
                                                             'LooksLikeAnEvolution', 'Evolution'),
    'evolution-without-evolve': registration([WithoutEvolve], "'without_evolve'", 'evolve()'),
    'evolution-id-missing': registration([WithoutId], 'WithoutId', 'evolution_id'),
    'evolution-id-empty': registration([_with_id('')], 'BadlyNamed', "''", 'empty'),
    'evolution-id-whitespace': registration([_with_id(' \t ')], 'BadlyNamed', repr(' \t ')),
    'evolution-id-not-a-string': registration([_with_id(42)], 'BadlyNamed', '42', 'string'),
    'evolution-id-bytes': registration([_with_id(b'valid')], 'BadlyNamed', "b'valid'"),
    'evolution-id-too-long': registration([_with_id(TOO_LONG_ID)], 'BadlyNamed',
                                          str(MAX_ID_LENGTH + 1), str(MAX_ID_LENGTH)),
    'evolution-id-duplicated': registration([FirstWithSharedId, SecondWithSharedId],
                                            "'shared_id'", 'FirstWithSharedId',
                                            'SecondWithSharedId'),
    'evolution-class-needs-arguments': registration([NeedsArguments], 'NeedsArguments',
                                                    'instance'),
    'depends-on-a-string': registration([Valid, DependsOnAString], 'depends_on',
                                        "'depends_on_a_string'"),
    # batched evolutions
    'batch-both-forms': registration([BOTH_FORMS], "'bothforms'", 'collection()', 'batch()'),
    'batch-neither-form': registration([NEITHER_FORM], "'neitherform'", 'collection()',
                                       'batch()'),
    'batch-collection-without-process': registration([NO_PROCESS], "'noprocess'", 'process'),
    'batch-process-and-process_batch': registration([PROCESS_AND_BULK], "'processandbulk'",
                                                    'process()', 'process_batch()'),
    'batch-batch-and-process': registration([BATCH_AND_PROCESS], "'batchandprocess'",
                                            'batch()', 'process'),
    'batch-with-evolve': registration([WITH_EVOLVE], "'withevolve'", 'evolve()'),
    **{f'batch_size-{label}': registration([_batched('Sized', base=Backfill, batch_size=value)],
                                          "'sized'", 'batch_size', repr(value))
       for label, value in (('zero', 0), ('negative', -10), ('fraction', 2.5), ('text', '100'),
                            ('boolean', True), ('none', None))},
    'max_batch_size-zero': registration([_batched('Capped', base=Backfill, max_batch_size=0)],
                                        "'capped'", 'max_batch_size', '0'),
    **{f'background-{label}': registration(
        [_batched('Backgrounded', base=Backfill, background=value)], "'backgrounded'",
        'background', repr(value)) for label, value in (('text', 'yes'), ('one', 1),
                                                         ('none', None))},
    'background-of-a-plain-evolution': registration(
        [_batched('PlainBackground', base=Valid, background='true')], "'plainbackground'",
        'background', "'true'"),
    'parallel-not-a-bool': registration([_batched('Parallel', base=Backfill, parallel='yes')],
                                        "'parallel'", 'parallel', "'yes'"),
    # settings given to plugme / plug
    'option-lease-not-a-number': option('lease', 'abc'),
    'option-lease-zero': option('lease', 0),
    'option-lease-negative': option('lease', -5),
    'option-lease-infinite': option('lease', float('inf')),
    'option-lease-a-boolean': option('lease', True),
    'option-poll_interval-negative': option('poll_interval', -1),
    'option-poll_interval-zero': option('poll_interval', 0.0),
    'option-retry_after-not-a-number': option('retry_after', 'x'),
    'option-retry_after-negative': option('retry_after', -1),
    'option-retry_after-fractional': option('retry_after', 2.5),
    'option-retry_after-infinite': option('retry_after', float('inf')),
    'option-on_failure-unknown': option('on_failure', 'maybe', 'block', 'serve'),
    'option-enabled-not-a-boolean': option('enabled', 'perhaps'),
    'option-readonly-not-a-boolean': option('readonly', 'maybe'),
    'option-unknown': BadInput({'evolutions': [Valid], 'leese': 10}, ("'leese'", "'lease'")),
    'option-batch_seconds-zero': option('batch_seconds', 0),
    'option-batch_seconds-negative': option('batch_seconds', -1.0),
    'option-batch_seconds-too-long': option('batch_seconds', 601),
    'option-batch_seconds-not-a-number': option('batch_seconds', 'fast'),
    'option-throttle-negative': option('throttle', -0.5),
    'option-throttle-too-high': option('throttle', 101),
    'option-throttle-infinite': option('throttle', float('inf')),
    # settings in the .ini
    'ini-lease-not-a-number': ini('lease', 'abc'),
    'ini-lease-zero': ini('lease', '0'),
    'ini-lease-negative': ini('lease', '-1'),
    'ini-lease-nan': ini('lease', 'nan'),
    'ini-poll_interval-negative': ini('poll_interval', '-1'),
    'ini-poll_interval-not-a-number': ini('poll_interval', 'soon'),
    'ini-retry_after-not-a-number': ini('retry_after', 'x'),
    'ini-retry_after-negative': ini('retry_after', '-5'),
    'ini-retry_after-fractional': ini('retry_after', '2.5'),
    'ini-on_failure-unknown': ini('on_failure', 'maybe', 'block', 'serve'),
    'ini-enabled-not-a-boolean': ini('enabled', 'perhaps'),
    'ini-readonly-not-a-boolean': ini('readonly', 'maybe'),
    'ini-batch_seconds-zero': ini('batch_seconds', '0'),
    'ini-batch_seconds-too-long': ini('batch_seconds', '3600'),
    'ini-batch_seconds-nan': ini('batch_seconds', 'nan'),
    'ini-throttle-negative': ini('throttle', '-1'),
    'ini-throttle-too-high': ini('throttle', '1000'),
    'ini-throttle-not-a-number': ini('throttle', 'gentle'),
    'ini-unknown-key': BadInput({'evolutions': [Valid]}, ("'tgext.evolve.leese'", "'lease'"),
                                ini={'tgext.evolve.leese': '10'}),
    'ini-evolutions-key': BadInput({'evolutions': [Valid]}, ("'tgext.evolve.evolutions'",),
                                   ini={'tgext.evolve.evolutions': 'valid'}),
    # the application
    'no-database': BadInput({'evolutions': [Valid]}, ('SQLAlchemy', 'Ming', 'enabled'),
                            database=False),
}


@pytest.mark.parametrize('case', BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_at_start_up_naming_the_culprit(tg_apps, sqlite_database_url,
                                                             app_style, case):
    model = tg_apps.model(('sqlite', sqlite_database_url)) if case.database else None
    with pytest.raises(ConfigurationError) as raised:
        configurator = tg_apps.configurator(app_style, model, dict(case.options))
        assert case.fails_at == 'make_wsgi_app', 'plugme accepted it'
        tg_apps.make_wsgi_app(configurator, case.ini)

    error = raised.value
    assert type(error) is ConfigurationError
    message = str(error)
    for name in case.names:
        assert name in message, f'{name!r} not named in: {message}'
    assert '\n' not in message
    # Raised by tgext.evolve's own checks, not by whatever failed deep inside.
    assert pathlib.Path(raised.traceback[-1].path).resolve().parent in (
        PACKAGE_DIR, PACKAGE_DIR / 'backends'), raised.traceback[-1]
    if case.fails_at == 'make_wsgi_app':
        assert [f for f in raised.traceback if f.name == 'make_wsgi_app'], 'not at start-up'


def test_plugme_refuses_what_is_not_a_configurator():
    with pytest.raises(ConfigurationError, match='neither an AppConfig nor an application '
                                                 'configurator'):
        tgext.evolve.plugme(object(), {'evolutions': [Valid]})


def test_plugme_twice_with_conflicting_settings_is_refused(tg_apps, sqlite_database_url):
    model = tg_apps.model(('sqlite', sqlite_database_url))
    configurator = tg_apps.configurator(('fullstack', 'plugme'), model,
                                        {'evolutions': [Valid], 'lease': 10})
    with pytest.raises(ConfigurationError, match=r"'lease' given twice .*10.*20"):
        tgext.evolve.plugme(configurator, {'evolutions': [Valid], 'lease': 20})


# --- the limits themselves are usable -------------------------------------------------------------

def test_longest_allowed_evolution_id_is_stored_and_applied(tg_apps, database_url):
    """The limit of the checks is what every database stores: an id of exactly
    MAX_ID_LENGTH characters registers, runs and is recorded."""
    model = tg_apps.model(database_url)
    longest = 'e' * MAX_ID_LENGTH
    app = tg_apps.build(('fullstack', 'plugme'), model, [NoteEvolution(longest, model)])
    app.wait_until_serving()
    assert app.history()[longest].state == APPLIED
    assert model.notes() == [longest]


def test_valid_ini_values_are_accepted_and_win_over_plugme_options(tg_apps, sqlite_database_url):
    """The other side of the table: values as an .ini spells them start the application, and
    the .ini overrides what ``plugme`` said."""
    model = tg_apps.model(('sqlite', sqlite_database_url))
    ini_values = {'enabled': 'Yes', 'lease': ' 2.5 ', 'retry_after': '0', 'on_failure': 'SERVE',
                  'readonly': 'on', 'poll_interval': '0.5'}
    app = tg_apps.build(('fullstack', 'plugme'), model, [Valid],
                        options={'lease': 30, 'on_failure': 'block'},
                        app_conf={f'tgext.evolve.{k}': v for k, v in ini_values.items()})
    assert app.service.settings == Settings(enabled=True, lease=2.5, retry_after=0,
                                            on_failure='serve', readonly=True, poll_interval=0.5)
    app.wait_until_serving()
