#!/usr/bin/env bash
# Makes a PostgreSQL server reachable for the test suite and prints the URL to use.
# Uses YIBAO_TEST_PG_URL if it already answers; otherwise starts the local Debian cluster (installing nothing:
# setup.sh --dev installed the package) and creates a password-authenticated test role that may create databases.
set -euo pipefail
log() { printf '[postgres] %s\n' "$*" >&2; }

url="${YIBAO_TEST_PG_URL:-postgresql+psycopg://yibao_test:yibao_test@127.0.0.1:5432/postgres}"
probe() { .venv/bin/python - "$1" <<'PY'
import sys
import psycopg
url = sys.argv[1].replace("postgresql+psycopg://", "postgresql://", 1)
try:
    with psycopg.connect(url, connect_timeout=3) as conn:
        conn.execute("SELECT 1")
except Exception as exc:  # report, don't trace back: this is a probe
    print(f"unreachable: {exc}".splitlines()[0], file=sys.stderr)
    sys.exit(1)
PY
}

if probe "$url" 2>/dev/null; then echo "$url"; exit 0; fi
if [ -n "${YIBAO_TEST_PG_URL:-}" ]; then
  log "YIBAO_TEST_PG_URL is set but does not answer"; probe "$url"; exit 1
fi

# Start the local cluster if it exists but is down.
if command -v pg_lsclusters >/dev/null; then
  read -r ver name _ < <(pg_lsclusters -h | head -n 1) || true
  if [ -z "${ver:-}" ]; then
    ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1); name=main
    log "creating cluster $ver/$name"; pg_createcluster "$ver" "$name" >/dev/null
  fi
  if ! pg_lsclusters -h | grep -q online; then
    log "starting cluster $ver/$name"
    pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start
  fi
else
  log "PostgreSQL is not installed (scripts/setup.sh --dev installs it)"; exit 1
fi

# The role the tests use: password auth works under Debian's default pg_hba (scram on 127.0.0.1) and under trust.
runuser -u postgres -- psql -qtAX -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'yibao_test') THEN
    CREATE ROLE yibao_test LOGIN CREATEDB PASSWORD 'yibao_test';
  END IF;
END $$;
SQL
for _ in $(seq 1 50); do probe "$url" 2>/dev/null && { echo "$url"; exit 0; }; sleep 0.2; done
log "PostgreSQL still unreachable at $url"; probe "$url"; exit 1
