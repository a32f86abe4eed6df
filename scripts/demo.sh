#!/usr/bin/env bash
# Sets up everything the system needs (Debian packages, .venv, locked Python dependencies), then runs
# `yibao demo`: Mosquitto on a free port, the sync server on SQLite, one simulated terminal. Ctrl-C stops it all.
# Extra arguments go to `yibao demo`, e.g. `scripts/demo.sh --port 8000` or `scripts/demo.sh --smoke`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/yibao demo "$@"
