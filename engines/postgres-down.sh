#!/usr/bin/env bash
# Stop the PostgreSQL of engines/postgres-up.sh [DIR]; its data stays in DIR/data.
set -euo pipefail
dir=$(realpath -m "${1:-${MLP_LAB_PG_DIR:-/var/tmp/mlp-lab/postgres}}")
[ -s "$dir/data/PG_VERSION" ] || exit 0
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
if [ "$(id -u)" = 0 ]; then as_owner() { runuser -u postgres -- "$@"; }; else as_owner() { "$@"; }; fi
if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  echo "[postgres-down] stopping PostgreSQL ($dir/data)"
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
fi
