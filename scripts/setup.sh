#!/usr/bin/env bash
# Shared set-up for scripts/serve.sh and scripts/test.sh: Debian packages (only those missing),
# a virtualenv in .venv, Relay installed into it in editable mode, and the browser client's
# npm packages (the demo page loads cborg from client/js/node_modules). The tests also need
# Chromium and redis-server (started by the test run itself, on loopback; nothing runs it as a service), and
# openssl and curl (the README's walkthroughs, run by their tests).
#   usage: source scripts/setup.sh [extra]   (extra: "" for the broker alone, "test" for everything)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_need+=(python3-venv)
command -v npm >/dev/null || apt_need+=(nodejs npm)
if [ "${1:-}" = "test" ]; then
  command -v chromium >/dev/null || apt_need+=(chromium)
  command -v redis-server >/dev/null || apt_need+=(redis-server)
  command -v openssl >/dev/null || apt_need+=(openssl) # the README's issuer key set-up, run by its test
  command -v curl >/dev/null || apt_need+=(curl)       # the README's TLS walkthrough, run by its test
fi
if [ ${#apt_need[@]} -gt 0 ]; then
  # One line when all is well; apt's whole output only if it fails.
  echo "installing Debian packages: ${apt_need[*]}"
  apt_log=$(mktemp)
  if ! { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${apt_need[@]}"; } >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    echo "installing ${apt_need[*]} failed (output above)" >&2
    exit 1
  fi
  rm -f "$apt_log"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -qq --upgrade pip
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install -qq -e ".[test]"
else
  .venv/bin/python -m pip install -qq -e .
fi
(cd client/js && npm ci --no-audit --no-fund --loglevel=error >/dev/null)  # its "added N packages" line; errors go to stderr
