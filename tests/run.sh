#!/bin/sh
# Install what the tests need into .venv, then run them. Used by CI too.
set -eu
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi

# The usage page is tested in Debian's Chromium (the playwright package's
# own browser download is not used).
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "install Chromium first: sudo apt-get install chromium" >&2
        exit 1
    fi
fi

.venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m pytest "$@"
