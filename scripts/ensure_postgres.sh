#!/usr/bin/env bash
# Makes a PostgreSQL server reachable for the test suite and prints the SQLAlchemy URL to use.
# - YIBAO_TEST_PG_URL set: that server must answer (nothing is started).
# - otherwise: the machine's Debian cluster (installed by `scripts/setup.sh --dev`) is created if missing, started
#   if down, and given a password-authenticated test role that may create databases; its real port is used.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[postgres] %s\n' "$*" >&2; }

probe() { .venv/bin/python - "$1" <<'PY'
import sys
import psycopg
url = sys.argv[1].replace("postgresql+psycopg://", "postgresql://", 1)
try:
    with psycopg.connect(url, connect_timeout=3) as conn:
        conn.execute("SELECT 1")
except Exception as exc:  # a probe reports, it does not trace back
    print(f"unreachable: {exc}".splitlines()[0], file=sys.stderr)
    sys.exit(1)
PY
}

if [ -n "${YIBAO_TEST_PG_URL:-}" ]; then
  probe "$YIBAO_TEST_PG_URL" || { log "YIBAO_TEST_PG_URL is set but does not answer"; exit 1; }
  echo "$YIBAO_TEST_PG_URL"; exit 0
fi

command -v pg_lsclusters >/dev/null || { log "PostgreSQL is not installed (scripts/setup.sh --dev installs it)"; exit 1; }
if [ -z "$(pg_lsclusters -h)" ]; then
  ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  log "creating cluster $ver/main"
  pg_createcluster "$ver" main >/dev/null
fi
read -r ver name port status _ < <(pg_lsclusters -h | head -n 1)
if [ "$status" != "online" ]; then
  log "starting cluster $ver/$name (port $port)"
  pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start
fi

# Password auth works under Debian's default pg_hba (scram on 127.0.0.1) as well as under trust.
(cd / && runuser -u postgres -- psql -p "$port" -qtAX -v ON_ERROR_STOP=1) <<'SQL' >/dev/null
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'yibao_test') THEN
    CREATE ROLE yibao_test LOGIN CREATEDB PASSWORD 'yibao_test';
  END IF;
END $$;
SQL

url="postgresql+psycopg://yibao_test:yibao_test@127.0.0.1:${port}/postgres"
for _ in $(seq 1 50); do probe "$url" 2>/dev/null && { echo "$url"; exit 0; }; sleep 0.2; done
log "PostgreSQL still unreachable at $url"; probe "$url"; exit 1
