"""Loader workers' memory: resident memory (PSS) of the ranks and of their loader workers while the full-size
ViT-H/14 recipe trains on 2 CPU ranks, this tree against the tree of commit REV, in the same run; and what starting
the workers from a fork server costs.

    python -m benchmarks.bench_worker_memory [--baseline REV] [--scenarios steps,epochs] [--json OUT]

  steps   `configs/vit_h14_i21k.yaml`, 2 CPU ranks, data.num_workers=1, model.num_classes=2, micro-batch 1 (global
          batch 2), 2 steps (rank 0 is stopped after step 2 by `PRETRAIN_FAULT=step:2`: no 9 GB checkpoint is saved)
  epochs  the same over 4 steps = 2 epochs of a 4-sample shard set, with an evaluation pass after every step (the
          evaluation loader's workers start after the model and its optimizer states exist)
  startup seconds from a loader's creation to its first batch (digits shards, 2 workers, a fresh process each):
          workers from a cold fork server (the process's first loader), from a running one (its second), and
          workers forked from the process

Every second the launch's processes are read from /proc (`smaps_rollup`): the ranks (children of DeepSpeed's
`launcher.launch`) and everything below them (loader workers, the fork server and its workers, Python's resource
tracker). Reported at the moment of the largest total: the ranks' RSS and PSS, the workers' PSS, and the total PSS
over the ranks' RSS (PSS splits a shared page between the processes that map it, so the sum of PSS is what the
machine holds). RAM: ViT-H/14 on 2 ranks takes 13-19 GB; run it only with that much free, never from a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/vit_h14_i21k.yaml"
SCENARIOS = {
    "steps": {"steps": 3, "stop_after": 2, "eval": False},
    "epochs": {"steps": 5, "stop_after": 4, "eval": True},
}


def tiny_shards(tmp: Path) -> Path:
    """6 photos in 2 classes sharded with 1 held out per class: 4 training samples (2 steps of 2: one epoch)."""
    from data_tools.digits import write_photos
    from data_tools.shard import shard

    out = tmp / "shards"
    shard(write_photos(tmp / "photos", classes=2, per_class=3), out, workers=1, val_per_class=1, progress=False)
    return out


def _kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB; (0, 0) when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split()[:2] for line in f if line.startswith(("Rss:", "Pss:")))
        return int(fields["Rss:"]), int(fields["Pss:"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def _tree(root: int) -> tuple[list[int], list[int]]:
    """(ranks, everything below the ranks) of a DeepSpeed launch whose runner is `root`."""
    import psutil

    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return [], []
    ranks = []
    for p in procs:
        try:
            if "deepspeed.launcher.launch" in " ".join(p.cmdline()):
                ranks += p.children()
        except psutil.Error:
            continue
    below = []
    for r in ranks:
        try:
            below += [c.pid for c in r.children(recursive=True)]
        except psutil.Error:
            continue
    return [r.pid for r in ranks], below


class Sampler(threading.Thread):
    """Reads the launch's memory every `every_s` seconds; keeps the sample with the largest total PSS."""

    def __init__(self, root: int, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.every_s, self.stop, self.peak = root, every_s, threading.Event(), None

    def run(self) -> None:
        while not self.stop.is_set():
            ranks, below = _tree(self.root)
            r, w = [_kib(p) for p in ranks], [_kib(p) for p in below]
            sample = {
                "ranks": len(ranks),
                "ranks_rss_gib": sum(x[0] for x in r) / 2**20,
                "ranks_pss_gib": sum(x[1] for x in r) / 2**20,
                "workers": len(below),
                "workers_pss_gib": sum(x[1] for x in w) / 2**20,
            }
            sample["total_pss_gib"] = sample["ranks_pss_gib"] + sample["workers_pss_gib"]
            if len(ranks) == 2 and (self.peak is None or sample["total_pss_gib"] > self.peak["total_pss_gib"]):
                self.peak = sample
            self.stop.wait(self.every_s)


def launch(tree: Path, shards: Path, out: Path, scenario: dict) -> dict:
    """One launch of the recipe in `tree`; the peak sample and the ratios."""
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    val = f"data.val_shards={shards}" if scenario["eval"] else "data.val_shards="
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_port()), "--module", "pretrain.train"]
    cmd += ["--config", RECIPE, f"data.train_shards={shards}", val, "data.num_workers=1", "model.num_classes=2"]
    cmd += ["train.micro_batch_size=1", "train.global_batch_size=2", f"train.steps={scenario['steps']}"]
    cmd += ["train.eval_every_steps=1", "train.eval_batches=1", f"run.output_dir={out}", "train.resume=none"]
    cmd += ["log.every_steps=1", "log.tensorboard=false", "checkpoint.every_steps=1000"]
    env = {**os.environ, "PYTHONPATH": str(tree), "PRETRAIN_FAULT": f"step:{scenario['stop_after']}"}
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        sampler.start()
        proc.wait()
        sampler.stop.set()
        sampler.join()
    text = (out.parent / f"{out.name}.log").read_text()
    steps = text.count("train step ") + 1  # rank 0 is killed after the last step, before it logs it
    peak = sampler.peak or {}
    if steps < scenario["stop_after"] or not peak:
        raise RuntimeError(f"the launch in {tree} ran {steps} steps:\n{text[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in peak.items()},
        "total_over_ranks_rss": round(peak["total_pss_gib"] / peak["ranks_rss_gib"], 3),
        "total_over_ranks_pss": round(peak["total_pss_gib"] / peak["ranks_pss_gib"], 3),
        "steps_run": steps,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _port() -> int:
    from pretrain.ports import free_port

    return free_port()


STARTUP = """
import sys, time
from pretrain.config import DataConfig
from pretrain.data import build_train_loader
import pretrain.data.loader as loader_module
from torch.utils.data import DataLoader
from pretrain.data.workers import ignore_stop_signals
if sys.argv[2] == "fork":  # the workers forked from this process, as before the fork server
    def forked(ds, workers, pin, prefetch):
        return DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context="fork",
                          prefetch_factor=prefetch, worker_init_fn=ignore_stop_signals)
    loader_module._dataloader = forked
if __name__ == "__main__":
    for _ in range(2):  # the first starts the fork server (cold), the second finds it running (warm)
        t0 = time.perf_counter()
        with build_train_loader(DataConfig(train_shards=sys.argv[1], num_workers=2), img_size=32, batch_size=8) as l:
            next(iter(l))
        print(time.perf_counter() - t0)
"""


def startup(tmp: Path, repeats: int = 3) -> dict:
    """Seconds from building a loader to its first batch (fresh process, best of `repeats`): fork server vs fork."""
    from data_tools.digits import write_digits
    from data_tools.shard import shard

    shards = tmp / "digits-shards"
    if not shards.exists():
        shard(write_digits(tmp / "digits"), shards, workers=1, progress=False)
    script = tmp / "startup.py"
    script.write_text(STARTUP)
    best = {"forkserver_cold": 1e9, "forkserver_warm": 1e9, "fork": 1e9}
    for _ in range(repeats):
        for kind in ("forkserver", "fork"):
            done = subprocess.run([sys.executable, str(script), str(shards), kind], capture_output=True, text=True)
            cold, warm = (float(x) for x in done.stdout.split()[-2:])
            if kind == "fork":
                best["fork"] = min(best["fork"], cold, warm)
            else:
                best["forkserver_cold"], best["forkserver_warm"] = (
                    min(best["forkserver_cold"], cold),
                    min(best["forkserver_warm"], warm),
                )
    return {f"{k}_s": round(v, 3) for k, v in best.items()}


def archive(rev: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=data, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", metavar="REV", help="also measure the tree of this commit (old vs new)")
    p.add_argument("--scenarios", default="steps,epochs,startup", help="comma-separated: steps, epochs, startup")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT")
    args = p.parse_args(argv)
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_worker_memory-") as tmp:
        tmp = Path(tmp)
        trees = {"this": ROOT, **({"baseline": archive(args.baseline, tmp / "baseline")} if args.baseline else {})}
        shards = tiny_shards(tmp)
        for name in args.scenarios.split(","):
            if name == "startup":
                result["startup"] = startup(tmp)
                continue
            for tree, path in trees.items():  # the baseline first would not change the figures: one at a time
                result.setdefault(name, {})[tree] = launch(path, shards, tmp / f"{name}_{tree}", SCENARIOS[name])
                print(name, tree, json.dumps(result[name][tree]), flush=True)
    text = json.dumps({"baseline_rev": args.baseline, **result}, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
