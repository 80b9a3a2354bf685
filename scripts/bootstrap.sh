#!/usr/bin/env bash
# Create .venv and install the given requirement files, only when they changed since last time.
# Usage: scripts/bootstrap.sh requirements.txt [more.txt ...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "dbapi needs Python 3.11 or newer as \$PYTHON (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# One stamp per set of files asked for: serve and test may ask for different sets.
stamp=.venv/.installed-$(echo "$*" | sha256sum | cut -c1-12)
wanted=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  args=()
  for file in "$@"; do args+=(-r "$file"); done
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${args[@]}"
  echo "$wanted" > "$stamp"
fi
