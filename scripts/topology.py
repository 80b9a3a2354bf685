#!/usr/bin/env python3
"""The production topology on one machine: real nginx in front of N gunicorn replicas.

    .venv/bin/python scripts/topology.py up --replicas 3 --port 8080 [--pgbouncer]

Each replica is `start.sh` (retention step, then gunicorn with gunicorn.conf.py) on a free
loopback port, named by REPLICA_ID (the `X-Served-By` response header). nginx runs Debian's
binary with the production template nginx/nginx.conf rendered for those ports, its own
prefix, pid file and logs in a private directory. With `--pgbouncer`, Debian's pgbouncer in
transaction mode stands between the replicas and the database (DEFAULT_DB_PGBOUNCER=transaction).
Ctrl-C stops everything.

As a library (the tests): `with topology(3, database, workdir) as top: top.url ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import psycopg2
import requests

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / 'nginx' / 'nginx.conf'
VENV_BIN = Path(sys.executable).parent
NGINX_CANDIDATES = ('/usr/sbin/nginx', '/usr/local/sbin/nginx', '/usr/local/nginx/sbin/nginx')
PGBOUNCER_CANDIDATES = ('/usr/sbin/pgbouncer', '/usr/bin/pgbouncer', '/usr/local/bin/pgbouncer')
# pgbouncer refuses to run as root: as root it runs as this OS user (Debian's PostgreSQL owner).
PGBOUNCER_OS_USER = 'postgres'
# pgbouncer's settings for a local run; its startup-parameter handling stays its default.
PGBOUNCER_DEFAULTS = {
    'pool_mode': 'transaction',
    'max_client_conn': '1000',
    'default_pool_size': '20',
    # pgbouncer's defaults hold a request for 120 s while PostgreSQL is down and wait 15 s
    # after a failed login before trying again: the service would answer late, then not at all.
    'query_wait_timeout': '5',
    'server_login_retry': '1',
}
PLACEHOLDER = re.compile(r'\$\{([A-Z][A-Z0-9_]*)\}')
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 40.0  # above gunicorn's graceful_timeout (30 s)
MAX_CONTENT_LENGTH = str(20 * 1024 * 1024)
DATABASE_VARIABLES = {'dbname': 'NAME', 'user': 'USER', 'password': 'PASS', 'host': 'HOST', 'port': 'PORT'}
NGINX_DEFAULTS = {
    'NGINX_RESOLVER': '127.0.0.1',  # unused locally: the servers are addresses, nothing to resolve
    'MAX_CONTENT_LENGTH': MAX_CONTENT_LENGTH,
    'NGINX_RATE_LIMIT': '100000r/s',
    'NGINX_RATE_BURST': '100000',
    'NGINX_WORKER_PROCESSES': '1',  # as the stack runs it: one worker per CPU of its limit
}


class TopologyError(RuntimeError):
    """A process did not start or stop as expected; the message says which and why."""


def find_nginx() -> str | None:
    """Debian's nginx binary (usually not on a non-root PATH), or None."""
    found = shutil.which('nginx')
    if found:
        return found
    return next((path for path in NGINX_CANDIDATES if os.access(path, os.X_OK)), None)


def find_pgbouncer() -> str | None:
    """Debian's pgbouncer binary (in /usr/sbin, often not on a non-root PATH), or None."""
    found = shutil.which('pgbouncer')
    if found:
        return found
    return next((path for path in PGBOUNCER_CANDIDATES if os.access(path, os.X_OK)), None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def render(template: str, values: Mapping[str, str]) -> str:
    """`${NAME}` replaced from `values` (envsubst's way); an unset NAME is an error naming it."""
    missing = sorted({name for name in PLACEHOLDER.findall(template) if name not in values})
    if missing:
        raise TopologyError(f'nginx template needs {", ".join(missing)}: set them')
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def upstream_servers(ports: list[int]) -> str:
    """Loopback replicas, never marked failed: a refused port costs nothing to retry, and a
    replica restarted on the same port must get traffic at once (Swarm's get new addresses)."""
    return ' '.join(f'server 127.0.0.1:{port} max_fails=0;' for port in ports)


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:])
    return ''


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TopologyError(f'{what} within {timeout:g} s')


class Replica:
    """One gunicorn master and its workers, started through start.sh like the container."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.stderr_path = log_dir / f'{name}.stderr'
        self.env = {**env, 'BIND': f'127.0.0.1:{self.port}', 'REPLICA_ID': name}
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f'<Replica {self.name} {self.url} pid={self.process.pid if self.process else None}>'

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, wait: bool = True) -> None:
        with self.stderr_path.open('ab') as stderr:
            self.process = subprocess.Popen(
                [str(ROOT / 'start.sh')],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # our own group: a Ctrl-C in a terminal goes to us first
            )
        if wait:
            self.wait_ready()

    def ready(self) -> bool:
        if not self.running:
            raise TopologyError(f'{self.name} exited with {self.process.returncode}:\n{tail(self.stderr_path)}')
        try:
            return requests.get(f'{self.url}/health/ready', timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self) -> None:
        wait_until(self.ready, START_TIMEOUT_SECONDS, f'{self.name} was not ready on {self.url}')

    def terminate(self) -> None:
        """SIGTERM without waiting (stop() then waits): several replicas drain at once."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the master (start.sh exec'd it: same pid) and wait for it; its exit code."""
        if not self.running:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise TopologyError(f'{self.name} did not stop within {STOP_TIMEOUT_SECONDS:g} s: killed') from None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Nginx:
    """Debian's nginx with the rendered template, its prefix, pid and logs under `directory`."""

    def __init__(self, directory: Path, ports: list[int], port: int = 0, **values: str) -> None:
        self.binary = find_nginx()
        if self.binary is None:
            raise TopologyError('nginx is not installed: run scripts/ensure_tools.sh as root (apt-get install nginx)')
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.conf = directory / 'nginx.conf'
        self.access_log = directory / 'nginx-access.log'
        self.stderr_path = directory / 'nginx.stderr'
        self.values = {
            **NGINX_DEFAULTS,
            'NGINX_LISTEN': f'127.0.0.1:{self.port}',
            'NGINX_ACCESS_LOG': str(self.access_log),
            **values,
        }
        self.ports = list(ports)
        self.process: subprocess.Popen[bytes] | None = None

    @cached_property
    def prefix(self) -> Path:
        """nginx's prefix: its pid and the temp files of bodies too large to buffer in memory.

        Run as root, nginx's workers drop to `nobody`, who cannot reach a temp dir inside a
        0700 directory (pytest's, a user's home); the prefix is then a directory of its own
        under the system temp dir that they can traverse.
        """
        if os.geteuid() != 0:
            return self.directory
        prefix = Path(tempfile.mkdtemp(prefix='dbapi-nginx-'))
        prefix.chmod(0o755)
        return prefix

    def command(self, *extra: str) -> list[str]:
        return [self.binary, '-p', f'{self.prefix}/', '-c', str(self.conf), '-e', 'stderr', *extra]

    def write_conf(self) -> None:
        values = {**self.values, 'NGINX_UPSTREAM_SERVERS': upstream_servers(self.ports)}
        self.conf.write_text(render(TEMPLATE.read_text(), values))

    def test(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the rendered configuration."""
        self.write_conf()
        return subprocess.run(self.command('-t'), capture_output=True, text=True, timeout=30, check=False)

    def start(self) -> None:
        """Check, start and wait until it listens; a failure stops it and removes its prefix."""
        try:
            checked = self.test()
            if checked.returncode != 0:
                raise TopologyError(f'nginx -t rejected {self.conf}:\n{checked.stderr}')
            with self.stderr_path.open('ab') as stderr:
                self.process = subprocess.Popen(
                    self.command('-g', 'daemon off;'), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
                )
            wait_until(self.listening, START_TIMEOUT_SECONDS, f'nginx did not listen on {self.url}')
        except BaseException:
            self.stop()  # callers stop what started; one that failed to start leaves nothing behind
            raise

    def listening(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise TopologyError(f'nginx exited:\n{tail(self.stderr_path)}')
        with socket.socket() as probe:
            return probe.connect_ex(('127.0.0.1', self.port)) == 0

    def reload(self, ports: list[int] | None = None, **values: str) -> None:
        """New upstream list or values, applied gracefully (old workers finish their requests)."""
        if ports is not None:
            self.ports = list(ports)
        self.values.update(values)
        checked = self.test()
        if checked.returncode != 0:
            raise TopologyError(f'nginx -t rejected {self.conf}:\n{checked.stderr}')
        self.process.send_signal(signal.SIGHUP)
        time.sleep(0.3)  # the new workers take over within milliseconds; give them margin

    def stop(self) -> None:
        try:
            self._stop_process()
        finally:
            if self.prefix != self.directory:
                shutil.rmtree(self.prefix, ignore_errors=True)

    def _stop_process(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)  # graceful: finish requests in flight
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def quoted(text: str) -> str:
    """A value of pgbouncer's auth file: double-quoted, inner quotes doubled."""
    return '"' + text.replace('"', '""') + '"'


class PgBouncer:
    """Debian's pgbouncer in front of one PostgreSQL server: every database name is passed
    through (`* = host=... port=...`), clients log in with the database's own user and password.

    Its configuration, auth file and log live in a private directory; as root, one of its own
    under the system temp dir owned by PGBOUNCER_OS_USER, since pgbouncer will not run as root.
    """

    def __init__(self, directory: Path, database: Mapping[str, Any], port: int = 0, **settings: str) -> None:
        self.binary = find_pgbouncer()
        if self.binary is None:
            raise TopologyError(
                'pgbouncer is not installed: run scripts/ensure_tools.sh as root (apt-get install pgbouncer)'
            )
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.server = {
            'host': str(database.get('host') or '/var/run/postgresql'),
            'port': str(database.get('port') or 5432),
        }
        self.user = str(database.get('user') or getpass.getuser())  # libpq's default user
        self.password = str(database.get('password') or '')
        self.settings = {**PGBOUNCER_DEFAULTS, **settings}
        self.stderr_path = self.directory / 'pgbouncer.stderr'
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f'<PgBouncer 127.0.0.1:{self.port} -> {self.server["host"]}:{self.server["port"]}>'

    @cached_property
    def home(self) -> Path:
        """Where the configuration, auth file and log are: readable by the user pgbouncer runs as."""
        if os.geteuid() != 0:
            return self.directory
        home = Path(tempfile.mkdtemp(prefix='dbapi-pgbouncer-'))
        entry = pwd.getpwnam(PGBOUNCER_OS_USER)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        return home

    @property
    def conf(self) -> Path:
        return self.home / 'pgbouncer.ini'

    @property
    def log_path(self) -> Path:
        return self.home / 'pgbouncer.log'

    def params(self, dbname: str) -> dict[str, Any]:
        """Connection parameters of a client of this pgbouncer."""
        params: dict[str, Any] = {'host': '127.0.0.1', 'port': self.port, 'user': self.user, 'dbname': dbname}
        if self.password:
            params['password'] = self.password
        return params

    def write_conf(self) -> None:
        settings = {
            'listen_addr': '127.0.0.1',
            'listen_port': str(self.port),
            'unix_socket_dir': '',
            'logfile': str(self.log_path),
            'auth_type': 'scram-sha-256' if self.password else 'trust',
            'auth_file': str(self.home / 'userlist.txt'),
            'admin_users': self.user,
            **self.settings,
        }
        lines = ['[databases]', f'* = host={self.server["host"]} port={self.server["port"]}', '', '[pgbouncer]']
        lines += [f'{key} = {value}' for key, value in settings.items()]
        auth = self.home / 'userlist.txt'
        auth.write_text(f'{quoted(self.user)} {quoted(self.password)}\n')
        auth.chmod(0o600)
        self.conf.write_text('\n'.join(lines) + '\n')
        if self.home != self.directory:
            entry = pwd.getpwnam(PGBOUNCER_OS_USER)
            for path in (auth, self.conf):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def command(self) -> list[str]:
        """pgbouncer itself, so a signal reaches it (runuser would hold a SIGTERM for 2 s)."""
        user = ['-u', PGBOUNCER_OS_USER] if os.geteuid() == 0 else []
        return [self.binary, *user, str(self.conf)]

    def start(self) -> None:
        """Write the configuration, start, and wait until it listens."""
        self.write_conf()
        with self.stderr_path.open('ab') as stderr:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        try:
            wait_until(self.listening, START_TIMEOUT_SECONDS, f'pgbouncer did not listen on 127.0.0.1:{self.port}')
        except BaseException:
            self.stop()
            raise

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def listening(self) -> bool:
        if not self.running:
            raise TopologyError(f'pgbouncer exited:\n{tail(self.stderr_path)}\n{tail(self.log_path)}')
        with socket.socket() as probe:
            return probe.connect_ex(('127.0.0.1', self.port)) == 0

    def show(self, what: str) -> list[dict[str, Any]]:
        """`SHOW <what>` on the admin console: one dict per row."""
        conn = psycopg2.connect(**self.params('pgbouncer'), connect_timeout=2)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'SHOW {what}')
                names = [column.name for column in cursor.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: pgbouncer's immediate shutdown, every client connection closed."""
        try:
            if self.running:
                self.process.send_signal(sig)
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            if self.home != self.directory:
                with contextlib.suppress(OSError):
                    shutil.copy(self.log_path, self.directory / 'pgbouncer.log')
                shutil.rmtree(self.home, ignore_errors=True)
                del self.home  # a restart makes a new one

    def restart(self) -> None:
        self.stop()
        self.start()


def replica_env(database: Mapping[str, Any], log_dir: Path, replicas: int, **extra: str) -> dict[str, str]:
    """The environment of every replica: the caller's, the database, the logs, the sizing."""
    env = {
        **os.environ,
        'PYTHON': str(VENV_BIN / 'python'),
        'GUNICORN': str(VENV_BIN / 'gunicorn'),
        'LOG_DIR': str(log_dir),
        'API_REPLICAS': str(replicas),
        'WEB_CONCURRENCY': os.getenv('WEB_CONCURRENCY', '2'),
        'POOL_SIZE': os.getenv('POOL_SIZE', '2'),
        'PROXY_HOPS': '1',  # nginx appends the caller to X-Forwarded-For
        'GUNICORN_LOG_LEVEL': os.getenv('GUNICORN_LOG_LEVEL', 'warning'),
    }
    for key, suffix in DATABASE_VARIABLES.items():
        if database.get(key) not in (None, ''):
            env[f'DEFAULT_DB_{suffix}'] = str(database[key])
    env.update(extra)
    return env


class Topology:
    """N replicas and one nginx in front of them; every process is ours and torn down by close()."""

    def __init__(
        self, replicas: int, database: Mapping[str, Any], workdir: Path, nginx_port: int = 0, **env: str
    ) -> None:
        if replicas < 1:
            raise ValueError(f'replicas={replicas} must be at least 1')
        self.workdir = Path(workdir)
        self.log_dir = self.workdir / 'logs'  # shared by the replicas, like the stack's volume
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = replica_env(database, self.log_dir, replicas, **env)
        self.replicas = [Replica(f'replica-{index + 1}', self.env, self.log_dir) for index in range(replicas)]
        self.nginx = Nginx(self.workdir / 'nginx', [replica.port for replica in self.replicas], port=nginx_port)
        self.extra_nginx: list[Nginx] = []

    @property
    def url(self) -> str:
        return self.nginx.url

    def start(self) -> None:
        for replica in self.replicas:
            replica.start(wait=False)  # all boot at once
        for replica in self.replicas:
            replica.wait_ready()
        self.nginx.start()

    def another_nginx(self, name: str, ports: list[int] | None = None, **values: str) -> Nginx:
        """A second nginx from the same template (other limits, other upstreams), closed with the rest."""
        ports = [replica.port for replica in self.replicas] if ports is None else ports
        extra = Nginx(self.workdir / name, ports, **values)
        self.extra_nginx.append(extra)
        extra.start()
        return extra

    def restart_replica(self, replica: Replica, drain_seconds: float = 0.0) -> None:
        """A rolling-update step: SIGTERM (the replica drains itself), started again on its port.

        With `drain_seconds`, nginx first stops sending to it for that long, the way a
        balancer that knows about the stop would; without, nginx finds the port refused and
        sends elsewhere, as when Swarm stops a task nginx still resolves.
        """
        if drain_seconds:
            self.nginx.reload([other.port for other in self.replicas if other is not replica])
            time.sleep(drain_seconds)
        exit_code = replica.stop()
        if exit_code != 0:
            raise TopologyError(f'{replica.name} exited with {exit_code} on SIGTERM:\n{tail(replica.stderr_path)}')
        replica.start()
        if drain_seconds:
            self.nginx.reload([other.port for other in self.replicas])

    def close(self) -> None:
        for nginx in [self.nginx, *self.extra_nginx]:
            nginx.stop()
        for replica in self.replicas:
            replica.terminate()
        for replica in self.replicas:
            with contextlib.suppress(TopologyError):
                replica.stop()
            replica.kill()


@contextlib.contextmanager
def topology(
    replicas: int, database: Mapping[str, Any], workdir: Path, nginx_port: int = 0, **env: str
) -> Iterator[Topology]:
    """Started replicas and nginx; everything stopped on the way out, whatever happened."""
    running = Topology(replicas, database, workdir, nginx_port, **env)
    try:
        running.start()
        yield running
    finally:
        running.close()


def settings_database() -> dict[str, Any]:
    """The default database as settings.py reads it from the environment (the CLI's case)."""
    sys.path.insert(0, str(ROOT))
    from lib.core.config import DEFAULT_DATABASE, databases_from, environment

    return {key: value for key, value in databases_from(environment())[DEFAULT_DATABASE].items() if value}


def interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def pgbouncer_in_front(database: Mapping[str, Any], workdir: Path) -> Iterator[tuple[dict[str, Any], PgBouncer]]:
    """A started pgbouncer in front of `database`, and the database as the replicas reach it."""
    pooler = PgBouncer(workdir / 'pgbouncer', database)
    pooler.start()
    try:
        yield {**database, **pooler.params(str(database.get('dbname') or pooler.user))}, pooler
    finally:
        pooler.stop()


def up(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or ROOT / '.local' / 'topology').resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    signal.signal(signal.SIGTERM, interrupt)
    with contextlib.ExitStack() as stack:
        database, env = settings_database(), {}
        if args.pgbouncer:
            database, pooler = stack.enter_context(pgbouncer_in_front(database, workdir))
            env['DEFAULT_DB_PGBOUNCER'] = 'transaction'
            print(f'pgbouncer (transaction mode) on 127.0.0.1:{pooler.port}, log {pooler.log_path}', flush=True)
        running = stack.enter_context(topology(args.replicas, database, workdir, args.port, **env))
        print(f'nginx on {running.url} in front of {len(running.replicas)} replicas:', flush=True)
        for replica in running.replicas:
            print(f'  {replica.name}  {replica.url}  pid {replica.process.pid}', flush=True)
        print(f'logs in {running.log_dir} (app) and {running.nginx.access_log} (nginx); Ctrl-C stops', flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while all(replica.running for replica in running.replicas):
                time.sleep(0.5)
            print('a replica exited: stopping', file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='nginx in front of N dbapi replicas on this machine')
    commands = parser.add_subparsers(dest='command', required=True)
    start = commands.add_parser('up', help='start, run in the foreground, stop everything on Ctrl-C')
    start.add_argument('--replicas', type=int, default=3)
    start.add_argument('--port', type=int, default=8080, help='nginx port on 127.0.0.1 (0: a free one)')
    start.add_argument('--workdir', help='private directory for logs and nginx (default .local/topology)')
    start.add_argument(
        '--pgbouncer', action='store_true', help="Debian's pgbouncer in transaction mode between replicas and database"
    )
    args = parser.parse_args(argv)
    try:
        return up(args)
    except TopologyError as error:
        print(f'topology: {error}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    raise SystemExit(main())
