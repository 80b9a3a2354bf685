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
# One stamp per set of files asked for: serve and test may ask for different sets. A current
# stamp of requirements-dev.txt covers every set: it includes every other requirements file.
stamp_of() { echo ".venv/.installed-$(echo "$*" | sha256sum | cut -c1-12)"; }
stamp=$(stamp_of "$@")
wanted=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$(stamp_of requirements-dev.txt)" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  args=()
  for file in "$@"; do args+=(-r "$file"); done
  # --no-compile: Python writes the .pyc of what it imports on first use; pip would compile
  # every file of every package (mypy, Material's theme, ...), a third of the install's CPU.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile "${args[@]}"
  echo "$wanted" > "$stamp"
fi
