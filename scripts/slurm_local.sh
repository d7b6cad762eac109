#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing slurm/ for real (CI runs it as root).
#
#   sudo bash scripts/slurm_local.sh start    # install slurm-wlm + munge if missing, configure, start
#   sudo bash scripts/slurm_local.sh status   # sinfo of the running cluster (exit 1 when it is not up)
#   sudo bash scripts/slurm_local.sh stop     # cancel every job, stop slurmd, slurmctld and munged
#
# `start` writes /etc/slurm/slurm.conf for this host (one node with its real CPU count and memory from
# `slurmd -C`, one partition `dr`, no cgroups: proctrack/linuxproc, task/none, no accounting), starts
# munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle. It refuses to replace a
# slurm.conf that it did not write. State and logs: $DR_SLURM_STATE (default /var/lib/dr-slurm-local).
# A real cluster needs none of this: its admins run these daemons; users only need sbatch/srun on PATH.
set -euo pipefail

state="${DR_SLURM_STATE:-/var/lib/dr-slurm-local}"
conf=/etc/slurm/slurm.conf
marker="# written by dr scripts/slurm_local.sh"
partition=dr

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds
  local deadline=$((SECONDS + $1)) what="$2"
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out waiting for $what (logs: $state/*.log)"
    sleep 0.5
  done
}

install_packages() {
  if command -v munged >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and apt-get is not available"
  echo "slurm_local.sh: installing slurm-wlm and munge" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
  if [[ -e "$conf" ]] && ! grep -qF "$marker" "$conf"; then
    die "$conf exists and was not written by this script; not replacing it"
  fi
  local host node
  host=$(hostname -s)
  # "NodeName=host CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=.."
  node=$(slurmd -C | head -n 1)
  [[ "$node" == NodeName=* ]] || die "slurmd -C printed no node line: $node"
  mkdir -p /etc/slurm
  cat >"$conf" <<EOF
$marker (rewritten by every start)
ClusterName=dr-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$partition Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # a munged is already answering
  fi
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  wait_for 20 munged bash -c 'munge -n </dev/null | unmunge'
}

node_idle() { [[ "$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1)" == idle ]]; }

start() {
  [[ $EUID -eq 0 ]] || die "must run as root (it installs packages and starts system daemons)"
  install_packages
  if node_idle; then
    echo "slurm_local.sh: already running" >&2
    sinfo
    return
  fi
  write_conf
  mkdir -p "$state/ctld" "$state/d"
  start_munge
  /usr/sbin/slurmctld -c   # -c: start from a clean state (no jobs from an earlier run)
  wait_for 30 slurmctld scontrol ping
  /usr/sbin/slurmd -c
  wait_for 60 "the node to become idle" node_idle
  sinfo
}

stop_pid() {  # stop_pid PIDFILE NAME: SIGTERM the daemon of that pid file, wait for it to exit
  local pid
  [[ -s "$1" ]] || return 0
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$1"
  echo "slurm_local.sh: stopped $2" >&2
}

stop() {
  [[ $EUID -eq 0 ]] || die "must run as root"
  if scontrol ping >/dev/null 2>&1; then
    scancel --full --user=root 2>/dev/null || true
    squeue -h -o %A | xargs -r scancel 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while [[ -n "$(squeue -h -o %A 2>/dev/null)" ]] && ((SECONDS < deadline)); do sleep 0.5; done
  fi
  stop_pid "$state/slurmd.pid" slurmd
  stop_pid "$state/slurmctld.pid" slurmctld
  stop_pid /run/munge/munged.pid munged
}

status() {
  scontrol ping >/dev/null 2>&1 || { echo "slurm_local.sh: slurmctld is not running" >&2; exit 1; }
  sinfo
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
