#!/usr/bin/env bash
# The container's command: the log retention step, then gunicorn as this process (exec), so
# SIGTERM from Docker reaches gunicorn's master, which drains in-flight requests and exits.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
GUNICORN=${GUNICORN:-gunicorn}
"$PYTHON" -m lib.observability.logging_setup --retention
exec "$GUNICORN" -c gunicorn.conf.py "${APP_TARGET:-app:app}"
