#!/usr/bin/env bash
# Start the API on this machine: virtualenv, pinned requirements, a database, the schema, gunicorn.
# With no DEFAULT_DB_HOST configured for the environment (the `local` default), a private
# PostgreSQL is started under .local/pgdata. PORT (default 8000) and BIND change the address.
set -euo pipefail
cd "$(dirname "$0")/.."
export ENVIRONMENT=${ENVIRONMENT:-local}

scripts/bootstrap.sh requirements.txt
setting() { .venv/bin/python -c "import settings; print($1)"; }

if [ -z "$(setting "settings.DATABASES['default']['host']")" ]; then
  scripts/bootstrap.sh requirements.txt requirements-local.txt
  echo "No database configured for ENVIRONMENT=$ENVIRONMENT: starting a private PostgreSQL in ${LOCAL_PGDATA:-.local/pgdata}"
  eval "$(.venv/bin/python scripts/local_postgres.py "${LOCAL_PGDATA:-.local/pgdata}" "$(setting "settings.DATABASES['default']['dbname'] or 'dbapi'")")"
fi
.venv/bin/python -m lib.apply_sql

export BIND=${BIND:-127.0.0.1:${PORT:-8000}}
token=$(setting "settings.BEARER.split(',')[0]")
cat <<INFO

dbapi ($ENVIRONMENT) on http://$BIND
token: $token
try:   curl -s -X POST http://$BIND/example/foo -H 'Authorization: Bearer $token' -H 'Content-Type: application/json' -d '{"name": "ada", "email": "ada@example.com"}'

INFO
exec .venv/bin/gunicorn -c gunicorn.conf.py app:app
