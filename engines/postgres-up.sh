#!/usr/bin/env bash
# A private PostgreSQL (Debian's postgresql, 15 on bookworm) for a shared MLflow store and
# Optuna studies, listening on 127.0.0.1 only. Idempotent: installs postgresql when missing
# (root + apt), creates the cluster in DIR on first use, starts it unless it runs, and creates
# the role and the databases `mlflow` and `optuna` that the role owns.
#
#   engines/postgres-up.sh [DIR]        # DIR: $MLP_LAB_PG_DIR, default /var/tmp/mlp-lab/postgres
#   PGPASSWORD=$(cat DIR/password) psql -h 127.0.0.1 -p 5433 -U mlflow mlflow
#
# Settings (environment): MLP_LAB_PG_PORT (5433), MLP_LAB_PG_USER (mlflow), MLP_LAB_PG_PASSWORD
# (default: a random one, made on first use). The password is kept in DIR/password (mode 0600)
# and never put on a command line. Clients over TCP must give it (scram-sha-256); the socket in
# DIR/socket is for the cluster's owner. engines/postgres-down.sh stops the server.
set -euo pipefail
say() { printf '[postgres-up] %s\n' "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }
dir=$(realpath -m "${1:-${MLP_LAB_PG_DIR:-/var/tmp/mlp-lab/postgres}}")
port=${MLP_LAB_PG_PORT:-5433}
user=${MLP_LAB_PG_USER:-mlflow}
case $user in *[!a-z0-9_]*|'') fail "MLP_LAB_PG_USER=$user: use lower-case letters, digits and _" ;; esac

if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    || fail "PostgreSQL is not installed (as root: apt-get install postgresql)"
  say "apt-get install postgresql"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

# PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user (DIR's
# parents must let it through: /tmp/<dir> or /var/tmp/<dir>, not a root-only home).
if [ "$(id -u)" = 0 ]; then owner=postgres; as_owner() { runuser -u postgres -- "$@"; }
else owner=$(id -un); as_owner() { "$@"; }; fi

install -d -m 0700 -o "$owner" "$dir"
if [ ! -s "$dir/password" ]; then
  (umask 077; printf '%s\n' "${MLP_LAB_PG_PASSWORD:-$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')}" \
    > "$dir/password")
fi
install -d -m 0700 -o "$owner" "$dir/socket"
if [ ! -s "$dir/data/PG_VERSION" ]; then
  say "creating a cluster in $dir/data ($("$bin/postgres" --version))"
  install -d -m 0700 -o "$owner" "$dir/data"
  as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log"; fail initdb; }
fi

if ! as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  say "starting PostgreSQL on 127.0.0.1:$port"
  touch "$dir/postgres.log" && chown "$owner" "$dir/postgres.log"
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir/socket" start >/dev/null \
    || { tail -20 "$dir/postgres.log"; fail "pg_ctl start"; }
fi

# The role and its databases, over the owner's socket (no password there).
psql_admin() { as_owner "$bin/psql" -h "$dir/socket" -p "$port" -U postgres -X -q -v ON_ERROR_STOP=1 "$@"; }
password=$(head -1 "$dir/password")
psql_admin -d postgres -v user="$user" -v password="$password" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'user')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
SELECT format('ALTER ROLE %I PASSWORD %L', :'user', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', db, :'user')
  FROM unnest(ARRAY['mlflow', 'optuna']) AS db
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = db) \gexec
SQL
say "ready: postgresql://$user:***@127.0.0.1:$port/{mlflow,optuna} (password in $dir/password)"
