#!/usr/bin/env bash
# A two-node SLURM cluster on this one machine, for tests and for trying launch/slurm.sbatch (needs root and
# Debian's `slurm-wlm` + `munge`): munged, slurmctld and `slurmd -N n1` / `-N n2` on 127.0.0.1, each on its own port,
# everything (config, state, logs, munge key and socket) inside DIR.
#   launch/slurm_lab.sh start DIR    # prints the environment line to use it: export SLURM_CONF=DIR/slurm.conf
#   launch/slurm_lab.sh stop DIR     # cancels its jobs, ends every daemon and job process it started
#   launch/slurm_lab.sh pids DIR     # the processes of the lab still alive (none after stop)
# Each node sees its own private tmpfs at DIR/nodetmp (a mount namespace per slurmd), as each node of a real cluster
# has its own /tmp: run jobs with TMPDIR=DIR/nodetmp and a file one node writes there is not there on the other.
# Node names (n1, n2) do not resolve as host names, as on many clusters; only NodeAddr (127.0.0.1) reaches a node.
set -euo pipefail
WAIT_S=${SLURM_LAB_WAIT_S:-60}   # bound on every wait below (daemons up, jobs gone, daemons gone)

usage() { echo "usage: $0 start|stop|pids DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")

# Wait until "$@" succeeds, at most WAIT_S seconds; says what it waited for when it gives up.
wait_for() {
  local what=$1; shift
  local deadline=$((SECONDS + WAIT_S))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "error: slurm lab: $what not within ${WAIT_S}s (logs in $dir/log)" >&2
      return 1
    fi
    sleep 0.5
  done
}

free_ports() {  # three distinct TCP ports free on 127.0.0.1 right now
  python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_conf() {
  local ctld_port=$1 n1_port=$2 n2_port=$3 host
  host=$(hostname -s)
  # Plugins that need no cgroups or accounting database: the lab runs in containers and VMs alike.
  # SlurmdParameters=config_overrides: both "nodes" claim the same CPUs without being drained for it.
  # MinJobAge: a finished job's record stays 5 min for the tests to read. SlurmctldDebug=debug2 logs slurmctld's
  # time-limit check (every 30 s), which the time-limit test times itself against (LogTimeFormat: how it parses it).
  cat >"$dir/slurm.conf" <<EOF
ClusterName=lab
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
MailProg=/bin/true
SlurmctldDebug=debug2
LogTimeFormat=iso8601_ms
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n1_port CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n2_port CPUs=2 State=UNKNOWN
PartitionName=lab Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  : >"$dir/plugstack.conf"
}

# Every daemon of this lab carries SLURM_LAB=$dir in its environment, every job process SLURM_JOB_ID and
# SLURM_CONF=$dir/slurm.conf: `stop` ends those, one pid at a time, and nothing else on the machine.
lab_pids() {
  local p
  for p in /proc/[0-9]*; do
    { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | awk -v lab="SLURM_LAB=$dir" -v conf="SLURM_CONF=$dir/slurm.conf" \
      '$0 == lab {d = 1} $0 == conf {c = 1} /^SLURM_JOB_ID=/ {j = 1} END {exit !(d || (c && j))}' &&
      echo "${p#/proc/}"
  done
  return 0
}

start() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null || {
    echo "error: slurm lab: slurmctld or munged not found; install them: apt-get install -y slurm-wlm munge" >&2
    exit 2
  }
  [ "$(id -u)" = 0 ] || { echo "error: slurm lab: needs root (the daemons run as root)" >&2; exit 2; }
  [ ! -e "$dir/slurm.conf" ] || { echo "error: slurm lab: $dir already holds a lab; stop it first" >&2; exit 2; }
  unshare --mount --propagation private true 2>/dev/null ||
    { echo "error: slurm lab: cannot create a mount namespace (unshare --mount): needs CAP_SYS_ADMIN" >&2; exit 2; }
  mkdir -p "$dir"/{state,spool/n1,spool/n2,run,log,munge,nodetmp}
  chmod 700 "$dir/munge"
  export SLURM_LAB=$dir SLURM_CONF=$dir/slurm.conf
  head -c 1024 /dev/urandom >"$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
  wait_for "munged" test -S "$dir/munge/munge.socket"
  # shellcheck disable=SC2046
  write_conf $(free_ports)
  slurmctld -f "$SLURM_CONF" -i
  wait_for "slurmctld answering" scontrol ping
  local node
  for node in n1 n2; do
    # A mount namespace per node: its jobs see their own tmpfs at $dir/nodetmp, gone when the node's last process is.
    unshare --mount --propagation private sh -c \
      "mount -t tmpfs -o size=256m,mode=1777 lab-$node '$dir/nodetmp' && exec slurmd -f '$SLURM_CONF' -N $node"
  done
  wait_for "nodes n1 and n2 idle" sh -c '[ "$(sinfo -h -N -o "%N %t" | sort | tr "\n" " ")" = "n1 idle n2 idle " ]'
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  [ -f "$dir/slurm.conf" ] || { echo "error: slurm lab: no lab in $dir" >&2; exit 2; }
  local conf=$dir/slurm.conf pids pid deadline
  if SLURM_CONF=$conf scontrol ping >/dev/null 2>&1; then
    SLURM_CONF=$conf scancel --quiet --user=root || true
    wait_for "jobs gone" env SLURM_CONF="$conf" sh -c '[ -z "$(squeue -h)" ]' || true
  fi
  pids=$(lab_pids)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
  deadline=$((SECONDS + WAIT_S))
  while pids=$(lab_pids) && [ -n "$pids" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
}

case $cmd in
  start) start ;;
  stop) stop ;;
  pids) lab_pids ;;
  *) usage ;;
esac
