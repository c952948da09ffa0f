"""tgext.evolve's loggers: ``tgext.evolve`` and one child per part, so that operators can quiet
one part from their .ini (``[logger_tgext.evolve.heartbeat]``) and keep the others.

Every line is written through the fork gate (:mod:`.forking`): a thread writing to a buffered
``sys.stderr`` holds the buffer's lock, and a child forked at that instant blocks for good on
its first log line (measured: one uWSGI worker in about twenty, whose master was logging
"evolving ..." as it forked).
"""
import logging

from .forking import fork_gate

ROOT = 'tgext.evolve'

#: No line is longer than this many characters: its head and its tail are kept.  A database
#: error can carry a whole statement (megabytes of parameters), an exception any text.
MAX_LINE = 8_000


def capped_line(message, args):
    """``message % args``, cut in the middle to :data:`MAX_LINE` characters."""
    try:
        text = message % args if args else str(message)
    except (TypeError, ValueError, KeyError):  # a wrong format must not raise in the caller
        text = f'{message} {args!r}'
    if len(text) <= MAX_LINE:
        return text
    cut = len(text) - MAX_LINE + 40
    head = (len(text) - cut) // 2
    return f'{text[:head]}[... {cut} characters cut ...]{text[head + cut:]}'


class GatedLogger:
    """The logger ``name``, writing each line through :data:`~.forking.fork_gate`.

    The :class:`logging.Logger` is looked up at the first line: most parts log nothing in a
    process that starts on an evolved database, which need not pay for creating them.
    """

    def __init__(self, name, gate=fork_gate):
        self.name = name
        self._gate = gate
        self._found = None

    @property
    def _logger(self):
        if self._found is None:
            self._found = logging.getLogger(self.name)
        return self._found

    def log(self, level, message, *args, **kwargs):
        logger = self._logger
        if logger.isEnabledFor(level):
            line = capped_line(message, args)
            with self._gate.call():
                logger.log(level, '%s', line, **kwargs)

    def debug(self, message, *args, **kwargs):
        self.log(logging.DEBUG, message, *args, **kwargs)

    def info(self, message, *args, **kwargs):
        self.log(logging.INFO, message, *args, **kwargs)

    def warning(self, message, *args, **kwargs):
        self.log(logging.WARNING, message, *args, **kwargs)

    def error(self, message, *args, **kwargs):
        self.log(logging.ERROR, message, *args, **kwargs)

    def isEnabledFor(self, level):  # noqa: N802 - logging's spelling
        return self._logger.isEnabledFor(level)


def _part(name):
    return GatedLogger(f'{ROOT}.{name}')


#: The protocol: plan, lock, run, wait (``runner.py``).
runner = _part('runner')
#: Lease renewals and progress writes while an evolution runs (``heartbeat.py``).
heartbeat = _part('heartbeat')
#: What a backend notices about its database (a lease taken over, tables being created).
backend = _part('backend')
#: Upgrades of tgext.evolve's own storage (the schema version).
storage = _part('storage')
#: The per-process service: start, restart after a fork, disabled.
service = _part('service')
#: ``gearbox evolve`` and the operations behind it.
cli = _part('cli')
#: Alembic upgrades run as evolutions.
alembic = _part('alembic')
