#!/usr/bin/env bash
# The one command of a lent-GPU session (the device tool's `run`; README "First GPU session"):
#
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# after `python -m benchmarks.device_kit` filled .whl/ here. On the machine (no network, its own torch) it installs
# the wheels to /tmp/site, records the environment, then runs two stages, each bounded, each recorded in
# $OUT/summary.txt, a failed one not stopping the next:
#   bench  python3 -m benchmarks --quick --only gpu   (ViT-B/L/H vs timm, MFU, compile, stream, largest batch)
#   train  data_tools digits + shard (JPEG), then 30 steps of pretrain.train under `deepspeed --num_gpus 1`:
#          ZeRO-2, bf16, regional torch.compile, data.decode=gpu, a checkpoint at the last step
# Files back in $OUT (at most 8): env.txt summary.txt bench.log gpu.json gpu_partial.json train.log
# train_metrics.jsonl. Exit 0 when the bench stage wrote gpu.json, else 1.
#
# Knobs (environment): BENCH_S (330), BENCH_GPU_BUDGET_S (270), BENCH_ARGS (--quick), TRAIN_S (180), DEADLINE_S (510:
# the training stage is cut short or skipped to end by then), W (scratch folder), STAGES ("install env bench train"),
# TRAIN_EXTRA (overrides appended). A CPU check of the training stage here (no GPU, venv on PATH):
#   STAGES="env train" TRAIN_EXTRA="data.decode=cpu train.compile=false train.steps=3 checkpoint.every_steps=3" \
#     bash benchmarks/gpu_session.sh
#   bash benchmarks/gpu_session.sh --print-overrides     prints the training overrides, one a line, and exits
set -u
cd "$(dirname "$0")/.."

W=${W:-/tmp/gpu_session}
OUT=${OUT:-$W/out}
STAGES=${STAGES:-install env bench train}
DEADLINE_S=${DEADLINE_S:-510}

# The training smoke's overrides of configs/tiny_digits.yaml (tests/test_device_kit.py loads them with it).
TRAIN_OVERRIDES=(
  "run.output_dir=$W/run"
  "data.train_shards=$W/shards"
  "data.val_shards=$W/shards"
  "data.num_workers=4"
  "data.decode=gpu"
  "train.steps=30"
  "train.precision=bf16"
  "train.compile=true"
  "train.resume=none"
  "deepspeed.zero_stage=2"
  "schedule.warmup_steps=5"
  "checkpoint.every_steps=30"
  "log.every_steps=5"
)
if [ "${1:-}" = "--print-overrides" ]; then
  printf '%s\n' "${TRAIN_OVERRIDES[@]}"
  exit 0
fi

mkdir -p "$OUT" "$W"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
wants() { [[ " $STAGES " == *" $1 "* ]]; }
record() { # stage rc start
  echo "$1 rc=$2 seconds=$((SECONDS - $3)) at=$SECONDS" | tee -a "$SUMMARY"
}

if wants install; then
  t=$SECONDS
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  rc=$?
  record install $rc $t
  [ $rc = 0 ] || exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
# DeepSpeed's JIT-built FusedAdam and inductor's kernels (kept where a caller already points them)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$W/torch_extensions}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$W/inductor}

if wants env; then
  t=$SECONDS
  {
    echo "## date"; date -u
    echo "## nvidia-smi"; nvidia-smi
    echo "## nvcc"; command -v nvcc && nvcc --version
    echo "## versions"
    python3 - <<'EOF'
import importlib
for name in ("torch", "torchvision", "timm", "triton", "deepspeed", "webdataset", "pydantic", "numpy"):
    try:
        m = importlib.import_module(name)
        print(name, m.__version__, m.__file__)
    except Exception as e:  # noqa: BLE001 - record and go on
        print(name, "IMPORT FAILED:", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), "nccl", torch.cuda.nccl.version())
EOF
    echo "## benchmarks.machine.describe()"
    python3 -c "import json; from benchmarks.machine import describe; print(json.dumps(describe(), indent=2))"
    echo "## Python.h (torch extensions, Triton)"
    python3 -c "import sysconfig, os; h = sysconfig.get_paths()['include']; print(h, os.path.isfile(h + '/Python.h'))"
    echo "## ds_report"; timeout 30 ds_report
    echo "## pip list"; python3 -m pip list 2>/dev/null
    echo "## cpu, memory, disk"; nproc; free -g; df -h /tmp /dev/shm
  } >"$OUT/env.txt" 2>&1
  record env $? $t
fi

if wants bench; then
  t=$SECONDS
  export BENCH_GPU_BUDGET_S=${BENCH_GPU_BUDGET_S:-270} BENCH_GPU_PARTIAL=$OUT/gpu_partial.json
  # shellcheck disable=SC2086 # BENCH_ARGS: words
  timeout -k 10 "${BENCH_S:-330}" python3 -m benchmarks ${BENCH_ARGS---quick} --only gpu --json "$OUT/gpu.json" 2>&1 |
    tee "$OUT/bench.log"
  record bench "${PIPESTATUS[0]}" $t
fi

if wants train; then
  t=$SECONDS
  {
    rm -rf "$W/digits" "$W/shards" "$W/run"
    python3 -m data_tools digits "$W/digits" &&
      python3 -m data_tools shard "$W/digits" "$W/shards" --workers 8 --samples-per-shard 200 --val-fraction 0.15 \
        --quality 90 --no-progress
  } >"$OUT/train.log" 2>&1
  rc=$?
  record shards $rc $t
  left=$((DEADLINE_S - SECONDS - 10))
  limit=${TRAIN_S:-180}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$rc" != 0 ]; then
    echo "train rc=skipped (no shards)" | tee -a "$SUMMARY"
  elif [ "$limit" -lt 60 ]; then
    echo "train rc=skipped (only ${left} s left before DEADLINE_S=${DEADLINE_S})" | tee -a "$SUMMARY"
  else
    t=$SECONDS
    # shellcheck disable=SC2086 # TRAIN_EXTRA: words
    timeout -k 10 "$limit" deepspeed --num_gpus 1 --module pretrain.train --config configs/tiny_digits.yaml \
      "${TRAIN_OVERRIDES[@]}" ${TRAIN_EXTRA:-} 2>&1 | tee -a "$OUT/train.log"
    record train "${PIPESTATUS[0]}" $t
    cp "$W/run/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
    ckpt="import sys, pathlib; from pretrain.checkpoint_format import newest_complete as n
print(n(pathlib.Path(sys.argv[1])))"
    tag=$(python3 -c "$ckpt" "$W/run/checkpoints" 2>&1 | tail -1)
    echo "checkpoint $tag" | tee -a "$SUMMARY"
  fi
fi

if [ -s "$OUT/gpu.json" ]; then
  echo "result ok: gpu.json written (total ${SECONDS} s)" | tee -a "$SUMMARY"
  exit 0
fi
echo "result FAILED: no gpu.json (total ${SECONDS} s)" | tee -a "$SUMMARY"
exit 1
