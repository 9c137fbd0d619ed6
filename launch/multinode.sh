#!/usr/bin/env bash
# Launch pretraining across the nodes of a hostfile with the deepspeed launcher (ssh fan-out from this node).
#   launch/multinode.sh HOSTFILE CONFIG [section.key=value ...]
# Environment: MASTER_ADDR (default: first host of HOSTFILE), MASTER_PORT (default 29500).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE CONFIG [section.key=value ...]" >&2
  exit 2
fi
hostfile=$1; config=$2; shift 2
[ -f "$hostfile" ] || { echo "error: hostfile $hostfile does not exist (see launch/hostfile.example)" >&2; exit 2; }
[ -f "$config" ] || { echo "error: config $config does not exist" >&2; exit 2; }
master_addr=${MASTER_ADDR:-$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')}
# NCCL: pick the fast fabric explicitly when nodes have several interfaces (see README, "Multi-node").
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
exec deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" \
  --module pretrain.train --config "$config" "$@"
