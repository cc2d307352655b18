#!/usr/bin/env bash
# A one-node SLURM cluster on this Debian machine, for `hydra/launcher=submitit_slurm` sweeps
# and the tests marked `slurm` (tests/engines/test_slurm.py). Needs root. Idempotent: installs what is
# missing (slurm-wlm, munge), writes /etc/slurm/slurm.conf for this host (partition `debug`,
# every CPU of the machine), starts munged, slurmctld and slurmd unless they run, and waits
# until the node accepts jobs. engines/slurm-down.sh stops the daemons again.
#
#   sudo engines/slurm-up.sh && sinfo        # debug* up infinite 1 idle <host>
#
# A real cluster needs none of this: its admins run SLURM; see README.md, "Team scale".
set -euo pipefail
say() { printf '[slurm-up] %s\n' "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (it installs packages and starts daemons)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || fail "slurm-wlm and munge are missing and there is no apt-get"
  say "apt-get install slurm-wlm munge"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# -- munge: the authentication SLURM's daemons and commands share ------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  say "creating the munge key"
  if command -v mungekey >/dev/null; then mungekey --create --force; else create-munge-key -f; fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
start_munged() {
  say "starting munged"
  runuser -u munge -- munged
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n </dev/null >/dev/null 2>&1 || fail "munged does not answer (/var/log/munge/munged.log)"
}

# -- slurm.conf for this one host ----------------------------------------------------------------
host=$(hostname -s)
# The node's hardware as slurmd sees it (CPUs, sockets, cores, memory): a node declared bigger
# than it is would be drained.
node=$(slurmd -C | head -1)
case $node in NodeName=*) ;; *) fail "slurmd -C printed no node line: $node" ;; esac
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
conf=$(mktemp)
trap 'rm -f "$conf"' EXIT
cat > "$conf" <<CONF
# Written by mlp-lab's engines/slurm-up.sh: a one-node cluster for local sweeps and tests.
ClusterName=local
# Loopback only: slurmctld and slurmd bind to 127.0.0.1 (the addresses below), not to every
# interface of the machine.
SlurmctldHost=$host(127.0.0.1)
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
# No accounting database (slurmdbd needs MySQL/MariaDB): sacct has nothing to show, and each
# run records its own job id, array task, node and log paths as tags instead.
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
changed=false
if ! cmp -s "$conf" /etc/slurm/slurm.conf; then
  say "writing /etc/slurm/slurm.conf ($host: ${node#NodeName=* })"
  install -m 0644 "$conf" /etc/slurm/slurm.conf
  changed=true
fi

# -- the daemons ------------------------------------------------------------------------------------
if $changed && pgrep -x slurmctld >/dev/null; then
  say "configuration changed: restarting the daemons"
  "$(dirname "$0")/slurm-down.sh"
fi
if ! munge -n </dev/null >/dev/null 2>&1; then start_munged; fi
if ! pgrep -x slurmctld >/dev/null; then say "starting slurmctld"; slurmctld; fi
if ! pgrep -x slurmd >/dev/null; then say "starting slurmd"; slurmd; fi

# -- wait until the node takes jobs ------------------------------------------------------------------
state=""
for _ in $(seq 60); do
  state=$(sinfo --noheader --nodes="$host" --format=%T 2>/dev/null | head -1 || true)
  case $state in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|drained*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
case $state in
  idle|mixed|allocated|completing) ;;
  *) fail "node $host is '${state:-unknown}' after 60 s (/var/log/slurm/slurmctld.log, slurmd.log)" ;;
esac
say "ready: partition debug, node $host ($state)"
