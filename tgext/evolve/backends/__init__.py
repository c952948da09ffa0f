"""Storage backends: one class per database family behind :class:`~.base.Backend`."""
from tg.support.converters import asbool

from ..errors import ConfigurationError


def backend_for_config(conf):
    """The backend for the database the TurboGears application configured.

    Called once the engine or datastore exists (TG's ``config_setup`` hook, or the CLI after
    ``setup``).  SQLAlchemy wins when an application configured both.
    """
    app_globals = conf.get('tg.app_globals')
    if asbool(conf.get('use_sqlalchemy', False)):
        try:
            from .sqlalchemy import SQLAlchemyBackend
        except ImportError as e:
            raise ConfigurationError(
                f'tgext.evolve: the application uses SQLAlchemy but {e.name} is not installed; '
                f'install "tgext.evolve[sqlalchemy]"') from e
        engine = getattr(app_globals, 'sa_engine', None)
        if engine is None:
            raise ConfigurationError('tgext.evolve: use_sqlalchemy is on but TurboGears created '
                                     'no engine (check sqlalchemy.url)')
        return SQLAlchemyBackend(engine, conf.get('SQLASession') or conf.get('DBSession'))
    if asbool(conf.get('ming.enabled', conf.get('use_ming', False))):
        try:
            from .ming import MingBackend
        except ImportError as e:
            raise ConfigurationError(
                f'tgext.evolve: the application uses Ming but {e.name} is not installed; '
                f'install "tgext.evolve[ming]"') from e
        datastore = getattr(app_globals, 'ming_datastore', None)
        if datastore is None:
            raise ConfigurationError('tgext.evolve: use_ming is on but TurboGears created no '
                                     'Ming datastore (check ming.url and ming.db)')
        return MingBackend(datastore.db, conf.get('MingSession') or conf.get('DBSession'))
    raise ConfigurationError(
        'tgext.evolve needs the application database, but neither SQLAlchemy '
        '(use_sqlalchemy = True) nor Ming (use_ming = True) is configured; '
        'set tgext.evolve.enabled = false to run without it')
