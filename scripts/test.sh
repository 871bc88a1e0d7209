#!/usr/bin/env bash
# Install everything the tests need (Chromium, Node packages, Python packages) and run
# the whole suite: lint, types, pytest (Python and browser tests, the npm package's install test),
# the JS tests and the JS client's TypeScript declarations (tsc over its typed example; silent when clean).
# Under CI=true nothing may be skipped for a missing service; "no tests ran" is a failure.
set -euo pipefail
source "$(dirname "$0")/setup.sh" test

.venv/bin/ruff check -q .
.venv/bin/ruff format --check -q .
.venv/bin/mypy

# One pytest worker per core (pytest-xdist): many tests wait on sockets, Redis, Chromium and timeouts,
# so two workers on two cores take the suite from about 9 minutes to about 5.
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider -n logical "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
[ "$status" -eq 0 ] || exit "$status"

if [ -f client/js/package.json ]; then
  (cd client/js && npm test --silent && npm run --silent typecheck)
fi
