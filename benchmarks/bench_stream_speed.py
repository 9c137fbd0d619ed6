"""Loader speed, this tree against the tree of commit REV and webdataset's own pipeline: images per CPU-second,
in-process with one torch thread (0 workers: the stream runs in the measuring process), on the same realistic JPEGs
and the same training transform (RandomResizedCrop 224 + flip, uint8), batch 32, shuffle buffer 256.

    python -m benchmarks.bench_stream_speed --baseline REV [--batches 40] [--repeats 3]

Each side runs in a fresh process (`PYTHONPATH` = its tree), the three alternating, `--repeats` rounds, best kept;
the first batch (start-up) is not timed. webdataset's pipeline, as users write it:
`WebDataset(urls).shuffle(256).decode("pil").to_tuple("jpg", "cls")` + torchvision v2
(`PILToTensor`, `RandomResizedCrop(224)`, `RandomHorizontalFlip`), batched by 32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_worker_memory import archive

OURS = """
import sys, time, torch
torch.set_num_threads(1)
from pretrain.config import DataConfig
from pretrain.data import build_train_loader
cfg = DataConfig(train_shards=sys.argv[1], num_workers=0, shuffle_buffer=256)
it = iter(build_train_loader(cfg, img_size=224, batch_size=32, seed=0, pin_memory=False))
next(it)
t0, n = time.process_time(), 0
for _ in range(int(sys.argv[2])):
    n += next(it)["image"].shape[0]
print(n / (time.process_time() - t0))
"""
WEBDATASET = """
import sys, time, glob, torch
import webdataset as wds
from torchvision.transforms import v2
torch.set_num_threads(1)
tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])
urls = sorted(glob.glob(sys.argv[1] + "/train-*.tar"))
ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat().shuffle(256).decode("pil")
ds = ds.to_tuple("jpg", "cls").map_tuple(tf, int).batched(32)
it = iter(ds)
next(it)
t0, n = time.process_time(), 0
for _ in range(int(sys.argv[2])):
    n += next(it)[0].shape[0]
print(n / (time.process_time() - t0))
"""


def measure(script: str, tree: Path, shards: Path, batches: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(shards), str(batches)], capture_output=True, text=True, env=env, cwd=tree
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return float(done.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", metavar="REV", required=True)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from data_tools.digits import write_photos
    from data_tools.shard import shard

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bench_stream_speed-") as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"
        shard(
            write_photos(tmp / "photos", classes=4, per_class=125, size=(500, 375)),
            shards,
            workers=1,
            samples_per_shard=64,
            progress=False,
        )
        sides = {
            "this": (OURS, root),
            "baseline": (OURS, archive(args.baseline, tmp / "base")),
            "webdataset": (WEBDATASET, root),
        }
        best = dict.fromkeys(sides, 0.0)
        for _ in range(args.repeats):  # alternate: load from other processes hits every side alike
            for name, (script, tree) in sides.items():
                best[name] = max(best[name], measure(script, tree, shards, args.batches))
                print(name, round(best[name], 1), flush=True)
    out = {
        "img_per_cpu_s": {k: round(v, 1) for k, v in best.items()},
        "this_vs_baseline": round(best["this"] / best["baseline"], 3),
        "this_vs_webdataset": round(best["this"] / best["webdataset"], 3),
        "baseline_vs_webdataset": round(best["baseline"] / best["webdataset"], 3),
        "load_average": os.getloadavg(),
        "baseline_rev": args.baseline,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
