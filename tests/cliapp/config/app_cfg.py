"""``base_config``, as in a quickstarted project, with tgext.evolve plugged in.

With ``CLIAPP_MING`` in the environment the application uses Ming (``ming.url`` in the .ini)
instead of SQLAlchemy: its evolutions are then only recorded (mark), never run.
"""
import os
from types import SimpleNamespace

from tg import FullStackApplicationConfigurator

import tgext.evolve

from .. import model
from ..controllers import RootController
from ..evolutions import EVOLUTIONS


class Globals:
    """The application's ``app_globals`` (a quickstart keeps it in lib/app_globals.py)."""


base_config = FullStackApplicationConfigurator()
base_config.update_blueprint({
    'root_controller': RootController(),
    'app_globals': Globals,
    'helpers': SimpleNamespace(),
    'renderers': ['json'],
    'default_renderer': 'json',
    'use_sqlalchemy': True,
    'model': model,
    'session.enabled': False,
    'cache.enabled': False,
    'i18n.enabled': False,
    'sa_auth.enabled': False,
    'trace_errors.enable': False,
    'debug': False,
})
if os.environ.get('CLIAPP_MING'):
    from .. import ming_model
    base_config.update_blueprint({'use_sqlalchemy': False, 'use_ming': True, 'model': ming_model,
                                  'tm.enabled': False})
tgext.evolve.plugme(base_config, {'evolutions': EVOLUTIONS})
