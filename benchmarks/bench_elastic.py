"""Elastic stream figures: state size, remote resume cost, repeats after a change of layout, shuffle quality.

    python -m benchmarks.bench_elastic [--baseline REV] [--json OUT]

Every measurement goes through the loader's public API (`build_train_loader`, `state_dict`, `load_state_dict`,
`batches_per_epoch`, `epoch`), so the same code measures today's stream and the elastic one. `--baseline REV` also
runs it on the tree of commit REV (`git archive` into a temporary folder, imported first on `PYTHONPATH` in a
subprocess) and prints both side by side: old vs new in the same run, on the same machine.

Data: scikit-learn digits sharded by `data_tools` with 10 % held out (1,617 training samples in 9 shards of at most
200, with `.idx` indexes): the setup of issue 24.
  state     the stream state a 2-rank x 2-worker run stores at 40 % of an epoch (buffer 200 and 2,000), JSON and
            torch.save bytes; computed for 512 ranks x 8 workers x buffer 2,000 on a 14.2 M-sample epoch
  resume    a 2-rank run (0 workers: one reader per rank, every request is the reader's) saved at 90 % of the epoch,
            resumed over HTTP (`tests.helpers.servers.ShardServer`) on 2 ranks and on 1: per rank, GET requests,
            bytes and samples touched until its first batch, and per canonical stream (the elastic tree: C = 2, so
            one stream per rank on 2 ranks, two on 1; today: one reader per rank)
  overlap   2 ranks x 2 workers, buffer 200, global batch 32, stopped at 40 % and resumed on 1 and on 4 ranks: keys
            read twice in the epoch's worth of global batches and until the resumed epoch's end, keys skipped,
            global batches equal (as sets) to the uninterrupted run's
  quality   positions (`benchmarks.shuffle_quality`): distinct classes and shards per 256-sample global batch
            and per 32-sample micro-batch on a class-sorted shard set, today's order, the elastic one, a permutation;
            and the same measured on the real loader's keys (class-sorted shards written here)
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from data_tools import format as fmt
from data_tools.digits import write_digits
from data_tools.shard import shard
from pretrain.config import DataConfig
from pretrain.data import build_train_loader
from tests.helpers.servers import ShardServer

SCALE = {"ranks": 512, "workers": 8, "buffer": 2000, "samples": 14_200_000}


# ------------------------------------------------------------------------ the two places that know the API


def loader_for(cfg: DataConfig, *, rank: int, world: int, batch: int, workers: int):
    """One rank's training loader (micro-batch `batch`, global batch world x batch)."""
    return build_train_loader(
        cfg, img_size=8, batch_size=batch, rank=rank, world_size=world, seed=0, num_workers=workers, pin_memory=False
    )


def stored(states: list) -> object:
    """What the checkpoint keeps of the ranks' states: the loader's merge of them (the elastic tree: one record),
    else one state when all ranks hold the same, else the list."""
    from pretrain.data import TrainLoader

    if hasattr(TrainLoader, "merge"):
        return TrainLoader.merge(states)
    return states[0] if all(s == states[0] for s in states) else states


# ------------------------------------------------------------------------------------------------- helpers


def digits_shards(tmp: Path) -> Path:
    out = tmp / "shards"
    shard(write_digits(tmp / "digits"), out, workers=1, samples_per_shard=200, val_fraction=0.1, progress=False)
    return out


def take(loader, n: int, close: bool = True) -> tuple[list[list[str]], object]:
    """Keys of the next n batches of a loader, and its state after them."""
    it = iter(loader)
    keys = [next(it)["key"] for _ in range(n)]
    state = loader.state_dict()
    if close:
        it.close()
    return keys, state


def to_end_of_epoch(loader, epoch: int) -> list[list[str]]:
    """Keys of every batch a (resumed) loader yields while it is in `epoch`."""
    it, out = iter(loader), []
    while True:
        keys = next(it)["key"]
        if loader.epoch != epoch:
            it.close()
            return out
        out.append(keys)


def sizes(obj: object) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return {"json_bytes": len(json.dumps(obj)), "torch_save_bytes": len(buf.getvalue())}


def samples_touched(log: list[tuple[str, int, int]], root: Path) -> int:
    """Samples whose bytes the served (path, start, stop) ranges of `.tar` files overlap, counted per range."""
    n = 0
    for path, a, b in log:
        if path.endswith(".tar"):
            offsets = fmt.parse_index((root / fmt.index_name(path.lstrip("/"))).read_bytes())
            n += sum(1 for lo, hi in zip(offsets, offsets[1:], strict=False) if lo < b and a < hi)
    return n


# ------------------------------------------------------------------------------------------- measurements


def state_size(shards: Path) -> dict:
    """Stored stream state of a 2-rank x 2-worker run at 40 % of an epoch; and computed at scale."""
    out = {}
    for buffer in (200, 2000):
        cfg = DataConfig(train_shards=str(shards), shuffle_buffer=buffer, num_workers=2)
        n = loader_for(cfg, rank=0, world=2, batch=16, workers=2).batches_per_epoch
        states = [take(loader_for(cfg, rank=r, world=2, batch=16, workers=2), int(0.4 * n))[1] for r in range(2)]
        out[f"buffer_{buffer}"] = sizes(stored(states))
        if buffer == 200:
            out["at_scale_today"] = today_at_scale(states[0])
    out["at_scale_elastic"] = elastic_at_scale()
    return out


def today_at_scale(rank_state: dict) -> dict:
    """Today's stored state for 512 ranks x 8 workers, buffer 2,000: every worker holds 2,000 positions of a 14.2 M
    epoch and a 625-int RNG state; each rank's dict is all-gathered and stored; the same dict rides in every batch."""
    if "workers" not in rank_state:
        return {"skipped": "no per-worker state in this tree"}
    rng = random.Random(0)
    workers = []
    for _ in range(SCALE["workers"]):  # distinct objects: pickle would store a repeated one once
        worker = copy.deepcopy(rank_state["workers"][0])
        worker["buffer"]["held"] = [rng.randrange(SCALE["samples"]) for _ in range(SCALE["buffer"])]
        worker["buffer"]["rng"] = list(random.Random(rng.random()).getstate())
        worker["buffer"]["cursor"] = worker["watermark"] = SCALE["samples"] // 2
        workers.append(worker)
    per_rank = sizes(dict(rank_state, workers=workers))
    meta = sizes({"buffer": worker["buffer"], "watermark": 1, "raw": 1, "worker": 0, "epoch": 0})
    return {
        **{k: v * SCALE["ranks"] for k, v in per_rank.items()},
        "per_batch_meta_torch_save_bytes": meta["torch_save_bytes"],
        **SCALE,
    }


def elastic_at_scale() -> dict:
    """The elastic state at 512 x 8 (C = 4,096, G = 4,096): the same record for any number of ranks and workers."""
    try:
        from pretrain.data.elastic_state import StreamState
    except ImportError:
        return {"skipped": "no elastic_state in this tree"}
    state = StreamState("epoch", 0, 4096, 4096, SCALE["buffer"], "drop", SCALE["samples"], 3, 1234, 57, (17, 4242))
    return sizes(state.to_dict())


def overlap(shards: Path, buffer: int = 200, stop: float = 0.4, new_worlds: tuple[int, ...] = (1, 4)) -> dict:
    """Keys read twice / skipped when a 2-rank x 2-worker run (global batch 32) resumes on another world size."""
    cfg = DataConfig(train_shards=str(shards), shuffle_buffer=buffer, num_workers=2)
    g, world = 32, 2
    n = loader_for(cfg, rank=0, world=world, batch=g // world, workers=2).batches_per_epoch
    k = int(stop * n)
    full = [take(loader_for(cfg, rank=r, world=world, batch=g // world, workers=2), n + 2)[0] for r in range(world)]
    ref = [set().union(*(full[r][i] for r in range(world))) for i in range(n + 2)]  # global batches as sets
    states = [take(loader_for(cfg, rank=r, world=world, batch=g // world, workers=2), k)[1] for r in range(world)]
    out = {"epoch_batches": n, "stopped_after": k, "epoch_samples": n * g}
    for new in new_worlds:
        ranks = []
        for r in range(new):
            loader = loader_for(cfg, rank=r, world=new, batch=g // new, workers=2)
            loader.load_state_dict(stored(states))
            ranks.append(to_end_of_epoch(loader, 0))
        after = [sum((ranks[r][i] for r in range(new)), []) for i in range(len(ranks[0]))]
        before = [key for i in range(k) for key in ref[i]]
        first_epoch = collections.Counter(before + [key for b in after[: n - k] for key in b])
        whole = collections.Counter(before + [key for b in after for key in b])
        out[f"resumed_on_{new}"] = {
            "read_twice_in_epoch_worth": sum(1 for v in first_epoch.values() if v > 1),
            "read_twice_until_epoch_end": sum(1 for v in whole.values() if v > 1),
            "global_batches_until_epoch_end": k + len(after),
            "skipped": len(set().union(*ref[:n]) - set(whole)),
            "batches_equal_to_uninterrupted": sum(set(b) == ref[k + i] for i, b in enumerate(after[: n - k])),
            "batches_compared": n - k,
        }
    return out


def remote_resume(shards: Path, buffer: int = 200, fraction: float = 0.9) -> dict:
    """GETs, bytes and samples until each rank's first batch after a resume at 90 % over HTTP (0 workers)."""
    cfg = DataConfig(train_shards=str(shards), shuffle_buffer=buffer, num_workers=0)
    n = loader_for(cfg, rank=0, world=2, batch=16, workers=0).batches_per_epoch
    k = int(fraction * n)
    runs = [take(loader_for(cfg, rank=r, world=2, batch=16, workers=0), k + 1) for r in range(2)]
    expected = set(runs[0][0][k]) | set(runs[1][0][k])  # global batch k of the uninterrupted run
    states = [take(loader_for(cfg, rank=r, world=2, batch=16, workers=0), k)[1] for r in range(2)]
    merged = stored(states)
    streams = merged.get("streams") if isinstance(merged, dict) else None  # elastic: C; today: one reader per rank
    out: dict = {"position_batches": k, "epoch_batches": n, "buffer": buffer, "batch": 16, "readers": 2}
    with ShardServer(shards) as srv:
        remote = DataConfig(train_shards=srv.url + "/", shuffle_buffer=buffer, num_workers=0, io_chunk_bytes=1 << 16)
        for world in (2, 1):
            per_rank, first = [], set()
            for r in range(world):
                srv.reset_counts()
                loader = loader_for(remote, rank=r, world=world, batch=32 // world, workers=0)
                loader.load_state_dict(stored(states))
                keys, _ = take(loader, 1)
                first |= set(keys[0])
                log = list(srv.log)
                per_rank.append(
                    {
                        "tar_gets": sum(p.endswith(".tar") for p, _, _ in log),
                        "idx_gets": sum(p.endswith(fmt.INDEX_SUFFIX) for p, _, _ in log),
                        "other_gets": sum(not p.endswith((".tar", fmt.INDEX_SUFFIX)) for p, _, _ in log),
                        "bytes": sum(b - a for _, a, b in log),
                        "samples_touched": samples_touched(log, shards),
                    }
                )
            readers = streams or world
            out[f"on_{world}_ranks"] = {
                "per_rank": per_rank,
                "per_stream": {key: sum(x[key] for x in per_rank) / readers for key in per_rank[0]},
                "first_global_batch_as_uninterrupted": first == expected,
            }
    out["bound_samples_per_stream"] = 3 * (buffer + 2 * 16)
    return out


def run() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_elastic-"))
    try:
        shards = digits_shards(tmp)
        from benchmarks.shuffle_quality import loader_quality, quality, today_replica_matches

        return {
            "tree": os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["pretrain"].__file__))),
            "state": state_size(shards),
            "resume": remote_resume(shards),
            "overlap": overlap(shards),
            "today_replica_matches_loader": today_replica_matches(shards, loader_for),
            "quality": quality(),
            "loader_quality": loader_quality(tmp, loader_for),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def baseline(rev: str) -> dict:
    """`run()` on the tree of commit `rev`, in a subprocess that imports that tree first."""
    root = Path(__file__).resolve().parents[1]
    tree = Path(tempfile.mkdtemp(prefix="bench_elastic-base-"))
    try:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        for name in ("bench_elastic.py", "shuffle_quality.py"):  # this measuring code, that tree's stream
            shutil.copy(Path(__file__).with_name(name), tree / "benchmarks" / name)
        env = dict(os.environ, PYTHONPATH=str(tree))
        cmd = [sys.executable, "-m", "benchmarks.bench_elastic", "--json", "-"]
        done = subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
        return json.loads(done.stdout)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", metavar="REV", help="also measure the tree of this commit (old vs new)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT (- for stdout only)")
    args = p.parse_args(argv)
    result = {"this": run()}
    if args.baseline:
        result["baseline"] = {"rev": args.baseline, **baseline(args.baseline)}
    text = json.dumps(result if args.baseline else result["this"], indent=1)
    if args.json and args.json != "-":
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
