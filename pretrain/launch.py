"""Start the ranks of one node and see them through signals and failures (the launcher for clusters and SLURM).

    python -m pretrain.launch --nproc-per-node 8 -- --config configs/vit_b16_i21k.yaml [section.key=value ...]
    python -m pretrain.launch --nproc-per-node 8 --nnodes 4 --node-rank $NODE --master-addr $ADDR -- --config ...

It starts `python -m pretrain.train` once per local rank with the variables `deepspeed.init_distributed` reads
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...): no hostfile, no ssh. Why not `deepspeed`'s own
runner: on SIGTERM it exits at once (143) while its ranks are still saving, its child SIGKILLs every rank 30 s after
a signal, and SIGUSR1 kills it without reaching the ranks. Here:

- SIGTERM or SIGUSR1 (to this process only, or to every process of the job as SLURM sends them) reaches every rank
  once; the ranks finish the current step, agree on it, save, and exit 75. This launcher waits up to
  `--stop-timeout` seconds for that, then exits 75 when every rank saved (exit codes: `pretrain.exit_codes`).
- A rank that fails (any other non-zero exit) ends the launch: the other ranks are killed at once, since a step
  cannot finish without a peer, and the launcher exits with the failed rank's code.
- A rank that freezes is bounded by the ranks' own watchdog (`train.collective_timeout_s`): a peer exits 124, and
  the frozen rank is killed with the others.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from pretrain import exit_codes
from pretrain.exit_codes import STOP_SIGNALS

POLL_S = 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain.launch", description="Start this node's training ranks; forward stop signals; bound the end."
    )
    p.add_argument("--nproc-per-node", type=int, default=None, help="ranks on this node (default: GPUs, or 1)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (rendezvous)")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port on node 0")
    p.add_argument("--stop-timeout", type=float, default=600.0, help="seconds the ranks get to save after a signal")
    p.add_argument("--module", default="pretrain.train", help="what each rank runs (python -m MODULE)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="after `--`: the arguments of pretrain.train")
    args = p.parse_args(argv)
    if args.args[:1] == ["--"]:
        args.args = args.args[1:]
    if args.nproc_per_node is None:
        args.nproc_per_node = _local_gpus() or 1
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        p.error(f"need --nproc-per-node >= 1 and 0 <= --node-rank < --nnodes (got {args.node_rank}, {args.nnodes})")
    return args


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def rank_env(args: argparse.Namespace, local_rank: int) -> dict[str, str]:
    """The environment of one rank: what torch.distributed's env:// rendezvous and DeepSpeed read."""
    n = args.nproc_per_node
    return {
        **os.environ,
        "RANK": str(args.node_rank * n + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(args.nnodes * n),
        "LOCAL_WORLD_SIZE": str(n),
        "LOCAL_SIZE": str(n),
        "CROSS_RANK": str(args.node_rank),
        "CROSS_SIZE": str(args.nnodes),
        "MASTER_ADDR": args.master_addr,
        "MASTER_PORT": str(args.master_port),
    }


class Launch:
    """The local ranks of one node, and what the launcher has been asked to do with them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop_at: float | None = None  # monotonic time of the first stop signal
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        """Start the ranks with the stop signals blocked: one that comes while a rank still imports stays pending
        until the rank's handler is set (`StopRequest.install` unblocks them), instead of killing it."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a child inherits the mask through exec
        try:
            for i in range(self.args.nproc_per_node):
                cmd = [sys.executable, "-u", "-m", self.args.module, f"--local_rank={i}", *self.args.args]
                self.procs.append(subprocess.Popen(cmd, env=rank_env(self.args, i)))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # ours now runs on_signal for what came meanwhile

    def on_signal(self, signum: int, frame: object) -> None:
        """First SIGTERM / SIGUSR1: pass it to every rank that may not have it (they ignore a second one)."""
        name = signal.Signals(signum).name
        if self.stop_at is not None:
            _say(f"{name} again: the ranks are already saving")
            return
        self.stop_at = time.monotonic()
        _say(f"{name}: ranks finish the current step and save (up to {self.args.stop_timeout:g} s)")
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # also ends a stopped (SIGSTOP) process
        for p in self.procs:
            p.wait()

    def wait(self) -> int:
        """Until every rank has exited; returns the launch's exit code."""
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, exit_codes.OK, exit_codes.PREEMPTED)]
            if failed:
                i, code = failed[0]
                _say(f"rank {self.args.node_rank * self.args.nproc_per_node + i} exited with {code}: stopping the rest")
                self.kill_all()
                return code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
            if all(c is not None for c in codes):
                return exit_codes.PREEMPTED if exit_codes.PREEMPTED in codes else exit_codes.OK
            if self.stop_at is not None and time.monotonic() - self.stop_at > self.args.stop_timeout:
                _say(f"the ranks did not finish saving within --stop-timeout={self.args.stop_timeout:g} s: killed")
                self.kill_all()
                return exit_codes.FAILED
            time.sleep(POLL_S)


def _say(msg: str) -> None:
    print(f"[pretrain.launch] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launch = Launch(args)
    for s in STOP_SIGNALS:
        signal.signal(s, launch.on_signal)
    try:
        launch.start()
        return launch.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the ranks too (same terminal process group); do not leave them
        launch.kill_all()
        return 130


if __name__ == "__main__":
    sys.exit(main())
