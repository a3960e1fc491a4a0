#!/usr/bin/env bash
# Set up (venv, package, test tools, Debian's Chromium for the browser test) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="server,test,triton" bash scripts/setup.sh
. .venv/bin/activate
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
exec python -m pytest -q -p no:cacheprovider "$@"
