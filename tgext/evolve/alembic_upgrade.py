"""Alembic schema upgrades under tgext.evolve's lock and gate, in the same plan as evolutions.

:class:`AlembicUpgrade` is a *repeatable* evolution: its fingerprint is the revision(s) it
upgrades to, so it runs again whenever a release brings a new head, and data evolutions can
``depends_on`` it.  Alembic is imported only when an upgrade is planned or run: it is an
optional dependency (``tgext.evolve[alembic]``).
"""
# Type hints for readers and checkers, never evaluated: that would cost every process start-up.
from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Optional, Sequence

from . import logs
from .errors import ConfigurationError
from .evolution import Evolution
from .records import MAX_ID_LENGTH

log = logs.alembic


class AlembicUpgrade(Evolution):
    """``alembic upgrade <revision>`` on the application's database, run by tgext.evolve.

    ``script_location`` is the Alembic script directory (``migration`` in a quickstarted
    TurboGears app): a path, relative to the directory of the application's .ini file (or to
    the working directory without one), or a ``package:directory`` resource.  ``revision`` is
    what ``alembic upgrade`` takes (``head``, ``heads`` or a revision id).  The evolution id
    defaults to ``alembic:<script_location>``.

    The script directory's own ``env.py`` runs, so its options (``version_table``, ...) apply.
    It is handed the connection of tgext.evolve's transaction as
    ``config.attributes['connection']``; an ``env.py`` that uses it (Alembic's documented
    recipe for sharing a connection) upgrades in the same transaction as the history record,
    so on PostgreSQL and SQLite the schema change and its record commit together or not at
    all.  On MySQL/MariaDB every DDL statement commits by itself, as with ``alembic upgrade``
    run by hand: revisions recorded in Alembic's version table never run twice, but one
    interrupted half-way (process killed, lease lost) stays half-applied and the next attempt
    fails until it is repaired by hand.  An ``env.py`` that ignores the connection opens its
    own from ``sqlalchemy.url`` (set to the application's engine URL): the upgrade still runs
    under the lock, but commits apart from its record (a warning says so).
    """

    def __init__(self, script_location: str = 'migration', revision: str = 'head', *,
                 evolution_id: Optional[str] = None, depends_on: Sequence[str] = ()) -> None:
        if not isinstance(script_location, str) or not script_location.strip():
            raise ConfigurationError(
                f'AlembicUpgrade: script_location must be a directory name, not '
                f'{script_location!r}')
        if not isinstance(revision, str) or not revision.strip():
            raise ConfigurationError(
                f'AlembicUpgrade({script_location!r}): revision must be a revision name such as '
                f'"head", not {revision!r}')
        self.script_location = script_location
        self.revision = revision
        self.evolution_id = evolution_id or f'alembic:{script_location}'
        self.depends_on = depends_on

    def fingerprint(self) -> str:
        """The revision id(s) ``revision`` stands for today: a new head means a new upgrade."""
        if self.config is not None and self._engine() is None:
            raise ConfigurationError(
                f'evolution {self.evolution_id!r}: Alembic upgrades need an application on '
                f'SQLAlchemy (use_sqlalchemy = True)')
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError
        try:
            targets = ScriptDirectory.from_config(self._alembic_config()).get_revisions(
                self.revision)
        except CommandError as e:
            raise ConfigurationError(
                f'evolution {self.evolution_id!r}: cannot resolve Alembic revision '
                f'{self.revision!r} in {self._script_directory()!r}: {e}') from e
        fingerprint = ' '.join(sorted(script.revision for script in targets if script)) or 'base'
        if len(fingerprint) > MAX_ID_LENGTH:
            fingerprint = 'sha256:' + hashlib.sha256(fingerprint.encode()).hexdigest()
        return fingerprint

    def evolve(self) -> None:
        from alembic import command
        from sqlalchemy import event
        engine = self._engine()
        config: Mapping[str, Any] = self.config or {}  # set by the runner before evolve()
        session = config.get('SQLASession') or config['DBSession']
        # The session's connection to that engine is the one tgext.evolve writes the history
        # record on when evolve() returns: the same database transaction.
        connection = session().connection(bind_arguments={'bind': engine})
        alembic_config = self._alembic_config(url=engine.url)
        alembic_config.attributes['connection'] = connection
        statements = []

        def on_statement(*args):
            statements.append(None)

        # Listening, not asking env.py: whether it used the connection is only known by use.
        event.listen(connection, 'before_cursor_execute', on_statement)
        try:
            command.upgrade(alembic_config, self.revision)
        finally:
            event.remove(connection, 'before_cursor_execute', on_statement)
        if not statements:
            log.warning("%r: %s/env.py ignores config.attributes['connection']: the upgrade ran "
                        "on a connection of its own and committed apart from its history record",
                        self.evolution_id, self._script_directory())

    def _engine(self):
        # The master, when the application balances reads over replicas.
        return getattr(self.config.get('tg.app_globals'), 'sa_engine', None)

    def _script_directory(self):
        location = self.script_location
        here = (self.config or {}).get('here')
        if here and not os.path.isabs(location) and ':' not in location:
            location = os.path.join(here, location)
        return location

    def _alembic_config(self, url=None):
        from alembic.config import Config
        alembic_config = Config()
        # Config values go through ConfigParser interpolation: a literal % is written %%.
        alembic_config.set_main_option('script_location',
                                       self._script_directory().replace('%', '%%'))
        if url is not None:
            alembic_config.set_main_option(
                'sqlalchemy.url', url.render_as_string(hide_password=False).replace('%', '%%'))
        return alembic_config

    def __repr__(self):
        return (f'<AlembicUpgrade {self.evolution_id!r}: upgrade {self.script_location!r} '
                f'to {self.revision!r}>')

