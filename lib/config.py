"""Turn `settings` (plain strings from the environment) into a checked app config.

Every check raises `ConfigError` with one line that names the bad setting, so a wrong
deployment fails at start instead of serving an open, closed or half-working API.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import settings
from lib.callers import Callers, CallersError, bearer_callers
from lib.jwt_auth import JwtSettings, JwtVerifier

ENVIRONMENTS = ('local', 'testing', 'production')
# Tokens shipped in this repository for local use and tests: never valid in production.
KNOWN_TOKENS = frozenset({'local-dev-token', 'testing-token', 'changeme', 'secret', 'token'})
MIN_PRODUCTION_TOKEN_LENGTH = 24
PGBOUNCER_MODES = ('transaction',)
# A database's settings that describe how it is reached, not what libpq connects with.
PGBOUNCER_KEYS = ('pgbouncer', 'pgbouncer_pool_size', 'pgbouncer_max_client_conn')


@cache
def project_version() -> str:
    """`version` of pyproject.toml (the contract's info.version, dbapi_build_info): the project is
    not installed, so no package metadata holds it."""
    with (settings.BASE_DIR / 'pyproject.toml').open('rb') as file:
        return str(tomllib.load(file)['project']['version'])


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


def parse_servers(raw: Any) -> list[str]:
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
    return urls


def parse_tokens(environment: str, raw: Any) -> list[bytes]:
    """BEARER's tokens (comma-separated); none is fine when callers come from elsewhere."""
    tokens = [raw] if isinstance(raw, bytes) else [t.strip() for t in str(raw or '').split(',')]
    tokens = [t.encode('utf-8') if isinstance(t, str) else t for t in tokens if t]
    if environment == 'production':
        for token in tokens:
            if token.decode('utf-8', 'replace') in KNOWN_TOKENS:
                raise ConfigError('BEARER holds a default token: production needs a token of its own')
            if len(token) < MIN_PRODUCTION_TOKEN_LENGTH:
                raise ConfigError(f'BEARER has a token shorter than {MIN_PRODUCTION_TOKEN_LENGTH} characters')
    return tokens


def check_jwt(raw: Mapping[str, Any]) -> JwtSettings | None:
    """JWT_* settings: the key set's URL, the issuer and the audience all three, or none."""
    names = ('JWT_JWKS_URL', 'JWT_ISSUER', 'JWT_AUDIENCE')
    url, issuer, audience = (str(raw[name] or '').strip() for name in names)
    given = [name for name, value in zip(names, (url, issuer, audience), strict=True) if value]
    if not given:
        return None
    if len(given) < len(names):
        missing = ', '.join(name for name in names if name not in given)
        raise ConfigError(f'{", ".join(given)} set without {missing}: JWTs need all three')
    if urlsplit(url).scheme not in {'http', 'https'} or not urlsplit(url).netloc:
        raise ConfigError(f'JWT_JWKS_URL={url!r} is not an http(s):// URL')
    scope_claim = str(raw['JWT_SCOPE_CLAIM'] or '').strip()
    caller_claims = tuple(c.strip() for c in str(raw['JWT_CALLER_CLAIM'] or '').split(',') if c.strip())
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


def check_callers(environment: str, raw: Mapping[str, Any], jwt: JwtSettings | None) -> Callers:
    """BEARER's caller and CALLERS_FILE's, read now; at least one way in must be configured."""
    tokens = parse_tokens(environment, raw['BEARER'])
    path = str(raw['CALLERS_FILE'] or '').strip() or None
    if not tokens and path is None and jwt is None:
        raise ConfigError('BEARER is empty and neither CALLERS_FILE nor JWT_JWKS_URL is set: nobody could call')
    try:
        return Callers(bearer_callers(tokens), path)
    except CallersError as error:
        raise ConfigError(str(error)) from None


@dataclass(frozen=True, slots=True)
class Pgbouncer:
    """A database reached through pgbouncer (`<NAME>_DB_PGBOUNCER`); the sizes, when set, stand in
    for what pgbouncer's admin console would tell the start-up check."""

    mode: str
    pool_size: int | None
    max_client_conn: int | None


def check_databases(databases: Any) -> dict[str, dict[str, Any]]:
    """Each database's connection parameters, as libpq takes them (the pgbouncer keys left out)."""
    if not isinstance(databases, Mapping) or settings.DEFAULT not in databases:
        raise ConfigError(f'DATABASES has no {settings.DEFAULT!r} database (set DEFAULT_DB_NAME)')
    checked = {}
    for name, params in databases.items():
        prefix = name.upper()
        if not params.get('dbname'):
            raise ConfigError(f'{prefix}_DB_NAME is not set for database {name!r}')
        port = parse_int(f'{prefix}_DB_PORT', params.get('port') or 5432, minimum=1)
        checked[name] = {
            key: value
            for key, value in dict(params, port=port).items()
            if value not in ('', None) and key not in PGBOUNCER_KEYS
        }
    return checked


def optional_int(name: str, value: Any) -> int | None:
    return None if value in ('', None) else parse_int(name, value, minimum=1)


def check_pgbouncer(databases: Mapping[str, Mapping[str, Any]]) -> dict[str, Pgbouncer]:
    """The databases reached through pgbouncer, by name; the others are direct."""
    found = {}
    for name, params in databases.items():
        prefix = f'{name.upper()}_DB_PGBOUNCER'
        mode = str(params.get('pgbouncer') or '').strip()
        if not mode:
            for key in PGBOUNCER_KEYS[1:]:
                if params.get(key) not in ('', None):
                    raise ConfigError(f'{name.upper()}_DB_{key.upper()} is set but {prefix} is not')
            continue
        if mode not in PGBOUNCER_MODES:
            raise ConfigError(f"{prefix}={mode!r} must be 'transaction' (pgbouncer's transaction pooling) or empty")
        found[name] = Pgbouncer(
            mode,
            optional_int(f'{prefix}_POOL_SIZE', params.get('pgbouncer_pool_size')),
            optional_int(f'{prefix}_MAX_CLIENT_CONN', params.get('pgbouncer_max_client_conn')),
        )
    return found


def parse_amqp_url(raw: Any) -> str:
    """EVENTS_AMQP_URL: empty (no relay in this deployment) or an amqp(s):// URL; the message
    never repeats the URL, which may hold a password."""
    url = str(raw or '').strip()
    if url and (urlsplit(url).scheme not in {'amqp', 'amqps'} or not urlsplit(url).hostname):
        raise ConfigError('EVENTS_AMQP_URL is not an amqp:// or amqps:// URL with a host')
    return url


def build_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Flask config for one app: settings, then `overrides` (tests), all checked."""
    raw: dict[str, Any] = {
        'ENVIRONMENT': settings.ENVIRONMENT,
        'BEARER': settings.BEARER,
        'CALLERS_FILE': settings.CALLERS_FILE,
        'JWT_JWKS_URL': settings.JWT_JWKS_URL,
        'JWT_ISSUER': settings.JWT_ISSUER,
        'JWT_AUDIENCE': settings.JWT_AUDIENCE,
        'JWT_SCOPE_CLAIM': settings.JWT_SCOPE_CLAIM,
        'JWT_CALLER_CLAIM': settings.JWT_CALLER_CLAIM,
        'JWT_JWKS_COOLDOWN': settings.JWT_JWKS_COOLDOWN,
        'JWT_JWKS_MAX_AGE': settings.JWT_JWKS_MAX_AGE,
        'DEBUG': settings.DEBUG,
        'DATABASES': settings.DATABASES,
        'MODULES': settings.MODULES,
        'MAX_CONTENT_LENGTH': settings.MAX_CONTENT_LENGTH,
        'COMPRESS_MIN_SIZE': settings.COMPRESS_MIN_SIZE,
        'PROXY_HOPS': settings.PROXY_HOPS,
        'REPLICA_ID': settings.REPLICA_ID,
        'POOL_SIZE': settings.POOL_SIZE,
        'POOL_TIMEOUT': settings.POOL_TIMEOUT,
        'POOL_MAX_LIFETIME': settings.POOL_MAX_LIFETIME,
        'POOL_MAX_IDLE': settings.POOL_MAX_IDLE,
        'CONNECT_TIMEOUT': settings.CONNECT_TIMEOUT,
        'STATEMENT_TIMEOUT': settings.STATEMENT_TIMEOUT,
        'API_DOCS': settings.API_DOCS,
        'OPENAPI_SERVERS': settings.OPENAPI_SERVERS,
        'METRICS': settings.METRICS,
        'IDEMPOTENCY_TTL': settings.IDEMPOTENCY_TTL,
        'BATCH_MAX_ACTIONS': settings.BATCH_MAX_ACTIONS,
        'EVENTS_AMQP_URL': settings.EVENTS_AMQP_URL,
        'EVENTS_RETENTION': settings.EVENTS_RETENTION,
        'EVENTS_METRICS_PORT': settings.EVENTS_METRICS_PORT,
    }
    raw.update(overrides or {})
    environment = raw['ENVIRONMENT']
    if environment not in ENVIRONMENTS:
        raise ConfigError(f'ENVIRONMENT={environment!r} is not one of {", ".join(ENVIRONMENTS)}')
    debug = parse_flag(raw['DEBUG'])
    if debug and environment != 'local':
        raise ConfigError(f'DEBUG is on in ENVIRONMENT={environment!r}: debug mode is for local only')
    config = dict(raw)
    jwt = check_jwt(raw)
    config.update(
        DEBUG=debug,
        # the caller step's: who may call (lib/auth.py)
        CALLERS=check_callers(environment, raw, jwt),
        JWT=None if jwt is None else JwtVerifier(jwt),
        DATABASES=check_databases(raw['DATABASES']),
        PGBOUNCER=check_pgbouncer(raw['DATABASES']),
        MODULES=list(raw['MODULES']),
        MAX_CONTENT_LENGTH=parse_int('MAX_CONTENT_LENGTH', raw['MAX_CONTENT_LENGTH'], minimum=1024),
        COMPRESS_MIN_SIZE=parse_int('COMPRESS_MIN_SIZE', raw['COMPRESS_MIN_SIZE']),
        PROXY_HOPS=parse_int('PROXY_HOPS', raw['PROXY_HOPS']),
        POOL_SIZE=parse_int('POOL_SIZE', raw['POOL_SIZE'], minimum=1),
        POOL_TIMEOUT=parse_float('POOL_TIMEOUT', raw['POOL_TIMEOUT']),
        POOL_MAX_LIFETIME=parse_float('POOL_MAX_LIFETIME', raw['POOL_MAX_LIFETIME']),
        POOL_MAX_IDLE=parse_float('POOL_MAX_IDLE', raw['POOL_MAX_IDLE']),
        CONNECT_TIMEOUT=parse_int('CONNECT_TIMEOUT', raw['CONNECT_TIMEOUT'], minimum=1),
        STATEMENT_TIMEOUT=parse_int('STATEMENT_TIMEOUT', raw['STATEMENT_TIMEOUT']),
        API_DOCS=parse_flag(raw['API_DOCS']),
        OPENAPI_SERVERS=parse_servers(raw['OPENAPI_SERVERS']),
        METRICS=parse_flag(raw['METRICS']),
        IDEMPOTENCY_TTL=parse_float('IDEMPOTENCY_TTL', raw['IDEMPOTENCY_TTL'], minimum=1.0, inclusive=True),
        BATCH_MAX_ACTIONS=parse_int('BATCH_MAX_ACTIONS', raw['BATCH_MAX_ACTIONS'], minimum=1),
        EVENTS_AMQP_URL=parse_amqp_url(raw['EVENTS_AMQP_URL']),
        EVENTS_RETENTION=parse_float('EVENTS_RETENTION', raw['EVENTS_RETENTION'], minimum=1.0, inclusive=True),
        EVENTS_METRICS_PORT=parse_int('EVENTS_METRICS_PORT', raw['EVENTS_METRICS_PORT']),
    )
    del config['BEARER']  # only the parsed form stays, so the raw value cannot leak into a dump
    return config
