#!/usr/bin/env bash
# The benchmark in one command: tools, pinned requirements, then `python -m bench` (arguments passed on).
#   bench/run.sh            full run (1, 8, 32 connections; about 6 minutes), writes bench/results/latest.*
#   bench/run.sh --quick    8 connections, 1 s each, under a minute: fails on any error, never on speed
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust; BENCH_PG_HOST/PORT/USER change it), wrk, pgbench.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh requirements.txt requirements-bench.txt
scripts/ensure_tools.sh
command -v pgbench >/dev/null || { echo "pgbench is missing: apt-get install postgresql-contrib (or postgresql-client)" >&2; exit 1; }
exec .venv/bin/python -m bench "$@"
