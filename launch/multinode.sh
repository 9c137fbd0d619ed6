#!/usr/bin/env bash
# Launch pretraining across the nodes of a hostfile with the deepspeed launcher (ssh fan-out from this node).
#   launch/multinode.sh HOSTFILE CONFIG [section.key=value ...]
# Environment: MASTER_ADDR (default: first host of HOSTFILE), MASTER_PORT (default: a port free on this machine at
# launch, no fixed number to collide with another job: run this on the first host of HOSTFILE, where rank 0 hosts the
# rendezvous, or set MASTER_PORT to a port that is free there).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE CONFIG [section.key=value ...]" >&2
  exit 2
fi
hostfile=$1; config=$2; shift 2
[ -f "$hostfile" ] || { echo "error: hostfile $hostfile does not exist (see launch/hostfile.example)" >&2; exit 2; }
[ -f "$config" ] || { echo "error: config $config does not exist" >&2; exit 2; }
master_addr=${MASTER_ADDR:-$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')}
master_port=${MASTER_PORT:-$(python -c 'from pretrain.ports import free_port; print(free_port())')}
# NCCL: pick the fast fabric explicitly when nodes have several interfaces (see README, "Multi-node").
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
exec deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port" \
  --module pretrain.train --config "$config" "$@"
