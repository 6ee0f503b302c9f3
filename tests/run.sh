#!/bin/sh
# Install what the tests need into .venv, then run them. Used by CI too.
set -eu
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi

.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m pytest "$@"
