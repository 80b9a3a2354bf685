"""All configuration, as module-level constants (the Django-style pattern of the design).

`ENVIRONMENT` (default `local`) selects `env/<ENVIRONMENT>/.env`; variables already set in
the process environment win over the file. Secrets may also come from `<NAME>_FILE`
(the Docker secrets convention). Nothing here is validated: `lib.config` does that at start,
so a wrong value fails with one line that names it.
"""

import os
import re
from pathlib import Path

from dotenv import load_dotenv

BASE_DIR = Path(__file__).resolve().parent

APP_ID = 'dbapi'
ENVIRONMENT = os.getenv('ENVIRONMENT', 'local')
# Local only: where `scripts/serve.sh` serves from (its private PostgreSQL), written while it runs,
# so `flask --app app ...` in another shell reaches the same database. Below the process
# environment, above env/local/.env.
LOCAL_DATABASE_RECORD = BASE_DIR / '.local' / 'database.env'

if ENVIRONMENT == 'local':
    load_dotenv(dotenv_path=LOCAL_DATABASE_RECORD, override=False)
load_dotenv(dotenv_path=BASE_DIR / 'env' / ENVIRONMENT / '.env', override=False)


def _secret(name: str, default: str = '') -> str:
    """The value of `name`, or the content of the file named by `<name>_FILE`."""
    path = os.getenv(f'{name}_FILE')
    if path:
        return Path(path).read_text(encoding='utf-8').strip()
    return os.getenv(name, default)


PROCESS_ID = os.getenv('PROCESS_ID', APP_ID)
# Names this replica in the X-Served-By response header when set (the stack sets the task slot).
REPLICA_ID = os.getenv('REPLICA_ID', '')
LOG_LEVEL = os.getenv('LOG_LEVEL', 'INFO').upper()
LOG_DIR = os.getenv('LOG_DIR', str(BASE_DIR / 'logs'))
LOG_STDOUT = os.getenv('LOG_STDOUT', '0')
LOG_MAX_BYTES = os.getenv('LOG_MAX_BYTES', str(50 * 1024 * 1024))
LOG_BACKUP_COUNT = os.getenv('LOG_BACKUP_COUNT', '5')
LOG_RETENTION_DAYS = os.getenv('LOG_RETENTION_DAYS', '15')
LOG_FORMAT = os.getenv('LOG_FORMAT', 'console' if ENVIRONMENT == 'local' else 'json')
ELK_APP = f'{APP_ID}.{PROCESS_ID}'
ELK_INDEX = f'{APP_ID}_{ENVIRONMENT}'
ELK_PROCESS = APP_ID

# Several tokens, separated by commas, so they can be rotated without downtime: the caller
# `default`, allowed every action.
BEARER = _secret('BEARER')
# Callers and scopes (README): a TOML file of callers, their tokens' SHA-256 digests and their
# scopes, re-read within 2 s of a change.
CALLERS_FILE = os.getenv('CALLERS_FILE', '')
# JSON Web Tokens from an identity provider: the key set's URL, the issuer and the audience (all
# three, or none); the claim of the scopes (space-separated) and those naming the caller (the
# first present); how often an unknown key id may refetch the key set, and its age at most (s).
JWT_JWKS_URL = os.getenv('JWT_JWKS_URL', '')
JWT_ISSUER = os.getenv('JWT_ISSUER', '')
JWT_AUDIENCE = os.getenv('JWT_AUDIENCE', '')
JWT_SCOPE_CLAIM = os.getenv('JWT_SCOPE_CLAIM', 'scope')
JWT_CALLER_CLAIM = os.getenv('JWT_CALLER_CLAIM', 'azp,sub')
JWT_JWKS_COOLDOWN = os.getenv('JWT_JWKS_COOLDOWN', '30')
JWT_JWKS_MAX_AGE = os.getenv('JWT_JWKS_MAX_AGE', '300')

DEBUG = os.getenv('DEBUG', '0')
MAX_CONTENT_LENGTH = os.getenv('MAX_CONTENT_LENGTH', str(20 * 1024 * 1024))
COMPRESS_MIN_SIZE = os.getenv('COMPRESS_MIN_SIZE', '500')
# How many reverse proxies (nginx) stand in front of the app and append to X-Forwarded-For.
PROXY_HOPS = os.getenv('PROXY_HOPS', '0')
# The contract: GET /openapi.json and its page GET /docs (0 turns both off), and the document's
# `servers`, comma-separated URLs (the relative `/` is the server that serves the document).
API_DOCS = os.getenv('API_DOCS', '1')
OPENAPI_SERVERS = os.getenv('OPENAPI_SERVERS', '/')
# Prometheus series and GET /metrics on each replica (0 turns both off). Under gunicorn the
# workers share PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py sets one of its own when unset).
METRICS = os.getenv('METRICS', '1')
# How long an Idempotency-Key's answer is kept (seconds; README "Retrying safely").
IDEMPOTENCY_TTL = os.getenv('IDEMPOTENCY_TTL', '86400')
# The most actions one POST /batch may hold (README "Batches").
BATCH_MAX_ACTIONS = os.getenv('BATCH_MAX_ACTIONS', '100')

# Database pools: one per named database per process.
POOL_SIZE = os.getenv('POOL_SIZE', '4')
POOL_TIMEOUT = os.getenv('POOL_TIMEOUT', '5')
POOL_MAX_LIFETIME = os.getenv('POOL_MAX_LIFETIME', '1800')  # seconds, less a random 0-10%
POOL_MAX_IDLE = os.getenv('POOL_MAX_IDLE', '600')  # seconds
CONNECT_TIMEOUT = os.getenv('CONNECT_TIMEOUT', '3')
STATEMENT_TIMEOUT = os.getenv('STATEMENT_TIMEOUT', '30000')  # milliseconds

DEFAULT = 'default'


def _database(prefix: str) -> dict[str, str]:
    return {
        'dbname': os.getenv(f'{prefix}_DB_NAME', ''),
        'user': os.getenv(f'{prefix}_DB_USER', ''),
        'password': _secret(f'{prefix}_DB_PASS'),
        'host': os.getenv(f'{prefix}_DB_HOST', ''),
        'port': os.getenv(f'{prefix}_DB_PORT', '5432'),
        # `transaction` when the host and port are pgbouncer's, in transaction mode (README,
        # "Past max_connections"); the sizes are for the start-up check when its console is closed.
        'pgbouncer': os.getenv(f'{prefix}_DB_PGBOUNCER', ''),
        'pgbouncer_pool_size': os.getenv(f'{prefix}_DB_PGBOUNCER_POOL_SIZE', ''),
        'pgbouncer_max_client_conn': os.getenv(f'{prefix}_DB_PGBOUNCER_MAX_CLIENT_CONN', ''),
    }


_DB_PREFIXES = {m.group(1) for m in map(re.compile(r'^([A-Z][A-Z0-9_]*)_DB_NAME$').match, os.environ) if m}
DATABASES = {prefix.lower(): _database(prefix) for prefix in _DB_PREFIXES | {DEFAULT.upper()}}

# Registering a module is one line here.
MODULES = [
    'modules.example',
]
# Modules for one deployment only (comma-separated import names), e.g. the benchmark's
# `modules.bench`, which production never serves unless asked for here.
EXTRA_MODULES = [name.strip() for name in os.getenv('EXTRA_MODULES', '').split(',') if name.strip()]
MODULES += [name for name in EXTRA_MODULES if name not in MODULES]
