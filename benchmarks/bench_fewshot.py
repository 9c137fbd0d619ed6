"""Few-shot evaluation cost (issue 25): one evaluation against one training step on CPU, and the fit at ImageNet-1k
size (the planner's `few-shot evaluation` row reads the latter).

    python -m benchmarks.bench_fewshot [--steps 40] [--every 10] [--skip-run] [--json OUT]

1. A 1-rank `pretrain.train` run of configs/tiny_digits.yaml on the digits shards with few-shot evaluation (1, 5, 10
   shots; 100 train and the 270 held-out images) every `--every` steps: the median evaluation (`fewshot/time_s`,
   after the first, which also reads the shot pool's labels) against the median training step (global batch /
   images/s), measured in the same run.
2. The fit alone at ImageNet-1k size: 1000 classes x 25 shots of 1024-d features (ViT-L/16's width), 10,000 test
   images, shots 1, 5, 10, 25, the L2 weight chosen on held-out shots: seconds of numpy float64 on this CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_tools.digits import write_digits
from data_tools.fsutil import atomic_write
from data_tools.shard import shard
from pretrain.fewshot.ridge import fewshot_fit
from pretrain.fewshot.sets import draw_shots

ROOT = Path(__file__).resolve().parents[1]


def run_cost(steps: int, every: int) -> dict:
    """Median few-shot evaluation vs median training step of a 1-rank digits run (seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        shards = t / "shards"
        shard(write_digits(t / "digits"), shards, workers=1, samples_per_shard=200, val_fraction=0.15, progress=False)
        run = t / "run"
        cmd = [sys.executable, "-m", "pretrain.train", "--config", "configs/tiny_digits.yaml"]
        cmd += [f"data.train_shards={shards}", f"data.val_shards={shards}", f"run.output_dir={run}"]
        cmd += [f"train.steps={steps}", "log.every_steps=1", f"checkpoint.every_steps={steps}", "log.tensorboard=false"]
        cmd += ["train.global_batch_size=32", f"fewshot.sets=digits={shards}", f"fewshot.every_steps={every}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [32 / r["images_per_s"] for r in rows if r["kind"] == "train" and r["step"] > 1]
    fs = [r["time_s"] for r in rows if r["kind"] == "fewshot"]
    step, ev = statistics.median(train), statistics.median(fs[1:] or fs)
    return {"step_s": step, "fewshot_s": ev, "first_fewshot_s": fs[0], "ratio": ev / step, "evaluations": len(fs)}


def fit_cost(classes: int = 1000, shots: tuple[int, ...] = (1, 5, 10, 25), dim: int = 1024, test: int = 10_000) -> dict:
    """Seconds of the fits of one ImageNet-1k-sized set (synthetic clustered features)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = np.repeat(np.arange(classes), max(shots))
    x = centres[labels] + 3 * rng.normal(size=(len(labels), dim)).astype(np.float32)
    ty = rng.integers(0, classes, size=test)
    tx = centres[ty] + 3 * rng.normal(size=(test, dim)).astype(np.float32)
    d = draw_shots(labels, classes, max(shots), seed=0)
    t0, acc = time.perf_counter(), {}
    for k in shots:
        pos, y, index = d.shots(k)
        acc[k] = fewshot_fit(x[pos].astype(np.float64), y, index, k, tx, ty, classes).accuracy
    return {"seconds": time.perf_counter() - t0, "accuracy": acc, "classes": classes, "dim": dim, "test": test}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_fewshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--skip-run", action="store_true", help="only the ImageNet-sized fit")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    out = {"fit": fit_cost()}
    f = out["fit"]
    print(f"fit, {f['classes']} classes x 25 shots x {f['dim']}-d, {f['test']} test images: {f['seconds']:.1f} s")
    if not a.skip_run:
        out["run"] = r = run_cost(a.steps, a.every)
        print(
            f"digits, 1 CPU rank: one few-shot evaluation {r['fewshot_s']:.2f} s (first, with the label pass: "
            f"{r['first_fewshot_s']:.2f} s) vs one training step {r['step_s']:.3f} s: {r['ratio']:.1f} steps"
        )
    if a.json:
        atomic_write(a.json, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
