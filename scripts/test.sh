#!/usr/bin/env bash
# The test suite: with no argument, all of it as CI runs it; with arguments, just those tests.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/test.sh [-h | --help] [PYTEST_ARGS...]

With no argument: the whole suite, as CI runs it (CI=true makes a test fail instead of skipping
when a tool it drives is missing):
  1. installs requirements-dev.txt into .venv (scripts/bootstrap.sh) and, as root, the Debian
     packages the tests drive for real (scripts/ensure_tools.sh: nginx, wrk, pgbouncer, ...)
  2. ruff check, ruff format --check, mypy (strict), bandit
  3. mkdocs build --strict: the documentation site (a broken link or a missing page fails)
  4. pytest: every test, against the PostgreSQL at TEST_PG_HOST (default 127.0.0.1:5432)

With arguments: requirements-dev.txt installed, then only pytest with those arguments; no
linters, no site, no Debian packages. For example:
  scripts/test.sh tests/test_module_orders.py     one file (a scaffolded module's test)
  scripts/test.sh -k batch                        the tests whose names match
  scripts/test.sh tests/test_cli.py -x -q         any of pytest's own options
The tests need a PostgreSQL they may create databases in: TEST_PG_HOST, TEST_PG_PORT and
TEST_PG_USER (default 127.0.0.1, 5432, postgres); when nothing answers there, the private one
a running scripts/serve.sh started.
USAGE
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac

cd "$(dirname "$0")/.."
scripts/bootstrap.sh requirements-dev.txt
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
scripts/ensure_tools.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # the files and strictness are in pyproject.toml
.venv/bin/lint-imports  # the layers of lib/ (pyproject.toml)
.venv/bin/bandit -q -c pyproject.toml -r app.py settings.py gunicorn.conf.py lib modules
site=$(mktemp -d "${TMPDIR:-/tmp}/dbapi-site.XXXXXX")
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"  # offline: no fonts or assets fetched
rm -rf "$site"
exec .venv/bin/python -m pytest
