#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the SLURM tests (facts: /work/shared/SLURM-NOTES.md).
#
#   bash scripts/slurm_cluster.sh start    install (apt-get) if needed, configure, start munged, slurmctld and
#                                          slurmd -N n1 / -N n2, wait until both nodes are idle
#   bash scripts/slurm_cluster.sh stop     cancel leftover jobs, stop the daemons by the pids in their pid files
#   bash scripts/slurm_cluster.sh status   what runs, and sinfo
#
# Needs root. Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing. It never
# overwrites a slurm.conf it did not write (that would break a real cluster's node): it stops with a message instead.
# Knobs: CLOZE_SLURM_CPUS (CPUs each simulated node advertises, default 8: more than the cores, so the tests'
# three 2x2-rank jobs share the nodes at once instead of queueing), CLOZE_SLURM_TIMEOUT (seconds to wait for idle nodes, default 60).
set -euo pipefail

MARK="# written by cloze scripts/slurm_cluster.sh"
CONF=/etc/slurm/slurm.conf
NODES=(n1 n2)
CPUS=${CLOZE_SLURM_CPUS:-8}
CONF_CHANGED=0
WAIT=${CLOZE_SLURM_TIMEOUT:-60}
PKGS=(munge slurmctld slurmd slurm-client)

log() { echo "[slurm-cluster] $*"; }
die() { echo "[slurm-cluster] error: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "needs root (it installs packages, writes /etc/slurm and starts daemons); run it with sudo"
}

install_packages() {
  local missing=()
  for b in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch; do
    [ -x "$b" ] || missing+=("$b")
  done
  [ ${#missing[@]} = 0 ] && return 0
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get; install ${PKGS[*]} by hand"
  log "installing ${PKGS[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # The package lists may be empty on a fresh image: update only when the first try fails.
  if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" >/tmp/cloze-slurm-apt.log 2>&1; then
    apt-get update -q >>/tmp/cloze-slurm-apt.log 2>&1 || true
    apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>/tmp/cloze-slurm-apt.log 2>&1 \
      || { tail -20 /tmp/cloze-slurm-apt.log >&2; die "apt-get install ${PKGS[*]} failed (log above)"; }
  fi
}

write_conf() {
  local host mem_mb
  host=$(hostname -s)
  # Each simulated node claims most of the machine's memory; CR_Core does not schedule memory, so this only has
  # to be a plausible number below MemTotal.
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace a real cluster's config (move it away first)"
  fi
  mkdir -p /etc/slurm
  local tmp
  tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
  cat >"$tmp" <<EOF
$MARK
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A short credential lifetime lets a requeued job start again after ~12 s instead of ~130 s.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Lets a node advertise more CPUs than the machine has (two simulated nodes share two cores).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
SlurmctldPort=6817
StateSaveLocation=/var/spool/slurm/ctld
SlurmdSpoolDir=/var/spool/slurm/d-%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
NodeName=n[1-${#NODES[@]}] NodeHostname=${host} NodeAddr=127.0.0.1 Port=17001-1700${#NODES[@]} CPUs=${CPUS} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
  else
    mv "$tmp" "$CONF"
    chmod 644 "$CONF"
    CONF_CHANGED=1
    log "wrote $CONF (${#NODES[@]} nodes x $CPUS CPUs on host $host)"
  fi
}

add_hosts() {
  # Simulated node names must resolve (MASTER_ADDR is the first host of the node list). Idempotent.
  local n missing=()
  for n in "${NODES[@]}"; do
    getent hosts "$n" >/dev/null || missing+=("$n")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "127.0.0.1 ${missing[*]}  # cloze simulated Slurm nodes" >>/etc/hosts
    log "added ${missing[*]} to /etc/hosts"
  fi
}

# pid_alive PIDFILE BINARY: the pid in the file belongs to a live process running BINARY (pids get reused).
pid_alive() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$2"
}

start_daemons() {
  install -d -o munge -g munge -m 0755 /run/munge
  install -d /run/slurm /var/log/slurm /var/spool/slurm/ctld
  local n
  for n in "${NODES[@]}"; do install -d "/var/spool/slurm/d-$n"; done
  if ! pid_alive /run/munge/munged.pid munged; then
    [ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    log "started munged"
  fi
  if ! pid_alive /run/slurm/slurmctld.pid slurmctld; then
    # -c: start from a clean state; a previous run's jobs must not reappear in a new test session.
    /usr/sbin/slurmctld -c
    log "started slurmctld"
  fi
  for n in "${NODES[@]}"; do
    if ! pid_alive "/run/slurm/slurmd-$n.pid" "slurmd"; then
      /usr/sbin/slurmd -N "$n"
      log "started slurmd -N $n"
    fi
  done
}

wait_idle() {
  local deadline=$((SECONDS + WAIT)) states
  while :; do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
    if [ -n "$states" ] && ! grep -qvE ' (idle|alloc|mix)$' <<<"$states"; then
      log "ready: $(tr '\n' ' ' <<<"$states")"
      return 0
    fi
    # A node left down/drained by an earlier run (e.g. killed mid-job) comes back only when told to.
    if grep -qE ' (down|drain|drng|drained)\*?$' <<<"$states"; then
      scontrol update nodename="n[1-${#NODES[@]}]" state=resume >/dev/null 2>&1 || true
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "sinfo: ${states:-<no answer>}" >&2
      tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-n*.log >&2 2>/dev/null || true
      die "nodes not idle after ${WAIT}s (logs above; see /var/log/slurm)"
    fi
    sleep 0.5
  done
}

# stop_pid PIDFILE BINARY NAME: TERM, wait up to 15 s, then KILL; only the process named in the pid file.
stop_pid() {
  local pid i
  pid_alive "$1" "$2" || return 0
  pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 150); do
    [ -d "/proc/$pid" ] || { log "stopped $3 (pid $pid)"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  log "killed $3 (pid $pid) after 15 s"
}

cmd_start() {
  need_root
  install_packages
  write_conf
  add_hosts
  if [ "$CONF_CHANGED" = 1 ] && pid_alive /run/slurm/slurmctld.pid slurmctld; then
    log "the configuration changed: restarting the running daemons"
    cmd_stop
  fi
  start_daemons
  wait_idle
}

cmd_stop() {
  need_root
  if pid_alive /run/slurm/slurmctld.pid slurmctld; then
    # Jobs left by a failed test would otherwise keep slurmstepd and their ranks alive after slurmd exits.
    scancel --full --quiet --state=PENDING,RUNNING,SUSPENDED --user=root 2>/dev/null || true
    local i
    for i in $(seq 50); do
      [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  local n
  for n in "${NODES[@]}"; do stop_pid "/run/slurm/slurmd-$n.pid" slurmd "slurmd $n"; done
  stop_pid /run/slurm/slurmctld.pid slurmctld slurmctld
  stop_pid /run/munge/munged.pid munged munged
}

cmd_status() {
  local n
  pid_alive /run/munge/munged.pid munged && echo "munged: pid $(cat /run/munge/munged.pid)" || echo "munged: stopped"
  pid_alive /run/slurm/slurmctld.pid slurmctld && echo "slurmctld: pid $(cat /run/slurm/slurmctld.pid)" \
    || echo "slurmctld: stopped"
  for n in "${NODES[@]}"; do
    pid_alive "/run/slurm/slurmd-$n.pid" slurmd && echo "slurmd $n: pid $(cat "/run/slurm/slurmd-$n.pid")" \
      || echo "slurmd $n: stopped"
  done
  if pid_alive /run/slurm/slurmctld.pid slurmctld; then sinfo -N 2>&1 || true; fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
