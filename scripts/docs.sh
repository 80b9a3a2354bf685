#!/usr/bin/env bash
# Serve the documentation site (mkdocs.yml, docs/) on http://127.0.0.1:8001, rebuilt on every
# change; extra arguments go to `mkdocs serve` (e.g. -a 127.0.0.1:9001). Offline: nothing fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh requirements-dev.txt
export NO_MKDOCS_2_WARNING=1  # Material's notice about MkDocs 2; the pins in requirements-docs.txt hold
exec .venv/bin/mkdocs serve --strict -a 127.0.0.1:8001 "$@"
