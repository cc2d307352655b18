#!/usr/bin/env bash
# Stop what engines/mlflow-server-up.sh [DIR] started: the MLflow server (its process group),
# then PostgreSQL. The store (DIR/postgres/data) and the artifacts (DIR/artifacts) stay.
set -euo pipefail
dir=$(realpath -m "${1:-${MLP_LAB_SERVER_DIR:-/var/tmp/mlp-lab}}")
if [ -s "$dir/mlflow.pid" ]; then
  pid=$(cat "$dir/mlflow.pid")
  if kill -0 "$pid" 2>/dev/null; then
    echo "[mlflow-server-down] stopping mlflow server ($pid and its workers)"
    # setsid made the server the leader of its own group: the group is it and its workers.
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$dir/mlflow.pid"
fi
"$(dirname "$0")/postgres-down.sh" "$dir/postgres"
