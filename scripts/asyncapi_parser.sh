#!/usr/bin/env bash
# Install the AsyncAPI parser the tests run (tools/asyncapi/package.json pins it) into .local/asyncapi,
# git-ignored, with the machine's Node.js and npm; no lockfile is written (it would record the
# registry's URLs). Does nothing when the pinned version is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
target=.local/asyncapi
command -v node >/dev/null 2>&1 || { echo "asyncapi_parser.sh: node is not installed (apt-get install nodejs npm)" >&2; exit 1; }
mkdir -p "$target"
if cmp -s tools/asyncapi/package.json "$target/package.json" && [ -d "$target/node_modules/@asyncapi/parser" ]; then
  exit 0
fi
cp tools/asyncapi/package.json tools/asyncapi/validate.mjs "$target/"
(cd "$target" && npm install --no-package-lock --no-audit --no-fund --loglevel=error >/dev/null)
