#!/usr/bin/env bash
# A team's MLflow tracking server on this machine: the PostgreSQL of engines/postgres-up.sh as
# the backend store, artifacts served from DIR/artifacts (--serve-artifacts: clients upload
# through the server), on 127.0.0.1 only. Idempotent: starts what does not run, then waits for
# /health. engines/mlflow-server-down.sh stops both.
#
#   engines/mlflow-server-up.sh [DIR]        # DIR: $MLP_LAB_SERVER_DIR, default /var/tmp/mlp-lab
#   MLFLOW_TRACKING_URI=http://127.0.0.1:5000 mlp-train ...
#
# Settings (environment): MLP_LAB_MLFLOW_PORT (5000); MLFLOW (the mlflow command, default the
# one on PATH); MLP_LAB_PG_PORT, MLP_LAB_PG_USER (engines/postgres-up.sh). With
# MLP_LAB_MLFLOW_AUTH=basic the server runs MLflow's basic-auth app (needs mlflow[auth]): users
# and permissions in the PostgreSQL database mlflow_auth, the admin `admin` with the password
# from MLFLOW_AUTH_ADMIN_PASSWORD (default: a random one, kept in DIR/admin-password, 0600);
# clients log in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
set -euo pipefail
say() { printf '[mlflow-server-up] %s\n' "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
dir=$(realpath -m "${1:-${MLP_LAB_SERVER_DIR:-/var/tmp/mlp-lab}}")
port=${MLP_LAB_MLFLOW_PORT:-5000}
mlflow=${MLFLOW:-mlflow}
command -v "$mlflow" >/dev/null || fail "no mlflow command ($mlflow): pip install 'mlp-lab[server]'"
python=$(dirname "$(command -v "$mlflow")")/python
[ -x "$python" ] || python=python3
"$python" -c 'import psycopg' 2>/dev/null \
  || fail "the PostgreSQL driver is missing beside $mlflow: pip install 'mlp-lab[server]'"

# 0711: the `postgres` user (the cluster's owner when this runs as root) must pass through.
install -d -m 0711 "$dir"
MLP_LAB_PG_DIR="$dir/postgres" "$here/postgres-up.sh"
pg_port=${MLP_LAB_PG_PORT:-5433}
pg_user=${MLP_LAB_PG_USER:-mlflow}
health=http://127.0.0.1:$port/health
healthy() { "$python" -c "import urllib.request as u; u.urlopen('$health', timeout=3)" 2>/dev/null; }

if [ -s "$dir/mlflow.pid" ] && kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null; then
  say "already running (pid $(cat "$dir/mlflow.pid"))"
else
  # The database password reaches the server through PGPASSWORD (libpq reads it), not through
  # the URI on its command line, where `ps` would show it.
  PGPASSWORD=$(head -1 "$dir/postgres/password")
  export PGPASSWORD
  args=(server --backend-store-uri "postgresql+psycopg://$pg_user@127.0.0.1:$pg_port/mlflow"
        --artifacts-destination "$dir/artifacts" --serve-artifacts
        --host 127.0.0.1 --port "$port" --workers 1)
  if [ "${MLP_LAB_MLFLOW_AUTH:-}" = basic ]; then
    if [ ! -s "$dir/admin-password" ]; then
      (umask 077; printf '%s\n' "${MLFLOW_AUTH_ADMIN_PASSWORD:-$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')}" \
        > "$dir/admin-password")
    fi
    if [ ! -s "$dir/flask-secret" ]; then
      (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$dir/flask-secret")
    fi
    runuser_psql() {
      local bin; bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
      if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$bin/psql" "$@"; else "$bin/psql" "$@"; fi
    }
    runuser_psql -h "$dir/postgres/socket" -p "$pg_port" -U postgres -X -q -d postgres \
      -v ON_ERROR_STOP=1 -v user="$pg_user" <<'SQL'
SELECT format('CREATE DATABASE mlflow_auth OWNER %I', :'user')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow_auth') \gexec
SQL
    cat > "$dir/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg://$pg_user@127.0.0.1:$pg_port/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# A password check (PBKDF2) costs ~1 s of CPU here: remember a good one for a minute, or every
# request of a training run waits for it (with 1 worker there is no staleness to fear).
auth_cache_ttl_seconds = 60
INI
    export MLFLOW_AUTH_CONFIG_PATH="$dir/basic_auth.ini"
    MLFLOW_AUTH_ADMIN_PASSWORD=$(head -1 "$dir/admin-password")
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$dir/flask-secret")
    export MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    args+=(--app-name basic-auth)
  fi
  healthy && fail "port $port already answers /health: another server? (MLP_LAB_MLFLOW_PORT)"
  say "starting mlflow server on 127.0.0.1:$port${MLP_LAB_MLFLOW_AUTH:+ (auth: $MLP_LAB_MLFLOW_AUTH)}"
  # One worker and no job runner: 2 processes and ~500 MB instead of 15 and ~2.7 GB.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
    setsid "$mlflow" "${args[@]}" >"$dir/mlflow.log" 2>&1 </dev/null &
  echo $! > "$dir/mlflow.pid"
fi

for _ in $(seq 180); do
  healthy && { say "ready: http://127.0.0.1:$port (log $dir/mlflow.log)"; exit 0; }
  kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null || { tail -30 "$dir/mlflow.log"; fail "the server exited"; }
  sleep 1
done
tail -30 "$dir/mlflow.log"
fail "no answer from $health after 180 s"
