"""Leave /dev/shm as we found it: DeepSpeed's CPU shared-memory all-reduce buffers.

Under the deepspeed launcher on CPU (it sets LOCAL_SIZE to the number of local ranks), `deepspeed.init_distributed`
builds `TorchBackend`, whose constructor calls `shm_comm_op.initialize(world, rank)`; when LOCAL_SIZE equals the world
size, `shm_initialize` (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates
`/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` (69,206,024 bytes) with
`shm_open(O_CREAT)` + `write`, keeps that descriptor open, maps every rank's buffer, and never unlinks any: its
`shared_close` is never called. The buffer only serves `inference_all_reduce`, which training never calls.

So every launch of ours calls `install()` first (`pretrain.train.lifecycle.run_rank` does): it removes the buffers
of dead runs (no live process maps or holds one open) and unlinks this rank's own buffer at exit (normal exit,
exception, SIGTERM). Unlinking only drops the name: peers that mapped the buffer keep their mapping, and the kernel
frees the memory when the last one exits.
"""

from __future__ import annotations

import atexit
import os
import signal
from collections.abc import Iterable
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"
LEDGER_ENV = "PRETRAIN_SHM_LEDGER"  # a folder: each launch records there the buffer name it will create (tests)


def buffer_name(rank: int, addr: str, port: str, uid: int | None = None) -> str:
    """The name `shm_initialize` gives rank `rank`'s buffer (`%s_%d_%s_%s` then `_%d`)."""
    return f"{PREFIX}_{os.getuid() if uid is None else uid}_{addr}_{port}_{rank}"


def own_buffer(shm_dir: Path = SHM_DIR) -> Path | None:
    """This rank's buffer, from the environment the launcher set (RANK, MASTER_ADDR, MASTER_PORT); None outside one."""
    rank, port = os.environ.get("RANK"), os.environ.get("MASTER_PORT")
    if rank is None or port is None:
        return None
    return shm_dir / buffer_name(int(rank), os.environ.get("MASTER_ADDR", ""), port)


def our_buffers(shm_dir: Path = SHM_DIR) -> list[Path]:
    """The buffers of this user in `shm_dir` (DeepSpeed puts the uid in the name)."""
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    return sorted(shm_dir / n for n in names if n.startswith(f"{PREFIX}_{os.getuid()}_"))


def _held_by(pid: str) -> set[str]:
    """Base names of the buffers process `pid` maps or holds open."""
    proc = Path("/proc") / pid
    held = set()
    for line in (proc / "maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        name = fields[-1].removesuffix(" (deleted)").rsplit("/", 1)[-1] if len(fields) == 6 else ""
        if name.startswith(PREFIX):
            held.add(name)
    for fd in os.listdir(proc / "fd"):
        try:
            name = os.readlink(proc / "fd" / fd).removesuffix(" (deleted)").rsplit("/", 1)[-1]
        except OSError:  # closed since the listing
            continue
        if name.startswith(PREFIX):
            held.add(name)
    return held


def held_names() -> set[str]:
    """Base names of the buffers any live process maps or holds open.

    Processes whose /proc entries we may not read (init, other users', non-dumpable ones) are skipped: ranks are
    ordinary processes of the user that launched them, and DeepSpeed creates the buffers with mode 0600.
    """
    held: set[str] = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                held |= _held_by(pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError):  # exited during the scan, or not ours
                continue
    return held


def remove_orphans(candidates: Iterable[Path] | None = None) -> list[Path]:
    """Unlink the candidate buffers (default: all of this user's) that no live process maps or holds open.

    The candidates are listed before the processes are scanned: a buffer that exists at listing time was created by
    a process that, if still alive, holds its descriptor (DeepSpeed never closes it), so it shows up in the scan.
    """
    paths = our_buffers() if candidates is None else [Path(p) for p in candidates]
    if not paths:
        return []
    held = held_names()
    removed = []
    for p in paths:
        if p.name not in held:
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                continue
    return removed


def unlink_own() -> None:
    """Unlink this rank's buffer if it exists. Safe once every rank has finished `init_distributed`."""
    own = own_buffer()
    if own is not None:
        own.unlink(missing_ok=True)


def _on_sigterm(signum: int, frame: object) -> None:
    """Unlink, then die of SIGTERM as if no handler were installed (the launcher reads the signal from the code)."""
    unlink_own()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def install() -> None:
    """Call first in every launched process: remove dead runs' buffers, unlink our own at exit and on SIGTERM.

    The SIGTERM handler is only installed where none is (a later handler, e.g. for preemption, takes precedence and
    the atexit hook still runs if it exits normally). Calling it again is harmless.
    """
    remove_orphans()
    own = own_buffer()
    if own is None:
        return
    ledger = os.environ.get(LEDGER_ENV)
    if ledger:
        Path(ledger, own.name).touch()
    atexit.register(unlink_own)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
