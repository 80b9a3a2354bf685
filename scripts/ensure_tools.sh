#!/usr/bin/env bash
# Install the Debian packages the tests and the benchmark drive for real: nginx, wrk, pgbouncer, valgrind, and
# envsubst (what the nginx image renders its template with; tests compare it with scripts/topology.py).
# (CI runs as root on a fresh machine; a developer without root installs them by hand.)
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v envsubst >/dev/null 2>&1 || missing+=(gettext-base)
# chromium and its chromedriver: tests/test_docs_browser.py opens /docs in them.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
# Prometheus and promtool: the metrics tests scrape with a real Prometheus and check the alert rules.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# valgrind (callgrind, callgrind_annotate): `python -m bench instructions` counts instructions per request.
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
# RabbitMQ: the events tests publish to the machine's broker (.ci/run starts it) and run a node of
# their own; Node.js and npm run the AsyncAPI parser (scripts/asyncapi_parser.sh installs it).
[ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing ${missing[*]}: run 'sudo apt-get install ${missing[*]}'" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages start a system nginx on port 80 and a pgbouncer on 6432; the tests run their own.
if command -v service >/dev/null 2>&1; then
  service nginx stop >/dev/null 2>&1 || true
  service pgbouncer stop >/dev/null 2>&1 || true
  service prometheus stop >/dev/null 2>&1 || true
  # RabbitMQ's package starts the machine's node, which the tests use: it is left running.
fi
