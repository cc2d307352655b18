#!/usr/bin/env bash
# Stop what engines/slurm-up.sh started: slurmd, slurmctld and munged (by their pid files).
# The configuration and the packages stay; slurm-up.sh starts the cluster again.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "[slurm-down] needs root" >&2; exit 1; }
stop() {  # stop <pid file> <name>: SIGTERM, then wait up to 10 s
  local pid
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 0
  echo "[slurm-down] stopping $2 ($pid)"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "[slurm-down] $2 ($pid) still runs after 10 s" >&2
  return 1
}
stop /run/slurm/slurmd.pid slurmd
stop /run/slurm/slurmctld.pid slurmctld
stop /run/munge/munged.pid munged
