"""A real pgbouncer in front of this run's PostgreSQL database, started and stopped by the tests.

Debian's ``pgbouncer`` package (``apt-get install pgbouncer``; ``.ci/run`` installs it) runs as
a child of the test process, never as a system service: on a free 127.0.0.1 port, in
``pool_mode = transaction`` (each transaction of a client may run on another server
connection: what breaks session state such as named prepared statements), with its
configuration, log and pid file in a temporary directory of its own.  It forwards the one
database of this run under the same name, so a URL through it differs only by its port.

``auth_type = trust``, as the PostgreSQL server of the test set-up: pgbouncer then only checks
that the user is in its ``auth_file``, and logs in to the server as that user (with the URL's
password, if it has one).  pgbouncer refuses to run as root: under root it runs as the
``postgres`` user (``nobody`` where there is none).
"""
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import socket
import tempfile

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import polling

#: Where Debian installs it; sbin directories are not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get('PATH', ''), '/usr/sbin', '/usr/local/sbin'])
INSTALL_HINT = ('install it from your distribution (Debian/Ubuntu: `apt-get install pgbouncer`; '
                '.ci/run does it), or unset TGEXT_EVOLVE_TEST_POSTGRES_URL to skip the '
                'PostgreSQL tests')
#: From start to the first query answered through it.
START_DEADLINE = 30.0
STOP_DEADLINE = 10.0
#: Server connections per database: fewer than the tests' processes, so that clients share
#: them and one client's consecutive transactions run on different server connections.
DEFAULT_POOL_SIZE = 4
#: Starting tries: the free port found may be taken before pgbouncer binds it.
START_TRIES = 3


def executable():
    """The pgbouncer program, or None."""
    return shutil.which('pgbouncer', path=SEARCH_PATH)


def _unprivileged_user():
    for name in ('postgres', 'nobody'):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError('pgbouncer will not run as root, and there is no postgres or nobody user')


def _free_port():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def _quoted(value):
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """One pgbouncer process in front of the PostgreSQL database at ``server_url``.

    ``url``
        ``server_url`` through pgbouncer (same user, database and driver).
    ``admin_query(command)``
        the rows of a console command (``SHOW SERVERS``...), through pgbouncer's admin console.
    ``connections(database)``
        ``{'clients': n, 'servers': n}``: connections of ``database`` on each side, now.
    ``reconnect()``
        fresh server connections from now on: nothing an earlier test left in a server session
        (a prepared statement) is seen by the next one.
    ``log_text()``
        what pgbouncer logged so far.
    """

    def __init__(self, server_url, pool_mode='transaction', default_pool_size=DEFAULT_POOL_SIZE):
        self.program = executable()
        if self.program is None:
            raise FileNotFoundError(f'pgbouncer is not installed: {INSTALL_HINT}')
        self.server = make_url(server_url)
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.directory = tempfile.mkdtemp(prefix='tgext-evolve-pgbouncer-')
        self.port = None
        self.popen = None
        self._log = None

    def __repr__(self):
        return f'<PgBouncer {self.pool_mode} 127.0.0.1:{self.port} pid {self.pid}>'

    @property
    def pid(self):
        return None if self.popen is None else self.popen.pid

    @property
    def url(self):
        return self.server.set(host='127.0.0.1', port=self.port).render_as_string(
            hide_password=False)

    def _path(self, name):
        return os.path.join(self.directory, name)

    def _write_config(self):
        server = self.server
        database = server.database
        user = server.username or 'postgres'
        target = ' '.join(f'{key}={value}' for key, value in (
            ('host', server.host or '127.0.0.1'), ('port', server.port or 5432),
            ('dbname', database)))
        with open(self._path('userlist.txt'), 'w') as f:
            f.write(f'{_quoted(user)} {_quoted(server.password or "")}\n')
        with open(self._path('pgbouncer.ini'), 'w') as f:
            f.write(f"""\
[databases]
{database} = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
; no unix socket: nothing outside this directory and this port
unix_socket_dir =
pidfile = {self._path('pgbouncer.pid')}
auth_type = trust
auth_file = {self._path('userlist.txt')}
admin_users = {user}
pool_mode = {self.pool_mode}
default_pool_size = {self.default_pool_size}
max_client_conn = 1000
""")

    def start(self):
        """Start pgbouncer and wait until it answers a query, with a deadline."""
        if os.geteuid() == 0:
            user = _unprivileged_user()
            os.chown(self.directory, user.pw_uid, user.pw_gid)
            as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        else:
            as_user = {}
        self._log = open(self._path('pgbouncer.log'), 'ab')
        for attempt in range(1, START_TRIES + 1):
            self.port = _free_port()
            self._write_config()
            # In the foreground (no -d): a child of this process, whose output is its log.
            self.popen = subprocess.Popen(
                [self.program, self._path('pgbouncer.ini')], stdout=self._log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.directory,
                **as_user)
            try:
                polling.wait_until(self._answers, f'pgbouncer answering on port {self.port}',
                                   START_DEADLINE, 0.05)
                return self
            except _Exited:
                if attempt == START_TRIES or 'Address already in use' not in self.log_text():
                    raise RuntimeError(f'pgbouncer exited with {self.popen.returncode}:\n'
                                       f'{self.log_text()[-3000:]}') from None

    def _answers(self):
        if self.popen.poll() is not None:
            raise _Exited()
        engine = sa.create_engine(self.url, poolclass=NullPool,
                                  connect_args={'connect_timeout': 2})
        try:
            with engine.connect() as conn:
                return conn.exec_driver_sql('SELECT 1').scalar_one() == 1
        except sa.exc.OperationalError:
            return False
        finally:
            engine.dispose()

    def admin_query(self, command):
        """Rows (as dicts) of a pgbouncer console command (``SHOW SERVERS``), [] for a command
        without rows (``RECONNECT``)."""
        import psycopg
        user = self.server.username or 'postgres'
        # The console speaks the simple query protocol only, outside transactions.
        with psycopg.connect(host='127.0.0.1', port=self.port, dbname='pgbouncer', user=user,
                             password=self.server.password, autocommit=True,
                             prepare_threshold=None, connect_timeout=5) as conn:
            cursor = conn.cursor()
            cursor.execute(command.encode())
            if cursor.description is None:
                return []
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def connections(self, database=None):
        database = database or self.server.database
        return {side: sum(1 for row in self.admin_query(f'SHOW {side.upper()}')
                          if row['database'] == database)
                for side in ('clients', 'servers')}

    def reconnect(self):
        self.admin_query(f'RECONNECT {self.server.database}')

    def log_text(self):
        try:
            with open(self._path('pgbouncer.log'), errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def stop(self):
        """SIGTERM (pgbouncer's immediate shutdown), SIGKILL past the deadline; then remove its
        directory."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_DEADLINE)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class _Exited(Exception):
    """pgbouncer exited while it was being waited for."""


def started(server_url, **options):
    """A started :class:`PgBouncer` (the caller stops it)."""
    bouncer = PgBouncer(server_url, **options)
    try:
        return bouncer.start()
    except BaseException:
        bouncer.stop()
        raise

