#!/usr/bin/env bash
# The whole test suite, as CI runs it: tools, linters, the type checker, then pytest against real PostgreSQL and nginx.
# Extra arguments go to pytest (e.g. scripts/test.sh -k auth).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh requirements-dev.txt
scripts/ensure_tools.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # the files and strictness are in pyproject.toml
.venv/bin/lint-imports  # the layers of lib/ (pyproject.toml)
.venv/bin/bandit -q -c pyproject.toml -r app.py settings.py gunicorn.conf.py lib modules
exec .venv/bin/python -m pytest "$@"
