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

The rendezvous store (torch.distributed's TCPStore) is hosted by node 0's launcher, not by rank 0, the way torchrun
does it (the ranks are its clients: TORCHELASTIC_USE_AGENT_STORE). Without `--master-port` (one node) it takes a free
port the moment it starts, and another if that one was taken between the choice and the bind; it holds the port
until its last rank has exited, so a launch that follows never meets a port still held by a rank that is saving.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from pretrain import exit_codes
from pretrain.exit_codes import STOP_SIGNALS
from pretrain.ports import free_port

if TYPE_CHECKING:
    from torch.distributed import TCPStore

POLL_S = 0.2
PORT_TRIES = 10
"""Free ports tried when the one chosen is taken before the store binds it."""


class LaunchError(Exception):
    """A launch that cannot start, for a reason the user can fix (one line, exit 2)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain.launch", description="Start this node's training ranks; forward stop signals; bound the end."
    )
    p.add_argument("--nproc-per-node", type=int, default=None, help="ranks on this node (default: GPUs, or 1)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (rendezvous)")
    p.add_argument(
        "--master-port", type=int, default=None, help="rendezvous port on node 0 (one node: default a free port)"
    )
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
    if args.master_port is None and args.nnodes > 1:
        p.error("--master-port is needed with --nnodes > 1: every node names the same rendezvous port")
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
        # node 0's launcher hosts the store (`host_store`); every rank is a client (torch's env:// rendezvous)
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "0",  # read alongside it by torch < 2.6 (a key prefix)
    }


def host_store(args: argparse.Namespace) -> TCPStore | None:
    """Node 0: the rendezvous store on `--master-port`, or on a free port (then set in `args.master_port`).

    A chosen port that another process takes between the choice and the bind is replaced by another one.

    Raises:
        LaunchError: the port the user gave is taken, or no chosen port could be bound.
    """
    if args.node_rank != 0:
        return None
    from torch.distributed import DistNetworkError, TCPStore

    given = args.master_port
    for _ in range(1 if given else PORT_TRIES):
        port = given or free_port()
        try:
            store = TCPStore(args.master_addr, port, is_master=True, wait_for_workers=False)
        except DistNetworkError as e:
            if given:
                raise LaunchError(f"--master-port {port} cannot be used ({_cause(e)}); pass another port") from None
            _say(f"port {port} was taken before the rendezvous store could bind it; taking another")
            continue
        args.master_port = port
        return store
    raise LaunchError(f"no free port could be bound for the rendezvous store in {PORT_TRIES} tries")


def _cause(e: Exception) -> str:
    """The last part of a TCPStore bind error (`..., name: EADDRINUSE, message: address already in use`)."""
    return str(e).rsplit("message: ", 1)[-1]


class Launch:
    """The local ranks of one node, and what the launcher has been asked to do with them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.store: TCPStore | None = None  # node 0: the rendezvous store, served until this launch ends
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


def wait_group_gone(pgid: int, timeout_s: float = 120.0) -> bool:
    """Wait until no process of the process group `pgid` is left (a launch started with `start_new_session`, after
    its launcher returned: loader workers may still be ending); past `timeout_s` the rest is killed.

    Returns:
        True when the group ended by itself, False when what was left had to be killed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(POLL_S)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    while True:  # SIGKILL cannot be refused: only the kernel's own clean-up is left to wait for
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(POLL_S)


def _say(msg: str) -> None:
    print(f"[pretrain.launch] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launch = Launch(args)
    for s in STOP_SIGNALS:
        signal.signal(s, launch.on_signal)
    # A stop signal that comes while the store binds (importing torch takes seconds) waits until the ranks exist.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        try:
            launch.store = host_store(args)
            launch.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # on_signal now runs for what came meanwhile
        return launch.wait()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.USAGE
    except KeyboardInterrupt:  # Ctrl-C reached the ranks too (same terminal process group); do not leave them
        launch.kill_all()
        return 130


if __name__ == "__main__":
    sys.exit(main())
