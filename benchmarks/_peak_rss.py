"""`pretrain.train` as launched by `deepspeed`, printing this rank's peak resident memory (VmHWM) when it exits.

    deepspeed --num_gpus 2 benchmarks/_peak_rss.py --config CONFIG [section.key=value ...]

Used by benchmarks/bench_zero3.py; the line is `PEAKRSS {"rank": r, "peak_mib": m}`.
"""

from __future__ import annotations

import atexit
import json
import os
import re

from pretrain.train.__main__ import main
from pretrain.train.lifecycle import run_rank


def peak_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def report() -> None:
    print("PEAKRSS " + json.dumps({"rank": int(os.environ.get("RANK", 0)), "peak_mib": peak_mib()}), flush=True)


if __name__ == "__main__":
    atexit.register(report)  # run_rank runs the exit handlers before it ends the process
    run_rank(main)
