"""A stand-in for `pretrain.train` under `pretrain.launch`, for the launcher's own tests (no DeepSpeed).

    python -m tests.helpers.fake_rank --local_rank=I [--fail-rank R] [--deaf] READY_DIR

Writes READY_DIR/rank-RANK once its handlers are set, then waits: SIGTERM / SIGUSR1 -> exit 75 (a "saved" rank),
counting the signals it got in READY_DIR/signals-RANK; `--fail-rank R`: rank R exits 3 at once; `--deaf`: ignore the
stop signals (a rank that never finishes saving).
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--local_rank", type=int)
p.add_argument("--fail-rank", type=int, default=-1)
p.add_argument("--deaf", action="store_true")
p.add_argument("ready", type=Path)
args = p.parse_args()
rank = int(os.environ["RANK"])
got: list[int] = []


def stop(signum, frame):
    got.append(signum)
    (args.ready / f"signals-{rank}").write_text(str(len(got)))


for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, signal.SIG_IGN if args.deaf else stop)
(args.ready / f"rank-{rank}").write_text(os.environ["WORLD_SIZE"])
if rank == args.fail_rank:
    sys.exit(3)
deadline = time.monotonic() + 120
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # a second signal, if one comes, arrives while "saving"
sys.exit(75 if got else 1)
