#!/usr/bin/env bash
# Install Relay into .venv and run the broker with its defaults: in-memory store,
# TCP on 127.0.0.1:7700, authentication on (secret created in ~/.local/share/relay).
# Extra arguments go to `relay-broker serve`.
set -euo pipefail
source "$(dirname "$0")/setup.sh" ""
exec .venv/bin/relay-broker serve "$@"
