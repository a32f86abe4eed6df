#!/usr/bin/env bash
# Sets up everything (Debian packages, .venv, dev dependencies, a reachable PostgreSQL) and runs the whole
# quality gate: ruff, formatting, mypy (strict), import-linter contracts, then the full pytest suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k outbox`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
YIBAO_TEST_PG_URL=$(bash scripts/ensure_postgres.sh)
export YIBAO_TEST_PG_URL

step() { printf '\n== %s\n' "$*"; }
step "ruff check";      .venv/bin/ruff check .
step "ruff format";     .venv/bin/ruff format --check .
step "mypy (strict)";   .venv/bin/mypy
step "import contracts"; .venv/bin/lint-imports
step "pytest";          exec .venv/bin/pytest "$@"
