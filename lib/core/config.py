"""The one configuration object: every setting, read once from the environment and the dotenv
file, checked, and typed.

`ENVIRONMENT` (default `local`) selects `env/<ENVIRONMENT>/.env`; a variable set in the process
environment wins over the file. A secret may also come from `<NAME>_FILE` (the Docker secrets
convention). `load()` is the only reader of the environment in the service: the app, logging,
gunicorn.conf.py and the start-up checks all read the `Config` it returns. Every check raises
`ConfigError` with one line naming the setting, so a wrong deployment fails at start instead of
serving an open, closed or half-working API.

`SETTINGS` lists every setting with its default and what it does: the docs' configuration page
is tested against it.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

APP_ID = 'dbapi'
BASE_DIR = Path(__file__).resolve().parents[2]  # the repository: env/, pyproject.toml
ENVIRONMENTS = ('local', 'testing', 'production')
DEFAULT_DATABASE = 'default'
# Tokens shipped in this repository for local use and tests: never valid in production.
KNOWN_TOKENS = frozenset({'local-dev-token', 'testing-token', 'changeme', 'secret', 'token'})
MIN_PRODUCTION_TOKEN_LENGTH = 24
MIN_LOG_BYTES = 4096
PGBOUNCER_MODES = ('transaction',)
DATABASE_PREFIX = re.compile(r'^([A-Z][A-Z0-9_]*)_DB_NAME$')


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: str
    help: str


# Every setting of the service, in the order the docs list them. `<NAME>_DB_*` stands for each
# database (`DEFAULT_DB_*` is the default one).
SETTINGS: tuple[Setting, ...] = (
    Setting('ENVIRONMENT', 'local', 'local, testing or production: selects env/<ENVIRONMENT>/.env and the checks'),
    Setting('BEARER', '', 'Tokens of the caller `default` (every scope), comma-separated; or BEARER_FILE'),
    Setting('CALLERS_FILE', '', "A TOML file of callers, their tokens' SHA-256 and their scopes"),
    Setting('JWT_JWKS_URL', '', "The identity provider's key set (JWTs need the URL, issuer and audience)"),
    Setting('JWT_ISSUER', '', 'The `iss` a JWT must carry'),
    Setting('JWT_AUDIENCE', '', 'The `aud` a JWT must carry'),
    Setting('JWT_SCOPE_CLAIM', 'scope', 'The claim holding the scopes (space-separated)'),
    Setting('JWT_CALLER_CLAIM', 'azp,sub', 'The claims naming the caller: the first present'),
    Setting('JWT_JWKS_COOLDOWN', '30', 'Seconds between fetches of the key set for an unknown key id'),
    Setting('JWT_JWKS_MAX_AGE', '300', 'Seconds after which the key set is fetched again'),
    Setting('<NAME>_DB_NAME', '', 'The database `<name>` (DEFAULT_DB_NAME is required)'),
    Setting('<NAME>_DB_USER', '', 'Its role'),
    Setting('<NAME>_DB_PASS', '', 'Its password; or <NAME>_DB_PASS_FILE'),
    Setting('<NAME>_DB_HOST', '', 'Its host; a path is a Unix socket directory; empty: libpq default'),
    Setting('<NAME>_DB_PORT', '5432', 'Its port'),
    Setting('<NAME>_DB_PGBOUNCER', '', '`transaction` when the host and port are pgbouncer in transaction mode'),
    Setting('<NAME>_DB_PGBOUNCER_POOL_SIZE', '', "pgbouncer's pool for the start-up check, if its console is closed"),
    Setting('<NAME>_DB_PGBOUNCER_MAX_CLIENT_CONN', '', "pgbouncer's max_client_conn, if its console is closed"),
    Setting('<NAME>_DB_MIGRATE_HOST', '', 'Where `migrate` connects instead: PostgreSQL itself, never pgbouncer'),
    Setting('<NAME>_DB_MIGRATE_PORT', '', "Its port (default: the database's own)"),
    Setting('MIGRATE_ON_START', '0', "1: gunicorn's master applies the pending migrations before forking"),
    Setting('EVENTS_AMQP_URL', '', 'The broker the relay publishes events to (amqp://...); or EVENTS_AMQP_URL_FILE'),
    Setting('EVENTS_RETENTION', str(7 * 24 * 3600), 'Seconds delivered events are kept in dbapi_outbox'),
    Setting('EVENTS_METRICS_PORT', '9108', "The port of the relay's own /metrics (0: none)"),
    Setting('POOL_SIZE', '4', 'Connections per database per worker'),
    Setting('POOL_TIMEOUT', '5', 'Seconds a request waits for a free connection (then 503)'),
    Setting('POOL_MAX_LIFETIME', '1800', 'Seconds a connection lives (less a random 0-10%)'),
    Setting('POOL_MAX_IDLE', '600', 'Seconds a connection may sit idle'),
    Setting('CONNECT_TIMEOUT', '3', 'Seconds to open a connection'),
    Setting('STATEMENT_TIMEOUT', '30000', 'Milliseconds a statement may run (then 504)'),
    Setting('MAX_CONTENT_LENGTH', str(20 * 1024 * 1024), 'The largest body accepted, in bytes (then 413)'),
    Setting('BATCH_MAX_ACTIONS', '100', 'The most actions one POST /batch may hold'),
    Setting('IDEMPOTENCY_TTL', '86400', "Seconds an Idempotency-Key's answer is kept"),
    Setting('COMPRESS_MIN_SIZE', '500', 'Answers at least this long are compressed when the client accepts it'),
    Setting('PROXY_HOPS', '0', 'Reverse proxies in front that append to X-Forwarded-For'),
    Setting('API_DOCS', '1', 'GET /openapi.json and /docs (0 turns both off)'),
    Setting('OPENAPI_SERVERS', '/', "The contract's servers, comma-separated URLs"),
    Setting('METRICS', '1', 'Prometheus series and GET /metrics (0 turns both off)'),
    Setting('REPLICA_ID', '', 'Names this replica in the X-Served-By header when set'),
    Setting('PROCESS_ID', APP_ID, 'Names the process in the logs (`app`: dbapi.<PROCESS_ID>)'),
    Setting('EXTRA_MODULES', '', 'Modules served by this deployment only, comma-separated import names'),
    Setting('DEBUG', '0', "Flask's debug mode (local only)"),
    Setting('LOG_LEVEL', 'INFO', 'The root logger level (access records are always written)'),
    Setting('LOG_DIR', 'logs', 'Where each process writes its JSON log file'),
    Setting('LOG_FORMAT', 'console in local, else json', '`console` adds readable lines on stderr'),
    Setting('LOG_STDOUT', '0', 'The JSON lines on stdout too (for a Docker log driver)'),
    Setting('LOG_MAX_BYTES', str(50 * 1024 * 1024), 'A log file rotates at this size'),
    Setting('LOG_BACKUP_COUNT', '5', 'Rotated files kept per process'),
    Setting('LOG_RETENTION_DAYS', '15', 'Log files older than this are deleted'),
    Setting('BIND', '0.0.0.0:8000', "gunicorn's address"),
    Setting('WEB_CONCURRENCY', '2 x CPUs + 1', "gunicorn's workers per replica"),
    Setting('WORKER_CLASS', 'lib.server.gunicorn_worker.DrainingKeepAliveWorker', "gunicorn's worker"),
    Setting('THREADS', '1', 'Threads per worker (gthread only; POOL_SIZE should be at least this)'),
    Setting('WORKER_TIMEOUT', '60', 'Seconds before a silent worker is restarted'),
    Setting('GRACEFUL_TIMEOUT', '30', 'Seconds in-flight requests get to finish on SIGTERM'),
    Setting('KEEPALIVE', '5', 'Seconds an idle kept-alive connection stays open'),
    Setting('MAX_REQUESTS', '10000', 'Requests after which a worker is recycled (0: never)'),
    Setting('MAX_REQUESTS_JITTER', '1000', 'A random 0 to this many more, so workers do not recycle together'),
    Setting('GUNICORN_LOG_LEVEL', 'info', "gunicorn's own log level"),
    Setting('API_REPLICAS', '1', 'Replicas of the service: the start-up check of the connection budget'),
    Setting('PROMETHEUS_MULTIPROC_DIR', 'a directory of the master', "Where the workers' metric files go"),
)


def default_of(name: str) -> str:
    """The documented default of setting `name`."""
    return next(setting.default for setting in SETTINGS if setting.name == name)


class ConfigError(Exception):
    """A setting is missing or wrong; the message names it."""


def parse_int(name: str, value: Any, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f'{name}={value!r} is not a whole number') from None
    if number < minimum:
        raise ConfigError(f'{name}={number} must be at least {minimum}')
    return number


def parse_float(name: str, value: Any, minimum: float = 0.0, inclusive: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f'{name}={value!r} is not a number') from None
    if number < minimum or (number == minimum and not inclusive):
        raise ConfigError(f'{name}={number:g} must be {"at least" if inclusive else "more than"} {minimum:g}')
    return number


def parse_flag(value: Any) -> bool:
    return str(value).strip().lower() in {'1', 'true', 'yes', 'on'}


def parse_servers(raw: Any) -> tuple[str, ...]:
    """OPENAPI_SERVERS: comma-separated (or a list); each an absolute path or an http(s) URL."""
    urls = [u.strip() for u in (raw.split(',') if isinstance(raw, str) else raw)]
    urls = [u for u in urls if u]
    if not urls:
        raise ConfigError('OPENAPI_SERVERS is empty: set it to / or to the URLs callers use')
    for url in urls:
        parts = urlsplit(url)
        absolute = parts.scheme in {'http', 'https'} and bool(parts.netloc)
        if not (absolute or (url.startswith('/') and not parts.netloc)) or any(c.isspace() for c in url):
            raise ConfigError(f'OPENAPI_SERVERS has {url!r}: each must be a path (/) or an http(s):// URL')
    return tuple(urls)


def parse_tokens(environment: str, raw: Any) -> tuple[bytes, ...]:
    """BEARER's tokens (comma-separated); none is fine when callers come from elsewhere."""
    tokens = [raw] if isinstance(raw, bytes) else [t.strip() for t in str(raw or '').split(',')]
    encoded = [t.encode('utf-8') if isinstance(t, str) else t for t in tokens if t]
    if environment == 'production':
        for token in encoded:
            if token.decode('utf-8', 'replace') in KNOWN_TOKENS:
                raise ConfigError('BEARER holds a default token: production needs a token of its own')
            if len(token) < MIN_PRODUCTION_TOKEN_LENGTH:
                raise ConfigError(f'BEARER has a token shorter than {MIN_PRODUCTION_TOKEN_LENGTH} characters')
    return tuple(encoded)


def parse_amqp_url(raw: Any) -> str:
    """EVENTS_AMQP_URL: empty (no relay in this deployment) or an amqp(s):// URL; the message
    never repeats the URL, which may hold a password."""
    url = str(raw or '').strip()
    if url and (urlsplit(url).scheme not in {'amqp', 'amqps'} or not urlsplit(url).hostname):
        raise ConfigError('EVENTS_AMQP_URL is not an amqp:// or amqps:// URL with a host')
    return url


@dataclass(frozen=True, slots=True)
class JwtSettings:
    jwks_url: str
    issuer: str
    audience: str
    scope_claim: str = 'scope'
    caller_claims: tuple[str, ...] = ('azp', 'sub')
    refetch_seconds: float = 30.0  # an unknown kid fetches the set at most this often
    max_age_seconds: float = 300.0  # the set is fetched again (in the background) when this old


def parse_jwt(raw: Mapping[str, Any]) -> JwtSettings | None:
    """JWT_* settings: the key set's URL, the issuer and the audience all three, or none."""
    names = ('JWT_JWKS_URL', 'JWT_ISSUER', 'JWT_AUDIENCE')
    url, issuer, audience = (str(raw.get(name) or '').strip() for name in names)
    given = [name for name, value in zip(names, (url, issuer, audience), strict=True) if value]
    if not given:
        return None
    if len(given) < len(names):
        missing = ', '.join(name for name in names if name not in given)
        raise ConfigError(f'{", ".join(given)} set without {missing}: JWTs need all three')
    if urlsplit(url).scheme not in {'http', 'https'} or not urlsplit(url).netloc:
        raise ConfigError(f'JWT_JWKS_URL={url!r} is not an http(s):// URL')
    scope_claim = str(raw.get('JWT_SCOPE_CLAIM') or '').strip()
    caller_claims = tuple(c.strip() for c in str(raw.get('JWT_CALLER_CLAIM') or '').split(',') if c.strip())
    if not scope_claim or not caller_claims:
        raise ConfigError('JWT_SCOPE_CLAIM and JWT_CALLER_CLAIM must name claims (defaults: scope; azp,sub)')
    return JwtSettings(
        url,
        issuer,
        audience,
        scope_claim,
        caller_claims,
        refetch_seconds=parse_float('JWT_JWKS_COOLDOWN', raw['JWT_JWKS_COOLDOWN'], inclusive=True),
        max_age_seconds=parse_float('JWT_JWKS_MAX_AGE', raw['JWT_JWKS_MAX_AGE'], minimum=1, inclusive=True),
    )


@dataclass(frozen=True, slots=True)
class Pgbouncer:
    """A database reached through pgbouncer (`<NAME>_DB_PGBOUNCER`); the sizes, when set, stand in
    for what pgbouncer's admin console would tell the start-up check."""

    mode: str
    pool_size: int | None
    max_client_conn: int | None


@dataclass(frozen=True, slots=True)
class Database:
    """One named database: libpq's connection parameters, and pgbouncer when it stands in front."""

    name: str
    params: Mapping[str, Any]  # dbname, user, password, host, port: as psycopg2.connect takes them
    pgbouncer: Pgbouncer | None = None
    migrate: Mapping[str, Any] | None = None  # where `migrate` connects: params, host and port replaced

    def migrate_params(self) -> Mapping[str, Any]:
        """The connection `migrate` takes its session lock on: refused when that is the transaction
        pooler the service goes through (a pooler keeps no session of its own)."""
        target = self.migrate or self.params
        same = (target.get('host'), target.get('port')) == (self.params.get('host'), self.params.get('port'))
        if self.pgbouncer is not None and same:
            prefix = self.name.upper()
            raise ConfigError(
                f'{prefix}_DB_PGBOUNCER is set: migrate needs a session of its own, which a transaction pooler'
                f' does not keep; set {prefix}_DB_MIGRATE_HOST and {prefix}_DB_MIGRATE_PORT to PostgreSQL itself'
            )
        return target


# A database's settings by their environment suffix, and the key each has in an override's mapping.
DATABASE_KEYS = {
    'NAME': 'dbname',
    'USER': 'user',
    'PASS': 'password',  # nosec B105 - libpq's parameter name, not a password
    'HOST': 'host',
    'PORT': 'port',
    'PGBOUNCER': 'pgbouncer',
    'PGBOUNCER_POOL_SIZE': 'pgbouncer_pool_size',
    'PGBOUNCER_MAX_CLIENT_CONN': 'pgbouncer_max_client_conn',
    'MIGRATE_HOST': 'migrate_host',
    'MIGRATE_PORT': 'migrate_port',
}
PGBOUNCER_KEYS = ('pgbouncer', 'pgbouncer_pool_size', 'pgbouncer_max_client_conn')
MIGRATE_KEYS = ('migrate_host', 'migrate_port')  # where `migrate` connects instead


def optional_int(name: str, value: Any) -> int | None:
    return None if value in ('', None) else parse_int(name, value, minimum=1)


def parse_database(name: str, given: Mapping[str, Any]) -> Database:
    """One database from its settings (`given` uses DATABASE_KEYS' names); errors name the setting."""
    prefix = name.upper()
    if not given.get('dbname'):
        raise ConfigError(f'{prefix}_DB_NAME is not set for database {name!r}')
    port = parse_int(f'{prefix}_DB_PORT', given.get('port') or 5432, minimum=1)
    params = {
        key: value
        for key, value in dict(given, port=port).items()
        if value not in ('', None) and key not in PGBOUNCER_KEYS + MIGRATE_KEYS
    }
    migrate = dict(params)
    if given.get('migrate_host'):
        migrate['host'] = given['migrate_host']
    if given.get('migrate_port'):
        migrate['port'] = parse_int(f'{prefix}_DB_MIGRATE_PORT', given['migrate_port'], minimum=1)
    mode = str(given.get('pgbouncer') or '').strip()
    if not mode:
        for key in PGBOUNCER_KEYS[1:]:
            if given.get(key) not in ('', None):
                raise ConfigError(f'{prefix}_DB_{key.upper()} is set but {prefix}_DB_PGBOUNCER is not')
        return Database(name, params, None, migrate)
    if mode not in PGBOUNCER_MODES:
        raise ConfigError(
            f"{prefix}_DB_PGBOUNCER={mode!r} must be 'transaction' (pgbouncer's transaction pooling) or empty"
        )
    pgbouncer = Pgbouncer(
        mode,
        optional_int(f'{prefix}_DB_PGBOUNCER_POOL_SIZE', given.get('pgbouncer_pool_size')),
        optional_int(f'{prefix}_DB_PGBOUNCER_MAX_CLIENT_CONN', given.get('pgbouncer_max_client_conn')),
    )
    return Database(name, params, pgbouncer, migrate)


def databases_from(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every `<NAME>_DB_*` database of the environment, as DATABASE_KEYS' mappings."""
    names = {m.group(1) for m in map(DATABASE_PREFIX.match, raw) if m} | {DEFAULT_DATABASE.upper()}
    found = {}
    for prefix in names:
        given: dict[str, Any] = {}
        for suffix, key in DATABASE_KEYS.items():
            value = secret(raw, f'{prefix}_DB_{suffix}') if suffix == 'PASS' else raw.get(f'{prefix}_DB_{suffix}', '')
            given[key] = value
        found[prefix.lower()] = given
    return found


def secret(raw: Mapping[str, Any], name: str) -> str:
    """The value of `name`, or the content of the file named by `<name>_FILE`."""
    path = raw.get(f'{name}_FILE')
    if path:
        try:
            return Path(path).read_text(encoding='utf-8').strip()
        except OSError as error:
            raise ConfigError(f'{name}_FILE={path!r} cannot be read: {error.strerror or error}') from None
    return str(raw.get(name, '') or '')


@dataclass(frozen=True, slots=True)
class LogSettings:
    log_dir: str
    level: str
    console: bool
    stdout_json: bool
    max_bytes: int
    backup_count: int
    retention_days: float

    def kinds(self) -> list[str]:
        """The handlers these settings make: always the file, then stdout and the console if asked."""
        return ['file'] + ['stdout'] * self.stdout_json + ['console'] * self.console


LOG_OPTIONS = {
    'log_dir': 'LOG_DIR',
    'level': 'LOG_LEVEL',
    'console': 'LOG_FORMAT',
    'stdout_json': 'LOG_STDOUT',
    'max_bytes': 'LOG_MAX_BYTES',
    'backup_count': 'LOG_BACKUP_COUNT',
    'retention_days': 'LOG_RETENTION_DAYS',
}


def parse_logging(raw: Mapping[str, Any], environment: str, overrides: Mapping[str, Any] | None = None) -> LogSettings:
    """LOG_* settings, with `overrides` by LogSettings field (a test's log_dir, say)."""
    import logging  # only to check a level's name

    unknown = set(overrides or {}) - set(LOG_OPTIONS)
    if unknown:
        raise TypeError(f'unknown logging options: {", ".join(sorted(unknown))}')
    log_format = raw.get('LOG_FORMAT') or ('console' if environment == 'local' else 'json')
    values: dict[str, Any] = {
        'log_dir': raw.get('LOG_DIR') or str(BASE_DIR / 'logs'),
        'level': raw.get('LOG_LEVEL') or 'INFO',
        'console': log_format == 'console',
        'stdout_json': parse_flag(raw.get('LOG_STDOUT', '0')),
        'max_bytes': raw.get('LOG_MAX_BYTES') or 50 * 1024 * 1024,
        'backup_count': raw.get('LOG_BACKUP_COUNT') or 5,
        'retention_days': raw.get('LOG_RETENTION_DAYS') or 15,
    }
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    level = str(values['level']).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(f'LOG_LEVEL={values["level"]!r} is not a logging level')
    return LogSettings(
        log_dir=str(values['log_dir']),
        level=level,
        console=bool(values['console']),
        stdout_json=bool(values['stdout_json']),
        # A file must rotate and old ones must go, or one busy replica can fill the shared volume.
        max_bytes=parse_int('LOG_MAX_BYTES', values['max_bytes'], minimum=MIN_LOG_BYTES),
        backup_count=parse_int('LOG_BACKUP_COUNT', values['backup_count'], minimum=1),
        retention_days=parse_float('LOG_RETENTION_DAYS', values['retention_days'], minimum=0.01, inclusive=True),
    )


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """gunicorn's settings (gunicorn.conf.py) and what the master's checks need."""

    bind: str
    workers: int
    worker_class: str
    threads: int
    timeout: int
    graceful_timeout: int
    keepalive: int
    max_requests: int
    max_requests_jitter: int
    log_level: str
    replicas: int
    metrics_dir: str  # PROMETHEUS_MULTIPROC_DIR; '' when unset (gunicorn.conf.py makes one)


def given(raw: Mapping[str, Any], name: str) -> Any:
    """Setting `name` as given (even empty), or its default when it is not set at all."""
    value = raw.get(name)
    return default_of(name) if value is None else value


def parse_server(raw: Mapping[str, Any]) -> ServerSettings:
    def number(name: str, minimum: int = 0) -> int:
        return parse_int(name, given(raw, name), minimum)

    return ServerSettings(
        bind=str(given(raw, 'BIND')),
        workers=parse_int('WEB_CONCURRENCY', raw.get('WEB_CONCURRENCY') or 2 * multiprocessing.cpu_count() + 1, 1),
        worker_class=str(given(raw, 'WORKER_CLASS')),
        threads=number('THREADS', minimum=1),
        timeout=number('WORKER_TIMEOUT', minimum=1),
        graceful_timeout=number('GRACEFUL_TIMEOUT'),
        keepalive=number('KEEPALIVE'),
        max_requests=number('MAX_REQUESTS'),
        max_requests_jitter=number('MAX_REQUESTS_JITTER'),
        log_level=str(given(raw, 'GUNICORN_LOG_LEVEL')),
        replicas=number('API_REPLICAS', minimum=1),
        metrics_dir=str(raw.get('PROMETHEUS_MULTIPROC_DIR') or ''),
    )


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of one app, checked. Built by `load()`; never changed."""

    environment: str
    debug: bool
    process_id: str
    replica_id: str
    bearer_tokens: tuple[bytes, ...] = field(repr=False)  # never in a repr or a log
    callers_file: str | None
    jwt: JwtSettings | None
    databases: Mapping[str, Database]
    modules: tuple[str, ...]
    pool_size: int
    pool_timeout: float
    pool_max_lifetime: float
    pool_max_idle: float
    connect_timeout: int
    statement_timeout: int
    max_content_length: int
    batch_max_actions: int
    idempotency_ttl: float
    compress_min_size: int
    proxy_hops: int
    api_docs: bool
    openapi_servers: tuple[str, ...]
    metrics: bool
    migrate_on_start: bool
    events_amqp_url: str = field(repr=False)  # may hold a password
    events_retention: float
    events_metrics_port: int
    log: LogSettings
    server: ServerSettings

    @property
    def pgbouncer(self) -> dict[str, Pgbouncer]:
        """The databases reached through pgbouncer, by name."""
        return {name: db.pgbouncer for name, db in self.databases.items() if db.pgbouncer is not None}


# Local only: where `scripts/serve.sh` serves from (its private PostgreSQL), written while it runs,
# so `flask --app app ...` in another shell of the checkout reaches the same database.
LOCAL_DATABASE_RECORD = Path('.local') / 'database.env'


def environment(base_dir: Path = BASE_DIR, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment over `env/<ENVIRONMENT>/.env` (and, in local mode, over serve.sh's
    record of its private database): what every setting is read from."""
    process = dict(os.environ if environ is None else environ)
    name = process.get('ENVIRONMENT') or 'local'
    files = [base_dir / 'env' / name / '.env']
    if name == 'local':
        files.append(base_dir / LOCAL_DATABASE_RECORD)
    merged: dict[str, str] = {}
    for path in files:
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    return {**merged, **process, 'ENVIRONMENT': name}


def extra_modules(raw: Mapping[str, Any]) -> list[str]:
    return [name.strip() for name in str(raw.get('EXTRA_MODULES') or '').split(',') if name.strip()]


def load(
    modules: Iterable[str] = (), overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """The checked configuration: `environ` (default: the process's, over its dotenv file), then
    `overrides` by setting name (tests use them; `DATABASES` maps names to connection settings,
    `MODULES` replaces the modules, `LOGGING` sets LogSettings fields). `modules` are settings.MODULES;
    EXTRA_MODULES adds to them."""
    raw: dict[str, Any] = environment(environ=environ)
    databases = databases_from(raw)
    overrides = dict(overrides or {})
    databases = overrides.pop('DATABASES', databases)
    listed = list(overrides.pop('MODULES', [*modules, *extra_modules(raw)]))
    log_overrides = overrides.pop('LOGGING', None)
    raw.update(overrides)

    def get(name: str) -> Any:
        return given(raw, name)

    env = str(raw['ENVIRONMENT'])
    if env not in ENVIRONMENTS:
        raise ConfigError(f'ENVIRONMENT={env!r} is not one of {", ".join(ENVIRONMENTS)}')
    debug = parse_flag(get('DEBUG'))
    if debug and env != 'local':
        raise ConfigError(f'DEBUG is on in ENVIRONMENT={env!r}: debug mode is for local only')
    if not isinstance(databases, Mapping) or DEFAULT_DATABASE not in databases:
        raise ConfigError(f'no {DEFAULT_DATABASE!r} database is configured (set DEFAULT_DB_NAME)')
    jwt = parse_jwt({name: get(name) for name in (s.name for s in SETTINGS) if name.startswith('JWT_')})
    tokens = parse_tokens(env, raw['BEARER'] if isinstance(raw.get('BEARER'), bytes) else secret(raw, 'BEARER'))
    callers_file = str(get('CALLERS_FILE')).strip() or None
    if not tokens and callers_file is None and jwt is None:
        raise ConfigError('BEARER is empty and neither CALLERS_FILE nor JWT_JWKS_URL is set: nobody could call')
    return Config(
        environment=env,
        debug=debug,
        process_id=str(get('PROCESS_ID')),
        replica_id=str(raw.get('REPLICA_ID') or ''),
        bearer_tokens=tokens,
        callers_file=callers_file,
        jwt=jwt,
        databases={name: parse_database(name, given) for name, given in databases.items()},
        modules=tuple(dict.fromkeys(listed)),
        pool_size=parse_int('POOL_SIZE', get('POOL_SIZE'), minimum=1),
        pool_timeout=parse_float('POOL_TIMEOUT', get('POOL_TIMEOUT')),
        pool_max_lifetime=parse_float('POOL_MAX_LIFETIME', get('POOL_MAX_LIFETIME')),
        pool_max_idle=parse_float('POOL_MAX_IDLE', get('POOL_MAX_IDLE')),
        connect_timeout=parse_int('CONNECT_TIMEOUT', get('CONNECT_TIMEOUT'), minimum=1),
        statement_timeout=parse_int('STATEMENT_TIMEOUT', get('STATEMENT_TIMEOUT')),
        max_content_length=parse_int('MAX_CONTENT_LENGTH', get('MAX_CONTENT_LENGTH'), minimum=1024),
        batch_max_actions=parse_int('BATCH_MAX_ACTIONS', get('BATCH_MAX_ACTIONS'), minimum=1),
        idempotency_ttl=parse_float('IDEMPOTENCY_TTL', get('IDEMPOTENCY_TTL'), minimum=1.0, inclusive=True),
        compress_min_size=parse_int('COMPRESS_MIN_SIZE', get('COMPRESS_MIN_SIZE')),
        proxy_hops=parse_int('PROXY_HOPS', get('PROXY_HOPS')),
        api_docs=parse_flag(get('API_DOCS')),
        openapi_servers=parse_servers(get('OPENAPI_SERVERS')),
        metrics=parse_flag(get('METRICS')),
        migrate_on_start=parse_flag(get('MIGRATE_ON_START')),
        events_amqp_url=parse_amqp_url(secret(raw, 'EVENTS_AMQP_URL')),
        events_retention=parse_float('EVENTS_RETENTION', get('EVENTS_RETENTION'), minimum=1.0, inclusive=True),
        events_metrics_port=parse_int('EVENTS_METRICS_PORT', get('EVENTS_METRICS_PORT')),
        log=parse_logging(raw, env, log_overrides),
        server=parse_server(raw),
    )


@cache
def project_version() -> str:
    """`version` of pyproject.toml (the contract's info.version, dbapi_build_info): the project is
    not installed, so no package metadata holds it."""
    with (BASE_DIR / 'pyproject.toml').open('rb') as file:
        return str(tomllib.load(file)['project']['version'])
